r"""Certified bounds from batched Sinkhorn: an upper and a lower bound of the *exact* :math:`W_2^2` per pair.

Log-domain Sinkhorn (:func:`saeot.transport._sinkhorn._sinkhorn_potentials`, batched, on the
device of the inputs, in the compute dtype) gives potentials f, g. From them, in float64:

* **upper bound**: the plan :math:`P_{kl} = a_k b_l e^{(f_k + g_l - C_{kl})/\varepsilon}` rounded
  onto :math:`\Pi(a, b)` (Altschuler et al. 2017, :func:`_round_to_coupling`) is feasible, so
  :math:`\langle P, C\rangle \ge W_2^2`;
* **lower bound**: the c-transforms :math:`g'_l = \min_{k: a_k>0} (C_{kl} - f_k)` and
  :math:`f'_k = \min_{l: b_l>0} (C_{kl} - g'_l)` satisfy :math:`f'_k + g'_l \le C_{kl}` on the
  supports (dual feasibility: :math:`f'_k \le C_{kl} - g'_l` by definition), so by weak
  duality :math:`\sum_k a_k f'_k + \sum_l b_l g'_l \le \sum_{kl} P_{kl}(f'_k + g'_l) \le
  \langle P, C\rangle` for every coupling P, in particular the optimal one.

Both are valid for any potentials (converged or not, any epsilon); they are tight when
epsilon is small and Sinkhorn has converged. :class:`~saeot.transport.ExactW2` with
``certify=True`` uses them to certify nearest neighbours (see :meth:`ExactW2.nearest`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._cost import _centre_pairs, cost_matrices
from saeot.transport._moments import _clean
from saeot.transport._sinkhorn import _round_to_coupling, _sinkhorn_potentials


def _log(w: Tensor) -> Tensor:
    return torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))


def _sinkhorn_bounds(x: Tensor, a: Tensor, y: Tensor, b: Tensor, reg: float, n_iter: int, tol: float = 1e-6,
                     dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    r"""``upper [P]``, ``lower [P]`` float64 bounds of the exact :math:`W_2^2` of the pairs ``(x[p], y[p])``.

    Args:
        x: ``[P, K, r]``, a: ``[P, K]``, y: ``[P, K', r]``, b: ``[P, K']``, every pair alive.
        reg: epsilon relative to the mean cost under the independent coupling.
        n_iter, tol: Sinkhorn iterations (annealed from a large epsilon) and marginal tolerance.
        dtype: the dtype Sinkhorn runs in (the bounds are evaluated in float64 either way).
    """
    x, a = _clean(x, a)
    y, b = _clean(y, b)
    x, y = _centre_pairs(x, a, y, b)
    C = cost_matrices(x, y)  # float64 [P, K, K']
    scale = torch.einsum("pk,pkl,pl->p", a, C, b)
    eps = (reg * scale).clamp_min(torch.finfo(dtype).tiny ** 0.5)
    la, lb = _log(a), _log(b)
    f, g, e = _sinkhorn_potentials(C.to(dtype), la.to(dtype), lb.to(dtype), eps.to(dtype), n_iter, tol,
                                   check_every=10, anneal=True)
    f, g, e = f.to(torch.float64), g.to(torch.float64), e.to(torch.float64)
    logp = (f.unsqueeze(2) + g.unsqueeze(1) - C) / e.view(-1, 1, 1) + la.unsqueeze(2) + lb.unsqueeze(1)
    P = _round_to_coupling(torch.nan_to_num(logp.exp(), nan=0.0), a, b)
    upper = (P * C).sum((1, 2))
    sa, sb = (a > 0).unsqueeze(2), (b > 0).unsqueeze(1)
    f = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)  # any finite f gives a feasible pair below
    g2 = (C - f.unsqueeze(2)).masked_fill(~sa, math.inf).amin(1)   # [P, K']
    f2 = (C - g2.unsqueeze(1)).masked_fill(~sb, math.inf).amin(2)  # [P, K]
    lower = torch.where(a > 0, a * f2, 0.0).sum(1) + torch.where(b > 0, b * g2, 0.0).sum(1)
    return upper, lower
