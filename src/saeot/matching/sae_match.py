"""SAE Match (seed 001, arXiv 2410.07656): data-free matching of folded SAE parameters.

Folding
-------
A JumpReLU SAE computes ``f_i(x) = p_i * 1[p_i > theta_i]`` with pre-activation
``p_i = (x - b_dec) . W_enc[:, i] + b_enc[i]`` and reconstructs
``x_hat = sum_i f_i(x) W_dec[i] + b_dec``. For any ``c_i > 0`` the transformation

    W_enc[:, i] -> c_i W_enc[:, i],  b_enc[i] -> c_i b_enc[i],  theta_i -> c_i theta_i,
    W_dec[i]    -> W_dec[i] / c_i

multiplies ``p_i`` and ``f_i`` by ``c_i``, leaves the firing pattern
``p_i > theta_i`` unchanged and so leaves the reconstruction unchanged: a feature's
parameters are only defined up to this per-feature scale. Folding picks the
representative with unit threshold, i.e. divides by the scale ``s_i = theta_i``:

    W_enc' = W_enc diag(1/s),   b_enc' = b_enc / s,   W_dec' = diag(s) W_dec,

after which the SAE is a JumpReLU with threshold ``theta / s = 1`` and the same
reconstruction, and the folded parameters are *invariant* to the transformation
above (``s`` transforms with the same ``c_i``). Comparing folded parameters is
therefore scale-invariant. :func:`fold_scale` generalises ``s`` to every
architecture: ``s`` must be a per-feature quantity that is multiplied by ``c_i``
under exactly the rescalings that leave that architecture's reconstruction unchanged.

* **JumpReLU** (``sae.threshold`` exists): ``s_i = theta_i`` (the paper). Features
  with ``theta_i <= 0`` behave as plain ReLU features and use the ReLU rule below
  (their folded threshold is then ``theta_i / s_i``, i.e. 0, not 1).
* **ReLU** (standard, gated) and **TopK with** ``rescale_acts_by_decoder_norm``: the
  same per-feature rescalings leave the reconstruction unchanged (ReLU is positively
  homogeneous; the TopK selection compares ``p_i ||W_dec[i]||``, which is invariant).
  There is no threshold, so ``s_i = 1 / ||W_dec[i]||`` (it is multiplied by ``c_i``):
  folding makes every decoder row unit-norm, exactly sae_lens' ``fold_W_dec_norm``.
  A feature with an all-zero decoder row is dead; it keeps ``s_i = 1``.
* **TopK / BatchTopK / AbsTopK without** ``rescale_acts_by_decoder_norm``: the top-k
  selection compares raw pre-activations across features, so only a *common* scale
  ``c`` (the same for all features) preserves the reconstruction. The matching scale
  is then one number, ``s = 1 / RMS_i ||W_dec[i]||``, shared by all features: folding
  stays exact (the folded SAE is the same TopK SAE) and is invariant to the common
  rescaling, without pretending to an invariance the architecture does not have.

:func:`fold_sae` builds the folded SAE (same class; threshold ``theta / s``), which
the tests use to check that folding leaves ``decode(encode(x))`` unchanged.

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

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from saeot.hooks import hook_layer, hooks_between
from saeot.matching.assignment import compose_matches
from saeot.matching.base import Matcher, MatchContext, topk_from_dense
from saeot.types import MatchResult

log = logging.getLogger(__name__)

__all__ = [
    "fold_scale",
    "fold_threshold",
    "fold_sae",
    "SAEMatch",
    "chunked_candidates",
    "rerank_exact",
]

_TOPK_FAMILY = ("topk", "batchtopk", "abstopk", "matryoshka_batchtopk")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------- folding
def _architecture(sae: Any) -> str:
    cfg = getattr(sae, "cfg", None)
    arch = getattr(cfg, "architecture", None)
    if callable(arch):
        return str(arch())
    return str(arch) if arch is not None else "unknown"


def _encoder_bias(sae: Any) -> Tensor:
    for name in ("b_enc", "b_gate"):  # gated SAEs: the gate bias decides firing
        bias = getattr(sae, name, None)
        if isinstance(bias, Tensor):
            return bias
    raise ValueError(f"cannot fold an SAE of architecture {_architecture(sae)!r}: it has no b_enc")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def fold_scale(sae: Any) -> Tensor:
    """``[d_sae]`` per-feature folding scale ``s`` (see the module docstring for the rules).

    JumpReLU: ``s = theta`` (``1/||W_dec[i]||`` where ``theta_i <= 0``); ReLU / gated /
    TopK with decoder-norm rescaling: ``s = 1/||W_dec[i]||``; other TopK variants: one
    shared ``s = 1/RMS(||W_dec[i]||)``. Features with a zero decoder row get ``s = 1``.
    """
    W_dec = sae.W_dec.detach()
    dtype = _compute_dtype(W_dec)
    dec_norm = W_dec.to(dtype).norm(dim=1)
    live = dec_norm > 0
    inv_norm = torch.where(live, 1.0 / dec_norm.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(dec_norm))
    threshold = getattr(sae, "threshold", None)
    if isinstance(threshold, Tensor):
        theta = threshold.detach().to(device=W_dec.device, dtype=dtype).expand_as(dec_norm)
        return torch.where(theta > 0, theta, inv_norm)
    arch = _architecture(sae)
    if arch in _TOPK_FAMILY and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rms = dec_norm[live].pow(2).mean().sqrt() if live.any() else dec_norm.new_tensor(1.0)
        return torch.full_like(dec_norm, float(1.0 / rms))
    return inv_norm


@torch.no_grad()
def fold_threshold(sae: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Folded parameters ``(W_enc' [d_in, d_sae], b_enc' [d_sae], W_dec' [d_sae, d_in])``.

    ``W_enc' = W_enc diag(1/s)``, ``b_enc' = b_enc / s``, ``W_dec' = diag(s) W_dec``
    with ``s = fold_scale(sae)``; for a JumpReLU SAE ``s = theta`` (SAE Match). Returned
    in float32 (float64 if the SAE is float64), on the SAE's device.
    """
    s = fold_scale(sae)
    dtype = s.dtype
    W_enc = sae.W_enc.detach().to(dtype) / s[None, :]
    b_enc = _encoder_bias(sae).detach().to(dtype) / s
    W_dec = sae.W_dec.detach().to(dtype) * s[:, None]
    return W_enc, b_enc, W_dec


