"""The streaming pass: substitution, baselines, co-activation and coverage of every run of
a matcher sweep in one pass over the evaluation tokens (the clean forward pass, the SAE
codes and the baselines computed once per batch and shared; the substituted
continuations of a batch -- baselines, every run's pairs, the consumers' coverage
levels -- start from the shared clean ``h^B`` and run stacked per hook,
:mod:`saeot.evaluation.functional._continuations`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.evaluation.functional._batch import PassBatch, PassConsumer, PassTotals
from saeot.evaluation.functional._coactivation import CoactivationAccumulator
from saeot.evaluation.functional._continuations import Continuations
from saeot.evaluation.functional._matchings import ONE_TO_ONE_DOC, PairMatching
from saeot.evaluation.functional._settings import BASELINE_DOC, FunctionalSettings
from saeot.evaluation.functional._substitution import (
    SubstitutionAccumulator, code_ratio, is_residual, next_token_ce, run_between, substitute_codes,
)
from saeot.hooks import hook_layer
from saeot.saes.codes import decode, encode

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.data.types import DataModule
    from saeot.models.language_model import LanguageModel

__all__ = ["evaluate_functional"]


@dataclass
class _PairState:
    pm: PairMatching
    ratio: Tensor
    sub: SubstitutionAccumulator = field(default_factory=SubstitutionAccumulator)
    coact: CoactivationAccumulator | None = None
    chance: CoactivationAccumulator | None = None
    chance_b: Tensor | None = None


def evaluate_functional(
    lm: LanguageModel, saes: dict[str, SAE], datamodule: DataModule, matchings: dict[str, list[PairMatching]],
    settings: FunctionalSettings | None = None, alive: dict[str, Tensor] | None = None,
    consumers: Sequence[PassConsumer] = (),
    stack_contexts: int = 64,
) -> dict[str, dict]:
    """Substitution, baselines, co-activation and coverage of several runs that share
    ``lm``, ``saes`` and ``datamodule``, in one streaming pass over ``settings.split``.

    Args:
        lm: :class:`saeot.models.language_model.LanguageModel`.
        saes: hook -> SAE.
        datamodule: a set-up :class:`saeot.data.datamodule.HiddenStateDataModule`.
        matchings: run label -> its :class:`PairMatching` list.
        settings: :class:`FunctionalSettings`.
        alive: hook -> ``[F]`` bool, features alive during the run's profiling (coverage).
        consumers: extra consumers of every batch (:mod:`saeot.evaluation.functional._batch`),
            e.g. the equal-coverage curves; their results stay in them.
        stack_contexts: contexts per stacked forward of the substituted continuations
            (:mod:`saeot.evaluation.functional._continuations`).

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
    hooks_b = sorted({pm.hook_b for pms in matchings.values() for pm in pms}
                     | {h for c in consumers for h in c.hooks_b}, key=hook_layer)
    hooks = sorted({h for pms in matchings.values() for pm in pms for h in (pm.hook_a, pm.hook_b)}
                   | {h for c in consumers for h in c.hooks}, key=hook_layer)
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
    for batch in _batches(datamodule, s, device, "functional: means", hooks=hooks_b):
        m = batch["mask"]
        n_tok += int(m.sum())
        for h in hooks_b:
            mean[h] += batch["hidden"][h][m].double().sum(0).cpu()
    if n_tok == 0:
        raise ValueError(f"functional.split={s.split!r} has no usable token")
    mean = {h: (v / n_tok).float() for h, v in mean.items()}

    # pass 1: everything else
    sst = {h: 0.0 for h in hooks_b}
    ref_acc = {h: {r: SubstitutionAccumulator() for r in s.baselines} for h in hooks_b}  # shared by all runs
    ce_clean_sum, n_ce, n_tok1 = 0.0, 0, 0
    # the same sums per context (row of a batch), for the bootstrap over contexts (_bootstrap)
    ctx_sst: dict[str, list[Tensor]] = {h: [] for h in hooks_b}
    ctx_ce: list[Tensor] = []
    ctx_n_ce: list[Tensor] = []
    digest = hashlib.sha256()
    n_requests = n_forwards = 0
    # A -> B forwards for the consumers' deactivation tests (residual-stream hooks only)
    between = (lambda ha, hb, h: run_between(model, ha, hb, h)) if all(map(is_residual, hooks)) else None
    for batch in _batches(datamodule, s, device, "functional: substitution"):
        tokens, mask = batch["tokens"], batch["mask"]
        ce_mask = mask[:, :-1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=hooks)
            ce_clean = next_token_ce(logits, tokens)
            del logits
            ce_clean_sum += float(ce_clean[ce_mask].double().sum())
            n_ce += int(ce_mask.sum())
            ctx_ce.append(torch.where(ce_mask, ce_clean.double(), 0.0).sum(-1).cpu())
            ctx_n_ce.append(ce_mask.sum(-1).double().cpu())
            digest.update(tokens.cpu().numpy().tobytes())
            n_tok1 += int(mask.sum())
            hidden = {h: cache[h].float() for h in hooks}
            del cache
            codes = {h: encode(saes[h], hidden[h]) for h in hooks}
            # every substituted continuation of this batch, stacked per hook (run at the latest by flush())
            cont = Continuations(model, tokens, mask, hidden, stack_contexts)

            def replace(hb: str, h_hat: Tensor, acc: SubstitutionAccumulator) -> None:
                cont.submit(hb, h_hat, lambda h_sub, ce, hb=hb, acc=acc: acc.update(hidden[hb], h_sub, mask, ce,
                                                                                    ce_mask))

            for hb, accs in ref_acc.items():
                sst[hb] += float((hidden[hb] - mean[hb].to(device))[mask].double().pow(2).sum())
                d2 = (hidden[hb] - mean[hb].to(device)).double().pow(2).sum(-1)
                ctx_sst[hb].append(torch.where(mask, d2, 0.0).sum(-1).cpu())
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
            for c in consumers:
                c.update(PassBatch(tokens, mask, ce_mask, hidden, codes, cont.run_now, cont.submit, between))
            cont.flush()
            n_requests += cont.n_requests
            n_forwards += cont.n_forwards
    ce_clean = ce_clean_sum / max(n_ce, 1)
    for c in consumers:
        c.finish(PassTotals(sst=dict(sst), n_ce=n_ce, ce_clean=ce_clean,
                            context_sst={h: torch.cat(v) for h, v in ctx_sst.items()},
                            context_ce_clean=torch.cat(ctx_ce), context_n_ce=torch.cat(ctx_n_ce),
                            contexts_digest=digest.hexdigest()[:16]))
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
                "substitution": sub, "baselines": ref, "ce_recovered": rec,
                "coactivation": st.coact.summary(),
                "chance": {k: ch[k] for k in ("precision", "recall", "corr", "micro_precision")},
                "coverage": pm.coverage(None if alive is None else alive.get(pm.hook_a)),
            }
        out[label] = {
            "split": s.split, "n_tokens": n_tok1, "n_ce_tokens": n_ce, "ce_clean": ce_clean,
            "code_scale": s.code_scale, "one_to_one": ONE_TO_ONE_DOC,
            "baselines": {r: BASELINE_DOC[r] for r in s.baselines},
            "max_batches": s.max_batches, "pairs": pairs, "seconds_shared_pass": seconds,
            "n_continuations": n_requests, "n_continuation_forwards": n_forwards,
        }
    return out


def _batches(datamodule: DataModule, s: FunctionalSettings, device: torch.device, desc: str,
             hooks: list[str] | None = None):
    """Batches of ``s.split``; with the hidden states at ``hooks`` (none when ``hooks`` is None)."""
    with torch.no_grad():
        yield from datamodule.iter_batches(s.split, device=device, progress=s.progress, desc=desc,
                                           max_batches=s.max_batches, hooks=hooks, hidden=hooks is not None)

