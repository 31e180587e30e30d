"""Streaming statistics over a token stream that merge exactly across shards.

:class:`CorrelationAccumulator`: the Pearson correlation of two SAEs' activations on the
same tokens. Its state merges exactly across shards (DDP ranks), so any split of the
token stream gives the same answer.
Streaming statistics (Chan, Golub & LeVeque's pairwise update), all float64:

    n,  mean_a [F_a],  mean_b [F_b],
    M2_a [F_a] = sum_t (a_t - mean_a)^2,   M2_b [F_b] likewise,
    C   [F_a, F_b] = sum_t (a_t - mean_a)(b_t - mean_b)^T     (centred co-moment).

A batch (or another accumulator) with statistics ``(n', mean', M2', C')`` merges as

    N = n + n',  delta_a = mean_a' - mean_a,  delta_b = mean_b' - mean_b,
    mean_a += delta_a n' / N,       M2_a += M2_a' + delta_a^2 n n' / N,
    C      += C' + outer(delta_a, delta_b) n n' / N,

and the batch's own statistics are computed centred on the batch mean, so no large
raw sums of squares are ever subtracted (the naive ``sum ab - n mean_a mean_b`` form
loses all precision for features with a large mean and a small variance). Then

    corr[i, j] = C[i, j] / sqrt(M2_a[i] M2_b[j]),

set to 0 where either feature is constant (``M2 <= (1e-12 * |mean|)^2 * n``, which
includes features that never fired). Memory: ``F_a * F_b`` float64 (2 GiB for
16k x 16k features).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["CorrelationAccumulator"]

_STATE_KEYS = ("n", "mean_a", "mean_b", "m2_a", "m2_b", "comoment", "n_fire_a", "n_fire_b")


class CorrelationAccumulator:
    """Streaming Pearson correlation ``[F_a, F_b]`` between two sets of features on shared tokens.

    Args:
        n_a, n_b: number of features of A and B.
        device: where the state lives (float64 matmuls run there).
        fire_threshold: a feature "fires" on a token where its activation exceeds this.
    """

    def __init__(
        self, n_a: int, n_b: int, device: torch.device | str = "cpu", fire_threshold: float = 0.0
    ) -> None:
        self.n_a, self.n_b = int(n_a), int(n_b)
        self.device = torch.device(device)
        self.fire_threshold = float(fire_threshold)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.mean_a = torch.zeros(self.n_a, **f64)
        self.mean_b = torch.zeros(self.n_b, **f64)
        self.m2_a = torch.zeros(self.n_a, **f64)
        self.m2_b = torch.zeros(self.n_b, **f64)
        self.comoment = torch.zeros(self.n_a, self.n_b, **f64)
        self.n_fire_a = torch.zeros(self.n_a, dtype=torch.long, device=self.device)
        self.n_fire_b = torch.zeros(self.n_b, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ streaming
    @property
    def shape(self) -> tuple[int, int]:
        """``(F_a, F_b)``, the shape of :meth:`correlation`."""
        return (self.n_a, self.n_b)

    @torch.no_grad()
    def update(self, acts_a: Tensor, acts_b: Tensor) -> "CorrelationAccumulator":
        """Add ``N`` tokens: ``acts_a [N, F_a]`` and ``acts_b [N, F_b]`` of the same tokens, in order."""
        if acts_a.dim() != 2 or acts_b.dim() != 2:
            raise ValueError(f"acts must be [N, F]; got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}")
        if acts_a.shape[0] != acts_b.shape[0]:
            raise ValueError(f"acts_a has {acts_a.shape[0]} tokens, acts_b has {acts_b.shape[0]}; they must match")
        if acts_a.shape[1] != self.n_a or acts_b.shape[1] != self.n_b:
            raise ValueError(
                f"expected [N, {self.n_a}] and [N, {self.n_b}], got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}"
            )
        n = acts_a.shape[0]
        if n == 0:
            return self
        a = acts_a.detach().to(self.device, torch.float64)
        b = acts_b.detach().to(self.device, torch.float64)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("CorrelationAccumulator.update: activations contain NaN or inf")
        mean_a, mean_b = a.mean(0), b.mean(0)
        xa, xb = a - mean_a, b - mean_b
        self._merge_stats(
            n,
            mean_a,
            mean_b,
            xa.pow(2).sum(0),
            xb.pow(2).sum(0),
            xa.T @ xb,
            (acts_a.detach() > self.fire_threshold).sum(0).to(self.device),
            (acts_b.detach() > self.fire_threshold).sum(0).to(self.device),
        )
        return self

    def _merge_stats(
        self, n: int, mean_a: Tensor, mean_b: Tensor, m2_a: Tensor, m2_b: Tensor, com: Tensor,
        fire_a: Tensor, fire_b: Tensor,
    ) -> None:
        n0 = self.n
        total = n0 + n
        if n == 0:
            return
        delta_a, delta_b = mean_a - self.mean_a, mean_b - self.mean_b
        w = n0 * n / total
        self.mean_a += delta_a * (n / total)
        self.mean_b += delta_b * (n / total)
        self.m2_a += m2_a + delta_a.pow(2) * w
        self.m2_b += m2_b + delta_b.pow(2) * w
        self.comoment += com
        self.comoment.addr_(delta_a, delta_b, alpha=w)
        self.n_fire_a += fire_a.long()
        self.n_fire_b += fire_b.long()
        self.n = total

    @torch.no_grad()
    def merge(self, other: "CorrelationAccumulator") -> "CorrelationAccumulator":
        """Add another accumulator's tokens (e.g. another DDP rank's shard); exact up to rounding."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge correlation accumulators of shapes {self.shape} and {other.shape}")
        to = lambda t: t.to(self.device)  # noqa: E731
        self._merge_stats(
            other.n, to(other.mean_a), to(other.mean_b), to(other.m2_a), to(other.m2_b),
            to(other.comoment), to(other.n_fire_a), to(other.n_fire_b),
        )
        return self

    # ------------------------------------------------------------------ results
    @property
    def fired_a(self) -> Tensor:
        """``[F_a]`` bool: features of A that fired on at least one token."""
        return self.n_fire_a > 0

    @property
    def fired_b(self) -> Tensor:
        """``[F_b]`` bool: features of B that fired on at least one token."""
        return self.n_fire_b > 0

    def _constant(self, mean: Tensor, m2: Tensor) -> Tensor:
        return m2 <= (1e-12 * mean.abs()).pow(2) * max(self.n, 1)

    @property
    def constant_a(self) -> Tensor:
        """``[F_a]`` bool: features of A with (numerically) zero variance; their correlations are 0."""
        return self._constant(self.mean_a, self.m2_a)

    @property
    def constant_b(self) -> Tensor:
        """``[F_b]`` bool: features of B with zero variance."""
        return self._constant(self.mean_b, self.m2_b)

    @torch.no_grad()
    def correlation(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[F_a, F_b]`` Pearson correlation in ``[-1, 1]``; 0 where either feature is constant."""
        if self.n < 2:
            return torch.zeros(self.n_a, self.n_b, dtype=dtype, device=self.device)
        sd_a = self.m2_a.clamp_min(0).sqrt()
        sd_b = self.m2_b.clamp_min(0).sqrt()
        ok_a, ok_b = ~self.constant_a, ~self.constant_b
        inv_a = torch.where(ok_a, 1.0 / sd_a.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sd_a))
        inv_b = torch.where(ok_b, 1.0 / sd_b.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sd_b))
        corr = self.comoment * inv_a[:, None] * inv_b[None, :]
        return corr.clamp_(-1.0, 1.0).to(dtype)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (and ``n``), e.g. for ``torch.save`` or gathering across ranks."""
        state = {k: getattr(self, k) for k in _STATE_KEYS if k != "n"}
        state["n"] = torch.tensor(self.n, dtype=torch.long)
        state["fire_threshold"] = torch.tensor(self.fire_threshold, dtype=torch.float64)
        return {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> "CorrelationAccumulator":
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"correlation state is missing {missing}")
        if tuple(state["comoment"].shape) != self.shape:
            raise ValueError(f"correlation state has shape {tuple(state['comoment'].shape)}, expected {self.shape}")
        self.n = int(state["n"])
        for k in _STATE_KEYS:
            if k == "n":
                continue
            ref = getattr(self, k)
            setattr(self, k, state[k].to(device=self.device, dtype=ref.dtype).clone())
        if "fire_threshold" in state:
            self.fire_threshold = float(state["fire_threshold"])
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "CorrelationAccumulator":
        n_a, n_b = state["comoment"].shape
        return cls(n_a, n_b, device=device).load_state_dict(state)
