"""Functional evaluation (layer substitution, co-activation, coverage) and report.html; the judge is in
test_judge.py, the equal-coverage curves in test_equal_coverage.py."""

from __future__ import annotations

import html.parser
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from omegaconf import OmegaConf

from saeot.evaluation.contexts import Context
from saeot.evaluation.functional import (
    CoactivationAccumulator, CoverageCurves, FunctionalSettings, RankedPairs, curve_auc, evaluate_functional,
    evaluate_runs, evaluation_data, format_markdown, full_assignment, identity_matching, one_to_one, pair_matching,
    rank_pairs, run_from_hook, substitute_codes,
)
from saeot.evaluation.report import render_report
from saeot.evaluation.runner import _expand, run_evaluate, select_evaluation
from saeot.pipeline.rundir import RunDir

from helpers.contexts import ctx as _ctx
from helpers.runs import train_run

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
QUIET = FunctionalSettings(progress=False, split="heldout")  # evaluate_functional reads an existing split


@pytest.fixture(scope="module")
def dm(tiny_lm, tiny_text):
    from saeot.data.datamodule import HiddenStateDataModule

    d = HiddenStateDataModule(tiny_lm, tiny_text, [H0, H1], context_len=32, max_contexts=16, batch_size=4,
                              heldout_fraction=0.5)
    d.setup()
    return d


@pytest.fixture(scope="module")
def tiny_saes(dm, tmp_path_factory):
    """Small TopK SAEs (48 features, k=6) trained for a second on the profile split of the tiny model."""
    from sae_lens import SAE

    from saeot.saes import LocalTrainedSAEs

    trainer = LocalTrainedSAEs(d_sae=48, k=6, steps=80, batch_size=128, lr=1e-2, progress=False)
    acts = trainer.collect(dm, [H0, H1])
    out = {}
    for h in (H0, H1):
        path = tmp_path_factory.mktemp("sae")
        trainer.train_one(acts[h], h).save_inference_model(path)
        out[h] = SAE.load_from_disk(path).eval().requires_grad_(False)
    return out


# ---------------------------------------------------------------------------- substitution
@pytest.fixture(scope="module")
def results(tiny_lm, tiny_saes, dm):
    """One streaming pass for three "runs": H1 onto itself, H1 onto itself scrambled, H0 onto itself."""
    F = tiny_saes[H1].cfg.d_sae
    perm = torch.roll(torch.arange(F), 7)
    rows = [{"feature_a": i, "feature_b": int(perm[i]), "distance": 1.0, "margin": 1.0, "matched": 1} for i in range(F)]
    runs = {"id1": [identity_matching(H1, F)], "scrambled": [pair_matching(H1, H1, rows, F, F)],
            "id0": [identity_matching(H0, tiny_saes[H0].cfg.d_sae)]}
    return evaluate_functional(tiny_lm, tiny_saes, dm, runs, QUIET)


def test_identity_substitution_is_exactly_the_sae_reconstruction(results, tiny_saes, dm):
    sae = tiny_saes[H1]
    res = results["id1"]
    p = res["pairs"][f"{H1}|{H1}"]
    sub, ref = p["substitution"], p["baselines"]
    assert sub["explained_variance"] == ref["sae"]["explained_variance"]
    assert sub["delta_ce"] == ref["sae"]["delta_ce"]
    # the SAE is a real one, the baselines differ (a random model: CE differences carry no meaning),
    # and the SAE's EV is what a direct computation gives
    assert 0.3 < ref["sae"]["explained_variance"] < 1.0
    assert len({ref[r]["delta_ce"] for r in ("sae", "bias", "mean")}) == 3
    assert ref["mean"]["explained_variance"] == pytest.approx(0.0, abs=1e-9)
    hs, recs = [], []
    for batch in dm.iter_batches("heldout"):
        h = batch["hidden"][H1][batch["mask"]]
        hs.append(h)
        recs.append(sae.decode(sae.encode(h)))
    h, r = torch.cat(hs).double(), torch.cat(recs).double()
    ev = 1 - (h - r).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert sub["explained_variance"] == pytest.approx(float(ev), abs=1e-5)
    assert res["n_tokens"] == h.shape[0]


def test_a_scrambled_matching_substitutes_worse_than_the_identity(results):
    key = f"{H1}|{H1}"
    ev_id = results["id1"]["pairs"][key]["substitution"]["explained_variance"]
    sc = results["scrambled"]["pairs"][key]
    assert sc["substitution"]["explained_variance"] < ev_id - 0.2
    assert sc["coactivation"]["corr"] < 0.5
    assert sc["baselines"] == results["id1"]["pairs"][key]["baselines"]  # shared baselines


def test_identity_coactivation_is_perfect(results):
    p = results["id0"]["pairs"][f"{H0}|{H0}"]
    co = p["coactivation"]
    assert co["n_precision_defined"] > 10 and co["n_corr_defined"] > 10
    assert co["precision"] == pytest.approx(1.0) and co["recall"] == pytest.approx(1.0)
    assert co["corr"] == pytest.approx(1.0, abs=1e-9)
    assert co["micro_precision"] == pytest.approx(1.0)
    assert p["chance"]["corr"] < 0.5


def test_coactivation_streams_like_a_batch_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(300, 5, generator=g))
    y = torch.relu(x + 0.7 * torch.randn(300, 5, generator=g))
    acc = CoactivationAccumulator(5)
    acc.update(x[:120], y[:120])
    acc.update(x[120:], y[120:])
    pp = acc.per_pair()
    for m in range(5):
        fa, fb = x[:, m] > 0, y[:, m] > 0
        assert float(pp["precision"][m]) == pytest.approx(float((fa & fb).sum() / fa.sum()))
        assert float(pp["recall"][m]) == pytest.approx(float((fa & fb).sum() / fb.sum()))
        assert float(pp["corr"][m]) == pytest.approx(np.corrcoef(x[:, m], y[:, m])[0, 1], abs=1e-9)


