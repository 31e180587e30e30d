"""Reading the run's settings: layers, layer pairs, objects built from ``_target_`` nodes.

Every check here runs before the model is loaded or any forward pass happens, and
fails with a :class:`ConfigError` whose message names the setting to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from saeot.hooks import hook_name, sae_key
from saeot.profiling.samplers import check_profiling
from saeot.settings import check_types, from_settings

#: the tag of the second SAE at a hook (``sae_b``): its SAE key is ``{hook}@b``
SAE_B_TAG = "b"

__all__ = ["ConfigError", "ALL_LAYERS", "LayerSettings", "ProfilingSettings", "layer_settings", "profiling_settings",
           "build", "wants_all_layers", "layer_ids", "layer_pairs", "check_layers", "run_hooks", "check_trainer",
           "match_device"]


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


def build(node: Any, *, partial: bool = False, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the error of the target itself (Hydra wraps
    it in an InstantiationException, hiding the one line that names the setting)."""
    try:
        if partial:
            return instantiate(node, _partial_=True)
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


#: ``layers.ids=all``: every layer of the model
ALL_LAYERS = "all"
#: ``layers.pairs`` by name
PAIR_MODES = ("adjacent", "all_to_first", "all_to_last")


@dataclass(frozen=True)
class LayerSettings:
    """The ``layers`` settings, checked when built (:func:`layer_settings`): a wrong one is a
    :class:`ConfigError` naming it.

    Attributes:
        ids: the SAE layers, sorted (no repeats, not empty), or ``"all"`` (every layer of the
            model, known once it is loaded).
        site: hook site, ``blocks.{id}.hook_{site}``.
        pairs: ``adjacent``, ``all_to_first``, ``all_to_last``, or layer pairs ``((a, b), ...)``.
    """

    ids: tuple[int, ...] | str = (3, 4)
    site: str = "resid_post"
    pairs: tuple[tuple[int, int], ...] | str = "adjacent"

    def __post_init__(self) -> None:
        spec = self.ids
        if isinstance(spec, str):
            if spec != ALL_LAYERS:
                raise ConfigError(f"layers.ids={spec!r}; use a list of layer numbers, e.g. [3,4], or all")
        else:
            try:
                ids = [int(i) for i in spec]
            except (TypeError, ValueError):
                raise ConfigError(f"layers.ids={spec}; use a list of layer numbers, e.g. [3,4], or all") from None
            if not ids:
                raise ConfigError("layers.ids is empty")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"layers.ids={ids} has repeats")
            object.__setattr__(self, "ids", tuple(sorted(ids)))
        pairs = self.pairs
        if isinstance(pairs, str):
            if pairs not in PAIR_MODES:
                raise ConfigError(f"layers.pairs={pairs!r}; use adjacent, all_to_first, all_to_last or a list of [a, b]")
        else:
            try:
                object.__setattr__(self, "pairs", tuple((int(a), int(b)) for a, b in pairs))
            except (TypeError, ValueError):
                raise ConfigError(f"layers.pairs={pairs}; use adjacent, all_to_first, all_to_last "
                                  "or a list of [a, b]") from None
        check_types(self, "layers")

    @property
    def all_layers(self) -> bool:
        """``layers.ids=all``: the layers are known only once the model is loaded."""
        return isinstance(self.ids, str)

    def layer_ids(self, n_layers: int | None = None) -> list[int]:
        """The layer ids, sorted; ``layers.ids=all`` is ``0..n_layers-1`` (``n_layers``: the
        model's layer count, needed then)."""
        if not self.all_layers:
            return list(self.ids)
        if n_layers is None:
            raise ConfigError("layers.ids=all: the model's layer count is not known here")
        return list(range(int(n_layers)))

    def layer_pairs(self, ids: list[int]) -> list[tuple[int, int]]:
        """The (A, B) layer pairs among ``ids``."""
        spec = self.pairs
        if isinstance(spec, str):
            if spec == "adjacent":
                pairs = list(zip(ids[:-1], ids[1:]))
            elif spec == "all_to_first":
                pairs = [(ids[0], b) for b in ids[1:]]
            else:
                pairs = [(a, ids[-1]) for a in ids[:-1]]
        else:
            pairs = list(spec)
            for a, b in pairs:
                if a not in ids or b not in ids:
                    raise ConfigError(f"layers.pairs has ({a}, {b}) but layers.ids={ids}")
        if not pairs:
            what = f"layers.ids=all ({len(ids)} layer(s) in this model)" if self.all_layers else f"layers.ids={ids}"
            shown = spec if isinstance(spec, str) else [list(p) for p in spec]
            raise ConfigError(f"layers.pairs={shown!r} gives no pair for {what}: configure at least two layers")
        return pairs


