r"""Batched squared 2-Wasserstein distances between weighted point clouds.

Every distance in this module is the **squared** 2-Wasserstein distance with the
squared Euclidean ground cost between two discrete probability measures

.. math::
    \mu = \sum_{k=1}^{K} a_k \delta_{x_k},\qquad \nu = \sum_{l=1}^{K'} b_l \delta_{y_l},
    \qquad W_2^2(\mu,\nu) = \min_{P \in \Pi(a,b)} \sum_{kl} P_{kl} \|x_k - y_l\|^2 ,

with :math:`\Pi(a,b) = \{P \ge 0: P 1 = a, P^\top 1 = b\}`.

Conventions (shared by all functions; F = features, K = samples per feature,
r = width of the space):

* A set of distributions is ``x [F, K, r]`` and ``w [F, K]``; ``w`` is non-negative.
  Zero weights are padding (their points are ignored). A row of ``w`` is
  renormalised to sum 1, so float32 rounding never matters. An all-zero row is a
  *dead* feature: every distance that involves it is ``inf`` and it is never
  chosen as a neighbour.
* Solvers are objects (:mod:`saeot.transport.solvers`, built from ``conf/transport``):
  :class:`ExactW2` (POT's network simplex, float64, CPU), :class:`SinkhornW2`
  (batched log-domain Sinkhorn in torch, runs wherever the tensors are) and
  :class:`SlicedW2` (batched sliced W2^2 in torch). Each answers ``pairwise``
  (``[Fa, Fb]``), ``pair`` (given pairs) and ``nearest`` (pruned k nearest).
  The functions :func:`w2_exact_pair`, :func:`w2_sinkhorn` and :func:`w2_sliced`
  are the same computations in functional form; batched functions take ``B``
  pairs at once.
* Functions never broadcast silently: leading shapes must agree exactly, and a
  bad shape raises ``ValueError`` naming the argument.
* Outputs live on the device of the first input. ``ExactW2`` results are float64;
  ``SinkhornW2`` / ``SlicedW2`` results use the compute dtype (float64 if any input is
  float64, otherwise float32).

Lower bounds and exact nearest neighbours
-----------------------------------------
Translation splits W2^2 exactly: with weighted means :math:`m_a, m_b` and centred
measures :math:`\bar\mu, \bar\nu`,

.. math::
    W_2^2(\mu,\nu) = \|m_a - m_b\|^2 + W_2^2(\bar\mu,\bar\nu)

(the cross term :math:`2 (m_a - m_b)^\top \sum_{kl} P_{kl}(\bar x_k - \bar y_l)` is
zero for every coupling because both centred measures have mean 0). Hence
:func:`lower_bound_mean` and, with the triangle inequality for W2 through the Dirac
:math:`\delta_0` (:math:`W_2(\bar\mu,\delta_0) = s_a`, the weighted spread),
:func:`lower_bound_mean_spread`. Projecting on the r axes of any orthonormal frame
(1-Lipschitz maps whose squared lengths add up) gives the tighter
:func:`lower_bound_axis_spread`. These bounds are squared Euclidean distances between
small per-feature embeddings, so they are computed with matmuls, chunked over A.

They only see means and spreads; real SAE features are told apart by the *orientation*
of their covariances. The Gelbrich bound :math:`\|m_a - m_b\|^2 + \mathrm{Bures}^2(S_a,
S_b)` (:func:`lower_bound_gelbrich`, one small SVD per pair: the fidelity is the nuclear
norm of the ``K x K`` matrix :math:`Y_a Y_b^\top`) sees it; :func:`lower_bound_fidelity`
relaxes it to two GEMMs over all pairs; :func:`lower_bound_max_sliced` adds exact 1-D
transport along a frame of directions (the shape of the clouds).

:meth:`W2Solver.nearest` uses a bound to find the k nearest neighbours *exactly*
without solving every pair: candidates of each row are visited in increasing bound
order, and the search stops as soon as the next bound exceeds the current k-th best
cost. :meth:`W2Solver.nearest` documents for which solver each bound is valid.
:meth:`ExactW2.nearest` runs a *cascade* (:data:`CASCADES`, ``ExactW2(bound=...)``):
dense bounds for all pairs, tight ones only for the pairs that survive them, every
bound lowered by a tolerance that covers rounding (:mod:`~saeot.transport._cascade`),
and optionally certifies rows with batched Sinkhorn upper / dual lower bounds before
any exact solve (``ExactW2(certify=True)``, :mod:`~saeot.transport._certify`; meant for
GPUs). Real SmolLM2 features (default run, 1,078 x 1,152, K=32, r=64, k=2): mean +
spread solves 21% of the pairs, ``fidelity`` 2.1%, ``gelbrich`` 0.83%.

Modules: ``_checks`` (input checks), ``_cost`` (weights, ground cost), ``_exact``
(network simplex), ``_sinkhorn``, ``_sliced``, ``_moments`` (per-feature statistics),
``_bounds`` (embedding bounds), ``_gelbrich`` (Gelbrich and fidelity bounds),
``_max_sliced`` (1-D frame bound), ``_labels`` (the fused cost of labelled points, e.g. by token
occurrence, and its bound), ``_cascade`` (the cascade, rounding tolerance),
``_certify`` (Sinkhorn bounds of the exact cost), ``_pairs`` (batched pair evaluators),
``_nearest`` (pruned search of the batched solvers), ``_nearest_exact`` (the exact
solver's search), ``_parallel`` (threads, blocks, progress bars) and the public ``solvers``.
"""


from saeot.transport._bounds import (
    lower_bound_axis_spread,
    lower_bound_mean,
    lower_bound_mean_spread,
    lower_bound_sliced,
)
from saeot.transport._cascade import BOUNDS, CASCADES
from saeot.transport._cost import cost_matrices
from saeot.transport._exact import w2_exact_pair
from saeot.transport._gelbrich import lower_bound_fidelity, lower_bound_gelbrich
from saeot.transport._max_sliced import lower_bound_max_sliced
from saeot.transport._labels import LabelCost
from saeot.transport._moments import feature_moments
from saeot.transport._nearest import NearestResult
from saeot.transport._offset import CostOffset
from saeot.transport._sinkhorn import w2_sinkhorn
from saeot.transport._sliced import sliced_directions, w2_sliced
from saeot.transport.solvers import ExactW2, SinkhornW2, SlicedW2, W2Solver

__all__ = [
    "W2Solver",
    "ExactW2",
    "SinkhornW2",
    "SlicedW2",
    "BOUNDS",
    "CASCADES",
    "NearestResult",
    "CostOffset",
    "LabelCost",
    "cost_matrices",
    "w2_exact_pair",
    "w2_sinkhorn",
    "w2_sliced",
    "sliced_directions",
    "feature_moments",
    "lower_bound_mean",
    "lower_bound_mean_spread",
    "lower_bound_axis_spread",
    "lower_bound_sliced",
    "lower_bound_fidelity",
    "lower_bound_gelbrich",
    "lower_bound_max_sliced",
]
