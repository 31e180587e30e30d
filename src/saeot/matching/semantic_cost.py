r"""The cost semantic OT ranks candidates by, with its variants, and its exact k-nearest search.

With each feature's distribution in the reference space (weighted means ``m``, spreads
``s``) and :math:`W_2^2 = \|m_i - m_j\|^2 + W_2^2(\bar\mu_i, \bar\nu_j)` (mean gap plus
centred term), the cost of the pair (i, j) is

.. math::
    c_{ij} = \|m_i - m_j\|^2 + \omega\, W_2^2(\bar\mu_i, \bar\nu_j)
             - \tfrac{\lambda}{2}\,(S_i + S_j)
             + \gamma\, M\, (1 - \cos(\phi_A d_i, \phi_B d_j))

where, with ``token_weight`` :math:`\tau > 0`, :math:`W_2^2` is the *fused* transport cost with
ground cost :math:`\|x - y\|^2 + \tau M [t \ne t']` (``t``: the token occurrence each sample
was taken at, :class:`saeot.transport.LabelCost`): mass moved between samples of the same
occurrence pays only its distance, mass that changes occurrence pays :math:`\tau M` on top.
It is still an OT distance between the two weighted clouds (:math:`\tau = 0` is plain
:math:`W_2^2`); it sees whether two features fire on the *same tokens*, which the sampled
clouds alone cannot (``benchmarks/sample_agreement.py``: coupled samples' shared tokens agree
with activation correlation on 46% of the suite's features, W2 on them on 27%). Self-distances
stay plain :math:`W_2^2` (the two halves of a feature share no occurrence);

* ``centred_weight`` :math:`\omega` (1: plain :math:`W_2^2`; 0: the mean embedding;
  between: a shrunk centred term, which carries most of the finite-sample noise);
* ``debias`` :math:`\lambda`: :math:`S_i` is the :math:`W_2^2` between the two halves of
  feature i's own samples (alternate samples in the order of their weights; 0 for a feature
  with fewer samples than the layer's full K, :func:`self_distances`). Between two
  K-sample clouds in r dimensions the centred term is inflated by about the clouds'
  spreads, more for broad candidates than for tight ones whatever their shape;
  subtracting half of each self-distance removes that inflation (as the Sinkhorn
  divergence removes the entropic one). ``c`` may then be negative;
* ``decoder_weight`` :math:`\gamma`: the decoder rows ``d`` of both SAEs mapped into the
  reference space by its linear part (``phi(b + d) - phi(b)``), compared by cosine; ``M``
  is the median cost of random pairs without this term and without the token term, so
  ``gamma = 1`` weighs an orthogonal pair of decoders (and ``tau = 1`` a change of token) like
  a typical unrelated pair of distributions;
* ``normalize="mean"``: every feature's cloud is divided by the norm of its mean first
  (invariant to per-feature rescaling of the activations' scale in the reference space).

:func:`SemanticCost.nearest` is exact under the solver. With :class:`~saeot.transport.ExactW2`
and ``centred_weight = 1`` (the default cost, debiased) ``c`` is :math:`W_2^2` plus exact
per-pair terms, so the solver's own bound cascade (fidelity, Gelbrich, ...) prunes it,
shifted by those terms (:class:`~saeot.transport.CostOffset`). Otherwise
:math:`\|m_i - m_j\|^2 + \omega (s_i - s_j)^2 + \text{(the exact extra terms)}`
is a lower bound of ``c`` wherever :math:`(s_i - s_j)^2` bounds the solver's centred
term (mean + spread bound, :func:`saeot.transport.lower_bound_mean_spread`), so
candidates are visited in increasing bound order and the search of a row stops when the
next bound exceeds its k-th best cost (brute force for solvers that the bound does not
bound, e.g. sliced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saeot.progress import progress_bar
from saeot.transport import CostOffset, ExactW2, LabelCost, W2Solver, feature_moments

__all__ = ["NORMALIZE", "SemanticCost", "self_distances", "mapped_directions", "check_token_weight"]

NORMALIZE = ("none", "mean")
#: random pairs behind the scale M of the decoder term
N_SCALE_PAIRS = 1024


def _alive(w: Tensor) -> Tensor:
    return w.sum(dim=1) > 0


def halves(x: Tensor, w: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Each feature's samples split in two: alternate samples in decreasing weight order."""
    order = w.argsort(dim=1, descending=True, stable=True)
    xs = torch.gather(x, 1, order.unsqueeze(2).expand(-1, -1, x.shape[2]))
    ws = torch.gather(w, 1, order)
    return (xs[:, 0::2], ws[:, 0::2]), (xs[:, 1::2], ws[:, 1::2])


