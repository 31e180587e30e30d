r"""Per-feature statistics the lower bounds are made of (float64, on the device of the inputs).

For a weighted cloud :math:`\mu = \sum_k w_k \delta_{x_k}` (``w`` renormalised, padding
``w_k = 0`` ignored even when its points are not finite) and a common shift ``c``:

* mean :math:`m = \sum_k w_k x_k - c`, spread :math:`s = (\sum_k w_k \|x_k - m\|^2)^{1/2}`,
  covariance :math:`S = Y^\top Y` with :math:`Y = \sqrt{w} \odot (x - m)` (rows, ``[K, r]``);
* the covariance sketch :math:`Z = \mathrm{diag}(\sigma) V^\top` ``[q, r]``, q = min(K, r), from
  the thin SVD :math:`Y = U \mathrm{diag}(\sigma) V^\top`, so :math:`Z^\top Z = S` and
  :math:`\sum_j \sigma_j = \mathrm{tr}\, S^{1/2}`;
* symmetric matrices as vectors :math:`\mathrm{vech}'(P)` (upper triangle, off-diagonal entries
  times :math:`\sqrt 2`) so that :math:`\langle P, Q\rangle = \mathrm{tr}(PQ)` is one dot product;
* ``mag`` :math:`= \max_k \|x_k - c\|^2 + \max_k \|x_k\|^2`, the scale of every rounding error
  made with these points (the exact solver builds its costs from the raw points).

:func:`feature_moments` is the public mean / spread / per-axis spread; :func:`_side_stats`
computes what a bound cascade asks for, in chunks of features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saeot.transport._cost import _alive, _normalize
from saeot.transport._sliced import _project_sorted


def _clean(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """float64 points with padding set to 0 (padding may hold anything, even NaN) and weights summing to 1."""
    w = _normalize(w.to(torch.float64))
    x = x.to(torch.float64).masked_fill((w == 0).unsqueeze(-1), 0.0)
    return x, w


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
        xs, ws = _clean(x[s:s + chunk], w[s:s + chunk])
        ms = torch.einsum("fk,fkr->fr", ws, xs)
        xc = xs - ms.unsqueeze(1)
        m[s:s + chunk] = ms
        var[s:s + chunk] = torch.einsum("fk,fkr->fr", ws, xc * xc)
    return m, var.sum(1).sqrt(), var.sqrt()


def _svd(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values ``[f, q]`` and right singular vectors ``[f, q, r]`` of a batch ``Y [f, K, r]``.

    On the CPU through NumPy: torch's batched CPU SVD of many small matrices slows down by
    10-50x with more than one thread on a loaded machine (measured), NumPy's does not.
    """
    if Y.device.type != "cpu":
        _, sig, Vh = torch.linalg.svd(Y, full_matrices=False)
        return sig, Vh
    _, sig, Vh = np.linalg.svd(Y.numpy(), full_matrices=False)
    return torch.from_numpy(sig), torch.from_numpy(Vh)


