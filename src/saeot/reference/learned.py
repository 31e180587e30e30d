"""Learned: per-layer linear (or small MLP) maps trained with Lightning.

Loss: the alignment between the images of the same token at every pair of layers,
plus a VICReg-style variance hinge and decorrelation term against collapse; the
linear maps start at the ridge solution.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch import Tensor, nn

from saeot.progress import trainer_progress_callbacks
from saeot.reference.base import ReferenceSpace, check_aligned
from saeot.reference.ridge import Ridge

__all__ = ["Learned", "LearnedReferenceModule"]


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
        n = check_aligned(states)
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
            log_every_n_steps=1, callbacks=trainer_progress_callbacks(None),
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

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Rebuild the trained maps from :meth:`tensors` (widths read off the weights:
        ``maps.<hook>.weight [r, d]`` for linear maps, ``.0.weight [hidden, d]`` and
        ``.2.weight [r, hidden]`` for MLPs)."""
        super().load_tensors({k: v for k, v in tensors.items() if not k.startswith("maps/")})
        state = {k.removeprefix("maps/"): v for k, v in tensors.items() if k.startswith("maps/")}
        if not state:
            self.module = None
            return
        hooks = sorted(self.mean)
        d = int(self.mean[hooks[0]].numel())
        key = hooks[0].replace(".", "_")
        if f"maps.{key}.0.weight" in state:
            hidden, r = int(state[f"maps.{key}.0.weight"].shape[0]), int(state[f"maps.{key}.2.weight"].shape[0])
        else:
            hidden, r = None, int(state[f"maps.{key}.weight"].shape[0])
        self.hidden = hidden
        self.module = LearnedReferenceModule(hooks, d, r, hidden, self.lr, self.var_weight, self.cov_weight, None)
        self.module.maps.load_state_dict(state)
        self.module.eval()
