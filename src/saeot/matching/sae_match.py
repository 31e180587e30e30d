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
default assignment is one-to-one (``hungarian``, a sparse LAP over the candidates).

Long-range pairs (A and B not adjacent): ``long_range="direct"`` matches A to B
directly; ``long_range="compose"`` (the paper) matches each adjacent pair on the way
(the hooks of ``chain``, or of ``ctx.saes``, strictly between A and B in layer order)
and composes the one-to-one maps (:func:`saeot.matching.assignment.compose_matches`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.dtypes import resolve_dtype
from saeot.hooks import hook_layer, hooks_between
from saeot.matching.assignment import compose_matches
from saeot.matching.base import MatchContext, Matcher, MatcherConfig
from saeot.matching.candidates import chunked_candidates
from saeot.saes import encoder_bias, fold_threshold
from saeot.types import MatchResult

log = logging.getLogger(__name__)

__all__ = ["SAEMatch", "SAEMatchConfig", "rerank_exact"]


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
@dataclass
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
        self.chain = list(self.chain) if self.chain is not None else None


class SAEMatch(Matcher):
    """SAE Match: squared distance between folded SAE parameters, one-to-one assignment.
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

    # ------------------------------------------------------------------ Matcher API
    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        va, vb = self._pair_vectors(ctx, hook_a, hook_b)
        na, nb = va.pow(2).sum(1), vb.pow(2).sum(1)
        vbT = vb.T.contiguous()

        def rows(start: int, stop: int) -> Tensor:
            cost = na[start:stop, None] + nb[None, :] - 2.0 * (va[start:stop] @ vbT)
            return cost.clamp_min_(0.0)

        cost, index = chunked_candidates(
            rows, va.shape[0], k, self.cfg.chunk_size, self.alive(ctx, hook_a), self.alive(ctx, hook_b)
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
            },
        )
