"""Work scheduling: blocks of indices, a thread pool for the network simplex, progress bars."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from saeot.progress import progress_bar


def _n_jobs(n_jobs: int | None) -> int:
    """Threads to use: ``n_jobs`` (>= 1), or by default torch's thread count capped at the CPU count."""
    if n_jobs is None:
        return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    if n_jobs < 1:
        raise ValueError(f"transport n_jobs must be >= 1, got {n_jobs}")
    return int(n_jobs)


def _parallel_map(fn: Callable, blocks: list, n_jobs: int, progress=None) -> list:
    """``[fn(block) for block in blocks]`` on a thread pool (the network simplex releases the GIL)."""
    out = []
    if n_jobs == 1 or len(blocks) <= 1:
        for blk in blocks:
            out.append(fn(blk))
            if progress is not None:
                progress.update(len(blk))
        return out
    with ThreadPoolExecutor(max_workers=n_jobs) as ex:
        for blk, res in zip(blocks, ex.map(fn, blocks)):
            out.append(res)
            if progress is not None:
                progress.update(len(blk))
    return out


def _split(n: int, size: int) -> list[np.ndarray]:
    """``range(n)`` cut into consecutive index blocks of at most ``size``."""
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


class _RowsToPairs:
    """Adapts a per-pair bar to work counted in rows of ``per_row`` pairs."""

    def __init__(self, bar, per_row: int):
        self.bar, self.per_row = bar, per_row

    def update(self, n_rows: int) -> None:
        if self.bar is not None:
            self.bar.update(n_rows * self.per_row)


def _bar(progress: bool, total: int, desc: str):
    """A tqdm bar over ``total`` pairs, or None without ``progress``."""
    if not progress:
        return None
    return progress_bar(total=total, desc=desc, unit="pair", dynamic_ncols=True)

