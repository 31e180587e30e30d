"""The synthetic ground-truth benchmark: does each matcher find the true match?

For every entry of ``synthetic.scenarios`` (one world per entry, two layers; an entry
combines scenarios with ``+`` and may set the rotation angle with ``@``, e.g.
``rotation+split_merge+birth_death`` or ``rotation@pi/8``,
:func:`saeot.synthetic.parse_scenario`) and every seed of ``synthetic.seeds``
(default: the one ``synthetic.seed``), SAEs are built (``oracle``: at the true dictionary, permuted and perturbed;
``trained``: trained with sae_lens), features are profiled and the held-out states and
correlations gathered by ``train.py``'s own consumers (:class:`~saeot.profiling.ProfileConsumer`,
:class:`~saeot.profiling.AlignedStatesConsumer`, :class:`~saeot.profiling.CorrelationConsumer`, fed
the world's batches by :func:`stream_world`), the reference space is fitted on held-out tokens
(:func:`saeot.pipeline.stages.fit_reference`), and every configured matcher runs twice: with
``assignment=nearest`` and ``assignment=hungarian``. Scores over the features of A
(top-1 and one-to-one accuracy, precision / recall of "no match", per kind of
feature, and ``affected_top1_accuracy`` on the kinds the entry acts on) are
:func:`saeot.synthetic.match_scores`. Over several seeds every number gets its
mean, ``_mean``, ``_ci95`` (95% Student-t half-width) and ``_seeds`` (per seed) keys
(:func:`saeot.synthetic.aggregate_seeds`); ``metrics.json["synthetic_by_seed"]``
keeps every seed's scores. The SAEs come from the
registry :data:`SAE_BUILDERS` (``synthetic.sae=oracle|trained``); a matcher whose settings
have a ``progress`` field runs without its own progress bar.

Under ``disjoint_tokens`` the layers share no token: matchers that need the same
tokens (activation correlation) are reported as not applicable (``null``), and a
reference space that needs the same tokens at every layer (ridge, learned) is replaced
by ``standardize``, which does not; the metrics say so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from saeot.io import atomic_write_json, atomic_write_text
from saeot.matching.base import MatchContext, Matcher, MatcherNotApplicable
from saeot.pipeline.config import build
from saeot.pipeline.stages import fit_reference
from saeot.pipeline.state import Streams
from saeot.profiling import AlignedStatesConsumer, CorrelationConsumer, ProfileConsumer, StreamPass
from saeot.profiling.stream import Consumer
from saeot.progress import progress_bar
from saeot.reference import Standardize, project_samples
from saeot.synthetic import (
    ScenarioSpec,
    SyntheticConfig,
    SyntheticSAEs,
    SyntheticWorld,
    affected_accuracy,
    aggregate_seeds,
    make_world,
    match_scores,
    oracle_saes,
    parse_scenario,
    trained_saes,
)
from saeot.synthetic.report import markdown_table, plot_benchmark, plot_sweep
from saeot.types import FeatureSamples

log = logging.getLogger(__name__)

NEEDS_SHARED_TOKENS_REFERENCE = ("ridge", "learned")


def build_world(scfg: DictConfig, scenario: str | list[str] | ScenarioSpec, noise: float | None = None) -> SyntheticWorld:
    """The two-layer world of ``scenario`` (an entry of ``synthetic.scenarios``, or a list of
    scenario names combined) from the ``synthetic`` settings (``synthetic.world`` may set any
    other :class:`SyntheticConfig` field)."""
    spec = scenario if isinstance(scenario, ScenarioSpec) else parse_scenario(scenario)
    extra = dict(OmegaConf.to_container(scfg.world, resolve=True)) if scfg.get("world") else {}
    fields = {
        "n_features": scfg.n_features, "d_model": scfg.d_model, "n_layers": 2, "n_tokens": scfg.n_tokens,
        "noise": scfg.noise if noise is None else noise, "seed": scfg.seed,
        "rotation_angle": scfg.get("rotation_angle", math.pi / 2), **extra, **spec.config_overrides(),
    }
    return make_world(SyntheticConfig(**fields))


def _oracle(scfg: DictConfig, world: SyntheticWorld) -> SyntheticSAEs:
    return oracle_saes(world, perturb=scfg.oracle_perturb, seed=scfg.seed)


def _trained(scfg: DictConfig, world: SyntheticWorld) -> SyntheticSAEs:
    return trained_saes(world, seed=scfg.seed)


#: ``synthetic.sae`` -> builder(synthetic settings, world) -> the world's SAEs with their truth
SAE_BUILDERS: dict[str, Callable[[DictConfig, SyntheticWorld], SyntheticSAEs]] = {"oracle": _oracle, "trained": _trained}


def build_saes(scfg: DictConfig, world: SyntheticWorld) -> SyntheticSAEs:
    """The SAEs ``synthetic.sae`` names (:data:`SAE_BUILDERS`) for ``world``."""
    if scfg.sae not in SAE_BUILDERS:
        raise ValueError(f"synthetic.sae={scfg.sae!r}; expected one of {sorted(SAE_BUILDERS)}")
    return SAE_BUILDERS[scfg.sae](scfg, world)


def stream_world(world: SyntheticWorld, saes: SyntheticSAEs | dict[str, Any], consumers: Sequence[Consumer],
                 split: str, hooks: Sequence[str] | None = None, n_tokens: int | None = None) -> None:
    """Feed the world's batches of ``split`` to the pipeline's consumers, batch by batch through
    :meth:`StreamPass.predict_step` (what ``trainer.predict`` runs in ``train.py``'s passes);
    one process, so there is nothing to merge. ``hooks``: the world streams several hooks
    together only when they share tokens."""
    step = StreamPass(dict(saes), list(consumers))
    for i, batch in enumerate(world.iter_batches(split, hooks=hooks, n_tokens=n_tokens)):
        step.predict_step(batch, i)


def profile_world(world: SyntheticWorld, saes: SyntheticSAEs | dict[str, Any], k: int, sampling: str,
                  seed: int) -> dict[str, FeatureSamples]:
    """Feature samples of every hook over the ``profile`` split (one hook at a time: a
    ``disjoint_tokens`` world has no batch of every hook), by the pipeline's :class:`ProfileConsumer`."""
    out = {}
    for hook in world.hooks:
        cons = ProfileConsumer([hook], dict(saes), k=k, mode=sampling, seed=seed)
        stream_world(world, saes, [cons], "profile", hooks=[hook])
        out.update(cons.results())
    return out


def heldout_streams(world: SyntheticWorld, saes: SyntheticSAEs | dict[str, Any], samples: dict[str, FeatureSamples],
                    n_tokens: int) -> Streams:
    """The held-out pass of ``train.py`` (:func:`saeot.pipeline.stages.stream`) on ``world``:
    the hidden states of its first ``n_tokens`` held-out tokens at every hook
    (:class:`AlignedStatesConsumer`) and, with shared tokens, the activation co-moments of the
    first pair (:class:`CorrelationConsumer`), in one pass. Without shared tokens each hook is
    streamed alone: its states are not aligned row by row and there are no correlations."""
    if world.shared_tokens:
        aligned = AlignedStatesConsumer(list(world.hooks), n_tokens)
        corr = CorrelationConsumer([world.pairs[0]], dict(saes))
        stream_world(world, saes, [aligned, corr], "heldout", n_tokens=n_tokens)
        return Streams(samples=samples, aligned=aligned.results(), correlations=corr.results(), metrics={})
    states: dict[str, Tensor] = {}
    for hook in world.hooks:
        cons = AlignedStatesConsumer([hook], n_tokens)
        stream_world(world, saes, [cons], "heldout", hooks=[hook], n_tokens=n_tokens)
        states.update(cons.results())
    return Streams(samples=samples, aligned=states, correlations=None, metrics={})


def world_context(cfg: DictConfig, world: SyntheticWorld, saes: SyntheticSAEs, k: int | None = None,
                  samples: dict[str, FeatureSamples] | None = None,
                  ) -> tuple[MatchContext, dict[str, FeatureSamples], dict[str, Any]]:
    """``(context, samples, info)``: what every matcher reads on one world: the SAEs, the
    profiled samples (K = ``k`` or ``synthetic.samples_per_feature``; or ``samples`` if given)
    projected by ``cfg.reference`` fitted on held-out tokens (:func:`saeot.pipeline.stages.fit_reference`
    when the layers share tokens), the correlations."""
    scfg = cfg.synthetic
    k = k or scfg.samples_per_feature
    if samples is None:
        samples = profile_world(world, saes, k, scfg.sampling, cfg.seed)
    info: dict[str, Any] = {"shared_tokens": bool(world.shared_tokens)}
    streams = heldout_streams(world, saes, samples, scfg.reference_tokens)
    if world.shared_tokens:
        fit = fit_reference(cfg, streams)
        space, projected = fit.space, fit.projected
    else:  # no aligned states: fit_reference's alignment error has no meaning here
        space = build(cfg.reference)
        if space.name in NEEDS_SHARED_TOKENS_REFERENCE:
            info["reference"] = f"standardize ({space.name} needs the same tokens at every layer)"
            space = Standardize()
        space.fit(streams.aligned)
        projected = {h: project_samples(space, s) for h, s in samples.items()}
    info.setdefault("reference", space.name)
    return (MatchContext(saes=dict(saes), samples=projected, correlations=streams.correlations, reference=space),
            samples, info)


def score_matchers(ctx: MatchContext, saes: SyntheticSAEs, alive_a: Tensor,
                   matchers: dict[str, DictConfig | Matcher], assignments: tuple[str, ...] = ("nearest", "hungarian"),
                   info: dict | None = None) -> dict:
    """Scores (:func:`match_scores`) of every matcher (name -> config or Matcher) on the world's first pair.

    Not :func:`saeot.pipeline.stages.match_pairs`: that runs one assignment per pair and
    summarizes it; here both assignments come from one cost computation
    (:meth:`Matcher.match_assignments`) and are scored against the planted truth."""
    a, b = saes.world.pairs[0]
    truth = saes.truth[(a, b)]
    out: dict[str, Any] = {}
    for name, mcfg in matchers.items():
        try:
            t0 = time.perf_counter()
            matcher = _quiet(mcfg if isinstance(mcfg, Matcher) else instantiate(mcfg))
            res = matcher.match_assignments(ctx, a, b, assignments)
            out[name] = match_scores(res["nearest"], res.get("hungarian", res["nearest"]), truth, alive_a,
                                     saes.kind_masks(a, b))
            if "hungarian" not in res:
                out[name]["hungarian_accuracy"] = None
            out[name]["seconds"] = time.perf_counter() - t0
        except MatcherNotApplicable as e:
            out[name] = None
            if info is not None:
                info.setdefault("not_applicable", {})[name] = str(e)
    return out


def evaluate_world(cfg: DictConfig, world: SyntheticWorld, saes: SyntheticSAEs,
                   matchers: dict[str, DictConfig | Matcher], k: int | None = None, assignments: tuple[str, ...] = ("nearest", "hungarian")) -> tuple[dict, dict]:
    """Scores of every matcher on one world; returns ``(scores, info)``."""
    ctx, samples, info = world_context(cfg, world, saes, k)
    a, _ = world.pairs[0]
    return score_matchers(ctx, saes, samples[a].alive, matchers, assignments, info), info


def _quiet(matcher: Matcher) -> Matcher:
    """``matcher`` with its progress bar off, if its settings have one (the benchmark shows one bar over scenarios)."""
    if any(f.name == "progress" for f in dataclasses.fields(matcher.cfg)):
        matcher.cfg = dataclasses.replace(matcher.cfg, progress=False)
    return matcher


def benchmark_seeds(scfg: DictConfig) -> tuple[list[int], bool]:
    """``(seeds, aggregated)``: ``synthetic.seeds`` if set (aggregated over them), else ``[synthetic.seed]``."""
    seeds = scfg.get("seeds")
    if seeds is None or len(seeds) == 0:
        return [int(scfg.seed)], False
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"synthetic.seeds={seeds} repeats a seed")
    return seeds, True


