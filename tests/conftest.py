import ipaddress
import os
import socket

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------- no network
# No test may reach anything but this machine: a connection to any other address fails at
# once, before a packet is sent (tests/test_no_network.py checks the guard itself).
class NetworkBlocked(RuntimeError):
    pass


def _local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guarded(real):
    def connect(self, address):
        if not _local(address):
            raise NetworkBlocked(f"tests may not connect to {address!r} (only localhost)")
        return real(self, address)
    return connect


socket.socket.connect = _guarded(_connect)
socket.socket.connect_ex = _guarded(_connect_ex)


@pytest.fixture(scope="session")
def tiny_lm():
    from saeot.models import load_tiny_random

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    far faster there, and no OpenMP spin-waits against other processes on the CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
