r"""Circuit tasks: (clean, corrupted) prompt pairs and the logit-difference metric.

A task is a list of :class:`PromptPair` ``(clean, corrupted, correct, wrong)``. On the
clean prompt the model should prefer ``correct`` over ``wrong``; the corrupted prompt
differs from the clean one in a few tokens so that the preference flips (or vanishes).
The metric of one prompt is the logit difference at its last position

.. math::
    m(x) = \ell_{T-1}(x)[\text{correct}] - \ell_{T-1}(x)[\text{wrong}],

and the task metric is its mean over prompts.

Builders (Hydra group ``circuit/``, one ``_target_`` each):

* :class:`IOITask` -- indirect object identification ("When Mary and John went to the
  store, John gave a drink to" -> `` Mary``); corrupted: the second mention of the
  subject is replaced by the indirect object, which flips the answer.
* :class:`SVATask` -- subject-verb agreement across an attractor ("The key near the
  cabinets" -> `` is`` vs `` are``); corrupted: the subject's number flips.
* :class:`DigitAdditionTask` -- ``a+b=`` with a few solved examples before it;
  corrupted: a different second operand. Works on tokenizers with single-token
  numbers (GPT-2) or digits (Gemma, SmolLM2, with ``n_digits=1``); SmolLM2 does not
  solve it well, which :func:`clean_accuracy` reports.
* :class:`JsonlTask` -- user prompts, one JSON object a line with the fields
  ``clean``, ``corrupted``, ``correct``, ``wrong``.

:meth:`Task.build` tokenises a task with a model's codec into :class:`TaskData`:
answers must be single tokens and the two prompts of a pair must have the same
number of tokens (so that node activations can be compared position by position);
pairs that break either rule are dropped, counted and reported, never silently.
"""

from __future__ import annotations

import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

log = logging.getLogger(__name__)

__all__ = [
    "PromptPair",
    "TaskData",
    "TaskError",
    "Task",
    "IOITask",
    "SVATask",
    "DigitAdditionTask",
    "JsonlTask",
    "PromptsTask",
    "logit_diff",
    "clean_accuracy",
]


class TaskError(ValueError):
    """A task cannot be built for this model; the message names the setting to change."""


@dataclass(frozen=True)
class PromptPair:
    """One clean / corrupted prompt pair with its two answers (strings, answers usually
    start with a space: ``" Mary"``)."""

    clean: str
    corrupted: str
    correct: str
    wrong: str


