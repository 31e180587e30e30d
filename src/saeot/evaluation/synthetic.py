"""Synthetic ground truth: a planted multi-layer model with known feature lineages.

The world
---------
A set of K *concepts* fires on every token ``t``: ``z_t in R^K_{>=0}``, sparse, with
Zipfian firing probabilities (``sae_lens.synthetic.ZipfianFiringProbabilityConfig``)
and correlated co-firing through a low-rank Gaussian copula (factor from
``sae_lens.synthetic.generate_random_low_rank_correlation_matrix``):

    g_t = eps_t F^T + eta_t * sqrt(diag),   eps_t ~ N(0, I_r), eta_t ~ N(0, I_K)
    concept k fires  <=>  g_{t,k} > Phi^{-1}(1 - p_k)
    z_{t,k} = max(0, m_{t,k}) * 1[fires],   m_{t,k} ~ N(magnitude_mean, magnitude_std^2)

plus *forced co-firing rules* ``(parent, context, q)``: on the tokens where ``parent``
fires, ``context`` fires with probability exactly ``q`` (independently of its own
sample); these give split children and near-duplicates their distinct contexts.

Layer ``l`` has ``n_l`` *true features*. True feature ``f`` reads one or two concepts,
optionally gated by a context concept ``g_f``::

    a^l_{t,f} = (z_{t,k1} + z_{t,k2}) * [gate]      gate = 1[z_{t,g_f} > 0] (or its negation)
    c^l_{t,f} = s^l_f * a^l_{t,f}                     (the "true activation", unit direction)
    h^l_t     = sum_f c^l_{t,f} D^l_f + b^l + eps,     eps ~ N(0, sigma_l^2 I_d)

with unit directions ``D^l [n_l, d]``, magnitudes ``s^l [n_l]``, a layer bias ``b^l``
(``bias`` x layer scale, 0 by default) and ``sigma_l = noise * rho_l``, where ``rho_l``
is the per-coordinate RMS of the noise-free signal (estimated once on a pilot chunk).
The same token index ``t`` gives the hidden state of every layer, i.e. the layer
streams are aligned token by token, unless ``disjoint_tokens`` is on.

Layer 0 holds ``n_features`` features, one per concept, with directions drawn at
random and spread apart (a few steps of gradient descent on ``sum_{i != j} cos^4``).

Transitions ``l -> l+1`` (every scenario in ``config.scenarios`` applies at once)
-------------------------------------------------------------------------------
* ``identity``: every feature continues: ``D^{l+1}_f = normalise(Q D^l_f + drift xi)``,
  ``xi ~ N(0, I/d)``, ``Q = I``. Always on; the other scenarios add to it.
* ``rotation``: ``Q`` is a random orthogonal matrix that rotates every plane of a
  random orthonormal basis by ``rotation_angle`` (so ``cos(v, Q v) = cos(angle)`` for
  every ``v`` when ``d`` is even). Reported in ``SyntheticWorld.rotations``:
  with ``drift = 0``, ``D^{l+1}_child = D^l_f Q^T`` (rows).
* ``rescale``: ``s^{l+1}_f = s^l_f * rescale_growth * r_f`` with ``r_f`` log-uniform in
  ``rescale_range`` (norm growth with depth plus per-feature magnitude change; layer-0
  magnitudes are 1, as they are for every layer without ``rescale``).
* ``birth_death``: ``round(birth_death_fraction * n_features)`` features die (no
  feature at ``l+1``; truth -1) and as many new concepts are born at ``l+1`` (they
  fire at every layer's token stream but are written only from ``l+1`` on).
* ``split_merge``: ``round(split_merge_fraction * n_features)`` plain features split:
  parent ``f`` (concept ``k``) gets a context concept ``g`` with the rule
  ``(k, g, split_context_prob)`` and becomes two children at ``l+1``, ``k`` gated by
  "``g`` fires" and by "``g`` silent" (disjoint contexts), with directions
  ``normalise(Q D_f + split_spread u_i)`` for two orthonormal ``u_i`` orthogonal to
  ``Q D_f`` (the best of 16 draws: least coherent with the layer's other features).
  And ``round(split_merge_fraction * n_features / 2)`` pairs of plain
  features merge into one feature reading both concepts, direction
  ``normalise(Q D_a + Q D_b)``, magnitude ``(s_a + s_b) / 2``.
* ``near_duplicates``: ``round(near_duplicate_fraction * n_features / 2)`` pairs
  ``(i, j)`` of layer-0 features get almost the same direction: at every layer
  ``D_i = normalise(u + e v_i)``, ``D_j = normalise(u + e v_j)`` with ``u`` the pair's
  shared direction (carried like any feature), ``v_i, v_j`` orthonormal and
  orthogonal to ``u`` and *redrawn at every layer*, and ``e = sqrt(1/c - 1)`` so that
  ``cos(D_i, D_j) = c ~ U(near_duplicate_cos)`` exactly. Across layers the pair is
  therefore exchangeable for any decoder-based method. Each member has its own
  context partner feature (rule ``(i, p_i, near_duplicate_context_prob)``), so the
  hidden states where ``i`` fires differ from those where ``j`` fires.
* ``disjoint_tokens``: layer ``l`` streams concept activations from its own token
  sample (``SyntheticWorld.shared_tokens`` is False); nothing else changes.

Features involved in a structural event are distinct. Splits, merges and split
contexts take plain features (one concept, no gate); any other feature may die
(including earlier split children and merged features). Split contexts and
near-duplicate members and partners are protected from all events (so a context
stays visible in the hidden state at every layer). Each transition consumes plain
features, so the depth is bounded: with every scenario on, the defaults support up
to 6 layers (a clear ValueError says when a setting asks for more).

Truth
-----
For an adjacent pair the *canonical child* of a layer-``l`` feature is its
continuation, -1 if it dies, the merged feature for both parents of a merge, and for
a split parent the child that carries the larger share of its firings: the
"context silent" child when ``split_context_prob < 0.5`` (the default 0.35, so the
canonical child receives 65% of the parent's firings), else the "context fires"
child. ``truth[(A, B)]`` is the canonical child in B's *true feature* index
(chains of canonical children for non-adjacent pairs); ``truth_sets[(A, B)]``
``[n_A, n_B]`` is True for every descendant (both children of a split). SAEs
number their latents differently: :class:`SyntheticSAEs` carries the same truth in
SAE latent indices (see :func:`express_in_latents`).

SAEs
----
:func:`oracle_saes` builds sae_lens SAEs at the true dictionary of each layer (decoder
= true directions, encoder = matched filters that also read a split child's or a
near-duplicate's context, JumpReLU thresholds calibrated per latent on ``train``
tokens), with
latents randomly permuted per layer and perturbed; latent ``j`` stands for true
feature ``pi[j]``. :func:`trained_saes` trains sae_lens TopK SAEs on the ``train``
split; a trained latent stands for the true feature of highest decoder cosine if that
cosine is at least ``min_cos`` (else for nothing). Either way the truth between
latents follows from the truth between true features (:func:`express_in_latents`).

Token streams are generated in fixed chunks of ``chunk_size`` tokens, each from its
own seeded generator, so a stream's content depends on ``(seed, split, chunk)`` only:
never on the batch size, the order of calls or global RNG state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

SCENARIOS: tuple[str, ...] = (
    "identity",
    "rotation",
    "rescale",
    "birth_death",
    "split_merge",
    "near_duplicates",
    "disjoint_tokens",
)
#: split name -> code used in the seeds of its chunks (0 is the pilot chunk)
SPLITS: dict[str, int] = {"train": 1, "profile": 2, "heldout": 3}
_PILOT = 0

#: labels of layer-A features in ``kinds`` (one per feature and pair), in priority order
KINDS: tuple[str, ...] = ("dies", "splits", "merges", "near_duplicate", "persists")


def hook_name(layer: int) -> str:
    """transformer_lens hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------------------- config
