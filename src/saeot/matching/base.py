"""The Matcher interface shared by semantic OT and every baseline.

A matcher answers one question for a pair of SAEs (hook A, hook B): for every
feature i of A, which feature of B is it, how sure are we (margin to the
second-best candidate), and is it a match at all (a cost below a threshold
calibrated on a null of random pairs)?

A subclass supplies two things:

* :meth:`Matcher.candidates` -- the ``k`` cheapest partners of each feature of A,
  ``cost [F_a, k]`` ascending and ``index [F_a, k]`` into B (``inf`` / -1 padding);
* :meth:`Matcher.pair_costs` -- the cost of arbitrary pairs (used for the null).

Everything else (nearest or one-to-one assignment, margin, the "no match"
decision) is shared, so all matchers produce comparable :class:`MatchResult`; a
matcher that can solve the one-to-one assignment on more than its candidates
overrides :meth:`Matcher.one_to_one_assignment` (SAE Match's dense LAP).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from saeot.matching.assignment import linear_assignment_sparse
from saeot.settings import check_types, from_settings
from saeot.types import FeatureSamples, MatchResult

if TYPE_CHECKING:
    from saeot.reference.base import ReferenceSpace


@dataclass(frozen=True)
class Shard:
    """This process's part of a search sharded over ``world_size`` ranks: a contiguous block of
    A's features (:meth:`rows`); ``gather(obj)`` returns every rank's ``obj`` in rank order
    (e.g. ``torch.distributed.all_gather_object``)."""

    rank: int
    world_size: int
    gather: Callable[[Any], list[Any]]

    def rows(self, n: int) -> Tensor:
        """``[m]`` this rank's rows of ``0..n-1``: blocks of ``ceil(n / world_size)``, the last ones shorter or empty."""
        step = -(-n // self.world_size)
        return torch.arange(min(n, self.rank * step), min(n, (self.rank + 1) * step))


@dataclass
class MatchContext:
    """What matchers may read. Fields a matcher does not declare in ``requires`` may be None.

    Attributes:
        saes: hook name -> sae_lens ``SAE`` (weights; used by the data-free baselines).
        samples: hook name -> :class:`FeatureSamples` already projected into the
            shared reference space (used by semantic OT and mean embedding).
        correlations: ``(hook_a, hook_b)`` -> ``[F_a, F_b]`` Pearson correlation of
            the two SAEs' activations on the same tokens (activation correlation).
        device: where matchers should compute.
        shard: under DDP, this rank's part of the candidate search (matchers with
            ``shardable``); the gathered result equals one process's.
        reference: the fitted reference space the samples were projected by (semantic OT's
            ``decoder_weight`` maps decoder rows through it); None if not given.
    """

    saes: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, FeatureSamples] | None = None
    correlations: dict[tuple[str, str], Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shard: Shard | None = None
    reference: ReferenceSpace | None = None


class MatcherNotApplicable(RuntimeError):
    """The matcher cannot run on this input (e.g. needs shared tokens that do not exist)."""


ASSIGNMENTS = ("nearest", "hungarian")
NULL_METHODS = ("fit", "empirical")
#: null_method=empirical: each feature of A's nearest partners excluded from the random pairs
NULL_EXCLUDE = 1
#: null pairs needed below a quantile for it to be taken empirically
MIN_TAIL_COUNT = 20
#: null_method=fit: the band of the random-pair costs the log-normal is fitted to
FIT_BAND = (0.01, 0.25)


@dataclass(frozen=True)
class NullEstimate:
    """The no-match threshold and how it was estimated.

    ``method``: ``fit`` (log-normal fitted to the band :data:`FIT_BAND`, extrapolated),
    ``empirical`` (quantile of the random-pair costs), ``quantile`` (a raw ``null_quantile``),
    ``off`` (decision disabled: threshold inf) or ``none`` (too few usable pairs: NaN).
    """

    threshold: float
    n_pairs: int
    level: float
    method: str


@dataclass(frozen=True)
class MatcherConfig:
    """Settings every matcher shares; a matcher's own settings extend it in a subclass
    (``SAEMatchConfig(MatcherConfig)``), whose fields are the keys of its ``conf/matcher/`` file.

    Attributes:
        assignment: ``nearest`` (each feature of A takes its cheapest partner; many-to-one)
            or ``hungarian`` (one-to-one linear assignment over the candidates; a matcher may
            solve it otherwise, :meth:`Matcher.one_to_one_assignment`: SAE Match's ``lap=dense`` over all pairs).
            Its result's ``extras['n_forced']``: rows left without a partner while a feature
            of B stays free (the pairs the equal-coverage protocol completes as "forced").
        n_candidates: partners kept per feature for the one-to-one assignment.
        null_alpha: the chance that a feature of A with no true partner in B is still
            called a match. Its best cost is the minimum over the ``F_b`` features of B,
            so the threshold is the ``q = 1 - (1 - null_alpha)^(1 / F_b)`` quantile (Sidak)
            of the costs of random pairs. ``1.0`` disables the decision.
        null_method: how that quantile is estimated from random pairs:
            ``fit`` (default): a log-normal fitted to the 1%-25% band of the random-pair
            costs, extrapolated to ``q``. True partners make up about 1/F_b of random
            pairs, more than ``q`` itself (``null_alpha / F_b``), so they sit exactly in
            the tail an empirical quantile would read; the band they cannot reach is
            fitted instead, and no pair needs to be excluded.
            ``empirical``: the empirical ``q`` quantile of up to ``n_null_max`` random
            pairs that exclude each feature's nearest partner (its likely true partner).
            Excluding it also removes the best null pair of every feature that has no
            partner, which is most of the null's mass below ``q``: the threshold comes
            out high (lenient). Kept as the comparison (tests/matching/test_null.py measures it).
            Either way the threshold does not depend on the assignments computed.
        null_quantile: if set, use this raw quantile of the random-pair costs instead.
        n_null: random pairs drawn for the null (``fit``; at least, for ``empirical``).
        n_null_max: random pairs drawn at most for ``empirical`` (as many as give 20
            pairs below ``q``, when affordable; else it falls back to ``fit``).
        min_margin: a pair is a match only if the second-best candidate costs at
            least this much more (relative to the best: ``margin / best``).
        seed: seed of the null's random pairs.
    """

    assignment: str = "nearest"
    n_candidates: int = 8
    null_quantile: float | None = None
    null_alpha: float = 0.05
    null_method: str = "fit"
    n_null: int = 2048
    n_null_max: int = 400_000
    min_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"matcher.assignment must be 'nearest' or 'hungarian', got {self.assignment!r}")
        if self.null_quantile is not None and not 0.0 < self.null_quantile <= 1.0:
            raise ValueError(f"matcher.null_quantile must be in (0, 1], got {self.null_quantile}")
        if not 0.0 < self.null_alpha <= 1.0:
            raise ValueError(f"matcher.null_alpha must be in (0, 1], got {self.null_alpha}")
        if self.n_candidates < 2:
            raise ValueError(f"matcher.n_candidates must be >= 2, got {self.n_candidates}")
        if self.null_method not in NULL_METHODS:
            raise ValueError(f"matcher.null_method must be one of {NULL_METHODS}, got {self.null_method!r}")
        if self.n_null < 10:
            raise ValueError(f"matcher.n_null must be >= 10, got {self.n_null}")
        if self.n_null_max < self.n_null:
            raise ValueError(f"matcher.n_null_max={self.n_null_max} must be >= matcher.n_null={self.n_null}")
        if self.min_margin < 0:
            raise ValueError(f"matcher.min_margin must be >= 0, got {self.min_margin}")

    def _check_types(self) -> None:
        """Every field annotated with plain ``int`` / ``float`` / ``bool`` / ``str`` (``| None``)
        holds such a value (``matcher.null_alpha=abc`` is named, not a TypeError later)."""
        check_types(self, "matcher")


