"""The substituted continuations of one batch, run together.

Layer substitution replaces ``h^B`` and runs the model on from hook B: one forward
per matcher, layer pair, reference and coverage level, the cost of the functional
evaluation. :class:`Continuations` collects them for one batch of contexts and runs
those at the same hook stacked along the batch axis (up to ``max_contexts`` contexts a
forward), the blocks after B once per stack; the logits and the next-token
cross-entropy of each request are then computed on its own rows (a stack's logits
would be ``n x B x T x V`` floats). Requests whose substituted states are exactly
equal share one forward. Each request's result goes to its callback.

The clean pass up to B is not repeated: every request starts from the batch's clean
``h^B`` (``start_at_layer``). Rows of a stack are independent sequences, so a request
gets the same cross-entropy as when run alone (the same numbers on CPU here; on other
BLAS builds possibly to the last bit). Hooks that are not on the residual stream run
one request at a time through :func:`run_from_hook`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.evaluation.functional._substitution import is_residual, next_token_ce, resid_position, run_from_hook

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Continuations"]

Done = Callable[[Tensor, Tensor], None]


@dataclass
class _Request:
    h_sub: Tensor
    checksum: float
    done: list[Done] = field(default_factory=list)


class Continuations:
    """Substituted continuations of one batch (module docstring).

    Args:
        model: the HookedTransformer.
        tokens: ``[B, T]`` the batch.
        mask: ``[B, T]`` bool, the positions replaced (BOS keeps its clean state).
        hidden: hook -> ``[B, T, d]`` clean hidden states.
        max_contexts: contexts per stacked forward.
    """

    def __init__(self, model: HookedTransformer, tokens: Tensor, mask: Tensor, hidden: dict[str, Tensor],
                 max_contexts: int = 64) -> None:
        self.model, self.tokens, self.hidden = model, tokens, hidden
        self.keep = mask[..., None]
        self.per_stack = max(1, max_contexts // max(tokens.shape[0], 1))
        self.pending: dict[str, list[_Request]] = {}
        self.n_requests = 0
        self.n_forwards = 0

    def substitute(self, hook: str, h_hat: Tensor) -> Tensor:
        """``h^B`` with ``h_hat [B, T, d]`` (or broadcastable) at the masked positions."""
        h_b = self.hidden[hook]
        return torch.where(self.keep, h_hat.expand_as(h_b), h_b)

    def submit(self, hook: str, h_hat: Tensor, done: Done) -> None:
        """Queue ``h^B <- h_hat`` at ``hook``; ``done(h_sub [B, T, d], ce [B, T-1])`` is called
        when it has run (at the latest at :meth:`flush`)."""
        h_sub = self.substitute(hook, h_hat)
        self.n_requests += 1
        queue = self.pending.setdefault(hook, [])
        checksum = float(h_sub.sum())
        for r in queue:
            if r.checksum == checksum and torch.equal(r.h_sub, h_sub):
                r.done.append(done)
                return
        queue.append(_Request(h_sub, checksum, [done]))
        if len(queue) >= self.per_stack:
            self.flush(hook)

    def run_now(self, hook: str, h_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_sub, ce)`` of one replacement, run at once (with what is queued at ``hook``)."""
        out: list[tuple[Tensor, Tensor]] = []
        self.submit(hook, h_hat, lambda h_sub, ce: out.append((h_sub, ce)))
        self.flush(hook)
        return out[0]

    def flush(self, hook: str | None = None) -> None:
        """Run what is queued (at ``hook``, or everywhere) and call the callbacks."""
        for h in [hook] if hook is not None else list(self.pending):
            queue = self.pending.pop(h, [])
            for i in range(0, len(queue), self.per_stack):
                self._run(h, queue[i:i + self.per_stack])

    @torch.no_grad()
    def _run(self, hook: str, requests: list[_Request]) -> None:
        model, tokens = self.model, self.tokens
        self.n_forwards += 1
        stackable = (is_residual(hook)
                     and not getattr(model.cfg, "output_logits_soft_cap", 0.0) > 0)
        if not stackable:
            for r in requests:
                ce = next_token_ce(run_from_hook(model, hook, r.h_sub, tokens), tokens)
                for done in r.done:
                    done(r.h_sub, ce)
            return
        start = resid_position(hook)
        dtype = next(model.parameters()).dtype
        stack = torch.cat([r.h_sub for r in requests]).to(dtype)
        resid = model(stack, start_at_layer=start, stop_at_layer=model.cfg.n_layers)
        B = tokens.shape[0]
        for j, r in enumerate(requests):
            x = resid[j * B:(j + 1) * B]
            if model.cfg.normalization_type is not None:
                x = model.ln_final(x)
            ce = next_token_ce(model.unembed(x), tokens)
            for done in r.done:
                done(r.h_sub, ce)
