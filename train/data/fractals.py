"""Formula-driven pretraining images: iterated-function-system (IFS) fractals, rendered in batches on any device.

Categories are searched as FractalDB does (Kataoka et al. 2020): random contractive affine maps, kept when the
attractor fills enough of the canvas. Each image perturbs its category's parameters by a few percent, as 1p-frac /
OFDB do (Nakamura et al. 2024), so one category is a family of close shapes. Every random draw goes through the
``generator`` argument (a ``torch.Generator`` on the tensors' device; ``None`` is the global RNG).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BURN_IN = 10  # chaos-game steps dropped before points are kept
KEPT_STEPS = 32  # steps kept per trajectory: the Python loop's length; trajectories grow with the point count
MARGIN = 0.04  # blank border, as a fraction of the canvas side
NOISE = 0.04  # std of the random background's pixel noise
MAX_SIGMA_PERTURBED = 0.99  # largest singular value a perturbed map may keep
SEARCH_BATCH = 512  # candidates a search evaluates at once; fixed, so a search for k is a prefix of one for more
MIN_FILL = 0.1  # filling rate at 64 px a category needs: Sierpinski ~0.23, median random system ~0.1, lines <0.03


@dataclass(frozen=True)
class FractalCategories:
    """K IFS systems, padded to the largest map count: ``maps`` (K, M, 2, 3) affine maps [A | b], ``probs`` (K, M) map
    probabilities (0 for padding), ``fill`` (K,) the filling rate each was accepted with, ``seed`` the search seed."""
    maps: torch.Tensor
    probs: torch.Tensor
    fill: torch.Tensor
    seed: int

    def to(self, device) -> FractalCategories:
        """The same categories with their tensors on ``device``."""
        return dataclasses.replace(self, maps=self.maps.to(device), probs=self.probs.to(device),
                                   fill=self.fill.to(device))

    def __len__(self) -> int:
        return self.maps.shape[0]


def default_points(size: int) -> int:
    """Chaos-game points per image of side ``size``: about two per pixel (too few points collapse FDSL accuracy)."""
    return 2 * size * size


def largest_singular_value(maps: torch.Tensor) -> torch.Tensor:
    """(...) spectral norm of each map's linear part A = [[a, b], [c, d]], in closed form (no batched SVD)."""
    a, b, c, d = maps[..., 0, 0], maps[..., 0, 1], maps[..., 1, 0], maps[..., 1, 1]
    return (torch.hypot(a + d, c - b) + torch.hypot(a - d, b + c)) / 2


def fixed_points(maps: torch.Tensor) -> torch.Tensor:
    """(..., M, 2) x = A x + b of each map (0 where I - A is singular): points on the attractor."""
    a, b, tx, c, d, ty = maps.flatten(-2).unbind(-1)
    det = (1 - a) * (1 - d) - b * c
    x = torch.stack(((1 - d) * tx + b * ty, c * tx + (1 - a) * ty), -1) / det[..., None]
    return torch.where(x.isfinite(), x, torch.zeros_like(x))


def render_points(maps, probs, n_points, generator=None) -> torch.Tensor:
    """(B, n_points, 2) attractor points of each system (the shared chaos-game core used by render and filling_rate).

    T trajectories per system run side by side; each starts at the fixed point of a map drawn from ``probs`` (already
    on the attractor, so even a barely contractive system has no stray points), runs ``BURN_IN`` steps to mix, then
    keeps ``KEPT_STEPS`` steps. The result is a view whose x and y planes are each contiguous.
    """
    batch, n_maps = probs.shape
    trajectories = math.ceil(n_points / KEPT_STEPS)
    steps = BURN_IN + KEPT_STEPS
    choice = torch.multinomial(probs.float(), (steps + 1) * trajectories, replacement=True, generator=generator)
    offset = n_maps * torch.arange(batch, device=probs.device)[:, None]
    choice = (choice.view(batch, steps + 1, trajectories) + offset[..., None]).transpose(0, 1).reshape(steps + 1, -1)
    params = maps.float().reshape(batch * n_maps, 6).T.contiguous()  # (6, B*M): a, b, tx, c, d, ty
    x, y = fixed_points(maps.float()).reshape(batch * n_maps, 2).T.contiguous().index_select(1, choice[0])
    kept = torch.empty(batch, 2, KEPT_STEPS, trajectories, device=maps.device)
    for step in range(steps):
        a, b, tx, c, d, ty = params.index_select(1, choice[step + 1])
        x, y = torch.addcmul(tx, a, x).addcmul_(b, y), torch.addcmul(ty, c, x).addcmul_(d, y)
        if step >= BURN_IN:
            kept[:, 0, step - BURN_IN] = x.view(batch, trajectories)
            kept[:, 1, step - BURN_IN] = y.view(batch, trajectories)
    return kept.view(batch, 2, -1)[..., :n_points].transpose(1, 2)


