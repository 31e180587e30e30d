"""``train.py``'s run: it profiles, fits the reference space and matches (it trains no model;
SAEs it lacks are trained in setup): the stages in order, then the outputs (rank 0 writes them)."""

from __future__ import annotations

import contextlib
import csv
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from saeot.io import update_json
from saeot.matching.flows import build_flows, write_flows
from saeot.matching.splits import write_run_splits
from saeot.pipeline.artifacts import save_artifacts
from saeot.pipeline.callbacks import RunCallback
from saeot.pipeline.completion import clear_complete, mark_complete
from saeot.pipeline.config import build
from saeot.pipeline.resources import StageClock
from saeot.pipeline.stages import fit_reference, match, setup, stream, trainer_shard
from saeot.pipeline.summary import format_run_summary, write_summary
from saeot.pipeline.state import TrainResult
from saeot.plots import plot_run
from saeot.progress import trainer_progress_callbacks

__all__ = ["run_train", "log_run"]

log = logging.getLogger(__name__)

#: warnings of the Lightning passes that a user cannot act on: (category, regex of the message's start)
LIGHTNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # Lightning's own pytree code builds torch's deprecated LeafSpec
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # StreamPass.predict_step returns None on purpose: its consumers keep what the passes see
    (UserWarning, r"predict returned None if it was on purpose"),
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """The Trainer's passes without the :data:`LIGHTNING_NOISE` warnings (every other warning shows)."""
    with warnings.catch_warnings():
        for category, message in LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def run_train(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """The whole ``train.py`` run; returns the :class:`TrainResult` (rank 0 writes the outputs)."""
    t_start = time.perf_counter()
    clock = StageClock()
    torch.manual_seed(cfg.seed)
    clear_complete(run_dir)  # a rerun in a finished run's directory is unfinished until it ends
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    with clock.stage("setup"):  # model, data, SAEs (trained here when not cached)
        run = setup(cfg, run_dir, checks=[c.check for c in callbacks if isinstance(c, RunCallback)])
    logger = build(cfg.logger) if cfg.get("logger") else None
    with quiet_lightning():
        trainer = build(cfg.trainer, logger=logger or False,
                        callbacks=[c for c in callbacks if isinstance(c, L.Callback)] + trainer_progress_callbacks(cfg.trainer))
        log.info("stage: profiling")
        with clock.stage("profiling"):
            streams = stream(run, trainer)
        log.info("stage: reference space")
        with clock.stage("reference"):
            reference = fit_reference(cfg, streams, logger)
    log.info("stage: matching")
    with clock.stage("matching"):
        matches = match(run, streams, reference, shard=trainer_shard(trainer))
    result = TrainResult(setup=run, streams=streams, reference=reference, matches=matches, logger=logger,
                         metrics={"profiling": streams.metrics, "reference": reference.metrics,
                                  "matching": matches.metrics})
    flows = build_flows(matches.results, alive={h: s.alive for h, s in streams.samples.items()})
    result.metrics["flows"] = flows.summary()
    if trainer.is_global_zero:
        with clock.stage("callbacks"):  # e.g. the circuit compression
            for cb in callbacks:
                if isinstance(cb, RunCallback):
                    out = cb.on_matching_end(result)
                    if out is not None:
                        result.metrics[cb.key] = out
        result.metrics["seconds_total"] = time.perf_counter() - t_start
        log.info("stage: writing outputs")
        with clock.stage("outputs"):
            save_artifacts(result)
            write_flows(flows, result.run_dir / "flows.csv")
            plots = plot_run(result, flows)
            splits = write_run_splits(result.results, result.samples.__getitem__, result.run_dir)
            if splits is not None:  # two SAEs of one hook (sae_b)
                result.metrics["splits"], plots["splits"] = splits
        result.metrics["resources"] = clock.summary()
        for key, value in result.metrics.items():
            update_json(result.run_dir / "metrics.json", key, value)
        log_run(result, plots)
        summary = run_summary(result)
        write_summary(summary, result.run_dir)
        mark_complete(result.run_dir, cfg)  # last: the run dir is finished
        log.info("wrote %s", result.run_dir)
        print(summary, flush=True)
    return result


def run_summary(result: TrainResult) -> str:
    """The terminal summary of a finished run (:mod:`saeot.pipeline.summary`) with the next commands."""
    d = result.run_dir
    return format_run_summary(result.results, result.samples, result.lm.codec, d, next_commands=(
        f"python evaluate.py run_dir={d}   # substitution, co-activation, equal coverage, report.html",
        f"python rematch.py -m run_dir={d} matcher=sae_match,feature_flow,activation_correlation   # the baselines",
    ))


def log_run(result: TrainResult, plots: dict[str, Path]) -> None:
    """Metrics, the matches table and the plots to the configured logger (wandb / csv)."""
    logger = result.logger
    if logger is None:
        return
    flat = {}
    for pair, s in result.metrics.get("matching", {}).get("pairs", {}).items():
        for k, v in s.items():
            if isinstance(v, (int, float)):
                flat[f"match/{pair}/{k}"] = v
    try:
        logger.log_hyperparams(OmegaConf.to_container(result.cfg, resolve=True))
        logger.log_metrics(flat)
        if isinstance(logger, WandbLogger):
            with open(result.run_dir / "matches.csv") as f:
                rows = list(csv.reader(f))
            logger.log_table(key="matches", columns=rows[0], data=rows[1:20001])
            for name, path in plots.items():
                logger.log_image(key=name, images=[str(path)])
        logger.save()
    except Exception as e:  # logging must never lose a finished run
        log.warning("logging to %s failed: %s", type(logger).__name__, e)
