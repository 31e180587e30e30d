"""The judge's question: the prompt showing both features' top contexts, and the robust
parsing of its answer into same / maybe / different (scored 3 / 2 / 1)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from saeot.evaluation.contexts import Context

__all__ = ["LABELS", "SCORES", "SYSTEM_PROMPT", "QUESTION", "build_prompt", "parse_answer"]

LABELS = ("same", "maybe", "different")
SCORES = {"same": 3, "maybe": 2, "different": 1}

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

