r"""Exact k nearest neighbours under a batched solver (Sinkhorn, sliced), without solving every pair.

For each row of A the features of B are visited in increasing lower bound (see
:mod:`saeot.transport._bounds`); the search stops as soon as the next bound exceeds
the current k-th best cost, so the result equals brute force under the same solver.
:func:`_search_nearest` is the loop over chunks of rows; :func:`_nearest_batched_chunk`
visits the candidates of a chunk in batched rounds. The exact solver's search (a
cascade of bounds, optionally certified) is :mod:`saeot.transport._nearest_exact`.

With an ``offset`` (:class:`~saeot.transport.CostOffset`) the cost searched is
``weight * v + O[i, j]`` for the solver's value ``v``: the bound ``L`` of ``v``, lowered by the
solver's rounding slack first, becomes ``weight * L + O`` lowered by the offset's slack
(:mod:`saeot.transport._offset` proves that it bounds the searched cost), costs are held in
float64 and each solved pair's cost is ``offset.total``, the caller's own number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.transport._bounds import _bound_embeddings, _bound_rows, _centre
from saeot.transport._cost import _alive
from saeot.transport._offset import CostOffset, _shift
from saeot.transport._parallel import _bar

# Pruning keeps a candidate unless bound * (1 - rtol) - atol > k-th best cost, so rounding
# in the bound or the solver can never prune a pair that might belong to the top k.
_SLACK = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class NearestResult:
    """The k nearest features of B for every feature of A under one solver.

    Attributes:
        cost: ``[Fa, k]`` ascending along dim 1 (ties broken by the smaller index in B);
            ``inf`` where fewer than k alive features exist or the row is dead.
        index: ``[Fa, k]`` long into B, -1 where ``cost`` is inf.
        n_solved: number of pairs the solver actually evaluated.
        n_pairs: number of (alive A, alive B) pairs brute force would have evaluated.
        bound: the lower bound that was used for pruning (``none`` if none).
        n_certified: rows of A whose k nearest were certified by Sinkhorn bounds before any
            exact solve (only :class:`~saeot.transport.ExactW2` with ``certify=True``).
        n_rows: alive rows of A.
    """

    cost: Tensor
    index: Tensor
    n_solved: int
    n_pairs: int
    bound: str = "none"
    n_certified: int = 0
    n_rows: int = 0

    @property
    def solved_fraction(self) -> float:
        return self.n_solved / self.n_pairs if self.n_pairs else 0.0

    @property
    def certified_fraction(self) -> float:
        return self.n_certified / self.n_rows if self.n_rows else 0.0


def _search_nearest(pairs, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int, bound: str, chunk: int,
                    progress: bool = False, desc: str = "W2 nearest", offset: CostOffset | None = None,
                    rows: Tensor | None = None) -> NearestResult:
    """The pruned search of :meth:`~saeot.transport.W2Solver.nearest` (inputs already checked).

    ``pairs`` is the solver's pair evaluator (``dtype``, ``theta``, ``nearest_chunk``);
    ``bound`` the bound it may use (``none`` disables pruning). Bounds are computed for
    ``chunk`` rows of A at a time (memory ``chunk * Fb`` float64). ``offset``: search
    ``weight * v + O`` (module docstring). ``rows``: only these rows of A (long indices; the
    result has one row each), searched with everything else computed on all of A.
    """
    Fa, Fb = xa.shape[0], xb.shape[0]
    alive_a, alive_b = _alive(wa), _alive(wb)
    sel = None if rows is None else rows.long().to(xa.device)
    n_rows = Fa if sel is None else sel.numel()
    n_alive_a = int(alive_a.sum() if sel is None else alive_a[sel].sum())
    n_pairs = n_alive_a * int(alive_b.sum())
    dtype = pairs.dtype if offset is None else torch.float64
    prune = bound != "none"
    atol = 0.0
    if prune:
        theta = pairs.theta if bound == "sliced" else None
        ua, ub, c = _centre(*_bound_embeddings(bound, xa, wa, xb, wb, theta))
        atol = _SLACK[pairs.dtype] * c * float(torch.cat([(ua * ua).sum(1), (ub * ub).sum(1)]).max())
    cost = torch.full((n_rows, k), math.inf, dtype=dtype)
    index = torch.full((n_rows, k), -1, dtype=torch.long)
    n_solved = 0
    bar = _bar(progress, n_rows, desc)
    try:
        for s in range(0, n_rows, chunk):
            if sel is None:
                rows_s, block = torch.arange(s, min(Fa, s + chunk), device=xa.device), slice(s, s + chunk)
            else:
                rows_s = block = sel[s:s + chunk]
            if prune:
                lb = _bound_rows(ua, ub, c, alive_b, block)
            else:
                lb = torch.zeros(len(rows_s), Fb, dtype=torch.float64, device=xa.device)
                lb.masked_fill_(~alive_b.unsqueeze(0), math.inf)
            lb.masked_fill_(~alive_a[rows_s].unsqueeze(1), math.inf)
            chunk_atol = atol
            if offset is not None and prune:  # a safe bound of the searched cost: nothing left to lower
                rtol = _SLACK[pairs.dtype]
                O = offset.dense(rows_s.cpu()).to(lb)
                lb = _shift(lb * (1.0 - rtol) - atol, O, float(offset.weight))
                chunk_atol = None
            c_, i_, n_ = pairs.nearest_chunk(lb, rows_s, k, prune, chunk_atol, bar, offset=offset)
            cost[s:s + len(rows_s)] = c_
            index[s:s + len(rows_s)] = i_
            n_solved += n_
    finally:
        if bar is not None:
            bar.close()
    return NearestResult(cost.to(xa.device), index.to(xa.device), int(n_solved), n_pairs, bound,
                         n_rows=n_alive_a)


def _sorted_bounds(lb: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m smallest bounds of each row of ``lb [n, Fb]`` ascending, and their columns."""
    if m >= lb.shape[1]:
        return lb.sort(dim=1, stable=True)
    v, i = torch.topk(lb, m, dim=1, largest=False, sorted=True)
    return v, i


