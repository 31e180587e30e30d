"""The terminal summary a run ends with: what it reports is what the run's files say."""

import csv

import torch

from saeot.evaluation.summary import format_functional_summary
from saeot.models.codecs import ByteCodec
from saeot.pipeline import run_train
from saeot.pipeline.summary import format_run_summary, strongest_matches, top_tokens
from saeot.types import FeatureSamples, MatchResult


def _samples(hook: str, token_ids: list[list[int]], weights: list[list[float]]) -> FeatureSamples:
    F, K = len(token_ids), len(token_ids[0])
    w = torch.tensor(weights, dtype=torch.float32)
    return FeatureSamples(hook=hook, points=torch.zeros(F, K, 2), weights=w, n_fire=torch.ones(F),
                          act_sum=torch.ones(F), act_max=torch.ones(F), n_tokens=100,
                          token_ids=torch.tensor(token_ids), locations=torch.zeros(F, K, 2, dtype=torch.long),
                          activations=w.clone())


def _result(a: str, b: str, feature_b, distance, matched, threshold) -> MatchResult:
    n = len(feature_b)
    return MatchResult(hook_a=a, hook_b=b, matcher="m", feature_b=torch.tensor(feature_b),
                       distance=torch.tensor(distance, dtype=torch.float64), margin=torch.ones(n),
                       matched=torch.tensor(matched), null_threshold=threshold)


def test_top_tokens_ranks_distinct_tokens_by_summed_weight():
    # "b" twice at 0.3 (0.6) outweighs "a" once at 0.4; padding (-1) and zero weights never show
    s = _samples("blocks.0.hook_resid_post", [[ord("a"), ord("b"), ord("b"), -1, ord("z")]],
                 [[0.4, 0.3, 0.3, 0.0, 0.0]])
    assert top_tokens(s, 0, ByteCodec(), n=3) == ["'b'", "'a'"]
    empty = _samples("blocks.0.hook_resid_post", [[-1, -1]], [[0.0, 0.0]])
    assert top_tokens(empty, 0, ByteCodec()) == []


def test_strongest_matches_compare_layer_pairs_on_their_own_scale():
    """Pair 1 -> 2 has costs 100x those of 0 -> 1: its best match still ranks by how far below its own
    threshold it is, in its own spread, not by the raw cost; unmatched features never appear."""
    a, b, c = (f"blocks.{i}.hook_resid_post" for i in range(3))
    small = _result(a, b, [0, 1, 2, 3], [0.10, 0.20, 0.30, 0.05], [True, True, True, False], 0.35)
    large = _result(b, c, [3, 2, 1, 0], [10.0, 25.0, 30.0, 35.0], [True, True, True, True], 36.0)
    top = strongest_matches([small, large], n=3)
    # z-scores: small: (0.35 - d) / std(0.1, 0.2, 0.3, 0.05) = 2.25, 1.35, 0.45 (feature 3 unmatched)
    #           large: (36 - d) / std(10, 25, 30, 35)        = 2.41, 1.02, 0.56, 0.09
    assert [(m.hook_a, m.feature_a, m.feature_b) for m in top] == [(b, 0, 3), (a, 0, 0), (a, 1, 1)]
    assert top[0].below > top[1].below > top[2].below > 0
    # no finite threshold: the pair's median cost stands in, so the order is the order of the costs
    nothr = _result(a, b, [0, 1, 2], [3.0, 1.0, 2.0], [True, True, True], float("nan"))
    assert [m.feature_a for m in strongest_matches([nothr], n=3)] == [1, 2, 0]


