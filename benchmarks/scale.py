"""Exact nearest W2 at scale: ``ExactW2.nearest`` (bound cascade, optionally certified) on n x n features.

Two sources of features:

* ``--n 16384 --k 32 --r 64``: synthetic clouds made as hard as real SAE features
  (:func:`make_hard_clouds`): every feature's covariance has low rank, is oriented at
  random inside a subspace shared by all features, and the means sit close together in
  another shared subspace, so means and spreads alone separate few pairs. The JSON shows
  how hard they are: ``mean_spread_solved_fraction`` (the classic mean + spread bound's
  solved fraction on the checked rows; real SmolLM2 features: 18-24%).
* ``--run-dir DIR``: a finished ``train.py`` run's features of two hooks
  (``features/<hook>.safetensors``), projected into its reference space
  (``reference.safetensors``).

``seconds`` is wall time of the search, ``cpu_seconds`` its CPU time over all threads (steadier on a
shared machine). ``agreement`` is checked against brute force with the same solver and threads
(``ExactW2(n_jobs).pairwise``) on ``--check-rows`` sampled rows: the fraction of those
rows whose k nearest (indices and costs) are identical. ``--ablation`` adds the solved
fraction of each bound cascade, measured by running the search on the checked rows.

    python benchmarks/scale.py --n 16384 --k 32 --r 64
    python benchmarks/scale.py --run-dir outputs/2026-01-01/12-00-00 --ablation
    python benchmarks/scale.py --n 16384 --debias 1     # semantic OT's default (debiased) cost

``--debias`` searches the cost semantic OT matches with by default (:mod:`saeot.matching.semantic_cost`)
through the same cascade, shifted by the exact debiasing terms.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
from safetensors import safe_open

from saeot import reference as reference_spaces
from saeot.hooks import sort_hooks_by_layer
from saeot.reference import project_samples
from saeot.matching.semantic_cost import SemanticCost
from saeot.transport import CASCADES, ExactW2, NearestResult
from saeot.types import FeatureSamples


def _frames(n: int, rank: int, basis: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``[n, rank, r]`` random orthonormal frames inside the row space of ``basis [d, r]``."""
    A = torch.randn(n, basis.shape[0], rank, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(A)  # [n, d, rank]
    return Q.transpose(1, 2) @ basis


def make_hard_clouds(n_a: int, n_b: int, K: int, r: int, seed: int = 0, mean_dim: int = 8, mean_scale: float = 0.55,
                     cov_dim: int = 16, rank: int = 4, drift: float = 0.3, chunk: int = 2048):
    """Synthetic features as hard to separate as real ones: ``xa [n_a, K, r]``, ``wa``, ``xb``, ``wb`` (float32).

    Concept c has a mean in a shared ``mean_dim``-dimensional subspace (Gaussian, std
    ``mean_scale`` per axis) and a covariance of rank ``rank`` (spectrum 1, 0.6, 0.35,
    0.2, ...) oriented at random inside a shared ``cov_dim``-dimensional subspace, plus a
    little isotropic noise. A feature of A is one concept; B holds drifted copies of 85%
    of A's concepts (mean moved by ``drift`` per mean axis, frame rotated by ``drift``,
    shuffled) and new concepts. Each feature keeps 80-100% of its K samples (the rest is
    padding) with log-normal weights.
    """
    g = torch.Generator().manual_seed(int(seed))
    n_keep = round(0.85 * min(n_a, n_b))
    n_new = n_b - n_keep
    n_c = n_a + n_new
    basis, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    mean_basis = basis[:, :mean_dim].T
    cov_basis = basis[:, mean_dim:mean_dim + cov_dim].T if mean_dim + cov_dim <= r else basis[:, -cov_dim:].T
    mu = (torch.randn(n_c, mean_dim, generator=g, dtype=torch.float64) * mean_scale) @ mean_basis
    frames = _frames(n_c, rank, cov_basis, g)
    spec = torch.tensor([0.6 ** (1.1 * i) for i in range(rank)], dtype=torch.float64)

    def features(concepts: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(concepts)
        x = torch.empty(n, K, r, dtype=torch.float32)
        w = torch.empty(n, K, dtype=torch.float32)
        for s in range(0, n, chunk):
            c = concepts[s:s + chunk]
            m = len(c)
            fr = frames[c]
            mean = mu[c]
            if shift > 0:
                mean = mean + (torch.randn(m, mean_dim, generator=g, dtype=torch.float64) * shift) @ mean_basis
                fr = fr + shift * torch.randn(m, rank, r, generator=g, dtype=torch.float64) @ \
                    (cov_basis.T @ cov_basis)
                fr = torch.linalg.qr(fr.transpose(1, 2))[0].transpose(1, 2)
            coef = torch.randn(m, K, rank, generator=g, dtype=torch.float64) * spec.sqrt()
            pts = mean.unsqueeze(1) + coef @ fr + 0.05 * torch.randn(m, K, r, generator=g, dtype=torch.float64)
            act = torch.exp(0.5 * torch.randn(m, K, generator=g, dtype=torch.float64))
            n_valid = torch.randint(math.ceil(0.8 * K), K + 1, (m,), generator=g)
            act = act * (torch.arange(K).unsqueeze(0) < n_valid.unsqueeze(1))
            x[s:s + m] = pts.float().masked_fill((act == 0).unsqueeze(-1), 0.0)
            w[s:s + m] = (act / act.sum(1, keepdim=True)).float()
        return x, w

    xa, wa = features(torch.arange(n_a), 0.0)
    kept = torch.randperm(n_a, generator=g)[:n_keep]
    concepts_b = torch.cat([kept, n_a + torch.arange(n_new)])[torch.randperm(n_b, generator=g)]
    xb, wb = features(concepts_b, drift)
    return xa, wa, xb, wb


def load_run_features(run_dir: str, hooks: list[str] | None = None):
    """``xa, wa, xb, wb, (hook_a, hook_b)``: two hooks' feature samples of a finished run, projected
    into its reference space (the class named in ``reference.safetensors``' metadata)."""
    ref_path = f"{run_dir}/reference.safetensors"
    with safe_open(ref_path, framework="pt") as f:
        name = f.metadata().get("name")
    spaces = {cls.name: cls for cls in (reference_spaces.Standardize, reference_spaces.Ridge,
                                        reference_spaces.Learned)}
    if name not in spaces:
        raise SystemExit(f"{ref_path}: unknown reference space {name!r}")
    space = spaces[name]().load(ref_path)
    if hooks is None:
        hooks = sort_hooks_by_layer(sorted(space.mean))[:2]
    out = []
    for h in hooks:
        s = project_samples(space, FeatureSamples.load(f"{run_dir}/features/{h}.safetensors"))
        out += [s.points, s.weights]
    return (*out, tuple(hooks))


def brute_force(solver: ExactW2, xa, wa, xb, wb, k: int):
    """``cost [n, k]``, ``index [n, k]`` of every pair solved (same solver, same threads), and seconds."""
    t0 = time.perf_counter()
    D = solver.pairwise(xa, wa, xb, wb).cpu()
    return (*_k_smallest(D, k), time.perf_counter() - t0)


def _k_smallest(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row of ``D`` (ties by index) and their columns (-1 where inf)."""
    v, i = D.sort(dim=1, stable=True)
    v, i = v[:, :k], i[:, :k]
    return v, torch.where(torch.isfinite(v), i, torch.full_like(i, -1))


def brute_force_cost(cost: SemanticCost, rows: torch.Tensor, n_b: int, k: int):
    """:func:`brute_force` on semantic OT's cost (every pair of ``rows`` x B through ``cost.pairs``)."""
    t0 = time.perf_counter()
    ia = rows.repeat_interleave(n_b)
    ib = torch.arange(n_b).repeat(len(rows))
    D = cost.pairs(ia, ib).view(len(rows), n_b)
    return (*_k_smallest(D, k), time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384, help="features per set (synthetic)")
    p.add_argument("--k", type=int, default=32, help="samples per feature K (synthetic)")
    p.add_argument("--r", type=int, default=64, help="width of the space (synthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="a finished train.py run instead of synthetic clouds")
    p.add_argument("--hooks", nargs=2, default=None, help="the two hooks of --run-dir (default: its first two)")
    p.add_argument("--bound", default=ExactW2.bound, choices=list(CASCADES))
    p.add_argument("--certify", action="store_true", help="certify with batched Sinkhorn bounds first")
    p.add_argument("--neighbours", type=int, default=2, help="k of the nearest search")
    p.add_argument("--n-jobs", type=int, default=None, help="threads of the exact solver (default: torch threads)")
    p.add_argument("--check-rows", type=int, default=256, help="rows checked against brute force")
    p.add_argument("--ablation", action="store_true", help="solved fraction of every bound cascade on the checked rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk", type=int, default=1024, help="rows of A bounded at once")
    p.add_argument("--debias", type=float, default=0.0,
                   help="search semantic OT's debiased cost W2^2 - debias/2 (S_a + S_b) (the matcher's default: 1) "
                        "with the same cascade; agreement against brute force on that cost")
    args = p.parse_args()

    if args.run_dir:
        xa, wa, xb, wb, hooks = load_run_features(args.run_dir, args.hooks)
        source = {"run_dir": args.run_dir, "hooks": list(hooks)}
    else:
        xa, wa, xb, wb = make_hard_clouds(args.n, args.n, args.k, args.r, args.seed)
        source = {"synthetic": "make_hard_clouds", "seed": args.seed}
    dev = torch.device(args.device)
    xa, wa, xb, wb = (t.to(dev) for t in (xa, wa, xb, wb))
    solver = ExactW2(n_jobs=args.n_jobs, bound=args.bound, certify=args.certify)
    k = args.neighbours

    t0, c0 = time.perf_counter(), time.process_time()
    cost = None
    if args.debias:  # the self-distances (one small solve per feature) count in the time
        cost = SemanticCost(solver, xa, wa, xb, wb, debias=args.debias)
        res_c, res_i = cost.nearest(k, chunk=args.chunk)
        n_alive = int(cost.alive_a.sum()) * int(cost.alive_b.sum())
        res = NearestResult(res_c, res_i, cost.n_solved, n_alive, solver.bound)
    else:
        res = solver.nearest(xa, wa, xb, wb, k=k, chunk=args.chunk)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    alive = (wa.sum(1) > 0).nonzero().flatten().cpu()
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = alive[torch.randperm(len(alive), generator=g)[:args.check_rows]].sort().values
    brute = ExactW2(n_jobs=args.n_jobs, bound="none")
    if cost is None:
        ref_c, ref_i, t_brute = brute_force(brute, xa[rows.to(dev)], wa[rows.to(dev)], xb, wb, k)
    else:
        ref_c, ref_i, t_brute = brute_force_cost(cost, rows, xb.shape[0], k)
    got_c, got_i = res.cost[rows.to(res.cost.device)].cpu(), res.index[rows.to(res.index.device)].cpu()
    same = (got_i == ref_i).all(1) & ((got_c == ref_c) | (torch.isinf(got_c) & torch.isinf(ref_c))).all(1)

    out = {
        "benchmark": "transport.scale",
        **source,
        "n_a": int(xa.shape[0]), "n_b": int(xb.shape[0]), "k": int(xa.shape[1]), "r": int(xa.shape[2]),
        "neighbours": k,
        "bound": res.bound,
        "certify": args.certify,
        "agreement": float(same.float().mean()) if len(rows) else None,
        "check_rows": len(rows),
        "solved_fraction": res.solved_fraction,
        "certified_fraction": res.certified_fraction if args.certify else None,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # all threads: robust to other load on a shared machine
        "brute_seconds_extrapolated": round(t_brute * len(alive) / max(len(rows), 1), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "n_jobs": solver.n_jobs or torch.get_num_threads(),
        "debias": args.debias,
        "torch_threads": torch.get_num_threads(),
    }
    sub = (xa[rows.to(dev)], wa[rows.to(dev)], xb, wb)
    bounds = list(CASCADES)[1:] if args.ablation else (["mean_spread"] if not args.run_dir else [])
    fractions = {}
    for b in bounds:
        r = ExactW2(n_jobs=args.n_jobs, bound=b).nearest(*sub, k=k, chunk=args.chunk)
        fractions[b] = round(r.solved_fraction, 5)
    if "mean_spread" in fractions:
        out["mean_spread_solved_fraction"] = fractions["mean_spread"]
    if args.ablation:
        out["ablation_solved_fraction"] = fractions
    print(json.dumps(out))


if __name__ == "__main__":
    main()
