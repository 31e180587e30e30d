"""Circuit graphs in the Neuronpedia / circuit-tracer JSON format, and their pictures.

The file format (what circuit-tracer's ``create_graph_files`` writes and Neuronpedia's
graph viewer reads)::

    {
      "metadata": {"slug", "scan", "prompt", "prompt_tokens", "node_threshold", ...},
      "qParams":  {"pinnedIds": [...], "supernodes": [[label, node_id, ...], ...],
                   "linkType": "both", "clickedId": "", "sg_pos": ""},
      "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId",
                 "clerp", "influence", "activation", "token_prob", "is_target_logit",
                 "run_idx", "reverse_ctx_idx", ...}],
      "links": [{"source": node_id, "target": node_id, "weight": float}]
    }

Node ids follow circuit-tracer: a feature is ``"{layer}_{feature}_{ctx_idx}"``, an error
node ``"0_{layer}_{ctx_idx}"`` (``feature_type`` "mlp reconstruction error"), an input
token ``"E_{token_id}_{ctx_idx}"`` (``layer`` "E", "embedding") and an output logit
``"{n_layers + 1}_{token_id}_{ctx_idx}"`` ("logit"). saeot writes its SAE features with
``feature_type`` "cross layer transcoder" -- the string the viewer draws as a
feature -- and records what they really are in the extra fields ``saeot_kind``
(``sae_feature`` / ``sae_error``) and ``sae_hook``. Every field it does not know is
kept verbatim on reading and written back, so a graph made elsewhere round-trips.

Supernodes are a partition of the feature and error nodes; the file lists the
groups with two or more members in ``qParams.supernodes`` (a node in none is its own
unit, as in the viewer). :meth:`CircuitGraph.units` gives the whole partition.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saeot.hooks import hook_layer
from saeot.plots import plt  # matplotlib with the Agg backend selected
from saeot.io import atomic_path, atomic_write_text, json_default

if TYPE_CHECKING:
    from saeot.circuits.attribution import Attribution, NodeRef
    from saeot.circuits.tasks import TaskData
    from saeot.models.language_model import LanguageModel

__all__ = [
    "FEATURE_TYPE",
    "ERROR_TYPE",
    "GraphNode",
    "GraphLink",
    "Supernode",
    "CircuitGraph",
    "GraphFormatError",
    "load_graph",
    "save_graph",
    "plot_supernode_graph",
    "circuit_graph",
]

FEATURE_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"
_NODE_KEYS = ("node_id", "feature", "layer", "ctx_idx", "feature_type")


class GraphFormatError(ValueError):
    """A graph JSON file does not follow the format; the message names the file and field."""


@dataclass
class GraphNode:
    """One node of a circuit graph (see the module docstring for the id scheme).

    Attributes:
        node_id: unique id.
        feature: feature index (features), -1 (error nodes), token id (logits) or
            position (embeddings), as circuit-tracer writes it.
        layer: layer as a string ("3", "E", ...).
        ctx_idx: token position in the graph's prompt.
        feature_type: "cross layer transcoder", "mlp reconstruction error", "embedding",
            "logit" (anything else is read as a feature).
        extra: every other field (``clerp``, ``influence``, ``activation``, ``jsNodeId``,
            ...), written back unchanged; a field absent on reading stays absent.
    """

    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def influence(self) -> float | None:
        """The node's effect / influence (saeot: its attribution effect on the metric)."""
        return self.extra.get("influence")

    @property
    def activation(self) -> float | None:
        return self.extra.get("activation")

    @property
    def clerp(self) -> str:
        """The node's text label ("" if none)."""
        return self.extra.get("clerp") or ""

    @property
    def kind(self) -> str:
        """``feature``, ``error``, ``embedding`` or ``logit``."""
        t = self.feature_type.lower()
        if t == "embedding":
            return "embedding"
        if t == "logit":
            return "logit"
        if "error" in t:
            return "error"
        return "feature"

    @property
    def layer_index(self) -> int | None:
        try:
            return int(self.layer)
        except (TypeError, ValueError):
            return None

    @property
    def feature_index(self) -> int | None:
        """The feature's index within its layer's dictionary: the middle part of a
        ``"{layer}_{feature}_{pos}"`` id (circuit-tracer may offset ``feature`` by layer),
        else ``feature``. ``None`` for non-feature nodes."""
        if self.kind != "feature":
            return None
        parts = self.node_id.split("_")
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            return int(parts[1])
        return int(self.feature)

    @property
    def hook(self) -> str | None:
        return self.extra.get("sae_hook")

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "feature": self.feature, "layer": self.layer, "ctx_idx": self.ctx_idx,
                "feature_type": self.feature_type, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "graph") -> "GraphNode":
        if not isinstance(d, dict):
            raise GraphFormatError(f"{where}: a node must be an object, got {type(d).__name__}")
        if "node_id" not in d:
            raise GraphFormatError(f"{where}: node without node_id: {str(d)[:120]}")
        nid = str(d["node_id"])
        for k in ("feature", "layer", "ctx_idx", "feature_type"):
            if k not in d:
                raise GraphFormatError(f"{where}: node {nid!r} lacks {k!r}")
        extra = {k: v for k, v in d.items() if k not in _NODE_KEYS}
        return cls(node_id=nid, feature=int(d["feature"]), layer=str(d["layer"]), ctx_idx=int(d["ctx_idx"]),
                   feature_type=str(d["feature_type"]), extra=extra)


