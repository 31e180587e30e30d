"""Ground-truth metrics: how well an SAE reconstructs a world, and how well a matcher finds the truth.

Over the features of layer A (``F_a`` latents, ``truth [F_a]`` the true partner in B or -1):

* ``top1_accuracy``: the nearest candidate is the true partner (features with a partner);
* ``hungarian_accuracy``: the one-to-one assignment gives the true partner;
* ``nomatch_precision`` / ``nomatch_recall``: of the "no match" decisions (nearest mode)
  against features whose true answer is "no match" (``None`` where undefined, e.g. a
  scenario without deaths has no true "no match" for recall);
* ``top1_by_kind``: top-1 accuracy per kind of A feature (:data:`~.config.KINDS`).

Over seeds (:func:`aggregate_seeds`), every number ``x`` of a score becomes ``x`` (the mean),
``x_mean``, ``x_ci95`` (half-width of the 95% Student-t interval of the mean) and
``x_seeds`` (the per-seed values), see :func:`mean_ci95`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import math
from collections.abc import Iterable, Sequence

import torch
from scipy.stats import t as student_t
from torch import Tensor

from saeot.synthetic._random import torch_threads
from saeot.synthetic.world import SyntheticWorld

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.types import MatchResult

__all__ = ["explained_variance", "match_scores", "AFFECTED", "affected_kinds", "affected_accuracy", "mean_ci95",
           "aggregate_seeds"]


@torch.no_grad()
def explained_variance(
    sae: SAE, world: SyntheticWorld, hook: str, split: str = "heldout", batch_size: int = 4096
) -> float:
    """``1 - sum |h - sae(h)|^2 / sum |h - mean h|^2`` over the split (streamed)."""
    err, s1, s2, n = 0.0, torch.zeros(world.d_model, dtype=torch.float64), 0.0, 0
    for h in world.hidden_states(hook, split, batch_size):
        with torch_threads(world.config.threads):
            rec = sae.decode(sae.encode(h))
        err += float((h - rec).double().pow(2).sum())
        s1 += h.double().sum(0)
        s2 += float(h.double().pow(2).sum())
        n += h.shape[0]
    total = s2 - float((s1 * s1).sum()) / max(n, 1)
    return 1.0 - err / max(total, 1e-30)


def match_scores(result: MatchResult, result_hung: MatchResult, truth: Tensor, alive_a: Tensor,
                 kinds: dict[str, Tensor] | None = None) -> dict:
    """The scores above of a nearest-mode ``result`` and a one-to-one ``result_hung`` (``MatchResult``).

    Args:
        result, result_hung: ``feature_b [F_a]`` (and ``matched [F_a]`` for ``result``).
        truth: ``[F_a]`` long, the true partner of each A latent, -1 for none.
        alive_a: ``[F_a]`` bool, A latents that fired (the others are not scored).
        kinds: kind -> ``[F_a]`` bool mask, for ``top1_by_kind``.
    """
    has = (truth >= 0) & alive_a
    top1 = float((result.feature_b[has] == truth[has]).float().mean()) if has.any() else None
    hung = float((result_hung.feature_b[has] == truth[has]).float().mean()) if has.any() else None
    pred_none = ~result.matched & alive_a
    true_none = (truth < 0) & alive_a
    tp = int((pred_none & true_none).sum())
    prec = tp / int(pred_none.sum()) if int(pred_none.sum()) else None
    rec = tp / int(true_none.sum()) if int(true_none.sum()) else None
    out = {"top1_accuracy": top1, "hungarian_accuracy": hung, "nomatch_precision": prec, "nomatch_recall": rec,
           "n_with_partner": int(has.sum()), "n_no_partner": int(true_none.sum())}
    by_kind = {}
    for kind, mask in (kinds or {}).items():
        sel = mask & has
        if sel.any():
            by_kind[kind] = {"top1_accuracy": float((result.feature_b[sel] == truth[sel]).float().mean()),
                             "n": int(sel.sum())}
    out["top1_by_kind"] = by_kind
    return out


#: per scenario, the kinds of A feature the scenario is about (top-1 on those alone)
AFFECTED = {"split_merge": ("splits", "merges"), "near_duplicates": ("near_duplicate",),
            "shared_mean": ("shared_mean",)}


def affected_kinds(scenario: str | Iterable[str]) -> tuple[str, ...]:
    """The kinds a scenario acts on: ``a+b+c`` (or its parts) acts on the union of its parts'
    (empty: it acts on every feature)."""
    parts = scenario.split("@")[0].split("+") if isinstance(scenario, str) else list(scenario)
    return tuple(k for p in parts for k in AFFECTED.get(p, ()))


def affected_accuracy(r: dict | None, scenario: str | Iterable[str]) -> float | None:
    """Top-1 accuracy on the features the scenario acts on (all features if it acts on all)."""
    if r is None:
        return None
    kinds = affected_kinds(scenario)
    if not kinds:
        return r.get("top1_accuracy")
    hits = [(v["top1_accuracy"] * v["n"], v["n"]) for k, v in r.get("top1_by_kind", {}).items() if k in kinds]
    n = sum(c for _, c in hits)
    return sum(h for h, _ in hits) / n if n else None


def mean_ci95(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """``(mean, half-width)`` of the 95% Student-t confidence interval of the mean of ``values``.

    ``t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation; None entries
    are left out; the half-width is None below two values (and the mean below one).
    """
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, float(student_t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))


def _aggregate_score(per_seed: list[dict | None]) -> dict | None:
    present = [r for r in per_seed if r is not None]
    if not present:
        return None
    out: dict[str, Any] = {"n_seeds": len(present)}
    keys = [k for k in present[0] if k != "top1_by_kind"]
    for key in keys:
        vals = [r.get(key) for r in present]
        if not all(v is None or isinstance(v, (int, float)) for v in vals):
            continue
        mean, ci = mean_ci95(vals)
        out.update({key: mean, f"{key}_mean": mean, f"{key}_ci95": ci, f"{key}_seeds": vals})
    kinds = sorted({k for r in present for k in r.get("top1_by_kind", {})})
    out["top1_by_kind"] = {}
    for kind in kinds:
        rows = [r.get("top1_by_kind", {}).get(kind) for r in present]
        agg = _aggregate_score([{"top1_accuracy": x["top1_accuracy"], "n": x["n"]} if x else None for x in rows])
        if agg is not None:
            agg.pop("top1_by_kind", None)
            out["top1_by_kind"][kind] = agg
    return out


def aggregate_seeds(per_seed: Sequence[dict]) -> dict:
    """``{scenario: {matcher: scores}}`` per seed -> the same keys with each number's mean, CI and values.

    A matcher that is not applicable (None) in every seed stays None.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds needs the results of at least one seed")
    out: dict[str, dict] = {}
    for scenario in per_seed[0]:
        out[scenario] = {}
        for matcher in per_seed[0][scenario]:
            out[scenario][matcher] = _aggregate_score([r[scenario].get(matcher) for r in per_seed])
    return out
