"""Data carried between the stages of saeot.

Shapes use F = number of SAE features, K = samples kept per feature, d = width of
the hidden state at the SAE's hook, r = width of the shared reference space.

Everything here is a plain container (tensors on CPU unless stated otherwise);
the stages that fill them live in their own modules:

    profiling.py  -> FeatureSamples (one per hook)
    reference.py  -> FeatureSamples projected into the reference space
    matching/     -> MatchResult (one per layer pair)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from saeot.io import atomic_save_safetensors, load_safetensors_checked

#: positions are below this: ``context * POS_SPAN + position`` orders tokens by (context, position)
POS_SPAN = 1 << 32


@dataclass
class FeatureSamples:
    """Activation-weighted empirical distribution of every feature of one SAE.

    Feature i is the distribution ``mu_i = sum_k weights[i, k] * delta(points[i, k])``.

    Attributes:
        hook: transformer_lens hook name of the SAE (e.g. ``blocks.3.hook_resid_post``).
        points: ``[F, K, d]`` hidden states (or their images in the reference space).
        weights: ``[F, K]`` non-negative; each row sums to 1 over its valid samples and
            is 0 on padding. A feature that never fired has an all-zero row.
        n_fire: ``[F]`` number of tokens on which the feature fired (activation > 0).
        act_sum: ``[F]`` sum of the feature's activations over all tokens seen.
        act_max: ``[F]`` largest activation seen.
        n_tokens: number of tokens streamed.
        token_ids: ``[F, K]`` token id at each kept sample, -1 on padding.
        locations: ``[F, K, 2]`` (context index, position) of each kept sample, -1 on padding.
        activations: ``[F, K]`` the feature's activation at each kept sample (0 on padding).
    """

    hook: str
    points: Tensor
    weights: Tensor
    n_fire: Tensor
    act_sum: Tensor
    act_max: Tensor
    n_tokens: int
    token_ids: Tensor
    locations: Tensor
    activations: Tensor

    def __post_init__(self) -> None:
        F, K = self.weights.shape
        if self.points.shape[:2] != (F, K):
            raise ValueError(
                f"points {tuple(self.points.shape)} and weights {tuple(self.weights.shape)} disagree"
            )

    @property
    def n_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def alive(self) -> Tensor:
        """``[F]`` bool: features with at least one kept sample."""
        return self.weights.sum(dim=1) > 0

    @property
    def firing_frequency(self) -> Tensor:
        return self.n_fire.double() / max(self.n_tokens, 1)

    def weighted_mean(self) -> Tensor:
        """``[F, d]`` the barycentre of each feature's distribution (0 for dead features)."""
        return torch.einsum("fk,fkd->fd", self.weights.to(self.points.dtype), self.points)

    def token_mass(self, i: int) -> dict[int, float]:
        """Token id -> the share of feature ``i``'s sample weight on it (its weights normalised to
        sum 1; padding and zero weights left out; ``{}`` for a feature without samples)."""
        w = self.weights[i].double()
        tot = float(w.sum())
        mass: dict[int, float] = {}
        if tot <= 0:
            return mass
        for t, wt in zip(self.token_ids[i].tolist(), (w / tot).tolist()):
            if t >= 0 and wt > 0:
                mass[int(t)] = mass.get(int(t), 0.0) + wt
        return mass

    def top_token_ids(self, i: int, n: int) -> list[int]:
        """The ``n`` token ids with most of feature ``i``'s sample weight, heaviest first (ties: lower id)."""
        mass = self.token_mass(i)
        return sorted(mass, key=lambda t: (-mass[t], t))[:n]

    def occurrences(self) -> Tensor:
        """``[F, K]`` long: one id per token occurrence, ``context * POS_SPAN + position`` (-1 on padding).

        Features of one profiling pass share the token stream, so equal ids at two layers are the
        same token occurrence (the labels of :class:`saeot.transport.LabelCost`)."""
        loc = self.locations.long()
        return torch.where(loc[..., 0] >= 0, loc[..., 0] * POS_SPAN + loc[..., 1], torch.full_like(loc[..., 0], -1))

    def with_points(self, points: Tensor) -> "FeatureSamples":
        """The same distribution with its support moved (e.g. projected), ``[F, K, r]``."""
        return replace(self, points=points)

    def subset(self, index: Tensor) -> "FeatureSamples":
        """The features at ``index`` (1-D long tensor), in that order."""
        return replace(
            self,
            points=self.points[index],
            weights=self.weights[index],
            n_fire=self.n_fire[index],
            act_sum=self.act_sum[index],
            act_max=self.act_max[index],
            token_ids=self.token_ids[index],
            locations=self.locations[index],
            activations=self.activations[index],
        )

    def tensors(self) -> dict[str, Tensor]:
        return {
            "points": self.points.contiguous(),
            "weights": self.weights.contiguous(),
            "n_fire": self.n_fire.contiguous(),
            "act_sum": self.act_sum.contiguous(),
            "act_max": self.act_max.contiguous(),
            "token_ids": self.token_ids.contiguous(),
            "locations": self.locations.contiguous(),
            "activations": self.activations.contiguous(),
        }

    def save(self, path: str | Path) -> None:
        """Write as safetensors atomically (temporary file, then rename)."""
        atomic_save_safetensors(
            self.tensors(), path, metadata={"hook": self.hook, "n_tokens": str(self.n_tokens)}
        )

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSamples":
        tensors, meta = load_safetensors_checked(path, required=("points", "weights", "n_fire"))
        return cls(hook=meta["hook"], n_tokens=int(meta["n_tokens"]), **tensors)


@dataclass
class MatchResult:
    """The matches of every feature of layer A's SAE against layer B's SAE.

    Attributes:
        hook_a, hook_b: hook names of the two SAEs.
        matcher: name of the matcher that produced it.
        feature_b: ``[F_a]`` long, the chosen partner in B (-1 if there is none at all).
        distance: ``[F_a]`` the matcher's own cost of that pair (lower is closer;
            ``inf`` where there is no candidate).
        margin: ``[F_a]`` cost of the second-best candidate minus the best (``inf`` if
            there is no second candidate).
        matched: ``[F_a]`` bool, False where the matcher decides "no match".
        null_threshold: the cost below which a pair is called a match, calibrated
            against a null distribution (``nan`` if the matcher has none).
        extras: anything else worth saving (e.g. number of exact solves).
    """

    hook_a: str
    hook_b: str
    matcher: str
    feature_b: Tensor
    distance: Tensor
    margin: Tensor
    matched: Tensor
    null_threshold: float = float("nan")
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.feature_b.shape[0]
        for name in ("distance", "margin", "matched"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"MatchResult.{name} must have shape ({n},)")

    @property
    def n_features(self) -> int:
        return int(self.feature_b.shape[0])
