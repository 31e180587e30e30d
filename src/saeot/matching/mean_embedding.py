"""Mean embedding: the ablation of semantic OT that collapses each distribution to its mean.

``D(i, j) = ||m_i - m_j||`` with ``m_i = sum_k w_ik x_ik`` in the reference space (a
lower bound of W2; equal to it when both distributions are single points). What it
loses against :mod:`saeot.matching.semantic_ot` is what the distribution adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.matching.base import MatchContext, Matcher, MatcherConfig
from saeot.matching.candidates import topk_from_dense

__all__ = ["MeanEmbedding", "MeanEmbeddingConfig"]


@dataclass(frozen=True)
class MeanEmbeddingConfig(MatcherConfig):
    """Settings of :class:`MeanEmbedding` (and the shared ones of :class:`MatcherConfig`).

    Attributes:
        chunk: rows of A per chunk of the dense distance.
    """

    chunk: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError(f"matcher.chunk must be >= 1, got {self.chunk}")


class MeanEmbedding(Matcher):
    """Ablation of semantic OT: each distribution collapsed to its weighted mean.
    Settings: :class:`MeanEmbeddingConfig`."""

    name = "mean_embedding"
    requires = frozenset({"samples"})
    config_class = MeanEmbeddingConfig

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].alive

    def _means(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].weighted_mean().to(ctx.device).double()

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        ma, mb = self._means(ctx, hook_a), self._means(ctx, hook_b)
        alive_a, alive_b = self.alive(ctx, hook_a), self.alive(ctx, hook_b)
        costs, index = [], []
        for i in range(0, len(ma), self.cfg.chunk):
            d = torch.cdist(ma[i:i + self.cfg.chunk], mb)
            c, j = topk_from_dense(d, k, alive_b)
            costs.append(c.cpu())
            index.append(j.cpu())
        cost, idx = torch.cat(costs), torch.cat(index)
        cost[~alive_a] = float("inf")
        idx[~alive_a] = -1
        return cost, idx

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        ma, mb = self._means(ctx, hook_a), self._means(ctx, hook_b)
        d = (ma[ia.to(ma.device)] - mb[ib.to(mb.device)]).norm(dim=1).cpu()
        dead = ~(self.alive(ctx, hook_a)[ia] & self.alive(ctx, hook_b)[ib])
        d[dead] = float("inf")
        return d
