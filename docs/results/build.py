"""Regenerate the tables of the results pages (docs/results/*.md) from their data files.

One code path for every measured table: each table of a page sits between two marker lines,

    <!-- table:NAME -->
    | header | ... |
    |---|...|
    | row | ... |
    <!-- /table -->

and its rows live in ``docs/results/data/<page>.json`` under ``tables.NAME`` (``header``, one
``formats`` entry per column, ``rows``). Everything outside the markers is prose and is never
touched.

    python docs/results/build.py                 # rewrite every page's tables from the data
    python docs/results/build.py --check         # exit 1, listing the pages (and tables) that differ
    python docs/results/build.py --from-eval EVAL_DIR --table NAME [--label RUN=TEXT ...] [--pair A,B ...]
                                                 # replace NAME's rows with those computed from an
                                                 # evaluate.py output dir, then rewrite the pages

Cells in the data files: a number (rendered with the column's format, a ``str.format`` template
such as ``"{:.3f}"``, ``"{:,d}"`` or ``"{:.3f} ± {:.3f}"``, whose fields take a list of numbers),
``{"bold": x}`` / ``{"italic": x}`` (the same, wrapped in ``**`` / ``*``), ``null`` (an empty
cell) or a string (printed as is: text, or a number whose printing is irregular). A literal
``|`` in a cell is escaped as ``\\|`` on the page.

Which outputs feed which table (``--from-eval`` readers):

* ``ec_quick_saes``, ``ec_suite``, ``ec_jumprelu`` (equal_coverage.md), ``token_cost_equal_coverage``,
  ``token_cost_larger_tau``, ``token_cost_ci``, ``token_cost_vs_best``, ``token_cost_why`` (token_cost.md):
  ``EVAL_DIR/equal_coverage.csv`` (written by
  ``saeot.evaluation.functional._equal_coverage.write_coverage_table``: ``auc_ev``, ``auc_dce``,
  ``auc_corr``, ``ev_full``, ``dce_full``, ``n_forced``, ``auc_deact_success``,
  ``deact_success_full``, ``deact_full``; the bootstrap's ``auc_*_lo`` / ``_hi`` / ``_vs_best_lo`` / ``_hi``;
  ``deact_silent``, ``deact_success_given_fires``, ``transfer_cos``, ``decoder_cos``) and, for the judge column, ``EVAL_DIR/judge_table.csv``
  (``mean_percentile`` per matcher, both layer pairs pooled; written with ``judge=embedding``).
  Bold marks the best printed value of a column within a layer pair (ties: all of them).
  ``--label RUN=TEXT`` renames a run's label (the csv's ``matcher`` column, or its run_dir's
  name) and, given at all, keeps only the labelled runs in that order; ``--pair A,B`` keeps
  those layer pairs in that order.
* ``synthetic_{headline,rotation,oracle}_{affected_top1_accuracy,top1_accuracy,hungarian_accuracy,
  nomatch_precision,nomatch_recall}`` (synthetic.md): ``EVAL_DIR/synthetic_table.md`` written by
  ``evaluate.py experiment=synthetic_headline`` / ``synthetic_rotation`` / ``synthetic_oracle``
  (``saeot.synthetic.report.markdown_table``), the table under the metric's heading.

No reader yet (``--from-eval`` stops with "no reader for table X yet"; edit the data file):
``ec_sample_agreement`` (``benchmarks/sample_agreement.py``'s JSON lines), ``ec_semantic_ot_variants``
(hand-composed from three evaluations' ``equal_coverage.csv`` and the other matchers' best),
``synthetic_summary_top1`` (a relabelled subset of ``synthetic_headline_top1_accuracy``),
``synthetic_finite_samples`` (``metrics.json["synthetic_sweep"]``), ``synthetic_defaults``
(``benchmarks/semantic_ot_settings.py``), ``synthetic_method_ablation``
(``benchmarks/method_ablation.py``), ``suite_quality`` / ``suite_jumprelu_quality``
(``metrics.json["saes"]`` of the run), ``circuits_suite`` / ``circuits_groupings``
(``metrics.json["circuit"]`` of each task's evaluation), and the timing tables
(``default_first_run``, ``suite_build``, ``scale_solved_fraction``, ``scale_all_layers``: ``/usr/bin/time``
and benchmark JSON lines), ``results_pages`` (the index).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

START = re.compile(r"^<!-- table:(?P<name>[A-Za-z0-9_.-]+) -->$")
END = "<!-- /table -->"

# ---------------------------------------------------------------------------------------------
# markdown tables <-> rows


def split_row(line: str) -> list[str]:
    """The cells of one ``| a | b |`` line, stripped, ``\\|`` unescaped."""
    s = line.strip()
    if not (s.startswith("|") and s.endswith("|")) or len(s) < 2:
        raise ValueError(f"not a table row: {line!r}")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s[1:-1])]


def parse_markdown_table(text: str) -> tuple[list[str], list[str], list[list[str]]]:
    """(header, separator cells, rows of printed strings) of a markdown table."""
    lines = [ln for ln in text.strip("\n").split("\n")]
    if len(lines) < 2:
        raise ValueError("a table needs a header and a separator line")
    header, sep = split_row(lines[0]), split_row(lines[1])
    if not all(re.fullmatch(r":?-+:?", c) for c in sep):
        raise ValueError(f"second line is not a separator: {lines[1]!r}")
    return header, sep, [split_row(ln) for ln in lines[2:]]


_NUM = re.compile(r"(?<![\w.])([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w.])")
_NUMERIC_LITERAL = re.compile(r"^[\s±/%\[\]()]*$")


def _skeleton(s: str):
    """(template with ``{}`` per number, [(sign, comma, decimals)], [values]) or None."""
    fields, values, parts, pos = [], [], [], 0
    for m in _NUM.finditer(s):
        parts.append(s[pos:m.start()].replace("{", "{{").replace("}", "}}"))
        parts.append("{}")
        sign, whole, dec = m.groups()
        fields.append((sign == "+", "," in whole, None if dec is None else len(dec)))
        txt = (sign + whole.replace(",", "") + ("." + dec if dec is not None else ""))
        values.append(int(txt) if dec is None else float(txt))
        pos = m.end()
    parts.append(s[pos:].replace("{", "{{").replace("}", "}}"))
    literal = "".join(p for p in parts if p != "{}")
    if not fields or not _NUMERIC_LITERAL.match(literal):
        return None
    return "".join(parts), fields, values


def _unwrap(s: str) -> tuple[str | None, str]:
    for key, mark in (("bold", "**"), ("italic", "*")):
        if len(s) > 2 * len(mark) and s.startswith(mark) and s.endswith(mark) and not s[len(mark)] == "*":
            return key, s[len(mark):-len(mark)]
    return None, s


def infer_formats(rows: list[list[str]], ncols: int) -> list[str | None]:
    """Per column, the format template most of its numeric cells follow (``None``: a text column)."""
    formats: list[str | None] = []
    for j in range(ncols):
        votes: dict[tuple, int] = {}
        sigs = []
        for r in rows:
            if j >= len(r) or not r[j]:
                continue
            sk = _skeleton(_unwrap(r[j])[1])
            if sk is not None:
                key = (sk[0], tuple((f[2],) for f in sk[1]))
                votes[key] = votes.get(key, 0) + 1
                sigs.append((key, sk[1]))
        if not votes:
            formats.append(None)
            continue
        key = max(votes, key=lambda k: votes[k])
        plus = [any(f[i][0] for k, f in sigs if k == key) for i in range(len(key[1]))]
        comma = [any(f[i][1] for k, f in sigs if k == key) for i in range(len(key[1]))]
        specs = []
        for i, (dec,) in enumerate(key[1]):
            spec = ("+" if plus[i] else "") + ("," if comma[i] else "") + ("d" if dec is None else f".{dec}f")
            specs.append("{:" + spec + "}")
        it = iter(specs)
        formats.append(re.sub(r"\{\}", lambda _: next(it), key[0]))
    return formats


def _apply(fmt: str, value) -> str:
    return fmt.format(*value) if isinstance(value, list) else fmt.format(value)


def cell_value(text: str, fmt: str | None):
    """The data form of one printed cell under its column's format (round-trips exactly)."""
    if text == "":
        return None
    if fmt is not None:
        wrap, inner = _unwrap(text)
        sk = _skeleton(inner)
        if sk is not None:
            value = sk[2][0] if len(sk[2]) == 1 else sk[2]
            try:
                ok = _apply(fmt, value) == inner
            except (ValueError, IndexError):
                ok = False
            if ok:
                return {wrap: value} if wrap else value
    return text


