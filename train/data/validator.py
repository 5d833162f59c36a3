"""The NATIX validator's queries as the subnet's own code makes them.

Follows ``natixnetwork/streetvision-subnet`` at :data:`SUBNET_COMMIT` (``natix/utils/image_transforms.py``,
``natix/protocol.py``, ``natix/validator/forward.py``); a new validator release is a change of that constant and of
the tests that pin the facts below.

Each query draws a level, 0-3 with probability 0.25 each (:data:`LEVEL_PROBS`):

- level 0: RGB, square centre crop to the shorter side, resize to 224 (PIL bilinear), to tensor;
- level 1: to tensor, rotation by an angle uniform in [-20, 20] degrees (nearest neighbour, zeros outside, same
  size), then a square RandomResizedCrop of 20-100% of the area, resized to 224 (bilinear, antialiased);
- level 2: level 1, then the DeeperForensics distortions CS, CC and JPEG, each at a level drawn from {0, 1};
- level 3: level 1, then CS, CC, JPEG, GNC and GB, each at a level drawn from {0, 1, 2} (0 = not applied).

The tensor then goes over the wire as a JPEG at PIL's default quality, and the miner decodes that.

The subnet's quirks are part of the distribution miners are scored on, so they are kept: its flip transforms never
flip; "CC" multiplies the pixels by the factor (it darkens); "JPEG" is a cv2 down- and up-sampling, not JPEG coding;
every distortion works on a uint8 BGR copy made by truncation, and CS casts without clipping; the crop that keeps an
inpainting mask point bounds the column by the image height and the row by its width.

:func:`draw_query` makes every random choice of a query from one numpy Generator (callers seed it per sample, so a
report is reproducible); :func:`render_query` applies a :class:`QueryDraw`, so draws made elsewhere (the subnet's own,
in ``train/bench/validator_parity.py``) can be replayed exactly.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

SUBNET_REPO = "natixnetwork/streetvision-subnet"
SUBNET_COMMIT = "28a1755c6ec9432d15d5417df2f2232ae792abdf"
VALIDATOR_VERSION = f"{SUBNET_REPO}@{SUBNET_COMMIT[:7]}"  # what the manifest and the query caches record
QUERY_SIZE = 224
LEVELS = (0, 1, 2, 3)
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
ROTATION_DEGREES = 20.0
CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop's area fraction; its aspect ratio is fixed at 1
MASK_MARGIN = 10  # pixels kept around an inpainting mask point when the crop is shifted to include it
# Distortions applied after level 1's geometry, in this order, and the highest distortion level each may draw.
DISTORTIONS = {2: (("CS", "CC", "JPEG"), 1), 3: (("CS", "CC", "JPEG", "GNC", "GB"), 2)}
# DeeperForensics parameters by distortion level 1..5 (the subnet draws at most level 2).
DISTORTION_PARAMS = {
    "CS": (0.4, 0.3, 0.2, 0.1, 0.0),          # colour saturation factor
    "CC": (0.85, 0.725, 0.6, 0.475, 0.35),    # "contrast": pixels multiplied by it
    "JPEG": (2, 3, 4, 5, 6),                  # down-sampling factor (cv2 resize down and back up)
    "GNC": (0.001, 0.002, 0.005, 0.01, 0.05),  # variance of Gaussian noise in YCbCr
    "GB": (7, 9, 13, 17, 21),                 # Gaussian blur kernel (sigma = kernel / 6)
}


@dataclass(frozen=True)
class QueryDraw:
    """Every random choice of one query: the level, level 1's rotation angle and crop ``(top, left, height, width)``
    in the rotated image, each distortion's level in order of application, and the seed of GNC's noise."""
    level: int
    angle: float = 0.0
    crop: tuple[int, int, int, int] | None = None
    distortions: tuple[tuple[str, int], ...] = ()
    noise_seed: int = 0


def draw_query(rng: np.random.Generator, height: int, width: int, level: int | None = None,
               mask_point: tuple[int, int] | None = None) -> QueryDraw:
    """The validator's draws for an image of ``height`` x ``width``; ``level=None`` draws the level too.
    ``mask_point`` ``(x, y)``: an image-to-image challenge's inpainted point, which the crop is shifted to keep."""
    if level is None:
        level = int(rng.choice(LEVELS, p=LEVEL_PROBS))
    if level not in LEVELS:
        raise ValueError(f"validator level must be one of {LEVELS}, got {level}")
    if level == 0:
        return QueryDraw(0)
    angle = float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    crop = square_crop(rng, height, width)
    if mask_point is not None:
        crop = keep_point(crop, mask_point, height, width)
    names, top = DISTORTIONS.get(level, ((), 0))
    distortions = tuple((name, int(rng.integers(0, top + 1))) for name in names)
    return QueryDraw(level, angle, crop, distortions, int(rng.integers(2 ** 63)))


