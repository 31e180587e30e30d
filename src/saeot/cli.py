"""Hydra entry points: ``train.py`` / ``saeot-train`` and ``evaluate.py`` / ``saeot-evaluate``.

Bad settings end the run with one line naming the setting (exit code 2), before
any long work; ``SAEOT_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("saeot")


def _user_errors() -> tuple[type[BaseException], ...]:
    from saeot.data.text import EmptyCorpusError
    from saeot.io import CorruptFileError
    from saeot.matching.base import MatcherNotApplicable

    return (ValueError, KeyError, FileNotFoundError, EmptyCorpusError, CorruptFileError, MatcherNotApplicable,
            FloatingPointError)


def _guard(fn, cfg: DictConfig):
    try:
        return fn(cfg)
    except _user_errors() as e:
        if os.environ.get("SAEOT_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.debug("error", exc_info=True)
        print(f"saeot: error: {msg}", file=sys.stderr)
        sys.exit(2)


def _train(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from saeot.pipeline import run_train

    run = run_train(cfg, HydraConfig.get().runtime.output_dir)
    return run.metrics


def _evaluate(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from saeot.evaluation.runner import run_evaluate

    return run_evaluate(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig):
    return _guard(_train, cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def evaluate_main(cfg: DictConfig):
    return _guard(_evaluate, cfg)
