"""Semantic optimal transport matcher and its mean-embedding ablation.

Feature i of layer A and feature j of layer B are compared by the 2-Wasserstein
distance between their activation-weighted distributions in the shared reference
space (``ctx.samples``, already projected):

    D(i, j) = W2(mu_i, nu_j),  W2^2 = min_{P in U(w_i, w_j)} sum_{k,l} P_kl ||x_ik - y_jl||^2.

The nearest candidates are exact under the chosen solver: lower bounds prune the
pairs that cannot be among the ``k`` nearest (see :meth:`saeot.transport.W2Solver.nearest`).
``distance`` in the outputs is W2 (not squared), so it is a metric.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeot.matching.base import MatchContext, Matcher, topk_from_dense
from saeot.transport import ExactW2, W2Solver


class SemanticOT(Matcher):
    """Wasserstein distance between feature distributions in the reference space.

    Args:
        solver: a :class:`~saeot.transport.W2Solver` (Hydra: ``${transport}``, e.g.
            ``ExactW2()``, ``SinkhornW2(reg=0.05)``, ``SlicedW2(n_projections=128)``);
            default :class:`~saeot.transport.ExactW2`.
        progress: show a progress bar over rows.
        (others: see :class:`~saeot.matching.base.Matcher`)
    """

    name = "semantic_ot"
    requires = frozenset({"samples"})

    def __init__(self, solver: W2Solver | None = None, progress: bool = True, **kw) -> None:
        super().__init__(**kw)
        if solver is None:
            solver = ExactW2()
        if not isinstance(solver, W2Solver):
            raise ValueError(f"matcher.solver must be a saeot.transport.W2Solver (set transport=exact, sinkhorn or "
                            f"sliced), got {type(solver).__name__}")
        self.solver = solver
        self.progress = progress
        self.last_stats: dict = {}

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].alive

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        res = self.solver.nearest(
            sa.points.to(dev), sa.weights.to(dev), sb.points.to(dev), sb.weights.to(dev),
            k=k, progress=self.progress,
        )
        self.last_stats = {"n_solved": int(res.n_solved), "n_pairs": int(res.n_pairs)}
        return res.cost.double().clamp_min(0).sqrt().cpu(), res.index.cpu()

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        c = self.solver.pair(sa.points.to(dev), sa.weights.to(dev), sb.points.to(dev), sb.weights.to(dev),
                             ia.to(dev), ib.to(dev))
        return c.double().clamp_min(0).sqrt().cpu()

    def match_assignments(self, ctx: MatchContext, hook_a: str, hook_b: str, assignments=("nearest", "hungarian")):
        results = super().match_assignments(ctx, hook_a, hook_b, assignments)
        for r in results.values():
            r.extras.update(self.last_stats)
        return results


class MeanEmbedding(Matcher):
    """Ablation of semantic OT: each distribution collapsed to its weighted mean.

    ``D(i, j) = ||m_i - m_j||`` with ``m_i = sum_k w_ik x_ik`` in the reference space
    (a lower bound of W2; equal to it when both distributions are single points).
    """

    name = "mean_embedding"
    requires = frozenset({"samples"})

    def __init__(self, chunk: int = 4096, **kw) -> None:
        super().__init__(**kw)
        self.chunk = chunk

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].alive

    def _means(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].weighted_mean().to(ctx.device).double()

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        ma, mb = self._means(ctx, hook_a), self._means(ctx, hook_b)
        alive_a, alive_b = self.alive(ctx, hook_a), self.alive(ctx, hook_b)
        costs, index = [], []
        for i in range(0, len(ma), self.chunk):
            d = torch.cdist(ma[i:i + self.chunk], mb)
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
