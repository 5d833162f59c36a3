"""Callbacks that interrupt training as the outside world would (used by the resume and preemption tests)."""
import os
import signal

import pytorch_lightning as pl


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


class SignalAtStep(pl.Callback):
    """Sends ``signum`` once optimizer step ``step`` is done: to the whole process group (loader workers included, as
    a scheduler does) when this process leads its own group, else to this process alone."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)