def test_run_summary_counts_and_tokens():
    a, b = "blocks.3.hook_resid_post", "blocks.4.hook_resid_post"
    res = _result(a, b, [1, 1, 0], [0.1, 0.2, 0.9], [True, True, False], 0.5)
    samples = {a: _samples(a, [[ord("x")], [ord("y")], [ord("q")]], [[1.0], [1.0], [1.0]]),
               b: _samples(b, [[ord("u")], [ord("v")]], [[1.0], [1.0]])}
    text = format_run_summary([res], samples, ByteCodec(), "/runs/r", next_commands=["python evaluate.py run_dir=/runs/r"])
    assert "L3 -> L4: 2 / 3 matched onto 1 distinct features, no-match threshold 0.5" in text
    strong = [ln for ln in text.splitlines() if "->" in ln and "sd" in ln]
    assert len(strong) == 2 and "L3 #0" in strong[0] and "'x'  ->  'v'" in strong[0]
    assert text.splitlines()[-1] == "  next: python evaluate.py run_dir=/runs/r"


def test_train_run_prints_the_summary_of_its_matches_csv(tmp_path, compose_cfg, capsys):
    cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}", run_dir=tmp_path / "run")
    run_train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    with open(tmp_path / "run" / "matches.csv") as f:
        rows = list(csv.DictReader(f))
    n_matched = sum(r["matched"] == "1" for r in rows)
    n_distinct = len({r["feature_b"] for r in rows if r["matched"] == "1"})
    assert f"L1 -> L2: {n_matched} / {len(rows)} matched onto {n_distinct} distinct features" in out
    assert (tmp_path / "run" / "summary.txt").read_text().strip() in out
    assert f"next: python evaluate.py run_dir={tmp_path / 'run'}" in out


def test_functional_summary_orders_matchers_by_auc_ev(tmp_path):
    rows = [{"matcher": m, "layer_a": 3, "layer_b": 4, "run_dir": str(tmp_path / m), "frac_a_matched": 0.5,
             "ev_sub": 0.4, "judge_mean": float("nan")} for m in ("low", "high")]
    cov = [{"matcher": m, "layer_a": 3, "layer_b": 4, "auc_ev": v, "auc_dce": 1.0, "auc_corr": 0.2,
            "auc_deact_success": 0.3} for m, v in (("low", 0.1), ("high", 0.6))]
    text = format_functional_summary({"rows": rows, "coverage_rows": cov, "table": "T.md"}, tmp_path)
    lines = text.splitlines()
    i_high = next(i for i, ln in enumerate(lines) if ln.strip().startswith("high"))
    i_low = next(i for i, ln in enumerate(lines) if ln.strip().startswith("low"))
    assert i_high < i_low and "0.600" in lines[i_high] and "0.100" in lines[i_low]
    assert "2 run(s), 1 layer pair(s)" in lines[0]


def test_metrics_record_seconds_and_peak_rss_per_stage(tmp_path, compose_cfg):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from saeot.pipeline import resources
    from saeot.pipeline.resources import peak_rss_gb

    run_train(compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                          run_dir=tmp_path / "run"), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())["resources"]
    assert [s["stage"] for s in res["stages"]] == ["setup", "profiling", "reference", "matching", "callbacks", "outputs"]
    peaks = [s["peak_rss_gb"] for s in res["stages"]]
    assert peaks == sorted(peaks) and 0.05 < peaks[-1] <= res["peak_rss_gb"] <= peak_rss_gb() + 1e-3
    assert sum(s["seconds"] for s in res["stages"]) <= res["seconds_total"]
    assert res["stages"][0]["seconds"] > 0.5  # setup trains two tiny SAEs
    # in a fresh process (this one's high-water mark is set by earlier tests): touching 0.3 GB in a
    # stage raises that stage's peak by about that much
    code = ("import importlib.util\n"  # the module alone: saeot.pipeline would load torch first, whose import peak could hide the growth
            f"spec = importlib.util.spec_from_file_location('resources', {str(Path(resources.__file__))!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "StageClock = mod.StageClock\n"
            "c = StageClock()\n"
            "with c.stage('idle'): pass\n"
            "with c.stage('grow'):\n"
            "    b = bytearray(300_000_000)\n"
            "    b[::4096] = b'x' * len(b[::4096])\n"
            "s = c.summary()['stages']\n"
            "print(s[1]['peak_rss_gb'] - s[0]['peak_rss_gb'])\n")
    grew = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.25 < grew < 0.4
