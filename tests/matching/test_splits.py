"""Two SAEs of one hook (``sae@sae_b=...``): SAE keys, and the feature-splitting view."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from saeot.evaluation.runner import run_evaluate
from saeot.hooks import base_hook, hook_layer, hook_site, sae_key
from saeot.matching.splits import build_splits, plot_splits, same_hook_pairs, write_splits
from saeot.pipeline import run_train
from saeot.pipeline.rematch import run_rematch
from saeot.types import MatchResult

H = "blocks.8.hook_resid_post"
HB = sae_key(H, "b")


def test_sae_keys_parse_as_their_hook():
    assert HB == "blocks.8.hook_resid_post@b"
    assert base_hook(HB) == H and base_hook(H) == H
    assert hook_layer(HB) == 8 and hook_site(HB) == "hook_resid_post"
    with pytest.raises(ValueError):
        sae_key(HB, "c")  # no key of a key


def _res(a, b, feature_b, matched, distance=None):
    n = len(feature_b)
    d = torch.tensor(distance if distance is not None else [float(i) for i in range(n)], dtype=torch.float64)
    return MatchResult(hook_a=a, hook_b=b, matcher="m", feature_b=torch.tensor(feature_b), distance=d,
                       margin=torch.ones(n), matched=torch.tensor(matched))


def test_splits_classify_narrow_features_by_their_children(tmp_path):
    # narrow A (3 features) -> wide B (5 features) and back
    ab = _res(H, HB, [0, 2, 4], [True, True, False])
    # wide -> narrow: 0 -> 0, 1 -> 1, 2 -> 1, 3 -> 1 (unmatched: no parent), 4 -> 1
    ba = _res(HB, H, [0, 1, 1, 1, 1], [True, True, True, False, True], distance=[0.1, 0.5, 0.2, 0.3, 0.9])
    s = build_splits(ab, ba, freq={H: torch.tensor([0.1, 0.3, 0.05]), HB: torch.tensor([0.1, 0.1, 0.15, 0.2, 0.05])})
    assert (s.narrow, s.wide) == (H, HB)
    assert s.parent.tolist() == [0, 1, 1, -1, 1]
    assert s.children == [[0], [2, 1, 4], []]  # closest first: 0.2, 0.5, 0.9
    assert [s.kind(i) for i in range(3)] == ["one", "split", "none"]
    c = s.counts()
    assert (c["one"], c["split"], c["none"], c["one_mutual"], c["wide_with_parent"]) == (1, 1, 1, 1, 4)
    # the reverse order of the pair gives the same splitting (wide is the larger SAE, not "B")
    s2 = build_splits(ba, ab)
    assert (s2.narrow, s2.wide) == (H, HB) and s2.children == s.children
    sp, pp = write_splits([s], tmp_path)
    rows = list(csv.DictReader(open(sp)))
    assert [r["kind"] for r in rows] == ["one", "split", "none"]
    assert rows[1]["children"] == "2 1 4" and rows[1]["child_distances"] == "0.2 0.5 0.9"
    assert float(rows[1]["children_frequency"]) == pytest.approx(0.15 + 0.1 + 0.05)
    assert rows[0]["mutual"] == "1" and rows[2]["own_match"] == "-1"
    parents = list(csv.DictReader(open(pp)))
    assert [int(r["parent"]) for r in parents] == [0, 1, 1, -1, 1]
    assert plot_splits([s], tmp_path / "splits.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not the two directions"):
        build_splits(ab, ab)


def test_same_hook_pairs_finds_each_pair_once():
    a, b = "blocks.3.hook_resid_post", "blocks.4.hook_resid_post"
    cross = _res(a, b, [0], [True])
    ab, ba = _res(H, HB, [0], [True]), _res(HB, H, [0], [True])
    pairs = same_hook_pairs([cross, ab, ba])
    assert len(pairs) == 1 and pairs[0][0] is ab and pairs[0][1] is ba


def test_train_with_sae_b_matches_two_saes_of_one_hook(tmp_path, compose_cfg):
    """``sae@sae_b=...``: the second SAE at layer 1, both directions matched, splits written. The same
    SAE config twice loads the same SAE: every alive feature is its own one, mutual partner."""
    cache = tmp_path / "cache"
    same = run_train(compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache}", "layers.ids=[1]",
                                 "sae@sae_b=train_local_tiny", run_dir=tmp_path / "same"), tmp_path / "same")
    h1, h1b = "blocks.1.hook_resid_post", "blocks.1.hook_resid_post@b"
    assert [(r.hook_a, r.hook_b) for r in same.results] == [(h1, h1b), (h1b, h1)]
    alive = same.samples["blocks.1.hook_resid_post"].alive
    ab = same.results[0]
    assert torch.equal(ab.feature_b[alive], torch.arange(len(alive))[alive])
    rows = list(csv.DictReader(open(tmp_path / "same" / "splits.csv")))
    assert all(r["kind"] == "one" and r["mutual"] == "1" for r, a in zip(rows, alive.tolist()) if a)

    wide_cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache}", "layers.ids=[1]",
                           "sae@sae_b=train_local_tiny", "sae_b.d_sae=256", run_dir=tmp_path / "wide")
    (tmp_path / "wide" / ".hydra").mkdir(parents=True)
    OmegaConf.save(wide_cfg, tmp_path / "wide" / ".hydra" / "config.yaml")  # as train.py's Hydra writes it
    wide = run_train(wide_cfg, tmp_path / "wide")
    assert wide.saes["blocks.1.hook_resid_post@b"].cfg.d_sae == 256 and wide.saes["blocks.1.hook_resid_post"].cfg.d_sae == 128
    rows = list(csv.DictReader(open(tmp_path / "wide" / "splits.csv")))
    parents = list(csv.DictReader(open(tmp_path / "wide" / "parents.csv")))
    assert len(rows) == 128 and len(parents) == 256
    # children and parents are one relation read both ways
    n_children = sum(int(r["n_children"]) for r in rows)
    assert n_children == sum(r["matched"] == "1" for r in parents)
    ba = wide.results[1]
    assert n_children == int(ba.matched.sum())
    counts = json.loads((tmp_path / "wide" / "metrics.json").read_text())["splits"]["blocks.1.hook_resid_post"]
    assert counts["one"] + counts["split"] + counts["none"] == 128 and counts["wide"] == "blocks.1.hook_resid_post@b"
    assert (tmp_path / "wide" / "plots" / "splits.png").stat().st_size > 1000
    records = json.loads((tmp_path / "wide" / "saes.json").read_text())
    assert set(records) == {"blocks.1.hook_resid_post", "blocks.1.hook_resid_post@b"}
    assert records["blocks.1.hook_resid_post"] != records["blocks.1.hook_resid_post@b"]
    # evaluate.py says plainly that same-hook pairs have no functional evaluation yet

    cfg = compose_cfg(f"run_dir={tmp_path / 'wide'}", "logger=none", config_name="evaluate", run_dir=tmp_path / "ev")
    with pytest.raises(ValueError, match=r"two SAEs of one hook \(sae_b\)"):
        run_evaluate(cfg, tmp_path / "ev")

    # rematch.py on that run: another matcher, both directions again, its own splitting
    cfg = compose_cfg(f"run_dir={tmp_path / 'wide'}", "matcher=activation_correlation", config_name="rematch",
                      run_dir=tmp_path / "re")
    metrics = run_rematch(cfg, tmp_path / "re")
    re_rows = list(csv.DictReader(open(tmp_path / "re" / "splits.csv")))
    re_matches = list(csv.DictReader(open(tmp_path / "re" / "matches.csv")))
    assert len(re_rows) == 128 and len(re_matches) == 128 + 256
    assert sum(int(r["n_children"]) for r in re_rows) == sum(
        r["matched"] == "1" for r in re_matches[128:])  # the wide -> narrow rows
    assert metrics["splits"]["blocks.1.hook_resid_post"]["n_wide"] == 256
