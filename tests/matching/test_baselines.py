"""Baseline matchers (SAE Match, feature flow, activation correlation) and assignment.

The null of :class:`Matcher` draws random pairs, of which about ``1 / F_b`` are true
matches; the tests use enough features (``1 / F_b`` well below ``null_quantile``)
for the null quantile to sit among unrelated pairs, as it does for real SAEs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from saeot.matching.assignment import (
    assignment_cost,
    compose_matches,
    linear_assignment_dense,
    linear_assignment_sparse,
)
from saeot.matching.base import MatchContext
from saeot.matching.activation_correlation import ActivationCorrelation
from saeot.profiling import CorrelationAccumulator
from saeot.matching.feature_flow import FeatureFlow
from saeot.matching.sae_match import SAEMatch
from saeot.saes import fold_sae, fold_scale, fold_threshold
from saeot.hooks import hooks_between, sort_hooks_by_layer

D_IN, D_SAE = 16, 256
H = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


# ---------------------------------------------------------------------------- helpers
def _set(sae, **params):
    with torch.no_grad():
        for name, value in params.items():
            getattr(sae, name).data = value.to(getattr(sae, name).dtype).clone()
    return sae


def make_jumprelu(seed: int, d_in: int = D_IN, d_sae: int = D_SAE, dtype: str = "float64") -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype=dtype))
    return _set(
        sae,
        W_enc=torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in**0.5,
        b_enc=0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64),
        W_dec=torch.randn(d_sae, d_in, generator=g, dtype=torch.float64) / d_in**0.5,
        b_dec=0.1 * torch.randn(d_in, generator=g, dtype=torch.float64),
        threshold=0.1 + 0.6 * torch.rand(d_sae, generator=g, dtype=torch.float64),
    )


def rescale_and_permute(sae, src: torch.Tensor, scale: torch.Tensor, noise: float = 0.0, seed: int = 0):
    """Feature j of the result is feature src[j] of ``sae`` with its scale multiplied by scale[j].

    The reconstruction-preserving transformation that folding undoes:
    W_enc[:, i] -> c W_enc[:, i], b_enc[i] -> c b_enc[i], theta[i] -> c theta[i], W_dec[i] -> W_dec[i] / c.
    """
    out = type(sae)(sae.cfg)
    c = scale.double()
    g = torch.Generator().manual_seed(seed)
    W_dec = sae.W_dec.detach().double()[src] / c[:, None]
    W_dec = W_dec + noise * W_dec.norm(dim=1, keepdim=True) * torch.randn(W_dec.shape, generator=g, dtype=torch.float64)
    params = dict(
        W_enc=sae.W_enc.detach().double()[:, src] * c[None, :],
        b_enc=sae.b_enc.detach().double()[src] * c,
        W_dec=W_dec,
        b_dec=sae.b_dec.detach().double(),
    )
    if hasattr(sae, "threshold"):
        params["threshold"] = sae.threshold.detach().double()[src] * c
    return _set(out, **params)


def recon(sae, x):
    with torch.no_grad():
        return sae.decode(sae.encode(x))


def random_perm_and_scales(seed: int, n: int = D_SAE):
    g = torch.Generator().manual_seed(seed)
    src = torch.randperm(n, generator=g)
    scale = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2.5, 2.5, generator=g))  # ~0.08x .. 12x
    return src, scale


def expected_a_to_b(src: torch.Tensor) -> torch.Tensor:
    """B's feature j is A's src[j], so A's feature i goes to j = src^{-1}[i]."""
    inv = torch.empty_like(src)
    inv[src] = torch.arange(len(src))
    return inv


