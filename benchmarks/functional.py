"""Cost of the functional evaluation: a five-matcher sweep's layer substitution on SmolLM2.

What ``python evaluate.py 'run_dirs=[sweep/*]'`` runs per batch (one streaming pass,
:func:`saeot.evaluation.functional.evaluate_functional`): the clean forward pass and the
SAE codes once; then one continuation from hook B per reference (``sae``, ``bias``,
``mean``) and hook B, per matcher and pair (its one-to-one matching), and per matcher,
pair and coverage level (the equal-coverage curves). Here the five "matchers" are
seeded random one-to-one matchings (what they match does not change the cost) between
freshly initialised TopK SAEs, over the pairs ``--pairs`` (default 8->9, 8->12).

The pass is timed twice on the same tokens: ``stacked`` (the continuations of a batch
run stacked per hook, ``--stack-contexts`` contexts a forward; the default) and
``one_by_one`` (``stack_contexts`` = the batch: every continuation its own forward, as
before). ``max_abs_diff`` is the largest difference between any number the two
produce (EV, CE, co-activation, curves): the results do not change.

    python benchmarks/functional.py                       # a few minutes on 2 cores
    python benchmarks/functional.py --contexts 64 --batch-size 8 --grid 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1

Prints one JSON line (wall and CPU seconds of each mode, continuations, speedup).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from saeot.data.datamodule import HiddenStateDataModule
from saeot.data.text import StdlibDocstrings
from saeot.evaluation.functional import FunctionalSettings, evaluate_functional, pair_matching
from saeot.evaluation.functional._coverage import RankedPairs
from saeot.evaluation.functional._curves import CoverageCurves
from saeot.hooks import hook_name
from saeot.models import load_smollm2_135m
from saeot.saes.training import SAETrainingConfig, build_training_sae, inference_sae

MATCHERS = ("semantic_ot", "sae_match", "feature_flow", "activation_correlation", "mean_embedding")


def _saes(layers: list[int], d_model: int, d_sae: int, k: int) -> dict:
    out = {}
    for layer in layers:
        torch.manual_seed(layer)
        sae = inference_sae(build_training_sae(SAETrainingConfig("topk", d_sae=d_sae, k=k), d_model))
        out[hook_name(layer)] = sae.eval().requires_grad_(False)
    return out


def _sweep(pairs: list[tuple[str, str]], d_sae: int, seed: int):
    """Per "matcher": a random partial one-to-one matching per pair and a ranked full assignment."""
    g = torch.Generator().manual_seed(seed)
    matchings, ranked = {}, {}
    for m in MATCHERS:
        matchings[m], ranked[m] = [], []
        for a, b in pairs:
            perm = torch.randperm(d_sae, generator=g)
            matched = torch.rand(d_sae, generator=g) < 0.6
            dist = torch.rand(d_sae, generator=g)
            rows = [{"feature_a": i, "feature_b": int(perm[i]), "distance": float(dist[i]), "margin": 1.0,
                     "matched": int(matched[i])} for i in range(d_sae)]
            matchings[m].append(pair_matching(a, b, rows, d_sae, d_sae))
            order = dist.argsort()
            ranked[m].append(RankedPairs(a, b, order, perm[order], dist[order].double(), d_sae, d_sae))
    return matchings, ranked


def _numbers(x, prefix: str = "") -> dict[str, float]:
    """Every float of a nested result, keyed by its path (for comparing two runs)."""
    out: dict[str, float] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            if "seconds" not in str(k) and not str(k).startswith("n_continuation"):
                out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(x, float):
        out[prefix] = x
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="8-9,8-12")
    p.add_argument("--contexts", type=int, default=4, help="evaluation contexts (of --context-len tokens)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=1152)
    p.add_argument("--k-sae", type=int, default=16)
    p.add_argument("--grid", default="0.25,0.5,0.75,1.0", help="equal-coverage levels ('' for none)")
    p.add_argument("--stack-contexts", type=int, default=32)
    p.add_argument("--modes", default="stacked,one_by_one")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    lm = load_smollm2_135m()
    pairs = [(hook_name(int(a)), hook_name(int(b))) for a, b in (x.split("-") for x in args.pairs.split(","))]
    layers = sorted({int(x) for pr in args.pairs.split(",") for x in pr.split("-")})
    hooks = [hook_name(i) for i in layers]
    saes = _saes(layers, lm.d_model, args.d_sae, args.k_sae)
    dm = HiddenStateDataModule(lm, StdlibDocstrings(), hooks, context_len=args.context_len,
                               max_contexts=args.contexts + 1, heldout_fraction=args.contexts / (args.contexts + 1),
                               batch_size=args.batch_size)
    dm.setup()
    matchings, ranked = _sweep(pairs, args.d_sae, args.seed)
    grid = tuple(float(f) for f in args.grid.split(",")) if args.grid else ()
    settings = FunctionalSettings(split="heldout", progress=False, **({"coverage_grid": grid} if grid else {}))

    out: dict = {"pairs": args.pairs, "matchers": len(MATCHERS), "contexts": dm.n_contexts("heldout"),
                 "batch_size": args.batch_size, "tokens": dm.n_contexts("heldout") * (args.context_len - 1),
                 "d_sae": args.d_sae, "grid": list(grid), "threads": torch.get_num_threads()}
    numbers = {}
    for mode in args.modes.split(","):
        stack = args.stack_contexts if mode == "stacked" else args.batch_size
        curves = [CoverageCurves(r, saes, grid, with_ce=True) for r in ranked.values()] if grid else []
        w0, c0 = time.perf_counter(), time.process_time()
        res = evaluate_functional(lm, saes, dm, matchings, settings, consumers=curves, stack_contexts=stack)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        first = next(iter(res.values()))
        out[mode] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "stack_contexts": stack,
                     "continuations": first["n_continuations"], "forwards": first["n_continuation_forwards"]}
        numbers[mode] = _numbers({"res": res, "curves": [c.results() for c in curves]})
    if {"stacked", "one_by_one"} <= set(out):
        a, b = numbers["stacked"], numbers["one_by_one"]
        diffs = [abs(a[k] - b[k]) for k in a if not (math.isnan(a[k]) and math.isnan(b[k]))]
        out["max_abs_diff"] = max(diffs) if diffs else 0.0
        out["speedup_cpu"] = round(out["one_by_one"]["cpu_seconds"] / out["stacked"]["cpu_seconds"], 3)
        out["speedup_wall"] = round(out["one_by_one"]["seconds"] / out["stacked"]["seconds"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
