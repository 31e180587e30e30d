import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from saeot.saes import DiskSAEs, LocalTrainedSAEs, PretrainedSAEs, check_sae_widths


def _jumprelu(d_in, d_sae, seed=0):
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.threshold.abs_()
    return sae


def test_from_disk_loads_what_sae_lens_saved(tmp_path, tiny_lm):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saved = {}
    for i, h in enumerate(hooks):
        sae = _jumprelu(tiny_lm.d_model, 48, seed=i)
        sae.save_model(tmp_path / f"layer_{i}")
        saved[h] = sae
    loaded = DiskSAEs(path=str(tmp_path / "layer_{layer}")).load(tiny_lm, hooks)
    x = torch.randn(10, tiny_lm.d_model)
    for h in hooks:
        assert torch.allclose(loaded[h].encode(x), saved[h].encode(x))
        assert torch.allclose(loaded[h].W_dec, saved[h].W_dec)


def test_from_disk_missing_dir_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="sae.path"):
        DiskSAEs(path=str(tmp_path / "nope_{layer}")).validate(["blocks.0.hook_resid_post"])


def test_width_mismatch_names_the_setting(tiny_lm):
    saes = {"blocks.0.hook_resid_post": _jumprelu(tiny_lm.d_model + 1, 8)}
    with pytest.raises(ValueError, match=r"d_in=33.*sae="):
        check_sae_widths(saes, tiny_lm)


def test_unknown_pretrained_release_fails_before_download():
    with pytest.raises(ValueError, match="sae.release"):
        PretrainedSAEs(release="no-such-release", sae_id="x").validate(["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="sae.sae_id"):
        PretrainedSAEs(release="gpt2-small-res-jb", sae_id="blocks.{layer}.nothing").validate(["blocks.0.hook_resid_post"])


def test_train_local_trains_then_reuses_the_cache(tmp_path, tiny_dm, tiny_lm, monkeypatch):
    prov = LocalTrainedSAEs(architecture="topk", d_sae=64, k=4, steps=60, batch_size=128, train_tokens=400,
                            cache_dir=str(tmp_path), progress=False)
    saes = prov.load(tiny_lm, tiny_dm.hooks, tiny_dm)
    assert prov.n_trained == 2
    assert set(saes) == set(tiny_dm.hooks)
    # the SAE reads raw hidden states: it explains most of their variance
    batch = next(tiny_dm.iter_batches("heldout"))
    for h in tiny_dm.hooks:
        x = batch["hidden"][h][batch["mask"]]
        rec = saes[h].decode(saes[h].encode(x))
        ev = 1 - ((rec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert ev > 0.5, (h, float(ev))

    # second load: nothing is trained (training would raise)
    prov2 = LocalTrainedSAEs(architecture="topk", d_sae=64, k=4, steps=60, batch_size=128, train_tokens=400,
                             cache_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(prov2, "train_one", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = prov2.load(tiny_lm, tiny_dm.hooks, tiny_dm)
    assert prov2.n_trained == 0
    for h in tiny_dm.hooks:
        assert torch.equal(again[h].W_dec, saes[h].W_dec)

    # a different setting is a different cache entry
    assert prov.cache_key(tiny_lm, tiny_dm.hooks[0], "x") != LocalTrainedSAEs(k=5).cache_key(tiny_lm, tiny_dm.hooks[0], "x")


def test_interrupted_training_is_not_trusted(tmp_path, tiny_dm, tiny_lm):
    prov = LocalTrainedSAEs(d_sae=32, k=4, steps=5, train_tokens=200, cache_dir=str(tmp_path), progress=False)
    path = prov.cache_path(tiny_lm, tiny_dm.hooks[0], tiny_dm.fingerprint())
    path.mkdir(parents=True)
    (path / "cfg.json").write_text("{half")  # a half-written entry without the completion marker
    prov.load(tiny_lm, tiny_dm.hooks, tiny_dm)
    assert prov.n_trained == 2
    assert (path / "SAEOT_COMPLETE").is_file()
