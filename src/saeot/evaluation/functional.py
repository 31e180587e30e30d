"""Functional evaluation of a finished run's matches on its real model (no judge needed).

For every layer pair (A, B) of a ``train.py`` run, on evaluation tokens streamed batch
by batch. **Which tokens** (``functional.split``):

* ``fresh`` (default): contexts packed from the run's own text source *after* the
  run's last context (same tokenizer, context length and BOS), as many as the run's
  held-out split. No stage of the run saw them: not the SAE training and profiling
  (``profile`` split), not the reference-space fit nor the activation correlations
  that the ``activation_correlation`` matcher matches on (``heldout`` split). If the
  source has no text left (``data.max_contexts=null``, or a short corpus), the
  evaluation falls back to ``heldout`` and says so (``split_note`` in the metrics);
* ``heldout``: the run's held-out split (in-sample for ``activation_correlation``
  and for the reference space of semantic OT / mean embedding);
* ``profile``: for debugging only.

Computed:

**Layer substitution** (SAE Match, Eq. 5). With ``f^A(h^A) [F_a]`` the codes of A's SAE
and the run's matching made one-to-one (below) as a partial permutation
``P [F_b, F_a]`` (``P[j, i] = 1`` iff i -> j),

    h_B_hat = W_dec^B' P f^A'(h^A) + b_dec^B

in *folded* parameters (``code_scale=fold``, the paper's choice): ``f' = f / s`` and
``W_dec' = diag(s) W_dec`` with the per-feature folding scale ``s`` of
:func:`saeot.saes.fold_scale` (JumpReLU threshold; ``1/||W_dec[i]||``
for ReLU; one shared scale for plain TopK), i.e. the code of A's feature i enters B's
decoder as ``f_i^A * s^B_j / s^A_i``. ``code_scale=none`` uses the raw codes. Reported:

* ``explained_variance`` of ``h^B``: ``1 - sum ||h^B - h_B_hat||^2 / sum ||h^B - mean(h^B)||^2``
  over the evaluation positions (BOS excluded; the mean is over the same tokens);
* ``delta_ce``: the increase of the next-token cross-entropy (nats per token, mean
  over the evaluation positions after BOS) when ``h^B`` is replaced by ``h_B_hat`` at
  hook B at every position but BOS (which keeps its clean state) and the rest of the
  model runs on it, against the clean forward pass.

and the same two numbers for the references, on the same tokens:

* ``sae``: B's own SAE reconstruction ``decode_B(encode_B(h^B))`` -- the ceiling of any
  substitution through B's dictionary (the identity matching of B onto itself
  gives exactly this);
* ``bias``: zero-ablation of the substituted part, i.e. every code zero:
  ``h_B_hat = b_dec^B`` -- "no feature carried over";
* ``mean``: mean-ablation, ``h^B`` replaced by its mean over the evaluation tokens (one vector).

``ce_recovered = (CE_mean - CE_sub) / (CE_mean - CE_sae)``: the fraction of the loss gap
between mean-ablation and B's own reconstruction that the substitution closes (1 =
as good as B's SAE, 0 = no better than the mean; ``bias`` stands in if ``mean`` is not
computed; NaN unless B's SAE is better than the ablation by more than 1e-6 nats).

**One-to-one.** Substitution needs a partial permutation. Only rows with
``matched == 1`` enter; where the run's matching is many-to-one, each feature of B
keeps the A feature with the lowest distance (ties: lowest index). The number of
pairs dropped this way is reported (``n_dropped_many_to_one``).

**Co-activation** of the matched pairs (all ``matched`` rows, many-to-one kept) on the
same evaluation tokens, streamed: per pair, ``precision = P(B fires | A fires)``,
``recall = P(A fires | B fires)`` (the fraction of B's firings that A's firing
covers) and the Pearson correlation of the two activations (all tokens, zeros
included); summarised as the mean over pairs where each is defined (A fires / B fires
/ both vary) and pooled (``micro_precision = sum n_AB / sum n_A``). ``chance_*`` is the
same for each A feature paired with a random feature of B (seeded): the level a
matcher must beat.

**Coverage**: fraction of A's features matched, fraction called "no match",
fraction of B's features that receive a match, and the fraction of A's *alive*
features (fired during the run's profiling) that are matched.

Runs that share model, data, SAEs and layers (a matcher sweep) are evaluated in one
streaming pass: the clean forward pass, the SAE codes and the references are
computed once per batch and shared. Memory is one batch of activations (plus, per
pair, a few ``[n_pairs]`` accumulators); nothing grows with the number of tokens.

Entry point: :func:`evaluate_runs` (``python evaluate.py run_dir=... | 'run_dirs=[...]'``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from saeot.hooks import hook_layer, hook_name
from saeot.io import atomic_path, atomic_write_text, read_json, update_json

log = logging.getLogger(__name__)

REFERENCES = ("sae", "bias", "mean")
REFERENCE_DOC = {
    "sae": "B's own SAE reconstruction decode_B(encode_B(h_B))",
    "bias": "zero-ablation: every code zero, h_B replaced by b_dec_B",
    "mean": "mean-ablation: h_B replaced by its mean over the evaluation tokens",
}
ONE_TO_ONE_DOC = ("matched rows only; where many-to-one, each B feature keeps the A feature with the lowest "
                  "distance (ties: lowest index)")
TABLE_COLUMNS = [
    "matcher", "layer_a", "layer_b", "run_dir",
    "ev_sub", "dce_sub", "ce_recovered", "ev_sae", "dce_sae", "ev_bias", "dce_bias", "ev_mean", "dce_mean",
    "coact_precision", "coact_recall", "coact_corr", "chance_precision", "chance_corr",
    "frac_a_matched", "frac_no_match", "frac_b_covered", "n_one_to_one",
    "judge_mean", "judge_ci_low", "judge_ci_high", "judge_n",
]


# ---------------------------------------------------------------------------- settings
@dataclass
class FunctionalSettings:
    """``functional:`` in ``conf/evaluate.yaml``.

    Attributes:
        split: ``fresh`` (contexts after the run's last one; default), ``heldout`` or ``profile``.
        fresh_contexts: contexts in the ``fresh`` split (None: as many as the held-out split).
        max_batches: cap on the batches streamed (None: the whole split).
        code_scale: ``fold`` (SAE Match Eq. 5 in folded parameters) or ``none``.
        references: which of ``sae``, ``bias``, ``mean`` to compute.
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
    code_scale: str = "fold"
    references: tuple[str, ...] = REFERENCES
    report: bool = True
    report_pairs: int = 24
    report_no_match: int = 8
    n_contexts: int = 5
    context_window: int = 12
    context_right: int = 4
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("fresh", "heldout", "profile"):
            raise ValueError(f"functional.split={self.split!r}; expected fresh, heldout or profile")
        if self.code_scale not in ("fold", "none"):
            raise ValueError(f"functional.code_scale={self.code_scale!r}; expected fold or none")
        refs = tuple(self.references)
        bad = [r for r in refs if r not in REFERENCES]
        if bad:
            raise ValueError(f"functional.references has {bad}; expected a subset of {list(REFERENCES)}")
        self.references = refs
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"functional.max_batches={self.max_batches} must be >= 1 or null")

    @classmethod
    def from_cfg(cls, node: Any) -> "FunctionalSettings":
        if node is None:
            return cls()
        d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"functional.{unknown[0]} is not a setting; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------- matchings
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