def test_run_from_hook_reproduces_the_clean_forward(tiny_lm, dm):
    tokens = dm.contexts[:2]
    model = tiny_lm.model
    logits, cache = model.run_with_cache(tokens, names_filter=[H1, "blocks.1.hook_mlp_out"])
    torch.testing.assert_close(run_from_hook(model, H1, cache[H1], tokens), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_from_hook(model, "blocks.1.hook_mlp_out", cache["blocks.1.hook_mlp_out"], tokens),
                               logits, atol=1e-5, rtol=1e-5)
    changed = run_from_hook(model, H1, torch.zeros_like(cache[H1]), tokens)
    assert not torch.allclose(changed, logits, atol=1e-3)


def test_one_to_one_keeps_the_closest_a_per_b():
    fa = torch.tensor([0, 1, 2, 3, 4])
    fb = torch.tensor([7, 7, 3, 7, 3])
    d = torch.tensor([0.5, 0.2, 0.9, 0.2, 0.1])
    a, b = one_to_one(fa, fb, d)
    assert a.tolist() == [1, 4] and b.tolist() == [7, 3]  # tie 0.2 between A1 and A3 -> lowest index


def test_pair_matching_coverage_and_no_match():
    rows = [{"feature_a": i, "feature_b": fb, "distance": d, "margin": 0.1, "matched": m}
            for i, (fb, d, m) in enumerate([(0, 0.1, 1), (0, 0.3, 1), (2, 0.2, 1), (1, 9.0, 0), (-1, math.inf, 0)])]
    pm = pair_matching(H0, H1, rows, 5, 4)
    cov = pm.coverage(alive_a=torch.tensor([True, True, True, False, True]))
    assert cov["frac_a_matched"] == pytest.approx(3 / 5) and cov["frac_no_match"] == pytest.approx(2 / 5)
    assert cov["frac_b_covered"] == pytest.approx(2 / 4)
    assert cov["n_one_to_one"] == 2 and cov["n_dropped_many_to_one"] == 1
    assert cov["frac_alive_a_matched"] == pytest.approx(3 / 4)
    assert pm.no_match.tolist() == [3, 4]
    codes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert substitute_codes(codes, pm.oto_a, pm.oto_b, torch.ones(2), 4).tolist() == [[1.0, 0.0, 3.0, 0.0]]


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="functional.bogus is not a setting of evaluate.py's functional evaluation"):
        FunctionalSettings.from_cfg({"bogus": 1})
    with pytest.raises(ValueError, match="code_scale"):
        FunctionalSettings(code_scale="sideways")
    with pytest.raises(ValueError, match=r"functional.fresh_contexts='many' must be of type int"):
        FunctionalSettings.from_cfg({"fresh_contexts": "many"})  # named here, not a TypeError in the pass
    assert FunctionalSettings.from_cfg({"fresh_contexts": 40, "coverage_grid": [0.5, 1.0]}).coverage_grid == (0.5, 1.0)


# ---------------------------------------------------------------------------- equal coverage
def test_pairs_rank_by_cost_with_forced_pairs_last_and_levels_round_half_up():
    fa, fb = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    cost = torch.tensor([0.5, math.nan, 0.1, 0.1], dtype=torch.float64)
    order = rank_pairs(fa, fb, cost, torch.tensor([False, False, False, True]))
    assert order.tolist() == [2, 0, 1, 3]  # 0.1 (A2), 0.5 (A0), NaN (A1), then the forced A3 despite its 0.1
    rp = RankedPairs(H0, H1, fa[order], fb[order], cost[order], n_features_a=5, n_features_b=4, n_forced=1)
    assert [rp.n_at(f) for f in (0.1, 0.5, 0.6, 1.0)] == [1, 3, 3, 4]  # 0.5 -> 1, 2.5 -> 3; at most the 4 pairs
    with pytest.raises(ValueError, match="one-to-one"):
        RankedPairs(H0, H1, fa, torch.tensor([0, 0, 1, 2]), cost, n_features_a=4, n_features_b=4)
    assert curve_auc([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert curve_auc([0.0, 0.5, 1.0], [0.0, math.nan, 1.0]) == pytest.approx(0.5)
    assert math.isnan(curve_auc([1.0], [2.0]))


def test_full_assignment_assigns_every_feature_whatever_the_matchers_null():
    from sae_lens import StandardSAE, StandardSAEConfig

    from saeot.matching import FeatureFlow
    from saeot.matching.assignment import linear_assignment_dense
    from saeot.matching.base import MatchContext

    g = torch.Generator().manual_seed(0)
    F = 24
    saes = {}
    for h in (H0, H1):
        sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=F))
        sae.W_dec.data = torch.randn(F, 16, generator=g)
        saes[h] = sae.eval().requires_grad_(False)
    ctx = MatchContext(saes=saes)
    strict = FeatureFlow(assignment="nearest", null_alpha=1e-6)
    assert int(strict.match(ctx, H0, H1).matched.sum()) < F  # the run's own null leaves features out
    rp = full_assignment(strict, ctx, H0, H1, n_candidates=F)
    assert rp.n_pairs == F and rp.n_forced == 0 and sorted(rp.feature_a.tolist()) == list(range(F))
    assert torch.all(rp.cost[1:] >= rp.cost[:-1])  # best first
    full = strict.pair_costs(ctx, H0, H1, torch.arange(F).repeat_interleave(F), torch.arange(F).repeat(F)).view(F, F)
    dense = linear_assignment_dense(full)  # with every candidate, the sparse LAP is the dense one
    assert dict(zip(rp.feature_a.tolist(), rp.feature_b.tolist())) == dict(enumerate(dense.tolist()))
    few = full_assignment(strict, ctx, H0, H1, n_candidates=2)  # forced pairs complete what the LAP leaves
    assert few.n_pairs == F and len(set(few.feature_b.tolist())) == F
    assert strict.cfg.assignment == "nearest" and strict.cfg.null_alpha == 1e-6  # the run's matcher is unchanged


