"""LLM judge of feature matches (the papers' "LLM Eval": same / maybe / different, scored 3 / 2 / 1).

The judge is shown the top-activating contexts of both features of a pair (from the
run's profiling, ``features/<hook>.safetensors``), the token where each feature fires
marked ``<<like this>>``, and asked whether the two features respond to the same
concept. Backends (``conf/judge/*.yaml``, ``judge=...`` on the ``evaluate.py`` line):

* ``none`` -- no judge (the default);
* ``openai_compatible`` -- any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
  vLLM, llama.cpp server, Ollama, ...) over plain HTTP (``urllib``; no extra
  dependency); base URL, model and key come from the environment variables the yaml
  names (``OPENAI_BASE_URL``, ``SAEOT_JUDGE_MODEL``, ``OPENAI_API_KEY`` by default);
* ``local_hf`` -- a local Hugging Face causal LM directory, by default the offline
  SmolLM2-135M-Instruct that :func:`saeot.lm.ensure_smollm2_hf_dir` builds. Mode
  ``logprob`` (default) scores the three answers by the model's log-likelihood after
  the prompt and takes the most likely one (it always yields a valid answer, and the
  normalised probabilities are kept); ``generate`` decodes greedily and parses.

Answers are parsed robustly (:func:`parse_answer`), cached on disk by a hash of the
backend's identity and the exact prompt (one JSON file per judgement, written
atomically), so a second evaluation of the same pairs does not call the model.
Per layer pair, ``n_pairs`` matched pairs are drawn (seeded) and ``n_control`` random
pairs of the same two layers (the judge's own base rate); the mean score gets a
percentile-bootstrap confidence interval (and a t interval).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeot.io import atomic_write_json

log = logging.getLogger(__name__)

LABELS = ("same", "maybe", "different")
SCORES = {"same": 3, "maybe": 2, "different": 1}
NEWLINE_MARK = "⏎"

SYSTEM_PROMPT = (
    "You compare features of a language model. A feature is described by text snippets on which it is "
    "most active; in each snippet the token where the feature fires is marked <<like this>>. "
    "Answer with exactly one word: same, maybe, or different."
)
QUESTION = (
    "Do feature A and feature B respond to the same concept?\n"
    "same = the same concept; maybe = related or partly overlapping; different = unrelated.\n"
    "Answer with one word: same, maybe, or different."
)


# ---------------------------------------------------------------------------- contexts
@dataclass
class Context:
    """One top-activating context of a feature: text left of the token, the token, text right."""

    left: str
    token: str
    right: str
    activation: float
    context_index: int = -1
    position: int = -1

    def marked(self) -> str:
        """``left<<token>>right`` (the prompt's form)."""
        return f"{self.left}<<{self.token}>>{self.right}"


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", NEWLINE_MARK).replace("\t", " ")


def feature_contexts(
    locations: Tensor, activations: Tensor, contexts: Tensor, codec: Any, n: int = 5, window: int = 12,
    right: int = 4, skip_ids: Sequence[int] = (),
) -> list[Context]:
    """The ``n`` most active distinct contexts of one feature.

    Args:
        locations: ``[K, 2]`` (context index into ``contexts``, position), -1 on padding.
        activations: ``[K]`` the feature's activation there.
        contexts: ``[N, T]`` the run's packed token contexts (``datamodule.contexts``).
        codec: decodes token ids (``lm.codec``).
        n: contexts returned (fewer if the feature has fewer samples).
        window / right: tokens shown left / right of the marked token.
        skip_ids: ids dropped from the shown text (BOS).

    Newlines are shown as ``⏎`` so that a snippet stays on one line.
    """
    valid = (locations[:, 0] >= 0) & (locations[:, 1] >= 0)
    idx = torch.nonzero(valid).flatten()
    idx = idx[torch.argsort(activations[idx].float(), descending=True, stable=True)]
    out: list[Context] = []
    seen: set[tuple[int, int]] = set()
    skip = set(int(i) for i in skip_ids)
    for k in idx.tolist():
        ci, pos = int(locations[k, 0]), int(locations[k, 1])
        if (ci, pos) in seen or ci >= contexts.shape[0] or pos >= contexts.shape[1]:
            continue
        seen.add((ci, pos))
        row = contexts[ci].tolist()
        left_ids = [t for t in row[max(0, pos - window):pos] if t not in skip]
        right_ids = [t for t in row[pos + 1:pos + 1 + right] if t not in skip]
        out.append(Context(
            left=_clean(codec.decode(left_ids)) if left_ids else "",
            token=_clean(codec.decode([row[pos]])),
            right=_clean(codec.decode(right_ids)) if right_ids else "",
            activation=float(activations[k]), context_index=ci, position=pos,
        ))
        if len(out) >= n:
            break
    return out


class FeatureContexts:
    """Reads the top contexts of features from a run's ``features/<hook>.safetensors``
    (only the small tensors: locations, activations, n_fire)."""

    def __init__(self, run_dir: str | Path, contexts: Tensor, codec: Any, n: int = 5, window: int = 12,
                 right: int = 4) -> None:
        self.run_dir = Path(run_dir)
        self.contexts, self.codec = contexts, codec
        self.n, self.window, self.right = n, window, right
        self._tensors: dict[str, dict[str, Tensor]] = {}
        bos = getattr(codec, "bos_token_id", None)
        self.skip_ids = () if bos is None else (int(bos),)

    def _load(self, hook: str) -> dict[str, Tensor]:
        if hook not in self._tensors:
            path = self.run_dir / "features" / f"{hook}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the judge and the report need the run's feature samples")
            from safetensors import safe_open

            from saeot.io import CorruptFileError

            try:
                with safe_open(str(path), framework="pt") as f:
                    self._tensors[hook] = {k: f.get_tensor(k) for k in ("locations", "activations", "n_fire")}
            except Exception as e:
                raise CorruptFileError(f"cannot read {path} ({e}); rerun train.py for this run") from e
        return self._tensors[hook]

    def has_contexts(self, hook: str) -> Tensor:
        """``[F]`` bool: features with at least one sample."""
        return (self._load(hook)["locations"][:, :, 0] >= 0).any(1)

    def n_fire(self, hook: str) -> Tensor:
        return self._load(hook)["n_fire"]

    def get(self, hook: str, feature: int) -> list[Context]:
        t = self._load(hook)
        return feature_contexts(t["locations"][feature], t["activations"][feature], self.contexts, self.codec,
                                n=self.n, window=self.window, right=self.right, skip_ids=self.skip_ids)


