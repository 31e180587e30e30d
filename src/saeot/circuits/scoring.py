r"""Scoring circuits and their supernode compressions by mean ablation (faithfulness, coherence).

Ablation
--------
For a set C of nodes (features and error nodes at the circuit hooks) the model is
run on the clean prompts with, at every circuit hook in forward order,

.. math::
    h \leftarrow \mathrm{dec}\big(f \odot 1_C + \mu_f \odot (1 - 1_C)\big) + \big(e \text{ if } e \in C
    \text{ else } \mu_e\big), \qquad f = \mathrm{enc}(h),\ e = h - \mathrm{dec}(f),

where ``h`` is the hidden state as it arrives (already changed by the ablations at
earlier hooks) and :math:`\mu_f`, :math:`\mu_e` are means over the task's clean prompts:

* ``position`` (default): per token position, over the clean prompts *of the same
  length* (``[T, F]`` and ``[T, d]``; prompts of one length mostly share a template,
  so the mean keeps the template and averages out what varies: names, numbers);
  lengths with fewer than ``min_prompts`` prompts fall back to ``global``;
* ``global``: over all non-BOS positions of all clean prompts (``[F]``, ``[d]``). This
  also erases the template and is far more destructive when the circuit hooks are
  early layers.

The BOS position is identical in every prompt and is never changed. Keeping every
node reproduces the model exactly; keeping none gives the "empty circuit".

Faithfulness
------------
.. math::
    \mathcal F(C) = \frac{\bar m(C) - \bar m(\varnothing)}{\bar m(M) - \bar m(\varnothing)}

with :math:`\bar m` the mean logit difference over prompts and M the full model. Task
accuracy under C is the fraction of prompts whose logit difference stays > 0.

Supernode circuits
------------------
A clustering partitions the circuit nodes into supernodes (error nodes are
singletons). The aggregated effect of a supernode S is :math:`\sum_{x \in S} \mathrm{IE}(x)`
(signed: members that push in opposite directions cancel). The *compressed circuit*
keeps the ``budget`` supernodes with the largest :math:`|\sum_{x\in S}\mathrm{IE}(x)|`, whole, and
ablates every other supernode as a unit (all its members at once), together with
everything outside the circuit. Compared at the same number of supernodes and the
same budget, a clustering that groups nodes of one role keeps more of the task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.circuits.attribution import NodeRef, _check_hooks, _split, sae_decode
from saeot.circuits.tasks import TaskData, logit_diff
from saeot.progress import progress_bar

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens.hook_points import HookPoint

    from saeot.models.language_model import LanguageModel

__all__ = [
    "ABLATIONS",
    "AblationMeans",
    "feature_means",
    "keep_masks",
    "ablated_logit_diffs",
    "faithfulness",
    "CircuitScore",
    "score_circuit",
    "supernode_effects",
    "compressed_circuit",
    "coherence",
    "pearson",
]


@dataclass
class AblationMeans:
    """Mean values used for ablation.

    Attributes:
        features: ``hook -> [F]`` global means (non-BOS positions of all clean prompts).
        errors: ``hook -> [d]`` the same for the error term.
        features_at: ``hook -> {T: [T, F]}`` per-position means over the clean prompts of
            length T (only lengths with at least ``min_prompts`` prompts).
        errors_at: ``hook -> {T: [T, d]}``.
        mode: ``position`` or ``global`` (which :meth:`at` returns).
    """

    features: dict[str, Tensor]
    errors: dict[str, Tensor]
    features_at: dict[str, dict[int, Tensor]]
    errors_at: dict[str, dict[int, Tensor]]
    mode: str = "position"

    def at(self, hook: str, T: int) -> tuple[Tensor, Tensor]:
        """``(mu_f, mu_e)`` for a batch of length T: ``[T, F], [T, d]`` (position mode, if
        that length has them) or ``[F], [d]`` (broadcast over positions)."""
        if self.mode == "position" and T in self.features_at[hook]:
            return self.features_at[hook][T], self.errors_at[hook][T]
        return self.features[hook], self.errors[hook]


ABLATIONS = ("position", "global")


@torch.no_grad()
def feature_means(lm: LanguageModel, saes: dict[str, SAE], hooks: Sequence[str], data: TaskData, batch_size: int = 16,
                  progress: bool = True, mode: str = "position", min_prompts: int = 4) -> AblationMeans:
    """Means of every feature and of the error vector over the clean prompts (plain
    forward passes, no intervention): global (non-BOS positions) and per position for
    every prompt length with at least ``min_prompts`` prompts (module docstring)."""
    if mode not in ABLATIONS:
        raise ValueError(f"callbacks.circuit.ablation={mode!r}; use one of {ABLATIONS}")
    model = lm.model
    hooks = _check_hooks(model, saes, hooks)
    device = next(model.parameters()).device
    sf = {h: torch.zeros(saes[h].cfg.d_sae, dtype=torch.float64) for h in hooks}
    se = {h: torch.zeros(model.cfg.d_model, dtype=torch.float64) for h in hooks}
    pf: dict[str, dict[int, Tensor]] = {h: {} for h in hooks}
    pe: dict[str, dict[int, Tensor]] = {h: {} for h in hooks}
    n_len: dict[int, int] = {}
    count = 0
    bar = progress_bar(total=data.n, desc="ablation means", enabled=progress, leave=False)
    for b in data.batches(batch_size, device):
        T = b.clean.shape[1]
        _, cache = model.run_with_cache(b.clean, names_filter=hooks)
        start = 1 if b.bos and T > 1 else 0
        for h in hooks:
            f, e = _split(saes[h], cache[h])
            sf[h] += f[:, start:].double().sum((0, 1)).cpu()
            se[h] += e[:, start:].double().sum((0, 1)).cpu()
            pf[h][T] = pf[h].get(T, 0) + f.double().sum(0).cpu()
            pe[h][T] = pe[h].get(T, 0) + e.double().sum(0).cpu()
        count += b.n * (T - start)
        n_len[T] = n_len.get(T, 0) + b.n
        bar.update(b.n)
    bar.close()
    keep = {T for T, n in n_len.items() if n >= min_prompts}
    return AblationMeans(
        features={h: (v / count).float() for h, v in sf.items()},
        errors={h: (v / count).float() for h, v in se.items()},
        features_at={h: {T: (v / n_len[T]).float() for T, v in pf[h].items() if T in keep} for h in hooks},
        errors_at={h: {T: (v / n_len[T]).float() for T, v in pe[h].items() if T in keep} for h in hooks},
        mode=mode,
    )


def keep_masks(saes: dict[str, SAE], hooks: Sequence[str], nodes: Sequence[NodeRef]) -> dict[str, tuple[Tensor, bool]]:
    """``hook -> (keep [F] bool, keep_error)`` for the nodes of a circuit."""
    masks = {h: (torch.zeros(saes[h].cfg.d_sae, dtype=torch.bool), False) for h in hooks}
    for n in nodes:
        if n.hook not in masks:
            raise ValueError(f"node {n} is at a hook outside the circuit hooks {list(hooks)}")
        feats, err = masks[n.hook]
        if n.is_error:
            masks[n.hook] = (feats, True)
        else:
            feats[n.feature] = True
    return masks


@torch.no_grad()
def ablated_logit_diffs(lm: LanguageModel, saes: dict[str, SAE], data: TaskData, keep: dict[str, tuple[Tensor, bool]],
                        means: AblationMeans, batch_size: int = 16) -> Tensor:
    """``[N]`` logit differences on the clean prompts with everything outside ``keep``
    mean-ablated (module docstring)."""
    model = lm.model
    hooks = _check_hooks(model, saes, list(keep))
    device = next(model.parameters()).device
    masks = {h: (keep[h][0].to(device), keep[h][1]) for h in hooks}

    def ablate(h: Tensor, hook: HookPoint, bos: bool) -> Tensor:
        name = hook.name
        keep_f, keep_e = masks[name]
        f, e = _split(saes[name], h)
        mu_f, mu_e = means.at(name, h.shape[1])
        f_new = torch.where(keep_f, f, mu_f.to(device=f.device, dtype=f.dtype))
        e_new = e if keep_e else mu_e.to(device=e.device, dtype=e.dtype).expand_as(e)
        h_new = sae_decode(saes[name], f_new, h) + e_new
        if bos:
            h_new[:, 0] = h[:, 0]
        return h_new

    out = torch.empty(data.n)
    for b in data.batches(batch_size, device):
        fwd = [(h, lambda x, hook, bos=b.bos: ablate(x, hook, bos)) for h in hooks]
        lg = model.run_with_hooks(b.clean, fwd_hooks=fwd)
        out[b.index] = logit_diff(lg, b.correct, b.wrong).float().cpu()
    return out


def faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """:math:`(m(C) - m(\\varnothing)) / (m(M) - m(\\varnothing))`; ``nan`` when the denominator is ~0."""
    denom = m_full - m_empty
    if not math.isfinite(denom) or abs(denom) < 1e-8:
        return float("nan")
    return (m_circuit - m_empty) / denom


@dataclass
class CircuitScore:
    """Mean metric, faithfulness and accuracy of one ablated circuit."""

    metric: float
    faithfulness: float
    accuracy: float
    n_nodes: int


def score_circuit(lm: LanguageModel, saes: dict[str, SAE], hooks: Sequence[str], data: TaskData, nodes: Sequence[NodeRef],
                  means: AblationMeans, m_full: float, m_empty: float, batch_size: int = 16) -> CircuitScore:
    """Mean-ablate everything at ``hooks`` but ``nodes`` and score the result."""
    ld = ablated_logit_diffs(lm, saes, data, keep_masks(saes, hooks, nodes), means, batch_size)
    m = float(ld.mean())
    return CircuitScore(metric=m, faithfulness=faithfulness(m, m_full, m_empty),
                        accuracy=float((ld > 0).float().mean()), n_nodes=len(nodes))


def supernode_effects(groups: Sequence[Sequence[NodeRef]], effect: dict[NodeRef, float]) -> Tensor:
    """``[M]`` aggregated (signed) effect of each supernode: the sum of its members' effects."""
    return torch.tensor([sum(effect[n] for n in g) for g in groups], dtype=torch.float64)