def test_equal_coverage_curves_equal_the_substitution_of_the_same_pairs(tiny_lm, tiny_saes, dm):
    F = tiny_saes[H1].cfg.d_sae
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(F, generator=g)  # identity pairs of H1 onto itself, ranked in a random order
    rp = RankedPairs(H1, H1, perm, perm, torch.arange(F, dtype=torch.float64), n_features_a=F, n_features_b=F)
    grid = (0.25, 0.5, 1.0)
    curves = CoverageCurves([rp], tiny_saes, grid, code_scale="fold", with_ce=True)
    no_ce = CoverageCurves([rp], tiny_saes, grid, code_scale="fold", with_ce=False)
    half = rp.n_at(0.5)
    rows = [{"feature_a": i, "feature_b": i, "distance": 0.0, "margin": 1.0, "matched": int(i in perm[:half].tolist())}
            for i in range(F)]
    res = evaluate_functional(tiny_lm, tiny_saes, dm, {"half": [pair_matching(H1, H1, rows, F, F)],
                                                       "id": [identity_matching(H1, F)]}, QUIET,
                              consumers=[curves, no_ce])
    c = curves.results()[rp.key]
    key = f"{H1}|{H1}"
    assert c["n_pairs"] == [F // 4, F // 2, F] and c["fraction"] == [0.25, 0.5, 1.0] and len(c["corr"]) == 3
    for f, label in ((0.5, "half"), (1.0, "id")):
        sub = res[label]["pairs"][key]["substitution"]
        i = grid.index(f)
        assert c["explained_variance"][i] == pytest.approx(sub["explained_variance"], abs=1e-9)
        assert c["delta_ce"][i] == pytest.approx(sub["delta_ce"], abs=1e-9)
    assert c["full"]["explained_variance"] == res["id"]["pairs"][key]["baselines"]["sae"]["explained_variance"]
    assert c["explained_variance"][0] < c["explained_variance"][1] < c["explained_variance"][2]
    assert c["corr"][2] == pytest.approx(1.0) and c["precision"][2] == pytest.approx(1.0)
    assert c["auc"]["explained_variance"] == pytest.approx(curve_auc(c["fraction"], c["explained_variance"]))
    n = no_ce.results()[rp.key]
    assert n["explained_variance"] == c["explained_variance"] and all(math.isnan(x) for x in n["delta_ce"])
    with pytest.raises(ValueError, match="coverage_grid"):
        FunctionalSettings(coverage_grid=(0.5, 0.2))


# ---------------------------------------------------------------------------- end to end on run dirs
def _no_sae_training(monkeypatch) -> list:
    """Make every way of training or provisioning an SAE raise; return the records that
    ``RunDir.load_saes`` loads (the only way left)."""
    import saeot.pipeline.rundir as rundir
    import saeot.saes.providers as providers
    import saeot.saes.training as training
    from saeot.saes import DiskSAEs, LocalTrainedSAEs, PretrainedSAEs

    def refuse(*a, **k):
        raise AssertionError("the evaluation trained or provisioned an SAE")

    for cls in (LocalTrainedSAEs, DiskSAEs, PretrainedSAEs):
        monkeypatch.setattr(cls, "load", refuse)
    monkeypatch.setattr(training, "train_sae", refuse)  # the one training path on sae_lens
    monkeypatch.setattr(providers, "train_sae", refuse)
    loaded: list = []
    real = rundir.load_recorded

    def recording(record, device):
        loaded.append(record)
        return real(record, device)

    monkeypatch.setattr(rundir, "load_recorded", recording)
    return loaded


def test_evaluate_runs_writes_metrics_table_and_report_without_training(tmp_path, compose_cfg, monkeypatch):
    cache = tmp_path / "cache"
    dirs = [tmp_path / "sm", tmp_path / "copy"]
    train_run(compose_cfg, dirs[0], cache, "sae_match")
    shutil.copytree(dirs[0], dirs[1])  # a second run sharing everything: one streaming pass for both
    records = json.loads((dirs[0] / "saes.json").read_text())
    loaded = _no_sae_training(monkeypatch)
    cfg = compose_cfg(f"paths.cache_dir={cache}", "functional.progress=false", config_name="evaluate",
                      run_dir=tmp_path / "eval")
    out = evaluate_runs(cfg, dirs, tmp_path / "eval")
    assert len(loaded) == 2 and sorted(map(json.dumps, loaded)) == sorted(map(json.dumps, records.values()))
    assert [r["matcher"] for r in out["rows"]] == ["sae_match (sm)", "sae_match (copy)"]
    k = "blocks.1.hook_resid_post|blocks.2.hook_resid_post"
    funcs = []
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["matching"]["matcher"] == "sae_match"  # the train metrics survive
        f = metrics["functional"]
        assert f["saes"] == records and f["n_runs_sharing_pass"] == 2
        assert f["split"] == "fresh" and f["n_tokens"] > 0, f["split_note"]
        p = f["pairs"][k]
        assert 0 < p["baselines"]["sae"]["explained_variance"] <= 1
        assert p["substitution"]["explained_variance"] < p["baselines"]["sae"]["explained_variance"]
        assert p["coverage"]["frac_a_matched"] + p["coverage"]["frac_no_match"] == pytest.approx(1.0)
        assert p["coverage"]["n_dropped_many_to_one"] == 0  # sae_match is one-to-one
        assert (d / "report.html").stat().st_size > 1000
        funcs.append(p)
    assert funcs[0]["substitution"] == funcs[1]["substitution"] and funcs[0]["baselines"] == funcs[1]["baselines"]
    md = (tmp_path / "eval" / "functional_table.md").read_text()
    assert md.count("| 1→2 |") == 2 and "EV sub" in md
    assert len((tmp_path / "eval" / "functional_table.csv").read_text().strip().splitlines()) == 3
    for p in funcs:  # equal coverage: sae_match's full assignment, whatever its own null decided
        c = p["equal_coverage"]
        assert c["full"]["n_pairs"] == c["n_features_a"] and c["full"]["fraction"] == 1.0
        assert c["grid"] == pytest.approx([0.1 * i for i in range(1, 11)]) and len(c["delta_ce"]) == 10
    cov = (tmp_path / "eval" / "equal_coverage.md").read_text()
    assert cov.count("| 1→2 |") == 2 and "AUC EV" in cov
    assert (tmp_path / "eval" / "plots" / "equal_coverage.png").stat().st_size > 5000
    assert "explained_variance@0.5" in (tmp_path / "eval" / "equal_coverage.csv").read_text().splitlines()[0]
    # the bootstrap (functional.bootstrap=200 by default): intervals, and the two copies paired with each other
    import csv

    with open(tmp_path / "eval" / "equal_coverage.csv", newline="") as f:
        ec = list(csv.DictReader(f))
    assert [r["auc_ev_best_other"] for r in ec] == ["sae_match (copy)", "sae_match (sm)"]
    for r in ec:  # the same run twice: the same numbers in every replicate
        assert float(r["auc_ev_lo"]) < float(r["auc_ev"]) < float(r["auc_ev_hi"])
        assert float(r["auc_ev_vs_best_lo"]) == 0.0 == float(r["auc_ev_vs_best_hi"])
        assert float(r["auc_dce_vs_best_lo"]) == 0.0 == float(r["auc_dce_vs_best_hi"])
    assert funcs[0]["equal_coverage"]["bootstrap"]["replicates"] == 200 and " [" in cov
    with open(tmp_path / "eval" / "deactivation_pairs.csv", newline="") as f:  # the test's pairs, per run
        dp = list(csv.DictReader(f))
    n_sampled = funcs[0]["equal_coverage"]["n_deactivation_pairs"]
    assert n_sampled > 0 and len(dp) == 2 * n_sampled
    assert [r["feature_a"] for r in dp if r["matcher"] == "sae_match (sm)"] == [
        str(i) for i in funcs[0]["equal_coverage"]["deactivation_pairs"]["feature_a"]]
    assert all(-1 <= float(r["transfer_cos"]) <= 1 for r in dp)
    silent = [float(r["j_clean"]) == 0 for r in dp if r["matcher"] == "sae_match (sm)"]
    assert float(ec[0]["deact_silent"]) == pytest.approx(sum(silent) / len(silent), abs=1e-5)
    run = RunDir.load(dirs[0])  # the rest of what the run wrote reads back as it was written
    assert run.matcher == "sae_match" and run.hooks == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    samples = run.samples(run.hooks[0])
    assert samples.n_features == run.load_saes()[run.hooks[0]].cfg.d_sae
    assert torch.equal(run.alive()[run.hooks[0]], samples.n_fire > 0)
    assert run.reference().dim is not None


@pytest.mark.parametrize("matcher", ["activation_correlation", "semantic_ot"])
def test_full_assignment_rebuilds_what_the_matcher_reads_from_the_run_dir(tmp_path, compose_cfg, matcher):
    """Correlations streamed again over the run's held-out split / samples projected by its reference space."""
    from saeot.evaluation.functional import assign_run

    run_dir = tmp_path / "run"
    train_run(compose_cfg, run_dir, tmp_path / "cache", matcher)
    run = RunDir.load(run_dir)
    lm = run.load_model()
    saes = run.load_saes()
    pairs = [tuple(run.hooks)]
    (rp,) = assign_run(run, saes, run.data_module(lm), pairs, n_candidates=8)
    F = saes[run.hooks[0]].cfg.d_sae
    assert rp.n_pairs == F and len(set(rp.feature_b.tolist())) == F
    real = rp.cost[: rp.n_pairs - rp.n_forced]
    assert torch.all(real[1:] >= real[:-1]) and torch.isfinite(real).all()
    own = {int(r["feature_a"]): (int(r["feature_b"]), float(r["distance"])) for r in run.rows}
    best = min(own.values(), key=lambda x: x[1])  # the run's overall best pair is also the full assignment's best
    assert float(rp.cost[0]) == pytest.approx(best[1], rel=1e-5)


def test_evaluate_py_finds_a_circuit_on_a_finished_runs_saes(tmp_path, compose_cfg, monkeypatch):
    """``evaluate.py evaluation=circuit run_dir=... circuit=digit_addition callbacks=circuit``: no retraining."""
    from saeot.circuits import load_graph

    cache, run_dir, out = tmp_path / "cache", tmp_path / "run", tmp_path / "eval"
    train_run(compose_cfg, run_dir, cache, "semantic_ot")
    loaded = _no_sae_training(monkeypatch)
    cfg = compose_cfg("evaluation=circuit", f"run_dir={run_dir}", f"paths.cache_dir={cache}", "circuit=digit_addition",
                      "circuit.n_prompts=12", "callbacks=circuit", "callbacks.circuit.n_exact=0",
                      "callbacks.circuit.max_nodes=8", "callbacks.circuit.progress=false", "callbacks.circuit.plot=true",
                      "callbacks.circuit.curve_ratios=[1,2]", config_name="evaluate", run_dir=out)
    m = run_evaluate(cfg, out)
    assert len(loaded) == 2 and m["run_dir"] == str(run_dir) and m["task"] == "digit_addition"
    saved = json.loads((out / "metrics.json").read_text())["circuit"]
    assert saved["nodes"] == m["nodes"] and set(saved["curves"]) == {"semantic_ot", "decoder_cosine",
                                                                    "attribution_profile", "random"}
    assert all(len(pts) == len(saved["curve_counts"]) for pts in saved["curves"].values())
    assert len(load_graph(out / "circuit.json").circuit_nodes()) == m["nodes"]
    assert (out / "circuit_curves.png").is_file()
    bare = compose_cfg("evaluation=circuit", f"run_dir={run_dir}", "circuit=digit_addition", config_name="evaluate")
    with pytest.raises(ValueError, match="callbacks=circuit"):
        run_evaluate(bare, out)


def test_a_run_dir_without_saes_json_is_refused_with_the_fix(tmp_path, compose_cfg):
    old = tmp_path / "old_run"
    (old / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_cfg("experiment=smoke", "logger=none"), old / ".hydra" / "config.yaml")
    (old / "matches.csv").write_text("layer_a,feature_a,layer_b,feature_b,distance,margin,matched\n")
    with pytest.raises(FileNotFoundError, match=r"saes\.json is missing.*rerun train\.py"):
        RunDir.load(old)
    cfg = compose_cfg(f"run_dir={old}", "functional.progress=false", config_name="evaluate", run_dir=tmp_path / "e")
    with pytest.raises(FileNotFoundError, match=r"saes\.json"):
        run_evaluate(cfg, tmp_path / "e")


def test_evaluate_py_chooses_one_evaluation():
    def cfg(**kw):
        return OmegaConf.create({"evaluation": None, "run_dir": None, "run_dirs": None, "synthetic": None, **kw})

    assert select_evaluation(cfg(run_dir="a")).name == "run_dir"
    assert select_evaluation(cfg(run_dirs=["a", "b"])).name == "run_dirs"
    assert select_evaluation(cfg(synthetic={"seed": 0})).name == "synthetic"
    assert select_evaluation(cfg(run_dir="a", synthetic={"seed": 0}, evaluation="synthetic")).name == "synthetic"
    with pytest.raises(ValueError, match="nothing to evaluate"):
        select_evaluation(cfg())
    with pytest.raises(ValueError, match="choose one with evaluation="):
        select_evaluation(cfg(run_dir="a", synthetic={"seed": 0}))
    with pytest.raises(ValueError, match="evaluation='bogus'"):
        select_evaluation(cfg(run_dir="a", evaluation="bogus"))
    with pytest.raises(ValueError, match="needs run_dirs="):
        select_evaluation(cfg(run_dir="a", evaluation="run_dirs"))


# ---------------------------------------------------------------------------- report
class _Structure(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.classes: dict[str, int] = {}
        self.text = []
        self.external = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        for k in ("src", "href"):
            if a.get(k):
                self.external.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def _report_html() -> str:
    nasty = Context(left="if a < b && c > d: <script>alert(1)</script> ", token="</td>", right=" \"q\" 'x'",
                    activation=3.5)
    pairs = [{"feature_a": i, "feature_b": i + 1, "distance": 0.1 * i, "margin": 0.05, "label": lab,
              "contexts_a": [nasty, _ctx("cat")], "contexts_b": [_ctx("kitten", act=2.0)]}
             for i, lab in enumerate(["same", "maybe", None])]
    sections = [{"title": "layer 3 → layer 4", "coverage": {"frac_a_matched": 0.5}, "pairs": pairs,
                 "no_match_ids": [7, 8, 9], "no_match": [{"feature_a": 7, "best_b": 2, "distance": math.inf,
                                                          "contexts_a": [_ctx("x")], "contexts_b": []}]},
                {"title": "layer 3 → layer 7", "coverage": {}, "pairs": [], "no_match_ids": [], "no_match": []}]
    return render_report("report <of> run", {"run": "/tmp/a&b"}, sections)


def test_report_is_escaped_and_structured():
    text = _report_html()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;/td&gt;" in text
    p = _Structure()
    p.feed(text)
    assert p.external == []  # self-contained
    assert p.tags["section"] == 2 and p.tags["style"] == 1 and p.tags.get("script", 0) == 0
    assert p.classes["matches"] == 1 and p.classes["nomatch"] == 1
    assert p.tags["mark"] == 3 * 3 + 1  # every context of every shown pair and of the no-match row
    assert p.classes["lab-same"] == 1 and p.classes["lab-maybe"] == 1
    assert "report <of> run" in "".join(p.text)  # escaped, then decoded back to the same text


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


# in CI (.ci/run installs chromium; CI=true) a missing chromium is a failure, not a skip
@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="no chromium: structure is checked by test_report_is_escaped_and_structured")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    exe = _chromium()
    assert exe is not None, "CI=true but chromium is not installed (.ci/run installs it with apt-get)"
    page = tmp_path / "report.html"
    page.write_text(_report_html())
    png = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", f"--screenshot={png}",
                    page.as_uri()], capture_output=True, timeout=120, check=False)
    assert png.is_file() and png.stat().st_size > 1000
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.std() > 5  # not a uniform page
    assert (img < 100).mean() > 0.001  # some dark text was drawn


