"""A task's feature circuit at some SAE hooks, compressed into supernodes: the settings and the work.

:class:`CircuitSettings` holds the ``callbacks.circuit`` settings (its fields are the keys of
``conf/callbacks/circuit.yaml``), checked once when built: a wrong value is a ValueError naming
the key (``callbacks.circuit.keep_fraction=2.0 must be in (0, 1]``). :class:`CircuitCompressor`
does the work with them, for the ``train.py`` callback
(:class:`saeot.circuits.callback.CircuitCompression`) and for ``evaluate.py evaluation=circuit``
(:mod:`saeot.evaluation.circuit_run`) alike:

1. builds the task with the model's codec and measures clean accuracy (a task the
   model cannot do is reported loudly: warning + ``metrics.json``; see
   ``on_low_accuracy``);
2. attribution patching over the SAE features and error terms at the hooks,
   node selection, edges; exact patching of the top nodes to check the linear
   approximation (Pearson correlation);
3. mean-ablation faithfulness of the circuit;
4. supernodes by the semantic OT distance, and by decoder cosine at the same
   number of supernodes (baseline); faithfulness and accuracy of each compressed
   circuit under the same supernode budget, coherence, compression ratio;
5. curves (:mod:`saeot.circuits.curves`): faithfulness against compression ratio for
   every grouping of :mod:`saeot.circuits.grouping` (semantic OT, decoder cosine,
   attribution profiles, random) at several supernode counts, with the share of
   effect in SAE error nodes beside each point;
6. writes ``circuit.json`` (Neuronpedia / circuit-tracer format, semantic
   supernodes), ``circuit_decoder_cosine.json``, ``circuit.png``,
   ``circuit_curves.png`` and returns the ``"circuit"`` metrics
   (``["curves"][grouping]``: one point per count).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saeot.circuits.attribution import (
    Attribution,
    Edges,
    NodeRef,
    attribute_edges,
    attribute_nodes,
    exact_node_effects,
    select_nodes,
)
from saeot.circuits.curves import DEFAULT_RATIOS, curve_counts, plot_supernode_curves, supernode_curves
from saeot.circuits.graph import CircuitGraph, circuit_graph, plot_supernode_graph, save_graph
from saeot.circuits.grouping import GROUPINGS, attribution_profiles, cosine_distances
from saeot.circuits.scoring import (
    ABLATIONS,
    CircuitScore,
    coherence,
    compressed_circuit,
    feature_means,
    pearson,
    score_circuit,
)
from saeot.circuits.supernodes import Clustering, compress_graph, decoder_cosine_distances, token_label
from saeot.circuits.tasks import Task, TaskData, clean_accuracy
from saeot.hooks import hook_layer
from saeot.settings import as_tuple, check_types, from_settings
from saeot.transport import ExactW2, W2Solver

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.models.language_model import LanguageModel
    from saeot.types import FeatureSamples

log = logging.getLogger(__name__)

__all__ = ["CircuitSettings", "CircuitCompressor", "LowAccuracyError", "PREFIX"]

#: where the settings live in the run's config (every error message starts with it)
PREFIX = "callbacks.circuit"
SELECTIONS = ("top_k", "cumulative")
LINKAGES = ("average", "complete", "single", "weighted")
ON_LOW_ACCURACY = ("warn", "skip", "raise")


class LowAccuracyError(ValueError):
    """The model does the task too badly to study its circuit (``on_low_accuracy=raise``)."""


@dataclass(frozen=True)
class CircuitSettings:
    """The ``callbacks.circuit`` settings, checked when built.

    Attributes:
        task: a :class:`~saeot.circuits.tasks.Task` (Hydra: ``${circuit}``).
        hooks: hooks whose SAEs enter the circuit (default: all of the run's).
        batch_size: prompts per forward pass.
        selection, n_nodes, fraction, max_nodes, include_errors: node selection, see
            :func:`~saeot.circuits.attribution.select_nodes`.
        edges: compute edges (one backward per downstream node and batch).
        n_supernodes, compression, distance_threshold, linkage: how the supernodes are
            cut (a count, ``ceil(nodes / compression)``, or a W2^2 threshold).
        solver: transport solver of the semantic distances, a :class:`~saeot.transport.W2Solver`
            (Hydra: ``${transport}``; default :class:`~saeot.transport.ExactW2`).
        keep_fraction: supernode budget of the compressed circuit, as a fraction of the
            number of supernodes (at least 1); the decoder-cosine baseline gets the same.
        n_exact: nodes (largest |effect|) checked by exact activation patching.
        ablation: the means everything outside a circuit is set to: ``position`` (per
            position, over the clean prompts of the same length) or ``global`` (see
            :mod:`saeot.circuits.scoring`).
        min_clean_accuracy: below this clean accuracy the task is reported as too hard.
        on_low_accuracy: ``warn`` (record it and go on), ``skip`` (record it and stop)
            or ``raise``.
        curves: compute the faithfulness-vs-compression curves of every grouping.
        groupings: which (:data:`~saeot.circuits.grouping.GROUPINGS`).
        curve_counts: supernode counts of the curves (None: from ``curve_ratios``).
        curve_ratios: compression ratios giving the default counts (``ceil(nodes / r)``).
        random_seed: seed of the random grouping.
        progress: progress bars.
        plot: write ``circuit.png`` (and ``circuit_curves.png``).
    """

    task: Any = None
    hooks: tuple[str, ...] | None = None
    batch_size: int = 16
    selection: str = "cumulative"
    n_nodes: int = 32
    fraction: float = 0.8
    max_nodes: int = 64
    include_errors: bool = True
    edges: bool = True
    n_supernodes: int | None = None
    compression: float | None = 3.0
    distance_threshold: float | None = None
    linkage: str = "average"
    solver: Any = None
    keep_fraction: float = 0.5
    n_exact: int = 16
    ablation: str = "position"
    min_clean_accuracy: float = 0.6
    on_low_accuracy: str = "warn"
    curves: bool = True
    groupings: tuple[str, ...] = GROUPINGS
    curve_counts: tuple[int, ...] | None = None
    curve_ratios: tuple[float, ...] = DEFAULT_RATIOS
    random_seed: int = 0
    progress: bool = True
    plot: bool = True

    @classmethod
    def from_settings(cls, **settings: Any) -> CircuitSettings:
        """From the yaml keys; an unknown key is named (``callbacks.circuit.n_supernode is not a setting ...``)."""
        return from_settings(cls, settings, PREFIX, "the circuit callback")

    def __post_init__(self) -> None:
        if self.task is None:
            raise ValueError("callbacks=circuit needs a task: add circuit=ioi (or circuit=sva, circuit=digit_addition, "
                             "circuit=jsonl circuit.path=<file>)")
        if not isinstance(self.task, Task):
            raise TypeError(f"circuit= must build a saeot.circuits.tasks.Task, got {type(self.task).__name__}")
        hooks = as_tuple(self.hooks, f"{PREFIX}.hooks", str)
        curve_counts_ = as_tuple(self.curve_counts, f"{PREFIX}.curve_counts", int)
        set_ = object.__setattr__  # frozen: the normal forms are set once, here
        set_(self, "hooks", hooks or None)
        set_(self, "groupings", as_tuple(self.groupings, f"{PREFIX}.groupings", str))
        set_(self, "curve_counts", curve_counts_ or None)
        set_(self, "curve_ratios", as_tuple(self.curve_ratios, f"{PREFIX}.curve_ratios", (int, float)))
        set_(self, "solver", self.solver or ExactW2())
        check_types(self, PREFIX)
        if self.on_low_accuracy not in ON_LOW_ACCURACY:
            raise ValueError(f"{PREFIX}.on_low_accuracy={self.on_low_accuracy!r}; use warn, skip or raise")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"{PREFIX}.ablation={self.ablation!r}; use one of {ABLATIONS}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"{PREFIX}.keep_fraction={self.keep_fraction} must be in (0, 1]")
        if self.distance_threshold is None and self.n_supernodes is None and self.compression is None:
            raise ValueError(f"set one of {PREFIX}.n_supernodes, compression or distance_threshold")
        bad = [g for g in self.groupings if g not in GROUPINGS]
        if bad:
            raise ValueError(f"{PREFIX}.groupings has {bad}; expected a subset of {list(GROUPINGS)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"{PREFIX}.selection={self.selection!r}; use top_k or cumulative")
        if self.linkage not in LINKAGES:
            raise ValueError(f"{PREFIX}.linkage={self.linkage!r}; use average, complete, single or weighted")
        for name in ("batch_size", "n_nodes", "max_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{PREFIX}.{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{PREFIX}.fraction={self.fraction} must be in (0, 1]")
        if self.n_exact < 0:
            raise ValueError(f"{PREFIX}.n_exact={self.n_exact} must be >= 0")
        if self.n_supernodes is not None and self.n_supernodes < 1:
            raise ValueError(f"{PREFIX}.n_supernodes={self.n_supernodes} must be >= 1")
        if self.compression is not None and self.compression <= 0:
            raise ValueError(f"{PREFIX}.compression={self.compression} must be > 0")
        bad = [c for c in (self.curve_counts or ()) if c < 1]
        bad += [r for r in (() if self.curve_counts else self.curve_ratios) if r < 1]
        if bad:
            raise ValueError(f"{PREFIX}.curve_counts / curve_ratios has {bad}: counts and ratios must be >= 1")
        if not isinstance(self.solver, W2Solver):
            raise ValueError(f"{PREFIX}.solver builds a {type(self.solver).__name__}, not a saeot.transport.W2Solver "
                             "(transport=exact | sinkhorn | ...)")


def _clean(x: Any) -> Any:
    """Metrics for JSON: floats rounded to 6 significant digits, NaN/inf -> None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


def _fmt(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


@dataclass
class _Found:
    """The circuit of step 2: the attribution, the selected nodes and their edges (None: not computed)."""

    attr: Attribution
    nodes: list[NodeRef]
    edges: Edges | None

    @property
    def effect(self) -> dict[NodeRef, float]:
        return {n: self.attr.effect(n) for n in self.nodes}


class CircuitCompressor:
    """Steps 1-6 of the module docstring with one :class:`CircuitSettings`; no Lightning, no pipeline run."""

    def __init__(self, settings: CircuitSettings) -> None:
        if not isinstance(settings, CircuitSettings):
            raise TypeError(f"CircuitCompressor needs a CircuitSettings, got {type(settings).__name__}")
        self.settings = settings

    def run(self, lm: LanguageModel, saes: dict[str, SAE], samples: dict[str, FeatureSamples], out_dir: str | Path,
            hooks: list[str] | None = None) -> dict:
        """The ``"circuit"`` metrics; the graphs and pictures go to ``out_dir``.

        Args:
            lm: :class:`saeot.models.language_model.LanguageModel`.
            saes: ``hook -> SAE``.
            samples: ``hook -> FeatureSamples`` in the shared reference space.
            out_dir: where ``circuit.json`` etc. go.
            hooks: circuit hooks (default the settings' ``hooks`` or all of ``saes``).
        """
        s = self.settings
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        hooks = list(hooks or s.hooks or saes)
        missing = [h for h in hooks if h not in samples]
        if missing:
            raise ValueError(f"no feature samples for circuit hook(s) {missing}: the supernodes need them")
        data = s.task.build(lm)
        m, acc = self._accuracy(lm, data, hooks)
        if m.get("skipped"):
            return _clean(m)
        found = self._circuit(lm, saes, hooks, data, m)
        hooks = found.attr.hooks
        score, full = self._faithfulness(lm, saes, hooks, data, found.nodes, acc, m)
        g_sem, g_cos, c_sem, sem = self._supernodes(lm, saes, samples, data, found, score, m)
        m["seconds"] = time.perf_counter() - t0
        metrics = _clean(m)
        self._write(out_dir, g_sem, g_cos, data, hooks, metrics, m, found.nodes, c_sem, full, sem)
        log.info("circuit: %d nodes -> %d supernodes; faithfulness full %.3f, compressed %.3f (cosine baseline %.3f)",
                 len(found.nodes), c_sem.n_supernodes, full.faithfulness, sem["faithfulness_compressed"],
                 m["baseline_decoder_cosine"]["faithfulness_compressed"])
        return metrics

    # ------------------------------------------------------------------ the steps
    def _accuracy(self, lm: LanguageModel, data: TaskData, hooks: list[str]) -> tuple[dict[str, Any], dict]:
        """Step 1: clean accuracy; a task the model does badly is warned about, skipped or refused."""
        s = self.settings
        acc = clean_accuracy(lm, data, s.batch_size)
        m: dict[str, Any] = {
            "task": data.name, "model": getattr(lm, "name", "?"), "hooks": hooks, "n_prompts": data.n,
            "n_dropped": len(data.dropped), "clean_accuracy": acc["accuracy"],
            "corrupted_accuracy": acc["corrupted_accuracy"], "logit_diff_clean": acc["logit_diff_clean"],
            "logit_diff_corrupted": acc["logit_diff_corrupted"], "ablation": s.ablation,
        }
        log.info("circuit=%s on %s: %d prompt pairs (%d dropped), clean accuracy %.3f", data.name, m["model"],
                 data.n, len(data.dropped), acc["accuracy"])
        if acc["accuracy"] < s.min_clean_accuracy:
            msg = (f"circuit={data.name}: clean accuracy {acc['accuracy']:.3f} of model {m['model']!r} is below "
                   f"{PREFIX}.min_clean_accuracy={s.min_clean_accuracy}: the model does not do this task "
                   "well enough for its circuit to mean much")
            m["warning"] = msg
            if s.on_low_accuracy == "raise":
                raise LowAccuracyError(msg)
            log.warning(msg)
            if s.on_low_accuracy == "skip":
                m["skipped"] = True
        return m, acc

    def _circuit(self, lm: LanguageModel, saes: dict, hooks: list[str], data: TaskData, m: dict[str, Any]) -> _Found:
        """Step 2: attribution, node selection, edges, the exact-patching check."""
        s, bs = self.settings, self.settings.batch_size
        attr = attribute_nodes(lm, saes, hooks, data, bs, s.progress)
        nodes = select_nodes(attr, s.selection, s.n_nodes, s.fraction, s.max_nodes, s.include_errors)
        total_abs = sum(abs(attr.effect(n)) for n in attr.all_nodes())
        m.update({
            "nodes": len(nodes), "feature_nodes": sum(not n.is_error for n in nodes),
            "error_nodes": sum(n.is_error for n in nodes),
            "effect_fraction_covered": sum(abs(attr.effect(n)) for n in nodes) / total_abs if total_abs else float("nan"),
            "error_effect_share": (sum(abs(attr.effect(n)) for n in nodes if n.is_error)
                                   / max(sum(abs(attr.effect(n)) for n in nodes), 1e-30)),
        })
        edges = attribute_edges(lm, saes, nodes, data, bs, s.progress) if s.edges else None
        m["edges"] = len(edges) if edges is not None else 0
        if s.n_exact > 0:
            ranked = sorted(attr.all_nodes(), key=lambda n: (-abs(attr.effect(n)), n))
            check = ranked[: s.n_exact]  # the largest effects, in or out of the circuit
            exact = exact_node_effects(lm, saes, check, data, bs, s.progress)
            approx = torch.tensor([attr.effect(n) for n in check])
            m["attribution_check"] = {
                "n_nodes": len(check), "pearson": pearson(approx, exact),
                "mean_abs_error": float((approx - exact).abs().mean()),
                "mean_abs_exact": float(exact.abs().mean()),
            }
            log.info("attribution vs exact patching on %d nodes: pearson %.3f", len(check), m["attribution_check"]["pearson"])
        return _Found(attr, nodes, edges)

    def _faithfulness(self, lm: LanguageModel, saes: dict, hooks: list[str], data: TaskData, nodes: list[NodeRef], acc: dict,
                      m: dict[str, Any]) -> tuple[Callable[[list[NodeRef]], CircuitScore], CircuitScore]:
        """Step 3: the mean-ablation metric of the empty and the full circuit; returns the scorer of any
        set of kept nodes (everything else ablated) and the full circuit's score."""
        s, bs = self.settings, self.settings.batch_size
        means = feature_means(lm, saes, hooks, data, bs, s.progress, mode=s.ablation)
        m_full = acc["logit_diff_clean"]
        empty = score_circuit(lm, saes, hooks, data, [], means, m_full, float("nan"), bs)
        m_empty = empty.metric

        def score(kept: list[NodeRef]) -> CircuitScore:
            return score_circuit(lm, saes, hooks, data, kept, means, m_full, m_empty, bs)

        full = score(nodes)
        denom, spread = m_full - m_empty, abs(acc["logit_diff_clean"] - acc["logit_diff_corrupted"])
        if not abs(denom) >= 0.1 * spread:
            msg = (f"faithfulness is ill-conditioned: ablating every node moves the metric by only {denom:.4g} "
                   f"(clean - corrupted: {spread:.4g}); faithfulness ratios are not meaningful for this circuit")
            m["faithfulness_warning"] = msg
            log.warning(msg)
        m.update({"metric_full_model": m_full, "metric_empty": m_empty, "metric_circuit": full.metric,
                  "faithfulness_full": full.faithfulness, "task_accuracy_full": full.accuracy,
                  "task_accuracy_empty": empty.accuracy})
        return score, full

    def _supernodes(self, lm: LanguageModel, saes: dict, samples: dict, data: TaskData, found: _Found,
                    score: Callable[[list[NodeRef]], CircuitScore],
                    m: dict[str, Any]) -> tuple[CircuitGraph, CircuitGraph, Clustering, dict]:
        """Steps 4-5: supernodes by semantic OT, then by decoder cosine at the same count, each scored;
        the curves. Returns both compressed graphs, the semantic clustering and its scores."""
        s, nodes, edges = self.settings, found.nodes, found.edges
        decode = lm.codec.decode
        clerps = {n: (f"L{hook_layer(n.hook)} SAE error" if n.is_error else
                      f"L{hook_layer(n.hook)} #{n.feature}: {token_label(samples, [(n.hook, n.feature)], decode)}")
                  for n in nodes}
        graph, ids = circuit_graph(lm, data, found.attr, nodes, edges if edges is not None else {}, clerps=clerps,
                                   slug=f"saeot-{data.name}-{m['model']}".lower().replace("_", "-"))
        ref_of = {ids[n]: n for n in nodes}
        effect = found.effect
        cut = {"n_supernodes": s.n_supernodes, "compression": s.compression}
        if s.distance_threshold is not None:
            cut = {"distance_threshold": s.distance_threshold}
        g_sem, c_sem = compress_graph(graph, samples=samples, method=s.linkage, solver=s.solver, decode=decode, **cut)
        keys = [(ref_of[i].hook, ref_of[i].feature) for i in c_sem.node_ids]
        d_cos = decoder_cosine_distances(saes, keys) if keys else torch.zeros(0, 0, dtype=torch.float64)
        g_cos, c_cos = compress_graph(graph, samples=samples, distances=d_cos, n_supernodes=c_sem.n_supernodes,
                                      method=s.linkage, decode=decode)
        sem = self._score_clustering(c_sem, c_sem.distances, d_cos, ref_of, effect, nodes, score)
        cos = self._score_clustering(c_cos, c_sem.distances, d_cos, ref_of, effect, nodes, score)
        m.update(sem)
        m["baseline_decoder_cosine"] = cos
        if s.curves:
            m.update(self._curves(graph, ref_of, c_sem, d_cos, nodes, edges, effect, score))
        return g_sem, g_cos, c_sem, sem

    def _write(self, out_dir: Path, g_sem: CircuitGraph, g_cos: CircuitGraph, data: TaskData, hooks: list[str],
               metrics: dict, m: dict[str, Any], nodes: list[NodeRef], c_sem: Clustering, full: CircuitScore,
               sem: dict) -> None:
        """Step 6: the two graphs (with the metrics in their metadata) and the pictures."""
        s = self.settings
        meta = {"saeot": {"task": data.name, "n_prompts": data.n, "hooks": hooks, "supernode_distance": "semantic_w2",
                          "metrics": metrics}}
        g_sem.metadata.update(meta)
        g_cos.metadata.update({"saeot": {**meta["saeot"], "supernode_distance": "decoder_cosine"}})
        save_graph(g_sem, out_dir / "circuit.json")
        save_graph(g_cos, out_dir / "circuit_decoder_cosine.json")
        if s.plot:
            title = (f"{data.name} on {m['model']}: {len(nodes)} nodes -> {c_sem.n_supernodes} supernodes "
                     f"(semantic OT); faithfulness {_fmt(full.faithfulness)} (circuit), "
                     f"{_fmt(sem['faithfulness_compressed'])} (top {sem['supernodes_kept']} supernodes)")
            plot_supernode_graph(g_sem, out_dir / "circuit.png", title=title)
            plot_supernode_graph(g_cos, out_dir / "circuit_decoder_cosine.png",
                                 title=f"{data.name}: decoder-cosine supernodes (baseline)")
            if metrics.get("curves"):
                plot_supernode_curves(metrics["curves"], out_dir / "circuit_curves.png",
                                      title=f"{data.name} on {m['model']}: {len(nodes)} nodes, "
                                            f"{100 * m['error_effect_share']:.0f}% of their |effect| in SAE error "
                                            f"nodes; top {s.keep_fraction:.0%} of supernodes kept")

    def _curves(self, graph: CircuitGraph, ref_of: dict[str, NodeRef], c_sem: Clustering, d_cos: torch.Tensor,
                nodes: list[NodeRef], edges: Edges | None, effect: dict[NodeRef, float],
                score: Callable[[list[NodeRef]], CircuitScore]) -> dict:
        """Faithfulness-vs-compression curves of every grouping (:mod:`saeot.circuits.curves`)."""
        s = self.settings
        feats = [ref_of[i] for i in c_sem.node_ids]
        dist: dict[str, torch.Tensor | None] = {"semantic_ot": c_sem.distances, "decoder_cosine": d_cos, "random": None}
        notes = {}
        if edges is not None:
            dist["attribution_profile"] = cosine_distances(attribution_profiles(feats, nodes, edges.weights, effect))
        else:
            notes["attribution_profile"] = f"needs edges ({PREFIX}.edges=true)"
        dist = {g: dist[g] for g in s.groupings if g in dist}
        n_err = sum(n.is_error for n in nodes)
        counts = curve_counts(len(nodes), n_err, s.curve_counts, s.curve_ratios)
        curves = supernode_curves(graph, ref_of, c_sem.node_ids, effect, dist, counts, score, s.keep_fraction,
                                  s.linkage, s.random_seed)
        mean = {g: sum(p["faithfulness"] for p in pts) / len(pts) for g, pts in curves.items() if pts}
        gain = {g: sum(p["grouping_gain"] for p in pts) / len(pts) for g, pts in curves.items() if pts}
        log.info("supernode curves over %d counts: mean faithfulness %s; mean gain over the same number of top "
                 "nodes %s", len(counts), ", ".join(f"{g} {_fmt(v)}" for g, v in mean.items()),
                 ", ".join(f"{g} {v:+.3f}" for g, v in gain.items()))
        return {"curves": curves, "curve_counts": counts, "curve_mean_faithfulness": mean,
                "curve_mean_grouping_gain": gain,
                **({"curve_notes": notes} if notes else {})}

    def _score_clustering(self, c: Clustering, d_sem: torch.Tensor, d_cos: torch.Tensor, ref_of: dict[str, NodeRef],
                          effect: dict[NodeRef, float], nodes: list[NodeRef],
                          score: Callable[[list[NodeRef]], CircuitScore]) -> dict:
        """Compression ratio, coherence, and the compressed circuit's faithfulness / accuracy
        (top ``keep_fraction`` of supernodes by |aggregated effect|; the rest ablated as
        units), with the node circuit of the same node count for reference."""
        groups = [[ref_of[i] for i in g] for g in c.groups()]
        M = len(groups)
        budget = max(1, min(M, round(self.settings.keep_fraction * M)))
        kept, kept_nodes = compressed_circuit(groups, effect, budget)
        comp = score(kept_nodes)
        same = score(nodes[: len(kept_nodes)])
        sizes = [len(g) for g in groups]
        return {
            "supernodes": M,
            "compression_ratio": len(nodes) / M if M else float("nan"),
            "multi_member_supernodes": sum(s > 1 for s in sizes),
            "largest_supernode": max(sizes, default=0),
            "supernodes_kept": budget,
            "nodes_kept": len(kept_nodes),
            "metric_compressed": comp.metric,
            "faithfulness_compressed": comp.faithfulness,
            "task_accuracy_compressed": comp.accuracy,
            "faithfulness_top_nodes_same_count": same.faithfulness,
            "coherence_w2": coherence(d_sem, c.labels),
            "coherence_decoder_cosine": coherence(d_cos, c.labels),
        }
