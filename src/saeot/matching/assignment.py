"""One-to-one assignment of features (linear assignment problems) and composition of matches.

Every function here speaks in ``feature_b`` maps: a ``[F_a]`` long tensor whose entry
``i`` is the feature of B assigned to feature ``i`` of A, or -1 for "unassigned".

* :func:`linear_assignment_dense` -- a full ``[F_a, F_b]`` cost matrix (scipy's
  ``linear_sum_assignment``); ``inf`` entries are forbidden pairs.
* :func:`linear_assignment_sparse` -- only ``k`` candidate partners per row
  (``[F_a, k]`` costs and indices, as returned by :meth:`Matcher.candidates`),
  solved with scipy's sparse LAPJV (``min_weight_full_bipartite_matching``).
* :func:`compose_matches` -- chain A->B, B->C, ... maps into A->Z.

Both solvers solve the same problem, lexicographically:

1. assign as many rows as possible (maximum cardinality over allowed pairs), then
2. among those, minimise the total cost ``sum_i cost[i, feature_b[i]]``.

They do it the same way: each row ``i`` gets a private dummy column "unassigned"
with cost ``D``, which makes a full matching (every row matched) always exist. With
the costs shifted to ``[1, 1 + R]`` (``R`` = max - min finite cost) and
``D = 1 + (F_a + 1) * (1 + R)``, trading one dummy for one more real pair always
pays (an augmenting path changes the real cost by at most ``F_a * (1 + R)`` once the
shifted cost has more real edges), so 1. holds; within a fixed cardinality the dummy
terms are constant and the shift adds the same constant to every full matching, so
2. holds. If all candidates contain every column, the answer therefore equals the
dense rectangular LAP (:func:`linear_assignment_dense`), which the tests check.
Passing ``unassigned_cost`` instead makes "unassigned" a real option that a row
takes whenever its best available partner costs more than that value (in the
original cost units).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

__all__ = ["linear_assignment_dense", "linear_assignment_sparse", "compose_matches", "assignment_cost"]


def _dummy_cost(finite: np.ndarray, n_rows: int, unassigned_cost: float | None, shift: float) -> float:
    """Cost of the per-row "unassigned" column in shifted units (see the module docstring)."""
    if unassigned_cost is not None:
        return float(unassigned_cost) - shift
    spread = float(finite.max() - finite.min()) if finite.size else 0.0
    return 1.0 + (n_rows + 1) * (1.0 + spread)


def linear_assignment_dense(cost: Tensor, unassigned_cost: float | None = None) -> Tensor:
    """One-to-one assignment minimising the total cost of a dense matrix.

    Args:
        cost: ``[F_a, F_b]`` float; ``+inf`` marks a forbidden pair. NaN is an error.
            Rectangular is fine: with ``F_a > F_b`` at most ``F_b`` rows are assigned.
        unassigned_cost: if given, a row may stay unassigned at this cost (a real
            option); if None, as many rows as possible are assigned (see module docstring).

    Returns:
        feature_b: ``[F_a]`` long on ``cost``'s device; -1 for rows left unassigned
        (no allowed partner, more rows than columns, or unassigned cheaper).
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be [F_a, F_b], got shape {tuple(cost.shape)}")
    device = cost.device
    c = cost.detach().double().cpu().numpy()
    n_a, n_b = c.shape
    out = np.full(n_a, -1, dtype=np.int64)
    if n_a == 0 or n_b == 0:
        return torch.from_numpy(out).to(device)
    if np.isnan(c).any() or np.isneginf(c).any():
        raise ValueError("linear_assignment_dense: cost contains NaN or -inf")
    finite = np.isfinite(c)
    if finite.all() and unassigned_cost is None:
        rows, cols = linear_sum_assignment(c)
        out[rows] = cols
        return torch.from_numpy(out).to(device)
    if not finite.any() and unassigned_cost is None:
        return torch.from_numpy(out).to(device)
    vals = c[finite]
    shift = float(vals.min()) - 1.0 if vals.size else 0.0
    dummy = _dummy_cost(vals, n_a, unassigned_cost, shift)
    # [F_a, F_b + F_a]: real columns (shifted; forbidden -> inf) then one private dummy per row
    big = np.full((n_a, n_b + n_a), np.inf)
    big[:, :n_b] = np.where(finite, c - shift, np.inf)
    big[np.arange(n_a), n_b + np.arange(n_a)] = dummy
    rows, cols = linear_sum_assignment(big)
    real = cols < n_b
    out[rows[real]] = cols[real]
    return torch.from_numpy(out).to(device)


