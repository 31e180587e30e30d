"""``evaluate.py``: the evaluations it runs, chosen by ``evaluation=`` or by the key that is set.

==============  ============================  ==========================================
evaluation      selected by                   what it does
==============  ============================  ==========================================
``run_dir``     ``run_dir=DIR``               functional evaluation (and judge, report) of
                                              one finished ``train.py`` run, written into
                                              its ``metrics.json["functional"]``
``run_dirs``    ``'run_dirs=[a,b]'``          the same for several runs (e.g. a matcher
                                              sweep; glob patterns allowed), one table
``synthetic``   ``experiment=synthetic_       every matcher on every planted scenario
                benchmark`` (``synthetic:``)  (:mod:`saeot.synthetic.benchmark`)
``circuit``     ``evaluation=circuit          a task's circuit on a finished run's SAEs,
                run_dir=DIR circuit=ioi       compressed into supernodes, with the curves
                callbacks=circuit``           (:mod:`saeot.evaluation.circuit_run`)
``supernodes``  ``evaluation=supernodes       a graph made elsewhere (circuit-tracer /
                graph=G.json run_dir=DIR``    Neuronpedia JSON) written back with
                                              ``qParams.supernodes`` filled
                                              (:mod:`saeot.evaluation.graph_run`)
==============  ============================  ==========================================

``evaluation: null`` (the default) picks the one evaluation whose key is set; setting
more than one key needs an explicit ``evaluation=``. A new evaluation is one function
``(cfg, out_dir) -> result`` and one :class:`Evaluation` entry in :data:`EVALUATIONS`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from saeot.evaluation.circuit_run import evaluate_circuit
from saeot.evaluation.dashboard import log_evaluation
from saeot.evaluation.functional import evaluate_runs
from saeot.evaluation.graph_run import evaluate_graph_supernodes
from saeot.evaluation.summary import format_functional_summary, write_summary
from saeot.hooks import SAE_TAG
from saeot.io import read_json
from saeot.pipeline.config import build
from saeot.synthetic.benchmark import run_benchmark

__all__ = ["Evaluation", "EVALUATIONS", "select_evaluation", "run_evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """One thing ``evaluate.py`` can do: ``run(cfg, out_dir)``, selected by the config key ``key``."""

    name: str
    key: str
    run: Callable[[DictConfig, Path], Any]
    doc: str


def _run_dirs(dirs: list) -> list[Path]:
    out = [Path(d) for d in _expand(dirs)]
    for d in out:
        if not (d / "matches.csv").is_file():
            raise FileNotFoundError(f"run_dir={d} has no matches.csv: point it at a finished train.py run")
        records = d / "saes.json"
        if records.is_file() and any(SAE_TAG in key for key in read_json(records)):
            raise ValueError(f"run_dir={d} matches two SAEs of one hook (sae_b): the functional evaluation of "
                             "same-hook pairs is not built yet; that run's outputs are splits.csv, parents.csv and "
                             "plots/splits.png")
    return out


def _evaluate_run_dir(cfg: DictConfig, out_dir: Path) -> Any:
    return _functional(cfg, _run_dirs([cfg.run_dir]), out_dir)


def _evaluate_run_dirs(cfg: DictConfig, out_dir: Path) -> Any:
    return _functional(cfg, _run_dirs(list(cfg.run_dirs)), out_dir)


def _functional(cfg: DictConfig, run_dirs: list[Path], out_dir: Path) -> dict:
    """:func:`evaluate_runs`, then its terminal summary (also ``summary.txt`` in ``out_dir``)."""
    result = evaluate_runs(cfg, run_dirs, out_dir)
    nxt = []
    judge = (cfg.get("judge") or {}).get("_target_")
    if not judge:
        nxt.append("the same with judge=embedding   # + how alike matched features' top contexts read")
    if len(run_dirs) == 1:
        nxt.append(f"python rematch.py -m run_dir={run_dirs[0]} matcher=sae_match,feature_flow,activation_correlation "
                   "hydra.sweep.dir=SWEEP, then python evaluate.py 'run_dirs=[" f"{run_dirs[0]},SWEEP/*]'   # vs the baselines")
    summary = format_functional_summary(result, out_dir, nxt)
    write_summary(summary, out_dir)
    print(summary, flush=True)
    return result


EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (
    Evaluation("run_dir", "run_dir", _evaluate_run_dir, "functional evaluation of one finished train.py run"),
    Evaluation("run_dirs", "run_dirs", _evaluate_run_dirs, "functional evaluation of several runs, one table"),
    Evaluation("synthetic", "synthetic", run_benchmark, "every matcher on the planted synthetic scenarios"),
    Evaluation("circuit", "circuit", evaluate_circuit, "a task's circuit on a finished run's SAEs, with supernodes"),
    Evaluation("supernodes", "graph", evaluate_graph_supernodes,
               "supernodes for a circuit graph made elsewhere (circuit-tracer / Neuronpedia JSON)"),
)}


def select_evaluation(cfg: DictConfig) -> Evaluation:
    """``cfg.evaluation`` if set, else the one evaluation whose key is set in ``cfg``."""
    name = cfg.get("evaluation")
    if name:
        if name not in EVALUATIONS:
            raise ValueError(f"evaluation={name!r}; expected one of {sorted(EVALUATIONS)}")
        ev = EVALUATIONS[name]
        if not cfg.get(ev.key):
            raise ValueError(f"evaluation={name} needs {ev.key}= to be set")
        return ev
    chosen = [e for e in EVALUATIONS.values() if cfg.get(e.key)]
    if not chosen:
        raise ValueError("nothing to evaluate: set run_dir=<train.py run dir>, run_dirs=[...] or "
                         "experiment=synthetic_benchmark")
    if len(chosen) > 1:
        keys = ", ".join(f"{e.key}=" for e in chosen)
        raise ValueError(f"{keys} are all set: choose one with evaluation={'|'.join(e.name for e in chosen)}")
    return chosen[0]


def run_evaluate(cfg: DictConfig, out_dir: str | Path) -> Any:
    """Run the selected evaluation (:func:`select_evaluation`) into ``out_dir``; its tables,
    numbers and plots go to the configured ``logger`` (:mod:`saeot.evaluation.dashboard`)."""
    evaluation = select_evaluation(cfg)
    logger = build(cfg.logger) if cfg.get("logger") else None  # built first: a bad logger setting fails now
    result = evaluation.run(cfg, Path(out_dir))
    log_evaluation(logger, cfg, result, out_dir)
    return result


def _expand(patterns: list) -> list[str]:
    """Glob patterns (``'run_dirs=[multirun/sweep/*]'``) -> the matching run dirs, sorted; a pattern
    keeps only the directories with a ``matches.csv``; plain paths pass through unchanged."""
    out: list[str] = []
    for p in map(str, patterns):
        if glob.has_magic(p) and not Path(p).exists():  # Hydra sweep dirs may contain [ ]
            hits = sorted(d for d in glob.glob(p) if (Path(d) / "matches.csv").is_file())
            if not hits:
                raise FileNotFoundError(f"run_dirs pattern {p!r} matches no train.py run dir (none has matches.csv)")
            out += hits
        else:
            out.append(p)
    return out
