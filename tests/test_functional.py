"""Functional evaluation (layer substitution, co-activation, coverage), the LLM judge and report.html."""

from __future__ import annotations

import html.parser
import json
import math
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omegaconf import OmegaConf

from saeot.evaluation.contexts import Context, FeatureContexts, feature_contexts
from saeot.evaluation.functional import (
    CoactivationAccumulator, FunctionalSettings, evaluate_functional, evaluate_runs, evaluation_data, format_markdown,
    identity_matching, judge_row, one_to_one, pair_matching, run_from_hook, substitute_codes, write_table,
)
from saeot.evaluation.judge import (
    LABELS, Judge, JudgeCache, OpenAICompatibleJudge, build_prompt, judge_run, mean_ci, parse_answer,
)
from saeot.evaluation.report import render_report
from saeot.evaluation.runner import _expand, run_evaluate, select_evaluation
from saeot.pipeline import run_train
from saeot.pipeline.rundir import RunDir

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
QUIET = FunctionalSettings(progress=False, split="heldout")  # evaluate_functional reads an existing split


@pytest.fixture(scope="module")
def dm(tiny_lm, tiny_text):
    from saeot.data.datamodule import HiddenStateDataModule

    d = HiddenStateDataModule(tiny_lm, tiny_text, [H0, H1], context_len=32, max_contexts=16, batch_size=4,
                              heldout_fraction=0.5)
    d.setup()
    return d


@pytest.fixture(scope="module")
def tiny_saes(dm, tmp_path_factory):
    """Small TopK SAEs (48 features, k=6) trained for a second on the profile split of the tiny model."""
    from sae_lens import SAE

    from saeot.saes import LocalTrainedSAEs

    trainer = LocalTrainedSAEs(d_sae=48, k=6, steps=80, batch_size=128, lr=1e-2, progress=False)
    acts = trainer.collect(dm, [H0, H1])
    out = {}
    for h in (H0, H1):
        path = tmp_path_factory.mktemp("sae")
        trainer.train_one(acts[h], h).save_inference_model(path)
        out[h] = SAE.load_from_disk(path).eval().requires_grad_(False)
    return out


# ---------------------------------------------------------------------------- substitution
@pytest.fixture(scope="module")
def results(tiny_lm, tiny_saes, dm):
    """One streaming pass for three "runs": H1 onto itself, H1 onto itself scrambled, H0 onto itself."""
    F = tiny_saes[H1].cfg.d_sae
    perm = torch.roll(torch.arange(F), 7)
    rows = [{"feature_a": i, "feature_b": int(perm[i]), "distance": 1.0, "margin": 1.0, "matched": 1} for i in range(F)]
    runs = {"id1": [identity_matching(H1, F)], "scrambled": [pair_matching(H1, H1, rows, F, F)],
            "id0": [identity_matching(H0, tiny_saes[H0].cfg.d_sae)]}
    return evaluate_functional(tiny_lm, tiny_saes, dm, runs, QUIET)


def test_identity_substitution_is_exactly_the_sae_reconstruction(results, tiny_saes, dm):
    sae = tiny_saes[H1]
    res = results["id1"]
    p = res["pairs"][f"{H1}|{H1}"]
    sub, ref = p["substitution"], p["reference"]
    assert sub["explained_variance"] == ref["sae"]["explained_variance"]
    assert sub["delta_ce"] == ref["sae"]["delta_ce"]
    # the SAE is a real one, the references differ (a random model: CE differences carry no meaning),
    # and the SAE's EV is what a direct computation gives
    assert 0.3 < ref["sae"]["explained_variance"] < 1.0
    assert len({ref[r]["delta_ce"] for r in ("sae", "bias", "mean")}) == 3
    assert ref["mean"]["explained_variance"] == pytest.approx(0.0, abs=1e-9)
    hs, recs = [], []
    for batch in dm.iter_batches("heldout"):
        h = batch["hidden"][H1][batch["mask"]]
        hs.append(h)
        recs.append(sae.decode(sae.encode(h)))
    h, r = torch.cat(hs).double(), torch.cat(recs).double()
    ev = 1 - (h - r).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert sub["explained_variance"] == pytest.approx(float(ev), abs=1e-5)
    assert res["n_tokens"] == h.shape[0]


