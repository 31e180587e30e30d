r"""The Gelbrich bound :math:`\|m_a - m_b\|^2 + \mathrm{Bures}^2(S_a, S_b) \le W_2^2` and a cheap relaxation.

With :math:`Y = \sqrt{w} \odot (x - m)` (``[K, r]``, rows) the covariance is
:math:`S = Y^\top Y`, and the Bures term is

.. math:: \mathrm{Bures}^2(S_a, S_b) = \mathrm{tr}\,S_a + \mathrm{tr}\,S_b - 2\,\|Y_a Y_b^\top\|_*,

because the non-zero squared singular values of :math:`Y_a Y_b^\top` are the eigenvalues of
:math:`Y_a S_b Y_a^\top`, i.e. of :math:`S_b^{1/2} S_a S_b^{1/2}`, so the nuclear norm is the
fidelity :math:`\mathrm{tr}(S_a^{1/2} S_b S_a^{1/2})^{1/2}`. With K samples S has rank < K,
and :math:`\|Y_a Y_b^\top\|_* = \|Z_a Z_b^\top\|_*` for the sketches
:math:`Z = \mathrm{diag}(\sigma)V^\top` (``[q, r]``, :mod:`saeot.transport._moments`): the factors
:math:`U` of the thin SVDs have orthonormal columns.

* :func:`_fidelity_exact` -- the nuclear norm by one batched SVD of ``q x q`` matrices per
  pair (for the pairs that survive cheaper bounds);
* :func:`_fidelity_upper` -- an upper bound of the nuclear norm for all pairs at once (two
  float64 GEMMs of width r(r+1)/2), hence a lower bound of the Gelbrich bound.

Proofs are in :func:`lower_bound_gelbrich` and :func:`lower_bound_fidelity`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._bounds import _sqdist_direct
from saeot.transport._checks import _check_two
from saeot.transport._cost import _alive
from saeot.transport._moments import _common_shift, _Side, _side_stats

# unit roundoff of float64: a dot product of length n has error <= n u / (1 - n u) * sum |x_i y_i|
_U64 = 2.0 ** -53


def _fidelity_upper(A: _Side, B: _Side) -> Tensor:
    r"""``[Fa, Fb]`` upper bound of :math:`\|Y_a Y_b^\top\|_*` (see :func:`lower_bound_fidelity`).

    .. math:: \min\Big(\sqrt{\mathrm{tr}S_a^{1/2}\,(\langle S_a^{1/2}, S_b\rangle + e_{ab})},\;
              \sqrt{\mathrm{tr}S_b^{1/2}\,(\langle S_b^{1/2}, S_a\rangle + e_{ba})},\; s_a s_b\Big)

    The inner products are float64 GEMMs of the ``vech'`` vectors; ``e`` is the rigorous
    bound of their rounding error (``gamma_n ||u|| ||v||``, n the vector width), added
    before the square root so that rounding near 0 can never make the result too small.
    """
    n = A.vech_S.shape[1]
    gamma = 2.0 * n * _U64 / (1.0 - 2.0 * n * _U64)
    xa = A.vech_R @ B.vech_S.T + gamma * A.s.unsqueeze(1) * B.fro_S.unsqueeze(0)
    ua = (A.half_tr.unsqueeze(1) * xa.clamp_min_(0.0)).sqrt_()
    xb = A.vech_S @ B.vech_R.T + gamma * A.fro_S.unsqueeze(1) * B.s.unsqueeze(0)
    ub = (B.half_tr.unsqueeze(0) * xb.clamp_min_(0.0)).sqrt_()
    return torch.minimum(torch.minimum(ua, ub), A.s.unsqueeze(1) * B.s.unsqueeze(0))


def _trim_rank(Z: Tensor) -> Tensor:
    """``Z [F, q, r]`` without the trailing rows that are zero for every feature (rank < q everywhere)."""
    nz = (Z.abs().amax(2) > 0).any(0).nonzero()
    q = int(nz.max()) + 1 if nz.numel() else 1
    return Z[:, :q]


def _fidelity_exact(Za: Tensor, Zb: Tensor) -> Tensor:
    r"""``[P]`` :math:`\|Z_a Z_b^\top\|_*` for paired sketches ``Za [P, qa, r]``, ``Zb [P, qb, r]`` (batched SVD)."""
    return torch.linalg.svdvals(Za @ Zb.transpose(1, 2)).sum(-1)


def _bures_bound(mg: Tensor, tr_a: Tensor, tr_b: Tensor, nuc: Tensor) -> Tensor:
    """``||m_a - m_b||^2 + tr S_a + tr S_b - 2 nuc`` (a lower bound of W2^2 whenever nuc >= ||Y_a Y_b^T||_*)."""
    return mg + tr_a + tr_b - 2.0 * nuc


def _pairs_stats(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, need: frozenset) -> tuple[_Side, _Side]:
    shift = _common_shift(xa, wa, xb, wb)
    return _side_stats(xa, wa, shift, need), _side_stats(xb, wb, shift, need)


def _dead_inf(L: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    return L.masked_fill_(~(_alive(wa).unsqueeze(1) & _alive(wb).unsqueeze(0)), math.inf)


def lower_bound_fidelity(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> Tensor:
    r"""``[Fa, Fb]`` lower bound of :func:`lower_bound_gelbrich` (hence of :math:`W_2^2`) for all pairs by GEMMs.

    .. math:: L = \|m_a - m_b\|^2 + \mathrm{tr}S_a + \mathrm{tr}S_b - 2\,\bar F_{ab},\qquad
              \bar F_{ab} = \min\Big(\sqrt{\mathrm{tr}S_a^{1/2}\,\langle S_a^{1/2}, S_b\rangle},\;
              \sqrt{\mathrm{tr}S_b^{1/2}\,\langle S_b^{1/2}, S_a\rangle},\; s_a s_b\Big)

    Proof. :math:`\|M\|_* = \max_{\|Q\|_{op}\le 1} \mathrm{tr}(Q^\top M)`. For any
    factorisation :math:`Y_a = X B` and :math:`\|Q\|_{op} \le 1`, by Cauchy-Schwarz
    :math:`\mathrm{tr}(Q^\top X B Y_b^\top) = \langle X, Q Y_b B^\top\rangle \le \|X\|_F
    \|Q Y_b B^\top\|_F \le \|X\|_F \|Y_b B^\top\|_F`. With the SVD :math:`Y_a = U
    \mathrm{diag}(\sigma) V^\top` take :math:`X = U \mathrm{diag}(\sigma)^{1/2} V^\top` and
    :math:`B = V \mathrm{diag}(\sigma)^{1/2} V^\top = S_a^{1/4}`: then :math:`\|X\|_F^2 =
    \sum_j \sigma_j = \mathrm{tr}S_a^{1/2}` and :math:`\|Y_b B\|_F^2 = \mathrm{tr}(S_a^{1/4}
    S_b S_a^{1/4}) = \langle S_a^{1/2}, S_b\rangle`. Exchanging a and b gives the second
    term, :math:`X = Y_a, B = I` the third (:math:`s_a s_b`). So :math:`\bar F_{ab} \ge
    \|Y_a Y_b^\top\|_*` and :math:`L \le` the Gelbrich bound. With the third term alone L
    is :func:`~saeot.transport.lower_bound_mean_spread`, so L is at least as tight.

    Cost: the vectors :math:`\mathrm{vech}'(S), \mathrm{vech}'(S^{1/2})` (width r(r+1)/2)
    per feature, then two float64 GEMMs. ``inf`` for dead features.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    A, B = _pairs_stats(xa, wa, xb, wb, frozenset({"fidelity"}))
    L = _bures_bound(_sqdist_direct(A.m, B.m), A.tr.unsqueeze(1), B.tr.unsqueeze(0), _fidelity_upper(A, B))
    return _dead_inf(L, wa, wb)


