"""Sweeps: the Optuna study over Stage-1 as users launch it (a failed trial does not sink it; the study is stored,
resumed and shared by processes; each trial's run sits in the sweep folder), the SLURM launcher, a plain multirun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_an_optuna_study_survives_a_failed_trial_and_reads_the_metric(tmp_path, data_dir):
    """Two trials of hparams_search=stage1_optuna (debug=tiny); job 0 asks for a ViT with 0 attention heads (it fails
    building the model), job 1 for 1 head. The study goes on; its best value is the completed trial's val/mcc_best;
    each trial's run is in the sweep folder under its trial number; the study is stored for a later invocation."""
    cmd = [sys.executable, "-m", "train", "hparams_search=stage1_optuna", "hydra.sweeper.n_trials=2", "debug=tiny",
           "model.backbone.num_heads=${hydra:job.num}", "model.backbone.pretrained=false",
           "trainer.limit_train_batches=3", "model.bootstrap=0", f"paths.root_dir={tmp_path}",
           f"paths.data_dir={data_dir}", "print_config=false", "callbacks.progress_bar=null",
           "trainer.enable_model_summary=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["multirun", "optuna"]
    (sweep,) = (tmp_path / "checkpoints" / "multirun").iterdir()
    (failed_run,), (done_run,) = (list((sweep / str(n)).iterdir()) for n in (0, 1))  # <sweep>/<trial>/<run>
    failed, done = (json.loads((r / "registry.json").read_text())["tasks"] for r in (failed_run, done_run))
    assert "stage1" not in failed and done["stage1"]["status"] == "complete"
    assert "job 0 failed; the sweep goes on" in (failed_run / "train.log").read_text()
    assert "ZeroDivisionError" in (failed_run / "train.log").read_text()  # the traceback, in the failed run's own log
    assert re.search(r"WARNING trial 0 failed: \w+: [^[]*ZeroDivisionError", " ".join(out.stdout.split()))  # wrapped
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == done["stage1"]["metrics"]["val/mcc_best"]
    assert (best["best_trial"], best["best_run"], best["n_trials"], best["n_complete"]) == (1, str(done_run), 2, 1)
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay",
                                        "model.label_smoothing", "model.backbone.drop_path_rate"}
    assert (tmp_path / "checkpoints" / "optuna" / "stage1.db").is_file()  # the study, for a later invocation


def _objective(cfg) -> float:
    """A stand-in for training: the trial's learning rate (the study maximises it); no run folder."""
    return cfg.model.optimizer.lr


def _study(root: Path, name: str, *overrides: str) -> dict:
    """``hparams_search=stage1_optuna`` on :func:`_objective` in this process (Hydra's multirun, the plugin found by
    Hydra's scan, the study in ``root``'s SQLite); returns optimization_results.yaml."""
    sweep = root / "multirun" / name
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        GlobalHydra.instance().hydra.multirun(
            config_name="config", task_function=_objective, with_log_configuration=False,
            overrides=["hparams_search=stage1_optuna", f"paths.root_dir={root}", f"hydra.sweep.dir={sweep}",
                       *overrides])
    return yaml.safe_load((sweep / "optimization_results.yaml").read_text())


def _stored_trials(root: Path) -> list:
    import optuna

    return optuna.load_study(study_name="stage1", storage=f"sqlite:///{root}/checkpoints/optuna/stage1.db").trials


def test_a_study_resumes_from_its_storage_and_processes_share_it(tmp_path):
    """A later invocation continues the study: trial numbers and folders go on, the best is over all trials, the
    sampler does not replay the first proposals; two processes at once add their trials to the one study."""
    lr = "model.optimizer.lr"
    first = _study(tmp_path, "first", "hydra.sweeper.n_trials=2")
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:  # the same command twice, at once
        jobs = [pool.submit(_study, tmp_path, "resumed", "hydra.sweeper.n_trials=2"),
                pool.submit(_study, tmp_path, "beside", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=7")]
        results = [job.result() for job in jobs]
    trials = _stored_trials(tmp_path)
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    assert first["n_trials"] == 2 and max(r["n_trials"] for r in results) == 6
    for t in trials:  # <sweep>/<trial number>
        assert Path(t.user_attrs["run"]).name == str(t.number) and Path(t.user_attrs["run"]).is_dir()
    assert sorted(p.name for p in (tmp_path / "multirun" / "first").iterdir() if p.is_dir()) == ["0", "1"]
    resumed = [t.params[lr] for t in trials if Path(t.user_attrs["run"]).parent.name == "resumed"]
    assert len(resumed) == 2 and not {t.params[lr] for t in trials[:2]} & set(resumed)  # the same seed, offset
    best, final = max(trials, key=lambda t: t.value), max(results, key=lambda r: r["n_trials"])
    assert (final["best_trial"], final["best_value"]) == (best.number, best.value)


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
    (sweep,) = (tmp_path / "checkpoints" / "multirun").iterdir()
    runs = {p.name.split("-")[0]: p for p in sweep.glob("*/*")}  # <sweep>/<job number>/<run>
    assert runs["evaluate"].parent.name == "0" and runs["data"].parent.name == "1"
    assert json.loads((runs["data"] / "registry.json").read_text())["tasks"]["data"]["status"] == "complete"
    assert "evaluate" not in json.loads((runs["evaluate"] / "registry.json").read_text())["tasks"]
    assert out.returncode == 1 and "nonexistent" in out.stderr  # Hydra re-raises job 0's error once all ran
