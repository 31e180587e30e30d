"""What a functional evaluation (``evaluate.py run_dir=... | 'run_dirs=[...]'``) found, in a few
lines for the terminal (also ``summary.txt`` in the evaluation dir).

One line per layer pair and matcher, best first at equal coverage: the area under the
substitution-EV / ΔCE / co-activation curves of the full one-to-one assignment kept
best-first (:mod:`saeot.evaluation.functional`), the causal deactivation success, the
matcher's own coverage and EV, the judge percentile if a judge ran; then where the
tables, plots and reports are and the command to run next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from saeot.pipeline.summary import write_summary

__all__ = ["format_functional_summary", "write_summary"]  # write_summary: saeot.pipeline.summary


def _n(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def format_functional_summary(result: dict, out_dir: str | Path, next_commands: Sequence[str] = ()) -> str:
    """The summary of :func:`saeot.evaluation.functional.evaluate_runs`'s ``result``."""
    rows, cov = result.get("rows", []), result.get("coverage_rows", [])
    by_key = {(c["matcher"], c["layer_a"], c["layer_b"]): c for c in cov}
    pairs = sorted({(r["layer_a"], r["layer_b"]) for r in rows})
    lines = [f"saeot: functional evaluation of {len({r['run_dir'] for r in rows})} run(s), {len(pairs)} layer pair(s)"]
    head = (f"    {'matcher':<28} {'AUC EV':>7} {'AUC dCE':>8} {'AUC corr':>8} {'deact.':>6}   "
            f"{'A matched':>9} {'EV (own)':>8} {'judge':>6}")
    for la, lb in pairs:
        lines.append(f"  L{la} -> L{lb} (best first at equal coverage; AUC over the fractions of A matched):")
        lines.append(head)
        here = [r for r in rows if (r["layer_a"], r["layer_b"]) == (la, lb)]

        def auc(r: dict) -> float:
            v = by_key.get((r["matcher"], la, lb), {}).get("auc_ev", float("nan"))
            return v if math.isfinite(v) else -math.inf

        for r in sorted(here, key=auc, reverse=True):
            c = by_key.get((r["matcher"], la, lb), {})
            lines.append(f"    {str(r['matcher'])[:28]:<28} {_n(c.get('auc_ev')):>7} {_n(c.get('auc_dce')):>8} "
                         f"{_n(c.get('auc_corr')):>8} {_n(c.get('auc_deact_success'), 2):>6}   "
                         f"{_n(r.get('frac_a_matched'), 2):>9} {_n(r.get('ev_sub')):>8} {_n(r.get('judge_mean'), 2):>6}")
    out = Path(out_dir)
    lines.append(f"  tables: {result.get('table', out / 'functional_table.md')}"
                 + (f", {out / 'equal_coverage.md'}, {out / 'plots' / 'equal_coverage.png'}" if cov else ""))
    reports = sorted({str(Path(r["run_dir"]) / "report.html") for r in rows if (Path(r["run_dir"]) / "report.html").is_file()})
    for rep in reports[:4]:
        lines.append(f"  report: {rep}")
    if len(reports) > 4:
        lines.append(f"  report: ... and {len(reports) - 4} more (report.html in every run dir)")
    for cmd in next_commands:
        lines.append(f"  next: {cmd}")
    return "\n".join(lines)