# ---------------------------------------------------------------------------- prompt and parsing
def build_prompt(contexts_a: Sequence[Context], contexts_b: Sequence[Context],
                 name_a: str = "feature A", name_b: str = "feature B") -> list[dict[str, str]]:
    """Chat messages ``[{"role": "system", ...}, {"role": "user", ...}]`` asking same / maybe / different."""

    def block(title: str, ctxs: Sequence[Context]) -> str:
        lines = [f"{title}:"]
        lines += [f"{i}. {c.marked()}" for i, c in enumerate(ctxs, 1)] or ["(no contexts)"]
        return "\n".join(lines)

    user = "\n\n".join([block(f"Feature A ({name_a})", contexts_a), block(f"Feature B ({name_b})", contexts_b),
                        QUESTION])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_NEG_SAME = re.compile(r"\b(not|n't|never|no)\s+(quite\s+|really\s+|exactly\s+|the\s+)*(the\s+)?same\b")
_EXPLICIT = re.compile(r"\b(?:answer|verdict|label|judg(?:e)?ment|final answer)\s*(?:is|:|=|-)?\s*\**\s*"
                       r"[\"'`(\[]?\s*(same|maybe|different)\b")
_PATTERNS = [
    ("different", re.compile(r"\b(different|differ|distinct|unrelated|dissimilar)\b")),
    ("maybe", re.compile(r"\b(maybe|possibly|perhaps|partially|partly|related|unsure|uncertain|unclear|similar)\b")),
    ("same", re.compile(r"\b(same|identical|equivalent)\b")),
]
_DIGIT = re.compile(r"^\W*([123])\W*$")


