"""The shards path's device augmentation (train/data/gpu_augment.py), on the CPU: boxes, flips, normalisation, seeds."""
import math

import numpy as np
import pytest
import torch

from train.data.gpu_augment import PARAMS, GpuAugment

S = 32


def plain(**kwargs) -> GpuAugment:
    """No rotation, flip or jitter unless asked; mean 0, std 1 (outputs are pixels / 255)."""
    settings = {"img_size": S, "mean": (0, 0, 0), "std": (1, 1, 1), "hflip_p": 0.0, **kwargs}
    return GpuAugment(**settings)


def params(aug: GpuAugment, seeds) -> torch.Tensor:
    return torch.from_numpy(aug.draw(seeds))


def test_draws_are_a_function_of_each_seed_and_boxes_stay_inside():
    aug = GpuAugment(S, (0.5,) * 3, (0.5,) * 3, rotate=20, rotate_p=0.3, brightness=0.2, jitter_p=0.5)
    p = aug.draw(range(2000))
    assert p.shape == (2000, len(PARAMS)) and p.dtype == np.float32
    assert np.array_equal(aug.draw([7, 3])[1], aug.draw([3])[0])  # neither the batch nor the position matters
    assert not np.array_equal(aug.draw([1]), aug.draw([2]))
    cx, cy, w, h, angle, flip, bright = (p[:, k] for k in range(7))
    assert (np.abs(cx) + w <= 1 + 1e-6).all() and (np.abs(cy) + h <= 1 + 1e-6).all()
    assert 0.35 - 1e-6 <= (w * h).min() and (w * h).max() <= 1 + 1e-6
    assert (w / h).min() >= 0.75 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert abs((angle != 0).mean() - 0.3) < 0.05 and np.abs(angle).max() <= math.radians(20) + 1e-6
    assert abs((flip < 0).mean() - 0.5) < 0.05 and abs((bright != 1).mean() - 0.5) < 0.05


def test_output_shape_dtype_and_normalisation():
    aug = GpuAugment(24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    images = torch.full((4, S, S, 3), 200, dtype=torch.uint8)
    out = aug(images, params(aug, range(4)))
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32
    expected = (200 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_the_whole_image_at_its_own_size_is_the_identity_and_a_flip_flips():
    images = torch.randint(0, 256, (3, S, S, 3), dtype=torch.uint8)
    pixels = images.permute(0, 3, 1, 2).float() / 255
    same = plain(scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(same(images, params(same, range(3))), pixels, atol=1e-5)
    flipped = plain(scale=(1, 1), ratio=(1, 1), hflip_p=1.0)
    assert torch.allclose(flipped(images, params(flipped, range(3))), pixels.flip(-1), atol=1e-5)


def test_a_crop_samples_the_box_it_drew():
    """A horizontal ramp (pixel x holds 4x): a box of half the side resized to half the side reads x0 + j."""
    ramp = (4 * torch.arange(S)).to(torch.uint8).view(1, 1, S, 1).expand(5, S, S, 3).contiguous()
    aug = plain(img_size=S // 2, scale=(0.25, 0.25), ratio=(1, 1))
    p = params(aug, range(5))
    out = aug(ramp, p) * 255 / 4
    left = (p[:, 0] - p[:, 2] + 1) / 2 * S  # the box's left edge in pixels
    expected = left.view(-1, 1) + torch.arange(S // 2).view(1, -1)
    assert torch.allclose(out[:, 0, 3, :], expected, atol=1e-3)


def test_a_quarter_turn_rotates_the_image_and_corners_left_by_a_rotation_are_black():
    images = torch.randint(1, 256, (2, S, S, 3), dtype=torch.uint8)
    p = torch.tensor([[0, 0, 1, 1, math.pi / 2, 1, 1, 1, 1]] * 2, dtype=torch.float32)
    out = plain(rotate=90, rotate_p=1.0)(images, p)
    assert torch.allclose(out, torch.rot90(images.permute(0, 3, 1, 2).float() / 255, 1, (2, 3)), atol=1e-4)
    p[:, 4] = math.pi / 4
    out = plain(rotate=45, rotate_p=1.0)(images, p)
    assert out[:, :, 0, 0].eq(0).all() and out[:, :, -1, -1].eq(0).all() and out[:, :, S // 2, S // 2].gt(0).all()


def test_jitter_scales_brightness_and_clamps():
    aug = plain(scale=(1, 1), ratio=(1, 1), brightness=0.5, jitter_p=1.0)
    images = torch.randint(0, 256, (4, S, S, 3), dtype=torch.uint8)
    p = params(aug, range(4))
    expected = (images.permute(0, 3, 1, 2).float() * p[:, 6].view(-1, 1, 1, 1)).clamp(0, 255) / 255
    assert torch.allclose(aug(images, p), expected, atol=1e-5)
    assert (p[:, 6] != 1).all() and p[:, 7:].eq(1).all()


def test_the_same_seeds_give_the_same_batch():
    aug = GpuAugment(24, (0.5,) * 3, (0.5,) * 3, rotate=20, rotate_p=0.5, brightness=0.2, contrast=0.3,
                     saturation=0.3, jitter_p=0.5)
    images = torch.randint(0, 256, (6, S, S, 3), dtype=torch.uint8)
    assert torch.equal(aug(images, params(aug, range(6))), aug(images, params(aug, range(6))))
    assert not torch.equal(aug(images, params(aug, range(6))), aug(images, params(aug, range(1, 7))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_device_computes_what_the_cpu_does():
    aug = GpuAugment(224, (0.5,) * 3, (0.5,) * 3, rotate=20, rotate_p=0.5, brightness=0.2, contrast=0.3,
                     saturation=0.3, jitter_p=0.5)
    images, p = torch.randint(0, 256, (16, 256, 256, 3), dtype=torch.uint8), params(aug, range(16))
    on_gpu = aug(images.cuda(non_blocking=True), p.cuda()).cpu()
    off = (on_gpu - aug(images, p)).abs() > 2e-3  # a pixel on a rotated frame's very edge may round either way
    assert off.float().mean() < 1e-4


def test_compiled_equals_eager():
    settings = dict(img_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, rotate=20, rotate_p=0.5, brightness=0.2,
                    contrast=0.3, saturation=0.3, jitter_p=0.5)
    images = torch.randint(0, 256, (4, S, S, 3), dtype=torch.uint8)
    eager, compiled = GpuAugment(**settings), GpuAugment(**settings, compile=True)
    p = params(eager, range(4))
    assert torch.allclose(compiled(images, p), eager(images, p), atol=1e-4)
