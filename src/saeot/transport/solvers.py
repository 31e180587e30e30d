r"""Solvers as objects: one class per way of evaluating :math:`W_2^2`, built from ``conf/transport``.

A solver holds its settings (``ExactW2(num_itermax, n_jobs)``, ``SinkhornW2(reg,
n_iter, ...)``, ``SlicedW2(n_projections, seed)``) and answers the three questions
the matchers and the circuits ask about two sets of distributions ``xa [Fa, K, r]``,
``wa [Fa, K]`` and ``xb [Fb, K', r]``, ``wb [Fb, K']``:

* :meth:`W2Solver.pairwise` -- ``[Fa, Fb]`` every pair (no pruning);
* :meth:`W2Solver.pair` -- ``[n]`` given pairs ``(ia, ib)`` (e.g. a null distribution);
* :meth:`W2Solver.nearest` -- the exact k nearest neighbours with lower-bound pruning.

Which solver runs is decided once, by the object; a new solver is a subclass that
implements :meth:`W2Solver.prepare` (a pair evaluator, see
:mod:`saeot.transport._pairs`) and, if some bounds do not hold for it,
:meth:`W2Solver.nearest_bound`, plus a yaml file in ``conf/transport/``::

    _target_: saeot.transport.SinkhornW2
    reg: 0.05
    n_iter: 200
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeot.transport._cascade import BOUNDS, CASCADES, _Cascade
from saeot.transport._checks import _check_nearest, _check_pair_index, _check_two
from saeot.transport._exact import _ExactPairs
from saeot.transport._labels import LabelCost
from saeot.transport._nearest import NearestResult, _search_nearest
from saeot.transport._nearest_exact import _search_exact
from saeot.transport._offset import CostOffset, _RowsOffset
from saeot.transport._pairs import _SinkhornPairs, _SlicedPairs
from saeot.transport._parallel import _bar, _n_jobs
from saeot.transport._sinkhorn import _check_sinkhorn_options

__all__ = ["W2Solver", "ExactW2", "SinkhornW2", "SlicedW2"]

# the bounds the batched solvers' search takes (one embedding distance per pair)
_EMBEDDING_BOUNDS = ("none", "mean", "mean_spread", "axis_spread")


class W2Solver(ABC):
    """A way to evaluate :math:`W_2^2` between the features of two sets of distributions.

    Subclasses are frozen dataclasses of their settings (so two solvers with the
    same settings compare equal) and implement :meth:`prepare`.
    """

    #: short name, shown in progress bars
    name: ClassVar[str] = "w2"

    @abstractmethod
    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor):
        """The pair evaluator of this solver for the two sets (inputs already checked).

        It has ``dtype``, ``theta`` (sliced directions or None), ``costs(ia, ib) -> [n]``,
        ``matrix(bar) -> [Fa, Fb]`` and ``nearest_chunk(lb, rows, k, prune, atol, bar)``.
        """

    #: the bound :meth:`nearest` uses when none is asked for
    default_bound: ClassVar[str] = "mean_spread"

    def nearest_bound(self, bound: str | None) -> str:
        """The bound :meth:`nearest` actually uses when ``bound`` is asked for (see its table; None: the default)."""
        if bound is None:
            return self.default_bound
        if bound not in BOUNDS:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
        if bound == "sliced":
            raise ValueError("transport bound 'sliced' only bounds the sliced solver; "
                             "use mean, mean_spread or axis_spread")
        if bound not in _EMBEDDING_BOUNDS:
            raise ValueError(f"transport bound {bound!r} runs in ExactW2's cascade; the {self.name} solver "
                             f"takes {_EMBEDDING_BOUNDS}")
        return bound

    def pairwise(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, progress: bool = False) -> Tensor:
        r"""``[Fa, Fb]`` :math:`W_2^2` between every feature of A and every feature of B (no pruning).

        Args:
            xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
            progress: show a tqdm bar.

        Returns:
            ``[Fa, Fb]``; ``inf`` in rows / columns of dead features.
        """
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        bar = _bar(progress, xa.shape[0] * xb.shape[0], f"W2 {self.name} all pairs")
        try:
            return self.prepare(xa, wa, xb, wb).matrix(bar)
        finally:
            if bar is not None:
                bar.close()

    def pair(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
        r"""``[n]`` :math:`W_2^2(\mu^a_{ia[j]}, \mu^b_{ib[j]})` for given pairs (e.g. a null distribution).

        Args:
            xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
            ia, ib: ``[n]`` long indices into A and B.

        Returns:
            ``[n]`` on the device of ``xa``; ``inf`` for pairs with a dead feature.
        """
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        ia, ib = _check_pair_index(ia, ib, xa.shape[0], xb.shape[0])
        return self.prepare(xa, wa, xb, wb).costs(ia, ib)

    def nearest(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int = 2, bound: str | None = None,
                chunk: int = 1024, progress: bool = False, offset: CostOffset | None = None,
                rows: Tensor | None = None) -> NearestResult:
        r"""Exact k nearest neighbours in B of every feature of A under this solver, with pruning.

        Algorithm: compute a lower bound ``L[i, j]`` for all pairs (chunks of ``chunk``
        rows of A, float64 matmuls). For each row i visit the features of B in
        increasing ``L[i, j]``; solve, keep the k best; stop as soon as the next bound
        exceeds the current k-th best cost (with a relative slack of 1e-9 in float64 /
        1e-4 in float32 so rounding never prunes a true neighbour). Every unvisited j
        then has cost >= L[i, j] > k-th best, so the result **equals brute force** under
        the same solver (ties broken by the smaller index, like a stable sort).
        :class:`ExactW2` runs a cascade of tighter bounds instead (:meth:`ExactW2.nearest`).

        Which bounds are valid for which solver (pruning is exact only if
        bound <= solver value for every pair):

        ============================  =========================================  =====================
        solver                        value                                      bounds used
        ============================  =========================================  =====================
        ExactW2                       :math:`W_2^2`                              as requested, any
                                                                                 cascade (default
                                                                                 ``ExactW2.bound``)
        SinkhornW2                    cost of a feasible plan :math:`\ge W_2^2`  as requested (mean,
                                                                                 mean_spread (default),
                                                                                 axis_spread)
        SinkhornW2(debiased=True)     Sinkhorn divergence, only                  ``mean`` (any other
                                      :math:`\ge\|m_a-m_b\|^2`                   request falls back)
        SlicedW2                      :math:`SW` (:func:`w2_sliced`), can be     always ``sliced``
                                      below :math:`\|m_a - m_b\|^2` unless       (:func:`lower_bound_sliced`,
                                      n is a multiple of r                       same directions)
        ============================  =========================================  =====================

        ``bound="none"`` disables pruning (brute force over all alive pairs).

        Work: ``SinkhornW2`` / ``SlicedW2`` visit candidates in rounds (k, then doubling up
        to 64 per row), all active rows of a chunk solved together in GPU-friendly batches
        of ``batch_size`` pairs.

        Args:
            xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
            k: neighbours per row (>= 1).
            bound: None (the solver's default) | ``mean_spread`` | ``axis_spread`` (tighter,
                width 2r) | ``mean`` | ``none``; ``ExactW2`` also takes ``fidelity``,
                ``gelbrich`` and ``max_sliced`` (:data:`~saeot.transport._cascade.CASCADES`);
                ``sliced`` is chosen automatically for the sliced solver.
            chunk: rows of A whose bounds are held at once (memory ``chunk * Fb`` float64).
            progress: tqdm bar over the rows of A.
            offset: a :class:`~saeot.transport.CostOffset`: search ``weight * v + O[i, j]`` for the
                solver's value ``v`` instead (exact extra terms, e.g. semantic OT's debiasing); every
                bound above is scaled and shifted alike (:mod:`saeot.transport._offset`), ``cost``
                then holds those values in float64 (``offset.total``).
            rows: only these rows of A (long indices, e.g. a DDP shard); the result has one row
                each, equal to those rows of the search over all of A.

        Returns:
            :class:`NearestResult`. Dead rows of A get ``inf`` / -1; dead features of B are
            never chosen.
        """
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        _check_nearest(k, chunk)
        rows = _check_rows(rows, xa.shape[0])
        used = self.nearest_bound(bound)
        pairs = self.prepare(xa, wa, xb, wb)  # on all of A, whatever rows: each pair's value is the same
        return _search_nearest(pairs, xa, wa, xb, wb, k, used, chunk, progress, f"W2 {self.name} nearest",
                               offset=offset, rows=rows)


def _check_rows(rows: Tensor | None, n: int) -> Tensor | None:
    """``rows`` as CPU long indices into the ``n`` rows of A (None: all rows)."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows).long().cpu().flatten()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"transport nearest rows must be indices into the {n} rows of xa")
    return rows


