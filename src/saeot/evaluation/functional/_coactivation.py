"""Co-activation of feature pairs on shared tokens, streamed: firing counts and moments."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CoactivationAccumulator"]


class CoactivationAccumulator:
    """Streaming firing counts and moments of ``M`` feature pairs ``(x_m, y_m)`` on shared tokens."""

    def __init__(self, m: int) -> None:
        self.n = 0
        z = lambda dt: torch.zeros(m, dtype=dt)  # noqa: E731
        self.n_a, self.n_b, self.n_ab = z(torch.long), z(torch.long), z(torch.long)
        self.sx, self.sy, self.sxx, self.syy, self.sxy = (z(torch.float64) for _ in range(5))

    def update(self, x: Tensor, y: Tensor) -> None:
        """``x, y [N, M]``: activations of the A and B feature of every pair on N tokens."""
        fa, fb = x > 0, y > 0
        self.n += x.shape[0]
        self.n_a += fa.sum(0).cpu()
        self.n_b += fb.sum(0).cpu()
        self.n_ab += (fa & fb).sum(0).cpu()
        x, y = x.double(), y.double()
        self.sx += x.sum(0).cpu()
        self.sy += y.sum(0).cpu()
        self.sxx += (x * x).sum(0).cpu()
        self.syy += (y * y).sum(0).cpu()
        self.sxy += (x * y).sum(0).cpu()

    def per_pair(self) -> dict[str, Tensor]:
        """``[M]`` precision / recall / corr, NaN where undefined."""
        nan = torch.full_like(self.sx, math.nan)
        prec = torch.where(self.n_a > 0, self.n_ab / self.n_a.clamp_min(1), nan)
        rec = torch.where(self.n_b > 0, self.n_ab / self.n_b.clamp_min(1), nan)
        n = max(self.n, 1)
        cov = self.sxy / n - (self.sx / n) * (self.sy / n)
        vx = (self.sxx / n - (self.sx / n) ** 2).clamp_min(0)
        vy = (self.syy / n - (self.sy / n) ** 2).clamp_min(0)
        ok = (vx > 1e-12 * (self.sxx / n).clamp_min(1e-30)) & (vy > 1e-12 * (self.syy / n).clamp_min(1e-30))
        corr = torch.where(ok, cov / (vx * vy).sqrt().clamp_min(1e-300), nan).clamp(-1, 1)
        return {"precision": prec, "recall": rec, "corr": corr}

    def summary(self) -> dict:
        pp = self.per_pair()

        def mean(t: Tensor) -> float:
            t = t[~t.isnan()]
            return float(t.mean()) if t.numel() else float("nan")

        def median(t: Tensor) -> float:
            t = t[~t.isnan()]
            return float(t.median()) if t.numel() else float("nan")

        return {
            "n_pairs": int(self.sx.numel()), "n_tokens": self.n,
            "precision": mean(pp["precision"]), "recall": mean(pp["recall"]),
            "corr": mean(pp["corr"]), "corr_median": median(pp["corr"]),
            "n_precision_defined": int((~pp["precision"].isnan()).sum()),
            "n_recall_defined": int((~pp["recall"].isnan()).sum()),
            "n_corr_defined": int((~pp["corr"].isnan()).sum()),
            "micro_precision": float(self.n_ab.sum() / self.n_a.sum()) if int(self.n_a.sum()) else float("nan"),
            "micro_recall": float(self.n_ab.sum() / self.n_b.sum()) if int(self.n_b.sum()) else float("nan"),
        }

