"""Kill ``train.py experiment=smoke`` with SIGKILL at many moments, rerun it, compare.

    python tests/pipeline/kill_harness.py --work /tmp/kills [--seed 0]

1. Two clean runs (cold SAE cache, then warm) give the reference outputs and the timeline
   of each phase, read from the run's log lines (``corpus: ...`` -> SAE training and
   caching, ``stage: profiling`` / ``reference space`` / ``matching`` / ``writing outputs``,
   ``wrote``).
2. Chains of kills: a chain starts from a fresh run dir (cold chains also from an empty
   SAE cache); each trial starts ``train.py`` on what the previous one left and kills it
   inside its target phase: when the phase's log line appears, after a seeded fraction of
   that phase's length in the clean run (cold or warm timeline; the phase hit is read
   back from the killed run's log, not assumed). After
   every kill nothing partial may look trusted: no completion marker in the run dir, every
   visible SAE cache entry complete, every visible output file readable. Each chain ends
   with an uninterrupted rerun whose outputs must equal the reference: ``matches.csv``,
   ``feature_stats.csv``, ``flows.csv``, ``features/*.safetensors``,
   ``reference.safetensors`` byte for byte, ``metrics.json``'s numbers without timings.
3. Model conversion (only SmolLM2 converts, from its GGUF): a stand-in build function
   that writes files slowly goes through ``saeot.models.smollm2.build_dir_atomically``
   and is killed at seeded moments of an uninterrupted build's duration; the target is
   absent or complete after each kill, and the rerun build equals the uninterrupted one.
4. A killed sweep (``-m``, two jobs) resumed with ``resume=true`` redoes only the job that
   had not finished.

Runs fork from this process after the heavy imports (one interpreter start in all); each
child runs ``saeot.cli.train_main`` with ``sys.argv`` as ``train.py`` would. The parent never
computes with torch, so forking is safe. Prints a summary and writes ``<work>/summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers, run as a script too
from helpers.metrics import result_numbers  # noqa: E402

from saeot.cli import train_main  # the heavy imports, once, before any fork
from saeot.io import is_complete_dir
from saeot.models import smollm2
from saeot.pipeline.completion import RUN_MARKER

SMOKE = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false", "sae.steps=60"]
#: log line -> the phase that starts there (in this order)
MARKERS = [("corpus:", "SAE training and caching"), ("stage: profiling", "profiling"),
           ("stage: reference space", "reference space"), ("stage: matching", "matching"),
           ("stage: writing outputs", "output writing"), ("wrote ", "finished")]
COMPARED = ["matches.csv", "feature_stats.csv", "flows.csv", "reference.safetensors",
                  "features/blocks.1.hook_resid_post.safetensors", "features/blocks.2.hook_resid_post.safetensors"]


# ---------------------------------------------------------------------------- forked runs
def _fork(target, log: Path) -> tuple[int, float]:
    """Run ``target()`` in a child whose stdout / stderr go to ``log``; (pid, start time)."""
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = target() or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid, t0


def _train(argv: list[str]):
    def run() -> int:
        sys.argv = ["train.py", *argv]
        train_main()
        return 0
    return run


def _wait(pid: int, kill_at: float | None = None, until=None) -> tuple[bool, int]:
    """Wait for ``pid``; SIGKILL it at time ``kill_at`` or when ``until()`` is true.
    Returns (killed, exit status)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False, os.waitstatus_to_exitcode(status)
        if (kill_at is not None and time.time() >= kill_at) or (until is not None and until()):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True, -signal.SIGKILL
        time.sleep(0.005)


def _marker_of(phase: str) -> str | None:
    return dict((p, m) for m, p in MARKERS).get(phase)


def _kill_in_phase(pid: int, t0: float, log: Path, phase: str, delay: float) -> bool:
    """SIGKILL ``pid`` ``delay`` seconds after ``phase`` began (its log line; ``setup``: the start)."""
    marker = _marker_of(phase)
    anchor = [t0 if marker is None else None]

    def due() -> bool:
        if anchor[0] is None and log.exists() and marker in log.read_text(errors="replace"):
            anchor[0] = time.time()
        return anchor[0] is not None and time.time() >= anchor[0] + delay

    killed, _ = _wait(pid, until=due)
    return killed