def test_a_scrambled_matching_substitutes_worse_than_the_identity(results):
    key = f"{H1}|{H1}"
    ev_id = results["id1"]["pairs"][key]["substitution"]["explained_variance"]
    sc = results["scrambled"]["pairs"][key]
    assert sc["substitution"]["explained_variance"] < ev_id - 0.2
    assert sc["coactivation"]["corr"] < 0.5
    assert sc["reference"] == results["id1"]["pairs"][key]["reference"]  # shared references


def test_identity_coactivation_is_perfect(results):
    p = results["id0"]["pairs"][f"{H0}|{H0}"]
    co = p["coactivation"]
    assert co["n_precision_defined"] > 10 and co["n_corr_defined"] > 10
    assert co["precision"] == pytest.approx(1.0) and co["recall"] == pytest.approx(1.0)
    assert co["corr"] == pytest.approx(1.0, abs=1e-9)
    assert co["micro_precision"] == pytest.approx(1.0)
    assert p["chance"]["corr"] < 0.5


def test_coactivation_streams_like_a_batch_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(300, 5, generator=g))
    y = torch.relu(x + 0.7 * torch.randn(300, 5, generator=g))
    acc = CoactivationAccumulator(5)
    acc.update(x[:120], y[:120])
    acc.update(x[120:], y[120:])
    pp = acc.per_pair()
    for m in range(5):
        fa, fb = x[:, m] > 0, y[:, m] > 0
        assert float(pp["precision"][m]) == pytest.approx(float((fa & fb).sum() / fa.sum()))
        assert float(pp["recall"][m]) == pytest.approx(float((fa & fb).sum() / fb.sum()))
        assert float(pp["corr"][m]) == pytest.approx(np.corrcoef(x[:, m], y[:, m])[0, 1], abs=1e-9)


def test_run_from_hook_reproduces_the_clean_forward(tiny_lm, dm):
    tokens = dm.contexts[:2]
    model = tiny_lm.model
    logits, cache = model.run_with_cache(tokens, names_filter=[H1, "blocks.1.hook_mlp_out"])
    torch.testing.assert_close(run_from_hook(model, H1, cache[H1], tokens), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_from_hook(model, "blocks.1.hook_mlp_out", cache["blocks.1.hook_mlp_out"], tokens),
                               logits, atol=1e-5, rtol=1e-5)
    changed = run_from_hook(model, H1, torch.zeros_like(cache[H1]), tokens)
    assert not torch.allclose(changed, logits, atol=1e-3)


def test_one_to_one_keeps_the_closest_a_per_b():
    fa = torch.tensor([0, 1, 2, 3, 4])
    fb = torch.tensor([7, 7, 3, 7, 3])
    d = torch.tensor([0.5, 0.2, 0.9, 0.2, 0.1])
    a, b = one_to_one(fa, fb, d)
    assert a.tolist() == [1, 4] and b.tolist() == [7, 3]  # tie 0.2 between A1 and A3 -> lowest index


def test_pair_matching_coverage_and_no_match():
    rows = [{"feature_a": i, "feature_b": fb, "distance": d, "margin": 0.1, "matched": m}
            for i, (fb, d, m) in enumerate([(0, 0.1, 1), (0, 0.3, 1), (2, 0.2, 1), (1, 9.0, 0), (-1, math.inf, 0)])]
    pm = pair_matching(H0, H1, rows, 5, 4)
    cov = pm.coverage(alive_a=torch.tensor([True, True, True, False, True]))
    assert cov["frac_a_matched"] == pytest.approx(3 / 5) and cov["frac_no_match"] == pytest.approx(2 / 5)
    assert cov["frac_b_covered"] == pytest.approx(2 / 4)
    assert cov["n_one_to_one"] == 2 and cov["n_dropped_many_to_one"] == 1
    assert cov["frac_alive_a_matched"] == pytest.approx(3 / 4)
    assert pm.no_match.tolist() == [3, 4]
    codes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert substitute_codes(codes, pm.oto_a, pm.oto_b, torch.ones(2), 4).tolist() == [[1.0, 0.0, 3.0, 0.0]]


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="functional.bogus"):
        FunctionalSettings.from_cfg({"bogus": 1})
    with pytest.raises(ValueError, match="code_scale"):
        FunctionalSettings(code_scale="sideways")


