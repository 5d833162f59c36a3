"""Data: sources, the run's sample index, transforms and the DataModule."""
from train.data.images import BadImageError, decode_rgb
from train.data.sources import DataError
from train.data.splits import SPLITS

__all__ = ["BadImageError", "DataError", "SPLITS", "decode_rgb"]
