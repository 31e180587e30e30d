"""Records of where an SAE came from, and loading an SAE back from its record without training.

A record is a small JSON-able dict, written into the run directory by ``train.py``
(``saes.json``) and read by ``evaluate.py``, which must never retrain:

* ``{"kind": "disk", "path": "/abs/dir"}``: a directory in sae_lens' format
  (``cfg.json`` + safetensors): a from-disk SAE or a locally trained SAE's cache entry;
* ``{"kind": "pretrained", "release": ..., "sae_id": ...}``: ``SAE.from_pretrained``.

Either may carry ``"dtype"`` (the dtype the SAE was loaded in).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_lens import SAE

from saeot.io import CorruptFileError

__all__ = ["disk_record", "pretrained_record", "load_recorded"]


def disk_record(path: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """The record of an SAE saved in sae_lens' format in directory ``path``."""
    rec: dict[str, Any] = {"kind": "disk", "path": str(Path(path).expanduser().resolve())}
    if dtype is not None:
        rec["dtype"] = dtype
    return rec


def pretrained_record(release: str, sae_id: str, dtype: str | None = None) -> dict[str, Any]:
    """The record of sae_lens' pretrained SAE ``(release, sae_id)``."""
    rec: dict[str, Any] = {"kind": "pretrained", "release": release, "sae_id": sae_id}
    if dtype is not None:
        rec["dtype"] = dtype
    return rec


def _load_disk(record: dict[str, Any], device: str) -> SAE:
    path = Path(record["path"])
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(
            f"the SAE directory {path} (recorded in the run's saes.json) is gone or has no cfg.json: "
            "rerun train.py to rebuild it"
        )
    try:
        return SAE.load_from_disk(path, device=device, dtype=record.get("dtype"))
    except Exception as e:  # sae_lens / safetensors raise several types on bad files
        raise CorruptFileError(f"cannot load the SAE in {path} ({e}); delete it and rerun train.py") from e


def _load_pretrained(record: dict[str, Any], device: str) -> SAE:
    return SAE.from_pretrained(record["release"], record["sae_id"], device=device,
                               dtype=record.get("dtype", "float32"))


#: record kind -> loader(record, device) -> SAE
_LOADERS: dict[str, Callable[[dict[str, Any], str], SAE]] = {"disk": _load_disk, "pretrained": _load_pretrained}


def load_recorded(record: dict[str, Any], device: str = "cpu") -> SAE:
    """The SAE a record describes, loaded (never trained).

    Raises:
        FileNotFoundError: a ``disk`` record whose directory is gone (names it; rerun train.py).
        CorruptFileError: the directory exists but cannot be loaded.
        ValueError: an unknown record kind.
    """
    kind = record.get("kind")
    if kind not in _LOADERS:
        raise ValueError(f"unknown SAE record kind {kind!r} in {record}; expected one of {sorted(_LOADERS)}")
    return _LOADERS[kind](record, str(device))
