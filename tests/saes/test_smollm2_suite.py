"""experiment=smollm2_suite: what it asks for, and that its caches are keyed by configuration."""

from types import SimpleNamespace

import torch
from hydra.utils import instantiate

from saeot.data.activation_store import store_key
from saeot.hooks import hook_name
from saeot.saes import LocalTrainedSAEs

D_MODEL = 576


def _fake_smollm2():
    cfg = {"n_layers": 30, "d_model": D_MODEL, "d_vocab": 49152, "n_heads": 9, "d_mlp": 1536, "seed": None}
    return SimpleNamespace(name="smollm2_135m", model=SimpleNamespace(cfg=SimpleNamespace(to_dict=lambda: cfg,
                                                                                            d_model=D_MODEL)))


def test_suite_settings(compose_cfg):
    cfg = compose_cfg("experiment=smollm2_suite")
    ids = list(cfg.layers.ids)
    pairs = {tuple(p) for p in cfg.layers.pairs}
    assert len(ids) >= 6 and max(ids) <= 16 and min(ids) <= 4
    assert {(3, 4), (4, 5), (8, 9)} <= pairs and any(b - a >= 4 for a, b in pairs)
    provider = instantiate(cfg.sae)
    assert isinstance(provider, LocalTrainedSAEs)
    assert provider.training_config(D_MODEL).d_sae >= 4 * D_MODEL and provider.settings.train_tokens >= 2_000_000
    n_held = round(cfg.data.heldout_fraction * cfg.data.max_contexts)
    assert (cfg.data.max_contexts - n_held) * (cfg.data.context_len - 1) >= provider.settings.train_tokens
    assert cfg.data.text._target_ == "saeot.data.corpus.PackagesCorpus"
    assert cfg.activation_store.splits == ["profile", "heldout"]
    assert cfg.callbacks.sae_quality._target_ == "saeot.evaluation.sae_quality.SAEQuality"
    jump = instantiate(compose_cfg("experiment=smollm2_suite", "sae.architecture=jumprelu").sae)
    assert jump.settings.architecture == "jumprelu"


def test_suite_sae_cache_key_changes_with_width_layer_tokens(compose_cfg):
    lm = _fake_smollm2()
    hook, fp = hook_name(8), "fingerprint-of-the-tokens"

    def key(*overrides, hook=hook, fp=fp):
        return instantiate(compose_cfg("experiment=smollm2_suite", *overrides).sae).cache_key(lm, hook, fp)

    base = key()
    assert key() == base  # the same configuration: the same cache entry (built once)
    changed = {
        "width": key("sae.expansion=8"),
        "d_sae": key("sae.d_sae=3000"),
        "layer": key(hook=hook_name(9)),
        "train_tokens": key("sae.train_tokens=3000000"),
        "token stream": key(fp="another-fingerprint"),
        "architecture": key("sae.architecture=jumprelu"),
        "steps": key("sae.steps=1000"),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)


def test_activation_store_key_changes_with_tokens_and_hooks(tiny_lm):
    tokens = torch.randint(200, (8, 16))
    hooks = [hook_name(0), hook_name(1)]
    base = store_key(tiny_lm, tokens, hooks, torch.float16)
    assert store_key(tiny_lm, tokens.clone(), hooks, torch.float16) == base
    other = tokens.clone()
    other[3, 5] += 1
    assert store_key(tiny_lm, other, hooks, torch.float16) != base
    assert store_key(tiny_lm, tokens[:7], hooks, torch.float16) != base
    assert store_key(tiny_lm, tokens, hooks[:1], torch.float16) != base
    assert store_key(tiny_lm, tokens, hooks, torch.float32) != base


class _ExactSAE(torch.nn.Module):
    """codes = [relu(h), relu(-h)], decode = codes[:d] - codes[d:]: a lossless "SAE"."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, h):
        return torch.cat([h.clamp_min(0), (-h).clamp_min(0)], -1)

    def decode(self, c):
        return c[..., : self.d] - c[..., self.d:]


def test_sae_quality_of_a_lossless_sae(tiny_lm, tiny_dm):
    from saeot.evaluation.sae_quality import sae_quality

    h = "blocks.1.hook_resid_post"
    batches = list(tiny_dm.iter_batches("heldout", hidden=True, hooks=[h]))
    # the random model's loss barely moves under mean ablation; BOS's state everywhere does hurt it
    ablation = batches[0]["hidden"][h][0, 0]
    q = sae_quality(tiny_lm, {h: _ExactSAE(tiny_lm.d_model)}, batches, {h: ablation})[h]
    assert abs(q["explained_variance"] - 1) < 1e-5 and abs(q["delta_ce"]) < 1e-4
    assert abs(q["ce_loss_recovered"] - 1) < 1e-3 and q["ce_mean_ablation"] > q["ce_clean"]
    n = sum(int(b["mask"].sum()) for b in batches)
    assert q["n_eval_tokens"] == n and 0.9 * tiny_lm.d_model <= q["l0"] <= tiny_lm.d_model


def test_store_run_records_sae_quality_and_reads_the_store(tmp_path, compose_cfg):
    import json

    from saeot.pipeline import run_train

    cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                      "activation_store=disk", "activation_store.progress=false",
                      "+callbacks.sae_quality._target_=saeot.evaluation.sae_quality.SAEQuality",
                      "+callbacks.sae_quality.max_tokens=256", run_dir=tmp_path / "run")
    run_train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["saes"]) == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
    for q in metrics["saes"].values():
        assert {"explained_variance", "ce_loss_recovered", "delta_ce", "l0", "dead_fraction", "n_train_tokens",
                "minutes"} <= set(q)
        assert q["n_train_tokens"] == cfg.sae.train_tokens and q["minutes"] > 0 and 0 <= q["dead_fraction"] <= 1
    stores = list((tmp_path / "cache" / "activations").glob("*/manifest.json"))
    assert sorted(json.loads(p.read_text())["split"] for p in stores) == ["heldout", "profile"]
    assert all(json.loads(p.read_text())["complete"] for p in stores)