# ---------------------------------------------------------------------------- model pieces
def code_ratio(sae_a: Any, sae_b: Any, oto_a: Tensor, oto_b: Tensor, mode: str) -> Tensor:
    """``[M']`` factor applied to A's code before B's decoder: ``s^B_j / s^A_i`` (fold) or 1."""
    if mode == "none":
        return torch.ones(oto_a.numel())
    from saeot.saes import fold_scale

    s_a, s_b = fold_scale(sae_a).float().cpu(), fold_scale(sae_b).float().cpu()
    return s_b[oto_b] / s_a[oto_a]


def substitute_codes(codes_a: Tensor, oto_a: Tensor, oto_b: Tensor, ratio: Tensor, d_sae_b: int) -> Tensor:
    """``[..., F_a] -> [..., F_b]``: ``P f^A`` with ``P`` the partial permutation ``oto_a -> oto_b``
    (times ``ratio``); B features without a partner get 0."""
    out = codes_a.new_zeros(*codes_a.shape[:-1], d_sae_b)
    out[..., oto_b] = codes_a[..., oto_a] * ratio.to(codes_a)
    return out


def encode(sae: Any, h: Tensor) -> Tensor:
    """``[..., d] -> [..., F]`` codes, float32."""
    p = next(sae.parameters())
    return sae.encode(h.to(device=p.device, dtype=p.dtype)).float()


def decode(sae: Any, codes: Tensor) -> Tensor:
    """``[..., F] -> [..., d]`` ``W_dec^T codes + b_dec`` (sae_lens' own decode), float32."""
    p = next(sae.parameters())
    return sae.decode(codes.to(device=p.device, dtype=p.dtype)).float()