def square_crop(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop draw at scale :data:`CROP_SCALE`, ratio 1: up to ten tries of a square of a
    random area fraction at a random place, else the centred square of the shorter side."""
    for _ in range(10):
        side = int(round(math.sqrt(height * width * rng.uniform(*CROP_SCALE))))
        if 0 < side <= min(height, width):
            return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def keep_point(crop: tuple[int, int, int, int], point: tuple[int, int], height: int,
               width: int) -> tuple[int, int, int, int]:
    """The subnet's shift of a crop that misses the mask point ``(x, y)`` (its bounds swap height and width)."""
    i, j, h, w = crop
    x, y = point
    if x < j:
        j = max(0, x - MASK_MARGIN)
    elif x > j + w:
        j = min(height - w, x - w + MASK_MARGIN)
    if y < i:
        i = max(0, y - MASK_MARGIN)
    elif y > i + h:
        i = min(width - h, y - h + MASK_MARGIN)
    return i, j, h, w


def render_query(image: np.ndarray | Image.Image, draw: QueryDraw) -> torch.Tensor:
    """The validator's float CHW tensor in [0, 1] (224 x 224) for ``image`` (RGB) under ``draw``."""
    pil = (Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("RGB")
    if draw.level == 0:
        side = min(pil.size)
        return TF.to_tensor(TF.resize(TF.center_crop(pil, [side, side]), [QUERY_SIZE, QUERY_SIZE]))
    x = TF.rotate(TF.to_tensor(pil), draw.angle)
    x = TF.resized_crop(x, *draw.crop, [QUERY_SIZE, QUERY_SIZE], antialias=True)
    for name, level in draw.distortions:
        if level > 0:
            x = distort(x, name, level, draw.noise_seed)
    return x


def distort(x: torch.Tensor, name: str, level: int, noise_seed: int = 0) -> torch.Tensor:
    """One DeeperForensics distortion at ``level`` (1-5) as the subnet applies it: on a uint8 BGR HWC copy of the
    RGB tensor made by truncation, back to a float RGB tensor."""
    bgr = (x[[2, 1, 0]].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    param = DISTORTION_PARAMS[name][level - 1]
    if name == "CS":
        ycbcr = to_ycbcr(bgr)
        ycbcr[:, :, 1:] = 0.5 + (ycbcr[:, :, 1:] - 0.5) * param
        out = from_ycbcr(ycbcr).astype(np.uint8)
    elif name == "CC":
        out = (bgr.astype(np.float32) * param).astype(np.uint8)
    elif name == "JPEG":
        h, w = bgr.shape[:2]
        out = cv2.resize(cv2.resize(bgr, (w // param, h // param)), (w, h))
    elif name == "GNC":
        noise = np.random.default_rng(noise_seed).standard_normal(bgr.shape)
        noisy = (to_ycbcr(bgr) / 255 + math.sqrt(param) * noise) * 255
        out = np.clip(from_ycbcr(noisy), 0, 255).astype(np.uint8)
    elif name == "GB":
        out = cv2.GaussianBlur(bgr, (param, param), param / 6)
    else:
        raise ValueError(f"unknown distortion {name!r}; allowed: {list(DISTORTION_PARAMS)}")
    return torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1)[[2, 1, 0]]


def to_ycbcr(bgr: np.ndarray) -> np.ndarray:
    """DeeperForensics' BGR -> YCbCr (float32; cv2's float conversion of 0-255 values, then studio-range scaling)."""
    ycrcb = cv2.cvtColor(bgr.astype(np.float32), cv2.COLOR_BGR2YCR_CB)
    ycbcr = ycrcb[:, :, (0, 2, 1)].astype(np.float32)
    ycbcr[:, :, 0] = (ycbcr[:, :, 0] * (235 - 16) + 16) / 255.0
    ycbcr[:, :, 1:] = (ycbcr[:, :, 1:] * (240 - 16) + 16) / 255.0
    return ycbcr


def from_ycbcr(ycbcr: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_ycbcr` (float32 BGR, not clipped)."""
    ycbcr = ycbcr.astype(np.float32)
    ycbcr[:, :, 0] = (ycbcr[:, :, 0] * 255.0 - 16) / (235 - 16)
    ycbcr[:, :, 1:] = (ycbcr[:, :, 1:] * 255.0 - 16) / (240 - 16)
    return cv2.cvtColor(ycbcr[:, :, (0, 2, 1)].astype(np.float32), cv2.COLOR_YCR_CB2BGR)


def wire_jpeg(query: torch.Tensor) -> bytes:
    """What the validator sends: the tensor as a PIL image (scaled by 255, truncated), saved as a JPEG at PIL's
    default quality."""
    buf = io.BytesIO()
    TF.to_pil_image(query).save(buf, format="JPEG")
    return buf.getvalue()


def query_rng(seed: int, level: int, i: int) -> np.random.Generator:
    """The generator of sample ``i``'s draws at ``level`` under evaluation ``seed`` (independent of order and
    worker)."""
    return np.random.default_rng([seed, level, i])
