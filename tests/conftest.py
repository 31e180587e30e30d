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
