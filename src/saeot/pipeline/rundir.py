"""Reading a finished ``train.py`` run back from its directory (``evaluate.py run_dir=...``).

    .hydra/config.yaml           the run's config: model, data, layers, matcher, ...
    matches.csv                  one row per feature of A and layer pair (read_matches)
    saes.json                    hook -> JSON record of where its SAE came from
    features/<hook>.safetensors  each feature's K weighted samples (FeatureSamples)
    reference.safetensors        the fitted reference-space maps
    metrics.json                 the matcher's name (and what evaluations add)

Nothing is trained or refit here: the SAEs are loaded from their records
(:func:`saeot.saes.load_recorded`, which never trains) and the model is built from the
run's ``model`` config (loading weights, as ``train.py`` did). A run without
``saes.json`` (made before it was written) cannot be evaluated: rerun ``train.py``.

What a matcher reads is rebuilt from the directory too (:meth:`RunDir.match_context`, for
``rematch.py`` and the evaluations): the feature samples projected by the fitted reference
space (:meth:`RunDir.projected_samples`), activation correlations streamed again over the
held-out split (:meth:`RunDir.correlations`), on the device the run matched on
(:attr:`RunDir.device`, from its ``trainer.accelerator``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import Tensor

from saeot.hooks import hook_layer
from saeot.io import CorruptFileError, read_json
from saeot.matching.base import Matcher, MatchContext
from saeot.pipeline.artifacts import read_matches
from saeot.pipeline.completion import RUN_FORMAT, RUN_MARKER, read_marker
from saeot.pipeline.config import build, match_device, run_hooks
from saeot.profiling.statistics import CorrelationAccumulator
from saeot.reference import project_samples
from saeot.saes import load_recorded
from saeot.saes.codes import encode
from saeot.types import FeatureSamples

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.data.types import DataModule
    from saeot.models.language_model import LanguageModel
    from saeot.reference.base import ReferenceSpace

__all__ = ["RunDir", "read_feature_tensors"]


def read_feature_tensors(path: str | Path, names: Sequence[str]) -> dict[str, Tensor]:
    """Only the tensors ``names`` of a ``features/<hook>.safetensors`` file (e.g. ``n_fire [F]``,
    ``locations [F, K, 2]``), without reading the ``[F, K, d]`` points.
    :class:`~saeot.io.CorruptFileError` naming the file if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in names}
    except Exception as e:  # safetensors raises several exception types on bad files
        raise CorruptFileError(f"cannot read {path} ({e}); rerun train.py for this run") from e


def _check_safetensors(path: Path) -> None:
    """Open ``path`` (header and size only); :class:`~saeot.io.CorruptFileError` naming it if it is
    missing, truncated or not safetensors."""
    if not path.is_file():
        raise CorruptFileError(f"run_dir: {path} is missing: rerun train.py for this run")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # safetensors raises several exception types on bad files
        raise CorruptFileError(f"run_dir: cannot read {path} ({e}); rerun train.py for this run") from e