def self_distances(solver: W2Solver, x: Tensor, w: Tensor) -> Tensor:
    """``[F]`` the solver's :math:`W_2^2` between the two :func:`halves` of each feature's samples,
    for the features with the full number of samples (the most any feature of the layer has,
    K once a feature fired on K tokens); 0 for the rarer ones.

    Halves of a few points overstate the inflation of a K-sample comparison (a feature seen
    on two tokens far apart has their whole squared distance as its self-distance), and
    subtracting it made such features every row's nearest candidate: on the SAE suite one
    layer-12 feature seen on 2 of 2.1M tokens took 2,191 of layer 8's 2,222 matches. A rare
    feature is compared by plain :math:`W_2^2`, which does not favour it."""
    (x1, w1), (x2, w2) = halves(x, w)
    n = (w > 0).sum(dim=1)
    full = n == n.max() if n.numel() else n.bool()
    ok = full & _alive(w1) & _alive(w2)
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    idx = ok.nonzero().flatten()
    if len(idx):
        out[idx] = solver.pair(x1, w1, x2, w2, idx, idx).double()
    return out


def check_token_weight(token_weight: float, solver: W2Solver, centred_weight: float) -> None:
    """``matcher.token_weight`` is >= 0, and > 0 only with the exact solver and ``centred_weight = 1``
    (the fused cost is solved by :class:`~saeot.transport.ExactW2`, whose cascade bounds it)."""
    if token_weight < 0:
        raise ValueError(f"matcher.token_weight must be >= 0, got {token_weight}")
    if token_weight > 0 and (not isinstance(solver, ExactW2) or centred_weight != 1.0):
        raise ValueError("matcher.token_weight > 0 needs transport=exact and matcher.centred_weight=1 "
                         "(the fused cost is solved by the exact solver)")


