r"""Equal coverage, step 2: substitution EV, ΔCE and co-activation correlation as a
function of the fraction of A matched, accumulated for every coverage level in the one
streaming pass.

For a run's full one-to-one assignment ranked by its own cost
(:class:`~saeot.evaluation.functional._coverage.RankedPairs`) and a grid of coverage
levels ``f`` (``functional.coverage_grid``), level ``f`` keeps the best
``n_f = round(f F_a)`` pairs: as if the matcher's threshold were swept until that many
features of A are matched. Every matcher is thereby compared at the same coverage.
Per level and batch:

* **substitution** (SAE Match Eq. 5 with the partial permutation of the first ``n_f``
  pairs, folded codes as in :mod:`saeot.evaluation.functional._substitution`): one decode
  of the masked codes, its squared error against ``h^B`` (EV) and, when
  ``functional.coverage_ce``, the model run on from hook B (ΔCE; one forward from B per
  level and batch: the expensive part, so levels with equal ``n_f`` are computed once);
* **co-activation**: one :class:`CoactivationAccumulator` over all ranked pairs; the
  curve at ``f`` is the mean Pearson correlation (and precision / recall) over the
  first ``n_f`` pairs where it is defined -- no extra cost per level;
* **deactivation** (``functional.coverage_deactivation`` pairs spread over the ranking,
  :mod:`saeot.evaluation.functional._deactivation`): the mean relative drop of j when i is
  removed at A, and the share of pairs where j loses at least half, over the sampled pairs
  among the first ``n_f``.

The area under each curve (``auc``) is the trapezoid area over the actual fractions
(the same grid for every matcher, so areas compare directly; ΔCE: lower is better).
The ``full`` entry is the last level (``f = 1``: the complete assignment, Eq. 5's
protocol). With ``functional.bootstrap`` replicates, every sum above is also kept per
context (row of a batch) and each area gets a 95% interval from a bootstrap over the
contexts, the same replicate weights for every run and layer pair
(:mod:`saeot.evaluation.functional._bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saeot.evaluation.functional._areas import CURVE_METRICS, curve_auc
from saeot.evaluation.functional._batch import PassBatch, PassTotals
from saeot.evaluation.functional._bootstrap import CurveSums, bootstrap_result
from saeot.evaluation.functional._coactivation import CoactivationAccumulator
from saeot.evaluation.functional._coverage import RankedPairs
from saeot.evaluation.functional._deactivation import DeactivationAccumulator, pair_geometry, sample_ranks, why_summary
from saeot.evaluation.functional._substitution import code_ratio, substitute_codes
from saeot.hooks import hook_layer
from saeot.saes.codes import decode

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["CURVE_METRICS", "curve_auc", "PairCurve", "CoverageCurves"]

class PairCurve:
    """The curves of one layer pair of one run (module docstring)."""

    def __init__(self, ranked: RankedPairs, sae_a: SAE, sae_b: SAE, grid: Sequence[float], code_scale: str,
                 with_ce: bool, deactivation: int = 0, bootstrap: int = 0, bootstrap_seed: int = 0) -> None:
        self.rp, self.sae_b, self.with_ce = ranked, sae_b, with_ce
        self.bootstrap, self.bootstrap_seed = int(bootstrap), int(bootstrap_seed)
        per_context = self.bootstrap > 0
        self._ctx_sse: list[Tensor] = []  # [B, levels] per batch (per_context)
        self._ctx_ce: list[Tensor] = []
        self.sums: CurveSums | None = None  # the per-context sums, after finish() (per_context)
        self.grid = [float(f) for f in grid]
        self.n = [ranked.n_at(f) for f in self.grid]
        self.levels = sorted(set(self.n))  # distinct pair counts: each computed once
        rank_of_b = torch.full((ranked.n_features_b,), ranked.n_pairs, dtype=torch.long)
        rank_of_b[ranked.feature_b] = torch.arange(ranked.n_pairs)
        self.col_masks = {n: (rank_of_b < n).float() for n in self.levels}  # [F_b] per level
        self.ratio = code_ratio(sae_a, sae_b, ranked.feature_a, ranked.feature_b, code_scale)
        self.sse = {n: 0.0 for n in self.levels}
        self.ce_sum = {n: 0.0 for n in self.levels}
        self.coact = CoactivationAccumulator(ranked.n_pairs, per_context=per_context)
        self.deact_ranks = sample_ranks(ranked.n_pairs, deactivation)
        self.deact = (DeactivationAccumulator(sae_a, sae_b, ranked.feature_a[self.deact_ranks],
                                              ranked.feature_b[self.deact_ranks], per_context=per_context)
                      if len(self.deact_ranks) else None)
        self._result: dict | None = None

    @torch.no_grad()
    def update(self, b: PassBatch) -> None:
        rp = self.rp
        ca, cb = b.codes[rp.hook_a], b.codes[rp.hook_b]
        dev = ca.device
        fa, fb = rp.feature_a.to(dev), rp.feature_b.to(dev)
        sub = substitute_codes(ca, fa, fb, self.ratio, rp.n_features_b)
        h_b = b.hidden[rp.hook_b]
        keep = b.mask[..., None]
        n_rows = b.tokens.shape[0]
        per_context = self.bootstrap > 0
        if per_context:  # this batch's rows, filled per level (by the callbacks, before the batch ends)
            self._ctx_sse.append(torch.zeros(n_rows, len(self.levels), dtype=torch.float64))
            self._ctx_ce.append(torch.zeros(n_rows, len(self.levels), dtype=torch.float64))
        for li, n in enumerate(self.levels):
            h_hat = decode(self.sae_b, sub * self.col_masks[n].to(dev))
            if self.with_ce and b.submit is not None:  # run stacked with the batch's other continuations
                b.submit(rp.hook_b, h_hat, lambda h_sub, ce, n=n, li=li: self._absorb(n, li, b, h_b, h_sub, ce))
                continue
            if self.with_ce:
                h_sub, ce = b.substituted(rp.hook_b, h_hat)
            else:
                h_sub, ce = torch.where(keep, h_hat.expand_as(h_b), h_b), None
            self._absorb(n, li, b, h_b, h_sub, ce)
        rows = b.mask.nonzero()[:, 0] if per_context else None  # the context of every evaluation token
        self.coact.update(ca[b.mask][:, fa], cb[b.mask][:, fb], rows, n_rows)
        if self.deact is not None and b.run_between is not None:
            self.deact.update(b.run_between, rp.hook_a, rp.hook_b, b.hidden[rp.hook_a], ca, cb, b.mask)
        elif self.deact is not None:
            self.deact.skip(n_rows)

    def _absorb(self, n: int, li: int, b: PassBatch, h_b: Tensor, h_sub: Tensor, ce: Tensor | None) -> None:
        """Level ``n``'s (index ``li``) squared error and, with ``ce``, cross-entropy of one batch; with
        ``functional.bootstrap`` the same sums per context (row) too, from the same squared errors."""
        sq = (h_b - h_sub).double().pow(2)
        self.sse[n] += float(sq[b.mask].sum())
        if ce is not None:
            self.ce_sum[n] += float(ce[b.ce_mask].double().sum())
        if self.bootstrap <= 0:
            return
        self._ctx_sse[-1][:, li] += torch.where(b.mask, sq.sum(-1), 0.0).sum(-1).cpu()
        if ce is not None:
            self._ctx_ce[-1][:, li] += torch.where(b.ce_mask, ce.double(), 0.0).sum(-1).cpu()

    def finish(self, t: PassTotals) -> dict:
        rp = self.rp
        sst = t.sst[rp.hook_b]
        pp = self.coact.per_pair()

        def prefix_mean(v: Tensor, n: int) -> float:
            x = v[:n]
            x = x[~x.isnan()]
            return float(x.mean()) if x.numel() else float("nan")

        frac = [n / max(rp.n_features_a, 1) for n in self.n]
        ev = [1.0 - self.sse[n] / sst if sst > 0 else float("nan") for n in self.n]
        dce = ([self.ce_sum[n] / max(t.n_ce, 1) - t.ce_clean for n in self.n] if self.with_ce
               else [float("nan")] * len(self.n))
        nan = [float("nan")] * len(self.n)
        deact, deact_ok = nan, nan
        deact_pairs: dict[str, list] = {}
        if self.deact is not None:
            dp = self.deact.per_pair()

            def sampled_mean(v: Tensor, n: int) -> float:
                x = v[self.deact_ranks < n]
                return float(x.mean()) if x.numel() else float("nan")

            deact = [sampled_mean(dp["change"], n) for n in self.n]
            deact_ok = [sampled_mean(dp["success"], n) for n in self.n]
            fa, fb = self.deact.fa, self.deact.fb
            geo = pair_geometry(self.deact.sae_a, self.deact.sae_b, fa, fb)
            deact_pairs = {"rank": self.deact_ranks.tolist(), "feature_a": fa.tolist(), "feature_b": fb.tolist(),
                           "j_clean": self.deact.clean.tolist(), "change": dp["change"].tolist(),
                           "success": dp["success"].tolist(), "corr": pp["corr"][self.deact_ranks].tolist(),
                           **{k: v.tolist() for k, v in geo.items()}}
        out = {
            "layer_a": hook_layer(rp.hook_a), "layer_b": hook_layer(rp.hook_b),
            "grid": self.grid, "fraction": frac, "n_pairs": self.n,
            "explained_variance": ev, "delta_ce": dce, "deactivation": deact, "deactivation_success": deact_ok,
            "n_deactivation_pairs": int(len(self.deact_ranks)),
            "corr": [prefix_mean(pp["corr"], n) for n in self.n],
            "precision": [prefix_mean(pp["precision"], n) for n in self.n],
            "recall": [prefix_mean(pp["recall"], n) for n in self.n],
            "n_pairs_total": rp.n_pairs, "n_forced": rp.n_forced, "n_features_a": rp.n_features_a,
            "assignment_seconds": rp.seconds,
        }
        if deact_pairs:  # per sampled pair, and where its successes are lost (full coverage: all sampled pairs)
            out["deactivation_pairs"] = deact_pairs
            out["deactivation_why"] = why_summary(deact_pairs)
        out["auc"] = {m: curve_auc(frac, out[m]) for m in CURVE_METRICS}
        out["full"] = {k: out[k][-1] for k in ("fraction", "n_pairs", *CURVE_METRICS)} if self.n else {}
        if self.bootstrap > 0:
            self.sums = self.context_sums(t, frac)
            out.update(bootstrap_result(self.sums, self.bootstrap, self.bootstrap_seed, t.contexts_digest))
        self._result = out
        return out

    def context_sums(self, t: PassTotals, fraction: list[float]) -> CurveSums:
        """The per-context sums of every curve (``functional.bootstrap`` > 0), aligned with ``t``'s contexts."""
        if t.context_sst is None or t.context_ce_clean is None or t.context_n_ce is None:
            raise ValueError("functional.bootstrap needs the pass's per-context totals (PassTotals.context_*)")
        at = [self.levels.index(n) for n in self.n]  # grid point -> its distinct level
        sse, ce = (torch.cat(v)[:, at] for v in (self._ctx_sse, self._ctx_ce))
        sst = t.context_sst[self.rp.hook_b]
        clean, ablated = self.deact.context_sums() if self.deact is not None else (None, None)
        sums = CurveSums(fraction=fraction, n=self.n, sse=sse, sst=sst, ce_sum=ce if self.with_ce else None,
                         ce_clean=t.context_ce_clean, n_ce=t.context_n_ce, moments=self.coact.context_moments(),
                         deact_clean=clean, deact_ablated=ablated,
                         deact_ranks=self.deact_ranks if self.deact is not None else None)
        rows = {len(x) for x in (sst, t.context_n_ce, sse, sums.moments["n"], *([] if clean is None else [clean]))}
        if len(rows) != 1:
            raise RuntimeError(f"per-context sums of {self.rp.key} disagree on the number of contexts: {sorted(rows)}")
        return sums

    @property
    def result(self) -> dict:
        if self._result is None:
            raise RuntimeError("PairCurve.result before finish()")
        return self._result


