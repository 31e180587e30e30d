"""The bootstrap over evaluation contexts of the equal-coverage areas (saeot.evaluation.functional._bootstrap):
intervals on constructed per-context sums, paired differences through the table writer, the settings. That the
per-context sums of a real pass reproduce the point estimate is in test_functional.py
(test_bootstrap_with_all_ones_weights_is_the_point_estimate)."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from saeot.evaluation.functional import (
    CURVE_METRICS, CurveSums, FunctionalSettings, bootstrap_result, coverage_rows, paired_difference, percentile_ci,
    replicate_weights, write_coverage_table,
)

SMOOTH = ("explained_variance", "delta_ce", "corr", "deactivation")  # metrics that vary smoothly with the weights


def _sums(n_contexts: int, seed: int = 0, tokens: int = 16, m: int = 4) -> CurveSums:
    """Even contexts substituted perfectly (no error, no CE increase, B's features copy A's, removing i
    silences j), odd ones badly (error = sst, +2 nats, independent features, j unchanged)."""
    g = torch.Generator().manual_seed(seed)
    c = n_contexts
    good = (torch.arange(c) % 2 == 0).double()
    sst = 1.0 + torch.rand(c, generator=g, dtype=torch.float64)
    sse = ((1 - good) * sst)[:, None] * torch.tensor([1.0, 0.6], dtype=torch.float64)  # better at f = 1
    n_ce = torch.full((c,), 31.0, dtype=torch.float64)
    ce_clean = 3.0 * n_ce
    ce_sum = (ce_clean + 2.0 * (1 - good) * n_ce)[:, None] * torch.ones(2, dtype=torch.float64)
    x = torch.relu(torch.randn(c, tokens, m, generator=g, dtype=torch.float64))
    y = torch.where(good[:, None, None] > 0, x, torch.relu(torch.randn(c, tokens, m, generator=g, dtype=torch.float64)))
    moments = {"n": torch.full((c,), float(tokens), dtype=torch.float64), "sx": x.sum(1), "sy": y.sum(1),
               "sxx": (x * x).sum(1), "syy": (y * y).sum(1), "sxy": (x * y).sum(1)}
    clean = 1.0 + torch.rand(c, m, generator=g, dtype=torch.float64)
    return CurveSums(fraction=[0.5, 1.0], n=[m // 2, m], sse=sse, sst=sst, ce_sum=ce_sum, ce_clean=ce_clean,
                     n_ce=n_ce, moments=moments, deact_clean=clean, deact_ablated=(1 - good)[:, None] * clean,
                     deact_ranks=torch.arange(m))


def _repeat(s: CurveSums, k: int) -> CurveSums:
    """Every context ``k`` times (the same numbers, ``k`` times as many contexts)."""
    rep = lambda t: torch.cat([t] * k)  # noqa: E731
    return dataclasses.replace(s, sse=rep(s.sse), sst=rep(s.sst), ce_sum=rep(s.ce_sum), ce_clean=rep(s.ce_clean),
                               n_ce=rep(s.n_ce), moments={n: rep(v) for n, v in s.moments.items()},
                               deact_clean=rep(s.deact_clean), deact_ablated=rep(s.deact_ablated))


def _point(s: CurveSums) -> dict[str, float]:
    return {k: float(v[0]) for k, v in s.aucs(torch.ones(1, s.n_contexts)).items()}


def test_interval_holds_the_point_estimate_and_shrinks_as_one_over_sqrt_contexts():
    small = _sums(40)
    big = _repeat(small, 4)
    p_small, p_big = _point(small), _point(big)
    width = {}
    for name, s in (("small", small), ("big", big)):
        boot = s.aucs(replicate_weights(s.n_contexts, 2000, 0))
        width[name] = {}
        for m in SMOOTH:
            lo, hi = percentile_ci(boot[m])
            assert lo < p_small[m] < hi, (name, m, lo, p_small[m], hi)
            width[name][m] = hi - lo
            assert width[name][m] > 0.01, (name, m)
    for m in SMOOTH:
        assert p_big[m] == pytest.approx(p_small[m], rel=1e-9, abs=1e-12)  # duplicating changes no ratio
        assert 0.35 <= width["big"][m] / width["small"][m] <= 0.65, (m, width["big"][m] / width["small"][m])
    c = small.curves(torch.ones(1, 40))  # the constructed case is what it says: half the contexts +2 nats, ...
    assert c["delta_ce"][0].tolist() == pytest.approx([1.0, 1.0]) and 0.3 < float(c["corr"][0, -1]) < 0.7
    assert float(c["deactivation"][0, -1]) == pytest.approx(0.5, abs=0.1)


def test_replicate_weights_depend_on_the_seed_and_the_contexts_only():
    w = replicate_weights(30, 50, 7)
    assert w.shape == (50, 30) and w.dtype == torch.float64
    assert torch.all(w.sum(1) == 30) and torch.all(w >= 0) and torch.all(w == w.round())
    assert torch.equal(w, replicate_weights(30, 50, 7))  # every run and layer pair gets these
    assert not torch.equal(w, replicate_weights(30, 50, 8))
    assert not torch.equal(replicate_weights(31, 50, 7)[:, :30], w)


def test_percentiles_leave_nan_replicates_out_unless_most_are_nan():
    v = np.linspace(0.0, 1.0, 101)
    assert percentile_ci(v) == pytest.approx([0.025, 0.975])
    assert percentile_ci(np.r_[v, [math.nan] * 40]) == pytest.approx([0.025, 0.975])
    assert all(math.isnan(x) for x in percentile_ci(np.r_[v, [math.nan] * 102]))
    assert all(math.isnan(x) for x in percentile_ci([]))
    with pytest.raises(ValueError, match="same weights"):
        paired_difference([1.0, 2.0], [1.0])


def _func(sums: CurveSums, digest: str = "d0", replicates: int = 300) -> dict:
    """A run's ``metrics.json["functional"]`` with one layer pair whose equal-coverage entry comes from ``sums``."""
    ones = {k: v[0].tolist() for k, v in sums.curves(torch.ones(1, sums.n_contexts)).items()}
    curve = {"grid": sums.fraction, "fraction": sums.fraction, "n_pairs": sums.n, **ones,
             "auc": _point(sums), "n_forced": 0, "assignment_seconds": 0.0,
             "full": {"fraction": 1.0, "n_pairs": sums.n[-1], **{m: ones[m][-1] for m in CURVE_METRICS}},
             **bootstrap_result(sums, replicates, 0, digest)}
    pair = {"layer_a": 3, "layer_b": 4, "equal_coverage": curve, "coverage": {"frac_a_matched": 0.5},
            "substitution": {"explained_variance": 0.4, "delta_ce": 0.3}}
    return {"pairs": {"a|b": pair}}


