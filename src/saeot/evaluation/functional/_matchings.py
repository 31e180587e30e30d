"""The matches of a run as index arrays, one :class:`PairMatching` per layer pair, and the
one-to-one subset that layer substitution needs (a partial permutation ``P [F_b, F_a]``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeot.hooks import hook_layer, hook_name

__all__ = ["ONE_TO_ONE_DOC", "PairMatching", "one_to_one", "pair_matching", "identity_matching",
           "matchings_from_rows"]

log = logging.getLogger(__name__)

ONE_TO_ONE_DOC = ("matched rows only; where many-to-one, each B feature keeps the A feature with the lowest "
                  "distance (ties: lowest index)")


@dataclass
class PairMatching:
    """The matches of one layer pair as index arrays.

    Attributes:
        hook_a, hook_b: hook names (may be equal: a layer onto itself).
        feature_a, feature_b, distance: ``[M]`` every ``matched`` row (many-to-one kept).
        oto_a, oto_b: ``[M']`` the one-to-one subset used for substitution.
        n_features_a, n_features_b: SAE widths.
        n_no_match: rows of A called "no match" (``matched == 0`` or no partner).
        n_rows: rows of the pair in ``matches.csv`` (``F_a`` for a complete run).
        no_match: ``[F_a - M]`` A features without a match.
        best_b, best_distance: ``[F_a]`` the matcher's best candidate and its distance
            for every A feature (matched or not; -1 / inf where none); for the report.
        margin: ``[F_a]`` the margin column.
    """

    hook_a: str
    hook_b: str
    feature_a: Tensor
    feature_b: Tensor
    distance: Tensor
    oto_a: Tensor
    oto_b: Tensor
    n_features_a: int
    n_features_b: int
    n_no_match: int
    n_rows: int
    no_match: Tensor
    best_b: Tensor
    best_distance: Tensor
    margin: Tensor

    @property
    def key(self) -> str:
        return f"{self.hook_a}|{self.hook_b}"

    def coverage(self, alive_a: Tensor | None = None) -> dict:
        """Fractions of A matched / "no match", of B covered; one-to-one bookkeeping."""
        out = {
            "n_features_a": self.n_features_a,
            "n_features_b": self.n_features_b,
            "n_matched": int(self.feature_a.numel()),
            "frac_a_matched": self.feature_a.numel() / max(self.n_features_a, 1),
            "frac_no_match": self.n_no_match / max(self.n_features_a, 1),
            "frac_b_covered": int(self.feature_b.unique().numel()) / max(self.n_features_b, 1),
            "n_one_to_one": int(self.oto_a.numel()),
            "n_dropped_many_to_one": int(self.feature_a.numel() - self.oto_a.numel()),
        }
        if alive_a is not None and alive_a.numel() == self.n_features_a:
            matched = torch.zeros(self.n_features_a, dtype=torch.bool)
            matched[self.feature_a] = True
            n_alive = int(alive_a.sum())
            out["n_alive_a"] = n_alive
            out["frac_alive_a_matched"] = int((matched & alive_a).sum()) / max(n_alive, 1)
        return out


def one_to_one(feature_a: Tensor, feature_b: Tensor, distance: Tensor) -> tuple[Tensor, Tensor]:
    """Keep, for every feature of B, the A feature with the lowest distance (ties: lowest A index).

    ``[M]`` long, long, float -> ``(oto_a [M'], oto_b [M'])`` sorted by ``oto_a``; each B
    index appears at most once. NaN distances count as +inf.
    """
    if feature_a.numel() == 0:
        return feature_a.clone(), feature_b.clone()
    fa, fb = feature_a.cpu().numpy(), feature_b.cpu().numpy()
    d = np.nan_to_num(distance.cpu().double().numpy(), nan=np.inf)
    order = np.lexsort((fa, d, fb))  # primary fb, then distance, then fa
    fb_sorted = fb[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = fb_sorted[1:] != fb_sorted[:-1]
    keep = order[first]
    keep = keep[np.argsort(fa[keep], kind="stable")]
    return torch.as_tensor(fa[keep], dtype=torch.long), torch.as_tensor(fb[keep], dtype=torch.long)


def pair_matching(hook_a: str, hook_b: str, rows: Sequence[dict], n_features_a: int, n_features_b: int) -> PairMatching:
    """A :class:`PairMatching` from the ``matches.csv`` rows of one layer pair."""
    fa = torch.tensor([int(r["feature_a"]) for r in rows], dtype=torch.long)
    fb = torch.tensor([int(r["feature_b"]) for r in rows], dtype=torch.long)
    dist = torch.tensor([float(r["distance"]) for r in rows], dtype=torch.float64)
    margin = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float64)
    matched = torch.tensor([int(float(r["matched"])) != 0 for r in rows], dtype=torch.bool)
    if len(rows) and (int(fa.max()) >= n_features_a or int(fa.min()) < 0):
        raise ValueError(f"matches.csv: feature_a out of range for the SAE at {hook_a} ({n_features_a} features); "
                         "is this run's SAE cache the one it was matched with?")
    if len(rows) and int(fb.max()) >= n_features_b:
        raise ValueError(f"matches.csv: feature_b out of range for the SAE at {hook_b} ({n_features_b} features)")
    ok = matched & (fb >= 0)
    best_b = torch.full((n_features_a,), -1, dtype=torch.long)
    best_d = torch.full((n_features_a,), math.inf, dtype=torch.float64)
    marg = torch.full((n_features_a,), math.nan, dtype=torch.float64)
    best_b[fa], best_d[fa], marg[fa] = fb, dist, margin
    is_matched = torch.zeros(n_features_a, dtype=torch.bool)
    is_matched[fa[ok]] = True
    oto_a, oto_b = one_to_one(fa[ok], fb[ok], dist[ok])
    return PairMatching(
        hook_a=hook_a, hook_b=hook_b, feature_a=fa[ok], feature_b=fb[ok], distance=dist[ok],
        oto_a=oto_a, oto_b=oto_b, n_features_a=n_features_a, n_features_b=n_features_b,
        n_no_match=int((~ok).sum()), n_rows=len(rows), no_match=torch.nonzero(~is_matched).flatten(),
        best_b=best_b, best_distance=best_d, margin=marg,
    )


def identity_matching(hook: str, n_features: int) -> PairMatching:
    """Every feature of one SAE matched to itself (distance 0): the substitution is the SAE's
    own reconstruction, co-activation is perfect."""
    rows = [{"feature_a": i, "feature_b": i, "distance": 0.0, "margin": 1.0, "matched": 1} for i in range(n_features)]
    return pair_matching(hook, hook, rows, n_features, n_features)


def matchings_from_rows(rows: Sequence[dict], site: str, saes: dict[str, Any]) -> list[PairMatching]:
    """One :class:`PairMatching` per (layer_a, layer_b) of ``matches.csv``, in file order."""

    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((int(r["layer_a"]), int(r["layer_b"])), []).append(r)
    out = []
    for (la, lb), rs in groups.items():
        ha, hb = hook_name(la, site), hook_name(lb, site)
        for h in (ha, hb):
            if h not in saes:
                raise ValueError(f"matches.csv has layer {hook_layer(h)} but the run's config has no SAE at {h}")
        pm = pair_matching(ha, hb, rs, saes[ha].cfg.d_sae, saes[hb].cfg.d_sae)
        if pm.n_rows != pm.n_features_a:
            log.warning("%s: %d rows in matches.csv for %d features of A", pm.key, pm.n_rows, pm.n_features_a)
        out.append(pm)
    return out
