r"""Log-domain Sinkhorn: a batched entropic approximation of :math:`W_2^2` in torch.

:func:`w2_sinkhorn` solves B pairs at once on the device of its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._checks import _check_two
from saeot.transport._cost import (
    _alive,
    _centre_pairs,
    _compute_dtype,
    _normalize,
    cost_matrices,
)


def _check_sinkhorn_options(reg: float, reg_mode: str) -> None:
    try:
        ok = not isinstance(reg, (str, bytes, bool)) and float(reg) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"transport.reg={reg!r}: sinkhorn reg must be > 0")
    if reg_mode not in ("relative", "absolute"):
        raise ValueError(f"transport.reg_mode={reg_mode!r}: sinkhorn reg_mode must be 'relative' or 'absolute'")


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
    _check_sinkhorn_options(reg, reg_mode)
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
