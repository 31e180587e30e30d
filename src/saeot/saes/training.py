"""The one SAE training path: sae_lens training SAEs fitted by Adam on a pool of hidden states.

Both :class:`~saeot.saes.LocalTrainedSAEs` (hidden states of a language model) and
the synthetic benchmark (:func:`saeot.synthetic.trained_saes`) train here.

Given a pool ``X [N, d]`` of hidden states, :func:`train_sae`

1. optionally rescales the inputs, ``x = c X`` with ``c = sqrt(d) / mean_t ||X_t||``
   (the mean input norm becomes ``sqrt(d)``, sae_lens' ``expected_average_only_in``),
   batch by batch: the pool (float32 or float16, millions of rows) is never copied;
2. builds a fresh training SAE of the configured architecture (:data:`ARCHITECTURES`)
   with the global torch RNG seeded by ``seed`` inside a fork (the caller's RNG state
   is restored afterwards), and starts ``b_dec`` at the pool mean (a geometric-median
   proxy);
3. takes ``steps`` Adam steps, each on ``min(batch_size, N)`` rows drawn uniformly with
   replacement by a generator seeded with ``order_seed``; sparsity coefficients warm
   up linearly as the architecture asks (``TrainCoefficientConfig.warm_up_steps``);
   a latent that has not fired for more than ``dead_window`` consecutive steps is
   "dead" (TopK's auxiliary loss revives it; sae_lens' ``dead_feature_window`` rule);
4. folds ``c`` back into the weights (``W_enc c``, ``W_dec / c``, ``b_dec / c``), so the
   trained SAE reads raw hidden states.

The result is the *training* SAE; :func:`inference_sae` converts it to the inference
class (what ``save_inference_model`` writes to disk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import (
    SAE,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainingSAE, TrainStepInput
from torch import Tensor

from saeot.progress import progress_bar

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "SAETrainingConfig",
    "build_training_sae",
    "train_sae",
    "inference_sae",
]


@dataclass(frozen=True)
class SAETrainingConfig:
    """How to train one SAE.

    Attributes:
        architecture: a key of :data:`ARCHITECTURES` (``topk``, ``jumprelu``, ``standard``).
        d_sae: number of latents F.
        k: TopK's k.
        l1_coefficient: sparsity penalty of ``standard``.
        l0_coefficient, jumprelu_init_threshold: sparsity penalty and initial threshold of ``jumprelu``.
        target_l0: ``jumprelu`` only: when set, sae_lens' quadratic sparsity loss around this L0
            (``l0_coefficient * 2 / target_l0 * (L0 - target_l0)^2``, Gemma Scope 2) instead of
            the L0 penalty; null keeps the L0 penalty (and the cache keys of SAEs trained with it).
        lr, steps, batch_size: Adam learning rate, steps, rows per step.
        dead_window: a latent silent for more than this many consecutive steps is dead.
        normalize_inputs: rescale inputs to mean norm ``sqrt(d)`` while training (folded back after).
        device: where to train.
        progress: show a progress bar.
    """

    architecture: str = "topk"
    d_sae: int = 128
    k: int = 16
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    jumprelu_init_threshold: float = 0.01
    target_l0: float | None = None
    lr: float = 3e-3
    steps: int = 600
    batch_size: int = 512
    dead_window: int = 200
    normalize_inputs: bool = True
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"sae.architecture={self.architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        if self.target_l0 is not None and not (0 < self.target_l0 <= self.d_sae):
            raise ValueError(f"sae.target_l0={self.target_l0}: expected a number in (0, d_sae={self.d_sae}] or null")

    def architecture_options(self) -> dict[str, Any]:
        """The settings specific to :attr:`architecture` (e.g. ``{"k": 16}`` for TopK)."""
        return ARCHITECTURES[self.architecture].options(self)


@dataclass(frozen=True)
class Architecture:
    """A trainable sae_lens architecture: its training SAE and config classes and its own settings."""

    sae_class: type[TrainingSAE]
    config_class: type
    options: Callable[[SAETrainingConfig], dict[str, Any]]


#: architecture name -> how to build its training SAE
ARCHITECTURES: dict[str, Architecture] = {
    "topk": Architecture(TopKTrainingSAE, TopKTrainingSAEConfig, lambda c: {"k": c.k}),
    "jumprelu": Architecture(
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        lambda c: {"l0_coefficient": c.l0_coefficient, "jumprelu_init_threshold": c.jumprelu_init_threshold,
                   **({} if c.target_l0 is None else {"jumprelu_sparsity_loss_mode": "quadratic",
                                                      "target_l0": float(c.target_l0)})},
    ),
    "standard": Architecture(StandardTrainingSAE, StandardTrainingSAEConfig, lambda c: {"l1_coefficient": c.l1_coefficient}),
}


def build_training_sae(cfg: SAETrainingConfig, d_in: int, metadata: SAEMetadata | None = None) -> TrainingSAE:
    """A fresh training SAE ``d_in -> cfg.d_sae`` (initialised from the global torch RNG)."""
    arch = ARCHITECTURES[cfg.architecture]
    kw: dict[str, Any] = {"d_in": d_in, "d_sae": cfg.d_sae, "device": cfg.device, **cfg.architecture_options()}
    if metadata is not None:
        kw["metadata"] = metadata
    return arch.sae_class(arch.config_class(**kw))


@contextmanager
def _forked_rng(device: str) -> Iterator[None]:
    """Run the block on a fork of the global torch RNG (CPU, and ``device`` if it is a GPU)."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _coefficients(coeff_cfg: dict[str, Any], step: int) -> dict[str, float]:
    """Sparsity coefficients at ``step``: ``value * min(1, (step + 1) / warm_up_steps)``."""
    out = {}
    for name, c in coeff_cfg.items():
        if isinstance(c, TrainCoefficientConfig):
            warm = min(1.0, (step + 1) / c.warm_up_steps) if c.warm_up_steps else 1.0
            out[name] = c.value * warm
        else:
            out[name] = float(c)
    return out


