"""The stages of a ``train.py`` run, each a function from typed inputs to a typed result.

1. :func:`setup`: read the ``layers`` and ``profiling`` settings into their typed, checked
   dataclasses (:class:`~saeot.pipeline.config.LayerSettings`,
   :class:`~saeot.pipeline.config.ProfilingSettings`; the later stages read those, not
   ``cfg``); load the model; check the layers; build the data module and
   tokenise (empty corpus?); check the SAE settings; load or train SAEs; check their
   widths. Every check that can fail on bad input runs here, before the first
   forward pass over the corpus.
2. :func:`stream`: the profile pass (every feature's K weighted samples) and the
   held-out pass (hidden states of the same tokens at every layer, and activation
   correlations when the matcher needs them), both driven by the Lightning Trainer.
3. :func:`fit_reference`: fit the reference space; project the feature samples.
4. :func:`match`: every configured layer pair through the matcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from saeot.hooks import base_hook, sae_key
from saeot.matching.base import Matcher, MatchContext, Shard
from saeot.pipeline.config import (
    SAE_B_TAG,
    build,
    check_layers,
    check_trainer,
    layer_settings,
    match_device,
    profiling_settings,
    run_hooks,
)
from saeot.pipeline.state import Matches, ReferenceFit, RunSetup, Streams
from saeot.profiling import (
    AlignedStatesConsumer,
    CorrelationConsumer,
    ProfileConsumer,
    StreamPass,
)
from saeot.reference import project_samples
from saeot.saes import check_saes
from saeot.types import MatchResult

if TYPE_CHECKING:
    import lightning as L

__all__ = ["setup", "stream", "fit_reference", "match", "match_pairs", "summarize", "trainer_shard"]

log = logging.getLogger(__name__)


def setup(cfg: DictConfig, run_dir: str | Path, checks: Sequence[Callable[[Any], None]] = ()) -> RunSetup:
    """Stage 1: build and check everything; no forward pass over the corpus happens here
    (except to train SAEs that are not cached, after every check of the settings).
    ``checks``: more checks of the loaded model (e.g. :meth:`RunCallback.check`)."""
    profiling = profiling_settings(cfg)  # the typed settings the stages read, checked once here
    layers = layer_settings(cfg)
    if cfg.get("trainer") is not None:  # built only after setup, by the caller
        check_trainer(cfg.trainer)
    matcher = build(cfg.matcher)
    providers = {None: build(cfg.sae)}  # SAE tag -> provider; sae_b: the second SAE at every hook
    if cfg.get("sae_b") is not None:
        providers[SAE_B_TAG] = build(cfg.sae_b)
    if not layers.all_layers:  # the SAE settings, before the model is even loaded
        for provider in providers.values():
            provider.validate(_model_hooks(run_hooks(cfg)[0]))
    lm = build(cfg.model)
    n_layers = lm.model.cfg.n_layers
    check_layers(layers.layer_ids(n_layers), n_layers)
    hooks, pairs = run_hooks(cfg, n_layers)
    if layers.all_layers:
        for provider in providers.values():
            provider.validate(_model_hooks(hooks))
    build(cfg.reference).check(lm.model.cfg.d_model)
    for check in checks:
        check(lm)
    datamodule = build(cfg.data, partial=True)(lm=lm, hooks=hooks)
    datamodule.setup()
    if cfg.get("activation_store") is not None:  # hidden states read from disk (built here once)
        datamodule = build(cfg.activation_store, partial=True)(parent=datamodule)
        datamodule.setup()
    log.info("corpus: %d profile + %d held-out contexts of %d tokens",
             datamodule.n_contexts("profile"), datamodule.n_contexts("heldout"), datamodule.context_len)
    saes, records = {}, {}
    base = _model_hooks(hooks)
    for tag, provider in providers.items():
        key = (lambda h: h) if tag is None else (lambda h, t=tag: sae_key(h, t))
        saes.update({key(h): sae for h, sae in provider.load(lm, base, datamodule).items()})
        records.update({key(h): rec for h, rec in provider.describe(base).items()})
    check_saes(saes, lm)
    for sae in saes.values():
        sae.eval()
        sae.requires_grad_(False)
    return RunSetup(cfg=cfg, run_dir=Path(run_dir), lm=lm, datamodule=datamodule, saes=saes,
                    sae_records=records, hooks=tuple(hooks), pairs=tuple(pairs), matcher=matcher,
                    layers=layers, profiling=profiling)


def _model_hooks(keys: Sequence[str]) -> list[str]:
    """The model hooks among SAE keys (a second SAE's ``{hook}@b`` left out)."""
    return [k for k in keys if base_hook(k) == k]


def stream(run: RunSetup, trainer: L.Trainer) -> Streams:
    """Stages 2-3: the profile pass and the held-out pass through ``trainer.predict``."""
    p = run.profiling
    t0 = time.perf_counter()
    hooks = list(run.hooks)
    prof = ProfileConsumer(hooks, run.saes, k=p.k, mode=p.sampling, seed=run.cfg.seed)
    trainer.predict(StreamPass(run.saes, [prof]), datamodule=run.datamodule.view("profile"), return_predictions=False)
    samples = prof.results()

    aligned_c = AlignedStatesConsumer(hooks, p.reference_tokens)
    consumers: list = [aligned_c]
    corr_c = None
    if "correlations" in run.matcher.requires:
        corr_c = CorrelationConsumer(list(run.pairs), run.saes)
        consumers.append(corr_c)
    trainer.predict(StreamPass(run.saes, consumers), datamodule=run.datamodule.view("heldout"), return_predictions=False)
    metrics = {
        "seconds": time.perf_counter() - t0,
        "n_tokens": {h: s.n_tokens for h, s in samples.items()},
        "alive_fraction": {h: float(s.alive.float().mean()) for h, s in samples.items()},
        "k": p.k, "sampling": p.sampling,
    }
    return Streams(samples=samples, aligned=aligned_c.results(),
                   correlations=corr_c.results() if corr_c is not None else None, metrics=metrics)


def fit_reference(cfg: DictConfig, streams: Streams, logger: Any = None) -> ReferenceFit:
    """Stage 4: fit ``cfg.reference`` on the held-out aligned states; project every feature's samples."""
    t0 = time.perf_counter()
    space = build(cfg.reference)
    if hasattr(space, "logger"):  # the learned space logs its loss curve
        space.logger = logger
    space.fit(streams.aligned)
    projected = {h: project_samples(space, s) for h, s in streams.samples.items()}
    metrics = {
        "name": space.name, "dim": space.dim, "seconds": time.perf_counter() - t0,
        "n_tokens": int(next(iter(streams.aligned.values())).shape[0]),
        "alignment_error": space.alignment_error(streams.aligned),
    }
    if getattr(space, "loss_history", None):
        metrics["final_loss"] = space.loss_history[-1]
    return ReferenceFit(space=space, projected=projected, metrics=metrics)


def match(run: RunSetup, streams: Streams, reference: ReferenceFit,
          pairs: tuple[tuple[str, str], ...] | None = None, shard: Shard | None = None) -> Matches:
    """Stage 5: every layer pair (default ``run.pairs``) through ``run.matcher``; under DDP
    (``shard``) each rank searches a block of A's features and the result is gathered."""
    ctx = MatchContext(saes=run.saes, samples=reference.projected, correlations=streams.correlations,
                       device=match_device(run.cfg), shard=shard, reference=reference.space)
    return match_pairs(run.matcher, ctx, run.pairs if pairs is None else pairs)


def match_pairs(matcher: Matcher, ctx: MatchContext, pairs: Sequence[tuple[str, str]]) -> Matches:
    """Every layer pair through ``matcher`` on ``ctx``, timed and summarized (``metrics.json["matching"]``)."""
    results, per_pair = [], {}
    for a, b in pairs:
        t0 = time.perf_counter()
        res = matcher.match(ctx, a, b)
        res.extras["seconds"] = time.perf_counter() - t0
        results.append(res)
        per_pair[f"{a}|{b}"] = summarize(res)
        log.info("%s -> %s: %d/%d matched (%.1fs)", a, b, int(res.matched.sum()), res.n_features, res.extras["seconds"])
    metrics = {"matcher": matcher.name, "assignment": matcher.cfg.assignment, "pairs": per_pair}
    return Matches(results=results, metrics=metrics)


def summarize(res: MatchResult) -> dict:
    """Coverage and distance summary of one layer pair's matching."""
    fb = res.feature_b[res.matched]
    return {
        "n_features": res.n_features,
        "n_matched": int(res.matched.sum()),
        "fraction_matched": float(res.matched.float().mean()),
        "n_distinct_targets": int(fb.unique().numel()),
        "null_threshold": res.null_threshold,
        "null_method": res.extras.get("null_method"),
        "median_distance_matched": float(res.distance[res.matched].median()) if len(fb) else float("nan"),
        **{k: v for k, v in res.extras.items() if isinstance(v, (int, float))},
    }


def trainer_shard(trainer: L.Trainer) -> Shard | None:
    """The matching shard of this process under a multi-process Trainer (None on one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    return Shard(rank=trainer.global_rank, world_size=trainer.world_size, gather=gather)
