"""SAE providers: every provider returns sae_lens ``SAE`` objects keyed by hook name.

* :class:`PretrainedSAEs` -- ``SAE.from_pretrained(release, sae_id)`` (online);
* :class:`DiskSAEs` -- sae_lens' on-disk format (``cfg.json`` + safetensors);
* :class:`LocalTrainedSAEs` -- trains TopK / JumpReLU / standard SAEs with sae_lens'
  training SAE classes (:mod:`saeot.saes.training`) on hidden states streamed from
  the data module, and caches them on disk under a key made of everything that
  determines them; a cached SAE is reused without retraining.

Providers are built by Hydra from ``conf/sae/*.yaml``; ``load`` is called with the
language model, the hooks and the data module; ``describe`` (after ``load``) gives
each hook's record of where its SAE came from (:mod:`saeot.saes.records`), from
which :func:`saeot.saes.load_recorded` loads it again without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from saeot.hooks import hook_layer
from saeot.hub import require_hub
from saeot.io import CorruptFileError, build_dir_atomically, default_cache_dir, is_complete_dir
from saeot.progress import progress_bar
from saeot.saes.records import disk_record, pretrained_record
from saeot.saes.training import ARCHITECTURES, SAETrainingConfig, train_sae
from saeot.settings import check_types, from_settings

if TYPE_CHECKING:
    from sae_lens import TrainingSAE

    from saeot.data.types import DataModule
    from saeot.models.language_model import LanguageModel

log = logging.getLogger(__name__)

__all__ = ["SAEProvider", "PretrainedSAEs", "DiskSAEs", "LocalTrainedSAEs", "LocalSAESettings"]



class SAEProvider(ABC):
    """Gives one SAE per hook."""

    def validate(self, hooks: list[str]) -> None:
        """Check the configuration without loading anything (called before long work)."""

    @abstractmethod
    def load(self, lm: LanguageModel, hooks: list[str], datamodule: DataModule | None = None) -> dict[str, SAE]:
        """hook name -> SAE for every hook in ``hooks``."""

    @abstractmethod
    def describe(self, hooks: list[str]) -> dict[str, dict[str, Any]]:
        """hook name -> JSON-able record of where its SAE came from (call after :meth:`load`).

        :func:`saeot.saes.load_recorded` loads the SAE back from its record without training.
        """


def _format(template: str, hook: str) -> str:
    return template.format(layer=hook_layer(hook), hook=hook)


class PretrainedSAEs(SAEProvider):
    """Pretrained SAEs from the sae_lens registry.

    Args:
        release: sae_lens release name (e.g. ``gpt2-small-res-jb``, ``gemma-scope-2b-pt-res-canonical``).
        sae_id: id template, formatted with ``layer`` and ``hook`` (e.g. ``blocks.{layer}.hook_resid_pre``
            or ``layer_{layer}/width_16k/canonical``).
        device, dtype: where and how to load.
    """

    def __init__(self, release: str, sae_id: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.release, self.sae_id, self.device, self.dtype = release, sae_id, device, dtype

    def validate(self, hooks: list[str]) -> None:
        directory = get_pretrained_saes_directory()
        if self.release not in directory:
            raise ValueError(f"sae.release={self.release!r} is not a sae_lens release (see sae_lens pretrained_saes.yaml)")
        known = directory[self.release].saes_map
        for hook in hooks:
            sid = _format(self.sae_id, hook)
            if sid not in known:
                raise ValueError(
                    f"sae.sae_id={sid!r} (for {hook}) is not in release {self.release!r}; "
                    f"e.g. {sorted(known)[:3]}"
                )
        require_hub(directory[self.release].repo_id, f"sae.release={self.release!r}")

    def load(self, lm: LanguageModel, hooks: list[str], datamodule: DataModule | None = None) -> dict[str, SAE]:
        self.validate(hooks)
        return {
            h: SAE.from_pretrained(self.release, _format(self.sae_id, h), device=self.device, dtype=self.dtype)
            for h in hooks
        }

    def describe(self, hooks: list[str]) -> dict[str, dict[str, Any]]:
        return {h: pretrained_record(self.release, _format(self.sae_id, h), self.dtype) for h in hooks}


class DiskSAEs(SAEProvider):
    """SAEs saved in sae_lens' format (``SAE.save_model`` / ``save_inference_model``).

    Args:
        path: directory template formatted with ``layer`` and ``hook``
            (e.g. ``/saes/layer_{layer}``), or a mapping hook -> directory.
    """

    def __init__(self, path: str | dict[str, str], device: str = "cpu", dtype: str | None = None) -> None:
        self.path, self.device, self.dtype = path, device, dtype

    def _dir(self, hook: str) -> Path:
        if isinstance(self.path, str):
            return Path(_format(self.path, hook)).expanduser()
        if hook not in self.path:
            raise ValueError(f"sae.path has no entry for {hook}")
        return Path(self.path[hook]).expanduser()

    def validate(self, hooks: list[str]) -> None:
        for h in hooks:
            d = self._dir(h)
            if not (d / "cfg.json").is_file():
                raise ValueError(f"sae.path: {d} (for {h}) has no cfg.json; expected an SAE saved with sae_lens")

    def load(self, lm: LanguageModel, hooks: list[str], datamodule: DataModule | None = None) -> dict[str, SAE]:
        self.validate(hooks)
        out = {}
        for h in hooks:
            try:
                out[h] = SAE.load_from_disk(self._dir(h), device=self.device, dtype=self.dtype)
            except Exception as e:
                raise ValueError(f"sae.path: cannot load the SAE in {self._dir(h)} ({e})") from e
        return out

    def describe(self, hooks: list[str]) -> dict[str, dict[str, Any]]:
        return {h: disk_record(self._dir(h), self.dtype) for h in hooks}


#: where the local training settings live in the run's config (``sae=train_local``)
PREFIX = "sae"


@dataclass(frozen=True)
class LocalSAESettings:
    """The settings of :class:`LocalTrainedSAEs` (the keys of ``conf/sae/train_local.yaml``),
    checked when built: a wrong value or an unknown key is a ValueError naming ``sae.<key>``.

    Attributes:
        architecture: ``topk``, ``jumprelu`` or ``standard``.
        d_sae: number of features (or ``expansion`` x d_model when None).
        expansion: features per hidden dimension when ``d_sae`` is None.
        k: TopK's k.
        l1_coefficient / l0_coefficient: sparsity penalties of standard / JumpReLU.
        jumprelu_init_threshold: JumpReLU: where the thresholds start.
        target_l0: JumpReLU: train towards this L0 (quadratic loss) instead of penalising L0.
        lr, steps, batch_size, train_tokens, seed: training settings.
        cache_dir: cache root (default ``$SAEOT_CACHE`` or ``~/.cache/saeot``).
        device: where to train and load.
        progress: progress bars.
    """

    architecture: str = SAETrainingConfig.architecture
    d_sae: int | None = None
    expansion: int = 4
    k: int = SAETrainingConfig.k
    l1_coefficient: float = SAETrainingConfig.l1_coefficient
    l0_coefficient: float = SAETrainingConfig.l0_coefficient
    jumprelu_init_threshold: float = SAETrainingConfig.jumprelu_init_threshold
    target_l0: float | None = SAETrainingConfig.target_l0
    lr: float = SAETrainingConfig.lr
    steps: int = SAETrainingConfig.steps
    batch_size: int = SAETrainingConfig.batch_size
    train_tokens: int = 16384
    seed: int = 0
    cache_dir: str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", str(self.cache_dir))
        if self.architecture not in ARCHITECTURES:  # first: the message names the choices
            raise ValueError(f"sae.architecture={self.architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        check_types(self, PREFIX)
        for name in ("expansion", "k", "steps", "batch_size", "train_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"sae.{name}={getattr(self, name)} must be >= 1")
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"sae.d_sae={self.d_sae} must be >= 1 (or null: expansion x d_model)")
        if not self.lr > 0:
            raise ValueError(f"sae.lr={self.lr} must be > 0")
        for name in ("l1_coefficient", "l0_coefficient", "jumprelu_init_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"sae.{name}={getattr(self, name)} must be >= 0")
        if self.target_l0 is not None and not self.target_l0 > 0:  # the upper bound, d_sae, once d_model is known
            raise ValueError(f"sae.target_l0={self.target_l0}: expected a number > 0 (and <= d_sae) or null")
        if self.target_l0 is not None and self.d_sae is not None and self.target_l0 > self.d_sae:
            raise ValueError(f"sae.target_l0={self.target_l0}: expected a number in (0, d_sae={self.d_sae}] or null")


#: the settings of :class:`LocalSAESettings` handed unchanged to :class:`~saeot.saes.training.SAETrainingConfig`
#: (its defaults are the training config's; ``d_sae`` follows from ``expansion``, ``dead_window`` and
#: ``normalize_inputs`` are not settings of a run)
TRAINING_FIELDS = ("architecture", "k", "l1_coefficient", "l0_coefficient", "jumprelu_init_threshold", "target_l0",
                   "lr", "steps", "batch_size", "device", "progress")


class LocalTrainedSAEs(SAEProvider):
    """Train one SAE per hook with sae_lens on streamed hidden states, cached on disk.

    One pass of the model over the ``profile`` split fills a buffer of at most
    ``train_tokens`` hidden states per hook (all hooks at once; from an activation
    store, :mod:`saeot.data.activation_store`, one hook at a time); each SAE is then
    trained for ``steps`` Adam steps of ``batch_size`` tokens on that buffer, its
    inputs scaled so that their mean norm is ``sqrt(d)`` and the scale folded back
    into the weights afterwards (the saved SAE reads raw hidden states).

    The cache key hashes the model, hook, token stream and every training setting;
    a finished SAE sits in ``cache_dir/saes/<key>/`` next to a completion marker,
    written to a temporary directory first and renamed, so an interrupted training
    is never reused.

    Built from its settings, ``LocalTrainedSAEs(d_sae=64, k=4)`` (what Hydra's
    ``conf/sae/train_local.yaml`` does: the fields of :class:`LocalSAESettings`), or from
    ready settings, ``LocalTrainedSAEs(LocalSAESettings(...))``; they live in ``self.settings``.
    """

    settings_class: ClassVar[type[LocalSAESettings]] = LocalSAESettings

    def __init__(self, settings: LocalSAESettings | None = None, **kwargs: Any) -> None:
        if settings is None:
            settings = from_settings(LocalSAESettings, kwargs, PREFIX, "sae=train_local")
        elif kwargs:
            raise TypeError("LocalTrainedSAEs: pass either a LocalSAESettings or settings, not both")
        if not isinstance(settings, LocalSAESettings):
            raise TypeError(f"LocalTrainedSAEs needs a LocalSAESettings, got {type(settings).__name__}")
        self.settings = settings
        self.n_trained = 0  # SAEs trained (not taken from the cache) by the last load()
        self._paths: dict[str, Path] = {}  # hook -> cache entry, set by load()

    def training_config(self, d_model: int) -> SAETrainingConfig:
        """The settings of :func:`saeot.saes.training.train_sae` for hidden states of width ``d_model``."""
        s = self.settings
        return SAETrainingConfig(**{name: getattr(s, name) for name in TRAINING_FIELDS},
                                 d_sae=s.d_sae or s.expansion * d_model, normalize_inputs=True)

    # ------------------------------------------------------------------ cache
    def _root(self) -> Path:
        if self.settings.cache_dir:
            return Path(self.settings.cache_dir).expanduser()
        return default_cache_dir()

    def key_settings(self, d_model: int) -> dict[str, Any]:
        """The training settings the cache key hashes (for hidden states of width ``d_model``)."""
        s, tcfg = self.settings, self.training_config(d_model)
        return {
            "architecture": s.architecture, "d_sae": tcfg.d_sae, "lr": s.lr, "steps": s.steps,
            "batch_size": s.batch_size, "train_tokens": s.train_tokens, "seed": s.seed,
            **tcfg.architecture_options(),
        }

    def cache_key(self, lm: LanguageModel, hook: str, data_fingerprint: str) -> str:
        model_id = {"name": lm.name, "cfg": {k: str(v) for k, v in sorted(lm.model.cfg.to_dict().items())
                                             if k in ("n_layers", "d_model", "d_vocab", "n_heads", "d_mlp", "seed")}}
        blob = json.dumps({"model": model_id, "hook": hook, "data": data_fingerprint,
                           "settings": self.key_settings(lm.model.cfg.d_model), "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def cache_path(self, lm: LanguageModel, hook: str, data_fingerprint: str) -> Path:
        return self._root() / "saes" / f"{hook}-{self.cache_key(lm, hook, data_fingerprint)}"

    # ------------------------------------------------------------------ load / train
    def load(self, lm: LanguageModel, hooks: list[str], datamodule: DataModule | None = None) -> dict[str, SAE]:
        if datamodule is None:
            raise ValueError("sae=train_local needs the data module to stream hidden states")
        fp = datamodule.fingerprint()
        paths = {h: self.cache_path(lm, h, fp) for h in hooks}
        sources = {h: {"sae": paths[h].name} for h in hooks}
        missing = [h for h in hooks if not is_complete_dir(paths[h], sources[h])]
        self.n_trained = 0
        # from an activation store, one hook's pool at a time (memory); live, one forward pass for all
        stored = callable(getattr(datamodule, "stores_hidden", None)) and datamodule.stores_hidden("profile", missing)
        for group in ([[h] for h in missing] if stored else [missing] if missing else []):
            t0 = time.perf_counter()
            buffers = self.collect(datamodule, group)
            collect_minutes = (time.perf_counter() - t0) / 60 / len(group)
            for h in group:
                t1 = time.perf_counter()
                acts = buffers.pop(h)
                sae = self.train_one(acts, h)
                record = {"n_train_tokens": int(acts.shape[0]), "minutes": (time.perf_counter() - t1) / 60,
                          "minutes_collect": collect_minutes, "from_activation_store": bool(stored)}
                del acts
                build_dir_atomically(paths[h], sources[h], lambda tmp: _save_trained(sae, tmp, record))
                self.n_trained += 1
                log.info("trained SAE for %s in %.1f min -> %s", h, record["minutes"], paths[h])
        out = {}
        for h in hooks:
            try:
                out[h] = SAE.load_from_disk(paths[h], device=self.settings.device)
            except Exception as e:
                raise CorruptFileError(f"paths.cache_dir: the cached SAE {paths[h]} is corrupt ({e}); "
                                       "delete that directory and rerun") from e
        self._paths.update(paths)
        return out

    def describe(self, hooks: list[str]) -> dict[str, dict[str, Any]]:
        """hook -> ``{"kind": "disk", "path": <its cache entry>}`` (the cache entries :meth:`load` used)."""
        missing = [h for h in hooks if h not in self._paths]
        if missing:
            raise RuntimeError(f"LocalTrainedSAEs.describe({missing}) before load(): the cache entries are not known")
        return {h: disk_record(self._paths[h]) for h in hooks}

    def collect(self, datamodule: DataModule, hooks: list[str]) -> dict[str, torch.Tensor]:
        """Up to ``train_tokens`` hidden states per hook from the profile split, ``[N, d]`` fp32,
        written into one buffer per hook allocated up front (peak memory: the pool, not the
        pool plus its batches, as gathering and concatenating took)."""
        s = self.settings
        bufs: dict[str, torch.Tensor] = {}
        n = 0
        with progress_bar(total=s.train_tokens, desc="collect SAE training tokens", enabled=s.progress, leave=False) as bar:
            for batch in datamodule.iter_batches("profile", device=s.device, hooks=hooks):
                mask = batch["mask"]
                take = min(int(mask.sum()), s.train_tokens - n)
                for h in hooks:
                    x = batch["hidden"][h][mask][:take]
                    if h not in bufs:
                        bufs[h] = torch.empty(s.train_tokens, x.shape[-1], dtype=torch.float32)
                    bufs[h][n:n + take].copy_(x)
                n += take
                bar.update(take)
                if n >= s.train_tokens:
                    break
        if n == 0:
            raise ValueError(f"sae.train_tokens={s.train_tokens}: the profile split gave no token to train the SAEs "
                             f"of {hooks} on (data.max_contexts, data.heldout_fraction)")
        return {h: b if n == b.shape[0] else b[:n].clone() for h, b in bufs.items()}

    def train_one(self, acts: torch.Tensor, hook: str) -> TrainingSAE:
        """Train a fresh training SAE on ``acts [N, d]``; returns it with the input scale folded in."""
        return train_sae(acts, self.training_config(acts.shape[1]), seed=self.settings.seed, name=hook)


TRAINING_RECORD = "training.json"
"""Written next to a trained SAE: ``n_train_tokens``, ``minutes`` (training), ``minutes_collect``."""


def _save_trained(sae: TrainingSAE, directory: Path, record: dict[str, Any]) -> None:
    sae.save_inference_model(directory)
    (Path(directory) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
