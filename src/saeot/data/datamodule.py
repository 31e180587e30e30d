"""The LightningDataModule that streams a language model's hidden states.

Text is tokenised once and packed into fixed-length contexts ``[N, T]``; each
context starts with BOS when the tokenizer has one. The contexts are split into
``profile`` (feature distributions, SAE training) and ``heldout`` (reference-space
fitting, activation correlation, evaluation). Batches carry token ids; the hidden
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
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from saeot.data.text import EmptyCorpusError
from saeot.hooks import hook_layer, stop_layer

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
        lm: a :class:`saeot.lm.LanguageModel` (HookedTransformer + text codec).
        text: a text source (iterable of strings), see :mod:`saeot.data.text`.
        hooks: hook names whose hidden states each batch carries.
        context_len: tokens per context, BOS included.
        max_contexts: contexts kept in all (profile + heldout).
        heldout_fraction: fraction of contexts in the held-out split.
        batch_size: contexts per batch.
        seed: seed of the profile / heldout split.
        skip_bos: exclude position 0 (BOS, whose hidden state is an outlier) from ``mask``.

    Batches (after transfer to the device) hold ``tokens [B, T]``, ``context_index [B]``,
    ``positions [B, T]``, ``mask [B, T]`` (positions to use) and ``hidden``:
    hook -> ``[B, T, d]``.
    """

    def __init__(
        self,
        lm: Any,
        text: Any,
        hooks: Sequence[str],
        context_len: int = 128,
        max_contexts: int | None = 512,
        heldout_fraction: float = 0.25,
        batch_size: int = 8,
        seed: int = 0,
        skip_bos: bool = True,
    ) -> None:
        super().__init__()
        if not hooks:
            raise ValueError("layers.ids is empty: configure at least one layer")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.lm = lm
        self.text = text
        self.hooks = list(hooks)
        self.context_len = context_len
        self.max_contexts = max_contexts
        self.heldout_fraction = heldout_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.skip_bos = skip_bos
        self.emit_hidden = True
        self.predict_split = "profile"
        self.contexts: Tensor | None = None
        self.splits: dict[str, Tensor] = {}
        for h in self.hooks:
            hook_layer(h)
        self._stop_at = stop_layer(self.hooks)

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        if self.contexts is not None:
            return
        codec = self.lm.codec
        contexts = pack_contexts(
            iter(self.text), codec.encode, self.context_len, codec.bos_token_id, self.max_contexts,
            sep_token_id=getattr(codec, "eos_token_id", None),
        )
        if len(contexts) < 2:
            raise EmptyCorpusError(
                f"data.text gave {len(contexts)} context(s) of {self.context_len} tokens; "
                "need at least 2 (one profile, one held-out): add text or lower data.context_len"
            )
        vocab = getattr(codec, "vocab_size", None)
        d_vocab = self.lm.model.cfg.d_vocab
        if int(contexts.max()) >= d_vocab:
            raise ValueError(f"token id {int(contexts.max())} >= model d_vocab {d_vocab} (tokenizer vocab {vocab})")
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(contexts), generator=g)
        n_held = max(1, int(round(self.heldout_fraction * len(contexts))))
        n_held = min(n_held, len(contexts) - 1)
        self.contexts = contexts
        self.splits = {"heldout": perm[:n_held].sort().values, "profile": perm[n_held:].sort().values}

    def fingerprint(self) -> str:
        """Hash of the packed contexts: identifies the token stream (for cache keys)."""
        self.setup()
        assert self.contexts is not None
        return hashlib.sha256(self.contexts.numpy().tobytes()).hexdigest()[:16]

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

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("profile", *self._rank_world())

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("heldout", *self._rank_world())

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader(self.predict_split, *self._rank_world())

    # ------------------------------------------------------------------ hidden states
    @torch.no_grad()
    def hidden_states(self, tokens: Tensor) -> dict[str, Tensor]:
        """hook -> ``[B, T, d]`` hidden states of ``tokens [B, T]``, computed up to the last hook."""
        model = self.lm.model
        if next(model.parameters()).device != tokens.device:
            model.to(tokens.device)
        _, cache = model.run_with_cache(
            tokens, names_filter=self.hooks, stop_at_layer=self._stop_at, return_type=None
        )
        out = {h: cache[h] for h in self.hooks}
        for h, x in out.items():
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"non-finite hidden states at {h}; check the model weights / dtype (model.dtype)")
        return out

    def position_mask(self, tokens: Tensor) -> Tensor:
        """``[B, T]`` bool: positions that count (all but BOS at position 0 when ``skip_bos``)."""
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if self.skip_bos and self.lm.codec.bos_token_id is not None:
            mask[:, 0] = False
        return mask

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        tokens = batch["tokens"]
        B, T = tokens.shape
        batch["positions"] = torch.arange(T, device=tokens.device).expand(B, T)
        batch["mask"] = self.position_mask(tokens)
        if self.emit_hidden:
            batch["hidden"] = self.hidden_states(tokens)
        return batch

    def iter_batches(
        self, split: str, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        progress: bool = False, desc: str | None = None, max_batches: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The same batches outside a Trainer (used by SAE training and fitting loops)."""
        from tqdm.auto import tqdm

        loader = self.dataloader(split, rank, world_size)
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        it = tqdm(loader, total=total, desc=desc or split, disable=not progress, leave=False)
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            yield self.on_after_batch_transfer(batch, 0)
