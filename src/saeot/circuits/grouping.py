r"""The groupings supernodes are compared across: each is a distance between the feature nodes
of a circuit, clustered by :func:`~saeot.circuits.supernodes.agglomerate` at a target count.

==========================  ===============================================================
grouping                    distance between feature nodes a, b
==========================  ===============================================================
``semantic_ot``             :math:`W_2^2` between their activation-weighted distributions
                            (:func:`~saeot.circuits.supernodes.semantic_distances`)
``decoder_cosine``          :math:`1 - \cos(W_{dec}[a], W_{dec}[b])`
``attribution_profile``     :math:`1 - \cos(p_a, p_b)` of their attribution profiles
                            (:func:`attribution_profiles`): the grouping proposed for the
                            Neuronpedia / circuit-tracer graph viewer, nodes that read from
                            and write to the same nodes with the same signs belong together
``random``                  a seeded random partition into the target count
                            (:func:`random_partition_distances`): the floor any grouping
                            must beat
==========================  ===============================================================

The attribution profile of a node n over the N circuit nodes is the signed vector

.. math::
    p_n = \big(w_{m_1 \to n}, \dots, w_{m_N \to n},\ w_{n \to m_1}, \dots, w_{n \to m_N},\ \mathrm{IE}(n)\big)
    \in \mathbb{R}^{2N + 1},

its incoming and outgoing edge weights and, as its edge to the task metric, its
attribution effect. Nodes with proportional profiles (same partners, same signs) are at
distance 0; a node without any edge or effect has no direction and is at distance 1
from every other node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from saeot.circuits.attribution import NodeRef

__all__ = ["GROUPINGS", "attribution_profiles", "cosine_distances", "random_partition_distances"]

GROUPINGS = ("semantic_ot", "decoder_cosine", "attribution_profile", "random")


def attribution_profiles(nodes: Sequence[NodeRef], all_nodes: Sequence[NodeRef],
                         edges: Mapping[tuple[NodeRef, NodeRef], float], effect: Mapping[NodeRef, float]) -> Tensor:
    """``[len(nodes), 2 N + 1]`` float64 signed profiles (module docstring) over ``all_nodes`` (N).

    Args:
        nodes: the nodes to describe (e.g. the circuit's feature nodes).
        all_nodes: the circuit's nodes, features and errors (the profile's coordinates).
        edges: ``(source, target) -> weight`` (e.g. :class:`~saeot.circuits.attribution.Edges`'s ``weights``).
        effect: node -> attribution effect on the metric.
    """
    index = {n: i for i, n in enumerate(all_nodes)}
    N = len(all_nodes)
    row = {n: r for r, n in enumerate(nodes)}
    P = torch.zeros(len(nodes), 2 * N + 1, dtype=torch.float64)
    for (src, dst), w in edges.items():
        if dst in row and src in index:
            P[row[dst], index[src]] += float(w)  # incoming
        if src in row and dst in index:
            P[row[src], N + index[dst]] += float(w)  # outgoing
    for n, r in row.items():
        P[r, 2 * N] = float(effect.get(n, 0.0))
    return P


def cosine_distances(X: Tensor) -> Tensor:
    """``[M, M]`` float64 ``1 - cos`` between the rows of ``X``; a zero row is at distance 1 from
    every other row (0 from itself)."""
    X = X.double()
    norm = X.norm(dim=1, keepdim=True)
    U = torch.where(norm > 0, X / norm.clamp_min(1e-300), torch.zeros_like(X))
    D = (1.0 - U @ U.T).clamp(0.0, 2.0)
    D = 0.5 * (D + D.T)
    D.fill_diagonal_(0.0)
    return D


def random_partition_distances(n: int, n_groups: int, seed: int) -> Tensor:
    """``[n, n]`` float64 distances of a seeded random partition of n items into
    ``min(n_groups, n)`` non-empty groups: 0 within a group, 1 between groups, so
    clustering them at that count gives the partition back."""
    k = int(max(1, min(n_groups, n)))
    rng = np.random.default_rng(seed)
    labels = np.empty(n, dtype=np.int64)
    order = rng.permutation(n)
    labels[order[:k]] = np.arange(k)  # every group non-empty
    labels[order[k:]] = rng.integers(0, k, size=n - k)
    lab = torch.as_tensor(labels)
    return (lab[:, None] != lab[None, :]).double()
