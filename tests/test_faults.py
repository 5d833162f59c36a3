"""Faults in training: NaN/inf losses skipped and counted, signals stop with a checkpoint, writes are atomic, crafted
checkpoints are refused."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from conftest import copy_run
from interrupt import SignalAtStep

from train.__main__ import USER_ERRORS, run_task
from train.utils.checkpoints import AtomicCheckpointIO, UnsafeCheckpointError, load_checkpoint
from train.utils.faults import NONFINITE_METRIC, NonFiniteLoss, NonFiniteLossError, Preempted, Preemption
from train.utils.files import atomic_file


class Toy(pl.LightningModule):
    """A linear model whose loss is NaN (or inf) at the steps in ``poison``; records its weights after every step."""

    def __init__(self, poison=(), fused=False):
        super().__init__()
        self.net, self.poison, self.weights, self.fused = nn.Linear(4, 1), set(poison), [], fused

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        if self.global_step in self.poison:
            loss = loss * (float("nan") if self.global_step % 2 else float("inf"))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights.append(self.net.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=8)


def fit(module, callbacks, tmp_path, **kw):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), **kw)
    trainer.fit(module)
    return trainer


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path):
    guard = NonFiniteLoss(max_consecutive=3)
    toy = Toy(poison={2, 3, 5})
    trainer = fit(toy, [guard], tmp_path)
    w = toy.weights  # after steps 0..7 (the global step still advances on a skipped step)
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[1]) and torch.equal(w[5], w[4])  # nothing moved
    assert not torch.equal(w[4], w[3]) and not torch.equal(w[6], w[5]) and torch.isfinite(w[-1]).all()
    assert guard.skipped == 3 and trainer.callback_metrics[NONFINITE_METRIC] == 3
    assert guard.state_dict() == {"skipped": 3, "consecutive": 0}  # resumed runs go on counting


def test_with_a_fused_optimizer_the_skip_stays_on_the_device(tmp_path, monkeypatch):
    """A fused AdamW skips the step itself (found_inf): weights and Adam's step count stay; the counters are read at
    logging steps only, and a bad run that spans reads still counts as one run."""
    reads = []
    monkeypatch.setattr(NonFiniteLoss, "_read", lambda self, trainer, read=NonFiniteLoss._read: (
        reads.append(trainer.global_step), read(self, trainer))[1])
    guard, toy = NonFiniteLoss(max_consecutive=4), Toy(poison={2, 3, 5}, fused=True)
    trainer = fit(toy, [guard], tmp_path, log_every_n_steps=3)
    w = toy.weights
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[1]) and torch.equal(w[5], w[4])
    assert not torch.equal(w[4], w[3]) and not torch.equal(w[6], w[5]) and torch.isfinite(w[-1]).all()
    assert int(trainer.optimizers[0].state[toy.net.weight]["step"]) == 8 - 3  # skipped steps are not counted
    assert guard.skipped == 3 and trainer.callback_metrics[NONFINITE_METRIC] == 3
    assert reads == [3, 6, 8]  # global steps 3 and 6 (log_every_n_steps=3), then the epoch's end
    with pytest.raises(NonFiniteLossError, match=r"NaN or inf in 4 consecutive steps \(epoch 0, step 6"):
        fit(Toy(poison={2, 3, 4, 5, 6}, fused=True), [NonFiniteLoss(max_consecutive=4)], tmp_path,
            log_every_n_steps=3)  # steps 2 | 3 4 5 across the read at step 3: one run of 4, seen at step 6


def test_nonfinite_loss_k_in_a_row_stops_with_a_clear_message(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"NaN or inf in 3 consecutive steps \(epoch 0, step 3; 3 skipped "
                                                 r"in all\).*callbacks\.nonfinite_loss\.max_consecutive"):
        fit(Toy(poison={1, 2, 3, 4, 5}), [NonFiniteLoss(max_consecutive=3)], tmp_path)
    assert NonFiniteLossError in USER_ERRORS  # python -m train prints the message, not a traceback
    with pytest.raises(ValueError, match="max_consecutive=0"):
        NonFiniteLoss(0)


def test_sigint_finishes_the_step_saves_last_ckpt_and_exits(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted, match=r"SIGINT: training stopped at epoch 0, step 4; saved .*last\.ckpt") as stop:
        fit(Toy(), [Preemption(), SignalAtStep(3, signal.SIGINT)], tmp_path)
    assert stop.value.code == 128 + signal.SIGINT
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 4  # the step in progress when the signal came finished first
    assert signal.getsignal(signal.SIGINT) == before  # the handler is ours only while training


# --------------------------------------------------------------------------------------------- atomic writes

class Killed(BaseException):
    """Stands for the process dying halfway through a write."""


def half_write(f, *args, **kw):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise Killed


@pytest.mark.parametrize("writer", ["checkpoint", "file"])
def test_a_write_killed_halfway_leaves_the_old_file_whole(writer, tmp_path, monkeypatch):
    """Checkpoints (Lightning's, through the trainer's plugin), safetensors, ONNX files in a bundle, JSON: all are
    written through ``atomic_file``."""
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    old = path.read_bytes()
    with pytest.raises(Killed):
        if writer == "checkpoint":
            monkeypatch.setattr(torch, "save", lambda obj, f: half_write(f))
            AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
        else:
            with atomic_file(path) as f:
                half_write(f)
    assert path.read_bytes() == old and load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_the_trainer_writes_checkpoints_atomically():
    from conftest import compose_config
    from hydra.utils import instantiate

    trainer = instantiate(compose_config().trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_an_export_bundle_failing_midway_leaves_the_old_bundle(tmp_path):
    from train.export import ModelCard, write_bundle

    out = tmp_path / "export"
    out.mkdir()
    (out / "manifest.json").write_text("{}")

    def build(folder):
        (folder / "stage1.onnx").write_bytes(b"half an onnx graph")
        raise Killed

    with pytest.raises(Killed):
        write_bundle(out, build, ModelCard(model_name="m", description="d", version="1", submitted_by="x",
                                           submission_time="t"), {})
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in out.iterdir()] == ["manifest.json"]


# ------------------------------------------------------------------------------------------------ safe loading

class Payload:
    """Unpickling this runs ``open(marker, "w")``: the marker file shows that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_checkpoint(path, marker):
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": {}}, "payload": Payload(marker)}, path)
    return path


