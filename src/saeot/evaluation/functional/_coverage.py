"""Equal coverage, step 1: every matcher's *full* one-to-one assignment with the null off,
its pairs ranked by the matcher's own cost.

SAE Match's Eq. 5 protocol assigns every feature of A: the cost decides the order of
the pairs, not which features take part. A finished run's ``matches.csv`` holds what
the run's own settings decided (nearest or Hungarian, pairs above the null threshold
called "no match"), so matchers with a strict null lose coverage and look worse in a
substitution that drops unmatched features. Here the run's matcher is rebuilt from its
config with ``assignment=hungarian``, ``null_alpha=1`` (no "no match" decision),
``min_margin=0`` and at least ``functional.coverage_candidates`` candidates per
feature, and run again on what the run computed (its SAEs, its feature samples
projected by its fitted reference space; activation correlations streamed again over
the run's held-out split, as the run did: :meth:`saeot.pipeline.rundir.RunDir.match_context`).
Nothing is retrained or refit.

The sparse assignment can leave a few features of A without a partner (all their
candidates taken; dead features have no finite cost at all). Those are paired with the
unused features of B in index order ("forced" pairs, costed by
:meth:`~saeot.matching.base.Matcher.pair_costs`) so that every feature of A is assigned
when ``F_a <= F_b``; forced pairs rank after every assigned pair.

:class:`RankedPairs` holds the result, best pair first; the coverage level ``f`` keeps
the first ``floor(f F_a + 1/2)`` pairs (:meth:`RankedPairs.n_at`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from saeot.matching.base import Matcher, MatchContext
from saeot.pipeline.config import build
from saeot.pipeline.rundir import RunDir

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.data.types import DataModule

__all__ = ["RankedPairs", "rank_pairs", "full_assignment", "full_matcher", "assign_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankedPairs:
    """A one-to-one assignment of A onto B, best pair first.

    Attributes:
        hook_a, hook_b: hook names.
        feature_a, feature_b: ``[M]`` long, ranked by ``cost`` (assigned pairs first,
            ascending, ties by A index; then the forced pairs).
        cost: ``[M]`` float64 the matcher's cost of each pair (``inf`` possible).
        n_features_a, n_features_b: SAE widths.
        n_forced: pairs completed after the sparse assignment (the last ``n_forced``).
        seconds: time of the assignment.
    """

    hook_a: str
    hook_b: str
    feature_a: Tensor
    feature_b: Tensor
    cost: Tensor
    n_features_a: int
    n_features_b: int
    n_forced: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        m = self.feature_a.numel()
        if self.feature_b.numel() != m or self.cost.numel() != m:
            raise ValueError("RankedPairs: feature_a, feature_b and cost must have one entry per pair")
        if m and len(set(self.feature_b.tolist())) != m:
            raise ValueError("RankedPairs: a feature of B appears twice (not one-to-one)")
        if m and len(set(self.feature_a.tolist())) != m:
            raise ValueError("RankedPairs: a feature of A appears twice (not one-to-one)")

    @property
    def key(self) -> str:
        return f"{self.hook_a}|{self.hook_b}"

    @property
    def n_pairs(self) -> int:
        return int(self.feature_a.numel())

    def n_at(self, fraction: float) -> int:
        """Pairs kept at coverage ``fraction`` of A: ``floor(fraction F_a + 1/2)``, at most all pairs."""
        return int(min(self.n_pairs, math.floor(float(fraction) * self.n_features_a + 0.5)))


def rank_pairs(feature_a: Tensor, feature_b: Tensor, cost: Tensor, forced: Tensor) -> Tensor:
    """``[M]`` order of the pairs: not forced before forced, then cost ascending (NaN as inf),
    then A index."""
    c = np.nan_to_num(cost.double().cpu().numpy(), nan=np.inf)
    order = np.lexsort((feature_a.cpu().numpy(), c, forced.cpu().numpy().astype(np.int8)))
    return torch.as_tensor(order, dtype=torch.long)


def full_matcher(matcher: Matcher, n_candidates: int) -> Matcher:
    """The same matcher (same settings otherwise) with ``assignment=hungarian``, the null off,
    no margin rule and at least ``n_candidates`` candidates."""
    cfg = dataclasses.replace(matcher.cfg, assignment="hungarian", null_alpha=1.0, null_quantile=None,
                              min_margin=0.0, n_candidates=max(int(matcher.cfg.n_candidates), int(n_candidates)))
    return type(matcher)(cfg)


def full_assignment(matcher: Matcher, ctx: MatchContext, hook_a: str, hook_b: str, n_candidates: int = 8,
                    n_features_a: int | None = None, n_features_b: int | None = None) -> RankedPairs:
    """``matcher``'s full one-to-one assignment of ``hook_a`` onto ``hook_b`` (module docstring)."""
    t0 = time.perf_counter()
    res = full_matcher(matcher, n_candidates).match(ctx, hook_a, hook_b)
    fb = res.feature_b.long().cpu().clone()
    cost = res.distance.double().cpu().clone()
    n_a = int(n_features_a if n_features_a is not None else fb.numel())
    n_b = int(n_features_b if n_features_b is not None else ctx.saes[hook_b].cfg.d_sae)
    forced = torch.zeros(n_a, dtype=torch.bool)
    left_a = torch.nonzero(fb < 0).flatten()
    if left_a.numel():
        used = torch.zeros(n_b, dtype=torch.bool)
        used[fb[fb >= 0]] = True
        free_b = torch.nonzero(~used).flatten()
        n = min(left_a.numel(), free_b.numel())
        ia, ib = left_a[:n], free_b[:n]
        if n:
            fb[ia] = ib
            forced[ia] = True
            cost[ia] = float("inf")  # a dead feature on either side has no finite cost
            live = (matcher.alive(ctx, hook_a).cpu()[ia] & matcher.alive(ctx, hook_b).cpu()[ib])
            if live.any():
                cost[ia[live]] = matcher.pair_costs(ctx, hook_a, hook_b, ia[live], ib[live]).double().cpu()
    fa = torch.arange(n_a)
    ok = fb >= 0
    fa, fb, cost, forced = fa[ok], fb[ok], cost[ok], forced[ok]
    order = rank_pairs(fa, fb, cost, forced)
    return RankedPairs(hook_a=hook_a, hook_b=hook_b, feature_a=fa[order], feature_b=fb[order], cost=cost[order],
                       n_features_a=n_a, n_features_b=n_b, n_forced=int(forced.sum()),
                       seconds=time.perf_counter() - t0)


def assign_run(run: RunDir, saes: dict[str, SAE], datamodule: DataModule, pairs: Sequence[tuple[str, str]],
               n_candidates: int = 8, progress: bool = False) -> list[RankedPairs]:
    """The full one-to-one assignment of every layer pair of ``run`` under its own matcher."""
    matcher = build(run.cfg.matcher)
    if not isinstance(matcher, Matcher):
        raise TypeError(f"{run.path}: matcher config builds a {type(matcher).__name__}, not a saeot Matcher")
    ctx = run.match_context(matcher, saes, datamodule, pairs, progress)
    out = []
    for a, b in pairs:
        rp = full_assignment(matcher, ctx, a, b, n_candidates, saes[a].cfg.d_sae, saes[b].cfg.d_sae)
        log.info("%s %s: full one-to-one assignment, %d pairs (%d forced) in %.1fs", run.label, rp.key, rp.n_pairs,
                 rp.n_forced, rp.seconds)
        out.append(rp)
    return out
