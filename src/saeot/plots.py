"""Pictures of a run: distance distributions against the null, and the flow of matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saeot.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_distances(results: list, path: Path) -> Path:
    """Histogram of best-match distances per layer pair, with the null threshold."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        d = r.distance[torch.isfinite(r.distance)].numpy()
        ax.hist(d, bins=40, color="#4c72b0", alpha=0.8, label="best match")
        if r.null_threshold == r.null_threshold:
            ax.axvline(r.null_threshold, color="#c44e52", ls="--", label="null threshold")
        ax.set_title(f"{r.hook_a.split('.hook')[0]} -> {r.hook_b.split('.hook')[0]}\n{int(r.matched.sum())}/{r.n_features} matched", fontsize=9)
        ax.set_xlabel(f"{r.matcher} distance")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_flow(results: list, path: Path, max_features: int = 40) -> Path:
    """Matched edges between layers for the first ``max_features`` features of each layer."""
    from saeot.data.datamodule import hook_layer

    fig, ax = plt.subplots(figsize=(6, 5))
    layers = sorted({hook_layer(r.hook_a) for r in results} | {hook_layer(r.hook_b) for r in results})
    for r in results:
        la, lb = hook_layer(r.hook_a), hook_layer(r.hook_b)
        n = min(max_features, r.n_features)
        for i in range(n):
            j = int(r.feature_b[i])
            if j < 0 or j >= max_features:
                continue
            ok = bool(r.matched[i])
            ax.plot([la, lb], [i, j], color="#55a868" if ok else "#cccccc", lw=1.2 if ok else 0.5, alpha=0.9 if ok else 0.6)
    for layer in layers:
        ax.scatter([layer] * max_features, range(max_features), s=6, color="k")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("feature index")
    ax.set_title("feature flow (green: matched, grey: below the null)")
    ax.invert_yaxis()
    return _save(fig, path)


def plot_run(run: Any) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if run.results:
        out["distances"] = plot_distances(run.results, run.run_dir / "plots" / "distances.png")
        out["flow"] = plot_flow(run.results, run.run_dir / "plots" / "flow.png")
    return out
