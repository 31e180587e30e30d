"""``CircuitCompression``: find a task's feature circuit after matching and compress it.

Wired by ``conf/callbacks/circuit.yaml``; ``python train.py circuit=ioi callbacks=circuit``.
Its settings are a :class:`~saeot.circuits.compression.CircuitSettings` (the yaml keys, checked
when the callback is built: a wrong one stops the run before the model is loaded, naming
``callbacks.circuit.<key>``). After the pipeline has profiled the features and projected them
into the reference space it calls :meth:`CircuitCompression.on_matching_end` with the run,
which hands the work to :class:`~saeot.circuits.compression.CircuitCompressor` (the same object
``evaluate.py evaluation=circuit`` uses, :mod:`saeot.evaluation.circuit_run`): the circuit,
its supernodes, faithfulness, curves, ``circuit.json`` and the ``"circuit"`` entry of
``metrics.json``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L

from saeot.circuits.compression import CircuitCompressor, CircuitSettings, LowAccuracyError
from saeot.pipeline.callbacks import RunCallback
from saeot.pipeline.state import TrainResult

if TYPE_CHECKING:
    from saeot.models.language_model import LanguageModel

log = logging.getLogger(__name__)

__all__ = ["CircuitCompression", "LowAccuracyError"]


class CircuitCompression(L.Callback, RunCallback):
    """Feature circuit of ``task`` at the run's SAE hooks, compressed into supernodes.

    Built from its settings, ``CircuitCompression(task=IOITask(), n_supernodes=4)`` (what Hydra's
    ``conf/callbacks/circuit.yaml`` does: the fields of
    :class:`~saeot.circuits.compression.CircuitSettings`), or from ready settings,
    ``CircuitCompression(settings)``; they live in ``self.settings``. An unknown or wrong
    setting is a ValueError naming it.
    """

    key = "circuit"
    settings_class: ClassVar[type[CircuitSettings]] = CircuitSettings

    def __init__(self, settings: CircuitSettings | None = None, **kwargs: Any) -> None:
        super().__init__()
        if settings is None:
            settings = CircuitSettings.from_settings(**kwargs)
        elif kwargs:
            raise TypeError("CircuitCompression: pass either a CircuitSettings or settings, not both")
        self.compressor = CircuitCompressor(settings)
        self.settings = settings

    # ------------------------------------------------------------------ pipeline hooks
    def check(self, lm: LanguageModel) -> None:
        """Before any forward pass (``train.py``'s setup stage): build the task with the model's
        codec, so that an unusable task (answers of several tokens, prompts of unequal length
        in a JSONL file) fails at once."""
        if getattr(self, "_checked", None) is not lm:
            self.settings.task.build(lm)
            self._checked = lm

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning hook, before the first streaming pass: build the task with the
        model's codec so that an unusable task (no single-token answers, bad JSONL)
        fails now, not after profiling."""
        lm = getattr(getattr(trainer, "datamodule", None), "lm", None)
        if lm is not None and getattr(self, "_checked", None) is not lm:
            self.settings.task.build(lm)
            self._checked = lm

    def on_matching_end(self, result: TrainResult) -> dict:
        """Called on rank 0 by :func:`saeot.pipeline.run_train` with the finished run; the
        returned metrics go to ``metrics.json["circuit"]``."""
        metrics = self.compressor.run(result.lm, result.saes, result.projected, result.run_dir,
                                      hooks=list(self.settings.hooks or result.hooks))
        self._log(result.logger, metrics)
        return metrics

    @staticmethod
    def _log(logger: Any, metrics: dict) -> None:
        if logger is None:
            return
        flat = {}

        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}/{k}", v)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat[f"{prefix}/{k}"] = v

        walk("circuit", metrics)
        try:
            logger.log_metrics(flat)
        except Exception as e:  # logging must never lose a finished circuit
            log.warning("logging circuit metrics to %s failed: %s", type(logger).__name__, e)