# ---------------------------------------------------------------------------- end to end on run dirs
def _train_run(compose_cfg, run_dir: Path, cache_dir: Path, matcher: str) -> None:
    """A finished ``train.py experiment=smoke`` run in ``run_dir`` (with its ``.hydra/config.yaml``)."""
    cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache_dir}", f"matcher={matcher}",
                      "data.max_contexts=16", run_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run_train(cfg, run_dir)


def _no_sae_training(monkeypatch) -> list:
    """Make every way of training or provisioning an SAE raise; return the records that
    ``RunDir.load_saes`` loads (the only way left)."""
    import saeot.pipeline.rundir as rundir
    import saeot.saes.providers as providers
    import saeot.saes.training as training
    from saeot.saes import DiskSAEs, LocalTrainedSAEs, PretrainedSAEs

    def refuse(*a, **k):
        raise AssertionError("the evaluation trained or provisioned an SAE")

    for cls in (LocalTrainedSAEs, DiskSAEs, PretrainedSAEs):
        monkeypatch.setattr(cls, "load", refuse)
    monkeypatch.setattr(training, "train_sae", refuse)  # the one training path on sae_lens
    monkeypatch.setattr(providers, "train_sae", refuse)
    loaded: list = []
    real = rundir.load_recorded

    def recording(record, device):
        loaded.append(record)
        return real(record, device)

    monkeypatch.setattr(rundir, "load_recorded", recording)
    return loaded


def test_evaluate_runs_writes_metrics_table_and_report_without_training(tmp_path, compose_cfg, monkeypatch):
    cache = tmp_path / "cache"
    dirs = [tmp_path / "sm", tmp_path / "copy"]
    _train_run(compose_cfg, dirs[0], cache, "sae_match")
    shutil.copytree(dirs[0], dirs[1])  # a second run sharing everything: one streaming pass for both
    records = json.loads((dirs[0] / "saes.json").read_text())
    loaded = _no_sae_training(monkeypatch)
    cfg = compose_cfg(f"paths.cache_dir={cache}", "functional.progress=false", config_name="evaluate",
                      run_dir=tmp_path / "eval")
    out = evaluate_runs(cfg, dirs, tmp_path / "eval")
    assert len(loaded) == 2 and sorted(map(json.dumps, loaded)) == sorted(map(json.dumps, records.values()))
    assert [r["matcher"] for r in out["rows"]] == ["sae_match (sm)", "sae_match (copy)"]
    k = "blocks.1.hook_resid_post|blocks.2.hook_resid_post"
    funcs = []
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["matching"]["matcher"] == "sae_match"  # the train metrics survive
        f = metrics["functional"]
        assert f["saes"] == records and f["n_runs_sharing_pass"] == 2
        assert f["split"] == "fresh" and f["n_tokens"] > 0, f["split_note"]
        p = f["pairs"][k]
        assert 0 < p["reference"]["sae"]["explained_variance"] <= 1
        assert p["substitution"]["explained_variance"] < p["reference"]["sae"]["explained_variance"]
        assert p["coverage"]["frac_a_matched"] + p["coverage"]["frac_no_match"] == pytest.approx(1.0)
        assert p["coverage"]["n_dropped_many_to_one"] == 0  # sae_match is one-to-one
        assert (d / "report.html").stat().st_size > 1000
        funcs.append(p)
    assert funcs[0]["substitution"] == funcs[1]["substitution"] and funcs[0]["reference"] == funcs[1]["reference"]
    md = (tmp_path / "eval" / "functional_table.md").read_text()
    assert md.count("| 1→2 |") == 2 and "EV sub" in md
    assert len((tmp_path / "eval" / "functional_table.csv").read_text().strip().splitlines()) == 3
    run = RunDir.load(dirs[0])  # the rest of what the run wrote reads back as it was written
    assert run.matcher == "sae_match" and run.hooks == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    samples = run.samples(run.hooks[0])
    assert samples.n_features == run.load_saes()[run.hooks[0]].cfg.d_sae
    assert torch.equal(run.alive()[run.hooks[0]], samples.n_fire > 0)
    assert run.reference().dim is not None


