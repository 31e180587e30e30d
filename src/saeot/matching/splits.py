"""Feature splitting between two SAEs of one hook (``train.py sae@sae_b=...``): which features of
the wider dictionary are the children of each feature of the narrower one.

A run with a second SAE at the same hook matches both ways with the configured matcher:
narrow -> wide and wide -> narrow (the same matcher, its own null). A wide feature's
**parent** is its match in the narrow SAE (none if the matcher calls it no match); a narrow
feature's **children** are the wide features whose parent it is. Each narrow feature is then

* ``one``: exactly one child (a clear partner; ``mutual`` says whether the narrow
  feature's own match is that child),
* ``split``: two or more children (the wider SAE split it; SAEs of growing width split
  features this way, Bricken et al. 2023),
* ``none``: no child (nothing in the wider SAE is its match).

Outputs: ``splits.csv`` (one row per narrow feature: kind, children, their distances,
its own match, mutual, firing frequencies), ``parents.csv`` (one row per wide feature:
its parent and distance) and ``plots/splits.png``: the count of each kind and, for split
features, the parent's firing frequency against the sum of its children's (a split
that divides the parent's contexts keeps the sum near the parent's).
When the SAEs are of equal width, B (``sae_b``) plays the wide one.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saeot.hooks import base_hook
from saeot.io import atomic_path
from saeot.plots import plt, save_figure
from saeot.types import FeatureSamples, MatchResult

__all__ = ["SPLIT_COLUMNS", "PARENT_COLUMNS", "Splits", "same_hook_pairs", "build_splits", "write_splits",
           "plot_splits", "write_run_splits"]

SPLIT_COLUMNS = ["hook", "narrow_feature", "kind", "n_children", "children", "child_distances", "own_match",
                 "mutual", "frequency", "children_frequency"]
PARENT_COLUMNS = ["hook", "wide_feature", "parent", "distance", "matched"]


@dataclass(frozen=True)
class Splits:
    """The splitting of ``narrow`` (an SAE key) into ``wide`` at one hook.

    Attributes:
        parent: ``[F_wide]`` long, each wide feature's parent in narrow (-1: none).
        parent_distance: ``[F_wide]`` the matcher's cost of that parent.
        children: for each narrow feature, its children (wide features), closest first.
        own_match: ``[F_narrow]`` long, the narrow feature's own match in wide (-1: none).
        freq_narrow, freq_wide: firing frequencies (``[F]``; NaN if not given).
    """

    narrow: str
    wide: str
    parent: Tensor
    parent_distance: Tensor
    children: list[list[int]]
    own_match: Tensor
    freq_narrow: Tensor
    freq_wide: Tensor

    def kind(self, i: int) -> str:
        n = len(self.children[i])
        return "none" if n == 0 else "one" if n == 1 else "split"

    def counts(self) -> dict[str, int]:
        """How many narrow features have one clear partner, split, or have none."""
        out = {"one": 0, "split": 0, "none": 0}
        for i in range(len(self.children)):
            out[self.kind(i)] += 1
        out["one_mutual"] = sum(1 for i, c in enumerate(self.children) if len(c) == 1 and int(self.own_match[i]) == c[0])
        out["wide_with_parent"] = int((self.parent >= 0).sum())
        out["n_narrow"], out["n_wide"] = len(self.children), int(self.parent.shape[0])
        return out


def same_hook_pairs(results: list[MatchResult]) -> list[tuple[MatchResult, MatchResult]]:
    """``(a -> b, b -> a)`` result pairs of two SAEs at one hook, each pair once."""
    by = {(r.hook_a, r.hook_b): r for r in results}
    out = []
    for (a, b), r in by.items():
        if a != b and base_hook(a) == base_hook(b) and (b, a) in by and a < b:
            out.append((r, by[(b, a)]))
    return out


def build_splits(ab: MatchResult, ba: MatchResult, freq: dict[str, Tensor] | None = None) -> Splits:
    """The :class:`Splits` from the two directions of one hook's matching (``ba`` is ``ab`` reversed)."""
    if (ab.hook_a, ab.hook_b) != (ba.hook_b, ba.hook_a):
        raise ValueError(f"{ab.hook_a}->{ab.hook_b} and {ba.hook_a}->{ba.hook_b} are not the two directions of one pair")
    # the wide SAE is the one with more features; B when equal
    n_a, n_b = ab.n_features, ba.n_features
    narrow_to_wide, wide_to_narrow = (ab, ba) if n_b >= n_a else (ba, ab)
    parent = torch.where(wide_to_narrow.matched, wide_to_narrow.feature_b.long(), torch.full_like(wide_to_narrow.feature_b.long(), -1))
    dist = wide_to_narrow.distance.double()
    children: list[list[int]] = [[] for _ in range(narrow_to_wide.n_features)]
    for j in torch.argsort(dist, stable=True).tolist():  # closest first
        p = int(parent[j])
        if p >= 0:
            children[p].append(j)
    own = torch.where(narrow_to_wide.matched, narrow_to_wide.feature_b.long(), torch.full_like(narrow_to_wide.feature_b.long(), -1))
    freq = freq or {}
    nan = float("nan")
    fn = freq.get(narrow_to_wide.hook_a, torch.full((narrow_to_wide.n_features,), nan)).double()
    fw = freq.get(wide_to_narrow.hook_a, torch.full((wide_to_narrow.n_features,), nan)).double()
    return Splits(narrow=narrow_to_wide.hook_a, wide=wide_to_narrow.hook_a, parent=parent, parent_distance=dist,
                  children=children, own_match=own, freq_narrow=fn, freq_wide=fw)


