"""Semantic optimal transport matcher (its mean-embedding ablation: :mod:`saeot.matching.mean_embedding`).

Feature i of layer A and feature j of layer B are compared by the 2-Wasserstein
distance between their activation-weighted distributions in the shared reference
space (``ctx.samples``, already projected):

    D(i, j) = W2(mu_i, nu_j),  W2^2 = min_{P in U(w_i, w_j)} sum_{k,l} P_kl ||x_ik - y_jl||^2.

The nearest candidates are exact under the chosen solver: lower bounds prune the
pairs that cannot be among the ``k`` nearest (see :meth:`saeot.transport.W2Solver.nearest`).
``distance`` in the outputs is W2 (not squared), so it is a metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saeot.matching.base import MatchContext, Matcher, MatcherConfig
from saeot.transport import ExactW2, W2Solver

__all__ = ["SemanticOT", "SemanticOTConfig"]


@dataclass
class SemanticOTConfig(MatcherConfig):
    """Settings of :class:`SemanticOT` (and the shared ones of :class:`MatcherConfig`).

    Attributes:
        solver: a :class:`~saeot.transport.W2Solver` (Hydra: ``${transport}``, e.g.
            ``ExactW2()``, ``SinkhornW2(reg=0.05)``, ``SlicedW2(n_projections=128)``);
            default :class:`~saeot.transport.ExactW2`.
        progress: show a progress bar over rows.
        n_null_max: fewer null pairs than the cheap matchers (each is an exact OT solve).
    """

    solver: W2Solver | None = None
    progress: bool = True
    n_null_max: int = 32768

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver is None:
            self.solver = ExactW2()
        if not isinstance(self.solver, W2Solver):
            raise ValueError(f"matcher.solver must be a saeot.transport.W2Solver (set transport=exact, sinkhorn or "
                             f"sliced), got {type(self.solver).__name__}")


class SemanticOT(Matcher):
    """Wasserstein distance between feature distributions in the reference space.
    Settings: :class:`SemanticOTConfig`."""

    name = "semantic_ot"
    requires = frozenset({"samples"})
    config_class = SemanticOTConfig
    shardable = True

    def __init__(self, cfg: SemanticOTConfig | None = None, **settings) -> None:
        super().__init__(cfg, **settings)
        self.last_stats: dict = {}

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].alive

    def candidate_stats(self) -> dict[str, int]:
        return dict(self.last_stats)

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest features of B (exact under the solver) of A's features ``rows`` (default all)."""
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        pa, wa = (sa.points, sa.weights) if rows is None else (sa.points[rows], sa.weights[rows])
        res = self.cfg.solver.nearest(
            pa.to(dev), wa.to(dev), sb.points.to(dev), sb.weights.to(dev), k=k, progress=self.cfg.progress,
        )
        self.last_stats = {"n_solved": int(res.n_solved), "n_pairs": int(res.n_pairs)}
        return res.cost.double().clamp_min(0).sqrt().cpu(), res.index.cpu()

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        c = self.cfg.solver.pair(sa.points.to(dev), sa.weights.to(dev), sb.points.to(dev), sb.weights.to(dev),
                             ia.to(dev), ib.to(dev))
        return c.double().clamp_min(0).sqrt().cpu()