def hit_mask(points: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size) float 0/1: the pixels hit once each image's points are scaled to its own bounding box
    (per axis, inside a ``MARGIN`` border; non-finite points are skipped, a zero extent lands in the middle)."""
    batch = points.shape[0]
    margin = MARGIN * size
    valid = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
    pixels = []
    for coordinate in points.unbind(-1):  # x, then y
        finite = coordinate.isfinite()
        low = torch.where(finite, coordinate, math.inf).amin(1, keepdim=True)
        extent = torch.where(finite, coordinate, -math.inf).amax(1, keepdim=True) - low
        spread = extent.isfinite() & (extent > 1e-12)
        unit = torch.where(spread, (coordinate - low) / torch.where(spread, extent, 1.0), 0.5)
        pixel = (margin + unit * (size - 1 - 2 * margin)).round_()
        valid &= pixel.isfinite()
        pixels.append(pixel.nan_to_num_(0.0).clamp_(0, size - 1).long())
    column, row = pixels[0], size - 1 - pixels[1]
    image = torch.arange(batch, device=points.device)[:, None]
    flat = torch.where(valid, (image * size + row) * size + column, batch * size * size)  # skipped: one spare cell
    canvas = torch.zeros(batch * size * size + 1, device=points.device)
    canvas.index_fill_(0, flat.flatten(), 1.0)
    return canvas[:-1].view(batch, size, size)


def filling_rate(maps, probs, resolution: int = 64, points: int | None = None, generator=None) -> torch.Tensor:
    """(B,) fraction of a resolution^2 canvas the systems' attractors cover (bounding-box normalised, as rendered)."""
    n_points = points or default_points(resolution)
    return hit_mask(render_points(maps, probs, n_points, generator), resolution).mean((1, 2))


def perturb(maps: torch.Tensor, amount: float, generator=None) -> torch.Tensor:
    """Per-instance maps: every one of the 6 parameters of every map multiplied by an independent U(1-amount, 1+amount)
    factor (amount=0.1 is 1p-frac's +-10%); maps whose largest singular value then exceeds 0.99 are scaled back to 0.99
    (the linear part A only)."""
    factor = 1 + amount * (2 * torch.rand(maps.shape, device=maps.device, generator=generator) - 1)
    maps = maps.float() * factor
    shrink = (MAX_SIGMA_PERTURBED / largest_singular_value(maps)).clamp(max=1.0)
    return torch.cat((maps[..., :2] * shrink[..., None, None], maps[..., 2:]), -1)


def render(maps, probs, size: int, points: int | None = None, generator=None, colour: bool = True,
           background: str = "random") -> torch.Tensor:
    """(B, 3, size, size) float images in [0, 1]: each system's attractor (``points`` chaos-game points, default
    :func:`default_points`) drawn in a random colour (``colour``) or white, on a ``background``: 'random' (a random
    colour, or grey when not ``colour``, at least 0.25 per channel away from the fractal's, plus light noise) or
    'black'."""
    if background not in ("random", "black"):
        raise ValueError(f"background={background!r}; allowed: 'random', 'black'")
    mask = hit_mask(render_points(maps, probs, points or default_points(size), generator), size)[:, None]
    batch, device = mask.shape[0], mask.device
    colours = (batch, 3 if colour else 1, 1, 1)
    fg = torch.rand(colours, device=device, generator=generator) if colour else torch.ones(colours, device=device)
    if background == "black":
        bg = torch.zeros_like(mask)
    else:
        offset = 0.25 + 0.5 * torch.rand(colours, device=device, generator=generator)
        bg = (fg + offset) % 1  # under a white fractal: grey in [0.25, 0.75]
        noise = torch.randn(batch, colours[1], size, size, device=device, generator=generator)
        bg = (bg + NOISE * noise).clamp(0, 1)
    return torch.lerp(bg, fg, mask).expand(batch, 3, size, size).contiguous()


