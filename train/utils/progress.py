"""The training progress bar: Lightning's rich bar, without a host-device sync every step."""
from __future__ import annotations

import pytorch_lightning as pl


class RichProgressBar(pl.callbacks.RichProgressBar):
    """:class:`pytorch_lightning.callbacks.RichProgressBar` whose metrics (``train/loss`` ...) are read every
    ``trainer.log_every_n_steps`` training steps, when the loggers read them, instead of every step: reading a
    metric logged on the GPU copies it to the host, which makes the host wait for the step and stalls the next."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown: dict | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        due = trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if self._shown is None or not trainer.training or due:
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