def mapped_directions(reference, hook: str, w_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``[F, r]`` decoder rows pushed through the reference space's map at ``hook``:
    ``phi(b_dec + d) - phi(b_dec)`` (the map's linear part, for the linear maps)."""
    base = reference.transform(hook, b_dec.detach().float().reshape(1, -1))
    return (reference.transform(hook, w_dec.detach().float() + b_dec.detach().float()) - base).double()


@dataclass
class SemanticCost:
    """The cost ``c`` above between the features of A (``xa [Fa, K, r]``, ``wa``) and B, ready to evaluate.

    Built once per pair of layers (self-distances, moments, the decoder term's scale);
    ``pairs`` evaluates given pairs, ``nearest`` the exact k nearest of every row.
    """

    solver: W2Solver
    xa: Tensor
    wa: Tensor
    xb: Tensor
    wb: Tensor
    centred_weight: float = 1.0
    debias: float = 0.0
    decoder_weight: float = 0.0
    normalize: str = "none"
    dirs_a: Tensor | None = None
    dirs_b: Tensor | None = None
    seed: int = 0
    token_weight: float = 0.0
    occurrences_a: Tensor | None = None
    occurrences_b: Tensor | None = None

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise ValueError(f"matcher.normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.centred_weight < 0:
            raise ValueError(f"matcher.centred_weight must be >= 0, got {self.centred_weight}")
        if self.decoder_weight > 0 and (self.dirs_a is None or self.dirs_b is None):
            raise ValueError("matcher.decoder_weight > 0 needs the decoder directions in the reference space")
        check_token_weight(self.token_weight, self.solver, self.centred_weight)
        if self.token_weight > 0:
            if self.occurrences_a is None or self.occurrences_b is None:
                raise ValueError("matcher.token_weight > 0 needs each sample's token occurrence")
        self.labels: LabelCost | None = None  # set below, after the scale M (measured without it)
        if self.normalize == "mean":
            self.xa, self.xb = _normalize(self.xa, self.wa), _normalize(self.xb, self.wb)
        self.alive_a, self.alive_b = _alive(self.wa), _alive(self.wb)
        self.n_solved = 0
        self.ma, self.sa, _ = feature_moments(self.xa, self.wa)
        self.mb, self.sb, _ = feature_moments(self.xb, self.wb)
        zeros = (torch.zeros(self.xa.shape[0], dtype=torch.float64), torch.zeros(self.xb.shape[0], dtype=torch.float64))
        self.self_a, self.self_b = zeros
        if self.debias:
            self.self_a = self_distances(self.solver, self.xa, self.wa).cpu()
            self.self_b = self_distances(self.solver, self.xb, self.wb).cpu()
        if self.decoder_weight > 0:
            self.ua = torch.nn.functional.normalize(self.dirs_a.double().cpu(), dim=1)
            self.ub = torch.nn.functional.normalize(self.dirs_b.double().cpu(), dim=1)
        self.scale = self._decoder_scale() if self.decoder_weight > 0 or self.token_weight > 0 else 0.0
        if self.token_weight > 0:
            self.labels = LabelCost(self.occurrences_a.cpu(), self.occurrences_b.cpu(),
                                    self.token_weight * self.scale)
        # the exact solver's cascade bounds W2^2, so it prunes W2^2 + exact terms (centred_weight 1)
        self.cascades = isinstance(self.solver, ExactW2) and self.centred_weight == 1.0
        bound = self.solver.nearest_bound("mean_spread")  # "sliced" for the sliced solver: no pruning
        self.bound_spread = bound == "mean_spread"
        self.prunes = bound in ("mean_spread", "mean")

    # ------------------------------------------------------------------ the cost
    def _w2(self, ia: Tensor, ib: Tensor) -> Tensor:
        ia, ib = ia.to(self.xa.device), ib.to(self.xa.device)
        if self.labels is not None:
            w2 = self.solver.pair(self.xa, self.wa, self.xb, self.wb, ia, ib, labels=self.labels)
        else:
            w2 = self.solver.pair(self.xa, self.wa, self.xb, self.wb, ia, ib)
        self.n_solved += len(ia)
        return w2.double().cpu()

    def _base(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` the cost without the decoder term."""
        w2 = self._w2(ia, ib)
        if self.centred_weight != 1.0:
            gap = (self.ma[ia] - self.mb[ib]).pow(2).sum(1).cpu()
            w2 = gap + self.centred_weight * (w2 - gap)
        return w2 - self._debias_term(ia, ib)

    def _full(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` ``c`` of alive pairs; with ``centred_weight == 1`` as ``W2^2 + offset``, the very sum
        the cascade search makes."""
        if self.centred_weight != 1.0:
            return self._base(ia, ib) + self._decoder_term(ia, ib)
        return self._w2(ia, ib) + self._offset_pairs(ia, ib)

    def _debias_term(self, ia: Tensor, ib: Tensor) -> Tensor:
        return 0.5 * self.debias * (self.self_a[ia] + self.self_b[ib])

    def _offset_pairs(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` what ``c`` adds to :math:`W_2^2` when ``centred_weight == 1`` (debias and decoder terms)."""
        return self._decoder_term(ia, ib) - self._debias_term(ia, ib)

    def _decoder_term(self, ia: Tensor, ib: Tensor) -> Tensor:
        if not self.decoder_weight:
            return torch.zeros(len(ia), dtype=torch.float64)
        return self.decoder_weight * self.scale * (1 - (self.ua[ia] * self.ub[ib]).sum(1))

    def pairs(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` ``c`` of the pairs ``(ia, ib)``; ``inf`` where a feature is dead."""
        ia, ib = ia.long().cpu(), ib.long().cpu()
        out = torch.full((len(ia),), math.inf, dtype=torch.float64)
        ok = self.alive_a[ia].cpu() & self.alive_b[ib].cpu()
        if ok.any():
            out[ok] = self._full(ia[ok], ib[ok])
        return out

    def _decoder_scale(self) -> float:
        """``M``: the median cost without the decoder term over random alive pairs."""
        a, b = self.alive_a.nonzero().flatten().cpu(), self.alive_b.nonzero().flatten().cpu()
        if not len(a) or not len(b):
            return 0.0
        g = torch.Generator().manual_seed(self.seed)
        ia = a[torch.randint(len(a), (N_SCALE_PAIRS,), generator=g)]
        ib = b[torch.randint(len(b), (N_SCALE_PAIRS,), generator=g)]
        base = self._base(ia, ib)
        return float(base[torch.isfinite(base)].median().abs())

    # ------------------------------------------------------------------ exact nearest
    def lower_bound(self, rows: Tensor) -> Tensor:
        """``[len(rows), Fb]`` a lower bound of ``c`` (exact terms plus the mean(+spread) bound)."""
        gap = torch.cdist(self.ma[rows].cpu(), self.mb.cpu()).pow(2)
        lb = gap.clone()
        if self.bound_spread:
            lb += self.centred_weight * (self.sa[rows].cpu()[:, None] - self.sb.cpu()[None, :]).pow(2)
        lb -= 0.5 * self.debias * (self.self_a[rows][:, None] + self.self_b[None, :])
        if self.decoder_weight:
            lb += self.decoder_weight * self.scale * (1 - self.ua[rows] @ self.ub.T)
        return lb.masked_fill_(~self.alive_b.cpu()[None, :], math.inf)

    def nearest(self, k: int, rows: Tensor | None = None, chunk: int = 512,
                progress: bool = False) -> tuple[Tensor, Tensor]:
        """``(cost [n, k], index [n, k])``: the k cheapest B features of A's ``rows`` (default all),
        ascending, exact under the solver (ties by index); ``inf`` / -1 padding, dead rows all padding."""
        if self.cascades:
            return self._nearest_cascade(k, rows, chunk, progress)
        rows = torch.arange(self.xa.shape[0]) if rows is None else rows.long().cpu()
        n, kk = len(rows), min(k, self.xb.shape[0])
        cost = torch.full((n, k), math.inf, dtype=torch.float64)
        index = torch.full((n, k), -1, dtype=torch.long)
        bar = progress_bar(total=n, desc="semantic OT nearest", enabled=progress)
        for s in range(0, n, chunk):
            r = rows[s:s + chunk]
            c, i = self._nearest_chunk(r, kk)
            cost[s:s + chunk, :kk], index[s:s + chunk, :kk] = c, i
            bar.update(len(r))
        bar.close()
        return cost, index

    def _nearest_cascade(self, k: int, rows: Tensor | None, chunk: int, progress: bool) -> tuple[Tensor, Tensor]:
        """The exact solver's bound cascade (:meth:`saeot.transport.ExactW2.nearest`) on ``W2^2 + O``."""
        xa, wa = (self.xa, self.wa) if rows is None else (self.xa[rows], self.wa[rows])
        offset = _Offset(self, None if rows is None else rows.long().cpu())
        labels = self.labels
        if labels is not None and rows is not None:
            labels = LabelCost(labels.labels_a[rows.long().cpu()], labels.labels_b, labels.weight)
        res = self.solver.nearest(xa, wa, self.xb, self.wb, k=k, chunk=chunk, progress=progress, offset=offset,
                                  labels=labels)
        self.n_solved += int(res.n_solved)
        return res.cost.double().cpu(), res.index.cpu()

    def _nearest_chunk(self, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        lb = self.lower_bound(rows)
        if not self.prunes:
            lb = torch.where(torch.isfinite(lb), torch.zeros_like(lb), lb)
        order = torch.argsort(lb, dim=1, stable=True)
        lb_sorted = torch.gather(lb, 1, order)
        m, fb = len(rows), lb.shape[1]
        best_c = torch.full((m, k), math.inf, dtype=torch.float64)
        best_i = torch.full((m, k), -1, dtype=torch.long)
        pos = torch.zeros(m, dtype=torch.long)
        active = self.alive_a[rows].cpu().clone()
        step = k
        while active.any():
            act = active.nonzero().flatten()
            take = torch.arange(step)[None, :] + pos[act, None]  # [a, step]
            valid = take < fb
            take = take.clamp_max(fb - 1)
            cand_lb = torch.gather(lb_sorted[act], 1, take)
            valid &= torch.isfinite(cand_lb)
            rr = act[:, None].expand_as(take)[valid]
            jj = torch.gather(order[act], 1, take)[valid]
            c = torch.full(take.shape, math.inf, dtype=torch.float64)
            if len(rr):
                c[valid] = self._full(rows[rr], jj)
            j_full = torch.where(valid, torch.gather(order[act], 1, take), torch.full_like(take, -1))
            allc = torch.cat([best_c[act], c], 1)
            alli = torch.cat([best_i[act], j_full], 1)
            # ascending cost, ties by index (stable over a key that folds the index in)
            key = torch.argsort(alli.masked_fill(alli < 0, fb).double(), dim=1, stable=True)
            allc, alli = torch.gather(allc, 1, key), torch.gather(alli, 1, key)
            srt = torch.argsort(allc, dim=1, stable=True)[:, :k]
            best_c[act], best_i[act] = torch.gather(allc, 1, srt), torch.gather(alli, 1, srt)
            pos[act] += step
            nxt = torch.gather(lb_sorted[act], 1, pos[act].clamp_max(fb - 1)[:, None])[:, 0]
            kth = best_c[act, k - 1]
            slack = 1e-9 * torch.maximum(kth.abs(), torch.ones_like(kth))
            done = (pos[act] >= fb) | ~torch.isfinite(nxt) | (nxt > kth + slack)
            active[act[done]] = False
            step = min(2 * step, 64)
        best_i[~torch.isfinite(best_c)] = -1
        return best_c, best_i


class _Offset(CostOffset):
    """The debias and decoder terms of a :class:`SemanticCost` for the cascade search (rows of A
    optionally a subset ``rows``)."""

    def __init__(self, cost: SemanticCost, rows: Tensor | None):
        self.cost, self.rows = cost, rows

    def _rows(self, local: Tensor) -> Tensor:
        return local if self.rows is None else self.rows[local]

    def dense(self, rows: slice) -> Tensor:
        c = self.cost
        ia = self._rows(torch.arange(rows.start, rows.stop))
        out = -0.5 * c.debias * (c.self_a[ia][:, None] + c.self_b[None, :])
        if c.decoder_weight:
            out = out + c.decoder_weight * c.scale * (1 - c.ua[ia] @ c.ub.T)
        return out

    def pairs(self, ia: Tensor, ib: Tensor) -> Tensor:
        return self.cost._offset_pairs(self._rows(ia.long().cpu()), ib.long().cpu())


def _normalize(x: Tensor, w: Tensor) -> Tensor:
    """Each feature's points divided by the norm of its weighted mean (dead features unchanged)."""
    m, _, _ = feature_moments(x, w)
    norm = m.norm(dim=1).clamp_min(1e-12).to(x.dtype)
    return x / norm[:, None, None]
