"""``sae.architecture=jumprelu`` trains JumpReLU SAEs, on which SAE Match's threshold folding is
a real per-feature rescaling; on TopK SAEs it is one number per SAE (a no-op), on ReLU SAEs it
is the decoder-norm normalisation (a no-op only where every decoder row has one norm)."""

from __future__ import annotations

import pytest
import torch

from saeot.saes import fold_sae, fold_scale
from saeot.saes.training import SAETrainingConfig, inference_sae, train_sae


def _spread(s: torch.Tensor) -> float:
    """Relative spread ``(max - min) / mean`` of a folding scale."""
    return float((s.max() - s.min()) / s.mean())


@pytest.fixture(scope="module")
def trained():
    """One SAE of each trainable architecture on the same pool of sparse, correlated inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(4096, 32, generator=g)) @ torch.randn(32, 24, generator=g)
    out = {arch: inference_sae(train_sae(x, SAETrainingConfig(architecture=arch, d_sae=64, k=8, steps=150,
                                                              batch_size=256), seed=0)).eval()
           for arch in ("jumprelu", "topk", "standard")}
    return x, out


def test_folding_is_per_feature_on_jumprelu_and_one_number_on_topk(trained):
    x, saes = trained
    jr, topk, relu = saes["jumprelu"], saes["topk"], saes["standard"]
    theta = jr.threshold.detach()
    s = fold_scale(jr)
    assert torch.equal(s, torch.where(theta > 0, theta, 1 / jr.W_dec.norm(dim=1)).to(s.dtype))
    assert _spread(s) > 0.05  # learned thresholds differ: folding rescales features differently
    with torch.no_grad():  # ... and leaves the SAE's function unchanged
        torch.testing.assert_close(fold_sae(jr).decode(fold_sae(jr).encode(x[:256])), jr.decode(jr.encode(x[:256])),
                                   atol=1e-4, rtol=1e-4)
    assert float((jr.encode(x[:512]) > 0).float().mean()) < 0.9  # a sparse code, not a dense one
    assert _spread(fold_scale(topk)) < 1e-5  # TopK: one shared number ...
    assert float(fold_scale(topk)[0]) == pytest.approx(1.0, abs=1e-5)  # ... 1 for sae_lens' unit-norm decoders
    # ReLU: s = 1 / ||W_dec[i]||, which sae_lens' training leaves unequal, so folding is not a no-op ...
    assert torch.allclose(fold_scale(relu), 1 / relu.W_dec.norm(dim=1))
    assert _spread(fold_scale(relu)) > 0.05
    unit = fold_sae(relu)  # ... except where the decoder rows already have one norm (e.g. after fold_W_dec_norm)
    assert _spread(fold_scale(unit)) < 1e-5


def test_sae_architecture_jumprelu_trains_through_the_config(compose_cfg, tiny_lm, tiny_dm, tmp_path):
    from sae_lens import JumpReLUSAE

    from saeot.pipeline.config import build

    cfg = compose_cfg("experiment=smoke", "sae.architecture=jumprelu", f"paths.cache_dir={tmp_path}")
    provider = build(cfg.sae)
    assert provider.settings.architecture == "jumprelu"
    tiny_dm.setup()
    hooks = list(tiny_dm.hooks)
    saes = provider.load(tiny_lm, hooks, tiny_dm)
    assert provider.n_trained == len(hooks)
    for sae in saes.values():
        assert isinstance(sae, JumpReLUSAE) and _spread(fold_scale(sae)) > 0.02
    provider.load(tiny_lm, hooks, tiny_dm)  # cached: the architecture is part of the key
    assert provider.n_trained == 0
    with pytest.raises(ValueError, match="sae.architecture"):
        build(compose_cfg("experiment=smoke", "sae.architecture=gated"))


def test_target_l0_trains_towards_it_and_keys_the_cache():
    """``sae.target_l0`` switches sae_lens' JumpReLU to its quadratic loss around that L0; null
    leaves the settings (so the cache keys of SAEs trained before it existed) unchanged."""
    from saeot.saes.providers import LocalTrainedSAEs

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(4096, 32, generator=g)) @ torch.randn(32, 24, generator=g)

    def l0(target):
        cfg = SAETrainingConfig(architecture="jumprelu", d_sae=64, steps=400, batch_size=256, target_l0=target)
        tsae = train_sae(x, cfg, seed=0)
        assert tsae.cfg.jumprelu_sparsity_loss_mode == "quadratic" and tsae.cfg.target_l0 == float(target)
        with torch.no_grad():
            return float((inference_sae(tsae).eval().encode(x[:1024]) > 0).float().sum(1).mean())

    low, high = l0(2), l0(48)
    assert high > 2 * low  # the same data, seed and steps: the L0 follows the target
    assert abs(high - 48) < 8  # and lands near it (the threshold moves slowly: 2 is not reached in 400 steps)
    plain = LocalTrainedSAEs(architecture="jumprelu").key_settings(24)
    assert "target_l0" not in plain and "jumprelu_sparsity_loss_mode" not in plain
    assert LocalTrainedSAEs(architecture="jumprelu", target_l0=64).key_settings(24)["target_l0"] == 64.0
    with pytest.raises(ValueError, match="sae.target_l0"):
        SAETrainingConfig(architecture="jumprelu", d_sae=64, target_l0=100)