def test_markdown_table_has_one_row_per_run_and_pair():
    row = {"matcher": "m", "layer_a": 3, "layer_b": 4, "ev_sub": 0.5, "dce_sub": 0.1, "judge_n": 0}
    md = format_markdown([row, {**row, "matcher": "n", "layer_b": 7}])
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert len(lines) == 3 and "| m | 3→4 | 0.500 | 0.100 |" in lines[1] and "judge" not in lines[0]



def test_run_dirs_accept_glob_patterns(tmp_path):
    for name in ("0_m=a,l=[3,4]", "1_m=b", "2_unfinished"):
        (tmp_path / name).mkdir()
    for name in ("0_m=a,l=[3,4]", "1_m=b"):
        (tmp_path / name / "matches.csv").write_text("x\n")
    literal = str(tmp_path / "0_m=a,l=[3,4]")
    assert _expand([f"{tmp_path}/*"]) == [literal, str(tmp_path / "1_m=b")]
    assert _expand([literal]) == [literal]  # brackets of a real path are not a pattern
    with pytest.raises(FileNotFoundError, match="matches no"):
        _expand([f"{tmp_path}/nothing*"])


def _data_run(tmp_path: Path, max_contexts) -> RunDir:
    """A RunDir whose config holds only what the data module needs (layers, data)."""
    data = {"_target_": "saeot.data.datamodule.HiddenStateDataModule",
            "text": {"_target_": "saeot.data.text.StdlibDocstrings", "max_docs": 60},
            "context_len": 32, "max_contexts": max_contexts, "heldout_fraction": 0.25, "batch_size": 4}
    cfg = OmegaConf.create({"data": data, "layers": {"ids": [0, 1], "site": "resid_post", "pairs": "adjacent"}})
    return RunDir(path=tmp_path, cfg=cfg, matcher="m", rows=[], sae_records={}, label="m")


