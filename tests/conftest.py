import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lm():
    from saeot.lm import load_tiny_random

    return load_tiny_random(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, seed=0)


@pytest.fixture(scope="session")
def tiny_text():
    from saeot.data.text import StdlibDocstrings

    return list(StdlibDocstrings(max_docs=60))


@pytest.fixture
def tiny_dm(tiny_lm, tiny_text):
    from saeot.data.datamodule import HiddenStateDataModule

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    return HiddenStateDataModule(tiny_lm, tiny_text, hooks, context_len=32, max_contexts=20, batch_size=4,
                                 heldout_fraction=0.25)


@pytest.fixture
def compose_cfg(tmp_path):
    """``compose_cfg(*overrides, run_dir=None, config_name="train")``: the real configs of
    ``conf/``, composed as ``train.py`` / ``evaluate.py`` compose them (Hydra's runtime
    set to ``run_dir``, default ``tmp_path``), with progress bars off."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from saeot.cli import CONF_DIR

    def _compose(*overrides: str, run_dir=None, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir or tmp_path)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            if "trainer" in cfg:
                cfg.trainer.enable_progress_bar = False
        GlobalHydra.instance().clear()
        return cfg

    return _compose
