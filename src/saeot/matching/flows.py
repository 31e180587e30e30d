"""Flows across many layers: chains of matched features, births and deaths per layer.

From the matches of consecutive layers (l -> l') a feature's chain follows its matched
partner forward, layer after layer. Under a many-to-one assignment several features can
reach one feature of the next layer: there the chain whose edge is closest continues and
the others end as ``merges``. So every matched node belongs to exactly one chain.

Per layer: ``born`` = alive features that no feature of the previous layer is matched to;
``dies`` = alive features with no match into the next layer; ``continues`` = the rest.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saeot.hooks import hook_layer
from saeot.io import atomic_path
from saeot.types import MatchResult

__all__ = ["Chain", "Flows", "build_flows", "write_flows", "FLOW_COLUMNS"]

FLOW_COLUMNS = ["chain", "length", "start_layer", "end_layer", "path", "mean_distance", "max_distance", "end"]


@dataclass
class Chain:
    """``nodes``: ``[(layer, feature), ...]`` in layer order; ``distances[i]`` between node i and i+1;
    ``end``: ``last_layer`` (reached the last layer), ``dies`` (no match onward) or ``merges``
    (its next feature continues another, closer chain)."""

    nodes: list[tuple[int, int]]
    distances: list[float] = field(default_factory=list)
    end: str = "dies"

    @property
    def length(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class Flows:
    chains: list[Chain]
    #: layer -> {"alive", "born", "dies", "continues"}
    layers: dict[int, dict[str, int]]

    def summary(self) -> dict:
        lengths = torch.tensor([c.length for c in self.chains], dtype=torch.float64)
        return {
            "n_chains": len(self.chains),
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "layers": {str(k): v for k, v in self.layers.items()},
        }


def build_flows(results: list[MatchResult], alive: dict[str, torch.Tensor] | None = None) -> Flows:
    """Chains through the consecutive layer pairs among ``results`` (pairs that skip a layer of
    the chain, e.g. 3 -> 7 when 4 is matched too, are ignored); ``alive``: hook -> ``[F]``
    bool (default: every feature of A that has a finite distance)."""
    layers = sorted({hook_layer(r.hook_a) for r in results} | {hook_layer(r.hook_b) for r in results})
    by_step = {(hook_layer(r.hook_a), hook_layer(r.hook_b)): r for r in results}
    steps = [by_step[(a, b)] for a, b in zip(layers[:-1], layers[1:]) if (a, b) in by_step]
    if not steps:
        return Flows([], {})

    def alive_of(hook: str, n: int, r: MatchResult | None) -> torch.Tensor:
        if alive is not None and hook in alive:
            return alive[hook].bool()
        if r is not None:
            return torch.isfinite(r.distance)
        return torch.ones(n, dtype=torch.bool)

    # the incoming matched edge that continues at each node of the next layer: the closest one
    winner: list[dict[int, int]] = []
    for r in steps:
        best: dict[int, tuple[float, int]] = {}
        for i in r.matched.nonzero().flatten().tolist():
            j, d = int(r.feature_b[i]), float(r.distance[i])
            if j >= 0 and (j not in best or d < best[j][0]):
                best[j] = (d, i)
        winner.append({j: i for j, (d, i) in best.items()})

    chains: list[Chain] = []
    stats: dict[int, dict[str, int]] = {}
    for s, r in enumerate(steps):
        la, lb = hook_layer(r.hook_a), hook_layer(r.hook_b)
        alive_a = alive_of(r.hook_a, r.n_features, r)
        targets = set(winner[s])
        reached = {int(r.feature_b[i]) for i in r.matched.nonzero().flatten().tolist()}
        prev = winner[s - 1] if s > 0 else {}
        entry = stats.setdefault(la, {"alive": int(alive_a.sum()), "born": 0, "dies": 0, "continues": 0})
        entry["born"] = int(sum(1 for i in alive_a.nonzero().flatten().tolist() if i not in prev)) if s > 0 else 0
        entry["dies"] = int((alive_a & ~r.matched).sum())
        entry["continues"] = entry["alive"] - entry["dies"]
        # start a chain at every alive feature of la that no chain reaches
        for i in alive_a.nonzero().flatten().tolist():
            if i in prev:
                continue
            chain = Chain(nodes=[(la, i)])
            cur, step = i, s
            while step < len(steps):
                rs = steps[step]
                if hook_layer(rs.hook_a) != chain.nodes[-1][0]:  # a gap in the matched layers
                    chain.end = "dies"
                    break
                if not bool(rs.matched[cur]):
                    chain.end = "dies"
                    break
                j = int(rs.feature_b[cur])
                if winner[step].get(j) != cur:
                    chain.end = "merges"
                    chain.distances.append(float(rs.distance[cur]))
                    break
                chain.nodes.append((hook_layer(rs.hook_b), j))
                chain.distances.append(float(rs.distance[cur]))
                cur, step = j, step + 1
            else:
                chain.end = "last_layer"
            chains.append(chain)
        if s == len(steps) - 1:  # the last layer: births only
            alive_b = alive.get(r.hook_b) if alive is not None and r.hook_b in alive else None
            if alive_b is None:
                stats[lb] = {"alive": len(reached), "born": 0, "dies": 0, "continues": 0}
            else:
                born = sum(1 for j in alive_b.nonzero().flatten().tolist() if j not in targets)
                stats[lb] = {"alive": int(alive_b.sum()), "born": born, "dies": 0, "continues": 0}
    return Flows(chains=chains, layers=stats)


def write_flows(flows: Flows, path: Path) -> None:
    """``flows.csv``: one row per chain (:data:`FLOW_COLUMNS`), longest first."""
    order = sorted(range(len(flows.chains)), key=lambda c: (-flows.chains[c].length, flows.chains[c].nodes[0]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FLOW_COLUMNS)
        for k, c in enumerate(order):
            ch = flows.chains[c]
            d = ch.distances
            w.writerow([k, ch.length, ch.nodes[0][0], ch.nodes[-1][0], " ".join(f"{la}:{i}" for la, i in ch.nodes),
                        f"{sum(d) / len(d):.6g}" if d else "", f"{max(d):.6g}" if d else "", ch.end])
