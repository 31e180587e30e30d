r"""Batched squared 2-Wasserstein distances between weighted point clouds.

Every distance in this module is the **squared** 2-Wasserstein distance with the
squared Euclidean ground cost between two discrete probability measures

.. math::
    \mu = \sum_{k=1}^{K} a_k \delta_{x_k},\qquad \nu = \sum_{l=1}^{K'} b_l \delta_{y_l},
    \qquad W_2^2(\mu,\nu) = \min_{P \in \Pi(a,b)} \sum_{kl} P_{kl} \|x_k - y_l\|^2 ,

with :math:`\Pi(a,b) = \{P \ge 0: P 1 = a, P^\top 1 = b\}`.

Conventions (shared by all functions; F = features, K = samples per feature,
r = width of the space):

* A set of distributions is ``x [F, K, r]`` and ``w [F, K]``; ``w`` is non-negative.
  Zero weights are padding (their points are ignored). A row of ``w`` is
  renormalised to sum 1, so float32 rounding never matters. An all-zero row is a
  *dead* feature: every distance that involves it is ``inf`` and it is never
  chosen as a neighbour.
* Solvers: ``exact`` (POT's network simplex, float64, CPU), ``sinkhorn`` (batched
  log-domain Sinkhorn in torch, runs wherever the tensors are) and ``sliced``
  (batched sliced W2^2 in torch). Batched functions take ``B`` pairs at once.
* Functions never broadcast silently: leading shapes must agree exactly, and a
  bad shape raises ``ValueError`` naming the argument.
* Outputs live on the device of the first input. ``exact`` results are float64;
  ``sinkhorn`` / ``sliced`` results use the compute dtype (float64 if any input is
  float64, otherwise float32).

Lower bounds and exact nearest neighbours
-----------------------------------------
Translation splits W2^2 exactly: with weighted means :math:`m_a, m_b` and centred
measures :math:`\bar\mu, \bar\nu`,

.. math::
    W_2^2(\mu,\nu) = \|m_a - m_b\|^2 + W_2^2(\bar\mu,\bar\nu)

(the cross term :math:`2 (m_a - m_b)^\top \sum_{kl} P_{kl}(\bar x_k - \bar y_l)` is
zero for every coupling because both centred measures have mean 0). Hence
:func:`lower_bound_mean` and, with the triangle inequality for W2 through the Dirac
:math:`\delta_0` (:math:`W_2(\bar\mu,\delta_0) = s_a`, the weighted spread),
:func:`lower_bound_mean_spread`. Projecting on the r axes of any orthonormal frame
(1-Lipschitz maps whose squared lengths add up) gives the tighter
:func:`lower_bound_axis_spread`. All bounds are squared Euclidean distances between
small per-feature embeddings, so they are computed with matmuls, chunked over A.

:func:`w2_nearest` uses a bound to find the k nearest neighbours *exactly* without
solving every pair: candidates of each row are visited in increasing bound order,
and the search stops as soon as the next bound exceeds the current k-th best
cost. :func:`w2_nearest` documents for which solver each bound is valid.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SOLVERS",
    "BOUNDS",
    "NearestResult",
    "cost_matrices",
    "w2_exact_pair",
    "w2_sinkhorn",
    "w2_sliced",
    "sliced_directions",
    "feature_moments",
    "lower_bound_mean",
    "lower_bound_mean_spread",
    "lower_bound_axis_spread",
    "lower_bound_sliced",
    "pairwise_w2",
    "pair_w2",
    "w2_nearest",
]

SOLVERS = ("exact", "sinkhorn", "sliced")
BOUNDS = ("none", "mean", "mean_spread", "axis_spread", "sliced")

# Pruning keeps a candidate unless bound * (1 - rtol) - atol > k-th best cost, so rounding
# in the bound or the solver can never prune a pair that might belong to the top k.
_SLACK = {torch.float64: 1e-9, torch.float32: 1e-4}


# ----------------------------------------------------------------------------- validation
def _check_cloud(x: Tensor, w: Tensor, name_x: str, name_w: str, batch: int | None = None) -> None:
    if not isinstance(x, Tensor) or not isinstance(w, Tensor):
        raise TypeError(f"{name_x} and {name_w} must be torch tensors")
    if x.ndim != 3:
        raise ValueError(f"{name_x} must have shape [F, K, r], got {tuple(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"{name_w} must have shape [F, K], got {tuple(w.shape)}")
    if tuple(w.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{name_w} {tuple(w.shape)} must match the first two dims of {name_x} {tuple(x.shape)}"
        )
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name_x} has {x.shape[0]} rows but the other side has {batch} (no broadcasting)")
    if not (x.is_floating_point() and w.is_floating_point()):
        raise TypeError(f"{name_x} and {name_w} must be floating point, got {x.dtype} and {w.dtype}")
    if w.numel() and bool((w < 0).any()):
        raise ValueError(f"{name_w} must be non-negative")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name_w} contains NaN or inf")
    for s in range(0, x.shape[0], 1024):
        xs, ws = x[s:s + 1024], w[s:s + 1024]
        if not bool(torch.isfinite(xs).all()) and not bool(torch.isfinite(xs[ws > 0]).all()):
            raise ValueError(f"{name_x} contains NaN or inf at samples with positive weight")


def _check_two(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, names: Sequence[str], paired: bool) -> None:
    _check_cloud(xa, wa, names[0], names[1])
    _check_cloud(xb, wb, names[2], names[3], batch=xa.shape[0] if paired else None)
    if xa.shape[2] != xb.shape[2]:
        raise ValueError(
            f"{names[0]} and {names[2]} live in different spaces: r={xa.shape[2]} vs r={xb.shape[2]}"
        )
    if xa.device != xb.device:
        raise ValueError(f"{names[0]} is on {xa.device} but {names[2]} is on {xb.device}")


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"transport solver must be one of {SOLVERS}, got {solver!r}")


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _normalize(w: Tensor) -> Tensor:
    """``[..., K]`` weights divided by their row sum (all-zero rows stay zero)."""
    s = w.sum(-1, keepdim=True)
    return torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))


def _alive(w: Tensor) -> Tensor:
    return w.sum(-1) > 0


# ----------------------------------------------------------------------------- cost
def cost_matrices(xa: Tensor, xb: Tensor) -> Tensor:
    r"""Batched squared Euclidean cost matrices.

    .. math:: C_{\dots kl} = \|x^a_{\dots k} - x^b_{\dots l}\|^2
              = \|x^a_k\|^2 + \|x^b_l\|^2 - 2 \langle x^a_k, x^b_l \rangle

    (one batched matmul; clamped at 0 against rounding).

    Args:
        xa: ``[..., K, r]``.
        xb: ``[..., K', r]`` with the same leading dims ``...`` as ``xa`` (no broadcasting).

    Returns:
        ``[..., K, K']`` in the promoted dtype of the inputs.
    """
    if xa.ndim < 2 or xb.ndim < 2:
        raise ValueError(f"cost_matrices needs [..., K, r] inputs, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    if xa.shape[:-2] != xb.shape[:-2]:
        raise ValueError(
            f"cost_matrices: leading dims differ {tuple(xa.shape[:-2])} vs {tuple(xb.shape[:-2])} (no broadcasting)"
        )
    if xa.shape[-1] != xb.shape[-1]:
        raise ValueError(f"cost_matrices: point widths differ, r={xa.shape[-1]} vs r={xb.shape[-1]}")
    dtype = torch.promote_types(xa.dtype, xb.dtype)
    xa, xb = xa.to(dtype), xb.to(dtype)
    na = (xa * xa).sum(-1)
    nb = (xb * xb).sum(-1)
    c = na.unsqueeze(-1) + nb.unsqueeze(-2) - 2.0 * (xa @ xb.transpose(-1, -2))
    return c.clamp_min_(0.0)


# ----------------------------------------------------------------------------- exact
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
    import ot  # pragma: no cover

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
    import ot

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
    """Per-pair exact solves between two sets: float64, padding removed, on the CPU.

    The float64 copies of the trimmed clouds are built once when they fit in
    ``cache_bytes``; otherwise each cloud is converted when a pair needs it.
    """

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, num_itermax: int = 100_000,
                 cache_bytes: int = 1 << 30):
        self.num_itermax = int(num_itermax)
        self.xa, self.wa = xa.detach().cpu(), wa.detach().cpu()
        self.xb, self.wb = xb.detach().cpu(), wb.detach().cpu()
        self.cache = 8 * (self.xa.numel() + self.xb.numel()) <= cache_bytes
        if self.cache:
            self.a = self._trim_all(self.xa, self.wa)
            self.b = self._trim_all(self.xb, self.wb)

    @staticmethod
    def _trim_one(x: np.ndarray, w: np.ndarray):
        keep = w > 0
        if not keep.any():
            return None
        x = np.ascontiguousarray(x[keep])
        w = w[keep]
        return x, w / w.sum(), (x * x).sum(1)

    @classmethod
    def _trim_all(cls, x: Tensor, w: Tensor) -> list:
        x64 = x.to(torch.float64).numpy()
        w64 = w.to(torch.float64).numpy()
        return [cls._trim_one(x64[i], w64[i]) for i in range(x64.shape[0])]

    @classmethod
    def _trim(cls, x: Tensor, w: Tensor, i: int):
        return cls._trim_one(x[i].to(torch.float64).numpy(), w[i].to(torch.float64).numpy())

    def side_a(self, i: int):
        return self.a[i] if self.cache else self._trim(self.xa, self.wa, i)

    def side_b(self, j: int):
        return self.b[j] if self.cache else self._trim(self.xb, self.wb, j)

    def cost_trimmed(self, pa, pb) -> float:
        if pa is None or pb is None:
            return math.inf
        x, a, na = pa
        y, b, nb = pb
        M = na[:, None] + nb[None, :] - 2.0 * (x @ y.T)
        np.maximum(M, 0.0, out=M)
        return _emd_cost(a, b, M, self.num_itermax)

    def cost(self, i: int, j: int) -> float:
        return self.cost_trimmed(self.side_a(i), self.side_b(j))

    def costs(self, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        return np.array([self.cost(int(i), int(j)) for i, j in zip(ia, ib)], dtype=np.float64)


def _n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    if n_jobs < 1:
        raise ValueError(f"transport n_jobs must be >= 1, got {n_jobs}")
    return int(n_jobs)


def _parallel_map(fn: Callable, blocks: list, n_jobs: int, progress=None) -> list:
    """``[fn(block) for block in blocks]`` on a thread pool (the network simplex releases the GIL)."""
    out = []
    if n_jobs == 1 or len(blocks) <= 1:
        for blk in blocks:
            out.append(fn(blk))
            if progress is not None:
                progress.update(len(blk))
        return out
    with ThreadPoolExecutor(max_workers=n_jobs) as ex:
        for blk, res in zip(blocks, ex.map(fn, blocks)):
            out.append(res)
            if progress is not None:
                progress.update(len(blk))
    return out


def _split(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------- sinkhorn
def _sinkhorn_potentials(
    C: Tensor, log_a: Tensor, log_b: Tensor, eps: Tensor, n_iter: int, tol: float,
    check_every: int, anneal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-domain Sinkhorn on a batch; returns potentials ``f [B,K]``, ``g [B,L]`` and the final ``eps [B]``.

    Fixed point: ``P = exp((f_k + g_l - C_kl) / eps + log a_k + log b_l)`` with
    ``P^T 1 = b`` exactly after each g-update and ``P 1 = a`` up to ``tol`` (L1).
    With ``anneal`` the first iterations use eps_t = max(eps, C_max 2^-t), C_max
    over the support (warm start, same fixed point). Pairs that have converged are dropped from the
    working set, so a few slow pairs do not cost a full batch per iteration.
    """
    B, K, L = C.shape
    tol = max(float(tol), 50.0 * torch.finfo(C.dtype).eps)  # reachable in the compute dtype
    f = torch.zeros(B, K, dtype=C.dtype, device=C.device)
    g = torch.zeros(B, L, dtype=C.dtype, device=C.device)
    support = torch.isfinite(log_a).unsqueeze(2) & torch.isfinite(log_b).unsqueeze(1)
    cmax = C.masked_fill(~support, 0.0).amax(dim=(1, 2)).clamp_min(torch.finfo(C.dtype).tiny)
    # per-pair schedule, so that a pair's result never depends on the other pairs of its batch
    if anneal:
        t0 = torch.ceil(torch.log2((cmax / eps).clamp_min(1.0))).long()
    else:
        t0 = torch.zeros(B, dtype=torch.long, device=C.device)
    first_check = int(t0.min()) + check_every - 1
    idx = None  # working set (None = all pairs)
    Cw, law, lbw, epsw, cmw, tw = C, log_a.unsqueeze(2), log_b.unsqueeze(1), eps, cmax, t0
    fw, gw = f, g
    for it in range(n_iter):
        e = torch.maximum(epsw, cmw * 0.5 ** it) if anneal else epsw
        e3 = e.view(-1, 1, 1)
        fw = -e.view(-1, 1) * torch.logsumexp((gw.unsqueeze(1) - Cw) / e3 + lbw, dim=2)
        gw = -e.view(-1, 1) * torch.logsumexp((fw.unsqueeze(2) - Cw) / e3 + law, dim=1)
        last = it == n_iter - 1
        if last:
            sel = slice(None) if idx is None else idx
            f[sel], g[sel] = fw, gw
            break
        if it < first_check:
            continue
        due = (tw <= it) & ((it - tw) % check_every == check_every - 1)
        if not bool(due.any()):
            continue
        logp = (fw.unsqueeze(2) + gw.unsqueeze(1) - Cw) / e3 + law + lbw
        err = (torch.logsumexp(logp, dim=2).exp() - law.squeeze(2).exp()).abs().sum(1)
        done = due & (err < tol)
        n_done = int(done.sum())
        if n_done == 0:
            continue
        sel = slice(None) if idx is None else idx
        f[sel], g[sel] = fw, gw
        if n_done == fw.shape[0]:
            break
        keep = (~done).nonzero().flatten()
        idx = keep if idx is None else idx[keep]
        Cw, law, lbw, epsw, cmw, tw = Cw[keep], law[keep], lbw[keep], epsw[keep], cmw[keep], tw[keep]
        fw, gw = fw[keep], gw[keep]
    return f, g, eps


def _centre_pairs(x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Shift both clouds of each pair by the midpoint of their means (W2 is translation invariant;
    this keeps float32 cost matrices accurate when the points share a large offset)."""
    c = 0.5 * (torch.einsum("bk,bkr->br", a, x) + torch.einsum("bk,bkr->br", b, y)).unsqueeze(1)
    return x - c, y - c


def _round_to_coupling(P: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Altschuler et al. (2017) rounding of ``P [B, K, L]`` to a plan with marginals exactly ``a``, ``b``.

    Scale rows down to at most ``a``, columns down to at most ``b``, then add the
    rank-one correction ``er ec^T / |er|_1`` for the missing mass (``P`` unchanged if
    it is already feasible).
    """
    r = P.sum(2)
    x = torch.where(r > 0, a / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r)).clamp_max(1.0)
    P = P * x.unsqueeze(2)
    c = P.sum(1)
    y = torch.where(c > 0, b / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(c)).clamp_max(1.0)
    P = P * y.unsqueeze(1)
    er = (a - P.sum(2)).clamp_min(0.0)
    ec = (b - P.sum(1)).clamp_min(0.0)
    s = er.sum(1).clamp_min(torch.finfo(P.dtype).tiny).view(-1, 1, 1)
    return P + er.unsqueeze(2) * ec.unsqueeze(1) / s


def w2_sinkhorn(
    x: Tensor, a: Tensor, y: Tensor, b: Tensor,
    reg: float = 0.01, n_iter: int = 1000, tol: float = 1e-6, debiased: bool = False,
    reg_mode: str = "relative", anneal: bool = True, check_every: int = 10,
) -> Tensor:
    r"""Batched entropic approximation of :math:`W_2^2` (log-domain Sinkhorn, pure torch).

    Runs on the device of the inputs (GPU when they are CUDA tensors); each pair's
    result does not depend on the other pairs in the batch.

    For each pair solves
    :math:`\min_{P\in\Pi(a,b)} \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P \| a\otimes b)`
    with :math:`C_{kl} = \|x_k - y_l\|^2`, by alternating the soft-min updates
    :math:`f_k = -\varepsilon \log\sum_l b_l e^{(g_l - C_{kl})/\varepsilon}` and
    :math:`g_l = -\varepsilon \log\sum_k a_k e^{(f_k - C_{kl})/\varepsilon}`. Zero
    weights enter as :math:`\log 0 = -\infty`, so padding carries no mass.

    * ``reg_mode="relative"`` (default): :math:`\varepsilon = \mathrm{reg}\cdot
      \sum_{kl} a_k b_l C_{kl}`, the mean cost under the independent coupling
      (= :math:`\|m_a-m_b\|^2 + s_a^2 + s_b^2`), so ``reg`` is scale free.
      ``reg_mode="absolute"``: :math:`\varepsilon = \mathrm{reg}` in cost units.
    * ``debiased=False``: returns the transport cost :math:`\langle P, C\rangle` of the
      Sinkhorn plan after rounding it onto :math:`\Pi(a,b)` (Altschuler et al. 2017),
      i.e. the cost of a feasible coupling, so the result is always
      :math:`\ge W_2^2` and decreases to it as ``reg -> 0``.
    * ``debiased=True``: the Sinkhorn divergence (Feydy et al. 2019)
      :math:`S_\varepsilon = OT_\varepsilon(a,b) - \tfrac12 OT_\varepsilon(a,a) -
      \tfrac12 OT_\varepsilon(b,b)` with :math:`OT_\varepsilon` the entropic objective
      (dual value :math:`\langle f,a\rangle + \langle g,b\rangle`) and one
      :math:`\varepsilon` per pair (the one of (a, b)). It is 0 for identical
      measures, tends to :math:`W_2^2` as ``reg -> 0`` and is
      :math:`\ge \|m_a - m_b\|^2` (up to solver tolerance), but not :math:`\ge W_2^2`.

    Args:
        x: ``[B, K, r]``, a: ``[B, K]``, y: ``[B, K', r]``, b: ``[B, K']`` -- B pairs.
        reg: entropic regularisation (see ``reg_mode``), > 0.
        n_iter: maximum Sinkhorn iterations (annealing steps included).
        tol: a pair has converged when the L1 error of its row marginal is below ``tol``
            (raised to 50 machine epsilons of the compute dtype). Pairs still
            unconverged after ``n_iter`` are rounded onto :math:`\Pi(a,b)` all the same,
            so the transport cost stays :math:`\ge W_2^2`; small ``reg`` needs many
            iterations (Sinkhorn's rate degrades like exp(-C_max / eps)).
        anneal: start at a large epsilon and halve it each iteration down to the target
            (same fixed point, much faster for small ``reg``).
        check_every: iterations between convergence checks (each one syncs a GPU).

    Returns:
        ``[B]`` on the device of ``x``; ``inf`` where a measure has no positive weight.
    """
    _check_two(x, a, y, b, ("x", "a", "y", "b"), paired=True)
    return _sinkhorn_core(x, a, y, b, reg, n_iter, tol, debiased, reg_mode, anneal, check_every)


def _sinkhorn_core(x: Tensor, a: Tensor, y: Tensor, b: Tensor, reg: float = 0.01, n_iter: int = 1000,
                   tol: float = 1e-6, debiased: bool = False, reg_mode: str = "relative", anneal: bool = True,
                   check_every: int = 10) -> Tensor:
    """:func:`w2_sinkhorn` without the input validation (internal batches)."""
    if reg <= 0:
        raise ValueError(f"transport sinkhorn reg must be > 0, got {reg}")
    if reg_mode not in ("relative", "absolute"):
        raise ValueError(f"transport sinkhorn reg_mode must be 'relative' or 'absolute', got {reg_mode!r}")
    dtype = _compute_dtype(x, a, y, b)
    x, y = x.to(dtype), y.to(dtype)
    a, b = _normalize(a.to(dtype)), _normalize(b.to(dtype))
    B = x.shape[0]
    out = torch.full((B,), math.inf, dtype=dtype, device=x.device)
    ok = _alive(a) & _alive(b)
    if not bool(ok.any()):
        return out
    if not bool(ok.all()):
        x, a, y, b = x[ok], a[ok], y[ok], b[ok]
    x, y = _centre_pairs(x, a, y, b)
    C = cost_matrices(x, y)
    scale = torch.einsum("bk,bkl,bl->b", a, C, b)
    if reg_mode == "relative":
        eps = (reg * scale).clamp_min(torch.finfo(dtype).tiny ** 0.5)
    else:
        eps = torch.full_like(scale, float(reg))
    log = lambda w: torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))  # noqa: E731
    if not debiased:
        f, g, e = _sinkhorn_potentials(C, log(a), log(b), eps, n_iter, tol, check_every, anneal)
        logp = (f.unsqueeze(2) + g.unsqueeze(1) - C) / e.view(-1, 1, 1) + log(a).unsqueeze(2) + log(b).unsqueeze(1)
        P = _round_to_coupling(logp.exp(), a, b)
        val = (P * C).sum((1, 2))
    else:
        Km = max(x.shape[1], y.shape[1])
        pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) if t.ndim == 3 else \
            torch.nn.functional.pad(t, (0, n - t.shape[1]))  # noqa: E731
        xp, ap, yp, bp = pad(x, Km), pad(a, Km), pad(y, Km), pad(b, Km)
        X = torch.cat([xp, xp, yp])
        Y = torch.cat([yp, xp, yp])
        A = torch.cat([ap, ap, bp])
        Bw = torch.cat([bp, ap, bp])
        CC = cost_matrices(X, Y)
        ee = eps.repeat(3)
        f, g, _ = _sinkhorn_potentials(CC, log(A), log(Bw), ee, n_iter, tol, check_every, anneal)
        dual = (A * f).sum(1) + (Bw * g).sum(1)
        n = x.shape[0]
        val = (dual[:n] - 0.5 * dual[n:2 * n] - 0.5 * dual[2 * n:]).clamp_min(0.0)
    out[ok] = val
    return out


