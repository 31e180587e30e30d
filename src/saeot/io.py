"""Atomic file output and checked loading.

Every file saeot writes goes through here: it is written to a temporary file in
the same directory and renamed into place, so an interrupted run never leaves a
half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor


class CorruptFileError(RuntimeError):
    """A cache or output file exists but cannot be read back."""


def default_cache_dir() -> Path:
    """``$SAEOT_CACHE`` if set, else ``~/.cache/saeot``."""
    env = os.environ.get("SAEOT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saeot"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for tensors and numpy values: scalars via ``item()``, arrays via ``tolist()``."""
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def update_json(path: str | Path, key: str, value: Any) -> dict:
    """Set ``key`` in the JSON object at ``path`` (created if missing), atomically."""
    path = Path(path)
    data = read_json(path) if path.exists() else {}
    data[key] = value
    atomic_write_json(path, data)
    return data


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); delete it and rerun") from e


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_safetensors_checked(
    path: str | Path, required: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file; raise :class:`CorruptFileError` naming it if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several exception types on bad files
        raise CorruptFileError(f"cannot read {path} ({e}); delete it and rerun") from e
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CorruptFileError(f"{path} lacks tensors {missing}; delete it and rerun")
    return tensors, meta
