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

from torch import Tensor

from saeot.transport._bounds import BOUNDS
from saeot.transport._checks import _check_nearest, _check_pair_index, _check_two
from saeot.transport._exact import _ExactPairs
from saeot.transport._nearest import NearestResult, _search_nearest
from saeot.transport._pairs import _SinkhornPairs, _SlicedPairs
from saeot.transport._parallel import _bar, _n_jobs
from saeot.transport._sinkhorn import _check_sinkhorn_options

__all__ = ["W2Solver", "ExactW2", "SinkhornW2", "SlicedW2"]


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

    def nearest_bound(self, bound: str) -> str:
        """The bound :meth:`nearest` actually uses when ``bound`` is asked for (see its table)."""
        if bound not in BOUNDS:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
        if bound == "sliced":
            raise ValueError("transport bound 'sliced' only bounds the sliced solver; "
                             "use mean, mean_spread or axis_spread")
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

    def nearest(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, k: int = 2, bound: str = "mean_spread",
                chunk: int = 1024, progress: bool = False) -> NearestResult:
        r"""Exact k nearest neighbours in B of every feature of A under this solver, with pruning.

        Algorithm: compute a lower bound ``L[i, j]`` for all pairs (chunks of ``chunk``
        rows of A, float64 matmuls). For each row i visit the features of B in
        increasing ``L[i, j]``; solve, keep the k best; stop as soon as the next bound
        exceeds the current k-th best cost (with a relative slack of 1e-9 in float64 /
        1e-4 in float32 so rounding never prunes a true neighbour). Every unvisited j
        then has cost >= L[i, j] > k-th best, so the result **equals brute force** under
        the same solver (ties broken by the smaller index, like a stable sort).

        Which bounds are valid for which solver (pruning is exact only if
        bound <= solver value for every pair):

        ============================  =========================================  =====================
        solver                        value                                      bounds used
        ============================  =========================================  =====================
        ExactW2                       :math:`W_2^2`                              as requested
        SinkhornW2                    cost of a feasible plan :math:`\ge W_2^2`  as requested
        SinkhornW2(debiased=True)     Sinkhorn divergence, only                  ``mean`` (any other
                                      :math:`\ge\|m_a-m_b\|^2`                   request falls back)
        SlicedW2                      :math:`SW` (:func:`w2_sliced`), can be     always ``sliced``
                                      below :math:`\|m_a - m_b\|^2` unless       (:func:`lower_bound_sliced`,
                                      n is a multiple of r                       same directions)
        ============================  =========================================  =====================

        ``bound="none"`` disables pruning (brute force over all alive pairs).

        Work: ``ExactW2`` solves each row's candidates one by one (the network simplex is
        a CPU call anyway) on ``n_jobs`` threads over rows; ``SinkhornW2`` / ``SlicedW2``
        visit candidates in rounds (k, then doubling up to 64 per row), all active rows
        of a chunk solved together in GPU-friendly batches of ``batch_size`` pairs.

        Args:
            xa: ``[Fa, K, r]``, wa: ``[Fa, K]``, xb: ``[Fb, K', r]``, wb: ``[Fb, K']``.
            k: neighbours per row (>= 1).
            bound: ``mean_spread`` (default) | ``axis_spread`` (tighter, width 2r) |
                ``mean`` | ``none`` (``sliced`` is chosen automatically for the sliced solver).
            chunk: rows of A whose bounds are held at once (memory ``chunk * Fb`` float64).
            progress: tqdm bar over the rows of A.

        Returns:
            :class:`NearestResult`. Dead rows of A get ``inf`` / -1; dead features of B are
            never chosen.
        """
        _check_two(xa, wa, xb, wb, ("xa", "wa", "xb", "wb"), paired=False)
        _check_nearest(k, chunk)
        used = self.nearest_bound(bound)
        pairs = self.prepare(xa, wa, xb, wb)
        return _search_nearest(pairs, xa, wa, xb, wb, k, used, chunk, progress, f"W2 {self.name} nearest")


@dataclass(frozen=True)
class ExactW2(W2Solver):
    """Exact :math:`W_2^2` by POT's network simplex (float64, CPU; results float64).

    Args:
        num_itermax: network-simplex iteration cap (``ot.emd2``'s ``numItermax``).
        n_jobs: threads (the network simplex releases the GIL); default
            ``torch.get_num_threads()``, capped at the CPU count.
    """

    num_itermax: int = 100_000
    n_jobs: int | None = None

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        if self.n_jobs is not None:
            _n_jobs(self.n_jobs)

    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> _ExactPairs:
        return _ExactPairs(xa, wa, xb, wb, self.num_itermax, _n_jobs(self.n_jobs))


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

    def nearest_bound(self, bound: str) -> str:
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

    def nearest_bound(self, bound: str) -> str:
        if bound not in BOUNDS:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
        return "none" if bound == "none" else "sliced"

    def prepare(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor) -> _SlicedPairs:
        return _SlicedPairs(xa, wa, xb, wb, self.n_projections, self.seed, self.batch_size)