def parse_answer(text: str | None) -> str | None:
    """``"same"``, ``"maybe"``, ``"different"`` or None (unparseable).

    Robust to case, punctuation, markdown, ``<think>`` blocks, explicit ``Answer: X``,
    a bare score 3 / 2 / 1, and negations ("not the same" -> different). Without an
    explicit answer the earliest keyword wins ("Maybe; they are related" -> maybe).
    """
    if text is None:
        return None
    t = _THINK.sub(" ", str(text)).lower().replace("*", " ").replace("_", " ")
    t = re.sub(r"\s+", " ", t).strip()
    if not t:
        return None
    m = _DIGIT.match(t)
    if m:
        return {"3": "same", "2": "maybe", "1": "different"}[m.group(1)]
    explicit = _EXPLICIT.findall(t)
    if explicit:
        return explicit[-1]
    hits: list[tuple[int, int, str]] = []
    for m in _NEG_SAME.finditer(t):
        hits.append((m.start(), 0, "different"))
    neg_spans = [m.span() for m in _NEG_SAME.finditer(t)]
    for prio, (label, pat) in enumerate(_PATTERNS, 1):
        for m in pat.finditer(t):
            if label == "same" and any(a <= m.start() < b for a, b in neg_spans):
                continue
            hits.append((m.start(), prio, label))
    if not hits:
        if re.match(r"^(yes|yeah|yep)\b", t):
            return "same"
        if re.match(r"^(no|nope)\b", t):
            return "different"
        return None
    return min(hits)[2]


# ---------------------------------------------------------------------------- cache
class JudgeCache:
    """One JSON file per judgement under ``root/<key[:2]>/<key>.json``; atomic writes.
    A file that cannot be read is ignored (and rewritten), never trusted."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root else None

    @staticmethod
    def key(identity: dict, messages: list[dict]) -> str:
        blob = json.dumps({"judge": identity, "messages": messages, "v": 1}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(d, dict) or "raw" not in d or d.get("key") != key:
            return None
        return d

    def put(self, key: str, record: dict) -> None:
        if self.root is None:
            return
        atomic_write_json(self._path(key), {**record, "key": key})


# ---------------------------------------------------------------------------- judges
@dataclass
class Judgement:
    label: str | None
    score: float
    raw: str
    cached: bool = False
    probs: dict[str, float] | None = None

    @classmethod
    def from_raw(cls, raw: str, probs: dict | None = None, cached: bool = False) -> "Judgement":
        label = parse_answer(raw)
        return cls(label=label, score=float(SCORES[label]) if label else math.nan, raw=raw, cached=cached, probs=probs)


class Judge(ABC):
    """Base class: prompt -> cached judgement. Subclasses implement :meth:`complete`.

    Args:
        n_pairs: matched pairs judged per layer pair (a seeded random sample).
        n_control: random (unmatched) pairs of the same layers judged as a control.
        n_contexts: top contexts shown per feature.
        context_window / context_right: tokens shown left / right of the marked token.
        confidence: level of the confidence intervals.
        n_boot: bootstrap resamples.
        seed: seed of the samples and of the bootstrap.
        cache_dir: judgement cache (None: no cache).
    """

    name = "judge"

    def __init__(self, n_pairs: int = 20, n_control: int = 10, n_contexts: int = 5, context_window: int = 12,
                 context_right: int = 4, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 cache_dir: str | None = None) -> None:
        if n_pairs < 1:
            raise ValueError(f"judge.n_pairs={n_pairs} must be >= 1")
        if not 0 < confidence < 1:
            raise ValueError(f"judge.confidence={confidence} must be in (0, 1)")
        self.n_pairs, self.n_control, self.n_contexts = int(n_pairs), int(n_control), int(n_contexts)
        self.context_window, self.context_right = int(context_window), int(context_right)
        self.confidence, self.n_boot, self.seed = float(confidence), int(n_boot), int(seed)
        self.cache = JudgeCache(cache_dir)
        self.n_calls = 0  # model calls (cache misses) made by this object

    @abstractmethod
    def identity(self) -> dict:
        """What determines the answers (backend, model, decoding); part of the cache key. No secrets."""

    @abstractmethod
    def complete(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, float] | None]:
        """The model's raw answer to ``messages`` (and label probabilities if the backend has them)."""

    def judge(self, messages: list[dict[str, str]]) -> Judgement:
        key = self.cache.key(self.identity(), messages)
        hit = self.cache.get(key)
        if hit is not None:
            return Judgement.from_raw(hit["raw"], hit.get("probs"), cached=True)
        self.n_calls += 1
        raw, probs = self.complete(messages)
        j = Judgement.from_raw(raw, probs)
        self.cache.put(key, {"raw": raw, "probs": probs, "label": j.label, "identity": self.identity(),
                             "time": time.time()})
        return j

    def judge_pair(self, contexts_a: Sequence[Context], contexts_b: Sequence[Context], name_a: str = "feature A",
                   name_b: str = "feature B") -> Judgement:
        return self.judge(build_prompt(contexts_a, contexts_b, name_a, name_b))


