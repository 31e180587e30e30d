"""Standardize: each layer centred and divided by its RMS norm; no change of basis."""

from __future__ import annotations

from torch import Tensor

from saeot.reference.base import ReferenceSpace, check_aligned

__all__ = ["Standardize"]


class Standardize(ReferenceSpace):
    """``phi_l(x) = (x - m_l) / s_l`` with ``s_l^2 = E||x - m_l||^2 / d``; ``r = d``."""

    name = "standardize"

    def fit(self, states: dict[str, Tensor]) -> "Standardize":
        check_aligned(states) if len(states) > 1 else None
        self._standardize_fit(states)
        self.dim = next(iter(states.values())).shape[1]
        return self

    def transform(self, hook: str, x: Tensor) -> Tensor:
        return self.standardize(hook, x)
