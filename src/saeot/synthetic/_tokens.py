"""Token streams: the concept activations ``z_t`` of every token, in seeded chunks, and re-batching.

K concepts fire on every token ``t``: ``z_t in R^K_{>=0}``, sparse, through a low-rank
Gaussian copula (or independently when there is no correlation factor)::

    g_t = eps_t F^T + eta_t * sqrt(diag),   eps_t ~ N(0, I_r), eta_t ~ N(0, I_K)
    concept k fires  <=>  g_{t,k} > Phi^{-1}(1 - p_k)
    z_{t,k} = max(0, m_{t,k}) * 1[fires],   m_{t,k} ~ N(magnitude_mean, magnitude_std^2)

then the forced co-firing rules ``(parent, context, q)`` set ``context`` on the tokens
where ``parent`` fires with probability exactly ``q``, and the choice rules
``(parent, first, second, q)`` make exactly one of ``first`` / ``second`` fire on the
parent's tokens (``first`` with probability ``q``) with the parent's own magnitude (so
the parent's hidden state is ``m (s_p D_p + s_c D_c)`` for one context ``c``). A stream is cut into chunks of a
fixed size, each drawn from its own generator seeded by ``(seed, split, stream, chunk)``,
so the content of a stream never depends on batch sizes or on the order of calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saeot.synthetic._random import generator

__all__ = ["ConceptModel", "rebatch"]


@dataclass(eq=False)
class ConceptModel:
    """The joint firing model of the K concepts (module docstring).

    Attributes:
        seed: the world's seed (mixed into every chunk's generator).
        probs: ``[K]`` firing probabilities ``p_k``.
        thresholds: ``[K]`` copula thresholds ``Phi^{-1}(1 - p_k)`` (NaN without copula).
        factor: ``[K, r]`` low-rank correlation factor ``F``, or None (independent concepts).
        diag_sqrt: ``[K]`` ``sqrt(diag)`` of the copula, or None.
        rules: ``[R, 2]`` long ``(parent, context)`` forced co-firing rules.
        rule_probs: ``[R]`` their probabilities ``q``.
        choice_rules: ``[C, 3]`` long ``(parent, first, second)`` choice rules.
        choice_probs: ``[C]`` P(first | parent fires).
        magnitude_mean, magnitude_std: firing magnitude ``max(0, N(mean, std^2))``.
        cache_size: recent chunks kept (streaming several hooks side by side samples each chunk once).
    """

    seed: int
    probs: Tensor
    thresholds: Tensor
    factor: Tensor | None
    diag_sqrt: Tensor | None
    rules: Tensor
    rule_probs: Tensor
    magnitude_mean: float
    magnitude_std: float
    choice_rules: Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    choice_probs: Tensor = field(default_factory=lambda: torch.zeros(0))
    cache_size: int = 8
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def n_concepts(self) -> int:
        return int(self.probs.shape[0])

    def chunk(self, split_code: int, stream: int, chunk: int, size: int) -> Tensor:
        """``[size, K]`` concepts of one chunk, shared with the cache: callers must not modify it."""
        key = (split_code, stream, chunk, size)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        z = self.sample(split_code, stream, chunk, size)
        self._cache[key] = z
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return z

    def sample(self, split_code: int, stream: int, chunk: int, size: int) -> Tensor:
        """``[size, K]`` concept activations ``z`` of one chunk (deterministic in its arguments, uncached)."""
        gen = generator(self.seed, 100, split_code, stream, chunk)
        K = self.n_concepts
        if self.factor is not None:
            eps = torch.randn(size, self.factor.shape[1], generator=gen)
            eta = torch.randn(size, K, generator=gen)
            fire = (eps @ self.factor.T + eta * self.diag_sqrt) > self.thresholds
        else:
            fire = torch.rand(size, K, generator=gen) < self.probs
        if self.rules.shape[0]:
            parent, ctx = self.rules[:, 0], self.rules[:, 1]
            coin = torch.rand(size, self.rules.shape[0], generator=gen) < self.rule_probs
            fire[:, ctx] = torch.where(fire[:, parent], coin, fire[:, ctx])
        n_choice = self.choice_rules.shape[0]
        if n_choice:
            parent, first, second = self.choice_rules.unbind(1)
            pf = fire[:, parent]
            pick = torch.rand(size, n_choice, generator=gen) < self.choice_probs
            fire[:, first] = torch.where(pf, pick, fire[:, first])
            fire[:, second] = torch.where(pf, ~pick, fire[:, second])
        rows, cols = fire.nonzero(as_tuple=True)
        mags = self.magnitude_mean + self.magnitude_std * torch.randn(rows.shape[0], generator=gen)
        z = torch.zeros(size, K)
        z[rows, cols] = mags.clamp_min(0.0)
        if n_choice:  # the chosen context fires with the parent's magnitude
            zp = z[:, parent]
            z[:, first] = torch.where(pf & pick, zp, z[:, first])
            z[:, second] = torch.where(pf & ~pick, zp, z[:, second])
        return z


def rebatch(chunks: Iterator[Any], batch_size: int) -> Iterator[Any]:
    """Re-cut a stream of chunks (tensors, or tuples of tensors sharing dim 0) into ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[Any] = []
    n_pending = 0
    for chunk in chunks:
        pending.append(chunk)
        n_pending += _rows(chunk)
        while n_pending >= batch_size:
            cat = _cat(pending)
            yield _slice(cat, 0, batch_size)
            rest = _slice(cat, batch_size, n_pending)
            n_pending -= batch_size
            pending = [rest] if n_pending else []
    if n_pending:
        yield _cat(pending)


def _rows(x: Any) -> int:
    return int(x[0].shape[0]) if isinstance(x, tuple) else int(x.shape[0])


def _cat(xs: list[Any]) -> Any:
    if len(xs) == 1:
        return xs[0]
    if isinstance(xs[0], tuple):
        return tuple(torch.cat([x[i] for x in xs]) for i in range(len(xs[0])))
    return torch.cat(xs)


def _slice(x: Any, a: int, b: int) -> Any:
    return tuple(t[a:b] for t in x) if isinstance(x, tuple) else x[a:b]
