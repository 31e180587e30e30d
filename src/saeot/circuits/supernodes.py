r"""Supernodes: circuit nodes clustered by the semantic optimal-transport distance.

Each feature node (hook h, feature i) is the activation-weighted distribution
:math:`\mu_{h,i}` of the hidden states that express it, projected into the shared
reference space (``run.projected``); nodes of every layer live in that one space, so

.. math::
    D_{ab} = W_2^2(\mu_a, \mu_b)

is defined within and across layers (:func:`semantic_distances`, through
:meth:`saeot.transport.W2Solver.pairwise`). The baseline distance is the decoder cosine
distance :math:`1 - \cos(W_{dec}[a], W_{dec}[b])` (:func:`decoder_cosine_distances`; across
layers too, since residual-stream directions share one basis).

Clustering (:func:`agglomerate`) is agglomerative with average linkage
(``scipy.cluster.hierarchy``), cut either at a distance threshold or at a target
number of clusters. Error nodes and features without samples (never fired while
profiling; every distance to them is infinite) are singletons. Each supernode is
labelled by the tokens its members' samples sit on (:func:`token_label`).

:func:`compress_graph` applies all of it to a :class:`~saeot.circuits.graph.CircuitGraph`,
including one made elsewhere (circuit-tracer / Neuronpedia JSON), given the feature
distributions of its layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

from saeot.circuits.graph import CircuitGraph, GraphNode, Supernode
from saeot.transport import ExactW2, W2Solver
from saeot.types import FeatureSamples

__all__ = [
    "stack_samples",
    "semantic_distances",
    "decoder_cosine_distances",
    "agglomerate",
    "target_count",
    "token_label",
    "Clustering",
    "compress_graph",
    "graph_feature_keys",
]


# ----------------------------------------------------------------------------- distances
def stack_samples(samples: dict[str, FeatureSamples], keys: Sequence[tuple[str, int]]) -> tuple[Tensor, Tensor]:
    """Distributions of the features ``keys = [(hook, feature), ...]`` as one batch.

    Returns:
        ``x [N, K, r]`` points and ``w [N, K]`` weights, K = the largest K among the
        hooks (shorter ones padded with zero weight).
    """
    if not keys:
        raise ValueError("no features to stack")
    missing = sorted({h for h, _ in keys if h not in samples})
    if missing:
        raise KeyError(f"no feature samples for hook(s) {missing}; have {sorted(samples)}")
    dims = {samples[h].points.shape[2] for h, _ in keys}
    if len(dims) != 1:
        raise ValueError(f"feature samples of the hooks live in spaces of different widths {sorted(dims)}: "
                         "use the projected (reference-space) samples")
    K = max(samples[h].points.shape[1] for h, _ in keys)
    r = dims.pop()
    x = torch.zeros(len(keys), K, r, dtype=torch.float32)
    w = torch.zeros(len(keys), K, dtype=torch.float32)
    for n, (h, i) in enumerate(keys):
        s = samples[h]
        if not 0 <= i < s.n_features:
            raise IndexError(f"feature {i} out of range for {h} ({s.n_features} features)")
        k = s.points.shape[1]
        x[n, :k] = s.points[i].float().cpu()
        w[n, :k] = s.weights[i].float().cpu()
    return x, w


def semantic_distances(samples: dict[str, FeatureSamples], keys: Sequence[tuple[str, int]],
                       solver: W2Solver | None = None, progress: bool = False) -> Tensor:
    r"""``[N, N]`` float64 :math:`W_2^2` between the features ``keys`` (symmetrised, zero
    diagonal) under ``solver`` (default :class:`~saeot.transport.ExactW2`); rows and
    columns of features without samples are ``inf``."""
    x, w = stack_samples(samples, keys)
    D = (solver or ExactW2()).pairwise(x, w, x, w, progress=progress).double().cpu()
    D = 0.5 * (D + D.T)
    alive = w.sum(1) > 0
    D.fill_diagonal_(0.0)
    D[~alive] = math.inf
    D[:, ~alive] = math.inf
    return D.clamp_min(0.0)


def decoder_cosine_distances(saes: dict[str, Any], keys: Sequence[tuple[str, int]]) -> Tensor:
    """``[N, N]`` float64 ``1 - cos`` between the decoder rows ``W_dec[i]`` of the features
    ``keys``, within and across hooks."""
    rows = []
    for h, i in keys:
        if h not in saes:
            raise KeyError(f"no SAE for hook {h}")
        rows.append(saes[h].W_dec[i].detach().double().cpu())
    V = torch.stack(rows)
    V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
    D = (1.0 - V @ V.T).clamp_min(0.0)
    D.fill_diagonal_(0.0)
    return 0.5 * (D + D.T)


# ----------------------------------------------------------------------------- clustering
def target_count(n_nodes: int, n_supernodes: int | None = None, compression: float | None = None) -> int:
    """The number of supernodes asked for: ``n_supernodes``, else ``ceil(n_nodes / compression)``."""
    if n_supernodes is not None:
        if n_supernodes < 1:
            raise ValueError(f"circuit.n_supernodes={n_supernodes} must be >= 1")
        return min(int(n_supernodes), n_nodes)
    if compression is None or compression < 1:
        raise ValueError(f"circuit.compression={compression} must be >= 1 (or set circuit.n_supernodes)")
    return max(1, math.ceil(n_nodes / compression))


def agglomerate(D: Tensor, n_clusters: int | None = None, threshold: float | None = None,
                method: str = "average") -> np.ndarray:
    """Agglomerative clustering of N items from their distances.

    Args:
        D: ``[N, N]`` symmetric distances; an item whose diagonal entry is not finite
            (no distribution, as :func:`semantic_distances` marks it) is a singleton.
        n_clusters: cut the dendrogram into this many clusters *in total*, singletons
            included (as close as ties allow; clipped to what is possible).
        threshold: or cut it where the merge distance exceeds this (``criterion="distance"``).
        method: scipy linkage method (``average``, ``complete``, ``single``, ``weighted``).

    Returns:
        ``[N]`` int labels ``0..M-1``, numbered in order of first appearance.
    """

    if (n_clusters is None) == (threshold is None):
        raise ValueError("give exactly one of n_clusters (circuit.n_supernodes / compression) or threshold "
                         "(circuit.distance_threshold)")
    if method not in ("average", "complete", "single", "weighted"):
        raise ValueError(f"circuit.linkage={method!r}; use average, complete, single or weighted")
    N = D.shape[0]
    if D.shape != (N, N):
        raise ValueError(f"D must be square, got {tuple(D.shape)}")
    Dn = D.double().cpu().numpy()
    ok = np.isfinite(np.diag(Dn)) if N else np.zeros(0, dtype=bool)
    idx = np.flatnonzero(ok)
    raw = np.full(N, -1, dtype=np.int64)
    if len(idx) == 1:
        raw[idx] = 0
    elif len(idx) > 1:
        sub = Dn[np.ix_(idx, idx)]
        if not np.isfinite(sub).all():
            raise ValueError("distances between items that have a distribution must be finite")
        sub = 0.5 * (sub + sub.T)
        np.fill_diagonal(sub, 0.0)
        Z = linkage(squareform(sub, checks=False), method=method)
        if n_clusters is not None:
            k = int(np.clip(n_clusters - (N - len(idx)), 1, len(idx)))
            raw[idx] = fcluster(Z, t=k, criterion="maxclust")
        else:
            raw[idx] = fcluster(Z, t=float(threshold), criterion="distance")
    nxt = int(raw.max()) + 1 if (raw >= 0).any() else 0
    for i in np.flatnonzero(raw < 0):
        raw[i] = nxt
        nxt += 1
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(int(v), len(remap)) for v in raw], dtype=np.int64)


# ----------------------------------------------------------------------------- labels
def token_label(samples: dict[str, FeatureSamples], keys: Sequence[tuple[str, int]], decode: Callable[[list[int]], str],
                top: int = 3) -> str:
    """The ``top`` tokens carrying most of the members' sample weight.

    Each member contributes its normalised sample weights (sum 1) to the token ids
    its samples sit on (``FeatureSamples.token_ids``); the label is the ``top`` heaviest
    tokens, decoded, e.g. ``"' Mary' | ' John' | ' she'"``; ``"(no samples)"`` if none.
    """
    mass: dict[int, float] = {}
    for h, i in keys:
        if h in samples:
            for t, wt in samples[h].token_mass(i).items():
                mass[t] = mass.get(t, 0.0) + wt
    if not mass:
        return "(no samples)"
    best = sorted(mass, key=lambda t: (-mass[t], t))[:top]
    return " | ".join(repr(decode([t]))[:16] for t in best)


def _span(layers: Sequence[int]) -> str:
    ls = sorted(set(layers))
    return f"L{ls[0]}" if len(ls) == 1 else f"L{ls[0]}-{ls[-1]}"


# ----------------------------------------------------------------------------- graphs
def graph_feature_keys(graph: CircuitGraph, hook_for_layer: str | Callable[[int], str]) -> dict[str, tuple[str, int]]:
    """``node_id -> (hook, feature index)`` for the feature nodes of ``graph``.

    ``hook_for_layer``: a template such as ``"blocks.{layer}.hook_resid_post"`` or a
    function of the layer; a node's own ``sae_hook`` field (saeot graphs) wins.
    """
    fn = hook_for_layer if callable(hook_for_layer) else (lambda layer: hook_for_layer.format(layer=layer))
    out = {}
    for n in graph.circuit_nodes():
        if n.kind != "feature" or n.layer_index is None:
            continue
        out[n.node_id] = (n.hook or fn(n.layer_index), int(n.feature_index))
    return out


@dataclass
class Clustering:
    """A partition of a graph's feature and error nodes.

    Attributes:
        supernodes: every unit (singletons included), in order of first member.
        node_ids: the clustered feature nodes (rows of ``distances``).
        labels: ``[len(node_ids)]`` their supernode index within ``supernodes``.
        distances: ``[N, N]`` the distances used.
    """

    supernodes: list[Supernode]
    node_ids: list[str]
    labels: np.ndarray
    distances: Tensor

    @property
    def n_supernodes(self) -> int:
        return len(self.supernodes)

    def groups(self) -> list[list[str]]:
        return [list(s.members) for s in self.supernodes]


def compress_graph(graph: CircuitGraph, *, samples: dict[str, FeatureSamples] | None = None,
                   hook_for_layer: str | Callable[[int], str] = "blocks.{layer}.hook_resid_post",
                   distances: Tensor | None = None, n_supernodes: int | None = None,
                   compression: float | None = None, distance_threshold: float | None = None,
                   method: str = "average", solver: W2Solver | None = None,
                   decode: Callable[[list[int]], str] | None = None) -> tuple[CircuitGraph, Clustering]:
    """Cluster a graph's nodes into supernodes and return a copy of it that carries them.

    Args:
        graph: any :class:`CircuitGraph` (made by saeot or read from a circuit-tracer file).
        samples: ``hook -> FeatureSamples`` in the shared reference space (a run's
            ``projected``); needed for the semantic distance and for labels.
        hook_for_layer: maps a node's layer to the hook of its samples (see
            :func:`graph_feature_keys`).
        distances: ``[N, N]`` distances between the feature nodes in
            :func:`graph_feature_keys` order, to cluster by another distance (e.g.
            :func:`decoder_cosine_distances`); default the semantic W2.
        n_supernodes / compression / distance_threshold: how to cut (see
            :func:`target_count`, :func:`agglomerate`); ``n_supernodes`` counts all units.
        method: linkage.
        solver: the transport solver of the semantic distance (default :class:`~saeot.transport.ExactW2`).
        decode: token ids -> text, for labels.

    Returns:
        ``(graph with supernodes, clustering)``. Error nodes and features without
        samples are singletons; each supernode's label is its layer span plus its
        members' top tokens (``"L3-4: ' Mary' | ' John'"``).
    """
    keys_by_id = graph_feature_keys(graph, hook_for_layer)
    node_ids = list(keys_by_id)
    keys = [keys_by_id[i] for i in node_ids]
    nodes = graph.node_map()
    if distances is None:
        if samples is None:
            raise ValueError("compress_graph needs samples (hook -> FeatureSamples) or distances")
        distances = (semantic_distances(samples, keys, solver=solver)
                     if keys else torch.zeros(0, 0, dtype=torch.float64))
    if distances.shape != (len(keys), len(keys)):
        raise ValueError(f"distances {tuple(distances.shape)} must be [{len(keys)}, {len(keys)}] (feature nodes)")
    n_units = len(graph.circuit_nodes())
    n_errors = n_units - len(keys)
    if distance_threshold is not None:
        labels = agglomerate(distances, threshold=distance_threshold, method=method) if keys else np.zeros(0, np.int64)
    else:
        target = target_count(n_units, n_supernodes, compression)
        labels = (agglomerate(distances, n_clusters=max(1, target - n_errors), method=method)
                  if keys else np.zeros(0, np.int64))
    members: dict[int, list[str]] = {}
    for nid, lab in zip(node_ids, labels.tolist()):
        members.setdefault(lab, []).append(nid)
    supernodes: list[Supernode] = []
    index_of: dict[int, int] = {}
    for lab, mem in members.items():
        index_of[lab] = len(supernodes)
        layers = [nodes[m].layer_index for m in mem if nodes[m].layer_index is not None]
        toks = token_label(samples, [keys_by_id[m] for m in mem], decode) if (samples is not None and decode) else ""
        supernodes.append(Supernode(f"{_span(layers)}: {toks}" if toks else _span(layers), mem))
    for n in graph.circuit_nodes():
        if n.node_id not in keys_by_id:
            supernodes.append(Supernode(n.clerp or _error_label(n), [n.node_id]))
    new_labels = np.array([index_of[int(lab)] for lab in labels], dtype=np.int64)
    return graph.with_supernodes(supernodes), Clustering(supernodes, node_ids, new_labels, distances)


def _error_label(n: GraphNode) -> str:
    return f"L{n.layer}: SAE error" if n.kind == "error" else n.node_id
