"""The lower-bound cascade of saeot.transport: every bound <= exact W2^2 (random and adversarial clouds),
the cascade's nearest == brute force, Sinkhorn certification == exact nearest."""

from __future__ import annotations

import math

import pytest
import torch

from saeot import transport as T
from saeot.transport import CASCADES, ExactW2
from saeot.transport._cascade import _Cascade
from saeot.transport._certify import _sinkhorn_bounds

EXACT = ExactW2(n_jobs=1)
PUBLIC = (T.lower_bound_mean, T.lower_bound_mean_spread, T.lower_bound_axis_spread, T.lower_bound_fidelity,
          T.lower_bound_gelbrich, T.lower_bound_max_sliced)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (tests/conftest.py)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_clouds(F, K, r, seed, scale=1.0, shift=0.0):
    g = _gen(seed)
    x = torch.randn(F, K, r, generator=g, dtype=torch.float64) * scale + shift
    w = torch.rand(F, K, generator=g, dtype=torch.float64) + 0.05
    n_valid = torch.randint(1, K + 1, (F,), generator=g)
    w = w * (torch.arange(K)[None, :] < n_valid[:, None])
    return x, w / w.sum(1, keepdim=True)


def adversarial(seed: int):
    """Two sets of 14 features (K=6, r=4) that stress every bound; returns ``xa, wa, xb, wb``."""
    g = _gen(seed)
    K, r = 6, 4
    xa, wa = random_clouds(14, K, r, seed)
    xb, wb = random_clouds(14, K, r, seed + 100, shift=0.2)
    xa[0] = xa[0, :1].expand(K, r)                       # all samples duplicates of one point
    xa[1, :3] = xa[1, 3:]                                # pairwise duplicates
    wa[2] = torch.tensor([1.0, 0, 0, 0, 0, 0])           # a single point
    xa[3, 3:] = float("nan")                             # padding that holds NaN ...
    wa[3, 3:] = 0.0                                      # ... with zero weight
    wa[3] /= wa[3].sum()
    xa[4] *= 1e3                                         # very different scales
    xa[5] *= 1e-4
    xb[6] *= 1e-3
    xb[7], wb[7] = xa[7].clone(), wa[7].clone()          # identical clouds
    t = torch.randn(K, 1, generator=g, dtype=torch.float64)
    xa[8] = t * torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)  # rank-1 cloud
    xb[8] = 0.5 * t * torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    xb[9] = xa[9] + torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)     # a pure translation
    wb[9] = wa[9]
    xa[10] = xa[10] + 1e4                                # a large offset
    xb[10] = xb[10] + 1e4
    wb[11] = 0.0                                         # a dead feature
    xb[12] = xa[12, torch.tensor([5, 4, 3, 2, 1, 0])]    # the same cloud, samples permuted
    wb[12] = wa[12, torch.tensor([5, 4, 3, 2, 1, 0])]
    return xa, wa, xb, wb


def safe_cascade_bounds(xa, wa, xb, wb, bound):
    """``[Fa, Fb]`` the cascade's safe bound (tolerance subtracted), every pair through every stage."""
    c = _Cascade(xa, wa, xb, wb, bound)
    A = c.side_a(slice(0, xa.shape[0]))
    L, tol = c.dense(A)
    ia, ib = torch.isfinite(L).nonzero(as_tuple=True)
    L[ia, ib] = c.refine(A, ia, ib, L[ia, ib], tol[ia, ib], torch.full((len(ia),), math.inf, dtype=torch.float64))
    return L


def _scale(xa, wa, xb, wb):
    """``[Fa, Fb]`` cost of the independent coupling (>= W2^2 and >= every bound)."""
    ma, sa, _ = T.feature_moments(xa, wa)
    mb, sb, _ = T.feature_moments(xb, wb)
    return torch.cdist(ma, mb) ** 2 + sa[:, None] ** 2 + sb[None] ** 2


