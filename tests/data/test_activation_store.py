"""The activation store: atomic, resumable shards; batches and profiles equal to the live ones."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from saeot.data.activation_store import ActivationStore, StoredHiddenStates
from saeot.data.datamodule import HiddenStateDataModule
from saeot.io import CorruptFileError
from saeot.profiling import ProfileConsumer, StreamPass
from saeot.saes import LocalTrainedSAEs
from saeot.saes.training import SAETrainingConfig, build_training_sae, inference_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def _dm(lm, text, **kw):
    return HiddenStateDataModule(lm, text, HOOKS, context_len=32, max_contexts=kw.pop("max_contexts", 24),
                                 batch_size=kw.pop("batch_size", 4), heldout_fraction=0.25, **kw)


def _counting(dm):
    """Wrap ``dm.hidden_states`` to count the contexts run through the model."""
    calls = {"contexts": 0}
    real = dm.hidden_states

    def counted(tokens, *args, **kwargs):
        calls["contexts"] += len(tokens)
        return real(tokens, *args, **kwargs)

    dm.hidden_states = counted
    return calls


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    import saeot.data.activation_store as st
    from saeot.data.datamodule import HiddenStateDataModule
    from saeot.data.text import StdlibDocstrings
    from saeot.models import load_tiny_random

    lm = load_tiny_random(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, seed=0)
    dm = HiddenStateDataModule(lm, list(StdlibDocstrings(max_docs=60)), {hooks!r}, context_len=32,
                               max_contexts=24, batch_size=4, heldout_fraction=0.25)
    real = st.atomic_save_safetensors
    n = [0]

    def save_then_die(tensors, path, metadata=None):
        if n[0] == 2:  # the third shard: half of it on disk under its final name and as a temp file, then SIGKILL
            data = b"partial" * 1000
            open(path, "wb").write(data)
            open(os.path.join(os.path.dirname(path), ".shard_00002.safetensors.x.tmp"), "wb").write(data)
            os.kill(os.getpid(), signal.SIGKILL)
        n[0] += 1
        real(tensors, path, metadata)

    st.atomic_save_safetensors = save_then_die
    st.ActivationStore(sys.argv[1]).build(dm, "profile", {hooks!r}, shard_contexts=5)
""").format(hooks=HOOKS)


def test_killed_build_resumes_without_reading_a_partial_shard(tmp_path, tiny_lm, tiny_text):
    root = tmp_path / "store"
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    proc = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    manifest = json.loads((root / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == [
        "shard_00000.safetensors", "shard_00001.safetensors"]
    assert (root / "shard_00002.safetensors").is_file()  # half-written, not listed
    store = ActivationStore(root)
    with pytest.raises(CorruptFileError, match="not complete"):
        store.read(torch.arange(3), HOOKS)  # an unfinished store is never read

    dm = _dm(tiny_lm, tiny_text)
    dm.setup()
    calls = _counting(dm)
    store.build(dm, "profile", HOOKS, shard_contexts=5)
    n = len(dm.splits["profile"])
    assert n == 18 and calls["contexts"] == n - 2 * 5  # the two finished shards are not recomputed
    assert store.complete and not list(root.glob(".shard_*"))
    fresh = _dm(tiny_lm, tiny_text)
    whole = ActivationStore(tmp_path / "whole").build(fresh, "profile", HOOKS, shard_contexts=5)
    a, b = store.read(torch.arange(n), HOOKS), whole.read(torch.arange(n), HOOKS)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["context_index"], b["context_index"])
    for h in HOOKS:
        assert torch.equal(a["hidden"][h], b["hidden"][h])
    live = dm.hidden_states(dm.contexts[dm.splits["profile"]], HOOKS)
    for h in HOOKS:  # float16 copies of what the model computes
        assert torch.equal(a["hidden"][h], live[h].half())
    calls["contexts"] = 0
    store.build(dm, "profile", HOOKS, shard_contexts=5)  # complete: nothing to do
    assert calls["contexts"] == 0


def test_truncated_shard_is_detected_and_rebuilt(tmp_path, tiny_lm, tiny_text):
    dm = _dm(tiny_lm, tiny_text)
    store = ActivationStore(tmp_path / "s").build(dm, "profile", HOOKS, shard_contexts=5)
    shard = tmp_path / "s" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="missing or truncated"):
        ActivationStore(tmp_path / "s").read(torch.arange(3), HOOKS)
    calls = _counting(dm)
    store = ActivationStore(tmp_path / "s").build(dm, "profile", HOOKS, shard_contexts=5)
    assert calls["contexts"] == 18 - 5  # from the truncated shard on
    assert store.read(torch.arange(18), HOOKS)["hidden"][HOOKS[0]].shape == (18, 32, 32)
    with pytest.raises(CorruptFileError, match="other settings"):
        store.build(dm, "profile", HOOKS[:1], shard_contexts=5)


