"""The curve metrics of the equal-coverage evaluation and the area under a curve: what both the
curves (:mod:`saeot.evaluation.functional._curves`) and their bootstrap
(:mod:`saeot.evaluation.functional._bootstrap`) compute, in one place below both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CURVE_METRICS", "curve_auc"]

#: metric -> (label, higher is better)
CURVE_METRICS = {"explained_variance": ("substitution EV", True), "delta_ce": ("substitution ΔCE (nats)", False),
                 "corr": ("co-activation correlation", True),
                 "deactivation": ("deactivation: mean drop of B's feature", True),
                 "deactivation_success": ("deactivation success rate", True)}


def curve_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid area under ``y(x)`` (NaN points dropped; one point: NaN)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if len(xs) < 2:
        return float("nan")
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