@dataclass(frozen=True)
class ExactW2(W2Solver):
    """Exact :math:`W_2^2` by POT's network simplex (float64, CPU; results float64).

    Args:
        num_itermax: network-simplex iteration cap (``ot.emd2``'s ``numItermax``).
        n_jobs: threads (the network simplex releases the GIL); default
            ``torch.get_num_threads()``, capped at the CPU count.
        bound: the lower-bound cascade :meth:`nearest` prunes with (a key of
            :data:`~saeot.transport._cascade.CASCADES`): ``fidelity`` (default:
            mean + spread, then the GEMM relaxation of the Gelbrich bound) | ``gelbrich``
            (+ one small SVD per surviving pair; worth it where SVDs are cheap, e.g. a GPU) |
            ``max_sliced`` (+ exact 1-D transport on a frame) | ``mean_spread`` | ``mean`` |
            ``axis_spread`` | ``none``.
        n_directions: frame size of ``max_sliced`` (half principal directions, half random).
        certify: certify nearest neighbours with batched Sinkhorn bounds before exact solves
            (on the device of the inputs; meant for GPUs).
        certify_candidates: pairs per row that get Sinkhorn bounds.
        certify_reg: Sinkhorn's epsilon, relative to the mean cost of the independent coupling.
        certify_iter: Sinkhorn iterations (annealed from a large epsilon).
    """

    num_itermax: int = 100_000
    n_jobs: int | None = None
    bound: str = "fidelity"
    n_directions: int = 8
    certify: bool = False
    certify_candidates: int = 16
    certify_reg: float = 1e-3
    certify_iter: int = 500

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        if self.n_jobs is not None:
            _n_jobs(self.n_jobs)
        if self.bound not in CASCADES:
            raise ValueError(f"transport exact bound must be one of {tuple(CASCADES)}, got {self.bound!r}")
        if self.n_directions < 1 or self.certify_candidates < 1 or self.certify_iter < 1:
            raise ValueError("transport exact n_directions, certify_candidates and certify_iter must be >= 1")
        if self.certify_reg <= 0:
            raise ValueError(f"transport exact certify_reg must be > 0, got {self.certify_reg}")

    def nearest_bound(self, bound: str | None) -> str:
        if bound is None:
            return self.bound
        if bound not in CASCADES:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}"
                             + ("; 'sliced' only bounds the sliced solver" if bound == "sliced" else ""))
        return bound

    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor,
                labels: LabelCost | None = None) -> _ExactPairs:
        if labels is not None:
            labels.check(wa, wb)
        return _ExactPairs(xa, wa, xb, wb, self.num_itermax, _n_jobs(self.n_jobs), labels=labels)

    def pair(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, ia: Tensor, ib: Tensor,
             labels: LabelCost | None = None) -> Tensor:
        r"""As :meth:`W2Solver.pair`; with ``labels`` (:class:`~saeot.transport.LabelCost`) the fused cost
        :math:`\min_P \sum P_{kl}(\|x_k - y_l\|^2 + \lambda [t_k \ne t_l])` instead of :math:`W_2^2`."""
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        ia, ib = _check_pair_index(ia, ib, xa.shape[0], xb.shape[0])
        return self.prepare(xa, wa, xb, wb, labels).costs(ia, ib)

    def nearest(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int = 2, bound: str | None = None,
                chunk: int = 1024, progress: bool = False, offset: CostOffset | None = None,
                labels: LabelCost | None = None, rows: Tensor | None = None) -> NearestResult:
        r"""Exact k nearest neighbours in B of every feature of A, pruned by a cascade of lower bounds.

        The cascade ``bound`` (default: the solver's ``bound``) runs its dense stages for
        all pairs of ``chunk`` rows of A, seeds a threshold per row (the k smallest-bound
        candidates solved exactly, or with ``certify`` the k-th smallest Sinkhorn upper
        bound), sends only the pairs below it through the pair stages, and solves the
        survivors in increasing bound on ``n_jobs`` threads, skipping any whose bound
        exceeds the current k-th best cost (:mod:`saeot.transport._nearest_exact`).
        Every bound is lowered by a tolerance that covers its rounding and the exact
        solver's (:mod:`saeot.transport._cascade`), so the result **equals brute force**
        with this solver, ties broken by the smaller index.

        Args:
            xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
            k: neighbours per row (>= 1).
            bound: a key of :data:`~saeot.transport._cascade.CASCADES`, or None for ``self.bound``.
            chunk: rows of A bounded at once (memory about ``3 * chunk * Fb`` float64).
            progress: tqdm bar over the rows of A.
            offset: a :class:`~saeot.transport.CostOffset`: search ``weight * W2^2 + O[i, j]`` instead
                (exact extra terms, e.g. semantic OT's debiasing); ``cost`` then holds those values.
            labels: a :class:`~saeot.transport.LabelCost`: search the fused cost (plus ``offset``),
                still exact (its label term is bounded by :math:`\lambda (1 - o)`, :mod:`~saeot.transport._labels`);
                not with ``certify``.
            rows: only these rows of A (long indices, e.g. a DDP shard); the result has one row each.

        Returns:
            :class:`NearestResult` (``certified_fraction`` with ``certify``). Dead rows of A
            get ``inf`` / -1; dead features of B are never chosen.
        """
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        _check_nearest(k, chunk)
        rows = _check_rows(rows, xa.shape[0])
        if rows is not None:  # exact values do not depend on the other rows: search the subset itself
            xa, wa = xa[rows], wa[rows]
            offset = None if offset is None else _RowsOffset(offset, rows)
            labels = None if labels is None else LabelCost(labels.labels_a[rows], labels.labels_b, labels.weight)
        used = self.nearest_bound(bound)
        cascade = _Cascade(xa, wa, xb, wb, used, self.n_directions, n_jobs=_n_jobs(self.n_jobs))
        certify = {"candidates": self.certify_candidates, "reg": self.certify_reg,
                   "n_iter": self.certify_iter} if self.certify else None
        return _search_exact(self.prepare(xa, wa, xb, wb, labels), cascade, xa, wa, xb, wb, k, chunk, certify,
                             progress, f"W2 {self.name} nearest", offset=offset, labels=labels)