@dataclass
class TaskData:
    """A task tokenised with one model's codec.

    Attributes:
        name: task name (``ioi``, ``sva``, ...).
        pairs: the N kept pairs.
        clean, corrupted: N long tensors ``[T_n]`` each (BOS first when the codec has
            one); ``clean[n]`` and ``corrupted[n]`` have the same length.
        correct, wrong: ``[N]`` long, the answer token ids.
        dropped: ``(pair, reason)`` for every pair that was not kept.
        bos: whether position 0 of every prompt is the BOS token.
    """

    name: str
    pairs: list[PromptPair]
    clean: list[Tensor]
    corrupted: list[Tensor]
    correct: Tensor
    wrong: Tensor
    dropped: list[tuple[PromptPair, str]] = field(default_factory=list)
    bos: bool = True

    @property
    def n(self) -> int:
        return len(self.pairs)

    def lengths(self) -> Tensor:
        """``[N]`` token count of each prompt."""
        return torch.tensor([len(t) for t in self.clean], dtype=torch.long)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator["TaskBatch"]:
        """Batches of prompts of equal length (no padding, so no attention mask is needed).

        Prompts are grouped by length, then cut into chunks of at most ``batch_size``;
        the order is deterministic. Every prompt appears in exactly one batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(self.clean):
            by_len.setdefault(len(t), []).append(i)
        for length in sorted(by_len):
            idx = by_len[length]
            for s in range(0, len(idx), batch_size):
                chunk = torch.tensor(idx[s:s + batch_size], dtype=torch.long)
                yield TaskBatch(
                    index=chunk,
                    clean=torch.stack([self.clean[i] for i in chunk.tolist()]).to(device),
                    corrupted=torch.stack([self.corrupted[i] for i in chunk.tolist()]).to(device),
                    correct=self.correct[chunk].to(device),
                    wrong=self.wrong[chunk].to(device),
                    bos=self.bos,
                )

    def n_batches(self, batch_size: int) -> int:
        counts: dict[int, int] = {}
        for t in self.clean:
            counts[len(t)] = counts.get(len(t), 0) + 1
        return sum(-(-c // batch_size) for c in counts.values())


@dataclass
class TaskBatch:
    """``n`` prompts of one length ``T``.

    Attributes:
        index: ``[n]`` positions of the prompts in :attr:`TaskData.pairs`.
        clean, corrupted: ``[n, T]`` long.
        correct, wrong: ``[n]`` long.
        bos: whether position 0 is BOS.
    """

    index: Tensor
    clean: Tensor
    corrupted: Tensor
    correct: Tensor
    wrong: Tensor
    bos: bool

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])


def logit_diff(logits: Tensor, correct: Tensor, wrong: Tensor) -> Tensor:
    """``[n]`` logit difference at the last position.

    Args:
        logits: ``[n, T, V]``.
        correct, wrong: ``[n]`` token ids.
    """
    if logits.ndim != 3 or logits.shape[0] != correct.shape[0] or correct.shape != wrong.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [n, T, V] with correct/wrong [n], got "
            f"{tuple(correct.shape)} / {tuple(wrong.shape)}"
        )
    last = logits[:, -1, :]
    return last.gather(1, correct[:, None]).squeeze(1) - last.gather(1, wrong[:, None]).squeeze(1)


@torch.no_grad()
def clean_accuracy(lm: LanguageModel, data: TaskData, batch_size: int = 32) -> dict[str, float]:
    """How well the unmodified model does the task.

    Returns a dict with ``accuracy`` (fraction of clean prompts with logit difference
    > 0), ``corrupted_accuracy`` (fraction of corrupted prompts with logit difference
    < 0, i.e. where the corruption flips the preference), ``logit_diff_clean`` and
    ``logit_diff_corrupted`` (means).
    """
    model = lm.model
    device = next(model.parameters()).device
    ld_clean = torch.empty(data.n)
    ld_corr = torch.empty(data.n)
    for b in data.batches(batch_size, device):
        ld_clean[b.index] = logit_diff(model(b.clean), b.correct, b.wrong).float().cpu()
        ld_corr[b.index] = logit_diff(model(b.corrupted), b.correct, b.wrong).float().cpu()
    return {
        "accuracy": float((ld_clean > 0).float().mean()),
        "corrupted_accuracy": float((ld_corr < 0).float().mean()),
        "logit_diff_clean": float(ld_clean.mean()),
        "logit_diff_corrupted": float(ld_corr.mean()),
    }


# ----------------------------------------------------------------------------- builders
class Task(ABC):
    """A set of prompt pairs; subclasses generate them, :meth:`build` tokenises them."""

    name: str = "task"
    #: a pair the model cannot use is an error naming it (user data), not dropped with a warning
    strict: bool = False

    @abstractmethod
    def pairs(self) -> list[PromptPair]:
        """All prompt pairs of the task (strings), in a deterministic order."""

    def where(self, i: int) -> str:
        """Where pair ``i`` comes from, for error messages."""
        return f"circuit={self.name} pair {i}"

    def build(self, lm: LanguageModel) -> TaskData:
        """Tokenise with ``lm.codec`` (BOS prepended when the codec has one).

        Pairs whose answers are not single tokens, whose two answers are the same
        token, or whose clean and corrupted prompts differ in token count are dropped
        (with a warning giving counts and an example). Raises :class:`TaskError` naming
        ``circuit=`` when nothing is left.
        """
        codec = lm.codec
        bos = codec.bos_token_id
        kept: list[PromptPair] = []
        clean: list[Tensor] = []
        corrupted: list[Tensor] = []
        correct: list[int] = []
        wrong: list[int] = []
        dropped: list[tuple[PromptPair, str]] = []
        for i, p in enumerate(self.pairs()):
            if self.strict and dropped:
                break
            a, w = codec.encode(p.correct), codec.encode(p.wrong)
            if len(a) != 1 or len(w) != 1:
                bad = p.correct if len(a) != 1 else p.wrong
                dropped.append((p, f"answer {bad!r} is {len(codec.encode(bad))} tokens, not 1"))
                continue
            if a[0] == w[0]:
                dropped.append((p, f"answers {p.correct!r} and {p.wrong!r} are the same token"))
                continue
            c = ([bos] if bos is not None else []) + list(codec.encode(p.clean))
            k = ([bos] if bos is not None else []) + list(codec.encode(p.corrupted))
            if len(c) != len(k):
                dropped.append((p, f"clean has {len(c)} tokens but corrupted has {len(k)}"))
                continue
            if len(c) == 0:
                dropped.append((p, "empty prompt"))
                continue
            kept.append(p)
            clean.append(torch.tensor(c, dtype=torch.long))
            corrupted.append(torch.tensor(k, dtype=torch.long))
            correct.append(a[0])
            wrong.append(w[0])
        model_name = getattr(lm, "name", "?")
        if self.strict and dropped:
            raise TaskError(f"{self.where(i)}: {dropped[0][1]} for model {model_name!r}; answers must be single "
                            "tokens and clean/corrupted prompts equally long in this model's tokenizer")
        if not kept:
            reasons = sorted({r for _, r in dropped})[:3]
            raise TaskError(
                f"circuit={self.name}: all {len(dropped)} prompt pairs were dropped for model {model_name!r} "
                f"(e.g. {reasons}); answers must be single tokens and clean/corrupted prompts equally long "
                "in this model's tokenizer: pick another circuit= task or model="
            )
        if dropped:
            log.warning("circuit=%s: dropped %d of %d prompt pairs for model %r (e.g. %s)", self.name,
                        len(dropped), len(dropped) + len(kept), model_name, dropped[0][1])
        return TaskData(
            name=self.name, pairs=kept, clean=clean, corrupted=corrupted,
            correct=torch.tensor(correct, dtype=torch.long), wrong=torch.tensor(wrong, dtype=torch.long),
            dropped=dropped, bos=bos is not None,
        )


def _check_n(n_prompts: int, setting: str) -> None:
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise TaskError(f"{setting}={n_prompts!r}: must be a positive integer")


class PromptsTask(Task):
    """A task from an explicit list of pairs (``PromptPair`` or dicts with the four fields)."""

    def __init__(self, pairs: Sequence[PromptPair | dict], name: str = "prompts") -> None:
        self.name = name
        self._pairs = [p if isinstance(p, PromptPair) else _pair_from_dict(p, f"circuit={name}") for p in pairs]
        if not self._pairs:
            raise TaskError(f"circuit={name}: no prompt pairs given")

    def pairs(self) -> list[PromptPair]:
        return list(self._pairs)


def _pair_from_dict(d: Any, where: str) -> PromptPair:
    if not isinstance(d, dict):
        raise TaskError(f"{where}: expected an object with clean, corrupted, correct, wrong; got {type(d).__name__}")
    missing = [k for k in ("clean", "corrupted", "correct", "wrong") if k not in d]
    if missing:
        raise TaskError(f"{where}: missing field(s) {missing}")
    bad = [k for k in ("clean", "corrupted", "correct", "wrong") if not isinstance(d[k], str)]
    if bad:
        raise TaskError(f"{where}: field(s) {bad} must be strings")
    return PromptPair(d["clean"], d["corrupted"], d["correct"], d["wrong"])


IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sarah", "Paul", "Anna", "Mark", "Kate", "David", "Lisa",
    "Michael", "Emma", "Peter", "Laura", "Alex", "Rachel", "Chris", "Jane",
)
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "While {A} and {B} were at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "When {A} and {B} got a {obj} at the {place}, {S} decided to give it to",
)
IOI_PLACES = ("store", "park", "school", "office", "station", "market", "garden", "restaurant")
IOI_OBJECTS = ("drink", "book", "ring", "bag", "kiss", "snack", "letter", "ball")


class IOITask(Task):
    """Indirect object identification.

    Each pair draws two names (IO, S), a template, a place and an object. The first
    sentence mentions both names (order IO-S or S-IO, at random); the clean prompt's
    second clause has S as its subject, so the answer is IO and the wrong answer S.
    The corrupted prompt puts IO there instead, which makes S the natural answer.

    Args:
        n_prompts: number of pairs.
        seed: the generator's seed.
        names, templates, places, objects: override the built-in lists (templates
            use ``{A}``, ``{B}`` for the first mentions, ``{S}`` for the subject,
            ``{place}``, ``{obj}``).
    """

    name = "ioi"

    def __init__(self, n_prompts: int = 64, seed: int = 0, names: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, places: Sequence[str] | None = None,
                 objects: Sequence[str] | None = None) -> None:
        _check_n(n_prompts, "circuit.n_prompts")
        self.n_prompts, self.seed = n_prompts, seed
        self.names = tuple(names or IOI_NAMES)
        self.templates = tuple(templates or IOI_TEMPLATES)
        self.places = tuple(places or IOI_PLACES)
        self.objects = tuple(objects or IOI_OBJECTS)
        if len(set(self.names)) < 2:
            raise TaskError("circuit.names needs at least two different names")

    def pairs(self) -> list[PromptPair]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.n_prompts):
            io, s = rng.sample(self.names, 2)
            t, place, obj = rng.choice(self.templates), rng.choice(self.places), rng.choice(self.objects)
            a, b = (io, s) if rng.random() < 0.5 else (s, io)
            clean = t.format(A=a, B=b, S=s, place=place, obj=obj)
            corrupted = t.format(A=a, B=b, S=io, place=place, obj=obj)
            out.append(PromptPair(clean, corrupted, " " + io, " " + s))
        return out


SVA_NOUNS = (
    ("key", "keys"), ("dog", "dogs"), ("cat", "cats"), ("boy", "boys"), ("girl", "girls"),
    ("teacher", "teachers"), ("doctor", "doctors"), ("book", "books"), ("car", "cars"),
    ("house", "houses"), ("friend", "friends"), ("student", "students"), ("player", "players"),
    ("farmer", "farmers"), ("writer", "writers"), ("bird", "birds"), ("tree", "trees"),
    ("table", "tables"), ("picture", "pictures"), ("window", "windows"),
)
SVA_TEMPLATES = (
    "The {subj} near the {attr}",
    "The {subj} behind the {attr}",
    "The {subj} next to the {attr}",
    "The {subj} with the {attr}",
    "The {subj} beside the {attr}",
)


class SVATask(Task):
    """Subject-verb agreement across an attractor noun.

    The prompt ends after a prepositional phrase whose noun (the attractor) has a
    random number; the answer is the verb that agrees with the subject. Clean
    prompts are singular or plural at random (`` is`` / `` are``, or the ``verbs``
    given); the corrupted prompt flips the subject's number, and with it the answer.

    Args:
        n_prompts, seed: as in :class:`IOITask`.
        nouns: ``(singular, plural)`` pairs.
        templates: with ``{subj}`` and ``{attr}``.
        verbs: ``(singular, plural)`` answer strings.
    """

    name = "sva"

    def __init__(self, n_prompts: int = 64, seed: int = 0, nouns: Sequence[Sequence[str]] | None = None,
                 templates: Sequence[str] | None = None, verbs: Sequence[str] = (" is", " are")) -> None:
        _check_n(n_prompts, "circuit.n_prompts")
        self.n_prompts, self.seed = n_prompts, seed
        self.nouns = tuple(tuple(p) for p in (nouns or SVA_NOUNS))
        self.templates = tuple(templates or SVA_TEMPLATES)
        if len(verbs) != 2:
            raise TaskError(f"circuit.verbs={list(verbs)} must be [singular, plural]")
        self.verbs = tuple(verbs)
        if any(len(p) != 2 for p in self.nouns) or len(self.nouns) < 2:
            raise TaskError("circuit.nouns must be at least two [singular, plural] pairs")

    def pairs(self) -> list[PromptPair]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.n_prompts):
            subj, attr = rng.sample(self.nouns, 2)
            t = rng.choice(self.templates)
            attr_word = attr[rng.randrange(2)]
            number = rng.randrange(2)  # 0 singular clean, 1 plural clean
            clean = t.format(subj=subj[number], attr=attr_word)
            corrupted = t.format(subj=subj[1 - number], attr=attr_word)
            out.append(PromptPair(clean, corrupted, self.verbs[number], self.verbs[1 - number]))
        return out


class DigitAdditionTask(Task):
    """``a+b=`` after ``few_shot`` solved examples, one per line.

    With ``n_digits=1`` the operands are digits whose sum is below 10 (a one-digit
    answer, a single token in digit-level tokenizers). With ``n_digits=2`` they are
    two-digit numbers whose sum has two digits (single tokens in GPT-2). The
    corrupted prompt changes the second operand so that the sum differs; the wrong
    answer is the corrupted prompt's sum.

    Args:
        n_prompts, seed: as in :class:`IOITask`.
        n_digits: 1 or 2.
        few_shot: number of solved examples before the question.
        separator: between examples.
    """

    name = "digit_addition"

    def __init__(self, n_prompts: int = 64, seed: int = 0, n_digits: int = 1, few_shot: int = 3,
                 separator: str = "\n") -> None:
        _check_n(n_prompts, "circuit.n_prompts")
        if n_digits not in (1, 2):
            raise TaskError(f"circuit.n_digits={n_digits!r}: must be 1 or 2")
        if few_shot < 0:
            raise TaskError(f"circuit.few_shot={few_shot!r}: must be >= 0")
        self.n_prompts, self.seed, self.n_digits, self.few_shot, self.separator = n_prompts, seed, n_digits, few_shot, separator

    def _operands(self, rng: random.Random) -> tuple[int, int]:
        if self.n_digits == 1:
            a = rng.randrange(0, 9)
            return a, rng.randrange(0, 10 - a)
        a = rng.randrange(10, 90)
        return a, rng.randrange(10, 100 - a)

    def pairs(self) -> list[PromptPair]:
        rng = random.Random(self.seed)
        out = []
        while len(out) < self.n_prompts:
            shots = []
            for _ in range(self.few_shot):
                x, y = self._operands(rng)
                shots.append(f"{x}+{y}={x + y}")
            a, b = self._operands(rng)
            lo, hi = (0, 10 - a) if self.n_digits == 1 else (10, 100 - a)
            options = [c for c in range(lo, hi) if c != b]
            if not options:
                continue
            b2 = rng.choice(options)
            prefix = self.separator.join(shots) + (self.separator if shots else "")
            out.append(PromptPair(f"{prefix}{a}+{b}=", f"{prefix}{a}+{b2}=", str(a + b), str(a + b2)))
        return out


class JsonlTask(Task):
    """User prompts: a JSON-lines file, one ``{"clean", "corrupted", "correct", "wrong"}``
    object a line (blank lines are skipped).

    Args:
        path: the file.
        limit: keep at most this many pairs (the first ones).
        name: reported task name.
    """

    strict = True

    def __init__(self, path: str, limit: int | None = None, name: str = "jsonl") -> None:
        if not path or path == "???":
            raise TaskError("circuit=jsonl needs circuit.path=<file.jsonl>")
        self.path, self.limit, self.name = Path(path).expanduser(), limit, name
        if not self.path.is_file():
            raise TaskError(f"circuit.path={str(path)!r} is not a file")
        self._lines: list[int] = []
        self._pairs = self._read()  # the file's format is checked when the task is built, before any work

    def _read(self) -> list[PromptPair]:
        out, lines = [], []
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"circuit.path={str(self.path)!r} line {i} is not JSON ({e})") from None
                out.append(_pair_from_dict(d, f"circuit.path={str(self.path)!r} line {i}"))
                lines.append(i)
                if self.limit is not None and len(out) >= self.limit:
                    break
        if not out:
            raise TaskError(f"circuit.path={str(self.path)!r} holds no prompt pairs")
        self._lines = lines
        return out

    def pairs(self) -> list[PromptPair]:
        return list(self._pairs)

    def where(self, i: int) -> str:
        return f"circuit.path={str(self.path)!r} line {self._lines[i]}"