@pytest.mark.parametrize("seed", [0, 1])
def test_every_bound_is_below_exact_w2_on_adversarial_clouds(seed):
    xa, wa, xb, wb = adversarial(seed)
    D = EXACT.pairwise(xa, wa, xb, wb)
    fin = torch.isfinite(D)
    assert fin.sum() == 14 * 13
    slack = 1e-9 * _scale(xa, wa, xb, wb)
    for fn in PUBLIC:
        L = fn(xa, wa, xb, wb)
        assert torch.isinf(L[~fin]).all(), fn.__name__
        assert not torch.isnan(L[fin]).any(), fn.__name__
        assert (L[fin] <= D[fin] + slack[fin]).all(), fn.__name__
    for bound in CASCADES:
        L = safe_cascade_bounds(xa, wa, xb, wb, bound)
        assert (L[fin] <= D[fin]).all(), bound  # the safe bound never exceeds the computed exact cost
        assert (L[fin] >= 0).all() and torch.isinf(L[~fin]).all(), bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_bound_is_below_exact_w2_on_random_clouds_and_the_cascade_only_grows(seed):
    xa, wa = random_clouds(9, 7, 3, seed)
    xb, wb = random_clouds(11, 5, 3, seed + 50, scale=1.5, shift=0.3)
    D = EXACT.pairwise(xa, wa, xb, wb)
    slack = 1e-9 * _scale(xa, wa, xb, wb)
    val = {fn.__name__: fn(xa, wa, xb, wb) for fn in PUBLIC}
    for name, L in val.items():
        assert (L <= D + slack).all(), name
    tight = lambda a, b: (val[a] <= val[b] + slack).all()
    assert tight("lower_bound_mean", "lower_bound_mean_spread")
    assert tight("lower_bound_mean_spread", "lower_bound_fidelity")
    assert tight("lower_bound_fidelity", "lower_bound_gelbrich")
    assert tight("lower_bound_mean_spread", "lower_bound_max_sliced")
    assert (val["lower_bound_gelbrich"] > val["lower_bound_fidelity"] + 1e-6).any()  # the SVD stage adds something
    safe = {b: safe_cascade_bounds(xa, wa, xb, wb, b) for b in ("mean_spread", "fidelity", "gelbrich", "max_sliced")}
    assert (safe["mean_spread"] <= safe["fidelity"]).all() and (safe["fidelity"] <= safe["gelbrich"]).all()
    assert (safe["gelbrich"] <= safe["max_sliced"]).all() and (safe["max_sliced"] <= D).all()


def test_bounds_that_are_exact():
    # a translated copy: W2^2 = ||shift||^2 and Bures(S, S) = 0, so Gelbrich is exact
    xa, wa = random_clouds(4, 6, 3, 7)
    xb = xa + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    D = EXACT.pair(xa, wa, xb, wa, torch.arange(4), torch.arange(4))
    G = T.lower_bound_gelbrich(xa, wa, xb, wa).diagonal()
    torch.testing.assert_close(G, D, rtol=1e-9, atol=1e-9)
    # in one dimension the frame covers the whole space: the max-sliced bound is exact
    x1, a1 = random_clouds(5, 7, 1, 8)
    y1, b1 = random_clouds(6, 4, 1, 9, shift=0.4)
    torch.testing.assert_close(T.lower_bound_max_sliced(x1, a1, y1, b1), EXACT.pairwise(x1, a1, y1, b1),
                               rtol=1e-9, atol=1e-12)
    # and Gelbrich reduces to mean + spread there (1x1 covariances commute)
    torch.testing.assert_close(T.lower_bound_gelbrich(x1, a1, y1, b1), T.lower_bound_mean_spread(x1, a1, y1, b1),
                               rtol=1e-9, atol=1e-12)
    # Diracs: every bound is the squared distance
    one = torch.ones(5, 1, dtype=torch.float64)
    xd, yd = torch.randn(5, 1, 3, generator=_gen(3), dtype=torch.float64), torch.randn(5, 1, 3, generator=_gen(4),
                                                                                        dtype=torch.float64)
    Dd = EXACT.pairwise(xd, one, yd, one)
    for fn in PUBLIC:
        torch.testing.assert_close(fn(xd, one, yd, one), Dd, rtol=1e-9, atol=1e-9)