@dataclass
class GraphLink:
    """A weighted edge ``source -> target`` (node ids); ``extra`` keeps unknown fields."""

    source: str
    target: str
    weight: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "weight": self.weight, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "graph") -> "GraphLink":
        if not isinstance(d, dict) or not {"source", "target"} <= set(d):
            raise GraphFormatError(f"{where}: a link needs source and target: {str(d)[:120]}")
        extra = {k: v for k, v in d.items() if k not in ("source", "target", "weight")}
        return cls(str(d["source"]), str(d["target"]), float(d.get("weight", 0.0)), extra)


@dataclass
class Supernode:
    """A named group of node ids."""

    label: str
    members: list[str]


@dataclass
class CircuitGraph:
    """Nodes, links, supernodes and the free-form ``metadata`` / other ``qparams``."""

    nodes: list[GraphNode]
    links: list[GraphLink]
    metadata: dict[str, Any] = field(default_factory=dict)
    qparams: dict[str, Any] = field(default_factory=dict)
    supernodes: list[Supernode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "graph") -> None:
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise GraphFormatError(f"{where}: duplicate node ids {dup}")
        known = set(ids)
        for link in self.links:
            for end in (link.source, link.target):
                if end not in known:
                    raise GraphFormatError(f"{where}: link {link.source!r} -> {link.target!r} names unknown node {end!r}")
        seen: set[str] = set()
        for s in self.supernodes:
            for m in s.members:
                if m not in known:
                    raise GraphFormatError(f"{where}: supernode {s.label!r} names unknown node {m!r}")
                if m in seen:
                    raise GraphFormatError(f"{where}: node {m!r} is in two supernodes")
                seen.add(m)

    # ------------------------------------------------------------------ access
    def node(self, node_id: str) -> GraphNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def node_map(self) -> dict[str, GraphNode]:
        return {n.node_id: n for n in self.nodes}

    def circuit_nodes(self) -> list[GraphNode]:
        """Feature and error nodes (what supernodes group), in file order."""
        return [n for n in self.nodes if n.kind in ("feature", "error")]

    def units(self) -> list[Supernode]:
        """The whole partition of the feature and error nodes: the listed supernodes,
        then one singleton per node in none (labelled by its clerp or id)."""
        covered = {m for s in self.supernodes for m in s.members}
        out = [Supernode(s.label, list(s.members)) for s in self.supernodes]
        out += [Supernode(n.clerp or n.node_id, [n.node_id]) for n in self.circuit_nodes() if n.node_id not in covered]
        return out

    def with_supernodes(self, supernodes: Sequence[Supernode]) -> "CircuitGraph":
        """A copy with these supernodes (groups of one member are dropped: a node in no
        supernode is its own unit) and every node pinned, so the viewer shows them."""
        g = copy.deepcopy(self)
        g.supernodes = [Supernode(s.label, list(s.members)) for s in supernodes if len(s.members) >= 2]
        if not g.qparams.get("pinnedIds"):
            g.qparams["pinnedIds"] = [n.node_id for n in g.nodes if n.kind != "embedding"]
        g.validate()
        return g

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        q = {"pinnedIds": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
        q.update(copy.deepcopy(self.qparams))
        q["supernodes"] = [[s.label, *s.members] for s in self.supernodes]
        return {
            "metadata": copy.deepcopy(self.metadata),
            "qParams": q,
            "nodes": [n.to_dict() for n in self.nodes],
            "links": [link.to_dict() for link in self.links],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "graph") -> "CircuitGraph":
        if not isinstance(d, dict):
            raise GraphFormatError(f"{where}: top level must be an object with nodes and links")
        for k in ("nodes", "links"):
            if not isinstance(d.get(k), list):
                raise GraphFormatError(f"{where}: missing or non-list {k!r}")
        q = dict(d.get("qParams") or {})
        raw_sn = q.pop("supernodes", []) or []
        sns = []
        for s in raw_sn:
            if not isinstance(s, list) or not s or not all(isinstance(x, str) for x in s):
                raise GraphFormatError(f"{where}: qParams.supernodes entries must be [label, node_id, ...], got {s!r}")
            sns.append(Supernode(s[0], list(s[1:])))
        g = cls.__new__(cls)
        g.nodes = [GraphNode.from_dict(n, where) for n in d["nodes"]]
        g.links = [GraphLink.from_dict(x, where) for x in d["links"]]
        g.metadata = dict(d.get("metadata") or {})
        g.qparams = q
        g.supernodes = sns
        g.validate(where)
        return g


def save_graph(graph: CircuitGraph, path: str | Path) -> Path:
    """Write ``graph`` as JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(graph.to_dict(), indent=1, default=json_default) + "\n")
    return path


def load_graph(path: str | Path) -> CircuitGraph:
    """Read a Neuronpedia / circuit-tracer graph JSON file (made by saeot or elsewhere)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"graph file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise GraphFormatError(f"{path} is not valid JSON ({e})") from None
    return CircuitGraph.from_dict(d, where=str(path))


# ----------------------------------------------------------------------------- picture
def _unit_layer(graph_nodes: dict[str, GraphNode], members: Sequence[str]) -> tuple[float, str]:
    layers = sorted({graph_nodes[m].layer_index for m in members if graph_nodes[m].layer_index is not None})
    if not layers:
        return 0.0, "?"
    span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    return sum(layers) / len(layers), span


def plot_supernode_graph(graph: CircuitGraph, path: str | Path, title: str = "", max_units: int = 40,
                         max_label: int = 38) -> Path:
    """PNG of the compressed graph: one circle per supernode (and per logit node),
    x = mean layer of its members, y = rank by aggregated ``|influence|`` within its
    column; circle area ~ ``|sum of member influences|`` (blue > 0, red < 0); lines =
    summed link weights between units (width ~ ``|weight|``, same colours). The
    ``max_units`` largest units are drawn."""
    nodes = graph.node_map()
    units = graph.units()
    unit_of = {m: i for i, u in enumerate(units) for m in u.members}
    logits = [n for n in graph.nodes if n.kind == "logit"]
    for n in logits:
        unit_of[n.node_id] = len(units)
        units.append(Supernode(n.clerp or n.node_id, [n.node_id]))
    infl = [sum(float(nodes[m].influence or 0.0) for m in u.members) for u in units]
    agg: dict[tuple[int, int], float] = {}
    for link in graph.links:
        a, b = unit_of.get(link.source), unit_of.get(link.target)
        if a is None or b is None or a == b:
            continue
        agg[(a, b)] = agg.get((a, b), 0.0) + link.weight
    logit_ids = set(range(len(units) - len(logits), len(units)))
    order = sorted((i for i in range(len(units)) if i not in logit_ids), key=lambda i: -abs(infl[i]))[:max_units]
    shown = set(order) | logit_ids
    max_layer = max((n.layer_index for n in graph.circuit_nodes() if n.layer_index is not None), default=0)
    xs: dict[int, float] = {}
    spans: dict[int, str] = {}
    for i in shown:
        if i in logit_ids:
            xs[i], spans[i] = max_layer + 1.0, "logit"
        else:
            xs[i], spans[i] = _unit_layer(nodes, units[i].members)
    columns: dict[float, list[int]] = {}
    for i in sorted(shown, key=lambda i: -abs(infl[i])):
        columns.setdefault(round(xs[i], 3), []).append(i)
    ys = {i: -rank for col in columns.values() for rank, i in enumerate(col)}
    tallest = max((len(c) for c in columns.values()), default=1)
    fig, ax = plt.subplots(figsize=(4 + 3.2 * len(columns), 1.5 + 0.55 * tallest))
    wmax = max((abs(w) for (a, b), w in agg.items() if a in shown and b in shown), default=1.0) or 1.0
    for (a, b), w in agg.items():
        if a in shown and b in shown and abs(w) >= 1e-3 * wmax:
            ax.plot([xs[a], xs[b]], [ys[a], ys[b]], color="tab:blue" if w > 0 else "tab:red",
                    lw=0.3 + 4.0 * abs(w) / wmax, alpha=0.55, zorder=1)
    imax = max((abs(infl[i]) for i in shown), default=1.0) or 1.0
    for i in shown:
        size = 60 + 900 * abs(infl[i]) / imax if i not in logit_ids else 400
        color = "0.6" if i in logit_ids else ("tab:blue" if infl[i] >= 0 else "tab:red")
        ax.scatter([xs[i]], [ys[i]], s=size, color=color, edgecolor="k", zorder=2)
        label = units[i].label
        label = label if len(label) <= max_label else label[: max_label - 1] + "…"
        n_mem = len(units[i].members)
        ax.annotate(f"{label}" + (f"  (x{n_mem})" if n_mem > 1 else ""), (xs[i], ys[i]),
                    xytext=(0.6 * math.sqrt(size) + 3, -3), textcoords="offset points", fontsize=7, zorder=3)
    ticks = sorted(columns)
    ax.set_xticks(ticks)
    ax.set_xticklabels(["logit" if t == max_layer + 1.0 else " / ".join(sorted({spans[i] for i in columns[t]}))
                        for t in ticks])
    ax.set_yticks([])
    ax.set_xlim(min(ticks, default=0) - 0.5, max(ticks, default=1) + 1.6)
    ax.set_ylim(-tallest, 1)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or graph.metadata.get("slug", "circuit"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: non-finite floats become ``None``."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- from an attribution
def circuit_graph(lm: LanguageModel, data: TaskData, attr: Attribution, nodes: Sequence[NodeRef], edges: Any,
                  slug: str = "saeot-circuit", clerps: dict[Any, str] | None = None,
                  metadata: dict[str, Any] | None = None) -> tuple[CircuitGraph, dict[Any, str]]:
    """The circuit as a :class:`CircuitGraph`, with one logit node for the metric.

    Args:
        lm: the :class:`saeot.models.language_model.LanguageModel` (codec and layer count).
        data: the :class:`~saeot.circuits.tasks.TaskData`; its first clean prompt is the
            graph's ``prompt`` and node positions refer to it.
        attr: the :class:`~saeot.circuits.attribution.Attribution`.
        nodes: the circuit's :class:`~saeot.circuits.attribution.NodeRef` list.
        edges: :class:`~saeot.circuits.attribution.Edges` between them.
        clerps: optional text label per node.
        metadata: merged into the file's metadata.

    Returns:
        ``(graph, node_id of every NodeRef)``. Node ``influence`` = attribution effect,
        ``activation`` = mean largest clean activation, ``ctx_idx`` = the position (in the
        first prompt, counted from its end) where the node's effect is largest; links =
        edge weights, plus the effects of the last hook's nodes as links to the logit node.
    """
    codec = lm.codec
    tokens = [int(t) for t in data.clean[0]]
    T0 = len(tokens)
    n_layers = int(lm.model.cfg.n_layers)
    used: set[str] = set()
    ids: dict[Any, str] = {}
    out_nodes: list[GraphNode] = []
    clerps = clerps or {}
    feature_ids = {f"{hook_layer(n.hook)}_{n.feature}_{max(0, T0 - 1 - attr.peak_rpos(n))}"
                   for n in nodes if not n.is_error}
    for node in nodes:
        layer = hook_layer(node.hook)
        rpos = attr.peak_rpos(node)
        ctx = max(0, T0 - 1 - rpos)
        if node.is_error:  # circuit-tracer's id, unless a layer-0 feature already has it
            nid = f"0_{layer}_{ctx}" if f"0_{layer}_{ctx}" not in feature_ids else f"err_{layer}_{ctx}"
            kind, ftype, feat = "sae_error", ERROR_TYPE, -1
        else:
            nid, kind, ftype, feat = f"{layer}_{node.feature}_{ctx}", "sae_feature", FEATURE_TYPE, node.feature
        if nid in used:
            raise GraphFormatError(f"node id {nid!r} is used twice: two circuit hooks share layer {layer}")
        used.add(nid)
        ids[node] = nid
        out_nodes.append(GraphNode(
            node_id=nid, feature=feat, layer=str(layer), ctx_idx=ctx, feature_type=ftype,
            extra={"jsNodeId": f"{layer}_{feat}-{rpos}", "clerp": clerps.get(node, ""),
                   "influence": finite_or_none(attr.effect(node)),
                   "activation": finite_or_none(float(attr.activation[node.hook][node.feature])),
                   "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                   "reverse_ctx_idx": rpos, "saeot_kind": kind, "sae_hook": node.hook},
        ))
    pair0 = data.pairs[0]
    correct0 = int(data.correct[0])
    logit_id = f"{n_layers + 1}_{correct0}_{T0 - 1}"
    out_nodes.append(GraphNode(
        node_id=logit_id, feature=correct0, layer=str(n_layers + 1), ctx_idx=T0 - 1, feature_type="logit",
        extra={"jsNodeId": f"L_{correct0}-{T0 - 1}",
               "clerp": f"logit diff {pair0.correct!r} - {pair0.wrong!r} ({data.name}, mean over {data.n} prompts)",
               "influence": finite_or_none(attr.metric_clean), "activation": None, "token_prob": 0.0,
               "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0, "saeot_kind": "metric"},
    ))
    links = [GraphLink(ids[a], ids[b], float(w)) for (a, b), w in edges.items() if a in ids and b in ids]
    if nodes:
        order = {h: i for i, h in enumerate(attr.hooks)}
        last = max((n.hook for n in nodes), key=order.__getitem__)
        links += [GraphLink(ids[n], logit_id, attr.effect(n)) for n in nodes if n.hook == last]
    meta = {
        "slug": slug, "scan": getattr(lm, "name", "model"), "transcoder_list": [], "prompt": pair0.clean,
        "prompt_tokens": [codec.decode([t]) for t in tokens], "schema_version": 1,
        "info": {"creator_name": "saeot", "generator": {"name": "saeot.circuits"}},
    }
    meta.update(metadata or {})
    return CircuitGraph(out_nodes, links, meta, {}), ids
