"""The "no match" decision: the Sidak level, the null's quantile estimators, and the
threshold a matcher gets from random pairs (known distributions, known quantiles)."""

import math

import pytest
import torch
from scipy.stats import lognorm

from saeot.matching.base import MatchContext, Matcher, NullEstimate, lognormal_quantile, null_level


@pytest.mark.parametrize("alpha,n_b", [(0.05, 1), (0.05, 1152), (0.01, 16384), (0.5, 7)])
def test_null_level_is_the_sidak_level(alpha, n_b):
    q = null_level(alpha, n_b)
    # the best of n_b independent null pairs falls below the q quantile with probability alpha
    assert 1 - (1 - q) ** n_b == pytest.approx(alpha, rel=1e-9)
    assert q <= alpha


def _lognormal(n, mu=1.0, sigma=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))


def test_lognormal_quantile_extrapolates_a_lognormal_tail():
    x = _lognormal(4000)
    q = 1e-4  # 0.4 expected samples below: a real extrapolation
    got = float(lognormal_quantile(x, q))
    assert got == pytest.approx(float(lognorm.ppf(q, s=0.4, scale=math.exp(1.0))), rel=0.05)
    assert got < float(x.min())


def test_lognormal_quantile_ignores_a_contaminated_lower_tail():
    """0.1% of the pairs are true partners at a tiny cost (about 1/F_b of random pairs for
    F_b = 1000): the fit band (1%-25%) hardly sees them."""
    x = _lognormal(4000)
    x[:4] = 1e-3
    assert float(lognormal_quantile(x, 1e-4)) == pytest.approx(float(lognorm.ppf(1e-4, s=0.4, scale=math.e)), rel=0.06)


class _PlantedNull(Matcher):
    """Pair cost = an independent log-normal draw per (i, j); the first ``n_partner`` rows have a
    true partner j = i at cost 0.001 (so the null is contaminated exactly as in a real layer pair)."""

    name = "planted"

    def __init__(self, n: int, n_partner: int, sigma: float = 0.3, **kw):
        super().__init__(**kw)
        g = torch.Generator().manual_seed(1)
        self.sigma = sigma
        self.cost = torch.exp(torch.randn(n, n, generator=g, dtype=torch.float64) * sigma)
        idx = torch.arange(n_partner)
        self.cost[idx, idx] = 1e-3

    def alive(self, ctx, hook):
        return torch.ones(self.cost.shape[0], dtype=torch.bool)

    def candidates(self, ctx, hook_a, hook_b, k):
        return torch.topk(self.cost, k, dim=1, largest=False)

    def pair_costs(self, ctx, hook_a, hook_b, ia, ib):
        return self.cost[ia, ib]

    def true_threshold(self, alpha):
        return float(lognorm.ppf(null_level(alpha, self.cost.shape[1]), s=self.sigma))


def _estimate(m):
    _, index = m.candidates(None, "a", "b", 2)
    return m.null_threshold(MatchContext(), "a", "b", exclude=index)


def test_fit_recovers_the_sidak_quantile_of_a_contaminated_null():
    m = _PlantedNull(400, n_partner=320, null_alpha=0.05, n_null=8000)
    est = _estimate(m)
    assert isinstance(est, NullEstimate) and est.method == "fit" and est.n_pairs == 8000
    assert est.level == pytest.approx(null_level(0.05, 400))
    assert est.threshold == pytest.approx(m.true_threshold(0.05), rel=0.05)
    # and the decision does what it promises: about null_alpha of the partnerless rows pass
    best_null = m.cost[320:].sort(dim=1).values[:, 0]
    assert float((best_null <= est.threshold).float().mean()) < 0.2


def test_empirical_with_exclusion_is_lenient_which_is_why_fit_is_the_default():
    """Excluding each row's nearest partner also removes the best null pair of every partnerless
    row, i.e. most of the null below the Sidak level: the empirical threshold comes out high."""
    m = _PlantedNull(400, n_partner=100, null_alpha=0.05, null_method="empirical", n_null_max=2_000_000)
    est = _estimate(m)
    assert est.method == "empirical" and est.n_pairs * est.level >= 20  # enough pairs were drawn
    assert est.threshold > 1.1 * m.true_threshold(0.05)


def test_empirical_falls_back_to_the_fit_when_pairs_are_capped():
    m = _PlantedNull(200, n_partner=0, null_alpha=0.05, null_method="empirical", n_null=500, n_null_max=500)
    assert _estimate(m).method == "fit"


def test_threshold_is_the_same_whatever_the_assignments():
    """One null whatever the assignments: computing the Hungarian assignment too must not move
    the nearest-mode threshold (it used to, through a wider candidate exclusion)."""
    for method in ("fit", "empirical"):
        m = _PlantedNull(120, n_partner=100, null_alpha=0.05, n_candidates=8, null_method=method, n_null=4000)
        ctx = MatchContext(correlations={("a", "b"): m.cost})  # tells the assignment F_b
        alone = m.match_assignments(ctx, "a", "b", ("nearest",))["nearest"]
        both = m.match_assignments(ctx, "a", "b", ("nearest", "hungarian"))
        assert alone.null_threshold == both["nearest"].null_threshold == both["hungarian"].null_threshold
        assert torch.equal(alone.matched, both["nearest"].matched)
        assert alone.extras["null_method"] == method


def test_null_can_be_switched_off():
    m = _PlantedNull(50, n_partner=10, null_alpha=1.0)
    assert m.null_threshold(MatchContext(), "a", "b").method == "off"
    assert bool(m.match(MatchContext(), "a", "b").matched.all())
