"""The Lightning module that drives the streaming passes over hidden states.

``trainer.predict(StreamPass(...), datamodule=dm)`` runs every consumer on every
batch (hidden states are computed by the data module after transfer). At the end
each consumer's state is gathered from all DDP ranks and merged exactly, so every
rank holds the same, complete result whatever the number of processes.

Consumers:

* :class:`ProfileConsumer` -- per-feature samples and firing statistics (profile split);
* :class:`AlignedStatesConsumer` -- a bounded subsample of hidden states of the same
  tokens at every hook (held-out split; fits the reference space);
* :class:`CorrelationConsumer` -- streaming Pearson correlation between two SAEs'
  activations on the same tokens (held-out split; activation-correlation baseline).
"""

from __future__ import annotations

from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from saeot.profiling.samplers import StreamingProfiler, flatten_batch
from saeot.profiling.statistics import CorrelationAccumulator
from saeot.saes.codes import encode


class Consumer(Protocol):
    """Something that absorbs batches and merges exactly across ranks (the consumers of a
    :class:`StreamPass`; they may also have ``to(device)``, called before the pass)."""

    def update(self, batch: dict, saes: dict[str, Any], cache: dict) -> None:
        """Absorb one batch; ``cache`` maps hook -> SAE codes, shared by the consumers of the batch."""
        ...

    def sync(self, module: L.LightningModule) -> None:
        """Merge the states of all ranks (no-op on one process)."""
        ...


def _gather(module: L.LightningModule, t: Tensor) -> list[Tensor]:
    """Per-rank copies of ``t`` (every rank gets all). Works with one process too."""
    if module.trainer is None or module.trainer.world_size == 1:
        return [t]
    g = module.all_gather(t)
    return list(g.unbind(0))


