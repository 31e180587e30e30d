"""Activation correlation: Pearson correlation of two SAEs' activations on the same tokens.

:class:`~saeot.profiling.statistics.CorrelationAccumulator` streams the correlation
over batches of tokens during the held-out pass (exact across DDP shards);
:class:`ActivationCorrelation` matches features by ``1 - corr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeot.matching.base import MatchContext, Matcher, MatcherConfig
from saeot.matching.candidates import chunked_candidates
from saeot.profiling.statistics import CorrelationAccumulator

__all__ = ["ActivationCorrelation", "ActivationCorrelationConfig"]


def _as_correlation(value: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(corr [F_a, F_b], fired_a | None, fired_b | None)`` from a tensor or an accumulator."""
    if isinstance(value, CorrelationAccumulator):
        return value.correlation(), value.fired_a & ~value.constant_a, value.fired_b & ~value.constant_b
    if isinstance(value, Tensor):
        return value, None, None
    raise TypeError(f"ctx.correlations values must be tensors or CorrelationAccumulator, got {type(value).__name__}")


@dataclass(frozen=True)
class ActivationCorrelationConfig(MatcherConfig):
    """Settings of :class:`ActivationCorrelation` (and the shared ones of :class:`MatcherConfig`).

    Attributes:
        chunk_size: rows of A per chunk of the top-k.
    """

    n_null: int = 4096
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ValueError(f"matcher.chunk_size must be >= 1, got {self.chunk_size}")


class ActivationCorrelation(Matcher):
    """Match by Pearson correlation of activations on shared tokens: ``C[i, j] = 1 - corr[i, j]`` in ``[0, 2]``.

    Reads ``ctx.correlations[(hook_a, hook_b)]``: a ``[F_a, F_b]`` tensor (as from
    :meth:`CorrelationAccumulator.correlation`) or the accumulator itself. Alive
    features are those that fired (and were not constant): taken from the accumulator
    if given, else a feature is alive if its row (column) has a non-zero entry,
    which is how :meth:`CorrelationAccumulator.correlation` marks dead features.
    Settings: :class:`ActivationCorrelationConfig`.
    """

    name = "activation_correlation"
    requires = frozenset({"correlations"})
    config_class = ActivationCorrelationConfig

    def _get(self, ctx: MatchContext, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor, Tensor]:
        corr, fired_a, fired_b = _as_correlation(ctx.correlations[(hook_a, hook_b)])
        if fired_a is None:
            nz = (corr != 0) & torch.isfinite(corr)
            fired_a, fired_b = nz.any(dim=1), nz.any(dim=0)
        return corr, fired_a.cpu(), fired_b.cpu()

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[F]`` bool: features that fired (looked up in any correlation entry with ``hook``)."""
        for (a, b) in (ctx.correlations or {}):
            if a == hook:
                return self._get(ctx, a, b)[1]
            if b == hook:
                return self._get(ctx, a, b)[2]
        raise KeyError(f"no correlations for {hook}")

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        corr, alive_a, alive_b = self._get(ctx, hook_a, hook_b)
        corr = corr.to(ctx.device)

        def rows(start: int, stop: int) -> Tensor:
            c = corr[start:stop].to(torch.float32)
            return (1.0 - torch.nan_to_num(c, nan=0.0)).clamp_(0.0, 2.0)

        return chunked_candidates(rows, corr.shape[0], k, self.cfg.chunk_size, alive_a, alive_b)

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        corr, alive_a, alive_b = self._get(ctx, hook_a, hook_b)
        ia, ib = ia.long().cpu(), ib.long().cpu()
        vals = torch.nan_to_num(corr[ia.to(corr.device), ib.to(corr.device)].cpu().double(), nan=0.0)
        cost = (1.0 - vals).clamp(0.0, 2.0)
        return cost.masked_fill(~(alive_a[ia] & alive_b[ib]), float("inf"))