@dataclass(frozen=True)
class ProfilingSettings:
    """The ``profiling`` settings, checked when built (:func:`profiling_settings`).

    Attributes:
        k: samples kept per feature (a whole number >= 1).
        sampling: one of :data:`saeot.profiling.MODES` (``topk``, ``reservoir``, ``coupled``).
        reference_tokens: held-out tokens (the same at every layer) the reference space is fitted on.
    """

    k: int = 32
    sampling: str = "topk"
    reference_tokens: int = 8192

    def __post_init__(self) -> None:
        check_profiling(self.k, self.sampling, self.reference_tokens)


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def layer_settings(cfg: DictConfig) -> LayerSettings:
    """``cfg.layers`` as :class:`LayerSettings`, checked."""
    return from_settings(LayerSettings, _plain(cfg.layers), "layers", "layers")


def profiling_settings(cfg: DictConfig) -> ProfilingSettings:
    """``cfg.profiling`` as :class:`ProfilingSettings`, checked."""
    return from_settings(ProfilingSettings, _plain(cfg.profiling), "profiling", "profiling")


def wants_all_layers(cfg: DictConfig) -> bool:
    """``layers.ids=all``: the layers are known only once the model is loaded."""
    return layer_settings(cfg).all_layers


def layer_ids(cfg: DictConfig, n_layers: int | None = None) -> list[int]:
    """``layers.ids``, sorted; no repeats, not empty. ``layers.ids=all`` is ``0..n_layers-1``
    (``n_layers``: the model's layer count, needed then)."""
    return layer_settings(cfg).layer_ids(n_layers)


def layer_pairs(cfg: DictConfig, ids: list[int]) -> list[tuple[int, int]]:
    """``layers.pairs``: ``adjacent``, ``all_to_first``, ``all_to_last``, or a list of [a, b]."""
    return layer_settings(cfg).layer_pairs(ids)


def check_layers(ids: list[int], n_layers: int) -> None:
    """Every id in ``0..n_layers-1``."""
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers.ids={ids}: {bad} out of range for a model with {n_layers} layers (0..{n_layers - 1})")


def run_hooks(cfg: DictConfig, n_layers: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The run's hook names (sorted by layer) and its (A, B) hook pairs, from ``layers``
    (``n_layers``: the model's layer count, for ``layers.ids=all``). With ``sae_b`` set, the
    hooks are followed by their second SAEs' keys (``{hook}@b``) and the pairs are
    ``(hook, hook@b)`` and ``(hook@b, hook)`` at every layer."""
    ids = layer_ids(cfg, n_layers)
    site = cfg.layers.site
    if cfg.get("sae_b") is not None:  # two SAEs at each hook, matched both ways (layers.pairs does not apply)
        hooks = [hook_name(i, site) for i in ids]
        tagged = [sae_key(h, SAE_B_TAG) for h in hooks]
        return hooks + tagged, [p for h, t in zip(hooks, tagged) for p in ((h, t), (t, h))]
    pairs = layer_pairs(cfg, ids)
    return [hook_name(i, site) for i in ids], [(hook_name(a, site), hook_name(b, site)) for a, b in pairs]


def _whole(value: Any) -> int | None:
    """``value`` as a whole number (an int, or a string of digits with an optional ``-``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def check_trainer(trainer: DictConfig) -> None:
    """``trainer.devices`` is a value Lightning accepts for ``trainer.accelerator``. Lightning
    itself says so only when the Trainer is built, after the model and the SAEs are loaded."""
    devices = trainer.get("devices", "auto")
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(devices, ListConfig):
        devices = OmegaConf.to_container(devices)
    if isinstance(devices, str) and devices.strip() == "auto":
        return
    n = _whole(devices)
    if n is not None and n >= 1:
        return
    if accelerator == "cpu":
        raise ConfigError(f"trainer.devices={devices!r} must be a whole number >= 1 or auto "
                          f"(with trainer.accelerator=cpu)")
    if n == -1:
        return
    if isinstance(devices, str) and "," in devices:
        devices_list: Any = [d for d in devices.split(",") if d.strip()]
    else:
        devices_list = devices
    if isinstance(devices_list, list) and devices_list:
        ids = [_whole(d) for d in devices_list]
        if all(i is not None and i >= 0 for i in ids) and len(set(ids)) == len(ids):
            return
    raise ConfigError(f"trainer.devices={devices!r} must be a whole number >= 1, -1 (every device), auto, "
                      f"or a list of distinct device indices such as [0,1] (with trainer.accelerator={accelerator})")


def match_device(cfg: DictConfig) -> torch.device:
    """Where a run's matchers compute (``MatchContext.device``), from its ``trainer.accelerator``:
    ``cpu`` on the CPU; any other accelerator (``gpu``, ``cuda``, ``auto``, none set) on the current
    CUDA device when there is one, else on the CPU (a GPU run rematched on a machine without one)."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto") or "auto").strip().lower()
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