class Matcher(ABC):
    """Base class of all matchers.

    Built from its settings, ``SAEMatch(assignment="hungarian", w_enc=0.5)`` (what Hydra's
    ``conf/matcher/*.yaml`` does), or from a ready config, ``SAEMatch(cfg)``; the settings
    are the fields of :attr:`config_class` and live in ``self.cfg``. An unknown setting
    is an error naming it.
    """

    name: ClassVar[str] = "matcher"
    #: which fields of MatchContext the matcher reads: {"saes", "samples", "correlations"}
    requires: ClassVar[frozenset[str]] = frozenset()
    #: the dataclass of this matcher's settings
    config_class: ClassVar[type[MatcherConfig]] = MatcherConfig
    #: ``candidates`` takes ``rows`` (a subset of A's features), so its search can be sharded over ranks
    shardable: ClassVar[bool] = False

    def __init__(self, cfg: MatcherConfig | None = None, **settings: Any) -> None:
        if cfg is None:
            cfg = from_settings(self.config_class, settings, "matcher", f"matcher {self.name}")
        elif settings:
            raise TypeError(f"{type(self).__name__}: pass either a config or settings, not both")
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    # ------------------------------------------------------------------ subclass API
    @abstractmethod
    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` cheapest partners in B of every feature of A.

        Returns:
            cost: ``[F_a, k]`` float, ascending along dim 1, ``inf`` where fewer exist.
            index: ``[F_a, k]`` long indices into B's features, -1 where ``cost`` is inf.
        """

    @abstractmethod
    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` cost of the pairs ``(ia[j], ib[j])``; ``inf`` for pairs with a dead feature."""

    def candidate_stats(self) -> dict[str, int]:
        """Counters of the last :meth:`candidates` call (e.g. exact solves), summed over shards."""
        return {}

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[F]`` bool: features that can take part in a match (default: all)."""
        return torch.ones(_n_features(ctx, hook), dtype=torch.bool)

    # ------------------------------------------------------------------ shared logic
    def check(self, ctx: MatchContext, hook_a: str, hook_b: str) -> None:
        """Raise :class:`MatcherNotApplicable` if ``ctx`` lacks what this matcher needs."""
        for need in self.requires:
            value = getattr(ctx, need)
            if value is None:
                raise MatcherNotApplicable(f"matcher {self.name} needs {need}, which this run did not compute")
            if need == "correlations":
                if (hook_a, hook_b) not in value:
                    raise MatcherNotApplicable(
                        f"matcher {self.name} needs activations of {hook_a} and {hook_b} on the same tokens"
                    )
            elif hook_a not in value or hook_b not in value:
                raise MatcherNotApplicable(f"matcher {self.name} needs {need} for {hook_a} and {hook_b}")

    def null_threshold(
        self, ctx: MatchContext, hook_a: str, hook_b: str, exclude: Tensor | None = None
    ) -> NullEstimate:
        """Cost below which a best match is unlikely to be chance (see ``null_alpha``, ``null_method``).

        Args:
            exclude: ``[F_a, k]`` partner indices into B per feature of A, nearest first
                (``null_method=empirical`` drops random pairs that hit the first
                :data:`NULL_EXCLUDE` of their row).
        """
        cfg = self.cfg
        if (cfg.null_quantile or cfg.null_alpha) >= 1.0:
            return NullEstimate(float("inf"), 0, 1.0, "off")
        alive_a = self.alive(ctx, hook_a).nonzero().flatten()
        alive_b = self.alive(ctx, hook_b).nonzero().flatten()
        if len(alive_a) == 0 or len(alive_b) == 0:
            return NullEstimate(float("nan"), 0, float("nan"), "none")
        q = cfg.null_quantile if cfg.null_quantile is not None else null_level(cfg.null_alpha, len(alive_b))
        empirical = cfg.null_quantile is None and cfg.null_method == "empirical"
        n = min(max(cfg.n_null, math.ceil(1.25 * MIN_TAIL_COUNT / q)), cfg.n_null_max) if empirical else cfg.n_null
        g = torch.Generator().manual_seed(cfg.seed)
        ia = alive_a[torch.randint(len(alive_a), (n,), generator=g)]
        ib = alive_b[torch.randint(len(alive_b), (n,), generator=g)]
        if empirical and exclude is not None:
            keep = ~(exclude[ia, :NULL_EXCLUDE] == ib[:, None]).any(1)
            ia, ib = ia[keep], ib[keep]
        costs = self.pair_costs(ctx, hook_a, hook_b, ia, ib).double()
        costs = costs[torch.isfinite(costs)]
        if costs.numel() < 10:
            return NullEstimate(float("nan"), int(costs.numel()), q, "none")
        if cfg.null_quantile is not None:
            return NullEstimate(float(torch.quantile(costs, q)), int(costs.numel()), q, "quantile")
        if empirical and q * costs.numel() >= MIN_TAIL_COUNT:
            return NullEstimate(float(torch.quantile(costs, q)), int(costs.numel()), q, "empirical")
        return NullEstimate(float(lognormal_quantile(costs, q)), int(costs.numel()), q, "fit")

    def match(self, ctx: MatchContext, hook_a: str, hook_b: str) -> MatchResult:
        """Match every feature of A to B; see the class docstring for the decision rule."""
        return self.match_assignments(ctx, hook_a, hook_b, (self.cfg.assignment,))[self.cfg.assignment]

    def match_assignments(
        self, ctx: MatchContext, hook_a: str, hook_b: str, assignments: tuple[str, ...] = ("nearest", "hungarian")
    ) -> dict[str, MatchResult]:
        """Direct matches of A to B under several assignments, sharing one candidate search
        and one null (the expensive parts)."""
        for a in assignments:
            if a not in ASSIGNMENTS:
                raise ValueError(f"matcher.assignment must be 'nearest' or 'hungarian', got {a!r}")
        self.check(ctx, hook_a, hook_b)
        k = self.cfg.n_candidates if "hungarian" in assignments else max(2, NULL_EXCLUDE)
        cost, index, stats = self._candidates(ctx, hook_a, hook_b, k)
        cost = cost.double().cpu()
        index = index.long().cpu()
        if cost.shape[1] < 2:  # B has a single feature: pad so that the margin is defined
            cost = torch.cat([cost, torch.full_like(cost[:, :1], float("inf"))], dim=1)
            index = torch.cat([index, torch.full_like(index[:, :1], -1)], dim=1)
        best, second = cost[:, 0], cost[:, 1]
        margin = second - best
        margin[~torch.isfinite(best)] = float("nan")
        null = self.null_threshold(ctx, hook_a, hook_b, exclude=index)
        threshold = null.threshold

        out, extras_by = {}, {}
        for assignment in assignments:
            if assignment == "nearest":
                feature_b, distance = index[:, 0].clone(), best.clone()
            else:
                feature_b, distance, lap_stats = self.one_to_one_assignment(ctx, hook_a, hook_b, cost, index)
                assigned = int((feature_b >= 0).sum())
                # rows left without a partner while a feature of B stays free: what the
                # equal-coverage protocol completes as "forced" pairs (functional/_coverage.py)
                n_forced = min(feature_b.numel() - assigned, _n_features(ctx, hook_b) - assigned)
                extras_by[assignment] = {**lap_stats, "n_forced": n_forced}
            matched = torch.isfinite(distance) & (feature_b >= 0)
            if threshold == threshold:  # not nan
                matched &= distance <= threshold
            if self.cfg.min_margin > 0:
                rel = margin / best.abs().clamp_min(1e-12)
                matched &= rel >= self.cfg.min_margin
            out[assignment] = MatchResult(
                hook_a=hook_a,
                hook_b=hook_b,
                matcher=self.name,
                feature_b=feature_b,
                distance=distance,
                margin=margin.clone(),
                matched=matched,
                null_threshold=threshold,
                extras={"assignment": assignment, "null_pairs": null.n_pairs, "null_level": null.level,
                        "null_method": null.method, **stats, **extras_by.get(assignment, {})},
            )
        return out

    def one_to_one_assignment(
        self, ctx: MatchContext, hook_a: str, hook_b: str, cost: Tensor, index: Tensor
    ) -> tuple[Tensor, Tensor, dict]:
        """The one-to-one (``hungarian``) assignment of A onto B, given the candidates.

        Default: the sparse LAP over the candidates (:func:`linear_assignment_sparse`);
        a row whose candidates are all taken by others stays unassigned (-1).

        Args:
            cost, index: ``[F_a, k]`` the candidates (CPU, float64 / long).

        Returns:
            ``(feature_b [F_a] long, distance [F_a] float64 (inf where unassigned), extras)``.
        """
        feature_b = linear_assignment_sparse(cost, index, n_b=_n_features(ctx, hook_b))
        distance, _ = candidate_costs(cost, index, feature_b)
        return feature_b, distance, {}


    def _candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor, dict]:
        """:meth:`candidates` of every feature of A, sharded over ``ctx.shard`` when the matcher allows."""
        shard = ctx.shard
        if shard is None or shard.world_size == 1 or not self.shardable:
            cost, index = self.candidates(ctx, hook_a, hook_b, k)
            return cost, index, self.candidate_stats()
        n = _n_features(ctx, hook_a)
        rows = shard.rows(n)
        cost, index = self.candidates(ctx, hook_a, hook_b, k, rows=rows)
        parts = shard.gather((rows, cost.cpu(), index.cpu(), self.candidate_stats()))
        full_cost = torch.empty(n, cost.shape[1], dtype=cost.dtype)
        full_index = torch.empty(n, index.shape[1], dtype=index.dtype)
        for r, c, i, _ in parts:
            full_cost[r], full_index[r] = c, i
        stats = {key: sum(p[3].get(key, 0) for p in parts) for key in parts[0][3]}
        return full_cost, full_index, stats


