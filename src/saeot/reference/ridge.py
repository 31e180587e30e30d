"""Ridge: closed-form per-layer regression onto the top-r PCA coordinates of a reference layer.

Target ``T = Z_ref U_r`` (``U_r`` the top-r right singular vectors of the reference
layer's standardised states ``Z_ref``); each layer's map is the ridge regression
``W_l = (Z_l^T Z_l + lam n I)^-1 Z_l^T T`` and ``phi_l(x) = z_l(x) W_l``. Undoes any
linear change of basis between layers that the tokens pin down.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeot.hooks import hook_layer
from saeot.reference.base import ReferenceSpace, check_aligned

__all__ = ["Ridge"]


class Ridge(ReferenceSpace):
    """Closed-form ridge maps onto the top-``dim`` PCA coordinates of a reference layer.

    Args:
        dim: r, the reference space's width (capped at d).
        reference: which layer defines the target: ``first``, ``last``, ``middle`` or a hook name.
        lam: ridge strength, relative (``lam * n`` is added to ``Z^T Z``, Z standardised).
    """

    name = "ridge"

    def __init__(self, dim: int = 64, reference: str = "middle", lam: float = 1e-3) -> None:
        super().__init__()
        self.r, self.reference, self.lam = dim, reference, lam
        self.W: dict[str, Tensor] = {}

    def reference_hook(self, hooks: list[str]) -> str:
        ordered = sorted(hooks, key=hook_layer)
        if self.reference == "first":
            return ordered[0]
        if self.reference == "last":
            return ordered[-1]
        if self.reference == "middle":
            return ordered[(len(ordered) - 1) // 2]
        if self.reference in hooks:
            return self.reference
        raise ValueError(f"reference.reference={self.reference!r}: use first, last, middle or one of {hooks}")

    def fit(self, states: dict[str, Tensor]) -> "Ridge":
        n = check_aligned(states)
        z = self._standardize_fit(states)
        ref = self.reference_hook(list(states))
        d = z[ref].shape[1]
        r = min(self.r, d, n)
        # top-r principal directions of the reference layer
        _, _, vh = torch.linalg.svd(z[ref], full_matrices=False)
        target = z[ref] @ vh[:r].T  # [n, r]
        for h, zh in z.items():
            gram = zh.T @ zh + self.lam * n * torch.eye(zh.shape[1], dtype=zh.dtype)
            self.W[h] = torch.linalg.solve(gram, zh.T @ target).float()
        self.dim = r
        return self

    def transform(self, hook: str, x: Tensor) -> Tensor:
        if hook not in self.W:
            raise KeyError(f"ridge reference space was not fitted on {hook}")
        return self.standardize(hook, x) @ self.W[hook].to(x)

    def tensors(self) -> dict[str, Tensor]:
        out = super().tensors()
        out.update({f"{h}/W": w for h, w in self.W.items()})
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_tensors({k: v for k, v in tensors.items() if not k.endswith("/W")})
        self.W = {k.rsplit("/", 1)[0]: v for k, v in tensors.items() if k.endswith("/W")}
