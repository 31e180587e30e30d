import json
import shutil

import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from saeot.io import COMPLETE_MARKER
from saeot.saes import (
    DiskSAEs,
    LocalTrainedSAEs,
    PretrainedSAEs,
    SAETrainingConfig,
    check_sae_widths,
    inference_sae,
    load_recorded,
    train_sae,
    training,
)


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
    assert (path / COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------------------- records
def test_from_disk_record_loads_the_same_sae(tmp_path, tiny_lm):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for i in range(2):
        _jumprelu(tiny_lm.d_model, 24, seed=i).save_model(tmp_path / f"layer_{i}")
    prov = DiskSAEs(path=str(tmp_path / "layer_{layer}"))
    loaded = prov.load(tiny_lm, hooks)
    records = prov.describe(hooks)
    assert json.loads(json.dumps(records)) == records  # JSON-able
    for i, h in enumerate(hooks):
        assert records[h] == {"kind": "disk", "path": str((tmp_path / f"layer_{i}").resolve())}
        again = load_recorded(records[h])
        assert torch.equal(again.W_dec, loaded[h].W_dec) and torch.equal(again.threshold, loaded[h].threshold)


def test_local_trained_record_points_at_the_cache_and_never_retrains(tmp_path, tiny_dm, tiny_lm, monkeypatch):
    prov = LocalTrainedSAEs(d_sae=32, k=4, steps=10, batch_size=64, train_tokens=200, cache_dir=str(tmp_path),
                            progress=False)
    with pytest.raises(RuntimeError, match="before load"):
        prov.describe(tiny_dm.hooks)
    saes = prov.load(tiny_lm, tiny_dm.hooks, tiny_dm)
    records = prov.describe(tiny_dm.hooks)
    for h in tiny_dm.hooks:
        path = prov.cache_path(tiny_lm, h, tiny_dm.fingerprint())
        assert records[h] == {"kind": "disk", "path": str(path.resolve())}
    # loading from the record trains nothing, whatever the provider would do
    monkeypatch.setattr(training, "train_sae", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    h = tiny_dm.hooks[0]
    again = load_recorded(records[h])
    assert torch.equal(again.W_enc, saes[h].W_enc) and torch.equal(again.W_dec, saes[h].W_dec)
    # a cache entry that is gone is named, with the way out
    shutil.rmtree(records[h]["path"])
    with pytest.raises(FileNotFoundError, match=r"hook_resid_post-.*rerun train\.py to rebuild it"):
        load_recorded(records[h])


def test_pretrained_record_and_unknown_kind():
    prov = PretrainedSAEs(release="gpt2-small-res-jb", sae_id="blocks.{layer}.hook_resid_pre")
    assert prov.describe(["blocks.3.hook_resid_pre"]) == {
        "blocks.3.hook_resid_pre": {"kind": "pretrained", "release": "gpt2-small-res-jb",
                                    "sae_id": "blocks.3.hook_resid_pre", "dtype": "float32"}
    }
    with pytest.raises(ValueError, match="record kind"):
        load_recorded({"kind": "ftp", "path": "x"})


# ---------------------------------------------------------------------------- training
def test_train_sae_is_seeded_and_leaves_the_global_rng_alone():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * 5 + 1
    cfg = SAETrainingConfig(d_sae=24, k=3, steps=20, batch_size=64)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = train_sae(x, cfg, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = train_sae(x, cfg, seed=7)
    assert torch.equal(a.W_dec, again.W_dec) and torch.equal(a.W_enc, again.W_enc)
    # the inference SAE reconstructs raw inputs as the training SAE does (input scale folded back)
    b = inference_sae(again)
    with torch.no_grad():
        torch.testing.assert_close(b.decode(b.encode(x)), a.decode(a.encode(x)), rtol=1e-4, atol=1e-4)
    c = train_sae(x, cfg, seed=8)
    assert not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "inf and -inf in one column", "fp max in every entry"])
def test_train_sae_refuses_exactly_the_non_finite_pools(bad, dtype):
    """The finiteness check rides on the float64 moments (no [N, d] temporaries): it must catch every
    inf / NaN, also +inf and -inf cancelling in one column, and pass the largest finite values."""
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    cfg = SAETrainingConfig(d_sae=24, k=3, steps=2, batch_size=64)
    big = torch.finfo(dtype).max
    if bad == "inf":
        x[17, 3] = float("inf")
    elif bad == "-inf":
        x[299, 11] = float("-inf")
    elif bad == "nan":
        x[0, 0] = float("nan")
    elif bad == "inf and -inf in one column":
        x[5, 2], x[6, 2] = float("inf"), float("-inf")
    else:  # finite, if huge: trains (no overflow in the float64 sums of values or squares)
        x.fill_(big)
        assert train_sae(x, cfg, seed=0) is not None
        return
    with pytest.raises(FloatingPointError, match="non-finite hidden states at layer7"):
        train_sae(x, cfg, seed=0, name="layer7")


def test_every_training_setting_reaches_the_training_config_with_its_default():
    """sae=train_local's settings hand SAETrainingConfig every field it has (but the width, which follows
    from expansion, and two internals), with the training config's defaults: a field added to one and not
    the other fails here instead of silently training with a default."""
    import dataclasses

    from saeot.saes.providers import TRAINING_FIELDS, LocalSAESettings, LocalTrainedSAEs

    train = {f.name: f.default for f in dataclasses.fields(SAETrainingConfig)}
    local = {f.name: f.default for f in dataclasses.fields(LocalSAESettings)}
    assert set(train) == set(TRAINING_FIELDS) | {"d_sae", "dead_window", "normalize_inputs"}
    assert set(TRAINING_FIELDS) <= set(local)
    assert {n: local[n] for n in TRAINING_FIELDS if n != "progress"} == {n: train[n] for n in TRAINING_FIELDS
                                                                         if n != "progress"}
    cfg = LocalTrainedSAEs(architecture="jumprelu", target_l0=12.0, k=5, lr=0.01, steps=7, batch_size=3,
                           l0_coefficient=2.0, jumprelu_init_threshold=0.3, expansion=3).training_config(64)
    assert (cfg.architecture, cfg.target_l0, cfg.k, cfg.lr, cfg.steps, cfg.batch_size, cfg.l0_coefficient,
            cfg.jumprelu_init_threshold, cfg.d_sae, cfg.normalize_inputs) == (
        "jumprelu", 12.0, 5, 0.01, 7, 3, 2.0, 0.3, 192, True)


def test_local_trained_saes_train_through_train_sae(tiny_dm, tiny_lm):
    prov = LocalTrainedSAEs(d_sae=32, k=4, steps=10, batch_size=64, train_tokens=200, seed=3, progress=False)
    acts = prov.collect(tiny_dm, tiny_dm.hooks[:1])[tiny_dm.hooks[0]]
    mine = prov.train_one(acts, tiny_dm.hooks[0])
    direct = train_sae(acts, prov.training_config(acts.shape[1]), seed=3)
    assert torch.equal(mine.W_dec, direct.W_dec) and torch.equal(mine.b_enc, direct.b_enc)


def test_the_training_pool_is_the_profile_tokens_in_order(tiny_dm):
    """collect fills a preallocated buffer: the same rows as concatenating the batches, cut at train_tokens."""
    hooks = list(tiny_dm.hooks)
    batches = list(tiny_dm.iter_batches("profile", hooks=hooks))
    want = {h: torch.cat([b["hidden"][h][b["mask"]].float() for b in batches]) for h in hooks}
    n_all = want[hooks[0]].shape[0]
    for n in (n_all // 3, n_all + 50):  # cut inside a batch; more than the split holds
        pool = LocalTrainedSAEs(train_tokens=n, progress=False).collect(tiny_dm, hooks)
        for h in hooks:
            assert pool[h].dtype == torch.float32 and torch.equal(pool[h], want[h][:n])


def test_unknown_architecture_names_the_setting():
    with pytest.raises(ValueError, match="sae.architecture"):
        LocalTrainedSAEs(architecture="nope")
    with pytest.raises(ValueError, match="sae.architecture"):
        SAETrainingConfig(architecture="nope")
