"""Exact W2 nearest neighbours: saeot.transport's ``W2Solver.nearest`` against brute force with the same solver.

Brute force solves every pair with the *same* exact solver and the same threads
(``ExactW2(n_jobs, bound="none").pairwise``), then takes the k smallest of each row, so
``speedup`` measures the pruning alone, not per-call overhead or threads. Ours is
``ExactW2(bound=--bound).nearest`` (a cascade of lower bounds, exact solves only on
surviving candidates); ``--solver sinkhorn`` / ``sliced`` time ``SinkhornW2()`` /
``SlicedW2()`` with their default settings against the same exact brute force.
Both run in the same process on the same data, so ``speedup`` is a same-run ratio
(robust to other load on the machine, as far as load is steady).

The clouds imitate real feature distributions: concepts grouped in families (so
there are near competitors), each concept a mixture of a few modes (contexts),
activation-like log-normal weights, a varying number of valid samples (padding);
B holds drifted copies of most concepts of A (shuffled) plus new ones.

    python benchmarks/transport.py --n-a 256 --n-b 256 --k 32 --r 64 --seed 0

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from saeot.transport import ExactW2, SinkhornW2, SlicedW2, W2Solver


def make_clouds(n_a: int, n_b: int, K: int, r: int, seed: int):
    """``xa [n_a, K, r]``, ``wa [n_a, K]``, ``xb``, ``wb`` (float32) and ``truth [n_a]`` (-1: no partner)."""
    g = np.random.default_rng(seed)
    n_keep = int(round(0.85 * min(n_a, n_b)))
    n_new = n_b - n_keep
    n_concepts = n_a + n_new
    n_fam = max(2, n_concepts // 8)
    fam = g.integers(n_fam, size=n_concepts)
    fam_centre = g.normal(size=(n_fam, r)) * 3.0
    centre = fam_centre[fam] + g.normal(size=(n_concepts, r)) * 1.0
    n_modes = 3
    modes = centre[:, None, :] + g.normal(size=(n_concepts, n_modes, r)) * 0.8
    mode_p = g.dirichlet(np.ones(n_modes), size=n_concepts)

    def feature(c: int, drift: float):
        m = int(g.integers(K // 2, K + 1))
        z = g.choice(n_modes, size=m, p=mode_p[c])
        shift = g.normal(size=r) * drift
        pts = modes[c][z] + shift + g.normal(size=(m, r)) * 0.5
        act = g.lognormal(0.0, 0.7, size=m)
        x = np.zeros((K, r))
        w = np.zeros(K)
        x[:m], w[:m] = pts, act / act.sum()
        return x, w

    A = [feature(c, 0.0) for c in range(n_a)]
    kept = g.permutation(n_a)[:n_keep]
    concepts_b = np.concatenate([kept, n_a + np.arange(n_new)])
    order = g.permutation(n_b)
    concepts_b = concepts_b[order]
    B = [feature(int(c), 0.3) for c in concepts_b]
    truth = np.full(n_a, -1)
    for j, c in enumerate(concepts_b):
        if c < n_a:
            truth[c] = j
    xa = torch.tensor(np.stack([x for x, _ in A]), dtype=torch.float32)
    wa = torch.tensor(np.stack([w for _, w in A]), dtype=torch.float32)
    xb = torch.tensor(np.stack([x for x, _ in B]), dtype=torch.float32)
    wb = torch.tensor(np.stack([w for _, w in B]), dtype=torch.float32)
    return xa, wa, xb, wb, truth


def brute_force(xa, wa, xb, wb, rows, n_jobs: int | None):
    """``[len(rows), Fb]`` costs of every pair, by the exact solver with the same threads as ours."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return ExactW2(n_jobs=n_jobs, bound="none").pairwise(xa[idx], wa[idx], xb, wb).numpy()


SOLVER_CLASSES = (ExactW2, SinkhornW2, SlicedW2)


