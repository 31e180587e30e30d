"""Semantic OT's cost variants (saeot.matching.semantic_cost): each is the cost it says, the pruned
search equals brute force, debias=0 is the plain W2 matcher."""

import math

import pytest
import torch

from saeot.matching.base import MatchContext, MatcherNotApplicable
from saeot.matching.semantic_cost import SemanticCost, halves, self_distances
from saeot.matching.semantic_ot import SemanticOT
from saeot.reference import Standardize, project_samples
from saeot.transport import ExactW2, SinkhornW2, SlicedW2, w2_exact_pair
from saeot.types import FeatureSamples


def _clouds(F, K, r, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(F, 1, r, generator=g, dtype=torch.float64)
    x = centres + torch.rand(F, 1, 1, generator=g, dtype=torch.float64) * torch.randn(F, K, r, generator=g,
                                                                                   dtype=torch.float64)
    w = torch.rand(F, K, generator=g, dtype=torch.float64) + 0.1
    w[:, K - 2:] = 0  # padding
    for d in dead:
        w[d] = 0
    return x, w


def _search_equals_dense(cost, dense, k: int, chunk: int, rtol: float, atol: float):
    """``cost.nearest(k)`` (its ``n_solved`` counted from 0) against the sorted dense costs on the live rows:
    the same indices, costs within ``rtol`` / ``atol``; returns ``(cost, index)`` of the search."""
    cost.n_solved = 0
    c, i = cost.nearest(k, chunk=chunk)
    want_c, want_i = torch.sort(dense, dim=1, stable=True)
    alive = torch.isfinite(want_c[:, 0])
    assert torch.allclose(c[alive], want_c[alive, :k], rtol=rtol, atol=atol)
    assert torch.equal(i[alive], want_i[alive, :k])
    return c, i


def _samples(hook, x, w):
    F, K, _ = x.shape
    z = torch.zeros(F)
    return FeatureSamples(hook=hook, points=x.float(), weights=w.float(), n_fire=(w > 0).sum(1), act_sum=z,
                          act_max=z, n_tokens=100, token_ids=torch.full((F, K), -1), locations=torch.full((F, K, 2), -1),
                          activations=w.float())


VARIANTS = [
    {},
    {"debias": 1.0},
    {"centred_weight": 0.3},
    {"normalize": "mean"},
    {"debias": 0.5, "centred_weight": 0.5, "normalize": "mean"},
    {"decoder_weight": 0.7, "debias": 0.5},
]


@pytest.mark.parametrize("settings", VARIANTS)
@pytest.mark.parametrize("solver", [ExactW2(n_jobs=1), SinkhornW2(reg=0.05, n_iter=300), SlicedW2(n_projections=16)])
def test_pruned_nearest_equals_brute_force(settings, solver):
    xa, wa = _clouds(13, 9, 4, 0, dead=(3,))
    xb, wb = _clouds(17, 7, 4, 1, dead=(5,))
    g = torch.Generator().manual_seed(2)
    dirs = {"dirs_a": torch.randn(13, 4, generator=g), "dirs_b": torch.randn(17, 4, generator=g)}
    cost = SemanticCost(solver, xa, wa, xb, wb, **settings, **dirs)
    ia, ib = torch.meshgrid(torch.arange(13), torch.arange(17), indexing="ij")
    dense = cost.pairs(ia.flatten(), ib.flatten()).view(13, 17)
    c, i = _search_equals_dense(cost, dense, 3, 5, rtol=1e-6, atol=1e-9)
    assert (i[3] == -1).all() and torch.isinf(c[3]).all() and not (i == 5).any()
    if isinstance(solver, ExactW2) and settings.get("debias"):
        assert cost.n_solved < 13 * 17  # the bound pruned some pairs


@pytest.mark.parametrize("solver", [SinkhornW2(reg=0.05, n_iter=300), SlicedW2(n_projections=16)])
@pytest.mark.parametrize("centred_weight", [1.0, 0.5])
def test_pruned_nearest_is_exact_when_the_debiased_cost_is_negative(solver, centred_weight):
    """Broad clouds with close means: the debiased cost of every row's k nearest is negative. The search
    (the solver's own, offset by the exact terms) still equals brute force; a placeholder bound of 0
    (the sliced solver's search before) stopped every row after its first round."""
    g = torch.Generator().manual_seed(0)
    xa = 0.3 * torch.randn(12, 1, 4, generator=g, dtype=torch.float64) + torch.randn(12, 10, 4, generator=g,
                                                                                     dtype=torch.float64)
    xb = 0.3 * torch.randn(14, 1, 4, generator=g, dtype=torch.float64) + torch.randn(14, 10, 4, generator=g,
                                                                                     dtype=torch.float64)
    wa = torch.rand(12, 10, generator=g, dtype=torch.float64) + 0.1
    wb = torch.rand(14, 10, generator=g, dtype=torch.float64) + 0.1
    cost = SemanticCost(solver, xa, wa, xb, wb, debias=1.0, centred_weight=centred_weight)
    ia, ib = torch.meshgrid(torch.arange(12), torch.arange(14), indexing="ij")
    want_c, want_i = torch.sort(cost.pairs(ia.flatten(), ib.flatten()).view(12, 14), dim=1, stable=True)
    assert (want_c[:, 1] < 0).all()
    c, i = cost.nearest(2, chunk=5)
    assert torch.equal(i, want_i[:, :2]) and torch.equal(c, want_c[:, :2])
    rows = torch.tensor([9, 2, 11])  # a subset (a DDP shard): the same rows of the result
    cr, ir = cost.nearest(2, rows=rows, chunk=2)
    assert torch.equal(ir, i[rows]) and torch.equal(cr, c[rows])


def test_each_setting_is_the_cost_it_says():
    xa, wa = _clouds(4, 8, 3, 3)
    xb, wb = _clouds(5, 6, 3, 4)
    ex = ExactW2(n_jobs=1)
    ia, ib = torch.tensor([0, 1, 3]), torch.tensor([4, 0, 2])

    def w2(x, w, y, v):
        return torch.tensor([w2_exact_pair(x[i], w[i], y[j], v[j]) for i, j in zip(ia.tolist(), ib.tolist())],
                            dtype=torch.float64)

    plain = w2(xa, wa, xb, wb)
    assert torch.allclose(SemanticCost(ex, xa, wa, xb, wb).pairs(ia, ib), plain)
    ma, mb = (torch.einsum("fk,fkr->fr", w / w.sum(1, keepdim=True), x) for x, w in ((xa, wa), (xb, wb)))
    gap = (ma[ia] - mb[ib]).pow(2).sum(1)
    assert torch.allclose(SemanticCost(ex, xa, wa, xb, wb, centred_weight=0.0).pairs(ia, ib), gap)
    assert torch.allclose(SemanticCost(ex, xa, wa, xb, wb, centred_weight=0.25).pairs(ia, ib),
                          gap + 0.25 * (plain - gap))
    # debias: half of each feature's self-distance between its two halves (alternate samples by weight)
    sa, sb = self_distances(ex, xa, wa), self_distances(ex, xb, wb)
    (h1, v1), (h2, v2) = halves(xa, wa)
    assert sa[1] == pytest.approx(w2_exact_pair(h1[1], v1[1], h2[1], v2[1]))
    assert (v1[0] >= v2[0]).sum() >= 3  # the first half takes the heavier sample of each pair
    assert torch.allclose(SemanticCost(ex, xa, wa, xb, wb, debias=1.5).pairs(ia, ib),
                          plain - 0.75 * (sa[ia] + sb[ib]))
    # normalize=mean: W2 of the clouds scaled to a unit mean, so a rescaled copy is at distance 0
    c = SemanticCost(ex, xa, wa, 3.0 * xa[[1, 0, 2, 3, 0]], wa[[1, 0, 2, 3, 0]], normalize="mean")
    assert float(c.pairs(torch.tensor([1]), torch.tensor([0]))) == pytest.approx(0.0, abs=1e-9)
    # the decoder term: gamma * M * (1 - cos), M the median cost of random pairs without it
    da, db = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    c = SemanticCost(ex, xa, wa, xb, wb, decoder_weight=2.0, dirs_a=da, dirs_b=db)
    cos = torch.nn.functional.cosine_similarity(da[ia], db[ib], dim=1)
    assert c.scale > 0 and torch.allclose(c.pairs(ia, ib), plain + 2.0 * c.scale * (1 - cos))


def test_plain_w2_setting_and_variants_reach_the_cost():
    xa, wa = _clouds(10, 8, 3, 5)
    xb, wb = _clouds(12, 8, 3, 6)
    ctx = MatchContext(samples={"a": _samples("a", xa, wa), "b": _samples("b", xb, wb)})
    assert SemanticOT().cfg.debias == 1.0 and not SemanticOT().cfg.plain  # the default is debiased
    base = SemanticOT(progress=False, solver=ExactW2(n_jobs=1), debias=0.0)
    assert base.cfg.plain
    r = base.match(ctx, "a", "b")
    brute = ExactW2(n_jobs=1).pairwise(xa.float(), wa.float(), xb.float(), wb.float())
    assert torch.equal(r.feature_b, brute.argmin(1))
    assert torch.allclose(r.distance, brute.min(1).values.double().sqrt(), rtol=1e-6)
    deb = SemanticOT(progress=False, solver=ExactW2(n_jobs=1), debias=1.0)
    rd = deb.match(ctx, "a", "b")
    cost = deb.cost(ctx, "a", "b")
    ia = torch.arange(10)
    c = cost.pairs(ia, rd.feature_b)
    assert torch.allclose(rd.distance, c.sign() * c.abs().sqrt())
    with pytest.raises(ValueError, match="matcher.normalize"):
        SemanticOT(normalize="unit")
    with pytest.raises(MatcherNotApplicable, match="reference"):
        SemanticOT(progress=False, decoder_weight=1.0).match(ctx, "a", "b")


def test_decoder_term_reads_the_mapped_decoders():
    """With the reference space in the context, decoder rows go through its map (phi(b + d) - phi(b))."""

    class _SAE:
        def __init__(self, w_dec):
            self.W_dec, self.b_dec = w_dec, torch.zeros(w_dec.shape[1])

    g = torch.Generator().manual_seed(0)
    states = {"a": torch.randn(500, 3, generator=g), "b": 3.0 * torch.randn(500, 3, generator=g) + 1.0}
    space = Standardize().fit(states)
    xa, wa = _clouds(6, 8, 3, 7)
    samples = {h: project_samples(space, _samples(h, xa, wa)) for h in ("a", "b")}
    dec = torch.nn.functional.normalize(torch.randn(6, 3, generator=g), dim=1)
    ctx = MatchContext(saes={"a": _SAE(dec), "b": _SAE(dec[[2, 0, 1, 5, 3, 4]])}, samples=samples, reference=space)
    m = SemanticOT(progress=False, solver=ExactW2(n_jobs=1), decoder_weight=50.0, centred_weight=0.0, debias=0.0)
    # the clouds say identity, the (much heavier) decoder term says the permutation
    assert m.match(ctx, "a", "b").feature_b.tolist() == [1, 2, 0, 4, 5, 3]
    assert math.isfinite(m.cost(ctx, "a", "b").scale)


@pytest.mark.parametrize("solver", [ExactW2(n_jobs=1), ExactW2(n_jobs=2, bound="gelbrich"),
                                    ExactW2(n_jobs=1, bound="max_sliced", certify=True, certify_candidates=6)])
@pytest.mark.parametrize("settings", [{"debias": 1.0}, {"debias": 1.5, "decoder_weight": 0.7}])
def test_debiased_cost_runs_the_exact_cascade_and_equals_brute_force(solver, settings):
    """With centred_weight 1 the cost is W2^2 + exact terms: the search runs the solver's bound cascade
    (fidelity / Gelbrich / max-sliced, optionally Sinkhorn-certified) shifted by those terms; a subset of
    rows (a DDP shard) gives the same rows of the result."""
    xa, wa = _clouds(40, 12, 5, 7, dead=(4,))
    xb, wb = _clouds(50, 10, 5, 8, dead=(9,))
    g = torch.Generator().manual_seed(3)
    dirs = {"dirs_a": torch.randn(40, 5, generator=g), "dirs_b": torch.randn(50, 5, generator=g)}
    cost = SemanticCost(solver, xa, wa, xb, wb, **settings, **dirs)
    assert cost.cascades
    ia, ib = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    dense = cost.pairs(ia.flatten(), ib.flatten()).view(40, 50)
    want_c, want_i = torch.sort(dense, dim=1, stable=True)
    cost.n_solved = 0
    c, i = cost.nearest(2, chunk=16)
    alive = torch.isfinite(want_c[:, 0])
    assert torch.equal(c[alive], want_c[alive, :2])  # the same numbers, not only close ones
    assert torch.equal(i[alive], want_i[alive, :2]) and (i[4] == -1).all()
    assert cost.n_solved < 0.6 * 39 * 49
    rows = torch.tensor([31, 4, 0, 17])
    cr, ir = cost.nearest(2, rows=rows, chunk=3)
    assert torch.equal(ir, i[rows]) and torch.equal(cr[ir[:, 0] >= 0], c[rows][ir[:, 0] >= 0])


def test_cascade_prunes_the_debiased_cost_like_plain_w2():
    """The debiased default is searched with the same cascade as plain W2 (before, only the mean + spread
    bound pruned it): on clouds with shared means and different covariances it solves far fewer pairs."""
    g = torch.Generator().manual_seed(0)
    F, K, r = 60, 16, 6
    frames = torch.linalg.qr(torch.randn(F, r, 2, generator=g, dtype=torch.float64))[0]  # [F, r, 2]
    x = (torch.randn(F, K, 2, generator=g, dtype=torch.float64) @ frames.transpose(1, 2)) \
        + 0.05 * torch.randn(F, 1, r, generator=g, dtype=torch.float64)
    w = torch.rand(F, K, generator=g, dtype=torch.float64) + 0.1
    y = x[torch.randperm(F, generator=g)] + 0.01 * torch.randn(F, K, r, generator=g, dtype=torch.float64)
    solved = {}
    for name, solver in (("cascade", ExactW2(n_jobs=1)), ("mean_spread", ExactW2(n_jobs=1))):
        cost = SemanticCost(solver, x, w, y, w, debias=1.0)
        cost.cascades = name == "cascade"
        cost.n_solved = 0
        solved[name] = (cost.nearest(2), cost.n_solved)
    (c1, i1), n1 = solved["cascade"]
    (c2, i2), n2 = solved["mean_spread"]
    assert torch.equal(i1, i2) and torch.allclose(c1, c2, rtol=0, atol=1e-12)
    assert n1 < 0.5 * n2


def test_a_rare_feature_is_not_debiased_into_a_hub():
    """A feature of B seen on two tokens far apart: its two 1-point halves give a self-distance of
    their whole squared distance. Subtracted, it made that feature every row's nearest candidate
    (the SAE suite: 2,191 of 2,222 matches of 8->12 on a feature seen twice); it is left undebiased."""
    g = torch.Generator().manual_seed(0)
    F, K, r = 12, 16, 6
    centres = 3 * torch.randn(F, 1, r, generator=g, dtype=torch.float64)
    xa = centres + 0.5 * torch.randn(F, K, r, generator=g, dtype=torch.float64)
    xb = centres + 0.5 * torch.randn(F, K, r, generator=g, dtype=torch.float64)  # feature i of B = i of A
    wa = torch.rand(F, K, generator=g, dtype=torch.float64) + 0.1
    wb = wa.clone()
    rare = torch.zeros(1, K, r, dtype=torch.float64)
    rare[0, 0, 0], rare[0, 1, 0] = 12.0, -12.0  # two tokens, far apart, around the middle of the clouds
    wr = torch.zeros(1, K, dtype=torch.float64)
    wr[0, :2] = 1.0
    xb, wb = torch.cat([xb, rare]), torch.cat([wb, wr])
    ex = ExactW2(n_jobs=1)
    s = self_distances(ex, xb, wb)
    assert s[F] == 0 and (s[:F] > 0).all()  # only the features with all K samples are debiased
    c, i = SemanticCost(ex, xa, wa, xb, wb, debias=1.0).nearest(1)
    assert torch.equal(i[:, 0], torch.arange(F))  # every feature finds its own partner, none the rare one
    # the rare feature's own self-distance (its two points) would have made it the hub
    (h1, v1), (h2, v2) = halves(xb[F:], wb[F:])
    s_old = s.clone()
    s_old[F] = w2_exact_pair(h1[0], v1[0], h2[0], v2[0])
    ia = torch.arange(F)
    to_rare = torch.tensor([w2_exact_pair(xa[a], wa[a], xb[F], wb[F]) for a in range(F)], dtype=torch.float64)
    to_own = torch.tensor([w2_exact_pair(xa[a], wa[a], xb[a], wb[a]) for a in range(F)], dtype=torch.float64)
    sa = self_distances(ex, xa, wa)
    old_rare = to_rare - 0.5 * (sa[ia] + s_old[F])
    old_own = to_own - 0.5 * (sa[ia] + s_old[ia])
    assert (old_rare < old_own).float().mean() > 0.5  # the old rule: the rare feature wins most rows


def _occurrences(F, K, w, seed, share=None):
    """``[F, K]`` distinct occurrence ids per feature (-1 on padding); ``share``: (rows, ids) to copy in."""
    g = torch.Generator().manual_seed(seed)
    occ = torch.stack([torch.randperm(3 * K, generator=g)[:K] for _ in range(F)]).long()
    if share is not None:
        occ[share[0]] = share[1]
    return torch.where(w > 0, occ, torch.full_like(occ, -1))


def test_token_weight_is_the_fused_cost_and_its_search_is_exact():
    """token_weight: W2^2 under ||x - y||^2 + tau M [t != t'] (M the median random-pair cost without it),
    debiasing unchanged (plain self-distances); the cascade search equals brute force on two layers."""
    from saeot.transport import LabelCost

    xa, wa = _clouds(13, 9, 4, 10, dead=(3,))
    xb, wb = _clouds(17, 9, 4, 11, dead=(5,))
    oa = _occurrences(13, 9, wa, 12)
    shared = torch.tensor([0, 1, 2, 4, 5, 6])  # alive in A; B's other features fire on other tokens
    ob = _occurrences(17, 9, wb, 13) + 1000
    ob[shared] = oa[shared]
    ob = torch.where(wb > 0, ob, torch.full_like(ob, -1))
    ex = ExactW2(n_jobs=1)
    base = SemanticCost(ex, xa, wa, xb, wb, debias=1.0)
    cost = SemanticCost(ex, xa, wa, xb, wb, debias=1.0, token_weight=0.8, occurrences_a=oa, occurrences_b=ob)
    assert cost.scale > 0 and cost.labels.weight == pytest.approx(0.8 * cost.scale)
    assert torch.equal(cost.self_a, base.self_a)
    ia, ib = torch.meshgrid(torch.arange(13), torch.arange(17), indexing="ij")
    ia, ib = ia.flatten(), ib.flatten()
    dense = cost.pairs(ia, ib).view(13, 17)
    fused = ex.pair(xa, wa, xb, wb, ia, ib, labels=LabelCost(oa, ob, 0.8 * cost.scale)).view(13, 17)
    debias = 0.5 * (base.self_a[:, None] + base.self_b[None, :])
    live = torch.isfinite(dense)
    assert torch.allclose(dense[live], (fused - debias)[live])
    # pairs with no shared occurrence pay the full tau M on top of the debiased W2^2, sharing ones less
    plain = base.pairs(ia, ib).view(13, 17)
    disjoint = torch.ones(13, 17, dtype=torch.bool)
    disjoint[:, shared] = False
    assert torch.allclose(dense[live & disjoint], (plain + 0.8 * cost.scale)[live & disjoint])
    same = torch.zeros(13, 17, dtype=torch.bool)
    same[shared, shared] = True
    assert bool((dense < plain + 0.8 * cost.scale - 1e-9)[same & live].all())
    c, i = _search_equals_dense(cost, dense, 2, 4, rtol=1e-9, atol=1e-12)
    assert cost.n_solved < 13 * 17
    rows = torch.tensor([7, 0, 2])
    c2, i2 = cost.nearest(2, rows=rows)
    assert torch.equal(i2, i[rows])


def test_token_weight_pulls_co_firing_features_together_in_the_matcher():
    xa, wa = _clouds(10, 8, 3, 20)
    xb = xa[torch.randperm(10, generator=torch.Generator().manual_seed(1))] + 0.0  # unrelated order of B
    xb = xb + 0.8 * torch.randn(xb.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wb = wa.clone()
    oa = _occurrences(10, 8, wa, 21) + 100 * torch.arange(10)[:, None]  # each feature on its own tokens
    oa = torch.where(wa > 0, oa, torch.full_like(oa, -1))
    ob = oa.clone()  # B feature j fired on the very tokens of A feature j
    sa, sb = _samples("a", xa, wa), _samples("b", xb, wb)
    for s, o in ((sa, oa), (sb, ob)):
        s.locations = torch.stack([torch.where(o >= 0, torch.zeros_like(o), -1), o], dim=-1)
    ctx = MatchContext(samples={"a": sa, "b": sb})
    plain = SemanticOT(progress=False, solver=ExactW2(n_jobs=1)).candidates(ctx, "a", "b", 1)[1][:, 0]
    fused = SemanticOT(progress=False, solver=ExactW2(n_jobs=1), token_weight=5.0).candidates(ctx, "a", "b", 1)[1][:, 0]
    assert bool((fused == torch.arange(10)).all())
    assert int((plain == torch.arange(10)).sum()) < 10
    with pytest.raises(ValueError, match="token_weight > 0 needs transport=exact"):
        SemanticOT(progress=False, solver=SinkhornW2(reg=0.05), token_weight=1.0)
    with pytest.raises(ValueError, match="token_weight"):
        SemanticOT(progress=False, token_weight=-1.0)