def render_cell(value, fmt: str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        (key, v), = value.items()
        mark = {"bold": "**", "italic": "*"}[key]
        return mark + render_cell(v, fmt) + mark
    if fmt is None:
        raise ValueError(f"number {value!r} in a column without a format")
    return _apply(fmt, value)


def _line(cells: list[str]) -> str:
    return "|" + "|".join(f" {c.replace('|', chr(92) + '|')} " if c else " " for c in cells) + "|"


def render_table(table: dict) -> str:
    """The markdown lines of one data table (no trailing newline)."""
    header, formats = table["header"], table["formats"]
    sep = table.get("separator") or ["---"] * len(header)
    lines = [_line(header), "|" + "|".join(sep) + "|"]
    for row in table["rows"]:
        lines.append(_line([render_cell(v, formats[j] if j < len(formats) else None) for j, v in enumerate(row)]))
    return "\n".join(lines)


def table_from_markdown(text: str, formats: list[str | None] | None = None) -> dict:
    """A data table from a markdown table; ``formats`` (e.g. the data file's) or inferred."""
    header, sep, rows = parse_markdown_table(text)
    if formats is None:
        formats = infer_formats(rows, len(header))
    table = {"header": header, "formats": formats,
             "rows": [[cell_value(c, formats[j] if j < len(formats) else None) for j, c in enumerate(r)]
                      for r in rows]}
    if any(c != "---" for c in sep):
        table["separator"] = sep
    return table


# ---------------------------------------------------------------------------------------------
# data files and pages


def data_path(page: str, data_dir: Path = DATA) -> Path:
    return data_dir / (Path(page).stem + ".json")


def load_data(data_dir: Path = DATA) -> dict[str, dict]:
    """page file name -> its data file's content."""
    out = {}
    for p in sorted(data_dir.glob("*.json")):
        d = json.loads(p.read_text(encoding="utf-8"))
        out[d["page"]] = d
    return out


def dump_data(d: dict) -> str:
    """JSON with one table row per line (diffs show the rows that changed)."""
    j = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    out = ["{", f'  "page": {j(d["page"])},', f'  "source": {j(d["source"])},', '  "tables": {']
    names = list(d["tables"])
    for i, name in enumerate(names):
        t = d["tables"][name]
        out.append(f"    {j(name)}: {{")
        keys = [k for k in t if k != "rows"]
        for k in keys:
            out.append(f"      {j(k)}: {j(t[k])},")
        out.append('      "rows": [')
        out += [f"        {j(r)}" + ("," if k < len(t["rows"]) - 1 else "") for k, r in enumerate(t["rows"])]
        out.append("      ]")
        out.append("    }" + ("," if i < len(names) - 1 else ""))
    out += ["  }", "}", ""]
    return "\n".join(out)


def write_data(d: dict, data_dir: Path = DATA) -> Path:
    p = data_path(d["page"], data_dir)
    p.write_text(dump_data(d), encoding="utf-8")
    return p


def render_page(text: str, tables: dict[str, dict], page: str = "page") -> tuple[str, list[str]]:
    """The page with every marked table rendered from ``tables``; and the names of those that changed."""
    lines = text.split("\n")
    out, changed, seen, i = [], [], set(), 0
    while i < len(lines):
        m = START.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        name = m.group("name")
        try:
            end = lines.index(END, i + 1)
        except ValueError:
            raise ValueError(f"{page}: <!-- table:{name} --> has no {END} line") from None
        if name not in tables:
            raise ValueError(f"{page}: table {name!r} has no data (docs/results/data/{Path(page).stem}.json)")
        if name in seen:
            raise ValueError(f"{page}: table {name!r} marked twice")
        seen.add(name)
        new = render_table(tables[name]).split("\n")
        if lines[i + 1:end] != new:
            changed.append(name)
        out += [lines[i], *new, END]
        i = end + 1
    unused = sorted(set(tables) - seen)
    if unused:
        raise ValueError(f"{page}: data tables without markers on the page: {unused}")
    return "\n".join(out), changed


def build(pages_dir: Path = HERE, data_dir: Path = DATA, write: bool = True) -> dict[str, list[str]]:
    """Render every page that has a data file; page -> names of the tables that differ(ed)."""
    diffs = {}
    for page, d in load_data(data_dir).items():
        path = pages_dir / page
        text = path.read_text(encoding="utf-8")
        new, changed = render_page(text, d["tables"], page)
        if new != text:
            diffs[page] = changed
            if write:
                path.write_text(new, encoding="utf-8")
    return diffs


def check(pages_dir: Path = HERE, data_dir: Path = DATA) -> dict[str, list[str]]:
    """Pages whose tables differ from what their data renders (nothing written)."""
    return build(pages_dir, data_dir, write=False)


def find_table(name: str, data_dir: Path = DATA) -> dict:
    for d in load_data(data_dir).values():
        if name in d["tables"]:
            return d
    raise SystemExit(f"no table {name!r} in {data_dir}/*.json")


# ---------------------------------------------------------------------------------------------
# --from-eval readers


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path} not found: an evaluate.py output dir has it "
                         "(equal coverage needs functional.coverage_grid, the judge column judge=...)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _float(v: str) -> float:
    return float("nan") if v in ("", None) else float(v)


