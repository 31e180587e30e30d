"""What a run writes to its directory, and the readers of the tabular files.

    feature_stats.csv            layer, hook, feature, firing frequency, mean / max activation
    features/<hook>.safetensors  each feature's K weighted samples (FeatureSamples.load)
    reference.safetensors        the fitted reference-space maps
    matches.csv                  MATCH_COLUMNS, one row per feature of A and layer pair
    saes.json                    hook -> where its SAE came from (saeot.saes.load_recorded)
    metrics.json                 summaries of every stage

Every file is written atomically (:mod:`saeot.io`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from saeot.hooks import hook_layer
from saeot.io import atomic_path, atomic_write_json
from saeot.pipeline.state import TrainResult
from saeot.types import FeatureSamples, MatchResult

__all__ = ["MATCH_COLUMNS", "write_feature_stats", "write_matches", "read_matches", "save_artifacts"]

MATCH_COLUMNS = ["layer_a", "feature_a", "layer_b", "feature_b", "distance", "margin", "matched"]


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
    """Rows of a ``matches.csv`` as dicts of strings; ValueError naming the file if its columns differ."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if columns != MATCH_COLUMNS:
        raise ValueError(f"run_dir: {path} has columns {columns}, expected {MATCH_COLUMNS} (not written by this "
                         "saeot's train.py): rerun train.py for this run")
    return rows


def save_artifacts(result: TrainResult) -> None:
    """Every file of the run directory except ``metrics.json`` and the plots."""
    out = result.run_dir
    write_feature_stats(result.samples, out / "feature_stats.csv")
    for h, s in result.samples.items():
        s.save(out / "features" / f"{h}.safetensors")
    result.reference.space.save(out / "reference.safetensors")
    atomic_write_json(out / "saes.json", result.setup.sae_records)
    if result.results:
        write_matches(result.results, out / "matches.csv")
