"""Every option of every config group composes, and builds the object it names.

Options that are cheap to build offline are instantiated and checked for their type;
the rest (hub models, the 135M SmolLM2, online SAEs and datasets, multi-device
trainers) are checked as far as possible without loading or downloading anything:
their ``_target_`` imports and their settings bind to its signature.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from saeot.cli import CONF_DIR
from saeot.matching.base import Matcher
from saeot.reference import ReferenceSpace
from saeot.transport import W2Solver

GROUPS = ["model", "sae", "data", "reference", "transport", "matcher", "trainer", "logger", "circuit",
          "callbacks", "judge"]

# groups whose every option is instantiated (cheap and offline), with the type it must give
BUILT = {"reference": ReferenceSpace, "transport": W2Solver, "matcher": Matcher}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options():
    for g in GROUPS:
        assert _options(g), f"conf/{g}/ has no option"


def _node(cfg: DictConfig, group: str):
    if group == "circuit":
        return cfg.get("circuit")
    return OmegaConf.select(cfg, group)


def _settings_fields(target) -> set[str] | None:
    """The fields of the settings dataclass a target is built from (``settings_class`` /
    ``config_class``: its yaml keys), or None for a target that takes plain arguments."""
    cls = getattr(target, "settings_class", None) or getattr(target, "config_class", None)
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None


def _check_binds(node: DictConfig, where: str) -> None:
    """``_target_`` imports; its settings bind to its signature, or are fields of its settings
    dataclass (nested targets too)."""
    target = get_object(node["_target_"])
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    params = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fields = _settings_fields(target)
    if fields is not None:
        params, takes_kwargs = fields, False
    unknown = [k for k in kwargs if k not in params and not takes_kwargs]
    assert not unknown, f"{where}: {unknown} are not arguments of {node['_target_']}"
    for k, v in kwargs.items():
        if isinstance(v, DictConfig) and "_target_" in v:
            _check_binds(v, f"{where}.{k}")


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_builds(group, option, tmp_path, compose_cfg):
    overrides = [f"{group}={option}"]
    if group == "callbacks" and option == "circuit":
        overrides.append("circuit=ioi")
    if group == "data" and option == "text_files":
        overrides.append(f"data.text.paths=[{tmp_path}/*.txt]")
    if group == "sae" and option == "from_disk":
        overrides.append(f"sae.path={tmp_path}")
    if group == "model" and option == "hf_local":
        overrides.append(f"model.path={tmp_path}")
    if group == "circuit" and option == "jsonl":
        jsonl = tmp_path / "task.jsonl"
        jsonl.write_text('{"clean": "a b", "corrupted": "c b", "correct": " x", "wrong": " y"}\n')
        overrides.append(f"circuit.path={jsonl}")
    cfg = compose_cfg(*overrides, config_name="evaluate" if group == "judge" else "train")
    node = _node(cfg, group)
    if node is None:  # an option that turns the group off (logger=none, judge=none, callbacks=none)
        assert option in ("none", "default"), f"{group}={option} composes to nothing"
        return
    if group == "callbacks":
        for name, cb in node.items():
            _check_binds(cb, f"callbacks.{name}")
            built = instantiate(cb)
            assert isinstance(built, L.Callback)
        return
    _check_binds(node, group)
    if group in BUILT:
        assert isinstance(instantiate(node), BUILT[group])
    elif group == "trainer" and option == "cpu":
        assert isinstance(instantiate(node), L.Trainer)
    elif group == "circuit":
        assert instantiate(node).name
    elif group == "model" and option == "tiny_random":
        lm = instantiate(node)
        assert lm.n_layers >= 2


#: yaml files whose keys are exactly the fields of their target's settings dataclass (less the
#: fields each leaves to the code): every setting can be overridden on the command line without ``+``
#: (sae.jumprelu_init_threshold once could not be: Hydra refused it)
SETTINGS_FILES = {"sae/train_local.yaml": {"device", "progress"}, "callbacks/circuit.yaml": set()}


@pytest.mark.parametrize("path", sorted(SETTINGS_FILES))
def test_a_settings_file_lists_every_setting_of_its_dataclass(path):
    node = OmegaConf.load(Path(CONF_DIR) / path)
    if "_target_" not in node:  # callbacks/*.yaml: one node per callback
        (node,) = node.values()
    fields = _settings_fields(get_object(node["_target_"]))
    keys = {k for k in node if not k.startswith("_")}
    missing = sorted(fields - SETTINGS_FILES[path] - keys)
    assert not missing, f"conf/{path} lacks {missing}"
    assert keys <= fields, f"conf/{path}: {sorted(keys - fields)} are not settings"


@pytest.mark.parametrize("overrides,named", [
    (["sae.k=abc"], "sae.k='abc' must be of type int"),
    (["sae.steps=0"], "sae.steps=0 must be >= 1"),
    (["sae.lr=-1"], "sae.lr=-1 must be > 0"),
    (["+sae.kk=3"], "sae.kk is not a setting of sae=train_local"),
    (["sae.architecture=gated"], "sae.architecture='gated'"),
    (["callbacks=circuit", "circuit=ioi", "callbacks.circuit.fraction=0"], "callbacks.circuit.fraction=0 must be"),
    (["callbacks=circuit", "circuit=ioi", "+callbacks.circuit.nodes=3"], "callbacks.circuit.nodes is not a setting"),
    (["matcher.null_alpha=abc"], "matcher.null_alpha='abc' must be of type float"),
])
def test_a_wrong_setting_is_one_value_error_naming_it(overrides, named, compose_cfg):
    """One settings style: matchers, the circuit callback and SAE training all check their
    settings when built and name the yaml key of a wrong one (the line the CLI prints)."""
    from saeot.pipeline.config import build

    cfg = compose_cfg("experiment=smoke", *overrides)
    group = "callbacks" if overrides[0].startswith(("callbacks", "+callbacks")) else overrides[0].lstrip("+").split(".")[0]
    node = cfg.callbacks.circuit if group == "callbacks" else cfg[group]
    with pytest.raises(ValueError) as e:
        build(node)
    assert str(e.value).splitlines()[0].startswith(named), str(e.value)


@pytest.mark.parametrize("overrides,named", [
    (["layers.ids=[1,1]"], "layers.ids=[1, 1] has repeats"),
    (["layers.ids=some"], "layers.ids='some'; use a list of layer numbers"),
    (["layers.pairs=sideways"], "layers.pairs='sideways'; use adjacent"),
    (["layers.pairs=[[1]]"], "layers.pairs=[[1]]; use adjacent"),
    (["layers.site=3"], "layers.site=3 must be of type str"),
    (["+layers.idz=[1]"], "layers.idz is not a setting of layers"),
    (["profiling.k=0"], "profiling.k=0 must be a whole number >= 1"),
    (["profiling.sampling=best"], "profiling.sampling='best'; expected one of"),
    (["profiling.reference_tokens=abc"], "profiling.reference_tokens='abc' must be a whole number >= 2"),
])
def test_a_wrong_layers_or_profiling_setting_is_named(overrides, named, compose_cfg):
    """``layers`` and ``profiling`` are typed settings too, built and checked once by the setup stage."""
    from saeot.pipeline.config import layer_settings, profiling_settings

    cfg = compose_cfg("experiment=smoke", *overrides)
    read = layer_settings if overrides[0].lstrip("+").startswith("layers") else profiling_settings
    with pytest.raises(ValueError) as e:
        read(cfg)
    assert str(e.value).splitlines()[0].startswith(named), str(e.value)


def test_the_layers_settings_give_the_run_hooks_and_pairs(compose_cfg):
    from saeot.pipeline.config import LayerSettings, layer_settings, profiling_settings, run_hooks

    layers = layer_settings(compose_cfg("experiment=smoke", "layers.ids=[3,1,2]", "layers.pairs=all_to_last"))
    assert layers == LayerSettings(ids=(1, 2, 3), site="resid_post", pairs="all_to_last") and not layers.all_layers
    assert layers.layer_pairs(layers.layer_ids()) == [(1, 3), (2, 3)]
    every = layer_settings(compose_cfg("layers.ids=all", "layers.pairs=[[0,2]]"))
    assert every.all_layers and every.layer_ids(4) == [0, 1, 2, 3] and every.layer_pairs([0, 1, 2, 3]) == [(0, 2)]
    assert profiling_settings(compose_cfg("experiment=smoke")).k == 8
    # sae_b: the layers' hooks, then their second SAEs' keys; both directions at every layer
    hooks, pairs = run_hooks(compose_cfg("experiment=smoke", "layers.ids=[1]", "sae@sae_b=train_local_tiny"))
    assert hooks == ["blocks.1.hook_resid_post", "blocks.1.hook_resid_post@b"]
    assert pairs == [(hooks[0], hooks[1]), (hooks[1], hooks[0])]
