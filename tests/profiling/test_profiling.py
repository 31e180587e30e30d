import pytest
import torch

from saeot.profiling import StreamingProfiler

from helpers.profiling_oracle import update_dense


def _stream(n=600, F=12, d=5, seed=0, density=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    acts = torch.rand(n, F, generator=g) * (torch.rand(n, F, generator=g) < density)
    toks = torch.randint(100, (n,), generator=g)
    locs = torch.stack([torch.arange(n) // 10, torch.arange(n) % 10], 1)
    return h, acts, toks, locs


def _run(h, acts, toks, locs, k=7, mode="topk", batch=64, seed=0):
    p = StreamingProfiler("blocks.0.hook_resid_post", acts.shape[1], h.shape[1], k=k, mode=mode, seed=seed)
    for i in range(0, len(h), batch):
        p.update(h[i:i + batch], acts[i:i + batch], toks[i:i + batch], locs[i:i + batch])
    return p


def test_topk_streaming_equals_global_topk():
    h, acts, toks, locs = _stream()
    fs = _run(h, acts, toks, locs).finalize()
    for f in range(acts.shape[1]):
        a = acts[:, f]
        n_valid = min(7, int((a > 0).sum()))
        top = a.topk(n_valid).indices
        kept_rows = fs.locations[f, :n_valid, 0] * 10 + fs.locations[f, :n_valid, 1]
        assert set(kept_rows.tolist()) == set(top.tolist())
        # kept points are the hidden states of those tokens and weights are proportional to activations
        assert torch.allclose(fs.points[f, :n_valid], h[kept_rows])
        w = a[kept_rows] / a[kept_rows].sum()
        assert torch.allclose(fs.weights[f, :n_valid], w, atol=1e-6)
        assert float(fs.weights[f, n_valid:].abs().sum()) == 0.0
        assert int(fs.n_fire[f]) == int((a > 0).sum())
        assert abs(float(fs.act_max[f]) - float(a.max())) < 1e-6


def test_rescaling_activations_leaves_distribution_unchanged():
    h, acts, toks, locs = _stream(seed=1)
    scale = torch.rand(acts.shape[1]) * 10 + 0.1
    for mode in ("topk", "reservoir"):
        a = _run(h, acts, toks, locs, mode=mode, seed=3).finalize()
        b = _run(h, acts * scale, toks, locs, mode=mode, seed=3).finalize()
        assert torch.equal(a.locations, b.locations)
        assert torch.allclose(a.points, b.points)
        assert torch.allclose(a.weights, b.weights, atol=1e-6)


def test_merge_of_shards_equals_one_pass_topk():
    h, acts, toks, locs = _stream(seed=2)
    whole = _run(h, acts, toks, locs).finalize()
    p0 = _run(h[0::2], acts[0::2], toks[0::2], locs[0::2])
    p1 = _run(h[1::2], acts[1::2], toks[1::2], locs[1::2])
    p0.merge(p1)
    merged = p0.finalize()
    assert merged.n_tokens == whole.n_tokens
    assert torch.equal(merged.n_fire, whole.n_fire)
    assert torch.equal(merged.locations, whole.locations)
    assert torch.allclose(merged.weights, whole.weights)


@pytest.mark.parametrize("mode", ["reservoir", "coupled"])
def test_reservoir_samples_proportionally_to_activation(mode):
    # K = 1: A-Res keeps token t with probability a_t / sum(a); coupling the draws across features keeps that law
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    h = torch.eye(4)
    counts = torch.zeros(4)
    for s in range(2000):
        p = StreamingProfiler("x", 1, 4, k=1, mode=mode, seed=s)
        p.update(h, a, torch.arange(4), torch.stack([torch.zeros(4, dtype=torch.long), torch.arange(4)], 1))
        counts[int(p.finalize().points[0, 0].argmax())] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, a.flatten() / a.sum(), atol=0.04)


def test_coupled_sampling_keeps_the_same_tokens_for_features_that_fire_alike():
    """Features 0 and 1 fire on the same tokens with proportional activations, feature 2 on the
    same tokens with other activations: under ``coupled`` 0 and 1 keep the same tokens (common
    random numbers), under ``reservoir`` their independent draws differ."""
    g = torch.Generator().manual_seed(3)
    n = 400
    base = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
    other = torch.rand(n, generator=g) * (base > 0)
    acts = torch.stack([base, 3.0 * base, other], 1)
    h = torch.randn(n, 4, generator=g)
    locs = torch.stack([torch.arange(n) // 20, torch.arange(n) % 20], 1)
    toks = torch.zeros(n, dtype=torch.long)
    kept = {}
    for mode in ("coupled", "reservoir"):
        fs = _run(h, acts, toks, locs, k=16, mode=mode, seed=1, batch=50).finalize()
        kept[mode] = [set(map(tuple, fs.locations[f].tolist())) for f in range(3)]
    assert kept["coupled"][0] == kept["coupled"][1]
    assert kept["coupled"][2] != kept["coupled"][0]  # other activations: another weighted sample
    assert len(kept["reservoir"][0] & kept["reservoir"][1]) < 16


def test_dead_feature_has_zero_weights():
    h, acts, toks, locs = _stream(seed=4)
    acts[:, 3] = 0
    fs = _run(h, acts, toks, locs).finalize()
    assert not bool(fs.alive[3]) and bool(fs.alive[0])
    assert float(fs.weights[3].sum()) == 0.0
    assert torch.all(fs.token_ids[3] == -1)


@pytest.mark.parametrize("mode", ["topk", "reservoir", "coupled"])
def test_sparse_update_equals_the_dense_one(mode):
    """The profiler reads only the firing entries; the result is the dense computation's, in both modes."""
    for seed, density, k in ((0, 0.02, 4), (1, 0.3, 7), (2, 0.9, 3)):
        h, acts, toks, locs = _stream(n=900, F=40, d=6, seed=seed, density=density)
        sparse = _run(h, acts, toks, locs, k=k, batch=50, mode=mode, seed=seed)
        dense = StreamingProfiler("blocks.0.hook_resid_post", 40, 6, k=k, mode=mode, seed=seed)
        for i in range(0, len(h), 50):
            update_dense(dense, h[i:i + 50], acts[i:i + 50], toks[i:i + 50], locs[i:i + 50])
        a, b = sparse.finalize(), dense.finalize()
        for field in ("points", "weights", "token_ids", "locations", "activations", "n_fire", "act_max"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (seed, field)
        assert torch.allclose(a.act_sum, b.act_sum, rtol=1e-12) and a.n_tokens == b.n_tokens
        assert torch.equal(sparse.keys.sort(1).values, dense.keys.sort(1).values), seed  # slots may differ


def test_any_number_of_shards_gives_the_one_pass_samples_with_ties():
    """Tokens split over 1..4 "ranks" by context (as DDP shards them), merged: the same samples,
    bit for bit, for topk and reservoir, also when activations tie (duplicated contexts)."""
    h, acts, toks, locs = _stream(n=800, seed=5)
    acts[400:500] = acts[100:200]  # contexts 40-49 repeat contexts 10-19: tied activations
    acts[:, 0] = 0.5  # every token ties: the first K tokens are kept
    acts[:, 1] = (acts[:, 1] > 0) * 0.25
    for mode in ("topk", "reservoir", "coupled"):
        whole = _run(h, acts, toks, locs, mode=mode, seed=7, batch=40).finalize()
        if mode == "topk":
            assert torch.equal(whole.locations[0], locs[:7])
        for world in (2, 3, 4):
            ranks = []
            for r in range(world):
                rows = (locs[:, 0] % world == r).nonzero().squeeze(1)
                ranks.append(_run(h[rows], acts[rows], toks[rows], locs[rows], mode=mode, seed=7, batch=30))
            merged = ranks[-1]
            for other in ranks[:-1]:
                merged.merge(other)
            got = merged.finalize()
            for field in ("points", "weights", "token_ids", "locations", "activations", "n_fire", "act_max"):
                assert torch.equal(getattr(got, field), getattr(whole, field)), (mode, world, field)
