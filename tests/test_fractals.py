"""IFS fractal categories (train/data/fractals.py): the filling filter, the search, perturbation, rendering, batches."""
import pytest
import torch

from train.data.fractals import (MIN_FILL, FractalCategories, FractalImages, contractive_maps, filling_rate, hit_mask,
                                 largest_singular_value, perturb, render, search_categories)


def system(linear, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """One IFS (1, M, 2, 3) with the same linear part in every map and equal probabilities."""
    maps = torch.tensor([[[linear[0][0], linear[0][1], x], [linear[1][0], linear[1][1], y]] for x, y in offsets])
    return maps[None], torch.full((1, len(offsets)), 1 / len(offsets))


SIERPINSKI = system([[0.5, 0], [0, 0.5]], [(0, 0), (0.5, 0), (0.25, 0.5)])
SQUARE = system([[0.5, 0], [0, 0.5]], [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)])  # attractor: the whole unit square
# Rank 1 with singular value 0.8 (contractive; [[.5, .5], [.5, .5]] would have singular value 1): the attractor is a
# segment of the diagonal, about 58 of 4096 pixels once drawn.
LINE = system([[0.4, 0.4], [0.4, 0.4]], [(0, 0), (0.3, 0.3)])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def repeat(ifs, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    maps, probs = ifs
    return maps.expand(n, -1, -1, -1), probs.expand(n, -1)


@pytest.fixture(scope="module")
def categories():
    return search_categories(8, seed=1)


def test_filling_rate_of_systems_of_known_fill():
    # Sierpinski (dimension log2 3 = 1.585) drawn into the 58 px inside the margin: its 3^log2(58) ~ 620 sub-triangles
    # of pixel side each cover 1-2 pixels, 620-1240 of 4096, so 0.15-0.30 (measured ~0.23).
    sierpinski = filling_rate(*repeat(SIERPINSKI, 4), 64, generator=gen(0))
    assert ((0.15 < sierpinski) & (sierpinski < 0.30)).all() and (sierpinski >= MIN_FILL).all()
    assert sierpinski.std() < 0.01  # equal probabilities: the estimate hardly moves between point draws
    # The square covers every pixel inside the 4% margin (centres 3..60), (58 / 64)^2 = 0.82, given enough points; the
    # default 2 per canvas pixel (8192), uniform over its 58^2 pixels, leave a fraction exp(-8192 / 58^2) of them unhit.
    inside = (58 / 64) ** 2
    assert filling_rate(*SQUARE, 64, points=2**17, generator=gen(0)).item() == pytest.approx(inside, abs=0.005)
    expected = inside * (1 - torch.exp(torch.tensor(-8192 / 58**2)).item())
    assert filling_rate(*SQUARE, 64, generator=gen(0)).item() == pytest.approx(expected, abs=0.01)
    line = filling_rate(*LINE, 64, generator=gen(0)).item()
    assert line == pytest.approx(58 / 64**2, abs=0.005) and line < MIN_FILL / 3


def test_search_is_deterministic_and_keeps_only_contractive_well_filled_systems(categories):
    small = search_categories(8, seed=1, resolution=32)  # 4x cheaper than 64 px for the determinism checks
    again = search_categories(8, seed=1, resolution=32)
    assert torch.equal(small.maps, again.maps) and torch.equal(small.probs, again.probs)
    assert not torch.equal(search_categories(8, seed=2, resolution=32).maps, small.maps)
    assert torch.equal(search_categories(3, seed=1, resolution=32).maps, small.maps[:3])  # a smaller k is a prefix
    assert len(categories) == 8 and categories.seed == 1
    used = categories.probs > 0
    assert (categories.fill >= MIN_FILL).all()
    assert (largest_singular_value(categories.maps)[used] <= 0.9 + 1e-6).all()
    weight = torch.linalg.det(categories.maps[..., :2]).abs()
    assert torch.allclose(categories.probs, weight / weight.sum(1, keepdim=True))  # p_i = |det A_i| / sum_j |det A_j|
    assert torch.allclose(categories.probs.sum(1), torch.ones(8))
    assert used.sum(1).min() >= 2 and used.sum(1).max() <= 4
    assert (categories.maps[~used] == 0).all()
    refill = filling_rate(categories.maps, categories.probs, 64, generator=gen(3))
    assert (refill - categories.fill).abs().median() < 0.01  # the accepted fill is a property of the system


def test_perturb_scales_each_parameter_within_the_amount_and_keeps_maps_contractive():
    maps = contractive_maps(4000, 0.85, gen(0), "cpu").view(1000, 4, 2, 3)
    assert torch.allclose(largest_singular_value(maps), torch.linalg.matrix_norm(maps[..., :2], ord=2), atol=1e-6)
    assert torch.equal(perturb(maps, 0.0), maps)
    # |dA| <= 0.1 |A| entrywise keeps the spectral norm under 0.85 * (1 + 0.1 * sqrt(2)) < 0.99: nothing is rescaled.
    ratio = perturb(maps, 0.1, gen(1)) / maps
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.05
    assert torch.equal(perturb(maps, 0.1, gen(1)), perturb(maps, 0.1, gen(1)))
    near_limit = contractive_maps(4000, 0.98, gen(2), "cpu")
    near_limit = near_limit[largest_singular_value(near_limit) > 0.97]
    sigma = largest_singular_value(perturb(near_limit, 0.1, gen(3)))
    assert sigma.max() <= 0.99 + 1e-5 and (sigma > 0.99 - 1e-5).float().mean() > 0.3  # many needed the clamp


def test_render_shape_range_and_seeds(categories):
    images = render(categories.maps, categories.probs, 48, generator=gen(0))
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, render(categories.maps, categories.probs, 48, generator=gen(0)))
    assert not torch.equal(images, render(categories.maps, categories.probs, 48, generator=gen(1)))
    grey = render(categories.maps, categories.probs, 48, generator=gen(0), colour=False)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    with pytest.raises(ValueError, match="background='white'"):
        render(categories.maps, categories.probs, 48, background="white")


