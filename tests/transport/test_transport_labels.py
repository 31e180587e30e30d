"""The fused ground cost of labelled clouds (saeot.transport._labels): its value, its bound, its exact search."""

import math

import numpy as np
import ot
import pytest
import torch

from saeot.transport import CostOffset, ExactW2, LabelCost
from saeot.transport._labels import _LabelBound


def _labelled(seed: int, fa: int = 36, fb: int = 44, k: int = 6, r: int = 3, pool: int = 50):
    """Two different 'layers': B's first features re-use A's occurrences (with moved points), the rest
    draw from the same pool; a few padded samples and one dead feature on each side."""
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(fa, k, r, generator=g), torch.randn(fb, k, r, generator=g) * 1.3 + 0.2
    wa, wb = torch.rand(fa, k, generator=g) + 0.1, torch.rand(fb, k, generator=g) + 0.1
    la = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(fa)])
    lb = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(fb)])
    lb[:12] = la[:12]
    xb[:12] = xa[:12] + 0.3 * torch.randn(12, k, r, generator=g)
    for w, lab in ((wa, la), (wb, lb)):
        w[3, -2:] = 0
        lab[3, -2:] = -1
        w[5] = 0
        lab[5] = -1
    return xa.double(), wa.double(), xb.double(), wb.double(), la, lb


def _pot_fused(x, a, la, y, b, lb, lam):
    keep_a, keep_b = a > 0, b > 0
    if not keep_a.any() or not keep_b.any():
        return math.inf
    x, a, la = x[keep_a].numpy(), (a[keep_a] / a[keep_a].sum()).numpy(), la[keep_a].numpy()
    y, b, lb = y[keep_b].numpy(), (b[keep_b] / b[keep_b].sum()).numpy(), lb[keep_b].numpy()
    M = ot.dist(x, y) + lam * (la[:, None] != lb[None, :])
    return float(ot.emd2(a, b, M))


