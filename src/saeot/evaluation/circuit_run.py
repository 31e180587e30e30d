"""The circuit of a task on a finished run's SAEs, without running ``train.py`` again:
``python evaluate.py evaluation=circuit run_dir=DIR circuit=ioi callbacks=circuit``.

The run directory gives the model (its ``model`` config), its SAEs (``saes.json``, never
retrained) and its feature samples projected by its fitted reference space (what the
supernodes' semantic distance reads); :class:`saeot.circuits.compression.CircuitCompressor`
(what the ``train.py`` callback runs too) does the rest with the ``callbacks.circuit`` settings of
the ``evaluate.py`` line (a :class:`~saeot.circuits.compression.CircuitSettings`).
Outputs go to the evaluation dir: ``circuit.json``, ``circuit_curves.png``, ... and
``metrics.json["circuit"]`` (with the run dir it came from).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from saeot.circuits.callback import CircuitCompression
from saeot.circuits.compression import CircuitCompressor
from saeot.io import update_json
from saeot.pipeline.config import build
from saeot.pipeline.rundir import RunDir

__all__ = ["evaluate_circuit"]

log = logging.getLogger(__name__)


def evaluate_circuit(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """The ``callbacks.circuit`` compression of ``circuit=`` on the run at ``cfg.run_dir``, into ``out_dir``."""
    node = (cfg.get("callbacks") or {}).get("circuit")
    if node is None:
        raise ValueError("evaluation=circuit needs callbacks=circuit (and a task: circuit=ioi | sva | jsonl ...)")
    if not cfg.get("run_dir"):
        raise ValueError("evaluation=circuit needs run_dir=<a finished train.py run>")
    callback = build(node)
    if not isinstance(callback, CircuitCompression):
        raise TypeError(f"callbacks.circuit builds a {type(callback).__name__}, not a CircuitCompression")
    settings = callback.settings
    run = RunDir.load(cfg.run_dir)
    lm = run.load_model()
    settings.task.build(lm)  # an unusable task fails before the SAEs and samples are read
    saes = run.load_saes(next(lm.model.parameters()).device)
    hooks = list(settings.hooks or run.hooks)
    samples = run.projected_samples(hooks)
    out_dir = Path(out_dir)
    metrics = CircuitCompressor(settings).run(lm, saes, samples, out_dir, hooks=hooks)
    metrics["run_dir"] = str(run.path)
    update_json(out_dir / "metrics.json", "circuit", metrics)
    log.info("circuit of %s on %s -> %s", metrics.get("task"), run.path, out_dir)
    return metrics
