"""``functional:`` in ``conf/evaluate.yaml``: which tokens, which baselines (sae / bias / mean), what the report shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saeot.settings import check_types, from_settings

__all__ = ["BASELINES", "BASELINE_DOC", "FunctionalSettings"]

BASELINES = ("sae", "bias", "mean")
BASELINE_DOC = {
    "sae": "B's own SAE reconstruction decode_B(encode_B(h_B))",
    "bias": "zero-ablation: every code zero, h_B replaced by b_dec_B",
    "mean": "mean-ablation: h_B replaced by its mean over the evaluation tokens",
}


@dataclass
class FunctionalSettings:
    """``functional:`` in ``conf/evaluate.yaml``.

    Attributes:
        split: ``fresh`` (contexts after the run's last one; default), ``heldout`` or ``profile``.
        fresh_contexts: contexts in the ``fresh`` split (None: as many as the held-out split).
        max_batches: cap on the batches streamed (None: the whole split).
        pairs: the layer pairs ``[[a, b], ...]`` evaluated (None: every pair of each run's
            ``matches.csv``); each must be a pair of every run.
        code_scale: ``fold`` (SAE Match Eq. 5 in folded parameters) or ``none``.
        baselines: which of ``sae``, ``bias``, ``mean`` to compute.
        coverage: equal-coverage curves (every matcher's full one-to-one assignment with
            the null off, ranked by its cost; :mod:`saeot.evaluation.functional._curves`).
        coverage_grid: fractions of A matched at which the curves are measured (ascending, in [0, 1]).
        coverage_ce: ΔCE on the curves (one forward pass from hook B per level and batch);
            False: EV and co-activation only (no extra forward pass).
        coverage_candidates: candidates per feature of A for the full assignment (at least
            the matcher's own ``n_candidates``).
        coverage_deactivation: pairs per layer pair (spread over each matcher's ranking) that get
            the causal deactivation test (:mod:`saeot.evaluation.functional._deactivation`;
            0: off). Residual-stream hooks only.
        bootstrap: replicates of the bootstrap over the evaluation contexts that gives every
            equal-coverage area a 95% interval, paired across matchers
            (:mod:`saeot.evaluation.functional._bootstrap`; 0: off).
        bootstrap_seed: seed of the replicate weights (with the number of contexts, all they depend on).
        report: write ``report.html`` into every run dir.
        report_pairs: matched pairs shown per layer pair in the report.
        report_no_match: no-match features shown with their contexts (all are listed).
        n_contexts: top-activating contexts shown per feature (report and judge).
        context_window: tokens left of the highlighted token.
        context_right: tokens right of it.
        progress: progress bars.
        seed: seed of the report's sample and of the chance pairs.
    """

    split: str = "fresh"
    fresh_contexts: int | None = None
    max_batches: int | None = None
    pairs: tuple[tuple[int, int], ...] | None = None
    code_scale: str = "fold"
    baselines: tuple[str, ...] = BASELINES
    coverage: bool = True
    coverage_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    coverage_ce: bool = True
    coverage_candidates: int = 8
    coverage_deactivation: int = 128
    bootstrap: int = 200
    bootstrap_seed: int = 0
    report: bool = True
    report_pairs: int = 24
    report_no_match: int = 8
    n_contexts: int = 5
    context_window: int = 12
    context_right: int = 4
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "functional")
        if self.split not in ("fresh", "heldout", "profile"):
            raise ValueError(f"functional.split={self.split!r}; expected fresh, heldout or profile")
        if self.code_scale not in ("fold", "none"):
            raise ValueError(f"functional.code_scale={self.code_scale!r}; expected fold or none")
        refs = tuple(self.baselines)
        bad = [r for r in refs if r not in BASELINES]
        if bad:
            raise ValueError(f"functional.baselines has {bad}; expected a subset of {list(BASELINES)}")
        self.baselines = refs
        grid = tuple(float(f) for f in self.coverage_grid)
        if not grid or list(grid) != sorted(set(grid)) or not all(0.0 < f <= 1.0 for f in grid):
            raise ValueError(f"functional.coverage_grid={list(grid)} must be distinct ascending fractions in (0, 1]")
        self.coverage_grid = grid
        if self.coverage_deactivation < 0:
            raise ValueError(f"functional.coverage_deactivation={self.coverage_deactivation} must be >= 0 (0: off)")
        if self.bootstrap < 0:
            raise ValueError(f"functional.bootstrap={self.bootstrap} must be >= 0 replicates (0: off)")
        if self.coverage_candidates < 2:
            raise ValueError(f"functional.coverage_candidates={self.coverage_candidates} must be >= 2")
        if self.pairs is not None:
            try:
                pairs = tuple((int(a), int(b)) for a, b in self.pairs)
            except (TypeError, ValueError):
                raise ValueError(f"functional.pairs={self.pairs!r} must be a list of [layer_a, layer_b] pairs") from None
            if not pairs:
                raise ValueError("functional.pairs=[] selects nothing: list [layer_a, layer_b] pairs, or null for all")
            self.pairs = pairs
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"functional.max_batches={self.max_batches} must be >= 1 or null")

    @classmethod
    def from_cfg(cls, node: Any) -> "FunctionalSettings":
        if node is None:
            return cls()
        d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        return from_settings(cls, d, "functional", "evaluate.py's functional evaluation")