# ---------------------------------------------------------------------------- folding
def test_fold_jumprelu_matches_paper_and_unit_threshold_preserves_reconstruction():
    sae = make_jumprelu(0)
    W_enc, b_enc, W_dec = fold_threshold(sae)
    theta = sae.threshold.detach()
    torch.testing.assert_close(W_enc, sae.W_enc.detach() / theta[None, :])
    torch.testing.assert_close(b_enc, sae.b_enc.detach() / theta)
    torch.testing.assert_close(W_dec, sae.W_dec.detach() * theta[:, None])

    unit = JumpReLUSAE(sae.cfg)
    _set(unit, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=sae.b_dec.detach(), threshold=torch.ones(D_SAE))
    x = torch.randn(512, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    acts = sae.encode(x)
    frac = (acts > 0).double().mean()
    assert 0.05 < frac < 0.6, "test must exercise both firing and non-firing features"
    torch.testing.assert_close(recon(unit, x), recon(sae, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recon(fold_sae(sae), x), recon(sae, x), rtol=1e-10, atol=1e-10)


def test_fold_jumprelu_zero_threshold_falls_back_to_decoder_norm():
    sae = make_jumprelu(2)
    with torch.no_grad():
        sae.threshold.data[:5] = 0.0
    s = fold_scale(sae)
    torch.testing.assert_close(s[:5], 1.0 / sae.W_dec.detach()[:5].norm(dim=1))
    torch.testing.assert_close(s[5:], sae.threshold.detach()[5:])
    folded = fold_sae(sae)
    assert torch.all(folded.threshold[:5] == 0) and torch.allclose(folded.threshold[5:], torch.ones(D_SAE - 5, dtype=torch.float64))
    x = torch.randn(256, D_IN, dtype=torch.float64)
    torch.testing.assert_close(recon(folded, x), recon(sae, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["standard", "topk", "topk_rescaled"])
def test_fold_non_jumprelu_preserves_reconstruction(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64"))
    else:
        cfg = TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", k=6, rescale_acts_by_decoder_norm=kind == "topk_rescaled")
        sae = TopKSAE(cfg)
    _set(
        sae,
        W_enc=torch.randn(D_IN, D_SAE, generator=g, dtype=torch.float64),
        b_enc=0.1 * torch.randn(D_SAE, generator=g, dtype=torch.float64),
        W_dec=torch.randn(D_SAE, D_IN, generator=g, dtype=torch.float64) * torch.rand(D_SAE, 1, generator=g, dtype=torch.float64),
    )
    x = torch.randn(256, D_IN, dtype=torch.float64, generator=g)
    folded = fold_sae(sae)
    torch.testing.assert_close(recon(folded, x), recon(sae, x), rtol=1e-10, atol=1e-10)
    norms = folded.W_dec.detach().norm(dim=1)
    if kind == "topk":  # only a common scale is free: one shared s, RMS decoder norm 1
        s = fold_scale(sae)
        assert torch.all(s == s[0])
        torch.testing.assert_close(norms.pow(2).mean().sqrt(), torch.tensor(1.0, dtype=torch.float64))
    else:  # per-feature scale free: unit decoder rows
        torch.testing.assert_close(norms, torch.ones(D_SAE, dtype=torch.float64))


def test_folding_undoes_the_rescaling_invariance():
    sae = make_jumprelu(4)
    src, scale = random_perm_and_scales(5)
    other = rescale_and_permute(sae, src, scale)
    x = torch.randn(256, D_IN, dtype=torch.float64)
    # the transformation is a true symmetry of the JumpReLU SAE ...
    torch.testing.assert_close(recon(other, x), recon(sae, x), rtol=1e-10, atol=1e-10)
    # ... and the folded parameters are invariant to it (up to the permutation)
    for p, q in zip(fold_threshold(other), fold_threshold(sae)):
        q = q[:, src] if q.shape == (D_IN, D_SAE) else q[src]
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- sae_match
@pytest.mark.parametrize("assignment", ["hungarian", "nearest"])
def test_sae_match_recovers_permutation_under_rescaling(assignment):
    a = make_jumprelu(10, dtype="float32")
    src, scale = random_perm_and_scales(11)
    b = rescale_and_permute(a, src, scale, noise=0.01, seed=12)
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    result = SAEMatch(assignment=assignment).match(ctx, H[0], H[1])
    expected = expected_a_to_b(src)
    assert torch.equal(result.feature_b, expected)
    assert result.matched.all()
    assert result.matcher == "sae_match" and result.distance.shape == (D_SAE,)
    rows = torch.arange(D_SAE)
    exact = SAEMatch().pair_costs(ctx, H[0], H[1], rows, result.feature_b)
    torch.testing.assert_close(result.distance, exact.double())  # candidates and null agree
    # without folding the scales hide the permutation from each row's candidates: the test is not trivial
    raw = SAEMatch(assignment=assignment, fold=False, lap="candidates").match(ctx, H[0], H[1])
    assert (raw.feature_b == expected).float().mean() < 0.8
    if assignment == "hungarian":
        # the dense LAP's global optimum still finds it, at costs the null mostly calls chance
        raw = SAEMatch(fold=False, lap="dense").match(ctx, H[0], H[1])
        assert torch.equal(raw.feature_b, expected) and raw.extras["n_beyond_candidates"] > 0
        assert raw.matched.float().mean() < 0.8


def test_sae_match_null_rejects_unrelated_features():
    a = make_jumprelu(20, dtype="float32")
    b = make_jumprelu(21, dtype="float32")  # independent SAE: nothing should match
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    # a raw 1% quantile of random pairs lets most best-of-F_b unrelated partners pass ...
    loose = SAEMatch(null_quantile=0.01, long_range="direct").match(ctx, H[0], H[1])
    assert loose.matched.float().mean() > 0.2
    # ... the default Sidak-corrected null (null_alpha=0.05) calls almost all of them "no match"
    strict = SAEMatch(long_range="direct").match(ctx, H[0], H[1])
    assert strict.matched.float().mean() < 0.1
    assert strict.null_threshold < loose.null_threshold


def test_sae_match_compose_equals_direct_and_known_permutation():
    a = make_jumprelu(30, dtype="float32")
    src1, sc1 = random_perm_and_scales(31)
    b = rescale_and_permute(a, src1, sc1, noise=0.005, seed=1)
    src2, sc2 = random_perm_and_scales(32)
    c = rescale_and_permute(b, src2, sc2, noise=0.005, seed=2)
    src3, sc3 = random_perm_and_scales(33)
    d = rescale_and_permute(c, src3, sc3, noise=0.005, seed=3)
    saes = {H[2]: c, H[0]: a, H[3]: d, H[1]: b}  # unordered on purpose
    ctx = MatchContext(saes=saes)

    steps = [expected_a_to_b(s) for s in (src1, src2, src3)]
    truth = compose_matches(*steps)
    composed = SAEMatch(long_range="compose").match(ctx, H[0], H[3])
    direct = SAEMatch(long_range="direct").match(ctx, H[0], H[3])
    assert composed.extras["route"] == [H[0], H[1], H[2], H[3]]
    assert torch.equal(composed.feature_b, truth)
    assert torch.equal(direct.feature_b, truth)
    assert composed.matched.all()
    assert torch.isfinite(composed.distance).all() and torch.isfinite(composed.margin).all()
    # an explicit chain restricts the route; backward matching walks the layers down
    via2 = SAEMatch(chain=[H[2]]).match(ctx, H[0], H[3])
    assert via2.extras["route"] == [H[0], H[2], H[3]] and torch.equal(via2.feature_b, truth)
    back = SAEMatch().match(ctx, H[3], H[0])
    assert back.extras["route"] == [H[3], H[2], H[1], H[0]]
    assert torch.equal(back.feature_b[truth], torch.arange(D_SAE))


def _exact_cost(ctx, hook_a, hook_b) -> torch.Tensor:
    """``[F_a, F_b]`` SAE Match's cost of every pair, one pair at a time (difference form; inf: dead)."""
    n_a, n_b = ctx.saes[hook_a].cfg.d_sae, ctx.saes[hook_b].cfg.d_sae
    ia, ib = torch.arange(n_a).repeat_interleave(n_b), torch.arange(n_b).repeat(n_a)
    return SAEMatch(dtype="float64").pair_costs(ctx, hook_a, hook_b, ia, ib).double().reshape(n_a, n_b)


@pytest.mark.parametrize("shape", [(6, 6), (5, 7)])
def test_sae_match_dense_assignment_equals_brute_force(shape):
    n_a, n_b = shape
    a = make_jumprelu(40, d_sae=n_a)
    b = make_jumprelu(41, d_sae=n_b)  # a different random layer: no planted permutation
    if n_b > n_a:
        _set(b, W_dec=b.W_dec.detach().double().index_fill(0, torch.tensor([2]), 0.0))  # B's feature 2 is dead
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    res = SAEMatch(lap="dense", dtype="float64", null_alpha=1.0, n_candidates=2).match(ctx, H[0], H[1])
    cost = _exact_cost(ctx, H[0], H[1])
    totals = {p: float(sum(cost[i, j] for i, j in enumerate(p))) for p in itertools.permutations(range(n_b), n_a)}
    ranked = sorted(totals, key=totals.get)
    best = ranked[0]
    assert totals[ranked[1]] - totals[best] > 1e-9  # a unique optimum, so the comparison is exact
    assert res.feature_b.tolist() == list(best)
    assert 2 not in res.feature_b.tolist() or n_b == n_a  # never the dead feature
    torch.testing.assert_close(res.distance, cost[torch.arange(n_a), res.feature_b])
    # not trivial: each row taking its nearest partner is not one-to-one here, and with two
    # candidates a row ends up outside its own candidates
    assert len(set(cost.argmin(1).tolist())) < n_a
    assert res.extras["lap"] == "dense" and res.extras["n_beyond_candidates"] > 0 and res.extras["n_forced"] == 0


@pytest.mark.parametrize("n_a", [256, 200])
def test_sae_match_dense_leaves_no_row_without_partner(n_a):
    from saeot.evaluation.functional import full_assignment

    a = make_jumprelu(50, d_sae=n_a, dtype="float32")
    src, scale = random_perm_and_scales(51)
    b = rescale_and_permute(make_jumprelu(52, dtype="float32"), src, scale)  # unrelated to A, scales 0.08x..12x
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    dense = SAEMatch(lap="dense", n_candidates=4).match(ctx, H[0], H[1])
    sparse = SAEMatch(lap="candidates", n_candidates=4).match(ctx, H[0], H[1])
    assert (dense.feature_b >= 0).all() and dense.feature_b.unique().numel() == n_a
    assert torch.isfinite(dense.distance).all() and dense.extras["n_forced"] == 0
    assert dense.extras["n_beyond_candidates"] > 0
    # the candidate restriction does leave rows without a partner on the same pair ...
    assert sparse.extras["lap"] == "candidates" and sparse.extras["n_forced"] > 0
    assert sparse.extras["n_forced"] == int((sparse.feature_b < 0).sum())
    # ... and the matcher's n_forced is the count the equal-coverage protocol completes
    total = {}
    for lap, res in (("dense", dense), ("candidates", sparse)):
        rp = full_assignment(SAEMatch(lap=lap, n_candidates=4), ctx, H[0], H[1], n_candidates=4)
        assert rp.n_forced == res.extras["n_forced"] and rp.n_pairs == n_a
        total[lap] = float(rp.cost.sum())
    assert total["dense"] < total["candidates"]  # the completed sparse assignment is not optimal
    # same candidates: the margin does not depend on the solver
    torch.testing.assert_close(dense.margin, sparse.margin, equal_nan=True)
    exact = SAEMatch().pair_costs(ctx, H[0], H[1], torch.arange(n_a), dense.feature_b)
    torch.testing.assert_close(dense.distance, exact.double())  # difference form, as the candidates


@pytest.mark.parametrize("shape", [(30, 40), (40, 40), (40, 30)])
def test_sae_match_dense_and_candidates_agree_with_all_candidates(shape):
    n_a, n_b = shape
    a = make_jumprelu(60, d_sae=n_a, dtype="float32")
    b = make_jumprelu(61, d_sae=n_b, dtype="float32")
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    k = n_b + 3  # at least every feature of B
    dense = SAEMatch(lap="dense", n_candidates=k, long_range="direct").match(ctx, H[0], H[1])
    sparse = SAEMatch(lap="candidates", n_candidates=k, long_range="direct").match(ctx, H[0], H[1])
    assert torch.equal(dense.feature_b, sparse.feature_b)
    assert int((dense.feature_b >= 0).sum()) == min(n_a, n_b)
    torch.testing.assert_close(dense.distance, sparse.distance, rtol=0, atol=0)
    torch.testing.assert_close(dense.margin, sparse.margin, rtol=0, atol=0)
    assert torch.equal(dense.matched, sparse.matched)
    assert dense.extras["n_forced"] == sparse.extras["n_forced"] == 0
    assert dense.extras["n_beyond_candidates"] == 0
    # the answer is not simply each row's nearest partner
    assert not torch.equal(dense.feature_b, SAEMatch(assignment="nearest").match(ctx, H[0], H[1]).feature_b)


def test_sae_match_dense_size_limit_names_the_setting():
    a, b = make_jumprelu(70, dtype="float32"), make_jumprelu(71, dtype="float32")
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    limit = 0.9 * D_SAE * D_SAE * 8 / 1e9  # just under this pair's dense cost
    with pytest.raises(ValueError, match=r"matcher.lap=dense needs a 256 x 256 .* over matcher.lap_max_gb="):
        SAEMatch(lap="dense", lap_max_gb=limit).match(ctx, H[0], H[1])
    assert SAEMatch(lap="auto", lap_max_gb=limit).match(ctx, H[0], H[1]).extras["lap"] == "candidates"
    assert SAEMatch(lap="auto", lap_max_gb=limit / 0.8).match(ctx, H[0], H[1]).extras["lap"] == "dense"
    assert SAEMatch().cfg.lap == "auto" and SAEMatch().match(ctx, H[0], H[1]).extras["lap"] == "dense"


def test_hook_ordering_helpers():
    hooks = ["blocks.10.hook_resid_post", "blocks.2.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.2.hook_mlp_out"]
    assert sort_hooks_by_layer(hooks) == [
        "blocks.2.hook_resid_pre",
        "blocks.2.hook_mlp_out",
        "blocks.2.hook_resid_post",
        "blocks.10.hook_resid_post",
    ]
    pool = [f"blocks.{i}.hook_resid_post" for i in range(12)] + ["blocks.5.hook_mlp_out", "hook_embed"]
    assert hooks_between(pool, "blocks.3.hook_resid_post", "blocks.6.hook_resid_post") == [
        "blocks.4.hook_resid_post",
        "blocks.5.hook_resid_post",
    ]
    assert hooks_between(pool, "blocks.6.hook_resid_post", "blocks.3.hook_resid_post") == [
        "blocks.5.hook_resid_post",
        "blocks.4.hook_resid_post",
    ]


# ---------------------------------------------------------------------------- feature_flow
@pytest.mark.parametrize("assignment", ["nearest", "hungarian"])
def test_feature_flow_recovers_permutation(assignment):
    g = torch.Generator().manual_seed(40)
    a = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _set(a, W_dec=torch.randn(D_SAE, D_IN, generator=g), W_enc=torch.randn(D_IN, D_SAE, generator=g))
    src, scale = random_perm_and_scales(41)
    b = rescale_and_permute(a, src, scale, noise=0.02, seed=42)
    ctx = MatchContext(saes={H[0]: a, H[1]: b})
    result = FeatureFlow(assignment=assignment).match(ctx, H[0], H[1])
    assert torch.equal(result.feature_b, expected_a_to_b(src))
    assert result.matched.all()
    assert (result.distance < 0.01).all() and result.matcher == "feature_flow"
    # a dead feature (zero decoder row) in A gets no partner
    with torch.no_grad():
        a.W_dec.data[0] = 0.0
    dead = FeatureFlow(assignment=assignment).match(ctx, H[0], H[1])
    assert dead.feature_b[0] == -1 and not dead.matched[0]


# ---------------------------------------------------------------------------- activation correlation
def _shared_token_acts(n_tokens: int, n_feat: int, src: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.relu(torch.randn(n_tokens, n_feat, generator=g)) * (torch.rand(n_tokens, n_feat, generator=g) < 0.3)
    acts_a = base * torch.exp(torch.randn(n_feat, generator=g))
    noise = 0.05 * torch.relu(torch.randn(n_tokens, n_feat, generator=g))
    acts_b = base[:, src] * torch.exp(torch.randn(n_feat, generator=g)) + noise
    return acts_a, acts_b


@pytest.mark.parametrize("as_tensor", [True, False])
def test_activation_correlation_recovers_permutation(as_tensor):
    n_feat = 200
    src = torch.randperm(n_feat, generator=torch.Generator().manual_seed(50))
    acts_a, acts_b = _shared_token_acts(3000, n_feat, src, seed=51)
    acts_a[:, 7] = 0.0  # a dead feature of A
    acc = CorrelationAccumulator(n_feat, n_feat)
    for chunk_a, chunk_b in zip(acts_a.split(700), acts_b.split(700)):
        acc.update(chunk_a, chunk_b)
    value = acc.correlation() if as_tensor else acc
    ctx = MatchContext(correlations={(H[0], H[1]): value})
    result = ActivationCorrelation().match(ctx, H[0], H[1])
    expected = expected_a_to_b(src)
    alive = torch.arange(n_feat) != 7
    assert torch.equal(result.feature_b[alive], expected[alive])
    assert result.matched[alive].all()
    assert result.feature_b[7] == -1 and not result.matched[7]
    hung = ActivationCorrelation(assignment="hungarian").match(ctx, H[0], H[1])
    assert torch.equal(hung.feature_b[alive], expected[alive]) and hung.feature_b[7] == -1


def test_correlation_accumulator_merge_is_exact():
    g = torch.Generator().manual_seed(60)
    n, fa, fb = 1000, 9, 7
    a = torch.randn(n, fa, generator=g, dtype=torch.float64) + 1000.0  # large mean: naive sums would fail
    b = torch.relu(torch.randn(n, fb, generator=g, dtype=torch.float64)) * 3.0
    b[:, 0] = 0.0  # never fires
    b[:, 1] = 2.5  # constant but firing
    one = CorrelationAccumulator(fa, fb).update(a, b)
    shards = []
    bounds = [0, 1, 137, 500, 501, 1000]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = CorrelationAccumulator(fa, fb)
        for s in range(lo, hi, 64):
            shard.update(a[s:min(hi, s + 64)], b[s:min(hi, s + 64)])
        shards.append(shard)
    merged = CorrelationAccumulator(fa, fb)
    for shard in reversed(shards):
        merged.merge(shard)
    c1, c2 = one.correlation(torch.float64), merged.correlation(torch.float64)
    assert merged.n == one.n == n
    torch.testing.assert_close(c2, c1, rtol=0, atol=1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.corrcoef(a.numpy().T, b.numpy().T)[:fa, fa:]
    ref = np.nan_to_num(ref, nan=0.0)
    ref[:, 1] = 0.0  # numpy gives rounding noise or nan for the constant column; we give exactly 0
    np.testing.assert_allclose(c1.numpy(), ref, atol=1e-10)
    assert torch.equal(merged.fired_b, torch.tensor([False] + [True] * (fb - 1)))
    assert merged.constant_b[:2].all() and not merged.constant_b[2:].any()
    assert torch.all(c1[:, :2] == 0)
    # state round trip
    restored = CorrelationAccumulator.from_state_dict(merged.state_dict())
    torch.testing.assert_close(restored.correlation(torch.float64), c2, rtol=0, atol=0)
    assert torch.equal(restored.n_fire_a, merged.n_fire_a)


# ---------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(20, 20), (15, 30), (30, 15)])
def test_sparse_assignment_equals_dense_with_all_candidates(seed, shape):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(shape, generator=g, dtype=torch.float64) * 5 - 1
    dense = linear_assignment_dense(cost)
    sorted_cost, index = cost.sort(dim=1)
    sparse = linear_assignment_sparse(sorted_cost, index, n_b=shape[1])
    assert torch.equal(sparse, dense)
    assert int((dense >= 0).sum()) == min(shape)
    assigned = dense[dense >= 0]
    assert len(assigned.unique()) == len(assigned)  # one-to-one


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(25, 25), (20, 40), (40, 20)])
def test_sparse_assignment_equals_dense_with_forbidden_pairs(seed, shape):
    g = torch.Generator().manual_seed(100 + seed)
    k = 3
    cost = torch.rand(shape, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(shape[1], generator=g)[:k] for _ in range(shape[0])])
    cand = cost.gather(1, index)
    cand[0] = float("inf")  # row 0 has no candidate at all
    index[1, 1:] = -1  # row 1 has a single candidate
    dense_cost = torch.full(shape, float("inf"), dtype=torch.float64)
    ok = (index >= 0) & torch.isfinite(cand)
    rows = torch.arange(shape[0])[:, None].expand_as(index)
    dense_cost[rows[ok], index[ok]] = cand[ok]

    sparse = linear_assignment_sparse(cand, index, n_b=shape[1])
    dense = linear_assignment_dense(dense_cost)
    assert sparse[0] == -1 and dense[0] == -1
    assert torch.equal(sparse, dense)
    # cardinality is maximal
    graph = csr_matrix(torch.isfinite(dense_cost).numpy().astype(np.int8))
    max_card = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    assert int((sparse >= 0).sum()) == max_card
    assert np.isfinite(assignment_cost(dense_cost, sparse))
    # with an explicit price for "unassigned", the two still agree
    for price in (0.2, 0.6):
        s = linear_assignment_sparse(cand, index, n_b=shape[1], unassigned_cost=price)
        d = linear_assignment_dense(dense_cost, unassigned_cost=price)
        assert torch.equal(s, d)
        assert torch.all(dense_cost[(s >= 0).nonzero().flatten(), s[s >= 0]] <= price)


def test_compose_matches():
    g = torch.Generator().manual_seed(70)
    p1, p2, p3 = (torch.randperm(12, generator=g) for _ in range(3))
    direct = p3[p2[p1]]
    assert torch.equal(compose_matches(p1, p2, p3), direct)
    assert torch.equal(compose_matches(p1), p1)
    q1 = p1.clone()
    q1[3] = -1
    q2 = p2.clone()
    q2[p1[5]] = -1
    out = compose_matches(q1, q2, p3)
    expected = direct.clone()
    expected[3] = -1
    expected[5] = -1
    assert torch.equal(out, expected)
    with pytest.raises(ValueError):
        compose_matches(torch.tensor([0, 5]), torch.tensor([0, 1]))


def test_matcher_settings_are_a_config_dataclass_that_names_bad_keys():
    from saeot.matching import MatcherConfig, SAEMatchConfig

    m = SAEMatch(w_enc=0.5, assignment="nearest")
    assert isinstance(m.cfg, SAEMatchConfig) and isinstance(m.cfg, MatcherConfig)
    assert m.cfg.w_enc == 0.5 and m.cfg.assignment == "nearest" and m.cfg.n_candidates == 32  # its own default
    assert SAEMatch(SAEMatchConfig(w_enc=0.5)).cfg == SAEMatchConfig(w_enc=0.5)
    with pytest.raises(ValueError, match=r"matcher.w_encc is not a setting of matcher sae_match"):
        SAEMatch(w_encc=0.5)
    with pytest.raises(ValueError, match="matcher.null_alpha"):
        FeatureFlow(null_alpha=2)
    with pytest.raises(ValueError, match="matcher.long_range"):
        SAEMatch(long_range="sideways")
    with pytest.raises(ValueError, match=r"matcher.lap must be one of \['auto', 'dense', 'candidates'\], got 'sparse'"):
        SAEMatch(lap="sparse")
    with pytest.raises(ValueError, match=r"matcher.lap_max_gb must be > 0, got 0"):
        SAEMatch(lap_max_gb=0)
    with pytest.raises(ValueError, match=r"matcher.lap_max_gb='abc' must be of type float"):
        SAEMatch(lap_max_gb="abc")