def test_orientation_separates_what_means_and_spreads_cannot():
    # same means and spreads, orthogonal covariances: only the Gelbrich / fidelity terms see it
    t = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    xa = (t * torch.tensor([1.0, 0.0], dtype=torch.float64)).unsqueeze(0)
    xb = (t * torch.tensor([0.0, 1.0], dtype=torch.float64)).unsqueeze(0)
    w = torch.full((1, 8), 1 / 8, dtype=torch.float64)
    D = EXACT.pairwise(xa, w, xb, w)
    assert T.lower_bound_mean_spread(xa, w, xb, w).abs().max() < 1e-12
    # (the fidelity bound adds the rounding bound of its GEMM under a square root: ~1e-8 relative)
    torch.testing.assert_close(T.lower_bound_fidelity(xa, w, xb, w), D, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(T.lower_bound_gelbrich(xa, w, xb, w), D, rtol=1e-9, atol=1e-12)


def families(Fa, Fb, K, r, seed, spread=1.0, noise=0.3):
    g = _gen(seed)
    centres = torch.randn(max(2, Fa // 4), r, generator=g, dtype=torch.float64) * 2
    fam = torch.randint(len(centres), (Fa,), generator=g)
    xa = centres[fam][:, None, :] + spread * torch.randn(Fa, K, r, generator=g, dtype=torch.float64)
    wa = torch.rand(Fa, K, generator=g, dtype=torch.float64) ** 2 + 0.01
    src = torch.randint(Fa, (Fb,), generator=g)
    xb = xa[src] + noise * torch.randn(Fb, K, r, generator=g, dtype=torch.float64)
    wb = wa[src] * (0.5 + torch.rand(Fb, K, generator=g, dtype=torch.float64))
    wa[:, -1] = 0.0
    return xa, wa / wa.sum(1, keepdim=True), xb, wb / wb.sum(1, keepdim=True)


def brute(D, k):
    v, i = D.sort(dim=1, stable=True)
    v, i = v[:, :k], i[:, :k]
    return v, torch.where(torch.isfinite(v), i, torch.full_like(i, -1))


@pytest.mark.parametrize("bound", list(CASCADES))
def test_cascade_nearest_equals_brute_force(bound):
    xa, wa, xb, wb = families(16, 30, 6, 3, 3)
    xb[5], wb[5] = xb[4], wb[4]          # exact duplicates: ties go to the smaller index
    xb[7], wb[7] = xb[6] + 1e-9, wb[6]   # near-ties
    wb[1] = 0.0                          # a dead feature of B
    wa[2] = 0.0                          # a dead feature of A
    D = EXACT.pairwise(xa, wa, xb, wb)
    for k in (1, 3):
        ref_c, ref_i = brute(D, k)
        res = ExactW2(n_jobs=2, bound=bound).nearest(xa, wa, xb, wb, k=k, chunk=5)
        assert torch.equal(res.index, ref_i), (bound, k)
        torch.testing.assert_close(res.cost, ref_c, rtol=0, atol=0)
        assert res.bound == bound and res.n_rows == 15 and res.n_pairs == 15 * 29
    assert res.n_solved == res.n_pairs if bound == "none" else res.n_solved < 0.8 * res.n_pairs


def test_tighter_cascades_solve_fewer_pairs_on_oriented_clouds():
    # features that differ mostly by the orientation of their covariance
    g = _gen(11)
    F, K, r = 40, 10, 6
    frames = torch.linalg.qr(torch.randn(F, r, r, generator=g, dtype=torch.float64))[0][:, :, :2]
    coef = torch.randn(F, K, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.3], dtype=torch.float64)
    xa = coef @ frames.transpose(1, 2)
    xa = xa - xa.mean(1, keepdim=True)
    xa = xa / xa.pow(2).sum((1, 2), keepdim=True).div(K).sqrt()  # same mean and spread everywhere
    xb = xa + 0.05 * torch.randn(F, K, r, generator=g, dtype=torch.float64)
    w = torch.full((F, K), 1 / K, dtype=torch.float64)
    solved = {}
    D = EXACT.pairwise(xa, w, xb, w)
    for bound in ("mean_spread", "fidelity", "gelbrich"):
        res = EXACT.nearest(xa, w, xb, w, k=1, bound=bound)
        assert torch.equal(res.index, brute(D, 1)[1])
        solved[bound] = res.n_solved
    assert solved["gelbrich"] <= solved["fidelity"] < solved["mean_spread"]
    assert solved["gelbrich"] < 0.2 * solved["mean_spread"]


def test_float32_offset_data_keeps_the_brute_force_nearest():
    # hidden states share a large offset: rounding must never prune a true neighbour
    xa, wa, xb, wb = families(12, 20, 5, 3, 5, noise=1e-3)
    xa, xb = (xa + 2000.0).float(), (xb + 2000.0).float()
    wa, wb = wa.float(), wb.float()
    D = EXACT.pairwise(xa, wa, xb, wb)
    for bound in ("fidelity", "gelbrich", "max_sliced"):
        res = EXACT.nearest(xa, wa, xb, wb, k=2, bound=bound)
        ref_c, ref_i = brute(D, 2)
        assert torch.equal(res.index, ref_i) and torch.equal(res.cost, ref_c)


def test_sinkhorn_bounds_bracket_the_exact_cost():
    xa, wa = random_clouds(12, 6, 3, 20)
    xb, wb = random_clouds(12, 5, 3, 21, shift=0.5)
    keep = (wa.sum(1) > 0) & (wb.sum(1) > 0)
    exact = EXACT.pair(xa, wa, xb, wb, torch.arange(12), torch.arange(12))
    for reg, n_iter in ((0.5, 5), (1e-3, 1000)):  # unconverged or converged: both bounds stay valid
        up, lo = _sinkhorn_bounds(xa, wa, xb, wb, reg, n_iter)
        assert (lo[keep] <= exact[keep] + 1e-12).all() and (up[keep] >= exact[keep] - 1e-12).all()
    assert ((up - lo)[keep] / exact[keep]).median() < 0.005  # tight once converged with a small epsilon
    x32 = (xa.float(), wa.float(), xb.float(), wb.float())
    exact32 = EXACT.pair(*x32, torch.arange(12), torch.arange(12))  # of the float32 clouds, as the solver sees them
    up32, lo32 = _sinkhorn_bounds(*x32, 1e-3, 500, dtype=torch.float32)
    assert (lo32[keep] <= exact32[keep] + 1e-12).all() and (up32[keep] >= exact32[keep] - 1e-12).all()


@pytest.mark.parametrize("bound", ["mean_spread", "gelbrich"])
def test_certified_nearest_equals_exact_nearest(bound):
    xa, wa, xb, wb = families(20, 24, 6, 3, 8, spread=0.5, noise=0.05)
    xb[3], wb[3] = xb[2], wb[2]  # a duplicate: a tie that cannot be certified, still exact
    D = EXACT.pairwise(xa, wa, xb, wb)
    for k in (1, 2):
        solver = ExactW2(n_jobs=1, bound=bound, certify=True, certify_candidates=4)
        res = solver.nearest(xa, wa, xb, wb, k=k, chunk=7)
        ref_c, ref_i = brute(D, k)
        assert torch.equal(res.index, ref_i) and torch.equal(res.cost, ref_c)
        assert res.certified_fraction > 0.3, res.certified_fraction
        plain = ExactW2(n_jobs=1, bound=bound).nearest(xa, wa, xb, wb, k=k)
        assert plain.certified_fraction == 0.0 and res.n_solved <= plain.n_solved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cascade_and_certification_on_cuda():  # pragma: no cover - CPU CI
    xa, wa, xb, wb = families(20, 24, 6, 3, 8, spread=0.5, noise=0.05)
    ref_c, ref_i = brute(EXACT.pairwise(xa, wa, xb, wb), 2)
    cuda = [t.cuda() for t in (xa, wa, xb, wb)]
    for solver in (ExactW2(bound="gelbrich"), ExactW2(bound="max_sliced", certify=True)):
        res = solver.nearest(*cuda, k=2)
        assert res.index.is_cuda
        assert torch.equal(res.index.cpu(), ref_i) and torch.equal(res.cost.cpu(), ref_c)
    for fn in PUBLIC:
        torch.testing.assert_close(fn(*cuda).cpu(), fn(xa, wa, xb, wb), rtol=1e-9, atol=1e-9)