def test_a_crafted_pickle_checkpoint_is_refused_everywhere(tiny_config, tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.ckpt"):
        load_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(evil)  # what trainer.fit(ckpt_path=...) reads through
    with pytest.raises(UnsafeCheckpointError):
        run_task(tiny_config("task=export", f"ckpt={evil}"))
    run = copy_run(tiny_run, tmp_path / "runs")
    shutil.copy(evil, run.path / "stage1" / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError):  # resume: ckpt_path=last
        run_task(tiny_config("task=stage1", f"run_dir={run.path}", "ckpt_path=last", "debug=fast_dev_run"))
    assert not marker.exists() and UnsafeCheckpointError in USER_ERRORS


def test_framework_checkpoints_load_weights_only(tiny_run):
    for name in ("best", "last"):
        assert load_checkpoint(tiny_run.artifact("stage1", name))["state_dict"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_loader_workers_ignore_sigterm():
    from train.data.images import loader_worker_init

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        loader_worker_init(0)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_a_failing_stage_ends_the_process_promptly(tiny_run, data_dir, tmp_path):
    """A bug in a middle stage of a pipeline while a loader's workers live (APT, once its threshold loader ran; they
    ignore SIGTERM): the traceback, exit code 1, and the process gone within seconds, not waiting on the workers."""
    tests = Path(__file__).resolve().parent
    run = copy_run(tiny_run, tmp_path)  # data and stage1 complete: the pipeline skips them
    cmd = [sys.executable, str(tests / "failing_stage.py"), "train.tiers.apt.tier:instantiate", f"run_dir={run.path}",
           "pipeline=stage1", "pipeline.stages=[data,stage1,apt,calibrate]", "debug=tiny", "data.num_workers=2",
           f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "print_config=false"]
    env = {**os.environ, "PYTHONPATH": str(tests.parent)}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # a hang fails here
    ended = time.time()
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" in out.stderr and "RuntimeError: injected failure" in out.stderr
    failed_at = float(re.search(r"failing at ([0-9.]+)", out.stderr).group(1))
    assert ended - failed_at < 5, f"exited {ended - failed_at:.1f} s after the failure"
    assert run.is_complete("stage1") and not run.is_complete("apt")
