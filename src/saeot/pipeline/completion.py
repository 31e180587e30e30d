"""The completion marker of a run directory: written last, atomically, by ``train.py``.

``.saeot_complete`` holds the run-dir format and a hash of the run's resolved config.
A run directory without it is unfinished (killed, or still running): ``evaluate.py``
refuses it, and with ``resume=true`` ``train.py`` redoes it, while a directory whose
marker matches the config is skipped (a resumed sweep redoes only its unfinished jobs).
A run starts by removing the marker, so a rerun that is killed is never taken for
the finished run it replaces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saeot.io import atomic_write_json

__all__ = ["RUN_MARKER", "RUN_FORMAT", "config_hash", "clear_complete", "mark_complete", "read_marker",
           "is_complete_run"]

RUN_MARKER = ".saeot_complete"
#: the layout of a run directory this saeot writes and reads (raise when files change meaning)
RUN_FORMAT = 1
#: settings that do not change a run's results
_VOLATILE = ("resume",)


def config_hash(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of the resolved config without :data:`_VOLATILE` keys."""
    try:
        data: Any = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # interpolations that need Hydra's runtime (outside train.py)
        data = OmegaConf.to_container(cfg, resolve=False)
    for key in (*_VOLATILE, "hydra"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clear_complete(run_dir: str | Path) -> None:
    (Path(run_dir) / RUN_MARKER).unlink(missing_ok=True)


def mark_complete(run_dir: str | Path, cfg: DictConfig) -> None:
    """Write the marker (call after every other output is in place)."""
    atomic_write_json(Path(run_dir) / RUN_MARKER, {"format": RUN_FORMAT, "config_hash": config_hash(cfg)})


def read_marker(run_dir: str | Path) -> dict | None:
    """The marker's content, or None when it is missing or unreadable."""
    try:
        marker = json.loads((Path(run_dir) / RUN_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete_run(run_dir: str | Path, cfg: DictConfig) -> bool:
    """True iff ``run_dir`` holds a finished run of exactly ``cfg`` in this format."""
    marker = read_marker(run_dir)
    return bool(marker) and marker.get("format") == RUN_FORMAT and marker.get("config_hash") == config_hash(cfg)
