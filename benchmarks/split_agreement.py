"""How much two matchers agree on the feature splitting of two SAEs of one hook.

Reads ``parents.csv`` / ``splits.csv`` of run dirs over the same two SAEs (a ``train.py
sae@sae_b=...`` run and its ``rematch.py`` runs with other matchers) and prints one JSON line:
per run the counts of narrow features with one child / a split / none, and for every pair of
runs the fraction of wide features that both give a parent and give the same one, and the
fraction of narrow features whose kind (one / split / none) is the same.

    python benchmarks/split_agreement.py --run semantic_ot=RUN --run feature_flow=REMATCH ...
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path


def _read(run: Path) -> tuple[list[int], list[str]]:
    parents = [int(r["parent"]) for r in csv.DictReader(open(run / "parents.csv"))]
    kinds = [r["kind"] for r in csv.DictReader(open(run / "splits.csv"))]
    return parents, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (two or more)")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.run)
    if len(runs) < 2:
        raise SystemExit("give two or more --run LABEL=RUN_DIR")
    data = {k: _read(Path(v)) for k, v in runs.items()}
    counts = {k: {kind: kinds.count(kind) for kind in ("one", "split", "none")} | {"with_parent": sum(p >= 0 for p in par)}
              for k, (par, kinds) in data.items()}
    pairs = {}
    for a, b in itertools.combinations(data, 2):
        pa, ka = data[a]
        pb, kb = data[b]
        both = [(x, y) for x, y in zip(pa, pb) if x >= 0 and y >= 0]
        pairs[f"{a}|{b}"] = {
            "wide_both_with_parent": len(both),
            "same_parent_of_both": sum(x == y for x, y in both) / max(1, len(both)),
            "same_kind": sum(x == y for x, y in zip(ka, kb)) / max(1, len(ka)),
        }
    print(json.dumps({"benchmark": "split_agreement", "runs": runs, "counts": counts, "pairs": pairs}))


if __name__ == "__main__":
    main()
