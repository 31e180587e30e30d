"""Atomic file output and checked loading.

Every file saeot writes goes through here: it is written to a temporary file in
the same directory and renamed into place, so an interrupted run never leaves a
half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

try:  # POSIX only; elsewhere builds rely on the atomic rename alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


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
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_safetensors_checked(
    path: str | Path, required: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file; raise :class:`CorruptFileError` naming it if unreadable."""
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


COMPLETE_MARKER = "saeot_complete.json"
"""File written last into a cached directory (a converted model, a trained SAE); without it
the directory is never trusted. It records the source and the size of every file."""
CACHE_FORMAT = 1

# ---------------------------------------------------------------------------- atomic directories


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete_dir(directory: Path, source: dict[str, Any]) -> bool:
    """True iff ``directory`` has a completion marker for ``source`` and every file the
    marker lists is present with its recorded size (catches truncated copies)."""
    marker = _read_marker(directory)
    if marker is None or marker.get("format") != CACHE_FORMAT or marker.get("source") != source:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        try:
            if (directory / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Inter-process exclusive lock (POSIX ``flock``; a no-op where unavailable).

    Serialises conversions so that e.g. DDP ranks starting together convert once."""
    if fcntl is None:  # pragma: no cover - Windows: rely on atomic rename alone
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_dir_atomically(target: Path, source: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``target`` after making sure it is a complete build of ``source``.

    If ``target`` carries a valid completion marker it is returned untouched.
    Otherwise ``build(tmp)`` fills a fresh temporary directory next to ``target``, the
    marker (source + file sizes) is written last, and the directory is renamed onto
    ``target``; an incomplete ``target`` is moved aside and deleted, as are leftovers
    of interrupted builds. Readers therefore see either nothing or a complete
    directory. Builds are serialised across processes by a lock file.
    """
    target = Path(target)
    if is_complete_dir(target, source):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(parent / f".{target.name}.lock"):
        if is_complete_dir(target, source):  # built by another process meanwhile
            return target
        for leftover in parent.glob(f".{target.name}.*"):
            if leftover.is_dir() and leftover.suffix in (".tmp", ".stale"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        try:
            build(tmp)
            files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            marker = {"format": CACHE_FORMAT, "source": source, "files": files}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            if target.exists() or target.is_symlink():
                stale = parent / f".{target.name}.{uuid.uuid4().hex[:8]}.stale"
                os.replace(target, stale)
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