class CoverageCurves:
    """A :class:`~saeot.evaluation.functional._batch.PassConsumer`: the curves of every layer
    pair of one run."""

    def __init__(self, ranked: Sequence[RankedPairs], saes: dict[str, Any], grid: Sequence[float],
                 code_scale: str = "fold", with_ce: bool = True, deactivation: int = 0, bootstrap: int = 0,
                 bootstrap_seed: int = 0) -> None:
        if not grid:
            raise ValueError("functional.coverage_grid is empty")
        bad = [f for f in grid if not 0.0 <= float(f) <= 1.0]
        if bad:
            raise ValueError(f"functional.coverage_grid has {bad}: fractions of A must be in [0, 1]")
        if list(grid) != sorted(grid):
            raise ValueError(f"functional.coverage_grid={list(grid)} must be ascending")
        self.curves = {rp.key: PairCurve(rp, saes[rp.hook_a], saes[rp.hook_b], grid, code_scale, with_ce,
                                         deactivation, bootstrap, bootstrap_seed) for rp in ranked}
        self.hooks = tuple(sorted({h for rp in ranked for h in (rp.hook_a, rp.hook_b)}, key=hook_layer))
        self.hooks_b = tuple(sorted({rp.hook_b for rp in ranked}, key=hook_layer))

    def update(self, batch: PassBatch) -> None:
        for c in self.curves.values():
            c.update(batch)

    def finish(self, totals: PassTotals) -> None:
        for c in self.curves.values():
            c.finish(totals)

    def results(self) -> dict[str, dict]:
        """``"hook_a|hook_b" ->`` the pair's curves (see :meth:`PairCurve.finish`)."""
        return {k: c.result for k, c in self.curves.items()}