def test_fused_cost_is_pots_emd_on_the_fused_ground_cost_and_w2_at_zero():
    xa, wa, xb, wb, la, lb = _labelled(0)
    ia, ib = torch.arange(0, 36, 2), torch.arange(1, 44, 2)[:18]
    solver = ExactW2(n_jobs=1)
    for lam in (0.0, 0.7, 5.0):
        got = solver.pair(xa, wa, xb, wb, ia, ib, labels=LabelCost(la, lb, lam))
        want = [_pot_fused(xa[i], wa[i], la[i], xb[j], wb[j], lb[j], lam) for i, j in zip(ia, ib)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    plain = solver.pair(xa, wa, xb, wb, ia, ib)
    zero = solver.pair(xa, wa, xb, wb, ia, ib, labels=LabelCost(la, lb, 0.0))
    assert torch.equal(plain, zero)
    # pairs that share occurrences pay less than lambda on top of W2^2; disjoint pairs exactly lambda
    lam = 2.0
    fused = solver.pair(xa, wa, xb, wb, torch.arange(12), torch.arange(12), labels=LabelCost(la, lb, lam))
    w2 = solver.pair(xa, wa, xb, wb, torch.arange(12), torch.arange(12))
    live = torch.isfinite(w2)
    assert bool((fused[live] - w2[live] < lam - 1e-9).all())


def test_overlap_is_the_shared_weight_and_bound_holds_for_every_pair():
    xa, wa, xb, wb, la, lb = _labelled(1)
    lam = 1.5
    labels = LabelCost(la, lb, lam)
    bound = _LabelBound(labels, wa, wb)
    ov = bound.overlap(slice(0, 36))
    an, bn = wa / wa.sum(1, keepdim=True).clamp_min(1e-300), wb / wb.sum(1, keepdim=True).clamp_min(1e-300)
    for i in range(36):
        for j in range(44):
            da = {int(t): float(v) for t, v in zip(la[i], an[i]) if v > 0}
            db = {int(t): float(v) for t, v in zip(lb[j], bn[j]) if v > 0}
            want = sum(min(da[t], db[t]) for t in set(da) & set(db))
            assert ov[i, j].item() == pytest.approx(want, abs=1e-12)
    assert float(ov[:12, :12].diagonal()[torch.tensor([i not in (3, 5) for i in range(12)])].min()) > 0
    solver = ExactW2(n_jobs=1, bound="mean_spread")
    ia, ib = torch.cartesian_prod(torch.arange(36), torch.arange(44)).T
    fused = solver.pair(xa, wa, xb, wb, ia, ib, labels=labels).reshape(36, 44)
    w2 = solver.pair(xa, wa, xb, wb, ia, ib).reshape(36, 44)
    live = torch.isfinite(fused)
    assert bool((w2 + bound.dense(slice(0, 36)) <= fused + 1e-12)[live].all())
    # the bound is tight for disjoint pairs: fused = W2^2 + lambda exactly
    disjoint = (ov == 0) & live
    torch.testing.assert_close(fused[disjoint], w2[disjoint] + lam, rtol=1e-12, atol=1e-12)


class _Shift(CostOffset):
    def __init__(self, sa, sb):
        self.sa, self.sb = sa, sb

    def dense(self, rows):
        return -(self.sa[rows][:, None] + self.sb[None, :])

    def pairs(self, ia, ib):
        return -(self.sa[ia] + self.sb[ib])


@pytest.mark.parametrize("seed,lam,bound,k", [(2, 0.5, "fidelity", 3), (3, 4.0, "mean_spread", 1),
                                              (4, 20.0, "gelbrich", 2)])
def test_nearest_with_labels_equals_brute_force(seed, lam, bound, k):
    xa, wa, xb, wb, la, lb = _labelled(seed)
    labels = LabelCost(la, lb, lam)
    solver = ExactW2(n_jobs=1, bound=bound)
    g = torch.Generator().manual_seed(seed + 100)
    offset = _Shift(torch.rand(36, generator=g, dtype=torch.float64) * 0.2,
                    torch.rand(44, generator=g, dtype=torch.float64) * 0.2)
    ia, ib = torch.cartesian_prod(torch.arange(36), torch.arange(44)).T
    full = solver.pair(xa, wa, xb, wb, ia, ib, labels=labels).reshape(36, 44)
    for off in (None, offset):
        res = solver.nearest(xa, wa, xb, wb, k=k, chunk=16, offset=off, labels=labels)
        c = full if off is None else full + off.dense(slice(0, 36))
        order = torch.argsort(c, dim=1, stable=True)[:, :k]
        want_c = torch.gather(c, 1, order)
        want_i = torch.where(torch.isfinite(want_c), order, torch.full_like(order, -1))
        assert torch.equal(res.index, want_i)
        torch.testing.assert_close(res.cost, want_c, rtol=1e-12, atol=1e-12)
        assert res.n_solved < res.n_pairs  # the label bound pruned pairs
    # the labels change the answer: sharing occurrences pulls B's first features to their A partners
    plain = solver.nearest(xa, wa, xb, wb, k=1).index[:12, 0]
    fused = solver.nearest(xa, wa, xb, wb, k=1, labels=LabelCost(la, lb, 50.0)).index[:12, 0]
    partner = torch.arange(12)
    ok = torch.tensor([i not in (3, 5) for i in range(12)])
    assert int((fused == partner)[ok].sum()) >= int((plain == partner)[ok].sum())
    assert bool((fused == partner)[ok].all())


def test_label_cost_rejects_bad_labels():
    xa, wa, xb, wb, la, lb = _labelled(5)
    dup = la.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="same label on two samples"):
        LabelCost(dup, lb, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        LabelCost(la, lb, -1.0)
    missing = la.clone()
    missing[0, 0] = -1
    with pytest.raises(ValueError, match="no label"):
        ExactW2(n_jobs=1).pair(xa, wa, xb, wb, torch.tensor([0]), torch.tensor([0]),
                               labels=LabelCost(missing, lb, 1.0))
    with pytest.raises(ValueError, match="certify"):
        ExactW2(n_jobs=1, certify=True).nearest(xa, wa, xb, wb, k=1, labels=LabelCost(la, lb, 1.0))
