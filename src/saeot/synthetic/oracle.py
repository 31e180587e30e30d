"""Oracle SAEs: sae_lens SAEs at each layer's true dictionary, latents permuted and perturbed.

:func:`oracle_saes` knows the truth, so it builds the SAE a perfect training run would
approach: decoder rows at the true directions, encoders that read each feature (and
the context that singles out a split child or a near-duplicate, :func:`oracle_encoder`),
JumpReLU thresholds calibrated per latent. Architectures are a registry
(:data:`ORACLE_ARCHITECTURES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from torch import Tensor

from saeot.synthetic._geometry import normalise
from saeot.synthetic._random import generator, torch_threads
from saeot.synthetic.latents import SyntheticSAEs, express_in_latents, sae_metadata
from saeot.synthetic.world import SyntheticWorld

__all__ = ["ORACLE_ARCHITECTURES", "default_k", "oracle_encoder", "oracle_saes"]


def _oracle_jumprelu(hook: str, w_enc: Tensor, w_dec: Tensor, b_dec: Tensor, threshold: Tensor, l0: float) -> Any:
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], metadata=sae_metadata(hook)))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        sae.b_enc.zero_()
        sae.threshold.copy_(threshold)
    return sae


def _oracle_topk(hook: str, w_enc: Tensor, w_dec: Tensor, b_dec: Tensor, threshold: Tensor, l0: float) -> Any:
    k = default_k(l0)
    cfg = TopKSAEConfig(
        d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=k, rescale_acts_by_decoder_norm=False, metadata=sae_metadata(hook)
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        sae.b_enc.zero_()
    return sae


def default_k(l0: float) -> int:
    """TopK width for a layer with mean L0 ``l0``: ``ceil(l0 + sqrt(l0))`` (L0 varies from token to token;
    a spare latent costs far less reconstruction than a missed feature)."""
    return max(1, math.ceil(l0 + math.sqrt(l0)))


#: architecture -> builder(hook, W_enc [d, F], W_dec [F, d], b_dec [d], threshold [F], expected L0) -> SAE
ORACLE_ARCHITECTURES: dict[str, Callable[..., Any]] = {"jumprelu": _oracle_jumprelu, "topk": _oracle_topk}


def oracle_encoder(world: SyntheticWorld, hook: str, context_weight: float = 0.5) -> Tensor:
    """``[d, n_l]`` encoder columns reading each true feature at ``hook`` (pre-activation ~ ``c_f``).

    ``e_f = D_f`` (matched filter), except where the direction alone cannot single the
    feature out and its context can, as a trained encoder would learn (``beta =
    context_weight``, ``D~_k = s_f / s_k D_k``: a context read in units of ``s_f``):

    * split child gated on feature ``g`` firing: ``e = (D_f + beta D~_g) / (1 + beta)``;
      gated on ``g`` silent: ``e = D_f - beta D~_g``;
    * near-duplicate member ``i`` (twin ``j``, context partners ``p_i``, ``p_j``):
      ``e = (D_i + beta D~_{p_i} - beta D~_{p_j}) / (1 + beta)``.

    * shared-mean group (bimodal X with contexts c1 / c2, unimodal Y near X's mean): the
      group's typical states are ``P1 = s_X D_X + s_1 D_1``, ``P2 = s_X D_X + s_2 D_2``,
      ``P3 = s_Y D_Y``, ``C1 = s_1 D_1`` and ``C2 = s_2 D_2`` (contexts alone); each member's
      encoder is the least-norm ``e`` giving its own activation on these states (X: P1, P2;
      Y: P3; c1: P1, C1; c2: P2, C2) and 0 on the others. No matched filter separates
      them: P3 lies next to the segment P1-P2.

    In each case the pre-activation is ``~ s_f`` on the feature's typical firing and
    well below it on its sibling's or twin's.
    """
    D = world.directions[hook]
    s = world.scales[hook]
    enc = D.clone()
    beta = context_weight
    for f, (g, on) in enumerate(zip(world.gate_feature[hook].tolist(), world.gate_on[hook].tolist())):
        if g < 0:
            continue
        if on:
            enc[f] = (D[f] + beta * s[f] / s[g] * D[g]) / (1 + beta)
        else:
            enc[f] = D[f] - beta * s[f] / s[g] * D[g]
    pairs, ctx = world.near_duplicate_pairs[hook], world.near_duplicate_contexts[hook]
    for (i, j), (pi, pj) in zip(pairs.tolist(), ctx.tolist()):
        for me, mine, theirs in ((i, pi, pj), (j, pj, pi)):
            enc[me] = (D[me] + beta * s[me] / s[mine] * D[mine] - beta * s[me] / s[theirs] * D[theirs]) / (1 + beta)
    for group in world.shared_mean_groups[hook].tolist():
        x, y, c1, c2 = group
        sx, sy, s1, s2 = (float(s[f]) for f in group)
        states = torch.stack([sx * D[x] + s1 * D[c1], sx * D[x] + s2 * D[c2], sy * D[y], s1 * D[c1], s2 * D[c2]])
        targets = torch.tensor([[sx, sx, 0, 0, 0], [0, 0, sy, 0, 0], [s1, 0, 0, s1, 0], [0, s2, 0, 0, s2]]).T
        sol = torch.linalg.pinv(states.double()) @ targets.double()  # [d, 4] least-norm read-outs
        enc[group] = sol.T.float()
    return enc.T.contiguous()


def oracle_saes(
    world: SyntheticWorld,
    perturb: float = 0.02,
    seed: int = 0,
    architecture: str = "jumprelu",
    threshold_frac: float | None = None,
    context_weight: float = 0.5,
    calibration_tokens: int = 8192,
) -> SyntheticSAEs:
    """SAEs initialised at each layer's true dictionary, latents randomly permuted, perturbed.

    For layer ``l`` with permutation ``pi`` (latent ``j`` stands for true feature ``pi[j]``):

        W_dec[j]    = normalise(D_{pi[j]} + perturb xi_j),        xi ~ N(0, I/d)
        W_enc[:, j] = e_{pi[j]} + perturb |e_{pi[j]}| xi'_j        (:func:`oracle_encoder`)
        threshold_j = m_j * magnitude_mean * s_{pi[j]} * (1 + perturb n_j),  n ~ N(0, 1)
        b_enc = 0,  b_dec = b^l

    ``m_j = threshold_frac`` if given; by default (None) each latent's ``m_j`` is
    calibrated on ``calibration_tokens`` tokens of the ``train`` split: the value in
    ``{0.3, 0.35, ..., 1.2}`` minimising the squared error of the latent's own output,
    ``sum_t [p_tj > theta_j] (p_tj - c_t)^2 + [p_tj <= theta_j] c_t^2`` (``p`` its
    pre-activation, ``c`` its true feature's activation). The oracle knows the truth,
    so it may as well place each threshold where a matched filter errs least.

    ``architecture``: ``jumprelu`` (``JumpReLUSAE``) or ``topk`` (``TopKSAE`` with
    ``k = ceil(L0 + sqrt(L0))``, L0 the layer's expected number of firing features;
    thresholds unused). The truth is returned in these
    permuted indices (:class:`SyntheticSAEs`).
    """
    if architecture not in ORACLE_ARCHITECTURES:
        raise ValueError(f"oracle architecture={architecture!r}; choose from {list(ORACLE_ARCHITECTURES)}")
    if perturb < 0:
        raise ValueError(f"oracle perturb must be >= 0, got {perturb}")
    build = ORACLE_ARCHITECTURES[architecture]
    cfg = world.config
    saes, l2t, lcos = {}, {}, {}
    with torch_threads(cfg.threads):
        for layer, hook in enumerate(world.hooks):
            gen = generator(cfg.seed, 300, seed, layer)
            D, s = world.directions[hook], world.scales[hook]
            n, d = D.shape
            perm = torch.randperm(n, generator=gen)
            w_dec = normalise(D[perm] + perturb * torch.randn(n, d, generator=gen) / math.sqrt(d))
            enc = oracle_encoder(world, hook, context_weight)[:, perm]
            w_enc = enc + perturb * enc.norm(dim=0, keepdim=True) * torch.randn(d, n, generator=gen) / math.sqrt(d)
            if threshold_frac is None:
                frac = _calibrated_fractions(world, hook, w_enc, perm, calibration_tokens)
            else:
                frac = torch.full((n,), float(threshold_frac))
            threshold = frac * cfg.magnitude_mean * s[perm] * (1 + perturb * torch.randn(n, generator=gen))
            saes[hook] = build(hook, w_enc, w_dec, world.bias[hook], threshold.clamp_min(0.0), world.expected_l0(hook))
            l2t[hook] = perm
            lcos[hook] = (w_dec * D[perm]).sum(-1)
        return express_in_latents(world, saes, l2t, lcos)


_THRESHOLD_GRID = torch.linspace(0.3, 1.2, 19)


def _calibrated_fractions(world: SyntheticWorld, hook: str, w_enc: Tensor, perm: Tensor, n_tokens: int) -> Tensor:
    """``[F]`` per-latent threshold fraction from :data:`_THRESHOLD_GRID` (see :func:`oracle_saes`)."""
    unit = world.config.magnitude_mean * world.scales[hook][perm]  # [F]
    err = torch.zeros(len(_THRESHOLD_GRID), w_enc.shape[1], dtype=torch.float64)
    for h, c, _ in world.stream(hook, "train", batch_size=world.config.chunk_size, n_tokens=n_tokens):
        pre = (h - world.bias[hook]) @ w_enc  # [N, F]
        target = c[:, perm]
        hit = (pre - target).pow(2)
        miss = target.pow(2)
        for g, m in enumerate(_THRESHOLD_GRID.tolist()):
            err[g] += torch.where(pre > m * unit, hit, miss).sum(0).double()
    return _THRESHOLD_GRID[err.argmin(dim=0)]
