"""Building the planted world, step by step (:func:`make_world`).

1. the concepts: firing probabilities, co-firing copula, base directions;
2. layer 0: one plain feature per concept, near-duplicate pairs planted;
3. each transition ``l -> l+1``: choose the features that split, merge, serve as split
   contexts and die; carry the continuing features; add split children, merged
   features and newborn features; carry the near-duplicate pairs;
4. assemble the :class:`SyntheticWorld`, calibrate noise, bias and firing rates on a
   pilot chunk, and record the truth of every pair.

All structural randomness comes from one generator (seeded by ``(seed, 1)``), drawn
in a fixed order; streams use their own generators (:mod:`._tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from sae_lens.synthetic import generate_random_low_rank_correlation_matrix
from torch import Tensor

from saeot.synthetic._geometry import (
    normalise,
    place_near_duplicates,
    place_shared_mean,
    plane_rotation,
    split_directions,
    spread_directions,
)
from saeot.synthetic._random import generator, mix_seed, torch_threads
from saeot.synthetic._tokens import ConceptModel
from saeot.synthetic.config import PILOT, SyntheticConfig
from saeot.synthetic.world import LayerFeatures, SyntheticWorld, Transition
from saeot.hooks import hook_name

__all__ = ["make_world"]


def make_world(cfg: SyntheticConfig) -> SyntheticWorld:
    """Build the planted model: concepts, per-layer true features, transitions and truth.

    Cost: O(n_layers * n_features * d) plus a pilot chunk per layer; about 0.2 s at the
    defaults. Raises ValueError (naming the setting) if ``n_features`` is too small for
    the requested scenario fractions.
    """
    with torch_threads(cfg.threads):
        return _WorldBuilder(cfg).build()


@dataclass
class _Concepts:
    """Step 1: the concepts' marginals and copula, and their base directions ``[K, d]``."""

    probs: Tensor  # [K]
    base: Tensor  # [K, d] unit rows
    factor: Tensor | None  # [K, r]
    diag_sqrt: Tensor | None  # [K]
    thresholds: Tensor  # [K]


@dataclass
class _NearDuplicates:
    """The near-duplicate pairs, carried from layer to layer."""

    pairs: Tensor  # [P, 2] feature indices at the current layer
    partner_concepts: Tensor  # [P, 2] the context partner concept of each member
    eps: Tensor  # [P] offset size e = sqrt(1/c - 1)
    base: Tensor  # [P, d] the pair's shared direction u


@dataclass
class _SharedMean:
    """The shared-mean groups (bimodal X, unimodal Y, first context, second context), carried along."""

    groups: Tensor  # [P, 4] feature indices at the current layer


@dataclass
class _Events:
    """Features of layer l chosen for the events of one transition."""

    split: Tensor  # [S] splitting features
    merge: Tensor  # [M, 2] merging pairs
    contexts: Tensor  # [S] the context feature of each split
    die: Tensor  # [n_die] dying features


