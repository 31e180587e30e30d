"""What the functional streaming pass hands to extra consumers (e.g. the equal-coverage
curves): each batch's tokens, hidden states and SAE codes, and a way to score a
replacement of ``h^B``; at the end, the totals every explained variance and
cross-entropy is normalised by. A consumer has ``hooks`` / ``hooks_b`` (the hooks it
reads / replaces), ``update(PassBatch)`` and ``finish(PassTotals)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

__all__ = ["PassBatch", "PassTotals", "PassConsumer"]


@dataclass(frozen=True)
class PassBatch:
    """One batch of the pass.

    Attributes:
        tokens: ``[B, T]``.
        mask: ``[B, T]`` bool, the evaluation positions (BOS excluded).
        ce_mask: ``[B, T-1]`` bool, positions whose next-token CE counts.
        hidden: hook -> ``[B, T, d]`` clean hidden states (float32).
        codes: hook -> ``[B, T, F]`` SAE codes of the clean hidden states.
        substituted: ``(hook_b, h_hat [B, T, d] or broadcastable) -> (h_sub [B, T, d], ce [B, T-1])``:
            ``h^B`` replaced by ``h_hat`` at the evaluation positions (BOS keeps its clean
            state), the model run on from ``hook_b``, the next-token CE.
        submit: ``(hook_b, h_hat, done)``: the same, queued and run stacked with the batch's
            other continuations; ``done(h_sub, ce)`` is called before the batch ends
            (:class:`~saeot.evaluation.functional._continuations.Continuations`). None: use ``substituted``.
        run_between: ``(hook_a, hook_b, h [n, T, d]) -> [n, T, d]``: the model run from hook A's
            states of ``n`` contexts (rows of this batch) up to hook B (residual-stream hooks;
            None where the pass cannot).
    """

    tokens: Tensor
    mask: Tensor
    ce_mask: Tensor
    hidden: dict[str, Tensor]
    codes: dict[str, Tensor]
    substituted: Callable[[str, Tensor], tuple[Tensor, Tensor]]
    submit: Callable[[str, Tensor, Callable[[Tensor, Tensor], None]], None] | None = None
    run_between: Callable[[str, str, Tensor], Tensor] | None = None


@dataclass(frozen=True)
class PassTotals:
    """Totals of the pass: ``sst`` per hook of B (``sum ||h^B - mean||^2`` over the evaluation
    positions), ``n_ce`` CE positions, ``ce_clean`` the clean mean CE (nats/token).

    The same sums per context (one row of a batch, in the order the batches came; ``C``
    contexts), for the bootstrap over contexts
    (:mod:`saeot.evaluation.functional._bootstrap`): ``context_sst`` hook -> ``[C]`` (additive:
    the mean is fixed by pass 0 before this pass), ``context_ce_clean [C]`` the clean CE
    summed over the context's CE positions, ``context_n_ce [C]`` their number;
    ``contexts_digest`` a hash of the contexts' tokens in order (two passes with the same
    digest resampled with the same weights resample the same contexts). None: not kept.
    """

    sst: dict[str, float]
    n_ce: int
    ce_clean: float
    context_sst: dict[str, Tensor] | None = None
    context_ce_clean: Tensor | None = None
    context_n_ce: Tensor | None = None
    contexts_digest: str | None = None


class PassConsumer(Protocol):
    hooks: tuple[str, ...]
    hooks_b: tuple[str, ...]

    def update(self, batch: PassBatch) -> None: ...

    def finish(self, totals: PassTotals) -> None: ...