# header text -> (csv column, higher is better); None: not bolded
EC_COLUMNS = {
    "AUC EV ↑": ("auc_ev", True), "AUC ΔCE (nats) ↓": ("auc_dce", False), "AUC ΔCE ↓": ("auc_dce", False),
    "AUC corr ↑": ("auc_corr", True), "EV at f = 1": ("ev_full", None), "ΔCE at f = 1": ("dce_full", None),
    "AUC deact. success ↑": ("auc_deact_success", True), "deact. success f=1": ("deact_success_full", True),
    "deact. drop f=1": ("deact_full", True), "pairs forced into the full assignment": ("n_forced", None),
    # where the deactivation successes are lost (over the sampled pairs; benchmarks/deactivation_cause.py)
    "j silent on i's tokens ↓": ("deact_silent", False), "success when j fires ↑": ("deact_success_given_fires", True),
    "transfer cos": ("transfer_cos", None), "decoder cos": ("decoder_cos", None),
}
#: header text -> (csv column, higher is better); the cell is [area, lo, hi], the bootstrap's 95% interval
#: (format "{:.3f} [{:.3f}, {:.3f}]"); bold by the area
EC_CI_COLUMNS = {
    "AUC EV [95% CI] ↑": ("auc_ev", True), "AUC ΔCE [95% CI] ↓": ("auc_dce", False),
    "AUC corr [95% CI] ↑": ("auc_corr", True), "AUC deact. success [95% CI] ↑": ("auc_deact_success", True),
}
#: header text -> csv area; the cell is [lo, hi] of the paired difference to the pair's best other matcher
EC_VS_BEST = {"EV − best other [95% CI]": "auc_ev", "ΔCE − best other [95% CI]": "auc_dce",
              "corr − best other [95% CI]": "auc_corr", "deact. success − best other [95% CI]": "auc_deact_success"}
