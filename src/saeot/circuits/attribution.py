r"""Attribution patching over SAE features and SAE error terms.

Splicing
--------
At every configured hook (``blocks.{l}.hook_resid_post`` etc.) the hidden state
``h [n, T, d]`` is written as its SAE reconstruction plus an error term,

.. math::
    h = \mathrm{dec}(f) + e, \qquad f = \mathrm{enc}(h) \in \mathbb{R}^{n\times T\times F},
    \qquad e = h - \mathrm{dec}(f) \in \mathbb{R}^{n\times T\times d},

so the spliced model computes exactly what the model computes. The nodes at a hook
are its F features and one error node (the whole vector ``e``; index ``-1``).

Node granularity
----------------
One node per (hook, feature) and one error node per hook, **summed over token
positions** (and averaged over prompts). Prompts of a task have different lengths
and templates, so per-position nodes would not line up across prompts; summing
over positions is the aggregation of sparse feature circuits (Marks et al. 2024)
for such tasks. The position where a node's effect is largest (counted from the
end of the prompt) is kept to place the node in exported graphs.

Node effects
------------
With the metric :math:`m` = logit difference at the last position, the effect of a
node x (a feature or the error term) is the first-order estimate of what is lost
when its value is patched from the corrupted into the clean run:

.. math::
    \mathrm{IE}(x) = \frac1N \sum_{n} \sum_{t} (x^{\mathrm{clean}}_{n,t} - x^{\mathrm{corr}}_{n,t})
    \cdot \frac{\partial m_n}{\partial x_{n,t}}\Big|_{\mathrm{clean}}
    \;\approx\; \bar m(\mathrm{clean}) - \bar m(\mathrm{clean},\ x \leftarrow x^{\mathrm{corr}}).

Gradients are *partial* derivatives: :math:`\partial m/\partial f` holds the error
term fixed (it is the decoder's vector-Jacobian product of :math:`\partial m / \partial h`)
and :math:`\partial m / \partial e = \partial m / \partial h`. Derivatives with respect to
the hidden state at a hook are total derivatives through the rest of the model
(the splices downstream are identities, so gradients pass through them unchanged).

Edges
-----
Edges join nodes at consecutive hooks A -> B (for residual-stream hooks everything
that reaches B from A passes through B's nodes, so these edges and the
last-hook -> metric edges make the graph complete):

.. math::
    w(a \to b) = \frac1N \sum_n \sum_{t} \Big[\frac{\partial}{\partial a_{n,t}}
    \sum_{t'} \frac{\partial m_n}{\partial b_{n,t'}} \, b_{n,t'}\Big]
    (a^{\mathrm{clean}}_{n,t} - a^{\mathrm{corr}}_{n,t}),

with :math:`\partial m / \partial b` held constant: the change of m through b when a
alone is patched, to first order (the edge formula of sparse feature circuits). One
backward pass per downstream node and batch.

Exact patching (:func:`exact_node_effects`) computes the true
:math:`\bar m(\mathrm{clean}) - \bar m(\mathrm{clean},\ x \leftarrow x^{\mathrm{corr}})` for a
few nodes to check the linear approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.circuits.tasks import TaskData, logit_diff
from saeot.progress import progress_bar

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

    from saeot.models.language_model import LanguageModel

__all__ = [
    "ERROR",
    "NodeRef",
    "Attribution",
    "Edges",
    "sae_encode",
    "sae_decode",
    "decoder_vjp",
    "attribute_nodes",
    "attribute_edges",
    "exact_node_effects",
    "select_nodes",
]

ERROR = -1
"""Feature index of a hook's error node."""


@dataclass(frozen=True, order=True)
class NodeRef:
    """A circuit node: feature ``feature`` of the SAE at ``hook``, or its error term
    (``feature == ERROR``)."""

    hook: str
    feature: int

    @property
    def is_error(self) -> bool:
        return self.feature == ERROR


# ----------------------------------------------------------------------------- SAE pieces
def _sae_param(sae: SAE) -> Tensor:
    return sae.W_dec


