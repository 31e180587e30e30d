"""Feature flow (arXiv 2502.03032): cosine similarity of decoder directions, nearest partner.

Feature ``i`` of A and ``j`` of B are compared by the directions they write into the
residual stream, the unit decoder rows ``d_i = W_dec_A[i] / ||W_dec_A[i]||``:

    C[i, j] = 1 - cos(W_dec_A[i], W_dec_B[j]) = 1 - d_i . e_j      in [0, 2].

The cost is invariant to any positive per-feature rescaling of either SAE, needs no
data, and is computed ``chunk_size`` rows of A at a time (memory O(chunk_size * F_b)).
The default assignment is ``nearest`` (top-1; many-to-one), as in the paper.
Features with an all-zero decoder row have no direction and are treated as dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.dtypes import resolve_dtype
from saeot.matching.base import MatchContext, Matcher, MatcherConfig
from saeot.matching.candidates import chunked_candidates

__all__ = ["FeatureFlow", "unit_decoder_rows"]


def unit_decoder_rows(sae, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``[d_sae, d_in]`` decoder rows scaled to unit norm (zero rows stay zero)."""
    W = sae.W_dec.detach().to(device=device, dtype=dtype)
    norm = W.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, W / norm.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(W))


@dataclass(frozen=True)
class FeatureFlowConfig(MatcherConfig):
    """Settings of :class:`FeatureFlow` (and the shared ones of :class:`MatcherConfig`).

    Attributes:
        chunk_size: rows of A per chunk of the dense cost.
        dtype: ``float32`` or ``float64``.
    """

    n_null: int = 4096
    chunk_size: int = 1024
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_dtype(self.dtype, "matcher.dtype", allowed=(torch.float32, torch.float64))
        if self.chunk_size < 1:
            raise ValueError(f"matcher.chunk_size must be >= 1, got {self.chunk_size}")


class FeatureFlow(Matcher):
    """Cosine distance between unit decoder rows. Settings: :class:`FeatureFlowConfig`."""

    name = "feature_flow"
    requires = frozenset({"saes"})
    config_class = FeatureFlowConfig

    def __init__(self, cfg: FeatureFlowConfig | None = None, **settings) -> None:
        super().__init__(cfg, **settings)
        self.dtype = resolve_dtype(self.cfg.dtype, "matcher.dtype")

    def _directions(self, ctx: MatchContext, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor]:
        d_a, d_b = int(ctx.saes[hook_a].cfg.d_in), int(ctx.saes[hook_b].cfg.d_in)
        if d_a != d_b:
            raise ValueError(
                f"feature_flow compares decoder directions, which needs equal d_in; "
                f"{hook_a} has {d_a}, {hook_b} has {d_b}"
            )
        return (
            unit_decoder_rows(ctx.saes[hook_a], ctx.device, self.dtype),
            unit_decoder_rows(ctx.saes[hook_b], ctx.device, self.dtype),
        )

    def alive(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[F]`` bool: features with a non-zero, finite decoder row."""
        W = ctx.saes[hook].W_dec.detach()
        return ((W.norm(dim=1) > 0) & torch.isfinite(W).all(dim=1)).cpu()

    def candidates(self, ctx: MatchContext, hook_a: str, hook_b: str, k: int) -> tuple[Tensor, Tensor]:
        ua, ub = self._directions(ctx, hook_a, hook_b)
        ubT = ub.T.contiguous()

        def rows(start: int, stop: int) -> Tensor:
            return (1.0 - ua[start:stop] @ ubT).clamp_(0.0, 2.0)

        return chunked_candidates(
            rows, ua.shape[0], k, self.cfg.chunk_size, self.alive(ctx, hook_a), self.alive(ctx, hook_b)
        )

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        ua, ub = self._directions(ctx, hook_a, hook_b)
        ia, ib = ia.long().to(ua.device), ib.long().to(ua.device)
        cost = (1.0 - (ua[ia] * ub[ib]).sum(1)).clamp(0.0, 2.0)
        ok = self.alive(ctx, hook_a).to(ua.device)[ia] & self.alive(ctx, hook_b).to(ua.device)[ib]
        return cost.masked_fill(~ok, float("inf")).cpu()
