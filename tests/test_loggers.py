"""Loggers (csv, tensorboard, wandb offline), the run's figures, and the progress bar's throughput."""
from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import yaml

from conftest import QUIET, compose_config, copy_run
from train.utils.progress import RichProgressBar

LEVEL_FIGURES = {"confusion", "levels", "reliability"}


def tensorboard_values(folder: Path) -> dict[str, str]:
    """tag -> kind of value (``image``, ``simple_value``, ...) over the event files in ``folder`` (TFRecord frames:
    length, its crc, an Event protobuf, its crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            found.update({v.tag: v.WhichOneof("value") for v in event.summary.value})
            i += n + 16
    return found


def test_every_logger_writes_the_run_its_tags_config_and_figures(data_run, tmp_path, one_thread):
    """One short Stage-1 fit with csv, tensorboard and wandb (offline) at once: each writes in the task's folder."""
    import wandb

    from train.__main__ import run_task

    run = copy_run(data_run, tmp_path)
    run_task(compose_config(f"run_dir={run.path}", "debug=tiny", *QUIET, "task=stage1", "model.bootstrap=0",
                            "trainer.limit_train_batches=2", "logger=[csv,tensorboard,wandb]", "tags=[smoke,loggers]"))
    task_dir = run.path / "stage1"
    hparams = yaml.safe_load((task_dir / "hparams.yaml").read_text())  # csv and tensorboard
    assert (hparams["run"], hparams["task"], hparams["tags"]) == (run.path.name, "stage1", ["smoke", "loggers"])
    assert hparams["config"]["model"]["backbone"]["name"] == "vit_tiny_patch16_224" and hparams["config"]["seed"] == 42
    assert "train/loss" in (task_dir / "metrics.csv").read_text().splitlines()[0]

    values = tensorboard_values(task_dir)
    assert values["train/loss"] == "simple_value" and values["test/L0/mcc"] == "simple_value"
    assert {f"figures/{name}" for name in LEVEL_FIGURES} <= {t for t, kind in values.items() if kind == "image"}

    experiment = wandb.run  # the task's wandb run stays open until the next task's logger (or the process) ends it
    try:
        assert (experiment.name, experiment.group, experiment.job_type) == (f"{run.path.name}/stage1",
                                                                            run.path.name, "stage1")
        assert set(experiment.tags) == {"smoke", "loggers"}
        assert experiment.config["config"]["task"]["name"] == "stage1" and experiment.config["run"] == run.path.name
        assert experiment.settings.mode == "offline"
        (folder,) = (task_dir / "wandb").glob("offline-run-*")
        media = {p.name.split("_")[0] for p in (folder / "files" / "media" / "images" / "figures").glob("*.png")}
        assert media == LEVEL_FIGURES
    finally:
        wandb.finish()


def test_the_shared_run_has_its_figures_as_artifacts(tiny_run):
    """Stage-1's test figures, the calibration's reliability diagram and the bundle's figures, recorded."""
    from PIL import Image

    tasks = tiny_run.read()["tasks"]
    expected = {"stage1": LEVEL_FIGURES, "calibrate": {"stage1_reliability"}, "evaluate": LEVEL_FIGURES}
    for task, names in expected.items():
        for name in names:
            path = tiny_run.artifact(task, name)  # checks the sha256 recorded
            assert path == tiny_run.path / task / f"{name}.png" and tasks[task]["artifacts"][name]
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) >= 300


def test_a_task_without_a_trainer_logs_its_figures(tiny_run, tmp_path):
    """task=evaluate builds the configured loggers itself: its figures reach TensorBoard as images."""
    from train.__main__ import run_task
    from train.utils.loggers import build_loggers

    run = copy_run(tiny_run, tmp_path)
    cfg = compose_config(f"run_dir={run.path}", "debug=tiny", *QUIET, "task=evaluate", "pipeline=stage1",
                         "logger=[csv,tensorboard]")
    loggers = build_loggers(cfg, tmp_path / "x" / "evaluate", figures_only=True)
    assert [type(lg).__name__ for lg in loggers] == ["KeepOpenTensorBoardLogger"]  # csv: only the task's config.yaml
    run_task(cfg)
    values = tensorboard_values(run.path / "evaluate")
    assert {t for t, kind in values.items() if kind == "image"} == {f"figures/{n}" for n in LEVEL_FIGURES}
    assert yaml.safe_load((run.path / "evaluate" / "hparams.yaml").read_text())["task"] == "evaluate"


def test_the_progress_bar_shows_img_s_measured_between_its_metric_reads(monkeypatch):
    """img/s = samples since the previous read / the time between reads (each read waits for the device), times
    the devices; no read is added for it."""
    import train.utils.progress as progress

    clock = iter(range(0, 1000, 2))  # each read happens 2 s after the one before... in this fake clock
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    reads = []
    monkeypatch.setattr(pl.callbacks.RichProgressBar, "get_metrics",
                        lambda self, t, m: reads.append(t.global_step) or {"train/loss": 0.5})
    monkeypatch.setattr(pl.callbacks.RichProgressBar, "on_train_batch_end",  # Lightning's: refresh the metrics
                        lambda self, t, m, out, batch, i: self.get_metrics(t, m))
    bar = RichProgressBar(batch_size_fn=lambda batch: len(batch["label"]))
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=5, training=True, world_size=2)
    shown = []
    for step in range(1, 12):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, {"label": [0] * 4}, step - 1)
        shown.append(bar._shown.get("img/s"))
    assert reads == [1, 5, 10]
    # the read at step 5: batches 2-5 (16 samples) in the 2 s since step 1's read, on 2 devices
    assert shown == [None] * 4 + [16] * 5 + [20] * 2  # at step 10: batches 6-10, 20 samples x 2 devices / 2 s