def test_a_run_dir_without_saes_json_is_refused_with_the_fix(tmp_path, compose_cfg):
    old = tmp_path / "old_run"
    (old / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_cfg("experiment=smoke", "logger=none"), old / ".hydra" / "config.yaml")
    (old / "matches.csv").write_text("layer_a,feature_a,layer_b,feature_b,distance,margin,matched\n")
    with pytest.raises(FileNotFoundError, match=r"saes\.json is missing.*rerun train\.py"):
        RunDir.load(old)
    cfg = compose_cfg(f"run_dir={old}", "functional.progress=false", config_name="evaluate", run_dir=tmp_path / "e")
    with pytest.raises(FileNotFoundError, match=r"saes\.json"):
        run_evaluate(cfg, tmp_path / "e")


def test_evaluate_py_chooses_one_evaluation():
    def cfg(**kw):
        return OmegaConf.create({"evaluation": None, "run_dir": None, "run_dirs": None, "synthetic": None, **kw})

    assert select_evaluation(cfg(run_dir="a")).name == "run_dir"
    assert select_evaluation(cfg(run_dirs=["a", "b"])).name == "run_dirs"
    assert select_evaluation(cfg(synthetic={"seed": 0})).name == "synthetic"
    assert select_evaluation(cfg(run_dir="a", synthetic={"seed": 0}, evaluation="synthetic")).name == "synthetic"
    with pytest.raises(ValueError, match="nothing to evaluate"):
        select_evaluation(cfg())
    with pytest.raises(ValueError, match="choose one with evaluation="):
        select_evaluation(cfg(run_dir="a", synthetic={"seed": 0}))
    with pytest.raises(ValueError, match="evaluation='bogus'"):
        select_evaluation(cfg(run_dir="a", evaluation="bogus"))
    with pytest.raises(ValueError, match="needs run_dirs="):
        select_evaluation(cfg(run_dir="a", evaluation="run_dirs"))


# ---------------------------------------------------------------------------- judge
def _ctx(token: str, left: str = "the ", right: str = " end", act: float = 1.0) -> Context:
    return Context(left=left, token=token, right=right, activation=act)


def test_prompt_shows_both_features_with_marked_tokens():
    msgs = build_prompt([_ctx("cat"), _ctx("dog")], [_ctx("kitten")], "layer 3 #1", "layer 4 #9")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "the <<cat>> end" in user and "the <<dog>> end" in user and "the <<kitten>> end" in user
    assert user.index("<<cat>>") < user.index("Feature B") < user.index("<<kitten>>")
    assert "layer 3 #1" in user and "layer 4 #9" in user
    assert all(w in user for w in LABELS)


def test_feature_contexts_highlight_the_firing_token():
    from saeot.models import ByteCodec

    codec = ByteCodec()
    ctx = torch.tensor([[256] + codec.encode("hello world\nand more"), [256] + codec.encode("x" * 20)])
    loc = torch.tensor([[0, 7], [1, 3], [0, 7], [-1, -1]])
    acts = torch.tensor([2.0, 5.0, 2.0, 0.0])
    out = feature_contexts(loc, acts, ctx, codec, n=5, window=6, right=3, skip_ids=[256])
    assert len(out) == 2  # duplicates and padding dropped
    assert out[0].activation == 5.0 and out[0].token == "x"
    assert out[1].token == "w" and out[1].left == "hello " and out[1].right == "orl"
    assert out[1].marked() == "hello <<w>>orl"


@pytest.mark.parametrize("text,label", [
    ("same", "same"), ("Same.", "same"), ("  **Maybe**", "maybe"), ("DIFFERENT", "different"),
    ("They are not the same.", "different"), ("not the same concept, different", "different"),
    ("Answer: different", "different"), ("Final answer: **same**", "same"),
    ("<think>same? maybe</think>Different", "different"), ("3", "same"), ("2", "maybe"), ("(1)", "different"),
    ("I'd say they're related", "maybe"), ("Maybe; they look different to me", "maybe"),
    ("Yes", "same"), ("No.", "different"), ("The two features are the same", "same"),
    ("banana", None), ("", None), (None, None),
])
def test_parse_answer(text, label):
    assert parse_answer(text) == label


class _CountingJudge(Judge):
    name = "counting"

    def __init__(self, answer: str = "Same!", **kw):
        super().__init__(**kw)
        self.answer = answer

    def identity(self) -> dict:
        return {"backend": self.name, "answer": self.answer}

    def complete(self, messages):
        return self.answer, None


