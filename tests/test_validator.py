"""The validator's levels pinned to the facts of the subnet's code (train/data/validator.py; parity with the code
itself is measured by ``python -m train.bench validator``, which needs a checkout of the subnet)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.transforms import ValidatorQuery
from train.data.validator import (DISTORTION_PARAMS, SUBNET_COMMIT, QueryDraw, distort, draw_query, keep_point,
                                  render_query, square_crop, wire_jpeg)


def solid(rgb, size=16) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1).expand(3, size, size).clone()


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def test_the_subnet_commit_is_named():
    assert len(SUBNET_COMMIT) == 40 and SUBNET_COMMIT.startswith("28a1755")


def test_levels_are_drawn_a_quarter_each():
    rng = np.random.default_rng(0)
    levels = [draw_query(rng, 256, 256).level for _ in range(4000)]
    assert np.allclose(np.bincount(levels, minlength=4) / 4000, 0.25, atol=0.025)


def test_each_level_draws_the_subnets_distortions():
    rng = np.random.default_rng(1)
    draws = {lv: [draw_query(rng, 200, 300, level=lv) for _ in range(300)] for lv in (0, 1, 2, 3)}
    assert draws[0][0] == QueryDraw(0) and all(d.distortions == () for d in draws[1])
    for level, names, top in ((2, ["CS", "CC", "JPEG"], 1), (3, ["CS", "CC", "JPEG", "GNC", "GB"], 2)):
        assert all([n for n, _ in d.distortions] == names for d in draws[level])
        seen = {lv for d in draws[level] for _, lv in d.distortions}
        assert seen == set(range(top + 1))  # 0 (not applied) .. top, uniformly
    angles = [d.angle for d in draws[1]]
    assert -20 <= min(angles) < -17 and 17 < max(angles) <= 20


@pytest.mark.parametrize("height,width", [(256, 256), (200, 300), (1080, 1920), (40, 400)])
def test_crops_are_squares_of_a_fifth_to_all_of_the_area(height, width):
    rng = np.random.default_rng(2)
    for _ in range(200):
        i, j, h, w = square_crop(rng, height, width)
        assert h == w and 0 <= i <= height - h and 0 <= j <= width - w
        if (height, width) != (40, 400):
            assert 0.2 - 0.02 <= h * w / (height * width) <= 1.0
    assert square_crop(rng, 40, 400) == (0, 180, 40, 40)  # no square of 20% fits: the centred one of the short side


def test_a_mask_point_is_kept_in_the_crop():
    rng = np.random.default_rng(3)
    for _ in range(200):
        x, y = (int(v) for v in rng.integers(0, 256, 2))
        i, j, h, w = keep_point(square_crop(rng, 256, 256), (x, y), 256, 256)
        assert j <= x <= j + w and i <= y <= i + h


def test_level0_frames_the_centre_square_and_resizes_to_224():
    image = np.zeros((300, 500, 3), np.uint8)
    image[:, 100:400] = 255  # the centred 300x300 square is white, the sides black
    out = as_uint8(render_query(image, QueryDraw(0)))
    assert out.shape == (3, 224, 224) and int(out.min()) == 255


def test_level1_rotates_by_nearest_neighbour_with_zeros_and_never_flips():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = 200  # left half bright
    full = (0, 0, 64, 64)
    straight = as_uint8(render_query(image, QueryDraw(1, 0.0, full)))
    assert straight[:, :, :100].float().mean() > 190 and straight[:, :, 124:].float().mean() < 10  # not flipped
    rotated = render_query(np.full((64, 64, 3), 200, np.uint8), QueryDraw(1, 20.0, full))
    assert as_uint8(rotated)[:, 0, 0].tolist() == [0, 0, 0]  # a corner left empty by the rotation is zero
    crop_free = render_query(np.full((224, 224, 3), 200, np.uint8), QueryDraw(1, 20.0, (0, 0, 224, 224)))
    assert set(as_uint8(crop_free).unique().tolist()) == {0, 200}  # nearest neighbour: no blend at the edge


def test_distortion_parameters_are_the_deeperforensics_table():
    assert DISTORTION_PARAMS == {"CS": (0.4, 0.3, 0.2, 0.1, 0.0), "CC": (0.85, 0.725, 0.6, 0.475, 0.35),
                                 "JPEG": (2, 3, 4, 5, 6), "GNC": (0.001, 0.002, 0.005, 0.01, 0.05),
                                 "GB": (7, 9, 13, 17, 21)}


def test_contrast_multiplies_the_pixels_and_truncates():
    assert as_uint8(distort(solid((200, 40, 41)), "CC", 1))[:, 0, 0].tolist() == [170, 34, 34]  # 41 * .85 = 34.85
    assert as_uint8(distort(solid((200, 40, 40)), "CC", 2))[:, 0, 0].tolist() == [145, 29, 29]


def test_saturation_moves_colours_towards_grey():
    red = [as_uint8(distort(solid((200, 40, 40)), "CS", lv))[:, 0, 0].tolist() for lv in (1, 2, 5)]
    assert red[0] == [132, 68, 68] and red[1] == [121, 73, 73] and red[2] == [87, 87, 87]  # 0.0: grey
    assert as_uint8(distort(solid((128, 128, 128)), "CS", 1))[:, 0, 0].tolist() == [127, 128, 127]


def test_jpeg_is_a_down_and_up_sampling_by_its_factor():
    stripes = torch.zeros(3, 24, 24)
    stripes[:, :, ::2] = 1.0  # one-pixel columns
    halved = distort(stripes, "JPEG", 1)  # factor 2: each pair of columns becomes one, then two equal ones again
    assert halved.shape == stripes.shape and float(halved.std()) == 0.0
    assert float(distort(stripes, "JPEG", 2).std()) > 0.1  # factor 3 does not average pairs away
    smooth = solid((90, 120, 150), 24)
    assert torch.equal(as_uint8(distort(smooth, "JPEG", 1)), as_uint8(smooth))


def test_noise_grows_with_its_variance_and_blur_smooths():
    grey = solid((128, 128, 128), 64)
    spread = [float(as_uint8(distort(grey, "GNC", lv, noise_seed=0)).float().std()) for lv in (1, 3, 5)]
    assert 0 < spread[0] < spread[1] < spread[2]
    assert torch.equal(distort(grey, "GNC", 2, noise_seed=4), distort(grey, "GNC", 2, noise_seed=4))
    noisy = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    blurred = [float(distort(noisy, "GB", lv).std()) for lv in (1, 2)]
    assert blurred[1] < blurred[0] < 0.5 * float(noisy.std())


def test_the_wire_is_a_jpeg_at_pils_default_quality():
    query = render_query(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8), QueryDraw(0))
    data = wire_jpeg(query)
    sent = Image.open(io.BytesIO(data))
    assert sent.format == "JPEG" and sent.size == (224, 224)

    def tables(quality):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG", quality=quality)
        return Image.open(buf).quantization

    assert sent.quantization == tables(75) != tables(90)
    assert ValidatorQuery(0)(np.zeros((300, 400, 3), np.uint8), 0).shape == (224, 224, 3)  # what the miner decodes