JUDGE_HEADERS = ("judge percentile (0.5 = chance)", "judge percentile", "judge ↑")

#: table -> how its rows are laid out: pair column?, row order ("auc_ev" = AUC EV descending within a pair,
#: or a default label order), the judge on every pair's rows or on the first pair's only (pooled figure)
EC_TABLES = {
    "ec_quick_saes": {"order": ["activation_correlation", "feature_flow", "sae_match", "mean_embedding",
                                "semantic_ot"], "judge": None},
    "ec_suite": {"order": "auc_ev", "judge": "first_pair"},
    "ec_jumprelu": {"order": "auc_ev", "judge": "first_pair"},
    "token_cost_equal_coverage": {"order": None, "judge": "all"},
    "token_cost_larger_tau": {"order": None, "judge": None},
    "token_cost_ci": {"order": None, "judge": "all"},
    "token_cost_vs_best": {"order": None, "judge": None},
    "token_cost_why": {"order": None, "judge": None},
}


def _bold_best(rows: list[list], cols: list[tuple[int, bool]], formats: list) -> None:
    """Wrap the best printed value of each column in ``{"bold": ...}`` (ties: all)."""
    for j, higher in cols:
        vals = [(i, float(f"{r[j][0]:.3f}") if isinstance(r[j], list) else float(render_cell(r[j], formats[j])))
                for i, r in enumerate(rows) if isinstance(r[j], (int, float, list))]
        vals = [(i, v) for i, v in vals if not math.isnan(v)]
        if len(vals) < 2:
            continue
        best = (max if higher else min)(v for _, v in vals)
        for i, v in vals:
            if v == best:
                rows[i][j] = {"bold": rows[i][j]}


