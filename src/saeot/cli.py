"""Hydra entry points: ``train.py`` / ``saeot-train``, ``evaluate.py`` / ``saeot-evaluate`` and
``rematch.py`` / ``saeot-rematch``.

Bad settings end the run with one line naming the setting (exit code 2), before
any long work; ``SAEOT_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from saeot.data.text import EmptyCorpusError
from saeot.evaluation.judge import JudgeUnreachable
from saeot.evaluation.runner import run_evaluate
from saeot.hub import HubUnreachable
from saeot.io import CorruptFileError, read_json
from saeot.matching.base import MatcherNotApplicable
from saeot.pipeline import run_train
from saeot.pipeline.completion import is_complete_run
from saeot.pipeline.rematch import run_rematch

#: the Hydra configs, shipped inside the package (in a checkout, src/saeot/conf links to conf/)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
log = logging.getLogger("saeot")

#: errors that come from the user's settings or files: one line, exit code 2
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, EmptyCorpusError, CorruptFileError, MatcherNotApplicable,
    FloatingPointError, HubUnreachable, JudgeUnreachable,
)


def path_slug(text: str, max_len: int = 120) -> str:
    """``text`` (e.g. Hydra's ``matcher=semantic_ot,data.text.paths=[/d/*.txt]``) as one path
    component of ``[A-Za-z0-9._-]`` only: ``=`` -> ``-``, ``,`` -> ``__``, anything else -> ``_``."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", text.replace("=", "-").replace(",", "__"))
    slug = re.sub(r"_{3,}", "__", slug).strip("._")
    return slug[:max_len] or "job"


if not OmegaConf.has_resolver("saeot_slug"):
    OmegaConf.register_new_resolver("saeot_slug", path_slug)


def _guard(fn, cfg: DictConfig):
    try:
        return fn(cfg)
    except USER_ERRORS as e:
        if os.environ.get("SAEOT_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.debug("error", exc_info=True)
        print(f"saeot: error: {msg}", file=sys.stderr)
        sys.exit(2)


def _train(cfg: DictConfig) -> dict:
    out_dir = HydraConfig.get().runtime.output_dir
    if cfg.get("resume") and is_complete_run(out_dir, cfg):  # a resumed sweep skips its finished jobs
        log.info("resume: %s already holds this run, finished; skipped (resume=false reruns it)", out_dir)
        return read_json(Path(out_dir) / "metrics.json")
    return run_train(cfg, out_dir).metrics


def _evaluate(cfg: DictConfig):
    return run_evaluate(cfg, HydraConfig.get().runtime.output_dir)


def _rematch(cfg: DictConfig) -> dict:
    return run_rematch(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig):
    return _guard(_train, cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def evaluate_main(cfg: DictConfig):
    return _guard(_evaluate, cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rematch")
def rematch_main(cfg: DictConfig):
    return _guard(_rematch, cfg)
