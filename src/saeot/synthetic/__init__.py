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
  every ``v`` when ``d`` is even; pi/2 by default, any angle for a sweep). Reported in ``SyntheticWorld.rotations``:
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
* ``shared_mean``: ``round(shared_mean_fraction * n_features / 2)`` groups of four plain
  features (X, Y, c1, c2), protected from all events. X fires in two separate contexts:
  on X's tokens exactly one of c1 (probability ``shared_mean_context_prob``) or c2 fires,
  with X's own magnitude (a choice rule; X, c1 and c2 are silent where Y fires), so X's
  hidden states are bimodal,
  ``m (s_X D_X + s_c D_c)``, with mean ``m * mid``,
  ``mid = s_X D_X + q s_1 D_1 + (1-q) s_2 D_2``. Y fires alone at their midpoint:
  ``s_Y D_Y = mid + shared_mean_offset |mid| n``, ``n`` a unit vector orthogonal to ``mid``
  *redrawn at every layer* (Y's direction and magnitude are recomputed from the carried
  X, c1, c2 at every layer). So X and Y have the same activation-weighted mean up to an
  offset that identifies nothing across layers, and different distributions (two modes
  against one): the mean embedding cannot tell them apart, W2 can. The offset cannot be
  0 for an SAE: with equal means no linear read-out fires on X's states and not on Y's.

Scenario entries of the benchmark (:func:`parse_scenario`) combine scenarios with ``+``
(``rotation+rescale+near_duplicates``: every part applies at once) and may set the
rotation angle with ``@`` (``rotation@pi/8``).

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
cosine is at least ``min_cos`` and its activation correlates with that feature's true
activation at least ``min_act_corr`` (it writes *and* reads the feature; else it stands
for nothing); it is trained through the one
training path of :mod:`saeot.saes.training`. Either way the truth between
latents follows from the truth between true features (:func:`express_in_latents`).

Token streams are generated in fixed chunks of ``chunk_size`` tokens, each from its
own seeded generator, so a stream's content depends on ``(seed, split, chunk)`` only:
never on the batch size, the order of calls or global RNG state.

Modules: :mod:`.config` (settings), :mod:`.builder` (:func:`make_world`), :mod:`.world`
(the world, its truth and streams), :mod:`._tokens` (concept streams), :mod:`._geometry`,
:mod:`.latents` (truth in latent indices), :mod:`.oracle`, :mod:`.trained`,
:mod:`.metrics`; the benchmark of every matcher on these worlds (``evaluate.py
experiment=synthetic_benchmark``): :mod:`.benchmark`, its tables and plots :mod:`.report`.
"""

from saeot.synthetic.builder import make_world
from saeot.synthetic.config import (
    KINDS,
    SCENARIOS,
    SPLITS,
    ScenarioSpec,
    SyntheticConfig,
    parse_angle,
    parse_scenario,
)
from saeot.synthetic.latents import (
    SyntheticSAEs,
    activation_agreement,
    express_in_latents,
    latents_to_true_by_decoder,
)
from saeot.synthetic.metrics import (
    AFFECTED,
    affected_accuracy,
    affected_kinds,
    aggregate_seeds,
    explained_variance,
    match_scores,
    mean_ci95,
)
from saeot.synthetic.oracle import ORACLE_ARCHITECTURES, default_k, oracle_encoder, oracle_saes
from saeot.synthetic.trained import trained_saes
from saeot.synthetic.world import SyntheticWorld

__all__ = [
    "SCENARIOS",
    "SPLITS",
    "KINDS",
    "SyntheticConfig",
    "ScenarioSpec",
    "parse_angle",
    "parse_scenario",
    "SyntheticWorld",
    "make_world",
    "SyntheticSAEs",
    "express_in_latents",
    "latents_to_true_by_decoder",
    "activation_agreement",
    "ORACLE_ARCHITECTURES",
    "default_k",
    "oracle_encoder",
    "oracle_saes",
    "trained_saes",
    "explained_variance",
    "match_scores",
    "AFFECTED",
    "affected_kinds",
    "affected_accuracy",
    "mean_ci95",
    "aggregate_seeds",
]
