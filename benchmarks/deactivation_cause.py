"""Why a matcher's pairs pass or fail the causal deactivation test, from an evaluation's pairs.

Reads ``EVAL_DIR/deactivation_pairs.csv`` (written by ``evaluate.py``: every pair the deactivation
test sampled, per run and layer pair, with ``j_clean`` (B's feature's activation on A's feature's
tokens), the relative drop ``change``, ``success`` (drop >= 0.5), the pair's co-activation
correlation ``corr`` and its first-order geometry ``transfer_cos`` (A's decoder row against B's
encoder column: feature flow's score, the linear prediction of the ablation) and ``decoder_cos``).

A failure has one of two causes: **silent** (j never fires on i's tokens: the pair does not even
co-fire, so removing i cannot show j depends on it) or **fires but does not depend** (j fires, but
removing i's direction leaves it). Per matcher and layer pair it prints the share of each, and,
over all sampled pairs of all matchers pooled, how well each predictor orders the drop (Spearman
rank correlation with ``change``) and the success rate of the pairs that fire, by quartile of
``transfer_cos``: whether the test measures the geometry feature flow matches by.

    python benchmarks/deactivation_cause.py --eval-dir EVAL_DIR

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from saeot.evaluation.functional._deactivation import why_summary


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} has no sampled pairs (functional.coverage_deactivation=0?)")
    for r in rows:
        for k in ("j_clean", "change", "success", "corr", "transfer_cos", "decoder_cos"):
            r[k] = float(r[k])
    return rows


def per_matcher(rows: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[f"{r['layer_a']}->{r['layer_b']} {r['matcher']}"].append(r)
    out = {}
    for key, g in sorted(groups.items()):
        why = why_summary({k: [r[k] for r in g] for k in ("j_clean", "success", "transfer_cos", "decoder_cos")})
        out[key] = {"n": len(g), "success": round(float(np.mean([r["success"] for r in g])), 4),
                    **{k: (None if math.isnan(v) else round(v, 4)) for k, v in why.items()},
                    "corr": round(float(np.nanmean([r["corr"] for r in g])), 4)}
    return out


def pooled(rows: list[dict]) -> dict:
    fires = [r for r in rows if r["j_clean"] > 0]
    change = np.array([r["change"] for r in fires])
    out = {"n_pairs": len(rows), "n_fire": len(fires), "spearman_with_change_given_fires": {}}
    for k in ("transfer_cos", "decoder_cos", "corr"):
        x = np.array([r[k] for r in fires])
        ok = np.isfinite(x)
        out["spearman_with_change_given_fires"][k] = round(float(spearmanr(x[ok], change[ok]).statistic), 4)
    tc = np.array([r["transfer_cos"] for r in fires])
    succ = np.array([r["success"] for r in fires])
    edges = np.quantile(tc, [0, 0.25, 0.5, 0.75, 1.0])
    bins = np.clip(np.searchsorted(edges, tc, side="right") - 1, 0, 3)
    out["success_given_fires_by_transfer_cos_quartile"] = [
        {"transfer_cos": [round(float(edges[q]), 3), round(float(edges[q + 1]), 3)],
         "success": round(float(succ[bins == q].mean()), 4), "n": int((bins == q).sum())} for q in range(4)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", required=True, type=Path)
    args = ap.parse_args()
    rows = load(args.eval_dir / "deactivation_pairs.csv")
    print(json.dumps({"eval_dir": str(args.eval_dir), "per_matcher": per_matcher(rows), "pooled": pooled(rows)}))


if __name__ == "__main__":
    main()