def build_solver(name: str, n_jobs: int | None, bound: str | None) -> W2Solver:
    """The solver ``--solver`` names, with its default settings (``--n-jobs`` threads and ``--bound`` for exact)."""
    cls = {c.name: c for c in SOLVER_CLASSES}[name]
    if cls is ExactW2:
        return ExactW2(n_jobs=n_jobs, bound=bound or ExactW2.bound)
    if n_jobs is not None:
        raise SystemExit(f"--n-jobs sets the threads of the exact solver, not of --solver {name}")
    return cls()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-a", type=int, default=256)
    p.add_argument("--n-b", type=int, default=256)
    p.add_argument("--k", type=int, default=32, help="samples per feature (K)")
    p.add_argument("--r", type=int, default=64, help="width of the reference space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default=ExactW2.name, choices=[c.name for c in SOLVER_CLASSES])
    p.add_argument("--bound", default=None, help="pruning bound (default: the solver's own)")
    p.add_argument("--neighbours", type=int, default=2, help="k of the nearest search")
    p.add_argument("--n-jobs", type=int, default=None, help="threads of the exact solver (default: torch threads)")
    p.add_argument("--brute-pairs", type=int, default=None,
                   help="solve only about this many pairs by brute force (whole rows) and extrapolate its time")
    args = p.parse_args()
    solver = build_solver(args.solver, args.n_jobs, args.bound if args.solver == ExactW2.name else None)

    xa, wa, xb, wb, truth = make_clouds(args.n_a, args.n_b, args.k, args.r, args.seed)
    n_a, n_b = xa.shape[0], xb.shape[0]
    rows = np.arange(n_a)
    if args.brute_pairs is not None and args.brute_pairs < n_a * n_b:
        n_rows = max(1, args.brute_pairs // n_b)
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(n_a, size=n_rows, replace=False))

    t0 = time.perf_counter()
    res = solver.nearest(xa, wa, xb, wb, k=args.neighbours, bound=None if args.solver == ExactW2.name else args.bound)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    D = brute_force(xa, wa, xb, wb, rows, args.n_jobs)
    t_brute_part = time.perf_counter() - t0
    t_brute = t_brute_part * (n_a / len(rows))

    nearest_brute = np.argsort(D, axis=1, kind="stable")[:, 0]
    ours_idx = res.index[rows, 0].numpy()
    ours_cost = res.cost[rows].double().numpy()
    agree = float(np.mean(ours_idx == nearest_brute))
    # every pair that both computed: the k neighbours we returned
    ref = np.take_along_axis(D, np.maximum(res.index[rows].numpy(), 0), 1)
    finite = np.isfinite(ours_cost)
    max_abs_err = float(np.max(np.abs(ref[finite] - ours_cost[finite]))) if finite.any() else 0.0
    has_truth = truth[rows] >= 0
    planted = float(np.mean(ours_idx[has_truth] == truth[rows][has_truth])) if has_truth.any() else None
    print(json.dumps({
        "benchmark": "transport.nearest",
        "solver": args.solver,
        "bound": res.bound,
        "n_a": n_a, "n_b": n_b, "K": args.k, "r": args.r, "seed": args.seed, "neighbours": args.neighbours,
        "n_jobs": (solver.n_jobs or torch.get_num_threads()) if isinstance(solver, ExactW2) else None,
        "torch_threads": torch.get_num_threads(),
        "exact_agreement": agree,
        "max_abs_err": max_abs_err,
        "speedup": t_brute / t_ours,
        "time_ours_s": round(t_ours, 4),
        "time_brute_s": round(t_brute, 4),
        "brute_rows": int(len(rows)),
        "brute_extrapolated": bool(len(rows) < n_a),
        "n_solved": res.n_solved,
        "n_pairs": res.n_pairs,
        "solved_fraction": res.solved_fraction,
        "solves_per_row": res.n_solved / max(n_a, 1),
        "planted_top1_accuracy": planted,
    }))


if __name__ == "__main__":
    main()
