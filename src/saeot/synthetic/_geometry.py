"""Geometry of the planted directions: spreading, plane rotations, orthogonal offsets, splits, near-duplicates.

All directions are unit rows ``[n, d]``; every random draw comes from the generator passed in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "normalise",
    "spread_directions",
    "plane_rotation",
    "orthonormal_offsets",
    "split_directions",
    "place_near_duplicates",
    "place_shared_mean",
]


def normalise(x: Tensor) -> Tensor:
    """Rows of ``x [..., d]`` scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spread_directions(x: Tensor, steps: int, max_n: int = 4096) -> Tensor:
    """Unit rows ``[n, d]`` pushed apart by ``steps`` of descent on ``sum_{i!=j} cos_ij^4 / 4``.

    Each step moves every row along the tangent part of its gradient ``sum_j G_ij^3 x_j``,
    scaled so that the row with the largest gradient turns by ``lr`` radians (``lr``
    decays from 0.11 to 0.01), then renormalises; this cannot overshoot whatever ``n / d``.
    Skipped for ``n > max_n`` (the Gram matrix is ``n x n``).
    """
    x = normalise(x)
    if x.shape[0] > max_n:
        return x
    for t in range(steps):
        gram = x @ x.T
        gram.fill_diagonal_(0.0)
        grad = (gram * gram * gram) @ x
        tangent = grad - (grad * x).sum(-1, keepdim=True) * x
        lr = 0.1 * (1 - t / steps) + 0.01
        x = normalise(x - lr * tangent / tangent.norm(dim=1).max().clamp_min(1e-12))
    return x


def plane_rotation(d: int, angle: float, gen: torch.Generator) -> Tensor:
    """``[d, d]`` orthogonal ``Q = U R U^T``: ``R`` rotates each coordinate plane (0,1), (2,3), ... by ``angle``.

    For even ``d``, ``v . Q v = cos(angle) |v|^2`` for every ``v``.
    """
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    r = torch.eye(d, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    for i in range(0, d - 1, 2):
        r[i, i], r[i, i + 1], r[i + 1, i], r[i + 1, i + 1] = c, -s, s, c
    return (u @ r @ u.T).float()


def orthonormal_offsets(base: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """``[n, m, d]``: for each unit row of ``base [n, d]``, ``m`` orthonormal vectors orthogonal to it."""
    n, d = base.shape
    basis = [base]
    out = []
    for _ in range(m):
        v = torch.randn(n, d, generator=gen)
        for b in basis:
            v = v - (v * b).sum(-1, keepdim=True) * b
        v = normalise(v)
        basis.append(v)
        out.append(v)
    return torch.stack(out, dim=1)


def split_directions(centre: Tensor, others: Tensor, spread: float, gen: torch.Generator, tries: int = 16) -> Tensor:
    """``[S, 2, d]`` children ``normalise(centre + spread u_i)``, ``u_1, u_2`` orthonormal and ⟂ ``centre``.

    Of ``tries`` random draws per split, keeps the one whose children have the smallest
    largest ``|cos|`` with ``others [m, d]`` (the layer's other directions), so that
    children are no more entangled with unrelated features than those are with each other.
    """
    S, d = centre.shape
    rep = centre.repeat_interleave(tries, dim=0)  # [S * tries, d]
    u = orthonormal_offsets(rep, 2, gen)  # [S * tries, 2, d]
    kids = normalise(rep[:, None, :] + spread * u).view(S, tries, 2, d)
    worst = (kids @ others.T).abs().amax(dim=(2, 3)) if others.shape[0] else torch.zeros(S, tries)
    best = worst.argmin(dim=1)
    return kids[torch.arange(S), best]


def place_near_duplicates(directions: Tensor, pairs: Tensor, base: Tensor, eps: Tensor, gen: torch.Generator) -> None:
    """In place: ``D_i, D_j = normalise(u + e v_i), normalise(u + e v_j)`` with fresh orthonormal ``v`` ⟂ ``u``."""
    if pairs.shape[0] == 0:
        return
    u = normalise(base)
    v = orthonormal_offsets(u, 2, gen)  # [P, 2, d]
    d_pair = normalise(u[:, None, :] + eps[:, None, None] * v)
    directions[pairs[:, 0]] = d_pair[:, 0]
    directions[pairs[:, 1]] = d_pair[:, 1]


def place_shared_mean(directions: Tensor, scales: Tensor, groups: Tensor, q: float, offset: float,
                      gen: torch.Generator) -> None:
    """In place: the unimodal member of each shared-mean group at the bimodal member's mean.

    ``groups [P, 4]`` = (bimodal X, unimodal Y, first context c1, second context c2). X fires
    with c1 (probability ``q``) or c2, each at X's magnitude, so its mean is
    ``mid = s_X D_X + q s_1 D_1 + (1 - q) s_2 D_2``; Y is written at
    ``s_Y D_Y = mid + offset |mid| n``, ``n`` a fresh unit vector orthogonal to ``mid``.
    """
    if groups.shape[0] == 0:
        return
    x, y, c1, c2 = groups.unbind(1)
    mid = (scales[x, None] * directions[x] + q * scales[c1, None] * directions[c1]
           + (1 - q) * scales[c2, None] * directions[c2])
    size = mid.norm(dim=1, keepdim=True)
    n = orthonormal_offsets(normalise(mid), 1, gen)[:, 0]
    target = mid + offset * size * n
    directions[y] = normalise(target)
    scales[y] = target.norm(dim=1)