def _vech_index(r: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Upper-triangle indices of an ``r x r`` matrix and the factors (1 on the diagonal, sqrt 2 off it)."""
    i, j = torch.triu_indices(r, r, device=device)
    one = torch.ones(len(i), dtype=torch.float64, device=device)
    return i, j, torch.where(i == j, one, one * math.sqrt(2.0))


@dataclass
class _Side:
    """Statistics of the features of one set (each ``[F, ...]``, float64; zeros for dead features).

    ``m``, ``s``, ``tr`` (= s^2), ``mag`` always; ``axis`` ([F, r], per-axis spreads) for
    ``axis_spread``; ``half_tr`` (tr S^1/2), ``vech_S``, ``vech_R`` (vech' of S and S^1/2),
    ``fro_S`` (||S||_F) for the fidelity bound; ``Z`` ([F, q, r] sketch) for Gelbrich;
    ``proj_v``, ``proj_c`` ([F, n, K] sorted projections and their CDF), ``perp_m`` ([F, r]),
    ``perp_s`` ([F]) for the max-sliced bound (frame ``U``).
    """

    alive: Tensor
    m: Tensor
    s: Tensor
    tr: Tensor
    mag: Tensor
    axis: Tensor | None = None
    half_tr: Tensor | None = None
    vech_S: Tensor | None = None
    vech_R: Tensor | None = None
    fro_S: Tensor | None = None
    Z: Tensor | None = None
    proj_v: Tensor | None = None
    proj_c: Tensor | None = None
    perp_m: Tensor | None = None
    perp_s: Tensor | None = None


def _side_stats(x: Tensor, w: Tensor, shift: Tensor, need: frozenset, frame: Tensor | None = None,
                chunk: int = 256) -> _Side:
    """The statistics ``need`` asks for (``axis``, ``fidelity``, ``gelbrich``, ``max_sliced``) of ``x [F, K, r]``.

    ``shift [r]`` is subtracted from every point first (the same for both sets: distances
    are unchanged and float cancellation is smaller). ``frame [n, r]`` (orthonormal rows)
    is needed for ``max_sliced``.
    """
    F, K, r = x.shape
    dev = x.device
    f64 = {"dtype": torch.float64, "device": dev}
    q = min(K, r)
    out = _Side(alive=_alive(w), m=torch.zeros(F, r, **f64), s=torch.zeros(F, **f64), tr=torch.zeros(F, **f64),
                mag=torch.zeros(F, **f64))
    if "axis" in need:
        out.axis = torch.zeros(F, r, **f64)
    if "fidelity" in need:
        vi, vj, vf = _vech_index(r, dev)
        out.half_tr = torch.zeros(F, **f64)
        out.vech_S = torch.zeros(F, len(vi), **f64)
        out.vech_R = torch.zeros(F, len(vi), **f64)
        out.fro_S = torch.zeros(F, **f64)
    if "gelbrich" in need:
        out.Z = torch.zeros(F, q, r, **f64)
    if "max_sliced" in need:
        n = frame.shape[0]
        out.proj_v = torch.zeros(F, n, K, **f64)
        out.proj_c = torch.zeros(F, n, K, **f64)
        out.perp_m = torch.zeros(F, r, **f64)
        out.perp_s = torch.zeros(F, **f64)
        frame = frame.to(**f64)
    shift = shift.to(**f64)
    for a in range(0, F, chunk):
        sl = slice(a, min(F, a + chunk))
        xs, ws = _clean(x[sl], w[sl])
        pad = (ws == 0).unsqueeze(-1)
        raw = (xs * xs).sum(-1).amax(1)
        xs = (xs - shift).masked_fill(pad, 0.0)
        m = torch.einsum("fk,fkr->fr", ws, xs)
        Y = (ws.sqrt().unsqueeze(-1) * (xs - m.unsqueeze(1))).masked_fill(pad, 0.0)  # [f, K, r]
        out.m[sl] = m
        out.tr[sl] = (Y * Y).sum((1, 2))
        out.s[sl] = out.tr[sl].sqrt()
        out.mag[sl] = (xs * xs).sum(-1).amax(1) + raw
        if out.axis is not None:
            out.axis[sl] = (Y * Y).sum(1).sqrt()
        if out.half_tr is not None or out.Z is not None:
            sig, Vh = _svd(Y)  # sig [f, q], Vh [f, q, r]
            if out.half_tr is not None:
                S = Y.transpose(1, 2) @ Y
                R = (Vh.transpose(1, 2) * sig.unsqueeze(1)) @ Vh  # S^1/2 = V diag(sig) V^T
                out.half_tr[sl] = sig.sum(1)
                out.vech_S[sl] = S[:, vi, vj] * vf
                out.vech_R[sl] = R[:, vi, vj] * vf
                out.fro_S[sl] = S.flatten(1).norm(dim=1)
            if out.Z is not None:
                out.Z[sl] = sig.unsqueeze(-1) * Vh
        if out.proj_v is not None:
            v, c = _project_sorted(xs, ws, frame)
            out.proj_v[sl], out.proj_c[sl] = v, c
            perp = torch.eye(r, **f64) - frame.T @ frame
            out.perp_m[sl] = m @ perp
            Yp = Y @ perp
            out.perp_s[sl] = (Yp * Yp).sum((1, 2)).sqrt()
    return out


def _common_shift(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> Tensor:
    """``[r]`` float64 mean of the alive features' means of both sets (zeros if none is alive)."""
    ma, mb = feature_moments(xa, wa)[0], feature_moments(xb, wb)[0]
    alive = torch.cat([_alive(wa), _alive(wb)])
    return torch.cat([ma, mb])[alive].mean(0) if bool(alive.any()) else ma.new_zeros(xa.shape[2])
