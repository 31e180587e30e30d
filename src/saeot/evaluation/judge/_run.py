"""Judging one run: a seeded sample of each layer pair's matches plus random control pairs,
summarised as a mean score with bootstrap confidence intervals (``metrics.json["judge"]``)."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from saeot.evaluation.contexts import FeatureContexts
from saeot.evaluation.judge._base import Judge
from saeot.evaluation.judge._prompt import LABELS, SCORES
from saeot.hooks import hook_layer
from saeot.progress import progress_bar

if TYPE_CHECKING:
    from saeot.evaluation.functional._matchings import PairMatching

__all__ = ["mean_ci", "sample_pairs", "control_pairs", "discrimination", "judge_run"]

log = logging.getLogger(__name__)


def mean_ci(scores: Sequence[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the valid (non-NaN) scores with a percentile-bootstrap CI (``ci``) and a t CI (``ci_t``)."""
    x = np.asarray([s for s in scores if not math.isnan(s)], dtype=float)
    n = len(x)
    out: dict[str, Any] = {"n": n, "n_invalid": len(scores) - n}
    if n == 0:
        out.update(mean=math.nan, ci=[math.nan, math.nan], ci_t=[math.nan, math.nan], sem=math.nan)
        return out
    mean = float(x.mean())
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    alpha = 1 - confidence
    if n > 1:
        rng = np.random.default_rng(seed)
        boots = x[rng.integers(0, n, size=(n_boot, n))].mean(1)
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        tq = float(stats.t.ppf(1 - alpha / 2, n - 1))
        ci_t = [mean - tq * sem, mean + tq * sem]
    else:
        lo = hi = mean
        ci_t = [math.nan, math.nan]
    out.update(mean=mean, ci=[float(lo), float(hi)], ci_t=ci_t, sem=sem, confidence=confidence,
               ci_method="percentile bootstrap")
    return out


def _summary(items: list[dict], judge: Judge) -> dict:
    scores = [float(i["score"]) for i in items]
    out = mean_ci(scores, judge.confidence, judge.n_boot, judge.seed)
    out["counts"] = {lab: sum(1 for i in items if i["label"] == lab) for lab in LABELS}
    expected = [sum(SCORES[k] * v for k, v in i["probs"].items()) for i in items if i.get("probs")]
    if expected:  # backends with label probabilities: the mean expected score, a finer-grained reading
        e = mean_ci(expected, judge.confidence, judge.n_boot, judge.seed)
        out["expected_score"] = {"mean": e["mean"], "ci": e["ci"], "n": e["n"]}
    pct = [float(i["percentile"]) for i in items if i.get("percentile") is not None]
    if pct:  # similarity judges: percentile among random pairs (0.5 = chance)
        e = mean_ci(pct, judge.confidence, judge.n_boot, judge.seed)
        out["percentile"] = {"mean": e["mean"], "ci": e["ci"], "n": e["n"]}
    return out


def discrimination(matched: dict, control: dict | None, backend: str = "judge") -> dict:
    """Can the judge tell the matched pairs from the random ones? Only if the matched pairs'
    CI lies entirely above the random pairs' (``matched.ci[0] > control.ci[1]``); otherwise
    ``warning`` says that its scores carry no information about the matches.

    Args:
        matched, control: summaries of :func:`mean_ci` (``mean``, ``ci``, ``n``).
        backend: named in the warning.

    Returns:
        ``{"discriminates": bool | None, "warning": str | None, "rule": ...}`` (None: no control).
    """
    rule = "matched pairs' CI lower end above the random pairs' CI upper end"
    if not control or not control.get("n") or not matched.get("n"):
        return {"discriminates": None, "warning": None, "rule": rule, "note": "no random-pair control to compare with"}
    lo, c_hi = matched["ci"][0], control["ci"][1]
    ok = bool(lo > c_hi)
    warning = None
    if not ok:
        why = ("the random pairs score as high as the matched ones" if control["mean"] >= matched["mean"]
               else "the confidence intervals overlap")
        warning = (f"judge {backend} cannot tell matched pairs from random ones here: matched {matched['mean']:.2f} "
                   f"[{matched['ci'][0]:.2f}, {matched['ci'][1]:.2f}] (n={matched['n']}), random "
                   f"{control['mean']:.2f} [{control['ci'][0]:.2f}, {control['ci'][1]:.2f}] (n={control['n']}): {why}; "
                   "its scores say nothing about these matches")
    return {"discriminates": ok, "warning": warning, "rule": rule}


# ---------------------------------------------------------------------------- one run
def _pair_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16)


