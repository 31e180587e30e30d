"""An on-disk store of hidden states: one forward pass, read by SAE training and profiling.

For one split of a :class:`~saeot.data.datamodule.HiddenStateDataModule`, one forward
pass up to the deepest requested hook (``stop_at_layer``) writes the hidden states
of every requested hook, in split order, into shards of ``shard_contexts`` contexts:

    <cache>/activations/<key>/manifest.json
    <cache>/activations/<key>/shard_00000.safetensors   tokens [n, T] int32, context_index [n],
                                                      hidden.<hook> [n, T, d] (float16 by default)

* **Atomic shards.** A shard is written to a temporary file and renamed; only then is it
  listed in ``manifest.json`` (itself replaced atomically) with its byte size. A reader
  trusts a shard only if the manifest lists it with that size, so a half-written shard
  is never read.
* **Resumable.** A build that is killed (SIGKILL included) continues, when run again,
  after the last shard the manifest lists; unlisted files and temporary leftovers are
  discarded and rewritten. The manifest says ``complete`` at the end.
* **Keyed by what determines it**: the model (name, shape, a checksum of its
  weights), the split's token ids, the hooks and the storage dtype.

:class:`StoredHiddenStates` wraps a data module: after ``setup`` the configured splits
are in stores, and its ``view`` / ``iter_batches`` yield the very batch dicts of the
live module (``{tokens, context_index, positions, mask, hidden}``, hidden states in the
model's dtype) read from disk instead of running the model; anything else (other
splits or hooks, the contexts, the fingerprint) is the wrapped module's. So
:class:`~saeot.saes.LocalTrainedSAEs` trains and the profiling pass profiles from the
store without a change on their side.

Why not sae_lens' ``CacheActivationsRunner``: it caches one hook per run, loads the
model itself by name (our models are built offline from local files), tokenises its
own dataset (our splits are fixed by the data module), writes Arrow datasets through
``datasets`` and refuses a non-empty directory instead of resuming. Its layout
(context-major ``[n, T, d]`` shards plus token ids, written shard by shard) is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from saeot.data.datamodule import HiddenStateDataModule, _rank_world, shard_indices
from saeot.dtypes import resolve_dtype
from saeot.hooks import sort_hooks_by_layer
from saeot.io import CorruptFileError, atomic_save_safetensors, atomic_write_json, default_cache_dir, exclusive_lock
from saeot.progress import progress_bar

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

__all__ = ["ActivationStore", "StoredHiddenStates", "StoreView", "model_identity", "store_key"]

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


def model_identity(lm: LanguageModel) -> dict:
    """Name, shape and a weight checksum of a language model (for cache keys)."""
    cfg = lm.model.cfg
    shape = {k: str(getattr(cfg, k, None)) for k in ("n_layers", "d_model", "d_vocab", "n_heads", "d_mlp")}
    with torch.no_grad():
        params = list(lm.model.parameters())
        checksum = [float(p.double().sum()) for p in (params[0], params[len(params) // 2], params[-1])]
    return {"name": getattr(lm, "name", "?"), "shape": shape, "checksum": checksum}


def store_key(lm: LanguageModel, tokens: Tensor, hooks: Sequence[str], dtype: torch.dtype) -> str:
    """Hash of the model, the token ids ``[N, T]`` of the stored contexts, the hooks and the dtype."""
    blob = json.dumps({"model": model_identity(lm), "tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                       "shape": list(tokens.shape), "hooks": list(hooks), "dtype": str(dtype), "v": FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ActivationStore:
    """The shards of one store directory (see the module docstring).

    Args:
        root: the store's directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._opened: dict | None = None  # the checked manifest of a complete store (see open())

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> dict | None:
        try:
            m = json.loads((self.root / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{self.root / MANIFEST} is unreadable ({e}); delete {self.root} and rerun") from e
        return m if m.get("format") == FORMAT else None

    @property
    def complete(self) -> bool:
        m = self.manifest()
        return bool(m and m.get("complete"))

    def _valid_shards(self, m: dict) -> list[dict]:
        """The manifest's shards, up to the first that is missing or has another size."""
        out = []
        for s in m.get("shards", []):
            p = self.root / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                log.warning("activation store %s: %s is missing or truncated; rebuilding from there", self.root, s["file"])
                break
            out.append(s)
        return out

    # ------------------------------------------------------------------ build
    def build(
        self, datamodule: HiddenStateDataModule, split: str, hooks: Sequence[str], dtype: torch.dtype = torch.float16,
        shard_contexts: int = 64, batch_size: int | None = None, progress: bool = False,
    ) -> "ActivationStore":
        """Write (or finish writing) the hidden states of ``split`` at ``hooks``; returns ``self``."""
        datamodule.setup()
        hooks = sort_hooks_by_layer(hooks)
        index = datamodule.splits[split]
        n = len(index)
        if shard_contexts < 1:
            raise ValueError(f"activation_store.shard_contexts={shard_contexts} must be >= 1")
        header = {"format": FORMAT, "split": split, "hooks": hooks, "dtype": str(dtype).replace("torch.", ""),
                  "n_contexts": n, "context_len": int(datamodule.context_len), "shard_contexts": shard_contexts,
                  "d_model": int(datamodule.lm.model.cfg.d_model)}
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / ".lock"):
            m = self.manifest()
            if m is not None and any(m.get(k) != v for k, v in header.items()):
                raise CorruptFileError(f"activation store {self.root} was built with other settings; delete it and rerun")
            shards = self._valid_shards(m) if m is not None else []
            if m is not None and m.get("complete") and len(shards) == len(m["shards"]):
                return self
            listed = {s["file"] for s in shards}
            for p in self.root.iterdir():  # unlisted shards and temporary files of a killed build
                if p.name.startswith(".shard_") or (p.name.startswith("shard_") and p.name not in listed):
                    p.unlink()
            m = {**header, "shards": shards, "complete": False}
            atomic_write_json(self.root / MANIFEST, m)
            start = len(shards) * shard_contexts
            bs = batch_size or datamodule.batch_size
            bar = progress_bar(total=n, initial=min(start, n), desc=f"activation store ({split})", enabled=progress,
                       leave=False, mininterval=2)
            for i in range(len(shards), (n + shard_contexts - 1) // shard_contexts):
                a, b = i * shard_contexts, min((i + 1) * shard_contexts, n)
                ctx = index[a:b]
                tokens = datamodule.contexts[ctx]
                parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
                for j in range(0, len(tokens), bs):
                    hidden = datamodule.hidden_states(tokens[j:j + bs], hooks)
                    for h in hooks:
                        parts[h].append(hidden[h].to(dtype).cpu())
                    bar.update(len(tokens[j:j + bs]))
                tensors = {"tokens": tokens.to(torch.int32), "context_index": ctx.clone()}
                tensors.update({f"hidden.{h}": torch.cat(parts[h]) for h in hooks})
                name = f"shard_{i:05d}.safetensors"
                atomic_save_safetensors(tensors, self.root / name)
                m["shards"].append({"file": name, "start": a, "stop": b, "bytes": (self.root / name).stat().st_size})
                atomic_write_json(self.root / MANIFEST, m)
            bar.close()
            m["complete"] = True
            atomic_write_json(self.root / MANIFEST, m)
        return self

    # ------------------------------------------------------------------ read
    def open(self) -> dict:
        """The manifest of a complete store whose every shard is present with its size (checked once)."""
        if self._opened is None:
            m = self.manifest()
            if m is None or not m.get("complete"):
                raise CorruptFileError(f"activation store {self.root} is not complete; build it first")
            if len(self._valid_shards(m)) != len(m["shards"]):
                raise CorruptFileError(f"activation store {self.root} has a missing or truncated shard; "
                                       "rerun to rebuild it")
            self._opened = m
        return self._opened

    def read(self, positions: Tensor, hooks: Sequence[str]) -> dict[str, Any]:
        """Contexts at split ``positions [B]`` (ascending): ``tokens [B, T]``, ``context_index [B]``
        and ``hidden``: hook -> ``[B, T, d]`` (stored dtype). Reads only the rows it needs."""
        m = self.open()
        S = m["shard_contexts"]
        out: dict[str, list[Tensor]] = {"tokens": [], "context_index": [], **{h: [] for h in hooks}}
        for shard in torch.unique(positions // S).tolist():
            rows = positions[positions // S == shard] - shard * S
            lo, hi = int(rows.min()), int(rows.max()) + 1
            rows = rows - lo
            path = self.root / m["shards"][shard]["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    out["tokens"].append(f.get_slice("tokens")[lo:hi][rows].long())
                    out["context_index"].append(f.get_slice("context_index")[lo:hi][rows])
                    for h in hooks:
                        out[h].append(f.get_slice(f"hidden.{h}")[lo:hi][rows])
            except Exception as e:
                raise CorruptFileError(f"cannot read {path} ({e}); delete {self.root} and rerun") from e
        return {"tokens": torch.cat(out["tokens"]), "context_index": torch.cat(out["context_index"]),
                "hidden": {h: torch.cat(out[h]) for h in hooks}}


class _StoredBatches(Dataset):
    """Batches (not contexts) of a store: item ``i`` is the ``i``-th batch of this rank's positions."""

    def __init__(self, store: ActivationStore, positions: Tensor, batch_size: int, hooks: Sequence[str]) -> None:
        self.store, self.hooks = store, list(hooks)
        self.batches = list(positions.split(batch_size)) if len(positions) else []

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.store.read(self.batches[i], self.hooks)


class StoreView(L.LightningDataModule):
    """One Trainer pass over a stored split (the store's counterpart of :class:`~saeot.data.datamodule.SplitView`)."""

    def __init__(self, owner: "StoredHiddenStates", split: str, hooks: tuple[str, ...]) -> None:
        super().__init__()
        self.owner, self.split, self.hooks = owner, split, hooks

    @property
    def lm(self) -> LanguageModel:
        return self.owner.lm

    def setup(self, stage: str | None = None) -> None:
        self.owner.setup(stage)

    def predict_dataloader(self) -> DataLoader:
        return self.owner.stored_loader(self.split, self.hooks, *_rank_world(self))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return self.owner.finish_batch(batch)


class StoredHiddenStates(L.LightningDataModule):
    """A data module whose ``splits`` are read from activation stores (module docstring).

    Args:
        parent: the live :class:`~saeot.data.datamodule.HiddenStateDataModule`.
        splits: the splits to store (e.g. ``[profile, heldout]``).
        hooks: the hooks to store (default: the parent's).
        dtype: storage dtype (``float16``; ``float32`` stores exactly what the model computes).
        shard_contexts: contexts per shard.
        cache_dir: cache root (stores under ``<cache_dir>/activations/``).
        progress: progress bar while building.
    """

    def __init__(
        self, parent: HiddenStateDataModule, splits: Sequence[str] = ("profile",), hooks: Sequence[str] | None = None,
        dtype: str = "float16", shard_contexts: int = 64, cache_dir: str | None = None, progress: bool = True,
    ) -> None:
        super().__init__()
        self.parent = parent
        self.stored_splits = tuple(splits)
        self.stored_hooks = tuple(sort_hooks_by_layer(hooks if hooks is not None else parent.hooks))
        self.dtype = resolve_dtype(dtype, "activation_store.dtype")
        self.shard_contexts = shard_contexts
        self.cache_dir, self.progress = cache_dir, progress
        self.stores: dict[str, ActivationStore] = {}

    def __getattr__(self, name: str) -> Any:  # everything not about stored hidden states is the parent's
        if name == "parent":
            raise AttributeError(name)
        return getattr(self.parent, name)

    # ------------------------------------------------------------------ build
    def setup(self, stage: str | None = None) -> None:
        self.parent.setup(stage)
        if len(self.stores) == len(self.stored_splits):
            return
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        for split in self.stored_splits:
            if split not in self.parent.splits:
                raise ValueError(f"activation_store.splits has {split!r}; the data module's splits are "
                                 f"{sorted(self.parent.splits)}")
            tokens = self.parent.contexts[self.parent.splits[split]]
            key = store_key(self.parent.lm, tokens, self.stored_hooks, self.dtype)
            store = ActivationStore(root / "activations" / f"{split}-{key}")
            if not store.complete:
                log.info("activation store: %d %s contexts x %d hooks -> %s", len(tokens), split,
                         len(self.stored_hooks), store.root)
            self.stores[split] = store.build(self.parent, split, self.stored_hooks, self.dtype, self.shard_contexts,
                                             progress=self.progress)

    def stores_hidden(self, split: str, hooks: Sequence[str]) -> bool:
        """True if the hidden states of ``split`` at ``hooks`` are read from a store."""
        return split in self.stored_splits and set(hooks) <= set(self.stored_hooks)

    # ------------------------------------------------------------------ read
    def stored_loader(self, split: str, hooks: Sequence[str], rank: int = 0, world_size: int = 1,
                      batch_size: int | None = None) -> DataLoader:
        """Batches of this rank's shard of ``split`` (the contexts the live loader gives it, in its order)."""
        self.setup()
        n = len(self.parent.splits[split])
        positions = shard_indices(n, rank, world_size)
        data = _StoredBatches(self.stores[split], positions, batch_size or self.parent.batch_size, hooks)
        return DataLoader(data, batch_size=None, shuffle=False)

    def finish_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Positions and mask (as the live module makes them) and hidden states in the model's dtype."""
        out = self.parent.prepare_batch({"tokens": batch["tokens"], "context_index": batch["context_index"]},
                                        hidden=False)
        dtype = next(self.parent.lm.model.parameters()).dtype
        out["hidden"] = {h: x.to(dtype) for h, x in batch["hidden"].items()}
        return out

    def view(self, split: str, hooks: Sequence[str] | None = None, hidden: bool = True) -> Any:
        hooks = tuple(self.parent.hooks if hooks is None else hooks)
        if hidden and self.stores_hidden(split, hooks):
            return StoreView(self, split, hooks)
        return self.parent.view(split, hooks, hidden)

    def iter_batches(
        self, split: str, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        progress: bool = False, desc: str | None = None, max_batches: int | None = None,
        hooks: Sequence[str] | None = None, hidden: bool = True,
    ) -> Iterator[dict[str, Any]]:
        hooks = tuple(self.parent.hooks if hooks is None else hooks)
        if not (hidden and self.stores_hidden(split, hooks)):
            yield from self.parent.iter_batches(split, device, rank, world_size, progress, desc, max_batches,
                                                hooks, hidden)
            return
        loader = self.stored_loader(split, hooks, rank, world_size)
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        for i, batch in enumerate(progress_bar(loader, total=total, desc=desc or split, enabled=progress, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {"tokens": batch["tokens"].to(device), "context_index": batch["context_index"].to(device),
                     "hidden": {h: x.to(device) for h, x in batch["hidden"].items()}}
            yield self.finish_batch(batch)
