"""Layer substitution (SAE Match, Eq. 5): A's SAE codes through a partial permutation into
B's decoder, the forward pass from the replaced hook, and the streaming sums of its
explained variance and next-token cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.hooks import hook_layer
from saeot.saes import fold_scale

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

__all__ = ["code_ratio", "substitute_codes", "run_from_hook", "next_token_ce", "SubstitutionAccumulator"]


def code_ratio(sae_a: SAE, sae_b: SAE, oto_a: Tensor, oto_b: Tensor, mode: str) -> Tensor:
    """``[M']`` factor applied to A's code before B's decoder: ``s^B_j / s^A_i`` (fold) or 1."""
    if mode == "none":
        return torch.ones(oto_a.numel())
    s_a, s_b = fold_scale(sae_a).float().cpu(), fold_scale(sae_b).float().cpu()
    return s_b[oto_b] / s_a[oto_a]


def substitute_codes(codes_a: Tensor, oto_a: Tensor, oto_b: Tensor, ratio: Tensor, d_sae_b: int) -> Tensor:
    """``[..., F_a] -> [..., F_b]``: ``P f^A`` with ``P`` the partial permutation ``oto_a -> oto_b``
    (times ``ratio``); B features without a partner get 0."""
    out = codes_a.new_zeros(*codes_a.shape[:-1], d_sae_b)
    out[..., oto_b] = codes_a[..., oto_a] * ratio.to(codes_a)
    return out


def run_from_hook(model: HookedTransformer, hook: str, value: Tensor, tokens: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of ``model`` when the activation at ``hook`` is replaced by
    ``value [B, T, d]``. Residual-stream hooks start the forward pass right there
    (``start_at_layer``: layers before the hook are not recomputed); other hooks run the
    whole model with a replacing hook."""
    value = value.to(next(model.parameters()).dtype)
    if is_residual(hook):
        return model(value, start_at_layer=resid_position(hook), return_type="logits")
    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, lambda act, hook: value)])


def run_between(model: HookedTransformer, hook_a: str, hook_b: str, value: Tensor) -> Tensor:
    """``[n, T, d]`` float32 states at ``hook_b`` when the residual stream at ``hook_a`` is ``value
    [n, T, d]`` (both residual-stream hooks, B after A): only the blocks between them run."""
    for h in (hook_a, hook_b):
        if not is_residual(h):
            raise ValueError(f"run_between needs residual-stream hooks, got {h}")
    start, stop = resid_position(hook_a), resid_position(hook_b)
    if stop < start:
        raise ValueError(f"run_between: {hook_b} comes before {hook_a}")
    value = value.to(next(model.parameters()).dtype)
    return model(value, start_at_layer=start, stop_at_layer=stop).float()


def is_residual(hook: str) -> bool:
    """``hook`` is on the residual stream (``hook_resid_pre`` / ``hook_resid_post``)."""
    return hook.endswith(("hook_resid_post", "hook_resid_pre"))


def resid_position(hook: str) -> int:
    """The block a residual-stream ``hook``'s state enters (``start_at_layer`` / ``stop_at_layer``):
    layer + 1 after ``hook_resid_post``, layer for ``hook_resid_pre``."""
    return hook_layer(hook) + (1 if hook.endswith("hook_resid_post") else 0)


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[B, T, V], [B, T] -> [B, T-1]`` cross-entropy (nats) of token t+1 given positions <= t."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)



@dataclass
class SubstitutionAccumulator:
    """Sums for EV and CE of one replacement of ``h^B`` (float64)."""

    sse: float = 0.0
    ce_sum: float = 0.0

    def update(self, h: Tensor, h_hat: Tensor, mask: Tensor, ce: Tensor, ce_mask: Tensor) -> None:
        self.sse += float((h - h_hat)[mask].double().pow(2).sum())
        self.ce_sum += float(ce[ce_mask].double().sum())

    def result(self, sst: float, n_ce: int, ce_clean: float) -> dict:
        ce = self.ce_sum / max(n_ce, 1)
        return {"explained_variance": 1.0 - self.sse / sst if sst > 0 else float("nan"),
                "ce": ce, "delta_ce": ce - ce_clean}

