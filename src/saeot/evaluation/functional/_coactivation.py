"""Co-activation of feature pairs on shared tokens, streamed: firing counts and moments
(optionally also per context, for the bootstrap over contexts:
:mod:`saeot.evaluation.functional._bootstrap`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MOMENTS", "CoactivationAccumulator", "pearson"]

#: the per-pair sums the correlation is computed from
MOMENTS = ("sx", "sy", "sxx", "syy", "sxy")


def pearson(n, sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
    """Pearson correlation from ``n`` tokens (a number, or a tensor broadcasting against the
    sums) and the sums of ``x, y, x^2, y^2, xy``; NaN where either side does not vary."""
    nan = torch.full_like(sx, math.nan)
    cov = sxy / n - (sx / n) * (sy / n)
    vx = (sxx / n - (sx / n) ** 2).clamp_min(0)
    vy = (syy / n - (sy / n) ** 2).clamp_min(0)
    ok = (vx > 1e-12 * (sxx / n).clamp_min(1e-30)) & (vy > 1e-12 * (syy / n).clamp_min(1e-30))
    return torch.where(ok, cov / (vx * vy).sqrt().clamp_min(1e-300), nan).clamp(-1, 1)


class CoactivationAccumulator:
    """Streaming firing counts and moments of ``M`` feature pairs ``(x_m, y_m)`` on shared tokens.

    With ``per_context``, :meth:`update` also keeps the moments of every context (row of the
    batch) apart: :meth:`context_moments` gives ``n [C]`` and ``sx .. sxy [C, M]`` (float64).
    The firing counts (precision / recall) are not kept per context: no bootstrapped metric
    reads them, and they would add three more ``[C, M]`` arrays.
    """

    def __init__(self, m: int, per_context: bool = False) -> None:
        self.n = 0
        z = lambda dt: torch.zeros(m, dtype=dt)  # noqa: E731
        self.n_a, self.n_b, self.n_ab = z(torch.long), z(torch.long), z(torch.long)
        self.sx, self.sy, self.sxx, self.syy, self.sxy = (z(torch.float64) for _ in range(5))
        self.per_context = per_context
        self._ctx: dict[str, list[Tensor]] = {k: [] for k in ("n", *MOMENTS)}

    def update(self, x: Tensor, y: Tensor, rows: Tensor | None = None, n_rows: int = 0) -> None:
        """``x, y [N, M]``: activations of the A and B feature of every pair on N tokens;
        ``rows [N]``: the context (row of the batch, ``< n_rows``) of each token (needed with
        ``per_context``)."""
        if self.per_context:
            if rows is None:
                raise ValueError("CoactivationAccumulator(per_context=True).update needs rows")
            xd, yd = x.double(), y.double()
            rows = rows.to(x.device)
            self._ctx["n"].append(torch.bincount(rows, minlength=n_rows).double().cpu())
            for k, v in zip(MOMENTS, (xd, yd, xd * xd, yd * yd, xd * yd)):
                self._ctx[k].append(v.new_zeros(n_rows, v.shape[1]).index_add_(0, rows, v).cpu())
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
        corr = pearson(max(self.n, 1), self.sx, self.sy, self.sxx, self.syy, self.sxy)
        return {"precision": prec, "recall": rec, "corr": corr}

    def context_moments(self) -> dict[str, Tensor]:
        """``n [C]`` tokens and ``sx, sy, sxx, syy, sxy [C, M]`` of every context seen (``per_context``)."""
        if not self.per_context:
            raise RuntimeError("CoactivationAccumulator.context_moments needs per_context=True")
        m = self.sx.numel()
        return {k: torch.cat(v) if v else torch.zeros((0,) if k == "n" else (0, m), dtype=torch.float64)
                for k, v in self._ctx.items()}

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

