"""The reference-space interface: per-hook maps into one shared space R^r.

``fit({hook: [M, d]})`` on hidden states of the SAME M tokens at every hook (row t =
the same token everywhere); ``transform(hook, x [..., d]) -> [..., r]``. Every space
first standardises each layer (centre, divide by the RMS norm); subclasses map the
standardised states on. Saved as safetensors (``hook/mean``, ``hook/scale`` and the
subclass's own tensors), with the space's name and r in the metadata.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from saeot.io import atomic_save_safetensors, load_safetensors_checked
from saeot.types import FeatureSamples

__all__ = ["ReferenceSpace", "check_aligned", "project_samples"]


def check_aligned(states: dict[str, Tensor]) -> int:
    """Number of tokens M of aligned states ``{hook: [M, d]}``; ValueError if they differ or are too few."""
    if not states:
        raise ValueError("reference space: no hidden states to fit on")
    sizes = {h: x.shape[0] for h, x in states.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"reference space needs the same tokens at every layer; got counts {sizes}")
    n = next(iter(sizes.values()))
    if n < 2:
        raise ValueError("reference space: need at least 2 tokens to fit")
    for h, x in states.items():
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite hidden states at {h}")
    return n



class ReferenceSpace(ABC):
    """Per-hook maps into a shared space. Subclasses set ``self.dim`` when fitted."""

    name = "reference"

    def __init__(self) -> None:
        self.mean: dict[str, Tensor] = {}
        self.scale: dict[str, Tensor] = {}
        self.dim: int | None = None

    def check(self, d_model: int) -> None:
        """Before any work: a width ``r`` (``reference.dim``, spaces that have one) is a whole
        number in ``1..d_model``; ValueError naming it otherwise."""
        r = getattr(self, "r", None)
        if r is None:
            return
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d_model:
            raise ValueError(f"reference.dim={r!r} must be a whole number in 1..{d_model} (the model's d_model)")

    def _standardize_fit(self, states: dict[str, Tensor]) -> dict[str, Tensor]:
        z = {}
        for h, x in states.items():
            x = x.double()
            m = x.mean(0)
            s = ((x - m) ** 2).sum(1).mean().sqrt() / x.shape[1] ** 0.5
            self.mean[h], self.scale[h] = m.float(), s.float().clamp_min(1e-12)
            z[h] = (x - m) / s.clamp_min(1e-12)
        return z

    def standardize(self, hook: str, x: Tensor) -> Tensor:
        if hook not in self.mean:
            raise KeyError(f"reference space was not fitted on {hook}; fitted: {sorted(self.mean)}")
        return (x - self.mean[hook].to(x)) / self.scale[hook].to(x)

    @abstractmethod
    def fit(self, states: dict[str, Tensor]) -> "ReferenceSpace":
        """Fit on aligned hidden states ``{hook: [M, d]}`` (row t = the same token everywhere)."""

    @abstractmethod
    def transform(self, hook: str, x: Tensor) -> Tensor:
        """``[..., d] -> [..., r]``."""

    def alignment_error(self, states: dict[str, Tensor]) -> dict[str, float]:
        """Mean squared distance between images of the same token, per layer pair, relative
        to the mean squared distance between images of random tokens (0 = perfect, ~1 = none)."""
        out = {}
        g = torch.Generator().manual_seed(0)
        for a, b in itertools.combinations(sorted(states), 2):
            pa, pb = self.transform(a, states[a].float()), self.transform(b, states[b].float())
            same = ((pa - pb) ** 2).sum(1).mean()
            perm = torch.randperm(len(pb), generator=g)
            rand = ((pa - pb[perm]) ** 2).sum(1).mean()
            out[f"{a}|{b}"] = float(same / rand.clamp_min(1e-12))
        return out

    # persistence ------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for h in self.mean:
            out[f"{h}/mean"], out[f"{h}/scale"] = self.mean[h], self.scale[h].reshape(1)
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        for k, v in tensors.items():
            h, what = k.rsplit("/", 1)
            if what == "mean":
                self.mean[h] = v
            elif what == "scale":
                self.scale[h] = v.reshape(())

    def save(self, path: str | Path) -> None:
        atomic_save_safetensors(self.tensors(), path, metadata={"name": self.name, "dim": str(self.dim)})

    def load(self, path: str | Path) -> "ReferenceSpace":
        tensors, meta = load_safetensors_checked(path)
        if meta.get("name") != self.name:
            raise ValueError(f"{path} holds a {meta.get('name')} reference space, not {self.name}")
        self.load_tensors(tensors)
        self.dim = int(meta["dim"])
        return self


def project_samples(space: ReferenceSpace, samples: FeatureSamples, chunk: int = 1024) -> FeatureSamples:
    """A :class:`~saeot.types.FeatureSamples` with its points mapped into the reference space."""
    pts = samples.points
    out = torch.cat([space.transform(samples.hook, pts[i:i + chunk]) for i in range(0, len(pts), chunk)]) \
        if len(pts) else pts.new_zeros(0, pts.shape[1], space.dim or pts.shape[2])
    return samples.with_points(out.float())
