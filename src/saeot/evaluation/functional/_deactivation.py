r"""The causal deactivation test (feature flow, Laptev et al. 2025, Table 1), per ranked pair.

For a matched pair (i at layer A, j at layer B): on the evaluation tokens where feature i
fires, its contribution :math:`f_i(h^A_t)\, d_i` (decoder row ``d_i``) is removed from
:math:`h^A_t`, the model runs on from A to B (every position of the context, so the
removal also reaches later tokens through attention), and j's activation is read again
with B's SAE. Over the tokens where i fires,

.. math::
    \Delta_{ij} = 1 - \frac{\sum_t f_j(\tilde h^B_t)}{\sum_t f_j(h^B_t)}

is the relative drop of j (1: j switched off, 0: unchanged, negative: j grew); a pair whose
j is silent on all of i's tokens has :math:`\Delta = 0` (deactivating i cannot show j
depends on it). A pair *succeeds* when :math:`\Delta \ge` :data:`SUCCESS_DROP` (j loses at
least half of its activation). No matcher optimises this: it asks whether j is causally
downstream of i, which neither decoder geometry, co-firing nor sample distributions state.

It is measured for ``functional.coverage_deactivation`` pairs per layer pair, spread
evenly over the matcher's ranking, so the equal-coverage curves take the mean over the
sampled pairs among the best ``n_f`` (one forward from A to B per sampled pair and batch
where i fires, stacked). With ``per_context``, the two sums of every pair are also kept per
context (row of a batch), for the bootstrap over contexts
(:mod:`saeot.evaluation.functional._bootstrap`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.saes.codes import encode

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["SUCCESS_DROP", "DeactivationAccumulator", "relative_drop", "sample_ranks"]

#: a pair succeeds when deactivating i removes at least this fraction of j's activation on i's tokens
SUCCESS_DROP = 0.5


def sample_ranks(n_pairs: int, m: int) -> Tensor:
    """``[<= m]`` ranks spread evenly over ``0 .. n_pairs - 1`` (all of them when ``m >= n_pairs``)."""
    if n_pairs <= 0 or m <= 0:
        return torch.zeros(0, dtype=torch.long)
    if m >= n_pairs:
        return torch.arange(n_pairs)
    return torch.linspace(0, n_pairs - 1, m).round().long().unique()


class DeactivationAccumulator:
    """:math:`\\Delta_{ij}` of the pairs ``(feature_a[q], feature_b[q])`` accumulated over batches."""

    def __init__(self, sae_a: SAE, sae_b: SAE, feature_a: Tensor, feature_b: Tensor, stack_contexts: int = 64,
                 per_context: bool = False):
        self.sae_a, self.sae_b = sae_a, sae_b
        self.fa, self.fb = feature_a.long().cpu(), feature_b.long().cpu()
        self.clean = torch.zeros(len(self.fa), dtype=torch.float64)
        self.ablated = torch.zeros(len(self.fa), dtype=torch.float64)
        self.stack = int(stack_contexts)
        self.per_context = per_context
        self._ctx_clean: list[Tensor] = []  # [B, P] per batch
        self._ctx_ablated: list[Tensor] = []

    def skip(self, n_rows: int) -> None:
        """A batch of ``n_rows`` contexts not tested (zero sums), so the contexts stay aligned."""
        if self.per_context:
            self._ctx_clean.append(torch.zeros(n_rows, len(self.fa), dtype=torch.float64))
            self._ctx_ablated.append(torch.zeros(n_rows, len(self.fa), dtype=torch.float64))

    @torch.no_grad()
    def update(self, run_between, hook_a: str, hook_b: str, h_a: Tensor, codes_a: Tensor, codes_b: Tensor,
               mask: Tensor) -> None:
        """One batch: ``h_a [B, T, d]`` clean states at A, their codes at A and B, ``mask [B, T]``;
        ``run_between(hook_a, hook_b, h [n, T, d]) -> [n, T, d]`` runs the model from A to B."""
        dev = h_a.device
        w_dec = self.sae_a.W_dec.detach().float()
        self.skip(h_a.shape[0])  # this batch's per-context sums (filled below)
        jobs: list[tuple[int, Tensor, Tensor]] = []  # (pair, contexts, fire mask [c, T])
        for q, (i, j) in enumerate(zip(self.fa.tolist(), self.fb.tolist())):
            fire = (codes_a[..., i] > 0) & mask
            ctx = fire.any(dim=1).nonzero().flatten()
            if len(ctx):
                jobs.append((q, ctx, fire[ctx]))
        rows: list[Tensor] = []
        meta: list[tuple[int, Tensor, Tensor, int]] = []
        for q, ctx, fire in jobs:
            i = int(self.fa[q])
            a = torch.where(fire, codes_a[ctx, :, i], torch.zeros((), device=dev))
            rows.append(h_a[ctx] - a[..., None] * w_dec[i].to(dev))
            meta.append((q, ctx, fire, len(ctx)))
        start = 0
        while start < len(rows):  # stacks of about self.stack contexts
            end, n = start, 0
            while end < len(rows) and (n == 0 or n + meta[end][3] <= self.stack):
                n += meta[end][3]
                end += 1
            h_b = run_between(hook_a, hook_b, torch.cat(rows[start:end]))
            z = encode(self.sae_b, h_b)
            off = 0
            for q, ctx, fire, c in meta[start:end]:
                j = int(self.fb[q])
                self.clean[q] += float(codes_b[ctx, :, j][fire].double().sum())
                self.ablated[q] += float(z[off:off + c, :, j][fire].double().sum())
                if self.per_context:
                    at = ctx.cpu()  # (not `rows`: that is the list of stacked states the while loop walks)
                    self._ctx_clean[-1][at, q] += torch.where(fire, codes_b[ctx, :, j], 0.0).double().sum(-1).cpu()
                    self._ctx_ablated[-1][at, q] += torch.where(fire, z[off:off + c, :, j], 0.0).double().sum(-1).cpu()
                off += c
            start = end

    def context_sums(self) -> tuple[Tensor, Tensor]:
        """``clean, ablated [C, P]``: the two sums of every pair per context (``per_context``)."""
        if not self.per_context:
            raise RuntimeError("DeactivationAccumulator.context_sums needs per_context=True")
        p = len(self.fa)
        cat = lambda v: torch.cat(v) if v else torch.zeros(0, p, dtype=torch.float64)  # noqa: E731
        return cat(self._ctx_clean), cat(self._ctx_ablated)

    def per_pair(self) -> dict[str, Tensor]:
        """``change [P]`` (:math:`\\Delta`, 0 where j was silent on i's tokens) and ``success [P]`` (0/1)."""
        return relative_drop(self.clean, self.ablated)


def relative_drop(clean: Tensor, ablated: Tensor) -> dict[str, Tensor]:
    """``change`` (:math:`\\Delta`, 0 where ``clean`` is 0) and ``success`` (0/1) from the two sums
    (any shape, e.g. ``[R, P]`` under bootstrap weights)."""
    ok = clean > 0
    change = torch.where(ok, 1.0 - ablated / clean.clamp_min(1e-300), torch.zeros_like(clean))
    return {"change": change, "success": (change >= SUCCESS_DROP).double()}


@torch.no_grad()
def pair_geometry(sae_a: SAE, sae_b: SAE, feature_a: Tensor, feature_b: Tensor) -> dict[str, Tensor]:
    """The two first-order predictors of a pair's functional scores, ``[P]`` each:

    * ``transfer_cos``: cosine of A's decoder row ``d_i`` and B's encoder column ``e_j``, feature
      flow's score. Removing ``a_i d_i`` at A moves j's pre-activation by about
      ``-a_i e_j . J d_i`` (J the A-to-B Jacobian, near the identity over few blocks of a residual
      stream): the linear prediction of the deactivation test.
    * ``decoder_cos``: cosine of ``d_i`` and B's decoder row ``d_j`` (SAE Match's geometry): what
      substituting i's code into j's slot reconstructs.
    """
    fa, fb = feature_a.long().cpu(), feature_b.long().cpu()
    d_a = sae_a.W_dec.detach().float().cpu()[fa]
    e_b = sae_b.W_enc.detach().float().cpu()[:, fb].T
    d_b = sae_b.W_dec.detach().float().cpu()[fb]
    cos = torch.nn.functional.cosine_similarity
    return {"transfer_cos": cos(d_a, e_b, dim=1).double(), "decoder_cos": cos(d_a, d_b, dim=1).double()}


def why_summary(pairs: dict[str, list]) -> dict[str, float]:
    """Where a matcher's deactivation successes are lost, over its sampled pairs: ``silent`` (share
    of pairs whose j never fires on i's tokens: co-firing already fails), ``success_given_fires``
    (the success rate among the others: j fires but does not depend on i), and the mean
    ``transfer_cos`` / ``decoder_cos`` of the pairs (:func:`pair_geometry`)."""
    clean = torch.tensor(pairs["j_clean"], dtype=torch.float64)
    if not clean.numel():
        return {k: float("nan") for k in ("silent", "success_given_fires", "transfer_cos", "decoder_cos")}
    fires = clean > 0
    succ = torch.tensor(pairs["success"], dtype=torch.float64)
    return {"silent": float((~fires).double().mean()),
            "success_given_fires": float(succ[fires].mean()) if bool(fires.any()) else float("nan"),
            "transfer_cos": float(torch.tensor(pairs["transfer_cos"]).mean()),
            "decoder_cos": float(torch.tensor(pairs["decoder_cos"]).mean())}
