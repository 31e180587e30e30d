"""Language models (saeot.models): tiny random model, codecs, name checks, and the offline
SmolLM2 path with its atomic cache. No test touches the network: a guard makes any
socket connection or DNS lookup fail and records it, and the tests assert that none
was attempted (a library that swallows the failure would otherwise go unnoticed)."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest
import torch

from saeot.dtypes import resolve_dtype
from saeot.io import CACHE_FORMAT, COMPLETE_MARKER, default_cache_dir
from saeot.models import (
    ByteCodec,
    HFCodec,
    LanguageModel,
    TextCodec,
    ensure_smollm2_hf_dir,
    load_hf_local,
    load_pretrained,
    load_smollm2_135m,
    load_tiny_random,
    loaders,
    resolve_official_name,
)
from saeot.models import smollm2 as smollm2_mod


@contextlib.contextmanager
def network_guard():
    """Make every outgoing connection / DNS lookup raise; yield the list of attempts."""
    attempts: list[str] = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append(f"{what}{args[1:2] if what == 'connect' else args[:1]}")
            raise OSError(f"network disabled in tests ({what})")

        return _refuse

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse("connect"))
        mp.setattr(socket.socket, "connect_ex", refuse("connect"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        yield attempts


@pytest.fixture
def no_network():
    with network_guard() as attempts:
        yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


# --------------------------------------------------------------------------- tiny random


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_random_is_deterministic_in_seed_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = load_tiny_random(seed=0)
    assert torch.equal(torch.rand(3), expected_next), "loading reseeded the global RNG"

    b = load_tiny_random(seed=0)
    c = load_tiny_random(seed=1)
    wa, wb, wc = _weights(a.model), _weights(b.model), _weights(c.model)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["blocks.0.attn.W_Q"], wc["blocks.0.attn.W_Q"])
    assert not torch.equal(wa["embed.W_E"], wc["embed.W_E"])

    tokens = a.to_tokens("same seed, same logits")
    with torch.no_grad():
        assert torch.equal(a.model(tokens), b.model(tokens))
        assert not torch.allclose(a.model(tokens), c.model(tokens))


def test_tiny_random_shapes_hooks_and_frozen():
    m = load_tiny_random(n_layers=3, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=64, seed=3)
    assert isinstance(m, LanguageModel) and m.name == "tiny_random"
    assert (m.n_layers, m.d_model) == (3, 32)
    assert m.model.cfg.d_vocab == 257
    assert not m.model.training
    assert all(not p.requires_grad for p in m.model.parameters())

    assert m.hook_name(2) == "blocks.2.hook_resid_post"
    assert m.hook_name(0, "resid_pre") == "blocks.0.hook_resid_pre"
    assert m.hook_name(1, "mlp_out") == "blocks.1.hook_mlp_out"
    assert m.hook_name(1, "hook_mlp_out") == "blocks.1.hook_mlp_out"  # saeot.hooks.hook_name
    with pytest.raises(ValueError, match=r"layer 3 is out of range .*3 layers: 0\.\.2"):
        m.hook_name(3)
    with pytest.raises(ValueError, match="out of range"):
        m.hook_name(-1)
    with pytest.raises(ValueError, match="must be an integer"):
        m.hook_name(1.0)
    with pytest.raises(ValueError, match="no hook 'blocks.0.hook_resid_psot'"):
        m.hook_name(0, "resid_psot")

    text = "héllo"  # 6 UTF-8 bytes
    tokens = m.to_tokens(text)
    assert tokens.dtype == torch.long and tokens.shape == (1, 7)
    assert tokens[0, 0].item() == 256
    assert m.to_tokens(text, prepend_bos=False).shape == (1, 6)
    logits, cache = m.model.run_with_cache(tokens, names_filter=m.hook_name(1))
    assert logits.shape == (1, 7, 257)
    assert cache[m.hook_name(1)].shape == (1, 7, 32)


def test_byte_codec_round_trip_including_non_ascii():
    codec = ByteCodec()
    assert isinstance(codec, TextCodec)
    assert (codec.bos_token_id, codec.vocab_size) == (256, 257)
    text = "Grüße, naïve café — 日本語 🙂\n\ttabs"
    ids = codec.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert all(0 <= i < 256 for i in ids)
    assert codec.decode(ids) == text
    assert codec.decode([256, *ids]) == text  # BOS is dropped
    assert codec.encode("") == [] and codec.decode([]) == ""
    assert codec.decode(codec.encode("é")[:1]) == "\ufffd"  # half a character
    with pytest.raises(ValueError, match="0..256"):
        codec.decode([257])


# --------------------------------------------------------------------------- name checks


def test_unknown_model_name_fails_before_any_download(no_network, monkeypatch):
    from transformer_lens import HookedTransformer

    def must_not_load(*a, **k):
        raise AssertionError("from_pretrained reached for an unknown name")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", must_not_load)
    with pytest.raises(ValueError) as err:
        load_pretrained("gpt9")
    msg = str(err.value)
    assert "model.name='gpt9'" in msg and "transformer_lens" in msg
    assert "\n" not in msg


def test_official_names_and_aliases_resolve():
    assert resolve_official_name("gpt2") == "gpt2"
    assert resolve_official_name("gpt2-small") == "gpt2"  # an alias
    assert resolve_official_name("GPT2") == "gpt2"
    with pytest.raises(ValueError, match="model.official_name='nope/nope'"):
        resolve_official_name("nope/nope", "model.official_name")


def test_hf_local_bad_inputs_name_the_setting(tmp_path, no_network):
    with pytest.raises(ValueError, match="model.path=.*no config.json"):
        load_hf_local(tmp_path / "missing")

    unsupported = tmp_path / "weird"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(
        json.dumps({"architectures": ["WeirdForCausalLM"], "model_type": "gpt2", "vocab_size": 10})
    )
    unsupported_msg = r"model.path=.*WeirdForCausalLM.*not supported.*model.official_name"
    with pytest.raises(ValueError, match=unsupported_msg):
        load_hf_local(unsupported)
    with pytest.raises(ValueError, match="model.official_name='gpt9'"):
        load_hf_local(unsupported, official_name="gpt9")
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        load_hf_local(unsupported, dtype="float8")


def test_resolve_dtype_names_the_setting_and_honours_allowed():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("torch.BFloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype(torch.int8) is torch.int8  # a torch dtype passes unless restricted
    with pytest.raises(ValueError, match=r"^model.dtype='float8' is not one of \['bf16', "):
        resolve_dtype("float8", "model.dtype")
    allowed = (torch.float32, torch.float64)
    assert resolve_dtype("float64", "matcher.dtype", allowed) is torch.float64
    assert resolve_dtype(torch.float32, "matcher.dtype", allowed) is torch.float32
    for bad in ("bfloat16", torch.float16):
        with pytest.raises(ValueError, match=r"matcher.dtype=.* is not one of \['float32', 'float64', 'fp32'\]"):
            resolve_dtype(bad, "matcher.dtype", allowed)


# --------------------------------------------------------------------------- SmolLM2 (offline)

HF_SUBDIR = Path("models") / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the default cache ($SAEOT_CACHE or
    ~/.cache/saeot): converted from the bundled GGUF if absent (about 30-50 s, so a
    fresh SAEOT_CACHE exercises the real conversion), reused otherwise. The tests
    only read it."""
    with network_guard() as attempts:
        path = ensure_smollm2_hf_dir()
    assert attempts == [], f"network was attempted: {attempts}"
    assert path == default_cache_dir() / HF_SUBDIR
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> LanguageModel:
    with network_guard() as attempts:
        model = load_smollm2_135m()
    assert attempts == [], f"network was attempted: {attempts}"
    return model