def candidate_costs(cost: Tensor, index: Tensor, feature_b: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's candidate cost of its assigned partner.

    Args:
        cost, index: ``[F_a, k]`` candidates (indices unique per row, -1 padding).
        feature_b: ``[F_a]`` long, -1 = unassigned.

    Returns:
        ``(distance [F_a], found [F_a] bool)``: ``distance`` is the candidate cost where the
        partner is among the row's candidates (``found``), ``inf`` elsewhere.
    """
    hit = (index == feature_b[:, None]) & (feature_b >= 0)[:, None]
    found = hit.any(1)
    distance = torch.full((index.shape[0],), float("inf"), dtype=cost.dtype)
    distance[found] = cost[hit]
    return distance, found


def null_level(alpha: float, n_b: int) -> float:
    """Per-pair level ``q`` such that the best of ``n_b`` null pairs falls below it with
    probability ``alpha``: ``1 - (1 - alpha)^(1 / n_b)`` (Sidak)."""
    return float(-torch.expm1(torch.log1p(torch.tensor(-alpha, dtype=torch.float64)) / max(n_b, 1)))


def lognormal_quantile(costs: Tensor, q: float, band: tuple[float, float] = FIT_BAND) -> Tensor:
    """The ``q`` quantile of a log-normal fitted to ``costs`` by least squares on the normal
    QQ plot of the ``band`` of their sorted logs: ``log c_(i) ~ mu + sigma z_i``,
    ``z_i = Phi^-1((i + 1/2) / n)`` for plotting positions in ``band``; returns
    ``exp(mu + sigma Phi^-1(q))``. On the raw costs (a normal) when some are not positive.
    """
    costs = costs.double()
    positive = bool((costs > 0).all())
    x = (costs.log() if positive else costs).sort().values
    n = x.numel()
    normal = torch.distributions.Normal(0.0, 1.0)
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    sel = (p >= band[0]) & (p <= band[1])
    if int(sel.sum()) < 3:
        raise ValueError(f"lognormal_quantile needs more costs: {n} give {int(sel.sum())} in the band {band}")
    z, y = normal.icdf(p[sel]), x[sel]
    zc = z - z.mean()
    sigma = (zc * (y - y.mean())).sum() / (zc * zc).sum()
    mu = y.mean() - sigma * z.mean()
    t = mu + sigma * normal.icdf(torch.tensor(q, dtype=torch.float64))
    return t.exp() if positive else t


def _n_features(ctx: MatchContext, hook: str) -> int:
    if ctx.samples is not None and hook in ctx.samples:
        return ctx.samples[hook].n_features
    if hook in ctx.saes:
        return int(ctx.saes[hook].cfg.d_sae)
    if ctx.correlations is not None:
        for (a, b), corr in ctx.correlations.items():
            if a == hook:
                return int(corr.shape[0])
            if b == hook:
                return int(corr.shape[1])
    raise KeyError(f"no SAE, samples or correlations for {hook}")
