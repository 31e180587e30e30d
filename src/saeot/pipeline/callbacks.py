"""The typed hook for work that runs on a finished match (e.g. circuit compression).

A Hydra ``callbacks:`` entry may be a Lightning ``Callback`` (it then also joins the
Trainer, e.g. to check its inputs in ``setup`` before the long passes), a
:class:`RunCallback`, or both. After matching, every :class:`RunCallback` gets the
typed :class:`~saeot.pipeline.state.TrainResult`; what it returns is stored under
its ``key`` in ``metrics.json``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from saeot.pipeline.state import TrainResult

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

__all__ = ["RunCallback"]


class RunCallback(ABC):
    """Runs after the matching stage on rank 0; returns metrics for ``metrics.json[key]``."""

    #: the key of ``metrics.json`` under which the returned metrics are stored
    key: str = "callback"

    def check(self, lm: LanguageModel) -> None:
        """Check the callback's inputs against the loaded model, before any forward pass
        (:func:`saeot.pipeline.stages.setup`); raise an error naming the setting."""

    @abstractmethod
    def on_matching_end(self, result: TrainResult) -> dict[str, Any] | None:
        """Do the work on the finished run (its directory is ``result.run_dir``)."""
