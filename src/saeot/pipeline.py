"""``train.py``: profile features, fit the reference space, match layer pairs.

Order of work (every check that can fail on bad input runs before the first
forward pass of the model):

1. load the model; check the layers; build the data module and tokenise (empty
   corpus?); check the SAE settings; load or train SAEs; check their widths;
2. profile every feature over the ``profile`` split (one streaming pass);
3. over the ``held-out`` split: hidden states of the same tokens at every layer
   (reference space) and, if the matcher needs it, activation correlations;
4. fit the reference space, project the feature distributions;
5. match every configured layer pair; write ``matches.csv``, ``metrics.json``,
   plots; log them.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from saeot.hooks import hook_layer, hook_name
from saeot.io import atomic_path, update_json
from saeot.matching.base import MatchContext
from saeot.types import FeatureSamples, MatchResult

log = logging.getLogger(__name__)

MATCH_COLUMNS = ["layer_a", "feature_a", "layer_b", "feature_b", "distance", "margin", "matched"]


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


def build(node: Any, *, partial: bool = False, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the error of the target itself (Hydra wraps
    it in an InstantiationException, hiding the one line that names the setting)."""
    from hydra.errors import InstantiationException

    try:
        if partial:
            return instantiate(node, _partial_=True)
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# ---------------------------------------------------------------------------- layers
def layer_ids(cfg: DictConfig) -> list[int]:
    ids = list(cfg.layers.ids)
    if not ids:
        raise ConfigError("layers.ids is empty")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"layers.ids={ids} has repeats")
    return sorted(int(i) for i in ids)


def layer_pairs(cfg: DictConfig, ids: list[int]) -> list[tuple[int, int]]:
    """``layers.pairs``: ``adjacent``, ``all_to_first``, ``all_to_last``, or a list of [a, b]."""
    spec = cfg.layers.pairs
    if isinstance(spec, str):
        if spec == "adjacent":
            pairs = list(zip(ids[:-1], ids[1:]))
        elif spec == "all_to_first":
            pairs = [(ids[0], b) for b in ids[1:]]
        elif spec == "all_to_last":
            pairs = [(a, ids[-1]) for a in ids[:-1]]
        else:
            raise ConfigError(f"layers.pairs={spec!r}; use adjacent, all_to_first, all_to_last or a list of [a, b]")
    else:
        pairs = [(int(a), int(b)) for a, b in spec]
        for a, b in pairs:
            if a not in ids or b not in ids:
                raise ConfigError(f"layers.pairs has ({a}, {b}) but layers.ids={ids}")
    if not pairs:
        raise ConfigError(f"layers.pairs={spec!r} gives no pair for layers.ids={ids}: configure at least two layers")
    return pairs


def check_layers(ids: list[int], n_layers: int) -> None:
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers.ids={ids}: {bad} out of range for a model with {n_layers} layers (0..{n_layers - 1})")


