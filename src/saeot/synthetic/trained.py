"""Trained SAEs of a synthetic world: sae_lens TopK SAEs trained on each layer's ``train`` split.

Training goes through the one training path of :mod:`saeot.saes.training`; this module
chooses the data (a pool of ``train`` tokens, never the profile or held-out tokens), the
sizes and the seeds, and decides what each trained latent stands for.
"""

from __future__ import annotations

import torch

from saeot.synthetic._random import mix_seed, torch_threads
from saeot.synthetic.latents import (
    SyntheticSAEs,
    activation_agreement,
    express_in_latents,
    latents_to_true_by_decoder,
    sae_metadata,
)
from saeot.synthetic.oracle import default_k
from saeot.synthetic.world import SyntheticWorld
from saeot.saes.training import SAETrainingConfig, inference_sae, train_sae

__all__ = ["trained_saes"]


def trained_saes(
    world: SyntheticWorld,
    d_sae: int | None = None,
    k: int | None = None,
    steps: int = 600,
    batch_size: int = 512,
    lr: float = 4e-3,
    seed: int = 0,
    min_cos: float = 0.7,
    dead_window: int = 200,
    train_tokens: int | None = None,
    min_act_corr: float = 0.5,
    check_tokens: int = 8192,
) -> SyntheticSAEs:
    """TopK SAEs trained with :func:`saeot.saes.training.train_sae` on each layer.

    Training data: a pool of ``train_tokens`` tokens of the ``train`` split (default
    ``min(steps * batch_size, 4 * n_tokens)``; never the profile or held-out tokens),
    batches drawn from it with replacement; Adam; ``b_dec`` starts at the pool mean; the
    TopK auxiliary loss revives latents silent for more than ``dead_window`` steps;
    inputs are not rescaled. The result is converted to the inference ``TopKSAE``
    (decoder norms folded).

    ``d_sae`` defaults to the layer's number of true features, ``k`` to
    ``ceil(L0 + sqrt(L0))`` with L0 the layer's expected number of firing features.

    Truth: latent ``j`` stands for the true feature f with the highest decoder cosine if
    that cosine is at least ``min_cos`` (:func:`latents_to_true_by_decoder`: it *writes*
    f) and its activation correlates with f's true activation at least ``min_act_corr``
    over ``check_tokens`` tokens of the ``train`` split (:func:`activation_agreement`: it
    *reads* f); else for nothing. Without the second test about one latent in six of a
    600-step TopK SAE stood for a feature whose tokens it hardly fires on, and such latents
    decided the benchmark for the decoder-based matchers. Then :func:`express_in_latents` (several latents may stand for one feature: A-side
    they all get its partner, B-side the closest one is the partner).
    Deterministic in ``seed`` (the global RNG is forked, not touched).
    """
    cfg = world.config
    n_pool = int(train_tokens) if train_tokens is not None else min(steps * batch_size, 4 * cfg.n_tokens)
    saes, l2t, lcos = {}, {}, {}
    for layer, hook in enumerate(world.hooks):
        tcfg = SAETrainingConfig(
            architecture="topk",
            d_sae=world.n_true(hook) if d_sae is None else int(d_sae),
            k=default_k(world.expected_l0(hook)) if k is None else int(k),
            lr=lr, steps=steps, batch_size=batch_size, dead_window=dead_window, normalize_inputs=False,
        )
        with torch_threads(cfg.threads):
            pool = torch.cat(list(world.hidden_states(hook, "train", cfg.chunk_size, n_tokens=n_pool)))
            sae = train_sae(pool, tcfg, seed=mix_seed(cfg.seed, 400, seed, layer) % (2**62),
                            order_seed=mix_seed(cfg.seed, 401, seed, layer), name=hook, metadata=sae_metadata(hook))
        saes[hook] = inference_sae(sae)
        l2t[hook], lcos[hook] = latents_to_true_by_decoder(saes[hook].W_dec, world.directions[hook], min_cos)
        agree = activation_agreement(saes[hook], world, hook, l2t[hook], "train", check_tokens)
        l2t[hook] = torch.where(agree >= min_act_corr, l2t[hook], torch.full_like(l2t[hook], -1))
    return express_in_latents(world, saes, l2t, lcos)