def run_seed(cfg: DictConfig, specs: list[ScenarioSpec], matchers: dict, seed: int) -> tuple[dict, dict]:
    """Scores ``{entry: {matcher: scores}}`` and info of every scenario entry for one world seed."""
    scfg = OmegaConf.merge(cfg.synthetic, {"seed": seed})
    results: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for spec in progress_bar(specs, desc=f"scenarios (seed {seed})"):
        world = build_world(scfg, spec)
        saes = build_saes(scfg, world)
        results[spec.name], info[spec.name] = evaluate_world(cfg, world, saes, matchers)
        for r in results[spec.name].values():
            if r is not None:
                r["affected_top1_accuracy"] = affected_accuracy(r, spec.parts)
        log.info("seed %d %s: %s", seed, spec.name,
                 {m: (r or {}).get("top1_accuracy") for m, r in results[spec.name].items()})
    return results, info


def run_benchmark(cfg: DictConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    scfg = cfg.synthetic
    specs = [parse_scenario(s) for s in scfg.scenarios]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"synthetic.scenarios={names} repeats an entry")
    seeds, aggregated = benchmark_seeds(scfg)
    if scfg.sae not in SAE_BUILDERS:
        raise ValueError(f"synthetic.sae={scfg.sae!r}; expected one of {sorted(SAE_BUILDERS)}")
    matchers = {name: m for name, m in cfg.matchers.items()}
    if not matchers:
        raise ValueError("matchers is empty: the benchmark needs at least one matcher config")
    t_start = time.perf_counter()
    by_seed: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for seed in seeds:
        by_seed[str(seed)], info[str(seed)] = run_seed(cfg, specs, matchers, seed)
    results = aggregate_seeds(list(by_seed.values())) if aggregated else by_seed[str(seeds[0])]

    sweep = finite_sample_sweep(cfg, matchers) if scfg.get("sweep_k") and "semantic_ot" in matchers else None
    metrics = {
        "synthetic": results,
        "synthetic_info": {"scenarios": info if aggregated else info[str(seeds[0])], "seeds": seeds,
                           "config": OmegaConf.to_container(scfg, resolve=True),
                           "seconds": time.perf_counter() - t_start},
    }
    if aggregated:
        metrics["synthetic_by_seed"] = by_seed
    if sweep is not None:
        metrics["synthetic_sweep"] = sweep
    atomic_write_json(out_dir / "metrics.json", metrics)
    table = markdown_table(results, seeds=seeds if aggregated else None, sae=scfg.sae)
    atomic_write_text(out_dir / "synthetic_table.md", table)
    plot_benchmark(results, out_dir / "plots" / "synthetic_top1.png")
    if sweep is not None:
        plot_sweep(sweep, out_dir / "plots" / "synthetic_sweep.png")
    print(table)
    return metrics


def finite_sample_sweep(cfg: DictConfig, matchers: dict) -> dict:
    """Top-1 accuracy of semantic OT against samples per feature K and the noise level."""
    scfg = cfg.synthetic
    scenario = scfg.sweep_scenario
    grid: dict[str, dict[str, float | None]] = {}
    cells = [(n, k) for n in scfg.sweep_noise for k in scfg.sweep_k]
    for noise, k in progress_bar(cells, desc=f"sweep ({scenario})"):
        world = build_world(scfg, scenario, noise=noise)
        saes = build_saes(scfg, world)
        res, _ = evaluate_world(cfg, world, saes, {"semantic_ot": matchers["semantic_ot"]}, k=k,
                                assignments=("nearest",))
        grid.setdefault(str(noise), {})[str(k)] = affected_accuracy(res["semantic_ot"], scenario)
    return {"scenario": scenario, "k": list(scfg.sweep_k), "noise": list(scfg.sweep_noise), "top1_accuracy": grid}
