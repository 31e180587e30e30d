"""The typed results that the stages of a run hand down to each other.

    setup() -> RunSetup -> stream() -> Streams -> fit_reference() -> ReferenceFit
            -> match() -> Matches  ==>  TrainResult (callbacks, artifacts, plots, logger)

Each stage reads what earlier stages produced and returns a new object; no stage
changes an earlier one's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from torch import Tensor

from saeot.types import FeatureSamples, MatchResult

if TYPE_CHECKING:  # annotations only: importing state.py loads no model, data or matching code
    from sae_lens import SAE

    from saeot.data.activation_store import StoredHiddenStates
    from saeot.data.datamodule import HiddenStateDataModule
    from saeot.matching.base import Matcher
    from saeot.models.language_model import LanguageModel
    from saeot.pipeline.config import LayerSettings, ProfilingSettings
    from saeot.reference.base import ReferenceSpace

__all__ = ["RunSetup", "Streams", "ReferenceFit", "Matches", "TrainResult"]


@dataclass(frozen=True)
class RunSetup:
    """Stage 1: everything built and checked, before any forward pass over the corpus.

    ``hooks``: the SAE hooks sorted by layer; ``pairs``: the (A, B) hooks to match;
    ``saes``: hook -> frozen sae_lens SAE; ``sae_records``: hook -> JSON record of where
    the SAE came from (read back by :class:`saeot.pipeline.rundir.RunDir`, never retrained);
    ``datamodule``: the corpus's data module, or the on-disk store of its hidden states
    (``activation_store`` set); ``layers`` / ``profiling``: those settings, typed and checked.
    """

    cfg: DictConfig
    run_dir: Path
    lm: LanguageModel
    datamodule: HiddenStateDataModule | StoredHiddenStates
    saes: dict[str, SAE]
    sae_records: dict[str, dict]
    hooks: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    matcher: Matcher
    layers: LayerSettings
    profiling: ProfilingSettings


@dataclass(frozen=True)
class Streams:
    """Stages 2-3: the profile pass and the held-out pass.

    ``samples``: hook -> per-feature K weighted samples in the hook's own space;
    ``aligned``: hook -> ``[N, d]`` hidden states of the same N held-out tokens at every hook;
    ``correlations``: (hook A, hook B) -> activation co-moments, when the matcher needs them.
    """

    samples: dict[str, FeatureSamples]
    aligned: dict[str, Tensor]
    correlations: dict | None
    metrics: dict


@dataclass(frozen=True)
class ReferenceFit:
    """Stage 4: the fitted reference space and the feature samples projected into it."""

    space: ReferenceSpace
    projected: dict[str, FeatureSamples]
    metrics: dict


@dataclass(frozen=True)
class Matches:
    """Stage 5: one :class:`MatchResult` per layer pair."""

    results: list[MatchResult]
    metrics: dict


@dataclass
class TrainResult:
    """A finished run, handed to callbacks, plots, the artifact writer and the logger.

    ``metrics`` is the run's ``metrics.json``; callbacks add their own keys to it.
    """

    setup: RunSetup
    streams: Streams
    reference: ReferenceFit
    matches: Matches
    metrics: dict = field(default_factory=dict)
    logger: Any = None

    # shortcuts for the things most readers want
    @property
    def run_dir(self) -> Path:
        return self.setup.run_dir

    @property
    def cfg(self) -> DictConfig:
        return self.setup.cfg

    @property
    def lm(self) -> LanguageModel:
        return self.setup.lm

    @property
    def saes(self) -> dict[str, SAE]:
        return self.setup.saes

    @property
    def hooks(self) -> tuple[str, ...]:
        return self.setup.hooks

    @property
    def samples(self) -> dict[str, FeatureSamples]:
        return self.streams.samples

    @property
    def projected(self) -> dict[str, FeatureSamples]:
        return self.reference.projected

    @property
    def results(self) -> list[MatchResult]:
        return self.matches.results
