"""Beyond one machine: the SLURM launcher config composes, and the sbatch script it would
submit asks for what the config says (no cluster here: the script is written, not run)."""

import os

import submitit
from omegaconf import OmegaConf


def test_slurm_launcher_composes_and_writes_its_submission(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from saeot.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                                          "hydra.launcher.gpus_per_node=4", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    # the executor as the launcher builds it (hydra_submitit_launcher's own key mapping)
    params = {k: v for k, v in OmegaConf.to_container(launcher).items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout", "name", "setup")}
    # submitit looks for srun on PATH before it builds a SLURM executor: a stand-in that never runs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ex = submitit.AutoExecutor(folder=str(tmp_path / "jobs"), cluster="slurm")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "stderr_to_stdout"}
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = ex._executor._make_submission_file_text("python train.py matcher=semantic_ot", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=240"):
        assert line in script, line
    assert "python train.py matcher=semantic_ot" in script
