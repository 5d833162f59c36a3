"""The training progress bar: Lightning's rich bar with throughput, without a host-device sync every step."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytorch_lightning as pl


class RichProgressBar(pl.callbacks.RichProgressBar):
    """:class:`pytorch_lightning.callbacks.RichProgressBar` whose metrics (``train/loss`` ...) are read every
    ``trainer.log_every_n_steps`` training steps, when the loggers read them, instead of every step: reading a
    metric logged on the GPU copies it to the host, which makes the host wait for the step and stalls the next.
    ``step_metrics`` are shown from ``trainer.callback_metrics``: a module logs them without ``prog_bar``, which
    Lightning would read every step (it turns ``prog_bar`` metrics into numbers at each batch end).

    It also shows ``img/s``: samples trained (``batch_size_fn(batch)``, read from shapes; all devices) over the
    time between two such reads. Each read waits for the device, so the rate is the device's, not the host's.
    """

    def __init__(self, *args, batch_size_fn: Callable[[object], int] | None = None,
                 step_metrics: Sequence[str] = ("train/loss",), **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size_fn, self.step_metrics = batch_size_fn, tuple(step_metrics)
        self._step_values: dict[str, float] = {}
        self._shown: dict | None = None
        self._samples, self._since, self._rate = 0, None, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.batch_size_fn is not None:
            self._samples += self.batch_size_fn(batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None  # validation and checkpoints since the last read are not training time
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None
        super().on_validation_start(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """The bar's metrics, read anew every ``log_every_n_steps`` training steps (and whenever not training), with
        ``step_metrics`` and ``img/s`` added; in between, the last read's."""
        due = trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if self._shown is None or not trainer.training or due:
            if trainer.training:  # waits for the device: a clean edge to time at
                logged = getattr(trainer, "callback_metrics", {})
                self._step_values = {k: float(logged[k]) for k in self.step_metrics if k in logged}
            self._shown = {**super().get_metrics(trainer, pl_module), **self._step_values}
            if trainer.training and self.batch_size_fn is not None:
                self._time_window(getattr(trainer, "world_size", 1))
        return self._shown

    def _time_window(self, devices: int) -> None:
        """img/s over the samples since the previous read (none before the first read of an epoch)."""
        now = time.perf_counter()
        if self._since is not None and self._samples:
            self._rate = devices * self._samples / max(now - self._since, 1e-9)
        self._since, self._samples = now, 0
        if self._rate is not None:
            self._shown["img/s"] = round(self._rate)
