"""Drawing primitives for the synthetic street scenes: a pinhole camera, world polygons, sprites.

World axes: x to the right of the road centre, y up, z along the road (metres). Sprites are
drawn in metres around their ground contact point, scaled by the camera's pixels per metre at
their depth. Colours are RGB tuples; every colour passes through a ``Tone`` (time of day, rain)
except lights, which are drawn as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import cv2
import numpy as np

SHIFT = 3                # fixed-point bits: sub-pixel polygon edges
ONE = 1 << SHIFT
AA = cv2.LINE_AA
NEAR = 0.3               # near clipping plane (m)
LIMIT = 1e5              # pixel coordinates are clamped to +-LIMIT before fixed-point conversion
SPECKLES = np.random.default_rng(7).random((14, 3))   # fixed speckle pattern for gravel piles

GLASS = (52, 64, 78)
TYRE = (28, 28, 30)
WHITE = (235, 235, 230)
BLACK = (20, 20, 22)
SILVER = (205, 208, 210)
SKIN = ((224, 180, 150), (190, 140, 105), (140, 95, 65), (95, 65, 45))


@dataclass(frozen=True)
class Camera:
    """A yawed pinhole camera; ``cv`` is the horizon row."""
    x: float
    z: float
    height: float
    yaw: float       # radians, positive looks to the right
    focal: float     # pixels
    cu: float
    cv: float
    size: int

    @cached_property
    def _rotation(self) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def to_camera(self, pts: np.ndarray) -> np.ndarray:
        """World points (..., 3) as x, y, z -> camera coordinates (..., 3): right, up, forward."""
        return (pts - (self.x, self.height, self.z)) @ self._rotation

    def image_plane(self, cam_pts: np.ndarray) -> np.ndarray:
        """Camera coordinates (..., 3) with positive depth -> pixel coordinates (..., 2)."""
        return cam_pts[..., :2] * (self.focal / cam_pts[..., 2:3]) * (1.0, -1.0) + (self.cu, self.cv)


class Tone:
    """Colour grading shared by every drawn surface: per-channel gain plus an offset."""

    def __init__(self, gain=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0), night: bool = False):
        self.gain, self.offset, self.night, self.cache = gain, offset, night, {}

    def __call__(self, colour) -> tuple:
        toned = self.cache.get(colour)
        if toned is None:
            toned = self.cache[colour] = tuple(min(255, max(0, int(c * g + o)))
                                               for c, g, o in zip(colour, self.gain, self.offset))
        return toned

    def reflective(self, colour) -> tuple:
        """Retro-reflective paint: at night it shines back in the headlights instead of going dark."""
        return shade(colour, 0.85) if self.night else self(colour)


def fixed(uv: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> clamped fixed-point int32."""
    return np.rint(np.clip(uv, -LIMIT, LIMIT) * ONE).astype(np.int32)


def clip_near(polys: np.ndarray) -> list[np.ndarray]:
    """Clip camera-space polygons (Q, K, 3) to depth >= NEAR (Sutherland-Hodgman against one plane).

    Each polygon keeps its vertices in front and gains the points where its edges cross the plane;
    polygons left with fewer than three vertices are dropped.
    """
    a, b = polys, np.roll(polys, -1, axis=1)
    a_in, b_in = a[..., 2] >= NEAR, b[..., 2] >= NEAR
    crossing = a_in != b_in
    t = (NEAR - a[..., 2]) / np.where(crossing, b[..., 2] - a[..., 2], 1.0)
    slots = np.stack([a, a + t[..., None] * (b - a)], 2).reshape(len(polys), -1, 3)
    keep = np.stack([a_in, crossing], 2).reshape(len(polys), -1)
    return [s[k] for s, k in zip(slots, keep) if k.sum() >= 3]


