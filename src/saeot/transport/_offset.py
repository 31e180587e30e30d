r"""Searching a cost affine in :math:`W_2^2`: ``weight * W2^2 + O[i, j]`` (:class:`CostOffset`).

Every solver's :meth:`~saeot.transport.W2Solver.nearest` takes an ``offset``: it then returns
the k cheapest pairs under :math:`c_{ij} = \omega\, W_2^2(\mu_i, \nu_j) + O_{ij}` instead of
:math:`W_2^2` alone, for exact extra terms ``O`` and a weight :math:`\omega \ge 0` (e.g. semantic
OT's debiasing, decoder and mean-gap terms, :mod:`saeot.matching.semantic_cost`).

Why the pruned search stays exact: the solver's value ``v`` of a pair (exact :math:`W_2^2`,
Sinkhorn's plan cost, sliced :math:`SW`) is at least the pair's bound ``L`` (the bound tables of
:meth:`~saeot.transport.W2Solver.nearest`). With :math:`\omega \ge 0`,

.. math::
    \omega v + O_{ij} \;\ge\; \omega L_{ij} + O_{ij},

so :math:`\omega L + O` bounds the searched cost of every pair, whatever the sign of ``O``
(a negative ``O`` makes the cost negative, the bound follows). :func:`_shift` lowers it by a
relative rounding slack that covers the rounding of ``omega L + O`` and the difference
between ``O`` as :meth:`CostOffset.dense` computes it for bounds and the searched cost as
:meth:`CostOffset.total` computes it for solved pairs (the same numbers up to rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CostOffset"]

#: relative slack by which an offset bound is lowered (covers the rounding of ``L + O`` and the
#: difference between ``offset.dense`` and ``offset.pairs`` / ``offset.total``)
_OFFSET_REL = 1e-12


class CostOffset:
    """Exact extra terms of a cost ``weight * W2^2 + O[i, j]`` searched by any solver's ``nearest``.

    Subclasses give ``O`` for a block of rows against every column (``dense``, for bounds:
    it may differ from ``pairs`` by rounding only) and for given pairs (``pairs``). ``total``
    turns the solver's values of solved pairs into the searched cost: by default
    ``w2 + pairs`` (``weight * w2 + pairs`` for a weight other than 1); a caller that computes
    its cost in another order overrides it, so that the search returns the caller's very
    numbers. Indices are rows of the ``xa`` and ``xb`` passed to the search.

    Attributes:
        weight: :math:`\\omega \\ge 0`, the factor of :math:`W_2^2` in the cost (1: ``W2^2 + O``).
    """

    weight: float = 1.0

    def dense(self, rows: slice | Tensor) -> Tensor:  # pragma: no cover - interface
        """``[n, Fb]`` float64 offsets of rows ``rows`` (a slice, or long indices) against every column."""
        raise NotImplementedError

    def pairs(self, ia: Tensor, ib: Tensor) -> Tensor:  # pragma: no cover - interface
        """``[P]`` float64 offsets of the pairs ``(ia, ib)``."""
        raise NotImplementedError

    def total(self, w2: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
        """``[P]`` float64 the searched cost of the pairs ``(ia, ib)`` whose solver values are ``w2``
        (alive pairs; on the CPU)."""
        w2, o = w2.double().cpu(), self.pairs(ia.cpu(), ib.cpu()).double().cpu()
        return w2 + o if self.weight == 1.0 else self.weight * w2 + o


class _RowsOffset(CostOffset):
    """``offset`` for a search over the rows ``rows`` of its A only: local row ``q`` is its row ``rows[q]``."""

    def __init__(self, offset: CostOffset, rows: Tensor):
        self.offset, self.rows = offset, rows.long().cpu()
        self.weight = offset.weight

    def dense(self, rows: slice | Tensor) -> Tensor:
        return self.offset.dense(self.rows[rows])

    def pairs(self, ia: Tensor, ib: Tensor) -> Tensor:
        return self.offset.pairs(self.rows[ia.long().cpu()], ib)

    def total(self, w2: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
        return self.offset.total(w2, self.rows[ia.long().cpu()], ib)


def _shift(L: Tensor, O: Tensor, weight: float = 1.0) -> Tensor:
    """``weight * L + O`` lowered by a rounding slack; ``inf`` stays ``inf`` (dead pairs)."""
    if weight == 1.0:
        return torch.where(torch.isfinite(L), L + O - _OFFSET_REL * (O.abs() + L.abs()), L)
    return torch.where(torch.isfinite(L), weight * L + O - _OFFSET_REL * (O.abs() + max(weight, 1.0) * L.abs()), L)


def _w2_limit(thr: Tensor, o: Tensor, weight: float = 1.0) -> Tensor:
    """The largest ``W2^2`` of a pair with offset ``o`` whose cost can still be ``<= thr`` (a little
    loose: safe); ``inf`` for ``weight = 0`` (the cost does not depend on ``W2^2``)."""
    lim = thr - o + _OFFSET_REL * (o.abs() + thr.abs())
    if weight == 1.0:
        return lim
    if weight == 0.0:
        return torch.full_like(lim, float("inf"))
    return lim / weight * (1.0 + _OFFSET_REL)
