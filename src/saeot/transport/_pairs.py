r"""Pair evaluators of the batched solvers (Sinkhorn, sliced): arbitrary pairs ``(ia, ib)``
of two sets of distributions, solved in batches of ``batch_size`` pairs on the device
of the inputs.

A solver prepares one evaluator per call (:meth:`~saeot.transport.W2Solver.pairs`);
the evaluator holds what is computed once for all pairs (the common shift, sorted
projections) and offers ``costs(ia, ib)``, ``matrix(bar)`` and ``nearest_chunk``
(:mod:`saeot.transport._nearest`). The exact solver's evaluator is
:class:`saeot.transport._exact._ExactPairs`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from saeot.transport._cost import _alive, _compute_dtype
from saeot.transport._moments import _common_shift
from saeot.transport._nearest import _nearest_batched_chunk
from saeot.transport._sinkhorn import _sinkhorn_core
from saeot.transport._sliced import _project_sorted, _w2_1d_sorted, sliced_directions


class _BatchedPairs(ABC):
    """Solver for arbitrary pairs (ia, ib), in batches of ``batch_size`` (default: about 256 MB of work memory).

    Both sets are shifted by one common vector first (W2 is translation invariant):
    accurate float32 costs for offset data. Results use the compute dtype (float64
    if any input is float64, otherwise float32) and live on the device of ``xa``.
    """

    theta: Tensor | None = None

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, batch_size: int | None):
        self.dtype = _compute_dtype(xa, wa, xb, wb)
        self.device = xa.device
        # one common shift (W2 is translation invariant): accurate float32 costs for offset data
        shift = _common_shift(xa, wa, xb, wb)
        xa = xa.to(self.dtype) - shift.to(self.dtype)
        xb = xb.to(self.dtype) - shift.to(self.dtype)
        per_pair = self._setup(xa, wa, xb, wb)
        self.alive_a, self.alive_b = _alive(wa), _alive(wb)
        self.batch_size = int(batch_size) if batch_size else max(1, (256 << 20) // per_pair)

    @abstractmethod
    def _setup(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> int:
        """Keep what every pair needs from the shifted clouds; return the work bytes of one pair."""

    @abstractmethod
    def _batch(self, i: Tensor, j: Tensor) -> Tensor:
        """``[n]`` values of the alive pairs ``(i[q], j[q])``, one batch."""

    def costs(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` values of the pairs ``(ia[q], ib[q])``; ``inf`` for pairs with a dead feature."""
        ia = ia.to(self.device)
        ib = ib.to(self.device)
        out = torch.full((ia.numel(),), math.inf, dtype=self.dtype, device=self.device)
        ok = (self.alive_a[ia] & self.alive_b[ib]).nonzero().flatten()
        for s in range(0, ok.numel(), self.batch_size):
            sel = ok[s:s + self.batch_size]
            out[sel] = self._batch(ia[sel], ib[sel])
        return out

    def matrix(self, bar=None) -> Tensor:
        """``[Fa, Fb]`` values of all pairs, whole rows per batch."""
        Fa, Fb = self.alive_a.shape[0], self.alive_b.shape[0]
        out = torch.empty(Fa, Fb, dtype=self.dtype, device=self.device)
        rows_per = max(1, self.batch_size // max(Fb, 1))
        jb = torch.arange(Fb, device=self.device)
        for s in range(0, Fa, rows_per):
            rows = torch.arange(s, min(Fa, s + rows_per), device=self.device)
            ia = rows.repeat_interleave(Fb)
            ib = jb.repeat(len(rows))
            out[s:s + len(rows)] = self.costs(ia, ib).view(len(rows), Fb)
            if bar is not None:
                bar.update(len(rows) * Fb)
        return out

    def nearest_chunk(self, lb: Tensor, rows: Tensor, k: int, prune: bool, atol: float | None,
                      bar, offset=None) -> tuple[Tensor, Tensor, int]:
        """Top-k of ``rows`` in batched rounds (see :func:`_nearest_batched_chunk`)."""
        return _nearest_batched_chunk(self, lb, rows, k, prune, atol, bar, offset=offset)


class _SinkhornPairs(_BatchedPairs):
    """Batched pairs for :func:`~saeot.transport.w2_sinkhorn` with ``options`` (its keyword arguments)."""

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, options: dict, batch_size: int | None):
        self.kw = dict(options)
        super().__init__(xa, wa, xb, wb, batch_size)

    def _setup(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> int:
        K, Kb, r = xa.shape[1], xb.shape[1], xa.shape[2]
        self.xa, self.wa = xa.to(self.dtype), wa.to(self.dtype)
        self.xb, self.wb = xb.to(self.dtype), wb.to(self.dtype)
        return (K * Kb * 8 + (K + Kb) * r) * 8 * (3 if self.kw.get("debiased") else 1)

    def _batch(self, i: Tensor, j: Tensor) -> Tensor:
        return _sinkhorn_core(self.xa[i], self.wa[i], self.xb[j], self.wb[j], **self.kw)


class _SlicedPairs(_BatchedPairs):
    """Batched pairs for :func:`~saeot.transport.w2_sliced`: each feature's projections on the
    ``n_projections`` directions are sorted once, a pair is then a 1-D quantile match."""

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, n_projections: int, seed: int,
                 batch_size: int | None):
        self.n, self.seed = int(n_projections), int(seed)
        super().__init__(xa, wa, xb, wb, batch_size)

    def _setup(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> int:
        K, Kb, r = xa.shape[1], xb.shape[1], xa.shape[2]
        self.theta = sliced_directions(r, self.n, self.seed, device=self.device, dtype=self.dtype)
        self.va, self.ca = _project_sorted(xa.to(self.dtype), wa.to(self.dtype), self.theta)
        self.vb, self.cb = _project_sorted(xb.to(self.dtype), wb.to(self.dtype), self.theta)
        return self.n * (K + Kb) * 8 * 6

    def _batch(self, i: Tensor, j: Tensor) -> Tensor:
        v = _w2_1d_sorted(self.va[i], self.ca[i], self.vb[j], self.cb[j]).sum(-1)
        return v * (self.theta.shape[1] / self.n)
