"""A callback that ends training early, as an interruption would (used by the resume test)."""
import pytorch_lightning as pl


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True
