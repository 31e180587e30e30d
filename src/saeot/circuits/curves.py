r"""Faithfulness against compression: every grouping (:mod:`saeot.circuits.grouping`) at several
supernode counts.

For each target count M (``callbacks.circuit.curve_counts``, default from the compression
ratios ``curve_ratios``: :math:`M = \lceil n / r \rceil` for a circuit of n nodes, error
nodes staying singletons) and each grouping, the circuit's nodes are clustered into M
supernodes and the compressed circuit keeps the ``keep_fraction`` of supernodes with
the largest :math:`|\sum_{x \in S} \mathrm{IE}(x)|` (whole; every other supernode is
ablated as a unit, :func:`~saeot.circuits.scoring.compressed_circuit`). A point of the
curve is its compression ratio :math:`n / M`, faithfulness and task accuracy, with the
share of the kept nodes' :math:`|\mathrm{IE}|` that sits in SAE error nodes
(``error_share_kept``): where that is large, the features do not carry the task and no
grouping of them can. Every grouping gets the same counts, budget and ablation.

Keeping whole supernodes keeps more nodes where a grouping makes larger supernodes, and
faithfulness grows with the nodes kept: a grouping that lumps the circuit into one big
supernode "wins" on faithfulness at a fixed count for that reason alone. Each point
therefore also scores the circuit of the same number of nodes taken one by one, largest
:math:`|\mathrm{IE}|` first (``faithfulness_top_nodes``), and reports
``grouping_gain = faithfulness - faithfulness_top_nodes``: what choosing whole supernodes
gains (> 0) or loses (< 0) against choosing the same number of nodes individually. That is
the comparison between groupings that the node count does not decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from torch import Tensor

from saeot.circuits.attribution import NodeRef
from saeot.circuits.graph import CircuitGraph
from saeot.circuits.grouping import random_partition_distances
from saeot.circuits.scoring import CircuitScore, compressed_circuit
from saeot.circuits.supernodes import compress_graph
from saeot.plots import save_figure

__all__ = ["DEFAULT_RATIOS", "curve_counts", "curve_point", "ranked_nodes", "supernode_curves", "plot_supernode_curves"]

#: compression ratios the default supernode counts come from
DEFAULT_RATIOS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def curve_counts(n_nodes: int, n_errors: int, counts: Sequence[int] | None = None,
                 ratios: Sequence[float] = DEFAULT_RATIOS) -> list[int]:
    """Distinct supernode counts, largest first: ``counts`` or ``ceil(n_nodes / r)`` for each ratio,
    clipped to what a partition with singleton error nodes allows (``n_errors + 1 .. n_nodes``)."""
    lo = min(n_nodes, n_errors + 1) if n_nodes > n_errors else n_nodes
    raw = list(counts) if counts else [math.ceil(n_nodes / r) for r in ratios]
    bad = [c for c in raw if c < 1] + [r for r in ([] if counts else ratios) if r < 1]
    if bad:
        raise ValueError(f"callbacks.circuit.curve_counts / curve_ratios has {bad}: counts and ratios must be >= 1")
    return sorted({int(min(max(c, lo), n_nodes)) for c in raw}, reverse=True)


def ranked_nodes(groups: Sequence[Sequence[NodeRef]], effect: Mapping[NodeRef, float]) -> list[NodeRef]:
    """The nodes of ``groups``, largest :math:`|\mathrm{IE}|` first (ties by node), as the circuit selects them."""
    return sorted((n for g in groups for n in g), key=lambda n: (-abs(effect[n]), n))


def curve_point(groups: Sequence[Sequence[NodeRef]], effect: Mapping[NodeRef, float], n_nodes: int,
                keep_fraction: float, score: Callable[[list[NodeRef]], CircuitScore]) -> dict:
    """One point: the compressed circuit of ``groups`` under the budget ``keep_fraction``, scored,
    beside the circuit of the same number of nodes chosen one by one (module docstring)."""
    M = len(groups)
    budget = max(1, min(M, round(keep_fraction * M)))
    _, kept = compressed_circuit(groups, dict(effect), budget)
    s = score(kept)
    top = score(ranked_nodes(groups, effect)[: len(kept)])
    tot = sum(abs(effect[n]) for n in kept)
    sizes = [len(g) for g in groups]
    return {
        "supernodes": M, "compression_ratio": n_nodes / M if M else float("nan"), "supernodes_kept": budget,
        "nodes_kept": len(kept), "faithfulness": s.faithfulness, "task_accuracy": s.accuracy, "metric": s.metric,
        "faithfulness_top_nodes": top.faithfulness, "grouping_gain": s.faithfulness - top.faithfulness,
        "error_share_kept": sum(abs(effect[n]) for n in kept if n.is_error) / tot if tot > 0 else float("nan"),
        "multi_member_supernodes": sum(x > 1 for x in sizes), "largest_supernode": max(sizes, default=0),
    }


def supernode_curves(graph: CircuitGraph, ref_of: Mapping[str, NodeRef], feature_ids: Sequence[str],
                     effect: Mapping[NodeRef, float], distances: Mapping[str, Tensor | None], counts: Sequence[int],
                     score: Callable[[list[NodeRef]], CircuitScore], keep_fraction: float = 0.5,
                     linkage: str = "average", seed: int = 0) -> dict[str, list[dict]]:
    """``grouping -> [point per count]`` (module docstring). ``score`` is called once per distinct
    set of kept nodes (the same-count node circuits recur across groupings).

    Args:
        graph: the circuit graph (its circuit nodes: features and errors).
        ref_of: graph node id -> :class:`NodeRef`.
        feature_ids: the feature node ids in the order of the distance matrices'
            rows (:func:`~saeot.circuits.supernodes.graph_feature_keys` order).
        effect: node -> attribution effect.
        distances: grouping -> ``[F, F]`` distances between the feature nodes; None for
            ``random`` (a seeded partition is drawn per count).
        counts: target supernode counts (errors included).
        score: nodes kept -> their :class:`CircuitScore` (everything else mean-ablated).
        keep_fraction, linkage: budget and linkage, as for the main compression.
        seed: seed of the random grouping (the same partition for the same seed and count).
    """
    n_units = len(graph.circuit_nodes())
    n_errors = n_units - len(feature_ids)
    memo: dict[frozenset, CircuitScore] = {}

    def scored(kept: list[NodeRef]) -> CircuitScore:
        key = frozenset(kept)
        if key not in memo:
            memo[key] = score(kept)
        return memo[key]

    out: dict[str, list[dict]] = {}
    for name, D in distances.items():
        points = []
        for count in counts:
            n_groups = max(1, count - n_errors)
            Dc = D if D is not None else random_partition_distances(len(feature_ids), n_groups, seed + count)
            _, c = compress_graph(graph, distances=Dc, n_supernodes=count, method=linkage)
            groups = [[ref_of[i] for i in g] for g in c.groups()]
            points.append({"target_supernodes": int(count), **curve_point(groups, effect, n_units, keep_fraction,
                                                                          scored)})
        out[name] = points
    return out


def plot_supernode_curves(curves: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Against compression ratio, a line per grouping: faithfulness and task accuracy of the
    compressed circuit, and its gain over the same number of nodes chosen one by one."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, (name, pts) in enumerate(curves.items()):
        x = [p["compression_ratio"] for p in pts]
        style = {"color": plt.cm.tab10(i % 10), "marker": "o", "ms": 3, "ls": "--" if name == "random" else "-"}
        axes[0].plot(x, [p["faithfulness"] for p in pts], label=name, **style)
        axes[1].plot(x, [p["task_accuracy"] for p in pts], label=name, **style)
        axes[2].plot(x, [p.get("grouping_gain", float("nan")) for p in pts], label=name, **style)
    axes[2].axhline(0.0, color="k", lw=0.6)
    for ax, ylab in zip(axes, ("faithfulness of the compressed circuit", "task accuracy of the compressed circuit",
                               "faithfulness - same number of top nodes")):
        ax.set_xlabel("compression ratio (circuit nodes / supernodes)")
        ax.set_ylabel(ylab, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, Path(path))
