"""Image transforms: albumentations for training, and the validator-faithful evaluation.

The NATIX validator re-encodes every query as a 224x224 JPEG after one of four augmentation
levels (25% each). :class:`ValidatorQuery` reproduces a level, seeded per sample so a report
is reproducible; :class:`ModelInput` then does what the miner's image processor does.
"""
from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

from train.data.images import decode_rgb, encode_jpeg

QUERY_SIZE = 224  # the validator's query side
QUERY_JPEG_QUALITY = 75
LEVELS = (0, 1, 2, 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _geometric(size: int) -> list[A.BasicTransform]:
    """Level 1's geometry: rotation up to +-20 deg, RandomResizedCrop (scale 0.2-1), flips."""
    return [A.Rotate(limit=20, p=1.0), A.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0)),
            A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


def validator_level(level: int, size: int = QUERY_SIZE) -> A.Compose:
    """The validator's augmentation ``level`` (0-3) as an albumentations pipeline."""
    if level == 0:  # square centre crop, then resize
        return A.Compose([A.SmallestMaxSize(max_size=size), A.CenterCrop(size, size)])
    if level == 1:
        return A.Compose(_geometric(size))
    if level == 2:  # + saturation, contrast, JPEG
        return A.Compose(_geometric(size) + [
            A.ColorJitter(brightness=0, contrast=(0.7, 1.3), saturation=(0.6, 1.4), hue=0, p=1.0),
            A.ImageCompression(quality_range=(40, 80), p=1.0)])
    if level == 3:  # + stronger distortions, Gaussian noise, blur
        return A.Compose(_geometric(size) + [
            A.ColorJitter(brightness=(0.7, 1.3), contrast=(0.5, 1.5), saturation=(0.4, 1.6), hue=0, p=1.0),
            A.ImageCompression(quality_range=(20, 60), p=1.0),
            A.GaussNoise(std_range=(0.02, 0.08), p=1.0),
            A.GaussianBlur(sigma_limit=(0.5, 2.0), p=1.0)])
    raise ValueError(f"validator level must be one of {LEVELS}, got {level}")


class ValidatorQuery:
    """Image -> the 224 px JPEG query the validator would send at ``level`` (decoded back to RGB).

    Levels 1-3 are random in the validator; here sample ``i`` always gets the same draw for a
    given ``seed``, whichever worker or order it is processed in.
    """

    def __init__(self, level: int, seed: int = 0):
        self.level, self.seed = level, seed
        self.transform = validator_level(level)

    def render(self, image: np.ndarray, i: int) -> bytes:
        """The JPEG bytes the validator would send for sample ``i``."""
        self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, self.level, i]).generate_state(1)[0]))
        return encode_jpeg(self.transform(image=image)["image"], QUERY_JPEG_QUALITY)

    def __call__(self, image: np.ndarray, i: int) -> np.ndarray:
        return decode_query(self.render(image, i), i)


def decode_query(data: bytes, i: int) -> np.ndarray:
    """A rendered query's JPEG bytes -> RGB (the same decode whether it was just rendered or read from a cache)."""
    return decode_rgb(data, where=f"validator query {i}")


class ModelInput:
    """RGB array -> normalised CHW float tensor at the model's input size: :meth:`resized` (uint8, what the run's
    resized-query cache stores) then :meth:`normalized`."""

    def __init__(self, img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        self.resize = A.Compose([A.Resize(img_size, img_size, interpolation=1, area_for_downscale="image")])
        self.normalize = A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std))])

    def resized(self, image: np.ndarray) -> np.ndarray:
        return self.resize(image=image)["image"]

    def normalized(self, resized: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.normalize(image=np.asarray(resized))["image"].transpose(2, 0, 1).copy())

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalized(self.resized(image))

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelInput) and (self.img_size, self.mean, self.std) == (other.img_size, other.mean,
                                                                                           other.std)

    __hash__ = None


class EvalTransform:
    """Validator query at ``level`` followed by the model's input transform."""

    def __init__(self, level: int, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0):
        self.query, self.model_input = ValidatorQuery(level, seed), ModelInput(img_size, mean, std)

    def __call__(self, image: np.ndarray, i: int, seed: int | None = None) -> torch.Tensor:
        return self.model_input(self.query(image, i))


class TrainTransform:
    """Configured albumentations transforms (random), then the model's input transform."""

    def __init__(self, transforms: Sequence[A.BasicTransform], img_size: int, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.augment = A.Compose(list(transforms))
        self.model_input = ModelInput(img_size, mean, std)

    def __call__(self, image: np.ndarray, i: int, seed: int | None = None) -> torch.Tensor:
        """``seed`` fixes this draw (the training sampler passes one per sample and epoch)."""
        if seed is not None:
            self.augment.set_random_seed(seed)
        return self.model_input(self.augment(image=image)["image"])


class ShardImage:
    """RGB array -> the uint8 square a decode-once shard stores (``task=prepare``): shorter side resized to
    ``size`` (area interpolation when shrinking), then centre-cropped square, as the validator's level 0 frames
    a query."""

    def __init__(self, size: int):
        self.transform = A.Compose([A.SmallestMaxSize(max_size=size, interpolation=1, area_for_downscale="image"),
                                    A.CenterCrop(size, size)])

    def __call__(self, image: np.ndarray, i: int = 0, seed: int | None = None) -> np.ndarray:
        return self.transform(image=image)["image"]