@dataclass(frozen=True)
class SinkhornW2(W2Solver):
    """Batched log-domain Sinkhorn (:func:`~saeot.transport.w2_sinkhorn`), on the device of the inputs.

    Args:
        reg, n_iter, tol, debiased, reg_mode, anneal, check_every: as in
            :func:`~saeot.transport.w2_sinkhorn`.
        batch_size: pairs per batched call (default: about 256 MB of work memory).
    """

    reg: float = 0.01
    n_iter: int = 1000
    tol: float = 1e-6
    debiased: bool = False
    reg_mode: str = "relative"
    anneal: bool = True
    check_every: int = 10
    batch_size: int | None = None

    name: ClassVar[str] = "sinkhorn"

    def __post_init__(self) -> None:
        _check_sinkhorn_options(self.reg, self.reg_mode)

    def nearest_bound(self, bound: str | None) -> str:
        used = super().nearest_bound(bound)
        if self.debiased and used != "none":
            return "mean"
        return used

    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> _SinkhornPairs:
        options = {"reg": self.reg, "n_iter": self.n_iter, "tol": self.tol, "debiased": self.debiased,
                   "reg_mode": self.reg_mode, "anneal": self.anneal, "check_every": self.check_every}
        return _SinkhornPairs(xa, wa, xb, wb, options, self.batch_size)


@dataclass(frozen=True)
class SlicedW2(W2Solver):
    """Batched sliced :math:`W_2^2` (:func:`~saeot.transport.w2_sliced`), on the device of the inputs.

    Args:
        n_projections, seed: as in :func:`~saeot.transport.w2_sliced`.
        batch_size: pairs per batched call (default: about 256 MB of work memory).
    """

    n_projections: int = 64
    seed: int = 0
    batch_size: int | None = None

    name: ClassVar[str] = "sliced"

    def __post_init__(self) -> None:
        if self.n_projections < 1:
            raise ValueError(f"transport sliced n_projections must be >= 1, got {self.n_projections}")

    def nearest_bound(self, bound: str | None) -> str:
        if bound is not None and bound not in BOUNDS:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
        return "none" if bound == "none" else "sliced"

    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> _SlicedPairs:
        return _SlicedPairs(xa, wa, xb, wb, self.n_projections, self.seed, self.batch_size)
