"""Functional evaluation (and judge, report) of finished ``train.py`` runs read from their
directories: runs that share model, data, SAEs and layers (a matcher sweep) are grouped
and evaluated in one streaming pass; every run dir gets its metrics and report, the
output dir one comparison table. Nothing is retrained: the SAEs come from each run's
``saes.json`` (:class:`saeot.pipeline.rundir.RunDir`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from saeot.evaluation.contexts import FeatureContexts
from saeot.evaluation.functional._coverage import assign_run
from saeot.evaluation.functional._curves import CoverageCurves
from saeot.evaluation.functional._equal_coverage import coverage_rows, plot_equal_coverage, write_coverage_table
from saeot.evaluation.functional._matchings import matchings_from_rows
from saeot.evaluation.functional._pass import evaluate_functional
from saeot.evaluation.functional._settings import FunctionalSettings
from saeot.evaluation.functional._tables import judge_row, table_rows, write_table
from saeot.evaluation.judge import judge_run
from saeot.evaluation.report import write_run_report
from saeot.io import update_json
from saeot.matching.base import MatcherNotApplicable
from saeot.pipeline.config import build
from saeot.pipeline.rundir import RunDir
from saeot.saes import check_sae_widths

if TYPE_CHECKING:
    from saeot.data.types import DataModule
    from saeot.models.language_model import LanguageModel

__all__ = ["EvaluationData", "evaluation_data", "label_runs", "evaluate_runs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationData:
    """The tokens of one streaming pass: a set-up data module built from the run's ``data``
    config, the split to read (``fresh`` unless it fell back), and a note saying why."""

    datamodule: DataModule
    split: str
    note: str | None = None


def evaluation_data(run: RunDir, lm: LanguageModel, settings: FunctionalSettings) -> EvaluationData:
    """The data module for ``settings.split``, built from the run's ``data`` config.

    For ``fresh``: the module is built with ``fresh_contexts`` (default: as many as the
    run's held-out split), i.e. contexts packed from the run's text after its last one.
    Its first contexts must equal those of the module the run itself used (checked
    against a second build without fresh contexts); if they do not, or the text has
    nothing left, the evaluation falls back to ``heldout`` and says so in the note.
    """
    run_dm = run.data_module(lm)
    if settings.split != "fresh":
        return EvaluationData(run_dm, settings.split)
    n0 = run_dm.n_run_contexts
    n = settings.fresh_contexts if settings.fresh_contexts is not None else run_dm.n_contexts("heldout")
    why = None
    if run_dm.max_contexts is None or n0 < run_dm.max_contexts:
        why = f"the run used all of its text ({n0} contexts): nothing left for a fresh split"
    else:
        try:
            dm = run.data_module(lm, fresh_contexts=n)
        except Exception as e:  # e.g. a source that cannot be read twice
            why = f"could not pack more text ({type(e).__name__}: {e})"
        else:
            if dm.n_run_contexts != n0 or not torch.equal(dm.contexts[:n0], run_dm.contexts[:n0]):
                why = "packing the text again did not reproduce the run's contexts (non-deterministic source?)"
            elif "fresh" not in dm.splits or dm.n_contexts("fresh") == 0:
                why = f"the text source holds no context beyond the run's {n0}"
            else:
                return EvaluationData(dm, "fresh", dm.fresh_note)
    log.warning("functional.split=fresh: %s; evaluating on the held-out split instead", why)
    return EvaluationData(run_dm, "heldout", f"fell back to heldout: {why}")


def select_pairs(run: RunDir, pairs: Sequence[tuple[int, int]] | None) -> RunDir:
    """``run`` with only the rows of ``matches.csv`` whose (layer_a, layer_b) is in ``pairs``
    (``functional.pairs``; None: all); ValueError naming the setting if a pair is not the run's."""
    if pairs is None:
        return run
    have = {(int(r["layer_a"]), int(r["layer_b"])) for r in run.rows}
    missing = [list(p) for p in pairs if tuple(p) not in have]
    if missing:
        raise ValueError(f"functional.pairs has {missing}, not a layer pair of {run.path} "
                         f"(its pairs: {sorted(map(list, have))})")
    keep = set(map(tuple, pairs))
    return dataclasses.replace(run, rows=[r for r in run.rows if (int(r["layer_a"]), int(r["layer_b"])) in keep])


def label_runs(runs: Sequence[RunDir]) -> list[RunDir]:
    """Label = matcher name, made unique with the directory name where matchers repeat."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.matcher] = counts.get(r.matcher, 0) + 1
    seen: set[str] = set()
    out = []
    for r in runs:
        label = r.matcher if counts[r.matcher] == 1 else f"{r.matcher} ({r.path.name})"
        while label in seen:
            label += "'"
        seen.add(label)
        out.append(r.relabel(label))
    return out


def evaluate_runs(cfg: DictConfig, run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Functional evaluation (and judge, report) of finished ``train.py`` runs.

    Every run dir gets ``metrics.json["functional"]`` (and ``["judge"]`` when ``judge=`` is
    set) and ``report.html``; ``out_dir`` gets ``functional_table.md`` / ``.csv``, one row
    per run x layer pair. Runs sharing model, data, SAEs and layers are evaluated in one
    streaming pass. With ``functional.coverage`` (default), every run's full one-to-one
    assignment is computed and its equal-coverage curves accumulated in the same pass
    (``metrics.json["functional"]["pairs"][...]["equal_coverage"]``; ``out_dir`` gets
    ``equal_coverage.md`` / ``.csv`` and ``plots/equal_coverage.png``).
    Returns ``{"rows": [...], "judge": [...], "table": <path>, "coverage_rows": [...]}``.
    """
    settings = FunctionalSettings.from_cfg(cfg.get("functional"))
    judge = build(cfg.judge) if cfg.get("judge") is not None else None
    out_dir = Path(out_dir)
    runs = label_runs([select_pairs(RunDir.load(d), settings.pairs) for d in run_dirs])
    groups: dict[str, list[RunDir]] = {}
    for r in runs:
        groups.setdefault(r.setup_key(), []).append(r)
    all_rows: list[dict] = []
    judge_rows: list[dict] = []
    cov_rows: list[dict] = []
    for group in groups.values():
        lead = group[0]
        log.info("evaluating %s (%d run(s) sharing model / data / SAEs)", [r.label for r in group], len(group))
        t0 = time.perf_counter()
        lm = lead.load_model()
        saes = lead.load_saes(next(lm.model.parameters()).device)
        check_sae_widths(saes, lm)
        data = evaluation_data(lead, lm, settings)
        setup_seconds = time.perf_counter() - t0
        matchings = {r.label: matchings_from_rows(r.rows, lead.site, saes) for r in group}
        curves = _coverage_curves(group, matchings, saes, data.datamodule, settings) if settings.coverage else {}
        results = evaluate_functional(lm, saes, data.datamodule, matchings,
                                      dataclasses.replace(settings, split=data.split), consumers=list(curves.values()))
        for label, c in curves.items():
            for key, curve in c.results().items():
                results[label]["pairs"][key]["equal_coverage"] = curve
        for r in group:  # coverage against the features alive in each run's own profiling
            alive = r.alive()
            for pm in matchings[r.label]:
                results[r.label]["pairs"][pm.key]["coverage"] = pm.coverage(alive.get(pm.hook_a))
        for r in group:
            func = results[r.label]
            func.update({"matcher": r.matcher, "label": r.label, "setup_seconds": setup_seconds,
                         "split_note": data.note, "saes": r.sae_records, "n_runs_sharing_pass": len(group)})
            update_json(r.path / "metrics.json", "functional", func)
            contexts = FeatureContexts(r.path, data.datamodule.contexts, lm.codec)
            judged = None
            if judge is not None:
                judged = judge_run(judge, r, matchings[r.label], contexts, progress=settings.progress)
                update_json(r.path / "metrics.json", "judge", judged)
            if settings.report:
                write_run_report(r.path / "report.html", r, matchings[r.label], contexts, settings, func, judged,
                                 model=getattr(lm, "name", "?"))
            all_rows.extend(table_rows(r, func, judged))
            cov_rows.extend(coverage_rows(r.label, str(r.path), func, method=r.matcher))
            if judged is not None:
                judge_rows.append(judge_row(r, judged))
        del lm, saes, data
    table = write_table(all_rows, out_dir, judge_rows)
    log.info("functional table: %s", table)
    if cov_rows:
        log.info("equal coverage: %s, %s", write_coverage_table(cov_rows, out_dir),
                 plot_equal_coverage(cov_rows, out_dir / "plots" / "equal_coverage.png"))
    return {"rows": all_rows, "judge": judge_rows, "table": str(table), "coverage_rows": cov_rows}


def _coverage_curves(group: Sequence[RunDir], matchings: dict, saes: dict, datamodule: DataModule,
                     settings: FunctionalSettings) -> dict[str, CoverageCurves]:
    """run label -> the consumer of its equal-coverage curves (its full assignment computed
    now); a run whose matcher cannot run again on what its directory holds is left out, said."""
    out = {}
    for r in group:
        pairs = [(pm.hook_a, pm.hook_b) for pm in matchings[r.label]]
        try:
            ranked = assign_run(r, saes, datamodule, pairs, settings.coverage_candidates, settings.progress)
        except MatcherNotApplicable as e:
            log.warning("%s: no equal-coverage curves (%s)", r.label, e)
            continue
        out[r.label] = CoverageCurves(ranked, saes, settings.coverage_grid, settings.code_scale, settings.coverage_ce,
                                      settings.coverage_deactivation, settings.bootstrap, settings.bootstrap_seed)
    return out
