"""Supernodes for a circuit graph made elsewhere (circuit-tracer, Neuronpedia):
``python evaluate.py evaluation=supernodes graph=GRAPH.json run_dir=DIR``.

The graph's feature nodes (``"{layer}_{feature}_{ctx}"``, circuit-tracer's ids) name SAE
features by layer and index; the run at ``run_dir`` must have profiled those SAEs at those
layers (``train.py`` with ``layers.ids`` covering the graph's layers and the same SAEs:
its ``saes.json``). Each feature node is then the run's activation-weighted distribution
of that feature, projected by the run's fitted reference space, and the nodes of every
layer are clustered by the semantic W2 distance between them
(:func:`saeot.circuits.supernodes.compress_graph`), or by decoder cosine
(``supernodes.distance=decoder_cosine``, the baseline). Nothing is profiled or trained
again: the model is loaded for its tokenizer only (the supernodes' token labels).

Output, in the evaluation dir: ``<graph stem>.supernodes.json`` -- the input graph with
every node, link and unknown field kept and ``qParams.supernodes`` filled, which
Neuronpedia's graph viewer loads -- ``plots/supernodes.png``, and
``metrics.json["supernodes"]``. Bad input (a missing file, a node at a layer the run did
not profile, a feature index past the SAE's width) stops before the model is loaded,
naming the setting to fix.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from saeot.circuits.graph import CircuitGraph, load_graph, plot_supernode_graph, save_graph
from saeot.circuits.supernodes import compress_graph, decoder_cosine_distances, graph_feature_keys
from saeot.io import update_json
from saeot.pipeline.config import build
from saeot.pipeline.rundir import RunDir

__all__ = ["SupernodeSettings", "evaluate_graph_supernodes"]

log = logging.getLogger(__name__)

_LINKAGES = ("average", "complete", "single", "weighted")
_DISTANCES = ("semantic", "decoder_cosine")


@dataclass(frozen=True)
class SupernodeSettings:
    """``supernodes:`` of ``evaluate.py`` (one of the three cuts; default ``compression=4``).

    Attributes:
        n_supernodes: units wanted in all (error nodes count, as singletons).
        compression: or ``ceil(units / compression)`` supernodes.
        distance_threshold: or cut the dendrogram where the merge distance exceeds this.
        linkage: scipy linkage (average | complete | single | weighted).
        distance: semantic (W2 in the run's reference space) | decoder_cosine.
        hook_template: the hook of a node's layer, e.g. ``blocks.{layer}.hook_resid_post``;
            null: ``blocks.{layer}.hook_<the run's layers.site>``.
    """

    n_supernodes: int | None = None
    compression: float | None = 4.0
    distance_threshold: float | None = None
    linkage: str = "average"
    distance: str = "semantic"
    hook_template: str | None = None

    def __post_init__(self) -> None:
        if self.linkage not in _LINKAGES:
            raise ValueError(f"supernodes.linkage={self.linkage!r}; expected one of {list(_LINKAGES)}")
        if self.distance not in _DISTANCES:
            raise ValueError(f"supernodes.distance={self.distance!r}; expected one of {list(_DISTANCES)}")
        if self.n_supernodes is not None and self.n_supernodes < 1:
            raise ValueError(f"supernodes.n_supernodes={self.n_supernodes} must be >= 1")
        if self.n_supernodes is None and self.distance_threshold is None and (self.compression is None
                                                                              or self.compression < 1):
            raise ValueError(f"supernodes.compression={self.compression} must be >= 1 "
                             "(or set supernodes.n_supernodes / supernodes.distance_threshold)")
        if self.hook_template is not None and "{layer}" not in self.hook_template:
            raise ValueError(f"supernodes.hook_template={self.hook_template!r} must contain {{layer}}")


def _check_hooks(keys: dict[str, tuple[str, int]], run: RunDir, graph_path: Path) -> None:
    """Every feature node on a hook the run profiled."""
    hooks = set(run.hooks)
    outside = sorted({h for h, _ in keys.values() if h not in hooks})
    if outside:
        nid = next(n for n, (h, _) in keys.items() if h == outside[0])
        raise ValueError(f"graph={graph_path}: node {nid!r} is on {outside[0]}, which run_dir={run.path} did not "
                         f"profile (it has {sorted(hooks)}): train.py with layers.ids covering the graph's layers, "
                         "or set supernodes.hook_template")


def _check_widths(keys: dict[str, tuple[str, int]], samples: dict, run: RunDir, graph_path: Path) -> None:
    """Every feature node's index within its SAE's width (``samples``: the run's, by hook)."""
    widths = {h: s.n_features for h, s in samples.items()}
    for nid, (h, i) in keys.items():
        if not 0 <= i < widths[h]:
            raise ValueError(f"graph={graph_path}: node {nid!r} names feature {i} of {h}, whose SAE in "
                             f"run_dir={run.path} has {widths[h]} features: the graph was made with other SAEs")


def evaluate_graph_supernodes(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """The supernodes of ``cfg.graph`` on the run at ``cfg.run_dir``, written into ``out_dir``."""
    if not cfg.get("graph"):
        raise ValueError("evaluation=supernodes needs graph=<circuit-tracer / Neuronpedia graph JSON>")
    if not cfg.get("run_dir"):
        raise ValueError("evaluation=supernodes needs run_dir=<a finished train.py run that profiled the graph's SAEs>")
    settings = build(cfg.supernodes) if isinstance(cfg.get("supernodes"), DictConfig) else SupernodeSettings()
    if not isinstance(settings, SupernodeSettings):
        raise TypeError(f"supernodes builds a {type(settings).__name__}, not a SupernodeSettings")
    graph_path = Path(str(cfg.graph))
    graph = load_graph(graph_path)
    run = RunDir.load(cfg.run_dir)
    template = settings.hook_template or f"blocks.{{layer}}.hook_{run.site}"
    keys = graph_feature_keys(graph, template)
    if not keys:
        raise ValueError(f"graph={graph_path} has no feature nodes to group")
    _check_hooks(keys, run, graph_path)
    samples = run.projected_samples(sorted({h for h, _ in keys.values()}))  # each hook's file read once
    _check_widths(keys, samples, run, graph_path)
    distances = None
    if settings.distance == "decoder_cosine":
        saes = run.load_saes()
        distances = decoder_cosine_distances(saes, list(keys.values()))
    solver = build(cfg.transport) if cfg.get("transport") else None
    codec = run.load_model().codec
    compressed, clustering = compress_graph(
        graph, samples=samples, hook_for_layer=template, distances=distances, n_supernodes=settings.n_supernodes,
        compression=None if settings.n_supernodes is not None else settings.compression,
        distance_threshold=settings.distance_threshold, method=settings.linkage, solver=solver, decode=codec.decode)
    compressed.metadata["saeot_supernodes"] = {"run_dir": str(run.path), **asdict(settings)}
    out_dir = Path(out_dir)
    path = save_graph(compressed, out_dir / f"{graph_path.stem}.supernodes.json")
    plot = plot_supernode_graph(compressed, out_dir / "plots" / "supernodes.png",
                                title=f"{graph_path.name}: {clustering.n_supernodes} units ({settings.distance})")
    metrics = {"graph": str(graph_path), "run_dir": str(run.path), "output": str(path), "plot": str(plot),
               "n_units_before": len(graph.circuit_nodes()), "n_units_after": clustering.n_supernodes,
               "n_feature_nodes": len(keys), "n_supernodes_listed": len(compressed.supernodes),
               "settings": asdict(settings)}
    update_json(out_dir / "metrics.json", "supernodes", metrics)
    print(f"saeot: {graph_path.name}: {metrics['n_units_before']} nodes -> {metrics['n_units_after']} units "
          f"({len(compressed.supernodes)} supernodes of 2+ nodes, {settings.distance} distance)\n"
          f"  graph with qParams.supernodes: {path}\n  picture: {plot}\n"
          "  next: load the graph in Neuronpedia's viewer (upload the JSON), or compare "
          "supernodes.distance=decoder_cosine", flush=True)
    return metrics
