"""Peak memory of training one SAE from a pool of hidden states, at the suite's size.

The SmolLM2 suite trains each SAE on a pool of 2M hidden states of d = 576 (4.6 GB in float32),
collected from the activation store one hook at a time. Its build peaked at 15.4 GB: the pool's
finiteness check (``torch.isfinite(acts).all()``) built ``|acts|`` and two boolean tensors
of the pool's shape, 1.75x the pool for a moment. The check now rides on the float64 moments the
training computes anyway (:func:`saeot.saes.training._pool_moments`).

This runs the provider's own pool collection (:meth:`saeot.saes.providers.LocalTrainedSAEs.collect`,
the buffer allocated up front) on a stand-in data module that yields random batches of the
suite's shape (16 contexts x 128 tokens, BOS masked; the store's reads are not timed here), then
``--steps`` steps of :func:`saeot.saes.training.train_sae` with the suite's settings, and prints
one JSON line: ``pool_gb``, ``peak_rss_gb_after_collect``, ``peak_rss_gb_after_train`` (VmHWM),
``train_overhead_x_pool`` ((peak after training - peak after collect) / pool).

    python benchmarks/training_memory.py                     # 2M x 576: about a minute, 6 GB
    python benchmarks/training_memory.py --tokens 200000     # a small check
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from saeot.pipeline.resources import peak_rss_gb
from saeot.saes.providers import LocalSAESettings, LocalTrainedSAEs

HOOK = "blocks.8.hook_resid_post"


class RandomBatches:
    """Stands in for a data module's ``iter_batches``: random hidden states of the suite's batch shape."""

    def __init__(self, d: int, batch: int = 16, context: int = 128, seed: int = 0) -> None:
        self.d, self.batch, self.context, self.seed = d, batch, context, seed

    def iter_batches(self, split: str, device: str = "cpu", hooks=(), **_: object) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed)
        mask = torch.ones(self.batch, self.context, dtype=torch.bool)
        mask[:, 0] = False  # BOS
        while True:
            yield {"mask": mask, "hidden": {h: torch.randn(self.batch, self.context, self.d, generator=g)
                                            for h in hooks}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="pool size (the suite: 2M)")
    ap.add_argument("--d", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="training steps (memory is set in the first)")
    args = ap.parse_args()
    base = peak_rss_gb()
    provider = LocalTrainedSAEs(LocalSAESettings(architecture="topk", expansion=args.expansion, k=64, lr=1e-3,
                                                 steps=args.steps, batch_size=1024, train_tokens=args.tokens,
                                                 progress=False))
    t0 = time.perf_counter()
    acts = provider.collect(RandomBatches(args.d), [HOOK]).pop(HOOK)
    after_collect = peak_rss_gb()
    t1 = time.perf_counter()
    provider.train_one(acts, HOOK)
    after_train = peak_rss_gb()
    pool = acts.numel() * acts.element_size() / 1e9
    print(json.dumps({
        "tokens": int(acts.shape[0]), "d": args.d, "d_sae": args.expansion * args.d, "steps": args.steps,
        "pool_gb": round(pool, 3), "peak_rss_gb_start": round(base, 3),
        "peak_rss_gb_after_collect": round(after_collect, 3), "peak_rss_gb_after_train": round(after_train, 3),
        "train_overhead_x_pool": round((after_train - after_collect) / pool, 3),
        "seconds_collect": round(t1 - t0, 1), "seconds_train": round(time.perf_counter() - t1, 1),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