def linear_assignment_sparse(
    cost: Tensor, index: Tensor, n_b: int, unassigned_cost: float | None = None
) -> Tensor:
    """One-to-one assignment restricted to candidate pairs (sparse LAP).

    Row ``i`` may only take the columns ``index[i, j]`` with ``index[i, j] >= 0`` and
    ``cost[i, j]`` finite. A private dummy column per row ("unassigned", cost ``D``;
    module docstring) keeps the problem feasible whatever the candidates, so the
    solver never fails: rows that lose every candidate to others come back -1.
    Duplicate candidates in a row keep their cheapest cost.

    Args:
        cost: ``[F_a, k]`` float candidate costs (``inf`` = absent; NaN is an error).
        index: ``[F_a, k]`` long column of each candidate in ``[0, n_b)``, -1 = absent.
        n_b: number of columns (features of B).
        unassigned_cost: see :func:`linear_assignment_dense`.

    Returns:
        feature_b: ``[F_a]`` long on ``cost``'s device, -1 = unassigned.

    Cost: LAPJVsp on ``F_a * k + F_a`` edges; memory O(F_a * k).
    """
    if cost.shape != index.shape or cost.dim() != 2:
        raise ValueError(f"cost {tuple(cost.shape)} and index {tuple(index.shape)} must both be [F_a, k]")
    device = cost.device
    c = cost.detach().double().cpu().numpy()
    idx = index.detach().long().cpu().numpy()
    n_a = c.shape[0]
    out = np.full(n_a, -1, dtype=np.int64)
    if n_a == 0:
        return torch.from_numpy(out).to(device)
    if np.isnan(c).any() or np.isneginf(c).any():
        raise ValueError("linear_assignment_sparse: cost contains NaN or -inf")
    if (idx >= n_b).any():
        raise ValueError(f"linear_assignment_sparse: index has entries >= n_b={n_b}")
    keep = (idx >= 0) & np.isfinite(c)
    rows = np.broadcast_to(np.arange(n_a)[:, None], c.shape)[keep]
    cols = idx[keep]
    vals = c[keep]
    if vals.size == 0 and unassigned_cost is None:
        return torch.from_numpy(out).to(device)
    # drop duplicate (row, col) pairs, keeping the cheapest
    order = np.lexsort((vals, cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    rows, cols, vals = rows[first], cols[first], vals[first]

    shift = float(vals.min()) - 1.0 if vals.size else 0.0  # shifted real costs are >= 1: no explicit zeros
    dummy = _dummy_cost(vals, n_a, unassigned_cost, shift)
    if dummy <= 0:
        # unassigned is cheaper than every real pair; scipy needs non-zero weights
        return torch.from_numpy(out).to(device)
    all_rows = np.concatenate([rows, np.arange(n_a)])
    all_cols = np.concatenate([cols, n_b + np.arange(n_a)])
    all_vals = np.concatenate([vals - shift, np.full(n_a, dummy)])
    graph = csr_matrix((all_vals, (all_rows, all_cols)), shape=(n_a, n_b + n_a))
    r, col = min_weight_full_bipartite_matching(graph)
    real = col < n_b
    out[r[real]] = col[real]
    return torch.from_numpy(out).to(device)


def assignment_cost(cost: Tensor, feature_b: Tensor) -> float:
    """Total dense cost ``sum_i cost[i, feature_b[i]]`` over assigned rows (``feature_b >= 0``)."""
    rows = (feature_b >= 0).nonzero().flatten()
    return float(cost[rows, feature_b[rows]].double().sum())


def compose_matches(*feature_b_maps: Tensor) -> Tensor:
    """Compose adjacent matches: A->B, B->C, ..., Y->Z into A->Z.

    ``out[i] = m_n[...m_2[m_1[i]]...]``; -1 anywhere along the path gives -1.

    Args:
        feature_b_maps: ``[F_0]``, ``[F_1]``, ... long maps; map ``t`` indexes into
            the domain of map ``t + 1`` (values in ``[-1, F_{t+1})``).

    Returns:
        ``[F_0]`` long on the first map's device.
    """
    if not feature_b_maps:
        raise ValueError("compose_matches needs at least one map")
    out = feature_b_maps[0].long().clone()
    for step, nxt in enumerate(feature_b_maps[1:], start=1):
        nxt = nxt.long().to(out.device)
        if out.numel() and int(out.max()) >= nxt.shape[0]:
            raise ValueError(
                f"compose_matches: map {step - 1} points to feature {int(out.max())}, "
                f"but map {step} has only {nxt.shape[0]} entries"
            )
        valid = out >= 0
        out = torch.where(valid, nxt[out.clamp_min(0)], torch.full_like(out, -1))
    return out
