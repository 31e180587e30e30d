r"""The max-sliced bound, strengthened: exact 1-D transport along an orthonormal frame plus its complement.

For one unit direction u the projection :math:`x \mapsto u^\top x` is 1-Lipschitz, so
:math:`W_2^2(u\#\mu_a, u\#\mu_b) \le W_2^2(\mu_a, \mu_b)`, and the 1-D value is exact and
cheap from sorted projections (quantile matching, :func:`saeot.transport._sliced._w2_1d_sorted`).
The maximum over a few directions is the max-sliced bound. For orthonormal directions
the 1-D terms *add up*, and the rest of the space still contributes its mean + spread
bound, so :func:`lower_bound_max_sliced` uses

.. math:: L = \sum_{i=1}^{n} W_2^2(u_i\#\mu_a, u_i\#\mu_b) + \|P_\perp(m_a - m_b)\|^2
          + (s^\perp_a - s^\perp_b)^2

with :math:`P_\perp` the projector on the orthogonal complement of the frame and
:math:`s^\perp = (\sum_k w_k \|P_\perp(x_k - m)\|^2)^{1/2}`; it is at least the max-sliced
bound (every term is >= 0) and at least :func:`~saeot.transport.lower_bound_mean_spread`.

The frame (:func:`_slice_frame`): the leading principal directions of the pooled samples
of both sets, completed by random directions (seeded), orthonormalised together.
Unlike the Gelbrich bound it sees the *shape* of the clouds along the frame (modes,
skew), not only their covariances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._checks import _check_two
from saeot.transport._cost import _alive
from saeot.transport._moments import _clean, _common_shift, _Side, _side_stats
from saeot.transport._sliced import _w2_1d_sorted


def _pooled_second_moment(x: Tensor, w: Tensor, shift: Tensor, chunk: int = 256) -> Tensor:
    r"""``[r, r]`` :math:`\sum_f \sum_k w_{fk} (x_{fk} - c)(x_{fk} - c)^\top` (every feature's weights sum to 1)."""
    r = x.shape[2]
    out = torch.zeros(r, r, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs, ws = _clean(x[s:s + chunk], w[s:s + chunk])
        xs = (xs - shift.to(xs)).masked_fill((ws == 0).unsqueeze(-1), 0.0)
        y = ws.sqrt().unsqueeze(-1) * xs
        out += torch.einsum("fkr,fks->rs", y, y)
    return out


def _slice_frame(moment: Tensor, n: int, seed: int) -> Tensor:
    """``[min(n, r), r]`` orthonormal rows: the ``ceil(n/2)`` leading eigenvectors of ``moment [r, r]``,
    then random directions (CPU generator seeded with ``seed``) orthonormalised against them."""
    r = moment.shape[0]
    n = min(int(n), r)
    _, vec = torch.linalg.eigh(moment.cpu())
    lead = vec.flip(1)[:, :(n + 1) // 2]
    g = torch.Generator().manual_seed(int(seed))
    rand = torch.randn(r, n - lead.shape[1], generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.cat([lead, rand], 1))
    return Q.T.contiguous().to(moment.device)


def _max_sliced_pairs(A: _Side, B: _Side, ia: Tensor, ib: Tensor) -> Tensor:
    """``[P]`` the bound of :func:`lower_bound_max_sliced` for the pairs ``(ia[p], ib[p])`` (alive)."""
    one_d = _w2_1d_sorted(A.proj_v[ia], A.proj_c[ia], B.proj_v[ib], B.proj_c[ib]).sum(-1)
    dm = A.perp_m[ia] - B.perp_m[ib]
    return one_d + (dm * dm).sum(1) + (A.perp_s[ia] - B.perp_s[ib]) ** 2


def _frame_for(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, shift: Tensor, n: int, seed: int) -> Tensor:
    """The frame of :func:`_slice_frame` for two sets (their pooled samples)."""
    return _slice_frame(_pooled_second_moment(xa, wa, shift) + _pooled_second_moment(xb, wb, shift), n, seed)


def lower_bound_max_sliced(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, n_directions: int = 8,
                           seed: int = 0, batch: int = 4096) -> Tensor:
    r"""``[Fa, Fb]`` the frame bound of this module (see its docstring) :math:`\le W_2^2`.

    Proof. Let :math:`u_1..u_n` be orthonormal and :math:`P_\perp` the projector on their
    orthogonal complement; then :math:`\|x - y\|^2 = \sum_i (u_i^\top(x - y))^2 +
    \|P_\perp(x - y)\|^2`. For any coupling P of :math:`\mu_a, \mu_b`, its image under
    :math:`(x, y) \mapsto (u_i^\top x, u_i^\top y)` couples the projected measures, so
    :math:`\sum_{kl} P_{kl} (u_i^\top(x_k - y_l))^2 \ge W_2^2(u_i\#\mu_a, u_i\#\mu_b)`; likewise
    the complement term is :math:`\ge W_2^2(P_\perp\#\mu_a, P_\perp\#\mu_b) \ge
    \|P_\perp(m_a - m_b)\|^2 + (s^\perp_a - s^\perp_b)^2` by
    :func:`~saeot.transport.lower_bound_mean_spread` applied to the projected measures
    (their means are :math:`P_\perp m`, their spreads :math:`s^\perp`). Summing and taking
    the optimal P gives :math:`L \le W_2^2`. Each 1-D term is exact (quantile matching of
    the sorted weighted projections).

    Args:
        n_directions: size of the frame (``min(n, r)``; half principal, half random).
        seed: seed of the random directions.
        batch: pairs evaluated at once.

    Returns:
        ``[Fa, Fb]`` float64; ``inf`` for dead features.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    shift = _common_shift(xa, wa, xb, wb)
    frame = _frame_for(xa, wa, xb, wb, shift, n_directions, seed)
    need = frozenset({"max_sliced"})
    A, B = _side_stats(xa, wa, shift, need, frame), _side_stats(xb, wb, shift, need, frame)
    Fa, Fb = xa.shape[0], xb.shape[0]
    ia = torch.arange(Fa, device=xa.device).repeat_interleave(Fb)
    ib = torch.arange(Fb, device=xa.device).repeat(Fa)
    out = torch.cat([_max_sliced_pairs(A, B, ia[s:s + batch], ib[s:s + batch]) for s in range(0, Fa * Fb, batch)]) \
        if Fa * Fb else torch.zeros(0, dtype=torch.float64, device=xa.device)
    out = out.view(Fa, Fb)
    return out.masked_fill_(~(_alive(wa).unsqueeze(1) & _alive(wb).unsqueeze(0)), math.inf)