def _read(path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["matcher"]: r for r in csv.DictReader(f)}


def test_paired_differences_are_zero_for_equal_matchers_and_the_shift_for_shifted_ones(tmp_path):
    s = _sums(40, seed=1)
    shift_ce, shift_ev = 0.25, 0.1  # per context: B's CE +0.25 nats at every position, its error +0.1 sst
    shifted = dataclasses.replace(s, ce_sum=s.ce_sum + shift_ce * s.n_ce[:, None],
                                  sse=s.sse + shift_ev * s.sst[:, None])
    rows = coverage_rows("a", "r/a", _func(s)) + coverage_rows("a_again", "r/a2", _func(s))
    rows += coverage_rows("b", "r/b", _func(shifted))
    md = write_coverage_table(rows, tmp_path).read_text()
    got = _read(tmp_path / "equal_coverage.csv")
    width = s.fraction[-1] - s.fraction[0]
    # a and a_again: the same numbers -> each is the other's best, the difference exactly [0, 0]
    for m in ("ev", "dce", "corr", "deact", "deact_success"):
        assert got["a"][f"auc_{m}_best_other"] == "a_again" and got["a_again"][f"auc_{m}_best_other"] == "a"
        assert float(got["a"][f"auc_{m}_vs_best_lo"]) == 0.0 == float(got["a"][f"auc_{m}_vs_best_hi"])
    # b: ΔCE higher by the shift (lower is better, so a is b's best other), EV lower by it, in every replicate
    for col, want in (("auc_dce", shift_ce * width), ("auc_ev", -shift_ev * width)):
        assert got["b"][f"{col}_best_other"] == "a"
        assert float(got["b"][f"{col}_vs_best_lo"]) == pytest.approx(want, abs=1e-5)
        assert float(got["b"][f"{col}_vs_best_hi"]) == pytest.approx(want, abs=1e-5)
        lo, hi = (float(got["b"][f"{col}_{k}"]) for k in ("lo", "hi"))
        assert lo < float(got["b"][col]) < hi
    row = next(r for r in rows if r["matcher"] == "a")
    ci = f"{row['auc_ev']:.3f} [{row['auc_ev_lo']:.3f}, {row['auc_ev_hi']:.3f}]"
    assert ci in md and "bootstrap over the 40 evaluation contexts" in md
    # contexts of another pass (other digest) are not paired; without a bootstrap: no interval
    bare = _func(shifted)
    for k in ("auc_ci", "auc_boot", "bootstrap"):
        del bare["pairs"]["a|b"]["equal_coverage"][k]
    rows = coverage_rows("a", "r/a", _func(s)) + coverage_rows("c", "r/c", _func(shifted, digest="other"))
    write_coverage_table(rows + coverage_rows("d", "r/d", bare), tmp_path)
    got = _read(tmp_path / "equal_coverage.csv")
    for k in ("a", "c", "d"):
        assert got[k]["auc_ev_best_other"] == "" and got[k]["auc_ev_vs_best_lo"] == "nan"
    assert got["d"]["auc_ev_lo"] == "nan" and got["a"]["auc_ev_lo"] != "nan" and got["c"]["auc_ev_hi"] != "nan"


