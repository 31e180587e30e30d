"""Which settings of semantic OT should be the default? Decided on the synthetic benchmark.

(Oracle SAEs, one seed; the multi-seed ablation with trained SAEs, tuned and held-out seeds
apart, is benchmarks/method_ablation.py.)

Runs semantic OT alone (oracle SAEs) on the scenarios where the settings matter, for each
variant of one setting at a time (sampling mode, K, reference space, solver), and prints
one JSON line: {"variants": {name: {scenario: top-1 accuracy on the affected features}},
"seconds": {name: s}}.

    python benchmarks/semantic_ot_settings.py [--scenarios split_merge near_duplicates birth_death rotation]
"""

from __future__ import annotations

import argparse
import json
import time

from hydra import compose, initialize_config_dir

from saeot.cli import CONF_DIR
from saeot.synthetic import affected_accuracy
from saeot.synthetic.benchmark import build_saes, build_world, evaluate_world

VARIANTS = {
    "default": [],
    "sampling=reservoir": ["synthetic.sampling=reservoir"],
    "K=8": ["synthetic.samples_per_feature=8"],
    "K=64": ["synthetic.samples_per_feature=64"],
    "reference=standardize": ["reference=standardize"],
    "reference=learned": ["reference=learned", "reference.epochs=5"],
    "transport=sinkhorn": ["transport=sinkhorn"],
    "transport=sliced": ["transport=sliced"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", nargs="+", default=["split_merge", "near_duplicates", "birth_death", "rotation"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    out, secs = {}, {}
    for name in args.variants:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("evaluate", overrides=["experiment=synthetic_benchmark", "synthetic.sae=oracle",
                                                 *VARIANTS[name]])
        t0 = time.perf_counter()
        out[name] = {}
        for scenario in args.scenarios:
            world = build_world(cfg.synthetic, scenario)
            saes = build_saes(cfg.synthetic, world)
            res, _ = evaluate_world(cfg, world, saes, {"semantic_ot": cfg.matchers.semantic_ot}, assignments=("nearest",))
            r = res["semantic_ot"]
            out[name][scenario] = affected_accuracy(r, scenario)
            if scenario == "birth_death":
                out[name]["birth_death_nomatch_recall"] = r["nomatch_recall"]
                out[name]["birth_death_nomatch_precision"] = r["nomatch_precision"]
        secs[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"benchmark": "semantic_ot_settings", "variants": out, "seconds": secs}))


if __name__ == "__main__":
    main()
