"""SAE Match (seed 001, arXiv 2410.07656): data-free matching of folded SAE parameters.

Folding (the per-feature scale, threshold folding) lives in :mod:`saeot.saes.folding`;
this module uses :func:`~saeot.saes.fold_threshold`.

Matching
--------
With folded parameters of A and B (same ``d_in``), the cost of pair ``(i, j)`` is

    C[i, j] = w_dec ||W_dec'_A[i] - W_dec'_B[j]||^2
            + w_enc ||W_enc'_A[:, i] - W_enc'_B[:, j]||^2
            + w_bias (b_enc'_A[i] - b_enc'_B[j])^2
            = ||v_i||^2 + ||u_j||^2 - 2 v_i . u_j

with ``v_i = [sqrt(w_dec) W_dec'_A[i], sqrt(w_enc) W_enc'_A[:, i], sqrt(w_bias) b_enc'_A[i]]``
(``[2 d_in + 1]``, likewise ``u_j``). Candidates are computed ``chunk_size`` rows of A
at a time (memory O(chunk_size * F_b)), keeping the ``k`` cheapest per row, whose
costs are then recomputed exactly in the difference form (:func:`rerank_exact`). The
default assignment is one-to-one (``hungarian``), solved as the paper does, a dense
linear assignment over all pairs (``lap``, below); the candidates give the margin and
the null's exclusions either way.

One-to-one assignment (``lap``)
-------------------------------
``lap=dense`` builds the full cost ``[F_a, F_b]`` over the alive features (``chunk_size``
rows at a time, in ``dtype``, stored float64 on the CPU: ``F_a * F_b * 8`` bytes, 2.1 GB
at 16k x 16k, plus about ``F_a * F_b`` bytes of masks while it is checked) and solves it
with scipy's ``linear_sum_assignment`` (:func:`~saeot.matching.assignment.linear_assignment_dense`):
with no more alive features in A than in B, every alive one gets a partner. Before building it the size
is checked against ``lap_max_gb``; over it, ``lap=dense`` stops with an error naming the
setting. ``lap=candidates`` is the sparse LAP restricted to each row's ``n_candidates``
cheapest partners (memory O(F_a * k)); a row whose candidates are all taken stays
unassigned. ``lap=auto`` (default) is ``dense`` when it fits ``lap_max_gb`` and
``candidates`` otherwise (logged). Either way ``distance`` is the exact difference-form
cost of the assigned pair (the candidate's cost, or :meth:`SAEMatch.pair_costs` for a
partner outside the candidates), ``margin`` the candidates' second-best minus best, and
the result's ``extras`` hold ``lap`` (the solver used), ``n_forced`` (rows left without a
partner while a feature of B stays free; :meth:`saeot.matching.base.Matcher.match_assignments`)
and, for ``dense``, ``n_beyond_candidates`` (assigned partners outside the row's
``n_candidates`` cheapest: the rows the candidate restriction could not have given
their partner).

Long-range pairs (A and B not adjacent): ``long_range="direct"`` matches A to B
directly; ``long_range="compose"`` (the paper) matches each adjacent pair on the way
(the hooks of ``chain``, or of ``ctx.saes``, strictly between A and B in layer order)
and composes the one-to-one maps (:func:`saeot.matching.assignment.compose_matches`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.dtypes import resolve_dtype
from saeot.hooks import hook_layer, hooks_between
from saeot.matching.assignment import compose_matches, linear_assignment_dense
from saeot.matching.base import MatchContext, Matcher, MatcherConfig, candidate_costs
from saeot.matching.candidates import chunked_candidates
from saeot.saes import encoder_bias, fold_threshold
from saeot.types import MatchResult

log = logging.getLogger(__name__)

__all__ = ["SAEMatch", "SAEMatchConfig", "rerank_exact", "LAPS"]

#: how SAE Match solves the one-to-one assignment (``matcher.lap``; module docstring)
LAPS = ("auto", "dense", "candidates")


def rerank_exact(va: Tensor, vb: Tensor, cost: Tensor, index: Tensor, max_elements: int = 1 << 22) -> Tensor:
    """Recompute candidate costs as ``||va[i] - vb[index[i, j]]||^2`` and re-sort each row.

    The matmul form ``|v|^2 + |u|^2 - 2 v.u`` used to screen all pairs loses precision
    to cancellation for nearly equal vectors (float32: ~1e-7 of ``|v|^2``); the
    difference form does not, and agrees with :meth:`SAEMatch.pair_costs`, so that a
    pair's ``distance`` and the null are computed the same way.

    Args:
        va: ``[F_a, D]``; vb: ``[F_b, D]``; cost, index: ``[F_a, k]`` (``inf`` / -1 padding).
        max_elements: bound on the ``[rows, k, D]`` temporary.

    Returns:
        ``(cost [F_a, k], index [F_a, k])`` ascending per row, padding last.
    """
    n_a, k = index.shape
    rows = max(1, max_elements // max(1, k * va.shape[1]))
    out = torch.empty_like(cost)
    for start in range(0, n_a, rows):
        idx = index[start : start + rows].to(va.device)
        valid = idx >= 0
        diff = va[start : start + rows, None, :] - vb[idx.clamp_min(0)]
        exact = diff.pow(2).sum(-1).masked_fill(~valid, float("inf"))
        out[start : start + rows] = exact.to(out.device, out.dtype)
    out, order = out.sort(dim=1, stable=True)
    return out, index.gather(1, order.to(index.device))


# ---------------------------------------------------------------------------- matcher
@dataclass(frozen=True)
class SAEMatchConfig(MatcherConfig):
    """Settings of :class:`SAEMatch` (and the shared ones of :class:`MatcherConfig`;
    the assignment defaults to ``hungarian``, as in the paper).

    Attributes:
        w_dec, w_enc, w_bias: weights of the decoder-row, encoder-column and encoder-bias
            terms of the cost (module docstring). Non-negative, not all zero.
        fold: fold thresholds / scales before comparing (False: raw weights; an ablation).
        long_range: ``compose`` (chain adjacent matches through the hooks between A and B)
            or ``direct`` (match A and B directly).
        chain: hooks to route through when composing (only those strictly between A
            and B in layer order are used); None: the hooks of ``ctx.saes``.
        chunk_size: rows of A per chunk of the dense cost.
        dtype: ``float32`` or ``float64``, precision of the cost computation.
        lap: how ``assignment=hungarian`` is solved: ``dense`` (the paper: scipy's
            ``linear_sum_assignment`` on the full ``[F_a, F_b]`` cost of the alive features,
            float64, ``F_a * F_b * 8`` bytes: 2.1 GB at 16k x 16k), ``candidates`` (sparse
            LAP over each row's ``n_candidates`` cheapest partners; rows whose candidates are
            all taken stay unassigned) or ``auto`` (default: ``dense`` if it fits
            ``lap_max_gb``, else ``candidates``). Module docstring.
        lap_max_gb: the largest dense cost matrix (GB, 1e9 bytes) ``dense`` / ``auto`` may build.
    """

    assignment: str = "hungarian"
    n_candidates: int = 32
    n_null: int = 4096
    w_dec: float = 1.0
    w_enc: float = 1.0
    w_bias: float = 1.0
    fold: bool = True
    long_range: str = "compose"
    chain: Sequence[str] | None = None
    chunk_size: int = 1024
    dtype: str = "float32"
    lap: str = "auto"
    lap_max_gb: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = (self.w_dec, self.w_enc, self.w_bias)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"matcher.w_dec/w_enc/w_bias must be >= 0 and not all 0, got {weights}")
        if self.long_range not in ("compose", "direct"):
            raise ValueError(f"matcher.long_range must be 'compose' or 'direct', got {self.long_range!r}")
        resolve_dtype(self.dtype, "matcher.dtype", allowed=(torch.float32, torch.float64))
        if self.chunk_size < 1:
            raise ValueError(f"matcher.chunk_size must be >= 1, got {self.chunk_size}")
        if self.lap not in LAPS:
            raise ValueError(f"matcher.lap must be one of {list(LAPS)}, got {self.lap!r}")
        if not self.lap_max_gb > 0:
            raise ValueError(f"matcher.lap_max_gb must be > 0, got {self.lap_max_gb}")
        object.__setattr__(self, "chain", list(self.chain) if self.chain is not None else None)  # frozen: a plain list, once


class SAEMatch(Matcher):
    """SAE Match: squared distance between folded SAE parameters, one-to-one assignment
    (by default the paper's dense LAP over all pairs, ``matcher.lap``; module docstring).
    Settings: :class:`SAEMatchConfig`."""

    name = "sae_match"
    requires = frozenset({"saes"})
    config_class = SAEMatchConfig

    def __init__(self, cfg: SAEMatchConfig | None = None, **settings) -> None:
        super().__init__(cfg, **settings)
        self.dtype = resolve_dtype(self.cfg.dtype, "matcher.dtype")

    # ------------------------------------------------------------------ features as vectors
    def feature_vectors(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[d_sae, 2 d_in + 1]`` the weighted folded parameters ``v_i`` of every feature, on ``ctx.device``."""
        sae = ctx.saes[hook]
        if self.cfg.fold:
            W_enc, b_enc, W_dec = fold_threshold(sae)
        else:
            W_enc, b_enc, W_dec = sae.W_enc.detach(), encoder_bias(sae).detach(), sae.W_dec.detach()
        parts = []
        if self.cfg.w_dec > 0:
            parts.append(math.sqrt(self.cfg.w_dec) * W_dec.to(ctx.device, self.dtype))
        if self.cfg.w_enc > 0:
            parts.append(math.sqrt(self.cfg.w_enc) * W_enc.to(ctx.device, self.dtype).T)
        if self.cfg.w_bias > 0:
            parts.append(math.sqrt(self.cfg.w_bias) * b_enc.to(ctx.device, self.dtype)[:, None])
        return torch.cat(parts, dim=1)

    def _pair_vectors(self, ctx: MatchContext, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor]:
        d_a, d_b = int(ctx.saes[hook_a].cfg.d_in), int(ctx.saes[hook_b].cfg.d_in)
        if d_a != d_b:
            raise ValueError(
                f"sae_match compares SAE weights, which needs equal d_in; {hook_a} has {d_a}, {hook_b} has {d_b}"
            )
        return self.feature_vectors(ctx, hook_a), self.feature_vectors(ctx, hook_b)

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[F]`` bool: features with a non-zero, finite decoder row."""
        W_dec = ctx.saes[hook].W_dec.detach()
        return ((W_dec.norm(dim=1) > 0) & torch.isfinite(W_dec).all(dim=1)).cpu()

    @staticmethod
    def _cost_rows(va: Tensor, vb: Tensor) -> Callable[[int, int], Tensor]:
        """``(start, stop) -> [stop - start, F_b]`` the matmul-form cost of rows ``start:stop`` of ``va``."""
        na, nb = va.pow(2).sum(1), vb.pow(2).sum(1)
        vbT = vb.T.contiguous()

        def rows(start: int, stop: int) -> Tensor:
            cost = na[start:stop, None] + nb[None, :] - 2.0 * (va[start:stop] @ vbT)
            return cost.clamp_min_(0.0)

        return rows

    # ------------------------------------------------------------------ Matcher API
    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        va, vb = self._pair_vectors(ctx, hook_a, hook_b)
        cost, index = chunked_candidates(
            self._cost_rows(va, vb), va.shape[0], k, self.cfg.chunk_size, self.alive(ctx, hook_a),
            self.alive(ctx, hook_b)
        )
        return rerank_exact(va, vb, cost, index)

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        va, vb = self._pair_vectors(ctx, hook_a, hook_b)
        ia, ib = ia.long().to(va.device), ib.long().to(va.device)
        out = torch.empty(ia.shape[0], dtype=va.dtype, device=va.device)
        step = max(1, self.cfg.chunk_size * 4)
        for start in range(0, ia.shape[0], step):
            sl = slice(start, start + step)
            out[sl] = (va[ia[sl]] - vb[ib[sl]]).pow(2).sum(1)
        ok = self.alive(ctx, hook_a).to(va.device)[ia] & self.alive(ctx, hook_b).to(va.device)[ib]
        return out.masked_fill(~ok, float("inf")).cpu()

    # ------------------------------------------------------------------ one-to-one assignment
    def lap_for(self, ctx: MatchContext, hook_a: str, hook_b: str) -> str:
        """``dense`` or ``candidates``: how :meth:`one_to_one_assignment` solves this pair (``matcher.lap``).

        Raises:
            ValueError: ``lap=dense`` and the dense cost would exceed ``lap_max_gb``.
        """
        if self.cfg.lap == "candidates":
            return "candidates"
        n_a, n_b = int(self.alive(ctx, hook_a).sum()), int(self.alive(ctx, hook_b).sum())
        gb = n_a * n_b * 8 / 1e9
        if gb <= self.cfg.lap_max_gb:
            return "dense"
        if self.cfg.lap == "dense":
            raise ValueError(
                f"matcher.lap=dense needs a {n_a} x {n_b} float64 cost matrix ({gb:.1f} GB) for {hook_a} -> "
                f"{hook_b}, over matcher.lap_max_gb={self.cfg.lap_max_gb:g}: raise matcher.lap_max_gb or set "
                f"matcher.lap=candidates"
            )
        log.warning("sae_match %s -> %s: the dense cost (%d x %d, %.1f GB) exceeds matcher.lap_max_gb=%g; "
                    "solving over %d candidates per feature (matcher.lap=candidates)",
                    hook_a, hook_b, n_a, n_b, gb, self.cfg.lap_max_gb, self.cfg.n_candidates)
        return "candidates"

    def dense_cost(self, ctx: MatchContext, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor, Tensor]:
        """The full cost between the alive features, built ``chunk_size`` rows at a time.

        Returns:
            ``(cost [n_a, n_b] float64 on the CPU, rows [n_a], cols [n_b])``: ``cost[i, j]``
            is the (matmul-form) cost of A's feature ``rows[i]`` and B's ``cols[j]``.
        """
        va, vb = self._pair_vectors(ctx, hook_a, hook_b)
        rows = self.alive(ctx, hook_a).nonzero().flatten()
        cols = self.alive(ctx, hook_b).nonzero().flatten()
        cost_rows = self._cost_rows(va[rows.to(va.device)], vb[cols.to(vb.device)])
        out = torch.empty(len(rows), len(cols), dtype=torch.float64)
        for start in range(0, len(rows), self.cfg.chunk_size):
            stop = min(start + self.cfg.chunk_size, len(rows))
            out[start:stop] = cost_rows(start, stop).to("cpu", torch.float64)
        return out, rows, cols

    def one_to_one_assignment(
        self, ctx: MatchContext, hook_a: str, hook_b: str, cost: Tensor, index: Tensor
    ) -> tuple[Tensor, Tensor, dict]:
        """The sparse LAP over the candidates (``lap=candidates``), or the dense LAP over all
        pairs of alive features (``lap=dense``; module docstring)."""
        lap = self.lap_for(ctx, hook_a, hook_b)
        if lap == "candidates":
            feature_b, distance, extras = super().one_to_one_assignment(ctx, hook_a, hook_b, cost, index)
            return feature_b, distance, {**extras, "lap": lap}
        dense, rows, cols = self.dense_cost(ctx, hook_a, hook_b)
        sub = linear_assignment_dense(dense)
        del dense
        feature_b = torch.full((index.shape[0],), -1, dtype=torch.long)
        ok = sub >= 0
        feature_b[rows[ok]] = cols[sub[ok]]
        distance, found = candidate_costs(cost, index, feature_b)
        beyond = ((feature_b >= 0) & ~found).nonzero().flatten()
        if len(beyond):  # the exact cost of partners outside the candidates, as rerank_exact computes it
            distance[beyond] = self.pair_costs(ctx, hook_a, hook_b, beyond, feature_b[beyond]).to(distance.dtype)
        return feature_b, distance, {"lap": lap, "n_beyond_candidates": int(len(beyond))}

    # ------------------------------------------------------------------ long range
    def route(self, ctx: MatchContext, hook_a: str, hook_b: str) -> list[str]:
        """``[hook_a, *intermediate hooks, hook_b]``: the hops that ``compose`` matches through."""
        if self.cfg.long_range == "direct":
            return [hook_a, hook_b]
        try:
            hook_layer(hook_a), hook_layer(hook_b)
        except ValueError:
            # no layer order: nothing lies "between"; the match is direct
            log.warning("sae_match: %s or %s has no 'blocks.<layer>.'; matching directly", hook_a, hook_b)
            return [hook_a, hook_b]
        pool = self.cfg.chain if self.cfg.chain is not None else list(ctx.saes)
        return [hook_a, *hooks_between(pool, hook_a, hook_b), hook_b]

    def match(self, ctx: MatchContext, hook_a: str, hook_b: str) -> MatchResult:
        """Direct match, or (``long_range=compose``) the composition of the adjacent matches.

        Composed result: ``feature_b`` is the composed map; ``matched`` holds only if
        every hop is matched; ``margin`` is the smallest margin along the path (the
        weakest hop; NaN if a hop is unassigned); ``distance`` is the direct A-B cost of
        the composed pair (:meth:`pair_costs`); ``null_threshold`` is NaN because the
        no-match decision was taken per hop (thresholds in ``extras['hop_null_thresholds']``).
        """
        hops = self.route(ctx, hook_a, hook_b)
        if len(hops) == 2:
            return super().match(ctx, hook_a, hook_b)
        results = [super(SAEMatch, self).match(ctx, x, y) for x, y in zip(hops[:-1], hops[1:])]
        n_a = results[0].n_features
        cur = torch.arange(n_a)
        matched = torch.ones(n_a, dtype=torch.bool)
        margin = torch.full((n_a,), float("inf"), dtype=torch.float64)
        for r in results:
            valid = cur >= 0
            idx = cur.clamp_min(0)
            matched &= valid & r.matched[idx]
            margin = torch.where(valid, torch.minimum(margin, r.margin[idx].double()), torch.nan)
            cur = torch.where(valid, r.feature_b[idx], torch.full_like(cur, -1))
        feature_b = compose_matches(*[r.feature_b for r in results])
        distance = torch.full((n_a,), float("inf"), dtype=torch.float64)
        assigned = (feature_b >= 0).nonzero().flatten()
        if len(assigned):
            distance[assigned] = self.pair_costs(ctx, hook_a, hook_b, assigned, feature_b[assigned]).double()
        matched &= torch.isfinite(distance)
        return MatchResult(
            hook_a=hook_a,
            hook_b=hook_b,
            matcher=self.name,
            feature_b=feature_b,
            distance=distance,
            margin=margin,
            matched=matched,
            null_threshold=float("nan"),
            extras={
                "long_range": "compose",
                "route": hops,
                "hop_null_thresholds": [r.null_threshold for r in results],
                "hop_matched_fraction": [float(r.matched.float().mean()) for r in results],
                "hop_n_forced": [r.extras.get("n_forced") for r in results],
                "hop_lap": [r.extras.get("lap") for r in results],
            },
        )
