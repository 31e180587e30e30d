"""Tables and plots of the synthetic benchmark (:mod:`saeot.synthetic.benchmark`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from saeot.plots import save_figure  # also selects matplotlib's Agg backend
from saeot.synthetic import affected_accuracy

__all__ = ["markdown_table", "plot_benchmark", "plot_sweep"]


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}"


def _cell(r: dict | None, metric: str) -> str:
    """``mean ± ci95`` over seeds when the score has them, else the one value."""
    if r is None:
        return "not applicable"
    value = r.get(metric)
    ci = r.get(f"{metric}_ci95")
    if value is not None and ci is not None:
        return f"{value:.3f} ± {ci:.3f}"
    return _fmt(value)


def _affected(r: dict | None, scenario: str) -> dict | None:
    if r is None or "affected_top1_accuracy" in r:
        return r
    return {**r, "affected_top1_accuracy": affected_accuracy(r, scenario)}


def markdown_table(results: dict, seeds: list[int] | None = None, sae: str | None = None) -> str:
    """One markdown table per metric (matchers x scenario entries); over several seeds each cell is
    ``mean ± half-width of the 95% t-interval``."""
    scenarios = list(results)
    matchers = list(next(iter(results.values())))
    head = []
    if sae or seeds:
        what = [f"{sae} SAEs"] if sae else []
        if seeds:
            what.append(f"mean ± 95% CI (Student t) over {len(seeds)} seeds {seeds}")
        head = ["_" + "; ".join(what) + "_\n"]
    lines = head + ["**top1_accuracy on the affected features** (split/merged features for split_merge, the "
                    "near-duplicate pairs for near_duplicates, the shared-mean pairs for shared_mean, their union "
                    "in combined entries; all features elsewhere)\n",
                    "| matcher | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for m in matchers:
        cells = [_cell(_affected(results[s].get(m), s), "affected_top1_accuracy") for s in scenarios]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for metric in ("top1_accuracy", "hungarian_accuracy", "nomatch_precision", "nomatch_recall"):
        lines.append(f"**{metric}**\n")
        lines.append("| matcher | " + " | ".join(scenarios) + " |")
        lines.append("|---|" + "---|" * len(scenarios))
        for m in matchers:
            cells = [_cell(results[s].get(m), metric) for s in scenarios]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_benchmark(results: dict, path: Path) -> Path:
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
    return save_figure(fig, path)


def plot_sweep(sweep: dict, path: Path) -> Path:
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
    return save_figure(fig, path)
