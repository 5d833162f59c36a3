"""What the cascade's tiers share, below the tasks that run them: the training flow (``training``), the classifier
LightningModule (``classifier``, ``stage1``), calibration of a tier (``calibration``), classifier outputs as feature
columns (``modalities``) and the bundle's replay (``replay``)."""
