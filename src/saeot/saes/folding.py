"""Threshold / scale folding of SAE parameters (SAE Match, seed 001, arXiv 2410.07656).

A JumpReLU SAE computes ``f_i(x) = p_i * 1[p_i > theta_i]`` with pre-activation
``p_i = (x - b_dec) . W_enc[:, i] + b_enc[i]`` and reconstructs
``x_hat = sum_i f_i(x) W_dec[i] + b_dec``. For any ``c_i > 0`` the transformation

    W_enc[:, i] -> c_i W_enc[:, i],  b_enc[i] -> c_i b_enc[i],  theta_i -> c_i theta_i,
    W_dec[i]    -> W_dec[i] / c_i

multiplies ``p_i`` and ``f_i`` by ``c_i``, leaves the firing pattern
``p_i > theta_i`` unchanged and so leaves the reconstruction unchanged: a feature's
parameters are only defined up to this per-feature scale. Folding picks the
representative with unit threshold, i.e. divides by the scale ``s_i = theta_i``:

    W_enc' = W_enc diag(1/s),   b_enc' = b_enc / s,   W_dec' = diag(s) W_dec,

after which the SAE is a JumpReLU with threshold ``theta / s = 1`` and the same
reconstruction, and the folded parameters are *invariant* to the transformation
above (``s`` transforms with the same ``c_i``). Comparing folded parameters is
therefore scale-invariant. :func:`fold_scale` generalises ``s`` to every
architecture: ``s`` must be a per-feature quantity that is multiplied by ``c_i``
under exactly the rescalings that leave that architecture's reconstruction unchanged.

* **JumpReLU** (``sae.threshold`` exists): ``s_i = theta_i`` (the paper). Features
  with ``theta_i <= 0`` behave as plain ReLU features and use the ReLU rule below
  (their folded threshold is then ``theta_i / s_i``, i.e. 0, not 1).
* **ReLU** (standard, gated) and **TopK with** ``rescale_acts_by_decoder_norm``: the
  same per-feature rescalings leave the reconstruction unchanged (ReLU is positively
  homogeneous; the TopK selection compares ``p_i ||W_dec[i]||``, which is invariant).
  There is no threshold, so ``s_i = 1 / ||W_dec[i]||`` (it is multiplied by ``c_i``):
  folding makes every decoder row unit-norm, exactly sae_lens' ``fold_W_dec_norm``.
  A feature with an all-zero decoder row is dead; it keeps ``s_i = 1``.
* **TopK / BatchTopK / AbsTopK without** ``rescale_acts_by_decoder_norm``: the top-k
  selection compares raw pre-activations across features, so only a *common* scale
  ``c`` (the same for all features) preserves the reconstruction. The matching scale
  is then one number, ``s = 1 / RMS_i ||W_dec[i]||``, shared by all features: folding
  stays exact (the folded SAE is the same TopK SAE) and is invariant to the common
  rescaling, without pretending to an invariance the architecture does not have.

:func:`fold_sae` builds the folded SAE (same class; threshold ``theta / s``), which
the tests use to check that folding leaves ``decode(encode(x))`` unchanged.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["fold_scale", "fold_threshold", "fold_sae", "encoder_bias"]

_TOPK_FAMILY = ("topk", "batchtopk", "abstopk", "matryoshka_batchtopk")


def _architecture(sae: SAE) -> str:
    cfg = getattr(sae, "cfg", None)
    arch = getattr(cfg, "architecture", None)
    if callable(arch):
        return str(arch())
    return str(arch) if arch is not None else "unknown"


def encoder_bias(sae: SAE) -> Tensor:
    """``[d_sae]`` the encoder bias that decides firing: ``b_enc`` (``b_gate`` for gated SAEs)."""
    for name in ("b_enc", "b_gate"):  # gated SAEs: the gate bias decides firing
        bias = getattr(sae, name, None)
        if isinstance(bias, Tensor):
            return bias
    raise ValueError(f"cannot fold an SAE of architecture {_architecture(sae)!r}: it has no b_enc")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def fold_scale(sae: SAE) -> Tensor:
    """``[d_sae]`` per-feature folding scale ``s`` (see the module docstring for the rules).

    JumpReLU: ``s = theta`` (``1/||W_dec[i]||`` where ``theta_i <= 0``); ReLU / gated /
    TopK with decoder-norm rescaling: ``s = 1/||W_dec[i]||``; other TopK variants: one
    shared ``s = 1/RMS(||W_dec[i]||)``. Features with a zero decoder row get ``s = 1``.
    """
    W_dec = sae.W_dec.detach()
    dtype = _compute_dtype(W_dec)
    dec_norm = W_dec.to(dtype).norm(dim=1)
    live = dec_norm > 0
    inv_norm = torch.where(live, 1.0 / dec_norm.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(dec_norm))
    threshold = getattr(sae, "threshold", None)
    if isinstance(threshold, Tensor):
        theta = threshold.detach().to(device=W_dec.device, dtype=dtype).expand_as(dec_norm)
        return torch.where(theta > 0, theta, inv_norm)
    arch = _architecture(sae)
    if arch in _TOPK_FAMILY and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rms = dec_norm[live].pow(2).mean().sqrt() if live.any() else dec_norm.new_tensor(1.0)
        return torch.full_like(dec_norm, float(1.0 / rms))
    return inv_norm


@torch.no_grad()
def fold_threshold(sae: SAE) -> tuple[Tensor, Tensor, Tensor]:
    """Folded parameters ``(W_enc' [d_in, d_sae], b_enc' [d_sae], W_dec' [d_sae, d_in])``.

    ``W_enc' = W_enc diag(1/s)``, ``b_enc' = b_enc / s``, ``W_dec' = diag(s) W_dec``
    with ``s = fold_scale(sae)``; for a JumpReLU SAE ``s = theta`` (SAE Match). Returned
    in float32 (float64 if the SAE is float64), on the SAE's device.
    """
    s = fold_scale(sae)
    dtype = s.dtype
    W_enc = sae.W_enc.detach().to(dtype) / s[None, :]
    b_enc = encoder_bias(sae).detach().to(dtype) / s
    W_dec = sae.W_dec.detach().to(dtype) * s[:, None]
    return W_enc, b_enc, W_dec


@torch.no_grad()
def fold_sae(sae: SAE) -> SAE:
    """A copy of ``sae`` (same class and config) with folded weights and threshold ``theta / s``.

    Its ``decode(encode(x))`` equals the original's up to rounding: for JumpReLU the
    copy is a unit-threshold JumpReLU, for ReLU / TopK-with-rescaling it has unit-norm
    decoder rows, for other TopK it is the original up to one common scale.
    """
    s = fold_scale(sae)
    W_enc, _, W_dec = fold_threshold(sae)
    out = copy.deepcopy(sae)

    def _set(name: str, value: Tensor) -> None:
        param = getattr(out, name)
        param.data = value.to(device=param.device, dtype=param.dtype).reshape(param.shape)

    _set("W_enc", W_enc)
    _set("W_dec", W_dec)
    for name in ("b_enc", "b_gate", "b_mag"):
        bias = getattr(out, name, None)
        if isinstance(bias, Tensor):
            _set(name, bias.detach().to(s.dtype) / s)
    threshold = getattr(out, "threshold", None)
    if isinstance(threshold, Tensor):
        _set("threshold", threshold.detach().to(s.dtype).expand_as(s) / s)
    return out
