r"""Equal coverage: confidence intervals of the areas under the curves, from a bootstrap
over the evaluation contexts, paired across matchers.

**Unit: one context** (one row of a batch of the streaming pass, ``PassBatch.tokens[b]``),
not one token. The tokens of a context are not independent draws: they share one stretch
of text, and every position attends to the earlier ones (a substitution that goes wrong
early raises the CE of the positions after it), so resampling tokens would understate the
spread. Contexts, packed from successive stretches of the text, are the closest thing to
independent draws the pass has.

**Replicates.** With ``C`` contexts and ``R`` = ``functional.bootstrap`` replicates, the
weights ``W [R, C]`` are the counts of ``C`` draws with replacement from the ``C`` contexts
(:func:`replicate_weights`, seeded by ``functional.bootstrap_seed`` and ``C`` only). Every
point of a curve is a ratio of sums over contexts (EV: squared error over ``sst``, whose
mean is the one fixed before the pass; ΔCE: CE sums over CE positions; correlation: the
pairs' moments; deactivation: the two sums of j), so replicate r's sums are
``W[r] @ per_context`` and its curves and areas follow as for the point estimate
(:class:`CurveSums`; with ``W`` all ones they are the point estimate).

**Paired.** All runs of one streaming pass see the same contexts in the same order, and
``W`` depends only on the seed and ``C``: replicate r reweights the same contexts for every
run and layer pair. The difference of two matchers' areas is therefore formed replicate by
replicate (:func:`paired_difference`), which cancels the variation they share (contexts
that are easy for every matcher). Rows of different passes pair only when their contexts
are the same tokens (``contexts_digest``).

The interval is the 2.5 / 97.5 percentile of the replicates; NaN replicates (e.g. no pair
with a defined correlation) are left out, and more than half NaN gives a NaN interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saeot.evaluation.functional._areas import CURVE_METRICS, curve_auc
from saeot.evaluation.functional._coactivation import MOMENTS, pearson
from saeot.evaluation.functional._deactivation import relative_drop

__all__ = ["CI_LEVEL", "replicate_weights", "percentile_ci", "paired_difference", "CurveSums", "bootstrap_result"]

#: two-sided coverage of the intervals
CI_LEVEL = 0.95


def replicate_weights(n_contexts: int, n_replicates: int, seed: int) -> Tensor:
    """``[R, C]`` float64: row r counts how often each of the ``C`` contexts is drawn in ``C``
    draws with replacement (every row sums to ``C``). A function of ``(seed, C, R)`` only, so
    every run and layer pair of an evaluation gets the same weights."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(n_contexts))
    draws = torch.randint(n_contexts, (n_replicates, n_contexts), generator=g)
    return torch.zeros(n_replicates, n_contexts, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_replicates, n_contexts, dtype=torch.float64))