def _env_or(value: str | None, env: str | None) -> str | None:
    if value:
        return value
    return os.environ.get(env) if env else None


class OpenAICompatibleJudge(Judge):
    """Any OpenAI-compatible chat endpoint over plain HTTP (``POST {base_url}/chat/completions``).

    Args:
        base_url / model / api_key: explicit values; else read from the environment
            variables named by ``base_url_env`` / ``model_env`` / ``api_key_env``. The key
            may be empty (local servers); it is never logged nor cached.
        temperature, max_tokens: decoding (0 and a few tokens: the answer is one word).
        timeout_s, max_retries: per request; retries back off on 429 / 5xx / network errors.
    """

    name = "openai_compatible"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 base_url_env: str | None = "OPENAI_BASE_URL", model_env: str | None = "SAEOT_JUDGE_MODEL",
                 api_key_env: str | None = "OPENAI_API_KEY", temperature: float = 0.0, max_tokens: int = 16,
                 timeout_s: float = 60.0, max_retries: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = _env_or(base_url, base_url_env)
        self.model = _env_or(model, model_env)
        if not self.base_url:
            raise ValueError(f"judge=openai_compatible needs a base URL: set ${base_url_env} or judge.base_url")
        if not self.model:
            raise ValueError(f"judge=openai_compatible needs a model name: set ${model_env} or judge.model")
        self.base_url = self.base_url.rstrip("/")
        self._api_key = _env_or(api_key, api_key_env) or ""
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)

    def identity(self) -> dict:
        return {"backend": self.name, "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, None]:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        delay = 1.0
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode())
                choice = (data.get("choices") or [{}])[0]
                content = (choice.get("message") or {}).get("content")
                if content is None:
                    content = choice.get("text", "")
                return str(content), None
            except urllib.error.HTTPError as e:
                retry = e.code == 429 or e.code >= 500
                if not retry or attempt == self.max_retries:
                    detail = e.read().decode(errors="replace")[:200] if hasattr(e, "read") else ""
                    raise RuntimeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.max_retries:
                    raise RuntimeError(f"judge endpoint {url} unreachable ({e}); check the judge's base URL") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


class LocalHFJudge(Judge):
    """A local Hugging Face causal LM (offline; default: SmolLM2-135M-Instruct from the bundled GGUF).

    Args:
        path: model directory (None: :func:`saeot.lm.ensure_smollm2_hf_dir` under ``model_cache_dir``).
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
                from saeot.lm import ensure_smollm2_hf_dir

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saeot.lm import resolve_dtype

        d = self.model_dir()
        self._tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(d, dtype=resolve_dtype(self.dtype), local_files_only=True)
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


# ---------------------------------------------------------------------------- statistics
def mean_ci(scores: Sequence[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the valid (non-NaN) scores with a percentile-bootstrap CI (``ci``) and a t CI (``ci_t``)."""
    x = np.asarray([s for s in scores if not math.isnan(s)], dtype=float)
    n = len(x)
    out: dict[str, Any] = {"n": n, "n_invalid": len(scores) - n}
    if n == 0:
        out.update(mean=math.nan, ci=[math.nan, math.nan], ci_t=[math.nan, math.nan], sem=math.nan)
        return out
    mean = float(x.mean())
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    alpha = 1 - confidence
    if n > 1:
        rng = np.random.default_rng(seed)
        boots = x[rng.integers(0, n, size=(n_boot, n))].mean(1)
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        from scipy import stats

        tq = float(stats.t.ppf(1 - alpha / 2, n - 1))
        ci_t = [mean - tq * sem, mean + tq * sem]
    else:
        lo = hi = mean
        ci_t = [math.nan, math.nan]
    out.update(mean=mean, ci=[float(lo), float(hi)], ci_t=ci_t, sem=sem, confidence=confidence,
               ci_method="percentile bootstrap")
    return out


def _summary(items: list[dict], judge: Judge) -> dict:
    scores = [float(i["score"]) for i in items]
    out = mean_ci(scores, judge.confidence, judge.n_boot, judge.seed)
    out["counts"] = {lab: sum(1 for i in items if i["label"] == lab) for lab in LABELS}
    expected = [sum(SCORES[k] * v for k, v in i["probs"].items()) for i in items if i.get("probs")]
    if expected:  # backends with label probabilities: the mean expected score, a finer-grained reading
        e = mean_ci(expected, judge.confidence, judge.n_boot, judge.seed)
        out["expected_score"] = {"mean": e["mean"], "ci": e["ci"], "n": e["n"]}
    return out


