"""SIGKILL at 20+ moments over the phases of ``train.py experiment=smoke`` (and of the model
conversion), reruns, a resumed sweep: tests/pipeline/kill_harness.py, run as its own process (it forks
its runs after one import of saeot; see its docstring). Runs in CI (marker ``kill``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kill
def test_killed_runs_never_leave_trusted_partial_outputs_and_reruns_equal_the_clean_run(tmp_path):
    work = tmp_path / "kills"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline" / "kill_harness.py"), "--work", str(work), "--seed", "0"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]  # the harness asserts integrity after every kill
    print(p.stdout.strip().splitlines()[-2])  # the summary line (pytest -s)
    s = json.loads((work / "summary.json").read_text())
    assert s["kills"] >= 20 and s["train_kills"] >= 15, s["phases_hit"]
    assert {"SAE training and caching", "profiling", "output writing", "model conversion"} <= set(s["phases_hit"])
    assert s["reruns_equal"] == s["reruns"] >= 10, s["chains"]
    assert all(t.get("finished_equal", True) for t in s["trials"])  # killed after the end: the finished run
    conv = s["conversion"]
    assert all(not t["target_present_after_kill"] and t["tmp_after_rerun"] == 0 for t in conv["trials"] if t["killed"])
    sweep = s["sweep_resume"]  # a killed sweep resumed with resume=true redoes only the unfinished job
    assert sweep["killed"] and len(sweep["unfinished_at_kill"]) == 1 and sweep["unfinished_at_kill"][0].startswith("1_")
    assert sweep["skipped"] == 1 and sweep["job0_untouched"] and sweep["all_complete"] and sweep["resume_exit"] == 0
    # progress bars in a log file: a few redraws per bar, not one per step
    with open(work / "clean_cold.log", newline="") as f:  # keep the carriage returns
        log = f.read()
    assert 0 < log.count("\r") <= 24, log.count("\r")
