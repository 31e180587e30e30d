"""The comparison tables of an evaluation: ``functional_table.md`` / ``.csv`` (one row per
run x layer pair) and the per-matcher judge table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from saeot.evaluation.functional._settings import BASELINES
from saeot.io import atomic_path, atomic_write_text
from saeot.pipeline.rundir import RunDir

__all__ = ["TABLE_COLUMNS", "table_rows", "judge_row", "format_markdown", "format_judge_markdown", "write_table"]

TABLE_COLUMNS = [
    "matcher", "layer_a", "layer_b", "run_dir",
    "ev_sub", "dce_sub", "ce_recovered", "ev_sae", "dce_sae", "ev_bias", "dce_bias", "ev_mean", "dce_mean",
    "coact_precision", "coact_recall", "coact_corr", "chance_precision", "chance_corr",
    "frac_a_matched", "frac_no_match", "frac_b_covered", "n_one_to_one",
    "judge_mean", "judge_ci_low", "judge_ci_high", "judge_n",
]


def table_rows(run: RunDir, func: dict, judged: dict | None = None) -> list[dict]:
    """One row per layer pair of ``func`` (a run's ``metrics.json["functional"]``)."""
    rows = []
    for key, p in func["pairs"].items():
        ref, co, cov, ch = p["baselines"], p["coactivation"], p["coverage"], p["chance"]
        row = {
            "matcher": run.label, "layer_a": p["layer_a"], "layer_b": p["layer_b"], "run_dir": str(run.path),
            "ev_sub": p["substitution"]["explained_variance"], "dce_sub": p["substitution"]["delta_ce"],
            "ce_recovered": p["ce_recovered"],
            "coact_precision": co["precision"], "coact_recall": co["recall"], "coact_corr": co["corr"],
            "chance_precision": ch["precision"], "chance_corr": ch["corr"],
            "frac_a_matched": cov["frac_a_matched"], "frac_no_match": cov["frac_no_match"],
            "frac_b_covered": cov["frac_b_covered"], "n_one_to_one": cov["n_one_to_one"],
        }
        for r in BASELINES:
            row[f"ev_{r}"] = ref.get(r, {}).get("explained_variance", float("nan"))
            row[f"dce_{r}"] = ref.get(r, {}).get("delta_ce", float("nan"))
        jp = (judged or {}).get("pairs", {}).get(key)
        row["judge_mean"] = jp["mean"] if jp else float("nan")
        row["judge_ci_low"], row["judge_ci_high"] = (jp["ci"] if jp else (float("nan"), float("nan")))
        row["judge_n"] = jp["n"] if jp else 0
        rows.append(row)
    return rows


_MD_HEADER = [
    ("matcher", "matcher"), ("pair", "A→B"), ("ev_sub", "EV sub"), ("dce_sub", "ΔCE sub"),
    ("ce_recovered", "CE rec."), ("ev_sae", "EV SAE"), ("dce_sae", "ΔCE SAE"), ("ev_bias", "EV zero"),
    ("dce_bias", "ΔCE zero"), ("ev_mean", "EV mean"), ("dce_mean", "ΔCE mean"),
    ("coact_precision", "co-act P"), ("coact_recall", "co-act R"), ("coact_corr", "corr"),
    ("chance_corr", "corr (rand)"), ("frac_a_matched", "A matched"), ("frac_no_match", "no match"),
    ("frac_b_covered", "B covered"), ("n_one_to_one", "n 1:1"), ("judge", "judge (95% CI)"),
]


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def judge_row(run: RunDir, judged: dict) -> dict:
    """Per-run (matcher) judge summary, all layer pairs pooled, with the random-pair control."""
    o, c = judged["overall"], judged.get("control_overall") or {}
    disc = judged.get("discrimination") or {}
    return {"matcher": run.label, "n": o["n"], "n_invalid": o["n_invalid"], "mean": o["mean"],
            "ci_low": o["ci"][0], "ci_high": o["ci"][1], **{f"n_{k}": v for k, v in o["counts"].items()},
            "control_n": c.get("n", 0), "control_mean": c.get("mean", float("nan")),
            "control_ci_low": (c.get("ci") or [float("nan")] * 2)[0],
            "control_ci_high": (c.get("ci") or [float("nan")] * 2)[1],
            "expected_mean": (o.get("expected_score") or {}).get("mean", float("nan")),
            "control_expected_mean": (c.get("expected_score") or {}).get("mean", float("nan")),
            "mean_percentile": (o.get("percentile") or {}).get("mean", float("nan")),
            "control_mean_percentile": (c.get("percentile") or {}).get("mean", float("nan")),
            "discriminates": disc.get("discriminates"), "warning": disc.get("warning") or "",
            "backend": judged["backend"].get("model", judged["backend"].get("backend"))}


def format_judge_markdown(rows: list[dict]) -> str:
    """Per-matcher judge table: mean score (3 same / 2 maybe / 1 different) with its CI and the control."""
    lines = ["| matcher | judge | n | mean score | 95% CI | same / maybe / different | random pairs: mean [CI] "
             "| expected score: matched / random | percentile: matched / random | tells matched from random? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tells = {True: "yes", False: "**NO**"}.get(r.get("discriminates"), "–")
        lines.append(f"| {r['matcher']} | {r['backend']} | {r['n']} | {_fmt(r['mean'], 2)} | "
                     f"[{_fmt(r['ci_low'], 2)}, {_fmt(r['ci_high'], 2)}] | "
                     f"{r.get('n_same', 0)} / {r.get('n_maybe', 0)} / {r.get('n_different', 0)} | "
                     f"{_fmt(r['control_mean'], 2)} [{_fmt(r['control_ci_low'], 2)}, {_fmt(r['control_ci_high'], 2)}] "
                     f"(n={r['control_n']}) | {_fmt(r['expected_mean'], 3)} / {_fmt(r['control_expected_mean'], 3)} | "
                     f"{_fmt(r.get('mean_percentile', float('nan')), 3)} / "
                     f"{_fmt(r.get('control_mean_percentile', float('nan')), 3)} | "
                     f"{tells} |")
    warnings = [f"- **{r['matcher']}**: {r['warning']}" for r in rows if r.get("warning")]
    if warnings:
        lines += ["", "Warning: a judge that scores random pairs as high as the matched ones cannot say whether "
                      "the matches are right:", *warnings]
    return "\n".join(lines) + "\n"


def format_markdown(rows: list[dict]) -> str:
    """The markdown table (rows sorted by layer pair, then matcher)."""
    rows = sorted(rows, key=lambda r: (r["layer_b"] - r["layer_a"], r["layer_a"], r["layer_b"], r["matcher"]))
    has_judge = any(r.get("judge_n") for r in rows)
    header = [(k, t) for k, t in _MD_HEADER if k != "judge" or has_judge]
    lines = ["| " + " | ".join(t for _, t in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = []
        for k, _ in header:
            if k == "pair":
                cells.append(f"{r['layer_a']}→{r['layer_b']}")
            elif k == "judge":
                cells.append(f"{r['judge_mean']:.2f} [{r['judge_ci_low']:.2f}, {r['judge_ci_high']:.2f}] (n={r['judge_n']})"
                             if r.get("judge_n") else "–")
            else:
                cells.append(_fmt(r.get(k)))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "EV: explained variance of h^B on evaluation tokens (functional.split, default fresh: text packed after the "
        "run's last context, seen by no stage of the run); ΔCE: increase of next-token cross-entropy (nats/token) "
        "when h^B is replaced. sub: A's SAE codes through the one-to-one matching into B's decoder (SAE Match Eq. 5, "
        "folded codes); SAE: B's own SAE reconstruction (ceiling); zero: all codes zero (h^B -> b_dec^B); mean: h^B -> "
        "its mean over the evaluation tokens. CE rec.: (CE_mean - CE_sub) / (CE_mean - CE_SAE). co-act P / R: P(B fires | A fires), "
        "P(A fires | B fires), mean over matched pairs; corr: Pearson correlation of the pair's activations; "
        "corr (rand): A features paired with random B features. A matched / no match: fractions of A's features; "
        "B covered: fraction of B's features that receive a match; n 1:1: pairs used for substitution.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_table(rows: list[dict], out_dir: str | Path, judge_rows: list[dict] | None = None) -> Path:
    """``out_dir/functional_table.md`` and ``.csv`` (atomic); with a judge, its per-matcher
    table is appended to the markdown and written to ``judge_table.csv``."""
    out_dir = Path(out_dir)
    md = out_dir / "functional_table.md"
    text = format_markdown(rows)
    if judge_rows:
        text += "\nJudge, all layer pairs pooled (mean of 3 = same, 2 = maybe, 1 = different):\n\n"
        text += format_judge_markdown(judge_rows)
        with atomic_path(out_dir / "judge_table.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(judge_rows[0]))
            w.writeheader()
            w.writerows(judge_rows)
    atomic_write_text(md, text)
    with atomic_path(out_dir / "functional_table.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return md