@dataclass
class SyntheticConfig:
    """Knobs of the planted model (see the module docstring for the semantics).

    Attributes:
        n_features: true features (= concepts) at layer 0.
        d_model: width d of the hidden states.
        n_layers: layers 0..n_layers-1; truth for every adjacent pair and (0, last).
        n_tokens: tokens per split (``train``, ``profile``, ``heldout``) and layer stream.
        noise: std of the isotropic hidden-state noise relative to the per-coordinate
            RMS of the noise-free signal (0.05: noise energy 0.25% of the signal's).
        scenarios: any of :data:`SCENARIOS`, combined.
        seed: seed of everything (structure and streams).
        firing_exponent, firing_max_prob, firing_min_prob: Zipfian firing
            probabilities (``sae_lens`` ``ZipfianFiringProbabilityConfig``), assigned to
            concepts in random order.
        magnitude_mean, magnitude_std: firing magnitude ``max(0, N(mean, std^2))``.
        correlation_rank, correlation_scale: low-rank copula of co-firing
            (``correlation_scale = 0`` makes concepts independent).
        drift: per-transition direction noise (``cos(D^l, D^{l+1}) ~ 1/sqrt(1+drift^2)``).
        spread_steps: gradient steps spreading the directions apart (0: plain random
            unit vectors; skipped above 4096 concepts).
        rotation_angle: rotation of every plane per transition, radians (pi/2: every
            direction ends orthogonal to where it was).
        rescale_growth, rescale_range: layer-wide magnitude growth per transition and
            log-uniform range of per-feature magnitude factors.
        birth_death_fraction: features (of ``n_features``) dying, and born, per transition.
        split_merge_fraction: features (of ``n_features``) splitting per transition;
            half as many pairs merge.
        split_context_prob: P(context fires | split parent fires).
        split_spread: size of the offset separating the two children of a split
            (``cos(child, parent) = 1/sqrt(1+spread^2)``).
        near_duplicate_fraction: features (of ``n_features``) in near-duplicate pairs (as
            many more are reserved as their context partners).
        near_duplicate_cos: range of the pairs' direction cosine.
        near_duplicate_context_prob: P(own context partner fires | member fires).
        bias: norm of a random per-layer offset b^l, in units of the layer's typical
            feature magnitude (0: centred hidden states).
        chunk_size: tokens per generated chunk (content never depends on batch sizes).
        threads: torch intra-op threads while this module computes (its tensors are
            small, where thread synchronisation costs more than it gains, badly so on a
            busy machine); torch's own setting is restored afterwards. None: leave it.
    """

    n_features: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_tokens: int = 20000
    noise: float = 0.05
    scenarios: tuple[str, ...] = ("identity",)
    seed: int = 0
    firing_exponent: float = 1.0
    firing_max_prob: float = 0.2
    firing_min_prob: float = 0.005
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    correlation_rank: int = 8
    correlation_scale: float = 0.075
    drift: float = 0.2
    spread_steps: int = 60
    rotation_angle: float = math.pi / 2
    rescale_growth: float = 2.0
    rescale_range: tuple[float, float] = (0.67, 1.5)
    birth_death_fraction: float = 0.1
    split_merge_fraction: float = 0.06
    split_context_prob: float = 0.35
    split_spread: float = 0.75
    near_duplicate_fraction: float = 0.1
    near_duplicate_cos: tuple[float, float] = (0.95, 0.99)
    near_duplicate_context_prob: float = 0.95
    bias: float = 0.0
    chunk_size: int = 4096
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.scenarios, str):
            self.scenarios = (self.scenarios,)
        self.scenarios = tuple(str(s) for s in self.scenarios)
        self.rescale_range = tuple(float(x) for x in self.rescale_range)  # type: ignore[assignment]
        self.near_duplicate_cos = tuple(float(x) for x in self.near_duplicate_cos)  # type: ignore[assignment]
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"synthetic.scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
        checks = [
            (self.n_features >= 2, "synthetic.n_features must be >= 2"),
            (self.d_model >= 2, "synthetic.d_model must be >= 2"),
            (self.n_layers >= 2, "synthetic.n_layers must be >= 2"),
            (self.n_tokens >= 1, "synthetic.n_tokens must be >= 1"),
            (self.noise >= 0, "synthetic.noise must be >= 0"),
            (0 < self.firing_min_prob < self.firing_max_prob <= 1,
             "synthetic.firing_min_prob / firing_max_prob must satisfy 0 < min < max <= 1"),
            (self.magnitude_mean > 0 and self.magnitude_std >= 0,
             "synthetic.magnitude_mean must be > 0 and magnitude_std >= 0"),
            (self.correlation_rank >= 1 and self.correlation_scale >= 0,
             "synthetic.correlation_rank must be >= 1 and correlation_scale >= 0"),
            (self.drift >= 0, "synthetic.drift must be >= 0"),
            (len(self.rescale_range) == 2 and 0 < self.rescale_range[0] <= self.rescale_range[1],
             "synthetic.rescale_range must be (lo, hi) with 0 < lo <= hi"),
            (self.rescale_growth > 0, "synthetic.rescale_growth must be > 0"),
            (0 <= self.birth_death_fraction < 1, "synthetic.birth_death_fraction must be in [0, 1)"),
            (0 <= self.split_merge_fraction < 1, "synthetic.split_merge_fraction must be in [0, 1)"),
            (0 < self.split_context_prob < 1, "synthetic.split_context_prob must be in (0, 1)"),
            (0 <= self.near_duplicate_fraction < 1, "synthetic.near_duplicate_fraction must be in [0, 1)"),
            (len(self.near_duplicate_cos) == 2 and 0 < self.near_duplicate_cos[0] <= self.near_duplicate_cos[1] < 1,
             "synthetic.near_duplicate_cos must be (lo, hi) with 0 < lo <= hi < 1"),
            (0 < self.near_duplicate_context_prob <= 1, "synthetic.near_duplicate_context_prob must be in (0, 1]"),
            (self.bias >= 0, "synthetic.bias must be >= 0"),
            (self.chunk_size >= 1, "synthetic.chunk_size must be >= 1"),
            (self.threads is None or self.threads >= 1, "synthetic.threads must be >= 1 or null"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def has(self, scenario: str) -> bool:
        return scenario in self.scenarios

    @property
    def firing(self) -> Any:
        """The ``sae_lens`` firing-probability config these knobs describe."""
        from sae_lens.synthetic import ZipfianFiringProbabilityConfig

        return ZipfianFiringProbabilityConfig(
            exponent=self.firing_exponent, max_prob=self.firing_max_prob, min_prob=self.firing_min_prob
        )


# ---------------------------------------------------------------------------- helpers
def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous setting."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _spread_directions(x: Tensor, steps: int, max_n: int = 4096) -> Tensor:
    """Unit rows ``[n, d]`` pushed apart by ``steps`` of descent on ``sum_{i!=j} cos_ij^4 / 4``.

    Each step moves every row along the tangent part of its gradient ``sum_j G_ij^3 x_j``,
    scaled so that the row with the largest gradient turns by ``lr`` radians (``lr``
    decays from 0.11 to 0.01), then renormalises; this cannot overshoot whatever ``n / d``.
    Skipped for ``n > max_n`` (the Gram matrix is ``n x n``).
    """
    x = _normalise(x)
    if x.shape[0] > max_n:
        return x
    for t in range(steps):
        gram = x @ x.T
        gram.fill_diagonal_(0.0)
        grad = (gram * gram * gram) @ x
        tangent = grad - (grad * x).sum(-1, keepdim=True) * x
        lr = 0.1 * (1 - t / steps) + 0.01
        x = _normalise(x - lr * tangent / tangent.norm(dim=1).max().clamp_min(1e-12))
    return x


def _plane_rotation(d: int, angle: float, gen: torch.Generator) -> Tensor:
    """``[d, d]`` orthogonal ``Q = U R U^T``: ``R`` rotates each coordinate plane (0,1), (2,3), ... by ``angle``.

    For even ``d``, ``v . Q v = cos(angle) |v|^2`` for every ``v``.
    """
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    r = torch.eye(d, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    for i in range(0, d - 1, 2):
        r[i, i], r[i, i + 1], r[i + 1, i], r[i + 1, i + 1] = c, -s, s, c
    return (u @ r @ u.T).float()


def _orthonormal_offsets(base: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """``[n, m, d]``: for each unit row of ``base [n, d]``, ``m`` orthonormal vectors orthogonal to it."""
    n, d = base.shape
    basis = [base]
    out = []
    for _ in range(m):
        v = torch.randn(n, d, generator=gen)
        for b in basis:
            v = v - (v * b).sum(-1, keepdim=True) * b
        v = _normalise(v)
        basis.append(v)
        out.append(v)
    return torch.stack(out, dim=1)


def _split_directions(centre: Tensor, others: Tensor, spread: float, gen: torch.Generator, tries: int = 16) -> Tensor:
    """``[S, 2, d]`` children ``normalise(centre + spread u_i)``, ``u_1, u_2`` orthonormal and ⟂ ``centre``.

    Of ``tries`` random draws per split, keeps the one whose children have the smallest
    largest ``|cos|`` with ``others [m, d]`` (the layer's other directions), so that
    children are no more entangled with unrelated features than those are with each other.
    """
    S, d = centre.shape
    rep = centre.repeat_interleave(tries, dim=0)  # [S * tries, d]
    u = _orthonormal_offsets(rep, 2, gen)  # [S * tries, 2, d]
    kids = _normalise(rep[:, None, :] + spread * u).view(S, tries, 2, d)
    worst = (kids @ others.T).abs().amax(dim=(2, 3)) if others.shape[0] else torch.zeros(S, tries)
    best = worst.argmin(dim=1)
    return kids[torch.arange(S), best]


def _rebatch(chunks: Iterator[Any], batch_size: int) -> Iterator[Any]:
    """Re-cut a stream of chunks (tensors, or tuples of tensors sharing dim 0) into ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[Any] = []
    n_pending = 0
    for chunk in chunks:
        pending.append(chunk)
        n_pending += _rows(chunk)
        while n_pending >= batch_size:
            cat = _cat(pending)
            yield _slice(cat, 0, batch_size)
            rest = _slice(cat, batch_size, n_pending)
            n_pending -= batch_size
            pending = [rest] if n_pending else []
    if n_pending:
        yield _cat(pending)


def _rows(x: Any) -> int:
    return int(x[0].shape[0]) if isinstance(x, tuple) else int(x.shape[0])


def _cat(xs: list[Any]) -> Any:
    if len(xs) == 1:
        return xs[0]
    if isinstance(xs[0], tuple):
        return tuple(torch.cat([x[i] for x in xs]) for i in range(len(xs[0])))
    return torch.cat(xs)


def _slice(x: Any, a: int, b: int) -> Any:
    return tuple(t[a:b] for t in x) if isinstance(x, tuple) else x[a:b]


@dataclass
class _Layer:
    """True features of one layer: what each reads (concepts, gate) and how it is written."""

    src: Tensor  # [n, 2] long concept ids, -1 padding (second source only for merges)
    gate: Tensor  # [n] long gating concept, -1 if ungated
    gate_on: Tensor  # [n] bool: the feature fires when the gate fires (True) or is silent (False)
    directions: Tensor  # [n, d] unit rows
    scales: Tensor  # [n] magnitudes s^l

    @property
    def n(self) -> int:
        return int(self.src.shape[0])

    def plain(self) -> Tensor:
        """``[n]`` bool: one source, no gate."""
        return (self.src[:, 1] < 0) & (self.gate < 0)


@dataclass
class _Transition:
    canonical: Tensor  # [n_a] long canonical child at l+1, -1 if it dies
    children: Tensor  # [n_a, n_b] bool
    kinds: tuple[str, ...]  # per layer-l feature
    rotation: Tensor  # [d, d]
    splits: Tensor  # [S, 3] long (parent, canonical child, other child)
    merges: Tensor  # [M, 3] long (parent a, parent b, child)


# ---------------------------------------------------------------------------- world
@dataclass(eq=False)
class SyntheticWorld:
    """A planted multi-layer model with its ground truth (built by :func:`make_world`).

    Attributes (``n_l`` = true features at layer l, in *true feature* indices):
        config: the :class:`SyntheticConfig`.
        hooks: ``blocks.{l}.hook_resid_post`` for every layer.
        directions: hook -> ``[n_l, d]`` unit true directions ``D^l``.
        scales: hook -> ``[n_l]`` magnitudes ``s^l``.
        bias: hook -> ``[d]`` layer offset ``b^l``.
        noise_std: hook -> ``sigma_l`` (per coordinate).
        firing_rate: hook -> ``[n_l]`` fraction of tokens on which each feature fires
            (estimated on the pilot chunk).
        truth: ``(hook_a, hook_b)`` -> ``[n_a]`` long canonical descendant in B, -1 if none,
            for every pair in :attr:`pairs`; :meth:`truth_between` gives any other.
        truth_sets: same keys -> ``[n_a, n_b]`` bool, every descendant.
        kinds: same keys -> per A feature one of :data:`KINDS` (the first event on its
            canonical chain, by priority dies > splits > merges; ``near_duplicate`` for
            members of a pair; otherwise ``persists``).
        born: same keys -> ``[n_b]`` bool, B features with no ancestor in A.
        rotations: same keys -> ``[d, d]`` the rotation ``Q`` applied between A and B
            (product over the transitions; identity without ``rotation``).
        splits, merges: adjacent pairs -> ``[S, 3]`` (parent, canonical child, other child)
            and ``[M, 3]`` (parent a, parent b, merged child).
        near_duplicate_pairs: hook -> ``[P, 2]`` feature indices of the pairs at that layer.
        near_duplicate_contexts: hook -> ``[P, 2]`` the context partner feature of each member.
        gate_feature: hook -> ``[n_l]`` long, for a split child the feature (same layer) whose
            firing gates it, -1 for ungated features.
        gate_on: hook -> ``[n_l]`` bool, True if the child fires only with its gate, False if
            only without it.
    """

    config: SyntheticConfig
    hooks: list[str]
    directions: dict[str, Tensor]
    scales: dict[str, Tensor]
    bias: dict[str, Tensor]
    noise_std: dict[str, float]
    firing_rate: dict[str, Tensor]
    truth: dict[tuple[str, str], Tensor]
    truth_sets: dict[tuple[str, str], Tensor]
    kinds: dict[tuple[str, str], tuple[str, ...]]
    born: dict[tuple[str, str], Tensor]
    rotations: dict[tuple[str, str], Tensor]
    splits: dict[tuple[str, str], Tensor]
    merges: dict[tuple[str, str], Tensor]
    near_duplicate_pairs: dict[str, Tensor]
    near_duplicate_contexts: dict[str, Tensor]
    gate_feature: dict[str, Tensor]
    gate_on: dict[str, Tensor]
    # concept model (private)
    _layers: list[_Layer] = field(repr=False)
    _transitions: list[_Transition] = field(repr=False)
    _probs: Tensor = field(repr=False)  # [K]
    _thresholds: Tensor = field(repr=False)  # [K] copula thresholds
    _factor: Tensor | None = field(repr=False)  # [K, r]
    _diag_sqrt: Tensor | None = field(repr=False)  # [K]
    _rules: Tensor = field(repr=False)  # [R, 2] long (parent, context)
    _rule_probs: Tensor = field(repr=False)  # [R]
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)  # recent concept chunks
    _cache_size: int = 8

    # ------------------------------------------------------------------ structure
    @property
    def n_layers(self) -> int:
        return len(self.hooks)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_concepts(self) -> int:
        return int(self._probs.shape[0])

    @property
    def shared_tokens(self) -> bool:
        """True when every layer is streamed from the same tokens (aligned row by row)."""
        return not self.config.has("disjoint_tokens")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Adjacent pairs, then ``(first, last)`` when there are more than two layers."""
        out = [(self.hooks[i], self.hooks[i + 1]) for i in range(self.n_layers - 1)]
        if self.n_layers > 2:
            out.append((self.hooks[0], self.hooks[-1]))
        return out

    def layer_of(self, hook: str) -> int:
        try:
            return self.hooks.index(hook)
        except ValueError:
            raise KeyError(f"hook {hook!r} is not in this synthetic world; hooks are {self.hooks}") from None

    def n_true(self, hook: str) -> int:
        return self._layers[self.layer_of(hook)].n

    def expected_l0(self, hook: str) -> float:
        """Mean number of true features firing per token at ``hook`` (pilot estimate)."""
        return float(self.firing_rate[hook].sum())

    def truth_between(self, hook_a: str, hook_b: str) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor]:
        """``(truth [n_a], truth_sets [n_a, n_b], kinds, born [n_b])`` for any layers ``a < b``."""
        a, b = self.layer_of(hook_a), self.layer_of(hook_b)
        if not a < b:
            raise ValueError(f"truth is defined from an earlier to a later layer, got {hook_a} -> {hook_b}")
        return _compose(self._transitions[a:b], self._layers[a].n, self._nd_members(a))

    def describe(self) -> dict[str, Any]:
        """Counts per layer and per pair (for logs and reports)."""
        return {
            "scenarios": list(self.config.scenarios),
            "n_true": {h: self.n_true(h) for h in self.hooks},
            "expected_l0": {h: round(self.expected_l0(h), 3) for h in self.hooks},
            "kinds": {
                f"{a}->{b}": {k: int(sum(x == k for x in self.kinds[(a, b)])) for k in KINDS}
                for a, b in self.pairs
            },
            "born": {f"{a}->{b}": int(self.born[(a, b)].sum()) for a, b in self.pairs},
        }

    def _nd_members(self, layer: int) -> Tensor:
        members = torch.zeros(self._layers[layer].n, dtype=torch.bool)
        members[self.near_duplicate_pairs[self.hooks[layer]].flatten()] = True
        return members

    # ------------------------------------------------------------------ streams
    def _stream_id(self, layer: int) -> int:
        return 0 if self.shared_tokens else layer + 1

    def _split_code(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return SPLITS[split]

    def concept_chunk(self, split_code: int, stream: int, chunk: int, size: int) -> Tensor:
        """``[size, K]`` concept activations ``z`` of one chunk (deterministic in its arguments)."""
        return self._concept_chunk(split_code, stream, chunk, size).clone()

    def _concept_chunk(self, split_code: int, stream: int, chunk: int, size: int) -> Tensor:
        # a few recent chunks are kept, so that streaming several hooks side by side
        # (aligned tokens) samples each chunk once; callers must not modify the result
        key = (split_code, stream, chunk, size)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        z = self._sample_concepts(split_code, stream, chunk, size)
        self._cache[key] = z
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return z

    def _sample_concepts(self, split_code: int, stream: int, chunk: int, size: int) -> Tensor:
        cfg = self.config
        gen = _generator(cfg.seed, 100, split_code, stream, chunk)
        K = self.n_concepts
        if self._factor is not None:
            eps = torch.randn(size, self._factor.shape[1], generator=gen)
            eta = torch.randn(size, K, generator=gen)
            fire = (eps @ self._factor.T + eta * self._diag_sqrt) > self._thresholds
        else:
            fire = torch.rand(size, K, generator=gen) < self._probs
        if self._rules.shape[0]:
            parent, ctx = self._rules[:, 0], self._rules[:, 1]
            coin = torch.rand(size, self._rules.shape[0], generator=gen) < self._rule_probs
            fire[:, ctx] = torch.where(fire[:, parent], coin, fire[:, ctx])
        rows, cols = fire.nonzero(as_tuple=True)
        mags = cfg.magnitude_mean + cfg.magnitude_std * torch.randn(rows.shape[0], generator=gen)
        z = torch.zeros(size, K)
        z[rows, cols] = mags.clamp_min(0.0)
        return z

    def _activations_from_concepts(self, layer: int, z: Tensor) -> Tensor:
        """``[N, n_l]`` true activations ``c = s * a`` of layer ``layer`` from concepts ``z [N, K]``."""
        lay = self._layers[layer]
        a = z.index_select(1, lay.src[:, 0])
        merged = (lay.src[:, 1] >= 0).nonzero().flatten()
        if len(merged):
            a[:, merged] += z.index_select(1, lay.src[merged, 1])
        gated = (lay.gate >= 0).nonzero().flatten()
        if len(gated):
            gate_fires = z.index_select(1, lay.gate[gated]) > 0
            a[:, gated] *= gate_fires == lay.gate_on[gated]
        return a * lay.scales

    def _chunks(self, hook: str, split: str, n_tokens: int | None, what: str) -> Iterator[Any]:
        layer = self.layer_of(hook)
        code = self._split_code(split)
        stream = self._stream_id(layer)
        total = self.config.n_tokens if n_tokens is None else int(n_tokens)
        size = self.config.chunk_size
        for chunk, start in enumerate(range(0, total, size)):
            m = min(size, total - start)
            ids = torch.arange(start, start + m, dtype=torch.long) + (stream << 40)
            if what == "ids":
                yield ids
                continue
            with _threads(self.config.threads):
                z = self._concept_chunk(code, stream, chunk, size)[:m]
                c = self._activations_from_concepts(layer, z)
                if what != "activations":
                    gen = _generator(self.config.seed, 200, code, layer, chunk)
                    noise = torch.randn(size, self.d_model, generator=gen)[:m] * self.noise_std[hook]
                    h = c @ self._layers[layer].directions + self.bias[hook] + noise
            if what == "activations":
                yield c
            elif what == "hidden":
                yield h
            else:  # "all"
                yield (h, c, ids)

    def hidden_states(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N, d]`` hidden states ``h^l_t`` of ``split`` (``n_tokens`` rows in all).

        Deterministic: the same rows for any ``batch_size``; with shared tokens, row t of
        every layer is the same token. ``n_tokens`` defaults to ``config.n_tokens`` (the
        ``train`` split may be streamed for longer).
        """
        return _rebatch(self._chunks(hook, split, n_tokens, "hidden"), batch_size)

    def true_activations(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N, n_l]`` true activations ``c^l_t`` (``h = c D + b + noise``), row-aligned with
        :meth:`hidden_states`."""
        return _rebatch(self._chunks(hook, split, n_tokens, "activations"), batch_size)

    def token_ids(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Stream ``[N]`` long token identifiers: equal across layers iff they are the same token."""
        return _rebatch(self._chunks(hook, split, n_tokens, "ids"), batch_size)

    def stream(
        self, hook: str, split: str = "profile", batch_size: int = 4096, n_tokens: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Stream ``(hidden [N, d], true activations [N, n_l], token ids [N])`` in one pass."""
        return _rebatch(self._chunks(hook, split, n_tokens, "all"), batch_size)

    def iter_batches(
        self, split: str = "profile", hooks: Sequence[str] | None = None, batch_size: int = 4096,
        n_tokens: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Batches in the format of :class:`saeot.data.datamodule.HiddenStateDataModule`.

        Every token is a context of length 1: ``tokens [N, 1]`` (token ids),
        ``context_index [N]``, ``positions [N, 1]`` (zeros), ``mask [N, 1]`` (True) and
        ``hidden``: hook -> ``[N, 1, d]``. Several hooks need shared tokens.
        """
        hooks = list(self.hooks if hooks is None else hooks)
        if len(hooks) > 1 and not self.shared_tokens:
            raise ValueError(
                "synthetic world uses disjoint_tokens: layers have different tokens; stream one hook at a time"
            )
        streams = [self.stream(h, split, batch_size, n_tokens) for h in hooks]
        for items in zip(*streams):
            ids = items[0][2]
            yield {
                "tokens": ids[:, None],
                "context_index": ids,
                "positions": torch.zeros_like(ids)[:, None],
                "mask": torch.ones(ids.shape[0], 1, dtype=torch.bool),
                "hidden": {h: it[0][:, None, :] for h, it in zip(hooks, items)},
            }


def _compose(
    transitions: Sequence[_Transition], n_a: int, nd_members: Tensor
) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor]:
    """Chain adjacent transitions: canonical descendants, descendant sets, kinds, born."""
    canon = torch.arange(n_a)
    sets = torch.eye(n_a, dtype=torch.bool)
    kinds = ["persists"] * n_a
    rank = {k: i for i, k in enumerate(KINDS)}
    for tr in transitions:
        alive = canon >= 0
        step_kind = [tr.kinds[int(c)] if c >= 0 else "dies" for c in canon]
        kinds = [min(k, s, key=rank.__getitem__) for k, s in zip(kinds, step_kind)]
        canon = torch.where(alive, tr.canonical[canon.clamp_min(0)], torch.full_like(canon, -1))
        sets = (sets.float() @ tr.children.float()) > 0
    kinds = ["near_duplicate" if (k == "persists" and bool(nd)) else k for k, nd in zip(kinds, nd_members)]
    born = ~sets.any(dim=0)
    return canon, sets, tuple(kinds), born


# ---------------------------------------------------------------------------- builder
def make_world(cfg: SyntheticConfig) -> SyntheticWorld:
    """Build the planted model: concepts, per-layer true features, transitions and truth.

    Cost: O(n_layers * n_features * d) plus a pilot chunk per layer; about 0.2 s at the
    defaults. Raises ValueError (naming the setting) if ``n_features`` is too small for
    the requested scenario fractions.
    """
    with _threads(cfg.threads):
        return _build_world(cfg)


def _build_world(cfg: SyntheticConfig) -> SyntheticWorld:
    from sae_lens.synthetic import generate_random_low_rank_correlation_matrix

    gen = _generator(cfg.seed, 1)
    d, n0, L = cfg.d_model, cfg.n_features, cfg.n_layers
    n_die = round(cfg.birth_death_fraction * n0) if cfg.has("birth_death") else 0
    n_split = round(cfg.split_merge_fraction * n0) if cfg.has("split_merge") else 0
    n_merge = round(cfg.split_merge_fraction * n0 / 2) if cfg.has("split_merge") else 0
    n_nd = round(cfg.near_duplicate_fraction * n0 / 2) if cfg.has("near_duplicates") else 0
    if 4 * n_nd > n0:
        raise ValueError(
            f"synthetic.near_duplicate_fraction={cfg.near_duplicate_fraction} needs {4 * n_nd} features "
            f"(members and context partners) but n_features={n0}"
        )
    K = n0 + n_die * (L - 1)

    # concepts: firing probabilities, correlation, base directions
    probs = cfg.firing.generate(K)[torch.randperm(K, generator=gen)].float()
    base = _spread_directions(torch.randn(K, d, generator=gen), cfg.spread_steps)
    if cfg.correlation_scale > 0:
        lr = generate_random_low_rank_correlation_matrix(
            K, cfg.correlation_rank, cfg.correlation_scale, seed=_seed(cfg.seed, 2) % (2**31)
        )
        factor, diag_sqrt = lr.correlation_factor.float(), lr.correlation_diag.float().sqrt()
        thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * probs)
    else:
        factor, diag_sqrt, thresholds = None, None, torch.full((K,), float("nan"))

    lo, hi = (math.log(x) for x in cfg.rescale_range)

    def magnitude_factors(n: int) -> Tensor:
        if not cfg.has("rescale"):
            return torch.ones(n)
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen))

    # layer 0
    layer0 = _Layer(
        src=torch.stack([torch.arange(n0), torch.full((n0,), -1)], dim=1),
        gate=torch.full((n0,), -1, dtype=torch.long),
        gate_on=torch.zeros(n0, dtype=torch.bool),
        directions=base[:n0].clone(),
        scales=torch.ones(n0),
    )
    protected = torch.zeros(K, dtype=torch.bool)  # concepts that no event may touch
    rules: list[tuple[int, int, float]] = []
    nd_pairs = torch.zeros(0, 2, dtype=torch.long)  # feature indices at the current layer
    nd_partner_concepts = torch.zeros(0, 2, dtype=torch.long)
    nd_eps = torch.zeros(0)
    nd_base = torch.zeros(0, d)
    if n_nd:
        pick = torch.randperm(n0, generator=gen)[: 4 * n_nd]
        nd_pairs = pick[: 2 * n_nd].view(n_nd, 2)
        nd_partner_concepts = pick[2 * n_nd :].view(n_nd, 2)
        lo_c, hi_c = cfg.near_duplicate_cos
        cos = lo_c + (hi_c - lo_c) * torch.rand(n_nd, generator=gen)
        nd_eps = torch.sqrt(1.0 / cos - 1.0)
        nd_base = layer0.directions[nd_pairs[:, 0]].clone()
        _place_near_duplicates(layer0.directions, nd_pairs, nd_base, nd_eps, gen)
        protected[pick] = True
        for (i, j), (pi, pj) in zip(nd_pairs.tolist(), nd_partner_concepts.tolist()):
            rules.append((i, pi, cfg.near_duplicate_context_prob))
            rules.append((j, pj, cfg.near_duplicate_context_prob))

    layers = [layer0]
    transitions: list[_Transition] = []
    nd_pairs_per_layer = [nd_pairs]
    q_cum = torch.eye(d)
    next_concept = n0
    growth = 1.0
    for _ in range(L - 1):
        lay = layers[-1]
        q = _plane_rotation(d, cfg.rotation_angle, gen) if cfg.has("rotation") else torch.eye(d)
        q_cum = q @ q_cum
        step = cfg.rescale_growth if cfg.has("rescale") else 1.0
        growth *= step
        concept_of = lay.src[:, 0]
        # any unprotected feature may die; splits, merges and split contexts need plain ones
        free = ~protected[concept_of]
        free_plain = (free & lay.plain()).nonzero().flatten()
        free_plain = free_plain[torch.randperm(len(free_plain), generator=gen)]
        need = 2 * n_split + 2 * n_merge
        split = free_plain[:n_split]
        merge = free_plain[n_split : n_split + 2 * n_merge].view(n_merge, 2)
        contexts = free_plain[n_split + 2 * n_merge : need]
        taken = torch.zeros(lay.n, dtype=torch.bool)
        taken[free_plain[:need]] = True
        can_die = (free & ~taken).nonzero().flatten()
        die = can_die[torch.randperm(len(can_die), generator=gen)[:n_die]]
        if need > len(free_plain) or len(die) < n_die:
            raise ValueError(
                f"synthetic: transition {len(layers) - 1}->{len(layers)} needs {need} free plain features "
                f"and {n_die} more that may die, but only {len(free_plain)} plain / {len(can_die) + need} free "
                "exist; raise synthetic.n_features, lower the fractions or synthetic.n_layers"
            )
        protected[concept_of[contexts]] = True
        for p, c in zip(concept_of[split].tolist(), concept_of[contexts].tolist()):
            rules.append((p, c, cfg.split_context_prob))

        def carry(x: Tensor) -> Tensor:
            moved = x @ q.T
            if cfg.drift > 0:
                moved = moved + cfg.drift * torch.randn(moved.shape, generator=gen) / math.sqrt(d)
            return _normalise(moved)

        event = torch.zeros(lay.n, dtype=torch.bool)
        event[die] = True
        event[split] = True
        event[merge.flatten()] = True
        cont = (~event).nonzero().flatten()  # continuing features, in order
        canonical = torch.full((lay.n,), -1, dtype=torch.long)
        kinds = ["persists"] * lay.n
        for f in die.tolist():
            kinds[f] = "dies"
        canonical[cont] = torch.arange(len(cont))
        src = [lay.src[cont]]
        gate = [lay.gate[cont]]
        gate_on = [lay.gate_on[cont]]
        dirs = [carry(lay.directions[cont])]
        scales = [lay.scales[cont] * step * magnitude_factors(len(cont))]
        n_next = len(cont)
        parent_of_new: list[list[int]] = [[int(f)] for f in cont]

        split_rows = []
        if n_split:
            centre = _normalise(lay.directions[split] @ q.T)
            child_dirs = _split_directions(centre, dirs[0], cfg.split_spread, gen)  # [S, 2, d]
            silent_first = cfg.split_context_prob < 0.5
            for s_i, (f, g) in enumerate(zip(split.tolist(), concept_of[contexts].tolist())):
                first_on = not silent_first  # the canonical child comes first
                for slot, on in enumerate((first_on, not first_on)):
                    src.append(lay.src[f : f + 1])
                    gate.append(torch.tensor([g]))
                    gate_on.append(torch.tensor([on]))
                    dirs.append(child_dirs[s_i, slot : slot + 1])
                    scales.append(lay.scales[f : f + 1] * step * magnitude_factors(1))
                    parent_of_new.append([f])
                canonical[f] = n_next
                kinds[f] = "splits"
                split_rows.append((f, n_next, n_next + 1))
                n_next += 2
        merge_rows = []
        for a, b in merge.tolist():
            src.append(torch.tensor([[int(lay.src[a, 0]), int(lay.src[b, 0])]]))
            gate.append(torch.tensor([-1]))
            gate_on.append(torch.tensor([False]))
            dirs.append(_normalise(lay.directions[a] @ q.T + lay.directions[b] @ q.T)[None])
            scales.append(((lay.scales[a] + lay.scales[b]) / 2 * step * magnitude_factors(1)).reshape(1))
            parent_of_new.append([a, b])
            canonical[a] = canonical[b] = n_next
            kinds[a] = kinds[b] = "merges"
            merge_rows.append((a, b, n_next))
            n_next += 1
        if n_die:
            new = torch.arange(next_concept, next_concept + n_die)
            next_concept += n_die
            src.append(torch.stack([new, torch.full_like(new, -1)], dim=1))
            gate.append(torch.full((n_die,), -1, dtype=torch.long))
            gate_on.append(torch.zeros(n_die, dtype=torch.bool))
            dirs.append(_normalise(base[new] @ q_cum.T))
            scales.append(growth * magnitude_factors(n_die))
            parent_of_new.extend([] for _ in range(n_die))
            n_next += n_die

        nxt = _Layer(
            src=torch.cat(src).long(),
            gate=torch.cat(gate).long(),
            gate_on=torch.cat(gate_on).bool(),
            directions=torch.cat(dirs),
            scales=torch.cat(scales).float(),
        )
        if n_nd:
            nd_base = _normalise(nd_base @ q.T + (cfg.drift * torch.randn(nd_base.shape, generator=gen) / math.sqrt(d)))
            nd_pairs = canonical[nd_pairs]
            _place_near_duplicates(nxt.directions, nd_pairs, nd_base, nd_eps, gen)
        children = torch.zeros(lay.n, n_next, dtype=torch.bool)
        for child, parents in enumerate(parent_of_new):
            for p in parents:
                children[p, child] = True
        transitions.append(
            _Transition(
                canonical=canonical,
                children=children,
                kinds=tuple(kinds),
                rotation=q,
                splits=torch.tensor(split_rows, dtype=torch.long).view(-1, 3),
                merges=torch.tensor(merge_rows, dtype=torch.long).view(-1, 3),
            )
        )
        layers.append(nxt)
        nd_pairs_per_layer.append(nd_pairs)

    rule_t = torch.tensor([(p, c) for p, c, _ in rules], dtype=torch.long).view(-1, 2)
    rule_p = torch.tensor([q for _, _, q in rules], dtype=torch.float32)
    hooks = [hook_name(i) for i in range(L)]
    world = SyntheticWorld(
        config=cfg,
        hooks=hooks,
        directions={h: lay.directions for h, lay in zip(hooks, layers)},
        scales={h: lay.scales for h, lay in zip(hooks, layers)},
        bias={h: torch.zeros(d) for h in hooks},
        noise_std={h: 0.0 for h in hooks},
        firing_rate={},
        truth={},
        truth_sets={},
        kinds={},
        born={},
        rotations={},
        splits={},
        merges={},
        near_duplicate_pairs={h: p for h, p in zip(hooks, nd_pairs_per_layer)},
        near_duplicate_contexts={},
        gate_feature={},
        gate_on={h: lay.gate_on.clone() for h, lay in zip(hooks, layers)},
        _layers=layers,
        _transitions=transitions,
        _probs=probs,
        _thresholds=thresholds,
        _factor=factor,
        _diag_sqrt=diag_sqrt,
        _rules=rule_t,
        _rule_probs=rule_p,
    )
    # near-duplicate context partners as feature indices at each layer (they stay plain)
    for h, lay in zip(hooks, layers):
        index = {int(k): f for f, k in enumerate(lay.src[:, 0].tolist()) if lay.src[f, 1] < 0 and lay.gate[f] < 0}
        world.near_duplicate_contexts[h] = torch.tensor(
            [[index[int(k)] for k in row] for row in nd_partner_concepts.tolist()], dtype=torch.long
        ).view(-1, 2)
        world.gate_feature[h] = torch.tensor(
            [index[int(g)] if g >= 0 else -1 for g in lay.gate.tolist()], dtype=torch.long
        )
    # pilot chunk: signal scale (noise, bias) and firing rates
    z = world._sample_concepts(_PILOT, 0, 0, cfg.chunk_size)
    for i, (h, lay) in enumerate(zip(hooks, layers)):
        c = world._activations_from_concepts(i, z)
        signal = c @ lay.directions
        rho = float(signal.pow(2).mean().sqrt())
        world.noise_std[h] = cfg.noise * rho
        world.firing_rate[h] = (c > 0).float().mean(0)
        if cfg.bias > 0:
            typical = float(lay.scales.median()) * cfg.magnitude_mean
            world.bias[h] = cfg.bias * typical * _normalise(torch.randn(d, generator=gen))
    for a, b in world.pairs:
        ia, ib = world.layer_of(a), world.layer_of(b)
        canon, sets, kinds, born = world.truth_between(a, b)
        world.truth[(a, b)], world.truth_sets[(a, b)] = canon, sets
        world.kinds[(a, b)], world.born[(a, b)] = kinds, born
        rot = torch.eye(d)
        for tr in transitions[ia:ib]:
            rot = tr.rotation @ rot
        world.rotations[(a, b)] = rot
        if ib == ia + 1:
            world.splits[(a, b)] = transitions[ia].splits
            world.merges[(a, b)] = transitions[ia].merges
    return world


def _place_near_duplicates(directions: Tensor, pairs: Tensor, base: Tensor, eps: Tensor, gen: torch.Generator) -> None:
    """In place: ``D_i, D_j = normalise(u + e v_i), normalise(u + e v_j)`` with fresh orthonormal ``v`` ⟂ ``u``."""
    if pairs.shape[0] == 0:
        return
    u = _normalise(base)
    v = _orthonormal_offsets(u, 2, gen)  # [P, 2, d]
    d_pair = _normalise(u[:, None, :] + eps[:, None, None] * v)
    directions[pairs[:, 0]] = d_pair[:, 0]
    directions[pairs[:, 1]] = d_pair[:, 1]


# ---------------------------------------------------------------------------- SAEs
@dataclass(eq=False)
class SyntheticSAEs(Mapping[str, Any]):
    """SAEs for every hook of a :class:`SyntheticWorld`, with the truth in *latent* indices.

    It is a read-only mapping ``hook -> sae_lens SAE`` (``dict(result)`` gives the plain
    dict a :class:`~saeot.matching.base.MatchContext` takes), plus:

    Attributes (``F_l`` = latents of the SAE at layer l):
        world: the world the SAEs belong to.
        saes: hook -> SAE.
        latent_to_true: hook -> ``[F_l]`` long, the true feature each latent stands for
            (-1: none, e.g. a trained latent whose decoder matches no true direction).
        latent_cos: hook -> ``[F_l]`` cosine between the latent's decoder row and the
            closest true direction (the one it stands for, when it stands for one).
        truth: ``(hook_a, hook_b)`` -> ``[F_a]`` long, the B latent that is the true
            partner of each A latent; -1 where there is none (the true feature dies, the
            latent is unmapped, or no B latent stands for the true partner). When several
            B latents stand for the partner, the one with the highest ``latent_cos``.
        truth_sets: same keys -> ``[F_a, F_b]`` bool, every B latent standing for a
            descendant of the A latent's true feature.
        kinds: same keys -> per A latent one of :data:`KINDS` or ``unmapped``.
        born: same keys -> ``[F_b]`` bool, B latents standing for a feature born after A.
    """

    world: SyntheticWorld
    saes: dict[str, Any]
    latent_to_true: dict[str, Tensor]
    latent_cos: dict[str, Tensor]
    truth: dict[tuple[str, str], Tensor]
    truth_sets: dict[tuple[str, str], Tensor]
    kinds: dict[tuple[str, str], tuple[str, ...]]
    born: dict[tuple[str, str], Tensor]

    def __getitem__(self, hook: str) -> Any:
        return self.saes[hook]

    def __iter__(self) -> Iterator[str]:
        return iter(self.saes)

    def __len__(self) -> int:
        return len(self.saes)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.truth)

    def kind_masks(self, hook_a: str, hook_b: str) -> dict[str, Tensor]:
        """kind -> ``[F_a]`` bool mask of the A latents of that kind (for per-scenario scores)."""
        kinds = self.kinds[(hook_a, hook_b)]
        return {k: torch.tensor([x == k for x in kinds], dtype=torch.bool) for k in (*KINDS, "unmapped")}

    def has_partner(self, hook_a: str, hook_b: str) -> Tensor:
        """``[F_a]`` bool: the A latent has a true partner among B's latents (the "match" class)."""
        return self.truth[(hook_a, hook_b)] >= 0


def express_in_latents(
    world: SyntheticWorld,
    saes: Mapping[str, Any],
    latent_to_true: Mapping[str, Tensor],
    latent_cos: Mapping[str, Tensor] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> SyntheticSAEs:
    """Translate the world's truth (true feature indices) into the SAEs' latent indices.

    ``pairs`` defaults to ``world.pairs``; any ``(earlier, later)`` pair of hooks works.

    For A latent ``j`` with true feature ``f = latent_to_true[A][j] >= 0``:
    ``truth[j] = rep_B(world.truth[f])`` where ``rep_B(g)`` is the B latent standing for
    ``g`` with the highest ``latent_cos`` (-1 if no B latent stands for ``g``);
    ``truth_sets[j, k] = world.truth_sets[f, latent_to_true[B][k]]``.
    """
    if latent_cos is None:
        latent_cos = {h: torch.ones(len(latent_to_true[h])) for h in world.hooks}
    truth, sets, kinds, born = {}, {}, {}, {}
    for a, b in world.pairs if pairs is None else pairs:
        if (a, b) in world.truth:
            true_t, true_sets, true_kinds, true_born = (
                world.truth[(a, b)], world.truth_sets[(a, b)], world.kinds[(a, b)], world.born[(a, b)]
            )
        else:
            true_t, true_sets, true_kinds, true_born = world.truth_between(a, b)
        la, lb = latent_to_true[a].long(), latent_to_true[b].long()
        cb = latent_cos[b].float().nan_to_num(-2.0)
        n_b_true = world.n_true(b)
        # rep[g]: the B latent standing for g with the highest cosine (lowest index on ties)
        mb = (lb >= 0).nonzero().flatten()
        best = torch.full((n_b_true,), -float("inf")).scatter_reduce(0, lb[mb], cb[mb], "amax")
        top = mb[cb[mb] >= best[lb[mb]]]
        rep = torch.full((n_b_true,), len(lb), dtype=torch.long).scatter_reduce(0, lb[top], top, "amin")
        rep[rep == len(lb)] = -1
        mapped_a, mapped_b = la >= 0, lb >= 0
        partner = torch.where(mapped_a, true_t[la.clamp_min(0)], torch.full_like(la, -1))
        truth[(a, b)] = torch.where(partner >= 0, rep[partner.clamp_min(0)], torch.full_like(partner, -1))
        s = true_sets[la.clamp_min(0)][:, lb.clamp_min(0)]
        sets[(a, b)] = s & mapped_a[:, None] & mapped_b[None, :]
        kinds[(a, b)] = tuple(true_kinds[int(f)] if f >= 0 else "unmapped" for f in la)
        born[(a, b)] = mapped_b & true_born[lb.clamp_min(0)]
    return SyntheticSAEs(
        world=world,
        saes=dict(saes),
        latent_to_true={h: latent_to_true[h].long() for h in world.hooks},
        latent_cos={h: latent_cos[h].float() for h in world.hooks},
        truth=truth,
        truth_sets=sets,
        kinds=kinds,
        born=born,
    )


def _metadata(hook: str) -> Any:
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=hook, model_name="synthetic", hook_head_index=None)


def _oracle_jumprelu(hook: str, w_enc: Tensor, w_dec: Tensor, b_dec: Tensor, threshold: Tensor, l0: float) -> Any:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], metadata=_metadata(hook)))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        sae.b_enc.zero_()
        sae.threshold.copy_(threshold)
    return sae


def _oracle_topk(hook: str, w_enc: Tensor, w_dec: Tensor, b_dec: Tensor, threshold: Tensor, l0: float) -> Any:
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    k = _default_k(l0)
    cfg = TopKSAEConfig(
        d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=k, rescale_acts_by_decoder_norm=False, metadata=_metadata(hook)
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        sae.b_enc.zero_()
    return sae


def _default_k(l0: float) -> int:
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
    with _threads(cfg.threads):
        for layer, hook in enumerate(world.hooks):
            gen = _generator(cfg.seed, 300, seed, layer)
            D, s = world.directions[hook], world.scales[hook]
            n, d = D.shape
            perm = torch.randperm(n, generator=gen)
            w_dec = _normalise(D[perm] + perturb * torch.randn(n, d, generator=gen) / math.sqrt(d))
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


def latents_to_true_by_decoder(w_dec: Tensor, directions: Tensor, min_cos: float = 0.7) -> tuple[Tensor, Tensor]:
    """Map each latent to the true feature whose direction its decoder row is closest to.

    Args:
        w_dec: ``[F, d]`` decoder rows.
        directions: ``[n, d]`` true unit directions.
        min_cos: below this best cosine the latent stands for nothing (-1).

    Returns:
        ``(index [F] long, cos [F])``: argmax_f cos(W_dec[j], D_f) and its value.
    """
    from sae_lens.util import cosine_similarities

    cos = cosine_similarities(w_dec.detach().float(), directions.float())  # [F, n]
    best, index = cos.max(dim=1)
    index = torch.where(best >= min_cos, index, torch.full_like(index, -1))
    return index, best


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
) -> SyntheticSAEs:
    """TopK SAEs trained with sae_lens' ``TopKTrainingSAE.training_forward_pass`` on each layer.

    Training data: a pool of ``train_tokens`` tokens of the ``train`` split (default
    ``min(steps * batch_size, 4 * n_tokens)``; never the profile or held-out tokens),
    batches drawn from it with replacement; Adam; ``b_dec`` starts at the pool mean; the
    TopK auxiliary loss revives latents silent for ``dead_window`` steps. The result is
    converted to the inference ``TopKSAE`` (decoder norms folded).

    ``d_sae`` defaults to the layer's number of true features, ``k`` to
    ``ceil(L0 + sqrt(L0))`` with L0 the layer's expected number of firing features.

    Truth: latent ``j`` stands for the true feature with the highest decoder cosine if
    it is at least ``min_cos`` (:func:`latents_to_true_by_decoder`), else for nothing;
    then :func:`express_in_latents` (several latents may stand for one feature: A-side
    they all get its partner, B-side the closest one is the partner).
    Deterministic in ``seed`` (the global RNG is forked, not touched).
    """
    from sae_lens.saes.sae import SAE, TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    n_pool = int(train_tokens) if train_tokens is not None else min(steps * batch_size, 4 * world.config.n_tokens)
    saes, l2t, lcos = {}, {}, {}
    for layer, hook in enumerate(world.hooks):
        n_lat = world.n_true(hook) if d_sae is None else int(d_sae)
        k_l = _default_k(world.expected_l0(hook)) if k is None else int(k)
        with torch.random.fork_rng(devices=[]), _threads(world.config.threads):
            torch.manual_seed(_seed(world.config.seed, 400, seed, layer) % (2**62))
            cfg = TopKTrainingSAEConfig(d_in=world.d_model, d_sae=n_lat, k=k_l, metadata=_metadata(hook))
            sae = TopKTrainingSAE(cfg)
            opt = torch.optim.Adam(sae.parameters(), lr=lr)
            last_fired = torch.zeros(n_lat, dtype=torch.long)
            pool = torch.cat(list(world.hidden_states(hook, "train", world.config.chunk_size, n_tokens=n_pool)))
            order = torch.Generator().manual_seed(_seed(world.config.seed, 401, seed, layer))
            with torch.no_grad():
                sae.b_dec.copy_(pool.mean(0))
            for step in range(steps):
                x = pool[torch.randint(n_pool, (batch_size,), generator=order)]
                out = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x,
                        coefficients={},
                        dead_neuron_mask=(step - last_fired) > dead_window,
                        n_training_steps=step,
                        is_logging_step=False,
                    )
                )
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                last_fired[(out.feature_acts > 0).any(dim=0)] = step
        state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
        inference = SAE.from_dict(cfg.get_inference_sae_cfg_dict())
        inference.load_state_dict(state)
        saes[hook] = inference
        l2t[hook], lcos[hook] = latents_to_true_by_decoder(inference.W_dec, world.directions[hook], min_cos)
    return express_in_latents(world, saes, l2t, lcos)


@torch.no_grad()
def explained_variance(
    sae: Any, world: SyntheticWorld, hook: str, split: str = "heldout", batch_size: int = 4096
) -> float:
    """``1 - sum |h - sae(h)|^2 / sum |h - mean h|^2`` over the split (streamed)."""
    err, s1, s2, n = 0.0, torch.zeros(world.d_model, dtype=torch.float64), 0.0, 0
    for h in world.hidden_states(hook, split, batch_size):
        with _threads(world.config.threads):
            rec = sae.decode(sae.encode(h))
        err += float((h - rec).double().pow(2).sum())
        s1 += h.double().sum(0)
        s2 += float(h.double().pow(2).sum())
        n += h.shape[0]
    total = s2 - float((s1 * s1).sum()) / max(n, 1)
    return 1.0 - err / max(total, 1e-30)
