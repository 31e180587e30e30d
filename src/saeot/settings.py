"""One style for every group of settings: a frozen dataclass, checked once when it is built.

A component's settings are the fields of a dataclass (``MatcherConfig``, ``CircuitSettings``,
``LocalSAESettings``, ``LayerSettings``, ``ProfilingSettings``); the fields are the keys of its
yaml node, so ``callbacks.circuit.n_supernodes=4`` on the command line is the field
``n_supernodes``. The dataclass's ``__post_init__`` checks the values with :func:`check_types`
and its own rules, and every error is a ``ValueError`` whose first line names the yaml key
(``callbacks.circuit.keep_fraction=2.0 must be in (0, 1]``), the one line the CLI prints.
:func:`from_settings` builds one from keyword arguments, naming an unknown key the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

__all__ = ["check_types", "from_settings", "as_tuple"]

T = TypeVar("T")

#: annotations whose values :func:`check_types` checks, and the Python types each accepts
_PLAIN_TYPES = {name: types for base, types in (("int", (int,)), ("float", (int, float)), ("bool", (bool,)),
                                                  ("str", (str,)))
                for name in (base, f"{base}|None")}


def check_types(obj: Any, prefix: str) -> None:
    """Every field of the dataclass ``obj`` annotated with plain ``int`` / ``float`` / ``bool`` /
    ``str`` (``| None``) holds such a value (``{prefix}.{field}=abc`` is named, not a TypeError later).
    The annotations are read as strings (modules with ``from __future__ import annotations``)."""
    for f in fields(obj):
        allowed = _PLAIN_TYPES.get(str(f.type).replace(" ", ""))
        value = getattr(obj, f.name)
        if allowed is None or (value is None and "None" in str(f.type)):
            continue
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise ValueError(f"{prefix}.{f.name}={value!r} must be of type {f.type}")


def from_settings(cls: type[T], settings: Mapping[str, Any], prefix: str, what: str) -> T:
    """``cls(**settings)``; a key that is not a field of ``cls`` is a ValueError naming
    ``{prefix}.{key}`` (``what``: whose settings they are, for the message)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]} is not a setting of {what}; its settings: {sorted(known)}")
    return cls(**settings)


def as_tuple(value: Any, name: str, kind: type | tuple[type, ...] | None = None) -> tuple | None:
    """A list setting (a Python or Omegaconf list) as a tuple, None kept; with ``kind``, every
    item must be of that type (``name``: the yaml key, for the message)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}={value!r} must be a list")
    out = tuple(value)
    if kind is not None:
        bad = [v for v in out if isinstance(v, bool) or not isinstance(v, kind)]
        if bad:
            raise ValueError(f"{name}={list(out)!r} has {bad!r}, not of type "
                             f"{kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)}")
    return out
