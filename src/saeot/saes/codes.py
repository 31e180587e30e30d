"""An SAE's codes and reconstructions, in float32, whatever the SAE's own dtype and device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["encode", "decode"]


def encode(sae: SAE, h: Tensor) -> Tensor:
    """``[..., d] -> [..., F]`` SAE activations ``f(h)`` (computed in the SAE's dtype, returned as float32)."""
    p = next(sae.parameters())
    return sae.encode(h.to(device=p.device, dtype=p.dtype)).float()


def decode(sae: SAE, codes: Tensor) -> Tensor:
    """``[..., F] -> [..., d]`` ``W_dec^T codes + b_dec`` (sae_lens' own decode), float32."""
    p = next(sae.parameters())
    return sae.decode(codes.to(device=p.device, dtype=p.dtype)).float()