def read_equal_coverage(name: str, table: dict, eval_dir: Path, labels: list[tuple[str, str]],
                        pairs: list[tuple[int, int]]) -> list[list]:
    """Rows of an equal-coverage table from ``equal_coverage.csv`` (+ ``judge_table.csv``)."""
    spec = EC_TABLES[name]
    header, formats = table["header"], table["formats"]
    rows = _read_csv(eval_dir / "equal_coverage.csv")
    rename = dict(labels)

    def label(r):
        for key in (r["matcher"], Path(r.get("run_dir", "")).name):
            if key in rename:
                return rename[key]
        return None if labels else r["matcher"]

    recs = [(label(r), r) for r in rows]
    judge = {}  # page label -> the judge percentile of its run (judge_table.csv is keyed by the run's label)
    if any(h in JUDGE_HEADERS for h in header):
        page_label = {r["matcher"]: lab for lab, r in recs}
        for jr in _read_csv(eval_dir / "judge_table.csv"):
            if page_label.get(jr["matcher"]) is not None:
                judge[page_label[jr["matcher"]]] = _float(jr.get("mean_percentile", ""))
    recs = [(lab, r) for lab, r in recs if lab is not None]
    pair_of = lambda r: (int(r["layer_a"]), int(r["layer_b"]))  # noqa: E731
    all_pairs = sorted({pair_of(r) for _, r in recs}, key=lambda p: (p[1] - p[0], p[0], p[1]))
    if pairs:
        missing = [p for p in pairs if p not in all_pairs]
        if missing:
            raise SystemExit(f"{eval_dir}/equal_coverage.csv has no layer pair {missing}; it has {all_pairs}")
        all_pairs = pairs
    has_pair = header[0] == "A→B"
    if not has_pair and len(all_pairs) != 1:
        raise SystemExit(f"table {name} has no A→B column but the evaluation has pairs {all_pairs}: pass --pair A,B")
    label_order = [t for _, t in labels] or (spec["order"] if isinstance(spec["order"], list) else [])
    out: list[list] = []
    for k, p in enumerate(all_pairs):
        group = [(lab, r) for lab, r in recs if pair_of(r) == p]
        if spec["order"] == "auc_ev":
            group.sort(key=lambda x: -_float(x[1]["auc_ev"]))
        else:
            group.sort(key=lambda x: label_order.index(x[0]) if x[0] in label_order else len(label_order))
        block = []
        for lab, r in group:
            row: list = []
            for j, h in enumerate(header):
                if h == "A→B":
                    row.append(f"{p[0]}→{p[1]}")
                elif h.startswith("matcher"):
                    row.append(lab)
                elif h in EC_COLUMNS:
                    v = _float(r[EC_COLUMNS[h][0]])
                    row.append("–" if math.isnan(v) else (int(v) if formats[j] == "{:d}" else v))
                elif h in EC_CI_COLUMNS:
                    c = EC_CI_COLUMNS[h][0]
                    v, lo, hi = (_float(r.get(k, "")) for k in (c, f"{c}_lo", f"{c}_hi"))
                    # without an interval (functional.bootstrap=0) the area alone, as text (not bolded)
                    row.append("–" if math.isnan(v) else (f"{v:.3f}" if math.isnan(lo) else [v, lo, hi]))
                elif h in EC_VS_BEST:
                    c = EC_VS_BEST[h]
                    lo, hi = (_float(r.get(f"{c}_vs_best_{k}", "")) for k in ("lo", "hi"))
                    row.append("–" if math.isnan(lo) else [lo, hi])
                elif h in JUDGE_HEADERS:
                    show = spec["judge"] == "all" or (spec["judge"] == "first_pair" and k == 0)
                    v = judge.get(lab, float("nan"))
                    row.append(v if show and not math.isnan(v) else None)
                else:
                    raise SystemExit(f"table {name}: no equal_coverage.csv column for header {h!r}")
            block.append(row)
        cols = [(j, EC_COLUMNS[h][1]) for j, h in enumerate(header) if h in EC_COLUMNS and EC_COLUMNS[h][1] is not None]
        cols += [(j, EC_CI_COLUMNS[h][1]) for j, h in enumerate(header) if h in EC_CI_COLUMNS]
        cols += [(j, True) for j, h in enumerate(header) if h in JUDGE_HEADERS]
        _bold_best(block, cols, formats)
        out += block
    return out


