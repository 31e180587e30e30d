"""The synthetic ground-truth benchmark: does each matcher find the true match?

For every scenario of :mod:`saeot.evaluation.synthetic` (one world per scenario, two
layers), SAEs are built (``oracle``: at the true dictionary, permuted and perturbed;
``trained``: trained with sae_lens), features are profiled exactly as ``train.py``
profiles them (:class:`~saeot.profiling.StreamingProfiler`), the reference space is
fitted on held-out tokens, and every configured matcher runs twice: with
``assignment=nearest`` and ``assignment=hungarian``. Scores, over the features of A:

* ``top1_accuracy``: the nearest candidate is the true partner (features with a partner);
* ``hungarian_accuracy``: the one-to-one assignment gives the true partner;
* ``nomatch_precision`` / ``nomatch_recall``: of the "no match" decisions (nearest mode)
  against features whose true answer is "no match" (``None`` where undefined, e.g. a
  scenario without deaths has no true "no match" for recall).

Under ``disjoint_tokens`` the layers share no token: matchers that need the same
tokens (activation correlation) are reported as not applicable (``null``), and a
reference space that needs the same tokens at every layer (ridge, learned) is replaced
by ``standardize``, which does not; the metrics say so.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from saeot.io import atomic_write_json, atomic_write_text
from saeot.matching.base import MatchContext, MatcherNotApplicable
from saeot.profiling import flatten_batch
from saeot.reference import Standardize, project_samples
from saeot.streaming import CorrelationConsumer, ProfileConsumer

log = logging.getLogger(__name__)

NEEDS_SHARED_TOKENS_REFERENCE = ("ridge", "learned")


def build_world(scfg: Any, scenario: str | list[str], noise: float | None = None) -> Any:
    from saeot.evaluation.synthetic import SyntheticConfig, make_world

    scenarios = [scenario] if isinstance(scenario, str) else list(scenario)
    return make_world(SyntheticConfig(
        n_features=scfg.n_features, d_model=scfg.d_model, n_layers=2, n_tokens=scfg.n_tokens,
        noise=scfg.noise if noise is None else noise, scenarios=tuple(scenarios), seed=scfg.seed,
    ))


def build_saes(scfg: Any, world: Any) -> Any:
    from saeot.evaluation.synthetic import oracle_saes, trained_saes

    if scfg.sae == "oracle":
        return oracle_saes(world, perturb=scfg.oracle_perturb, seed=scfg.seed)
    if scfg.sae == "trained":
        return trained_saes(world, seed=scfg.seed)
    raise ValueError(f"synthetic.sae={scfg.sae!r}; expected oracle or trained")


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


def scores(result: Any, result_hung: Any, truth: torch.Tensor, alive_a: torch.Tensor,
           kinds: dict[str, torch.Tensor] | None = None) -> dict:
    has = (truth >= 0) & alive_a
    top1 = float((result.feature_b[has] == truth[has]).float().mean()) if has.any() else None
    hung = float((result_hung.feature_b[has] == truth[has]).float().mean()) if has.any() else None
    pred_none = ~result.matched & alive_a
    true_none = (truth < 0) & alive_a
    tp = int((pred_none & true_none).sum())
    prec = tp / int(pred_none.sum()) if int(pred_none.sum()) else None
    rec = tp / int(true_none.sum()) if int(true_none.sum()) else None
    out = {"top1_accuracy": top1, "hungarian_accuracy": hung, "nomatch_precision": prec, "nomatch_recall": rec,
           "n_with_partner": int(has.sum()), "n_no_partner": int(true_none.sum())}
    by_kind = {}
    for kind, mask in (kinds or {}).items():
        sel = mask & has
        if sel.any():
            by_kind[kind] = {"top1_accuracy": float((result.feature_b[sel] == truth[sel]).float().mean()),
                             "n": int(sel.sum())}
    out["top1_by_kind"] = by_kind
    return out


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
            matcher = instantiate(mcfg, **_quiet(mcfg))
            res = matcher.match_assignments(ctx, a, b, assignments)
            out[name] = scores(res["nearest"], res.get("hungarian", res["nearest"]), truth, alive_a,
                               saes.kind_masks(a, b))
            if "hungarian" not in res:
                out[name]["hungarian_accuracy"] = None
            out[name]["seconds"] = time.perf_counter() - t0
        except MatcherNotApplicable as e:
            out[name] = None
            info.setdefault("not_applicable", {})[name] = str(e)
    return out, info


def _quiet(mcfg: DictConfig) -> dict:
    return {"progress": False} if "progress" in mcfg or str(mcfg.get("_target_", "")).endswith("SemanticOT") else {}


def run_benchmark(cfg: DictConfig, out_dir: str | Path) -> dict:
    from saeot.evaluation.synthetic import SCENARIOS

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


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}"


#: per scenario, the kinds of A feature the scenario is about (top-1 on those alone)
AFFECTED = {"split_merge": ("splits", "merges"), "near_duplicates": ("near_duplicate",)}


def affected_accuracy(r: dict | None, scenario: str) -> float | None:
    """Top-1 accuracy on the features the scenario acts on (all features if it acts on all)."""
    if r is None:
        return None
    kinds = AFFECTED.get(scenario)
    if not kinds:
        return r.get("top1_accuracy")
    hits = [(v["top1_accuracy"] * v["n"], v["n"]) for k, v in r.get("top1_by_kind", {}).items() if k in kinds]
    n = sum(c for _, c in hits)
    return sum(h for h, _ in hits) / n if n else None


def markdown_table(results: dict) -> str:
    scenarios = list(results)
    matchers = list(next(iter(results.values())))
    lines = ["**top1_accuracy on the affected features** (split/merged features for split_merge, the "
             "near-duplicate pairs for near_duplicates; all features elsewhere)\n",
             "| matcher | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for m in matchers:
        cells = [_fmt(affected_accuracy(results[s].get(m), s)) if results[s].get(m) is not None else "not applicable"
                 for s in scenarios]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for metric in ("top1_accuracy", "hungarian_accuracy", "nomatch_precision", "nomatch_recall"):
        lines.append(f"**{metric}**\n")
        lines.append("| matcher | " + " | ".join(scenarios) + " |")
        lines.append("|---|" + "---|" * len(scenarios))
        for m in matchers:
            cells = [_fmt((results[s].get(m) or {}).get(metric)) if results[s].get(m) is not None else "not applicable"
                     for s in scenarios]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_benchmark(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeot.plots import _save

    scenarios = list(results)
    matchers = list(next(iter(results.values())))
    grid = torch.full((len(matchers), len(scenarios)), float("nan"))
    for j, s in enumerate(scenarios):
        for i, m in enumerate(matchers):
            r = results[s].get(m)
            if r is not None and r.get("top1_accuracy") is not None:
                grid[i, j] = r["top1_accuracy"]
    fig, ax = plt.subplots(figsize=(1.3 * len(scenarios) + 2.5, 0.55 * len(matchers) + 1.5))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn")
    for i in range(len(matchers)):
        for j in range(len(scenarios)):
            v = float(grid[i, j])
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(scenarios)), scenarios, rotation=30, ha="right")
    ax.set_yticks(range(len(matchers)), matchers)
    ax.set_title("top-1 accuracy on planted ground truth")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)


def plot_sweep(sweep: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeot.plots import _save

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for noise in sweep["noise"]:
        row = sweep["top1_accuracy"][str(noise)]
        ax.plot(sweep["k"], [row[str(k)] for k in sweep["k"]], marker="o", label=f"noise {noise}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per feature K")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"semantic OT, finite samples ({sweep['scenario']})")
    ax.legend(fontsize=7)
    return _save(fig, path)
