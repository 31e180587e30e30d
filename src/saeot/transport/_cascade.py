r"""A cascade of exact lower bounds of :math:`W_2^2`, from cheap to tight, made safe against rounding.

=============  ======================================================  ==========================
stage          bound (each proved where it is defined)                 cost
=============  ======================================================  ==========================
mean           :math:`\|m_a-m_b\|^2` (:func:`lower_bound_mean`)         GEMM, width r, all pairs
mean_spread    :math:`+ (s_a - s_b)^2` (:func:`lower_bound_mean_spread`) GEMM, width r, all pairs
axis_spread    per-axis spreads (:func:`lower_bound_axis_spread`)       GEMM, width 2r, all pairs
fidelity       relaxed Gelbrich (:func:`lower_bound_fidelity`)          2 GEMMs, width r(r+1)/2
gelbrich       :math:`+\mathrm{Bures}^2` (:func:`lower_bound_gelbrich`)  one q x q SVD per pair
max_sliced     1-D transport on a frame (:func:`lower_bound_max_sliced`) n sorted merges per pair
=============  ======================================================  ==========================

:data:`CASCADES` names the stages a ``bound`` setting runs: dense stages are computed for
all pairs of a chunk of rows by matmuls; pair stages only for the pairs whose bound so
far does not exceed the row's threshold. Every stage keeps the maximum with the stages
before it, so the cascade bound only grows.

Safety. Each stage's value is lowered by the tolerance

.. math:: \tau_{ab} = 10^{-9}\,(\|m_a - m_b\|^2 + \mathrm{tr}S_a + \mathrm{tr}S_b)
          + 10^{-12}\,(\mathrm{mag}_a + \mathrm{mag}_b)

(``mag`` = largest squared norm of a sample, shifted and raw). The first term dominates
the relative float64 error of every bound (:math:`\|m_a-m_b\|^2 + \mathrm{tr}S_a +
\mathrm{tr}S_b` is the cost of the independent coupling, so it is >= every bound and
>= W2^2); the second the absolute error of matmul-form squared distances and of the
exact solver's cost matrix (built from the raw points). Pruning a pair needs its safe
bound to *exceed* a cost the exact solver returned, so such a pair's computed cost is
strictly larger and nearest neighbours equal brute force, ties included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeot.transport._bounds import _sqdist
from saeot.transport._gelbrich import (
    _bures_bound,
    _fidelity_exact,
    _fidelity_upper,
    _trim_rank,
)
from saeot.transport._max_sliced import _frame_for, _max_sliced_pairs
from saeot.transport._moments import _common_shift, _Side, _side_stats
from saeot.transport._parallel import _parallel_map

#: bound setting -> the stages it runs, cheap to tight
CASCADES = {
    "none": (),
    "mean": ("mean",),
    "mean_spread": ("mean_spread",),
    "axis_spread": ("axis_spread",),
    "fidelity": ("mean_spread", "fidelity"),
    "gelbrich": ("mean_spread", "fidelity", "gelbrich"),
    "max_sliced": ("mean_spread", "fidelity", "gelbrich", "max_sliced"),
}
#: the pruning bounds of :meth:`~saeot.transport.W2Solver.nearest` (``none``: brute force;
#: ``sliced``: the bound of the sliced solver's own value)
BOUNDS = (*CASCADES, "sliced")
_DENSE = ("mean", "mean_spread", "axis_spread", "fidelity")
_PAIR = ("gelbrich", "max_sliced")
_REL, _ABS = 1e-9, 1e-12


class _Cascade:
    """The stages of ``bound`` between the features of A (rows, in chunks) and all of B.

    Holds B's statistics; A's are computed per chunk of rows (:meth:`side_a`).
    :meth:`dense` gives the safe dense bound and tolerance of a chunk, :meth:`refine`
    raises given pairs through the pair stages. Everything is float64 on the device of
    the inputs.
    """

    def __init__(self, xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, bound: str, n_directions: int = 8,
                 seed: int = 0, batch: int = 4096, n_jobs: int = 1):
        if bound not in CASCADES:
            raise ValueError(f"transport bound must be one of {BOUNDS}, got {bound!r}")
        self.bound = bound
        self.stages = CASCADES[bound]
        self.xa, self.wa = xa, wa
        self.batch = int(batch)
        # pair stages on CPU threads (batched SVDs release the GIL); one stream of batches on a GPU
        self.n_jobs = int(n_jobs) if xa.device.type == "cpu" else 1
        self.shift = _common_shift(xa, wa, xb, wb)
        need = set()
        if "axis_spread" in self.stages:
            need.add("axis")
        need.update(s for s in ("fidelity", "gelbrich", "max_sliced") if s in self.stages)
        self.need = frozenset(need)
        self.frame = _frame_for(xa, wa, xb, wb, self.shift, n_directions, seed) if "max_sliced" in need else None
        self.B = _side_stats(xb, wb, self.shift, self.need, self.frame)
        if self.B.Z is not None:
            self.B.Z = _trim_rank(self.B.Z)

    @property
    def pair_stages(self) -> tuple[str, ...]:
        return tuple(s for s in self.stages if s in _PAIR)

    def side_a(self, rows: slice) -> _Side:
        A = _side_stats(self.xa[rows], self.wa[rows], self.shift, self.need, self.frame)
        if A.Z is not None:
            A.Z = _trim_rank(A.Z)
        return A

    def dense(self, A: _Side, block: int = 256) -> tuple[Tensor, Tensor]:
        """Safe bound ``[n, Fb]`` of the dense stages and the tolerance ``[n, Fb]`` (``inf`` on dead pairs)."""
        B = self.B
        n, Fb = A.m.shape[0], B.m.shape[0]
        L = torch.empty(n, Fb, dtype=torch.float64, device=B.m.device)
        tol = torch.empty_like(L)
        for s in range(0, n, block):
            a = slice(s, min(n, s + block))
            Ab = _Side(**{k: (v[a] if isinstance(v, Tensor) else v) for k, v in vars(A).items()})
            mg = _sqdist(Ab.m, B.m)
            t = _REL * (mg + Ab.tr.unsqueeze(1) + B.tr.unsqueeze(0)) + _ABS * (Ab.mag.unsqueeze(1) + B.mag.unsqueeze(0))
            val = torch.zeros_like(mg)
            for stage in self.stages:
                if stage == "mean":
                    val = mg
                elif stage == "mean_spread":
                    val = mg + (Ab.s.unsqueeze(1) - B.s.unsqueeze(0)) ** 2
                elif stage == "axis_spread":
                    val = mg + _sqdist(Ab.axis, B.axis)
                elif stage == "fidelity":
                    fid = _bures_bound(mg, Ab.tr.unsqueeze(1), B.tr.unsqueeze(0), _fidelity_upper(Ab, B))
                    val = torch.maximum(val, fid)
            L[a] = (val - t).clamp_min_(0.0)
            tol[a] = t
        dead = ~(A.alive.unsqueeze(1) & B.alive.unsqueeze(0))
        return L.masked_fill_(dead, math.inf), tol.masked_fill_(dead, math.inf)

    def refine(self, A: Tensor | _Side, ia: Tensor, ib: Tensor, L: Tensor, tol: Tensor, limit: Tensor) -> Tensor:
        """``[P]`` safe bounds of the (alive) pairs ``(ia, ib)`` (``ia`` local to the chunk of ``A``)
        after the pair stages; a pair leaves the cascade as soon as its bound exceeds ``limit [P]``.

        ``L [P]`` are their dense safe bounds, ``tol [P]`` their tolerances.
        """
        L = L.clone()
        for stage in self.pair_stages:
            todo = (L <= limit).nonzero().flatten()
            step = max(1, min(self.batch, -(-todo.numel() // self.n_jobs)))
            blocks = [todo[s:s + step] for s in range(0, todo.numel(), step)]
            vals = _parallel_map(lambda p, stage=stage: self._stage(stage, A, ia[p], ib[p]), blocks, self.n_jobs)
            for p, val in zip(blocks, vals):
                L[p] = torch.maximum(L[p], (val - tol[p]).clamp_min(0.0))
        return L

    def row_refiner(self, A: _Side, i: int):
        """``(jb [b], L [b], tol [b]) -> [b]``: :meth:`refine` of the pairs ``(i, jb)`` of one row (``i``
        local to the chunk of ``A``) on the calling thread, every pair stage, no limit: the lazy
        refinement of :func:`~saeot.transport._nearest_exact._visit`, which runs on the solver's threads.
        The row's Gelbrich sketch, mean and trace are taken once (the per-call indexing of
        :meth:`_stage` cost as much as the SVDs on blocks of a few pairs)."""
        B = self.B
        za, ma, tra = A.Z[i] if A.Z is not None else None, A.m[i], A.tr[i]

        def refine(jb: Tensor, L: Tensor, tol: Tensor) -> Tensor:
            out = L.clone()
            for stage in self.pair_stages:
                if stage == "gelbrich":
                    nuc = torch.linalg.svdvals(torch.matmul(za, B.Z[jb].transpose(1, 2))).sum(-1)
                    dm = B.m[jb] - ma
                    val = _bures_bound((dm * dm).sum(1), tra, B.tr[jb], nuc)
                else:
                    val = self._stage(stage, A, torch.full_like(jb, i), jb)
                out = torch.maximum(out, (val - tol).clamp_min(0.0))
            return out

        return refine

    def _stage(self, stage: str, A: _Side, ia: Tensor, ib: Tensor) -> Tensor:
        B = self.B
        if stage == "gelbrich":
            dm = A.m[ia] - B.m[ib]
            nuc = _fidelity_exact(A.Z[ia], B.Z[ib])
            return _bures_bound((dm * dm).sum(1), A.tr[ia], B.tr[ib], nuc)
        return _max_sliced_pairs(A, B, ia, ib)
