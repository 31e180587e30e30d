"""SAEs of a synthetic world, with the world's truth translated into their latent indices.

An SAE numbers its latents in its own order; latent ``j`` of the SAE at layer ``l``
*stands for* true feature ``latent_to_true[l][j]`` (-1: none). :func:`express_in_latents`
re-indexes the world's truth accordingly; :func:`latents_to_true_by_decoder` and
:func:`activation_agreement` decide what a trained latent stands for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.util import cosine_similarities
from torch import Tensor

from saeot.synthetic._random import torch_threads
from saeot.synthetic.config import KINDS
from saeot.synthetic.world import SyntheticWorld

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["SyntheticSAEs", "express_in_latents", "latents_to_true_by_decoder", "activation_agreement",
           "sae_metadata"]


def sae_metadata(hook: str) -> SAEMetadata:
    """sae_lens metadata of an SAE at ``hook`` of the synthetic model."""
    return SAEMetadata(hook_name=hook, model_name="synthetic", hook_head_index=None)


@dataclass(eq=False)
class SyntheticSAEs(Mapping[str, Any]):
    """SAEs for every hook of a :class:`SyntheticWorld`, with the truth in *latent* indices.

    It is a read-only mapping ``hook -> sae_lens SAE`` (``dict(result)`` gives the plain
    dict a :class:`~saeot.matching.base.MatchContext` takes), plus:

    Attributes (``F_l`` = latents of the SAE at layer l):
        world: the world the SAEs belong to.
        saes: hook -> SAE.
        latent_to_true: hook -> ``[F_l]`` long, the true feature each latent stands for
            (-1: none, e.g. a trained latent whose decoder matches no true direction).
        latent_cos: hook -> ``[F_l]`` cosine between the latent's decoder row and the
            closest true direction (the one it stands for, when it stands for one).
        truth: ``(hook_a, hook_b)`` -> ``[F_a]`` long, the B latent that is the true
            partner of each A latent; -1 where there is none (the true feature dies, the
            latent is unmapped, or no B latent stands for the true partner). When several
            B latents stand for the partner, the one with the highest ``latent_cos``.
        truth_sets: same keys -> ``[F_a, F_b]`` bool, every B latent standing for a
            descendant of the A latent's true feature.
        kinds: same keys -> per A latent one of :data:`KINDS` or ``unmapped``.
        born: same keys -> ``[F_b]`` bool, B latents standing for a feature born after A.
    """

    world: SyntheticWorld
    saes: dict[str, Any]
    latent_to_true: dict[str, Tensor]
    latent_cos: dict[str, Tensor]
    truth: dict[tuple[str, str], Tensor]
    truth_sets: dict[tuple[str, str], Tensor]
    kinds: dict[tuple[str, str], tuple[str, ...]]
    born: dict[tuple[str, str], Tensor]

    def __getitem__(self, hook: str) -> Any:
        return self.saes[hook]

    def __iter__(self) -> Iterator[str]:
        return iter(self.saes)

    def __len__(self) -> int:
        return len(self.saes)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.truth)

    def kind_masks(self, hook_a: str, hook_b: str) -> dict[str, Tensor]:
        """kind -> ``[F_a]`` bool mask of the A latents of that kind (for per-scenario scores)."""
        kinds = self.kinds[(hook_a, hook_b)]
        return {k: torch.tensor([x == k for x in kinds], dtype=torch.bool) for k in (*KINDS, "unmapped")}


def express_in_latents(
    world: SyntheticWorld,
    saes: Mapping[str, Any],
    latent_to_true: Mapping[str, Tensor],
    latent_cos: Mapping[str, Tensor] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> SyntheticSAEs:
    """Translate the world's truth (true feature indices) into the SAEs' latent indices.

    ``pairs`` defaults to ``world.pairs``; any ``(earlier, later)`` pair of hooks works.

    For A latent ``j`` with true feature ``f = latent_to_true[A][j] >= 0``:
    ``truth[j] = rep_B(world.truth[f])`` where ``rep_B(g)`` is the B latent standing for
    ``g`` with the highest ``latent_cos`` (-1 if no B latent stands for ``g``);
    ``truth_sets[j, k] = world.truth_sets[f, latent_to_true[B][k]]``.
    """
    if latent_cos is None:
        latent_cos = {h: torch.ones(len(latent_to_true[h])) for h in world.hooks}
    truth, sets, kinds, born = {}, {}, {}, {}
    for a, b in world.pairs if pairs is None else pairs:
        if (a, b) in world.truth:
            true_t, true_sets, true_kinds, true_born = (
                world.truth[(a, b)], world.truth_sets[(a, b)], world.kinds[(a, b)], world.born[(a, b)]
            )
        else:
            true_t, true_sets, true_kinds, true_born = world.truth_between(a, b)
        la, lb = latent_to_true[a].long(), latent_to_true[b].long()
        cb = latent_cos[b].float().nan_to_num(-2.0)
        n_b_true = world.n_true(b)
        # rep[g]: the B latent standing for g with the highest cosine (lowest index on ties)
        mb = (lb >= 0).nonzero().flatten()
        best = torch.full((n_b_true,), -float("inf")).scatter_reduce(0, lb[mb], cb[mb], "amax")
        top = mb[cb[mb] >= best[lb[mb]]]
        rep = torch.full((n_b_true,), len(lb), dtype=torch.long).scatter_reduce(0, lb[top], top, "amin")
        rep[rep == len(lb)] = -1
        mapped_a, mapped_b = la >= 0, lb >= 0
        partner = torch.where(mapped_a, true_t[la.clamp_min(0)], torch.full_like(la, -1))
        truth[(a, b)] = torch.where(partner >= 0, rep[partner.clamp_min(0)], torch.full_like(partner, -1))
        s = true_sets[la.clamp_min(0)][:, lb.clamp_min(0)]
        sets[(a, b)] = s & mapped_a[:, None] & mapped_b[None, :]
        kinds[(a, b)] = tuple(true_kinds[int(f)] if f >= 0 else "unmapped" for f in la)
        born[(a, b)] = mapped_b & true_born[lb.clamp_min(0)]
    return SyntheticSAEs(
        world=world,
        saes=dict(saes),
        latent_to_true={h: latent_to_true[h].long() for h in world.hooks},
        latent_cos={h: latent_cos[h].float() for h in world.hooks},
        truth=truth,
        truth_sets=sets,
        kinds=kinds,
        born=born,
    )


def latents_to_true_by_decoder(w_dec: Tensor, directions: Tensor, min_cos: float = 0.7) -> tuple[Tensor, Tensor]:
    """Map each latent to the true feature whose direction its decoder row is closest to.

    Args:
        w_dec: ``[F, d]`` decoder rows.
        directions: ``[n, d]`` true unit directions.
        min_cos: below this best cosine the latent stands for nothing (-1).

    Returns:
        ``(index [F] long, cos [F])``: argmax_f cos(W_dec[j], D_f) and its value.
    """
    cos = cosine_similarities(w_dec.detach().float(), directions.float())  # [F, n]
    best, index = cos.max(dim=1)
    index = torch.where(best >= min_cos, index, torch.full_like(index, -1))
    return index, best


@torch.no_grad()
def activation_agreement(sae: SAE, world: SyntheticWorld, hook: str, latent_to_true: Tensor,
                         split: str = "train", n_tokens: int = 8192) -> Tensor:
    """``[F]`` Pearson correlation, over ``n_tokens`` tokens of ``split``, between each latent's
    activation and the true activation of the feature it stands for (NaN for latents that stand
    for nothing, or that are constant there).

    A latent whose decoder row points at feature f but that does not fire when f fires
    writes f without reading it; such a latent is not f (see :func:`trained_saes`).
    """
    l2t = latent_to_true.long()
    mapped = (l2t >= 0).nonzero().flatten()
    n = 0
    sums = torch.zeros(5, len(mapped), dtype=torch.float64)  # x, y, xx, yy, xy
    for h, c, _ in world.stream(hook, split, batch_size=world.config.chunk_size, n_tokens=n_tokens):
        with torch_threads(world.config.threads):
            x = sae.encode(h)[:, mapped].double()
        y = c[:, l2t[mapped]].double()
        sums += torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])
        n += h.shape[0]
    sx, sy, sxx, syy, sxy = sums / max(n, 1)
    cov, vx, vy = sxy - sx * sy, sxx - sx * sx, syy - sy * sy
    corr = cov / (vx * vy).clamp_min(1e-30).sqrt()
    corr[(vx <= 1e-20) | (vy <= 1e-20)] = float("nan")
    out = torch.full((len(l2t),), float("nan"))
    out[mapped] = corr.float()
    return out
