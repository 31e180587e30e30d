"""``rematch.py``: a finished ``train.py`` run's features matched again under another matcher.

Profiling is the expensive stage of a run (a pass over millions of tokens at every
layer); the matchers only read what it wrote. ``python rematch.py run_dir=DIR
matcher=feature_flow`` rebuilds what the matcher reads from ``DIR`` (its SAEs, its
feature samples projected by its fitted reference space; for activation correlation,
one pass over the run's held-out split, as the run made it) and writes a new run
directory that ``evaluate.py`` reads like any other:

    .hydra/config.yaml     the source run's config with ``matcher`` replaced
    features/, reference.safetensors, saes.json, feature_stats.csv
                           the source run's files (hard links where the file system allows)
    matches.csv, flows.csv the new matcher's matches and chains
    metrics.json           ``matching`` (as train.py writes it), ``flows``, ``rematched_from``
    .saeot_complete        written last

Runs made this way share the source run's setup key
(:meth:`saeot.pipeline.rundir.RunDir.setup_key`), so ``evaluate.py 'run_dirs=[...]'`` streams
one pass for all of them. A matcher sweep costs one profiling pass instead of one per
matcher: ``python rematch.py -m run_dir=DIR matcher=sae_match,feature_flow,...``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from saeot.io import atomic_path, update_json
from saeot.matching.base import Matcher
from saeot.matching.flows import build_flows, write_flows
from saeot.matching.splits import write_run_splits
from saeot.pipeline.artifacts import write_matches
from saeot.pipeline.completion import clear_complete, mark_complete
from saeot.pipeline.config import build
from saeot.pipeline.resources import StageClock
from saeot.pipeline.rundir import RunDir
from saeot.pipeline.stages import match_pairs

__all__ = ["run_rematch", "COPIED"]

log = logging.getLogger(__name__)

#: what a rematched run takes from its source run as it is
COPIED = ("saes.json", "reference.safetensors", "feature_stats.csv")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def run_rematch(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Match the layer pairs of the run at ``cfg.run_dir`` with ``cfg.matcher``; write a run
    directory at ``out_dir`` (module docstring). Returns its ``metrics.json`` content."""
    t0 = time.perf_counter()
    if not cfg.get("run_dir"):
        raise ValueError("run_dir=null: point run_dir at a finished train.py run (rematch.py run_dir=DIR matcher=NAME)")
    out = Path(out_dir).resolve()
    src = RunDir.load(cfg.run_dir)
    if src.path.resolve() == out:
        raise ValueError(f"run_dir={src.path} is the output directory: set hydra.run.dir to another directory")
    matcher = build(cfg.matcher)
    if not isinstance(matcher, Matcher):
        raise TypeError(f"matcher config builds a {type(matcher).__name__}, not a saeot Matcher")
    pairs = src.pairs
    clear_complete(out)  # a rerun in a finished directory is unfinished until it ends
    datamodule, device = None, "cpu"
    if "correlations" in matcher.requires:  # the held-out pass of the source run, through the model
        lm = src.load_model()
        device = next(lm.model.parameters()).device
        datamodule = src.data_module(lm)
    clock = StageClock()
    with clock.stage("load"):  # the run's SAEs, samples, reference space (and held-out correlations)
        saes = src.load_saes(device)
        ctx = src.match_context(matcher, saes, datamodule, pairs, progress=bool(cfg.get("progress", True)))
    with clock.stage("matching"):
        matches = match_pairs(matcher, ctx, pairs)
    flows = build_flows(matches.results, alive=src.alive())

    run_cfg = src.cfg.copy()
    with open_dict(run_cfg):
        run_cfg.matcher = OmegaConf.create(OmegaConf.to_container(cfg.matcher, resolve=True))
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src.path / name).is_file():
            _link_or_copy(src.path / name, out / name)
    for h in src.hooks:
        _link_or_copy(src.features_path(h), out / "features" / f"{h}.safetensors")
    (out / ".hydra").mkdir(exist_ok=True)
    with atomic_path(out / ".hydra" / "config.yaml") as tmp:
        OmegaConf.save(run_cfg, tmp)
    write_matches(matches.results, out / "matches.csv")
    write_flows(flows, out / "flows.csv")
    splits = write_run_splits(matches.results, src.samples, out)  # samples read only for split hooks
    metrics = {
        "matching": matches.metrics,
        "flows": flows.summary(),
        **({"splits": splits[0]} if splits is not None else {}),  # two SAEs of one hook (sae_b)
        "rematched_from": str(src.path.resolve()),
        "seconds_total": time.perf_counter() - t0,
        "resources": clock.summary(),
    }
    if (out / "metrics.json").is_file():
        (out / "metrics.json").unlink()  # an earlier run's evaluations are not this run's
    for key, value in metrics.items():
        update_json(out / "metrics.json", key, value)
    mark_complete(out, run_cfg)  # last: the run dir is finished
    log.info("rematched %s with %s in %.1f s -> %s", src.path, matcher.name, metrics["seconds_total"], out)
    return metrics

