"""Training augmentation on the device, for batches of decode-once uint8 shards (``data.train_source=shards``).

:meth:`GpuAugment.draw` runs in the loader workers: each sample's parameters (rotation, RandomResizedCrop box,
horizontal flip, colour jitter) come from its own seed, as :class:`~train.data.sampling.EpochSampler` hands them
out, so a resumed run draws exactly what an unbroken one would. :meth:`GpuAugment.__call__` applies a batch's
parameters on the device: one ``grid_sample`` (rotate + crop + resize + flip, bilinear; a crop's edge pixels
repeat as a resize's do, and a rotation's corners are black as ``albumentations.Rotate`` and the validator fill them),
elementwise ops (jitter, normalise), a few fused kernels when compiled; uint8 NHWC in, float32 NCHW out.
It runs on the CPU too (tests), just slower.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PARAMS = ("cx", "cy", "half_w", "half_h", "angle", "flip", "brightness", "contrast", "saturation")
TRIES = 10  # RandomResizedCrop's attempts at a box inside the image (as torchvision / albumentations)
UNIFORMS = 2 * TRIES + 9
LUMA = (0.299, 0.587, 0.114)


class GpuAugment:
    """RandomResizedCrop to ``img_size`` (``scale`` of the area, aspect ``ratio``), rotation up to +-``rotate``
    degrees with probability ``rotate_p``, horizontal flip with ``hflip_p``, colour jitter (brightness, contrast,
    saturation factors in 1 +- the value) with ``jitter_p``; then ``(x / 255 - mean) / std``. ``compile`` runs the
    device part through ``torch.compile``.

    Crop boxes are in the shard's normalised coordinates: the whole square shard is [-1, 1]^2.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 rotate: float = 0.0, rotate_p: float = 0.0, hflip_p: float = 0.5, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, jitter_p: float = 0.0, compile: bool = False):
        self.img_size, self.mean, self.std = int(img_size), tuple(mean), tuple(std)
        self.scale, self.ratio = tuple(map(float, scale)), tuple(map(float, ratio))
        self.rotate, self.rotate_p, self.hflip_p = float(rotate), float(rotate_p), float(hflip_p)
        self.jitter = (float(brightness), float(contrast), float(saturation))
        self.jitter_p = float(jitter_p) if any(self.jitter) else 0.0
        self.compile, self._fn = bool(compile), None
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # --- in the loader workers (numpy, per sample seeds) -----------------------------------------
    def draw(self, seeds: Sequence[int]) -> np.ndarray:
        """One row of :data:`PARAMS` per seed (float32), a function of the seed alone."""
        u = np.stack([np.random.default_rng(int(s)).random(UNIFORMS) for s in seeds]).reshape(len(seeds), UNIFORMS)
        w, h = self._box(u[:, :TRIES], u[:, TRIES:2 * TRIES])
        x0, y0 = u[:, 2 * TRIES] * (1 - w), u[:, 2 * TRIES + 1] * (1 - h)
        rest = u[:, 2 * TRIES + 2:]
        angle = np.where(rest[:, 0] < self.rotate_p, np.radians((2 * rest[:, 1] - 1) * self.rotate), 0.0)
        flip = np.where(rest[:, 2] < self.hflip_p, -1.0, 1.0)
        on = rest[:, 3] < self.jitter_p
        jitter = [np.where(on, 1 + (2 * rest[:, 4 + k] - 1) * amount, 1.0) for k, amount in enumerate(self.jitter)]
        columns = [2 * x0 + w - 1, 2 * y0 + h - 1, w, h, angle, flip, *jitter]
        return np.stack(columns, axis=1).astype(np.float32)

    def _box(self, u_area: np.ndarray, u_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Width and height (fractions of the side) of the first of :data:`TRIES` draws that fits; else the whole
        image (torchvision's fallback for a square image whose aspect is within ``ratio``)."""
        area = self.scale[0] + u_area * (self.scale[1] - self.scale[0])
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = np.exp(log_low + u_ratio * (log_high - log_low))
        w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
        fits = (w <= 1) & (h <= 1)
        first = fits.argmax(axis=1)
        rows = np.arange(len(w))
        found = fits.any(axis=1)
        return np.where(found, w[rows, first], 1.0), np.where(found, h[rows, first], 1.0)

    # --- on the device ---------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, S, S, 3]`` + :meth:`draw`'s ``[B, 9]`` (same device) -> float32 ``[B, 3, img, img]``."""
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"shards hold square images; got a batch of {tuple(images.shape)}")
        if self._fn is None:  # compiled: the crop's gathers and the elementwise ops fused into a few kernels
            self._fn = torch.compile(augment, dynamic=False) if self.compile else augment
        return self._fn(images, params, *self.constants(images.device), self.img_size, self.rotate_p > 0,
                        self.jitter_p > 0)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255 * mean, 1 / (255 * std) and the luma weights as ``[1, 3, 1, 1]`` tensors, made once per device (a
        fresh host-to-device copy per batch would make the host wait for the device)."""
        if device not in self._constants:
            def column(values):
                return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)
            self._constants[device] = (column([255 * m for m in self.mean]),
                                       column([1 / (255 * s) for s in self.std]), column(LUMA))
        return self._constants[device]

    def __getstate__(self) -> dict:  # loader workers only draw: device tensors and compiled code stay behind
        return {**self.__dict__, "_constants": {}, "_fn": None}


def augment(images: torch.Tensor, params: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
            luma: torch.Tensor, size: int, rotated: bool, jitter: bool) -> torch.Tensor:
    """:meth:`GpuAugment.__call__`'s work: ``grid_sample`` through :func:`theta` (the border repeats, as a resize of
    the crop does; black outside a rotated image), colour jitter, then ``(x - shift) * scale``."""
    x = images.permute(0, 3, 1, 2).float()  # a view: NCHW with channels-last strides, 0-255
    p = params.float()
    grid = F.affine_grid(theta(p), [len(x), 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if rotated:
        x = x * (grid.abs() <= 1).all(-1).unsqueeze(1)
    if jitter:
        x = colour_jitter(x, p[:, 6:9], luma)
    return (x - shift) * scale


def theta(p: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` affine maps from output coordinates to the shard's: flip, scale to the box, move to its centre,
    rotate about the image centre."""
    cos, sin = p[:, 4].cos(), p[:, 4].sin()
    sx, sy, cx, cy = p[:, 2] * p[:, 5], p[:, 3], p[:, 0], p[:, 1]
    return torch.stack([torch.stack([cos * sx, -sin * sy, cos * cx - sin * cy], 1),
                        torch.stack([sin * sx, cos * sy, sin * cx + cos * cy], 1)], 1)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """Brightness (a blend with black), contrast (with the mean grey), saturation (with each pixel's grey) by the
    ``[B, 3]`` factors, clamped to 0-255 after each, as torchvision's ``adjust_*`` do."""
    b, c, s = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = (x * b).clamp(0, 255)
    grey = (x * luma).sum(1, keepdim=True)
    x = torch.lerp(grey.mean((2, 3), keepdim=True), x, c).clamp(0, 255)
    grey = (x * luma).sum(1, keepdim=True)
    return torch.lerp(grey, x, s).clamp(0, 255)