def test_judge_cache_second_call_does_not_call_the_model(tmp_path):
    j = _CountingJudge(cache_dir=str(tmp_path))
    a, b = [_ctx("cat")], [_ctx("kitten")]
    first = j.judge_pair(a, b)
    assert (first.label, first.score, first.cached) == ("same", 3.0, False) and j.n_calls == 1
    second = j.judge_pair(a, b)
    assert (second.label, second.score, second.cached) == ("same", 3.0, True) and j.n_calls == 1
    j.judge_pair(a, [_ctx("dog")])
    assert j.n_calls == 2
    fresh = _CountingJudge(cache_dir=str(tmp_path))  # another process, same cache dir
    assert fresh.judge_pair(a, b).cached and fresh.n_calls == 0
    other = _CountingJudge(answer="different", cache_dir=str(tmp_path))  # another backend: its own entries
    assert other.judge_pair(a, b).label == "different" and other.n_calls == 1
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 3 and not list(tmp_path.rglob("*.tmp"))
    key = JudgeCache.key(j.identity(), build_prompt(a, b))
    (tmp_path / key[:2] / f"{key}.json").write_text("{corrupt")  # never trusted: recomputed
    assert not j.judge_pair(a, b).cached and j.n_calls == 3


def test_mean_ci():
    r = mean_ci([3, 3, 2, 1, 3, 2, 3, 3, float("nan")], seed=1)
    assert r["n"] == 8 and r["n_invalid"] == 1
    assert r["mean"] == pytest.approx(2.5)
    assert r["ci"][0] < 2.5 < r["ci"][1] and r["ci_t"][0] < r["ci"][0] + 0.5
    assert mean_ci([2, 2, 2])["ci"] == [2.0, 2.0]
    assert math.isnan(mean_ci([])["mean"])


def test_openai_compatible_judge_over_http(tmp_path, monkeypatch):
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["path"] = self.path
            seen["auth"] = self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Maybe."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_JUDGE_URL", f"http://127.0.0.1:{server.server_port}/v1/")
        monkeypatch.setenv("TEST_JUDGE_MODEL", "tiny-judge")
        monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
        j = OpenAICompatibleJudge(base_url_env="TEST_JUDGE_URL", model_env="TEST_JUDGE_MODEL",
                                  api_key_env="TEST_JUDGE_KEY", cache_dir=str(tmp_path))
        jd = j.judge_pair([_ctx("cat")], [_ctx("kitten")])
    finally:
        server.shutdown()
    assert (jd.label, jd.score) == ("maybe", 2.0)
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer sk-test"
    assert seen["body"]["model"] == "tiny-judge" and seen["body"]["messages"][1]["content"].count("<<") == 2
    assert "sk-test" not in "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    monkeypatch.delenv("TEST_JUDGE_URL")
    with pytest.raises(ValueError, match="TEST_JUDGE_URL"):
        OpenAICompatibleJudge(base_url_env="TEST_JUDGE_URL", model_env="TEST_JUDGE_MODEL")


def _fake_run(tmp_path: Path, codec, texts_a: list[str], texts_b: list[str]):
    """A run dir with features/<hook>.safetensors over contexts built from ``texts`` (token 3 of each fires)."""
    from safetensors.torch import save_file

    T = 16
    rows = []
    for t in texts_a + texts_b:
        ids = codec.encode(t)[:T]
        rows.append(ids + [ids[-1]] * (T - len(ids)))
    contexts = torch.tensor(rows)
    n = len(texts_a)
    (tmp_path / "features").mkdir(parents=True, exist_ok=True)
    for hook, offset in ((H0, 0), (H1, n)):
        F, K = n, 2
        loc = torch.full((F, K, 2), -1, dtype=torch.long)
        for f in range(F):
            loc[f, 0] = torch.tensor([offset + f, 3])
        save_file({"locations": loc, "activations": torch.ones(F, K), "n_fire": torch.ones(F)},
                  str(tmp_path / "features" / f"{hook}.safetensors"))
    rows_m = [{"feature_a": i, "feature_b": i, "distance": 0.1, "margin": 1.0, "matched": 1} for i in range(n)]
    pm = pair_matching(H0, H1, rows_m, n, n)
    run = SimpleNamespace(path=tmp_path, label="fake", matcher="fake")
    return run, [pm], FeatureContexts(tmp_path, contexts, codec)


