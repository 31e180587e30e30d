"""Pictures of a run: distance distributions against the null, and the flow of matches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display: select the backend before pyplot loads
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saeot.hooks import hook_layer  # noqa: E402
from saeot.io import atomic_path  # noqa: E402

if TYPE_CHECKING:  # annotations only: plots sit below matching/, which draws with them
    from saeot.matching.flows import Chain, Flows
    from saeot.models.codecs import TextCodec
    from saeot.pipeline.state import TrainResult
    from saeot.types import FeatureSamples


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
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
    return save_figure(fig, path)


def _top_token(samples: FeatureSamples | None, codec: TextCodec | None, i: int) -> str:
    if samples is None or codec is None:
        return ""
    toks = samples.token_ids[i]
    toks = toks[toks >= 0]
    if len(toks) == 0:
        return ""
    vals, counts = toks.unique(return_counts=True)
    text = codec.decode([int(vals[counts.argmax()])]).replace("\n", "\\n")
    return repr(text[:12])


def plot_flow(results: list, path: Path, samples: dict | None = None, codec: TextCodec | None = None, n_start: int = 24) -> Path:
    """:func:`flow_figure` as PNG at ``path``."""
    return save_figure(flow_figure(results, samples=samples, codec=codec, n_start=n_start), path)


def _fit_labels_right(ax, labels: list, pad_px: float = 4.0) -> None:
    """Widen ``ax``'s x range until every label (drawn to the right of its point) ends inside
    the axes: the last layer's labels would otherwise run past the axes into the colour bar."""
    fig = ax.figure
    fig.canvas.draw()  # lays the figure out and sizes the texts
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    x0, x1 = ax.get_xlim()
    right = x1
    for t in labels:
        x = t.xy[0]
        beyond = t.get_window_extent(renderer).x1 - ax.transData.transform((x, 0))[0] + pad_px  # pixels right of x
        room = max(1.0 - beyond / width, 0.2)  # the fraction of the axes left of the label's point
        right = max(right, x0 + (x - x0) / room)
    ax.set_xlim(x0, right)


def flow_figure(results: list, samples: dict | None = None, codec: TextCodec | None = None, n_start: int = 24):
    """Follow the ``n_start`` most frequent features of the first layer through every layer pair.

    Nodes are (layer, feature), labelled with the feature's most common top token; an edge is
    the match of its left end, coloured by distance (matched) or dashed grey (below the null).
    The colour bar has its own axes, right of the flow's; every label lies inside the flow's.
    """
    by_a: dict[str, list] = {}
    for r in results:
        by_a.setdefault(r.hook_a, []).append(r)
    first = min((r.hook_a for r in results), key=hook_layer)
    s0 = samples.get(first) if samples else None
    if s0 is not None:
        order = s0.n_fire.argsort(descending=True)
    else:
        order = torch.arange(results[0].n_features)
    frontier = {first: [int(i) for i in order[:n_start]]}
    ypos: dict[tuple[str, int], float] = {}
    for j, i in enumerate(frontier[first]):
        ypos[(first, i)] = float(j)
    edges = []
    dists = [float(d) for r in results for d in r.distance[r.matched]]
    vmax = max(dists) if dists else 1.0
    seen = set()
    queue = [first]
    while queue:
        h = queue.pop(0)
        if h in seen:
            continue
        seen.add(h)
        for r in sorted(by_a.get(h, []), key=lambda r: hook_layer(r.hook_b)):
            nxt = []
            for i in frontier.get(h, []):
                j = int(r.feature_b[i])
                if j < 0:
                    continue
                if (r.hook_b, j) not in ypos:
                    ypos[(r.hook_b, j)] = ypos[(h, i)]
                    nxt.append(j)
                edges.append((h, i, r.hook_b, j, bool(r.matched[i]), float(r.distance[i])))
            frontier.setdefault(r.hook_b, []).extend(nxt)
            queue.append(r.hook_b)
    fig, (ax, cax) = plt.subplots(1, 2, figsize=(2.6 + 2.2 * len(seen), 0.32 * n_start + 1.5), layout="constrained",
                                  gridspec_kw={"width_ratios": [1, 0.035]})
    cmap = plt.get_cmap("viridis")
    for ha, i, hb, j, ok, d in edges:
        xa, xb = hook_layer(ha), hook_layer(hb)
        ya, yb = ypos[(ha, i)], ypos[(hb, j)]
        if ok:
            ax.plot([xa, xb], [ya, yb], color=cmap(min(d / vmax, 1.0)), lw=1.6, alpha=0.9)
        else:
            ax.plot([xa, xb], [ya, yb], color="#bbbbbb", lw=0.8, ls="--")
    labels = []
    for (h, i), y in ypos.items():
        x = hook_layer(h)
        ax.scatter([x], [y], s=14, color="k", zorder=3)
        label = f"{i} {_top_token(samples.get(h) if samples else None, codec, i)}"
        labels.append(ax.annotate(label, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=6))
    layers = sorted({hook_layer(h) for h, _ in ypos})
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_yticks([])
    ax.set_ylim(max(ypos.values()) + 0.6, -0.8)  # top row first, room above it for its labels
    ax.set_title(f"flow of the {n_start} most frequent features of layer {hook_layer(first)}\n"
                 "(colour: distance, dashed: no match)", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, cax=cax, label=f"{results[0].matcher} distance")
    _fit_labels_right(ax, labels)
    return fig


