"""Hook names: the one vocabulary for places in a model.

saeot names every place it reads a hidden state by its transformer_lens hook name,
``blocks.{layer}.hook_{site}`` (``blocks.3.hook_resid_post``). This module is the
only parser and builder of those names; everything else calls it.

A second SAE at the same hook (``sae_b=``: another width, seed or architecture) is keyed
``{hook}@b`` (:func:`sae_key`): every stage keys SAEs, samples and states by these keys,
and only the model's forward reads :func:`base_hook`, the hook itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "RESIDUAL_SITES",
    "SAE_TAG",
    "sae_key",
    "base_hook",
    "hook_name",
    "hook_layer",
    "hook_site",
    "stop_layer",
    "hook_sort_key",
    "sort_hooks_by_layer",
    "hooks_between",
]

#: sites whose activations are ``[batch, T, d_model]`` and that SAEs are trained on
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")

# ``blocks.{l}.<rest>``, also inside a longer name (``model.blocks.3.hook_resid_post``)
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(.+)$")

# position of a hook inside a transformer block, so that hooks of one layer sort in compute order
_POSITION = (
    ("hook_resid_pre", 0.0),
    ("ln1", 1.0),
    ("attn", 2.0),
    ("hook_z", 2.0),
    ("hook_attn_out", 2.5),
    ("hook_resid_mid", 3.0),
    ("ln2", 4.0),
    ("mlp", 5.0),
    ("hook_mlp_in", 4.5),
    ("hook_mlp_out", 5.5),
    ("hook_resid_post", 6.0),
)


#: separates a hook from the tag of a second SAE at that hook (``blocks.8.hook_resid_post@b``)
SAE_TAG = "@"


def sae_key(hook: str, tag: str) -> str:
    """The key of the SAE tagged ``tag`` at ``hook``: ``{hook}@{tag}``."""
    if not tag or SAE_TAG in tag or SAE_TAG in hook:
        raise ValueError(f"cannot tag hook {hook!r} with {tag!r}")
    return f"{hook}{SAE_TAG}{tag}"


def base_hook(key: str) -> str:
    """The model hook of an SAE key (``blocks.8.hook_resid_post@b`` -> ``blocks.8.hook_resid_post``)."""
    return key.split(SAE_TAG, 1)[0]


def hook_name(layer: int, site: str = "resid_post") -> str:
    """``blocks.{layer}.hook_{site}``; ``site`` may be given with or without ``hook_``."""
    return f"blocks.{int(layer)}.hook_{site.removeprefix('hook_')}"


def _split(hook: str) -> tuple[int, str]:
    m = _BLOCK_RE.search(base_hook(hook))
    if m is None:
        raise ValueError(f"unsupported hook name {hook!r}; expected blocks.<layer>.hook_resid_post or similar")
    return int(m.group(1)), m.group(2)


def hook_layer(hook: str) -> int:
    """Block index ``l`` of a hook name ``blocks.{l}.<...>``."""
    return _split(hook)[0]


def hook_site(hook: str) -> str:
    """What follows ``blocks.{l}.``: ``hook_resid_post``, ``ln2.hook_normalized``, ..."""
    return _split(hook)[1]


def stop_layer(hooks: Sequence[str]) -> int:
    """Smallest ``stop_at_layer`` that still computes every hook in ``hooks``
    (``resid_pre`` of block l is computed before block l runs; everything else inside it)."""
    need = 0
    for h in hooks:
        layer, site = _split(h)
        need = max(need, layer if site == "hook_resid_pre" else layer + 1)
    return need


def hook_sort_key(hook: str) -> tuple[int, float, str]:
    """``(layer, position inside the block, name)``: sorts hooks in the order the model computes them."""
    layer, site = _split(hook)
    position = 3.5  # unknown hooks: middle of the block
    for prefix, pos in _POSITION:
        if site.startswith(prefix):
            position = pos
    return layer, position, hook


def sort_hooks_by_layer(hooks: Iterable[str]) -> list[str]:
    """Distinct ``blocks.{l}.*`` hook names sorted by layer (then compute order inside the block)."""
    return sorted(set(hooks), key=hook_sort_key)


def hooks_between(hooks: Iterable[str], hook_a: str, hook_b: str) -> list[str]:
    """The hooks strictly between ``hook_a`` and ``hook_b``, in order from A to B.

    If A and B are the same kind of hook (same name after ``blocks.{l}.``), only hooks
    of that kind are kept (residual SAEs chain through residual SAEs). Hooks whose
    names carry no layer are ignored. Works in both directions (A after B: descending).
    """
    ka, kb = hook_sort_key(hook_a), hook_sort_key(hook_b)
    same_kind = hook_site(hook_a) == hook_site(hook_b)
    lo, hi = min(ka, kb), max(ka, kb)
    out = []
    for h in set(hooks):
        if h in (hook_a, hook_b) or _BLOCK_RE.search(h) is None:
            continue
        if same_kind and hook_site(h) != hook_site(hook_a):
            continue
        if lo < hook_sort_key(h) < hi:
            out.append(h)
    out.sort(key=hook_sort_key, reverse=ka > kb)
    return out
