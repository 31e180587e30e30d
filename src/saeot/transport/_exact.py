r"""Exact :math:`W_2^2` with POT's network simplex (float64, on the CPU).

:func:`w2_exact_pair` solves one pair with ``ot.emd2``; :class:`_ExactPairs` solves
arbitrary pairs of two sets of distributions on a thread pool (the network simplex
releases the GIL), for :class:`~saeot.transport.ExactW2`.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import torch
from torch import Tensor

from saeot.transport._labels import LabelCost
from saeot.transport._parallel import _parallel_map, _RowsToPairs, _split

try:  # the C++ network simplex behind ot.emd2, without its per-call Python overhead
    from ot.lp.emd_wrap import check_result as _check_result
    from ot.lp.emd_wrap import emd_c as _emd_c
except Exception:  # pragma: no cover - other POT layouts
    _emd_c = None


def _emd_cost(a: np.ndarray, b: np.ndarray, M: np.ndarray, num_itermax: int) -> float:
    """``min_P <P, M>`` for float64 ``a [n] > 0``, ``b [m] > 0`` (equal sums), C-contiguous ``M [n, m]``.

    Same network simplex as ``ot.emd2`` (identical result), called directly.
    """
    b = b * (a.sum() / b.sum())  # as ot.emd2 does: equal masses to the last bit
    if _emd_c is not None:
        _, cost, _, _, code = _emd_c(a, b, M, num_itermax, 1)
        _check_result(code)
        return float(cost)
    return float(ot.emd2(a, b, M, numItermax=num_itermax))  # pragma: no cover


def _to_numpy64(t) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def w2_exact_pair(x, a, y, b, num_itermax: int = 100_000) -> float:
    r"""Exact :math:`W_2^2` between two weighted point clouds, with ``ot.emd2``.

    Zero-weight samples are dropped first, both weight vectors are renormalised to
    sum 1 and everything is float64.

    Args:
        x: ``[K, r]`` points of the first measure (tensor or array).
        a: ``[K]`` non-negative weights.
        y: ``[K', r]`` points of the second measure.
        b: ``[K']`` non-negative weights.
        num_itermax: network-simplex iteration cap (``ot.emd2``'s ``numItermax``).

    Returns:
        :math:`W_2^2` as a float; ``inf`` if either measure has no positive weight.
    """
    x, a, y, b = (_to_numpy64(t) for t in (x, a, y, b))
    if x.ndim != 2 or y.ndim != 2 or a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"w2_exact_pair needs x [K, r], a [K], y [K', r], b [K'], got "
                         f"{x.shape}, {a.shape}, {y.shape}, {b.shape}")
    if x.shape[0] != a.shape[0] or y.shape[0] != b.shape[0] or x.shape[1] != y.shape[1]:
        raise ValueError(f"w2_exact_pair: shapes disagree x {x.shape}, a {a.shape}, y {y.shape}, b {b.shape}")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("w2_exact_pair: weights must be non-negative")
    ka, kb = a > 0, b > 0
    if not ka.any() or not kb.any():
        return math.inf
    x, a, y, b = x[ka], a[ka] / a[ka].sum(), y[kb], b[kb] / b[kb].sum()
    M = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    np.maximum(M, 0.0, out=M)
    return float(ot.emd2(a, b, np.ascontiguousarray(M), numItermax=num_itermax))


class _ExactPairs:
    """Per-pair exact solves between two sets: float64, padding removed, on the CPU; with ``labels``
    (:class:`~saeot.transport.LabelCost`) under the fused ground cost ``||x - y||^2 + lambda [t != t']``.

    The float64 copies of the trimmed clouds are built once when they fit in
    ``cache_bytes``; otherwise each cloud is converted when a pair needs it. Pairs
    are solved on ``n_jobs`` threads; results go back to the device of ``xa``.
    """

    dtype = torch.float64
    theta = None  # no sliced directions: the sliced bound does not apply

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, num_itermax: int = 100_000,
                 n_jobs: int = 1, cache_bytes: int = 1 << 30, labels: LabelCost | None = None):
        self.num_itermax = int(num_itermax)
        self.n_jobs = int(n_jobs)
        self.device = xa.device
        self.xa, self.wa = xa.detach().cpu(), wa.detach().cpu()
        self.xb, self.wb = xb.detach().cpu(), wb.detach().cpu()
        self.labels = labels  # None: the squared Euclidean ground cost; else the fused one (_labels)
        self.la = self.lb = None
        if labels is not None:
            self.la, self.lb = labels.labels_a.cpu().long().numpy(), labels.labels_b.cpu().long().numpy()
        self.cache = 8 * (self.xa.numel() + self.xb.numel()) <= cache_bytes
        if self.cache:
            self.a = self._trim_all(self.xa, self.wa, self.la)
            self.b = self._trim_all(self.xb, self.wb, self.lb)

    @staticmethod
    def _trim_one(x: np.ndarray, w: np.ndarray, lab: np.ndarray | None = None):
        keep = w > 0
        if not keep.any():
            return None
        x = np.ascontiguousarray(x[keep])
        w = w[keep]
        return x, w / w.sum(), (x * x).sum(1), None if lab is None else lab[keep]

    @classmethod
    def _trim_all(cls, x: Tensor, w: Tensor, lab: np.ndarray | None) -> list:
        x64 = x.to(torch.float64).numpy()
        w64 = w.to(torch.float64).numpy()
        return [cls._trim_one(x64[i], w64[i], None if lab is None else lab[i]) for i in range(x64.shape[0])]

    @classmethod
    def _trim(cls, x: Tensor, w: Tensor, i: int, lab: np.ndarray | None):
        return cls._trim_one(x[i].to(torch.float64).numpy(), w[i].to(torch.float64).numpy(),
                             None if lab is None else lab[i])

    def side_a(self, i: int):
        return self.a[i] if self.cache else self._trim(self.xa, self.wa, i, self.la)

    def side_b(self, j: int):
        return self.b[j] if self.cache else self._trim(self.xb, self.wb, j, self.lb)

    def cost_trimmed(self, pa, pb) -> float:
        if pa is None or pb is None:
            return math.inf
        x, a, na, la = pa
        y, b, nb, lb = pb
        M = na[:, None] + nb[None, :] - 2.0 * (x @ y.T)
        np.maximum(M, 0.0, out=M)
        if self.labels is not None:
            M += self.labels.mismatch(la, lb)
        return _emd_cost(a, b, M, self.num_itermax)

    def cost(self, i: int, j: int) -> float:
        return self.cost_trimmed(self.side_a(i), self.side_b(j))

    def _costs_np(self, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        """``[n]`` costs of the pairs ``(ia[q], ib[q])``, one after the other."""
        return np.array([self.cost(int(i), int(j)) for i, j in zip(ia, ib)], dtype=np.float64)

    def costs(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` float64 costs of the pairs ``(ia[q], ib[q])`` (blocks of 64 pairs on the threads)."""
        ia_np, ib_np = ia.cpu().numpy(), ib.cpu().numpy()
        blocks = _split(len(ia_np), 64)
        res = _parallel_map(lambda blk: self._costs_np(ia_np[blk], ib_np[blk]), blocks, self.n_jobs)
        vals = np.concatenate(res) if res else np.zeros(0)
        return torch.from_numpy(vals).to(self.device)

    def matrix(self, bar=None) -> Tensor:
        """``[Fa, Fb]`` float64 costs of all pairs (blocks of whole rows on the threads)."""
        Fa, Fb = self.xa.shape[0], self.xb.shape[0]
        jb = np.arange(Fb)

        def row_block(rows):
            return np.stack([self._costs_np(np.full(Fb, i), jb) for i in rows]) if len(rows) else np.zeros((0, Fb))

        blocks = _split(Fa, max(1, 4096 // max(Fb, 1)))
        res = _parallel_map(row_block, blocks, self.n_jobs, _RowsToPairs(bar, Fb))
        return torch.from_numpy(np.concatenate(res) if res else np.zeros((0, Fb))).to(self.device)
