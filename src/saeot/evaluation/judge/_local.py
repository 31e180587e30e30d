"""A judge on a local Hugging Face causal LM (offline; default: SmolLM2-135M-Instruct)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saeot.dtypes import resolve_dtype
from saeot.evaluation.judge._base import Judge
from saeot.evaluation.judge._prompt import LABELS
from saeot.models import ensure_smollm2_hf_dir

__all__ = ["LocalHFJudge"]


class LocalHFJudge(Judge):
    """A local Hugging Face causal LM (offline; default: SmolLM2-135M-Instruct from the bundled GGUF).

    Args:
        path: model directory (None: :func:`saeot.models.ensure_smollm2_hf_dir` under ``model_cache_dir``).
        mode: ``logprob`` (score the three answers, take the most likely; always valid)
            or ``generate`` (greedy decoding, parsed).
        max_new_tokens: for ``generate``.
        dtype, device: where the judge runs.
        max_prompt_tokens: prompts are cut from the left of the user text beyond this.
    """

    name = "local_hf"

    def __init__(self, path: str | None = None, model_cache_dir: str | None = None, mode: str = "logprob",
                 max_new_tokens: int = 8, dtype: str = "float32", device: str = "cpu",
                 max_prompt_tokens: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("logprob", "generate"):
            raise ValueError(f"judge.mode={mode!r}; expected logprob or generate")
        self.path, self.model_cache_dir, self.mode = path, model_cache_dir, mode
        self.max_new_tokens, self.dtype, self.device = int(max_new_tokens), dtype, device
        self.max_prompt_tokens = int(max_prompt_tokens)
        self._model = self._tok = None
        self._dir: Path | None = None

    def model_dir(self) -> Path:
        if self._dir is None:
            if self.path:
                d = Path(self.path).expanduser()
                if not (d / "config.json").is_file():
                    raise ValueError(f"judge.path={self.path!r} is not a local Hugging Face model directory")
                self._dir = d.resolve()
            else:
                self._dir = ensure_smollm2_hf_dir(self.model_cache_dir)
        return self._dir

    def identity(self) -> dict:
        d = self.model_dir()
        cfg = d / "config.json"
        weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
        fingerprint = [(p.name, p.stat().st_size) for p in weights] + [("config", cfg.stat().st_size)]
        return {"backend": self.name, "model": d.name, "files": fingerprint, "mode": self.mode,
                "max_new_tokens": self.max_new_tokens if self.mode == "generate" else None, "dtype": self.dtype}

    def _load(self) -> None:
        if self._model is not None:
            return
        d = self.model_dir()
        self._tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(d, dtype=resolve_dtype(self.dtype, "judge.dtype"),
                                                           local_files_only=True)
        self._model.to(self.device).eval().requires_grad_(False)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        self._load()
        tok = self._tok
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) > self.max_prompt_tokens:
            ids = ids[:8] + ids[-(self.max_prompt_tokens - 8):]
        return ids

    @torch.no_grad()
    def label_logprobs(self, messages: list[dict[str, str]]) -> dict[str, float]:
        """log P(label | prompt) for each label, summed over its spellings ("same", "Same")."""
        self._load()
        ids = torch.tensor([self.prompt_ids(messages)], device=self.device)
        out = self._model(ids, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        res = {}
        for label in LABELS:
            lps = []
            for spelling in {label, label.capitalize()}:
                opt = self._tok.encode(spelling, add_special_tokens=False)
                lp = float(first[opt[0]])
                if len(opt) > 1:
                    cache = copy.deepcopy(out.past_key_values)
                    o2 = self._model(torch.tensor([opt[:-1]], device=self.device), past_key_values=cache, use_cache=True)
                    logp = torch.log_softmax(o2.logits[0].float(), -1)
                    lp += float(logp[torch.arange(len(opt) - 1), torch.tensor(opt[1:])].sum())
                lps.append(lp)
            res[label] = float(torch.logsumexp(torch.tensor(lps), 0))
        return res

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, float] | None]:
        if self.mode == "logprob":
            lp = self.label_logprobs(messages)
            z = torch.logsumexp(torch.tensor(list(lp.values())), 0)
            probs = {k: float(math.exp(v - float(z))) for k, v in lp.items()}
            return max(probs, key=probs.get), probs
        self._load()
        ids = torch.tensor([self.prompt_ids(messages)], device=self.device)
        gen = self._model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   attention_mask=torch.ones_like(ids),
                                   pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id)
        return self._tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), None

