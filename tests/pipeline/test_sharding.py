"""Matching sharded over ranks: each rank searches a block of A's features; the gathered
result equals one process's (ranks simulated by threads exchanging through a barrier; the
2-process DDP run is in tests/pipeline/test_train.py)."""

import threading

import torch

from saeot.matching import SemanticOT
from saeot.matching.base import MatchContext, Shard
from saeot.types import FeatureSamples


def _samples(hook, n, k=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, k, d, generator=g)
    w = torch.rand(n, k, generator=g) + 0.1
    w[3] = 0  # a dead feature
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    acts = w.clone()
    return FeatureSamples(hook=hook, points=pts, weights=w, activations=acts,
                          token_ids=torch.zeros(n, k, dtype=torch.long),
                          locations=torch.zeros(n, k, 2, dtype=torch.long),
                          n_fire=(w > 0).sum(1).long(), act_sum=acts.sum(1), act_max=acts.max(1).values,
                          n_tokens=100)


class _Exchange:
    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def shard(self, rank):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return Shard(rank=rank, world_size=self.world, gather=gather)


def test_shard_rows_are_disjoint_and_cover():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            ex = _Exchange(world)
            rows = torch.cat([ex.shard(r).rows(n) for r in range(world)])
            assert rows.tolist() == list(range(n))


def test_two_ranks_give_the_single_process_matching():
    samples = {"blocks.0.hook_resid_post": _samples("blocks.0.hook_resid_post", 23, seed=0),
               "blocks.1.hook_resid_post": _samples("blocks.1.hook_resid_post", 19, seed=1)}
    a, b = samples
    m = SemanticOT(progress=False, assignment="hungarian")
    one = m.match_assignments(MatchContext(samples=samples), a, b)
    ex, out = _Exchange(2), [None, None]

    def rank(r):
        out[r] = SemanticOT(progress=False, assignment="hungarian").match_assignments(
            MatchContext(samples=samples, shard=ex.shard(r)), a, b)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got in out:
        for key in ("nearest", "hungarian"):
            x, y = one[key], got[key]
            assert torch.equal(x.feature_b, y.feature_b) and torch.equal(x.matched, y.matched)
            assert torch.equal(x.distance, y.distance) and torch.equal(x.margin.nan_to_num(-1), y.margin.nan_to_num(-1))
            assert x.null_threshold == y.null_threshold
            assert x.extras["n_solved"] == y.extras["n_solved"] and x.extras["n_pairs"] == y.extras["n_pairs"]
