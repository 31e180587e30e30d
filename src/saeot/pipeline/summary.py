"""What a finished ``train.py`` / ``rematch.py`` run found, in a few lines for the terminal
(also written to the run dir as ``summary.txt``).

Per layer pair: features matched / total, how many distinct features of B they land on
and the no-match threshold; then the strongest matches of the run with the tokens each
side fires on, where the outputs are, and the command to run next.

"Strongest" ranks every matched pair of every layer pair by how far its cost lies below
its pair's no-match threshold, in standard deviations of that pair's costs
(``(null_threshold - distance) / std(distance)``), so layer pairs whose distances have
different scales (and debiased distances, which may be negative) are comparable; where a
matcher has no finite threshold, the pair's median cost stands in for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from saeot.hooks import base_hook, hook_layer
from saeot.io import atomic_write_text
from saeot.models.codecs import TextCodec
from saeot.types import FeatureSamples, MatchResult

__all__ = ["StrongMatch", "top_tokens", "strongest_matches", "format_run_summary", "write_summary"]


@dataclass(frozen=True)
class StrongMatch:
    """One matched pair of the summary: feature ``feature_a`` of ``hook_a`` -> ``feature_b`` of ``hook_b``."""

    hook_a: str
    feature_a: int
    hook_b: str
    feature_b: int
    distance: float
    below: float  # (threshold - distance) / std of the pair's costs: larger is stronger


def top_tokens(samples: FeatureSamples, feature: int, codec: TextCodec, n: int = 3) -> list[str]:
    """The ``n`` tokens carrying most of ``feature``'s sample weight (distinct token ids), decoded
    and quoted, strongest first; ``[]`` for a feature without samples."""
    return [repr(codec.decode([t])) for t in samples.top_token_ids(feature, n)]

def _below(res: MatchResult) -> torch.Tensor:
    """``[F_a]`` (threshold - distance) / std of the finite distances (NaN where the cost is not finite)."""
    d = res.distance.double()
    finite = torch.isfinite(d)
    if not bool(finite.any()):
        return torch.full_like(d, float("nan"))
    t = res.null_threshold if math.isfinite(res.null_threshold) else float(d[finite].median())
    scale = float(d[finite].std()) if int(finite.sum()) > 1 else 0.0
    return torch.where(finite, (t - d) / (scale if scale > 0 else 1.0), torch.full_like(d, float("nan")))


def strongest_matches(results: Sequence[MatchResult], n: int = 5) -> list[StrongMatch]:
    """The ``n`` matched pairs furthest below their pair's no-match threshold (ties: first pair,
    lowest feature first)."""
    cands = []
    for r in results:
        below = _below(r)
        for i in torch.nonzero(r.matched & torch.isfinite(below), as_tuple=False).flatten().tolist():
            cands.append(StrongMatch(r.hook_a, i, r.hook_b, int(r.feature_b[i]), float(r.distance[i]), float(below[i])))
    cands.sort(key=lambda m: -m.below)  # stable: equal scores keep pair / feature order
    return cands[:n]


def _layer(key: str) -> str:
    """``L8``, or ``L8@b`` for the second SAE at that hook."""
    tag = key[len(base_hook(key)):]
    return f"L{hook_layer(key)}{tag}"


def _feature(key: str, i: int) -> str:
    return f"{_layer(key)} #{i}"


def format_run_summary(results: Sequence[MatchResult], samples: dict[str, FeatureSamples], codec: TextCodec,
                       run_dir: str | Path, next_commands: Sequence[str] = (), n_strongest: int = 5) -> str:
    """The summary text (see the module doc); ``samples`` are the run's unprojected feature samples."""
    lines = [f"saeot: {results[0].matcher if results else 'no'} matches, {len(results)} layer pair(s)"]
    for r in results:
        fb = r.feature_b[r.matched]
        thr = f"{r.null_threshold:.4g}" if math.isfinite(r.null_threshold) else "none"
        lines.append(f"  {_layer(r.hook_a)} -> {_layer(r.hook_b)}: "
                     f"{int(r.matched.sum())} / {r.n_features} matched onto {int(fb.unique().numel())} distinct "
                     f"features, no-match threshold {thr}")
    strong = strongest_matches(results, n_strongest)
    if strong:
        lines.append("  strongest matches (sd of the pair's costs below its threshold; the tokens each feature "
                     "fires on most):")
        for m in strong:
            ta = ", ".join(top_tokens(samples[m.hook_a], m.feature_a, codec)) if m.hook_a in samples else ""
            tb = ", ".join(top_tokens(samples[m.hook_b], m.feature_b, codec)) if m.hook_b in samples else ""
            lines.append(f"    {_feature(m.hook_a, m.feature_a):>10} -> {_feature(m.hook_b, m.feature_b):<10} "
                         f"{m.below:5.1f} sd   {ta}  ->  {tb}")
    out = Path(run_dir)
    lines.append(f"  outputs: {out}/ (matches.csv, flows.csv, plots/, metrics.json)")
    for cmd in next_commands:
        lines.append(f"  next: {cmd}")
    return "\n".join(lines)


def write_summary(text: str, out_dir: str | Path) -> Path:
    """``summary.txt`` in ``out_dir`` (a run or evaluation dir), written atomically; returns its path."""
    path = Path(out_dir) / "summary.txt"
    atomic_write_text(path, text + "\n")
    return path