def train_sae(
    acts: Tensor,
    cfg: SAETrainingConfig,
    *,
    seed: int,
    order_seed: int | None = None,
    name: str = "sae",
    metadata: SAEMetadata | None = None,
) -> TrainingSAE:
    """Train a fresh SAE on ``acts [N, d]`` (module docstring); returns the training SAE, scale folded in.

    Args:
        acts: ``[N, d]`` the pool of hidden states.
        cfg: the training settings.
        seed: seeds the SAE's initialisation (a fork of the global RNG; the caller's state is kept).
        order_seed: seeds the batch sampler (default ``seed``).
        name: named in errors and in the progress bar (e.g. the hook).
        metadata: sae_lens metadata (hook name, model name) stored in the SAE's config.
    """
    n, d = acts.shape
    with _forked_rng(cfg.device):
        torch.manual_seed(seed)
        mean_norm, mean = _pool_moments(acts)  # also the finiteness check: no [N, d] temporary
        if not (math.isfinite(mean_norm) and bool(torch.isfinite(mean).all())):
            raise FloatingPointError(f"non-finite hidden states at {name}; cannot train an SAE on them")
        scale = math.sqrt(d) / max(mean_norm, 1e-8) if cfg.normalize_inputs else None
        # the pool is never copied (scaled batch by batch): millions of rows fit, in any float dtype
        x_all = acts.to(cfg.device)
        sae = build_training_sae(cfg, d, metadata)
        with torch.no_grad():  # start the decoder bias at the data mean (geometric-median proxy)
            sae.b_dec.copy_(mean * (scale if scale is not None else 1.0))
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        coeff_cfg = sae.get_coefficients()
        g = torch.Generator(device="cpu").manual_seed(seed if order_seed is None else order_seed)
        fired_recently = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=cfg.device)
        bar = progress_bar(range(cfg.steps), desc=f"train SAE {name}", enabled=cfg.progress, leave=False, mininterval=2)
        for step in bar:
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=g)
            x = x_all[idx.to(x_all.device)].float()
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x * scale if scale is not None else x, coefficients=_coefficients(coeff_cfg, step),
                    dead_neuron_mask=fired_recently > cfg.dead_window, n_training_steps=step, is_logging_step=False,
                )
            )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            with torch.no_grad():
                fired = (out.feature_acts > 0).any(0)
                fired_recently = torch.where(fired, torch.zeros_like(fired_recently), fired_recently + 1)
            if cfg.progress and step % 50 == 0:
                bar.set_postfix(loss=out.loss.item(), refresh=False)  # shown at the next timed redraw
    if scale is not None:
        sae.fold_activation_norm_scaling_factor(scale)
    return sae


@torch.no_grad()
def _pool_moments(acts: Tensor, chunk: int = 1 << 16) -> tuple[float, Tensor]:
    """Mean row norm and ``[d]`` mean of ``acts [N, d]``, in float64 chunk by chunk (float16 pools too).

    Both are finite exactly when every entry of ``acts`` is: a float32 or float16 value is below
    3.5e38, so neither a float64 sum of millions of them nor of their squares can overflow, and
    an inf or NaN anywhere makes its column sum (and the norm sum) inf or NaN. This is the pool's
    finiteness check: ``torch.isfinite(acts).all()`` builds ``|acts|`` and two boolean
    ``[N, d]`` tensors on the CPU, 1.75x the pool (8 GB on a 2M x 576 pool; the suite build's
    15.4 GB peak). Its transient is one chunk (``chunk`` rows of float64: 0.3 GB at d = 576) and its norms."""
    norm_sum, total = 0.0, torch.zeros(acts.shape[1], dtype=torch.float64, device=acts.device)
    for i in range(0, acts.shape[0], chunk):
        x = acts[i:i + chunk].double()
        norm_sum += float(x.norm(dim=1).sum())
        total += x.sum(0)
    n = max(acts.shape[0], 1)
    return norm_sum / n, (total / n).float()


@torch.no_grad()
def inference_sae(sae: TrainingSAE) -> SAE:
    """The inference SAE of a trained training SAE (the weights ``save_inference_model`` would write)."""
    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    out = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    out.load_state_dict(state)
    return out