def test_fresh_split_is_text_after_the_runs_contexts(tiny_lm, tmp_path):
    run = _data_run(tmp_path, 12)
    own = run.data_module(tiny_lm)  # the data module the run itself used
    before = own.contexts.clone()
    data = evaluation_data(run, tiny_lm, FunctionalSettings(fresh_contexts=5))
    dm = data.datamodule
    assert data.split == "fresh" and data.note == "5 contexts packed after the run's 12"
    assert torch.equal(dm.contexts[:12], before) and dm.splits["fresh"].tolist() == list(range(12, 17))
    assert not any(torch.equal(dm.contexts[i], before[j]) for i in range(12, 17) for j in range(12))
    assert sum(int(b["mask"].sum()) for b in dm.iter_batches("fresh", hidden=False)) == 5 * 31
    assert dm.fingerprint() == own.fingerprint()  # the run's SAE cache keys are unchanged
    for split in ("profile", "heldout"):
        assert torch.equal(dm.splits[split], own.splits[split])
    assert evaluation_data(run, tiny_lm, FunctionalSettings()).datamodule.n_contexts("fresh") == 3  # = heldout
    all_text = evaluation_data(_data_run(tmp_path, None), tiny_lm, FunctionalSettings(fresh_contexts=5))
    assert all_text.split == "heldout" and "all of its text" in all_text.note
    assert "fresh" not in all_text.datamodule.splits


