"""``evaluate.py``: dispatch to the synthetic benchmark or to the evaluation of finished runs.

* ``synthetic`` set (``experiment=synthetic_benchmark``): every matcher on every planted
  scenario, see :mod:`saeot.evaluation.benchmark`;
* ``run_dir`` set: functional evaluation of one finished ``train.py`` run, written into
  that run's ``metrics.json`` under ``"functional"`` (and ``report.html``);
* ``run_dirs`` set: the same for several runs (e.g. a matcher sweep) and one comparison table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run_evaluate(cfg: DictConfig, out_dir: str | Path) -> Any:
    out_dir = Path(out_dir)
    if cfg.get("run_dir") or cfg.get("run_dirs"):
        from saeot.evaluation.functional import evaluate_runs

        dirs = _expand([cfg.run_dir] if cfg.get("run_dir") else list(cfg.run_dirs))
        for d in dirs:
            if not (Path(d) / "matches.csv").is_file():
                raise FileNotFoundError(f"run_dir={d} has no matches.csv: point it at a finished train.py run")
        return evaluate_runs(cfg, [Path(d) for d in dirs], out_dir)
    if cfg.get("synthetic"):
        from saeot.evaluation.benchmark import run_benchmark

        return run_benchmark(cfg, out_dir)
    raise ValueError("nothing to evaluate: set run_dir=<train.py run dir>, run_dirs=[...] or experiment=synthetic_benchmark")


def _expand(patterns: list) -> list[str]:
    """Glob patterns (``'run_dirs=[multirun/sweep/*]'``) -> the matching run dirs, sorted; a pattern
    keeps only the directories with a ``matches.csv``; plain paths pass through unchanged."""
    import glob

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