def write_splits(all_splits: list[Splits], run_dir: str | Path) -> tuple[Path, Path]:
    """``splits.csv`` and ``parents.csv`` in ``run_dir`` (atomically), rows of every hook in ``all_splits``."""
    run_dir = Path(run_dir)
    sp, pp = run_dir / "splits.csv", run_dir / "parents.csv"
    with atomic_path(sp) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_COLUMNS)
        for s in all_splits:
            for i, ch in enumerate(s.children):
                own = int(s.own_match[i])
                w.writerow([s.narrow, i, s.kind(i), len(ch), " ".join(map(str, ch)),
                            " ".join(f"{float(s.parent_distance[j]):.6g}" for j in ch), own,
                            int(len(ch) == 1 and own == ch[0]), f"{float(s.freq_narrow[i]):.6g}",
                            f"{float(s.freq_wide[ch].sum()) if ch else 0.0:.6g}"])
    with atomic_path(pp) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PARENT_COLUMNS)
        for s in all_splits:
            for j in range(int(s.parent.shape[0])):
                w.writerow([s.wide, j, int(s.parent[j]), f"{float(s.parent_distance[j]):.6g}", int(s.parent[j] >= 0)])
    return sp, pp


def plot_splits(all_splits: list[Splits], path: str | Path) -> Path:
    """Per hook: bars of one / split / none (and the number of children of split features);
    the parent's firing frequency against its children's summed frequency."""
    fig, axes = plt.subplots(len(all_splits), 2, figsize=(9.5, 3.4 * len(all_splits)), squeeze=False)
    for (bar_ax, sc_ax), s in zip(axes, all_splits):
        n_children = np.array([len(c) for c in s.children])
        top = 8  # bars 0 .. 7 children, then "8+"
        bins = np.bincount(np.minimum(n_children, top), minlength=top + 1)
        colours = ["#c44e52"] + ["#55a868"] + ["#4c72b0"] * (top - 1)
        labels = [str(k) for k in range(top)] + [f"{top}+"]
        bar_ax.bar(range(top + 1), bins, color=colours)
        bar_ax.set_xticks(range(top + 1), labels, fontsize=8)
        bar_ax.set_xlabel(f"children in {s.wide} (0: none, red; 1: one, green; 2+: split, blue)", fontsize=8)
        bar_ax.set_ylabel(f"features of {s.narrow}")
        c = s.counts()
        bar_ax.set_title(f"one {c['one']} ({c['one_mutual']} mutual) · split {c['split']} · none {c['none']}", fontsize=9)
        split = [i for i, ch in enumerate(s.children) if len(ch) >= 2]
        if split:
            x = s.freq_narrow[split].numpy()
            y = np.array([float(s.freq_wide[s.children[i]].sum()) for i in split])
            sc_ax.scatter(x, y, s=8, alpha=0.6, color="#4c72b0")
            finite = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
            if finite.any():
                lo, hi = min(x[finite].min(), y[finite].min()), max(x[finite].max(), y[finite].max())
                sc_ax.plot([lo, hi], [lo, hi], color="#999999", lw=0.8, ls="--")
                sc_ax.set_xscale("log")
                sc_ax.set_yscale("log")
        sc_ax.set_xlabel("firing frequency of the split feature")
        sc_ax.set_ylabel("summed frequency of its children")
        sc_ax.set_title(f"{len(split)} split features", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def write_run_splits(results: list[MatchResult], samples_of: Callable[[str], FeatureSamples],
                     run_dir: str | Path) -> tuple[dict, Path] | None:
    """A run's splitting outputs (``splits.csv``, ``parents.csv``, ``plots/splits.png``) when
    ``results`` match two SAEs of one hook both ways; returns ``(metrics["splits"], plot path)``,
    or None (nothing written, ``samples_of`` never called) when they do not. ``samples_of``:
    hook -> its feature samples (for the firing frequencies), read only for the split hooks."""
    pairs = same_hook_pairs(results)
    if not pairs:
        return None
    freq = {h: samples_of(h).firing_frequency for ab, _ in pairs for h in (ab.hook_a, ab.hook_b)}
    splits = [build_splits(ab, ba, freq) for ab, ba in pairs]
    write_splits(splits, run_dir)
    plot = plot_splits(splits, Path(run_dir) / "plots" / "splits.png")
    return {s.narrow: {"wide": s.wide, **s.counts()} for s in splits}, plot