def test_black_grayscale_render_covers_the_filling_rate(categories):
    maps = torch.cat((categories.maps, torch.nn.functional.pad(SIERPINSKI[0], (0, 0, 0, 0, 0, 1)), SQUARE[0]))
    probs = torch.cat((categories.probs, torch.nn.functional.pad(SIERPINSKI[1], (0, 1)), SQUARE[1]))
    images = render(maps, probs, 64, generator=gen(5), colour=False, background="black")
    assert set(images.unique().tolist()) == {0.0, 1.0}
    covered = (images[:, 0] > 0).float().mean((1, 2))
    fill = filling_rate(maps, probs, 64, generator=gen(6))
    assert (covered - fill).abs().median() < 0.01 and (covered - fill).abs().max() < 0.05


def test_drawing_guards_degenerate_and_non_finite_points():
    points = torch.tensor([[[0.3, 0.3]] * 4, [[0.0, 0.0], [1.0, 1.0], [float("nan"), 0.5], [float("inf"), 0.0]]])
    mask = hit_mask(points, 17)
    assert mask[0].sum() == 1 and mask[0, 8, 8] == 1  # zero extent: the single point lands in the middle
    assert mask[1].sum() == 2 and mask[1, 15, 1] == 1 and mask[1, 1, 15] == 1  # y up, inside the 4% margin


def test_crop_and_flip_takes_a_window_of_each_canvas():
    images = FractalImages(FractalCategories(*SIERPINSKI, fill=torch.ones(1), seed=0), 6, canvas_scale=1.5)
    canvas = torch.arange(64 * 3 * 9 * 9, dtype=torch.float32).view(64, 3, 9, 9)
    crops = images.crop_and_flip(canvas, gen(0))
    flipped = 0
    for crop, source in zip(crops, canvas):
        row, col = divmod(int(source[0].flatten().tolist().index(crop[0, 0, 0].item())), 9)
        col = col - 5 if crop[0, 0, 0] > crop[0, 0, 1] else col  # a mirrored crop starts at its window's right edge
        window = source[:, row:row + 6, col:col + 6]
        flipped += not torch.equal(crop, window)
        assert torch.equal(crop, window) or torch.equal(crop, window.flip(-1))
    assert 16 < flipped < 48


def iou(masks: torch.Tensor) -> torch.Tensor:
    """(B, B) intersection over union of binary masks, the better of each pair's two left-right orientations."""
    flat, mirrored = masks.flatten(1).float(), masks.flip(-1).flatten(1).float()
    area = flat.sum(1)
    overlap = torch.maximum(flat @ flat.T, flat @ mirrored.T)  # a mask's area is the same mirrored
    return overlap / (area[:, None] + area[None] - overlap)


def test_fractal_images_are_normalised_labelled_and_grouped_by_class(categories):
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    images, labels = FractalImages(categories, 40)(32, gen(0))
    assert images.shape == (32, 3, 40, 40) and labels.shape == (32,)
    assert labels.min() >= 0 and labels.max() < 8 and labels.unique().numel() > 4
    low, high = ((0 - mean) / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()

    plain = FractalImages(categories, 40, canvas_scale=1.0, colour=False, background="black")
    images, labels = plain(96, gen(1))
    assert torch.allclose(images.amin((0, 2, 3)), low.flatten())
    assert torch.allclose(images.amax((0, 2, 3)), high.flatten())
    overlap = iou(images[:, 0] > 0)
    same = labels[:, None] == labels[None]
    pairs = same & ~torch.eye(96, dtype=torch.bool)
    assert pairs.any() and (overlap[pairs] < 0.99).all()  # instances of a class differ
    assert overlap[pairs].mean() > overlap[~same].mean() + 0.1
