"""End to end: the real Hydra configs, composed as train.py composes them, on tiny data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeot.pipeline import MATCH_COLUMNS, ConfigError, build, fit_reference, match, run_train, setup, stream

ROOT = Path(__file__).resolve().parents[1]
MATCHERS = ["semantic_ot", "sae_match", "feature_flow", "activation_correlation", "mean_embedding"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("saeot-cache")


@pytest.fixture
def smoke_cfg(compose_cfg, cache_dir):
    """``experiment=smoke`` without a logger, SAEs cached for the module."""
    def make(run_dir, *overrides):
        return compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache_dir}", *overrides, run_dir=run_dir)
    return make


@pytest.mark.parametrize("matcher", MATCHERS)
def test_every_matcher_writes_matches_csv(tmp_path, smoke_cfg, matcher):
    run = run_train(smoke_cfg(tmp_path, f"matcher={matcher}"), tmp_path)
    with open(tmp_path / "matches.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == MATCH_COLUMNS
    n_a = run.saes["blocks.1.hook_resid_post"].cfg.d_sae
    assert len(rows) == n_a  # one row per feature of layer A (one pair)
    assert {r["layer_a"] for r in rows} == {"1"} and {r["layer_b"] for r in rows} == {"2"}
    matched = [r for r in rows if r["matched"] == "1"]
    assert all(0 <= int(r["feature_b"]) < n_a for r in matched)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["matching"]["matcher"] == matcher
    assert (tmp_path / "feature_stats.csv").is_file()
    assert (tmp_path / "plots" / "flow.png").stat().st_size > 1000


def test_semantic_ot_matches_a_layer_to_itself(tmp_path, smoke_cfg):
    """Layer 1 against a copy of itself: every live feature finds itself at distance 0."""
    cfg = smoke_cfg(tmp_path, "layers.ids=[1,2]")
    run = setup(cfg, tmp_path)
    streams = stream(run, build(cfg.trainer, logger=False))
    reference = fit_reference(cfg, streams)
    a = "blocks.1.hook_resid_post"
    res = match(run, streams, reference, pairs=((a, a),)).results[0]
    alive = streams.samples[a].alive
    assert torch.equal(res.feature_b[alive], torch.arange(len(alive))[alive])
    assert float(res.distance[alive].max()) < 1e-6


def test_feature_stats_match_a_direct_count(tmp_path, smoke_cfg):
    run = run_train(smoke_cfg(tmp_path), tmp_path)
    hook = "blocks.2.hook_resid_post"
    sae, dm = run.saes[hook], run.setup.datamodule
    n_fire = torch.zeros(sae.cfg.d_sae)
    n_tok = 0
    for batch in dm.iter_batches("profile"):
        acts = sae.encode(batch["hidden"][hook][batch["mask"]])
        n_fire += (acts > 0).sum(0)
        n_tok += acts.shape[0]
    with open(tmp_path / "feature_stats.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["hook"] == hook]
    freq = torch.tensor([float(r["firing_frequency"]) for r in rows])
    assert torch.allclose(freq, n_fire / n_tok, atol=1e-5)


@pytest.mark.parametrize("override,setting", [
    ("layers.ids=[1,9]", "layers.ids"),
    ("layers.pairs=[[1,3]]", "layers.pairs"),
    ("layers.pairs=sideways", "layers.pairs"),
    ("model=gpt2_small model.name=gpt9-nonexistent", "model.name"),
    ("data.max_contexts=1", "data"),
])
def test_bad_settings_fail_before_any_forward_pass(tmp_path, smoke_cfg, override, setting, monkeypatch):
    from transformer_lens import HookedTransformer

    def no_forward(*a, **k):
        raise AssertionError("forward pass before the settings were checked")

    monkeypatch.setattr(HookedTransformer, "forward", no_forward)
    cfg = smoke_cfg(tmp_path, *override.split())
    with pytest.raises((ConfigError, ValueError)) as e:
        setup(cfg, tmp_path)
    assert setting in str(e.value)


def test_sae_width_mismatch_fails_at_startup(tmp_path, smoke_cfg):
    from sae_lens import StandardSAE, StandardSAEConfig

    for layer in (1, 2):
        StandardSAE(StandardSAEConfig(d_in=48, d_sae=16)).save_model(tmp_path / f"sae_{layer}")
    cfg = smoke_cfg(tmp_path, "sae=from_disk", f"sae.path='{tmp_path}/sae_{{layer}}'")
    with pytest.raises(ValueError, match="d_in=48"):
        setup(cfg, tmp_path)


def test_cli_prints_one_line_error(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SAEOT_CACHE": str(tmp_path / "c")}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=none",
                        "layers.ids=[1,99]", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("saeot: error:")]
    assert len(err) == 1 and "layers.ids" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "run" / "matches.csv").exists()


def test_ddp_two_processes_give_the_single_process_result(tmp_path):
    """trainer=ddp on 2 CPU processes: each rank profiles a shard; merged results equal one process."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SAEOT_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]
    one = subprocess.run(common + [f"hydra.run.dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(common + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                   f"hydra.run.dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    stats1 = (tmp_path / "one" / "feature_stats.csv").read_text()
    stats2 = (tmp_path / "two" / "feature_stats.csv").read_text()
    assert stats1 == stats2  # firing counts and maxima merged exactly
    from saeot.types import FeatureSamples

    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        a = FeatureSamples.load(tmp_path / "one" / "features" / f"{hook}.safetensors")
        b = FeatureSamples.load(tmp_path / "two" / "features" / f"{hook}.safetensors")
        # the same top-K activations for every feature (which of two tied tokens is kept may differ)
        assert torch.allclose(a.activations, b.activations, atol=1e-5)
        same_loc = (a.locations == b.locations).all(-1).float().mean()
        assert same_loc > 0.97
        assert torch.allclose(a.weights, b.weights, atol=1e-5)
    with open(tmp_path / "one" / "matches.csv") as f1, open(tmp_path / "two" / "matches.csv") as f2:
        r1, r2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    same = sum(x["feature_b"] == y["feature_b"] for x, y in zip(r1, r2)) / len(r1)
    assert same > 0.98  # the reference space is fitted on the same tokens in another order