@pytest.mark.slow
def test_smollm2_matches_hf_and_knows_paris(smollm2, smollm2_dir, no_network):
    from transformers import AutoModelForCausalLM

    assert (smollm2.n_layers, smollm2.d_model, smollm2.name) == (30, 576, "smollm2_135m")
    assert isinstance(smollm2.codec, HFCodec) and smollm2.codec.vocab_size == 49152
    assert not smollm2.model.training
    assert all(not p.requires_grad for p in smollm2.model.parameters())

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    assert hf.config.architectures == ["LlamaForCausalLM"]
    assert getattr(hf.config, "quantization_config", None) is None
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert tokens[0, 0].item() == smollm2.codec.bos_token_id
    with torch.no_grad():
        ours = smollm2.model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (1, tokens.shape[1], 49152)
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff < 1e-4, max_diff
    assert smollm2.codec.decode([ours[0, -1].argmax().item()]) == " Mary"

    paris = smollm2.to_tokens("The capital of France is")
    logits, cache = smollm2.model.run_with_cache(paris, names_filter=smollm2.hook_name(29))
    assert smollm2.codec.decode([logits[0, -1].argmax().item()]) == " Paris"
    assert cache["blocks.29.hook_resid_post"].shape == (1, paris.shape[1], 576)

    text = "Optimal transport — entre couches 🙂"
    assert smollm2.codec.decode(smollm2.codec.encode(text)) == text


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.slow
def test_second_load_reuses_the_cache(smollm2_dir, monkeypatch, no_network):
    before = _snapshot(smollm2_dir)
    assert COMPLETE_MARKER in before and "model.safetensors" in before

    def no_conversion(*a, **k):
        raise AssertionError("the cached directory was not reused")

    loaded_from: list[Path] = []

    def record_load(path, **kwargs):  # the HookedTransformer build itself is tested above
        loaded_from.append(Path(path))
        return "loaded"

    monkeypatch.setattr(smollm2_mod, "convert_gguf_to_hf", no_conversion)
    monkeypatch.setattr(smollm2_mod, "load_hf_local", record_load)
    assert load_smollm2_135m() == "loaded"
    assert loaded_from == [smollm2_dir]
    assert _snapshot(smollm2_dir) == before


