r"""A ground cost that also charges for different labels, and the lower bound that keeps its search exact.

Each point carries a label (for SAE features: the token occurrence it was sampled at, so
two features sampled at the same occurrence share it). The *fused* cost of a coupling is

.. math::
    C_\lambda(\mu, \nu) = \min_{P \in \Pi(a, b)} \sum_{kl} P_{kl}
        \big(\|x_k - y_l\|^2 + \lambda\,[t_k \ne t_l]\big), \qquad \lambda \ge 0,

still an optimal-transport cost between two weighted clouds (``lambda = 0`` is
:math:`W_2^2`; the ground cost is the squared distance of the points ``(x, sqrt(lambda/2)
e_t)`` with ``e_t`` one-hot in the label, so :math:`\sqrt{C_\lambda}` is a metric on
labelled measures). Two features that fire on the same occurrences can move their mass
label to label at no extra cost; mass that changes label pays ``lambda``.

**Bound.** For any coupling, :math:`\sum_{kl} P_{kl}[t_k \ne t_l] = 1 - \sum_{kl: t_k =
t_l} P_{kl}` and the mass on equal labels is at most the *overlap*
:math:`o(\mu, \nu) = \sum_t \min(a(t), b(t))` (``a(t)``: the weight of label ``t`` in
``mu``; the marginals cap it). The minimum of a sum is at least the sum of the minima, so

.. math::
    C_\lambda(\mu, \nu) \ge W_2^2(\mu, \nu) + \lambda\,\big(1 - o(\mu, \nu)\big),

and every lower bound of :math:`W_2^2` plus :math:`\lambda (1 - o)` bounds
:math:`C_\lambda`. Pairs that share no label (almost all pairs of a layer) get the whole
``lambda`` on top of their :math:`W_2^2` bound. :func:`overlap_rows` computes ``o`` for a
block of rows against every column exactly (a sparse join on labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.transport._cost import _normalize

#: relative slack by which the label term of a bound is lowered (rounding of the overlap sums)
_LABEL_REL = 1e-12


@dataclass(frozen=True, eq=False)
class LabelCost:
    """The label term of a fused ground cost: ``weight * [label_a != label_b]`` (see the module).

    Attributes:
        labels_a: ``[Fa, K]`` long, one label per sample of A (-1 on padding); labels are
            distinct within a feature (each sample is its own occurrence).
        labels_b: ``[Fb, K']`` long, likewise for B.
        weight: ``lambda >= 0`` (in the units of the squared distances).
    """

    labels_a: Tensor
    labels_b: Tensor
    weight: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"the label cost weight must be finite and >= 0, got {self.weight}")
        for name, lab in (("labels_a", self.labels_a), ("labels_b", self.labels_b)):
            if lab.ndim != 2 or lab.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"LabelCost.{name} must be an integer [F, K] tensor, got {lab.dtype} "
                                 f"{tuple(lab.shape)}")
            srt = lab.sort(dim=1).values
            if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
                raise ValueError(f"LabelCost.{name}: a feature has the same label on two samples "
                                 "(labels are token occurrences, distinct within a feature)")

    def check(self, wa: Tensor, wb: Tensor) -> None:
        """The labels fit the weights ``wa [Fa, K]``, ``wb [Fb, K']``, and every weighted sample has a label."""
        if self.labels_a.shape != wa.shape or self.labels_b.shape != wb.shape:
            raise ValueError(f"LabelCost labels {tuple(self.labels_a.shape)} / {tuple(self.labels_b.shape)} do not "
                             f"match the weights {tuple(wa.shape)} / {tuple(wb.shape)}")
        for name, lab, w in (("a", self.labels_a, wa), ("b", self.labels_b, wb)):
            if bool(((w > 0) & (lab.to(w.device) < 0)).any()):
                raise ValueError(f"LabelCost.labels_{name}: a sample with positive weight has no label (-1)")

    def mismatch(self, la, lb):
        """``[n, m]`` the label term between label vectors ``la [n]`` and ``lb [m]`` (numpy or torch)."""
        return self.weight * (la[:, None] != lb[None, :])


class _LabelBound:
    """:math:`\\lambda (1 - o)` for blocks of rows of A against all of B (B's labels sorted once)."""

    def __init__(self, labels: LabelCost, wa: Tensor, wb: Tensor):
        self.labels = labels
        self.a = _normalize(wa.detach().cpu().double())
        self.la = labels.labels_a.cpu().long()
        b = _normalize(wb.detach().cpu().double())
        lb = labels.labels_b.cpu().long()
        jb, kb = ((b > 0) & (lb >= 0)).nonzero(as_tuple=True)
        lab = lb[jb, kb]
        order = torch.argsort(lab, stable=True)
        self.lab_b, self.j_b, self.v_b = lab[order], jb[order], b[jb, kb][order]
        self.n_b = wb.shape[0]

    def overlap(self, rows: slice) -> Tensor:
        """``[n, Fb]`` float64 :math:`o(\\mu_i, \\nu_j)` for the rows ``rows`` of A."""
        return overlap_rows(self.a[rows], self.la[rows], self.lab_b, self.j_b, self.v_b, self.n_b)

    def dense(self, rows: slice) -> Tensor:
        """``[n, Fb]`` float64 safe lower bound of the label term of the fused cost of each pair."""
        lam = self.labels.weight
        return (lam * (1.0 - self.overlap(rows)) * (1.0 - _LABEL_REL)).clamp_min(0.0)


def overlap_rows(a: Tensor, la: Tensor, lab_b: Tensor, j_b: Tensor, v_b: Tensor, n_b: int) -> Tensor:
    """``[n, Fb]`` :math:`\\sum_t \\min(a_i(t), b_j(t))` for rows ``a [n, K]`` (normalised weights) with
    labels ``la [n, K]`` against B given as its weighted samples sorted by label (``lab_b``, their
    features ``j_b`` and weights ``v_b``): one sparse join, memory in the number of shared labels."""
    out = torch.zeros(a.shape[0], n_b, dtype=torch.float64)
    ia, ka = ((a > 0) & (la >= 0)).nonzero(as_tuple=True)
    if not len(ia) or not len(lab_b):
        return out
    lab, va = la[ia, ka], a[ia, ka]
    lo = torch.searchsorted(lab_b, lab, right=False)
    cnt = torch.searchsorted(lab_b, lab, right=True) - lo
    if int(cnt.sum()) == 0:
        return out
    src = torch.repeat_interleave(torch.arange(len(lab)), cnt)
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(int(cnt.sum())) - start[src] + lo[src]
    out.index_put_((ia[src], j_b[pos]), torch.minimum(va[src], v_b[pos]), accumulate=True)
    return out
