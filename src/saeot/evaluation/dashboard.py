"""What ``evaluate.py`` sends to the configured logger (``logger=wandb`` offline by default,
``csv``, ``none``), one logger run per ``evaluate.py`` call (one run dir, or a sweep's run
dirs in one table), so a dashboard compares matchers side by side.

* metrics: every number of the evaluation's tables, keyed ``<table>/<row label>/<column>``
  (functional: ``functional/<matcher>/<a>-<b>/ev_sub``, ...), and for evaluations without
  tables (synthetic benchmark, circuit) every number of the result, keyed by its path;
* tables (wandb): each table of rows, as it is written to the evaluation directory;
* images (wandb): every plot under ``<out_dir>/plots``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

__all__ = ["TABLES", "table_metrics", "flat_numbers", "log_evaluation"]

log = logging.getLogger(__name__)

#: result key -> table name, for the evaluations that return rows (saeot.evaluation.functional.evaluate_runs)
TABLES = {"rows": "functional", "coverage_rows": "equal_coverage", "judge": "judge"}
_LABELS = ("matcher", "label", "run", "scenario")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _row_label(row: dict, i: int) -> str:
    label = next((str(row[k]) for k in _LABELS if k in row), f"row{i}")
    if "layer_a" in row and "layer_b" in row:
        label += f"/{row['layer_a']}-{row['layer_b']}"
    return label


def table_metrics(name: str, rows: list[dict]) -> dict[str, float]:
    """``{name/<row label>/<column>: value}`` for the finite numbers of ``rows``."""
    out = {}
    for i, row in enumerate(rows):
        label = _row_label(row, i)
        for k, v in row.items():
            if _number(v) and k not in ("layer_a", "layer_b"):
                out[f"{name}/{label}/{k}"] = float(v)
    return out


def flat_numbers(obj: Any, prefix: str = "", limit: int = 5000) -> dict[str, float]:
    """The finite numbers of a nested dict / list, keyed by their path (at most ``limit``)."""
    out: dict[str, float] = {}

    def walk(p: str, node: Any) -> None:
        if len(out) >= limit:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{p}/{k}" if p else str(k), v)
        elif isinstance(node, (list, tuple)) and len(node) <= 64:
            for i, v in enumerate(node):
                walk(f"{p}/{i}", v)
        elif _number(node):
            out[p] = float(node)

    walk(prefix, obj)
    return out


def log_evaluation(logger: Any, cfg: DictConfig, result: Any, out_dir: str | Path) -> dict[str, float]:
    """Send ``result`` (what the evaluation returned) and the plots of ``out_dir`` to ``logger``;
    returns the metrics logged. A failure to log is a warning: it never loses a finished evaluation."""
    if logger is None:
        return {}
    tables = {name: result[key] for key, name in TABLES.items()
              if isinstance(result, dict) and isinstance(result.get(key), list) and result[key]}
    metrics: dict[str, float] = {}
    for name, rows in tables.items():
        metrics.update(table_metrics(name, rows))
    if not tables:
        metrics = flat_numbers(result)
    try:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if metrics:
            logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            for name, rows in tables.items():
                columns = list(dict.fromkeys(k for r in rows for k in r))
                logger.log_table(key=name, columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            for png in sorted(Path(out_dir).glob("plots/*.png")):
                logger.log_image(key=png.stem, images=[str(png)])
        logger.save()
        if hasattr(logger, "finalize"):
            logger.finalize("success")
    except Exception as e:  # logging must never lose a finished evaluation
        log.warning("logging to %s failed: %s", type(logger).__name__, e)
    return metrics
