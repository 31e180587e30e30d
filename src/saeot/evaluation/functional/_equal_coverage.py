"""Equal coverage, step 3: one table (``equal_coverage.md`` / ``.csv``) and one plot
(``plots/equal_coverage.png``) comparing every evaluated matcher at the same coverage.

Table: one row per run (matcher) x layer pair -- the full one-to-one assignment
(``f = 1``, SAE Match's Eq. 5 protocol) and the area under each curve; beside them the
run's own coverage (its nearest / Hungarian matching with its null) for reference. With
``functional.bootstrap``, every area has its 95% interval over the evaluation contexts
(``auc_<m>_lo`` / ``_hi``; markdown ``0.555 [0.541, 0.568]``) and the interval of its
difference to the best *other* matcher of the layer pair on that metric (by point estimate,
ΔCE: lowest), formed replicate by replicate from the same weights (``auc_<m>_vs_best_lo`` /
``_hi``, that matcher in ``auc_<m>_best_other``;
:mod:`saeot.evaluation.functional._bootstrap`): an interval that excludes 0 says the two
differ beyond the spread of the contexts.
Plot: one row of three panels (EV, ΔCE, co-activation correlation against the fraction
of A matched) per layer pair, one line per matcher.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.pyplot as plt

from saeot.evaluation.functional._bootstrap import paired_difference
from saeot.evaluation.functional._curves import CURVE_METRICS
from saeot.io import atomic_path, atomic_write_text
from saeot.plots import save_figure

__all__ = ["COVERAGE_COLUMNS", "CI_COLUMNS", "AUC_COLUMNS", "coverage_rows", "add_paired_differences",
           "format_coverage_markdown", "write_coverage_table", "plot_equal_coverage"]

COVERAGE_COLUMNS = [
    "matcher", "layer_a", "layer_b", "n_pairs", "n_forced", "fraction_full",
    "ev_full", "dce_full", "corr_full", "auc_ev", "auc_dce", "auc_corr",
    "deact_full", "deact_success_full", "auc_deact", "auc_deact_success",
    "own_frac_a_matched", "own_ev_sub", "own_dce_sub", "assignment_seconds", "run_dir",
    # where the deactivation successes are lost (_deactivation.why_summary, over the sampled pairs)
    "deact_silent", "deact_success_given_fires", "transfer_cos", "decoder_cos",
]
#: deactivation_pairs.csv: one row per sampled pair of every run x layer pair
DEACTIVATION_PAIR_COLUMNS = ["matcher", "layer_a", "layer_b", "rank", "feature_a", "feature_b", "j_clean", "change",
                             "success", "corr", "transfer_cos", "decoder_cos"]
#: curve metric -> its ``auc_*`` column
AUC_COLUMNS = {"explained_variance": "auc_ev", "delta_ce": "auc_dce", "corr": "auc_corr",
               "deactivation": "auc_deact", "deactivation_success": "auc_deact_success"}
#: the bootstrap's columns (after COVERAGE_COLUMNS): each area's interval, its paired difference to the best other
CI_COLUMNS = [f"{a}_{s}" for a in AUC_COLUMNS.values() for s in ("lo", "hi", "vs_best_lo", "vs_best_hi", "best_other")]


def coverage_rows(label: str, run_dir: str, func: dict, method: str | None = None) -> list[dict]:
    """Rows of one run from its ``metrics.json["functional"]`` (pairs with an ``equal_coverage`` entry);
    ``method``: the run's matcher (``RunDir.matcher``), whose other runs are not its rivals in
    :func:`add_paired_differences`."""
    rows = []
    for p in func["pairs"].values():
        c = p.get("equal_coverage")
        if not c:
            continue
        full, auc = c["full"], c["auc"]
        rows.append({
            "matcher": label, "layer_a": p["layer_a"], "layer_b": p["layer_b"], "n_pairs": full["n_pairs"],
            "n_forced": c["n_forced"], "fraction_full": full["fraction"],
            "ev_full": full["explained_variance"], "dce_full": full["delta_ce"], "corr_full": full["corr"],
            "auc_ev": auc["explained_variance"], "auc_dce": auc["delta_ce"], "auc_corr": auc["corr"],
            "deact_full": full.get("deactivation", float("nan")),
            "deact_success_full": full.get("deactivation_success", float("nan")),
            "auc_deact": auc.get("deactivation", float("nan")),
            "auc_deact_success": auc.get("deactivation_success", float("nan")),
            "own_frac_a_matched": p["coverage"]["frac_a_matched"],
            "own_ev_sub": p["substitution"]["explained_variance"], "own_dce_sub": p["substitution"]["delta_ce"],
            "assignment_seconds": c["assignment_seconds"], "run_dir": run_dir, "method": method or label,
            "curve": c,
        })
        for m, col in AUC_COLUMNS.items():
            rows[-1][f"{col}_lo"], rows[-1][f"{col}_hi"] = c.get("auc_ci", {}).get(m, [float("nan")] * 2)
        why = c.get("deactivation_why", {})
        for col, key in (("deact_silent", "silent"), ("deact_success_given_fires", "success_given_fires"),
                         ("transfer_cos", "transfer_cos"), ("decoder_cos", "decoder_cos")):
            rows[-1][col] = why.get(key, float("nan"))
    return rows


def _boot_key(r: dict) -> tuple | None:
    """Rows with equal keys hold replicates of the same weights over the same contexts."""
    b = r["curve"].get("bootstrap")
    return None if not b else (r["layer_a"], r["layer_b"], b["contexts_digest"], b["n_contexts"], b["replicates"],
                               b["seed"])


def add_paired_differences(rows: list[dict]) -> list[dict]:
    """Set ``auc_<m>_vs_best_lo`` / ``_hi`` / ``auc_<m>_best_other`` in every row (in place; also
    returned): the interval of ``auc(row) - auc(best other)`` per replicate, the best other being
    the row of the same layer pair and contexts with the best point estimate on the metric
    (ΔCE: lowest) among the rows of the *other methods* (``method``: the run's matcher, so that
    semantic OT's variants are compared with the baselines, not with each other); among all other
    rows when no other method has one. NaN / "" without a bootstrap or another row."""
    for r in rows:
        key = _boot_key(r)
        for m, col in AUC_COLUMNS.items():
            r[f"{col}_vs_best_lo"] = r[f"{col}_vs_best_hi"] = float("nan")
            r[f"{col}_best_other"] = ""
            others = [o for o in rows if o is not r and key is not None and _boot_key(o) == key
                      and not math.isnan(o[col])]
            rivals = [o for o in others if o.get("method") != r.get("method")]
            others = rivals or others
            if not others:
                continue
            higher = CURVE_METRICS[m][1]
            best = (max if higher else min)(others, key=lambda o: o[col])
            lo, hi = paired_difference(r["curve"]["auc_boot"][m], best["curve"]["auc_boot"][m])
            r[f"{col}_vs_best_lo"], r[f"{col}_vs_best_hi"], r[f"{col}_best_other"] = lo, hi, best["matcher"]
    return rows


def _f(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _cell(v):
    """A csv cell: floats with 6 significant digits, the rest as they are."""
    return f"{v:.6g}" if isinstance(v, float) else v


def _ci(r: dict, col: str) -> str:
    """``0.555 [0.541, 0.568]`` (the area and its interval; the area alone without one)."""
    lo, hi = r.get(f"{col}_lo", float("nan")), r.get(f"{col}_hi", float("nan"))
    return _f(r[col]) + ("" if math.isnan(lo) or math.isnan(hi) else f" [{_f(lo)}, {_f(hi)}]")


def format_coverage_markdown(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (r["layer_b"] - r["layer_a"], r["layer_a"], r["layer_b"], r["matcher"]))
    grid = rows[0]["curve"]["grid"] if rows else []
    head = ["matcher", "A→B", "pairs (forced)", "EV full", "ΔCE full", "corr full", "AUC EV ↑", "AUC ΔCE ↓",
            "AUC corr ↑", "deact. drop full", "deact. success full", "AUC deact. success ↑",
            "own: A matched", "own: EV", "own: ΔCE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["matcher"], f"{r['layer_a']}→{r['layer_b']}", f"{r['n_pairs']} ({r['n_forced']})",
                 _f(r["ev_full"]), _f(r["dce_full"]), _f(r["corr_full"]), _ci(r, "auc_ev"), _ci(r, "auc_dce"),
                 _ci(r, "auc_corr"), _f(r["deact_full"]), _f(r["deact_success_full"]), _ci(r, "auc_deact_success"),
                 _f(r["own_frac_a_matched"]), _f(r["own_ev_sub"]), _f(r["own_dce_sub"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Every matcher's full one-to-one assignment with the null off (assignment=hungarian, null_alpha=1, "
        "min_margin=0), its pairs ranked by the matcher's own cost; coverage level f keeps the best round(f F_a) "
        "pairs. full: f = 1 (SAE Match Eq. 5: every feature of A assigned; 'forced' pairs completed the sparse "
        "assignment and rank last). EV / ΔCE: layer substitution through the kept pairs (folded codes); corr: mean "
        "Pearson correlation of the kept pairs' activations. deact.: feature i removed at A where it fires, the "
        "relative drop of j at B (mean), success: j loses >= half (sampled pairs spread over the ranking). "
        "AUC: trapezoid area over the coverage grid "
        f"{[round(g, 3) for g in grid]} (the same for every matcher). own: the run's own matching and null "
        "(functional_table.md), for reference.",
    ]
    boot = next((r["curve"]["bootstrap"] for r in rows if r["curve"].get("bootstrap")), None)
    if boot:
        notes.append(f"\n[lo, hi]: 95% interval of the area, bootstrap over the {boot['n_contexts']} evaluation contexts "
                     f"({boot['replicates']} replicates, seed {boot['seed']}; the context is the unit: its tokens are "
                     "correlated). equal_coverage.csv adds, per area, the interval of the difference to the best other "
                     "matcher of the pair (auc_*_vs_best_lo / _hi, that matcher in auc_*_best_other), paired: every "
                     "matcher reweighted by the same replicates of the same contexts.")
    return "\n".join(lines + notes) + "\n"


def write_coverage_table(rows: list[dict], out_dir: str | Path) -> Path:
    """``out_dir/equal_coverage.md`` and ``.csv`` (atomic); the csv adds the bootstrap's intervals
    (:data:`CI_COLUMNS`, :func:`add_paired_differences`) and the curves, one column per level;
    ``deactivation_pairs.csv`` has every sampled pair of the deactivation test (its two sums, drop,
    success, co-activation correlation and first-order geometry, :func:`~saeot.evaluation.functional._deactivation.pair_geometry`)."""
    out_dir = Path(out_dir)
    add_paired_differences(rows)
    md = out_dir / "equal_coverage.md"
    atomic_write_text(md, format_coverage_markdown(rows))
    grid = rows[0]["curve"]["grid"] if rows else []
    curve_cols = [f"{m}@{g:g}" for m in CURVE_METRICS for g in grid]
    with atomic_path(out_dir / "equal_coverage.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COVERAGE_COLUMNS + CI_COLUMNS + curve_cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: _cell(v) for k, v in r.items() if k != "curve"}
            for m in CURVE_METRICS:
                for g, v in zip(grid, r["curve"].get(m, [float("nan")] * len(grid))):
                    out[f"{m}@{g:g}"] = _cell(v)
            w.writerow(out)
    with atomic_path(out_dir / "deactivation_pairs.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DEACTIVATION_PAIR_COLUMNS)
        w.writeheader()
        for r in rows:
            dp = r["curve"].get("deactivation_pairs", {})
            for q in range(len(dp.get("rank", []))):
                w.writerow({"matcher": r["matcher"], "layer_a": r["layer_a"], "layer_b": r["layer_b"],
                            **{k: _cell(dp[k][q]) for k in DEACTIVATION_PAIR_COLUMNS[3:]}})
    return md


def plot_equal_coverage(rows: list[dict], path: str | Path) -> Path:
    """One panel per curve metric (EV, ΔCE, correlation, deactivation vs fraction of A matched) per layer
    pair, one line per matcher."""
    pairs = sorted({(r["layer_a"], r["layer_b"]) for r in rows}, key=lambda p: (p[1] - p[0], p))
    n_col = len(CURVE_METRICS)
    fig, axes = plt.subplots(max(len(pairs), 1), n_col, figsize=(4.3 * n_col, 3.4 * max(len(pairs), 1)),
                             squeeze=False)
    labels = sorted({r["matcher"] for r in rows})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(labels)}
    for i, pair in enumerate(pairs):
        for j, (metric, (title, higher)) in enumerate(CURVE_METRICS.items()):
            ax = axes[i][j]
            for r in (r for r in rows if (r["layer_a"], r["layer_b"]) == pair):
                c = r["curve"]
                ax.plot(c["fraction"], c.get(metric, [float("nan")] * len(c["fraction"])), marker="o", ms=3,
                        color=colors[r["matcher"]], label=r["matcher"])
            ax.set_title(f"{pair[0]}→{pair[1]}: {title} ({'higher' if higher else 'lower'} is better)", fontsize=9)
            ax.set_xlabel("fraction of A matched (best pairs by the matcher's own cost)", fontsize=8)
            ax.grid(alpha=0.3)
    # one legend for the figure, below the panels: per-panel legends of long run labels covered the
    # neighbouring panels; the areas under the curves are in equal_coverage.md
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ms=3) for m in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 3), 1, 1))  # room for the legend
    return save_figure(fig, Path(path))
