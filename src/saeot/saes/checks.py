"""Checks of loaded SAEs against the model they are applied to (run before any long work)."""

from __future__ import annotations

from typing import Any

from sae_lens import SAE

__all__ = ["check_sae_widths"]


def check_sae_widths(saes: dict[str, SAE], lm: Any) -> None:
    """Raise if an SAE's ``d_in`` differs from the width of its hook."""
    d_model = lm.model.cfg.d_model
    for hook, sae in saes.items():
        if sae.cfg.d_in != d_model:
            raise ValueError(
                f"sae for {hook} has d_in={sae.cfg.d_in} but the model's {hook} has width {d_model}: "
                "check sae= (release / path) against model="
            )
