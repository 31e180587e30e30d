"""What the strongest matches of a run are: token agreement, hubs and spread by distance quintile.

For one layer pair of a finished run, the matched pairs are cut into five quintiles by the
matcher's cost (strongest first). Per quintile: the mean cost, the Jaccard overlap of the
two features' top-5 tokens (by summed sample weight), how many distinct B features the
quintile's pairs land on (fewer: hubs), the median firing frequency of A's features and
the median spread of A's samples (weighted mean squared distance to their mean, in the
hidden space). Spearman correlations of the cost with the Jaccard overlap and the spread
over all matched pairs. Prints one JSON line.

    python benchmarks/match_strength.py --run-dir DIR --pair 3,4
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from saeot.hooks import hook_name
from saeot.types import FeatureSamples


def top_tokens(s: FeatureSamples, i: int, n: int = 5) -> set[int]:
    return set(s.top_token_ids(i, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--pair", default="3,4", help="layer_a,layer_b")
    ap.add_argument("--site", default="resid_post")
    args = ap.parse_args()
    la, lb = (int(x) for x in args.pair.split(","))
    d = Path(args.run_dir)
    A = FeatureSamples.load(d / "features" / f"{hook_name(la, args.site)}.safetensors")
    B = FeatureSamples.load(d / "features" / f"{hook_name(lb, args.site)}.safetensors")
    rows = [r for r in csv.DictReader(open(d / "matches.csv"))
            if r["matched"] == "1" and int(r["layer_a"]) == la and int(r["layer_b"]) == lb]
    if not rows:
        raise SystemExit(f"no matched pairs {la}->{lb} in {d / 'matches.csv'}")
    dist = np.array([float(r["distance"]) for r in rows])
    fa = np.array([int(r["feature_a"]) for r in rows])
    fb = np.array([int(r["feature_b"]) for r in rows])
    jac = np.array([len(top_tokens(A, a) & top_tokens(B, b)) / max(1, len(top_tokens(A, a) | top_tokens(B, b)))
                    for a, b in zip(fa, fb)])
    freq = A.firing_frequency.numpy()[fa]
    mu = A.weighted_mean()
    spread = np.array([float((A.weights[i] * ((A.points[i] - mu[i]) ** 2).sum(-1)).sum()) for i in fa])
    quintiles = []
    for idx in np.array_split(np.argsort(dist, kind="stable"), 5):
        quintiles.append({"n": len(idx), "mean_distance": float(dist[idx].mean()), "top5_jaccard": float(jac[idx].mean()),
                          "distinct_b": len(set(fb[idx].tolist())), "median_frequency_a": float(np.median(freq[idx])),
                          "median_spread_a": float(np.median(spread[idx]))})
    print(json.dumps({
        "benchmark": "match_strength", "run_dir": str(d), "pair": [la, lb], "n_matched": len(rows),
        "quintiles_strongest_first": quintiles,
        "spearman_distance_jaccard": float(spearmanr(dist, jac).statistic),
        "spearman_distance_spread": float(spearmanr(dist, spread).statistic),
    }))


if __name__ == "__main__":
    main()