# ---------------------------------------------------------------------------- run state
@dataclass
class Run:
    """Everything a finished (or finishing) run holds; handed to callbacks."""

    cfg: DictConfig
    run_dir: Path
    lm: Any = None
    datamodule: Any = None
    saes: dict[str, Any] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    samples: dict[str, FeatureSamples] = field(default_factory=dict)
    projected: dict[str, FeatureSamples] = field(default_factory=dict)
    reference: Any = None
    aligned: dict = field(default_factory=dict)
    correlations: dict | None = None
    results: list[MatchResult] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    trainer: Any = None
    logger: Any = None
    matcher: Any = None


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Step 1: build and check everything; no forward pass of the model happens here."""
    run = Run(cfg=cfg, run_dir=run_dir)
    ids = layer_ids(cfg)
    pairs = layer_pairs(cfg, ids)
    run.matcher = build(cfg.matcher)
    sae_provider = build(cfg.sae)
    run.lm = build(cfg.model)
    check_layers(ids, run.lm.model.cfg.n_layers)
    run.hooks = [hook_name(i, cfg.layers.site) for i in ids]
    run.pairs = [(hook_name(a, cfg.layers.site), hook_name(b, cfg.layers.site)) for a, b in pairs]
    sae_provider.validate(run.hooks)
    run.datamodule = build(cfg.data, partial=True)(lm=run.lm, hooks=run.hooks)
    run.datamodule.setup()
    log.info("corpus: %d profile + %d held-out contexts of %d tokens",
             run.datamodule.n_contexts("profile"), run.datamodule.n_contexts("heldout"), run.datamodule.context_len)
    run.saes = sae_provider.load(run.lm, run.hooks, run.datamodule)
    from saeot.saes import check_sae_widths

    check_sae_widths(run.saes, run.lm)
    for sae in run.saes.values():
        sae.eval()
        for p in sae.parameters():
            p.requires_grad_(False)
    return run


def stream(run: Run) -> None:
    """Steps 2-3: the profile pass and the held-out pass, driven by the Lightning Trainer."""
    from saeot.streaming import AlignedStatesConsumer, CorrelationConsumer, ProfileConsumer, StreamPass

    cfg = run.cfg
    prof = ProfileConsumer(run.hooks, run.saes, k=cfg.profiling.k, mode=cfg.profiling.sampling, seed=cfg.seed)
    run.trainer.predict(StreamPass(run.saes, [prof]), datamodule=run.datamodule.view("profile"), return_predictions=False)
    run.samples = prof.results()

    consumers: list = [AlignedStatesConsumer(run.hooks, cfg.profiling.reference_tokens)]
    if "correlations" in run.matcher.requires:
        consumers.append(CorrelationConsumer(run.pairs, run.saes))
    run.trainer.predict(StreamPass(run.saes, consumers), datamodule=run.datamodule.view("heldout"), return_predictions=False)
    run.aligned = consumers[0].results()
    run.correlations = consumers[1].results() if len(consumers) > 1 else None


def fit_reference(run: Run) -> None:
    """Step 4."""
    from saeot.reference import project_samples

    t0 = time.perf_counter()
    space = build(run.cfg.reference)
    if hasattr(space, "logger"):
        space.logger = run.logger
    space.fit(run.aligned)
    run.reference = space
    run.projected = {h: project_samples(space, s) for h, s in run.samples.items()}
    run.metrics["reference"] = {
        "name": space.name, "dim": space.dim, "seconds": time.perf_counter() - t0,
        "n_tokens": int(next(iter(run.aligned.values())).shape[0]),
        "alignment_error": space.alignment_error(run.aligned),
    }
    if getattr(space, "loss_history", None):
        run.metrics["reference"]["final_loss"] = space.loss_history[-1]


def match(run: Run) -> None:
    """Step 5: every layer pair through the configured matcher."""
    ctx = MatchContext(saes=run.saes, samples=run.projected, correlations=run.correlations,
                       device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    per_pair = {}
    for a, b in run.pairs:
        t0 = time.perf_counter()
        res = run.matcher.match(ctx, a, b)
        res.extras["seconds"] = time.perf_counter() - t0
        run.results.append(res)
        per_pair[f"{a}|{b}"] = summarize(res)
        log.info("%s -> %s: %d/%d matched (%.1fs)", a, b, int(res.matched.sum()), res.n_features, res.extras["seconds"])
    run.metrics["matching"] = {"matcher": run.matcher.name, "assignment": run.matcher.assignment, "pairs": per_pair}


def summarize(res: MatchResult) -> dict:
    fb = res.feature_b[res.matched]
    return {
        "n_features": res.n_features,
        "n_matched": int(res.matched.sum()),
        "fraction_matched": float(res.matched.float().mean()),
        "n_distinct_targets": int(fb.unique().numel()),
        "null_threshold": res.null_threshold,
        "median_distance_matched": float(res.distance[res.matched].median()) if len(fb) else float("nan"),
        **{k: v for k, v in res.extras.items() if isinstance(v, (int, float))},
    }


# ---------------------------------------------------------------------------- outputs
def write_feature_stats(samples: dict[str, FeatureSamples], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "hook", "feature", "firing_frequency", "mean_activation", "max_activation"])
        for hook, s in samples.items():
            freq = s.firing_frequency
            mean = s.act_sum / s.n_fire.clamp_min(1)
            for i in range(s.n_features):
                w.writerow([hook_layer(hook), hook, i, f"{float(freq[i]):.6g}", f"{float(mean[i]):.6g}", f"{float(s.act_max[i]):.6g}"])


def write_matches(results: list[MatchResult], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MATCH_COLUMNS)
        for r in results:
            la, lb = hook_layer(r.hook_a), hook_layer(r.hook_b)
            for i in range(r.n_features):
                w.writerow([la, i, lb, int(r.feature_b[i]), f"{float(r.distance[i]):.6g}",
                            f"{float(r.margin[i]):.6g}", int(bool(r.matched[i]))])


def read_matches(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != MATCH_COLUMNS:
        raise ValueError(f"{path}: columns {list(rows[0])} != {MATCH_COLUMNS}")
    return rows


def save_artifacts(run: Run) -> None:
    out = run.run_dir
    write_feature_stats(run.samples, out / "feature_stats.csv")
    for h, s in run.samples.items():
        s.save(out / "features" / f"{h}.safetensors")
    if run.reference is not None:
        run.reference.save(out / "reference.safetensors")
    if run.results:
        write_matches(run.results, out / "matches.csv")


def run_train(cfg: DictConfig, run_dir: str | Path) -> Run:
    """The whole ``train.py`` run; returns the :class:`Run` (rank 0 writes the outputs)."""
    from saeot.plots import plot_run

    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = setup(cfg, run_dir)
    run.logger = build(cfg.logger) if cfg.get("logger") else None
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    run.trainer = build(cfg.trainer, logger=run.logger or False, callbacks=[c for c in callbacks if _is_pl_callback(c)])
    t0 = time.perf_counter()
    stream(run)
    run.metrics["profiling"] = {
        "seconds": time.perf_counter() - t0,
        "n_tokens": {h: s.n_tokens for h, s in run.samples.items()},
        "alive_fraction": {h: float(s.alive.float().mean()) for h, s in run.samples.items()},
        "k": cfg.profiling.k, "sampling": cfg.profiling.sampling,
    }
    fit_reference(run)
    match(run)
    for cb in callbacks:
        if hasattr(cb, "on_matching_end"):
            cb.on_matching_end(run)
    run.metrics["seconds_total"] = time.perf_counter() - t_start
    if run.trainer.is_global_zero:
        save_artifacts(run)
        plots = plot_run(run)
        for key, value in run.metrics.items():
            update_json(run_dir / "metrics.json", key, value)
        log_run(run, plots)
        log.info("wrote %s", run_dir)
    return run


def _is_pl_callback(c: Any) -> bool:
    import lightning as L

    return isinstance(c, L.Callback)


def log_run(run: Run, plots: dict[str, Path]) -> None:
    """Metrics, the matches table and the plots to the configured logger (wandb / csv)."""
    logger = run.logger
    if logger is None:
        return
    flat = {}
    for pair, s in run.metrics.get("matching", {}).get("pairs", {}).items():
        for k, v in s.items():
            if isinstance(v, (int, float)):
                flat[f"match/{pair}/{k}"] = v
    try:
        logger.log_hyperparams(OmegaConf.to_container(run.cfg, resolve=True))
        logger.log_metrics(flat)
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            import csv as _csv

            with open(run.run_dir / "matches.csv") as f:
                rows = list(_csv.reader(f))
            logger.log_table(key="matches", columns=rows[0], data=rows[1:20001])
            for name, path in plots.items():
                logger.log_image(key=name, images=[str(path)])
        logger.save()
    except Exception as e:  # logging must never lose a finished run
        log.warning("logging to %s failed: %s", type(logger).__name__, e)
