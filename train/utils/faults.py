"""What training does when something goes wrong: a NaN/inf loss, a preemption signal (SIGTERM, SIGINT).

Both are Lightning callbacks of the ``callbacks`` group (``callbacks.nonfinite_loss``, ``callbacks.preemption``), so
every training task (stage1, apt, draft, difficulty, prm, fusion) has them.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)
NONFINITE_METRIC = "train/nonfinite_steps"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss in too many consecutive steps."""


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; exits with code 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteLoss(pl.Callback):
    """Skips the optimizer step of a batch whose loss is NaN or inf (its gradients are dropped, so the weights and
    the optimizer state stay as they were; the LR schedule still advances) and counts it (logged as
    ``train/nonfinite_steps``, saved in checkpoints); ``max_consecutive`` such steps in a row stop training with
    :class:`NonFiniteLossError`.

    With a fused optimizer (``fused=True``: AdamW on CUDA by default) the skip stays on the device: the flag goes to
    the fused kernel as ``found_inf`` (as GradScaler does), which leaves weights and step counts alone, and the
    counters are read only at logging steps (``trainer.log_every_n_steps``), so a run of bad steps stops up to that
    many steps late. Otherwise the flag is read every optimizer step (a host-device sync). Under DeepSpeed the
    engine owns the step: steps are counted, not skipped."""

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite_loss.max_consecutive={max_consecutive}; it must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped = self.consecutive = 0
        self._finite: torch.Tensor | None = None
        self._on_device: torch.Tensor | None = None  # fused path, since the last read: (skipped, bad run, steps)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # stays on the device: no sync here
        self._finite = finite if self._finite is None else self._finite & finite  # over accumulated batches

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        finite, self._finite = self._finite, None
        if finite is None:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        fused = getattr(optimizer, "defaults", {}).get("fused")
        if fused and getattr(trainer.precision_plugin, "scaler", None) is None:  # a GradScaler sets found_inf itself
            self._skip_on_device(trainer, optimizer, finite)
            return
        bad = not bool(finite)
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: every rank skips alike
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        optimizer.zero_grad(set_to_none=True)  # an optimizer steps no parameter that has no gradient
        log.warning("non-finite training loss at epoch %d step %d: step skipped (%d in a row, %d in all)",
                    trainer.current_epoch, trainer.global_step, self.consecutive, self.skipped)
        self._check(trainer)

    def _skip_on_device(self, trainer: pl.Trainer, optimizer, finite: torch.Tensor) -> None:
        bad = (~finite).float()
        if trainer.world_size > 1:  # any rank: every rank skips alike (a collective, no host sync)
            bad = trainer.strategy.reduce(bad, reduce_op=torch.distributed.ReduceOp.MAX)
        optimizer.found_inf = bad  # the fused kernel leaves everything as it was where this is 1
        counts = self._on_device if self._on_device is not None else torch.zeros(3, device=bad.device)
        self._on_device = torch.stack([counts[0] + bad, bad * (counts[1] + 1), counts[2] + 1])  # a good step ends
        # the bad run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._on_device is not None and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._read(trainer)
            self._check(trainer)

    def _counts(self) -> tuple[int, int, int]:
        """(skipped, consecutive) with the fused path's device counters folded in (one sync), and the newly skipped."""
        if self._on_device is None:
            return self.skipped, self.consecutive, 0
        new, run, steps = (int(v) for v in self._on_device.tolist())
        consecutive = self.consecutive + run if run == steps else run  # a run of bad steps may span reads
        return self.skipped + new, consecutive, new

    def _read(self, trainer: pl.Trainer) -> None:
        self.skipped, self.consecutive, new = self._counts()
        self._on_device = None
        if new:
            log.warning("non-finite training loss: %d step(s) skipped up to epoch %d step %d (%d in a row, %d in all)",
                        new, trainer.current_epoch, trainer.global_step, self.consecutive, self.skipped)

    def _check(self, trainer: pl.Trainer) -> None:
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the training loss was NaN or inf in {self.consecutive} consecutive steps (epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; {self.skipped} skipped in all): training "
                "stopped. Lower the learning rate, check the inputs, or raise callbacks.nonfinite_loss.max_consecutive")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)
        pl_module.log(NONFINITE_METRIC, float(self.skipped))

    def state_dict(self) -> dict:
        skipped, consecutive, _ = self._counts()
        return {"skipped": skipped, "consecutive": consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])
        self._on_device = None


def fault_metrics(trainer: pl.Trainer) -> dict[str, int]:
    """The fit's fault counts for a task's metrics (and so the run's summary.json): ``train/nonfinite_steps``."""
    return {NONFINITE_METRIC: cb.skipped for cb in trainer.callbacks if isinstance(cb, NonFiniteLoss)}


class Preemption(pl.Callback):
    """On SIGTERM or SIGINT during fit: finish the current optimizer step, save ``last.ckpt`` (atomically) and stop
    with :class:`Preempted`; ``ckpt_path=last`` then resumes to what an unbroken run gives. A signal in the last
    batch of an epoch or in validation stops at the epoch's end, after its own checkpoint. A second SIGINT stops at
    once. Outside fit the signals keep their usual effect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None  # after Lightning's own SIGTERM handler is set: this one replaces it during fit
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: training stops after this step, once last.ckpt is saved",
                    signal.Signals(signum).name)

    def _stop(self, trainer: pl.Trainer) -> bool:
        stop = self.received is not None
        return trainer.strategy.reduce_boolean_decision(stop, all=False) if trainer.world_size > 1 else stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._stop(trainer):
            return
        self.received = self.received or signal.SIGTERM  # another rank's signal
        if batch_idx + 1 >= trainer.num_training_batches:  # the epoch ends with its validation and checkpoint
            trainer.should_stop = True
        elif (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # not inside a gradient accumulation
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            raise self._preempted(trainer, path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None:
            trainer.should_stop = True
            if not _last_checkpoint_callback(trainer):
                trainer.save_checkpoint(last_checkpoint_path(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None:
            raise self._preempted(trainer, last_checkpoint_path(trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _preempted(self, trainer: pl.Trainer, path: Path) -> Preempted:
        name = signal.Signals(self.received).name
        return Preempted(self.received, f"{name}: training stopped at epoch {trainer.current_epoch}, step "
                                        f"{trainer.global_step}; saved {path}. Resume with ckpt_path=last (and the "
                                        "same run_dir and settings)")


def _last_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The unmonitored ModelCheckpoint (``callbacks.last_checkpoint``): what ``ckpt_path=last`` resumes from."""
    return next((cb for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.monitor is None and cb.dirpath), None)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the unmonitored ModelCheckpoint writes the last checkpoint (what ``ckpt_path=last`` resumes from);
    ``<default_root_dir>/checkpoints/last.ckpt`` when there is none."""
    cb = _last_checkpoint_callback(trainer)
    if cb is None:
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    return Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
