"""The planted world: true features per layer, the transitions between layers, the truth, the streams.

:class:`SyntheticWorld` is what :func:`~saeot.synthetic.make_world` builds:
the true directions ``D^l [n_l, d]`` and magnitudes ``s^l [n_l]`` of every layer, the
truth between layers (:meth:`SyntheticWorld.truth_between` chains the transitions),
and streams of hidden states ``h^l_t = sum_f c^l_{t,f} D^l_f + b^l + eps`` with true
activations ``c^l_t`` and token ids, deterministic in ``(seed, split, chunk)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saeot.synthetic._random import generator, torch_threads
from saeot.synthetic._tokens import ConceptModel, rebatch
from saeot.synthetic.config import KINDS, SPLITS, SyntheticConfig

__all__ = ["SyntheticWorld", "LayerFeatures", "Transition"]


@dataclass
class LayerFeatures:
    """True features of one layer: what each reads (concepts, gate) and how it is written."""

    src: Tensor  # [n, 2] long concept ids, -1 padding (second source only for merges)
    gate: Tensor  # [n] long gating concept, -1 if ungated
    gate_on: Tensor  # [n] bool: the feature fires when the gate fires (True) or is silent (False)
    directions: Tensor  # [n, d] unit rows
    scales: Tensor  # [n] magnitudes s^l

    @property
    def n(self) -> int:
        return int(self.src.shape[0])

    def plain(self) -> Tensor:
        """``[n]`` bool: one source, no gate."""
        return (self.src[:, 1] < 0) & (self.gate < 0)


@dataclass
class Transition:
    """What happens to the features of layer ``l`` on the way to ``l + 1``."""

    canonical: Tensor  # [n_a] long canonical child at l+1, -1 if it dies
    children: Tensor  # [n_a, n_b] bool
    kinds: tuple[str, ...]  # per layer-l feature
    rotation: Tensor  # [d, d]
    splits: Tensor  # [S, 3] long (parent, canonical child, other child)
    merges: Tensor  # [M, 3] long (parent a, parent b, child)


# ---------------------------------------------------------------------------- world
@dataclass(eq=False)
class SyntheticWorld:
    """A planted multi-layer model with its ground truth (built by :func:`~saeot.synthetic.make_world`).

    Attributes (``n_l`` = true features at layer l, in *true feature* indices):
        config: the :class:`SyntheticConfig`.
        hooks: ``blocks.{l}.hook_resid_post`` for every layer.
        directions: hook -> ``[n_l, d]`` unit true directions ``D^l``.
        scales: hook -> ``[n_l]`` magnitudes ``s^l``.
        bias: hook -> ``[d]`` layer offset ``b^l``.
        noise_std: hook -> ``sigma_l`` (per coordinate).
        firing_rate: hook -> ``[n_l]`` fraction of tokens on which each feature fires
            (estimated on the pilot chunk).
        truth: ``(hook_a, hook_b)`` -> ``[n_a]`` long canonical descendant in B, -1 if none,
            for every pair in :attr:`pairs`; :meth:`truth_between` gives any other.
        truth_sets: same keys -> ``[n_a, n_b]`` bool, every descendant.
        kinds: same keys -> per A feature one of :data:`KINDS` (the first event on its
            canonical chain, by priority dies > splits > merges; ``near_duplicate`` for
            members of a pair; otherwise ``persists``).
        born: same keys -> ``[n_b]`` bool, B features with no ancestor in A.
        rotations: same keys -> ``[d, d]`` the rotation ``Q`` applied between A and B
            (product over the transitions; identity without ``rotation``).
        splits, merges: adjacent pairs -> ``[S, 3]`` (parent, canonical child, other child)
            and ``[M, 3]`` (parent a, parent b, merged child).
        near_duplicate_pairs: hook -> ``[P, 2]`` feature indices of the pairs at that layer.
        near_duplicate_contexts: hook -> ``[P, 2]`` the context partner feature of each member.
        shared_mean_groups: hook -> ``[P, 4]`` feature indices (bimodal X, unimodal Y, first
            context, second context) of the shared-mean groups at that layer.
        gate_feature: hook -> ``[n_l]`` long, for a split child the feature (same layer) whose
            firing gates it, -1 for ungated features.
        gate_on: hook -> ``[n_l]`` bool, True if the child fires only with its gate, False if
            only without it.
    """

    config: SyntheticConfig
    hooks: list[str]
    directions: dict[str, Tensor]
    scales: dict[str, Tensor]
    bias: dict[str, Tensor]
    noise_std: dict[str, float]
    firing_rate: dict[str, Tensor]
    truth: dict[tuple[str, str], Tensor]
    truth_sets: dict[tuple[str, str], Tensor]
    kinds: dict[tuple[str, str], tuple[str, ...]]
    born: dict[tuple[str, str], Tensor]
    rotations: dict[tuple[str, str], Tensor]
    splits: dict[tuple[str, str], Tensor]
    merges: dict[tuple[str, str], Tensor]
    near_duplicate_pairs: dict[str, Tensor]
    near_duplicate_contexts: dict[str, Tensor]
    shared_mean_groups: dict[str, Tensor]
    gate_feature: dict[str, Tensor]
    gate_on: dict[str, Tensor]
    # the concept model and the per-layer features (private)
    _layers: list[LayerFeatures] = field(repr=False)
    _transitions: list[Transition] = field(repr=False)
    _concepts: ConceptModel = field(repr=False)

    # ------------------------------------------------------------------ structure
    @property
    def n_layers(self) -> int:
        return len(self.hooks)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_concepts(self) -> int:
        return self._concepts.n_concepts

    @property
    def shared_tokens(self) -> bool:
        """True when every layer is streamed from the same tokens (aligned row by row)."""
        return not self.config.has("disjoint_tokens")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Adjacent pairs, then ``(first, last)`` when there are more than two layers."""
        out = [(self.hooks[i], self.hooks[i + 1]) for i in range(self.n_layers - 1)]
        if self.n_layers > 2:
            out.append((self.hooks[0], self.hooks[-1]))
        return out

    def layer_of(self, hook: str) -> int:
        try:
            return self.hooks.index(hook)
        except ValueError:
            raise KeyError(f"hook {hook!r} is not in this synthetic world; hooks are {self.hooks}") from None

    def n_true(self, hook: str) -> int:
        return self._layers[self.layer_of(hook)].n

    def expected_l0(self, hook: str) -> float:
        """Mean number of true features firing per token at ``hook`` (pilot estimate)."""
        return float(self.firing_rate[hook].sum())

    def truth_between(self, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor]:
        """``(truth [n_a], truth_sets [n_a, n_b], kinds, born [n_b])`` for any layers ``a < b``."""
        a, b = self.layer_of(hook_a), self.layer_of(hook_b)
        if not a < b:
            raise ValueError(f"truth is defined from an earlier to a later layer, got {hook_a} -> {hook_b}")
        return compose_transitions(self._transitions[a:b], self._layers[a].n, self._nd_members(a),
                                   self._sm_members(a))

    def describe(self) -> dict[str, Any]:
        """Counts per layer and per pair (for logs and reports)."""
        return {
            "scenarios": list(self.config.scenarios),
            "n_true": {h: self.n_true(h) for h in self.hooks},
            "expected_l0": {h: round(self.expected_l0(h), 3) for h in self.hooks},
            "kinds": {
                f"{a}->{b}": {k: int(sum(x == k for x in self.kinds[(a, b)])) for k in KINDS}
                for a, b in self.pairs
            },
            "born": {f"{a}->{b}": int(self.born[(a, b)].sum()) for a, b in self.pairs},
        }

    def _nd_members(self, layer: int) -> Tensor:
        members = torch.zeros(self._layers[layer].n, dtype=torch.bool)
        members[self.near_duplicate_pairs[self.hooks[layer]].flatten()] = True
        return members

    def _sm_members(self, layer: int) -> Tensor:
        members = torch.zeros(self._layers[layer].n, dtype=torch.bool)
        members[self.shared_mean_groups[self.hooks[layer]][:, :2].flatten()] = True
        return members

    # ------------------------------------------------------------------ streams
    def _stream_id(self, layer: int) -> int:
        return 0 if self.shared_tokens else layer + 1

    def _split_code(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return SPLITS[split]

    def activations_from_concepts(self, layer: int, z: Tensor) -> Tensor:
        """``[N, n_l]`` true activations ``c = s * a`` of layer ``layer`` from concepts ``z [N, K]``."""
        lay = self._layers[layer]
        a = z.index_select(1, lay.src[:, 0])
        merged = (lay.src[:, 1] >= 0).nonzero().flatten()
        if len(merged):
            a[:, merged] += z.index_select(1, lay.src[merged, 1])
        gated = (lay.gate >= 0).nonzero().flatten()
        if len(gated):
            gate_fires = z.index_select(1, lay.gate[gated]) > 0
            a[:, gated] *= gate_fires == lay.gate_on[gated]
        return a * lay.scales

    def _chunks(self, hook: str, split: str, n_tokens: int | None, what: str) -> Iterator[Any]:
        layer = self.layer_of(hook)
        code = self._split_code(split)
        stream = self._stream_id(layer)
        total = self.config.n_tokens if n_tokens is None else int(n_tokens)
        size = self.config.chunk_size
        for chunk, start in enumerate(range(0, total, size)):
            m = min(size, total - start)
            ids = torch.arange(start, start + m, dtype=torch.long) + (stream << 40)
            if what == "ids":
                yield ids
                continue
            with torch_threads(self.config.threads):
                z = self._concepts.chunk(code, stream, chunk, size)[:m]
                c = self.activations_from_concepts(layer, z)
                if what != "activations":
                    gen = generator(self.config.seed, 200, code, layer, chunk)
                    noise = torch.randn(size, self.d_model, generator=gen)[:m] * self.noise_std[hook]
                    h = c @ self._layers[layer].directions + self.bias[hook] + noise
            if what == "activations":
                yield c
            elif what == "hidden":
                yield h
            else:  # "all"
                yield (h, c, ids)

    def hidden_states(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N, d]`` hidden states ``h^l_t`` of ``split`` (``n_tokens`` rows in all).

        Deterministic: the same rows for any ``batch_size``; with shared tokens, row t of
        every layer is the same token. ``n_tokens`` defaults to ``config.n_tokens`` (the
        ``train`` split may be streamed for longer).
        """
        return rebatch(self._chunks(hook, split, n_tokens, "hidden"), batch_size)

    def true_activations(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N, n_l]`` true activations ``c^l_t`` (``h = c D + b + noise``), row-aligned with
        :meth:`hidden_states`."""
        return rebatch(self._chunks(hook, split, n_tokens, "activations"), batch_size)

    def token_ids(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N]`` long token identifiers: equal across layers iff they are the same token."""
        return rebatch(self._chunks(hook, split, n_tokens, "ids"), batch_size)

    def stream(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Stream ``(hidden [N, d], true activations [N, n_l], token ids [N])`` in one pass."""
        return rebatch(self._chunks(hook, split, n_tokens, "all"), batch_size)

    def iter_batches(
        self, split: str = "profile", hooks: Sequence[str] | None = None, batch_size: int = 4096,
        n_tokens: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Batches in the format of :class:`saeot.data.datamodule.HiddenStateDataModule`.

        Every token is a context of length 1: ``tokens [N, 1]`` (token ids),
        ``context_index [N]``, ``positions [N, 1]`` (zeros), ``mask [N, 1]`` (True) and
        ``hidden``: hook -> ``[N, 1, d]``. Several hooks need shared tokens.
        """
        hooks = list(self.hooks if hooks is None else hooks)
        if len(hooks) > 1 and not self.shared_tokens:
            raise ValueError(
                "synthetic world uses disjoint_tokens: layers have different tokens; stream one hook at a time"
            )
        streams = [self.stream(h, split, batch_size, n_tokens) for h in hooks]
        for items in zip(*streams):
            ids = items[0][2]
            yield {
                "tokens": ids[:, None],
                "context_index": ids,
                "positions": torch.zeros_like(ids)[:, None],
                "mask": torch.ones(ids.shape[0], 1, dtype=torch.bool),
                "hidden": {h: it[0][:, None, :] for h, it in zip(hooks, items)},
            }


def compose_transitions(
    transitions: Sequence[Transition], n_a: int, nd_members: Tensor, sm_members: Tensor | None = None
) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor]:
    """Chain adjacent transitions: canonical descendants, descendant sets, kinds, born.

    A persisting feature is ``near_duplicate`` / ``shared_mean`` if it is a member of a pair of
    that kind in A (``nd_members`` / ``sm_members``, ``[n_a]`` bool)."""
    canon = torch.arange(n_a)
    sets = torch.eye(n_a, dtype=torch.bool)
    kinds = ["persists"] * n_a
    rank = {k: i for i, k in enumerate(KINDS)}
    for tr in transitions:
        alive = canon >= 0
        step_kind = [tr.kinds[int(c)] if c >= 0 else "dies" for c in canon]
        kinds = [min(k, s, key=rank.__getitem__) for k, s in zip(kinds, step_kind)]
        canon = torch.where(alive, tr.canonical[canon.clamp_min(0)], torch.full_like(canon, -1))
        sets = (sets.float() @ tr.children.float()) > 0
    kinds = ["near_duplicate" if (k == "persists" and bool(nd)) else k for k, nd in zip(kinds, nd_members)]
    if sm_members is not None:
        kinds = ["shared_mean" if (k == "persists" and bool(sm)) else k for k, sm in zip(kinds, sm_members)]
    born = ~sets.any(dim=0)
    return canon, sets, tuple(kinds), born
