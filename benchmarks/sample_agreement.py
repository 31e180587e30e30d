"""What a feature's K profiled samples say about its partner at the next layer.

For one layer pair of a finished run, each A feature with the run's full K samples gets its
nearest B feature under several comparisons of the *same* samples, and the benchmark counts
how often that nearest feature is the one a reference matcher picks (another run dir over the
same SAEs, e.g. made by ``rematch.py``: activation correlation sees every held-out token,
feature flow the SAE weights):

- ``semantic_ot``: the run's own nearest match (``matches.csv``, matched or not);
- ``mean_raw``: the activation-weighted mean of the samples in the hidden space (L2; the
  residual streams of adjacent layers share a basis up to a small drift);
- ``mean_reference``: the same mean after the run's reference space (what the
  ``mean_embedding`` matcher compares);
- ``shared_locations``: the number of (context, position) the two features' samples share
  (ties broken by ``mean_reference``): whether their strongest tokens are the same tokens.

If every comparison of the samples agrees with the reference about equally, and much less
than the references agree with each other, the samples are what limits a sample-based
matcher, not the distance. Prints one JSON line.

    python rematch.py -m run_dir=DIR matcher=activation_correlation,feature_flow hydra.sweep.dir=REM
    python benchmarks/sample_agreement.py --run-dir DIR --pair 8,9 \\
        --reference activation_correlation=REM/0_* --reference feature_flow=REM/1_*
"""

from __future__ import annotations

import argparse
import glob
import json
import time

import numpy as np
import scipy.sparse as sp
import torch

from saeot.pipeline.rundir import RunDir
from saeot.reference import project_samples
from saeot.types import FeatureSamples


def nearest_of(run: RunDir, layer_a: int, layer_b: int) -> dict[int, int]:
    """A feature -> its nearest B feature in ``run``'s matches (rows with a B feature)."""
    out = {}
    for r in run.rows:
        if int(r["layer_a"]) == layer_a and int(r["layer_b"]) == layer_b and r["feature_b"] not in ("", "-1"):
            out[int(r["feature_a"])] = int(r["feature_b"])
    return out


def shared_locations(a: FeatureSamples, b: FeatureSamples) -> sp.csr_matrix:
    """``[F_a, F_b]`` sparse: how many (context, position) the samples of each pair share."""
    def incidence(s: FeatureSamples, index: dict) -> tuple[list[int], list[int]]:
        loc = s.locations.long()
        rows, cols = [], []
        for f, k in zip(*torch.nonzero(loc[..., 0] >= 0, as_tuple=True)):
            key = (int(loc[f, k, 0]), int(loc[f, k, 1]))
            rows.append(int(f))
            cols.append(index.setdefault(key, len(index)))
        return rows, cols

    index: dict = {}
    ra, ca = incidence(a, index)
    rb, cb = incidence(b, index)
    n = len(index)
    ma = sp.csr_matrix((np.ones(len(ra)), (ra, ca)), shape=(a.points.shape[0], n))
    mb = sp.csr_matrix((np.ones(len(rb)), (rb, cb)), shape=(b.points.shape[0], n))
    return (ma @ mb.T).tocsr()


def agreement(nearest: dict[int, int], reference: dict[int, int], features: list[int]) -> float:
    keys = [f for f in features if f in reference]
    return sum(nearest.get(f) == reference[f] for f in keys) / max(1, len(keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a finished train.py run (its features/ and matches.csv)")
    p.add_argument("--pair", required=True, help="layers A,B, e.g. 8,9")
    p.add_argument("--reference", action="append", required=True,
                   help="name=DIR: a run over the same SAEs whose nearest matches are the reference (repeatable)")
    args = p.parse_args()
    t0 = time.perf_counter()
    la, lb = (int(x) for x in args.pair.split(","))
    run = RunDir.load(args.run_dir)
    hooks = {int(h.split(".")[1]): h for h in run.hooks}
    if la not in hooks or lb not in hooks:
        raise SystemExit(f"--pair {args.pair}: the run has layers {sorted(hooks)}")
    sa, sb = run.samples(hooks[la]), run.samples(hooks[lb])
    K = sa.weights.shape[1]
    full = [int(f) for f in torch.nonzero((sa.weights > 0).sum(1) == K).flatten()]
    space = run.reference()
    pa, pb = project_samples(space, sa), project_samples(space, sb)
    m_ref_a, m_ref_b = pa.weighted_mean(), pb.weighted_mean()
    d_ref = torch.cdist(m_ref_a, m_ref_b)
    nearest = {
        "semantic_ot": nearest_of(run, la, lb),
        "mean_raw": dict(enumerate(torch.cdist(sa.weighted_mean(), sb.weighted_mean()).argmin(1).tolist())),
        "mean_reference": dict(enumerate(d_ref.argmin(1).tolist())),
    }
    shared = shared_locations(sa, sb)
    best_shared = {}
    for f in full:
        row = shared.getrow(f)
        if row.nnz == 0:
            best_shared[f] = int(d_ref[f].argmin())
            continue
        top = row.data.max()
        cands = row.indices[row.data == top]
        best_shared[f] = int(cands[d_ref[f, torch.as_tensor(cands)].argmin()])
    nearest["shared_locations"] = best_shared
    most_shared = np.asarray(shared.max(axis=1).todense()).ravel()[full]
    refs = {}
    for spec in args.reference:
        name, _, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern))
        if len(paths) != 1:
            raise SystemExit(f"--reference {spec}: {len(paths)} directories match {pattern!r}; expected one")
        refs[name] = nearest_of(RunDir.load(paths[0]), la, lb)
    out = {
        "run_dir": args.run_dir, "pair": [la, lb], "k": K, "sampling": run.cfg.profiling.sampling,
        "n_features_full_k": len(full),
        "agreement": {name: {c: round(agreement(n, ref, full), 4) for c, n in nearest.items()}
                      for name, ref in refs.items()},
        "references_agree": {f"{a}|{b}": round(agreement(refs[a], refs[b], full), 4)
                             for i, a in enumerate(refs) for b in list(refs)[i + 1:]},
        "shared_locations": {"mean_of_most": round(float(most_shared.mean()), 3),
                             "fraction_sharing_none": round(float((most_shared == 0).mean()), 4)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