def plot_chains(flows: Flows, path: Path, samples: dict | None = None, codec: TextCodec | None = None, n: int = 40) -> Path:
    """The ``n`` longest chains through all layers (ties: most frequent first feature), one row
    each, coloured by distance; labelled with the top token at both ends; the births and
    deaths per layer as bars underneath. Stays readable for 30 layers."""
    by_layer = {hook_layer(h): s for h, s in (samples or {}).items()}

    def freq(chain: Chain) -> float:
        la, i = chain.nodes[0]
        s = by_layer.get(la)
        return float(s.n_fire[i]) if s is not None else 0.0

    chains = sorted(flows.chains, key=lambda c: (-c.length, -freq(c)))[:n]
    layers = sorted(flows.layers)
    dists = [d for c in chains for d in c.distances]
    vmax = max(dists) if dists else 1.0
    width = min(22.0, max(8.0, 0.55 * len(layers) + 4))
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(width, 0.26 * len(chains) + 4.5), sharex=True,
                                 gridspec_kw={"height_ratios": [max(3, 0.26 * len(chains)), 1.6]})
    cmap = plt.get_cmap("viridis")
    for y, c in enumerate(chains):
        xs = [la for la, _ in c.nodes]
        for k, d in enumerate(c.distances[: len(xs) - 1]):
            ax.plot(xs[k:k + 2], [y, y], color=cmap(min(d / vmax, 1.0)), lw=2.2)
        ax.scatter(xs, [y] * len(xs), s=8, color="k", zorder=3)
        (la0, i0), (la1, i1) = c.nodes[0], c.nodes[-1]
        ax.annotate(f"{la0}:{i0} {_top_token(by_layer.get(la0), codec, i0)}", (la0, y), xytext=(-4, 0),
                    textcoords="offset points", fontsize=6, ha="right", va="center")
        ax.annotate(f"{_top_token(by_layer.get(la1), codec, i1)} ({c.end})", (la1, y), xytext=(4, 0),
                    textcoords="offset points", fontsize=6, va="center")
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_title(f"the {len(chains)} longest feature chains across {len(layers)} layers "
                 f"({len(flows.chains)} chains in all; colour: distance)", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=[ax, bx], fraction=0.03, label="distance")
    born = [flows.layers[la]["born"] for la in layers]
    dies = [-flows.layers[la]["dies"] for la in layers]
    bx.bar(layers, born, color="#4c72b0", label="born")
    bx.bar(layers, dies, color="#c44e52", label="dies")
    bx.axhline(0, color="k", lw=0.5)
    bx.set_xticks(layers)
    bx.set_xlabel("layer")
    bx.set_ylabel("features")
    bx.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_run(run: TrainResult, flows: Flows | None = None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if run.results:
        out["distances"] = plot_distances(run.results, run.run_dir / "plots" / "distances.png")
        codec = getattr(run.lm, "codec", None)
        out["flow"] = plot_flow(run.results, run.run_dir / "plots" / "flow.png", samples=run.samples, codec=codec)
        if flows is not None and len(flows.layers) > 2:
            out["chains"] = plot_chains(flows, run.run_dir / "plots" / "chains.png", samples=run.samples, codec=codec)
    return out