def _stored(lm, text, tmp_path, dtype="float32", **kw):
    return StoredHiddenStates(_dm(lm, text, **kw), splits=["profile", "heldout"], dtype=dtype,
                              shard_contexts=3, cache_dir=str(tmp_path), progress=False)


def test_stored_batches_equal_live_batches(tmp_path, tiny_lm, tiny_text):
    stored = _stored(tiny_lm, tiny_text, tmp_path)
    stored.setup()
    live = stored.parent
    for split in ("profile", "heldout"):
        for rank in (0, 1):
            a = list(live.iter_batches(split, rank=rank, world_size=2))
            b = list(stored.iter_batches(split, rank=rank, world_size=2))
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert set(x) == set(y) == {"tokens", "context_index", "positions", "mask", "hidden"}
                for k in ("tokens", "context_index", "positions", "mask"):
                    assert torch.equal(x[k], y[k])
                for h in HOOKS:
                    assert torch.equal(x["hidden"][h], y["hidden"][h]) and y["hidden"][h].dtype == torch.float32
    assert stored.fingerprint() == live.fingerprint() and stored.contexts is live.contexts
    # another split or hook is the live module's
    assert stored.view("heldout", hooks=["blocks.1.hook_resid_post"]).__class__.__name__ == "SplitView"


def _random_saes(lm, d_sae=48, k=4):
    out = {}
    for i, h in enumerate(HOOKS):
        torch.manual_seed(i)
        cfg = SAETrainingConfig(architecture="topk", d_sae=d_sae, k=k)
        out[h] = inference_sae(build_training_sae(cfg, lm.model.cfg.d_model)).eval()
    return out


def _profile(dm_view, saes, k=6):
    prof = ProfileConsumer(HOOKS, saes, k=k, mode="topk", seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.predict(StreamPass(saes, [prof]), datamodule=dm_view, return_predictions=False)
    return prof.results()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_profiling_from_the_store_equals_live_profiling(tmp_path, tiny_lm, tiny_text, dtype):
    stored = _stored(tiny_lm, tiny_text, tmp_path, dtype=dtype)
    stored.setup()
    saes = _random_saes(tiny_lm)
    live = _profile(stored.parent.view("profile"), saes)
    calls = _counting(stored.parent)
    from_store = _profile(stored.view("profile"), saes)
    assert calls["contexts"] == 0  # no forward pass
    for h in HOOKS:
        a, b = live[h], from_store[h]
        assert a.n_tokens == b.n_tokens == 18 * 31
        if dtype == "float32":  # exactly what the model computes: the same profile
            for field in ("points", "weights", "n_fire", "token_ids", "locations", "act_sum", "act_max"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
        else:  # float16 storage: the same samples up to ties, points to fp16 precision
            same = (a.locations == b.locations).all(-1).float().mean()
            assert same > 0.95
            assert (a.n_fire - b.n_fire).abs().sum() <= 0.01 * a.n_fire.sum()
            ok = (a.locations == b.locations).all(-1)
            assert torch.allclose(a.points[ok], b.points[ok], rtol=2e-3, atol=2e-3)


def test_local_saes_train_from_the_store_one_hook_at_a_time(tmp_path, tiny_lm, tiny_text):
    stored = _stored(tiny_lm, tiny_text, tmp_path)
    stored.setup()
    calls = _counting(stored.parent)
    seen = []
    provider = LocalTrainedSAEs(d_sae=32, k=4, steps=20, batch_size=64, train_tokens=300,
                                cache_dir=str(tmp_path / "c"), progress=False)
    real = provider.collect
    provider.collect = lambda dm, hooks: seen.append(list(hooks)) or real(dm, hooks)
    saes = provider.load(tiny_lm, HOOKS, stored)
    assert calls["contexts"] == 0 and seen == [[HOOKS[0]], [HOOKS[1]]]
    live = LocalTrainedSAEs(d_sae=32, k=4, steps=20, batch_size=64, train_tokens=300,
                            cache_dir=str(tmp_path / "c2"), progress=False).load(tiny_lm, HOOKS, stored.parent)
    for h in HOOKS:  # float32 store: the same pool, the same SAE
        assert torch.equal(saes[h].W_enc, live[h].W_enc)
        record = json.loads((provider._paths[h] / "training.json").read_text())
        assert record["n_train_tokens"] == 300 and record["from_activation_store"] and record["minutes"] >= 0