class Surfaces:
    """World polygons drawn in order, projected once per view; those crossing the near plane are clipped."""

    def __init__(self, layers: list):
        self.items, chunks, sizes, start = [], [], [], 0
        for polys, colour in layers:
            arr = np.asarray(polys, np.float64)
            if arr.size:
                q, k = arr.shape[:2]
                self.items.append((colour, start, len(sizes), q, k))
                chunks.append(arr.reshape(-1, 3))
                sizes += [k] * q
                start += q * k
        self.vertices = np.concatenate(chunks) if chunks else np.zeros((0, 3))
        self.poly_starts = np.cumsum([0] + sizes[:-1]) if sizes else np.zeros(0, int)

    def draw(self, img: np.ndarray, cam: Camera, tone: Tone) -> None:
        """Fill every polygon into ``img`` as ``cam`` sees it, in order, each colour through ``tone``."""
        if not self.items:
            return
        c = cam.to_camera(self.vertices)
        front = c[:, 2] > NEAR
        px = fixed(cam.image_plane(np.where(front[:, None], c, (0.0, 0.0, 1.0))))
        behind = np.add.reduceat(~front, self.poly_starts)        # vertices behind, per polygon
        crossing = np.concatenate([[0], np.cumsum(behind > 0)]).tolist()
        for colour, start, first, q, k in self.items:
            shapes = px[start:start + q * k].reshape(q, k, 2)
            if crossing[first + q] > crossing[first]:
                n_behind = behind[first:first + q]
                partly = (n_behind > 0) & (n_behind < k)
                clipped = clip_near(c[start:start + q * k].reshape(q, k, 3)[partly]) if partly.any() else []
                shapes = list(shapes[n_behind == 0]) + [fixed(cam.image_plane(p)) for p in clipped]
            if len(shapes):
                cv2.fillPoly(img, shapes, tone(colour), AA, SHIFT)


