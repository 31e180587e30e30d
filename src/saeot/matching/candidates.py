"""Candidate search on a dense cost: the ``k`` cheapest partners of every row.

Shared by the matchers whose cost of all pairs fits in memory a chunk of rows at a
time (SAE Match, feature flow, activation correlation, mean embedding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["topk_from_dense", "chunked_candidates"]


def topk_from_dense(cost: Tensor, k: int, alive_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``k`` smallest entries per row of a dense ``[F_a, F_b]`` cost (``inf`` = impossible)."""
    if alive_b is not None:
        cost = cost.masked_fill(~alive_b.to(cost.device)[None, :], float("inf"))
    k_eff = min(k, cost.shape[1])
    values, index = torch.topk(cost, k_eff, dim=1, largest=False)
    index = index.masked_fill(~torch.isfinite(values), -1)
    if k_eff < k:
        pad = k - k_eff
        values = torch.cat([values, values.new_full((cost.shape[0], pad), float("inf"))], dim=1)
        index = torch.cat([index, index.new_full((cost.shape[0], pad), -1)], dim=1)
    return values, index


def chunked_candidates(
    cost_rows: Callable[[int, int], Tensor],
    n_a: int,
    k: int,
    chunk_size: int,
    alive_a: Tensor | None = None,
    alive_b: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``k`` cheapest partners of every row, computing the dense cost one chunk of rows at a time.

    Args:
        cost_rows: ``(start, stop) -> [stop - start, F_b]`` dense cost of rows ``start:stop``.
        n_a: number of rows (features of A).
        k: candidates kept per row.
        chunk_size: rows per chunk; peak memory O(chunk_size * F_b).
        alive_a: ``[F_a]`` bool; dead rows get no candidates (all ``inf`` / -1).
        alive_b: ``[F_b]`` bool; dead columns are never candidates.

    Returns:
        ``cost [F_a, k]`` ascending (``inf`` padding) and ``index [F_a, k]`` long (-1 padding).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    costs, indices = [], []
    for start in range(0, n_a, chunk_size):
        stop = min(start + chunk_size, n_a)
        cost = cost_rows(start, stop)
        if alive_a is not None:
            cost = cost.masked_fill(~alive_a[start:stop].to(cost.device)[:, None], float("inf"))
        c, i = topk_from_dense(cost, k, alive_b)
        costs.append(c)
        indices.append(i)
    if not costs:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(costs), torch.cat(indices)