class FractalImages:
    """Batches of labelled fractal images on the categories' device: ``__call__(batch_size, generator) -> (images
    (B, 3, size, size), labels (B,))``. Labels are uniform over the categories; each image perturbs its category by
    ``perturbation``, is rendered on a canvas of ``round(size * canvas_scale)`` px, randomly cropped to ``size`` and
    flipped, then normalised with ``mean`` / ``std``."""

    def __init__(self, categories: FractalCategories, size: int, perturbation: float = 0.1, points: int | None = None,
                 canvas_scale: float = 1.25, colour: bool = True, background: str = "random",
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.categories, self.size, self.perturbation, self.points = categories, size, perturbation, points
        self.canvas = round(size * canvas_scale)
        if self.canvas < size:
            raise ValueError(f"canvas_scale={canvas_scale} gives a canvas smaller than size={size}")
        self.colour, self.background = colour, background
        device = categories.maps.device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch_size: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.categories.maps.device
        labels = torch.randint(len(self.categories), (batch_size,), device=device, generator=generator)
        maps = perturb(self.categories.maps[labels], self.perturbation, generator)
        canvas = render(maps, self.categories.probs[labels], self.canvas, self.points, generator, self.colour,
                        self.background)
        images = self.crop_and_flip(canvas, generator)
        return (images - self.mean) / self.std, labels

    def crop_and_flip(self, canvas: torch.Tensor, generator=None) -> torch.Tensor:
        """A random ``size`` crop of each canvas, mirrored left-right with probability 1/2, by one gather."""
        batch, device = canvas.shape[0], canvas.device
        corner = torch.randint(self.canvas - self.size + 1, (2, batch, 1), device=device, generator=generator)
        flip = torch.rand(batch, 1, device=device, generator=generator) < 0.5
        steps = torch.arange(self.size, device=device)
        rows = corner[0] + steps
        cols = corner[1] + torch.where(flip, self.size - 1 - steps, steps)
        image = torch.arange(batch, device=device)[:, None, None]
        return canvas[image, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def contractive_maps(count: int, max_sigma: float, generator, device) -> torch.Tensor:
    """(count, 2, 3) maps with the 6 parameters uniform in [-1, 1], redrawn until the largest singular value of A is
    at most ``max_sigma`` (per-map rejection)."""
    kept, total = [], 0
    while total < count:
        maps = 2 * torch.rand(4 * (count - total), 2, 3, device=device, generator=generator) - 1
        maps = maps[largest_singular_value(maps) <= max_sigma]
        kept.append(maps)
        total += len(maps)
    return torch.cat(kept)[:count]


def random_systems(count: int, n_maps: tuple[int, int], max_sigma: float, generator, device):
    """``count`` candidate systems of n in [n_maps] contractive maps, padded to n_maps[1]: (maps, probs) with
    p_i = |det A_i| / sum_j |det A_j| (FractalDB's rule)."""
    lowest, most = n_maps
    n = torch.randint(lowest, most + 1, (count, 1), device=device, generator=generator)
    used = torch.arange(most, device=device) < n
    maps = contractive_maps(count * most, max_sigma, generator, device).view(count, most, 2, 3) * used[..., None, None]
    weight = (maps[..., 0, 0] * maps[..., 1, 1] - maps[..., 0, 1] * maps[..., 1, 0]).abs()  # |det A|
    return maps, weight / weight.sum(1, keepdim=True).clamp_min(1e-12)


def search_categories(k: int, seed: int = 0, n_maps: tuple[int, int] = (2, 4), max_sigma: float = 0.9,
                      min_fill: float = MIN_FILL, resolution: int = 64, device="cpu") -> FractalCategories:
    """FractalDB's search: draw systems of n in [n_maps] random contractive maps (largest singular value <= max_sigma),
    render each at ``resolution`` and accept it when its filling rate >= ``min_fill``, until k are accepted.
    Deterministic in ``seed`` (per device); candidates go ``SEARCH_BATCH`` at a time, so a smaller k gives a prefix."""
    generator = torch.Generator(device=device).manual_seed(seed)
    found, total = [], 0
    while total < k:
        maps, probs = random_systems(SEARCH_BATCH, n_maps, max_sigma, generator, device)
        fill = filling_rate(maps, probs, resolution, generator=generator)
        keep = fill >= min_fill
        found.append((maps[keep], probs[keep], fill[keep]))
        total += int(keep.sum())
    maps, probs, fill = (torch.cat(parts)[:k] for parts in zip(*found))
    return FractalCategories(maps=maps, probs=probs, fill=fill, seed=seed)