# ---------------------------------------------------------------------------- causal deactivation
def _one_heldout_batch(tiny_lm, tiny_saes, dm):
    """One held-out batch of the tiny model: ``tokens, mask``, the clean states at H0 / H1 and their codes."""
    from saeot.saes.codes import encode

    batch = next(iter(dm.iter_batches("heldout", device=torch.device("cpu"), progress=False, desc="t",
                                      hooks=None, hidden=False)))
    tokens, mask = batch["tokens"], batch["mask"]
    with torch.no_grad():
        _, cache = tiny_lm.model.run_with_cache(tokens, names_filter=[H0, H1])
        h0, h1 = cache[H0].float(), cache[H1].float()
        ca, cb = encode(tiny_saes[H0], h0), encode(tiny_saes[H1], h1)
    return tokens, mask, h0, h1, ca, cb


def test_deactivation_drop_equals_an_ablation_run_through_hooks(tiny_lm, tiny_saes, dm):
    """Deactivation across two different layers (0 -> 1): removing i's decoder contribution at A where it
    fires, j's relative drop at B equals the same ablation done with a forward hook on the whole model."""
    from saeot.evaluation.functional._deactivation import SUCCESS_DROP, DeactivationAccumulator, sample_ranks
    from saeot.evaluation.functional._substitution import run_between
    from saeot.saes.codes import encode

    model = tiny_lm.model
    sa, sb = tiny_saes[H0], tiny_saes[H1]
    tokens, mask, h0, h1, ca, cb = _one_heldout_batch(tiny_lm, tiny_saes, dm)
    with torch.no_grad():
        assert torch.allclose(run_between(model, H0, H1, h0), h1, atol=1e-4)
    fires = ((ca > 0) & mask[..., None]).sum((0, 1))
    fa = torch.argsort(fires, descending=True)[:6]  # features of A that fire in this batch
    fb = torch.tensor([int((cb[..., :][(ca[..., i] > 0) & mask]).sum(0).argmax()) for i in fa])  # j co-firing most
    acc = DeactivationAccumulator(sa, sb, fa, fb, stack_contexts=3)
    acc.update(lambda a, b, h: run_between(model, a, b, h), H0, H1, h0, ca, cb, mask)
    got = acc.per_pair()
    for q, (i, j) in enumerate(zip(fa.tolist(), fb.tolist())):
        fire = (ca[..., i] > 0) & mask

        def ablate(act, hook, i=i, fire=fire):
            return act - torch.where(fire, ca[..., i], torch.zeros(())).unsqueeze(-1) * sa.W_dec[i].detach()

        store = {}
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(H0, ablate), (H1, lambda act, hook: store.update(h=act))])
            zj = encode(sb, store["h"].float())[..., j]
        want = 1 - float(zj[fire].sum()) / float(cb[..., j][fire].sum())
        assert got["change"][q].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert got["success"][q].item() == float(want >= SUCCESS_DROP)
    assert float(got["change"].abs().max()) > 0  # removing a feature moved its co-firing partner somewhere
    assert sample_ranks(100, 5).tolist() == [0, 25, 50, 74, 99] and sample_ranks(3, 8).tolist() == [0, 1, 2]


