"""Projections phi_l of each layer's hidden states into one shared reference space R^r.

Distributions of features from different layers live in different bases (the
residual stream drifts, is rescaled and rotated from layer to layer); they are
compared after mapping every layer into one space. All maps are fitted on
hidden states of the SAME tokens at every layer involved (the held-out split),
``fit({hook: [M, d]})``, and applied with ``transform(hook, x [..., d]) -> [..., r]``.

* :class:`Standardize` -- ``phi_l(x) = (x - m_l) / s_l``, ``s_l`` the layer's RMS norm
  of centred states; ``r = d``. Undoes norm growth, not rotation.
* :class:`Ridge` -- closed form: the target is the top-r PCA coordinates of one
  reference layer's standardised states, ``T = Z_ref U_r``; each layer's map is the
  ridge regression ``W_l = (Z_l^T Z_l + lam n I)^-1 Z_l^T T``, ``phi_l(x) = z_l(x) W_l``.
  Undoes any linear change of basis between layers that the tokens pin down.
* :class:`Learned` -- a LightningModule with one linear (or small MLP) map per layer,
  trained by the Lightning Trainer with an alignment loss between the images of the
  same token at every pair of layers plus a VICReg-style variance / decorrelation
  term against collapse; initialised at the ridge solution.
"""

from __future__ import annotations

import itertools
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from saeot.io import atomic_save_safetensors, load_safetensors_checked

log = logging.getLogger(__name__)


def _check_aligned(states: dict[str, Tensor]) -> int:
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


class Standardize(ReferenceSpace):
    """``phi_l(x) = (x - m_l) / s_l`` with ``s_l^2 = E||x - m_l||^2 / d``; ``r = d``."""

    name = "standardize"

    def fit(self, states: dict[str, Tensor]) -> "Standardize":
        _check_aligned(states) if len(states) > 1 else None
        self._standardize_fit(states)
        self.dim = next(iter(states.values())).shape[1]
        return self

    def transform(self, hook: str, x: Tensor) -> Tensor:
        return self.standardize(hook, x)


class Ridge(ReferenceSpace):
    """Closed-form ridge maps onto the top-``dim`` PCA coordinates of a reference layer.

    Args:
        dim: r, the reference space's width (capped at d).
        reference: which layer defines the target: ``first``, ``last``, ``middle`` or a hook name.
        lam: ridge strength, relative (``lam * n`` is added to ``Z^T Z``, Z standardised).
    """

    name = "ridge"

    def __init__(self, dim: int = 64, reference: str = "middle", lam: float = 1e-3) -> None:
        super().__init__()
        self.r, self.reference, self.lam = dim, reference, lam
        self.W: dict[str, Tensor] = {}

    def reference_hook(self, hooks: list[str]) -> str:
        from saeot.hooks import hook_layer

        ordered = sorted(hooks, key=hook_layer)
        if self.reference == "first":
            return ordered[0]
        if self.reference == "last":
            return ordered[-1]
        if self.reference == "middle":
            return ordered[(len(ordered) - 1) // 2]
        if self.reference in hooks:
            return self.reference
        raise ValueError(f"reference.reference={self.reference!r}: use first, last, middle or one of {hooks}")

    def fit(self, states: dict[str, Tensor]) -> "Ridge":
        n = _check_aligned(states)
        z = self._standardize_fit(states)
        ref = self.reference_hook(list(states))
        d = z[ref].shape[1]
        r = min(self.r, d, n)
        # top-r principal directions of the reference layer
        _, _, vh = torch.linalg.svd(z[ref], full_matrices=False)
        target = z[ref] @ vh[:r].T  # [n, r]
        for h, zh in z.items():
            gram = zh.T @ zh + self.lam * n * torch.eye(zh.shape[1], dtype=zh.dtype)
            self.W[h] = torch.linalg.solve(gram, zh.T @ target).float()
        self.dim = r
        return self

    def transform(self, hook: str, x: Tensor) -> Tensor:
        if hook not in self.W:
            raise KeyError(f"ridge reference space was not fitted on {hook}")
        return self.standardize(hook, x) @ self.W[hook].to(x)

    def tensors(self) -> dict[str, Tensor]:
        out = super().tensors()
        out.update({f"{h}/W": w for h, w in self.W.items()})
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_tensors({k: v for k, v in tensors.items() if not k.endswith("/W")})
        self.W = {k.rsplit("/", 1)[0]: v for k, v in tensors.items() if k.endswith("/W")}


class _Maps(nn.Module):
    def __init__(self, hooks: list[str], d: int, r: int, hidden: int | None) -> None:
        super().__init__()
        self.keys = {h: h.replace(".", "_") for h in hooks}

        def make() -> nn.Module:
            if hidden:
                return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, r))
            return nn.Linear(d, r, bias=False)

        self.maps = nn.ModuleDict({k: make() for k in self.keys.values()})

    def forward(self, hook: str, z: Tensor) -> Tensor:
        return self.maps[self.keys[hook]](z)