def _timeline(log: Path, t0: float) -> dict[str, float]:
    """Seconds from the start to each marker's first log line (Hydra's ``[%Y-%m-%d %H:%M:%S,%f]``)."""
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("["):
            continue
        for marker, phase in MARKERS:
            if marker in line and phase not in out:
                stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out[phase] = stamp - t0
    return out


def _phase(log: Path, cold: bool) -> str:
    seen = [phase for marker, phase in MARKERS if marker in log.read_text(errors="replace")]
    if not seen:
        return "setup"
    if seen[-1] == "SAE training and caching" and not cold:
        return "setup"  # SAEs cached: nothing is trained
    return seen[-1]


# ---------------------------------------------------------------------------- checks
def _tensors(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and arrays (NumPy: the parent never runs torch kernels)."""
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _same_file(a: Path, b: Path) -> bool:
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    (ma, ta), (mb, tb) = _tensors(a), _tensors(b)  # the header's key order may differ
    return ma == mb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and ta[k].tobytes() == tb[k].tobytes() for k in ta)


def _same_outputs(a: Path, b: Path) -> list[str]:
    """What differs between two finished run dirs (empty: the same)."""
    diff = [f for f in COMPARED if not _same_file(a / f, b / f)]
    if result_numbers(json.loads((a / "metrics.json").read_text())) != result_numbers(json.loads((b / "metrics.json").read_text())):
        diff.append("metrics.json")
    return diff


def _cache_complete(cache: Path) -> int:
    """Number of SAE cache entries; raise if a visible one is not complete (it would be trusted)."""
    n = 0
    for entry in sorted((cache / "saes").glob("*")) if (cache / "saes").is_dir() else []:
        if entry.name.startswith("."):
            continue  # temporary builds and locks: never read
        if not is_complete_dir(entry, {"sae": entry.name}):
            raise AssertionError(f"visible cache entry {entry} is incomplete")
        n += 1
    return n


def _visible_outputs_readable(run: Path) -> None:
    """Every visible output file of a killed run dir reads back whole (temp files start with '.')."""
    for f in run.rglob("*"):
        rel = f.relative_to(run)
        if not f.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".csv":
            rows = list(csv.reader(f.open()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), f
        elif f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt"):
                pass
        elif f.suffix == ".png":
            assert f.read_bytes()[-8:] == b"IEND\xaeB`\x82", f  # PNG trailer: written whole


# ---------------------------------------------------------------------------- the harness
def _argv(run: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMOKE, f"paths.cache_dir={cache}", f"hydra.run.dir={run}", *extra]


def _clean_run(work: Path, name: str, cache: Path) -> tuple[Path, dict[str, float], float]:
    run = work / name
    pid, t0 = _fork(_train(_argv(run, cache)), work / f"{name}.log")
    killed, code = _wait(pid)
    assert code == 0, (work / f"{name}.log").read_text()[-3000:]
    return run, _timeline(work / f"{name}.log", t0), time.time() - t0


def _windows(tl: dict[str, float], total: float) -> dict[str, tuple[float, float]]:
    """phase -> (start, end) seconds in a clean run's timeline."""
    starts = [("setup", 0.0)] + [(p, tl[p]) for _, p in MARKERS if p in tl]
    out = {}
    for (p, a), (_, b) in zip(starts, starts[1:] + [("end", total)]):
        out[p] = (a, b)
    return out


def kill_chain(work: Path, name: str, cache: Path, targets: list[str], windows: dict, reference: Path,
               rng: random.Random, trials: list[dict]) -> dict:
    """Trials on one run dir, each killed at a seeded moment inside its target phase: the phase's
    start in this run (its log line) plus a uniform fraction of the phase's length in the clean
    run; then a full rerun whose outputs must equal the reference."""
    run = work / name
    for i, target in enumerate(targets):
        n_cached = _cache_complete(cache)
        a, b = windows[target]
        length = (b - a) * (1.0 if target != "SAE training and caching" else (2 - n_cached) / 2)
        delay = rng.uniform(0.1, 0.9) * length
        log = work / f"{name}.{i}.log"
        pid, t0 = _fork(_train(_argv(run, cache)), log)
        killed = _kill_in_phase(pid, t0, log, target, delay)
        phase = _phase(log, n_cached < 2) if killed else "not killed: finished first"
        record = {"chain": name, "target": target, "delay_s": round(delay, 2), "at_s": round(time.time() - t0, 2),
                  "killed": killed, "phase": phase, "cache_entries": _cache_complete(cache),
                  "marker": (run / RUN_MARKER).exists()}
        if record["marker"]:  # killed after the run finished: it must be the reference run
            record["finished_equal"] = not _same_outputs(run, reference)
        elif run.exists():
            _visible_outputs_readable(run)
        trials.append(record)
    log = work / f"{name}.rerun.log"
    pid, _ = _fork(_train(_argv(run, cache)), log)
    _, code = _wait(pid)
    assert code == 0, log.read_text()[-3000:]
    diff = _same_outputs(run, reference)
    return {"chain": name, "equal": not diff, "differs": diff}


def _slow_build(tmp: Path) -> None:
    """Stand-in for the GGUF -> HF conversion: four files written in chunks, slowly."""
    for i in range(4):
        with open(tmp / f"part{i}.bin", "wb") as f:
            for j in range(6):
                f.write(bytes([i * 16 + j]) * 65536)
                f.flush()
                time.sleep(0.02)
    (tmp / "config.json").write_text(json.dumps({"parts": 4}))


def conversion_kills(work: Path, n: int, rng: random.Random) -> dict:
    """Each trial: a fresh target, the build killed at a seeded moment of an uninterrupted
    build's duration, the target checked (absent or complete), the build rerun and compared."""
    source = {"file": "stand-in.gguf", "bytes": 1}
    ref = work / "conv_ref" / "model"

    def build(target: Path):
        return lambda: (smollm2.build_dir_atomically(target, source, _slow_build), 0)[1]

    pid, t0 = _fork(build(ref), work / "conv_ref.log")
    _, code = _wait(pid)
    duration = time.time() - t0
    assert code == 0 and is_complete_dir(ref, source)
    files = sorted(p.name for p in ref.iterdir() if p.name != "saeot_complete.json")
    trials = []
    for i in range(n):
        target = work / f"conv{i}" / "model"
        offset = rng.uniform(0.05, 0.85) * duration
        pid, t0 = _fork(build(target), work / f"conv{i}.log")
        killed, _ = _wait(pid, kill_at=t0 + offset)
        present = target.exists()
        assert not present or is_complete_dir(target, source), "a killed conversion left a target that is not complete"
        leftover = len(list(target.parent.glob(".model.*.tmp")))
        pid, _ = _fork(build(target), work / f"conv{i}.rerun.log")
        _, code = _wait(pid)
        equal = code == 0 and is_complete_dir(target, source) and all(
            (ref / f).read_bytes() == (target / f).read_bytes() for f in files)
        trials.append({"offset_s": round(offset, 3), "killed": killed, "target_present_after_kill": present,
                       "tmp_left_by_kill": leftover, "tmp_after_rerun": len(list(target.parent.glob(".model.*.tmp"))),
                       "rerun_equal": equal})
    return {"kills": sum(t["killed"] for t in trials), "build_seconds": round(duration, 3), "trials": trials,
            "reruns_equal": sum(t["rerun_equal"] for t in trials)}


def sweep_resume(work: Path, cache: Path) -> dict:
    """Kill a two-job sweep as soon as job 0 is finished; resume it with resume=true."""
    sweep = work / "sweep"
    argv = ["-m", *SMOKE, f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep}", "matcher=semantic_ot,sae_match"]
    def job1_under_way() -> bool:  # job 0 finished, job 1 profiling
        logs = list(sweep.glob("1_*/cli.log"))
        return bool(logs) and "stage: profiling" in logs[0].read_text(errors="replace")

    pid, _ = _fork(_train(argv), work / "sweep.log")
    killed, _ = _wait(pid, until=job1_under_way)
    jobs = sorted(d for d in sweep.glob("[0-9]_*") if d.is_dir())
    job0 = jobs[0]
    stamp0 = (job0 / "matches.csv").stat().st_mtime_ns
    unfinished = [d.name for d in jobs if not (d / RUN_MARKER).exists()]
    pid, _ = _fork(_train([*argv, "resume=true"]), work / "sweep.resume.log")
    _, code = _wait(pid)
    text = (work / "sweep.resume.log").read_text()
    jobs = sorted(d for d in sweep.glob("[0-9]_*") if d.is_dir())
    return {"killed": killed, "jobs": [d.name for d in jobs], "unfinished_at_kill": unfinished,
            "resume_exit": code, "skipped": text.count("resume: "),
            "job0_untouched": (job0 / "matches.csv").stat().st_mtime_ns == stamp0,
            "all_complete": len(jobs) == 2 and all((d / RUN_MARKER).exists() for d in jobs)}


def run_harness(work: Path, seed: int = 0, n_conversion: int = 5) -> dict:
    t_start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cold_cache, warm_cache = work / "cache_ref", work / "cache_warm"
    reference, tl_cold, t_cold = _clean_run(work, "clean_cold", cold_cache)
    shutil.copytree(cold_cache, warm_cache)
    warm_ref, tl_warm, t_warm = _clean_run(work, "clean_warm", warm_cache)
    assert not _same_outputs(reference, warm_ref), "a run from the warm cache differs from the cold one"
    w_cold, w_warm = _windows(tl_cold, t_cold), _windows(tl_warm, t_warm)
    trials: list[dict] = []
    chains = []
    # cold chains: an empty SAE cache; kills while the SAEs are trained and cached
    for c in range(3):
        chains.append(kill_chain(work, f"cold{c}", work / f"cache_cold{c}", ["SAE training and caching"] * 2, w_cold,
                                 reference, rng, trials))
    # warm chains: SAEs cached; kills over setup, profiling, reference space, matching, output writing
    warm_targets = ["setup", "profiling", "profiling", "reference space", "matching", "output writing",
                    "output writing", "output writing"]
    for c in range(2):
        targets = warm_targets[:]
        rng.shuffle(targets)
        chains.append(kill_chain(work, f"warm{c}", warm_cache, targets, w_warm, reference, rng, trials))
    conversion = conversion_kills(work, n_conversion, rng)
    sweep = sweep_resume(work, warm_cache)
    killed = [t for t in trials if t["killed"]]
    phases: dict[str, int] = {}
    for t in killed:
        phases[t["phase"]] = phases.get(t["phase"], 0) + 1
    if conversion["kills"]:
        phases["model conversion"] = conversion["kills"]
    return {
        "kills": len(killed) + conversion["kills"], "train_kills": len(killed), "trials": trials,
        "phases_hit": phases, "reruns": len(chains) + n_conversion,
        "reruns_equal": sum(c["equal"] for c in chains) + conversion["reruns_equal"],
        "chains": chains, "conversion": conversion, "sweep_resume": sweep,
        "clean_seconds": {"cold": round(t_cold, 1), "warm": round(t_warm, 1)},
        "timeline_cold": {k: round(v, 2) for k, v in tl_cold.items()},
        "timeline_warm": {k: round(v, 2) for k, v in tl_warm.items()}, "seconds": round(time.time() - t_start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = run_harness(args.work, args.seed)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"kills: {summary['kills']} ({summary['train_kills']} of train.py, {summary['conversion']['kills']} of the "
          f"model conversion); phases hit: {summary['phases_hit']}; reruns equal: {summary['reruns_equal']}/"
          f"{summary['reruns']}; sweep resumed: skipped {summary['sweep_resume']['skipped']} finished job(s), "
          f"all complete: {summary['sweep_resume']['all_complete']}; {summary['seconds']} s")
    print(json.dumps({k: summary[k] for k in ("kills", "phases_hit", "reruns", "reruns_equal")}))


if __name__ == "__main__":
    main()
