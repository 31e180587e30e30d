"""docs/results/*.md: every table is rendered from docs/results/data/*.json by docs/results/build.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _load_build():
    spec = importlib.util.spec_from_file_location("results_build", RESULTS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()
PAGES = sorted(p.name for p in RESULTS.glob("*.md"))


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    pages, data = tmp_path / "pages", tmp_path / "pages" / "data"
    shutil.copytree(RESULTS / "data", data)
    for p in PAGES:
        shutil.copy(RESULTS / p, pages / p)
    return pages, data


def test_every_page_has_a_data_file_and_its_tables_equal_the_data():
    data = build.load_data(RESULTS / "data")
    assert sorted(data) == PAGES
    for page in PAGES:
        text = (RESULTS / page).read_text(encoding="utf-8")
        assert "<!-- table:" in text, f"{page} has no marked table"
        # every table line of the page sits between markers (no hand-written table left)
        inside, fence = False, False
        for line in text.split("\n"):
            fence ^= line.startswith("```")
            if build.START.match(line):
                inside = True
            elif line == build.END:
                inside = False
            elif line.startswith("|") and not fence:
                assert inside, f"{page}: table line outside markers: {line[:60]!r}"
    assert build.check(RESULTS, RESULTS / "data") == {}, "run: python docs/results/build.py"


def test_check_cli_exits_0_on_the_repository():
    assert build.main(["--check"]) == 0


def test_render_parse_round_trip():
    table = {"header": ["A→B", "matcher", "AUC EV ↑", "n", "CI", "a \\| b"],
             "formats": [None, None, "{:.3f}", "{:,d}", "{:.3f} ± {:.3f}", None],
             "rows": [["3→4", "feature_flow", {"bold": 0.5}, 1893, [0.976, 0.029], "x | y"],
                      ["3→4", "sae_match", 0.123, 12, None, "–"],
                      ["4→5", "semantic OT, token_weight=4", {"italic": 2.0}, 2000000, "n/a", ""]]}
    text = build.render_table(table)
    assert text.split("\n")[2] == "| 3→4 | feature_flow | **0.500** | 1,893 | 0.976 ± 0.029 | x \\| y |"
    assert text.split("\n")[4].startswith("| 4→5 | semantic OT, token_weight=4 | *2.000* | 2,000,000 | n/a | |")
    back = build.table_from_markdown(text, table["formats"])
    assert back["rows"][0] == table["rows"][0]
    assert back["rows"][1] == table["rows"][1]
    assert back["rows"][2][:5] == table["rows"][2][:5] and back["rows"][2][5] is None  # "" is an empty cell
    assert build.render_table(back) == text
    # inferred formats give the same rows
    assert build.table_from_markdown(text)["rows"][0][2:5] == [{"bold": 0.5}, 1893, [0.976, 0.029]]


def _write_ec_csv(path: Path, rows: list[dict]) -> None:
    cols = ["matcher", "layer_a", "layer_b", "n_pairs", "n_forced", "fraction_full", "ev_full", "dce_full",
            "corr_full", "auc_ev", "auc_dce", "auc_corr", "deact_full", "deact_success_full", "auc_deact",
            "auc_deact_success", "own_frac_a_matched", "own_ev_sub", "own_dce_sub", "assignment_seconds", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="nan")
        w.writeheader()
        w.writerows(rows)


def test_from_eval_equal_coverage_rows(tmp_path):
    pages, data = _copy(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    base = {"n_pairs": 1152, "n_forced": 3, "fraction_full": 1}
    _write_ec_csv(ev / "equal_coverage.csv", [
        {**base, "matcher": "semantic_ot", "layer_a": 3, "layer_b": 4, "auc_ev": 0.51349, "auc_dce": 2.8412,
         "auc_corr": 0.30271, "ev_full": 0.651, "dce_full": 2.9331, "run_dir": "r/0"},
        {**base, "matcher": "feature_flow", "layer_a": 3, "layer_b": 4, "auc_ev": 0.57444, "auc_dce": 1.99912,
         "auc_corr": 0.4221, "ev_full": 0.7306, "dce_full": 1.93, "run_dir": "r/1"},
        {**base, "matcher": "activation_correlation", "layer_a": 3, "layer_b": 4, "auc_ev": 0.5721,
         "auc_dce": 2.0834, "auc_corr": 0.44, "ev_full": 0.72649, "dce_full": 2.0551, "run_dir": "r/2"},
        {**base, "matcher": "feature_flow", "layer_a": 3, "layer_b": 7, "auc_ev": 0.478, "auc_dce": 2.0414,
         "auc_corr": 0.369, "ev_full": 0.616, "dce_full": 2.135, "run_dir": "r/1"},
        {**base, "matcher": "activation_correlation", "layer_a": 3, "layer_b": 7, "auc_ev": 0.49149,
         "auc_dce": 2.048, "auc_corr": 0.394, "ev_full": 0.625, "dce_full": 2.226, "run_dir": "r/2"},
    ])
    build.from_eval("ec_quick_saes", ev, data_dir=data)
    d = json.loads((data / "equal_coverage.json").read_text())
    rows = d["tables"]["ec_quick_saes"]["rows"]
    assert rows[0] == ["3→4", "activation_correlation", 0.5721, 2.0834, {"bold": 0.44}, 0.72649, 2.0551]
    assert d["tables"]["ec_quick_saes"]["source"].startswith("python docs/results/build.py --from-eval")
    assert build.build(pages, data) == {"equal_coverage.md": ["ec_quick_saes"]}
    text = (pages / "equal_coverage.md").read_text()
    block = text.split("<!-- table:ec_quick_saes -->\n")[1].split("\n<!-- /table -->")[0].split("\n")
    assert block[2:] == [
        # pairs by distance, then the page's matcher order; bold: best printed value per column and pair
        "| 3→4 | activation_correlation | 0.572 | 2.083 | **0.440** | 0.726 | 2.055 |",
        "| 3→4 | feature_flow | **0.574** | **1.999** | 0.422 | 0.731 | 1.930 |",
        "| 3→4 | semantic_ot | 0.513 | 2.841 | 0.303 | 0.651 | 2.933 |",
        "| 3→7 | activation_correlation | **0.491** | 2.048 | **0.394** | 0.625 | 2.226 |",
        "| 3→7 | feature_flow | 0.478 | **2.041** | 0.369 | 0.616 | 2.135 |",
    ]
    assert build.check(pages, data) == {}
    # the prose around the table is untouched
    orig = (RESULTS / "equal_coverage.md").read_text()
    assert text.split("<!-- table:ec_quick_saes -->")[0] == orig.split("<!-- table:ec_quick_saes -->")[0]
    assert text.split("<!-- table:ec_suite -->")[1] == orig.split("<!-- table:ec_suite -->")[1]


def test_from_eval_labels_judge_and_forced_pairs(tmp_path):
    """JumpReLU-style table: one pair, no A→B column, ordered by AUC EV, the judge percentile."""
    pages, data = _copy(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    base = {"layer_a": 8, "layer_b": 9, "n_pairs": 2304, "ev_full": 0.5, "dce_full": 1.0}
    _write_ec_csv(ev / "equal_coverage.csv", [
        {**base, "matcher": "semantic_ot (0_x)", "auc_ev": 0.12, "auc_dce": 2.317, "auc_corr": 0.263, "n_forced": 330},
        {**base, "matcher": "feature_flow", "auc_ev": 0.293, "auc_dce": 1.442, "auc_corr": 0.34, "n_forced": 44},
    ])
    with open(ev / "judge_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["matcher", "mean_percentile"])
        w.writeheader()
        w.writerows([{"matcher": "semantic_ot (0_x)", "mean_percentile": 0.8912},
                     {"matcher": "feature_flow", "mean_percentile": 0.7649}])
    assert build.main(["--from-eval", str(ev), "--table", "ec_jumprelu", "--label", "feature_flow=feature_flow",
                       "--label", "semantic_ot (0_x)=semantic_ot", "--pages", str(pages), "--data", str(data)]) == 0
    text = (pages / "equal_coverage.md").read_text()
    block = text.split("<!-- table:ec_jumprelu -->\n")[1].split("\n<!-- /table -->")[0].split("\n")
    assert block[2:] == ["| feature_flow | **0.293** | **1.442** | **0.340** | 44 | 0.76 |",
                         "| semantic_ot | 0.120 | 2.317 | 0.263 | 330 | **0.89** |"]


def test_tables_without_a_reader_say_so(tmp_path):
    _, data = _copy(tmp_path)
    msg = "no reader for table circuits_groupings yet: edit docs/results/data/circuits.json"
    with pytest.raises(SystemExit, match=msg):
        build.from_eval("circuits_groupings", tmp_path, data_dir=data)


def test_from_eval_synthetic_table(tmp_path):
    pages, data = _copy(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    d = json.loads((data / "synthetic.json").read_text())
    t = d["tables"]["synthetic_oracle_nomatch_recall"]
    assert t["formats"][1] is None  # "identity": n/a on every row of the page
    md = build.render_table(t).replace("| semantic_ot | n/a |", "| semantic_ot | 0.500 ± 0.100 |", 1)
    (ev / "synthetic_table.md").write_text("_trained SAEs_\n\n**top1_accuracy**\n\n| matcher | x |\n|---|---|\n"
                                           "| a | 1 |\n\n**nomatch_recall**\n\n" + md + "\n")
    build.from_eval("synthetic_oracle_nomatch_recall", ev, data_dir=data)
    new = json.loads((data / "synthetic.json").read_text())["tables"]["synthetic_oracle_nomatch_recall"]
    assert build.render_table(new) == md
    assert new["formats"][1] == "{:.3f} ± {:.3f}" and new["rows"][0][1] == [0.5, 0.1]
    assert build.build(pages, data) == {"synthetic.md": ["synthetic_oracle_nomatch_recall"]}


def test_an_edited_number_fails_the_check(tmp_path, capsys):
    pages, data = _copy(tmp_path)
    assert build.main(["--check", "--pages", str(pages), "--data", str(data)]) == 0
    path = data / "token_cost.json"
    d = json.loads(path.read_text())
    row = d["tables"]["token_cost_larger_tau"]["rows"][0]
    assert row[2] == 0.555
    row[2] = 0.556
    path.write_text(json.dumps(d, ensure_ascii=False))
    before = (pages / "token_cost.md").read_text()
    assert build.main(["--check", "--pages", str(pages), "--data", str(data)]) == 1
    assert "token_cost.md: tables differ from the data: token_cost_larger_tau" in capsys.readouterr().out
    assert (pages / "token_cost.md").read_text() == before  # --check writes nothing
    assert build.main(["--pages", str(pages), "--data", str(data)]) == 0
    assert "| 3→4 | semantic OT, token_weight=4 | 0.556 | 0.427 |" in (pages / "token_cost.md").read_text()
    assert build.check(pages, data) == {}


@pytest.mark.parametrize("name,page", [("ec_quick_saes", "equal_coverage"), ("ec_suite", "equal_coverage"),
                                       ("ec_jumprelu", "equal_coverage"), ("token_cost_equal_coverage", "token_cost"),
                                       ("token_cost_larger_tau", "token_cost")])
def test_the_equal_coverage_reader_reproduces_the_page(tmp_path, name, page):
    """csvs carrying the page's own figures give back the page's table: order, bold, judge cells."""
    pages, data = _copy(tmp_path)
    table = json.loads((data / f"{page}.json").read_text())["tables"][name]
    header = table["header"]
    plain = lambda v: v["bold"] if isinstance(v, dict) else v  # noqa: E731
    rows, judge, labels = [], {}, {}
    for r in table["rows"]:
        cells = dict(zip(header, map(plain, r)))
        a, b = (cells.pop("A→B") if "A→B" in cells else "8→9").split("→")
        label = cells.pop(next(h for h in header if h.startswith("matcher")))
        run = labels.setdefault(label, f"run {len(labels)}")  # the csv's label; --label maps it back
        out = {"matcher": run, "layer_a": a, "layer_b": b, "run_dir": f"x/{run}"}
        for h, v in cells.items():
            if h in build.EC_COLUMNS:
                out[build.EC_COLUMNS[h][0]] = v
            elif h in build.JUDGE_HEADERS and v is not None:
                judge[run] = v
        rows.append(out)
    ev = tmp_path / "eval"
    ev.mkdir()
    _write_ec_csv(ev / "equal_coverage.csv", rows)
    with open(ev / "judge_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["matcher", "mean_percentile"])
        w.writeheader()
        w.writerows([{"matcher": k, "mean_percentile": v} for k, v in judge.items()])
    args = ["--from-eval", str(ev), "--table", name, "--pages", str(pages), "--data", str(data)]
    for label, run in labels.items():
        args += ["--label", f"{run}={label}"]
    assert build.main(args) == 0
    assert json.loads((data / f"{page}.json").read_text())["tables"][name]["rows"] == table["rows"]
    assert (pages / f"{page}.md").read_text() == (RESULTS / f"{page}.md").read_text()


def test_from_eval_reads_the_bootstrap_intervals_and_the_deactivation_causes(tmp_path):
    """token_cost_ci / _vs_best / _why: each area with its interval, the paired difference to the best
    other matcher, and where the deactivation successes are lost (equal_coverage.csv's columns)."""
    pages, data = _copy(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    cols = ["matcher", "layer_a", "layer_b", "auc_ev", "auc_ev_lo", "auc_ev_hi", "auc_ev_vs_best_lo",
            "auc_ev_vs_best_hi", "auc_dce", "auc_dce_lo", "auc_dce_hi", "auc_corr", "auc_deact_success",
            "deact_success_full", "deact_silent", "deact_success_given_fires", "transfer_cos", "decoder_cos"]
    rows = [
        {"matcher": "feature_flow", "layer_a": 3, "layer_b": 4, "auc_ev": 0.5581, "auc_ev_lo": 0.5512,
         "auc_ev_hi": 0.5650, "auc_ev_vs_best_lo": -0.0140, "auc_ev_vs_best_hi": -0.0061, "auc_dce": 2.1,
         "auc_dce_lo": 2.0, "auc_dce_hi": 2.2, "deact_success_full": 0.359, "deact_silent": 0.12,
         "deact_success_given_fires": 0.408, "transfer_cos": 0.61, "decoder_cos": 0.55},
        {"matcher": "activation_correlation", "layer_a": 3, "layer_b": 4, "auc_ev": 0.5691, "auc_ev_lo": 0.5601,
         "auc_ev_hi": 0.5772, "auc_ev_vs_best_lo": 0.0061, "auc_ev_vs_best_hi": 0.0140, "auc_dce": 2.05,
         "auc_dce_lo": "nan", "auc_dce_hi": "nan", "deact_success_full": 0.211, "deact_silent": 0.02,
         "deact_success_given_fires": 0.215, "transfer_cos": 0.31, "decoder_cos": 0.29},
    ]
    with open(ev / "equal_coverage.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="nan")
        w.writeheader()
        w.writerows(rows)
    with open(ev / "judge_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["matcher", "mean_percentile"])
        w.writeheader()
        w.writerows([{"matcher": "feature_flow", "mean_percentile": 0.82},
                     {"matcher": "activation_correlation", "mean_percentile": 0.84}])
    labels = [("activation_correlation", "activation_correlation"), ("feature_flow", "feature_flow")]
    for name in ("token_cost_ci", "token_cost_vs_best", "token_cost_why"):
        build.from_eval(name, ev, labels=labels, data_dir=data)
    t = json.loads((data / "token_cost.json").read_text())["tables"]
    # the area and its interval in one cell, bold by the area; no interval (bootstrap off): the area alone
    assert t["token_cost_ci"]["rows"][0][:4] == ["3→4", "activation_correlation", {"bold": [0.5691, 0.5601, 0.5772]},
                                                 "2.050"]
    assert t["token_cost_ci"]["rows"][1][2] == [0.5581, 0.5512, 0.5650]
    assert t["token_cost_vs_best"]["rows"][1][2] == [-0.0140, -0.0061]
    assert t["token_cost_why"]["rows"][1][4:] == [{"bold": 0.359}, 0.12, {"bold": 0.408}, 0.61, 0.55]
    assert build.build(pages, data) == {"token_cost.md": ["token_cost_ci", "token_cost_vs_best", "token_cost_why"]}
    text = (pages / "token_cost.md").read_text()
    assert "| 3→4 | activation_correlation | **0.569 [0.560, 0.577]** | 2.050 |" in text
    assert "| 3→4 | feature_flow | 0.558 [0.551, 0.565] | 2.100 [2.000, 2.200] |" in text
    assert "| 3→4 | feature_flow | [-0.014, -0.006] | – | – |" in text
    assert build.check(pages, data) == {}
