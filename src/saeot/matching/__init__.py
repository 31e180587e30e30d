"""Matchers: semantic OT and the baselines it must beat, one file a matcher.

Every matcher is a :class:`~saeot.matching.base.Matcher` with a settings dataclass that
extends :class:`~saeot.matching.base.MatcherConfig`; a new matcher is one class here
plus one ``conf/matcher/<name>.yaml``. Shared pieces: the candidate search
(:mod:`~saeot.matching.candidates`), the assignments (:mod:`~saeot.matching.assignment`)
and the "no match" decision against a null of random pairs (in the base class).
"""

from saeot.matching.activation_correlation import ActivationCorrelation, ActivationCorrelationConfig
from saeot.matching.base import MatchContext, Matcher, MatcherConfig, MatcherNotApplicable
from saeot.matching.feature_flow import FeatureFlow, FeatureFlowConfig
from saeot.matching.mean_embedding import MeanEmbedding, MeanEmbeddingConfig
from saeot.matching.sae_match import SAEMatch, SAEMatchConfig
from saeot.matching.semantic_ot import SemanticOT, SemanticOTConfig

__all__ = [
    "MatchContext", "Matcher", "MatcherConfig", "MatcherNotApplicable",
    "SemanticOT", "SemanticOTConfig", "MeanEmbedding", "MeanEmbeddingConfig", "SAEMatch", "SAEMatchConfig",
    "FeatureFlow", "FeatureFlowConfig", "ActivationCorrelation", "ActivationCorrelationConfig",
]
