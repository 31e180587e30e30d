"""Language-model loaders: every way saeot obtains a ``HookedTransformer``.

Each returns a :class:`~saeot.models.LanguageModel` (model + text codec + name) and
is reachable from Hydra ``model/`` configs through ``_target_``:

- :func:`load_tiny_random`: a small randomly initialised transformer over bytes, for
  tests and smoke runs. Deterministic in its seed.
- :func:`load_hf_local`: any local Hugging Face causal-LM directory.
- :func:`load_pretrained`: ``HookedTransformer.from_pretrained`` for online users;
  the name is checked before anything is downloaded.

(The offline default, SmolLM2 from the bundled GGUF, is :mod:`saeot.models.smollm2`.)

The local-directory loader never touches the network (``local_files_only=True``
everywhere) and by default loads the weights unprocessed, so the HookedTransformer's
logits and residual stream equal the Hugging Face model's (up to float error).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoModelForCausalLM, AutoTokenizer

from saeot.dtypes import resolve_dtype
from saeot.hub import require_hub
from saeot.models.codecs import ByteCodec, HFCodec
from saeot.models.language_model import LanguageModel

__all__ = [
    "load_tiny_random",
    "load_pretrained",
    "load_hf_local",
    "resolve_device",
    "resolve_official_name",
]

# transformer_lens picks a hard-coded config when a *path* contains these words, and
# then crashes; see _tl_config_from_dir.
_TL_NAME_TRIGGERS = ("llama", "gemma")


def _freeze(model: HookedTransformer) -> HookedTransformer:
    """Eval mode and ``requires_grad=False`` on every parameter, in place."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_tl_deprecation() -> Iterator[None]:
    """transformer_lens 3 deprecates HookedTransformer in favour of TransformerBridge;
    saeot uses the HookedTransformer API on purpose (hook names, run_with_cache)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="HookedTransformer is deprecated", category=DeprecationWarning
        )
        yield


def _new_hooked_transformer(cfg: HookedTransformerConfig, tokenizer: Any = None) -> HookedTransformer:
    with _quiet_tl_deprecation():
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


# --------------------------------------------------------------------------- settings


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else goes to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"model.device={device!r} is not a torch device ({e})") from None


def resolve_official_name(name: str, setting: str = "model.name") -> str:
    """The transformer_lens official name for ``name`` or one of its aliases.

    Raises ValueError naming ``setting`` when transformer_lens does not know it;
    nothing is downloaded.
    """
    official = tl_loading.make_model_alias_map().get(str(name).lower())
    if official is None:
        raise ValueError(
            f"{setting}={name!r} is not a model transformer_lens knows; see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES (or its aliases), "
            "or use model=hf_local with model.path=<local HF dir>"
        )
    return official


# --------------------------------------------------------------------------- tiny random


def load_tiny_random(
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    d_mlp: int = 256,
    n_ctx: int = 256,
    seed: int = 0,
    act_fn: str = "gelu",
    normalization_type: str | None = "LN",
) -> LanguageModel:
    """A randomly initialised HookedTransformer over bytes (``d_vocab=257``, ByteCodec).

    The weights depend only on the arguments (same seed, same weights); the global
    torch RNG is left as it was. CPU, float32, eval mode, frozen.
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=ByteCodec.vocab_size,
        act_fn=act_fn,
        normalization_type=normalization_type,
        model_name="tiny_random",
        default_prepend_bos=True,
        device="cpu",
        dtype=torch.float32,
    )
    # cfg.seed would reseed the *global* RNGs; fork the RNG state instead.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_hooked_transformer(cfg)
    return LanguageModel(model=_freeze(model), codec=ByteCodec(), name="tiny_random")


# --------------------------------------------------------------------------- online


def load_pretrained(
    name: str, dtype: str | torch.dtype = "float32", device: str = "cpu", **kwargs: Any
) -> LanguageModel:
    """``HookedTransformer.from_pretrained(name, ...)`` (downloads unless cached).

    ``name`` must be a transformer_lens official name or alias, checked before
    anything is downloaded; a model that is not cached needs the hub to answer
    (:func:`saeot.hub.require_hub`: a clear error at once when it cannot). ``kwargs`` go to ``from_pretrained`` unchanged (its
    defaults fold LayerNorm and centre weights, as e.g. the GPT-2 res-jb SAEs expect;
    pass an SAE's ``model_from_pretrained_kwargs`` here).
    """
    official = resolve_official_name(name, "model.name")
    torch_dtype = resolve_dtype(dtype, "model.dtype")
    require_hub(official, f"model.name={name!r}")
    with _quiet_tl_deprecation():
        model = HookedTransformer.from_pretrained(
            official, dtype=torch_dtype, device=str(resolve_device(device)), **kwargs
        )
    if model.tokenizer is None:
        raise ValueError(f"model.name={name!r} comes without a tokenizer; saeot needs one to read text")
    return LanguageModel(model=_freeze(model), codec=HFCodec(model.tokenizer), name=name)