def test_deactivation_sums_are_the_same_with_per_context_sums_over_many_stacks(tiny_lm, tiny_saes, dm):
    """Keeping the per-context sums (the bootstrap) must not change which pairs get tested: with stacks of
    one context (many stacks per batch) every pair's sums equal those without, and the per-context sums add
    up to them (a loop variable once shadowed the list of stacks and ended the batch after the first)."""
    from saeot.evaluation.functional._deactivation import DeactivationAccumulator
    from saeot.evaluation.functional._substitution import run_between

    model = tiny_lm.model
    sa, sb = tiny_saes[H0], tiny_saes[H1]
    tokens, mask, h0, h1, ca, cb = _one_heldout_batch(tiny_lm, tiny_saes, dm)
    fires = ((ca > 0) & mask[..., None]).sum((0, 1))
    fa = torch.argsort(fires, descending=True)[:8]
    fb = torch.tensor([int((cb[(ca[..., i] > 0) & mask]).sum(0).argmax()) for i in fa])
    between = lambda a, b, h: run_between(model, a, b, h)  # noqa: E731
    accs = [DeactivationAccumulator(sa, sb, fa, fb, stack_contexts=1, per_context=pc) for pc in (False, True)]
    for acc in accs:
        acc.update(between, H0, H1, h0, ca, cb, mask)
    assert bool((accs[0].clean > 0).all())  # every pair tested: j fires on i's tokens
    assert torch.equal(accs[0].clean, accs[1].clean) and torch.equal(accs[0].ablated, accs[1].ablated)
    clean, ablated = accs[1].context_sums()
    assert clean.shape == (tokens.shape[0], len(fa))
    torch.testing.assert_close(clean.sum(0), accs[1].clean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ablated.sum(0), accs[1].ablated, rtol=1e-9, atol=1e-9)


