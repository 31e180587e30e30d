"""benchmarks/sample_agreement.py: shared sample locations and agreement counts on hand-made samples."""

import importlib.util
from pathlib import Path

import torch

from saeot.types import FeatureSamples

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_agreement.py"
_spec = importlib.util.spec_from_file_location("sample_agreement", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _samples(locs: list[list[tuple[int, int]]], K: int = 3) -> FeatureSamples:
    F = len(locs)
    loc = torch.full((F, K, 2), -1, dtype=torch.long)
    w = torch.zeros(F, K)
    for f, ls in enumerate(locs):
        for k, (c, p) in enumerate(ls):
            loc[f, k] = torch.tensor([c, p])
            w[f, k] = 1.0 / len(ls)
    return FeatureSamples(hook="h", points=torch.randn(F, K, 4), weights=w, n_fire=torch.ones(F), act_sum=torch.ones(F),
                          act_max=torch.ones(F), n_tokens=10, token_ids=torch.zeros(F, K, dtype=torch.long),
                          locations=loc, activations=w.clone())


def test_shared_locations_counts_common_context_positions_only():
    a = _samples([[(0, 1), (0, 2), (3, 4)], [(5, 5)]])
    b = _samples([[(0, 2), (3, 4), (9, 9)], [(0, 1)], [(1, 0)]])  # (1, 0) vs (0, 1): not the same token
    m = bench.shared_locations(a, b).toarray()
    assert m.tolist() == [[2, 1, 0], [0, 0, 0]]


def test_agreement_counts_only_features_the_reference_matched():
    assert bench.agreement({0: 1, 1: 2, 2: 0}, {0: 1, 1: 0}, [0, 1, 2]) == 0.5
    assert bench.agreement({0: 1}, {}, [0]) == 0.0
