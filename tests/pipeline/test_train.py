"""End to end: the real Hydra configs, composed as train.py composes them, on tiny data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.metrics import result_numbers

from saeot.pipeline import MATCH_COLUMNS, ConfigError, build, fit_reference, match, run_train, setup, stream

ROOT = Path(__file__).resolve().parents[2]
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


def test_default_run_shows_no_lightning_warning_a_user_cannot_act_on(tmp_path, smoke_cfg, recwarn):
    """Lightning's LeafSpec deprecation and its "predict returned None" (the stream passes
    return None on purpose) stay out of the run's output."""
    run_train(smoke_cfg(tmp_path), tmp_path)
    noise = [str(w.message) for w in recwarn if "LeafSpec" in str(w.message) or "predict returned None" in str(w.message)]
    assert not noise, noise


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


@pytest.mark.parametrize("sampling", ["topk", "reservoir"])
def test_ddp_two_processes_give_the_single_process_result(tmp_path, sampling):
    """trainer=ddp on 2 CPU processes: each rank profiles a shard of the contexts (reservoir keys
    hashed from the token, ties ranked by token), the samples and the held-out states are merged
    exactly: matches.csv and feature_stats.csv byte for byte, metrics.json's numbers (timings aside)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SAEOT_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=none", "trainer.enable_progress_bar=false",
              f"profiling.sampling={sampling}"]
    one = subprocess.run(common + [f"hydra.run.dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(common + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                   f"hydra.run.dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stderr  # really two ranks
    for name in ("matches.csv", "feature_stats.csv", "flows.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    m1, m2 = (result_numbers(json.loads((tmp_path / d / "metrics.json").read_text())) for d in ("one", "two"))
    assert m1 == m2
    assert m1["/profiling/sampling"] == sampling and m1["/reference/n_tokens"] > 0
    from saeot.types import FeatureSamples

    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        a = FeatureSamples.load(tmp_path / "one" / "features" / f"{hook}.safetensors")
        b = FeatureSamples.load(tmp_path / "two" / "features" / f"{hook}.safetensors")
        for field in ("points", "weights", "locations", "activations", "n_fire"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (hook, field)
