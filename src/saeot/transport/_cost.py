r"""Weighted point clouds: weight normalisation, compute dtype and the squared Euclidean ground cost."""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _normalize(w: Tensor) -> Tensor:
    """``[..., K]`` weights divided by their row sum (all-zero rows stay zero)."""
    s = w.sum(-1, keepdim=True)
    return torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))


def _alive(w: Tensor) -> Tensor:
    return w.sum(-1) > 0


def cost_matrices(xa: Tensor, xb: Tensor) -> Tensor:
    r"""Batched squared Euclidean cost matrices.

    .. math:: C_{\dots kl} = \|x^a_{\dots k} - x^b_{\dots l}\|^2
              = \|x^a_k\|^2 + \|x^b_l\|^2 - 2 \langle x^a_k, x^b_l \rangle

    (one batched matmul; clamped at 0 against rounding).

    Args:
        xa: ``[..., K, r]``.
        xb: ``[..., K', r]`` with the same leading dims ``...`` as ``xa`` (no broadcasting).

    Returns:
        ``[..., K, K']`` in the promoted dtype of the inputs.
    """
    if xa.ndim < 2 or xb.ndim < 2:
        raise ValueError(f"cost_matrices needs [..., K, r] inputs, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    if xa.shape[:-2] != xb.shape[:-2]:
        raise ValueError(
            f"cost_matrices: leading dims differ {tuple(xa.shape[:-2])} vs {tuple(xb.shape[:-2])} (no broadcasting)"
        )
    if xa.shape[-1] != xb.shape[-1]:
        raise ValueError(f"cost_matrices: point widths differ, r={xa.shape[-1]} vs r={xb.shape[-1]}")
    dtype = torch.promote_types(xa.dtype, xb.dtype)
    xa, xb = xa.to(dtype), xb.to(dtype)
    na = (xa * xa).sum(-1)
    nb = (xb * xb).sum(-1)
    c = na.unsqueeze(-1) + nb.unsqueeze(-2) - 2.0 * (xa @ xb.transpose(-1, -2))
    return c.clamp_min_(0.0)


def _centre_pairs(x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Shift both clouds of each pair by the midpoint of their means (W2 is translation invariant;
    this keeps float32 cost matrices accurate when the points share a large offset)."""
    c = 0.5 * (torch.einsum("bk,bkr->br", a, x) + torch.einsum("bk,bkr->br", b, y)).unsqueeze(1)
    return x - c, y - c

