"""Roadwork cascade training framework: train, calibrate and export every learned tier."""
import os as _os

# Offline and quiet by default: no library may reach for the network at import or run time.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("WANDB_MODE", "offline")  # logger=wandb syncs only if the user sets WANDB_MODE=online
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = {0: "None", 1: "Roadwork"}  # the NATIX label map; index 1 is the positive class

import warnings as _warnings

# pytorch_lightning 2.6 on torch 2.14 warns on every step about a torch pytree rename: noise, not a problem.
_warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
