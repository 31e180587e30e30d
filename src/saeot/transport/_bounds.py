r"""Lower bounds of :math:`W_2^2` (and of the sliced value) from per-feature moments.

Every bound here is ``c * ||u_a - u_b||^2`` between small per-feature embeddings ``u``
(means, spreads, per-axis or per-direction standard deviations), so a ``[Fa, Fb]``
bound matrix is one float64 matmul per chunk of rows of A. Proofs are in the
docstrings of the public functions. The tighter bounds of the cascade are in
:mod:`saeot.transport._gelbrich` and :mod:`saeot.transport._max_sliced`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._checks import _check_two
from saeot.transport._cost import _alive
from saeot.transport._moments import _clean, feature_moments
from saeot.transport._sliced import sliced_directions


def _projected_moments(x: Tensor, w: Tensor, theta: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """``[F, n]`` weighted mean and std of the projections of each cloud on the rows of ``theta [n, r]``."""
    theta = theta.to(device=x.device, dtype=torch.float64)
    F, n = x.shape[0], theta.shape[0]
    m = torch.empty(F, n, dtype=torch.float64, device=x.device)
    sd = torch.empty(F, n, dtype=torch.float64, device=x.device)
    for s in range(0, F, chunk):
        xs, ws = _clean(x[s:s + chunk], w[s:s + chunk])
        p = xs @ theta.T  # [f, K, n]
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
        raise ValueError(f"embedding bounds are mean, mean_spread, axis_spread and sliced, got {bound!r}")
    ma, spa, axa = feature_moments(xa, wa)
    mb, spb, axb = feature_moments(xb, wb)
    if bound == "mean":
        return ma, mb, 1.0
    if bound == "mean_spread":
        return torch.cat([ma, spa[:, None]], 1), torch.cat([mb, spb[:, None]], 1), 1.0
    return torch.cat([ma, axa], 1), torch.cat([mb, axb], 1), 1.0


def _sqdist_direct(ua: Tensor, ub: Tensor) -> Tensor:
    """``[Fa, Fb]`` squared distances between rows from their differences: no cancellation,
    but ``Fa * Fb * D`` work (for the all-pairs functions, in blocks of about 2^22 numbers)."""
    step = max(1, (1 << 22) // max(1, ub.shape[0] * ub.shape[1]))
    parts = [((ua[s:s + step].unsqueeze(1) - ub.unsqueeze(0)) ** 2).sum(-1) for s in range(0, ua.shape[0], step)]
    return torch.cat(parts) if parts else ua.new_zeros(0, ub.shape[0])


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
        out[s:s + chunk] = _sqdist_direct(ua[s:s + chunk], ub) * c
    out.masked_fill_(~alive_b.unsqueeze(0), math.inf)
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

