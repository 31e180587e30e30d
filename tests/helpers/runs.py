"""A finished ``train.py`` run for the tests that read one back (evaluate.py, rematch.py)."""

from pathlib import Path

from omegaconf import OmegaConf

from saeot.pipeline import run_train


def train_run(compose_cfg, run_dir: Path, cache_dir: Path, matcher: str = "semantic_ot", *overrides: str) -> None:
    """A finished ``train.py experiment=smoke`` run in ``run_dir`` (with its ``.hydra/config.yaml``)."""
    cfg = compose_cfg("experiment=smoke", "logger=none", f"paths.cache_dir={cache_dir}", f"matcher={matcher}",
                      "data.max_contexts=16", *overrides, run_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run_train(cfg, run_dir)