def sample_pairs(feature_a: Tensor, feature_b: Tensor, usable_a: Tensor, usable_b: Tensor, n: int,
                 seed: int) -> list[tuple[int, int]]:
    """Up to ``n`` matched pairs (seeded, without replacement) whose two features have contexts."""
    ok = usable_a[feature_a] & usable_b[feature_b]
    cand = torch.nonzero(ok).flatten().numpy()
    rng = np.random.default_rng(seed)
    pick = rng.choice(cand, size=min(n, len(cand)), replace=False) if len(cand) else cand
    return [(int(feature_a[i]), int(feature_b[i])) for i in sorted(pick.tolist())]


def control_pairs(usable_a: Tensor, usable_b: Tensor, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random (A, B) pairs of features with contexts (same for every matcher of the same layers)."""
    a, b = torch.nonzero(usable_a).flatten().numpy(), torch.nonzero(usable_b).flatten().numpy()
    if not len(a) or not len(b) or n < 1:
        return []
    rng = np.random.default_rng(seed)
    return [(int(x), int(y)) for x, y in zip(rng.choice(a, n), rng.choice(b, n))]


def judge_run(judge: Judge, run: Any, matchings: Sequence[PairMatching], contexts: FeatureContexts,
              progress: bool = True) -> dict:
    """Judge a sample of each layer pair's matches of one run (``metrics.json["judge"]``).

    Args:
        judge: a :class:`Judge`.
        run: the run (its ``label`` seeds the sample), e.g. :class:`saeot.pipeline.rundir.RunDir`.
        matchings: its :class:`saeot.evaluation.functional.PairMatching` list.
        contexts: the run's :class:`saeot.evaluation.contexts.FeatureContexts`.
        progress: a progress bar per layer pair.
    """
    n, window, right = judge.n_contexts, judge.context_window, judge.context_right
    t0 = time.perf_counter()
    calls0 = judge.n_calls
    pairs: dict[str, dict] = {}
    all_items, all_control = [], []
    for pm in matchings:
        ua, ub = contexts.has_contexts(pm.hook_a), contexts.has_contexts(pm.hook_b)
        la, lb = hook_layer(pm.hook_a), hook_layer(pm.hook_b)
        todo = [("match", p) for p in sample_pairs(pm.feature_a, pm.feature_b, ua, ub, judge.n_pairs,
                                                   _pair_seed(judge.seed, run.label + pm.key))]
        todo += [("control", p) for p in control_pairs(ua, ub, judge.n_control, _pair_seed(judge.seed, pm.key))]
        if judge.n_calibration:  # judges calibrated on random pairs (other ones than the control's)
            cal = control_pairs(ua, ub, judge.n_calibration, _pair_seed(judge.seed, pm.key + "|calibration"))
            judge.calibrate([(contexts.get(pm.hook_a, i, n, window, right), contexts.get(pm.hook_b, j, n, window, right))
                             for i, j in cal])
        items, control = [], []
        for kind, (i, j) in progress_bar(todo, desc=f"judge {run.label} {la}->{lb}", enabled=progress, leave=False):
            jd = judge.judge_pair(contexts.get(pm.hook_a, i, n, window, right),
                                  contexts.get(pm.hook_b, j, n, window, right), f"layer {la} #{i}", f"layer {lb} #{j}")
            rec = {"feature_a": i, "feature_b": j, "label": jd.label, "score": jd.score, "cached": jd.cached}
            if jd.probs:
                rec["probs"] = jd.probs
            if jd.similarity is not None:
                rec["similarity"], rec["percentile"] = jd.similarity, jd.percentile
            if jd.label is None:
                rec["raw"] = jd.raw[:200]
            (items if kind == "match" else control).append(rec)
        summ = _summary(items, judge)
        summ["control"] = _summary(control, judge) if control else None
        summ["discrimination"] = discrimination(summ, summ["control"], judge.name)
        summ["items"] = items
        summ["control_items"] = control
        pairs[pm.key] = summ
        all_items += items
        all_control += control
    overall = _summary(all_items, judge)
    control_overall = _summary(all_control, judge) if all_control else None
    disc = discrimination(overall, control_overall, judge.name)
    if disc["warning"]:
        log.warning("%s: %s", run.label, disc["warning"])
    return {
        "backend": judge.identity(), "n_pairs_per_layer_pair": judge.n_pairs, "n_control": judge.n_control,
        "scale": SCORES, "overall": overall, "control_overall": control_overall, "discrimination": disc,
        "pairs": pairs, "n_model_calls": judge.n_calls - calls0, "seconds": time.perf_counter() - t0,
    }