# ----------------------------------------------------------------------------- sliced
def sliced_directions(r: int, n_projections: int, seed: int = 0, device=None, dtype=torch.float32) -> Tensor:
    r"""``[n, r]`` unit directions made of whole random orthonormal frames.

    Rows come in blocks of ``min(r, remaining)`` mutually orthonormal directions,
    each block Haar distributed (QR of a Gaussian matrix with sign fix), drawn
    from a CPU generator seeded with ``seed`` so that every device gets the same
    directions.
    """
    if r < 1 or n_projections < 1:
        raise ValueError(f"sliced_directions needs r >= 1 and n_projections >= 1, got {r}, {n_projections}")
    g = torch.Generator().manual_seed(int(seed))
    rows, left = [], n_projections
    while left > 0:
        m = min(r, left)
        A = torch.randn(r, m, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(A)
        Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(m, dtype=torch.float64))
        rows.append(Q.T)
        left -= m
    return torch.cat(rows).to(device=device, dtype=dtype)


def _project_sorted(x: Tensor, w: Tensor, theta: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Projections of each cloud on each direction, sorted: values ``[F, n, K]`` and CDF ``[F, n, K]``.

    ``theta [n, r]``; computed in chunks of ``chunk`` clouds (the sort indices are int64).
    """
    F, K = w.shape
    n = theta.shape[0]
    vals = torch.empty(F, n, K, dtype=theta.dtype, device=x.device)
    cdf = torch.empty(F, n, K, dtype=theta.dtype, device=x.device)
    for s in range(0, F, chunk):
        p = (x[s:s + chunk].to(theta.dtype) @ theta.T).transpose(1, 2)  # [f, n, K]
        v, order = p.sort(dim=2)
        c = _normalize(w[s:s + chunk].to(theta.dtype)).unsqueeze(1).expand_as(p).gather(2, order).cumsum(2)
        last = c[..., -1:]
        vals[s:s + chunk] = v
        cdf[s:s + chunk] = torch.where(last > 0, c / torch.where(last > 0, last, torch.ones_like(last)), c)
    return vals, cdf


def _w2_1d_sorted(va: Tensor, ca: Tensor, vb: Tensor, cb: Tensor) -> Tensor:
    r"""Exact weighted 1-D :math:`W_2^2` by quantile matching, ``[..., n]``.

    :math:`W_2^2 = \int_0^1 (Q_a(u) - Q_b(u))^2 du`; the quantile functions are
    piecewise constant between the merged CDF breakpoints, so the integral is an
    exact finite sum. ``va [..., K]`` sorted values, ``ca [..., K]`` their CDF (last
    entry 1); same for b.
    """
    va, ca, vb, cb = va.contiguous(), ca.contiguous(), vb.contiguous(), cb.contiguous()
    t = torch.cat([ca, cb], dim=-1).sort(dim=-1).values
    dt = torch.diff(t, dim=-1, prepend=torch.zeros_like(t[..., :1]))
    ia = torch.searchsorted(ca, t).clamp_max_(ca.shape[-1] - 1)
    ib = torch.searchsorted(cb, t).clamp_max_(cb.shape[-1] - 1)
    d = va.gather(-1, ia) - vb.gather(-1, ib)
    return (dt * d * d).sum(-1)


def w2_sliced(x: Tensor, a: Tensor, y: Tensor, b: Tensor, n_projections: int = 64, seed: int = 0) -> Tensor:
    r"""Batched sliced :math:`W_2^2`, in the units of :math:`W_2^2`.

    .. math:: SW(\mu,\nu) = \frac{r}{n} \sum_{l=1}^{n} W_2^2(\theta_l\#\mu, \theta_l\#\nu)

    with the directions of :func:`sliced_directions` (whole orthonormal frames) and
    each 1-D term exact for weighted measures (quantile matching). The factor
    :math:`r` makes it an unbiased estimate of :math:`r\,\mathbb{E}_\theta
    W_2^2(\theta\#\mu,\theta\#\nu)` (POT's ``sliced_wasserstein_distance(p=2)**2``
    is the same average without the factor r).

    Properties: for any coupling P and orthonormal frame,
    :math:`\sum_{\theta} W_2^2(\theta\#\mu,\theta\#\nu) \le \sum_\theta
    \sum P_{kl} (\theta^\top(x_k - y_l))^2 = \langle P, C\rangle`, so **when
    n_projections is a multiple of r**, :math:`SW \le W_2^2` exactly; otherwise only
    in expectation. For r = 1 it is the exact 1-D :math:`W_2^2`.

    Args:
        x: ``[B, K, r]``, a: ``[B, K]``, y: ``[B, K', r]``, b: ``[B, K']``.
        n_projections: number of directions n.
        seed: seed of the directions (same seed, same directions on any device).

    Returns:
        ``[B]``; ``inf`` where a measure has no positive weight.
    """
    _check_two(x, a, y, b, ("x", "a", "y", "b"), paired=True)
    dtype = _compute_dtype(x, a, y, b)
    theta = sliced_directions(x.shape[2], n_projections, seed, device=x.device, dtype=dtype)
    x, y = _centre_pairs(x.to(dtype), _normalize(a.to(dtype)), y.to(dtype), _normalize(b.to(dtype)))
    va, ca = _project_sorted(x, a.to(dtype), theta)
    vb, cb = _project_sorted(y, b.to(dtype), theta)
    out = _w2_1d_sorted(va, ca, vb, cb).sum(-1) * (x.shape[2] / n_projections)
    dead = ~(_alive(a) & _alive(b))
    return out.masked_fill(dead, math.inf)


# ----------------------------------------------------------------------------- bounds
def feature_moments(x: Tensor, w: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    r"""Weighted mean, spread and per-axis spread of every feature.

    .. math:: m = \sum_k w_k x_k,\quad s = \Big(\sum_k w_k \|x_k - m\|^2\Big)^{1/2},\quad
              \sigma_j = \Big(\sum_k w_k (x_{kj} - m_j)^2\Big)^{1/2}

    with ``w`` renormalised. Computed by centring (no cancellation), in float64, in
    chunks of ``chunk`` features so memory stays ``O(chunk * K * r)``.

    Args:
        x: ``[F, K, r]``, w: ``[F, K]``.

    Returns:
        ``mean [F, r]``, ``spread [F]``, ``axis_spread [F, r]`` (float64, zeros for dead features).
    """
    F, _, r = x.shape
    m = torch.empty(F, r, dtype=torch.float64, device=x.device)
    var = torch.empty(F, r, dtype=torch.float64, device=x.device)
    for s in range(0, F, chunk):
        xs = x[s:s + chunk].to(torch.float64)
        ws = _normalize(w[s:s + chunk].to(torch.float64))
        ms = torch.einsum("fk,fkr->fr", ws, xs)
        xc = xs - ms.unsqueeze(1)
        m[s:s + chunk] = ms
        var[s:s + chunk] = torch.einsum("fk,fkr->fr", ws, xc * xc)
    return m, var.sum(1).sqrt(), var.sqrt()


def _projected_moments(x: Tensor, w: Tensor, theta: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """``[F, n]`` weighted mean and std of the projections of each cloud on the rows of ``theta [n, r]``."""
    theta = theta.to(device=x.device, dtype=torch.float64)
    F, n = x.shape[0], theta.shape[0]
    m = torch.empty(F, n, dtype=torch.float64, device=x.device)
    sd = torch.empty(F, n, dtype=torch.float64, device=x.device)
    for s in range(0, F, chunk):
        p = x[s:s + chunk].to(torch.float64) @ theta.T  # [f, K, n]
        ws = _normalize(w[s:s + chunk].to(torch.float64))
        ms = torch.einsum("fk,fkn->fn", ws, p)
        pc = p - ms.unsqueeze(1)
        m[s:s + chunk] = ms
        sd[s:s + chunk] = torch.einsum("fk,fkn->fn", ws, pc * pc).sqrt()
    return m, sd


def _sqdist(ua: Tensor, ub: Tensor) -> Tensor:
    """``[Fa, Fb]`` squared Euclidean distances between rows (float64 matmul form)."""
    d = (ua * ua).sum(1, keepdim=True) + (ub * ub).sum(1).unsqueeze(0) - 2.0 * (ua @ ub.T)
    return d.clamp_min_(0.0)


def _bound_embeddings(
    bound: str, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, theta: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """Embeddings ``ua [Fa, D]``, ``ub [Fb, D]`` and a factor c with bound = c * ||ua - ub||^2."""
    if bound == "sliced":
        if theta is None:
            raise ValueError("the sliced bound needs the sliced directions")
        ma, sa = _projected_moments(xa, wa, theta)
        mb, sb = _projected_moments(xb, wb, theta)
        return torch.cat([ma, sa], 1), torch.cat([mb, sb], 1), xa.shape[2] / theta.shape[0]
    if bound not in ("mean", "mean_spread", "axis_spread"):
        raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
    ma, spa, axa = feature_moments(xa, wa)
    mb, spb, axb = feature_moments(xb, wb)
    if bound == "mean":
        return ma, mb, 1.0
    if bound == "mean_spread":
        return torch.cat([ma, spa[:, None]], 1), torch.cat([mb, spb[:, None]], 1), 1.0
    return torch.cat([ma, axa], 1), torch.cat([mb, axb], 1), 1.0


def _bound_rows(ua: Tensor, ub: Tensor, c: float, alive_b: Tensor, rows: slice) -> Tensor:
    lb = _sqdist(ua[rows], ub) * c
    return lb.masked_fill_(~alive_b.unsqueeze(0), math.inf)


def _bound_matrix(
    bound: str, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, chunk: int, theta: Tensor | None = None
) -> Tensor:
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    ua, ub, c = _centre(*_bound_embeddings(bound, xa, wa, xb, wb, theta))
    alive_a, alive_b = _alive(wa), _alive(wb)
    out = torch.empty(xa.shape[0], xb.shape[0], dtype=torch.float64, device=xa.device)
    for s in range(0, xa.shape[0], chunk):
        out[s:s + chunk] = _bound_rows(ua, ub, c, alive_b, slice(s, s + chunk))
    return out.masked_fill_(~alive_a.unsqueeze(1), math.inf)


def _centre(ua: Tensor, ub: Tensor, c: float) -> tuple[Tensor, Tensor, float]:
    """Shift both embeddings by a common vector (distances unchanged, less cancellation)."""
    shift = torch.cat([ua, ub]).mean(0, keepdim=True)
    return ua - shift, ub - shift, c


def lower_bound_mean(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, chunk: int = 1024) -> Tensor:
    r"""``[Fa, Fb]`` lower bound :math:`\|m_a - m_b\|^2 \le W_2^2(\mu_a, \mu_b)`.

    Proof: for any coupling P of the two measures, by Jensen
    :math:`\sum P_{kl}\|x_k-y_l\|^2 \ge \|\sum P_{kl}(x_k - y_l)\|^2 = \|m_a-m_b\|^2`.
    Float64, computed by matmuls in chunks of ``chunk`` rows of A; ``inf`` for dead
    features.
    """
    return _bound_matrix("mean", xa, wa, xb, wb, chunk)


def lower_bound_mean_spread(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, chunk: int = 1024) -> Tensor:
    r"""``[Fa, Fb]`` lower bound :math:`\|m_a - m_b\|^2 + (s_a - s_b)^2 \le W_2^2`.

    :math:`s = (\sum_k w_k \|x_k - m\|^2)^{1/2}` is the weighted spread (RMS radius).

    Proof. (1) Let :math:`\bar\mu_a, \bar\mu_b` be the measures centred at their
    means. For any coupling P,
    :math:`\sum P_{kl}\|x_k - y_l\|^2 = \|m_a - m_b\|^2 + \sum P_{kl}\|\bar x_k - \bar y_l\|^2
    + 2 (m_a-m_b)^\top \sum P_{kl}(\bar x_k - \bar y_l)`, and the last sum is
    :math:`\sum_k a_k \bar x_k - \sum_l b_l \bar y_l = 0`. Couplings of the centred
    measures are the same matrices, so
    :math:`W_2^2(\mu_a,\mu_b) = \|m_a-m_b\|^2 + W_2^2(\bar\mu_a,\bar\mu_b)`.
    (2) W2 is a metric, so by the triangle inequality through the Dirac
    :math:`\delta_0`: :math:`W_2(\bar\mu_a,\bar\mu_b) \ge |W_2(\bar\mu_a,\delta_0) -
    W_2(\bar\mu_b,\delta_0)| = |s_a - s_b|` (the only coupling with a Dirac costs
    :math:`\sum_k a_k\|\bar x_k\|^2 = s_a^2`). Squaring and adding gives the bound,
    which is :math:`\ge` :func:`lower_bound_mean`.

    It is the squared distance between the embeddings ``[m, s]``, so it is one
    float64 matmul per chunk of ``chunk`` rows of A. ``inf`` for dead features.
    """
    return _bound_matrix("mean_spread", xa, wa, xb, wb, chunk)


def lower_bound_axis_spread(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, chunk: int = 1024) -> Tensor:
    r"""``[Fa, Fb]`` lower bound :math:`\|m_a - m_b\|^2 + \|\sigma_a - \sigma_b\|^2 \le W_2^2`.

    :math:`\sigma \in \mathbb{R}^r` holds the weighted standard deviation along each
    coordinate axis :math:`e_j`.

    Proof. For any coupling P, :math:`\langle P, C\rangle = \sum_j \sum P_{kl}
    (e_j^\top(x_k - y_l))^2 \ge \sum_j W_2^2(e_j\#\mu_a, e_j\#\mu_b)` (the projected
    P couples the projected measures). Each 1-D term is, by the two steps of
    :func:`lower_bound_mean_spread` in dimension one,
    :math:`\ge (m_{a,j}-m_{b,j})^2 + (\sigma_{a,j}-\sigma_{b,j})^2`. Summing over j gives
    the bound. It is :math:`\ge` :func:`lower_bound_mean_spread` since
    :math:`\|\sigma_a - \sigma_b\| \ge |\,\|\sigma_a\| - \|\sigma_b\|\,| = |s_a - s_b|`.
    Cost: embeddings of width 2r instead of r + 1.
    """
    return _bound_matrix("axis_spread", xa, wa, xb, wb, chunk)


def lower_bound_sliced(
    xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, n_projections: int = 64, seed: int = 0, chunk: int = 1024
) -> Tensor:
    r"""``[Fa, Fb]`` lower bound of :func:`w2_sliced` (same ``n_projections``, ``seed``).

    .. math:: \frac{r}{n}\Big(\|\Theta m_a - \Theta m_b\|^2 + \|\sigma^\Theta_a - \sigma^\Theta_b\|^2\Big)
              \le SW(\mu_a, \mu_b)

    with :math:`\sigma^\Theta_l` the weighted std of the projections on direction
    :math:`\theta_l`: each 1-D term of SW is bounded like
    :func:`lower_bound_mean_spread` in dimension one. Valid for any n (it bounds the
    sliced value, which is itself not a lower/upper bound of W2^2 unless n is a
    multiple of r).
    """
    theta = sliced_directions(xa.shape[2], n_projections, seed, device=xa.device, dtype=torch.float64)
    return _bound_matrix("sliced", xa, wa, xb, wb, chunk, theta)


# ----------------------------------------------------------------------------- pair solvers
_SINKHORN_OPTIONS = frozenset({"reg", "n_iter", "tol", "debiased", "reg_mode", "anneal", "check_every"})


class _BatchedPairs:
    """Solver for arbitrary pairs (ia, ib) with sinkhorn / sliced, in batches of ``batch_size``."""

    def __init__(self, solver: str, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor,
                 batch_size: int | None, solver_kw: dict):
        self.solver = solver
        self.kw = dict(solver_kw)
        self.dtype = _compute_dtype(xa, wa, xb, wb)
        self.device = xa.device
        K, Kb, r = xa.shape[1], xb.shape[1], xa.shape[2]
        # one common shift (W2 is translation invariant): accurate float32 costs for offset data
        ma, mb = feature_moments(xa, wa)[0], feature_moments(xb, wb)[0]
        alive = torch.cat([_alive(wa), _alive(wb)])
        shift = torch.cat([ma, mb])[alive].mean(0) if bool(alive.any()) else ma.new_zeros(r)
        xa = xa.to(self.dtype) - shift.to(self.dtype)
        xb = xb.to(self.dtype) - shift.to(self.dtype)
        if solver == "sliced":
            n = int(self.kw.pop("n_projections", 64))
            seed = int(self.kw.pop("seed", 0))
            if self.kw:
                raise ValueError(f"unknown sliced options {sorted(self.kw)} (allowed: n_projections, seed)")
            self.n, self.seed = n, seed
            self.theta = sliced_directions(r, n, seed, device=self.device, dtype=self.dtype)
            self.va, self.ca = _project_sorted(xa.to(self.dtype), wa.to(self.dtype), self.theta)
            self.vb, self.cb = _project_sorted(xb.to(self.dtype), wb.to(self.dtype), self.theta)
            per_pair = n * (K + Kb) * 8 * 6
        else:
            unknown = set(self.kw) - _SINKHORN_OPTIONS
            if unknown:
                raise ValueError(f"unknown sinkhorn options {sorted(unknown)} (allowed: {sorted(_SINKHORN_OPTIONS)})")
            self.xa, self.wa = xa.to(self.dtype), wa.to(self.dtype)
            self.xb, self.wb = xb.to(self.dtype), wb.to(self.dtype)
            per_pair = (K * Kb * 8 + (K + Kb) * r) * 8 * (3 if self.kw.get("debiased") else 1)
        self.alive_a, self.alive_b = _alive(wa), _alive(wb)
        self.batch_size = int(batch_size) if batch_size else max(1, (256 << 20) // per_pair)

    def costs(self, ia: Tensor, ib: Tensor) -> Tensor:
        ia = ia.to(self.device)
        ib = ib.to(self.device)
        out = torch.full((ia.numel(),), math.inf, dtype=self.dtype, device=self.device)
        ok = (self.alive_a[ia] & self.alive_b[ib]).nonzero().flatten()
        for s in range(0, ok.numel(), self.batch_size):
            sel = ok[s:s + self.batch_size]
            i, j = ia[sel], ib[sel]
            if self.solver == "sliced":
                v = _w2_1d_sorted(self.va[i], self.ca[i], self.vb[j], self.cb[j]).sum(-1)
                out[sel] = v * (self.theta.shape[1] / self.n)
            else:
                out[sel] = _sinkhorn_core(self.xa[i], self.wa[i], self.xb[j], self.wb[j], **self.kw)
        return out


def _exact_kw(solver_kw: dict) -> tuple[int, int]:
    kw = dict(solver_kw)
    num_itermax = int(kw.pop("num_itermax", 100_000))
    n_jobs = _n_jobs(kw.pop("n_jobs", None))
    if kw:
        raise ValueError(f"unknown exact solver options {sorted(kw)} (allowed: num_itermax, n_jobs)")
    return num_itermax, n_jobs


def pair_w2(
    xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, ia: Tensor, ib: Tensor,
    solver: str = "exact", batch_size: int | None = None, **solver_kw,
) -> Tensor:
    r"""``[n]`` :math:`W_2^2(\mu^a_{ia[j]}, \mu^b_{ib[j]})` for given pairs (e.g. a null distribution).

    Args:
        xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
        ia, ib: ``[n]`` long indices into A and B.
        solver: ``exact`` | ``sinkhorn`` | ``sliced``; ``solver_kw`` go to the solver
            (exact: ``num_itermax``, ``n_jobs`` threads, default ``torch.get_num_threads()``;
            sinkhorn: the options of :func:`w2_sinkhorn`; sliced: ``n_projections``, ``seed``).
            Unknown options raise ``ValueError``.
        batch_size: pairs per batched solver call (default: about 256 MB of work memory).

    Returns:
        ``[n]`` on the device of ``xa``; ``inf`` for pairs with a dead feature.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    _check_solver(solver)
    ia, ib = torch.as_tensor(ia).long().flatten(), torch.as_tensor(ib).long().flatten()
    if ia.shape != ib.shape:
        raise ValueError(f"pair_w2: ia {tuple(ia.shape)} and ib {tuple(ib.shape)} must have the same length")
    if ia.numel() and (int(ia.min()) < 0 or int(ia.max()) >= xa.shape[0]):
        raise ValueError(f"pair_w2: ia out of range [0, {xa.shape[0]})")
    if ib.numel() and (int(ib.min()) < 0 or int(ib.max()) >= xb.shape[0]):
        raise ValueError(f"pair_w2: ib out of range [0, {xb.shape[0]})")
    if solver == "exact":
        num_itermax, n_jobs = _exact_kw(solver_kw)
        ex = _ExactPairs(xa, wa, xb, wb, num_itermax)
        ia_np, ib_np = ia.cpu().numpy(), ib.cpu().numpy()
        blocks = _split(len(ia_np), 64)
        res = _parallel_map(lambda blk: ex.costs(ia_np[blk], ib_np[blk]), blocks, n_jobs)
        vals = np.concatenate(res) if res else np.zeros(0)
        return torch.from_numpy(vals).to(xa.device)
    return _BatchedPairs(solver, xa, wa, xb, wb, batch_size, solver_kw).costs(ia, ib)


def pairwise_w2(
    xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, solver: str = "exact",
    batch_size: int | None = None, progress: bool = False, **solver_kw,
) -> Tensor:
    r"""``[Fa, Fb]`` :math:`W_2^2` between every feature of A and every feature of B (no pruning).

    Args:
        xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
        solver, batch_size, solver_kw: as in :func:`pair_w2`.
        progress: show a tqdm bar.

    Returns:
        ``[Fa, Fb]``; ``inf`` in rows / columns of dead features.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    _check_solver(solver)
    Fa, Fb = xa.shape[0], xb.shape[0]
    bar = _bar(progress, Fa * Fb, f"W2 {solver} all pairs")
    try:
        if solver == "exact":
            num_itermax, n_jobs = _exact_kw(solver_kw)
            ex = _ExactPairs(xa, wa, xb, wb, num_itermax)
            jb = np.arange(Fb)

            def row_block(rows):
                return np.stack([ex.costs(np.full(Fb, i), jb) for i in rows]) if len(rows) else np.zeros((0, Fb))

            blocks = _split(Fa, max(1, 4096 // max(Fb, 1)))
            res = _parallel_map(row_block, blocks, n_jobs, _RowsToPairs(bar, Fb))
            return torch.from_numpy(np.concatenate(res) if res else np.zeros((0, Fb))).to(xa.device)
        solver_obj = _BatchedPairs(solver, xa, wa, xb, wb, batch_size, solver_kw)
        out = torch.empty(Fa, Fb, dtype=solver_obj.dtype, device=xa.device)
        rows_per = max(1, solver_obj.batch_size // max(Fb, 1))
        jb = torch.arange(Fb, device=xa.device)
        for s in range(0, Fa, rows_per):
            rows = torch.arange(s, min(Fa, s + rows_per), device=xa.device)
            ia = rows.repeat_interleave(Fb)
            ib = jb.repeat(len(rows))
            out[s:s + len(rows)] = solver_obj.costs(ia, ib).view(len(rows), Fb)
            if bar is not None:
                bar.update(len(rows) * Fb)
        return out
    finally:
        if bar is not None:
            bar.close()


class _RowsToPairs:
    def __init__(self, bar, per_row: int):
        self.bar, self.per_row = bar, per_row

    def update(self, n_rows: int) -> None:
        if self.bar is not None:
            self.bar.update(n_rows * self.per_row)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair", dynamic_ncols=True)


# ----------------------------------------------------------------------------- nearest
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
    """

    cost: Tensor
    index: Tensor
    n_solved: int
    n_pairs: int
    bound: str = "none"

    @property
    def solved_fraction(self) -> float:
        return self.n_solved / self.n_pairs if self.n_pairs else 0.0


def _effective_bound(solver: str, bound: str, solver_kw: dict) -> str:
    """The bound actually used by :func:`w2_nearest` (see its docstring for the table)."""
    if bound not in BOUNDS:
        raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
    if bound == "none":
        return "none"
    if solver == "sliced":
        return "sliced"
    if bound == "sliced":
        raise ValueError("transport bound 'sliced' only bounds the sliced solver; use mean, mean_spread or axis_spread")
    if solver == "sinkhorn" and solver_kw.get("debiased", False) and bound != "mean":
        return "mean"
    return bound


def w2_nearest(
    xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int = 2, solver: str = "exact",
    bound: str = "mean_spread", chunk: int = 1024, batch_size: int | None = None,
    progress: bool = False, **solver_kw,
) -> NearestResult:
    r"""Exact k nearest neighbours in B of every feature of A under ``solver``, with pruning.

    Algorithm: compute a lower bound ``L[i, j]`` for all pairs (chunks of ``chunk``
    rows of A, float64 matmuls). For each row i visit the features of B in
    increasing ``L[i, j]``; solve, keep the k best; stop as soon as the next bound
    exceeds the current k-th best cost (with a relative slack of 1e-9 in float64 /
    1e-4 in float32 so rounding never prunes a true neighbour). Every unvisited j
    then has cost >= L[i, j] > k-th best, so the result **equals brute force** under
    the same solver (ties broken by the smaller index, like a stable sort).

    Which bounds are valid for which solver (pruning is exact only if
    bound <= solver value for every pair):

    ============================  =========================================  =====================
    solver                        value                                      bounds used
    ============================  =========================================  =====================
    exact                         :math:`W_2^2`                              as requested
    sinkhorn                      cost of a feasible plan :math:`\ge W_2^2`  as requested
    sinkhorn, debiased=True       Sinkhorn divergence, only                  ``mean`` (any other
                                  :math:`\ge\|m_a-m_b\|^2`                   request falls back)
    sliced                        :math:`SW` (:func:`w2_sliced`), can be     always ``sliced``
                                  below :math:`\|m_a - m_b\|^2` unless       (:func:`lower_bound_sliced`,
                                  n is a multiple of r                       same directions)
    ============================  =========================================  =====================

    ``bound="none"`` disables pruning (brute force over all alive pairs).

    Work: ``exact`` solves each row's candidates one by one (the network simplex is
    a CPU call anyway) on ``n_jobs`` threads over rows; ``sinkhorn`` / ``sliced``
    visit candidates in rounds (k, then doubling up to 64 per row), all active rows
    of a chunk solved together in GPU-friendly batches of ``batch_size`` pairs.

    Args:
        xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
        k: neighbours per row (>= 1).
        solver: ``exact`` | ``sinkhorn`` | ``sliced``.
        bound: ``mean_spread`` (default) | ``axis_spread`` (tighter, width 2r) |
            ``mean`` | ``none`` (``sliced`` is chosen automatically for the sliced solver).
        chunk: rows of A whose bounds are held at once (memory ``chunk * Fb`` float64).
        batch_size: pairs per batched solver call (sinkhorn / sliced).
        progress: tqdm bar over the rows of A.
        solver_kw: options of the solver (see :func:`pair_w2`).

    Returns:
        :class:`NearestResult`. Dead rows of A get ``inf`` / -1; dead features of B are
        never chosen.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    _check_solver(solver)
    if k < 1:
        raise ValueError(f"w2_nearest k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"w2_nearest chunk must be >= 1, got {chunk}")
    used = _effective_bound(solver, bound, solver_kw)
    Fa, Fb = xa.shape[0], xb.shape[0]
    alive_a, alive_b = _alive(wa), _alive(wb)
    n_pairs = int(alive_a.sum()) * int(alive_b.sum())
    if solver == "exact":
        num_itermax, n_jobs = _exact_kw(solver_kw)
        dtype = torch.float64
    else:
        batched = _BatchedPairs(solver, xa, wa, xb, wb, batch_size, solver_kw)
        dtype = batched.dtype
    prune = used != "none"
    atol = 0.0
    if prune:
        theta = batched.theta if used == "sliced" else None
        ua, ub, c = _centre(*_bound_embeddings(used, xa, wa, xb, wb, theta))
        atol = _SLACK[dtype] * c * float(torch.cat([(ua * ua).sum(1), (ub * ub).sum(1)]).max())
    cost = torch.full((Fa, k), math.inf, dtype=dtype)
    index = torch.full((Fa, k), -1, dtype=torch.long)
    n_solved = 0
    bar = _bar(progress, Fa, f"W2 {solver} nearest")
    if solver == "exact":
        ex = _ExactPairs(xa, wa, xb, wb, num_itermax)
    try:
        for s in range(0, Fa, chunk):
            rows = torch.arange(s, min(Fa, s + chunk), device=xa.device)
            if prune:
                lb = _bound_rows(ua, ub, c, alive_b, slice(s, s + chunk))
            else:
                lb = torch.zeros(len(rows), Fb, dtype=torch.float64, device=xa.device)
                lb.masked_fill_(~alive_b.unsqueeze(0), math.inf)
            lb.masked_fill_(~alive_a[rows].unsqueeze(1), math.inf)
            if solver == "exact":
                c_, i_, n_ = _nearest_exact_chunk(ex, lb, s, k, n_jobs, prune, atol, bar)
            else:
                c_, i_, n_ = _nearest_batched_chunk(batched, lb, rows, k, prune, atol, bar)
            cost[s:s + len(rows)] = c_
            index[s:s + len(rows)] = i_
            n_solved += n_
    finally:
        if bar is not None:
            bar.close()
    return NearestResult(cost.to(xa.device), index.to(xa.device), int(n_solved), n_pairs, used)


def _sorted_bounds(lb: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m smallest bounds of each row of ``lb [n, Fb]`` ascending, and their columns."""
    if m >= lb.shape[1]:
        return lb.sort(dim=1, stable=True)
    v, i = torch.topk(lb, m, dim=1, largest=False, sorted=True)
    return v, i


def _nearest_exact_chunk(ex: _ExactPairs, lb: Tensor, row0: int, k: int, n_jobs: int, prune: bool,
                         atol: float, bar) -> tuple[Tensor, Tensor, int]:
    """Exact top-k of rows ``row0 + [0, n)`` given their bounds ``lb [n, Fb]`` (inf = skip)."""
    n_rows, Fb = lb.shape
    v, i = _sorted_bounds(lb, min(Fb, max(8 * k, 32)))
    lb_v, lb_i = v.cpu().numpy(), i.cpu().numpy()
    rtol = _SLACK[torch.float64]

    def one_row(r: int) -> tuple[list, int]:
        vals, idx = lb_v[r], lb_i[r]
        pa = ex.side_a(row0 + r)
        best: list[tuple[float, int]] = []  # (cost, j) ascending: ties broken by index
        seen: list[int] = []
        n, t = 0, 0
        while True:
            if t == len(idx):
                if len(seen) >= Fb or len(idx) >= Fb:
                    break
                # the short list ran out before the stopping rule fired: sort the whole row
                full = lb[r].cpu().numpy()
                order = np.argsort(full, kind="stable")
                order = order[~np.isin(order, np.asarray(seen))]
                vals, idx, t = full[order], order, 0
                if len(idx) == 0:
                    break
            lbv = float(vals[t])
            if not math.isfinite(lbv):
                break
            if prune and len(best) == k and lbv * (1.0 - rtol) - atol > best[-1][0]:
                break
            j = int(idx[t])
            t += 1
            seen.append(j)
            item = (ex.cost_trimmed(pa, ex.side_b(j)), j)
            n += 1
            if len(best) < k:
                best.append(item)
                best.sort()
            elif item < best[-1]:
                best[-1] = item
                best.sort()
        return best, n

    res = _parallel_map(lambda rows: [one_row(int(r)) for r in rows], _split(n_rows, 8), n_jobs, bar)
    cost = torch.full((n_rows, k), math.inf, dtype=torch.float64)
    index = torch.full((n_rows, k), -1, dtype=torch.long)
    n_total, r = 0, 0
    for blk in res:
        for best, n in blk:
            n_total += n
            for q, (cv, j) in enumerate(best):
                if math.isfinite(cv):
                    cost[r, q], index[r, q] = cv, j
            r += 1
    return cost, index, n_total


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


def _nearest_batched_chunk(solver: _BatchedPairs, lb: Tensor, rows: Tensor, k: int, prune: bool,
                           atol: float, bar, max_step: int = 64) -> tuple[Tensor, Tensor, int]:
    """Top-k of ``rows`` with a batched solver: rounds of k, 2k, ... (<= max_step) candidates per row.

    ``lb [n, Fb]`` is overwritten (visited entries become -inf).
    """
    n_rows, Fb = lb.shape
    dev = lb.device
    lb_v, lb_i = _sorted_bounds(lb, min(Fb, max(8 * k, 64)))
    best_c = torch.full((n_rows, k), math.inf, dtype=solver.dtype, device=dev)
    best_i = torch.full((n_rows, k), -1, dtype=torch.long, device=dev)
    rtol = _SLACK[solver.dtype]

    def pruned(v: Tensor) -> Tensor:  # bound exceeds the current k-th best: cannot enter the top k
        if not prune:
            return torch.zeros_like(v, dtype=torch.bool)
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
        new_c = torch.full(wv.shape, math.inf, dtype=solver.dtype, device=dev)
        if rr.numel():
            new_c[rr, cc] = solver.costs(rows[rr], wi[rr, cc]).to(device=dev, dtype=solver.dtype)
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
