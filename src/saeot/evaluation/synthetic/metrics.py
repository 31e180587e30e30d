"""Ground-truth metrics: how well an SAE reconstructs a world, and how well a matcher finds the truth.

Over the features of layer A (``F_a`` latents, ``truth [F_a]`` the true partner in B or -1):

* ``top1_accuracy``: the nearest candidate is the true partner (features with a partner);
* ``hungarian_accuracy``: the one-to-one assignment gives the true partner;
* ``nomatch_precision`` / ``nomatch_recall``: of the "no match" decisions (nearest mode)
  against features whose true answer is "no match" (``None`` where undefined, e.g. a
  scenario without deaths has no true "no match" for recall);
* ``top1_by_kind``: top-1 accuracy per kind of A feature (:data:`~.config.KINDS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saeot.evaluation.synthetic._random import torch_threads
from saeot.evaluation.synthetic.world import SyntheticWorld

__all__ = ["explained_variance", "match_scores", "AFFECTED", "affected_accuracy"]


@torch.no_grad()
def explained_variance(
    sae: Any, world: SyntheticWorld, hook: str, split: str = "heldout", batch_size: int = 4096
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


def match_scores(result: Any, result_hung: Any, truth: Tensor, alive_a: Tensor,
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
AFFECTED = {"split_merge": ("splits", "merges"), "near_duplicates": ("near_duplicate",)}


def affected_accuracy(r: dict | None, scenario: str) -> float | None:
    """Top-1 accuracy on the features the scenario acts on (all features if it acts on all)."""
    if r is None:
        return None
    kinds = AFFECTED.get(scenario)
    if not kinds:
        return r.get("top1_accuracy")
    hits = [(v["top1_accuracy"] * v["n"], v["n"]) for k, v in r.get("top1_by_kind", {}).items() if k in kinds]
    n = sum(c for _, c in hits)
    return sum(h for h, _ in hits) / n if n else None
