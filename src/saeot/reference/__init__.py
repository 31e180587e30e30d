"""Projections phi_l of each layer's hidden states into one shared reference space R^r.

Distributions of features from different layers live in different bases (the
residual stream drifts, is rescaled and rotated from layer to layer); they are
compared after mapping every layer into one space. All maps are fitted on
hidden states of the SAME tokens at every layer involved (the held-out split),
``fit({hook: [M, d]})``, and applied with ``transform(hook, x [..., d]) -> [..., r]``.

* :class:`Standardize` -- ``phi_l(x) = (x - m_l) / s_l``, ``s_l`` the layer's RMS norm
  of centred states; ``r = d``. Undoes norm growth, not rotation.
* :class:`Ridge` -- closed form: the target is the top-r PCA coordinates of one
  reference layer's standardised states, ``T = Z_ref U_r``; each layer's map is the
  ridge regression ``W_l = (Z_l^T Z_l + lam n I)^-1 Z_l^T T``, ``phi_l(x) = z_l(x) W_l``.
  Undoes any linear change of basis between layers that the tokens pin down.
* :class:`Learned` -- a LightningModule with one linear (or small MLP) map per layer,
  trained by the Lightning Trainer with an alignment loss between the images of the
  same token at every pair of layers plus a VICReg-style variance / decorrelation
  term against collapse; initialised at the ridge solution.
"""

from saeot.reference.base import ReferenceSpace, check_aligned, project_samples
from saeot.reference.learned import Learned, LearnedReferenceModule
from saeot.reference.ridge import Ridge
from saeot.reference.standardize import Standardize

__all__ = ["ReferenceSpace", "check_aligned", "project_samples", "Standardize", "Ridge", "Learned",
           "LearnedReferenceModule"]
