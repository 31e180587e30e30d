"""The judge interface: a prompt in, a cached :class:`Judgement` out; backends implement
:meth:`Judge.complete` (and :meth:`Judge.identity`, the cache key's part)."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from saeot.evaluation.contexts import Context
from saeot.evaluation.judge._cache import JudgeCache
from saeot.evaluation.judge._prompt import SCORES, build_prompt, parse_answer

__all__ = ["Judgement", "Judge"]


@dataclass
class Judgement:
    """One judged pair: ``label`` (same / maybe / different or None), its ``score`` (3 / 2 / 1),
    the raw answer; label probabilities (LLM judges in logprob mode); for judges that score
    a similarity, the ``similarity`` and its ``percentile`` among random pairs."""

    label: str | None
    score: float
    raw: str
    cached: bool = False
    probs: dict[str, float] | None = None
    similarity: float | None = None
    percentile: float | None = None

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
    #: random pairs per layer pair this judge wants for :meth:`calibrate` (0: none)
    n_calibration: int = 0

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

    def calibrate(self, random_pairs: Sequence[tuple[Sequence[Context], Sequence[Context]]]) -> None:
        """Called before each layer pair with ``n_calibration`` random pairs' contexts (default: nothing)."""

    def judge_pair(self, contexts_a: Sequence[Context], contexts_b: Sequence[Context], name_a: str = "feature A",
                   name_b: str = "feature B") -> Judgement:
        return self.judge(build_prompt(contexts_a, contexts_b, name_a, name_b))

