"""Progress bars that stay readable in a log file.

On a terminal a bar redraws itself in place. When stderr is a file or a pipe (a batch
job's log), each redraw would add a carriage-return update, thousands per pass; there
a bar updates at most every :data:`LOG_INTERVAL_S` seconds and leaves its final state
as one line. Every tqdm bar in saeot comes from :func:`progress_bar`; the Lightning
Trainer gets its bar from :func:`trainer_progress_callbacks`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "interactive", "progress_bar", "trainer_progress_callbacks"]

#: seconds between two updates of a bar written to a file
LOG_INTERVAL_S = 30.0


def interactive() -> bool:
    """Whether stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, off when not ``enabled``; when stderr is not a terminal
    it redraws at most every :data:`LOG_INTERVAL_S` seconds and keeps its last line."""
    kwargs["disable"] = kwargs.get("disable", False) or not enabled
    if not interactive():
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_INTERVAL_S)
        kwargs["leave"] = True  # erasing a closed bar writes control characters into the log
        kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, **kwargs)


def trainer_progress_callbacks(trainer_cfg: DictConfig | dict | None) -> list:
    """The Trainer's progress bar when stderr is not a terminal: Lightning's Rich bar, which
    writes one line per pass to a file (its TQDM bar would write an update per batch).
    Empty on a terminal or with ``trainer.enable_progress_bar=false`` (Lightning's default then)."""
    enabled = True if trainer_cfg is None else bool(trainer_cfg.get("enable_progress_bar", True))
    if not enabled or interactive():
        return []
    from lightning.pytorch.callbacks import RichProgressBar  # slow import; tqdm-only users never need it

    return [RichProgressBar()]
