r"""The cost semantic OT ranks candidates by, with its variants, and what its exact k-nearest search needs.

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

:func:`SemanticCost.nearest` is exact under the solver: ``c`` is affine in the solver's value
``v`` (:math:`W_2^2`, Sinkhorn's or the sliced value),

.. math::
    c_{ij} = \omega\, v_{ij} + O_{ij},\qquad
    O_{ij} = (1 - \omega)\|m_i - m_j\|^2 - \tfrac{\lambda}{2}(S_i + S_j)
             + \gamma M (1 - \cos(\phi_A d_i, \phi_B d_j)),

with :math:`\omega \ge 0` and every term of ``O`` computed exactly for each pair (no bound in
it: the mean gap is the features' own, whether or not the solver's value exceeds it, as the
sliced value may not). So the solver's own pruned search (:meth:`~saeot.transport.W2Solver.nearest`,
one per solver in :mod:`saeot.transport`) searches ``c`` given ``O`` and :math:`\omega` as a
:class:`~saeot.transport.CostOffset` (:class:`_Offset`): each bound ``L`` of ``v`` becomes
:math:`\omega L + O`, a bound of ``c`` (:mod:`saeot.transport._offset`); with the exact solver
its bound cascade (fidelity, Gelbrich, ...), with Sinkhorn the mean + spread bound, with sliced
the sliced bound. With ``token_weight`` the exact solver solves the fused cost and bounds its
label term as well (:mod:`saeot.transport._labels`); ``O`` is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

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
        # the exact solver prunes c with its bound cascade (False: with the mean + spread bound alone)
        self.cascades = isinstance(self.solver, ExactW2)

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
        """``[n]`` ``c`` of alive pairs."""
        return self._combine(self._w2(ia, ib), ia, ib)

    def _combine(self, w2: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
        """``[n]`` ``c`` of alive pairs from the solver's values ``w2`` (float64, CPU): with
        ``centred_weight == 1`` as ``W2^2 + offset``, otherwise as ``_base`` plus the decoder term;
        the search's solved costs are these very numbers (:meth:`_Offset.total`)."""
        if self.centred_weight != 1.0:
            gap = (self.ma[ia] - self.mb[ib]).pow(2).sum(1).cpu()
            w2 = gap + self.centred_weight * (w2 - gap)
            return (w2 - self._debias_term(ia, ib)) + self._decoder_term(ia, ib)
        return w2 + self._offset_pairs(ia, ib)

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
    def nearest(self, k: int, rows: Tensor | None = None, chunk: int = 512,
                progress: bool = False) -> tuple[Tensor, Tensor]:
        """``(cost [n, k], index [n, k])``: the k cheapest B features of A's ``rows`` (default all),
        ascending, exact under the solver (ties by index); ``inf`` / -1 padding, dead rows all padding.
        The solver's own pruned search of ``c`` (module docstring)."""
        labels = {} if self.labels is None else {"labels": self.labels}
        bound = None if self.cascades or not isinstance(self.solver, ExactW2) else "mean_spread"
        res = self.solver.nearest(self.xa, self.wa, self.xb, self.wb, k=k, bound=bound, chunk=chunk,
                                  progress=progress,
                                  offset=_Offset(self) if self.centred_weight == 1.0 else _WeightedOffset(self),
                                  rows=None if rows is None else rows.long().cpu(), **labels)
        self.n_solved += int(res.n_solved)
        return res.cost.double().cpu(), res.index.cpu()


class _Offset(CostOffset):
    r"""``c = weight * v + O`` of a :class:`SemanticCost` for the solver's pruned search: ``weight`` is
    ``centred_weight``, ``O`` the exact terms of the module docstring. ``c`` of a solved pair is
    :meth:`SemanticCost._combine` of its value (``O`` may differ from it by rounding only).

    Why ``O`` is exact: :math:`c = \|m_i - m_j\|^2 + \omega (v - \|m_i - m_j\|^2) - \tfrac{\lambda}{2}(S_i + S_j)
    + (\text{decoder term}) = \omega v + O` by expanding, whatever ``v`` is; the mean gap, self-distances
    and decoder cosines are per-pair numbers, not bounds (with ``centred_weight = 1`` the gap
    cancels and ``O`` is the debias and decoder terms).
    """

    def __init__(self, cost: SemanticCost):
        self.cost = cost
        self.weight = float(cost.centred_weight)

    @staticmethod
    def _ids(rows: slice | Tensor) -> Tensor:
        return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows.long().cpu()

    def dense(self, rows: slice | Tensor) -> Tensor:
        c = self.cost
        ia = self._ids(rows)
        out = -0.5 * c.debias * (c.self_a[ia][:, None] + c.self_b[None, :])
        if c.decoder_weight:
            out = out + c.decoder_weight * c.scale * (1 - c.ua[ia] @ c.ub.T)
        if c.centred_weight != 1.0:  # the mean gap, from differences (no cancellation)
            gap = torch.cdist(c.ma[ia].cpu(), c.mb.cpu(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
            out = (1.0 - c.centred_weight) * gap + out
        return out

    def pairs(self, ia: Tensor, ib: Tensor) -> Tensor:
        c = self.cost
        ia, ib = ia.long().cpu(), ib.long().cpu()
        if c.centred_weight != 1.0:
            gap = (c.ma[ia] - c.mb[ib]).pow(2).sum(1).cpu()
            return (1.0 - c.centred_weight) * gap + c._offset_pairs(ia, ib)
        return c._offset_pairs(ia, ib)


class _WeightedOffset(_Offset):
    """:class:`_Offset` for ``centred_weight != 1``: solved costs in :meth:`SemanticCost._combine`'s
    order of operations (with weight 1 the default ``w2 + pairs`` is that order already)."""

    def total(self, w2: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
        return self.cost._combine(w2.double().cpu(), ia.long().cpu(), ib.long().cpu())


def _normalize(x: Tensor, w: Tensor) -> Tensor:
    """Each feature's points divided by the norm of its weighted mean (dead features unchanged)."""
    m, _, _ = feature_moments(x, w)
    norm = m.norm(dim=1).clamp_min(1e-12).to(x.dtype)
    return x / norm[:, None, None]