# --------------------------------------------------------------------------- local HF dir


def load_hf_local(
    path: str | os.PathLike,
    official_name: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    name: str | None = None,
    fold_ln: bool = False,
    n_ctx: int | None = None,
) -> LanguageModel:
    """Load a local Hugging Face causal-LM directory into a HookedTransformer, offline.

    Args:
        path: directory with ``config.json``, weights and tokenizer files.
        official_name: transformer_lens official name whose hard-coded config to use
            (needed only where transformer_lens configures a family by name, e.g.
            Llama-2/3 or Gemma checkpoints); by default the architecture is read from
            ``config.json`` (LlamaForCausalLM, GPT2LMHeadModel, Qwen2, Mistral, ...).
        dtype: weights dtype (``"float32"``, ``"bfloat16"``, ...).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``.
        name: short name for reports; default the directory name.
        fold_ln: fold norm weights into the following linear maps (transformer_lens's
            processing; same outputs, different parameters). Off by default: the
            weights stay exactly the Hugging Face ones.
        n_ctx: cap the context length (default: the model's).

    Logits equal the Hugging Face model's up to float error (about 1e-4 in float32).
    Nothing is downloaded; errors name ``model.path`` / ``model.official_name``.
    """
    root = Path(path).expanduser().resolve()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"model.path={str(path)!r} is not a local Hugging Face model directory (no config.json)"
        )
    try:
        hf_cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model.path={str(path)!r}: config.json is not valid JSON ({e})") from None
    official = resolve_official_name(official_name, "model.official_name") if official_name else None
    torch_dtype = resolve_dtype(dtype, "model.dtype")
    torch_device = resolve_device(device)
    cfg_kwargs = dict(
        hf_cfg=hf_cfg, fold_ln=fold_ln, device=str(torch_device), dtype=torch_dtype, n_ctx=n_ctx
    )

    # 1. transformer_lens config (cheap; rejects unsupported architectures before any weights load)
    try:
        if official is not None and any(t in official.lower() for t in _TL_NAME_TRIGGERS):
            cfg = tl_loading.get_pretrained_model_config(official, **cfg_kwargs)
        else:
            cfg = _tl_config_from_dir(root, **cfg_kwargs)
    except NotImplementedError as e:
        raise ValueError(
            f"model.path={str(path)!r}: architecture {hf_cfg.get('architectures')} is not supported "
            f"by transformer_lens ({e}); set model.official_name to a supported model of the same family"
        ) from None
    cfg.model_name = name or root.name
    cfg.tokenizer_name = str(root)

    # 2. tokenizer and Hugging Face weights, from disk only
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.path={str(path)!r} has no usable tokenizer ({type(e).__name__}: {e})"
        ) from None
    hf_model = AutoModelForCausalLM.from_pretrained(root, dtype=torch_dtype, local_files_only=True)
    hf_model.requires_grad_(False)

    # 3. convert to transformer_lens parameter names and build the HookedTransformer
    try:
        state_dict = tl_loading.get_pretrained_state_dict(
            str(root), cfg, hf_model=hf_model, dtype=torch_dtype
        )
    except ValueError as e:
        if "not currently supported" not in str(e):
            raise
        raise ValueError(
            f"model.path={str(path)!r}: transformer_lens cannot convert {cfg.original_architecture} weights"
        ) from None
    del hf_model
    model = _new_hooked_transformer(cfg, tokenizer=tokenizer)
    _load_state_dict(model, state_dict, fold_ln=fold_ln)
    model.move_model_modules_to_device()
    return LanguageModel(model=_freeze(model), codec=HFCodec(tokenizer), name=name or root.name)


def _tl_config_from_dir(root: Path, **kwargs: Any) -> HookedTransformerConfig:
    """``get_pretrained_model_config`` on a local directory, read from its config.json.

    transformer_lens decides by substring whether a name is a Llama/Gemma family that
    it configures without reading config.json, and applies that test to paths too: a
    directory whose path contains "llama" would crash there. Such a path is read
    through a copy of config.json in a neutrally named temporary directory.
    """
    if not any(t in str(root).lower() for t in _TL_NAME_TRIGGERS):
        return tl_loading.get_pretrained_model_config(str(root), local_files_only=True, **kwargs)
    with tempfile.TemporaryDirectory(prefix="saeot-hfcfg-") as tmp:
        shutil.copyfile(root / "config.json", Path(tmp) / "config.json")
        return tl_loading.get_pretrained_model_config(tmp, local_files_only=True, **kwargs)


def _load_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor], fold_ln: bool) -> None:
    """Load transformer_lens-format weights into ``model``.

    Unprocessed weights go in with one strict ``load_state_dict`` (transformer_lens's
    ``load_and_process_state_dict`` loads key by key, several seconds slower for
    SmolLM2 on 2 cores); with ``fold_ln`` transformer_lens does the folding.
    """
    if fold_ln:
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=True,
        )
    else:
        model.load_state_dict(model.fill_missing_keys(state_dict), strict=True)