def test_a_negative_bootstrap_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"^functional\.bootstrap=-1 must be >= 0") as e:
        FunctionalSettings(bootstrap=-1)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"functional\.bootstrap=-1"):
        FunctionalSettings.from_cfg({"bootstrap": -1})
    with pytest.raises(ValueError, match=r"functional\.bootstrap_seed='x' must be of type int"):
        FunctionalSettings.from_cfg({"bootstrap_seed": "x"})
    assert FunctionalSettings.from_cfg({"bootstrap": 0}).bootstrap == 0 and FunctionalSettings().bootstrap == 200


def test_a_matchers_variants_are_compared_with_the_other_methods_not_with_each_other(tmp_path):
    """Two semantic OT variants and one baseline: each variant's best other is the baseline even where the
    other variant is better; the baseline's best other is the better variant."""
    s = _sums(40, seed=2)
    worse = dataclasses.replace(s, sse=s.sse + 0.05 * s.sst[:, None])
    worst = dataclasses.replace(s, sse=s.sse + 0.1 * s.sst[:, None])
    rows = (coverage_rows("sot tw=16", "r/1", _func(s), method="semantic_ot")
            + coverage_rows("sot tw=0", "r/0", _func(worst), method="semantic_ot")
            + coverage_rows("feature_flow", "r/ff", _func(worse), method="feature_flow"))
    write_coverage_table(rows, tmp_path)
    got = _read(tmp_path / "equal_coverage.csv")
    assert got["sot tw=0"]["auc_ev_best_other"] == "feature_flow"
    assert got["sot tw=16"]["auc_ev_best_other"] == "feature_flow"
    assert got["feature_flow"]["auc_ev_best_other"] == "sot tw=16"
    assert float(got["sot tw=16"]["auc_ev_vs_best_lo"]) > 0 > float(got["sot tw=0"]["auc_ev_vs_best_hi"])