class LearnedReferenceModule(L.LightningModule):
    """Trains per-layer maps: alignment between the same token's images at every layer pair,
    plus variance (hinge on per-dimension std) and decorrelation (off-diagonal covariance)
    terms that keep the space from collapsing.

    Batches: tuples of standardised states, one ``[B, d]`` tensor per hook, same tokens.
    """

    def __init__(self, hooks: list[str], d: int, r: int, hidden: int | None, lr: float,
                 var_weight: float, cov_weight: float, init: dict[str, Tensor] | None) -> None:
        super().__init__()
        self.hooks = hooks
        self.maps = _Maps(hooks, d, r, hidden)
        self.lr, self.var_weight, self.cov_weight = lr, var_weight, cov_weight
        self.history: list[float] = []
        if init is not None and not hidden:
            with torch.no_grad():
                for h in hooks:
                    self.maps.maps[self.maps.keys[h]].weight.copy_(init[h].T)

    def loss_terms(self, zs: list[Tensor]) -> dict[str, Tensor]:
        ys = [self.maps(h, z) for h, z in zip(self.hooks, zs)]
        align = torch.stack([((a - b) ** 2).sum(1).mean() for a, b in itertools.combinations(ys, 2)]).mean() \
            if len(ys) > 1 else ys[0].sum() * 0
        var = torch.stack([torch.relu(1.0 - y.std(0)).mean() for y in ys]).mean()
        cov = []
        for y in ys:
            yc = y - y.mean(0)
            c = yc.T @ yc / max(len(y) - 1, 1)
            off = c - torch.diag(torch.diag(c))
            cov.append((off ** 2).sum() / y.shape[1])
        cov_t = torch.stack(cov).mean()
        return {"align": align, "var": var, "cov": cov_t}

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        terms = self.loss_terms(list(batch))
        loss = terms["align"] + self.var_weight * terms["var"] + self.cov_weight * terms["cov"]
        self.log("reference/loss", loss, prog_bar=True)
        for k, v in terms.items():
            self.log(f"reference/{k}", v)
        self.history.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Learned(ReferenceSpace):
    """Per-layer linear or MLP maps trained with Lightning (see :class:`LearnedReferenceModule`).

    Args:
        dim: r.
        hidden: MLP hidden width (None: linear maps).
        epochs, batch_size, lr: training settings.
        var_weight, cov_weight: weights of the anti-collapse terms.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. a logger).
    """

    name = "learned"

    def __init__(self, dim: int = 64, hidden: int | None = None, epochs: int = 20, batch_size: int = 512,
                 lr: float = 1e-3, var_weight: float = 1.0, cov_weight: float = 0.04, seed: int = 0,
                 ridge_init: bool = True) -> None:
        super().__init__()
        self.r, self.hidden, self.epochs, self.batch_size, self.lr = dim, hidden, epochs, batch_size, lr
        self.var_weight, self.cov_weight, self.seed, self.ridge_init = var_weight, cov_weight, seed, ridge_init
        self.module: LearnedReferenceModule | None = None
        self.logger = None  # set by the pipeline to log the loss curve

    def fit(self, states: dict[str, Tensor]) -> "Learned":
        n = _check_aligned(states)
        hooks = sorted(states)
        z = {h: x.float() for h, x in self._standardize_fit(states).items()}
        d = z[hooks[0]].shape[1]
        r = min(self.r, d)
        init = None
        if self.ridge_init and not self.hidden:
            ridge = Ridge(dim=r).fit(states)
            init = {h: ridge.W[h] for h in hooks}
            r = ridge.dim
        L.seed_everything(self.seed, workers=False, verbose=False)
        self.module = LearnedReferenceModule(hooks, d, r, self.hidden, self.lr, self.var_weight, self.cov_weight, init)
        ds = torch.utils.data.TensorDataset(*[z[h] for h in hooks])
        loader = torch.utils.data.DataLoader(ds, batch_size=min(self.batch_size, n), shuffle=True,
                                             generator=torch.Generator().manual_seed(self.seed))
        trainer = L.Trainer(
            max_epochs=self.epochs, accelerator="auto", devices=1, logger=self.logger or False,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
            log_every_n_steps=1,
        )
        trainer.fit(self.module, loader)
        self.module.eval().cpu()
        self.dim = r
        return self

    @property
    def loss_history(self) -> list[float]:
        return [] if self.module is None else list(self.module.history)

    def transform(self, hook: str, x: Tensor) -> Tensor:
        if self.module is None:
            raise RuntimeError("learned reference space is not fitted")
        with torch.no_grad():
            return self.module.maps(hook, self.standardize(hook, x).float()).to(x.dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = super().tensors()
        if self.module is not None:
            out.update({f"maps/{k}": v for k, v in self.module.maps.state_dict().items()})
        return out


def project_samples(space: ReferenceSpace, samples, chunk: int = 1024):
    """A :class:`~saeot.types.FeatureSamples` with its points mapped into the reference space."""
    pts = samples.points
    out = torch.cat([space.transform(samples.hook, pts[i:i + chunk]) for i in range(0, len(pts), chunk)]) \
        if len(pts) else pts.new_zeros(0, pts.shape[1], space.dim or pts.shape[2])
    return samples.with_points(out.float())