def sae_encode(sae: SAE, h: Tensor) -> Tensor:
    """``[..., d] -> [..., F]`` feature activations (float32, on h's device)."""
    p = _sae_param(sae)
    return sae.encode(h.to(device=p.device, dtype=p.dtype)).to(device=h.device, dtype=torch.float32)


def sae_decode(sae: SAE, f: Tensor, like: Tensor) -> Tensor:
    """``[..., F] -> [..., d]`` reconstruction, in the dtype and device of ``like``."""
    p = _sae_param(sae)
    return sae.decode(f.to(device=p.device, dtype=p.dtype)).to(device=like.device, dtype=like.dtype)


def decoder_vjp(sae: SAE, f: Tensor, g: Tensor) -> Tensor:
    r"""``[..., F]``: :math:`g^\top \partial\,\mathrm{dec}(f) / \partial f` (for a linear decoder
    ``g @ W_dec.T``), i.e. the gradient with respect to the features when the error
    term is held fixed. ``f [..., F]``, ``g [..., d]``."""
    with torch.enable_grad():
        f_ = f.detach().to(_sae_param(sae).dtype).requires_grad_(True)
        out = sae.decode(f_)
        (grad,) = torch.autograd.grad(out, f_, g.to(out.dtype))
    return grad.float()


def _split(sae: SAE, h: Tensor) -> tuple[Tensor, Tensor]:
    f = sae_encode(sae, h)
    return f, h - sae_decode(sae, f, h)


# ----------------------------------------------------------------------------- forward passes
@dataclass
class _Site:
    h_new: Tensor  # [n, T, d] output of the splice (in the graph)
    f: Tensor  # [n, T, F]
    e: Tensor  # [n, T, d]


def _spliced_clean(model: HookedTransformer, tokens: Tensor, saes: dict[str, SAE],
                   hooks: Sequence[str]) -> tuple[Tensor, dict[str, _Site]]:
    """Clean forward with every hook spliced and differentiable from the first hook on."""
    sites: dict[str, _Site] = {}
    first = hooks[0]

    def splice(h: Tensor, hook: HookPoint) -> Tensor:
        name = hook.name
        if name == first:
            h = h.detach().requires_grad_(True)
        f = sae_encode(saes[name], h)
        x_hat = sae_decode(saes[name], f, h)
        e = h - x_hat
        h_new = x_hat + e
        sites[name] = _Site(h_new=h_new, f=f, e=e)
        return h_new

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(h, splice) for h in hooks])
    return logits, sites


