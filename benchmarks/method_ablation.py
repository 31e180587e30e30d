"""Semantic OT's method ablation on the synthetic benchmark: one setting changed at a time.

Each (scenario entry, seed) world and its SAEs are built once (``synthetic.sae``, trained by
default); every variant then profiles, projects and matches exactly as
``python evaluate.py experiment=synthetic_benchmark`` does (saeot.synthetic.benchmark), and the
baselines run once per world for reference. Settings were chosen on the ``--tune`` seeds and are
checked on the ``--check`` seeds (never used to choose anything); both are reported, as mean and
95% Student-t half-width over seeds of the top-1 accuracy (all features with a partner) and of
the no-match precision / recall on entries with deaths.

Prints one JSON line and writes the markdown table to ``--markdown`` (default: print it too).

    python benchmarks/method_ablation.py --tune 0 1 2 --check 10 11 12 13 14 \\
        [--scenarios rotation+rescale+near_duplicates rotation+split_merge+birth_death split_merge shared_mean] \\
        [--override synthetic.n_features=256 ...] [--markdown docs/method_ablation.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeot.cli import CONF_DIR
from saeot.io import atomic_write_text
from saeot.synthetic import affected_accuracy, mean_ci95
from saeot.synthetic.benchmark import build_saes, build_world, profile_world, score_matchers, world_context

#: the default the evidence chose (SemanticOTConfig / conf/matcher/semantic_ot.yaml)
DEFAULT = {"debias": 1.0}
#: name -> (matcher settings on top of DEFAULT, context settings: k, sampling, reference.*, reference_tokens)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "W2 (debias=0, the former default)": ({"debias": 0.0}, {}),
    "debias=0.5": ({"debias": 0.5}, {}),
    "debias=1 (default)": ({}, {}),
    "debias=1.5": ({"debias": 1.5}, {}),
    "debias=0, centred_weight=0.5 (shrunk centred term)": ({"debias": 0.0, "centred_weight": 0.5}, {}),
    "debias=0, centred_weight=0 (= mean embedding)": ({"debias": 0.0, "centred_weight": 0.0}, {}),
    "normalize=mean": ({"normalize": "mean"}, {}),
    "decoder_weight=1": ({"decoder_weight": 1.0}, {}),
    "K=16": ({}, {"k": 16}),
    "K=64": ({}, {"k": 64}),
    "sampling=reservoir": ({}, {"sampling": "reservoir"}),
    "reference.dim=16": ({}, {"reference.dim": 16}),
    "reference_tokens=1024": ({}, {"reference_tokens": 1024}),
    "reference_tokens=16384": ({}, {"reference_tokens": 16384}),
    "null_method=empirical": ({"null_method": "empirical"}, {}),
}
BASELINES = ("activation_correlation", "mean_embedding", "feature_flow", "sae_match")
SCENARIOS = ["rotation+rescale+near_duplicates", "rotation+split_merge+birth_death", "split_merge", "shared_mean"]


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("evaluate", overrides=["experiment=synthetic_benchmark", *overrides])


def _variant_cfg(cfg, ctx_settings: dict):
    cfg = copy.deepcopy(cfg)
    for key, value in ctx_settings.items():
        if key == "k":
            cfg.synthetic.samples_per_feature = value
        elif key == "sampling":
            cfg.synthetic.sampling = value
        elif key == "reference_tokens":
            cfg.synthetic.reference_tokens = value
        else:
            OmegaConf.update(cfg, key, value)
    return cfg


def run_world(cfg, spec: str, seed: int, variants: dict, baselines: tuple[str, ...]) -> dict:
    """``{row: scores}`` of every variant and baseline on one world."""
    cfg = OmegaConf.merge(cfg, {"synthetic": {"seed": seed}})
    world = build_world(cfg.synthetic, spec)
    saes = build_saes(cfg.synthetic, world)
    a, _ = world.pairs[0]
    out, contexts, samples = {}, {}, {}
    for name, (settings, ctx_settings) in variants.items():
        vcfg = _variant_cfg(cfg, ctx_settings)
        key = json.dumps(ctx_settings, sort_keys=True)
        if key not in contexts:
            skey = (vcfg.synthetic.samples_per_feature, vcfg.synthetic.sampling)
            if skey not in samples:
                samples[skey] = profile_world(world, saes, skey[0], skey[1], vcfg.seed)
            contexts[key] = world_context(vcfg, world, saes, samples=samples[skey])[0]
        matcher = OmegaConf.merge(OmegaConf.to_container(vcfg.matchers.semantic_ot, resolve=True),
                                  {**DEFAULT, **settings})
        out[name] = score_matchers(contexts[key], saes, samples[skey][a].alive, {name: matcher},
                                   assignments=("nearest",))[name]
    skey = (cfg.synthetic.samples_per_feature, cfg.synthetic.sampling)
    if skey not in samples:
        samples[skey] = profile_world(world, saes, skey[0], skey[1], cfg.seed)
    base_key = json.dumps({})
    if base_key not in contexts:
        contexts[base_key] = world_context(cfg, world, saes, samples=samples[skey])[0]
    base = {m: OmegaConf.to_container(cfg.matchers[m], resolve=True) for m in baselines if m in cfg.matchers}
    out.update(score_matchers(contexts[base_key], saes, samples[skey][a].alive, base, assignments=("nearest",)))
    for r in out.values():
        if r is not None:
            r["affected_top1_accuracy"] = affected_accuracy(r, spec)
    return out


def summarise(per_seed: list[dict], metric: str) -> dict:
    vals = [(r or {}).get(metric) for r in per_seed]
    mean, ci = mean_ci95(vals)
    return {"mean": mean, "ci95": ci, "seeds": vals}


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f}" + (f" ± {s['ci95']:.3f}" if s["ci95"] is not None else "")


def markdown(result: dict, scenarios: list[str]) -> str:
    lines = []
    for phase in ("tune", "check"):
        seeds = result[f"{phase}_seeds"]
        if not seeds:
            continue
        what = "seeds the settings were chosen on" if phase == "tune" else "held-out seeds, never used to choose"
        lines += [f"**top1_accuracy, {what}: {seeds}** (mean ± 95% CI; last column: no-match precision / "
                  f"recall on rotation+split_merge+birth_death)\n",
                  "| variant | " + " | ".join(scenarios) + " | no-match P / R |",
                  "|---|" + "---|" * (len(scenarios) + 1)]
        for row, cells in result[phase].items():
            nm = cells.get("rotation+split_merge+birth_death", {})
            pr = (f"{_cell(nm['nomatch_precision'])} / {_cell(nm['nomatch_recall'])}"
                  if nm.get("nomatch_precision") else "n/a")
            lines.append(f"| {row} | " + " | ".join(_cell(cells[s]["top1_accuracy"]) for s in scenarios)
                         + f" | {pr} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=SCENARIOS)
    ap.add_argument("--tune", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--check", nargs="*", type=int, default=[10, 11, 12, 13, 14])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES))
    ap.add_argument("--override", nargs="*", default=["synthetic.sae=trained"],
                    help="Hydra overrides of experiment=synthetic_benchmark")
    ap.add_argument("--markdown", default=None, help="write the markdown table here")
    args = ap.parse_args()
    cfg = _config(args.override)
    variants = {v: VARIANTS[v] for v in args.variants}
    t0 = time.perf_counter()
    result: dict = {"benchmark": "method_ablation", "default": DEFAULT, "overrides": args.override,
                    "tune_seeds": args.tune, "check_seeds": args.check}
    for phase, seeds in (("tune", args.tune), ("check", args.check)):
        raw = {s: [run_world(cfg, s, seed, variants, tuple(args.baselines)) for seed in seeds]
               for s in args.scenarios} if seeds else {}
        rows = list(variants) + [b for b in args.baselines if b in cfg.matchers]
        result[phase] = {
            row: {s: {m: summarise([r[row] for r in raw[s]], m)
                      for m in ("top1_accuracy", "affected_top1_accuracy", "nomatch_precision", "nomatch_recall")}
                  for s in args.scenarios}
            for row in rows
        } if seeds else {}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown(result, args.scenarios)
    if args.markdown:
        atomic_write_text(args.markdown, table + "\n")
    else:
        print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