# --------------------------------------------------------------------------- atomic cache


@pytest.fixture
def fake_converter(monkeypatch):
    """Replace the (30 s) GGUF conversion by writing two small files, counting calls:
    the cache logic around the conversion is what these tests check."""
    calls: list[Path] = []

    def fake_convert(gguf_path, out_dir):
        assert Path(gguf_path).name == smollm2_mod.SMOLLM2_GGUF_FILE
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (Path(out_dir) / "model.safetensors").write_bytes(b"w" * 4096)

    monkeypatch.setattr(smollm2_mod, "convert_gguf_to_hf", fake_convert)
    return calls


def test_half_written_cache_dir_is_rebuilt_not_trusted(tmp_path, fake_converter, no_network):
    models = tmp_path / "models"
    target = models / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    # an interrupted copy: config present, weights truncated, no completion marker
    (target / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (target / "model.safetensors").write_bytes(b"w" * 100)
    leftover = models / ".smollm2-135m-instruct.abc123.tmp"  # an earlier interrupted build
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    assert ensure_smollm2_hf_dir(tmp_path) == target
    assert len(fake_converter) == 1 and fake_converter[0].parent == models and fake_converter[0] != target
    assert (target / "model.safetensors").stat().st_size == 4096
    marker = json.loads((target / COMPLETE_MARKER).read_text())
    assert marker["files"] == {"config.json": 39, "model.safetensors": 4096}
    assert marker["source"]["file"] == smollm2_mod.SMOLLM2_GGUF_FILE
    assert sorted(p.name for p in models.iterdir()) == [
        ".smollm2-135m-instruct.lock",
        "smollm2-135m-instruct",
    ]

    before = _snapshot(target)
    assert ensure_smollm2_hf_dir(tmp_path) == target  # complete now: reused untouched
    assert len(fake_converter) == 1 and _snapshot(target) == before


def test_marked_but_truncated_cache_is_rebuilt(tmp_path, fake_converter, no_network):
    target = ensure_smollm2_hf_dir(tmp_path)
    (target / "model.safetensors").write_bytes(b"w" * 10)  # e.g. disk full while copying
    ensure_smollm2_hf_dir(tmp_path)
    assert len(fake_converter) == 2
    assert (target / "model.safetensors").stat().st_size == 4096

    (target / COMPLETE_MARKER).write_text("{not json")  # a corrupt marker is no marker
    ensure_smollm2_hf_dir(tmp_path)
    assert len(fake_converter) == 3
    assert json.loads((target / COMPLETE_MARKER).read_text())["format"] == CACHE_FORMAT


def test_interrupted_conversion_leaves_nothing_to_trust(tmp_path, monkeypatch, no_network):
    def dies_halfway(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the conversion

    monkeypatch.setattr(smollm2_mod, "convert_gguf_to_hf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_smollm2_hf_dir(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [".smollm2-135m-instruct.lock"]


def test_local_dir_whose_path_says_llama_is_read_from_its_config(tmp_path):
    # transformer_lens takes "llama" anywhere in a path for one of its hard-coded
    # family names and then has no config to read; saeot reads the directory's own.
    d = tmp_path / "my-llama-finetune"
    d.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "vocab_size": 300, "hidden_act": "silu", "rope_theta": 50000.0,
    }
    (d / "config.json").write_text(json.dumps(config))
    cfg = loaders._tl_config_from_dir(d, fold_ln=False, device="cpu", dtype=torch.float32)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (3, 64, 4, 2, 300)
    assert cfg.rotary_base == 50000.0 and cfg.original_architecture == "LlamaForCausalLM"
