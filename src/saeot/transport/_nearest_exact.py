r"""Exact k nearest neighbours under :class:`~saeot.transport.ExactW2`: a bound cascade, optionally certified.

For each chunk of rows of A (:func:`_search_exact`):

1. the dense stages of the cascade (:class:`saeot.transport._cascade._Cascade`) give a safe
   lower bound ``L[i, j]`` for every pair (float64 GEMMs);
2. each row gets a threshold ``t_i`` >= its k-th smallest exact cost: by default the k
   candidates of smallest ``L`` are solved exactly (they are the answer in most rows) and
   ``t_i`` is the k-th of those costs; with ``certify`` batched Sinkhorn on the
   ``candidates`` smallest-``L`` pairs gives upper bounds U (``t_i`` = k-th smallest U) and
   dual lower bounds D (``L = max(L, D)`` on those pairs), see :mod:`saeot.transport._certify`;
3. only the pairs with ``L <= t_i`` go through the pair stages (Gelbrich SVDs, 1-D
   transport), each pair leaving as soon as its bound exceeds ``t_i``;
4. the survivors are solved exactly in increasing bound, one row per task on threads,
   skipping every pair whose bound exceeds ``min(t_i, current k-th best cost)``.

With ``labels`` (:class:`~saeot.transport.LabelCost`) the pairs are solved under the fused ground
cost and :math:`\lambda (1 - o_{ij})`, a lower bound of its label term, is added to every bound
like an offset (:mod:`saeot.transport._labels` proves it); solved costs are the fused ones.

With an ``offset`` (:class:`~saeot.transport.CostOffset`) the cost searched is
``weight * W2^2 + O[i, j]`` for exact extra terms ``O`` and a weight >= 0 (e.g. semantic OT's
debiasing, decoder and mean-gap terms): every bound above is scaled and shifted the same way
(lowered by a rounding slack; why that bounds the searched cost: :mod:`saeot.transport._offset`),
thresholds go back to ``W2^2`` units for the pair stages, and each solved pair's cost is
``w2 + offset.pairs(i, j)`` (``offset.total`` where the offset computes it otherwise), the very
number the caller's own pair evaluation gives.

A pair is left unsolved only when its safe bound exceeds a number that is at least the
row's k-th smallest computed cost, so its own computed cost is strictly larger: the
result equals brute force under the same solver, ties broken by the smaller index. A row
is *certified* when after step 3 only its k neighbours are left: they are known before any
exact solve, and k solves give their costs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from saeot.transport._cascade import _Cascade
from saeot.transport._certify import _sinkhorn_bounds
from saeot.transport._cost import _alive
from saeot.transport._labels import LabelCost, _LabelBound
from saeot.transport._nearest import NearestResult
from saeot.transport._offset import _OFFSET_REL, CostOffset, _RowsOffset, _shift, _w2_limit
from saeot.transport._parallel import _bar, _parallel_map, _split

#: most candidates of a row whose pair-stage bounds the lazy refinement computes at once (one batched call)
LAZY_BLOCK = 32


def _visit(ex, jobs: list, k: int, n_jobs: int, bar=None, combine=None) -> list[tuple[list, int]]:
    """Exact solves along each row's candidate list; returns ``(best, n_solved)`` per job.

    A job is ``(i, bounds, cols, limit, best, offs[, tighter])``: candidates ``cols`` of row ``i`` sorted by
    their safe ``bounds`` (ascending), a threshold ``limit`` (>= the row's k-th smallest
    cost), the ``(cost, j)`` pairs already solved and the candidates' cost offsets (None: 0). A candidate is solved unless its
    bound exceeds ``min(limit, k-th best cost so far)``; then all later ones are skipped too.
    A solved pair's cost is ``w2 + o``, or ``combine(w2, i, j, o)`` when given (:func:`_combiner`).

    ``tighter`` (the lazy refinement; None: off): ``tighter(lo, hi) -> [hi - lo]`` safe bounds of
    candidates ``lo:hi`` at least as tight as ``bounds`` (the cascade's pair stages), asked for in
    blocks (4, then as many as refined so far, at most :data:`LAZY_BLOCK`) as the visit reaches them. A candidate whose tighter bound exceeds
    the threshold is skipped, not solved; the visit still stops at the first ``bounds`` above it (the
    order is by ``bounds``). Exact either way: a skipped pair's cost is above the current k-th best,
    which only decreases. Refining lazily bounds only the pairs the visit reaches, under the
    threshold as it tightens, where refining every pair under the first threshold before the visit
    costs as much as the solves it saves.
    """

    def one(job) -> tuple[list, int]:
        i, bounds, cols, limit, best, offs = job[:6]
        tighter = job[6] if len(job) > 6 else None
        best = list(best)
        pa = ex.side_a(i)
        n = 0
        offs = [0.0] * len(cols) if offs is None else offs.tolist()
        tight: list[float] = []
        for p, (b, j, o) in enumerate(zip(bounds.tolist(), cols.tolist(), offs)):
            thr = min(limit, best[k - 1][0]) if len(best) >= k else limit
            if b > thr:
                break
            if tighter is not None:
                if p >= len(tight):  # blocks of 4, 8, ... LAZY_BLOCK: few pairs refined past the stop
                    step = min(LAZY_BLOCK, max(4, len(tight)))
                    tight.extend(tighter(p, min(p + step, len(cols))).tolist())
                if tight[p] > thr:
                    continue
            w2 = ex.cost_trimmed(pa, ex.side_b(j))
            best.append((w2 + o if combine is None else combine(w2, i, j, o), j))
            best.sort()  # (cost, j): ties by the smaller index, like a stable sort of the row
            del best[k:]
            n += 1
        return best, n

    res = _parallel_map(lambda blk: [one(jobs[q]) for q in blk], _split(len(jobs), 8), n_jobs, bar)
    return [r for blk in res for r in blk]


def _combiner(offset: CostOffset | None):
    """How :func:`_visit` turns a solved ``w2`` into the searched cost: None (``w2 + o``) for no offset
    or an additive one; ``weight * w2 + o`` for another weight; the offset's own ``total`` where it
    overrides it (one pair at a time)."""
    if offset is None:
        return None
    base = offset.offset if isinstance(offset, _RowsOffset) else offset
    if type(base).total is CostOffset.total:
        w = float(offset.weight)
        return None if w == 1.0 else (lambda w2, i, j, o: w * w2 + o)

    def total(w2: float, i: int, j: int, o: float) -> float:
        return float(offset.total(torch.tensor([w2], dtype=torch.float64), torch.tensor([i]), torch.tensor([j]))[0])

    return total


def _kth(best: list, k: int) -> float:
    return best[k - 1][0] if len(best) >= k else math.inf


def _search_exact(ex, cascade: _Cascade, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int, chunk: int,
                  certify: dict | None = None, progress: bool = False, desc: str = "W2 exact nearest",
                  offset: CostOffset | None = None, labels: LabelCost | None = None) -> NearestResult:
    """The search of :meth:`~saeot.transport.ExactW2.nearest` (inputs already checked).

    ``ex`` is the exact pair evaluator (``side_a``, ``side_b``, ``cost_trimmed``, ``n_jobs``),
    ``cascade`` the bounds. ``certify`` (None: off) holds ``candidates``, ``reg``, ``n_iter``
    of the Sinkhorn certification. ``chunk`` rows of A are bounded at once (two
    ``[chunk, Fb]`` float64 matrices). ``offset``: search ``weight * W2^2 + O`` (:class:`CostOffset`).
    ``labels``: ``ex`` solves the fused cost (:mod:`saeot.transport._labels`); its label term's
    bound :math:`\\lambda (1 - o)` joins the offset in every bound, not in the solved costs.
    """
    if labels is not None and certify is not None:
        raise ValueError("transport certify bounds W2^2 only: it does not take a label cost (set certify=false)")
    lbound = None if labels is None else _LabelBound(labels, wa, wb)
    weight = 1.0 if offset is None else float(offset.weight)
    combine = _combiner(offset)
    Fa = xa.shape[0]
    lazy = bool(cascade.pair_stages) and certify is None
    alive_a, alive_b = _alive(wa), _alive(wb)
    n_alive_b = int(alive_b.sum())
    kk = min(k, n_alive_b)
    cost = torch.full((Fa, k), math.inf, dtype=torch.float64)
    index = torch.full((Fa, k), -1, dtype=torch.long)
    n_solved = n_certified = 0
    bar = _bar(progress, Fa, desc)
    try:
        for s in range(0, Fa, chunk):
            rows = slice(s, min(Fa, s + chunk))
            n = rows.stop - s
            live = alive_a[rows].cpu()
            if kk == 0 or not bool(live.any()):
                if bar is not None:
                    bar.update(n)
                continue
            A = cascade.side_a(rows)
            L, tol = cascade.dense(A)
            O = None if offset is None else offset.dense(rows).to(L)
            if lbound is not None:  # a bound of the label term: in the bounds only, ex solves the fused cost
                E = lbound.dense(rows).to(L)
                E = E if weight == 1.0 else weight * E  # the label term is part of the weighted W2^2
                O = E if O is None else O + E
            Lc = L if O is None else _shift(L, O, weight)  # bounds of the searched cost
            ids = live.nonzero().flatten().tolist()
            best = {i: [] for i in ids}
            if certify is None:
                thr, n0 = _seed(ex, Lc, ids, s, k, kk, best, offset, combine)
            else:  # tightens L (W2^2 units) with Sinkhorn duals: the shifted bounds follow
                thr, n0 = _certify(cascade, L, Lc, tol, ids, s, kk, certify, xa, wa, xb, wb, O, weight=weight)
                if O is not None:
                    Lc = _shift(L, O, weight)
            n_solved += n0
            ia, ib = ((Lc <= thr.unsqueeze(1)) & torch.isfinite(Lc)).nonzero(as_tuple=True)
            if lazy:  # the pair stages run inside the visit, on the pairs it reaches (_visit)
                Lr = Lc[ia, ib]
            elif O is None:
                Lr = cascade.refine(A, ia, ib, L[ia, ib], tol[ia, ib], thr[ia])
            else:  # the pair stages bound W2^2: thresholds back in its units (a little loose: safe)
                o = O[ia, ib]
                lim = _w2_limit(thr[ia], o, weight)
                Lr = _shift(cascade.refine(A, ia, ib, L[ia, ib], tol[ia, ib], lim), o, weight)
            keep = Lr <= thr[ia]
            ia, ib, Lr = ia[keep], ib[keep], Lr[keep]
            counts = torch.bincount(ia, minlength=n).cpu()
            if certify is not None:
                n_certified += int(((counts == kk) & live).sum())
            o = torch.argsort(Lr, stable=True)
            o = o[torch.argsort(ia[o], stable=True)]
            Lr_np, ib_np = Lr[o].cpu().numpy(), ib[o].cpu().numpy()
            starts = np.concatenate([[0], np.cumsum(counts.numpy())])
            thr_l = thr.cpu().tolist()
            offs = None
            if offset is not None:
                offs = offset.pairs(ia[o].cpu() + s, ib[o].cpu()).double().cpu().numpy()
            jobs = [(s + i, Lr_np[starts[i]:starts[i + 1]], ib_np[starts[i]:starts[i + 1]], thr_l[i], best[i],
                     None if offs is None else offs[starts[i]:starts[i + 1]],
                     _tighter(cascade, A, i, torch.from_numpy(ib_np[starts[i]:starts[i + 1]]), L, tol, O, weight)
                     if lazy else None)
                    for i in ids]
            if bar is not None:
                bar.update(n - len(ids))
            for i, (b, m) in zip(ids, _visit(ex, jobs, k, ex.n_jobs, bar, combine)):
                n_solved += m
                for q, (c, j) in enumerate(b):
                    cost[s + i, q], index[s + i, q] = c, j
    finally:
        if bar is not None:
            bar.close()
    return NearestResult(cost.to(xa.device), index.to(xa.device), int(n_solved), int(alive_a.sum()) * n_alive_b,
                         cascade.bound, n_certified=n_certified, n_rows=int(alive_a.sum()))


def _tighter(cascade: _Cascade, A, i: int, cols: Tensor, L: Tensor, tol: Tensor, O: Tensor | None, weight: float):
    """The lazy refinement of chunk row ``i`` (local) over its sorted candidates ``cols``: ``(lo, hi) ->``
    the pair stages' safe bounds of candidates ``lo:hi`` of the searched cost (shifted by ``O`` as the
    dense bounds are)."""
    cols = cols.to(L.device)
    refine = cascade.row_refiner(A, i)

    def tighter(lo: int, hi: int) -> Tensor:
        jb = cols[lo:hi]
        v = refine(jb, L[i, jb], tol[i, jb])
        return (v if O is None else _shift(v, O[i, jb], weight)).cpu()

    return tighter


def _seed(ex, L: Tensor, ids: list, s: int, k: int, kk: int, best: dict,
          offset: CostOffset | None = None, combine=None) -> tuple[Tensor, int]:
    """Solve the ``kk`` smallest-bound candidates of each live row exactly (into ``best``);
    the threshold is the k-th of those costs (inf with fewer than k). Seeded pairs get
    ``L = inf`` so that they are not visited again. With an ``offset`` ``L`` bounds the
    shifted cost and the solved costs are ``W2^2 + offset.pairs`` (``combine``: :func:`_visit`)."""
    v, first = torch.topk(L, kk, dim=1, largest=False, sorted=True)
    v_np, f_np = v.cpu().numpy(), first.cpu().numpy()
    offs = None
    if offset is not None:
        rows = torch.arange(L.shape[0]).unsqueeze(1).expand_as(first)
        offs = offset.pairs(rows.reshape(-1) + s, first.cpu().reshape(-1)).double().cpu().numpy().reshape(v_np.shape)
    jobs = [(s + i, v_np[i][np.isfinite(v_np[i])], f_np[i][np.isfinite(v_np[i])], math.inf, [],
             None if offs is None else offs[i][np.isfinite(v_np[i])]) for i in ids]
    thr = torch.full((L.shape[0],), -math.inf, dtype=torch.float64)
    n = 0
    for i, (b, m) in zip(ids, _visit(ex, jobs, k, ex.n_jobs, combine=combine)):
        best[i] = b
        thr[i] = _kth(b, k)
        n += m
    L.scatter_(1, first, math.inf)
    return thr.to(L.device), n


def _certify(cascade: _Cascade, L: Tensor, Lc: Tensor, tol: Tensor, ids: list, s: int, kk: int, opts: dict,
             xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, O: Tensor | None = None,
             batch: int = 8192, weight: float = 1.0) -> tuple[Tensor, int]:
    """Sinkhorn bounds on the ``candidates`` smallest-bound pairs of each live row (by ``Lc``, the
    bounds of the searched cost): the threshold is the kk-th smallest upper bound (+ tolerance; times
    ``weight`` plus the offsets ``O`` when given); their bounds become ``max(L, dual - tolerance)``
    (``L`` in ``W2^2`` units)."""
    m = min(L.shape[1], max(int(opts["candidates"]), kk))
    v, cand = torch.topk(Lc, m, dim=1, largest=False, sorted=True)
    live = torch.zeros(L.shape[0], dtype=torch.bool, device=L.device)
    live[torch.tensor(ids, device=L.device)] = True
    ok = torch.isfinite(v) & live.unsqueeze(1)
    ri, ci = ok.nonzero(as_tuple=True)
    jb = cand[ri, ci]
    up = torch.full(v.shape, math.inf, dtype=torch.float64, device=L.device)
    dtype = torch.float64 if xa.dtype == torch.float64 or xb.dtype == torch.float64 else torch.float32
    for q in range(0, ri.numel(), batch):
        r, c, j = ri[q:q + batch], ci[q:q + batch], jb[q:q + batch]
        U, D = _sinkhorn_bounds(xa[s + r], wa[s + r], xb[j], wb[j], opts["reg"], opts["n_iter"], dtype=dtype)
        t = tol[r, j]
        if O is None:
            up[r, c] = U + t
        elif weight == 1.0:
            up[r, c] = U + t + O[r, j] + _OFFSET_REL * (O[r, j].abs() + U.abs())
        else:
            up[r, c] = weight * (U + t) + O[r, j] + _OFFSET_REL * (O[r, j].abs() + max(weight, 1.0) * U.abs())
        L[r, j] = torch.maximum(L[r, j], (D - t).clamp_min(0.0))
    thr = up.sort(dim=1).values[:, kk - 1]
    return thr.masked_fill(~live, -math.inf), 0