@dataclass
class _NextLayer:
    """The features of layer l+1, accumulated in order, with the parents of each."""

    src: list[Tensor] = field(default_factory=list)
    gate: list[Tensor] = field(default_factory=list)
    gate_on: list[Tensor] = field(default_factory=list)
    dirs: list[Tensor] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)
    parents: list[list[int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.parents)

    def add(self, src: Tensor, gate: Tensor, gate_on: Tensor, dirs: Tensor, scales: Tensor,
            parents: list[list[int]]) -> None:
        self.src.append(src)
        self.gate.append(gate)
        self.gate_on.append(gate_on)
        self.dirs.append(dirs)
        self.scales.append(scales)
        self.parents.extend(parents)

    def features(self) -> LayerFeatures:
        return LayerFeatures(
            src=torch.cat(self.src).long(),
            gate=torch.cat(self.gate).long(),
            gate_on=torch.cat(self.gate_on).bool(),
            directions=torch.cat(self.dirs),
            scales=torch.cat(self.scales).float(),
        )

    def children(self, n_prev: int) -> Tensor:
        """``[n_prev, n]`` bool: layer-l feature p is a parent of layer-(l+1) feature c."""
        out = torch.zeros(n_prev, self.n, dtype=torch.bool)
        for child, parents in enumerate(self.parents):
            for p in parents:
                out[p, child] = True
        return out


class _WorldBuilder:
    """Builds one :class:`SyntheticWorld` from a :class:`SyntheticConfig` (module docstring for the steps)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.gen = generator(cfg.seed, 1)
        self.d, n0, L = cfg.d_model, cfg.n_features, cfg.n_layers
        self.n_die = round(cfg.birth_death_fraction * n0) if cfg.has("birth_death") else 0
        self.n_split = round(cfg.split_merge_fraction * n0) if cfg.has("split_merge") else 0
        self.n_merge = round(cfg.split_merge_fraction * n0 / 2) if cfg.has("split_merge") else 0
        self.n_nd = round(cfg.near_duplicate_fraction * n0 / 2) if cfg.has("near_duplicates") else 0
        self.n_sm = round(cfg.shared_mean_fraction * n0 / 2) if cfg.has("shared_mean") else 0
        if 4 * self.n_nd + 4 * self.n_sm > n0:
            raise ValueError(
                f"synthetic.near_duplicate_fraction={cfg.near_duplicate_fraction} and shared_mean_fraction="
                f"{cfg.shared_mean_fraction} need {4 * self.n_nd + 4 * self.n_sm} features "
                f"(members and contexts) but n_features={n0}"
            )
        self.K = n0 + self.n_die * (L - 1)
        self.protected = torch.zeros(self.K, dtype=torch.bool)  # concepts that no event may touch
        self.rules: list[tuple[int, int, float]] = []  # (parent concept, context concept, probability)
        self.choices: list[tuple[int, int, int]] = []  # (parent, first, second) concepts of the choice rules
        self.q_cum = torch.eye(self.d)  # rotation from layer 0 to the current layer
        self.next_concept = n0  # the next concept to be born
        self.growth = 1.0  # layer-wide magnitude growth so far
        self.log_range = tuple(math.log(x) for x in cfg.rescale_range)

    # ------------------------------------------------------------------ the steps
    def build(self) -> SyntheticWorld:
        concepts = self.concepts()
        layers = [self.first_layer(concepts)]
        nd = self.plant_near_duplicates(layers[0])
        sm = self.plant_shared_mean(layers[0])
        transitions: list[Transition] = []
        nd_pairs_per_layer = [nd.pairs]
        sm_per_layer = [sm.groups]
        for index in range(self.cfg.n_layers - 1):
            nxt, tr = self.transition(index, layers[-1], concepts, nd, sm)
            layers.append(nxt)
            transitions.append(tr)
            nd_pairs_per_layer.append(nd.pairs)
            sm_per_layer.append(sm.groups)
        world = self.assemble(concepts, layers, transitions, nd, nd_pairs_per_layer, sm_per_layer)
        self.calibrate_on_pilot(world, layers)
        self.record_truth(world, transitions)
        return world

    def concepts(self) -> _Concepts:
        """Step 1: firing probabilities in random order, spread base directions, the copula."""
        cfg, K = self.cfg, self.K
        probs = cfg.firing.generate(K)[torch.randperm(K, generator=self.gen)].float()
        base = spread_directions(torch.randn(K, self.d, generator=self.gen), cfg.spread_steps)
        if cfg.correlation_scale > 0:
            lr = generate_random_low_rank_correlation_matrix(
                K, cfg.correlation_rank, cfg.correlation_scale, seed=mix_seed(cfg.seed, 2) % (2**31)
            )
            factor, diag_sqrt = lr.correlation_factor.float(), lr.correlation_diag.float().sqrt()
            thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * probs)
        else:
            factor, diag_sqrt, thresholds = None, None, torch.full((K,), float("nan"))
        return _Concepts(probs=probs, base=base, factor=factor, diag_sqrt=diag_sqrt, thresholds=thresholds)

    def first_layer(self, concepts: _Concepts) -> LayerFeatures:
        """Step 2: layer 0, one plain feature per concept at its base direction, magnitude 1."""
        n0 = self.cfg.n_features
        return LayerFeatures(
            src=torch.stack([torch.arange(n0), torch.full((n0,), -1)], dim=1),
            gate=torch.full((n0,), -1, dtype=torch.long),
            gate_on=torch.zeros(n0, dtype=torch.bool),
            directions=concepts.base[:n0].clone(),
            scales=torch.ones(n0),
        )

    def plant_near_duplicates(self, layer0: LayerFeatures) -> _NearDuplicates:
        """Step 2: pairs of layer-0 features at cosine ``c ~ U(near_duplicate_cos)``, each with a context partner."""
        cfg, gen, n = self.cfg, self.gen, self.n_nd
        if not n:
            return _NearDuplicates(
                pairs=torch.zeros(0, 2, dtype=torch.long), partner_concepts=torch.zeros(0, 2, dtype=torch.long),
                eps=torch.zeros(0), base=torch.zeros(0, self.d),
            )
        pick = torch.randperm(cfg.n_features, generator=gen)[: 4 * n]
        pairs = pick[: 2 * n].view(n, 2)
        partners = pick[2 * n :].view(n, 2)
        lo_c, hi_c = cfg.near_duplicate_cos
        cos = lo_c + (hi_c - lo_c) * torch.rand(n, generator=gen)
        nd = _NearDuplicates(pairs=pairs, partner_concepts=partners, eps=torch.sqrt(1.0 / cos - 1.0),
                             base=layer0.directions[pairs[:, 0]].clone())
        place_near_duplicates(layer0.directions, nd.pairs, nd.base, nd.eps, gen)
        self.protected[pick] = True
        for (i, j), (pi, pj) in zip(pairs.tolist(), partners.tolist()):
            self.rules.append((i, pi, cfg.near_duplicate_context_prob))
            self.rules.append((j, pj, cfg.near_duplicate_context_prob))
        return nd

    def plant_shared_mean(self, layer0: LayerFeatures) -> _SharedMean:
        """Step 2: groups (X, Y, c1, c2) of unprotected layer-0 features; X fires with c1 or c2, Y at X's mean."""
        cfg, n = self.cfg, self.n_sm
        if not n:
            return _SharedMean(groups=torch.zeros(0, 4, dtype=torch.long))
        free = (~self.protected[: cfg.n_features]).nonzero().flatten()
        pick = free[torch.randperm(len(free), generator=self.gen)[: 4 * n]]
        groups = pick.view(n, 4)
        self.protected[pick] = True
        for x, y, c1, c2 in groups.tolist():
            self.choices.append((x, c1, c2))
            for other in (x, c1, c2):  # Y's tokens carry none of X's: its mean is exactly X's
                self.rules.append((y, other, 0.0))
        layer0.scales[groups[:, 2:].flatten()] = cfg.shared_mean_context_scale
        place_shared_mean(layer0.directions, layer0.scales, groups, cfg.shared_mean_context_prob,
                          cfg.shared_mean_offset, self.gen)
        return _SharedMean(groups=groups)

    def transition(
        self, index: int, lay: LayerFeatures, concepts: _Concepts, nd: _NearDuplicates, sm: _SharedMean
    ) -> tuple[LayerFeatures, Transition]:
        """Step 3: layer ``index + 1`` from layer ``index`` (``nd`` and ``sm`` are carried along in place)."""
        cfg = self.cfg
        q = plane_rotation(self.d, cfg.rotation_angle, self.gen) if cfg.has("rotation") else torch.eye(self.d)
        self.q_cum = q @ self.q_cum
        step = cfg.rescale_growth if cfg.has("rescale") else 1.0
        self.growth *= step
        ev = self.choose_events(index, lay)
        canonical = torch.full((lay.n,), -1, dtype=torch.long)
        kinds = ["persists"] * lay.n
        for f in ev.die.tolist():
            kinds[f] = "dies"
        nxt = _NextLayer()
        self.add_continuing(lay, ev, q, step, nxt, canonical)
        split_rows = self.add_split_children(lay, ev, q, step, nxt, canonical, kinds)
        merge_rows = self.add_merged(lay, ev, q, step, nxt, canonical, kinds)
        self.add_born(concepts, nxt)
        features = nxt.features()
        if self.n_nd:
            self.carry_near_duplicates(nd, q, canonical, features)
        if self.n_sm:
            sm.groups = canonical[sm.groups]
            place_shared_mean(features.directions, features.scales, sm.groups, cfg.shared_mean_context_prob,
                              cfg.shared_mean_offset, self.gen)
        return features, Transition(
            canonical=canonical,
            children=nxt.children(lay.n),
            kinds=tuple(kinds),
            rotation=q,
            splits=torch.tensor(split_rows, dtype=torch.long).view(-1, 3),
            merges=torch.tensor(merge_rows, dtype=torch.long).view(-1, 3),
        )

    # ------------------------------------------------------------------ one transition
    def choose_events(self, index: int, lay: LayerFeatures) -> _Events:
        """Any unprotected feature may die; splits, merges and split contexts take plain ones."""
        cfg, gen = self.cfg, self.gen
        n_split, n_merge, n_die = self.n_split, self.n_merge, self.n_die
        concept_of = lay.src[:, 0]
        free = ~self.protected[concept_of]
        free_plain = (free & lay.plain()).nonzero().flatten()
        free_plain = free_plain[torch.randperm(len(free_plain), generator=gen)]
        need = 2 * n_split + 2 * n_merge
        taken = torch.zeros(lay.n, dtype=torch.bool)
        taken[free_plain[:need]] = True
        can_die = (free & ~taken).nonzero().flatten()
        die = can_die[torch.randperm(len(can_die), generator=gen)[:n_die]]
        if need > len(free_plain) or len(die) < n_die:
            raise ValueError(
                f"synthetic: transition {index}->{index + 1} needs {need} free plain features "
                f"and {n_die} more that may die, but only {len(free_plain)} plain / {len(can_die) + need} free "
                "exist; raise synthetic.n_features, lower the fractions or synthetic.n_layers"
            )
        ev = _Events(
            split=free_plain[:n_split],
            merge=free_plain[n_split : n_split + 2 * n_merge].view(n_merge, 2),
            contexts=free_plain[n_split + 2 * n_merge : need],
            die=die,
        )
        self.protected[concept_of[ev.contexts]] = True
        for p, c in zip(concept_of[ev.split].tolist(), concept_of[ev.contexts].tolist()):
            self.rules.append((p, c, cfg.split_context_prob))
        return ev

    def magnitude_factors(self, n: int) -> Tensor:
        """``[n]`` per-feature magnitude factors, log-uniform in ``rescale_range`` (ones without ``rescale``)."""
        if not self.cfg.has("rescale"):
            return torch.ones(n)
        lo, hi = self.log_range
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=self.gen))

    def carry(self, x: Tensor, q: Tensor) -> Tensor:
        """``normalise(x Q^T + drift xi)``, ``xi ~ N(0, I/d)``: directions ``[n, d]`` carried to the next layer."""
        moved = x @ q.T
        if self.cfg.drift > 0:
            moved = moved + self.cfg.drift * torch.randn(moved.shape, generator=self.gen) / math.sqrt(self.d)
        return normalise(moved)

    def add_continuing(self, lay: LayerFeatures, ev: _Events, q: Tensor, step: float, nxt: _NextLayer,
                       canonical: Tensor) -> None:
        """Features without an event continue, in order, as the first features of the next layer."""
        event = torch.zeros(lay.n, dtype=torch.bool)
        event[ev.die] = True
        event[ev.split] = True
        event[ev.merge.flatten()] = True
        cont = (~event).nonzero().flatten()
        canonical[cont] = torch.arange(len(cont))
        dirs = self.carry(lay.directions[cont], q)
        nxt.add(lay.src[cont], lay.gate[cont], lay.gate_on[cont], dirs,
                lay.scales[cont] * step * self.magnitude_factors(len(cont)), [[int(f)] for f in cont])

    def add_split_children(self, lay: LayerFeatures, ev: _Events, q: Tensor, step: float, nxt: _NextLayer,
                           canonical: Tensor, kinds: list[str]) -> list[tuple[int, int, int]]:
        """Two children per split, gated on the context firing / silent; the canonical child comes first."""
        if not self.n_split:
            return []
        concept_of = lay.src[:, 0]
        centre = normalise(lay.directions[ev.split] @ q.T)
        child_dirs = split_directions(centre, nxt.dirs[0], self.cfg.split_spread, self.gen)  # [S, 2, d]
        silent_first = self.cfg.split_context_prob < 0.5  # the canonical child gets most firings
        first_on = not silent_first
        rows = []
        for s_i, (f, g) in enumerate(zip(ev.split.tolist(), concept_of[ev.contexts].tolist())):
            canonical[f] = nxt.n
            kinds[f] = "splits"
            rows.append((f, nxt.n, nxt.n + 1))
            for slot, on in enumerate((first_on, not first_on)):
                nxt.add(lay.src[f : f + 1], torch.tensor([g]), torch.tensor([on]), child_dirs[s_i, slot : slot + 1],
                        lay.scales[f : f + 1] * step * self.magnitude_factors(1), [[f]])
        return rows

    def add_merged(self, lay: LayerFeatures, ev: _Events, q: Tensor, step: float, nxt: _NextLayer,
                   canonical: Tensor, kinds: list[str]) -> list[tuple[int, int, int]]:
        """One feature per merging pair, reading both concepts: ``normalise(Q D_a + Q D_b)``, mean magnitude."""
        rows = []
        for a, b in ev.merge.tolist():
            canonical[a] = canonical[b] = nxt.n
            kinds[a] = kinds[b] = "merges"
            rows.append((a, b, nxt.n))
            nxt.add(
                torch.tensor([[int(lay.src[a, 0]), int(lay.src[b, 0])]]), torch.tensor([-1]), torch.tensor([False]),
                normalise(lay.directions[a] @ q.T + lay.directions[b] @ q.T)[None],
                ((lay.scales[a] + lay.scales[b]) / 2 * step * self.magnitude_factors(1)).reshape(1), [[a, b]],
            )
        return rows

    def add_born(self, concepts: _Concepts, nxt: _NextLayer) -> None:
        """``n_die`` new concepts start being written, at their base direction rotated to this layer."""
        n = self.n_die
        if not n:
            return
        new = torch.arange(self.next_concept, self.next_concept + n)
        self.next_concept += n
        nxt.add(torch.stack([new, torch.full_like(new, -1)], dim=1), torch.full((n,), -1, dtype=torch.long),
                torch.zeros(n, dtype=torch.bool), normalise(concepts.base[new] @ self.q_cum.T),
                self.growth * self.magnitude_factors(n), [[] for _ in range(n)])

    def carry_near_duplicates(self, nd: _NearDuplicates, q: Tensor, canonical: Tensor, nxt: LayerFeatures) -> None:
        """Carry each pair's shared direction, follow the members, redraw their offsets (in place)."""
        drift = self.cfg.drift * torch.randn(nd.base.shape, generator=self.gen) / math.sqrt(self.d)
        nd.base = normalise(nd.base @ q.T + drift)
        nd.pairs = canonical[nd.pairs]
        place_near_duplicates(nxt.directions, nd.pairs, nd.base, nd.eps, self.gen)

    # ------------------------------------------------------------------ the world
    def assemble(self, concepts: _Concepts, layers: list[LayerFeatures], transitions: list[Transition],
                 nd: _NearDuplicates, nd_pairs_per_layer: list[Tensor], sm_per_layer: list[Tensor]) -> SyntheticWorld:
        """Step 4: the world, with each layer's near-duplicate contexts and split gates as feature indices."""
        cfg, d = self.cfg, self.d
        hooks = [hook_name(i) for i in range(cfg.n_layers)]
        model = ConceptModel(
            seed=cfg.seed,
            probs=concepts.probs,
            thresholds=concepts.thresholds,
            factor=concepts.factor,
            diag_sqrt=concepts.diag_sqrt,
            rules=torch.tensor([(p, c) for p, c, _ in self.rules], dtype=torch.long).view(-1, 2),
            rule_probs=torch.tensor([q for _, _, q in self.rules], dtype=torch.float32),
            magnitude_mean=cfg.magnitude_mean,
            magnitude_std=cfg.magnitude_std,
            choice_rules=torch.tensor(self.choices, dtype=torch.long).view(-1, 3),
            choice_probs=torch.full((len(self.choices),), cfg.shared_mean_context_prob),
        )
        world = SyntheticWorld(
            config=cfg,
            hooks=hooks,
            directions={h: lay.directions for h, lay in zip(hooks, layers)},
            scales={h: lay.scales for h, lay in zip(hooks, layers)},
            bias={h: torch.zeros(d) for h in hooks},
            noise_std={h: 0.0 for h in hooks},
            firing_rate={},
            truth={},
            truth_sets={},
            kinds={},
            born={},
            rotations={},
            splits={},
            merges={},
            near_duplicate_pairs={h: p for h, p in zip(hooks, nd_pairs_per_layer)},
            shared_mean_groups={h: g for h, g in zip(hooks, sm_per_layer)},
            near_duplicate_contexts={},
            gate_feature={},
            gate_on={h: lay.gate_on.clone() for h, lay in zip(hooks, layers)},
            _layers=layers,
            _transitions=transitions,
            _concepts=model,
        )
        # near-duplicate context partners as feature indices at each layer (they stay plain)
        for h, lay in zip(hooks, layers):
            index = {int(k): f for f, k in enumerate(lay.src[:, 0].tolist()) if lay.src[f, 1] < 0 and lay.gate[f] < 0}
            world.near_duplicate_contexts[h] = torch.tensor(
                [[index[int(k)] for k in row] for row in nd.partner_concepts.tolist()], dtype=torch.long
            ).view(-1, 2)
            world.gate_feature[h] = torch.tensor(
                [index[int(g)] if g >= 0 else -1 for g in lay.gate.tolist()], dtype=torch.long
            )
        return world

    def calibrate_on_pilot(self, world: SyntheticWorld, layers: list[LayerFeatures]) -> None:
        """Step 4: noise ``sigma_l = noise * RMS(signal)``, firing rates and the layer bias, on a pilot chunk."""
        cfg = self.cfg
        z = world._concepts.sample(PILOT, 0, 0, cfg.chunk_size)
        for i, (h, lay) in enumerate(zip(world.hooks, layers)):
            c = world.activations_from_concepts(i, z)
            signal = c @ lay.directions
            rho = float(signal.pow(2).mean().sqrt())
            world.noise_std[h] = cfg.noise * rho
            world.firing_rate[h] = (c > 0).float().mean(0)
            if cfg.bias > 0:
                typical = float(lay.scales.median()) * cfg.magnitude_mean
                world.bias[h] = cfg.bias * typical * normalise(torch.randn(self.d, generator=self.gen))

    def record_truth(self, world: SyntheticWorld, transitions: list[Transition]) -> None:
        """Step 4: truth, descendant sets, kinds, births and rotations of every pair; splits and merges."""
        for a, b in world.pairs:
            ia, ib = world.layer_of(a), world.layer_of(b)
            canon, sets, kinds, born = world.truth_between(a, b)
            world.truth[(a, b)], world.truth_sets[(a, b)] = canon, sets
            world.kinds[(a, b)], world.born[(a, b)] = kinds, born
            rot = torch.eye(self.d)
            for tr in transitions[ia:ib]:
                rot = tr.rotation @ rot
            world.rotations[(a, b)] = rot
            if ib == ia + 1:
                world.splits[(a, b)] = transitions[ia].splits
                world.merges[(a, b)] = transitions[ia].merges
