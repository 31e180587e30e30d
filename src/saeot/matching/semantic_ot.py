"""Semantic optimal transport matcher (its mean-embedding ablation: :mod:`saeot.matching.mean_embedding`).

Feature i of layer A and feature j of layer B are compared by the 2-Wasserstein
distance between their activation-weighted distributions in the shared reference
space (``ctx.samples``, already projected):

    D(i, j) = W2(mu_i, nu_j),  W2^2 = min_{P in U(w_i, w_j)} sum_{k,l} P_kl ||x_ik - y_jl||^2.

The nearest candidates are exact under the chosen solver: lower bounds prune the
pairs that cannot be among the ``k`` nearest (see :meth:`saeot.transport.W2Solver.nearest`).
``distance`` in the outputs is W2 (not squared), so it is a metric.

Variants of the cost (``centred_weight``, ``debias``, ``decoder_weight``, ``normalize``;
:mod:`saeot.matching.semantic_cost`): by default the cost is *debiased* (``debias=1``:
half of each feature's self-distance between two halves of its samples is subtracted,
which removes the finite-sample inflation of W2 between small clouds; the method
ablation in docs/results/synthetic.md measured it). With any variant on, ``distance``
is ``sign(c) sqrt(|c|)`` of the variant's cost ``c`` (a debiased cost can be negative,
e.g. a feature against the very same samples scores ``-sqrt(S_i)``); ``debias=0`` gives
plain W2, a metric. The search stays exact under the solver.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saeot.matching.base import MatchContext, Matcher, MatcherConfig, MatcherNotApplicable
from saeot.matching.semantic_cost import NORMALIZE, SemanticCost, check_token_weight, mapped_directions
from saeot.transport import ExactW2, W2Solver

__all__ = ["SemanticOT", "SemanticOTConfig"]


@dataclass(frozen=True)
class SemanticOTConfig(MatcherConfig):
    """Settings of :class:`SemanticOT` (and the shared ones of :class:`MatcherConfig`).

    Attributes:
        solver: a :class:`~saeot.transport.W2Solver` (Hydra: ``${transport}``, e.g.
            ``ExactW2()``, ``SinkhornW2(reg=0.05)``, ``SlicedW2(n_projections=128)``);
            default :class:`~saeot.transport.ExactW2`.
        progress: show a progress bar over rows.
        n_null_max: fewer null pairs than the cheap matchers (each is an exact OT solve).
        centred_weight: weight of the centred term of W2^2 (1: W2; 0: the mean embedding).
        debias: subtract ``debias / 2`` times each feature's self-distance between the two
            halves of its samples (0: plain W2). Default 1: chosen on synthetic seeds 0-2 and
            confirmed on held-out seeds (docs/results/synthetic.md, method ablation).
        decoder_weight: weight of the cosine distance of the two SAEs' decoder rows mapped
            into the reference space (0: off; needs ``ctx.reference``).
        normalize: ``none`` | ``mean`` (each cloud divided by the norm of its mean).
        token_weight: the fused ground cost's price of moving mass between different token
            occurrences, in units of the median random-pair cost (0: off, plain W2; needs
            ``transport=exact``). Features that fire on the same tokens transport at low cost.
        (:mod:`saeot.matching.semantic_cost` defines the cost these settings make.)
    """

    solver: W2Solver | None = None
    progress: bool = True
    n_null_max: int = 32768
    centred_weight: float = 1.0
    debias: float = 1.0
    decoder_weight: float = 0.0
    normalize: str = "none"
    token_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver is None:
            object.__setattr__(self, "solver", ExactW2())  # frozen: the default solver, set once
        if not isinstance(self.solver, W2Solver):
            raise ValueError(f"matcher.solver must be a saeot.transport.W2Solver (set transport=exact, sinkhorn or "
                             f"sliced), got {type(self.solver).__name__}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"matcher.normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.centred_weight < 0 or self.decoder_weight < 0:
            raise ValueError("matcher.centred_weight and matcher.decoder_weight must be >= 0")
        check_token_weight(self.token_weight, self.solver, self.centred_weight)

    @property
    def plain(self) -> bool:
        """The cost is plain W2 (every variant off)."""
        return (self.centred_weight == 1.0 and self.debias == 0.0 and self.decoder_weight == 0.0
                and self.normalize == "none" and self.token_weight == 0.0)


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
        self._cost: tuple[tuple, SemanticCost] | None = None

    def cost(self, ctx: MatchContext, hook_a: str, hook_b: str) -> SemanticCost:
        """The variant cost between A and B (built once per context and pair of hooks)."""
        key = (id(ctx), id(ctx.samples[hook_a]), id(ctx.samples[hook_b]), hook_a, hook_b)
        if self._cost is None or self._cost[0] != key:
            cfg, dev = self.cfg, ctx.device
            sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
            dirs = (None, None)
            if cfg.decoder_weight > 0:
                reference = ctx.reference
                if reference is None or hook_a not in ctx.saes or hook_b not in ctx.saes:
                    raise MatcherNotApplicable("matcher.decoder_weight > 0 needs the SAEs and the fitted reference "
                                               "space in the match context (ctx.reference)")
                dirs = tuple(mapped_directions(reference, h, ctx.saes[h].W_dec, ctx.saes[h].b_dec)
                             for h in (hook_a, hook_b))
            self._cost = (key, SemanticCost(
                cfg.solver, sa.points.to(dev), sa.weights.to(dev), sb.points.to(dev), sb.weights.to(dev),
                centred_weight=cfg.centred_weight, debias=cfg.debias, decoder_weight=cfg.decoder_weight,
                normalize=cfg.normalize, dirs_a=dirs[0], dirs_b=dirs[1], seed=cfg.seed,
                token_weight=cfg.token_weight,
                occurrences_a=sa.occurrences() if cfg.token_weight > 0 else None,
                occurrences_b=sb.occurrences() if cfg.token_weight > 0 else None,
            ))
        return self._cost[1]

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        return ctx.samples[hook].alive

    def candidate_stats(self) -> dict[str, int]:
        return dict(self.last_stats)

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest features of B (exact under the solver) of A's features ``rows`` (default all)."""
        if not self.cfg.plain:
            cost = self.cost(ctx, hook_a, hook_b)
            cost.n_solved = 0
            c, index = cost.nearest(k, rows=rows, progress=self.cfg.progress)
            alive_rows = cost.alive_a if rows is None else cost.alive_a[rows]
            self.last_stats = {"n_solved": int(cost.n_solved), "n_pairs": int(alive_rows.sum() * cost.alive_b.sum())}
            return _signed_sqrt(c), index
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        pa, wa = (sa.points, sa.weights) if rows is None else (sa.points[rows], sa.weights[rows])
        res = self.cfg.solver.nearest(
            pa.to(dev), wa.to(dev), sb.points.to(dev), sb.weights.to(dev), k=k, progress=self.cfg.progress,
        )
        self.last_stats = {"n_solved": int(res.n_solved), "n_pairs": int(res.n_pairs)}
        return res.cost.double().clamp_min(0).sqrt().cpu(), res.index.cpu()

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        if not self.cfg.plain:
            return _signed_sqrt(self.cost(ctx, hook_a, hook_b).pairs(ia, ib))
        sa, sb = ctx.samples[hook_a], ctx.samples[hook_b]
        dev = ctx.device
        c = self.cfg.solver.pair(sa.points.to(dev), sa.weights.to(dev), sb.points.to(dev), sb.weights.to(dev),
                             ia.to(dev), ib.to(dev))
        return c.double().clamp_min(0).sqrt().cpu()


def _signed_sqrt(c: Tensor) -> Tensor:
    """``sign(c) sqrt(|c|)``: a distance in the units of W2 that keeps the order of a cost that may be negative."""
    c = c.double().cpu()
    return c.sign() * c.abs().sqrt()
