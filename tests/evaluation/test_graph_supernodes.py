"""``evaluate.py evaluation=supernodes graph=G.json run_dir=DIR``: a graph saeot did not make
(tests/fixtures/circuit_tracer_graph.json, written by hand in circuit-tracer's format, features of
layers 1 and 2 of the smoke SAEs) comes back with ``qParams.supernodes`` filled, valid against
Neuronpedia's schema, every field of the input kept."""

import json
import math
from pathlib import Path

import pytest
from helpers.neuronpedia import schema_errors
from helpers.runs import train_run

from saeot.evaluation.runner import run_evaluate
from saeot.pipeline.rundir import RunDir

GRAPH = Path(__file__).resolve().parents[1] / "fixtures" / "circuit_tracer_graph.json"


def _features(graph: dict) -> list[dict]:
    return [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]


def test_a_hand_written_circuit_tracer_graph_gets_supernodes(tmp_path, compose_cfg):
    run_dir = tmp_path / "run"
    train_run(compose_cfg, run_dir, tmp_path / "cache")

    def evaluate(out, *overrides):
        cfg = compose_cfg("evaluation=supernodes", f"graph={GRAPH}", f"run_dir={run_dir}", "logger=none",
                          f"paths.cache_dir={tmp_path / 'cache'}", *overrides, config_name="evaluate", run_dir=out)
        return run_evaluate(cfg, out)

    raw = json.loads(GRAPH.read_text())
    metrics = evaluate(tmp_path / "ev", "supernodes.compression=2")
    out = json.loads(Path(metrics["output"]).read_text())
    assert schema_errors(out) == []
    # nothing of the input lost: nodes, links, metadata (plus saeot's settings) all as written
    assert out["nodes"] == raw["nodes"] and out["links"] == raw["links"]
    assert {k: v for k, v in out["metadata"].items() if k != "saeot_supernodes"} == raw["metadata"]
    assert out["metadata"]["saeot_supernodes"]["run_dir"] == str(run_dir)
    # the supernodes: a partition of some feature / error nodes, each listed group of 2+
    units = len(_features(raw)) + 2  # + the two error nodes
    assert metrics["n_units_before"] == units
    groups = [s[1:] for s in out["qParams"]["supernodes"]]
    members = [m for g in groups for m in g]
    assert len(members) == len(set(members)) and all(len(g) >= 2 for g in groups)
    feature_ids = {n["node_id"] for n in _features(raw)}
    assert set(members) <= feature_ids  # error nodes stay singletons
    alive = {h: RunDir.load(run_dir).samples(h).alive for h in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")}
    n_dead = sum(not bool(alive[f"blocks.{n['layer']}.hook_resid_post"][int(n["node_id"].split("_")[1])])
                 for n in _features(raw))
    # compression 2: ceil(units / 2) units, unless dead features (their own units) make more
    assert metrics["n_units_after"] == max(math.ceil(units / 2), n_dead + 2 + (len(feature_ids) > n_dead))
    # the same feature at two token positions is one distribution: distance 0, one supernode
    assert bool(alive["blocks.1.hook_resid_post"][5]) or bool(alive["blocks.2.hook_resid_post"][33])
    if bool(alive["blocks.1.hook_resid_post"][5]):
        assert any({"1_5_2", "1_5_3"} <= set(g) for g in groups)
    if bool(alive["blocks.2.hook_resid_post"][33]):
        assert any({"2_33_3", "2_33_1"} <= set(g) for g in groups)
    assert (tmp_path / "ev" / "plots" / "supernodes.png").stat().st_size > 1000
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["supernodes"]["n_units_after"] == metrics["n_units_after"]

    # decoder cosine groups the same nodes by another distance, same count
    cos = evaluate(tmp_path / "ev_cos", "supernodes.compression=2", "supernodes.distance=decoder_cosine")
    assert cos["n_units_after"] == metrics["n_units_after"]
    assert schema_errors(json.loads(Path(cos["output"]).read_text())) == []

    # bad input: one line naming what to fix, before any output is written
    bad = json.loads(GRAPH.read_text())
    bad["nodes"].append({**_features(raw)[0], "node_id": "7_3_1", "layer": "7", "jsNodeId": "7_3-1"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"node '7_3_1' is on blocks\.7\.hook_resid_post, which run_dir=.* did not profile"):
        evaluate(tmp_path / "ev_bad", f"graph={tmp_path / 'bad.json'}")
    wide = json.loads(GRAPH.read_text())
    wide["nodes"].append({**_features(raw)[0], "node_id": "1_4000_1", "jsNodeId": "1_4000-1"})
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    with pytest.raises(ValueError, match="names feature 4000 of blocks.1.hook_resid_post, whose SAE .* has 128 features"):
        evaluate(tmp_path / "ev_wide", f"graph={tmp_path / 'wide.json'}")
    with pytest.raises(ValueError, match="supernodes.linkage='ward'"):
        evaluate(tmp_path / "ev_link", "supernodes.linkage=ward")
    assert not (tmp_path / "ev_bad").exists() or not any((tmp_path / "ev_bad").iterdir())
