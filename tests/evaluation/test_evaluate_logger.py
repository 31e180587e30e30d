"""``evaluate.py`` logs its tables and plots to the configured logger, one logger run per call."""

import csv
import sys

from saeot.cli import evaluate_main, train_main
from saeot.evaluation.dashboard import flat_numbers, table_metrics

SMOKE = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def _main(main, argv: list[str]) -> None:
    old = sys.argv
    sys.argv = ["saeot", *argv]
    try:
        main()
    finally:
        sys.argv = old


def test_evaluate_logs_one_table_row_per_matcher_to_the_csv_logger(tmp_path):
    cache = tmp_path / "cache"
    runs = [tmp_path / "sweep" / f"{i}_matcher-{m}" for i, m in enumerate(("semantic_ot", "sae_match"))]
    for run, m in zip(runs, ("semantic_ot", "sae_match")):
        _main(train_main, [*SMOKE, f"matcher={m}", f"paths.cache_dir={cache}", f"hydra.run.dir={run}"])
    out = tmp_path / "eval"
    _main(evaluate_main, [f"run_dirs=[{tmp_path}/sweep/*]", "logger=csv", f"paths.cache_dir={cache}",
                          "functional.progress=false", "functional.report=false", f"hydra.run.dir={out}"])
    logged = list(out.glob("csv/version_*/metrics.csv"))
    assert len(logged) == 1  # one logger run for the whole sweep
    with open(logged[0]) as f:
        rows = list(csv.DictReader(f))
    with open(out / "functional_table.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["matcher"] for r in table} == {"semantic_ot", "sae_match"}
    for r in table:  # every matcher's numbers, as the table written to the evaluation dir has them
        key = f"functional/{r['matcher']}/1-2/ev_sub"
        got = [float(x[key]) for x in rows if x.get(key)]
        assert got and abs(got[0] - float(r["ev_sub"])) < 1e-5, key  # the table file rounds to 6 digits
    assert any(k.startswith("equal_coverage/") for k in rows[0])  # the equal-coverage table too
    assert (logged[0].parent / "hparams.yaml").is_file()


def test_metrics_of_tables_and_nested_results():
    rows = [{"matcher": "m", "layer_a": 3, "layer_b": 4, "ev_sub": 0.5, "note": "x", "bad": float("nan")}]
    assert table_metrics("functional", rows) == {"functional/m/3-4/ev_sub": 0.5}
    assert flat_numbers({"a": {"b": 1, "c": [2.0, True]}, "d": "s"}) == {"a/b": 1.0, "a/c/0": 2.0}