# ---------------------------------------------------------------------------- one run
def _pair_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16)


def sample_pairs(feature_a: Tensor, feature_b: Tensor, usable_a: Tensor, usable_b: Tensor, n: int,
                 seed: int) -> list[tuple[int, int]]:
    """Up to ``n`` matched pairs (seeded, without replacement) whose two features have contexts."""
    ok = usable_a[feature_a] & usable_b[feature_b]
    cand = torch.nonzero(ok).flatten().numpy()
    rng = np.random.default_rng(seed)
    pick = rng.choice(cand, size=min(n, len(cand)), replace=False) if len(cand) else cand
    return [(int(feature_a[i]), int(feature_b[i])) for i in sorted(pick.tolist())]


def control_pairs(usable_a: Tensor, usable_b: Tensor, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random (A, B) pairs of features with contexts (same for every matcher of the same layers)."""
    a, b = torch.nonzero(usable_a).flatten().numpy(), torch.nonzero(usable_b).flatten().numpy()
    if not len(a) or not len(b) or n < 1:
        return []
    rng = np.random.default_rng(seed)
    return [(int(x), int(y)) for x, y in zip(rng.choice(a, n), rng.choice(b, n))]


def judge_run(judge: Judge, run: Any, matchings: Sequence[Any], base: Any, settings: Any = None) -> dict:
    """Judge a sample of each layer pair's matches of one run (``metrics.json["judge"]``).

    Args:
        judge: a :class:`Judge`.
        run: :class:`saeot.evaluation.functional.RunDir`.
        matchings: its :class:`saeot.evaluation.functional.PairMatching` list.
        base: the set-up :class:`saeot.pipeline.Run` (``datamodule.contexts``, ``lm.codec``).
    """
    from tqdm.auto import tqdm

    fc = FeatureContexts(run.path, base.datamodule.contexts, base.lm.codec, n=judge.n_contexts,
                         window=judge.context_window, right=judge.context_right)
    t0 = time.perf_counter()
    calls0 = judge.n_calls
    pairs: dict[str, dict] = {}
    all_items, all_control = [], []
    for pm in matchings:
        ua, ub = fc.has_contexts(pm.hook_a), fc.has_contexts(pm.hook_b)
        la, lb = _layer(pm.hook_a), _layer(pm.hook_b)
        todo = [("match", p) for p in sample_pairs(pm.feature_a, pm.feature_b, ua, ub, judge.n_pairs,
                                                   _pair_seed(judge.seed, run.label + pm.key))]
        todo += [("control", p) for p in control_pairs(ua, ub, judge.n_control, _pair_seed(judge.seed, pm.key))]
        items, control = [], []
        progress = True if settings is None else settings.progress
        for kind, (i, j) in tqdm(todo, desc=f"judge {run.label} {la}->{lb}", disable=not progress, leave=False):
            jd = judge.judge_pair(fc.get(pm.hook_a, i), fc.get(pm.hook_b, j), f"layer {la} #{i}", f"layer {lb} #{j}")
            rec = {"feature_a": i, "feature_b": j, "label": jd.label, "score": jd.score, "cached": jd.cached}
            if jd.probs:
                rec["probs"] = jd.probs
            if jd.label is None:
                rec["raw"] = jd.raw[:200]
            (items if kind == "match" else control).append(rec)
        summ = _summary(items, judge)
        summ["control"] = _summary(control, judge) if control else None
        summ["items"] = items
        summ["control_items"] = control
        pairs[pm.key] = summ
        all_items += items
        all_control += control
    overall = _summary(all_items, judge)
    return {
        "backend": judge.identity(), "n_pairs_per_layer_pair": judge.n_pairs, "n_control": judge.n_control,
        "scale": SCORES, "overall": overall, "control_overall": _summary(all_control, judge) if all_control else None,
        "pairs": pairs, "n_model_calls": judge.n_calls - calls0, "seconds": time.perf_counter() - t0,
    }


def _layer(hook: str) -> int:
    from saeot.hooks import hook_layer

    return hook_layer(hook)


__all__ = [
    "LABELS", "SCORES", "Context", "feature_contexts", "FeatureContexts", "build_prompt", "parse_answer",
    "JudgeCache", "Judgement", "Judge", "OpenAICompatibleJudge", "LocalHFJudge", "mean_ci", "sample_pairs",
    "control_pairs", "judge_run",
]
