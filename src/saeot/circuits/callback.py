"""``CircuitCompression``: find a task's feature circuit after matching and compress it.

Wired by ``conf/callbacks/circuit.yaml``; ``python train.py circuit=ioi callbacks=circuit``.
After the pipeline has profiled the features and projected them into the reference
space it calls :meth:`CircuitCompression.on_matching_end` with the run, which

1. builds the task with the model's codec and measures clean accuracy (a task the
   model cannot do is reported loudly: warning + ``metrics.json``; see
   ``on_low_accuracy``);
2. attribution patching over the SAE features and error terms at the run's hooks,
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
   ``circuit_curves.png`` and the ``"circuit"`` entry of ``metrics.json``
   (``["curves"][grouping]``: one point per count).

:meth:`CircuitCompression.compress` does steps 1-6 without a pipeline run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from saeot.circuits.attribution import (
    NodeRef,
    attribute_edges,
    attribute_nodes,
    exact_node_effects,
    select_nodes,
)
from saeot.circuits.curves import DEFAULT_RATIOS, curve_counts, plot_supernode_curves, supernode_curves
from saeot.circuits.graph import circuit_graph, plot_supernode_graph, save_graph
from saeot.circuits.grouping import GROUPINGS, attribution_profiles, cosine_distances
from saeot.circuits.scoring import (
    ABLATIONS,
    coherence,
    compressed_circuit,
    feature_means,
    pearson,
    score_circuit,
)
from saeot.circuits.supernodes import Clustering, compress_graph, decoder_cosine_distances, token_label
from saeot.hooks import hook_layer
from saeot.circuits.tasks import Task, TaskData, clean_accuracy
from saeot.pipeline.callbacks import RunCallback
from saeot.pipeline.state import TrainResult
from saeot.transport import ExactW2, W2Solver

log = logging.getLogger(__name__)

__all__ = ["CircuitCompression", "LowAccuracyError"]


class LowAccuracyError(ValueError):
    """The model does the task too badly to study its circuit (``on_low_accuracy=raise``)."""


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


class CircuitCompression(L.Callback, RunCallback):
    """Feature circuit of ``task`` at the run's SAE hooks, compressed into supernodes.

    Args:
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

    key = "circuit"

    def __init__(self, task: Task | None = None, hooks: list[str] | None = None, batch_size: int = 16,
                 selection: str = "cumulative", n_nodes: int = 32, fraction: float = 0.8, max_nodes: int = 64,
                 include_errors: bool = True, edges: bool = True, n_supernodes: int | None = None,
                 compression: float | None = 3.0, distance_threshold: float | None = None, linkage: str = "average",
                 solver: W2Solver | None = None, keep_fraction: float = 0.5,
                 n_exact: int = 16, ablation: str = "position", min_clean_accuracy: float = 0.6,
                 on_low_accuracy: str = "warn", curves: bool = True, groupings: tuple[str, ...] = GROUPINGS,
                 curve_counts: list[int] | None = None, curve_ratios: tuple[float, ...] = DEFAULT_RATIOS,
                 random_seed: int = 0, progress: bool = True, plot: bool = True) -> None:
        super().__init__()
        if task is None:
            raise ValueError("callbacks=circuit needs a task: add circuit=ioi (or circuit=sva, circuit=digit_addition, "
                             "circuit=jsonl circuit.path=<file>)")
        if not isinstance(task, Task):
            raise TypeError(f"circuit= must build a saeot.circuits.tasks.Task, got {type(task).__name__}")
        if on_low_accuracy not in ("warn", "skip", "raise"):
            raise ValueError(f"callbacks.circuit.on_low_accuracy={on_low_accuracy!r}; use warn, skip or raise")
        if ablation not in ABLATIONS:
            raise ValueError(f"callbacks.circuit.ablation={ablation!r}; use one of {ABLATIONS}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"callbacks.circuit.keep_fraction={keep_fraction} must be in (0, 1]")
        if distance_threshold is None and n_supernodes is None and compression is None:
            raise ValueError("set one of callbacks.circuit.n_supernodes, compression or distance_threshold")
        bad = [g for g in groupings if g not in GROUPINGS]
        if bad:
            raise ValueError(f"callbacks.circuit.groupings has {bad}; expected a subset of {list(GROUPINGS)}")
        self.curves, self.groupings = curves, tuple(groupings)
        self.curve_counts = list(curve_counts) if curve_counts else None
        self.curve_ratios, self.random_seed = tuple(curve_ratios), int(random_seed)
        self.task, self.hooks = task, list(hooks) if hooks else None
        self.batch_size = batch_size
        self.selection, self.n_nodes, self.fraction, self.max_nodes = selection, n_nodes, fraction, max_nodes
        self.include_errors, self.edges = include_errors, edges
        self.n_supernodes, self.compression, self.distance_threshold = n_supernodes, compression, distance_threshold
        self.linkage, self.solver = linkage, solver or ExactW2()
        self.keep_fraction, self.n_exact, self.ablation = keep_fraction, n_exact, ablation
        self.min_clean_accuracy, self.on_low_accuracy = min_clean_accuracy, on_low_accuracy
        self.progress, self.plot = progress, plot

    # ------------------------------------------------------------------ pipeline hooks
    def check(self, lm: Any) -> None:
        """Before any forward pass (``train.py``'s setup stage): build the task with the model's
        codec, so that an unusable task (answers of several tokens, prompts of unequal length
        in a JSONL file) fails at once."""
        if getattr(self, "_checked", None) is not lm:
            self.task.build(lm)
            self._checked = lm

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Lightning hook, before the first streaming pass: build the task with the
        model's codec so that an unusable task (no single-token answers, bad JSONL)
        fails now, not after profiling."""
        lm = getattr(getattr(trainer, "datamodule", None), "lm", None)
        if lm is not None and getattr(self, "_checked", None) is not lm:
            self.task.build(lm)
            self._checked = lm

    def on_matching_end(self, result: TrainResult) -> dict:
        """Called on rank 0 by :func:`saeot.pipeline.run_train` with the finished run; the
        returned metrics go to ``metrics.json["circuit"]``."""
        metrics = self.compress(result.lm, result.saes, result.projected, result.run_dir,
                                hooks=self.hooks or list(result.hooks))
        self._log(result.logger, metrics)
        return metrics

    @staticmethod
    def _log(logger: Any, metrics: dict) -> None:
        if logger is None:
            return
        flat = {}

        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}/{k}", v)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat[f"{prefix}/{k}"] = v

        walk("circuit", metrics)
        try:
            logger.log_metrics(flat)
        except Exception as e:  # logging must never lose a finished circuit
            log.warning("logging circuit metrics to %s failed: %s", type(logger).__name__, e)

    # ------------------------------------------------------------------ the work
    def compress(self, lm: Any, saes: dict[str, Any], samples: dict[str, Any], out_dir: str | Path,
                 hooks: list[str] | None = None) -> dict:
        """Steps 1-5 of the module docstring; returns the ``"circuit"`` metrics.

        Args:
            lm: :class:`saeot.lm.LanguageModel`.
            saes: ``hook -> SAE``.
            samples: ``hook -> FeatureSamples`` in the shared reference space.
            out_dir: where ``circuit.json`` etc. go.
            hooks: circuit hooks (default ``self.hooks`` or all of ``saes``).
        """
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        hooks = list(hooks or self.hooks or saes)
        missing = [h for h in hooks if h not in samples]
        if missing:
            raise ValueError(f"no feature samples for circuit hook(s) {missing}: the supernodes need them")
        bs = self.batch_size
        data = self.task.build(lm)
        acc = clean_accuracy(lm, data, bs)
        m: dict[str, Any] = {
            "task": data.name, "model": getattr(lm, "name", "?"), "hooks": hooks, "n_prompts": data.n,
            "n_dropped": len(data.dropped), "clean_accuracy": acc["accuracy"],
            "corrupted_accuracy": acc["corrupted_accuracy"], "logit_diff_clean": acc["logit_diff_clean"],
            "logit_diff_corrupted": acc["logit_diff_corrupted"], "ablation": self.ablation,
        }
        log.info("circuit=%s on %s: %d prompt pairs (%d dropped), clean accuracy %.3f", data.name, m["model"],
                 data.n, len(data.dropped), acc["accuracy"])
        if acc["accuracy"] < self.min_clean_accuracy:
            msg = (f"circuit={data.name}: clean accuracy {acc['accuracy']:.3f} of model {m['model']!r} is below "
                   f"callbacks.circuit.min_clean_accuracy={self.min_clean_accuracy}: the model does not do this task "
                   "well enough for its circuit to mean much")
            m["warning"] = msg
            if self.on_low_accuracy == "raise":
                raise LowAccuracyError(msg)
            log.warning(msg)
            if self.on_low_accuracy == "skip":
                m["skipped"] = True
                return _clean(m)

        # attribution and the circuit
        attr = attribute_nodes(lm, saes, hooks, data, bs, self.progress)
        hooks = attr.hooks
        nodes = select_nodes(attr, self.selection, self.n_nodes, self.fraction, self.max_nodes, self.include_errors)
        total_abs = sum(abs(attr.effect(n)) for n in attr.all_nodes())
        m.update({
            "nodes": len(nodes), "feature_nodes": sum(not n.is_error for n in nodes),
            "error_nodes": sum(n.is_error for n in nodes),
            "effect_fraction_covered": sum(abs(attr.effect(n)) for n in nodes) / total_abs if total_abs else float("nan"),
            "error_effect_share": (sum(abs(attr.effect(n)) for n in nodes if n.is_error)
                                   / max(sum(abs(attr.effect(n)) for n in nodes), 1e-30)),
        })
        edges = attribute_edges(lm, saes, nodes, data, bs, self.progress) if self.edges else None
        m["edges"] = len(edges) if edges is not None else 0
        if self.n_exact > 0:
            ranked = sorted(attr.all_nodes(), key=lambda n: (-abs(attr.effect(n)), n))
            check = ranked[: self.n_exact]  # the largest effects, in or out of the circuit
            exact = exact_node_effects(lm, saes, check, data, bs, self.progress)
            approx = torch.tensor([attr.effect(n) for n in check])
            m["attribution_check"] = {
                "n_nodes": len(check), "pearson": pearson(approx, exact),
                "mean_abs_error": float((approx - exact).abs().mean()),
                "mean_abs_exact": float(exact.abs().mean()),
            }
            log.info("attribution vs exact patching on %d nodes: pearson %.3f", len(check), m["attribution_check"]["pearson"])

        # faithfulness of the circuit
        means = feature_means(lm, saes, hooks, data, bs, self.progress, mode=self.ablation)
        m_full = acc["logit_diff_clean"]
        empty = score_circuit(lm, saes, hooks, data, [], means, m_full, float("nan"), bs)
        m_empty = empty.metric
        full = score_circuit(lm, saes, hooks, data, nodes, means, m_full, m_empty, bs)
        denom, spread = m_full - m_empty, abs(acc["logit_diff_clean"] - acc["logit_diff_corrupted"])
        if not abs(denom) >= 0.1 * spread:
            msg = (f"faithfulness is ill-conditioned: ablating every node moves the metric by only {denom:.4g} "
                   f"(clean - corrupted: {spread:.4g}); faithfulness ratios are not meaningful for this circuit")
            m["faithfulness_warning"] = msg
            log.warning(msg)
        m.update({"metric_full_model": m_full, "metric_empty": m_empty, "metric_circuit": full.metric,
                  "faithfulness_full": full.faithfulness, "task_accuracy_full": full.accuracy,
                  "task_accuracy_empty": empty.accuracy})

        # supernodes: semantic OT, then decoder cosine at the same count
        decode = lm.codec.decode
        clerps = {n: (f"L{hook_layer(n.hook)} SAE error" if n.is_error else
                      f"L{hook_layer(n.hook)} #{n.feature}: {token_label(samples, [(n.hook, n.feature)], decode)}")
                  for n in nodes}
        graph, ids = circuit_graph(lm, data, attr, nodes, edges if edges is not None else {}, clerps=clerps,
                                   slug=f"saeot-{data.name}-{m['model']}".lower().replace("_", "-"))
        ref_of = {ids[n]: n for n in nodes}
        effect = {n: attr.effect(n) for n in nodes}
        cut = {"n_supernodes": self.n_supernodes, "compression": self.compression}
        if self.distance_threshold is not None:
            cut = {"distance_threshold": self.distance_threshold}
        g_sem, c_sem = compress_graph(graph, samples=samples, method=self.linkage, solver=self.solver,
                                      decode=decode, **cut)
        keys = [(ref_of[i].hook, ref_of[i].feature) for i in c_sem.node_ids]
        d_cos = decoder_cosine_distances(saes, keys) if keys else torch.zeros(0, 0, dtype=torch.float64)
        g_cos, c_cos = compress_graph(graph, samples=samples, distances=d_cos, n_supernodes=c_sem.n_supernodes,
                                      method=self.linkage, decode=decode)
        sem = self._score_clustering(c_sem, c_sem.distances, d_cos, ref_of, effect, nodes, lm, saes, hooks, data,
                                     means, m_full, m_empty)
        cos = self._score_clustering(c_cos, c_sem.distances, d_cos, ref_of, effect, nodes, lm, saes, hooks, data,
                                     means, m_full, m_empty)
        m.update(sem)
        m["baseline_decoder_cosine"] = cos
        if self.curves:
            m.update(self._curves(graph, ref_of, c_sem, d_cos, nodes, edges, effect, lm, saes, hooks, data, means,
                                  m_full, m_empty))
        m["seconds"] = time.perf_counter() - t0
        metrics = _clean(m)

        # outputs
        meta = {"saeot": {"task": data.name, "n_prompts": data.n, "hooks": hooks, "supernode_distance": "semantic_w2",
                          "metrics": metrics}}
        g_sem.metadata.update(meta)
        g_cos.metadata.update({"saeot": {**meta["saeot"], "supernode_distance": "decoder_cosine"}})
        save_graph(g_sem, out_dir / "circuit.json")
        save_graph(g_cos, out_dir / "circuit_decoder_cosine.json")
        if self.plot:
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
                                            f"nodes; top {self.keep_fraction:.0%} of supernodes kept")
        log.info("circuit: %d nodes -> %d supernodes; faithfulness full %.3f, compressed %.3f (cosine baseline %.3f)",
                 len(nodes), c_sem.n_supernodes, full.faithfulness, sem["faithfulness_compressed"],
                 cos["faithfulness_compressed"])
        return metrics

    def _curves(self, graph: Any, ref_of: dict[str, NodeRef], c_sem: Clustering, d_cos: torch.Tensor,
                nodes: list[NodeRef], edges: Any, effect: dict[NodeRef, float], lm: Any, saes: dict,
                hooks: list[str], data: TaskData, means: Any, m_full: float, m_empty: float) -> dict:
        """Faithfulness-vs-compression curves of every grouping (:mod:`saeot.circuits.curves`)."""
        feats = [ref_of[i] for i in c_sem.node_ids]
        dist: dict[str, torch.Tensor | None] = {"semantic_ot": c_sem.distances, "decoder_cosine": d_cos, "random": None}
        notes = {}
        if edges is not None:
            dist["attribution_profile"] = cosine_distances(attribution_profiles(feats, nodes, edges.weights, effect))
        else:
            notes["attribution_profile"] = "needs edges (callbacks.circuit.edges=true)"
        dist = {g: dist[g] for g in self.groupings if g in dist}
        n_err = sum(n.is_error for n in nodes)
        counts = curve_counts(len(nodes), n_err, self.curve_counts, self.curve_ratios)

        def score(kept: list[NodeRef]) -> Any:
            return score_circuit(lm, saes, hooks, data, kept, means, m_full, m_empty, self.batch_size)

        curves = supernode_curves(graph, ref_of, c_sem.node_ids, effect, dist, counts, score, self.keep_fraction,
                                  self.linkage, self.random_seed)
        mean = {g: sum(p["faithfulness"] for p in pts) / len(pts) for g, pts in curves.items() if pts}
        gain = {g: sum(p["grouping_gain"] for p in pts) / len(pts) for g, pts in curves.items() if pts}
        log.info("supernode curves over %d counts: mean faithfulness %s; mean gain over the same number of top "
                 "nodes %s", len(counts), ", ".join(f"{g} {_fmt(v)}" for g, v in mean.items()),
                 ", ".join(f"{g} {v:+.3f}" for g, v in gain.items()))
        return {"curves": curves, "curve_counts": counts, "curve_mean_faithfulness": mean,
                "curve_mean_grouping_gain": gain,
                **({"curve_notes": notes} if notes else {})}

    def _score_clustering(self, c: Clustering, d_sem: torch.Tensor, d_cos: torch.Tensor, ref_of: dict[str, NodeRef],
                          effect: dict[NodeRef, float], nodes: list[NodeRef], lm: Any, saes: dict, hooks: list[str],
                          data: TaskData, means: Any, m_full: float, m_empty: float) -> dict:
        """Compression ratio, coherence, and the compressed circuit's faithfulness / accuracy
        (top ``keep_fraction`` of supernodes by |aggregated effect|; the rest ablated as
        units), with the node circuit of the same node count for reference."""
        groups = [[ref_of[i] for i in g] for g in c.groups()]
        M = len(groups)
        budget = max(1, min(M, round(self.keep_fraction * M)))
        kept, kept_nodes = compressed_circuit(groups, effect, budget)
        comp = score_circuit(lm, saes, hooks, data, kept_nodes, means, m_full, m_empty, self.batch_size)
        same = score_circuit(lm, saes, hooks, data, nodes[: len(kept_nodes)], means, m_full, m_empty, self.batch_size)
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
