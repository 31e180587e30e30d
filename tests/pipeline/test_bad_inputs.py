"""The bad-input catalogue (docs/bad_inputs.md): each bad input ends the run with exactly one
line ``saeot: error: ...`` naming the setting to fix, exit code 2, and (where the input allows
it) before any forward pass of the model.

The cases run through the command-line entries themselves (``saeot.cli.train_main`` /
``evaluate_main`` read ``sys.argv`` through Hydra, as ``train.py`` / ``evaluate.py`` do, in this
process: no interpreter start per case); the headline offline case also runs as
``python train.py`` in a subprocess.
"""

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

import saeot.hub as hub
import saeot.models as models
from saeot.cli import evaluate_main, rematch_main, train_main
from saeot.data.text import StdlibDocstrings
from saeot.pipeline.completion import RUN_MARKER
from saeot.pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]
HOOK1 = "blocks.1.hook_resid_post"


# ---------------------------------------------------------------------------- the workspace
def _save_sae(path: Path, d_in: int, hook: str | None = None, nan: bool = False) -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=16, metadata=SAEMetadata(hook_name=hook)))
    if nan:
        with torch.no_grad():
            sae.W_enc[0, 3] = float("nan")
    sae.save_model(path)


def _run_cli(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """``main()`` with ``sys.argv = argv``: (exit code, stderr lines)."""
    old = sys.argv
    sys.argv = ["saeot", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Files of the bad inputs, and one finished smoke run (its SAEs cached) that the
    ``evaluate.py`` cases damage copies of."""
    ws = tmp_path_factory.mktemp("bad_inputs")
    texts = ws / "texts"
    texts.mkdir()
    (texts / "empty.txt").write_text("")
    (texts / "empty2.txt").write_text("  \n")
    (texts / "tiny.txt").write_text("hi there")
    (texts / "blob.txt").write_bytes(b"GIF89a\x00\x01\x02" * 50)
    (texts / "latin1.txt").write_bytes("Un café, s'il vous plaît. ".encode("latin-1") * 20)
    good = ws / "good"
    good.mkdir()
    for i, doc in enumerate(StdlibDocstrings(max_docs=40)):
        (good / f"doc{i:02d}.txt").write_text(doc)
    for layer in (1, 2):
        _save_sae(ws / f"wide_{layer}", d_in=48)
        _save_sae(ws / f"pre_{layer}", d_in=64, hook=f"blocks.{layer}.hook_resid_pre")
        _save_sae(ws / f"nan_{layer}", d_in=64, nan=(layer == 1))
    ok = {"clean": "ab", "corrupted": "cb", "correct": "x", "wrong": "y"}
    (ws / "missing.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({"clean": "ab", "corrupted": "cb",
                                                                          "correct": "x"}) + "\n")
    (ws / "long_answer.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "correct": " xy"}) + "\n")
    (ws / "lengths.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "corrupted": "cbb"}) + "\n")
    (ws / "empty_hub").mkdir()

    # one finished run, its SAEs in ws/cache
    run = ws / "run"
    code = train_main_argv(SMOKE + [f"paths.cache_dir={ws / 'cache'}", f"hydra.run.dir={run}"])
    assert code == 0 and (run / RUN_MARKER).is_file()
    corrupt = ws / "cache_corrupt"
    shutil.copytree(ws / "cache", corrupt)
    entry = Path(json.loads((run / "saes.json").read_text())[HOOK1]["path"]).name  # the run's SAE for HOOK1
    weights = corrupt / "saes" / entry / "sae_weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"\xff" * 32  # garbage header, same size: the completion marker still matches
    weights.write_bytes(bytes(raw))

    def damaged(name: str, damage) -> None:
        shutil.copytree(run, ws / name)
        damage(ws / name)

    damaged("run_truncated", lambda d: (d / "features" / f"{HOOK1}.safetensors").write_bytes(
        (d / "features" / f"{HOOK1}.safetensors").read_bytes()[:300]))
    damaged("run_incomplete", lambda d: (d / RUN_MARKER).unlink())
    damaged("run_old", lambda d: (d / "saes.json").unlink())
    damaged("run_format0", lambda d: (d / RUN_MARKER).write_text(json.dumps({"format": 0})))
    damaged("run_columns", lambda d: (d / "matches.csv").write_text(
        (d / "matches.csv").read_text().replace("feature_b", "feat_b", 1)))
    damaged("run_judge", lambda d: None)
    return ws


def train_main_argv(argv: list[str]) -> int:
    old = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        train_main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old


@pytest.fixture
def no_forward(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("forward pass before the bad input was reported")

    monkeypatch.setattr(HookedTransformer, "forward", refuse)


# ---------------------------------------------------------------------------- the catalogue
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {ws}: the workspace; {cache}: its warm SAE cache
    setting: str  # must appear in the error line
    message: str  # a regex the error line matches
    entry: str = "train"
    forward_ok: bool = False  # the input can only show in a forward pass
    before_model: bool = False  # reported before the model is even loaded


def _t(*a: str) -> tuple[str, ...]:
    return (*SMOKE, "paths.cache_dir={cache}", *a)


def _e(run: str, *a: str) -> tuple[str, ...]:
    return (f"run_dir={{ws}}/{run}", "paths.cache_dir={cache}", "functional.progress=false", *a)


CASES = [
    Case("unknown-model", _t("model=gpt2_small", "model.name=gpt9-nonexistent"), "model.name",
         r"is not a model transformer_lens knows"),
    Case("unknown-sae-release", _t("sae=pretrained", "sae.release=no-such-release"), "sae.release",
         r"is not a sae_lens release"),
    Case("unknown-sae-id", _t("sae=pretrained", "sae.release=gpt2-small-res-jb", "sae.sae_id='blocks.{{layer}}.hook_nope'"),
         "sae.sae_id", r"is not in release"),
    Case("hub-offline-model", _t("model=gpt2_small"), "model.name",
         r"cannot be reached \(HF_HUB_OFFLINE=1\)"),
    Case("hub-offline-sae", _t("sae=pretrained", "sae.release=gpt2-small-res-jb", "sae.sae_id='blocks.{{layer}}.hook_resid_pre'"),
         "sae.release", r"cannot be reached \(HF_HUB_OFFLINE=1\)"),
    Case("hub-refused-model", _t("model=gpt2_small"), "model.name", r"cannot be reached \(.*(Connect|refused)"),
    Case("sae-width", _t("sae=from_disk", "sae.path='{ws}/wide_{{layer}}'"), "sae=", r"d_in=48 .* width 64"),
    Case("sae-hook", _t("sae=from_disk", "sae.path='{ws}/pre_{{layer}}'"), "layers.site",
         r"was made for blocks\.1\.hook_resid_pre"),
    Case("sae-nan-weights", _t("sae=from_disk", "sae.path='{ws}/nan_{{layer}}'"), "sae=",
         r"1 non-finite value\(s\) in W_enc \(first at \[0, 3\]\)"),
    Case("layers-out-of-range", _t("layers.ids=[1,9]"), "layers.ids", r"\[9\] out of range .* 4 layers"),
    Case("layers-all-impossible-pair", _t("layers.ids=all", "layers.pairs=[[0,7]]"), "layers.pairs",
         r"has \(0, 7\) but layers.ids=\[0, 1, 2, 3\]"),
    Case("layers-all-one-layer", _t("layers.ids=all", "model.n_layers=1"), "layers.ids=all",
         r"no pair for layers.ids=all \(1 layer"),
    Case("text-empty", _t("data=text_files", "data.text.paths=['{ws}/texts/empty*.txt']"), "data.text.paths",
         r"all 2 file\(s\) are empty"),
    Case("text-tiny", _t("data=text_files", "data.text.paths=['{ws}/texts/tiny.txt']"), "data.context_len",
         r"gave 0 context\(s\) of 64 tokens"),
    Case("text-binary", _t("data=text_files", "data.text.paths=['{ws}/texts/blob.txt']"), "data.text.paths",
         r"blob\.txt is binary \(NUL byte at offset 6\)"),
    Case("text-not-utf8", _t("data=text_files", "data.text.paths=['{ws}/texts/latin1.txt']"), "data.text.encoding",
         r"latin1\.txt is not valid utf-8 \(byte 0xe9 at offset 6\)"),
    Case("hidden-states-nan", _t(), HOOK1, r"non-finite hidden states at blocks\.1\.hook_resid_post, first at "
         r"context (\d+) position 5 \(token id (\d+)", forward_ok=True),
    Case("cache-corrupt-safetensors", (*SMOKE, "paths.cache_dir={ws}/cache_corrupt"), "paths.cache_dir",
         r"the cached SAE .*blocks\.1\.hook_resid_post.* is corrupt"),
    Case("profiling-k-zero", _t("profiling.k=0"), "profiling.k", r"profiling\.k=0 must be a whole number >= 1"),
    Case("profiling-k-text", _t("profiling.k=abc"), "profiling.k", r"profiling\.k='abc' must be a whole number"),
    Case("null-alpha-2", _t("matcher.null_alpha=2"), "matcher.null_alpha", r"must be in \(0, 1\], got 2"),
    Case("null-alpha-text", _t("matcher.null_alpha=abc"), "matcher.null_alpha", r"='abc' must be of type float"),
    Case("sae-match-lap", _t("matcher=sae_match", "matcher.lap=sparse"), "matcher.lap",
         r"matcher\.lap must be one of \['auto', 'dense', 'candidates'\], got 'sparse'"),
    Case("transport-reg-negative", _t("transport=sinkhorn", "transport.reg=-1"), "transport.reg",
         r"transport\.reg=-1: sinkhorn reg must be > 0"),
    Case("reference-dim-too-wide", _t("reference.dim=100"), "reference.dim", r"reference\.dim=100 .* 1\.\.64"),
    Case("trainer-devices-zero", _t("trainer.devices=0"), "trainer.devices",
         r"^saeot: error: trainer\.devices=0 must be a whole number >= 1 or auto \(with trainer\.accelerator=cpu\)$",
         before_model=True),
    Case("circuit-keep-fraction", _t("callbacks=circuit", "circuit=digit_addition", "callbacks.circuit.keep_fraction=2"),
         "callbacks.circuit.keep_fraction", r"keep_fraction=2 must be in \(0, 1\]", before_model=True),
    Case("circuit-n-exact-text", _t("callbacks=circuit", "circuit=digit_addition", "callbacks.circuit.n_exact=abc"),
         "callbacks.circuit.n_exact", r"n_exact='abc' must be of type int", before_model=True),
    Case("sae-steps-text", _t("sae.steps=abc"), "sae.steps", r"sae\.steps='abc' must be of type int", before_model=True),
    Case("sae-unknown-key", _t("+sae.kk=3"), "sae.kk", r"is not a setting of sae=train_local", before_model=True),
    Case("layers-repeats", _t("layers.ids=[1,1]"), "layers.ids", r"layers\.ids=\[1, 1\] has repeats", before_model=True),
    Case("layers-pairs-malformed", _t("layers.pairs=[[1]]"), "layers.pairs", r"use adjacent, all_to_first",
         before_model=True),
    Case("profiling-sampling", _t("profiling.sampling=best"), "profiling.sampling", r"expected one of",
         before_model=True),
    Case("jsonl-missing-key", _t("callbacks=circuit", "circuit=jsonl", "circuit.path={ws}/missing.jsonl"),
         "circuit.path", r"line 2: missing field\(s\) \['wrong'\]"),
    Case("jsonl-answer-not-one-token", _t("callbacks=circuit", "circuit=jsonl", "circuit.path={ws}/long_answer.jsonl"),
         "circuit.path", r"line 2: answer ' xy' is 3 tokens, not 1"),
    Case("jsonl-unequal-lengths", _t("callbacks=circuit", "circuit=jsonl", "circuit.path={ws}/lengths.jsonl"),
         "circuit.path", r"line 2: clean has 3 tokens but corrupted has 4"),
    Case("run-dir-missing", _e("nowhere"), "run_dir", r"has no matches\.csv", entry="evaluate"),
    Case("run-dir-incomplete", _e("run_incomplete"), "run_dir", r"is incomplete \(no \.saeot_complete",
         entry="evaluate"),
    Case("run-dir-older-saeot", _e("run_old"), "saes.json", r"a run made before train\.py recorded its SAEs",
         entry="evaluate"),
    Case("run-dir-older-format", _e("run_format0"), "run_dir", r"run-dir format 0, this saeot reads format 1",
         entry="evaluate"),
    Case("run-dir-truncated-safetensors", _e("run_truncated"), "run_dir",
         r"cannot read .*features/blocks\.1\.hook_resid_post\.safetensors", entry="evaluate"),
    Case("matches-csv-columns", _e("run_columns"), "run_dir", r"has columns \[.*'feat_b'.*\], expected",
         entry="evaluate"),
    Case("rematch-run-dir-null", ("matcher=feature_flow",), "run_dir", r"run_dir=null: point run_dir at a finished",
         entry="rematch"),
    Case("rematch-run-dir-incomplete", ("run_dir={ws}/run_incomplete", "matcher=feature_flow"), "run_dir",
         r"is incomplete \(no \.saeot_complete", entry="rematch"),
    Case("judge-never-answers", _e("run_judge", "judge=openai_compatible", "judge.base_url=http://127.0.0.1:{port}/v1",
                                   "judge.model=m", "judge.timeout_s=1", "judge.n_pairs=2", "judge.n_control=0",
                                   "functional.coverage=false", "functional.report=false"),
         "judge.timeout_s", r"judge\.base_url='http://127\.0\.0\.1:\d+/v1' did not answer within judge\.timeout_s=1 s",
         entry="evaluate", forward_ok=True),
]


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def _nan_at_row1_pos5(real):
    """A model loader whose layer-1 output is NaN at position 5 of the second context of every batch."""
    @functools.wraps(real)
    def load(*a, **k):
        lm = real(*a, **k)

        def poison(x, hook):
            if x.shape[0] > 1:
                x = x.clone()
                x[1, 5] = float("nan")
            return x

        lm.model.add_perma_hook(HOOK1, poison)
        return lm
    return load


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_setting(case, ws, capsys, monkeypatch, request):
    port = 0
    if case.id.startswith("hub-"):
        monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(ws / "empty_hub"))  # nothing cached
    if case.id == "hub-refused-model":  # online, but the hub's port refuses connections (a real refusal)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "model_info", HfApi(endpoint=f"http://127.0.0.1:{_closed_port()}").model_info)
    if case.id == "hidden-states-nan":
        monkeypatch.setattr(models, "load_tiny_random", _nan_at_row1_pos5(models.load_tiny_random))
    if case.id == "judge-never-answers":
        port = request.getfixturevalue("silent_server")
    if not case.forward_ok:
        request.getfixturevalue("no_forward")
    if case.before_model:
        def no_model(*a, **k):
            raise AssertionError("model loaded before the bad input was reported")

        monkeypatch.setattr(models, "load_tiny_random", no_model)
    out = ws / "out" / case.id
    argv = [a.format(ws=ws, cache=ws / "cache", port=port) for a in case.argv] + [f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    main = {"train": train_main, "evaluate": evaluate_main, "rematch": rematch_main}[case.entry]
    code, err = _run_cli(main, argv, capsys)
    seconds = time.perf_counter() - t0
    assert code == 2, err[-20:]
    errors = [line for line in err if line.startswith("saeot: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err[-20:]  # one line, and the last one
    assert case.setting in errors[0] and re.search(case.message, errors[0]), errors[0]
    print(f"\n{case.id}\t{seconds:.1f}s\t{errors[0]}")  # pytest -s shows the catalogue's messages
    assert not (out / "matches.csv").exists() and not (out / RUN_MARKER).exists()
    if case.id.startswith("hub-") or case.id == "judge-never-answers":
        assert seconds < 30, seconds  # fails fast: no retries against an unreachable hub / silent endpoint
    if case.id == "hidden-states-nan":  # the first bad token is the one poisoned, named with its context
        ctx, tok = (int(x) for x in re.search(case.message, errors[0]).groups())
        dm = _smoke_datamodule()
        assert ctx == int(dm.splits["profile"][1]) and tok == int(dm.contexts[ctx, 5])


def _smoke_datamodule():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from saeot.cli import CONF_DIR
    from saeot.pipeline import build

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke"])
    GlobalHydra.instance().clear()
    dm = build(cfg.data, partial=True)(lm=build(cfg.model), hooks=[HOOK1])
    dm.setup()
    return dm


# ---------------------------------------------------------------------------- not errors any more
def test_text_files_run_with_the_smoke_experiment(ws, capsys):
    """``train.py experiment=smoke data=text_files data.text.paths=[...]`` used to die with a raw
    TypeError (the smoke experiment sets data.text.max_docs); it runs, reading at most max_docs files."""
    out = ws / "out" / "text_files_ok"
    code, err = _run_cli(train_main, [*SMOKE, f"paths.cache_dir={ws / 'cache'}", "data=text_files",
                                      f"data.text.paths=['{ws}/good/*.txt']", "data.text.max_docs=30",
                                      "sae.steps=20", f"hydra.run.dir={out}"], capsys)
    assert code == 0, err[-20:]
    assert (out / "matches.csv").is_file() and (out / RUN_MARKER).is_file()


def test_layers_all_is_every_layer_of_the_model(ws, capsys):
    """``layers.ids=all``: every layer of the model (4 in the tiny one), adjacent pairs; the
    finished run reads back with its hooks (``evaluate.py`` works on it)."""
    out = ws / "out" / "layers_all"
    code, err = _run_cli(train_main, [*SMOKE, f"paths.cache_dir={ws / 'cache'}", "layers.ids=all", "sae.steps=10",
                                      f"hydra.run.dir={out}"], capsys)
    assert code == 0, err[-20:]
    pairs = {line.split(",")[0] + "->" + line.split(",")[2]
             for line in (out / "matches.csv").read_text().splitlines()[1:]}
    assert pairs == {"0->1", "1->2", "2->3"}
    assert RunDir.load(out).hooks == tuple(f"blocks.{i}.hook_resid_post" for i in range(4))


def test_truncated_cache_entry_is_rebuilt_not_trusted(ws, capsys, tmp_path):
    """A truncated SAE in the cache differs from the sizes its completion marker records: the
    entry is rebuilt (trained again), never loaded."""
    cache = tmp_path / "cache"
    shutil.copytree(ws / "cache", cache)
    entry = Path(json.loads((ws / "run" / "saes.json").read_text())[HOOK1]["path"]).name  # the run's SAE
    weights = cache / "saes" / entry / "sae_weights.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = _run_cli(train_main, [*SMOKE, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err[-20:]
    assert weights.stat().st_size == size
    assert (tmp_path / "run" / "matches.csv").read_bytes() == (ws / "run" / "matches.csv").read_bytes()


def test_offline_hub_run_fails_fast_from_the_command_line(tmp_path):
    """The issue's case as typed: ``python train.py model=gpt2_small sae=pretrained`` offline
    ended after a minute in an OSError traceback; now one line naming sae.release, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled",
           "SAEOT_CACHE": str(tmp_path / "c")}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=gpt2_small", "sae=pretrained", "logger=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and lines[-1].startswith("saeot: error: sae.release='gpt2-small-res-jb'"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "cannot be reached" in lines[-1]


def test_catalogue_document_lists_every_case():
    """docs/bad_inputs.md has one row per case (its id in backticks), with exit code 2."""
    rows = [line for line in (ROOT / "docs" / "bad_inputs.md").read_text().splitlines() if line.startswith("| `")]
    ids = [re.match(r"\| `([^`]+)`", r).group(1) for r in rows]
    assert sorted(ids) == sorted(c.id for c in CASES)
    assert all(r.rstrip().endswith("| 2 |") for r in rows)
    assert len(CASES) >= 20


@pytest.mark.parametrize("accelerator,devices,ok", [
    ("cpu", 1, True), ("cpu", "2", True), ("cpu", "auto", True), ("cpu", 0, False), ("cpu", -1, False),
    ("cpu", [0], False), ("cpu", True, False), ("gpu", -1, True), ("gpu", [0, 1], True), ("gpu", "0,1", True),
    ("gpu", 0, False), ("gpu", [], False), ("gpu", [0, 0], False), ("auto", "abc", False),
])
def test_trainer_devices_values_lightning_accepts(accelerator, devices, ok):
    """``trainer.devices`` as Lightning reads it for ``trainer.accelerator``; every shipped trainer config passes."""
    from omegaconf import OmegaConf

    from saeot.pipeline.config import ConfigError, check_trainer

    for conf in (ROOT / "conf" / "trainer").glob("*.yaml"):
        check_trainer(OmegaConf.load(conf))
    node = OmegaConf.create({"accelerator": accelerator, "devices": devices})
    if ok:
        check_trainer(node)
    else:
        with pytest.raises(ConfigError, match=r"^trainer\.devices=.* must be a whole number >= 1"):
            check_trainer(node)
