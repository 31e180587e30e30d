"""Chains of matched features through many layers, with births, deaths and merges."""

import csv

import torch

from saeot.matching.flows import FLOW_COLUMNS, build_flows, write_flows
from saeot.types import MatchResult

H = [f"blocks.{i}.hook_resid_post" for i in range(3)]


def _result(a, b, feature_b, matched, distance):
    return MatchResult(hook_a=H[a], hook_b=H[b], matcher="t", feature_b=torch.tensor(feature_b),
                       distance=torch.tensor(distance, dtype=torch.float64),
                       margin=torch.zeros(len(feature_b), dtype=torch.float64), matched=torch.tensor(matched),
                       null_threshold=1.0, extras={})


def _planted():
    r01 = _result(0, 1, [0, 1, 1, 3], [True, True, True, False], [0.1, 0.2, 0.5, 2.0])  # 2 merges into 1, 3 dies
    r12 = _result(1, 2, [2, 0, 3, 1], [True, True, False, True], [0.1, 0.3, 2.0, 0.2])  # 1:2 born and dies
    alive = {h: torch.ones(4, dtype=torch.bool) for h in H}
    return [r01, r12], alive


def test_chains_follow_matches_and_the_closest_edge_wins_a_merge():
    results, alive = _planted()
    flows = build_flows(results, alive)
    got = {tuple(c.nodes): c.end for c in flows.chains}
    assert got == {
        ((0, 0), (1, 0), (2, 2)): "last_layer",
        ((0, 1), (1, 1), (2, 0)): "last_layer",
        ((0, 2),): "merges",
        ((0, 3),): "dies",
        ((1, 2),): "dies",
        ((1, 3), (2, 1)): "last_layer",
    }
    nodes = [n for c in flows.chains for n in c.nodes]
    assert len(nodes) == len(set(nodes))  # every node in one chain
    assert flows.layers[0] == {"alive": 4, "born": 0, "dies": 1, "continues": 3}
    assert flows.layers[1] == {"alive": 4, "born": 2, "dies": 1, "continues": 3}
    assert flows.layers[2]["born"] == 1  # 2:3 is reached by no feature of layer 1
    assert flows.summary()["max_length"] == 3


def test_pairs_that_skip_a_layer_are_not_chained():
    results, alive = _planted()
    skip = _result(0, 2, [0, 1, 2, 3], [True] * 4, [0.1] * 4)
    flows = build_flows(results + [skip], alive)
    assert max(c.length for c in flows.chains) == 3 and len(flows.chains) == 6


def test_flows_csv_lists_chains_longest_first(tmp_path):
    results, alive = _planted()
    write_flows(build_flows(results, alive), tmp_path / "flows.csv")
    with open(tmp_path / "flows.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FLOW_COLUMNS and len(rows) == 6
    assert [int(r["length"]) for r in rows] == sorted((int(r["length"]) for r in rows), reverse=True)
    assert rows[0]["path"] == "0:0 1:0 2:2" and rows[0]["end"] == "last_layer"
