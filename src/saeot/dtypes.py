"""Torch dtypes by name: the one table and resolver for every ``*.dtype`` setting."""

from __future__ import annotations

from collections.abc import Collection

import torch

__all__ = ["DTYPES", "resolve_dtype"]

#: config names (lower case, without ``torch.``) of the dtypes saeot accepts
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(
    dtype: str | torch.dtype,
    setting: str = "dtype",
    allowed: Collection[torch.dtype] | None = None,
) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` / ``"float64"`` (or a torch dtype).

    Args:
        dtype: a name from :data:`DTYPES` (case-insensitive, ``torch.`` prefix allowed)
            or a ``torch.dtype``.
        setting: the config setting that holds ``dtype`` (``"model.dtype"``,
            ``"matcher.dtype"``), named in the error.
        allowed: the dtypes this caller supports (default: any torch dtype given as
            such, any name in :data:`DTYPES`).

    Raises ValueError ``{setting}={dtype!r} is not one of [...]`` otherwise.
    """
    names = DTYPES if allowed is None else {k: v for k, v in DTYPES.items() if v in allowed}
    if isinstance(dtype, torch.dtype):
        if allowed is None or dtype in allowed:
            return dtype
    else:
        key = str(dtype).removeprefix("torch.").lower()
        if key in names:
            return names[key]
    raise ValueError(f"{setting}={dtype!r} is not one of {sorted(set(names))}")