def _merge_topk(bc: Tensor, bi: Tensor, nc: Tensor, ni: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of ``[bc | nc]`` per row, ties by index (stable sort by index, then by cost)."""
    c = torch.cat([bc, nc], 1)
    i = torch.cat([bi, ni], 1)
    c = torch.where(i < 0, torch.full_like(c, math.inf), c)
    key = torch.where(i < 0, torch.full_like(i, torch.iinfo(torch.long).max), i)
    o = key.sort(dim=1, stable=True).indices
    c, i = c.gather(1, o), i.gather(1, o)
    o = c.sort(dim=1, stable=True).indices[:, :k]
    c, i = c.gather(1, o), i.gather(1, o)
    return c, torch.where(torch.isfinite(c), i, torch.full_like(i, -1))


def _nearest_batched_chunk(pairs, lb: Tensor, rows: Tensor, k: int, prune: bool, atol: float | None, bar,
                           max_step: int = 64, offset: CostOffset | None = None) -> tuple[Tensor, Tensor, int]:
    """Top-k of ``rows`` with a batched solver: rounds of k, 2k, ... (<= max_step) candidates per row.

    ``pairs`` is the batched pair evaluator (``dtype``, ``costs(ia, ib)``); all active
    rows of the chunk are solved together. ``atol`` None: ``lb`` is already safe (lowered by
    every slack), a candidate is pruned when its bound exceeds the k-th best cost. ``offset``:
    solved costs are ``offset.total`` of the solver's values, in float64.

    ``lb [n, Fb]`` is overwritten (visited entries become -inf).
    """
    n_rows, Fb = lb.shape
    dev = lb.device
    dtype = pairs.dtype if offset is None else torch.float64
    lb_v, lb_i = _sorted_bounds(lb, min(Fb, max(8 * k, 64)))
    best_c = torch.full((n_rows, k), math.inf, dtype=dtype, device=dev)
    best_i = torch.full((n_rows, k), -1, dtype=torch.long, device=dev)
    rtol = _SLACK[pairs.dtype]

    def pruned(v: Tensor) -> Tensor:  # bound exceeds the current k-th best: cannot enter the top k
        if not prune:
            return torch.zeros_like(v, dtype=torch.bool)
        if atol is None:
            return v > best_c[:, -1:].to(torch.float64)
        return (v * (1.0 - rtol) - atol) > best_c[:, -1:].to(torch.float64)

    active = torch.isfinite(lb_v[:, 0]) if Fb else torch.zeros(n_rows, dtype=torch.bool, device=dev)
    if bar is not None:
        bar.update(n_rows - int(active.sum()))
    pos, step, n_solved = 0, k, 0
    while pos < Fb and bool(active.any()):
        if pos + step > lb_v.shape[1] and lb_v.shape[1] < Fb:
            lb_v, lb_i = _sorted_bounds(lb, min(Fb, max(4 * lb_v.shape[1], pos + step + 1)))
        hi = min(pos + step, Fb)
        wv, wi = lb_v[:, pos:hi], lb_i[:, pos:hi]
        want = active.unsqueeze(1) & torch.isfinite(wv) & ~pruned(wv)
        rr, cc = want.nonzero(as_tuple=True)
        new_c = torch.full(wv.shape, math.inf, dtype=dtype, device=dev)
        if rr.numel():
            ia, ib = rows[rr], wi[rr, cc]
            v = pairs.costs(ia, ib)
            if offset is not None:
                v = offset.total(v, ia, ib)
            new_c[rr, cc] = v.to(device=dev, dtype=dtype)
            n_solved += int(rr.numel())
        best_c, best_i = _merge_topk(best_c, best_i, new_c, torch.where(want, wi, torch.full_like(wi, -1)), k)
        # visited columns sort first from now on, so a longer list re-sorted later keeps them in [0, pos)
        lb.scatter_(1, wi, -math.inf)
        pos = hi
        if pos >= Fb:
            break
        if pos >= lb_v.shape[1]:
            lb_v, lb_i = _sorted_bounds(lb, min(Fb, max(4 * lb_v.shape[1], pos + 1)))
        nxt = lb_v[:, pos:pos + 1]
        still = (torch.isfinite(nxt) & ~pruned(nxt)).squeeze(1)
        if bar is not None:
            bar.update(int((active & ~still).sum()))
        active &= still
        step = min(2 * step, max_step)
    if bar is not None:
        bar.update(int(active.sum()))
    return best_c.cpu(), best_i.cpu(), n_solved
