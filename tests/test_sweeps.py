"""Sweeps: the Optuna study over Stage-1 as users launch it (a failed trial does not sink it), the SLURM launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_an_optuna_study_survives_a_failed_trial_and_reads_the_metric(tmp_path, data_dir):
    """Two trials of hparams_search=stage1_optuna (debug=tiny); job 0 asks for a ViT with 0 attention heads (it fails
    building the model), job 1 for 1 head. The study goes on; its best value is the completed trial's val/mcc_best."""
    cmd = [sys.executable, "-m", "train", "hparams_search=stage1_optuna", "hydra.sweeper.n_trials=2", "debug=tiny",
           "model.backbone.num_heads=${hydra:job.num}", "model.backbone.pretrained=false", "trainer.limit_train_batches=3", "model.bootstrap=0",
           f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "print_config=false",
           "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "checkpoints").iterdir() if p.name != "multirun")
    assert len(runs) == 2
    failed, done = (json.loads((r / "registry.json").read_text())["tasks"] for r in runs)
    assert "stage1" not in failed and done["stage1"]["status"] == "complete"
    assert "job 0 failed; the sweep goes on" in (runs[0] / "train.log").read_text()
    assert "ZeroDivisionError" in (runs[0] / "train.log").read_text()  # the traceback, in the failed run's own log
    (results,) = (tmp_path / "checkpoints" / "multirun").glob("*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == done["stage1"]["metrics"]["val/mcc_best"]
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay",
                                        "model.label_smoothing", "model.backbone.drop_path_rate"}


def test_the_slurm_launcher_composes_and_instantiates():
    """It cannot submit here; it builds with the sweep's settings."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=stage1_optuna", "hydra/launcher=slurm",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 1)
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
    built = instantiate(launcher)
    assert built.params["partition"] == "gpu" and built.params["timeout_min"] == 240


def test_a_plain_multirun_runs_every_job_when_one_fails(tmp_path, data_dir):
    """-m task=evaluate,data with a missing bundle: job 0 stops with a user error (which used to end the whole sweep
    as SystemExit), job 1 still runs; Hydra then reports the failure (exit code 1)."""
    cmd = [sys.executable, "-m", "train", "-m", "task=evaluate,data", "bundle=/nonexistent", "debug=tiny",
           f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "print_config=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    runs = {p.name.split("-")[0]: p for p in (tmp_path / "checkpoints").iterdir() if p.name != "multirun"}
    assert json.loads((runs["data"] / "registry.json").read_text())["tasks"]["data"]["status"] == "complete"
    assert "evaluate" not in json.loads((runs["evaluate"] / "registry.json").read_text())["tasks"]
    assert out.returncode == 1 and "nonexistent" in out.stderr  # Hydra re-raises job 0's error once all ran
