"""One streaming pass: per-feature weighted samples of the hidden states where it fires.

For feature i of the SAE at a hook, with activation ``a_t = f_i(h_t)`` at token t,
the feature is the distribution ``mu_i = sum_t w_t delta(h_t)``, ``w_t = a_t / sum a_t``
over the tokens where it fires. It is estimated with K samples per feature, in
memory ``O(F x K x d)`` whatever the stream length:

* ``topk``: the K tokens with the largest activations, weights proportional to them;
* ``reservoir``: weighted reservoir sampling (Efraimidis & Spirakis' A-Res): each
  firing token gets the key ``u^(1/a_t)``, ``u ~ U(0, 1)``, and the K largest keys
  are kept; the kept tokens are an activation-weighted sample without replacement,
  so they carry uniform weights;
* ``coupled``: the same weighted reservoir sample, with ``u`` drawn per *token*
  instead of per (token, feature) (common random numbers): each feature's sample has
  the same law as under ``reservoir``, but two features that fire on the same tokens
  with proportional activations keep the same tokens, so the distance between them
  measures how their distributions differ, not the luck of two independent draws.

Both keep the K largest *keys* (``a_t`` itself for topk, ``log(u) / a_t`` for
reservoir), so merging two streams (e.g. two DDP ranks) is exact: keep the K
largest keys of the union. A reservoir key's ``u`` is a hash of (seed, context
index, position, feature) (``coupled``: of seed, context index and position), not a
draw from a stream of random numbers, so a token
gets the same key whichever rank reads it, and equal keys are ranked by (context,
position): the kept samples are the same for any number of processes. Multiplying a feature's activations by c > 0 leaves
both the kept tokens and the weights unchanged (the ranking of ``a_t`` and of
``log(u) / a_t`` is unchanged and the weights are normalised).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from saeot.types import POS_SPAN as _POS_SPAN
from saeot.types import FeatureSamples

MODES = ("topk", "reservoir", "coupled")
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply, multipliers < 2^31 so int64 never overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


def token_uniform(seed: int, context: Tensor, position: Tensor, feature: Tensor) -> Tensor:
    """``U(0, 1)`` numbers (float64, 53 bits) that depend only on (seed, context, position,
    feature): the reservoir key of a token is the same whichever process reads it."""
    h = _mix32(torch.full_like(context, int(seed) & _M32))
    for part in (context, position, feature):
        h = _mix32(h ^ (part.long() & _M32))
    lo = _mix32(h ^ 0x5BD1E995)
    return ((h >> 5).double() * 67108864.0 + (lo >> 6).double() + 0.5) / 9007199254740992.0


def rank_desc(values: Tensor, locations: Tensor) -> Tensor:
    """``[F, M]`` indices that sort each row of ``values [F, M]`` in decreasing order, equal values
    by ``(context, position)`` of ``locations [F, M, 2]`` (increasing): one order for any process count."""
    lin = locations[..., 0] * _POS_SPAN + locations[..., 1]
    by_token = torch.argsort(lin, dim=1, stable=True)
    by_value = torch.argsort(values.gather(1, by_token), dim=1, descending=True, stable=True)
    return by_token.gather(1, by_value)


def check_profiling(k: object, mode: object, reference_tokens: object = 2) -> None:
    """The ``profiling`` settings, checked before any work: ValueError naming the one that is wrong."""
    if mode not in MODES:
        raise ValueError(f"profiling.sampling={mode!r}; expected one of {MODES}")
    for name, value, low in (("k", k, 1), ("reference_tokens", reference_tokens, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"profiling.{name}={value!r} must be a whole number >= {low}")


class StreamingProfiler:
    """Streaming K-sample estimate of every feature's distribution, plus firing statistics.

    Args:
        hook: hook name of the SAE.
        n_features: F.
        d: width of the hidden states.
        k: samples kept per feature.
        mode: ``topk`` or ``reservoir``.
        seed: seed of the reservoir keys.
        dtype: storage dtype of the kept hidden states.
        device: where the state lives.
    """

    def __init__(
        self, hook: str, n_features: int, d: int, k: int = 32, mode: str = "topk", seed: int = 0,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        check_profiling(k, mode)
        self.hook, self.F, self.d, self.K, self.mode = hook, n_features, d, k, mode
        dev = torch.device(device)
        self.seed = int(seed)
        self.keys = torch.full((n_features, k), float("-inf"), device=dev)
        self.acts = torch.zeros(n_features, k, device=dev)
        self.points = torch.zeros(n_features, k, d, dtype=dtype, device=dev)
        self.token_ids = torch.full((n_features, k), -1, dtype=torch.long, device=dev)
        self.locations = torch.full((n_features, k, 2), -1, dtype=torch.long, device=dev)
        self.n_fire = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.act_sum = torch.zeros(n_features, dtype=torch.float64, device=dev)
        self.act_max = torch.zeros(n_features, device=dev)
        self.n_tokens = 0

    def _reservoir_keys(self, rows: Tensor, feats: Tensor, vals: Tensor, locations: Tensor) -> Tensor:
        """Keys ``log(u) / a`` of the firing entries ``(rows, feats)`` with activations ``vals``;
        ``u`` hashes the token and the feature (``reservoir``) or the token alone (``coupled``)."""
        key_feats = feats if self.mode == "reservoir" else torch.zeros_like(feats)
        u = token_uniform(self.seed, locations[rows, 0], locations[rows, 1], key_feats)
        return (torch.log(u) / vals.double()).to(self.keys.dtype)

    @torch.no_grad()
    def update(self, h: Tensor, acts: Tensor, token_ids: Tensor, locations: Tensor) -> None:
        """Absorb one batch of tokens.

        Args:
            h: ``[N, d]`` hidden states.
            acts: ``[N, F]`` the SAE's activations on them.
            token_ids: ``[N]`` token ids.
            locations: ``[N, 2]`` (context index, position).
        """
        if h.shape[0] != acts.shape[0] or acts.shape[1] != self.F or h.shape[1] != self.d:
            raise ValueError(f"update: h {tuple(h.shape)} / acts {tuple(acts.shape)} do not fit F={self.F}, d={self.d}")
        if not bool(torch.isfinite(acts.sum())):  # one reduction: NaN / inf anywhere make the sum non-finite
            raise FloatingPointError(f"non-finite SAE activations at {self.hook}")
        self._update_sparse(h, acts.float(), token_ids, locations)

    def _update_sparse(self, h: Tensor, acts: Tensor, token_ids: Tensor, locations: Tensor) -> None:
        """From the firing entries only: the same state as the dense computation over the whole
        ``[N, F]`` key matrix (up to exact ties; tests/helpers/profiling_oracle.py is that oracle).

        SAE codes are sparse (TopK: k of F per token), so the statistics are scattered from
        the ``nnz`` firing entries, their keys are computed there alone (the activation for
        ``topk``; the reservoir key for ``reservoir`` / ``coupled``), and a firing entry is a
        candidate only if its key beats its feature's current K-th largest key; the survivors
        are ranked per feature (at most K kept) and merged by :meth:`_absorb`. Cost ``O(nnz)``
        instead of ``O(N F)``, in every mode.
        """
        rows, feats = acts.nonzero(as_tuple=True)  # SAE codes are >= 0: the firing entries, in one pass
        vals = acts[rows, feats]
        pos = vals > 0
        if not bool(pos.all()):
            rows, feats, vals = rows[pos], feats[pos], vals[pos]
        F, K = self.F, self.K
        self.n_fire += torch.bincount(feats, minlength=F)
        self.act_sum.index_add_(0, feats, vals.double())
        self.act_max = self.act_max.scatter_reduce(0, feats, vals, "amax", include_self=True)
        self.n_tokens += h.shape[0]
        keys = vals if self.mode == "topk" else self._reservoir_keys(rows, feats, vals, locations)
        # ties with the K-th key are candidates too: _absorb ranks equal keys by token order
        beat = keys >= self.keys.min(dim=1).values[feats]  # -inf while a feature has a free slot
        if not bool(beat.any()):
            return
        rows, feats, vals, keys = rows[beat], feats[beat], vals[beat], keys[beat]
        by_token = torch.argsort(locations[rows, 0] * _POS_SPAN + locations[rows, 1], stable=True)
        rows, feats, vals, keys = rows[by_token], feats[by_token], vals[by_token], keys[by_token]
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(feats[order], stable=True)]  # by feature, then by key (desc.)
        rows, feats, vals, keys = rows[order], feats[order], vals[order], keys[order]
        counts = torch.bincount(feats, minlength=F)
        rank = torch.arange(len(feats), device=feats.device) - (torch.cumsum(counts, 0) - counts)[feats]
        top = rank < K
        rows, feats, vals, keys, rank = rows[top], feats[top], vals[top], keys[top], rank[top]
        m = int(rank.max()) + 1
        cand_keys = torch.full((F, m), float("-inf"), device=acts.device)
        cand_acts = torch.zeros((F, m), device=acts.device)
        cand_rows = torch.zeros((F, m), dtype=torch.long, device=acts.device)
        cand_keys[feats, rank] = keys
        cand_acts[feats, rank] = vals
        cand_rows[feats, rank] = rows
        self._absorb(
            cand_keys, cand_acts, locations[cand_rows],
            fetch=lambda f, j: (h[cand_rows[f, j]], token_ids[cand_rows[f, j]]),
        )

    def _absorb(self, cand_keys: Tensor, cand_acts: Tensor, cand_locs: Tensor, fetch: Callable) -> None:
        """Keep the K largest keys of (state, candidates), equal keys by token order
        (:func:`rank_desc`); write incoming samples into evicted slots.

        ``cand_keys``/``cand_acts``: ``[F, M]``, ``cand_locs``: ``[F, M, 2]``. ``fetch(f, j)``
        returns the hidden states and token ids of candidates ``(f[n], j[n])``.
        """
        K = self.K
        all_keys = torch.cat([self.keys, cand_keys], dim=1)
        top = rank_desc(all_keys, torch.cat([self.locations, cand_locs], dim=1))[:, :K]
        chosen = torch.zeros_like(all_keys, dtype=torch.bool).scatter_(1, top, True)
        chosen &= torch.isfinite(all_keys)
        incoming = chosen[:, K:]  # [F, M]
        evicted = ~chosen[:, :K]  # [F, K] slots free for incoming samples
        n_in = incoming.sum(1)
        if int(n_in.sum()) == 0:
            return
        # pair the j-th incoming candidate of a row with the j-th free slot of that row
        slot_order = torch.argsort((~evicted).to(torch.int8), dim=1, stable=True)  # free slots first
        in_order = torch.argsort((~incoming).to(torch.int8), dim=1, stable=True)  # incoming first
        rank = torch.arange(max(K, incoming.shape[1]), device=all_keys.device)
        f_idx, r_idx = (rank[None, : incoming.shape[1]] < n_in[:, None]).nonzero(as_tuple=True)
        cand_j = in_order[f_idx, r_idx]
        slot = slot_order[f_idx, r_idx]
        pts, toks = fetch(f_idx, cand_j)
        self.points[f_idx, slot] = pts.to(self.points.dtype)
        self.token_ids[f_idx, slot] = toks
        self.locations[f_idx, slot] = cand_locs[f_idx, cand_j]
        self.keys[f_idx, slot] = cand_keys[f_idx, cand_j]
        self.acts[f_idx, slot] = cand_acts[f_idx, cand_j]

    @torch.no_grad()
    def merge(self, other: "StreamingProfiler") -> None:
        """Absorb another profiler's state (same hook/F/K/mode): exact, order-free."""
        if (other.F, other.K, other.d, other.mode) != (self.F, self.K, self.d, self.mode):
            raise ValueError("merge: profilers differ in F, K, d or mode")
        self.n_fire += other.n_fire.to(self.n_fire.device)
        self.act_sum += other.act_sum.to(self.act_sum.device)
        self.act_max = torch.maximum(self.act_max, other.act_max.to(self.act_max.device))
        self.n_tokens += other.n_tokens
        dev = self.keys.device
        o_pts, o_tok = other.points.to(dev), other.token_ids.to(dev)
        self._absorb(
            other.keys.to(dev), other.acts.to(dev), other.locations.to(dev),
            fetch=lambda f, j: (o_pts[f, j], o_tok[f, j]),
        )

    def state(self) -> dict[str, Tensor]:
        return {
            "keys": self.keys, "acts": self.acts, "points": self.points, "token_ids": self.token_ids,
            "locations": self.locations, "n_fire": self.n_fire, "act_sum": self.act_sum,
            "act_max": self.act_max, "n_tokens": torch.tensor([self.n_tokens], device=self.keys.device),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            if name == "n_tokens":
                self.n_tokens = int(value.reshape(-1)[0])
            else:
                setattr(self, name, value.to(getattr(self, name).device))

    def finalize(self) -> FeatureSamples:
        """The estimated distributions, samples sorted by decreasing activation (equal ones by token order)."""
        valid = torch.isfinite(self.keys)
        acts = torch.where(valid, self.acts, torch.zeros_like(self.acts))
        order = rank_desc(acts, self.locations)
        valid = valid.gather(1, order)
        acts = acts.gather(1, order)
        if self.mode == "topk":
            w = acts
        else:
            w = valid.float()
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
        w = torch.where(valid, w, torch.zeros_like(w))
        pts = self.points.gather(1, order[..., None].expand(-1, -1, self.d))
        return FeatureSamples(
            hook=self.hook,
            points=pts.float().cpu(),
            weights=w.cpu(),
            n_fire=self.n_fire.cpu(),
            act_sum=self.act_sum.cpu(),
            act_max=self.act_max.cpu(),
            n_tokens=self.n_tokens,
            token_ids=torch.where(valid, self.token_ids.gather(1, order), -1).cpu(),
            locations=torch.where(valid[..., None], self.locations.gather(1, order[..., None].expand(-1, -1, 2)), -1).cpu(),
            activations=acts.cpu(),
        )


def flatten_batch(batch: dict, hook: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(h [N, d], token_ids [N], locations [N, 2])`` of the masked positions of a batch."""
    mask = batch["mask"]
    h = batch["hidden"][hook][mask]
    toks = batch["tokens"][mask]
    ctx = batch["context_index"][:, None].expand_as(batch["tokens"])[mask]
    pos = batch["positions"][mask]
    return h, toks, torch.stack([ctx, pos], dim=1)