def compressed_circuit(groups: Sequence[Sequence[NodeRef]], effect: dict[NodeRef, float],
                       budget: int) -> tuple[list[int], list[NodeRef]]:
    """The supernodes kept under a budget and their member nodes.

    Args:
        groups: the M supernodes (lists of nodes; together the circuit).
        effect: node -> attribution effect.
        budget: number of supernodes kept (1..M).

    Returns:
        ``(kept supernode indices, largest |aggregated effect| first; their nodes)``.
    """
    M = len(groups)
    if not 1 <= budget <= M:
        raise ValueError(f"supernode budget {budget} must be in 1..{M}")
    agg = supernode_effects(groups, effect).abs()
    order = sorted(range(M), key=lambda i: (-float(agg[i]), i))[:budget]
    return order, [n for i in order for n in groups[i]]


def coherence(D: Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Mean distance between nodes of the same supernode vs of different supernodes.

    Args:
        D: ``[N, N]`` symmetric distances (non-finite entries are skipped).
        labels: ``[N]`` supernode of each node.

    Returns:
        ``within``, ``between`` and ``ratio = within / between`` (lower is more coherent;
        ``nan`` where a mean has no pair).
    """
    lab = torch.as_tensor(list(labels))
    N = len(lab)
    if D.shape != (N, N):
        raise ValueError(f"D {tuple(D.shape)} must be [{N}, {N}] to match labels")
    same = lab[:, None] == lab[None, :]
    off = ~torch.eye(N, dtype=torch.bool)
    ok = torch.isfinite(D) & off
    w = D[same & ok]
    bt = D[~same & ok]
    within = float(w.double().mean()) if w.numel() else float("nan")
    between = float(bt.double().mean()) if bt.numel() else float("nan")
    ratio = within / between if w.numel() and bt.numel() and between > 0 else float("nan")
    return {"within": within, "between": between, "ratio": ratio}


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two ``[n]`` vectors (``nan`` if n < 2 or one is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"pearson: sizes differ ({x.numel()} vs {y.numel()})")
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / den if den > 0 else float("nan")