def lower_bound_gelbrich(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, batch: int = 4096) -> Tensor:
    r"""``[Fa, Fb]`` the Gelbrich bound :math:`\|m_a - m_b\|^2 + \mathrm{Bures}^2(S_a, S_b) \le W_2^2`.

    Proof. Let P be a coupling, :math:`\bar x_k = x_k - m_a`, :math:`\bar y_l = y_l - m_b`.
    As in :func:`~saeot.transport.lower_bound_mean_spread`,
    :math:`\sum_{kl} P_{kl}\|x_k - y_l\|^2 = \|m_a - m_b\|^2 + \mathrm{tr}S_a + \mathrm{tr}S_b
    - 2\sum_{kl} P_{kl}\,\bar x_k^\top \bar y_l`. Put :math:`Q_{kl} = P_{kl}/\sqrt{a_k b_l}`
    (0 where a weight is 0; P is 0 there too). Then :math:`\sum P_{kl}\bar x_k^\top\bar y_l =
    \mathrm{tr}(Y_a^\top Q Y_b)`, and :math:`\|Q\|_{op} \le 1`: for unit u, v, by
    Cauchy-Schwarz with the marginals of P, :math:`|u^\top Q v| \le (\sum P_{kl}
    u_k^2/a_k)^{1/2} (\sum P_{kl} v_l^2/b_l)^{1/2} = 1`. By the duality of the operator and
    nuclear norms, :math:`\mathrm{tr}(Q\,Y_b Y_a^\top) \le \|Q\|_{op}\|Y_b Y_a^\top\|_* \le
    \|Y_a Y_b^\top\|_*`. So every coupling costs at least :math:`\|m_a - m_b\|^2 +
    \mathrm{tr}S_a + \mathrm{tr}S_b - 2\|Y_a Y_b^\top\|_*`, and so does the optimal one.

    Computed as :math:`\|Z_a Z_b^\top\|_*` (one ``q x q`` SVD per pair, in batches of
    ``batch`` pairs), which is exact for Gaussians and costs about half an exact solve on a
    CPU -- :class:`~saeot.transport.ExactW2` therefore only evaluates it on pairs that
    survive :func:`lower_bound_fidelity`. ``inf`` for dead features.
    """
    _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
    A, B = _pairs_stats(xa, wa, xb, wb, frozenset({"gelbrich"}))
    Za, Zb = _trim_rank(A.Z), _trim_rank(B.Z)
    Fa, Fb = xa.shape[0], xb.shape[0]
    ia = torch.arange(Fa, device=xa.device).repeat_interleave(Fb)
    ib = torch.arange(Fb, device=xa.device).repeat(Fa)
    nuc = torch.cat([_fidelity_exact(Za[ia[s:s + batch]], Zb[ib[s:s + batch]])
                     for s in range(0, Fa * Fb, batch)]) if Fa * Fb else torch.zeros(0, dtype=torch.float64)
    L = _bures_bound(_sqdist_direct(A.m, B.m), A.tr.unsqueeze(1), B.tr.unsqueeze(0), nuc.view(Fa, Fb).to(xa.device))
    return _dead_inf(L, wa, wb)
