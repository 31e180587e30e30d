"""The LightningDataModule that streams a language model's hidden states.

Text is tokenised once and packed into fixed-length contexts ``[N, T]``; each
context starts with BOS when the tokenizer has one. The contexts are split into
``profile`` (feature distributions, SAE training) and ``heldout`` (reference-space
fitting, activation correlation), and optionally ``fresh``: contexts packed from the
text *after* the run's last one, seen by no stage of a run (functional evaluation).
A source that is split by document (it has ``split_documents(split)``, e.g. the
packages corpus) gives each split its own documents instead: no document is in two splits.
The splits are fixed when the module is set up; nothing changes them afterwards.
A pass over one split (a Trainer ``predict``) reads a :class:`SplitView`, which
says which split, which hooks and whether hidden states are computed; the module
itself is never reconfigured. Batches carry token ids; the hidden
states are computed on the batch's device, after transfer, under ``no_grad`` and
with ``stop_at_layer`` (:meth:`HiddenStateDataModule.on_after_batch_transfer`), so
nothing but one batch of activations ever exists at a time.

Under DDP every rank reads a disjoint shard of the contexts (``contexts[rank::world]``,
no padding, no repeats), which is why Lightning's own distributed sampler must be
off (``Trainer(use_distributed_sampler=False)``; the trainer configs set it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from saeot.data.text import EmptyCorpusError
from saeot.hooks import base_hook, hook_layer, stop_layer
from saeot.progress import progress_bar

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

def shard_indices(n: int, rank: int, world_size: int) -> Tensor:
    """Indices of the contexts read by ``rank`` of ``world_size``: disjoint, covering, unpadded."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return torch.arange(rank, max(n, rank), world_size)  # empty when rank >= n


