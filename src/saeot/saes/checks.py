"""Checks of loaded SAEs against the model they are applied to (run before any long work)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from sae_lens import SAE

from saeot.hooks import base_hook

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

__all__ = ["check_sae_widths", "check_saes"]

_TL_HOOK = re.compile(r"^blocks\.\d+\.hook_\w+$")


def check_sae_widths(saes: dict[str, SAE], lm: LanguageModel) -> None:
    """Raise if an SAE's ``d_in`` differs from the width of its hook."""
    d_model = lm.model.cfg.d_model
    for hook, sae in saes.items():
        if sae.cfg.d_in != d_model:
            raise ValueError(
                f"sae for {hook} has d_in={sae.cfg.d_in} but the model's {hook} has width {d_model}: "
                "check sae= (release / path) against model="
            )


def check_saes(saes: dict[str, SAE], lm: LanguageModel) -> None:
    """Widths (:func:`check_sae_widths`), the hook each SAE was made for (when its metadata
    names a ``blocks.<l>.hook_<site>`` hook, it must be the run's), and finite weights."""
    check_sae_widths(saes, lm)
    for hook, sae in saes.items():
        own = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if isinstance(own, str) and _TL_HOOK.match(own) and own != base_hook(hook):
            raise ValueError(f"sae for {hook} was made for {own}: set layers.site / layers.ids to match it, "
                             "or pick the SAE of that hook (sae.sae_id / sae.path)")
        for name, p in sae.named_parameters():
            bad = ~torch.isfinite(p)
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise FloatingPointError(f"sae for {hook} has {int(bad.sum())} non-finite value(s) in {name} "
                                         f"(first at {list(first)}): check sae= (release / path), or delete the cached "
                                         "SAE under paths.cache_dir")