def run_from_hook(model: Any, hook: str, value: Tensor, tokens: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of ``model`` when the activation at ``hook`` is replaced by
    ``value [B, T, d]``. Residual-stream hooks start the forward pass right there
    (``start_at_layer``: layers before the hook are not recomputed); other hooks run the
    whole model with a replacing hook."""
    layer = hook_layer(hook)
    value = value.to(next(model.parameters()).dtype)
    if hook.endswith("hook_resid_post"):
        return model(value, start_at_layer=layer + 1, return_type="logits")
    if hook.endswith("hook_resid_pre"):
        return model(value, start_at_layer=layer, return_type="logits")
    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, lambda act, hook: value)])


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[B, T, V], [B, T] -> [B, T-1]`` cross-entropy (nats) of token t+1 given positions <= t."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------------------- accumulators
@dataclass
class SubstitutionAccumulator:
    """Sums for EV and CE of one replacement of ``h^B`` (float64)."""

    sse: float = 0.0
    ce_sum: float = 0.0

    def update(self, h: Tensor, h_hat: Tensor, mask: Tensor, ce: Tensor, ce_mask: Tensor) -> None:
        self.sse += float((h - h_hat)[mask].double().pow(2).sum())
        self.ce_sum += float(ce[ce_mask].double().sum())

    def result(self, sst: float, n_ce: int, ce_clean: float) -> dict:
        ce = self.ce_sum / max(n_ce, 1)
        return {"explained_variance": 1.0 - self.sse / sst if sst > 0 else float("nan"),
                "ce": ce, "delta_ce": ce - ce_clean}


class CoactivationAccumulator:
    """Streaming firing counts and moments of ``M`` feature pairs ``(x_m, y_m)`` on shared tokens."""

    def __init__(self, m: int) -> None:
        self.n = 0
        z = lambda dt: torch.zeros(m, dtype=dt)  # noqa: E731
        self.n_a, self.n_b, self.n_ab = z(torch.long), z(torch.long), z(torch.long)
        self.sx, self.sy, self.sxx, self.syy, self.sxy = (z(torch.float64) for _ in range(5))

    def update(self, x: Tensor, y: Tensor) -> None:
        """``x, y [N, M]``: activations of the A and B feature of every pair on N tokens."""
        fa, fb = x > 0, y > 0
        self.n += x.shape[0]
        self.n_a += fa.sum(0).cpu()
        self.n_b += fb.sum(0).cpu()
        self.n_ab += (fa & fb).sum(0).cpu()
        x, y = x.double(), y.double()
        self.sx += x.sum(0).cpu()
        self.sy += y.sum(0).cpu()
        self.sxx += (x * x).sum(0).cpu()
        self.syy += (y * y).sum(0).cpu()
        self.sxy += (x * y).sum(0).cpu()

    def per_pair(self) -> dict[str, Tensor]:
        """``[M]`` precision / recall / corr, NaN where undefined."""
        nan = torch.full_like(self.sx, math.nan)
        prec = torch.where(self.n_a > 0, self.n_ab / self.n_a.clamp_min(1), nan)
        rec = torch.where(self.n_b > 0, self.n_ab / self.n_b.clamp_min(1), nan)
        n = max(self.n, 1)
        cov = self.sxy / n - (self.sx / n) * (self.sy / n)
        vx = (self.sxx / n - (self.sx / n) ** 2).clamp_min(0)
        vy = (self.syy / n - (self.sy / n) ** 2).clamp_min(0)
        ok = (vx > 1e-12 * (self.sxx / n).clamp_min(1e-30)) & (vy > 1e-12 * (self.syy / n).clamp_min(1e-30))
        corr = torch.where(ok, cov / (vx * vy).sqrt().clamp_min(1e-300), nan).clamp(-1, 1)
        return {"precision": prec, "recall": rec, "corr": corr}

    def summary(self) -> dict:
        pp = self.per_pair()

        def mean(t: Tensor) -> float:
            t = t[~t.isnan()]
            return float(t.mean()) if t.numel() else float("nan")

        def median(t: Tensor) -> float:
            t = t[~t.isnan()]
            return float(t.median()) if t.numel() else float("nan")

        return {
            "n_pairs": int(self.sx.numel()), "n_tokens": self.n,
            "precision": mean(pp["precision"]), "recall": mean(pp["recall"]),
            "corr": mean(pp["corr"]), "corr_median": median(pp["corr"]),
            "n_precision_defined": int((~pp["precision"].isnan()).sum()),
            "n_recall_defined": int((~pp["recall"].isnan()).sum()),
            "n_corr_defined": int((~pp["corr"].isnan()).sum()),
            "micro_precision": float(self.n_ab.sum() / self.n_a.sum()) if int(self.n_a.sum()) else float("nan"),
            "micro_recall": float(self.n_ab.sum() / self.n_b.sum()) if int(self.n_b.sum()) else float("nan"),
        }


# ---------------------------------------------------------------------------- the streaming pass
@dataclass
class _PairState:
    pm: PairMatching
    ratio: Tensor
    sub: SubstitutionAccumulator = field(default_factory=SubstitutionAccumulator)
    coact: CoactivationAccumulator | None = None
    chance: CoactivationAccumulator | None = None
    chance_b: Tensor | None = None


def evaluate_functional(
    lm: Any, saes: dict[str, Any], datamodule: Any, matchings: dict[str, list[PairMatching]],
    settings: FunctionalSettings | None = None, alive: dict[str, Tensor] | None = None,
) -> dict[str, dict]:
    """Substitution, references, co-activation and coverage of several runs that share
    ``lm``, ``saes`` and ``datamodule``, in one streaming pass over ``settings.split``.

    Args:
        lm: :class:`saeot.lm.LanguageModel`.
        saes: hook -> SAE.
        datamodule: a set-up :class:`saeot.data.datamodule.HiddenStateDataModule`.
        matchings: run label -> its :class:`PairMatching` list.
        settings: :class:`FunctionalSettings`.
        alive: hook -> ``[F]`` bool, features alive during the run's profiling (coverage).

    Returns:
        run label -> ``{"pairs": {"hook_a|hook_b": {...}}, "ce_clean": ..., ...}`` (the
        ``"functional"`` entry of its metrics.json).
    """
    s = settings or FunctionalSettings()
    t0 = time.perf_counter()
    model = lm.model
    device = next(model.parameters()).device
    for sae in saes.values():
        sae.to(device)
    hooks_b = sorted({pm.hook_b for pms in matchings.values() for pm in pms}, key=hook_layer)
    hooks = sorted({h for pms in matchings.values() for pm in pms for h in (pm.hook_a, pm.hook_b)}, key=hook_layer)
    for h in hooks:
        if h not in saes:
            raise ValueError(f"no SAE loaded for {h}")
    g = torch.Generator().manual_seed(s.seed)
    states: dict[str, list[_PairState]] = {}
    for label, pms in matchings.items():
        states[label] = []
        for pm in pms:
            st = _PairState(pm=pm, ratio=code_ratio(saes[pm.hook_a], saes[pm.hook_b], pm.oto_a, pm.oto_b, s.code_scale))
            st.coact = CoactivationAccumulator(pm.feature_a.numel())
            st.chance = CoactivationAccumulator(pm.feature_a.numel())
            st.chance_b = torch.randint(pm.n_features_b, (pm.feature_a.numel(),), generator=g)
            states[label].append(st)

    # pass 0: the mean of h^B over the split (mean-ablation and the EV denominator); stops at the last hook
    mean = {h: torch.zeros(lm.d_model, dtype=torch.float64) for h in hooks_b}
    n_tok = 0
    for batch in _batches(datamodule, s, device, hidden=True, desc="functional: means"):
        m = batch["mask"]
        n_tok += int(m.sum())
        for h in hooks_b:
            mean[h] += batch["hidden"][h][m].double().sum(0).cpu()
    if n_tok == 0:
        raise ValueError(f"functional.split={s.split!r} has no usable token")
    mean = {h: (v / n_tok).float() for h, v in mean.items()}

    # pass 1: everything else
    sst = {h: 0.0 for h in hooks_b}
    ref_acc = {h: {r: SubstitutionAccumulator() for r in s.references} for h in hooks_b}  # shared by all runs
    ce_clean_sum, n_ce, n_tok1 = 0.0, 0, 0
    for batch in _batches(datamodule, s, device, hidden=False, desc="functional: substitution"):
        tokens, mask = batch["tokens"], batch["mask"]
        ce_mask = mask[:, :-1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=hooks)
            ce_clean = next_token_ce(logits, tokens)
            del logits
            ce_clean_sum += float(ce_clean[ce_mask].double().sum())
            n_ce += int(ce_mask.sum())
            n_tok1 += int(mask.sum())
            hidden = {h: cache[h].float() for h in hooks}
            del cache
            codes = {h: encode(saes[h], hidden[h]) for h in hooks}
            keep = mask[..., None]

            def replace(hb: str, h_hat: Tensor, acc: SubstitutionAccumulator) -> None:
                h_b = hidden[hb]
                h_sub = torch.where(keep, h_hat.expand_as(h_b), h_b)
                ce = next_token_ce(run_from_hook(model, hb, h_sub, tokens), tokens)
                acc.update(h_b, h_sub, mask, ce, ce_mask)

            for hb, accs in ref_acc.items():
                sst[hb] += float((hidden[hb] - mean[hb].to(device))[mask].double().pow(2).sum())
                for r, acc in accs.items():
                    if r == "sae":
                        h_hat = decode(saes[hb], codes[hb])
                    elif r == "bias":
                        h_hat = saes[hb].b_dec.detach().float()[None, None, :]
                    else:
                        h_hat = mean[hb].to(device)[None, None, :]
                    replace(hb, h_hat, acc)
            for sts in states.values():
                for st in sts:
                    pm = st.pm
                    ca, cb = codes[pm.hook_a], codes[pm.hook_b]
                    sub = substitute_codes(ca, pm.oto_a.to(device), pm.oto_b.to(device), st.ratio, pm.n_features_b)
                    replace(pm.hook_b, decode(saes[pm.hook_b], sub), st.sub)
                    xa, xb = ca[mask], cb[mask]
                    x = xa[:, pm.feature_a.to(device)]
                    st.coact.update(x, xb[:, pm.feature_b.to(device)])
                    st.chance.update(x, xb[:, st.chance_b.to(device)])
    ce_clean = ce_clean_sum / max(n_ce, 1)
    ref_res = {hb: {r: acc.result(sst[hb], n_ce, ce_clean) for r, acc in accs.items()} for hb, accs in ref_acc.items()}
    seconds = time.perf_counter() - t0

    out = {}
    for label, sts in states.items():
        pairs = {}
        for st in sts:
            pm = st.pm
            sub = st.sub.result(sst[pm.hook_b], n_ce, ce_clean)
            sub["n_pairs_used"] = int(pm.oto_a.numel())
            ref = ref_res[pm.hook_b]
            base = ref.get("mean") or ref.get("bias")
            rec = float("nan")
            if base is not None and "sae" in ref:
                gap = base["ce"] - ref["sae"]["ce"]  # undefined unless B's SAE beats the ablation
                rec = (base["ce"] - sub["ce"]) / gap if gap > 1e-6 else float("nan")
            ch = st.chance.summary()
            pairs[pm.key] = {
                "layer_a": hook_layer(pm.hook_a), "layer_b": hook_layer(pm.hook_b),
                "substitution": sub, "reference": ref, "ce_recovered": rec,
                "coactivation": st.coact.summary(),
                "chance": {k: ch[k] for k in ("precision", "recall", "corr", "micro_precision")},
                "coverage": pm.coverage(None if alive is None else alive.get(pm.hook_a)),
            }
        out[label] = {
            "split": s.split, "n_tokens": n_tok1, "n_ce_tokens": n_ce, "ce_clean": ce_clean,
            "code_scale": s.code_scale, "one_to_one": ONE_TO_ONE_DOC,
            "references": {r: REFERENCE_DOC[r] for r in s.references},
            "max_batches": s.max_batches, "pairs": pairs, "seconds_shared_pass": seconds,
        }
    return out


def _batches(datamodule: Any, s: FunctionalSettings, device: torch.device, hidden: bool, desc: str):
    with torch.no_grad():
        yield from datamodule.iter_batches(s.split, device=device, progress=s.progress, desc=desc,
                                           max_batches=s.max_batches, hidden=hidden)


# ---------------------------------------------------------------------------- fresh tokens
def add_fresh_split(run: Any, n_contexts: int | None = None) -> tuple[int, str]:
    """Append up to ``n_contexts`` contexts packed from the run's text *after* its last context
    to ``run.datamodule`` as split ``"fresh"``; returns ``(n_added, note)``.

    The run's text source is packed again with a larger ``max_contexts``; the first
    contexts must be the run's own (checked), the rest are new. Call after anything that
    fingerprints the data module (the SAE cache key hashes its contexts).
    """
    from saeot.pipeline import build

    dm = run.datamodule
    n0 = len(dm.contexts)
    n = n_contexts if n_contexts is not None else len(dm.splits["heldout"])
    if dm.max_contexts is None or n0 < dm.max_contexts:
        return 0, f"the run used all of its text ({n0} contexts): nothing left for a fresh split"
    try:
        more = build(run.cfg.data, partial=True)(lm=run.lm, hooks=run.hooks, max_contexts=n0 + n)
        more.setup()
    except Exception as e:  # e.g. a source that cannot be read twice
        return 0, f"could not pack more text ({type(e).__name__}: {e})"
    if len(more.contexts) < n0 or not torch.equal(more.contexts[:n0], dm.contexts):
        return 0, "packing the text again did not reproduce the run's contexts (non-deterministic source?)"
    extra = len(more.contexts) - n0
    if extra <= 0:
        return 0, f"the text source holds no context beyond the run's {n0}"
    dm.contexts = more.contexts
    dm.splits["fresh"] = torch.arange(n0, n0 + extra)
    note = f"{extra} contexts packed after the run's {n0}" + (f" (asked for {n})" if extra < n else "")
    return extra, note


# ---------------------------------------------------------------------------- runs on disk
@dataclass
class RunDir:
    """A finished ``train.py`` run as the evaluation reads it."""

    path: Path
    cfg: DictConfig
    matcher: str
    rows: list[dict]
    label: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "RunDir":
        from saeot.pipeline import read_matches

        path = Path(path)
        cfg_file = path / ".hydra" / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"run_dir={path} has no .hydra/config.yaml: point it at a finished train.py run")
        if not (path / "matches.csv").is_file():
            raise FileNotFoundError(f"run_dir={path} has no matches.csv: point it at a finished train.py run")
        cfg = OmegaConf.load(cfg_file)
        matcher = None
        if (path / "metrics.json").is_file():
            matcher = read_json(path / "metrics.json").get("matching", {}).get("matcher")
        if not matcher:
            matcher = str(cfg.matcher.get("_target_", "matcher")).rsplit(".", 1)[-1]
        return cls(path=path, cfg=cfg, matcher=matcher, rows=read_matches(path / "matches.csv"))

    def setup_key(self) -> str:
        """Runs with equal keys share model, data, SAEs and layers: one streaming pass serves them all."""
        parts = {k: OmegaConf.to_container(self.cfg[k], resolve=False) if isinstance(self.cfg.get(k), DictConfig)
                 else self.cfg.get(k) for k in ("model", "sae", "data", "layers", "seed")}
        return json.dumps(parts, sort_keys=True, default=str)


def _label_runs(runs: list[RunDir]) -> None:
    """Label = matcher name, made unique with the directory name where matchers repeat."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.matcher] = counts.get(r.matcher, 0) + 1
    seen: set[str] = set()
    for r in runs:
        label = r.matcher if counts[r.matcher] == 1 else f"{r.matcher} ({r.path.name})"
        while label in seen:
            label += "'"
        seen.add(label)
        r.label = label


def _check_sae_cache(run: RunDir, setup_run: Any, t_started: float) -> dict:
    """Where the SAEs came from; warns if locally trained SAEs were (re)trained now."""
    from saeot.pipeline import build
    from saeot.saes import LocalTrainedSAEs

    info: dict[str, Any] = {"provider": str(run.cfg.sae.get("_target_"))}
    try:
        provider = build(run.cfg.sae)
    except Exception:  # already built once by setup; never fail the evaluation here
        return info
    if isinstance(provider, LocalTrainedSAEs):
        fp = setup_run.datamodule.fingerprint()
        paths = {h: provider.cache_path(setup_run.lm, h, fp) for h in setup_run.hooks}
        info["cache"] = {h: str(p) for h, p in paths.items()}
        fresh = [h for h, p in paths.items() if p.exists() and p.stat().st_mtime >= t_started]
        info["retrained"] = fresh
        if fresh:
            log.warning("SAEs for %s were not in the cache and were trained now; they should equal the run's "
                        "(seeded) but check %s", fresh, provider._root())
    return info


def _alive(run_dir: Path, hooks: Sequence[str]) -> dict[str, Tensor]:
    from saeot.io import load_safetensors_checked

    out = {}
    for h in hooks:
        f = run_dir / "features" / f"{h}.safetensors"
        if f.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as fh:
                    out[h] = fh.get_tensor("n_fire") > 0
            except Exception:
                tensors, _ = load_safetensors_checked(f, required=("n_fire",))
                out[h] = tensors["n_fire"] > 0
    return out


def evaluate_runs(cfg: DictConfig, run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Functional evaluation (and judge, report) of finished ``train.py`` runs.

    Every run dir gets ``metrics.json["functional"]`` (and ``["judge"]`` when ``judge=`` is
    set) and ``report.html``; ``out_dir`` gets ``functional_table.md`` / ``.csv``, one row
    per run x layer pair. Runs sharing model, data, SAEs and layers are evaluated in one
    streaming pass. Returns ``{"rows": [...], "table": <path>}``.
    """
    from saeot.pipeline import setup

    settings = FunctionalSettings.from_cfg(cfg.get("functional"))
    judge = _build_judge(cfg)
    out_dir = Path(out_dir)
    runs = [RunDir.load(d) for d in run_dirs]
    _label_runs(runs)
    groups: dict[str, list[RunDir]] = {}
    for r in runs:
        groups.setdefault(r.setup_key(), []).append(r)
    all_rows: list[dict] = []
    judge_rows: list[dict] = []
    for group in groups.values():
        lead = group[0]
        log.info("evaluating %s (%d run(s) sharing model / data / SAEs)", [r.label for r in group], len(group))
        t_setup = time.time()
        t0 = time.perf_counter()
        base = setup(lead.cfg, lead.path)
        provenance = _check_sae_cache(lead, base, t_setup)
        group_settings, split_note = settings, None
        if settings.split == "fresh":
            n_fresh, split_note = add_fresh_split(base, settings.fresh_contexts)
            if n_fresh == 0:
                log.warning("functional.split=fresh: %s; evaluating on the held-out split instead", split_note)
                split_note = f"fell back to heldout: {split_note}"
                group_settings = dataclasses.replace(settings, split="heldout")
        setup_seconds = time.perf_counter() - t0
        matchings = {r.label: matchings_from_rows(r.rows, str(lead.cfg.layers.site), base.saes) for r in group}
        results = evaluate_functional(base.lm, base.saes, base.datamodule, matchings, group_settings)
        for r in group:  # coverage against the features alive in each run's own profiling
            alive = _alive(r.path, base.hooks)
            for pm in matchings[r.label]:
                results[r.label]["pairs"][pm.key]["coverage"] = pm.coverage(alive.get(pm.hook_a))
        for r in group:
            func = results[r.label]
            func.update({"matcher": r.matcher, "label": r.label, "setup_seconds": setup_seconds, "split_note": split_note,
                         "saes": provenance, "n_runs_sharing_pass": len(group)})
            update_json(r.path / "metrics.json", "functional", func)
            judged = None
            if judge is not None:
                from saeot.evaluation.judge import judge_run

                judged = judge_run(judge, r, matchings[r.label], base, settings)
                update_json(r.path / "metrics.json", "judge", judged)
            if settings.report:
                from saeot.evaluation.report import write_run_report

                write_run_report(r.path / "report.html", r, matchings[r.label], base, settings, func, judged)
            all_rows.extend(table_rows(r, func, judged))
            if judged is not None:
                judge_rows.append(judge_row(r, judged))
        del base
    table = write_table(all_rows, out_dir, judge_rows)
    log.info("functional table: %s", table)
    return {"rows": all_rows, "judge": judge_rows, "table": str(table)}


def _build_judge(cfg: DictConfig) -> Any:
    node = cfg.get("judge")
    if node is None:
        return None
    from saeot.pipeline import build

    return build(node)


# ---------------------------------------------------------------------------- table
def table_rows(run: RunDir, func: dict, judged: dict | None = None) -> list[dict]:
    """One row per layer pair of ``func`` (a run's ``metrics.json["functional"]``)."""
    rows = []
    for key, p in func["pairs"].items():
        ref, co, cov, ch = p["reference"], p["coactivation"], p["coverage"], p["chance"]
        row = {
            "matcher": run.label, "layer_a": p["layer_a"], "layer_b": p["layer_b"], "run_dir": str(run.path),
            "ev_sub": p["substitution"]["explained_variance"], "dce_sub": p["substitution"]["delta_ce"],
            "ce_recovered": p["ce_recovered"],
            "coact_precision": co["precision"], "coact_recall": co["recall"], "coact_corr": co["corr"],
            "chance_precision": ch["precision"], "chance_corr": ch["corr"],
            "frac_a_matched": cov["frac_a_matched"], "frac_no_match": cov["frac_no_match"],
            "frac_b_covered": cov["frac_b_covered"], "n_one_to_one": cov["n_one_to_one"],
        }
        for r in REFERENCES:
            row[f"ev_{r}"] = ref.get(r, {}).get("explained_variance", float("nan"))
            row[f"dce_{r}"] = ref.get(r, {}).get("delta_ce", float("nan"))
        jp = (judged or {}).get("pairs", {}).get(key)
        row["judge_mean"] = jp["mean"] if jp else float("nan")
        row["judge_ci_low"], row["judge_ci_high"] = (jp["ci"] if jp else (float("nan"), float("nan")))
        row["judge_n"] = jp["n"] if jp else 0
        rows.append(row)
    return rows


_MD_HEADER = [
    ("matcher", "matcher"), ("pair", "A→B"), ("ev_sub", "EV sub"), ("dce_sub", "ΔCE sub"),
    ("ce_recovered", "CE rec."), ("ev_sae", "EV SAE"), ("dce_sae", "ΔCE SAE"), ("ev_bias", "EV zero"),
    ("dce_bias", "ΔCE zero"), ("ev_mean", "EV mean"), ("dce_mean", "ΔCE mean"),
    ("coact_precision", "co-act P"), ("coact_recall", "co-act R"), ("coact_corr", "corr"),
    ("chance_corr", "corr (rand)"), ("frac_a_matched", "A matched"), ("frac_no_match", "no match"),
    ("frac_b_covered", "B covered"), ("n_one_to_one", "n 1:1"), ("judge", "judge (95% CI)"),
]


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def judge_row(run: RunDir, judged: dict) -> dict:
    """Per-run (matcher) judge summary, all layer pairs pooled, with the random-pair control."""
    o, c = judged["overall"], judged.get("control_overall") or {}
    return {"matcher": run.label, "n": o["n"], "n_invalid": o["n_invalid"], "mean": o["mean"],
            "ci_low": o["ci"][0], "ci_high": o["ci"][1], **{f"n_{k}": v for k, v in o["counts"].items()},
            "control_n": c.get("n", 0), "control_mean": c.get("mean", float("nan")),
            "control_ci_low": (c.get("ci") or [float("nan")] * 2)[0],
            "control_ci_high": (c.get("ci") or [float("nan")] * 2)[1],
            "expected_mean": (o.get("expected_score") or {}).get("mean", float("nan")),
            "control_expected_mean": (c.get("expected_score") or {}).get("mean", float("nan")),
            "backend": judged["backend"].get("model", judged["backend"].get("backend"))}


def format_judge_markdown(rows: list[dict]) -> str:
    """Per-matcher judge table: mean score (3 same / 2 maybe / 1 different) with its CI and the control."""
    lines = ["| matcher | judge | n | mean score | 95% CI | same / maybe / different | random pairs: mean [CI] "
             "| expected score: matched / random |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matcher']} | {r['backend']} | {r['n']} | {_fmt(r['mean'], 2)} | "
                     f"[{_fmt(r['ci_low'], 2)}, {_fmt(r['ci_high'], 2)}] | "
                     f"{r.get('n_same', 0)} / {r.get('n_maybe', 0)} / {r.get('n_different', 0)} | "
                     f"{_fmt(r['control_mean'], 2)} [{_fmt(r['control_ci_low'], 2)}, {_fmt(r['control_ci_high'], 2)}] "
                     f"(n={r['control_n']}) | {_fmt(r['expected_mean'], 3)} / {_fmt(r['control_expected_mean'], 3)} |")
    return "\n".join(lines) + "\n"


def format_markdown(rows: list[dict]) -> str:
    """The markdown table (rows sorted by layer pair, then matcher)."""
    rows = sorted(rows, key=lambda r: (r["layer_b"] - r["layer_a"], r["layer_a"], r["layer_b"], r["matcher"]))
    has_judge = any(r.get("judge_n") for r in rows)
    header = [(k, t) for k, t in _MD_HEADER if k != "judge" or has_judge]
    lines = ["| " + " | ".join(t for _, t in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = []
        for k, _ in header:
            if k == "pair":
                cells.append(f"{r['layer_a']}→{r['layer_b']}")
            elif k == "judge":
                cells.append(f"{r['judge_mean']:.2f} [{r['judge_ci_low']:.2f}, {r['judge_ci_high']:.2f}] (n={r['judge_n']})"
                             if r.get("judge_n") else "–")
            else:
                cells.append(_fmt(r.get(k)))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "EV: explained variance of h^B on evaluation tokens (functional.split, default fresh: text packed after the "
        "run's last context, seen by no stage of the run); ΔCE: increase of next-token cross-entropy (nats/token) "
        "when h^B is replaced. sub: A's SAE codes through the one-to-one matching into B's decoder (SAE Match Eq. 5, "
        "folded codes); SAE: B's own SAE reconstruction (ceiling); zero: all codes zero (h^B -> b_dec^B); mean: h^B -> "
        "its mean over the evaluation tokens. CE rec.: (CE_mean - CE_sub) / (CE_mean - CE_SAE). co-act P / R: P(B fires | A fires), "
        "P(A fires | B fires), mean over matched pairs; corr: Pearson correlation of the pair's activations; "
        "corr (rand): A features paired with random B features. A matched / no match: fractions of A's features; "
        "B covered: fraction of B's features that receive a match; n 1:1: pairs used for substitution.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_table(rows: list[dict], out_dir: str | Path, judge_rows: list[dict] | None = None) -> Path:
    """``out_dir/functional_table.md`` and ``.csv`` (atomic); with a judge, its per-matcher
    table is appended to the markdown and written to ``judge_table.csv``."""
    out_dir = Path(out_dir)
    md = out_dir / "functional_table.md"
    text = format_markdown(rows)
    if judge_rows:
        text += "\nLLM judge, all layer pairs pooled (mean of 3 = same, 2 = maybe, 1 = different):\n\n"
        text += format_judge_markdown(judge_rows)
        with atomic_path(out_dir / "judge_table.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(judge_rows[0]))
            w.writeheader()
            w.writerows(judge_rows)
    atomic_write_text(md, text)
    with atomic_path(out_dir / "functional_table.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return md


__all__ = [
    "FunctionalSettings", "PairMatching", "one_to_one", "pair_matching", "identity_matching",
    "matchings_from_rows", "substitute_codes", "code_ratio", "run_from_hook", "next_token_ce",
    "SubstitutionAccumulator", "CoactivationAccumulator", "evaluate_functional", "add_fresh_split", "RunDir",
    "evaluate_runs", "table_rows", "judge_row", "format_markdown", "format_judge_markdown", "write_table",
]
