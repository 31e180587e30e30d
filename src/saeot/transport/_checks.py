"""Input checks shared by every entry point: shapes, dtypes, finiteness, pair indices.

A set of distributions is ``x [F, K, r]`` with weights ``w [F, K]``; nothing is
broadcast, and a bad input raises ``ValueError`` (``TypeError`` for a wrong type)
naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_cloud(x: Tensor, w: Tensor, name_x: str, name_w: str, batch: int | None = None) -> None:
    if not isinstance(x, Tensor) or not isinstance(w, Tensor):
        raise TypeError(f"{name_x} and {name_w} must be torch tensors")
    if x.ndim != 3:
        raise ValueError(f"{name_x} must have shape [F, K, r], got {tuple(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"{name_w} must have shape [F, K], got {tuple(w.shape)}")
    if tuple(w.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{name_w} {tuple(w.shape)} must match the first two dims of {name_x} {tuple(x.shape)}"
        )
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name_x} has {x.shape[0]} rows but the other side has {batch} (no broadcasting)")
    if not (x.is_floating_point() and w.is_floating_point()):
        raise TypeError(f"{name_x} and {name_w} must be floating point, got {x.dtype} and {w.dtype}")
    if w.numel() and bool((w < 0).any()):
        raise ValueError(f"{name_w} must be non-negative")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name_w} contains NaN or inf")
    for s in range(0, x.shape[0], 1024):
        xs, ws = x[s:s + 1024], w[s:s + 1024]
        if not bool(torch.isfinite(xs).all()) and not bool(torch.isfinite(xs[ws > 0]).all()):
            raise ValueError(f"{name_x} contains NaN or inf at samples with positive weight")


def _check_two(xa: Tensor, wa: Tensor, xb: Tensor, wb: Tensor, names: Sequence[str], paired: bool) -> None:
    _check_cloud(xa, wa, names[0], names[1])
    _check_cloud(xb, wb, names[2], names[3], batch=xa.shape[0] if paired else None)
    if xa.shape[2] != xb.shape[2]:
        raise ValueError(
            f"{names[0]} and {names[2]} live in different spaces: r={xa.shape[2]} vs r={xb.shape[2]}"
        )
    if xa.device != xb.device:
        raise ValueError(f"{names[0]} is on {xa.device} but {names[2]} is on {xb.device}")



def _check_pair_index(ia, ib, n_a: int, n_b: int) -> tuple[Tensor, Tensor]:
    """``ia``, ``ib`` as flat long tensors of the same length, in ``[0, n_a)`` and ``[0, n_b)``."""
    ia, ib = torch.as_tensor(ia).long().flatten(), torch.as_tensor(ib).long().flatten()
    if ia.shape != ib.shape:
        raise ValueError(f"W2Solver.pair: ia {tuple(ia.shape)} and ib {tuple(ib.shape)} must have the same length")
    if ia.numel() and (int(ia.min()) < 0 or int(ia.max()) >= n_a):
        raise ValueError(f"W2Solver.pair: ia out of range [0, {n_a})")
    if ib.numel() and (int(ib.min()) < 0 or int(ib.max()) >= n_b):
        raise ValueError(f"W2Solver.pair: ib out of range [0, {n_b})")
    return ia, ib


def _check_nearest(k: int, chunk: int) -> None:
    if k < 1:
        raise ValueError(f"W2Solver.nearest k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"W2Solver.nearest chunk must be >= 1, got {chunk}")
