"""``report.html`` of a run: matched pairs with their top contexts side by side.

One self-contained file (inline CSS, no script, no external asset): it opens from
disk in any browser. For every layer pair: the functional summary, a seeded sample of
matched pairs (plus every pair the judge saw) sorted by distance, each with distance,
margin, the judge's label if any and both features' top-activating contexts with the
firing token highlighted; then the "no match" list (every id, and the contexts of
the first few with their best rejected candidate). A judge that cannot tell matched pairs
from random ones gets a warning above everything else. All text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saeot.evaluation.contexts import FeatureContexts
from saeot.hooks import hook_layer
from saeot.io import atomic_write_text

if TYPE_CHECKING:
    from saeot.evaluation.functional._matchings import PairMatching
    from saeot.evaluation.functional._settings import FunctionalSettings

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;max-width:1400px;
 color:#1d1d1f;background:#fff;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:2px solid #ddd}
h3{font-size:1rem;margin-top:1.2rem}.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0;font-size:.85rem}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f3f4f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
ol.ctx{margin:0;padding-left:1.4rem}ol.ctx li{margin:2px 0}
.snip{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
mark{background:#ffd54f;color:#000;padding:0 1px;border-radius:2px;font-weight:600}
.act{display:inline-block;min-width:3.2em;color:#666;font-size:.75rem;font-family:ui-monospace,monospace}
.lab-same{background:#c8e6c9}.lab-maybe{background:#fff3c4}.lab-different{background:#ffcdd2}
.ids{font-family:ui-monospace,monospace;font-size:.8rem;line-height:1.5;word-break:break-word}
.empty{color:#999;font-style:italic}
.warn{background:#fff3cd;border:1px solid #e0b400;padding:.5rem .8rem;border-radius:4px}
table.matches td:nth-child(-n+5),table.nomatch td:nth-child(-n+3){width:1%;white-space:nowrap}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if math.isnan(f):
        return "–"
    if math.isinf(f):
        return "∞" if f > 0 else "-∞"
    return f"{f:.{digits}f}"


def contexts_html(contexts: Sequence[Any]) -> str:
    """``<ol>`` of contexts (objects with ``left``, ``token``, ``right``, ``activation``), token in ``<mark>``."""
    if not contexts:
        return '<span class="empty">no contexts</span>'
    items = [
        f'<li><span class="act">{_num(c.activation, 2)}</span> '
        f'<span class="snip">{_e(c.left)}<mark>{_e(c.token)}</mark>{_e(c.right)}</span></li>'
        for c in contexts
    ]
    return '<ol class="ctx">' + "".join(items) + "</ol>"


def _summary_table(func: dict | None, judged: dict | None) -> str:
    if not func:
        return ""
    head = ["A→B", "EV sub", "ΔCE sub", "CE rec.", "EV SAE", "ΔCE SAE", "EV mean", "ΔCE mean", "co-act P",
            "co-act R", "corr", "corr (rand)", "A matched", "no match", "judge"]
    rows = []
    for key, p in func.get("pairs", {}).items():
        ref, co, cov = p.get("baselines", {}), p.get("coactivation", {}), p.get("coverage", {})
        jp = (judged or {}).get("pairs", {}).get(key)
        jtxt = f"{_num(jp['mean'], 2)} [{_num(jp['ci'][0], 2)}, {_num(jp['ci'][1], 2)}]" if jp else "–"
        cells = [f"{p['layer_a']}→{p['layer_b']}", _num(p["substitution"]["explained_variance"]),
                 _num(p["substitution"]["delta_ce"]), _num(p.get("ce_recovered")),
                 _num(ref.get("sae", {}).get("explained_variance")), _num(ref.get("sae", {}).get("delta_ce")),
                 _num(ref.get("mean", {}).get("explained_variance")), _num(ref.get("mean", {}).get("delta_ce")),
                 _num(co.get("precision")), _num(co.get("recall")), _num(co.get("corr")),
                 _num(p.get("chance", {}).get("corr")), _num(cov.get("frac_a_matched")),
                 _num(cov.get("frac_no_match")), _e(jtxt)]
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    return ("<table class=\"summary\"><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def render_report(
    title: str, meta: dict[str, Any], sections: Sequence[dict], func: dict | None = None, judged: dict | None = None,
) -> str:
    """The HTML text.

    Args:
        title: page title (escaped).
        meta: key -> value shown under the title.
        sections: one per layer pair: ``{"title", "coverage" (dict), "pairs": [{"feature_a", "feature_b",
            "distance", "margin", "label", "contexts_a", "contexts_b"}], "no_match_ids": [...],
            "no_match": [{"feature_a", "best_b", "distance", "contexts_a", "contexts_b"}]}``.
        func, judged: the run's ``functional`` / ``judge`` metrics (summary table).
    """
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    out.append('<p class="meta">' + " · ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in meta.items()) + "</p>")
    out.append(_summary_table(func, judged))
    warning = ((judged or {}).get("discrimination") or {}).get("warning")
    if warning:
        out.append(f'<p class="warn"><b>Judge:</b> {_e(warning)}</p>')
    for si, sec in enumerate(sections):
        out.append(f'<section class="pair" id="pair-{si}"><h2>{_e(sec["title"])}</h2>')
        cov = sec.get("coverage") or {}
        if cov:
            out.append('<p class="meta">' + " · ".join(f"{_e(k)}: {_num(v) if isinstance(v, float) else _e(v)}"
                                                        for k, v in cov.items()) + "</p>")
        out.append("<h3>Matched pairs (sample, by distance)</h3>")
        if sec["pairs"]:
            out.append('<table class="matches"><thead><tr><th>A</th><th>B</th><th>distance</th><th>margin</th>'
                       "<th>judge</th><th>top contexts of A</th><th>top contexts of B</th></tr></thead><tbody>")
            for p in sec["pairs"]:
                lab = p.get("label")
                lab_html = f'<td class="lab-{_e(lab)}">{_e(lab)}</td>' if lab else "<td>–</td>"
                out.append(f'<tr><td class="num">{_e(p["feature_a"])}</td><td class="num">{_e(p["feature_b"])}</td>'
                           f'<td class="num">{_num(p["distance"], 4)}</td><td class="num">{_num(p["margin"], 4)}</td>'
                           f"{lab_html}<td>{contexts_html(p['contexts_a'])}</td><td>{contexts_html(p['contexts_b'])}</td></tr>")
            out.append("</tbody></table>")
        else:
            out.append('<p class="empty">no matched pair</p>')
        ids = list(sec.get("no_match_ids", []))
        out.append(f"<h3>No match ({len(ids)})</h3>")
        if ids:
            out.append('<p class="ids">' + ", ".join(_e(i) for i in ids) + "</p>")
        if sec.get("no_match"):
            out.append('<table class="nomatch"><thead><tr><th>A</th><th>best B (rejected)</th><th>distance</th>'
                       "<th>top contexts of A</th><th>top contexts of best B</th></tr></thead><tbody>")
            for p in sec["no_match"]:
                out.append(f'<tr><td class="num">{_e(p["feature_a"])}</td><td class="num">{_e(p["best_b"])}</td>'
                           f'<td class="num">{_num(p["distance"], 4)}</td><td>{contexts_html(p["contexts_a"])}</td>'
                           f"<td>{contexts_html(p['contexts_b'])}</td></tr>")
            out.append("</tbody></table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_run_report(path: str | Path, run: Any, matchings: Sequence[PairMatching], contexts: FeatureContexts,
                     settings: FunctionalSettings, func: dict | None = None, judged: dict | None = None,
                     model: str = "?") -> Path:
    """Build the sections of one run and write ``path`` atomically.

    Args:
        run: the run (``path``, ``matcher``, ``label``), e.g. :class:`saeot.pipeline.rundir.RunDir`.
        matchings: its :class:`saeot.evaluation.functional.PairMatching` list.
        contexts: the run's :class:`saeot.evaluation.contexts.FeatureContexts`.
        settings: :class:`saeot.evaluation.functional.FunctionalSettings` (report sizes, contexts shown, seed).
        func, judged: the run's ``functional`` / ``judge`` metrics.
        model: the model's name, shown under the title.
    """
    n, window, right = settings.n_contexts, settings.context_window, settings.context_right

    def ctx(hook: str, feature: int) -> list:
        return contexts.get(hook, feature, n, window, right)

    sections = []
    for pi, pm in enumerate(matchings):
        jp = (judged or {}).get("pairs", {}).get(pm.key, {})
        labels = {(it["feature_a"], it["feature_b"]): it["label"] for it in jp.get("items", [])}
        rng = np.random.default_rng(settings.seed + pi)
        m = pm.feature_a.numel()
        pick = set(rng.choice(m, size=min(settings.report_pairs, m), replace=False).tolist()) if m else set()
        index = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(pm.feature_a.tolist(), pm.feature_b.tolist()))}
        pick |= {index[p] for p in labels if p in index}
        chosen = sorted(pick, key=lambda k: (float(pm.distance[k]), k))
        pairs = []
        for k in chosen:
            a, b = int(pm.feature_a[k]), int(pm.feature_b[k])
            pairs.append({"feature_a": a, "feature_b": b, "distance": float(pm.distance[k]),
                          "margin": float(pm.margin[a]), "label": labels.get((a, b)),
                          "contexts_a": ctx(pm.hook_a, a), "contexts_b": ctx(pm.hook_b, b)})
        no_ids = pm.no_match.tolist()
        no_rows = []
        for a in no_ids[: settings.report_no_match]:
            b = int(pm.best_b[a])
            no_rows.append({"feature_a": a, "best_b": b if b >= 0 else "–", "distance": float(pm.best_distance[a]),
                            "contexts_a": ctx(pm.hook_a, a), "contexts_b": ctx(pm.hook_b, b) if b >= 0 else []})
        cov = (func or {}).get("pairs", {}).get(pm.key, {}).get("coverage") or pm.coverage()
        sections.append({"title": f"layer {hook_layer(pm.hook_a)} → layer {hook_layer(pm.hook_b)}  "
                                  f"({pm.hook_a} → {pm.hook_b})",
                         "coverage": cov, "pairs": pairs, "no_match_ids": no_ids, "no_match": no_rows})
    meta = {"run": str(run.path), "matcher": run.matcher, "model": model,
            "contexts shown": f"top {settings.n_contexts} per feature (profile split), "
                              f"{settings.context_window} tokens left, {settings.context_right} right"}
    if func:
        meta["evaluation tokens"] = f"{func.get('n_tokens')} ({func.get('split')} split)"
        meta["clean CE"] = _num(func.get("ce_clean"))
    text = render_report(f"saeot matches: {run.label}", meta, sections, func, judged)
    path = Path(path)
    atomic_write_text(path, text)
    return path


__all__ = ["render_report", "write_run_report", "contexts_html"]