def test_equal_coverage_curves_carry_deactivation_over_the_sampled_ranks(tiny_lm, tiny_saes, dm):
    F = tiny_saes[H0].cfg.d_sae
    g = torch.Generator().manual_seed(4)
    fa, fb = torch.randperm(F, generator=g), torch.randperm(F, generator=g)
    rp = RankedPairs(H0, H1, fa, fb, torch.arange(F, dtype=torch.float64), n_features_a=F, n_features_b=F)
    curves = CoverageCurves([rp], tiny_saes, (0.5, 1.0), code_scale="fold", with_ce=False, deactivation=F)
    evaluate_functional(tiny_lm, tiny_saes, dm, {"id": [identity_matching(H1, F)]}, QUIET, consumers=[curves])
    c = curves.results()[rp.key]
    per = curves.curves[rp.key].deact.per_pair()
    assert c["n_deactivation_pairs"] == F
    assert c["deactivation"][0] == pytest.approx(float(per["change"][: F // 2].mean()))
    assert c["deactivation"][1] == pytest.approx(float(per["change"].mean()))
    assert c["deactivation_success"][1] == pytest.approx(float(per["success"].mean()))
    # where the successes are lost: the per-pair rows and their summary agree with the accumulator and the SAEs
    dp, why = c["deactivation_pairs"], c["deactivation_why"]
    acc = curves.curves[rp.key].deact
    assert dp["feature_a"] == fa.tolist() and dp["feature_b"] == fb.tolist() and dp["j_clean"] == acc.clean.tolist()
    silent = acc.clean == 0
    assert 0 < int(silent.sum()) < F  # random pairs: some j never fire on i's tokens, some do
    assert why["silent"] == pytest.approx(float(silent.double().mean()))
    assert why["success_given_fires"] == pytest.approx(float(per["success"][~silent].mean()))
    q = 3
    sa, sb = tiny_saes[H0], tiny_saes[H1]
    d_i, e_j, d_j = sa.W_dec[fa[q]].detach(), sb.W_enc[:, fb[q]].detach(), sb.W_dec[fb[q]].detach()
    assert dp["transfer_cos"][q] == pytest.approx(float(d_i @ e_j / (d_i.norm() * e_j.norm())), abs=1e-5)
    assert dp["decoder_cos"][q] == pytest.approx(float(d_i @ d_j / (d_i.norm() * d_j.norm())), abs=1e-5)
    assert why["transfer_cos"] == pytest.approx(sum(dp["transfer_cos"]) / F)
    off = CoverageCurves([rp], tiny_saes, (1.0,), code_scale="fold", with_ce=False, deactivation=0)
    assert off.curves[rp.key].deact is None
    with pytest.raises(ValueError, match="coverage_deactivation"):
        FunctionalSettings(coverage_deactivation=-1)


# ---------------------------------------------------------------------------- bootstrap over contexts
def _boot_ranked(F: int) -> list:
    g = torch.Generator().manual_seed(5)
    fa, fb, ranks = torch.randperm(F, generator=g), torch.randperm(F, generator=g), torch.arange(F, dtype=torch.float64)
    return [RankedPairs(H0, H1, fa, fb, ranks, n_features_a=F, n_features_b=F),
            RankedPairs(H1, H1, fb, fb, ranks, n_features_a=F, n_features_b=F)]


BOOT_GRID = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def boot_pass(tiny_lm, tiny_saes, dm):
    """One pass with the same curves twice: bootstrap=40 (seed 1) and off."""
    ranked = _boot_ranked(tiny_saes[H0].cfg.d_sae)
    boot = CoverageCurves(ranked, tiny_saes, BOOT_GRID, with_ce=True, deactivation=12, bootstrap=40, bootstrap_seed=1)
    off = CoverageCurves(ranked, tiny_saes, BOOT_GRID, with_ce=True, deactivation=12)
    F = tiny_saes[H1].cfg.d_sae
    evaluate_functional(tiny_lm, tiny_saes, dm, {"id": [identity_matching(H1, F)]}, QUIET, consumers=[boot, off])
    return boot, off


def test_bootstrap_with_all_ones_weights_is_the_point_estimate(boot_pass, dm):
    """Every curve and area recomputed from the per-context sums with weight 1 on every context equals the
    point estimate (accumulated as before, over all tokens at once); bootstrap=0 keeps the results as they were.
    Intervals on constructed sums and the paired differences: test_bootstrap.py."""
    from saeot.evaluation.functional import CURVE_METRICS, replicate_weights

    boot, off = boot_pass
    n_contexts = dm.n_contexts("heldout")
    digests = set()
    for key, pc in boot.curves.items():
        c, o = pc.result, off.curves[key].result
        assert not {"auc_ci", "auc_boot", "bootstrap"} & set(o)  # off: the result as it was
        same = {k: v for k, v in c.items() if k not in ("auc_ci", "auc_boot", "bootstrap")}
        assert json.dumps(same, sort_keys=True) == json.dumps(o, sort_keys=True)  # the point estimate is unchanged
        assert pc.sums.n_contexts == n_contexts == c["bootstrap"]["n_contexts"]
        ones = torch.ones(1, n_contexts)
        curves, aucs = pc.sums.curves(ones), pc.sums.aucs(ones)
        for m in CURVE_METRICS:
            assert all(math.isfinite(v) for v in c[m]), (key, m)  # every metric is measured here
            np.testing.assert_allclose(curves[m][0].numpy(), c[m], rtol=1e-9, atol=1e-12, err_msg=f"{key} {m}")
            assert aucs[m][0] == pytest.approx(c["auc"][m], rel=1e-9, abs=1e-12), (key, m)
            assert len(c["auc_boot"][m]) == 40 and c["auc_ci"][m][0] <= c["auc_ci"][m][1]
        w = replicate_weights(n_contexts, 40, 1)  # what finish() drew: a function of the seed and C only
        assert pc.sums.aucs(w)["explained_variance"].tolist() == c["auc_boot"]["explained_variance"]
        assert c["auc_ci"]["explained_variance"][0] < c["auc_ci"]["explained_variance"][1]
        digests.add(c["bootstrap"]["contexts_digest"])
    assert len(digests) == 1  # every layer pair saw the same contexts


class _SomeRows:
    """The data module with only rows ``rows`` of every batch."""

    def __init__(self, dm, rows):
        self.dm, self.rows = dm, list(rows)

    def iter_batches(self, *a, **k):
        for b in self.dm.iter_batches(*a, **k):
            yield {n: ({h: t[self.rows] for h, t in v.items()} if isinstance(v, dict) else v[self.rows])
                   for n, v in b.items()}


def test_bootstrap_weights_reweight_the_contexts_they_name(boot_pass, tiny_lm, tiny_saes, dm):
    """Weight 1 on rows 1 and 3 of every batch, 0 elsewhere, gives what a pass over only those contexts
    measures (ΔCE, correlation, deactivation; EV's squared error -- its sst has the full pass's mean): the
    per-context sums of every accumulator are aligned with the pass's contexts."""
    from saeot.evaluation.functional import CURVE_METRICS

    boot, _ = boot_pass
    assert dm.batch_size == 4 and dm.n_contexts("heldout") % 4 == 0
    sub = CoverageCurves(_boot_ranked(tiny_saes[H0].cfg.d_sae), tiny_saes, BOOT_GRID, with_ce=True, deactivation=12)
    F = tiny_saes[H1].cfg.d_sae
    evaluate_functional(tiny_lm, tiny_saes, _SomeRows(dm, [1, 3]), {"id": [identity_matching(H1, F)]}, QUIET,
                        consumers=[sub])
    w = (torch.arange(dm.n_contexts("heldout")) % 4 % 2 == 1).double()[None]
    for key, pc in boot.curves.items():
        want, got = sub.curves[key].result, pc.sums.curves(w)
        for m in (m for m in CURVE_METRICS if m != "explained_variance"):
            np.testing.assert_allclose(got[m][0].numpy(), want[m], rtol=1e-4, atol=1e-5, err_msg=f"{key} {m}")
        np.testing.assert_allclose((w @ pc.sums.sse)[0].numpy(), [sub.curves[key].sse[n] for n in pc.n], rtol=1e-5)