@torch.no_grad()
def fold_sae(sae: Any) -> Any:
    """A copy of ``sae`` (same class and config) with folded weights and threshold ``theta / s``.

    Its ``decode(encode(x))`` equals the original's up to rounding: for JumpReLU the
    copy is a unit-threshold JumpReLU, for ReLU / TopK-with-rescaling it has unit-norm
    decoder rows, for other TopK it is the original up to one common scale.
    """
    s = fold_scale(sae)
    W_enc, _, W_dec = fold_threshold(sae)
    out = copy.deepcopy(sae)

    def _set(name: str, value: Tensor) -> None:
        param = getattr(out, name)
        param.data = value.to(device=param.device, dtype=param.dtype).reshape(param.shape)

    _set("W_enc", W_enc)
    _set("W_dec", W_dec)
    for name in ("b_enc", "b_gate", "b_mag"):
        bias = getattr(out, name, None)
        if isinstance(bias, Tensor):
            _set(name, bias.detach().to(s.dtype) / s)
    threshold = getattr(out, "threshold", None)
    if isinstance(threshold, Tensor):
        _set("threshold", threshold.detach().to(s.dtype).expand_as(s) / s)
    return out


# ---------------------------------------------------------------------------- chunked candidates
def chunked_candidates(
    cost_rows: Callable[[int, int], Tensor],
    n_a: int,
    k: int,
    chunk_size: int,
    alive_a: Tensor | None = None,
    alive_b: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``k`` cheapest partners of every row, computing the dense cost one chunk of rows at a time.

    Args:
        cost_rows: ``(start, stop) -> [stop - start, F_b]`` dense cost of rows ``start:stop``.
        n_a: number of rows (features of A).
        k: candidates kept per row.
        chunk_size: rows per chunk; peak memory O(chunk_size * F_b).
        alive_a: ``[F_a]`` bool; dead rows get no candidates (all ``inf`` / -1).
        alive_b: ``[F_b]`` bool; dead columns are never candidates.

    Returns:
        ``cost [F_a, k]`` ascending (``inf`` padding) and ``index [F_a, k]`` long (-1 padding).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    costs, indices = [], []
    for start in range(0, n_a, chunk_size):
        stop = min(start + chunk_size, n_a)
        cost = cost_rows(start, stop)
        if alive_a is not None:
            cost = cost.masked_fill(~alive_a[start:stop].to(cost.device)[:, None], float("inf"))
        c, i = topk_from_dense(cost, k, alive_b)
        costs.append(c)
        indices.append(i)
    if not costs:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(costs), torch.cat(indices)


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
class SAEMatch(Matcher):
    """SAE Match: squared distance between folded SAE parameters, one-to-one assignment.

    Args:
        assignment, n_candidates, null_quantile, n_null, min_margin, seed: see :class:`Matcher`
            (default assignment here is ``hungarian``, as in the paper).
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

    name = "sae_match"
    requires = frozenset({"saes"})

    def __init__(
        self,
        assignment: str = "hungarian",
        n_candidates: int = 32,
        null_quantile: float | None = None,
        null_alpha: float = 0.05,
        n_null: int = 4096,
        min_margin: float = 0.0,
        seed: int = 0,
        w_dec: float = 1.0,
        w_enc: float = 1.0,
        w_bias: float = 1.0,
        fold: bool = True,
        long_range: str = "compose",
        chain: Sequence[str] | None = None,
        chunk_size: int = 1024,
        dtype: str = "float32",
    ) -> None:
        super().__init__(
            assignment=assignment,
            n_candidates=n_candidates,
            null_quantile=null_quantile,
            null_alpha=null_alpha,
            n_null=n_null,
            min_margin=min_margin,
            seed=seed,
        )
        weights = (w_dec, w_enc, w_bias)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"matcher.w_dec/w_enc/w_bias must be >= 0 and not all 0, got {weights}")
        if long_range not in ("compose", "direct"):
            raise ValueError(f"matcher.long_range must be 'compose' or 'direct', got {long_range!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"matcher.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if chunk_size < 1:
            raise ValueError(f"matcher.chunk_size must be >= 1, got {chunk_size}")
        self.w_dec, self.w_enc, self.w_bias = float(w_dec), float(w_enc), float(w_bias)
        self.fold = fold
        self.long_range = long_range
        self.chain = list(chain) if chain is not None else None
        self.chunk_size = chunk_size
        self.dtype = _DTYPES[dtype]

    # ------------------------------------------------------------------ features as vectors
    def feature_vectors(self, ctx: MatchContext, hook: str) -> Tensor:
        """``[d_sae, 2 d_in + 1]`` the weighted folded parameters ``v_i`` of every feature, on ``ctx.device``."""
        sae = ctx.saes[hook]
        if self.fold:
            W_enc, b_enc, W_dec = fold_threshold(sae)
        else:
            W_enc, b_enc, W_dec = sae.W_enc.detach(), _encoder_bias(sae).detach(), sae.W_dec.detach()
        parts = []
        if self.w_dec > 0:
            parts.append(math.sqrt(self.w_dec) * W_dec.to(ctx.device, self.dtype))
        if self.w_enc > 0:
            parts.append(math.sqrt(self.w_enc) * W_enc.to(ctx.device, self.dtype).T)
        if self.w_bias > 0:
            parts.append(math.sqrt(self.w_bias) * b_enc.to(ctx.device, self.dtype)[:, None])
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
            rows, va.shape[0], k, self.chunk_size, self.alive(ctx, hook_a), self.alive(ctx, hook_b)
        )
        return rerank_exact(va, vb, cost, index)

    def pair_costs(self, ctx: MatchContext, hook_a: str, hook_b: str, ia: Tensor, ib: Tensor) -> Tensor:
        va, vb = self._pair_vectors(ctx, hook_a, hook_b)
        ia, ib = ia.long().to(va.device), ib.long().to(va.device)
        out = torch.empty(ia.shape[0], dtype=va.dtype, device=va.device)
        step = max(1, self.chunk_size * 4)
        for start in range(0, ia.shape[0], step):
            sl = slice(start, start + step)
            out[sl] = (va[ia[sl]] - vb[ib[sl]]).pow(2).sum(1)
        ok = self.alive(ctx, hook_a).to(va.device)[ia] & self.alive(ctx, hook_b).to(va.device)[ib]
        return out.masked_fill(~ok, float("inf")).cpu()

    # ------------------------------------------------------------------ long range
    def route(self, ctx: MatchContext, hook_a: str, hook_b: str) -> list[str]:
        """``[hook_a, *intermediate hooks, hook_b]``: the hops that ``compose`` matches through."""
        if self.long_range == "direct":
            return [hook_a, hook_b]
        try:
            hook_layer(hook_a), hook_layer(hook_b)
        except ValueError:
            # no layer order: nothing lies "between"; the match is direct
            log.warning("sae_match: %s or %s has no 'blocks.<layer>.'; matching directly", hook_a, hook_b)
            return [hook_a, hook_b]
        pool = self.chain if self.chain is not None else list(ctx.saes)
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
