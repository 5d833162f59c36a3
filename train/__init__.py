"""Roadwork cascade training framework: train, calibrate and export every learned tier."""
import os as _os

# Offline and quiet by default: no library may reach for the network at import or run time.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("WANDB_MODE", "offline")  # logger=wandb syncs only if the user sets WANDB_MODE=online
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = {0: "None", 1: "Roadwork"}  # the NATIX label map; index 1 is the positive class

import warnings as _warnings

# Library warnings that describe this framework's design, not a problem:
for _message in (
    r".*isinstance\(treespec, LeafSpec\).*",  # pytorch_lightning 2.6 on torch 2.14, every step: a torch pytree rename
    # APT's LightningModule prepares its token plan in on_before_batch_transfer, beside the shared DataModule
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the draft's frozen teacher
    # a task's CSV logger writes into the task's folder, which holds its other files; only metrics.csv is replaced
    r"Experiment logs directory .* exists and is not empty",
):
    _warnings.filterwarnings("ignore", message=_message)