class Pen:
    """Draws sprite parts in metres (x right, y up) around the ground anchor (u, v) at s px/m."""

    def __init__(self, img, u, v, s, tone: Tone, lights: list, flip: int = 1, detail: float = 1.0):
        self.img, self.u, self.v, self.s, self.tone, self.lights, self.flip = img, u, v, s, tone, lights, flip
        self.detail = detail   # the sprite's height in pixels: small sprites skip fine parts
        self.scale, self.origin = (flip * s * ONE, -s * ONE), (u * ONE + 0.5, v * ONE + 0.5)

    def shift(self, dx: float) -> None:
        """Move the anchor ``dx`` metres (in the sprite's own, possibly flipped, x direction)."""
        self.u += self.flip * dx * self.s
        self.origin = (self.u * ONE + 0.5, self.v * ONE + 0.5)

    def _pts(self, pts) -> np.ndarray:
        (sx, sy), (ox, oy) = self.scale, self.origin
        return np.array([(int(ox + sx * x), int(oy + sy * y)) for x, y in pts], np.int32)

    def xy(self, x, y) -> tuple:
        """The fixed-point pixel of the point (``x``, ``y``) in metres."""
        (sx, sy), (ox, oy) = self.scale, self.origin
        return int(ox + sx * x), int(oy + sy * y)

    def poly(self, pts, colour) -> None:
        """One convex polygon."""
        cv2.fillConvexPoly(self.img, self._pts(pts), self.tone(colour), AA, SHIFT)

    def polys(self, many, colour, reflective: bool = False) -> None:
        """Polygons of one colour in one fill (``reflective``: retro-reflective paint); an empty list draws nothing."""
        if many:
            colour = self.tone.reflective(colour) if reflective else self.tone(colour)
            cv2.fillPoly(self.img, [self._pts(p) for p in many], colour, AA, SHIFT)

    def rect(self, x0, y0, x1, y1, colour) -> None:
        """An axis-aligned rectangle from corner (``x0``, ``y0``) to (``x1``, ``y1``)."""
        (sx, sy), (ox, oy) = self.scale, self.origin
        a, b, c, d = int(ox + sx * x0), int(oy + sy * y0), int(ox + sx * x1), int(oy + sy * y1)
        corners = np.array(((a, b), (c, b), (c, d), (a, d)), np.int32)
        cv2.fillConvexPoly(self.img, corners, self.tone(colour), AA, SHIFT)

    def circle(self, x, y, r, colour) -> None:
        """A filled circle of radius ``r`` metres (at least half a pixel)."""
        cv2.circle(self.img, self.xy(x, y), max(ONE // 2, round(r * self.s * ONE)), self.tone(colour), -1, AA, SHIFT)

    def ellipse(self, x, y, rx, ry, colour, start=0, end=360) -> None:
        """A filled ellipse of radii ``rx``, ``ry`` metres, or its sector from ``start`` to ``end`` degrees (mirrored
        with the sprite)."""
        axes = (max(1, round(rx * self.s * ONE)), max(1, round(ry * self.s * ONE)))
        a0, a1 = (start, end) if self.flip > 0 else (180 - end, 180 - start)
        cv2.ellipse(self.img, self.xy(x, y), axes, 0, a0, a1, self.tone(colour), -1, AA, SHIFT)

    def line(self, pts, colour, width) -> None:
        """An open polyline through ``pts``, ``width`` metres thick (at least one pixel)."""
        thick = max(1, round(width * self.s))
        cv2.polylines(self.img, [self._pts(pts)], False, self.tone(colour), thick, AA, SHIFT)

    def light(self, x, y, r, colour) -> None:
        """A lamp: drawn untoned now and remembered for the night glow."""
        centre, radius = self.xy(x, y), max(ONE // 2, round(r * self.s * ONE))
        cv2.circle(self.img, centre, radius, colour, -1, AA, SHIFT)
        self.lights.append((centre[0] / ONE, centre[1] / ONE, r * self.s, colour))


def shade(colour, k: float) -> tuple:
    """The colour scaled by ``k`` (darker below 1), clipped to 0..255."""
    return tuple(min(255, int(c * k)) for c in colour)


def striped_board(pen: Pen, x0, y0, x1, y1, colour, accent, period) -> None:
    """A board with diagonal stripes (``colour`` on reflective ``accent``)."""
    pen.polys([((x0, y0), (x1, y0), (x1, y1), (x0, y1))], accent, reflective=True)
    slant, half, stripes = y1 - y0, period / 2, []
    a = x0 - slant
    while a < x1:
        xs = [min(max(x, x0), x1) for x in (a, a + half, a + half + slant, a + slant)]
        if xs[1] > xs[0] or xs[2] > xs[3]:
            stripes.append(((xs[0], y0), (xs[1], y0), (xs[2], y1), (xs[3], y1)))
        a += period
    pen.polys(stripes, colour)


def banded(pen: Pen, half_width, bands, colour, reflective: bool = False) -> None:
    """Horizontal bands (y0, y1) across a vertical body of the given half width."""
    pen.polys([((-half_width, a), (half_width, a), (half_width, b), (-half_width, b)) for a, b in bands], colour,
              reflective)


# --- roadwork sprites ------------------------------------------------------------------------

def draw_cone(pen: Pen, t) -> None:
    """A traffic cone on a dark base, with one (variant 0) or two reflective bands."""
    w, h = t.width, t.height

    def slice_(a, b):   # the cone's outline between heights a*h and b*h
        half_a, half_b = w * (0.38 - 0.3 * (a - 0.07) / 0.93), w * (0.38 - 0.3 * (b - 0.07) / 0.93)
        return (-half_a, a * h), (half_a, a * h), (half_b, b * h), (-half_b, b * h)

    pen.rect(-w / 2, 0, w / 2, 0.07 * h, shade(t.colour, 0.55))
    pen.poly(slice_(0.07, 1.0), t.colour)
    bands = ((0.42, 0.62),) if t.variant == 0 else ((0.28, 0.40), (0.55, 0.67))
    pen.polys([slice_(a, b) for a, b in bands], t.accent, reflective=True)


def draw_barrel(pen: Pen, t) -> None:
    """A construction barrel on a black base, with two (variant 0) or three reflective bands."""
    w, h = t.width, t.height
    pen.rect(-0.56 * w, 0, 0.56 * w, 0.08 * h, BLACK)
    pen.rect(-w / 2, 0.06 * h, w / 2, 0.94 * h, t.colour)
    pen.ellipse(0, 0.94 * h, w / 2, 0.05 * h, shade(t.colour, 0.8))
    bands = ((0.22, 0.34), (0.52, 0.64)) if t.variant == 0 else ((0.2, 0.3), (0.42, 0.52), (0.64, 0.74))
    banded(pen, w / 2, [(a * h, b * h) for a, b in bands], t.accent, reflective=True)


def draw_barrier(pen: Pen, t) -> None:
    """A roadwork barrier: striped boards (one for variant 0, else two) on A-frame legs, a lamp on top when
    ``lamp``; variant 2 is a plastic water-filled barrier of alternating segments."""
    w, h = t.width, t.height
    if t.variant == 2:   # plastic water-filled barrier: alternating segments
        n = 4
        for i in range(n):
            x0 = -w / 2 + i * w / n
            pen.poly(((x0, 0), (x0 + w / n, 0), (x0 + w / n - 0.06, 0.8 * h), (x0 + 0.06, 0.8 * h)),
                     t.colour if i % 2 == 0 else t.accent)
        return
    for x in (-0.42 * w, 0.42 * w):
        pen.line(((x - 0.12, 0), (x, 0.98 * h), (x + 0.12, 0)), WHITE if t.variant else (90, 90, 90), 0.05)
    boards = ((0.62, 0.92),) if t.variant == 0 else ((0.3, 0.5), (0.7, 0.9))
    for a, b in boards:
        striped_board(pen, -w / 2, a * h, w / 2, b * h, t.colour, t.accent, 0.42)
    if t.lamp:
        pen.light(-0.42 * w, 1.03 * h, 0.07, (255, 190, 40))


def draw_worksign(pen: Pen, t) -> None:
    """A roadwork sign on a post: an orange diamond or (variant 2) a red-bordered triangle, showing an exclamation
    mark (variant 1) or a digging worker."""
    r, cy = t.width / 2, t.height - t.width / 2
    pen.line(((0, 0), (0, cy)), (120, 120, 125), 0.06)
    if t.variant == 2:   # European triangle: red border, white field
        pen.poly(((-r, cy - 0.8 * r), (r, cy - 0.8 * r), (0, cy + r)), (200, 30, 35))
        pen.poly(((-0.72 * r, cy - 0.64 * r), (0.72 * r, cy - 0.64 * r), (0, cy + 0.62 * r)), WHITE)
        sym, k = (0, cy - 0.2 * r), 0.55
    else:                # diamond: black rim, orange field
        pen.poly(((0, cy - r), (r, cy), (0, cy + r), (-r, cy)), BLACK)
        pen.poly(((0, cy - 0.88 * r), (0.88 * r, cy), (0, cy + 0.88 * r), (-0.88 * r, cy)), t.colour)
        sym, k = (0, cy), 0.7
    x, y = sym
    if t.variant == 1:   # exclamation mark
        pen.rect(x - 0.07 * r, y - 0.15 * r, x + 0.07 * r, y + 0.5 * k * r, BLACK)
        pen.circle(x, y - 0.35 * k * r, 0.08 * r, BLACK)
    else:                # digging worker pictogram
        pen.circle(x + 0.1 * r * k, y + 0.45 * r * k, 0.12 * r * k, BLACK)
        pen.line(((x + 0.05 * r * k, y + 0.3 * r * k), (x - 0.2 * r * k, y - 0.2 * r * k),
                  (x - 0.05 * r * k, y - 0.6 * r * k)), BLACK, 0.06 * r * k + 0.02)
        pen.line(((x - 0.1 * r * k, y + 0.1 * r * k), (x + 0.5 * r * k, y - 0.5 * r * k)), BLACK, 0.05)
        pen.poly(((x + 0.3 * r * k, y - 0.62 * r * k), (x + 0.7 * r * k, y - 0.62 * r * k),
                  (x + 0.55 * r * k, y - 0.35 * r * k)), BLACK)


def draw_person(pen: Pen, t) -> None:
    """A pedestrian; roadwork workers add a striped hi-vis vest and a hard hat."""
    h = t.height
    trousers, shirt = t.accent, t.colour
    for side in (-1, 1):
        pen.line(((side * 0.07, 0.47 * h), (side * 0.1, 0.02 * h)), trousers, 0.13)
    pen.poly(((-0.16, 0.46 * h), (0.16, 0.46 * h), (0.2, 0.8 * h), (-0.2, 0.8 * h)), shirt)
    raised = 0.95 if t.variant == 1 else 0.42
    pen.line(((-0.2, 0.78 * h), (-0.26, 0.45 * h)), shirt, 0.08)
    pen.line(((0.2, 0.78 * h), (0.3, raised * h)), shirt, 0.08)
    pen.circle(0, 0.88 * h, 0.065 * h, SKIN[t.variant2 % len(SKIN)])
    if t.roadwork:
        pen.poly(((-0.155, 0.5 * h), (0.155, 0.5 * h), (0.185, 0.79 * h), (-0.185, 0.79 * h)), t.vest)
        banded(pen, 0.17, ((0.56 * h, 0.6 * h), (0.66 * h, 0.7 * h)), SILVER, reflective=True)
        pen.polys([((-0.1, 0.7 * h), (-0.06, 0.7 * h), (-0.06, 0.79 * h), (-0.1, 0.79 * h)),
                   ((0.06, 0.7 * h), (0.1, 0.7 * h), (0.1, 0.79 * h), (0.06, 0.79 * h))], SILVER, reflective=True)
        pen.ellipse(0, 0.905 * h, 0.085 * h, 0.06 * h, t.helmet, 180, 360)
        pen.rect(-0.1 * h, 0.9 * h, 0.1 * h, 0.915 * h, t.helmet)
        if t.variant == 1:   # holding a shovel up
            pen.line(((0.3, 0.95 * h), (0.45, 0.1 * h)), (110, 80, 50), 0.04)
    else:
        pen.ellipse(0, 0.9 * h, 0.068 * h, 0.05 * h, (50, 35, 25), 180, 360)


def draw_excavator(pen: Pen, t) -> None:
    """An excavator in profile (tracks, body, cab, arm and bucket), centred on the anchor."""
    k, body, dark = t.height / 3.0, t.colour, shade(t.colour, 0.7)
    pen.shift(-0.8 * k)   # centre the 5 m wide silhouette on the anchor
    pen.rect(-1.6 * k, 0.1 * k, 1.0 * k, 0.7 * k, TYRE)
    pen.circle(-1.6 * k, 0.4 * k, 0.3 * k, TYRE)
    pen.circle(1.0 * k, 0.4 * k, 0.3 * k, TYRE)
    pen.rect(-1.5 * k, 0.7 * k, 0.9 * k, 1.6 * k, body)
    pen.rect(-1.7 * k, 0.9 * k, -1.2 * k, 1.7 * k, dark)
    pen.rect(-0.2 * k, 1.6 * k, 0.9 * k, 2.8 * k, body)
    pen.rect(0.0 * k, 1.8 * k, 0.75 * k, 2.6 * k, GLASS)
    pen.line(((0.8 * k, 1.4 * k), (2.1 * k, 3.0 * k), (2.9 * k, 1.1 * k)), body, 0.32 * k)
    pen.poly(((2.6 * k, 1.3 * k), (3.3 * k, 1.2 * k), (3.2 * k, 0.4 * k), (2.75 * k, 0.5 * k)), (60, 60, 60))


def draw_roller(pen: Pen, t) -> None:
    """A road roller in profile (drum, body, wheel and roof), centred on the anchor."""
    k, body = t.height / 2.6, t.colour
    pen.shift(-0.3 * k)   # centre the silhouette on the anchor
    pen.rect(0.8 * k, 0.0, 2.0 * k, 1.3 * k, (150, 150, 150))
    pen.rect(0.75 * k, 1.1 * k, 2.05 * k, 1.4 * k, body)
    pen.rect(-1.4 * k, 0.5 * k, 0.9 * k, 1.5 * k, body)
    pen.circle(-0.8 * k, 0.55 * k, 0.55 * k, TYRE)
    pen.circle(-0.8 * k, 0.55 * k, 0.25 * k, shade(body, 0.8))
    for x in (-1.2 * k, 0.2 * k):
        pen.line(((x, 1.5 * k), (x, 2.5 * k)), BLACK, 0.08 * k)
    pen.rect(-1.35 * k, 2.45 * k, 0.35 * k, 2.6 * k, body)


def draw_gravel(pen: Pen, t) -> None:
    """A gravel pile: a half ellipse speckled with lighter and darker stones (a fixed pattern)."""
    w, h = t.width, t.height
    pen.ellipse(0, 0, w / 2, h, t.colour, 180, 360)
    for sx, sy, sk in SPECKLES:
        x = (sx - 0.5) * w * 0.8
        y = sy * h * (1 - (2 * x / w) ** 2) * 0.8
        pen.circle(x, y, 0.03 + 0.05 * sk * w / 2.5, shade(t.colour, 0.6 + 0.8 * sk))


# --- street sprites --------------------------------------------------------------------------

def draw_car(pen: Pen, t) -> None:
    """A car seen from behind (variant 0) or from the front (variant 1); taxis get a roof sign."""
    w, h, body = t.width, t.height, t.colour
    lamp = (255, 40, 30) if t.variant == 0 else (255, 245, 220)
    if pen.detail < 14:
        pen.rect(-w / 2, 0.05, w / 2, 0.62 * h, body)
        pen.poly(((-0.43 * w, 0.6 * h), (0.43 * w, 0.6 * h), (0.33 * w, h), (-0.33 * w, h)), GLASS)
    else:
        for side in (-1, 1):
            pen.rect(side * (w / 2 - 0.32), 0, side * (w / 2 - 0.06), 0.3, TYRE)
        pen.poly(((-w / 2, 0.22), (w / 2, 0.22), (w / 2, 0.58 * h), (w * 0.44, 0.64 * h),
                  (-w * 0.44, 0.64 * h), (-w / 2, 0.58 * h)), body)
        pen.poly(((-0.43 * w, 0.63 * h), (0.43 * w, 0.63 * h), (0.33 * w, h), (-0.33 * w, h)), body)
        pen.poly(((-0.38 * w, 0.67 * h), (0.38 * w, 0.67 * h), (0.3 * w, 0.95 * h), (-0.3 * w, 0.95 * h)), GLASS)
        pen.rect(-w / 2, 0.2, w / 2, 0.3, shade(body, 0.5))
        pen.rect(-0.18, 0.32, 0.18, 0.43, WHITE)
    for side in (-1, 1):
        pen.light(side * (w / 2 - 0.15), 0.5 * h, 0.09, lamp)
    if t.taxi:
        pen.rect(-0.25, h, 0.25, h + 0.15, (250, 250, 240) if t.variant2 % 2 else (40, 40, 40))


def draw_truck(pen: Pen, t) -> None:
    """A box truck or bus from behind; ``variant`` 1 is a bus with a window band."""
    w, h, body = t.width, t.height, t.colour
    for side in (-1, 1):
        pen.rect(side * (w / 2 - 0.45), 0, side * (w / 2 - 0.08), 0.45, TYRE)
    pen.rect(-w / 2, 0.35, w / 2, h, body)
    if t.variant == 1:
        pen.rect(-0.45 * w, 0.6 * h, 0.45 * w, 0.9 * h, GLASS)
    else:
        pen.line(((0, 0.45), (0, 0.95 * h)), shade(body, 0.6), 0.04)
    pen.rect(-w / 2, 0.35, w / 2, 0.5, (40, 40, 40))
    for side in (-1, 1):
        pen.light(side * (w / 2 - 0.15), 0.7, 0.1, (255, 40, 30))


def draw_tree(pen: Pen, t) -> None:
    """A tree: a trunk and a round crown (one circle on a small sprite, three otherwise)."""
    w, h, leaf = t.width, t.height, t.colour
    pen.rect(-0.05 * w, 0, 0.05 * w, 0.5 * h, (85, 60, 40))
    if pen.detail < 20:
        pen.circle(0, 0.7 * h, 0.42 * w, leaf)
        return
    pen.circle(0, 0.62 * h, 0.38 * w, shade(leaf, 0.75))
    pen.circle(-0.2 * w, 0.72 * h, 0.3 * w, leaf)
    pen.circle(0.18 * w, 0.78 * h, 0.27 * w, shade(leaf, 1.2))


def draw_streetlight(pen: Pen, t) -> None:
    """A street light: a pole with an arm and its lamp."""
    h = t.height
    pen.line(((0, 0), (0, h), (-0.9, h + 0.15)), (95, 98, 105), 0.12)
    pen.light(-0.9, h, 0.16, (255, 225, 170))


def draw_traffic_light(pen: Pen, t) -> None:
    """A traffic light on a pole: red, amber and green, the one numbered ``variant`` lit."""
    h = t.height
    pen.line(((0, 0), (0, h - 0.9)), (70, 72, 76), 0.12)
    pen.rect(-0.18, h - 0.95, 0.18, h, (30, 32, 35))
    colours = ((255, 40, 30), (255, 170, 20), (60, 230, 90))
    for i, colour in enumerate(colours):
        y = h - 0.17 - i * 0.3
        if i == t.variant:
            pen.light(0, y, 0.1, colour)
        else:
            pen.circle(0, y, 0.1, shade(colour, 0.25))


def draw_sign(pen: Pen, t) -> None:
    """An ordinary traffic sign: 0 round, 1 square, 2 octagon, 3 rectangle, 4 warning diamond."""
    c, r, cy = t.colour, t.width / 2, t.height - t.width / 2
    pen.line(((0, 0), (0, cy)), (120, 120, 125), 0.06)
    if t.variant == 0:
        pen.circle(0, cy, r, (200, 30, 35))
        pen.circle(0, cy, 0.75 * r, WHITE)
        pen.rect(-0.3 * r, cy - 0.3 * r, 0.3 * r, cy + 0.3 * r, BLACK)
    elif t.variant == 1:
        pen.rect(-r, cy - r, r, cy + r, c)
        pen.rect(-0.3 * r, cy - 0.5 * r, 0.3 * r, cy + 0.5 * r, WHITE)
    elif t.variant == 2:
        pen.poly([(r * math.cos(a), cy + r * math.sin(a)) for a in np.arange(8) * math.pi / 4 + math.pi / 8],
                 (200, 30, 35))
        pen.rect(-0.6 * r, cy - 0.12 * r, 0.6 * r, cy + 0.12 * r, WHITE)
    elif t.variant == 3:   # rectangle with text lines (orange ones are look-alikes)
        pen.rect(-1.4 * r, cy - 0.7 * r, 1.4 * r, cy + 0.7 * r, c)
        for y in (cy + 0.3 * r, cy - 0.1 * r):
            pen.rect(-1.1 * r, y - 0.1 * r, 0.9 * r, y + 0.1 * r, BLACK if sum(c) > 400 else WHITE)
    else:                  # yellow warning diamond with a curve arrow
        pen.poly(((0, cy - r), (r, cy), (0, cy + r), (-r, cy)), BLACK)
        pen.poly(((0, cy - 0.88 * r), (0.88 * r, cy), (0, cy + 0.88 * r), (-0.88 * r, cy)), c)
        pen.line(((0, cy - 0.5 * r), (0, cy), (0.3 * r, cy + 0.4 * r)), BLACK, 0.07)


def draw_striped_pole(pen: Pen, t) -> None:
    """A white pole with five bands of its colour."""
    w, h = t.width, t.height
    pen.rect(-w / 2, 0, w / 2, h, WHITE)
    banded(pen, w / 2, [(y, y + h / 10) for y in np.arange(0, h, h / 5)], t.colour)


def draw_bin(pen: Pen, t) -> None:
    """A litter bin with a darker lid."""
    w, h = t.width, t.height
    pen.rect(-w / 2, 0, w / 2, 0.88 * h, t.colour)
    pen.rect(-0.55 * w, 0.86 * h, 0.55 * w, h, shade(t.colour, 0.7))


SPRITES = {
    "cone": draw_cone, "barrel": draw_barrel, "barrier": draw_barrier, "worksign": draw_worksign,
    "worker": draw_person, "person": draw_person, "excavator": draw_excavator, "roller": draw_roller,
    "gravel": draw_gravel, "car": draw_car, "truck": draw_truck, "tree": draw_tree,
    "streetlight": draw_streetlight, "traffic_light": draw_traffic_light, "sign": draw_sign,
    "striped_pole": draw_striped_pole, "bin": draw_bin,
}


# --- backgrounds and camera effects ---------------------------------------------------------

def sky_and_ground(size: int, horizon: float, sky_top, sky_horizon, ground) -> np.ndarray:
    """A fresh image: vertical sky gradient above the horizon row, flat ground colour below."""
    img = np.empty((size, size, 3), np.uint8)
    h = int(min(size, max(0, round(horizon))))
    if h:
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
        column = (np.float32(sky_top) * (1 - t) + np.float32(sky_horizon) * t).astype(np.uint8)[:, None, :]
        cv2.resize(column, (size, h), dst=img[:h], interpolation=cv2.INTER_NEAREST)
    cv2.rectangle(img, (0, h), (size, size), ground, -1)
    return img


def night_glow(img: np.ndarray, lights: list) -> None:
    """Blurred halos around every lamp (drawn and blurred at quarter resolution), added in place."""
    if not lights:
        return
    size = img.shape[0]
    small = max(8, size // 4)
    k = small / size
    halo = np.zeros((small, small, 3), np.uint8)
    for u, v, r, colour in lights:
        cv2.circle(halo, (round(u * k * ONE), round(v * k * ONE)), round((2.5 * r + size / 90) * k * ONE),
                   shade(colour, 0.7), -1, AA, SHIFT)
    halo = cv2.GaussianBlur(halo, (0, 0), small / 70)
    cv2.add(img, cv2.resize(halo, (size, size), interpolation=cv2.INTER_LINEAR), dst=img)


def fog(img: np.ndarray, cam: Camera, colour, visibility: float, strength: float) -> np.ndarray:
    """Blend towards the fog colour by the depth of the ground at each row (sky fully fogged)."""
    size = img.shape[0]
    rows = np.arange(size, dtype=np.float32) + 0.5 - cam.cv
    depth = np.where(rows > 0, cam.focal * cam.height / np.maximum(rows, 1e-3), 1e9)
    weight = (strength * (1 - np.exp(-depth / visibility))).astype(np.float32)[:, None, None]
    out = img.astype(np.float32)
    out += (np.float32(colour) - out) * weight
    return out.astype(np.uint8)


def rain(img: np.ndarray, streaks: np.ndarray, colour) -> None:
    """Thin bright streaks (N, 2, 2) in pixels, drawn in place."""
    cv2.polylines(img, list(fixed(streaks)), False, colour, 1, AA, SHIFT)


def blur(img: np.ndarray, motion: bool, amount: float) -> np.ndarray:
    """Gaussian (out of focus) or horizontal motion blur; ``amount`` in pixels."""
    if not motion:
        return cv2.GaussianBlur(img, (0, 0), amount)
    n = max(2, round(amount * 3))
    return cv2.blur(img, (n, 1))


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed bank of unit Gaussian noise (int16, scaled by 16) larger than the image."""
    return np.rint(np.random.default_rng(size).normal(0, 16, (size + 64, size + 64, 3))).astype(np.int16)


def sensor_noise(img: np.ndarray, sigma: float, dy: int, dx: int) -> np.ndarray:
    """Additive Gaussian noise: a shifted window of the fixed bank, scaled to ``sigma``."""
    size = img.shape[0]
    noise = _noise_bank(size)[dy:dy + size, dx:dx + size]
    out = img.astype(np.int16) + (noise * round(sigma * 16) >> 8)
    return np.clip(out, 0, 255).astype(np.uint8)


def grade(img: np.ndarray, contrast: float, brightness: float, gamma: float) -> np.ndarray:
    """Brightness / contrast / gamma jitter through a lookup table."""
    x = np.arange(256, dtype=np.float32) / 255
    lut = np.clip((x ** gamma - 0.5) * contrast * 255 + 127.5 + brightness, 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


# --- one view --------------------------------------------------------------------------------

def render(scene, cam: Camera, fx: dict) -> np.ndarray:
    """Draw one view: sky, ground, facades far to near, sprites far to near, then camera effects."""
    tone = scene.tone
    img = sky_and_ground(cam.size, cam.cv, *scene.sky, tone(scene.verge))
    scene.surfaces.draw(img, cam, tone)
    lights: list = []
    draw_sprites(img, scene.things, cam, tone, lights)
    if scene.time == "night":
        night_glow(img, lights)
    if "fog" in fx:
        colour, visibility, strength = fx["fog"]
        img = fog(img, cam, tone(colour), visibility, strength)
    if fx["streaks"] is not None:
        rain(img, fx["streaks"], (110, 115, 130) if scene.time == "night" else (215, 218, 225))
    if fx["blur"] is not None:
        img = blur(img, *fx["blur"])
    if fx["noise"] is not None:
        img = sensor_noise(img, *fx["noise"])
    return grade(img, fx["contrast"], fx["brightness"], fx["gamma"])


def draw_sprites(img: np.ndarray, things: list, cam: Camera, tone: Tone, lights: list) -> None:
    """Every thing in front of the camera and inside the frame, far to near (painter's order)."""
    if not things:
        return
    c = cam.to_camera(np.array([(t.x, 0.0, t.z) for t in things]))
    order, c = np.argsort(-c[:, 2], kind="stable").tolist(), c.tolist()   # plain floats: faster scalar maths
    size = cam.size
    for i in order:
        right, _, depth = c[i]
        if depth < 0.8:
            break
        t, s = things[i], cam.focal / depth
        u, v = cam.cu + right * s, cam.cv + cam.height * s
        height = t.height * s
        if height < 0.7 or v - height * 1.1 > size or abs(u - size / 2) > size / 2 + t.width * s:
            continue
        if height < 4:   # a few pixels: a blob of the main colour is all that would show
            half = t.width * s / 2
            cv2.rectangle(img, (round((u - half) * ONE), round((v - height) * ONE)),
                          (round((u + half) * ONE), round(v * ONE)), tone(t.colour), -1, AA, SHIFT)
            continue
        SPRITES[t.kind](Pen(img, u, v, s, tone, lights, t.flip, height), t)
