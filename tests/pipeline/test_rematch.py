"""rematch.py: a finished run's features matched again under another matcher equal a train.py run
with that matcher (no profiling, no SAE training), and evaluate.py reads the result like a run dir."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from saeot.pipeline import run_train
from saeot.pipeline.completion import RUN_MARKER
from saeot.pipeline.rematch import run_rematch
from saeot.pipeline.rundir import RunDir


def _train(compose_cfg, run_dir: Path, cache: Path, matcher: str) -> None:
    cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache}", f"matcher={matcher}",
                      "data.max_contexts=16", "layers.ids=[1,2,3]", "layers.pairs=[[1,2],[1,3]]", run_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run_train(cfg, run_dir)


@pytest.mark.parametrize("matcher", ["feature_flow", "activation_correlation", "mean_embedding"])
def test_rematch_equals_a_train_run_with_that_matcher(tmp_path, compose_cfg, matcher, monkeypatch):
    cache = tmp_path / "cache"
    _train(compose_cfg, tmp_path / "src", cache, "semantic_ot")
    _train(compose_cfg, tmp_path / "direct", cache, matcher)

    from saeot.profiling.stream import ProfileConsumer
    from saeot.saes.providers import LocalTrainedSAEs

    def refuse(*a, **k):
        raise AssertionError("rematch profiled again or provisioned an SAE")

    monkeypatch.setattr(ProfileConsumer, "__init__", refuse)  # every profiling pass builds one
    monkeypatch.setattr(LocalTrainedSAEs, "load", refuse)
    cfg = compose_cfg(f"run_dir={tmp_path / 'src'}", f"matcher={matcher}", config_name="rematch",
                      run_dir=tmp_path / "re")
    metrics = run_rematch(cfg, tmp_path / "re")
    re_, direct = tmp_path / "re", tmp_path / "direct"
    assert (re_ / "matches.csv").read_bytes() == (direct / "matches.csv").read_bytes()
    assert (re_ / "flows.csv").read_bytes() == (direct / "flows.csv").read_bytes()
    assert metrics["matching"]["matcher"] == json.loads((direct / "metrics.json").read_text())["matching"]["matcher"]
    assert (re_ / RUN_MARKER).is_file()
    res = json.loads((re_ / "metrics.json").read_text())["resources"]
    assert [s["stage"] for s in res["stages"]] == ["load", "matching"] and res["peak_rss_gb"] > 0.05
    run = RunDir.load(re_)
    src = RunDir.load(tmp_path / "src")
    assert run.matcher == metrics["matching"]["matcher"] and run.cfg.matcher._target_.endswith(
        {"feature_flow": "FeatureFlow", "activation_correlation": "ActivationCorrelation",
         "mean_embedding": "MeanEmbedding"}[matcher])
    assert run.setup_key() == src.setup_key()  # evaluate.py streams one pass for both
    assert (re_ / "features" / f"{run.hooks[0]}.safetensors").read_bytes() == src.features_path(run.hooks[0]).read_bytes()
    assert json.loads((tmp_path / "src" / "metrics.json").read_text())["matching"]["matcher"] == "semantic_ot"


def test_rematch_refuses_a_missing_or_unfinished_run(tmp_path, compose_cfg):
    cfg = compose_cfg(config_name="rematch", run_dir=tmp_path / "re")
    with pytest.raises(ValueError, match="run_dir"):
        run_rematch(cfg, tmp_path / "re")
    (tmp_path / "half" / ".hydra").mkdir(parents=True)
    (tmp_path / "half" / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / "half" / "matches.csv").write_text("")
    (tmp_path / "half" / "saes.json").write_text("{}")
    cfg = compose_cfg(f"run_dir={tmp_path / 'half'}", config_name="rematch", run_dir=tmp_path / "re")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        run_rematch(cfg, tmp_path / "re")
    assert not (tmp_path / "re" / "matches.csv").exists()


def test_rematched_runs_share_the_evaluation_pass_and_functional_pairs_selects(tmp_path, compose_cfg):
    from saeot.evaluation.functional import evaluate_runs

    cache = tmp_path / "cache"
    _train(compose_cfg, tmp_path / "src", cache, "semantic_ot")
    cfg = compose_cfg(f"run_dir={tmp_path / 'src'}", "matcher=feature_flow", config_name="rematch",
                      run_dir=tmp_path / "ff")
    run_rematch(cfg, tmp_path / "ff")
    ev = compose_cfg(f"paths.cache_dir={cache}", "functional.progress=false", "functional.report=false",
                     "functional.pairs=[[1,3]]", "functional.fresh_contexts=4", "functional.coverage_grid=[0.5,1.0]",
                     config_name="evaluate", run_dir=tmp_path / "eval")
    out = evaluate_runs(ev, [tmp_path / "src", tmp_path / "ff"], tmp_path / "eval")
    assert sorted(r["matcher"] for r in out["rows"]) == ["feature_flow", "semantic_ot"]
    for d in ("src", "ff"):
        f = json.loads((tmp_path / d / "metrics.json").read_text())["functional"]
        assert list(f["pairs"]) == ["blocks.1.hook_resid_post|blocks.3.hook_resid_post"]  # 1->2 left out
        assert f["n_runs_sharing_pass"] == 2 and "equal_coverage" in f["pairs"]["blocks.1.hook_resid_post|blocks.3.hook_resid_post"]
    bad = compose_cfg(f"paths.cache_dir={cache}", "functional.pairs=[[2,3]]", config_name="evaluate",
                      run_dir=tmp_path / "eval2")
    with pytest.raises(ValueError, match=r"functional.pairs has \[\[2, 3\]\]"):
        evaluate_runs(bad, [tmp_path / "src"], tmp_path / "eval2")
    with pytest.raises(ValueError, match="functional.pairs"):
        evaluate_runs(compose_cfg("functional.pairs=[[1]]", config_name="evaluate", run_dir=tmp_path / "e3"),
                      [tmp_path / "src"], tmp_path / "e3")