class ProfileConsumer:
    def __init__(self, hooks: list[str], saes: dict[str, Any], k: int, mode: str, seed: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.profilers = {
            h: StreamingProfiler(h, saes[h].cfg.d_sae, saes[h].cfg.d_in, k=k, mode=mode, seed=seed, dtype=dtype, device=device)
            for h in hooks
        }

    def to(self, device: torch.device) -> None:
        for p in self.profilers.values():
            p.load_state({k: v.to(device) for k, v in p.state().items()})

    def update(self, batch: dict, saes: dict[str, Any], cache: dict) -> None:
        for h, prof in self.profilers.items():
            x, toks, locs = flatten_batch(batch, h)
            acts = cache.setdefault(h, encode(saes[h], x))
            prof.update(x.to(prof.points.device), acts.to(prof.points.device), toks, locs)

    def sync(self, module: L.LightningModule) -> None:
        if module.trainer is None or module.trainer.world_size == 1:
            return
        for h, prof in self.profilers.items():
            states = {k: _gather(module, v) for k, v in prof.state().items()}
            merged = StreamingProfiler(h, prof.F, prof.d, prof.K, prof.mode, device=prof.keys.device)
            for r in range(module.trainer.world_size):
                other = StreamingProfiler(h, prof.F, prof.d, prof.K, prof.mode, device=prof.keys.device)
                other.load_state({k: v[r] for k, v in states.items()})
                merged.merge(other)
            self.profilers[h] = merged

    def results(self):
        return {h: p.finalize() for h, p in self.profilers.items()}


class AlignedStatesConsumer:
    """Keeps the hidden states of the first ``max_tokens`` tokens, in (context, position) order,
    at every hook (the same tokens). Each rank reads its contexts in increasing order, so the
    first ``max_tokens`` of all ranks together hold the global first ones: the merged result
    is the one process's, row for row."""

    def __init__(self, hooks: list[str], max_tokens: int) -> None:
        self.hooks, self.max_tokens = hooks, max_tokens
        self.parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        self.locs: list[Tensor] = []
        self.n = 0

    def update(self, batch: dict, saes: dict[str, Any], cache: dict) -> None:
        if self.n >= self.max_tokens:
            return
        take = self.max_tokens - self.n
        for h in self.hooks:
            x, _, locs = flatten_batch(batch, h)
            self.parts[h].append(x[:take].float().cpu())
        self.locs.append(locs[:take].cpu())
        self.n += min(take, int(batch["mask"].sum()))

    def sync(self, module: L.LightningModule) -> None:
        if module.trainer is None or module.trainer.world_size == 1:
            return
        m = self.max_tokens
        locs = torch.cat(self.locs) if self.locs else torch.zeros(0, 2, dtype=torch.long)
        pad = m - len(locs)  # equal shapes for all_gather; padding rows have context -1
        all_locs = torch.cat(_gather(module, torch.cat([locs, locs.new_full((pad, 2), -1)]).to(module.device))).cpu()
        keep = (all_locs[:, 0] >= 0).nonzero().squeeze(1)
        by_pos = keep[torch.argsort(all_locs[keep, 1], stable=True)]
        order = by_pos[torch.argsort(all_locs[by_pos, 0], stable=True)][:m]  # (context, position) order
        for h in self.hooks:
            x = torch.cat(self.parts[h]) if self.parts[h] else torch.zeros(0, 0)
            d = int(max(_gather(module, torch.tensor([x.shape[1]], device=module.device))))  # 0 on a rank without tokens
            x = torch.cat([x.reshape(-1, d), x.new_zeros((pad, d))])
            self.parts[h] = [torch.cat(_gather(module, x.to(module.device))).cpu()[order]]
        self.locs = [all_locs[order]]

    def results(self) -> dict[str, Tensor]:
        return {h: torch.cat(v) for h, v in self.parts.items()}


class CorrelationConsumer:
    def __init__(self, pairs: list[tuple[str, str]], saes: dict[str, Any]) -> None:
        self.pairs = pairs
        self.acc = {(a, b): CorrelationAccumulator(saes[a].cfg.d_sae, saes[b].cfg.d_sae) for a, b in pairs}

    def update(self, batch: dict, saes: dict[str, Any], cache: dict) -> None:
        for a, b in self.pairs:
            for h in (a, b):
                if h not in cache:
                    x, _, _ = flatten_batch(batch, h)
                    cache[h] = encode(saes[h], x)
            self.acc[(a, b)].update(cache[a].cpu(), cache[b].cpu())

    def sync(self, module: L.LightningModule) -> None:
        if module.trainer is None or module.trainer.world_size == 1:
            return

        for p, acc in self.acc.items():
            state = acc.state_dict()
            gathered = {k: _gather(module, torch.as_tensor(v).to(module.device)) for k, v in state.items()}
            merged = None
            for r in range(module.trainer.world_size):
                other = CorrelationAccumulator.from_state_dict({k: v[r].cpu() for k, v in gathered.items()})
                merged = other if merged is None else merged.merge(other)
            self.acc[p] = merged

    def results(self) -> dict[tuple[str, str], Any]:
        """The accumulators themselves (the matcher reads correlations and firing masks)."""
        return dict(self.acc)


class StreamPass(L.LightningModule):
    """Runs consumers over ``trainer.predict`` batches; merges them across ranks at the end."""

    def __init__(self, saes: dict[str, Any], consumers: list[Consumer]) -> None:
        super().__init__()
        self.saes = saes
        # register SAEs as submodules so Lightning moves them to the device
        self.sae_modules = torch.nn.ModuleList(list(saes.values()))
        self.consumers = consumers

    def on_predict_start(self) -> None:
        for c in self.consumers:
            if hasattr(c, "to"):
                c.to(self.device)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        cache: dict[str, Tensor] = {}
        for c in self.consumers:
            c.update(batch, self.saes, cache)
        return None

    def on_predict_end(self) -> None:
        for c in self.consumers:
            c.sync(self)
