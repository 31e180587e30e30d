"""saeot.transport: exact / Sinkhorn / sliced W2^2 solvers, lower bounds and exact pruned nearest neighbours."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hydra.utils import instantiate

from saeot import transport as T
from saeot.transport import ExactW2, SinkhornW2, SlicedW2

EXACT = ExactW2()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (tests/conftest.py)


def clouds(F, K, r, seed, pad=True, shift=0.0, dtype=torch.float64, uniform=False):
    """Random weighted clouds ``[F, K, r]``, ``[F, K]`` with non-uniform weights and padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(F, K, r, generator=g, dtype=torch.float64) + shift
    w = torch.ones(F, K, dtype=torch.float64) if uniform else torch.rand(F, K, generator=g, dtype=torch.float64) + 0.05
    if pad:
        n_valid = torch.randint(1, K + 1, (F,), generator=g)
        w = w * (torch.arange(K)[None, :] < n_valid[:, None])
        x = x.masked_fill((w == 0).unsqueeze(-1), 0.0)
    w = w / w.sum(1, keepdim=True)
    return x.to(dtype), w.to(dtype)


def families(Fa, Fb, K, r, seed, dtype=torch.float64):
    """Clustered clouds: B holds noisy copies of A's features (so nearest neighbours are meaningful)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, Fa // 4), r, generator=g, dtype=torch.float64) * 2
    fam = torch.randint(len(centres), (Fa,), generator=g)
    xa = centres[fam][:, None, :] + torch.randn(Fa, K, r, generator=g, dtype=torch.float64)
    wa = torch.rand(Fa, K, generator=g, dtype=torch.float64) ** 2 + 0.01
    src = torch.randint(Fa, (Fb,), generator=g)
    xb = xa[src] + 0.3 * torch.randn(Fb, K, r, generator=g, dtype=torch.float64)
    wb = wa[src] * (0.5 + torch.rand(Fb, K, generator=g, dtype=torch.float64))
    wa[:, -1] = 0.0  # some padding
    return xa.to(dtype), wa / wa.sum(1, keepdim=True), xb.to(dtype), wb / wb.sum(1, keepdim=True)


def pot_w2(x, a, y, b):
    x, a, y, b = (t.double().numpy() for t in (x, a, y, b))
    return ot.emd2(a / a.sum(), b / b.sum(), ot.dist(x, y))


def brute(D, k):
    v, i = D.sort(dim=1, stable=True)
    v, i = v[:, :k], i[:, :k]
    return v, torch.where(torch.isfinite(v), i, torch.full_like(i, -1))


# ----------------------------------------------------------------------------- cost and exact
def test_cost_matrices_match_ot_dist_and_batch():
    x, _ = clouds(3, 5, 4, 0, pad=False)
    y, _ = clouds(3, 7, 4, 1, pad=False)
    C = T.cost_matrices(x, y)
    assert C.shape == (3, 5, 7)
    for i in range(3):
        np.testing.assert_allclose(C[i].numpy(), ot.dist(x[i].numpy(), y[i].numpy()), rtol=1e-12, atol=1e-12)
    assert (C >= 0).all()
    with pytest.raises(ValueError, match="leading dims"):
        T.cost_matrices(x, y[:2])


def test_exact_pair_and_pairwise_match_ot_emd2_with_padding():
    xa, wa = clouds(7, 9, 3, 0)
    xb, wb = clouds(8, 6, 3, 1, shift=0.5)
    assert (wa == 0).any() and (wb == 0).any()
    D = EXACT.pairwise(xa, wa, xb, wb)
    assert D.shape == (7, 8) and D.dtype == torch.float64
    for i in range(7):
        for j in range(8):
            ref = pot_w2(xa[i], wa[i], xb[j], wb[j])
            assert abs(T.w2_exact_pair(xa[i], wa[i], xb[j], wb[j]) - ref) < 1e-6
            assert abs(D[i, j].item() - ref) < 1e-6
    ia = torch.tensor([0, 6, 3, 3])
    ib = torch.tensor([7, 0, 2, 2])
    torch.testing.assert_close(EXACT.pair(xa, wa, xb, wb, ia, ib), D[ia, ib], rtol=0, atol=0)
    # more threads, same numbers
    torch.testing.assert_close(ExactW2(n_jobs=2).pairwise(xa, wa, xb, wb), D, rtol=0, atol=0)


def test_exact_accepts_float32_and_unnormalised_weights():
    xa, wa = clouds(4, 6, 3, 2, dtype=torch.float32)
    xb, wb = clouds(5, 6, 3, 3, dtype=torch.float32)
    D32 = EXACT.pairwise(xa, wa * 3.0, xb, wb * 0.5)
    D64 = EXACT.pairwise(xa.double(), wa.double(), xb.double(), wb.double())
    torch.testing.assert_close(D32, D64, rtol=1e-5, atol=1e-6)
    assert D32.dtype == torch.float64


def test_dead_features():
    xa, wa = clouds(4, 5, 2, 4)
    xb, wb = clouds(5, 5, 2, 5)
    wa[1] = 0
    wb[2] = 0
    D = EXACT.pairwise(xa, wa, xb, wb)
    assert torch.isinf(D[1]).all() and torch.isinf(D[:, 2]).all()
    assert torch.isfinite(D[[0, 2, 3]][:, [0, 1, 3, 4]]).all()
    assert math.isinf(T.w2_exact_pair(xa[1], wa[1], xb[0], wb[0]))
    for solver in (SinkhornW2(), SlicedW2()):
        S = solver.pairwise(xa, wa, xb, wb)
        assert torch.isinf(S[1]).all() and torch.isinf(S[:, 2]).all() and torch.isfinite(S[0, 0])
    for solver in (ExactW2(), SinkhornW2(), SlicedW2()):
        res = solver.nearest(xa, wa, xb, wb, k=5)
        assert (res.index[1] == -1).all() and torch.isinf(res.cost[1]).all()
        assert not (res.index == 2).any()
        # 4 alive features in B: the 5th slot is padding
        assert (res.index[[0, 2, 3], 4] == -1).all() and (res.index[[0, 2, 3], :4] >= 0).all()
        assert res.n_pairs == 3 * 4
    for fn in (T.lower_bound_mean, T.lower_bound_mean_spread):
        L = fn(xa, wa, xb, wb)
        assert torch.isinf(L[1]).all() and torch.isinf(L[:, 2]).all()


# ----------------------------------------------------------------------------- sinkhorn
def test_sinkhorn_approaches_exact_as_reg_shrinks():
    xa, wa = clouds(6, 6, 2, 6)
    xb, wb = clouds(6, 5, 2, 7, shift=0.3)
    exact = EXACT.pair(xa, wa, xb, wb, torch.arange(6), torch.arange(6))
    errs = []
    for reg in (0.3, 0.1, 0.03, 0.01):
        s = T.w2_sinkhorn(xa, wa, xb, wb, reg=reg, n_iter=20000, tol=1e-10)
        assert (s >= exact - 1e-8).all(), "the rounded Sinkhorn plan is feasible, its cost cannot be below W2^2"
        errs.append((s - exact).abs())
    for e0, e1 in zip(errs, errs[1:]):
        assert (e1 <= e0 + 1e-9).all()
    assert (errs[-1] / exact).max() < 0.01
    assert (errs[0] / exact).max() > 0.02  # the test would notice if reg were ignored


def test_sinkhorn_debiased():
    xa, wa = clouds(4, 6, 2, 8)
    xb, wb = clouds(4, 6, 2, 9, shift=1.0)
    exact = EXACT.pair(xa, wa, xb, wb, torch.arange(4), torch.arange(4))
    s = T.w2_sinkhorn(xa, wa, xb, wb, reg=0.01, n_iter=2000, tol=1e-8, debiased=True)
    assert ((s - exact).abs() / exact).max() < 0.02
    same = T.w2_sinkhorn(xa, wa, xa, wa, reg=0.1, debiased=True)
    assert same.abs().max() < 1e-6
    mean_gap = T.lower_bound_mean(xa, wa, xb, wb).diagonal()
    big = T.w2_sinkhorn(xa, wa, xb, wb, reg=10.0, debiased=True)
    assert (big >= mean_gap - 1e-6).all()


def test_sinkhorn_padding_is_ignored_and_float32_works():
    x, a = clouds(3, 6, 3, 10, pad=False)
    y, b = clouds(3, 4, 3, 11, pad=False)
    ref = T.w2_sinkhorn(x, a, y, b, reg=0.05)
    # pad y with garbage points of zero weight
    yp = torch.cat([y, torch.full((3, 3, 3), 100.0, dtype=y.dtype)], 1)
    bp = torch.cat([b, torch.zeros(3, 3, dtype=b.dtype)], 1)
    torch.testing.assert_close(T.w2_sinkhorn(x, a, yp, bp, reg=0.05), ref, rtol=1e-9, atol=1e-9)
    s32 = T.w2_sinkhorn(x.float(), a.float(), y.float(), b.float(), reg=0.05)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), ref, rtol=1e-3, atol=1e-4)
    abs_reg = T.w2_sinkhorn(x, a, y, b, reg=0.05, reg_mode="absolute")
    assert torch.isfinite(abs_reg).all()


def test_float32_solvers_survive_a_large_common_offset():
    # hidden states often share a large mean direction; W2 is translation invariant
    x, a = clouds(4, 6, 3, 20, pad=False)
    y, b = clouds(4, 5, 3, 21, pad=False, shift=0.5)
    off = 3000.0
    ref = T.w2_sinkhorn(x, a, y, b, reg=0.05)
    got = T.w2_sinkhorn((x + off).float(), a.float(), (y + off).float(), b.float(), reg=0.05)
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)
    ref = T.w2_sliced(x, a, y, b, n_projections=6)
    got = T.w2_sliced((x + off).float(), a.float(), (y + off).float(), b.float(), n_projections=6)
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sinkhorn_and_sliced_on_cuda():  # pragma: no cover - CPU CI
    x, a = clouds(5, 6, 3, 12, dtype=torch.float32)
    y, b = clouds(5, 6, 3, 13, dtype=torch.float32)
    for fn in (lambda *t: T.w2_sinkhorn(*t, reg=0.05), lambda *t: T.w2_sliced(*t, n_projections=6)):
        cpu = fn(x, a, y, b)
        gpu = fn(x.cuda(), a.cuda(), y.cuda(), b.cuda())
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    res = SinkhornW2().nearest(x.cuda(), a.cuda(), y.cuda(), b.cuda(), k=2)
    assert res.index.is_cuda


# ----------------------------------------------------------------------------- sliced
def test_sliced_below_exact_and_exact_in_1d():
    xa, wa = clouds(6, 7, 3, 14)
    xb, wb = clouds(6, 5, 3, 15, shift=0.4)
    exact = EXACT.pair(xa, wa, xb, wb, torch.arange(6), torch.arange(6))
    for n in (3, 30):  # whole orthonormal frames: SW <= W2^2 deterministically
        sw = T.w2_sliced(xa, wa, xb, wb, n_projections=n, seed=1)
        assert (sw <= exact + 1e-9).all()
        assert (sw > 0.2 * exact).all()
    x1, a1 = clouds(5, 8, 1, 16)
    y1, b1 = clouds(5, 6, 1, 17, shift=0.2)
    sw1 = T.w2_sliced(x1, a1, y1, b1, n_projections=1)
    ex1 = EXACT.pair(x1, a1, y1, b1, torch.arange(5), torch.arange(5))
    torch.testing.assert_close(sw1, ex1, rtol=1e-9, atol=1e-12)


def test_sliced_matches_pot_with_same_directions():
    xa, wa = clouds(3, 7, 4, 18)
    xb, wb = clouds(3, 6, 4, 19, shift=0.3)
    n = 10
    theta = T.sliced_directions(4, n, seed=3, dtype=torch.float64)
    assert theta.shape == (n, 4)
    torch.testing.assert_close(theta[:4] @ theta[:4].T, torch.eye(4, dtype=torch.float64))  # a whole frame
    sw = T.w2_sliced(xa, wa, xb, wb, n_projections=n, seed=3)
    for i in range(3):
        keep_a, keep_b = wa[i] > 0, wb[i] > 0
        pot = ot.sliced_wasserstein_distance(
            xa[i][keep_a].numpy(), xb[i][keep_b].numpy(), wa[i][keep_a].numpy(), wb[i][keep_b].numpy(),
            projections=theta.T.numpy(), p=2,
        )
        assert abs(sw[i].item() - 4 * pot**2) < 1e-8


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("seed", [0, 1])
def test_lower_bounds_below_exact_and_ordered(seed):
    xa, wa = clouds(9, 7, 3, 20 + seed)
    xb, wb = clouds(11, 5, 3, 30 + seed, shift=0.3)
    xb[0] = xa[0, :5] * 2.0  # a pair with a large spread difference
    wb[0] = wa[0, :5] / wa[0, :5].sum()
    D = EXACT.pairwise(xa, wa, xb, wb)
    Lm = T.lower_bound_mean(xa, wa, xb, wb, chunk=4)
    Ls = T.lower_bound_mean_spread(xa, wa, xb, wb, chunk=4)
    Lx = T.lower_bound_axis_spread(xa, wa, xb, wb, chunk=4)
    fin = torch.isfinite(D)
    assert (Lm[fin] <= Ls[fin] + 1e-12).all()
    assert (Ls[fin] <= Lx[fin] + 1e-12).all()
    assert (Lx[fin] <= D[fin] + 1e-9).all()
    assert (Ls > Lm + 1e-3).any()  # the spread term matters somewhere
    # exact for Diracs: W2^2 = ||ma - mb||^2
    one_a, one_b = torch.ones(9, 1, dtype=torch.float64), torch.ones(11, 1, dtype=torch.float64)
    d1 = T.lower_bound_mean_spread(xa[:, :1], one_a, xb[:, :1], one_b)
    D1 = EXACT.pairwise(xa[:, :1], one_a, xb[:, :1], one_b)
    torch.testing.assert_close(d1, D1, rtol=1e-9, atol=1e-9)
    Lsl = T.lower_bound_sliced(xa, wa, xb, wb, n_projections=5, seed=2)
    SW = SlicedW2(n_projections=5, seed=2).pairwise(xa, wa, xb, wb)
    assert (Lsl[fin] <= SW[fin] + 1e-9).all()


# ----------------------------------------------------------------------------- nearest
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bound", ["mean", "mean_spread", "axis_spread"])
def test_pruned_nearest_equals_brute_force(seed, bound):
    xa, wa, xb, wb = families(14, 18, 6, 3, seed)
    # exact duplicates and near-ties in B
    xb[5], wb[5] = xb[4], wb[4]
    xb[7], wb[7] = xb[6] + 1e-7, wb[6]
    xb[1] = 0  # plus a dead one
    wb[1] = 0
    D = EXACT.pairwise(xa, wa, xb, wb)
    for k in (1, 3):
        ref_c, ref_i = brute(D, k)
        res = EXACT.nearest(xa, wa, xb, wb, k=k, bound=bound, chunk=5)
        assert torch.equal(res.index, ref_i)
        torch.testing.assert_close(res.cost, ref_c, rtol=0, atol=0)
        assert res.n_solved <= res.n_pairs
    # the structure is clustered, so pruning must skip pairs
    assert EXACT.nearest(xa, wa, xb, wb, k=1, bound=bound).n_solved < 0.6 * res.n_pairs
    # and POT agrees on the neighbour's cost
    for i in range(0, 14, 5):
        j = int(res.index[i, 0])
        assert abs(pot_w2(xa[i], wa[i], xb[j], wb[j]) - res.cost[i, 0].item()) < 1e-9


@pytest.mark.parametrize("solver,k", [(ExactW2(), 4), (SlicedW2(n_projections=3), 70)])
def test_pruned_nearest_long_candidate_lists(solver, k):
    # unstructured clouds (exact) or a large k (sliced): rows outgrow the first short candidate list
    xa, wa = clouds(5, 5, 3, 40)
    xb, wb = clouds(150, 5, 3, 41)
    D = solver.pairwise(xa, wa, xb, wb)
    ref_c, ref_i = brute(D, k)
    res = solver.nearest(xa, wa, xb, wb, k=k, bound="mean")
    assert res.n_solved > 5 * 64  # the extension path ran
    assert torch.equal(res.index, ref_i)
    torch.testing.assert_close(res.cost, ref_c, rtol=0, atol=0)


def test_pruned_nearest_with_many_exact_ties():
    # B is four copies of the same three features: every row has exact ties; ties go to the smallest index
    xa, wa, xb, wb = families(6, 3, 5, 2, 5)
    xb, wb = xb.repeat(4, 1, 1), wb.repeat(4, 1)
    D = EXACT.pairwise(xa, wa, xb, wb)
    ref_c, ref_i = brute(D, 4)
    for solver_bound in ("mean_spread", "none"):
        res = ExactW2(n_jobs=2).nearest(xa, wa, xb, wb, k=4, bound=solver_bound)
        assert torch.equal(res.index, ref_i)
        torch.testing.assert_close(res.cost, ref_c, rtol=0, atol=0)


def test_self_match_has_zero_cost():
    xa, wa, _, _ = families(12, 2, 7, 4, 6)
    for solver in (ExactW2(), SinkhornW2(debiased=True, reg=0.1), SlicedW2(n_projections=8)):
        res = solver.nearest(xa, wa, xa, wa, k=2)
        assert torch.equal(res.index[:, 0], torch.arange(12)), solver
        assert res.cost[:, 0].abs().max() < 1e-6, solver
        assert (res.cost[:, 1] > 1e-3).all(), solver
    res = SinkhornW2(reg=0.01).nearest(xa, wa, xa, wa, k=1)
    assert torch.equal(res.index[:, 0], torch.arange(12))


@pytest.mark.parametrize("solver,expected_bound", [
    (SinkhornW2(reg=0.1, n_iter=200, batch_size=7), "mean_spread"),
    (SinkhornW2(reg=0.1, n_iter=200, debiased=True, batch_size=7), "mean"),
    (SlicedW2(n_projections=5, seed=3, batch_size=7), "sliced"),  # not a multiple of r: pruning must still be exact
])
def test_pruned_nearest_equals_brute_force_batched_solvers(solver, expected_bound):
    xa, wa, xb, wb = families(10, 40, 6, 3, 7, dtype=torch.float32)
    D = solver.pairwise(xa, wa, xb, wb)
    ref_c, ref_i = brute(D, 3)
    res = solver.nearest(xa, wa, xb, wb, k=3, chunk=4)
    assert torch.equal(res.index, ref_i)
    torch.testing.assert_close(res.cost, ref_c, rtol=1e-6, atol=1e-6)
    assert res.n_solved < res.n_pairs
    assert res.bound == expected_bound


def test_float32_nearest_matches_float64():
    xa, wa, xb, wb = families(8, 10, 5, 3, 8)
    r64 = EXACT.nearest(xa, wa, xb, wb, k=2)
    r32 = EXACT.nearest(xa.float(), wa.float(), xb.float(), wb.float(), k=2)
    assert torch.equal(r32.index, r64.index)
    torch.testing.assert_close(r32.cost, r64.cost, rtol=1e-5, atol=1e-6)


def test_progress_bar_runs(capsys):
    """``progress=True`` draws a bar on stderr that reaches its total, and changes no result."""
    xa, wa, xb, wb = families(5, 6, 4, 2, 9)
    sliced = SlicedW2()
    near = EXACT.nearest(xa, wa, xb, wb, k=1, progress=True)
    cost = sliced.pairwise(xa, wa, xb, wb, progress=True)
    err = capsys.readouterr().err
    assert "W2 exact nearest" in err and "5/5" in err  # one step per row of A
    assert f"W2 {sliced.name} all pairs" in err and "30/30" in err  # one per pair
    quiet = EXACT.nearest(xa, wa, xb, wb, k=1)
    assert torch.equal(near.index, quiet.index) and torch.equal(near.cost, quiet.cost)
    assert torch.equal(near.index[:, 0], EXACT.pairwise(xa, wa, xb, wb).argmin(1))
    assert torch.equal(cost, sliced.pairwise(xa, wa, xb, wb))
    assert capsys.readouterr().err == ""  # and without it, nothing


# ----------------------------------------------------------------------------- validation
def test_shape_and_option_errors_are_clear():
    xa, wa = clouds(3, 4, 2, 0)
    xb, wb = clouds(5, 6, 3, 1)
    with pytest.raises(ValueError, match=r"different spaces: r=2 vs r=3"):
        EXACT.nearest(xa, wa, xb, wb)
    with pytest.raises(ValueError, match=r"xa must have shape \[F, K, r\]"):
        EXACT.pairwise(xa[0], wa, xa, wa)
    with pytest.raises(ValueError, match=r"wb \(3, 3\) must match"):
        EXACT.pairwise(xa, wa, xa, wa[:, :3])
    with pytest.raises(ValueError, match="non-negative"):
        T.lower_bound_mean(xa, -wa, xa, wa)
    with pytest.raises(ValueError, match="transport bound must be one of"):
        EXACT.nearest(xa, wa, xa, wa, bound="tight")
    with pytest.raises(ValueError, match="transport bound 'sliced' only bounds the sliced solver"):
        SinkhornW2().nearest(xa, wa, xa, wa, bound="sliced")
    with pytest.raises(ValueError, match="runs in ExactW2's cascade"):
        SinkhornW2().nearest(xa, wa, xa, wa, bound="gelbrich")
    with pytest.raises(ValueError, match="transport exact bound must be one of"):
        ExactW2(bound="tight")
    with pytest.raises(ValueError, match="certify_reg must be > 0"):
        ExactW2(certify_reg=0.0)
    assert EXACT.nearest(xa, wa, xa, wa).bound == ExactW2().bound == "fidelity"  # the solver's setting
    with pytest.raises(ValueError, match="no broadcasting"):
        T.w2_sinkhorn(xa, wa, xa[:2], wa[:2])
    with pytest.raises(ValueError, match="reg must be > 0"):
        T.w2_sinkhorn(xa, wa, xa, wa, reg=0.0)
    with pytest.raises(ValueError, match="reg must be > 0"):
        SinkhornW2(reg=0.0)  # settings are checked when the solver is built, before any work
    with pytest.raises(ValueError, match="reg_mode must be"):
        SinkhornW2(reg_mode="scaled")
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        ExactW2(n_jobs=0)
    with pytest.raises(ValueError, match="n_projections must be >= 1"):
        SlicedW2(n_projections=0)
    with pytest.raises(TypeError, match="reg"):
        ExactW2(reg=0.1)
    with pytest.raises(TypeError, match="n_projections"):
        SinkhornW2(n_projections=4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        EXACT.nearest(xa, wa, xa, wa, k=0)
    with pytest.raises(ValueError, match="ia out of range"):
        EXACT.pair(xa, wa, xa, wa, torch.tensor([3]), torch.tensor([0]))
    bad = xa.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        EXACT.pairwise(bad, wa, xa, wa)
    with pytest.raises(ValueError, match="w2_exact_pair: shapes disagree"):
        T.w2_exact_pair(xa[0], wa[0, :3], xa[1], wa[1])


# ----------------------------------------------------------------------------- solvers from config
@pytest.mark.parametrize("option,cls", [("exact", ExactW2), ("sinkhorn", SinkhornW2), ("sliced", SlicedW2)])
def test_transport_config_builds_its_solver_and_the_matcher_gets_it(option, cls, compose_cfg):
    cfg = compose_cfg(f"transport={option}")
    solver = instantiate(cfg.transport)
    assert type(solver) is cls
    assert instantiate(cfg.matcher).cfg.solver == solver  # matcher.solver: ${transport}
    # every setting of the yaml reaches the object
    for key, value in cfg.transport.items():
        if key != "_target_":
            assert getattr(solver, key) == value, key


def test_benchmark_experiment_composes_the_exact_solver(compose_cfg):
    cfg = compose_cfg("experiment=synthetic_benchmark", config_name="evaluate")
    assert instantiate(cfg.transport) == ExactW2()
    assert instantiate(cfg.matchers.semantic_ot, progress=False).cfg.solver == ExactW2()


@pytest.mark.parametrize("option", ["exact", "sinkhorn", "sliced"])
def test_solver_objects_equal_the_functional_solvers(option, compose_cfg):
    """``solver.pair`` / ``pairwise`` / ``nearest`` give the values of ``w2_exact_pair``,
    ``w2_sinkhorn`` and ``w2_sliced`` with the same settings, for the configured solvers."""
    solver = instantiate(compose_cfg(f"transport={option}").transport)
    xa, wa, xb, wb = families(6, 7, 5, 3, 11)
    wb[2] = 0  # a dead feature
    ia = torch.tensor([0, 5, 3, 3, 1, 2])
    ib = torch.tensor([6, 0, 2, 4, 1, 2])
    if isinstance(solver, ExactW2):
        ref = torch.tensor([T.w2_exact_pair(xa[i], wa[i], xb[j], wb[j], num_itermax=solver.num_itermax)
                            for i, j in zip(ia.tolist(), ib.tolist())], dtype=torch.float64)
    elif isinstance(solver, SinkhornW2):
        ref = T.w2_sinkhorn(xa[ia], wa[ia], xb[ib], wb[ib], reg=solver.reg, n_iter=solver.n_iter, tol=solver.tol,
                            debiased=solver.debiased, reg_mode=solver.reg_mode, anneal=solver.anneal,
                            check_every=solver.check_every)
    else:
        ref = T.w2_sliced(xa[ia], wa[ia], xb[ib], wb[ib], n_projections=solver.n_projections, seed=solver.seed)
    got = solver.pair(xa, wa, xb, wb, ia, ib)
    assert got.dtype == torch.float64 and torch.isinf(got[[2, 5]]).all() and torch.isfinite(got[[0, 1, 3, 4]]).all()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    D = solver.pairwise(xa, wa, xb, wb)
    torch.testing.assert_close(D[ia, ib], got, rtol=0, atol=0)
    res = solver.nearest(xa, wa, xb, wb, k=2)
    ref_c, ref_i = brute(D, 2)
    assert torch.equal(res.index, ref_i)
    torch.testing.assert_close(res.cost, ref_c, rtol=0, atol=0)
