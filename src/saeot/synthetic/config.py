"""Settings of the planted model: :class:`SyntheticConfig`, the scenarios, splits and kinds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sae_lens.synthetic import ZipfianFiringProbabilityConfig

__all__ = ["SCENARIOS", "SPLITS", "PILOT", "KINDS", "SyntheticConfig", "ScenarioSpec", "parse_angle", "parse_scenario"]

SCENARIOS: tuple[str, ...] = (
    "identity",
    "rotation",
    "rescale",
    "birth_death",
    "split_merge",
    "near_duplicates",
    "disjoint_tokens",
    "shared_mean",
)
#: split name -> code used in the seeds of its chunks (0 is the pilot chunk)
SPLITS: dict[str, int] = {"train": 1, "profile": 2, "heldout": 3}
#: split code of the pilot chunk that estimates signal scale and firing rates
PILOT = 0

#: labels of layer-A features in ``kinds`` (one per feature and pair), in priority order
KINDS: tuple[str, ...] = ("dies", "splits", "merges", "near_duplicate", "shared_mean", "persists")


@dataclass
class SyntheticConfig:
    """Knobs of the planted model (see :mod:`saeot.synthetic` for the semantics).

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
            direction ends orthogonal to where it was; ``cos(v, Q v) = cos(angle)``); a
            string ``pi/8`` is read by :func:`parse_angle`.
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
        shared_mean_fraction: features (of ``n_features``) in shared-mean pairs (twice as many
            more are reserved as the two contexts of each pair's bimodal member).
        shared_mean_offset: the unimodal member's mean sits at the bimodal member's mean plus
            an offset of this size (relative to the mean's norm), in a direction redrawn at
            every layer (so it identifies nothing across layers); 0: equal means.
        shared_mean_context_prob: P(first context | bimodal member fires) (else the second).
        shared_mean_context_scale: layer-0 magnitude of the two contexts (the distance between
            the bimodal member's two modes; the unimodal one sits between them).
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
    shared_mean_fraction: float = 0.1
    shared_mean_offset: float = 0.6
    shared_mean_context_prob: float = 0.5
    shared_mean_context_scale: float = 2.0
    bias: float = 0.0
    chunk_size: int = 4096
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.scenarios, str):
            self.scenarios = (self.scenarios,)
        self.scenarios = tuple(str(s) for s in self.scenarios)
        self.rotation_angle = parse_angle(self.rotation_angle)
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
            (0 <= self.shared_mean_fraction < 1, "synthetic.shared_mean_fraction must be in [0, 1)"),
            (self.shared_mean_offset >= 0, "synthetic.shared_mean_offset must be >= 0"),
            (0 < self.shared_mean_context_prob < 1, "synthetic.shared_mean_context_prob must be in (0, 1)"),
            (self.shared_mean_context_scale > 0, "synthetic.shared_mean_context_scale must be > 0"),
            (math.isfinite(self.rotation_angle), "synthetic.rotation_angle must be a finite number of radians"),
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
    def firing(self) -> ZipfianFiringProbabilityConfig:
        """The ``sae_lens`` firing-probability config these knobs describe."""
        return ZipfianFiringProbabilityConfig(
            exponent=self.firing_exponent, max_prob=self.firing_max_prob, min_prob=self.firing_min_prob
        )


_ANGLE = re.compile(r"^\s*(?:(\d+(?:\.\d*)?)\s*\*?\s*)?pi\s*(?:/\s*(\d+(?:\.\d*)?))?\s*$")


def parse_angle(value: float | int | str) -> float:
    """Radians from a number or a multiple of pi written ``pi``, ``pi/8``, ``3pi/8`` or ``3*pi/8``."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    m = _ANGLE.match(text)
    if m:
        num = float(m.group(1)) if m.group(1) else 1.0
        den = float(m.group(2)) if m.group(2) else 1.0
        if den == 0:
            raise ValueError(f"rotation angle {value!r}: division by zero")
        return num * math.pi / den
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"rotation angle {value!r}: write radians (0.39) or a multiple of pi (pi/8, 3pi/8)") from None


@dataclass(frozen=True)
class ScenarioSpec:
    """One entry of ``synthetic.scenarios``: ``part+part+...`` with an optional ``@angle`` (rotation).

    ``rotation+rescale+near_duplicates`` combines three scenarios in one world;
    ``rotation@pi/8`` sets the rotation angle of that entry (else ``synthetic.rotation_angle``).
    """

    name: str
    parts: tuple[str, ...]
    rotation_angle: float | None

    def config_overrides(self) -> dict:
        """The :class:`SyntheticConfig` fields this entry sets."""
        out: dict = {"scenarios": self.parts}
        if self.rotation_angle is not None:
            out["rotation_angle"] = self.rotation_angle
        return out


def parse_scenario(spec: str | list | tuple) -> ScenarioSpec:
    """:class:`ScenarioSpec` of ``spec`` (a string as above, or a list of scenario names).

    Raises ValueError naming ``synthetic.scenarios`` for an unknown part, an empty part or an
    angle without ``rotation``.
    """
    if isinstance(spec, (list, tuple)):
        spec = "+".join(str(x) for x in spec)
    name = str(spec).strip()
    body, _, angle = name.partition("@")
    parts = tuple(p.strip() for p in body.split("+"))
    if not body or any(not p for p in parts):
        raise ValueError(f"synthetic.scenarios: empty scenario in {name!r}; write e.g. rotation+rescale")
    unknown = [p for p in parts if p not in SCENARIOS]
    if unknown:
        raise ValueError(f"synthetic.scenarios: unknown {unknown} in {name!r}; choose from {list(SCENARIOS)}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"synthetic.scenarios: {name!r} names a scenario twice")
    rot = None
    if angle:
        if "rotation" not in parts:
            raise ValueError(f"synthetic.scenarios: {name!r} gives an angle but no rotation")
        rot = parse_angle(angle)
    return ScenarioSpec(name=name, parts=parts, rotation_angle=rot)
