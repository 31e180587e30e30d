"""Judging one run: a seeded sample of each layer pair's matches plus random control pairs,
summarised as a mean score with bootstrap confidence intervals (``metrics.json["judge"]``)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from saeot.evaluation.contexts import FeatureContexts
from saeot.evaluation.judge._base import Judge
from saeot.evaluation.judge._prompt import LABELS, SCORES
from saeot.hooks import hook_layer

__all__ = ["mean_ci", "sample_pairs", "control_pairs", "judge_run"]


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
    return out


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


def judge_run(judge: Judge, run: Any, matchings: Sequence[Any], contexts: FeatureContexts,
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
        items, control = [], []
        for kind, (i, j) in tqdm(todo, desc=f"judge {run.label} {la}->{lb}", disable=not progress, leave=False):
            jd = judge.judge_pair(contexts.get(pm.hook_a, i, n, window, right),
                                  contexts.get(pm.hook_b, j, n, window, right), f"layer {la} #{i}", f"layer {lb} #{j}")
            rec = {"feature_a": i, "feature_b": j, "label": jd.label, "score": jd.score, "cached": jd.cached}
            if jd.probs:
                rec["probs"] = jd.probs
            if jd.label is None:
                rec["raw"] = jd.raw[:200]
            (items if kind == "match" else control).append(rec)
        summ = _summary(items, judge)
        summ["control"] = _summary(control, judge) if control else None
        summ["items"] = items
        summ["control_items"] = control
        pairs[pm.key] = summ
        all_items += items
        all_control += control
    overall = _summary(all_items, judge)
    return {
        "backend": judge.identity(), "n_pairs_per_layer_pair": judge.n_pairs, "n_control": judge.n_control,
        "scale": SCORES, "overall": overall, "control_overall": _summary(all_control, judge) if all_control else None,
        "pairs": pairs, "n_model_calls": judge.n_calls - calls0, "seconds": time.perf_counter() - t0,
    }