def percentile_ci(values: Sequence[float] | np.ndarray) -> list[float]:
    """``[lo, hi]``, the 2.5 / 97.5 percentiles of the finite ``values``; NaN when more than half are NaN."""
    v = np.asarray(values, dtype=float)
    ok = v[np.isfinite(v)]
    if not len(v) or 2 * len(ok) < len(v):
        return [math.nan, math.nan]
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(ok, [tail, 100 - tail])
    return [float(lo), float(hi)]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """The interval of ``a - b`` formed replicate by replicate (both from the same weights)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} replicates are not from the same weights")
    return percentile_ci(a - b)


@dataclass
class CurveSums:
    """The sums behind one layer pair's curves, per context (``C`` rows, in the pass's order).

    Attributes:
        fraction: ``[G]`` fractions of A matched (the x of the areas).
        n: ``[G]`` pairs kept at each grid point (best first).
        sse: ``[C, G]`` squared error of the substitution.
        sst: ``[C]`` ``sum ||h^B - mean||^2`` (mean fixed before the pass).
        ce_sum: ``[C, G]`` substituted CE summed over the CE positions (None: no ΔCE).
        ce_clean: ``[C]`` clean CE summed over the same positions; ``n_ce [C]`` their number.
        moments: ``n [C]`` tokens and ``sx .. sxy [C, M]`` of the ranked pairs (None: no correlation).
        deact_clean, deact_ablated: ``[C, P]`` j's activation on i's tokens, clean / with i removed
            (None: no deactivation test); ``deact_ranks [P]`` the ranks of the sampled pairs.
    """

    fraction: list[float]
    n: list[int]
    sse: Tensor
    sst: Tensor
    ce_sum: Tensor | None
    ce_clean: Tensor
    n_ce: Tensor
    moments: dict[str, Tensor] | None = None
    deact_clean: Tensor | None = None
    deact_ablated: Tensor | None = None
    deact_ranks: Tensor | None = None

    @property
    def n_contexts(self) -> int:
        return int(self.sst.numel())

    def curves(self, w: Tensor) -> dict[str, Tensor]:
        """metric -> ``[R, G]`` curves under the weights ``w [R, C]`` (``CURVE_METRICS`` and the
        formulas of :meth:`~saeot.evaluation.functional._curves.PairCurve.finish`)."""
        w = w.double()
        if w.shape[1] != self.n_contexts:
            raise ValueError(f"bootstrap weights for {w.shape[1]} contexts, the sums have {self.n_contexts}")
        r, g = w.shape[0], len(self.n)
        nan = torch.full((r, g), math.nan, dtype=torch.float64)
        sst = (w @ self.sst.double())[:, None]
        out = {"explained_variance": torch.where(sst > 0, 1.0 - (w @ self.sse.double()) / sst, nan), "delta_ce": nan}
        if self.ce_sum is not None:
            n_ce = (w @ self.n_ce.double()).clamp_min(1)[:, None]
            out["delta_ce"] = (w @ self.ce_sum.double()) / n_ce - (w @ self.ce_clean.double())[:, None] / n_ce
        out["corr"] = nan
        if self.moments is not None:
            m = {k: w @ v.double() for k, v in self.moments.items()}
            corr = pearson(m["n"].clamp_min(1)[:, None], *(m[k] for k in MOMENTS))  # [R, M]
            ok = ~corr.isnan()
            total = torch.cumsum(torch.where(ok, corr, 0.0), dim=1)
            count = torch.cumsum(ok.double(), dim=1)
            cols = []
            for k in self.n:  # mean over the first k pairs where the correlation is defined
                if k > 0 and corr.shape[1]:
                    c = count[:, k - 1]
                    cols.append(torch.where(c > 0, total[:, k - 1] / c.clamp_min(1), nan[:, 0]))
                else:
                    cols.append(nan[:, 0])
            out["corr"] = torch.stack(cols, dim=1)
        out["deactivation"] = out["deactivation_success"] = nan
        if self.deact_clean is not None and self.deact_ranks is not None and len(self.deact_ranks):
            dp = relative_drop(w @ self.deact_clean.double(), w @ self.deact_ablated.double())  # [R, P]
            for metric, key in (("deactivation", "change"), ("deactivation_success", "success")):
                cols = [dp[key][:, self.deact_ranks < k].mean(1) if bool((self.deact_ranks < k).any()) else nan[:, 0]
                        for k in self.n]
                out[metric] = torch.stack(cols, dim=1)
        return out

    def aucs(self, w: Tensor) -> dict[str, np.ndarray]:
        """metric -> ``[R]`` areas under the curves of :meth:`curves` (:func:`curve_auc` row by row)."""
        c = self.curves(w)
        return {m: np.array([curve_auc(self.fraction, row) for row in c[m].tolist()]) for m in CURVE_METRICS}


def bootstrap_result(sums: CurveSums, replicates: int, seed: int, contexts_digest: str | None) -> dict:
    """The entries a curve's result gets from the bootstrap: ``auc_boot`` metric -> ``[R]`` areas,
    ``auc_ci`` metric -> ``[lo, hi]``, and ``bootstrap`` (what the replicates were drawn from)."""
    boot = sums.aucs(replicate_weights(sums.n_contexts, replicates, seed))
    return {"auc_ci": {m: percentile_ci(v) for m, v in boot.items()},
            "auc_boot": {m: v.tolist() for m, v in boot.items()},
            "bootstrap": {"unit": "context", "n_contexts": sums.n_contexts, "replicates": int(replicates),
                          "seed": int(seed), "contexts_digest": contexts_digest}}