@dataclass(frozen=True)
class RunDir:
    """A finished ``train.py`` run as its directory holds it.

    Attributes:
        path: the run directory.
        cfg: its ``.hydra/config.yaml``.
        matcher: the matcher's name (``metrics.json["matching"]["matcher"]``, else the
            class name of ``cfg.matcher._target_``).
        rows: ``matches.csv`` as dicts of strings (:func:`saeot.pipeline.artifacts.read_matches`).
        sae_records: ``saes.json``, hook -> record for :func:`saeot.saes.load_recorded`.
        label: the run's name in a comparison table (default: ``matcher``; see :meth:`relabel`).
    """

    path: Path
    cfg: DictConfig
    matcher: str
    rows: list[dict]
    sae_records: dict[str, dict]
    label: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "RunDir":
        """Read the run's config, matches and SAE records; FileNotFoundError naming what is missing."""
        path = Path(path)
        cfg_file = path / ".hydra" / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"run_dir={path} has no .hydra/config.yaml: point it at a finished train.py run")
        if not (path / "matches.csv").is_file():
            raise FileNotFoundError(f"run_dir={path} has no matches.csv: point it at a finished train.py run")
        saes_file = path / "saes.json"
        if not saes_file.is_file():
            raise FileNotFoundError(f"{saes_file} is missing (a run made before train.py recorded its SAEs): rerun "
                                    "train.py for this run; evaluation loads the recorded SAEs and never retrains them")
        marker = read_marker(path)
        if marker is None:
            raise FileNotFoundError(f"run_dir={path} is incomplete (no {RUN_MARKER}: train.py was killed or is still "
                                    "running, or an older saeot made it): rerun train.py for this run")
        if marker.get("format") != RUN_FORMAT:
            raise CorruptFileError(f"run_dir={path} was written in run-dir format {marker.get('format')!r}, this saeot "
                                   f"reads format {RUN_FORMAT}: rerun train.py for this run")
        cfg = OmegaConf.load(cfg_file)
        matcher = None
        if (path / "metrics.json").is_file():
            matcher = read_json(path / "metrics.json").get("matching", {}).get("matcher")
        if not matcher:
            matcher = str(cfg.matcher.get("_target_", "matcher")).rsplit(".", 1)[-1]
        records = read_json(saes_file)
        run = cls(path=path, cfg=cfg, matcher=matcher, rows=read_matches(path / "matches.csv"), sae_records=records,
                  label=matcher)
        missing = [h for h in run.hooks if h not in records]
        if missing:
            raise CorruptFileError(f"{saes_file} has no record for {missing}; rerun train.py for this run")
        for f in [run.features_path(h) for h in run.hooks] + [path / "reference.safetensors"]:
            _check_safetensors(f)  # a truncated or corrupt file is named now, before any model is loaded
        return run

    def relabel(self, label: str) -> "RunDir":
        """The same run under another table label."""
        return dataclasses.replace(self, label=label)

    def _hooks_and_pairs(self) -> tuple[list[str], list[tuple[str, str]]]:
        n_layers = 1 + max((hook_layer(h) for h in self.sae_records), default=0)  # for layers.ids=all
        return run_hooks(self.cfg, n_layers)

    @property
    def hooks(self) -> tuple[str, ...]:
        """The run's SAE hooks, sorted by layer (``layers.ids`` at ``layers.site``)."""
        return tuple(self._hooks_and_pairs()[0])

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The run's layer pairs (hook A, hook B), as ``train.py`` matched them (``layers.pairs``)."""
        return tuple((a, b) for a, b in self._hooks_and_pairs()[1])

    @property
    def site(self) -> str:
        return str(self.cfg.layers.site)

    @property
    def device(self) -> torch.device:
        """Where the run's matcher computed, and a rematch of it computes
        (:func:`saeot.pipeline.config.match_device` of its ``trainer``)."""
        return match_device(self.cfg)

    def setup_key(self) -> str:
        """Runs with equal keys share model, data, SAEs and layers: one streaming pass serves them all."""
        parts = {k: OmegaConf.to_container(self.cfg[k], resolve=False) if isinstance(self.cfg.get(k), DictConfig)
                 else self.cfg.get(k) for k in ("model", "sae", "data", "layers", "seed")}
        parts["saes.json"] = self.sae_records
        return json.dumps(parts, sort_keys=True, default=str)

    # ---------------------------------------------------------------- what the run used
    def load_model(self) -> Any:
        """The run's language model, built from its ``model`` config."""
        return build(self.cfg.model)

    def load_saes(self, device: torch.device | str = "cpu") -> dict[str, SAE]:
        """hook -> the run's SAE, frozen, loaded from ``saes.json`` (never trained)."""
        saes = {}
        for h in self.hooks:
            sae = load_recorded(self.sae_records[h], device)
            sae.eval()
            sae.requires_grad_(False)
            saes[h] = sae
        return saes

    def data_module(self, lm: LanguageModel, **overrides: Any) -> Any:
        """A data module built from the run's ``data`` config (``overrides``, e.g.
        ``fresh_contexts``, passed to it), set up: its splits fixed."""
        dm = build(self.cfg.data, partial=True)(lm=lm, hooks=list(self.hooks), **overrides)
        dm.setup()
        return dm

    # ---------------------------------------------------------------- what the run wrote
    def features_path(self, hook: str) -> Path:
        return self.path / "features" / f"{hook}.safetensors"

    def samples(self, hook: str) -> FeatureSamples:
        """The feature samples of ``hook`` as profiled by the run."""
        return FeatureSamples.load(self.features_path(hook))

    def alive(self) -> dict[str, Tensor]:
        """hook -> ``[F]`` bool, features that fired during the run's profiling (hooks without a file left out)."""
        out = {}
        for h in self.hooks:
            f = self.features_path(h)
            if f.is_file():
                out[h] = read_feature_tensors(f, ("n_fire",))["n_fire"] > 0
        return out

    def reference(self) -> ReferenceSpace:
        """The run's fitted reference space (``reference.safetensors``), not refit."""
        return build(self.cfg.reference).load(self.path / "reference.safetensors")

    def projected_samples(self, hooks: Sequence[str] | None = None,
                          space: ReferenceSpace | None = None) -> dict[str, FeatureSamples]:
        """hook -> the run's feature samples of ``hooks`` (default: all) projected by its fitted
        reference space (``space``: the one :meth:`reference` loads, when it is already loaded)."""
        space = self.reference() if space is None else space
        return {h: project_samples(space, self.samples(h)) for h in (self.hooks if hooks is None else hooks)}

    @torch.no_grad()
    def correlations(self, saes: dict[str, SAE], datamodule: DataModule, pairs: Sequence[tuple[str, str]],
                     progress: bool = False) -> dict[tuple[str, str], CorrelationAccumulator]:
        """Activation correlations of every pair over the run's held-out split (as the run computed
        them), on the device of ``saes``."""
        device = next(iter(saes.values())).W_dec.device
        hooks = sorted({h for p in pairs for h in p})
        acc = {(a, b): CorrelationAccumulator(saes[a].cfg.d_sae, saes[b].cfg.d_sae) for a, b in pairs}
        for batch in datamodule.iter_batches("heldout", device=device, progress=progress,
                                             desc="activation correlations (held-out split)", hooks=hooks):
            m = batch["mask"]
            codes = {h: encode(saes[h], batch["hidden"][h][m]).cpu() for h in hooks}
            for (a, b), c in acc.items():
                c.update(codes[a], codes[b])
        return acc

    def match_context(self, matcher: Matcher, saes: dict[str, SAE], datamodule: DataModule | None = None,
                      pairs: Sequence[tuple[str, str]] | None = None, progress: bool = False) -> MatchContext:
        """What ``matcher`` reads for ``pairs`` (default: the run's), rebuilt from the directory: the
        SAEs ``saes``, the projected feature samples (if it reads samples), the correlations over
        the held-out split of ``datamodule`` (if it reads correlations); on :attr:`device`."""
        pairs = self.pairs if pairs is None else pairs
        samples = correlations = space = None
        hooks = sorted({h for p in pairs for h in p})
        if "samples" in matcher.requires:
            space = self.reference()
            samples = self.projected_samples(hooks, space)
        if "correlations" in matcher.requires:
            correlations = self.correlations(saes, datamodule, pairs, progress)
        return MatchContext(saes=saes, samples=samples, correlations=correlations, device=self.device,
                            reference=space)