def test_judge_run_summarises_scores_with_control(tmp_path):
    from saeot.models import ByteCodec

    run, pms, contexts = _fake_run(tmp_path / "run", ByteCodec(), ["the cat sat on the mat"] * 6, ["a dog ran far"] * 6)
    j = _CountingJudge(answer="different", n_pairs=4, n_control=3, cache_dir=str(tmp_path / "c"))
    out = judge_run(j, run, pms, contexts)
    p = out["pairs"][pms[0].key]
    assert p["n"] == 4 and p["mean"] == 1.0 and p["counts"]["different"] == 4
    assert p["control"]["n"] == 3 and len(p["items"]) == 4
    assert out["overall"]["n"] == 4


@pytest.mark.slow
def test_local_hf_judge_on_offline_smollm2(tmp_path):
    from saeot.evaluation.judge import LocalHFJudge
    from saeot.models import HFCodec, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))

    judge = LocalHFJudge(n_pairs=3, n_control=2, cache_dir=str(tmp_path / "judge"))
    judge._load()
    codec = HFCodec(judge._tok)
    texts_a = ["The capital of France is Paris, a city", "import os\nimport sys\nimport json",
               "She walked to the store and bought milk"]
    texts_b = ["The capital of Italy is Rome, a city", "from math import sqrt, pi, e",
               "He drove to the market and sold fish"]
    run, pms, contexts = _fake_run(tmp_path / "run", codec, texts_a, texts_b)
    out = judge_run(judge, run, pms, contexts)
    p = out["pairs"][pms[0].key]
    items = p["items"] + p["control_items"]
    assert len(p["items"]) == 3 and len(p["control_items"]) == 2
    for it in items:
        assert it["label"] in LABELS and it["score"] in (1.0, 2.0, 3.0)
        assert sum(it["probs"].values()) == pytest.approx(1.0, abs=1e-6)
    assert 1.0 <= p["mean"] <= 3.0 and p["n_invalid"] == 0
    calls = judge.n_calls
    again = judge_run(judge, run, pms, contexts)  # every judgement now comes from the cache
    assert judge.n_calls == calls and again["n_model_calls"] == 0
    assert [i["label"] for i in again["pairs"][pms[0].key]["items"]] == [i["label"] for i in p["items"]]


# ---------------------------------------------------------------------------- report
class _Structure(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.classes: dict[str, int] = {}
        self.text = []
        self.external = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        for k in ("src", "href"):
            if a.get(k):
                self.external.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def _report_html() -> str:
    nasty = Context(left="if a < b && c > d: <script>alert(1)</script> ", token="</td>", right=" \"q\" 'x'",
                    activation=3.5)
    pairs = [{"feature_a": i, "feature_b": i + 1, "distance": 0.1 * i, "margin": 0.05, "label": lab,
              "contexts_a": [nasty, _ctx("cat")], "contexts_b": [_ctx("kitten", act=2.0)]}
             for i, lab in enumerate(["same", "maybe", None])]
    sections = [{"title": "layer 3 → layer 4", "coverage": {"frac_a_matched": 0.5}, "pairs": pairs,
                 "no_match_ids": [7, 8, 9], "no_match": [{"feature_a": 7, "best_b": 2, "distance": math.inf,
                                                          "contexts_a": [_ctx("x")], "contexts_b": []}]},
                {"title": "layer 3 → layer 7", "coverage": {}, "pairs": [], "no_match_ids": [], "no_match": []}]
    return render_report("report <of> run", {"run": "/tmp/a&b"}, sections)


def test_report_is_escaped_and_structured():
    text = _report_html()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;/td&gt;" in text
    p = _Structure()
    p.feed(text)
    assert p.external == []  # self-contained
    assert p.tags["section"] == 2 and p.tags["style"] == 1 and p.tags.get("script", 0) == 0
    assert p.classes["matches"] == 1 and p.classes["nomatch"] == 1
    assert p.tags["mark"] == 3 * 3 + 1  # every context of every shown pair and of the no-match row
    assert p.classes["lab-same"] == 1 and p.classes["lab-maybe"] == 1
    assert "report <of> run" in "".join(p.text)  # escaped, then decoded back to the same text


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
                    reason="no chromium: structure is checked by test_report_is_escaped_and_structured")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(_report_html())
    png = tmp_path / "shot.png"
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", f"--screenshot={png}",
                    page.as_uri()], capture_output=True, timeout=120, check=False)
    assert png.is_file() and png.stat().st_size > 1000
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.std() > 5  # not a uniform page
    assert (img < 100).mean() > 0.001  # some dark text was drawn


