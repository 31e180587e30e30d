"""The synthetic ground-truth benchmark: does each matcher find the true match?

For every scenario of :mod:`saeot.evaluation.synthetic` (one world per scenario, two
layers), SAEs are built (``oracle``: at the true dictionary, permuted and perturbed;
``trained``: trained with sae_lens), features are profiled exactly as ``train.py``
profiles them (:class:`~saeot.profiling.StreamingProfiler`), the reference space is
fitted on held-out tokens, and every configured matcher runs twice: with
``assignment=nearest`` and ``assignment=hungarian``. Scores over the features of A
(top-1 and one-to-one accuracy, precision / recall of "no match", per kind of
feature) are :func:`saeot.evaluation.synthetic.match_scores`. The SAEs come from the
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from saeot.evaluation.synthetic import (
    SCENARIOS,
    SyntheticConfig,
    SyntheticSAEs,
    SyntheticWorld,
    affected_accuracy,
    make_world,
    match_scores,
    oracle_saes,
    trained_saes,
)
from saeot.evaluation.benchmark_report import markdown_table, plot_benchmark, plot_sweep
from saeot.io import atomic_write_json, atomic_write_text
from saeot.matching.base import MatchContext, Matcher, MatcherNotApplicable
from saeot.profiling import CorrelationConsumer, ProfileConsumer, flatten_batch
from saeot.reference import Standardize, project_samples

log = logging.getLogger(__name__)

NEEDS_SHARED_TOKENS_REFERENCE = ("ridge", "learned")


def build_world(scfg: Any, scenario: str | list[str], noise: float | None = None) -> SyntheticWorld:
    """The two-layer world of ``scenario`` (one name or several combined) from the ``synthetic`` settings."""
    scenarios = [scenario] if isinstance(scenario, str) else list(scenario)
    return make_world(SyntheticConfig(
        n_features=scfg.n_features, d_model=scfg.d_model, n_layers=2, n_tokens=scfg.n_tokens,
        noise=scfg.noise if noise is None else noise, scenarios=tuple(scenarios), seed=scfg.seed,
    ))


def _oracle(scfg: Any, world: SyntheticWorld) -> SyntheticSAEs:
    return oracle_saes(world, perturb=scfg.oracle_perturb, seed=scfg.seed)


def _trained(scfg: Any, world: SyntheticWorld) -> SyntheticSAEs:
    return trained_saes(world, seed=scfg.seed)


#: ``synthetic.sae`` -> builder(synthetic settings, world) -> the world's SAEs with their truth
SAE_BUILDERS: dict[str, Callable[[Any, SyntheticWorld], SyntheticSAEs]] = {"oracle": _oracle, "trained": _trained}


def build_saes(scfg: Any, world: SyntheticWorld) -> SyntheticSAEs:
    """The SAEs ``synthetic.sae`` names (:data:`SAE_BUILDERS`) for ``world``."""
    if scfg.sae not in SAE_BUILDERS:
        raise ValueError(f"synthetic.sae={scfg.sae!r}; expected one of {sorted(SAE_BUILDERS)}")
    return SAE_BUILDERS[scfg.sae](scfg, world)


def profile_world(world: Any, saes: Any, k: int, sampling: str, seed: int) -> dict:
    """Feature samples of every hook over the ``profile`` split (one hook at a time)."""
    out = {}
    for hook in world.hooks:
        cons = ProfileConsumer([hook], dict(saes), k=k, mode=sampling, seed=seed)
        for batch in world.iter_batches("profile", hooks=[hook]):
            cons.update(batch, dict(saes), {})
        out.update(cons.results())
    return out


def aligned_states(world: Any, n_tokens: int) -> dict:
    """Held-out hidden states of the same tokens at every layer (shared-token worlds only)."""
    parts: dict[str, list] = {h: [] for h in world.hooks}
    for batch in world.iter_batches("heldout", n_tokens=n_tokens):
        for h in world.hooks:
            x, _, _ = flatten_batch(batch, h)
            parts[h].append(x)
    return {h: torch.cat(v) for h, v in parts.items()}


def heldout_states_per_layer(world: Any, n_tokens: int) -> dict:
    return {h: torch.cat(list(world.hidden_states(h, "heldout", n_tokens=n_tokens))) for h in world.hooks}


def correlations(world: Any, saes: Any, n_tokens: int) -> dict:
    (a, b) = world.pairs[0]
    cons = CorrelationConsumer([(a, b)], dict(saes))
    for batch in world.iter_batches("heldout", n_tokens=n_tokens):
        cons.update(batch, dict(saes), {})
    return cons.results()


def evaluate_world(cfg: DictConfig, world: Any, saes: Any, matchers: dict[str, DictConfig],
                   k: int | None = None, assignments: tuple[str, ...] = ("nearest", "hungarian")) -> tuple[dict, dict]:
    """Scores of every matcher on one world; returns ``(scores, info)``."""
    scfg = cfg.synthetic
    k = k or scfg.samples_per_feature
    a, b = world.pairs[0]
    truth = saes.truth[(a, b)]
    samples = profile_world(world, saes, k, scfg.sampling, cfg.seed)
    info: dict[str, Any] = {"shared_tokens": bool(world.shared_tokens)}
    space = instantiate(cfg.reference)
    if world.shared_tokens:
        space.fit(aligned_states(world, scfg.reference_tokens))
        corr = correlations(world, saes, scfg.reference_tokens)
    else:
        if space.name in NEEDS_SHARED_TOKENS_REFERENCE:
            info["reference"] = f"standardize ({space.name} needs the same tokens at every layer)"
            space = Standardize()
        space.fit(heldout_states_per_layer(world, scfg.reference_tokens))
        corr = None
    info.setdefault("reference", space.name)
    projected = {h: project_samples(space, s) for h, s in samples.items()}
    ctx = MatchContext(saes=dict(saes), samples=projected, correlations=corr)
    alive_a = samples[a].alive
    out: dict[str, Any] = {}
    for name, mcfg in matchers.items():
        try:
            t0 = time.perf_counter()
            matcher = _quiet(instantiate(mcfg))
            res = matcher.match_assignments(ctx, a, b, assignments)
            out[name] = match_scores(res["nearest"], res.get("hungarian", res["nearest"]), truth, alive_a,
                               saes.kind_masks(a, b))
            if "hungarian" not in res:
                out[name]["hungarian_accuracy"] = None
            out[name]["seconds"] = time.perf_counter() - t0
        except MatcherNotApplicable as e:
            out[name] = None
            info.setdefault("not_applicable", {})[name] = str(e)
    return out, info


def _quiet(matcher: Matcher) -> Matcher:
    """``matcher`` with its progress bar off, if its settings have one (the benchmark shows one bar over scenarios)."""
    if any(f.name == "progress" for f in dataclasses.fields(matcher.cfg)):
        matcher.cfg.progress = False
    return matcher


def run_benchmark(cfg: DictConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    scfg = cfg.synthetic
    scenarios = list(scfg.scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"synthetic.scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    matchers = {name: m for name, m in cfg.matchers.items()}
    if not matchers:
        raise ValueError("matchers is empty: the benchmark needs at least one matcher config")
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for scenario in tqdm(scenarios, desc="scenarios"):
        world = build_world(scfg, scenario)
        saes = build_saes(scfg, world)
        results[scenario], info[scenario] = evaluate_world(cfg, world, saes, matchers)
        log.info("%s: %s", scenario, {m: (r or {}).get("top1_accuracy") for m, r in results[scenario].items()})

    sweep = finite_sample_sweep(cfg, matchers) if scfg.get("sweep_k") and "semantic_ot" in matchers else None
    metrics = {
        "synthetic": results,
        "synthetic_info": {"scenarios": info, "config": OmegaConf.to_container(scfg, resolve=True),
                           "seconds": time.perf_counter() - t_start},
    }
    if sweep is not None:
        metrics["synthetic_sweep"] = sweep
    atomic_write_json(out_dir / "metrics.json", metrics)
    table = markdown_table(results)
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
    for noise, k in tqdm(cells, desc=f"sweep ({scenario})"):
        world = build_world(scfg, scenario, noise=noise)
        saes = build_saes(scfg, world)
        res, _ = evaluate_world(cfg, world, saes, {"semantic_ot": matchers["semantic_ot"]}, k=k,
                                assignments=("nearest",))
        grid.setdefault(str(noise), {})[str(k)] = affected_accuracy(res["semantic_ot"], scenario)
    return {"scenario": scenario, "k": list(scfg.sweep_k), "noise": list(scfg.sweep_noise), "top1_accuracy": grid}