def pack_contexts(
    docs: Iterator[str], encode, context_len: int, bos_token_id: int | None, max_contexts: int | None,
    sep_token_id: int | None = None,
) -> Tensor:
    """Concatenate tokenised documents and cut them into ``[N, context_len]`` contexts.

    Each context is ``[BOS] + (context_len - 1)`` stream tokens when ``bos_token_id``
    is set, else ``context_len`` stream tokens. Documents are separated by
    ``sep_token_id`` (if any). The remainder shorter than a context is dropped.
    """
    body = context_len - (1 if bos_token_id is not None else 0)
    if body < 1:
        raise ValueError(f"data.context_len={context_len} is too short")
    buf: list[int] = []
    rows: list[list[int]] = []
    for doc in docs:
        buf.extend(encode(doc))
        if sep_token_id is not None:
            buf.append(sep_token_id)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            rows.append(([bos_token_id] if bos_token_id is not None else []) + chunk)
            if max_contexts is not None and len(rows) >= max_contexts:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        return torch.empty(0, context_len, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


class _Contexts(Dataset):
    def __init__(self, contexts: Tensor, index: Tensor) -> None:
        self.contexts, self.index = contexts, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        j = self.index[i]
        return {"tokens": self.contexts[j], "context_index": j}


class HiddenStateDataModule(L.LightningDataModule):
    """Streams ``{tokens, context_index, positions, mask, hidden}`` batches.

    Args:
        lm: a :class:`saeot.models.LanguageModel` (HookedTransformer + text codec).
        text: a text source (iterable of strings), see :mod:`saeot.data.text`.
        hooks: hook names whose hidden states each batch carries by default.
        context_len: tokens per context, BOS included.
        max_contexts: contexts of the run (profile + heldout).
        heldout_fraction: fraction of the run's contexts in the held-out split.
        batch_size: contexts per batch.
        seed: seed of the profile / heldout split.
        skip_bos: exclude position 0 (BOS, whose hidden state is an outlier) from ``mask``.
        fresh_contexts: up to this many more contexts, packed from the text after the
            run's last one, as split ``fresh`` (0: none). The run's own contexts, their
            split and :meth:`fingerprint` do not depend on it.

    Batches (after transfer to the device) hold ``tokens [B, T]``, ``context_index [B]``,
    ``positions [B, T]``, ``mask [B, T]`` (positions to use) and ``hidden``:
    hook -> ``[B, T, d]``.
    """

    def __init__(
        self,
        lm: LanguageModel,
        text: Any,
        hooks: Sequence[str],
        context_len: int = 128,
        max_contexts: int | None = 512,
        heldout_fraction: float = 0.25,
        batch_size: int = 8,
        seed: int = 0,
        skip_bos: bool = True,
        fresh_contexts: int = 0,
    ) -> None:
        super().__init__()
        if not hooks:
            raise ValueError("layers.ids is empty: configure at least one layer")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if fresh_contexts and max_contexts is None:
            raise ValueError("data.max_contexts=null uses all of the text: nothing is left for fresh_contexts")
        self.lm = lm
        self.text = text
        self.hooks = tuple(hooks)
        self.context_len = context_len
        self.max_contexts = max_contexts
        self.heldout_fraction = heldout_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.skip_bos = skip_bos
        self.fresh_contexts = int(fresh_contexts or 0)
        self.contexts: Tensor | None = None
        self.splits: dict[str, Tensor] = {}
        self.n_run_contexts = 0
        self.fresh_note = ""
        for h in self.hooks:
            hook_layer(h)

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        if self.contexts is not None:
            return
        codec = self.lm.codec
        by_document = self._pack_document_splits() if callable(getattr(self.text, "split_documents", None)) else None
        if by_document is not None:
            contexts, doc_splits = by_document
            n_run = len(doc_splits["profile"]) + len(doc_splits["heldout"])
        else:
            wanted = None if self.max_contexts is None else self.max_contexts + self.fresh_contexts
            contexts = pack_contexts(
                iter(self.text), codec.encode, self.context_len, codec.bos_token_id, wanted,
                sep_token_id=getattr(codec, "eos_token_id", None),
            )
            n_run = len(contexts) if self.max_contexts is None else min(len(contexts), self.max_contexts)
        if n_run < 2 or (by_document is not None and min(len(doc_splits["profile"]), len(doc_splits["heldout"])) < 1):
            raise EmptyCorpusError(
                f"data.text gave {n_run} context(s) of {self.context_len} tokens; "
                "need at least 2 (one profile, one held-out): add text or lower data.context_len"
            )
        vocab = getattr(codec, "vocab_size", None)
        d_vocab = self.lm.model.cfg.d_vocab
        if int(contexts.max()) >= d_vocab:
            raise ValueError(f"token id {int(contexts.max())} >= model d_vocab {d_vocab} (tokenizer vocab {vocab})")
        self.contexts = contexts
        self.n_run_contexts = n_run
        if by_document is not None:
            self.splits = {k: v for k, v in doc_splits.items() if k != "fresh" or self.fresh_contexts}
        else:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(n_run, generator=g)
            n_held = max(1, int(round(self.heldout_fraction * n_run)))
            n_held = min(n_held, n_run - 1)
            self.splits = {"heldout": perm[:n_held].sort().values, "profile": perm[n_held:].sort().values}
        if self.fresh_contexts:
            n_fresh = len(contexts) - n_run
            self.splits["fresh"] = torch.arange(n_run, n_run + n_fresh)
            self.fresh_note = (f"{n_fresh} contexts packed after the run's {n_run}"
                               + (f" (asked for {self.fresh_contexts})" if n_fresh < self.fresh_contexts else ""))

    def _pack_document_splits(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Contexts packed from each split's own documents (a source with ``split_documents``,
        e.g. :class:`saeot.data.corpus.PackagesCorpus`): ``[profile | heldout | fresh]`` and
        their indices. ``heldout_fraction`` of ``max_contexts`` (rounded, >= 1) come from the
        held-out documents, the rest from the profile documents; ``fresh_contexts`` from the fresh ones."""
        codec = self.lm.codec
        n_held = n_prof = None
        if self.max_contexts is not None:
            n_held = min(max(1, int(round(self.heldout_fraction * self.max_contexts))), self.max_contexts - 1)
            n_prof = self.max_contexts - n_held
        wanted = {"profile": n_prof, "heldout": n_held, "fresh": self.fresh_contexts}
        parts, splits, start = [], {}, 0
        for split, n in wanted.items():
            if split == "fresh" and not n:
                continue
            ctx = pack_contexts(self.text.split_documents(split), codec.encode, self.context_len, codec.bos_token_id,
                                n, sep_token_id=getattr(codec, "eos_token_id", None))
            parts.append(ctx)
            splits[split] = torch.arange(start, start + len(ctx))
            start += len(ctx)
        return torch.cat(parts), splits

    def fingerprint(self) -> str:
        """Hash of the run's packed contexts (not the fresh ones): identifies the token stream (for cache keys)."""
        self.setup()
        assert self.contexts is not None
        return hashlib.sha256(self.contexts[: self.n_run_contexts].numpy().tobytes()).hexdigest()[:16]

    def n_contexts(self, split: str) -> int:
        self.setup()
        return len(self.splits[split])

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> DataLoader:
        """Contexts of ``split`` read by ``rank`` of ``world_size`` (disjoint shards)."""
        self.setup()
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        assert self.contexts is not None
        index = self.splits[split][shard_indices(len(self.splits[split]), rank, world_size)]
        return DataLoader(_Contexts(self.contexts, index), batch_size=batch_size or self.batch_size, shuffle=False)

    def view(self, split: str, hooks: Sequence[str] | None = None, hidden: bool = True) -> "SplitView":
        """A LightningDataModule for one Trainer pass over ``split`` (see :class:`SplitView`)."""
        return SplitView(self, split, self.hooks if hooks is None else tuple(hooks), hidden)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("profile", *_rank_world(self))

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("heldout", *_rank_world(self))

    # ------------------------------------------------------------------ hidden states
    @torch.no_grad()
    def hidden_states(self, tokens: Tensor, hooks: Sequence[str] | None = None,
                      context_index: Tensor | None = None) -> dict[str, Tensor]:
        """hook -> ``[B, T, d]`` hidden states of ``tokens [B, T]``, computed up to the last hook.
        FloatingPointError naming the hook and the first bad token (its context from
        ``context_index [B]``, when given) if any is NaN or inf."""
        hooks = list(self.hooks if hooks is None else hooks)
        bases = list(dict.fromkeys(base_hook(h) for h in hooks))  # two SAEs of one hook: one hidden state
        model = self.lm.model
        if next(model.parameters()).device != tokens.device:
            model.to(tokens.device)
        _, cache = model.run_with_cache(
            tokens, names_filter=bases, stop_at_layer=stop_layer(bases), return_type=None
        )
        for h in bases:
            x = cache[h]
            bad = ~torch.isfinite(x).all(-1)
            if bool(bad.any()):
                b, t = (int(i) for i in bad.nonzero()[0])
                ctx = int(context_index[b]) if context_index is not None else b
                raise FloatingPointError(
                    f"non-finite hidden states at {h}, first at context {ctx} position {t} (token id "
                    f"{int(tokens[b, t])}, {int(bad.sum())} positions in this batch): check the model weights / "
                    "model.dtype")
        return {h: cache[base_hook(h)] for h in hooks}

    def position_mask(self, tokens: Tensor) -> Tensor:
        """``[B, T]`` bool: positions that count (all but BOS at position 0 when ``skip_bos``)."""
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if self.skip_bos and self.lm.codec.bos_token_id is not None:
            mask[:, 0] = False
        return mask

    def prepare_batch(self, batch: dict[str, Tensor], hooks: Sequence[str] | None = None,
                      hidden: bool = True) -> dict[str, Any]:
        """Add ``positions``, ``mask`` and (if ``hidden``) the hidden states at ``hooks`` to a batch on its device."""
        tokens = batch["tokens"]
        B, T = tokens.shape
        out: dict[str, Any] = dict(batch)
        out["positions"] = torch.arange(T, device=tokens.device).expand(B, T)
        out["mask"] = self.position_mask(tokens)
        if hidden:
            out["hidden"] = self.hidden_states(tokens, hooks, batch.get("context_index"))
        return out

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Any]:
        return self.prepare_batch(batch)

    def iter_batches(
        self, split: str, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        progress: bool = False, desc: str | None = None, max_batches: int | None = None,
        hooks: Sequence[str] | None = None, hidden: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """The same batches outside a Trainer (SAE training, evaluation loops); ``hooks`` and
        ``hidden`` choose which hidden states are computed (default: all of the module's)."""
        loader = self.dataloader(split, rank, world_size)
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        it = progress_bar(loader, total=total, desc=desc or split, enabled=progress, leave=False)
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            yield self.prepare_batch(batch, hooks, hidden)


class SplitView(L.LightningDataModule):
    """One Trainer pass over ``split`` of a :class:`HiddenStateDataModule`: its
    ``predict_dataloader`` reads this rank's shard, and each batch gets the hidden
    states at ``hooks`` (when ``hidden``). Immutable; the parent is not changed."""

    def __init__(self, parent: HiddenStateDataModule, split: str, hooks: tuple[str, ...], hidden: bool) -> None:
        super().__init__()
        self.parent, self.split, self.hooks, self.hidden = parent, split, hooks, hidden

    @property
    def lm(self) -> LanguageModel:
        return self.parent.lm

    def setup(self, stage: str | None = None) -> None:
        self.parent.setup(stage)
        if self.split not in self.parent.splits:
            raise ValueError(f"unknown split {self.split!r}; expected one of {sorted(self.parent.splits)}")

    def predict_dataloader(self) -> DataLoader:
        return self.parent.dataloader(self.split, *_rank_world(self))

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Any]:
        return self.parent.prepare_batch(batch, self.hooks, self.hidden)


def _rank_world(dm: L.LightningDataModule) -> tuple[int, int]:
    trainer = getattr(dm, "trainer", None)
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size