def test_markdown_table_has_one_row_per_run_and_pair():
    row = {"matcher": "m", "layer_a": 3, "layer_b": 4, "ev_sub": 0.5, "dce_sub": 0.1, "judge_n": 0}
    md = format_markdown([row, {**row, "matcher": "n", "layer_b": 7}])
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert len(lines) == 3 and "| m | 3→4 | 0.500 | 0.100 |" in lines[1] and "judge" not in lines[0]



def test_judge_table_is_appended_with_its_control(tmp_path):
    j = _CountingJudge(answer="maybe", n_pairs=3, n_control=2, cache_dir=str(tmp_path / "c"))
    from saeot.models import ByteCodec

    run, pms, contexts = _fake_run(tmp_path / "run", ByteCodec(), ["the cat sat on the mat"] * 4, ["a dog ran far"] * 4)
    row = judge_row(run, judge_run(j, run, pms, contexts))
    md = write_table([], tmp_path / "out", [row]).read_text()
    assert "| fake | counting | 3 | 2.00 | [2.00, 2.00] | 0 / 3 / 0 | 2.00 [2.00, 2.00] (n=2) |" in md
    assert (tmp_path / "out" / "judge_table.csv").read_text().startswith("matcher,")


def test_run_dirs_accept_glob_patterns(tmp_path):
    for name in ("0_m=a,l=[3,4]", "1_m=b", "2_unfinished"):
        (tmp_path / name).mkdir()
    for name in ("0_m=a,l=[3,4]", "1_m=b"):
        (tmp_path / name / "matches.csv").write_text("x\n")
    literal = str(tmp_path / "0_m=a,l=[3,4]")
    assert _expand([f"{tmp_path}/*"]) == [literal, str(tmp_path / "1_m=b")]
    assert _expand([literal]) == [literal]  # brackets of a real path are not a pattern
    with pytest.raises(FileNotFoundError, match="matches no"):
        _expand([f"{tmp_path}/nothing*"])


def _data_run(tmp_path: Path, max_contexts) -> RunDir:
    """A RunDir whose config holds only what the data module needs (layers, data)."""
    data = {"_target_": "saeot.data.datamodule.HiddenStateDataModule",
            "text": {"_target_": "saeot.data.text.StdlibDocstrings", "max_docs": 60},
            "context_len": 32, "max_contexts": max_contexts, "heldout_fraction": 0.25, "batch_size": 4}
    cfg = OmegaConf.create({"data": data, "layers": {"ids": [0, 1], "site": "resid_post", "pairs": "adjacent"}})
    return RunDir(path=tmp_path, cfg=cfg, matcher="m", rows=[], sae_records={}, label="m")


def test_fresh_split_is_text_after_the_runs_contexts(tiny_lm, tmp_path):
    run = _data_run(tmp_path, 12)
    own = run.data_module(tiny_lm)  # the data module the run itself used
    before = own.contexts.clone()
    data = evaluation_data(run, tiny_lm, FunctionalSettings(fresh_contexts=5))
    dm = data.datamodule
    assert data.split == "fresh" and data.note == "5 contexts packed after the run's 12"
    assert torch.equal(dm.contexts[:12], before) and dm.splits["fresh"].tolist() == list(range(12, 17))
    assert not any(torch.equal(dm.contexts[i], before[j]) for i in range(12, 17) for j in range(12))
    assert sum(int(b["mask"].sum()) for b in dm.iter_batches("fresh", hidden=False)) == 5 * 31
    assert dm.fingerprint() == own.fingerprint()  # the run's SAE cache keys are unchanged
    for split in ("profile", "heldout"):
        assert torch.equal(dm.splits[split], own.splits[split])
    assert evaluation_data(run, tiny_lm, FunctionalSettings()).datamodule.n_contexts("fresh") == 3  # = heldout
    all_text = evaluation_data(_data_run(tmp_path, None), tiny_lm, FunctionalSettings(fresh_contexts=5))
    assert all_text.split == "heldout" and "all of its text" in all_text.note
    assert "fresh" not in all_text.datamodule.splits
