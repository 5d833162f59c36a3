"""Image transforms: albumentations for training, and the validator-faithful evaluation.

The NATIX validator sends every query as a 224x224 JPEG after one of four augmentation levels
(25% each). :class:`ValidatorQuery` makes it as the subnet's code does (:mod:`train.data.validator`),
seeded per sample so a report is reproducible; :class:`ModelInput` then does what the miner's image
processor does.
"""
from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

from train.data.images import decode_rgb
from train.data.validator import LEVELS, QueryDraw, draw_query, query_rng, render_query, wire_jpeg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ValidatorQuery:
    """Image -> the query the validator sends at ``level`` (:mod:`train.data.validator`: the subnet's own levels and
    wire JPEG), decoded back to RGB as the miner decodes it.

    Levels 1-3 are random in the validator; here sample ``i`` always gets the same draw for a given ``seed``,
    whichever worker or order it is processed in. ``level=None`` draws the level too (25% each).
    """

    def __init__(self, level: int | None, seed: int = 0):
        if level is not None and level not in LEVELS:
            raise ValueError(f"validator level must be one of {LEVELS}, got {level}")
        self.level, self.seed = level, seed

    def draw(self, image: np.ndarray, i: int, rng: np.random.Generator | None = None) -> QueryDraw:
        """The validator's draws for ``image`` as sample ``i`` (from ``rng`` when given, else from sample ``i``'s own
        generator under ``seed``)."""
        rng = query_rng(self.seed, len(LEVELS) if self.level is None else self.level, i) if rng is None else rng
        return draw_query(rng, image.shape[0], image.shape[1], self.level)

    def render(self, image: np.ndarray, i: int, rng: np.random.Generator | None = None) -> bytes:
        """The JPEG bytes the validator would send for sample ``i`` (``rng``: draw from it instead)."""
        return wire_jpeg(render_query(image, self.draw(image, i, rng)))

    def __call__(self, image: np.ndarray, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        return decode_query(self.render(image, i, rng), i)


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
        """``image`` resized to ``img_size`` x ``img_size`` (uint8)."""
        return self.resize(image=image)["image"]

    def normalized(self, resized: np.ndarray) -> torch.Tensor:
        """A :meth:`resized` image as the normalised CHW float tensor."""
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
    """Configured albumentations transforms (random), then the model's input transform. With probability
    ``validator_p`` a sample is instead the validator's exact query (:class:`ValidatorQuery`, level drawn 25% each)."""

    def __init__(self, transforms: Sequence[A.BasicTransform], img_size: int, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, validator_p: float = 0.0):
        if not 0.0 <= validator_p <= 1.0:
            raise ValueError(f"data.validator_augment={validator_p}: a probability in [0, 1]")
        self.augment = A.Compose(list(transforms))
        self.model_input = ModelInput(img_size, mean, std)
        self.validator_p, self.validator = validator_p, ValidatorQuery(None)

    def __call__(self, image: np.ndarray, i: int, seed: int | None = None) -> torch.Tensor:
        """``seed`` fixes this draw (the training sampler passes one per sample and epoch)."""
        if self.validator_p > 0:
            rng = np.random.default_rng(seed)
            if rng.random() < self.validator_p:
                return self.model_input(self.validator(image, i, rng))
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