@torch.no_grad()
def _features(model: HookedTransformer, tokens: Tensor, saes: dict[str, SAE],
              hooks: Sequence[str]) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Plain forward; ``hook -> (f [n, T, F], e [n, T, d])`` and the logits."""
    logits, cache = model.run_with_cache(tokens, names_filter=list(hooks))
    return logits, {h: _split(saes[h], cache[h]) for h in hooks}


def _check_hooks(model: HookedTransformer, saes: dict[str, SAE], hooks: Sequence[str]) -> list[str]:
    hooks = list(hooks)
    if not hooks:
        raise ValueError("circuit hooks are empty: configure at least one SAE hook")
    missing = [h for h in hooks if h not in saes]
    if missing:
        raise ValueError(f"no SAE for circuit hook(s) {missing}; SAEs exist for {sorted(saes)}")
    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        raise ValueError(f"circuit hook(s) {unknown} do not exist in the model")
    order = {name: i for i, name in enumerate(model.hook_dict)}
    return sorted(hooks, key=order.__getitem__)


# ----------------------------------------------------------------------------- node effects
@dataclass
class Attribution:
    """Node effects of a task.

    Attributes:
        hooks: the hooks, in forward order.
        effects: ``hook -> [F + 1]`` attribution-patching effect of every feature, the
            error node last (``effects[h][ERROR]``); the unit is the task metric.
        effects_by_rpos: ``hook -> [P, F + 1]`` the same split by position counted from
            the end of the prompt (row 0 = last token), P = longest prompt.
        activation: ``hook -> [F + 1]`` mean over prompts of the largest clean
            activation over positions (the error node's entry: mean largest norm of e).
        metric_clean, metric_corrupted: mean logit difference of the two runs.
        n_prompts: N.
    """

    hooks: list[str]
    effects: dict[str, Tensor]
    effects_by_rpos: dict[str, Tensor]
    activation: dict[str, Tensor]
    metric_clean: float
    metric_corrupted: float
    n_prompts: int

    def effect(self, node: NodeRef) -> float:
        return float(self.effects[node.hook][node.feature])

    def all_nodes(self) -> list[NodeRef]:
        """Every node with a nonzero effect."""
        out = []
        for h in self.hooks:
            eff = self.effects[h]
            F = eff.shape[0] - 1
            out += [NodeRef(h, int(i)) for i in torch.nonzero(eff[:F]).flatten().tolist()]
            if float(eff[ERROR]) != 0.0:
                out.append(NodeRef(h, ERROR))
        return out

    def peak_rpos(self, node: NodeRef) -> int:
        """Position from the end of the prompt where the node's ``|effect|`` is largest."""
        return int(self.effects_by_rpos[node.hook][:, node.feature].abs().argmax())


def attribute_nodes(lm: LanguageModel, saes: dict[str, SAE], hooks: Sequence[str], data: TaskData,
                    batch_size: int = 16, progress: bool = True) -> Attribution:
    """Attribution-patching effects of every feature and error node at ``hooks``.

    One clean forward + backward and one corrupted forward per batch. See the module
    docstring for the formula. ``lm.model`` is any HookedTransformer.
    """
    model = lm.model
    hooks = _check_hooks(model, saes, hooks)
    device = next(model.parameters()).device
    P = int(data.lengths().max())
    sum_eff = {h: torch.zeros(P, saes[h].cfg.d_sae + 1, dtype=torch.float64) for h in hooks}
    act = {h: torch.zeros(saes[h].cfg.d_sae + 1, dtype=torch.float64) for h in hooks}
    m_clean = m_corr = 0.0
    bar = progress_bar(total=data.n, desc="attribution patching (nodes)", enabled=progress, leave=False)
    for b in data.batches(batch_size, device):
        logits_corr, corr = _features(model, b.corrupted, saes, hooks)
        logits, sites = _spliced_clean(model, b.clean, saes, hooks)
        ld = logit_diff(logits, b.correct, b.wrong)
        grads = torch.autograd.grad(ld.sum(), [sites[h].h_new for h in hooks])
        T = b.clean.shape[1]
        for h, g_h in zip(hooks, grads):
            s = sites[h]
            f_corr, e_corr = corr[h]
            g_f = decoder_vjp(saes[h], s.f, g_h)
            per_feat = ((s.f.detach() - f_corr) * g_f).sum(0)  # [T, F]
            per_err = ((s.e.detach() - e_corr).float() * g_h.float()).sum(-1).sum(0)  # [T]
            per_pos = torch.cat([per_feat, per_err[:, None]], dim=1).double().cpu()  # [T, F+1]
            sum_eff[h][:T] += per_pos.flip(0)  # row r = position T-1-r
            start = 1 if b.bos and T > 1 else 0
            act[h][:-1] += s.f.detach()[:, start:].amax(dim=1).sum(0).double().cpu()
            act[h][-1] += s.e.detach()[:, start:].float().norm(dim=-1).amax(dim=1).sum().double().cpu()
        m_clean += float(ld.detach().sum())
        m_corr += float(logit_diff(logits_corr, b.correct, b.wrong).sum())
        bar.update(b.n)
    bar.close()
    N = data.n
    by_rpos = {h: (v / N).float() for h, v in sum_eff.items()}
    return Attribution(
        hooks=hooks,
        effects={h: v.sum(0) for h, v in by_rpos.items()},
        effects_by_rpos=by_rpos,
        activation={h: (v / N).float() for h, v in act.items()},
        metric_clean=m_clean / N,
        metric_corrupted=m_corr / N,
        n_prompts=N,
    )


def select_nodes(attr: Attribution, mode: str = "cumulative", n_nodes: int = 32, fraction: float = 0.8,
                 max_nodes: int = 64, include_errors: bool = True) -> list[NodeRef]:
    r"""The circuit: nodes ranked by :math:`|\mathrm{IE}|`, largest first.

    Args:
        mode: ``top_k`` keeps the ``n_nodes`` largest; ``cumulative`` keeps the smallest
            prefix whose :math:`\sum|\mathrm{IE}|` reaches ``fraction`` of the total over all
            nodes, at most ``max_nodes``.
        include_errors: whether error nodes may enter the circuit (if not, they are
            skipped here and therefore ablated in evaluations).

    Returns:
        list of :class:`NodeRef`, largest ``|effect|`` first (ties broken by hook, feature).
    """
    if mode not in ("top_k", "cumulative"):
        raise ValueError(f"circuit.selection={mode!r}; use top_k or cumulative")
    if mode == "top_k" and n_nodes < 1:
        raise ValueError(f"circuit.n_nodes={n_nodes} must be >= 1")
    if mode == "cumulative" and not 0 < fraction <= 1:
        raise ValueError(f"circuit.fraction={fraction} must be in (0, 1]")
    nodes = [n for n in attr.all_nodes() if include_errors or not n.is_error]
    nodes.sort(key=lambda n: (-abs(attr.effect(n)), n))
    if not nodes:
        raise ValueError("no node has a nonzero effect: the clean and corrupted prompts give the same SAE "
                         "activations at the circuit hooks (check circuit= and the hooks)")
    if mode == "top_k":
        return nodes[:n_nodes]
    mags = torch.tensor([abs(attr.effect(n)) for n in nodes], dtype=torch.float64)
    cum = mags.cumsum(0) / mags.sum()
    k = int(torch.searchsorted(cum, torch.tensor([fraction], dtype=torch.float64) - 1e-12).item()) + 1
    return nodes[: max(1, min(k, max_nodes, len(nodes)))]


# ----------------------------------------------------------------------------- edges
@dataclass
class Edges:
    """Edge weights between circuit nodes at consecutive hooks.

    Attributes:
        weights: ``(source NodeRef, target NodeRef) -> weight`` (unit: the task metric).
    """

    weights: dict[tuple[NodeRef, NodeRef], float] = field(default_factory=dict)

    def items(self):
        return self.weights.items()

    def __len__(self) -> int:
        return len(self.weights)


def attribute_edges(lm: LanguageModel, saes: dict[str, SAE], nodes: Sequence[NodeRef], data: TaskData,
                    batch_size: int = 16, progress: bool = True) -> Edges:
    """Edge weights (module docstring) from every circuit node at hook A to every one at
    the next hook B that holds circuit nodes. One backward pass per downstream node and
    batch, restricted to the blocks between the two hooks."""
    model = lm.model
    by_hook: dict[str, list[NodeRef]] = {}
    for n in nodes:
        by_hook.setdefault(n.hook, []).append(n)
    hooks = _check_hooks(model, saes, list(by_hook))
    pairs = list(zip(hooks[:-1], hooks[1:]))
    out = Edges()
    if not pairs:
        return out
    acc = {(a, b): torch.zeros(len(by_hook[b]), len(by_hook[a]), dtype=torch.float64) for a, b in pairs}
    device = next(model.parameters()).device
    n_back = sum(len(by_hook[b]) for _, b in pairs) * data.n_batches(batch_size)
    bar = progress_bar(total=n_back, desc="attribution patching (edges)", enabled=progress, leave=False)
    for batch in data.batches(batch_size, device):
        _, corr = _features(model, batch.corrupted, saes, hooks)
        logits, sites = _spliced_clean(model, batch.clean, saes, hooks)
        ld = logit_diff(logits, batch.correct, batch.wrong)
        g_h = dict(zip(hooks, torch.autograd.grad(ld.sum(), [sites[h].h_new for h in hooks], retain_graph=True)))
        for a, b in pairs:
            src, dst = by_hook[a], by_hook[b]
            sa, sb = sites[a], sites[b]
            feat_a = torch.tensor([n.feature for n in src if not n.is_error], dtype=torch.long, device=device)
            err_a = [i for i, n in enumerate(src) if n.is_error]
            col_feat = [i for i, n in enumerate(src) if not n.is_error]
            df_a = (sa.f.detach() - corr[a][0])[..., feat_a]  # [n, T, |feat_a|]
            de_a = (sa.e.detach() - corr[a][1]).float()  # [n, T, d]
            g_fb = decoder_vjp(saes[b], sb.f, g_h[b])  # [n, T, F_b], constant
            for j, node in enumerate(dst):
                if node.is_error:
                    s = (g_h[b].detach() * sb.e).sum()
                else:
                    s = (g_fb[..., node.feature] * sb.f[..., node.feature]).sum()
                (gh_a,) = torch.autograd.grad(s, sa.h_new, retain_graph=True, allow_unused=True)
                if gh_a is None:  # the downstream node does not depend on A at all
                    bar.update(1)
                    continue
                row = acc[(a, b)][j]
                if col_feat:
                    g_fa = decoder_vjp(saes[a], sa.f, gh_a)[..., feat_a]
                    row[col_feat] += (df_a * g_fa).sum((0, 1)).double().cpu()
                for i in err_a:
                    row[i] += float((de_a * gh_a.float()).sum())
                bar.update(1)
        del sites, logits, g_h
    bar.close()
    for (a, b), W in acc.items():
        W /= data.n
        for j, dn in enumerate(by_hook[b]):
            for i, sn in enumerate(by_hook[a]):
                out.weights[(sn, dn)] = float(W[j, i])
    return out


# ----------------------------------------------------------------------------- exact patching
@torch.no_grad()
def exact_node_effects(lm: LanguageModel, saes: dict[str, SAE], nodes: Sequence[NodeRef], data: TaskData,
                       batch_size: int = 16, progress: bool = True) -> Tensor:
    r"""``[len(nodes)]`` exact effects :math:`\bar m(\mathrm{clean}) - \bar m(\mathrm{clean},\ x \leftarrow x^{\mathrm{corr}})`.

    For a feature i at hook h the clean hidden state becomes
    ``h + dec(f') - dec(f)`` with ``f'`` = the clean features with feature i set to its
    corrupted values (at every position); for an error node it becomes
    ``dec(f) + e_corr``. Everything downstream is recomputed. One forward pass per node
    and batch.
    """
    model = lm.model
    nodes = list(nodes)
    hooks = _check_hooks(model, saes, sorted({n.hook for n in nodes}))
    device = next(model.parameters()).device
    total = torch.zeros(len(nodes), dtype=torch.float64)
    bar = progress_bar(total=len(nodes) * data.n_batches(batch_size), desc="exact patching", enabled=progress, leave=False)
    for b in data.batches(batch_size, device):
        logits, clean = _features(model, b.clean, saes, hooks)
        _, corr = _features(model, b.corrupted, saes, hooks)
        m_clean = logit_diff(logits, b.correct, b.wrong).double().sum()
        for k, node in enumerate(nodes):
            f, e = clean[node.hook]
            f_c, e_c = corr[node.hook]
            sae = saes[node.hook]
            if node.is_error:
                delta = e_c - e
            else:
                f2 = f.clone()
                f2[..., node.feature] = f_c[..., node.feature]
                delta = sae_decode(sae, f2, e) - sae_decode(sae, f, e)

            def patch(h: Tensor, hook: HookPoint, delta: Tensor = delta) -> Tensor:
                return h + delta.to(h.dtype)

            lg = model.run_with_hooks(b.clean, fwd_hooks=[(node.hook, patch)])
            total[k] += float(m_clean - logit_diff(lg, b.correct, b.wrong).double().sum())
            bar.update(1)
    bar.close()
    return (total / data.n).float()
