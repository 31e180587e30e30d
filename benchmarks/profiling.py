"""Profiling at scale: the profile pass against the bare forward pass on the same tokens.

Streams ``--tokens`` tokens (after BOS) of the corpus through SmolLM2-135M up to the
deepest of ``--layers`` twice, on the same batches, the two sides alternating batch by batch
after both are warmed up on the first batch, in turn first and second (so load, caches and the allocator are the same
for both; timing one side after the other made the default print 2.9 where the forward
inside the profile pass ran 2.4x slower than the same forward alone):

* ``seconds_bare_forward``: the forward pass alone (``run_with_cache`` of the hooks with
  ``stop_at_layer``: what the profile pass itself runs), no SAE;
* ``seconds_profile``: the forward pass plus, at every hook, the SAE's encoder and the
  streaming K-sample profiler (:class:`saeot.profiling.ProfileConsumer`, what
  ``train.py``'s profile pass runs per batch);

``ratio = seconds_profile / seconds_bare_forward`` (the target is <= 1.2), and
``peak_rss_mb`` (the process's peak resident memory; the profiler's state is
``F x K x d`` per hook whatever the number of tokens). The SAEs are TopK SAEs of
``--d-sae`` features and ``--k-sae`` active ones, freshly initialised (their sparsity,
not their training, sets the profiler's cost); ``--saes RUN_DIR`` uses a run's SAEs.
``--seconds-*-parts`` split the profile pass into encode and profiler update.

    python benchmarks/profiling.py                        # a few minutes on 2 cores
    python benchmarks/profiling.py --tokens 1000000 --layers 3,4,5,8,9,12,16 --data packages

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from saeot.data.datamodule import HiddenStateDataModule
from saeot.data.text import StdlibDocstrings
from saeot.hooks import hook_name
from saeot.models import load_smollm2_135m
from saeot.profiling import ProfileConsumer
from saeot.profiling.samplers import flatten_batch
from saeot.saes.codes import encode
from saeot.saes.training import SAETrainingConfig, build_training_sae, inference_sae


def _saes(hooks: list[str], d_model: int, d_sae: int, k: int, run_dir: str | None) -> dict:
    if run_dir:
        from saeot.pipeline.rundir import RunDir  # only with --saes

        saes = RunDir.load(run_dir).load_saes(torch.device("cpu"))
        return {h: saes[h] for h in hooks}
    out = {}
    for i, h in enumerate(hooks):
        torch.manual_seed(i)
        out[h] = inference_sae(build_training_sae(SAETrainingConfig("topk", d_sae=d_sae, k=k), d_model)).eval()
    return out


def _profile_batch(prof: ProfileConsumer, dm: HiddenStateDataModule, b: dict, hooks: list[str],
                   saes: dict) -> tuple[float, float]:
    """One batch of the profile pass (forward, then ProfileConsumer.update timed in two parts);
    returns the seconds of (encode, profiler update)."""
    batch = dm.prepare_batch(b, hooks)
    t_enc = t_upd = 0.0
    for h, profiler in prof.profilers.items():
        t1 = time.perf_counter()
        x, toks, locs = flatten_batch(batch, h)
        acts = encode(saes[h], x)
        t2 = time.perf_counter()
        profiler.update(x, acts, toks, locs)
        t_enc += t2 - t1
        t_upd += time.perf_counter() - t2
    return t_enc, t_upd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", default="3,4,8,9")
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--k-sae", type=int, default=32)
    p.add_argument("--k", type=int, default=32, help="samples kept per feature")
    p.add_argument("--sampling", default="topk")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--data", choices=["stdlib", "packages"], default="stdlib")
    p.add_argument("--saes", default=None, help="a train.py run dir whose SAEs to profile")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_smollm2_135m()
    hooks = [hook_name(int(x)) for x in args.layers.split(",")]
    if args.data == "packages":
        from saeot.data.corpus import PackagesCorpus  # extracted once into the cache (minutes)

        text = PackagesCorpus()
    else:
        text = StdlibDocstrings()
    n_ctx = -(-args.tokens // (args.context_len - 1))
    dm = HiddenStateDataModule(lm, text, hooks, context_len=args.context_len, max_contexts=n_ctx + 1,
                               heldout_fraction=1 / (n_ctx + 1), batch_size=args.batch_size)
    dm.setup()
    saes = _saes(hooks, lm.d_model, args.d_sae, args.k_sae, args.saes)
    batches = [b for b in dm.iter_batches("profile", hidden=False)]
    n_tokens = sum(int(b["mask"].sum()) for b in batches)

    with torch.no_grad():
        # warm both sides up on the first batch (a throwaway profiler: the measured one starts empty)
        dm.hidden_states(batches[0]["tokens"], hooks)
        _profile_batch(ProfileConsumer(hooks, saes, k=args.k, mode=args.sampling, seed=0), dm, batches[0], hooks, saes)
        # then alternate the two sides batch by batch, so both see the same load, caches and allocator
        prof = ProfileConsumer(hooks, saes, k=args.k, mode=args.sampling, seed=0)
        bare = profile = t_enc = t_upd = 0.0
        for i, b in enumerate(batches):
            for side in ("bare", "profile") if i % 2 == 0 else ("profile", "bare"):  # ABBA: no side always first
                t0 = time.perf_counter()
                if side == "bare":
                    dm.hidden_states(b["tokens"], hooks)
                    bare += time.perf_counter() - t0
                else:
                    enc, upd = _profile_batch(prof, dm, b, hooks, saes)
                    profile += time.perf_counter() - t0
                    t_enc += enc
                    t_upd += upd
        results = prof.results()

    state_mb = sum(sum(t.numel() * t.element_size() for t in pr.state().values()) for pr in prof.profilers.values())
    print(json.dumps({
        "tokens": n_tokens, "layers": [int(x) for x in args.layers.split(",")], "d_sae": args.d_sae,
        "k_sae": args.k_sae, "k": args.k, "sampling": args.sampling, "batch_size": args.batch_size,
        "data": args.data, "threads": torch.get_num_threads(),
        "seconds_profile": round(profile, 2), "seconds_bare_forward": round(bare, 2),
        "ratio": round(profile / bare, 3),
        "seconds_profile_parts": {"forward": round(profile - t_enc - t_upd, 2), "encode": round(t_enc, 2),
                                  "profiler_update": round(t_upd, 2)},
        "tokens_per_second_profile": round(n_tokens / profile, 1),
        "profiler_state_mb": round(state_mb / 2**20, 1),
        "alive_fraction": {h: round(float(r.alive.float().mean()), 4) for h, r in results.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
