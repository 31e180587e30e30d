"""The dense reference computation of :class:`saeot.profiling.StreamingProfiler`'s update.

The profiler reads only the firing entries of a batch (``_update_sparse``); this oracle builds the
whole ``[N, F]`` key matrix and takes each feature's candidates from it, so a test can check that
the sparse update leaves the same state (up to exact ties).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeot.profiling import StreamingProfiler
from saeot.types import POS_SPAN


def top_rows(keys: Tensor, lin: Tensor, m: int) -> Tensor:
    """``[F, m]`` column indices of the ``m`` largest entries of each row of ``keys [F, N]``
    (ascending), equal keys at the boundary taken by smallest ``lin [N]`` (token order)."""
    t = keys.topk(m, dim=1).values[:, -1:]  # each row's m-th largest key
    gt, eq = keys > t, keys == t
    need = m - gt.sum(1, keepdim=True)
    # boundary ties: by token order (rows of -inf keys are never kept, any of them will do)
    amb = ((eq.sum(1, keepdim=True) > need) & torch.isfinite(t)).squeeze(1)
    eq_lin = torch.where(eq, lin[None, :], torch.iinfo(torch.long).max)
    pick = eq & (eq.cumsum(1) <= need)
    if bool(amb.any()):
        rank = torch.argsort(torch.argsort(eq_lin[amb], dim=1, stable=True), dim=1)
        pick[amb] = eq[amb] & (rank < need[amb])
    return (gt | pick).nonzero(as_tuple=True)[1].view(keys.shape[0], m)


def keys_of(profiler: StreamingProfiler, acts: Tensor, locations: Tensor) -> Tensor:
    """``[N, F]`` sampling keys of activations ``[N, F]`` at tokens ``locations [N, 2]``
    (-inf where the feature is off); reservoir keys from :func:`saeot.profiling.samplers.token_uniform`."""
    fire = acts > 0
    if profiler.mode == "topk":
        return torch.where(fire, acts, torch.full_like(acts, float("-inf")))
    keys = torch.full_like(acts, float("-inf"))
    rows, feats = fire.nonzero(as_tuple=True)
    keys[rows, feats] = profiler._reservoir_keys(rows, feats, acts[rows, feats], locations).to(keys.dtype)
    return keys


def update_dense(profiler: StreamingProfiler, h: Tensor, acts: Tensor, token_ids: Tensor, locations: Tensor) -> None:
    """Absorb one batch into ``profiler`` from the whole ``[N, F]`` key matrix (reservoir keys are
    random per entry): what ``StreamingProfiler.update`` must equal."""
    fire = acts > 0
    profiler.n_fire += fire.sum(0)
    profiler.act_sum += acts.clamp_min(0).sum(0, dtype=torch.float64)
    profiler.act_max = torch.maximum(profiler.act_max, acts.max(0).values.clamp_min(0))
    profiler.n_tokens += h.shape[0]

    keys = keys_of(profiler, acts, locations).T  # [F, N]
    m = min(profiler.K, keys.shape[1])
    if m == 0:
        return
    cand_rows = top_rows(keys, locations[:, 0] * POS_SPAN + locations[:, 1], m)  # [F, m]
    cand_keys = keys.gather(1, cand_rows)
    cand_acts = acts.T.gather(1, cand_rows)
    profiler._absorb(
        cand_keys, cand_acts, locations[cand_rows],
        fetch=lambda f, j: (h[cand_rows[f, j]], token_ids[cand_rows[f, j]]),
    )