SYNTHETIC_METRICS = {"affected_top1_accuracy": "**top1_accuracy on the affected features**",
                     "top1_accuracy": "**top1_accuracy**", "hungarian_accuracy": "**hungarian_accuracy**",
                     "nomatch_precision": "**nomatch_precision**", "nomatch_recall": "**nomatch_recall**"}


def read_synthetic(name: str, table: dict, eval_dir: Path) -> list[list]:
    """Rows of a synthetic table from ``synthetic_table.md`` (the table under the metric's heading)."""
    metric = name.split("_", 2)[2]
    path = eval_dir / "synthetic_table.md"
    if not path.is_file():
        raise SystemExit(f"{path} not found: evaluate.py experiment=synthetic_* writes it")
    lines = path.read_text(encoding="utf-8").split("\n")
    heading = SYNTHETIC_METRICS[metric]
    starts = [i for i, ln in enumerate(lines) if ln == heading or ln.startswith(heading + " ")]
    if not starts:
        raise SystemExit(f"{path} has no {heading} table")
    i = next(k for k in range(starts[0] + 1, len(lines)) if lines[k].startswith("|"))
    j = i
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    text = "\n".join(lines[i:j])
    header, _, cells = parse_markdown_table(text)
    if header != table["header"]:
        raise SystemExit(f"{path}: the {metric} table's columns {header} are not the page's {table['header']}")
    # a column that was all "n/a" on the page has no format yet: take it from the new cells
    table["formats"] = [f or g for f, g in zip(table["formats"], infer_formats(cells, len(header)))]
    return table_from_markdown(text, table["formats"])["rows"]


def from_eval(name: str, eval_dir: Path, labels=(), pairs=(), data_dir: Path = DATA) -> Path:
    """Replace table ``name``'s rows in its data file with those read from ``eval_dir``."""
    d = find_table(name, data_dir)
    table = d["tables"][name]
    if name in EC_TABLES:
        rows = read_equal_coverage(name, table, Path(eval_dir), list(labels), list(pairs))
    elif re.fullmatch(r"synthetic_(headline|rotation|oracle)_(%s)" % "|".join(SYNTHETIC_METRICS), name):
        rows = read_synthetic(name, table, Path(eval_dir))
    else:
        raise SystemExit(f"no reader for table {name} yet: edit docs/results/data/{Path(d['page']).stem}.json")
    table["rows"] = rows
    table["source"] = f"python docs/results/build.py --from-eval {eval_dir} --table {name}"
    return write_data(d, data_dir)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a page's tables differ from the data")
    ap.add_argument("--from-eval", metavar="EVAL_DIR", help="an evaluate.py output dir to read TABLE's rows from")
    ap.add_argument("--table", metavar="NAME", help="the table --from-eval refreshes")
    ap.add_argument("--label", action="append", default=[], metavar="RUN=TEXT",
                    help="(--from-eval) a run's label (or run_dir name) -> its row label; keeps only those, in order")
    ap.add_argument("--pair", action="append", default=[], metavar="A,B", help="(--from-eval) layer pairs to keep")
    ap.add_argument("--pages", type=Path, default=HERE, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=DATA, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.from_eval:
        if not a.table:
            ap.error("--from-eval needs --table NAME")
        labels = [tuple(s.split("=", 1)) for s in a.label]
        if any(len(t) != 2 for t in labels):
            ap.error("--label takes RUN=TEXT")
        pairs = [tuple(int(x) for x in s.split(",")) for s in a.pair]
        p = from_eval(a.table, Path(a.from_eval), labels, pairs, a.data)
        print(f"{p}: table {a.table} refreshed from {a.from_eval}")
    if a.check:
        diffs = check(a.pages, a.data)
        for page, names in diffs.items():
            print(f"{page}: tables differ from the data: {', '.join(names) or '(layout)'}")
        return 1 if diffs else 0
    diffs = build(a.pages, a.data)
    for page, names in diffs.items():
        print(f"{page}: rewrote {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
