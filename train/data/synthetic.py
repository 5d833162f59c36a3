"""Procedural street scenes for the roadwork / no-roadwork task, deterministic by seed.

A scene layout (road, buildings, traffic, look-alikes, roadwork) is sampled once per seed and
rendered from 1..6 cameras that differ in yaw, lateral offset, height and position along the
road. Negatives often hold hard look-alikes (orange cars, taxis, zebra crossings, striped poles,
people in orange, autumn trees) so colour alone does not separate the classes; roadwork is told
apart by shape: striped cones and barrels, striped barriers, vests with reflective bands, machines.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from train.data import synthetic_draw as draw
from train.data.synthetic_draw import Camera, Tone

__all__ = ["RenderedView", "SceneKnobs", "render_scene"]

MAX_VIEWS = 6
LANE_WORDS = {2: "two-lane", 3: "three-lane", 4: "four-lane"}
NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CAR_COLOURS = ((235, 235, 235), (25, 25, 28), (175, 178, 182), (110, 112, 118), (30, 45, 95), (160, 25, 30),
               (35, 70, 45), (200, 190, 165), (95, 65, 45), (120, 160, 200))
WARM = ((235, 110, 20), (245, 200, 30), (240, 150, 25), (225, 85, 30), (250, 120, 45), (255, 140, 0))
CONE_ORANGE = ((255, 95, 10), (250, 75, 20), (245, 120, 25), (255, 140, 0), (230, 60, 30))
STRIPE_RED = ((210, 30, 30), (235, 90, 20), (250, 120, 10))
FOLIAGE = ((60, 110, 40), (80, 130, 50), (45, 90, 35), (95, 125, 55))
AUTUMN = ((210, 110, 30), (225, 150, 40), (185, 70, 30), (205, 170, 50))
FACADES = ((180, 170, 160), (205, 195, 175), (150, 150, 155), (165, 85, 60), (190, 110, 70), (120, 125, 135),
           (225, 215, 195), (160, 140, 110), (210, 160, 100))
ROOFS = ((70, 70, 75), (150, 60, 40), (190, 95, 55), (95, 80, 70))
MACHINE = ((240, 185, 20), (235, 160, 15), (245, 200, 40), (230, 120, 20))
SHIRTS = ((40, 60, 120), (200, 200, 200), (30, 30, 30), (120, 30, 40), (60, 100, 60), (150, 150, 160),
          (90, 70, 120), (200, 170, 130))
OPACITY = {"car": 0.9, "truck": 0.95, "excavator": 0.6, "roller": 0.7, "person": 0.45, "worker": 0.45,
           "tree": 0.25, "barrier": 0.35, "barrel": 0.7, "gravel": 0.8}
WINDOW_CORNERS = np.array([(0, 0), (1.5, 0), (1.5, 1.2), (0, 1.2)])   # (up, along) offsets in metres
ROADWORK_NOUNS = {"cone": "traffic cone", "barrel": "construction barrel", "barrier": "striped roadwork barrier",
                  "worksign": "roadwork sign", "worker": "worker in a hi-vis vest", "excavator": "excavator",
                  "roller": "road roller", "gravel": "roadwork gravel pile"}


@dataclass(frozen=True)
class SceneKnobs:
    """Image size and how often the hard parts (look-alikes, night, weather, blur, noise) appear."""
    size: int = 256                 # square output side in px
    lookalike_rate: float = 0.7     # probability that a NEGATIVE scene contains hard look-alikes
    distractor_rate: float = 0.5    # probability that a POSITIVE scene also contains look-alikes
    night_rate: float = 0.15
    weather_rate: float = 0.25      # rain / fog
    blur_rate: float = 0.15
    noise_rate: float = 0.2

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 16:
            raise ValueError(f"SceneKnobs.size must be an integer >= 16, got {self.size!r}")
        for name in ("lookalike_rate", "distractor_rate", "night_rate", "weather_rate", "blur_rate", "noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SceneKnobs.{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class RenderedView:
    """One camera's image of a scene, with its description and difficulty."""
    image: np.ndarray     # HxWx3 uint8 RGB
    view: int             # camera index 0..n_views-1
    description: str      # natural-language scene description (like NATIX's `scene_description`)
    difficulty: float     # in [0, 1]: how hard (small, cut-off or few roadwork objects, night, fog, look-alikes)


@dataclass
class Thing:
    """An upright object on the ground, drawn as a camera-facing sprite (see ``draw.SPRITES``)."""
    kind: str
    x: float
    z: float
    width: float
    height: float
    colour: tuple = (128, 128, 128)
    accent: tuple = draw.WHITE
    variant: int = 0
    variant2: int = 0
    flip: int = 1
    roadwork: bool = False
    lookalike: str = ""              # description phrase when this is a hard look-alike
    vest: tuple = (255, 120, 20)
    helmet: tuple = (250, 210, 20)
    lamp: bool = False
    taxi: bool = False


@dataclass
class Scene:
    """Everything sampled once per seed; ``ground`` and building ``layers`` are (world polygons, colour)."""
    size: int
    kind: str
    lanes: int
    half_road: float
    outer: float                     # |x| of the building line / verge
    time: str
    weather: str
    tone: Tone
    sky: tuple
    verge: tuple
    ground: list = field(default_factory=list)
    buildings: list = field(default_factory=list)   # (near z, layers), drawn far to near
    things: list = field(default_factory=list)
    notes: list = field(default_factory=list)       # (phrase, x, z): described when in view
    cameras: list = field(default_factory=list)
    effects: list = field(default_factory=list)     # one dict per camera
    surfaces: draw.Surfaces | None = None           # ground and buildings, compiled for drawing


def render_scene(seed: int, label: int, n_views: int = 1, knobs: SceneKnobs = SceneKnobs()) -> list[RenderedView]:
    """Render one scene (label 1 = roadwork present) from n_views (1..6) cameras.

    Deterministic in (seed, label, n_views, knobs). All six cameras are sampled whatever ``n_views`` is, so
    more views only add cameras (and, for positives, a roadwork object in front of any camera seeing none).
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (no roadwork) or 1 (roadwork), got {label!r}")
    if not isinstance(n_views, (int, np.integer)) or not 1 <= n_views <= MAX_VIEWS:
        raise ValueError(f"n_views must be an integer in 1..{MAX_VIEWS}, got {n_views!r}")
    scene, cameras = build_scene(seed, label, n_views, knobs)
    views = []
    for i, cam in enumerate(cameras):
        vis = visibility(scene, cam)
        lookalikes = list(dict.fromkeys([t.lookalike for t, seen in zip(scene.things, vis["seen"])
                                         if seen and t.lookalike] + notes_in_view(scene, cam)))
        fx = scene.effects[i]
        views.append(RenderedView(draw.render(scene, cam, fx), i, describe(scene, vis, lookalikes, label),
                                  view_difficulty(scene, vis, label, fx, len(lookalikes))))
    return views


def build_scene(seed: int, label: int, n_views: int, knobs: SceneKnobs) -> tuple[Scene, list[Camera]]:
    """The scene layout and the cameras to render; positives show roadwork to every one of them."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, label, knobs)
    cameras = scene.cameras[:n_views]
    if label:
        ensure_roadwork_in_view(rng, scene, cameras)
    return scene, cameras


# --- sampling --------------------------------------------------------------------------------

def uni(rng, low: float, high: float) -> float:
    """A uniform float in [low, high) (cheaper than ``rng.uniform`` for one value)."""
    return low + (high - low) * rng.random()


def randint(rng, low: int, high: int) -> int:
    """A uniform int in [low, high)."""
    return low + int(rng.random() * (high - low))


def pick(rng, options):
    """One of ``options``, uniformly."""
    return options[int(rng.random() * len(options))]


def sample_scene(rng, label: int, knobs: SceneKnobs) -> Scene:
    """Road, roadside, traffic, maybe look-alikes, roadwork for positives, six cameras and their effects."""
    scene = sample_environment(rng, knobs)
    lane_width = (2 * scene.half_road) / scene.lanes
    own_lane = -scene.half_road + lane_width * (randint(rng, scene.lanes // 2, scene.lanes) + 0.5)
    scene.cameras = [sample_camera(rng, knobs.size, own_lane, main=i == 0) for i in range(MAX_VIEWS)]
    add_road(rng, scene, lane_width)
    add_roadside(rng, scene)
    add_traffic(rng, scene, lane_width, own_lane)
    if rng.random() < (knobs.distractor_rate if label else knobs.lookalike_rate):
        for kind in rng.choice(len(LOOKALIKES), size=randint(rng, 1, 5), replace=False):
            LOOKALIKES[kind](rng, scene)
    if label:
        add_roadwork(rng, scene, lane_width)
    scene.buildings.sort(key=lambda b: -b[0])
    scene.surfaces = draw.Surfaces(scene.ground + [layer for _, layers in scene.buildings for layer in layers])
    scene.effects = [sample_effects(rng, scene, knobs) for _ in range(MAX_VIEWS)]   # last: layout is size-free
    return scene


def sample_environment(rng, knobs: SceneKnobs) -> Scene:
    """Road kind and width, time of day, weather and the colour grading that follows from them."""
    kind = str(rng.choice(["urban street", "suburban road", "highway"], p=[0.5, 0.3, 0.2]))
    lanes = randint(rng, 2, 5)
    half_road = lanes * uni(rng, 3.0, 3.7) / 2
    r = rng.random()
    time = "night" if r < knobs.night_rate else "dusk" if r < knobs.night_rate + 0.12 else "day"
    r = rng.random()
    weather = "rain" if r < knobs.weather_rate / 2 else "fog" if r < knobs.weather_rate else "clear"
    gain = rng.uniform(0.92, 1.08, 3)
    sky = (tuple(int(c) for c in rng.integers([60, 120, 200], [110, 170, 245])), (185, 205, 228))
    if time == "dusk":
        glow = tuple(int(c) for c in rng.integers([235, 120, 50], [256, 180, 110]))
        gain, sky = gain * (1.0, 0.82, 0.68), ((70, 70, 130), glow)
    elif time == "night":
        gain, sky = gain * (0.38, 0.4, 0.52), ((4, 6, 18), (25, 30, 55))
    offset = (0.0, 0.0, 0.0)
    if weather == "rain":
        gain, offset = gain * 0.78, (14.0, 15.0, 18.0)
        sky = sky if time == "night" else ((120, 124, 130), (165, 168, 172))
    verge = pick(rng, FOLIAGE) if kind != "urban street" else (120, 118, 112)
    return Scene(knobs.size, kind, lanes, half_road, half_road + uni(rng, 2.0, 4.5), time, weather,
                 Tone(tuple(gain), offset, night=time == "night"), sky, verge)


def sample_camera(rng, size: int, lane_x: float, main: bool) -> Camera:
    """View 0 looks down its lane; the others are yawed, shifted, raised or lowered, moved along."""
    return Camera(x=lane_x + (0.0 if main else uni(rng, -1.5, 1.5)), z=0.0 if main else uni(rng, -3, 8),
                  height=uni(rng, 1.2, 2.4), yaw=rng.normal(0, 0.03) if main else uni(rng, -0.45, 0.45),
                  focal=size * uni(rng, 0.8, 1.2), cu=size / 2, cv=size * uni(rng, 0.38, 0.52), size=size)


def sample_effects(rng, scene: Scene, knobs: SceneKnobs) -> dict:
    """One camera's grading jitter, blur, sensor noise, rain streaks and fog."""
    size = knobs.size
    fx = dict(contrast=uni(rng, 0.85, 1.15), brightness=uni(rng, -18, 18), gamma=uni(rng, 0.85, 1.15),
              blur=None, noise=None, streaks=None)
    if rng.random() < knobs.blur_rate:
        fx["blur"] = (bool(rng.random() < 0.5), uni(rng, 0.6, 1.8) * size / 256)
    if rng.random() < knobs.noise_rate:
        fx["noise"] = (uni(rng, 3, 12), randint(rng, 0, 64), randint(rng, 0, 64))
    if scene.weather == "rain":
        n, slant = randint(rng, 80, 230), uni(rng, -0.3, 0.3)
        start = rng.random((n, 2)) * size
        length = rng.uniform(0.02, 0.06, (n, 1)) * size
        fx["streaks"] = np.stack([start, start + length * np.array([slant, 1.0])], 1)
    if scene.weather == "fog":
        fx["fog"] = (tuple(int(c) for c in randint(rng, 150, 215) + rng.integers(-8, 9, 3)),
                     uni(rng, 12, 45), uni(rng, 0.7, 0.92))
    return fx


def quad_x(x0, x1, z0, z1, y=0.0):
    """A horizontal rectangle x0..x1 by z0..z1 at height y (world polygon)."""
    return ((x0, y, z0), (x1, y, z0), (x1, y, z1), (x0, y, z1))


def add_road(rng, scene: Scene, lane_width: float) -> None:
    """Road surface, kerbs / shoulders and lane markings."""
    r, far = scene.half_road, 600.0
    walk = (pick(rng, ((150, 148, 142), (170, 165, 155), (130, 128, 125))) if scene.kind != "highway"
            else scene.verge)
    asphalt = tuple(int(c) for c in randint(rng, 62, 110) + rng.integers(-4, 5, 3))
    scene.ground += [([quad_x(-scene.outer, -r, -40, far), quad_x(r, scene.outer, -40, far)], walk),
                     ([quad_x(-r, r, -40, far)], asphalt)]
    if scene.kind != "highway":
        scene.ground.append(([quad_x(-r - 0.2, -r, -40, far), quad_x(r, r + 0.2, -40, far)], (185, 183, 178)))
    period, dash, width = uni(rng, 8, 13), uni(rng, 2.5, 4.0), uni(rng, 0.1, 0.16)
    phase, white = uni(rng, 0, period), (225, 225, 218)
    for i in range(1, scene.lanes):
        x = -r + i * lane_width
        centre = scene.lanes % 2 == 0 and i == scene.lanes // 2
        if centre and rng.random() < 0.4:   # solid double centre line, yellow or white
            colour = pick(rng, ((225, 185, 40), white))
            scene.ground.append(([quad_x(x - 0.2, x - 0.2 + width, -40, far),
                                  quad_x(x + 0.2 - width, x + 0.2, -40, far)], colour))
        else:
            z = np.arange(phase - 30, 160, period)
            scene.ground.append((np.array([quad_x(x - width / 2, x + width / 2, a, a + dash) for a in z]), white))
    if scene.kind != "urban street":
        scene.ground.append(([quad_x(-r + 0.2, -r + 0.2 + width, -40, far), quad_x(r - 0.2 - width, r - 0.2, -40, far)],
                             white))


def add_roadside(rng, scene: Scene) -> None:
    """Buildings or houses, trees and street lights along both sides."""
    autumn = rng.random() < 0.25
    for side in (-1, 1):
        z = uni(rng, -12, 0)
        while z < 110 and scene.kind != "highway":
            z = add_building(rng, scene, side, z)
        z = uni(rng, 0, 15)
        tree_rate = {"urban street": 0.35, "suburban road": 0.8, "highway": 0.6}[scene.kind]
        while z < 85:
            if rng.random() < tree_rate:
                x = side * (scene.outer - uni(rng, 0.6, 1.4) if scene.kind == "urban street"
                            else scene.outer + uni(rng, 0.5, 5))
                w, leaves = uni(rng, 2.5, 5.5), pick(rng, AUTUMN if autumn and rng.random() < 0.8 else FOLIAGE)
                scene.things.append(Thing("tree", x, z, w, w * uni(rng, 1.4, 2.0), leaves,
                                          lookalike="autumn trees" if leaves in AUTUMN else ""))
            z += uni(rng, 8, 20)
        z = uni(rng, 0, 30)
        while z < 100 and (scene.kind != "highway" or side > 0):
            scene.things.append(Thing("streetlight", side * (scene.half_road + 0.4), z, 1.2, uni(rng, 6, 8),
                                      flip=side))
            z += uni(rng, 28, 45)
    if scene.kind == "highway":
        for side in (-1, 1):
            x = side * (scene.half_road + 0.6)
            scene.ground.append(([((x, 0.45, -40), (x, 0.8, -40), (x, 0.8, 600), (x, 0.45, 600))], (150, 155, 160)))


def add_building(rng, scene: Scene, side: int, z0: float) -> float:
    """One facade (with windows, maybe an awning) starting at z0; returns where the next may start."""
    urban = scene.kind == "urban street"
    length = uni(rng, 10, 28) if urban else uni(rng, 8, 14)
    x = side * (scene.outer + (uni(rng, 0, 0.8) if urban else uni(rng, 3, 9)))
    height = uni(rng, 7, 26) if urban else uni(rng, 3, 6)
    depth, z1, colour = side * 10.0, z0 + length, pick(rng, FACADES)
    layers = [([((x, 0, z0), (x + depth, 0, z0), (x + depth, height, z0), (x, height, z0))], draw.shade(colour, 0.8)),
              ([((x, 0, z0), (x, height, z0), (x, height, z1), (x, 0, z1))], colour)]
    if not urban:
        roof = pick(rng, ROOFS)
        layers.append(([((x, height, z0), (x + depth / 2, height + 2.5, z0), (x + depth / 2, height + 2.5, z1),
                          (x, height, z1))], roof))
    ys = np.arange(1.2 if urban else 0.8, height - 1.2 if z0 < 70 else 0, 3.0)   # far ones: no windows
    zs = np.arange(z0 + 0.8, z1 - 1.4, uni(rng, 2.4, 3.6))
    if len(ys) and len(zs):
        wins = np.empty((len(ys), len(zs), 4, 3))
        wins[..., 0] = x
        wins[..., 1] = ys[:, None, None] + WINDOW_CORNERS[:, 0]
        wins[..., 2] = zs[None, :, None] + WINDOW_CORNERS[:, 1]
        wins = wins.reshape(-1, 4, 3)
        lit = rng.random(len(wins)) < 0.35 if scene.time == "night" else None
        layers.append((wins if lit is None else wins[~lit], draw.GLASS))
        if lit is not None and lit.any():
            layers.append((wins[lit], (255, 215, 140)))
    if urban and rng.random() < 0.12:
        add_awning(rng, scene, layers, x, z0, z1, pick(rng, STRIPE_RED))
    scene.buildings.append((z0, layers))
    return z1 + (uni(rng, 0, 4) if urban and rng.random() < 0.4 else 0.0 if urban else uni(rng, 4, 12))


def add_awning(rng, scene: Scene, layers: list, x: float, z0: float, z1: float, colour) -> None:
    """A shop awning with vertical stripes over part of the facade."""
    a = uni(rng, z0, max(z0, z1 - 6))
    b, out = min(z1, a + uni(rng, 3, 7)), -np.sign(x) * 1.2
    zs = np.arange(a, b, 0.5)
    stripes = [((x, 3.2, z), (x + out, 2.5, z), (x + out, 2.5, z + 0.25), (x, 3.2, z + 0.25)) for z in zs]
    layers.append(([((x, 3.2, a), (x + out, 2.5, a), (x + out, 2.5, b), (x, 3.2, b))], draw.WHITE))
    layers.append((np.array(stripes), colour))
    scene.notes.append(("a striped shop awning", x, (a + b) / 2))


def add_vehicle(rng, scene: Scene, x: float, z: float, oncoming: bool, colour=None, lookalike: str = "",
                big: bool | None = None, taxi: bool = False) -> None:
    """A car, or (``big``) a box truck or bus; ordinary traffic is now and then orange or yellow too."""
    if colour is None:
        colour = pick(rng, WARM) if rng.random() < 0.08 else pick(rng, CAR_COLOURS)
    big = rng.random() < 0.15 if big is None else big
    if big:
        thing = Thing("truck", x, z, uni(rng, 2.3, 2.55), uni(rng, 2.8, 3.4), colour,
                      variant=int(rng.random() < 0.4), lookalike=lookalike)
    else:
        thing = Thing("car", x, z, uni(rng, 1.7, 2.0), uni(rng, 1.35, 1.75), colour, variant=int(oncoming),
                      variant2=randint(rng, 0, 2), lookalike=lookalike, taxi=taxi)
    scene.things.append(thing)


def add_person(rng, scene: Scene, x: float, z: float, shirt, lookalike: str = "") -> None:
    """A pedestrian (no vest, no hard hat)."""
    scene.things.append(Thing("person", x, z, 0.55, uni(rng, 1.55, 1.9), shirt, pick(rng, SHIRTS[:4]),
                              variant=int(rng.random() < 0.15), variant2=randint(rng, 0, 4), lookalike=lookalike))


def sidewalk_x(rng, scene: Scene) -> float:
    """A lateral position on either sidewalk."""
    return pick(rng, (-1, 1)) * uni(rng, scene.half_road + 0.4, scene.outer - 0.3)


def add_traffic(rng, scene: Scene, lane_width: float, own_lane: float) -> None:
    """Moving and parked vehicles, pedestrians and ordinary traffic signs."""
    r, clear_ahead = scene.half_road, max(c.z for c in scene.cameras) + 14
    for i in range(scene.lanes):
        x = -r + (i + 0.5) * lane_width
        z = (clear_ahead if abs(x - own_lane) < 1 else 8) + uni(rng, 0, 25)
        while z < 80:
            if rng.random() < 0.5:
                add_vehicle(rng, scene, x + rng.normal(0, 0.2), z, oncoming=i < scene.lanes // 2)
            z += uni(rng, 9, 35)
    for side in (-1, 1) if scene.kind != "highway" else ():
        x = side * (r - 1.1)
        z = (clear_ahead if abs(x - own_lane) < 1.5 else 3) + uni(rng, 0, 15)
        while z < 75:
            if rng.random() < 0.35:
                add_vehicle(rng, scene, x, z, oncoming=False, big=False)
            z += uni(rng, 5.5, 9)
    for _ in range(randint(rng, 0, {"urban street": 6, "suburban road": 3, "highway": 1}[scene.kind])):
        add_person(rng, scene, sidewalk_x(rng, scene), uni(rng, 4, 70), pick(rng, SHIRTS))
    for _ in range(randint(rng, 0, 3)):
        scene.things.append(Thing("sign", pick(rng, (-1, 1)) * (r + 0.3), uni(rng, 5, 60), 0.7,
                                  uni(rng, 2.2, 2.8), pick(rng, ((30, 80, 180), (30, 120, 60))),
                                  variant=randint(rng, 0, 4)))


# --- hard look-alikes: orange, yellow and striped things that are not roadwork ----------------

def near_z(rng) -> float:
    """A distance at which look-alikes are about as prominent as roadwork."""
    return uni(rng, 6, 40)


def lookalike_vehicle(rng, scene: Scene) -> None:
    """One or two orange or yellow cars, yellow taxis, orange trucks or yellow buses on the road."""
    r = scene.half_road
    for _ in range(randint(rng, 1, 3)):
        x = uni(rng, -r + 1, r - 1)
        style = randint(rng, 0, 4)
        if style == 0:
            colour = pick(rng, WARM)
            phrase = "an orange car" if colour[1] < 160 else "a yellow car"
            add_vehicle(rng, scene, x, near_z(rng), False, colour, phrase, big=False)
        elif style == 1:
            add_vehicle(rng, scene, x, near_z(rng), False, (245, 195, 25), "a yellow taxi", big=False, taxi=True)
        else:
            colour = pick(rng, WARM)
            add_vehicle(rng, scene, x, near_z(rng) + 5, False, colour,
                        "an orange truck" if style == 2 else "a yellow bus", big=True)


def lookalike_people(rng, scene: Scene) -> None:
    """One to three people in orange clothes, mostly on the sidewalks."""
    for _ in range(randint(rng, 1, 4)):
        x = sidewalk_x(rng, scene) if rng.random() < 0.7 else uni(rng, -scene.half_road, scene.half_road)
        add_person(rng, scene, x, near_z(rng), pick(rng, WARM + CONE_ORANGE), "a person in orange clothes")


def lookalike_zebra(rng, scene: Scene) -> None:
    """A zebra crossing over the road, more often than not with traffic lights beside it."""
    r, z = scene.half_road, uni(rng, 5, 30)
    bars = [quad_x(x, x + 0.5, z, z + uni(rng, 2.5, 4)) for x in np.arange(-r + 0.3, r - 0.3, 1.0)]
    scene.ground.append((np.array(bars), (230, 230, 225)))
    scene.notes.append(("a zebra crossing", 0.0, z))
    if rng.random() < 0.6:
        lookalike_traffic_light(rng, scene, z)


def lookalike_traffic_light(rng, scene: Scene, z: float | None = None) -> None:
    """A traffic light on each side of the road at ``z`` (a near distance when None)."""
    z = near_z(rng) if z is None else z
    for side in (-1, 1):
        scene.things.append(Thing("traffic_light", side * (scene.half_road + 0.3), z, 0.4, uni(rng, 3.6, 4.6),
                                  variant=int(rng.choice(3, p=[0.35, 0.4, 0.25])), lookalike="traffic lights"))


def lookalike_striped_poles(rng, scene: Scene) -> None:
    """One to four striped poles (red or orange on white), tall or short, beside the road."""
    colour = pick(rng, STRIPE_RED)
    for _ in range(randint(rng, 1, 5)):
        tall = rng.random() < 0.5
        scene.things.append(Thing("striped_pole", pick(rng, (-1, 1)) * (scene.half_road + uni(rng, 0.2, 1.0)),
                                  near_z(rng), 0.12 if tall else 0.22, uni(rng, 2, 3.2) if tall else uni(rng, 0.8, 1.2),
                                  colour, lookalike="red-and-white striped poles"))


def lookalike_awning(rng, scene: Scene) -> None:
    """A striped awning on a facade of an urban street; striped poles on other roads."""
    if scene.kind != "urban street":   # no facade to hang it on
        lookalike_striped_poles(rng, scene)
        return
    layers: list = []
    x, z0 = pick(rng, (-1, 1)) * scene.outer, uni(rng, 4, 40)
    add_awning(rng, scene, layers, x, z0, z0 + uni(rng, 4, 8), pick(rng, STRIPE_RED))
    scene.buildings.append((-1e9, layers))   # drawn after every facade


def lookalike_signs(rng, scene: Scene) -> None:
    """One or two yellow warning diamonds or orange street signs beside the road."""
    for _ in range(randint(rng, 1, 3)):
        diamond = rng.random() < 0.4
        colour = (250, 200, 20) if diamond else pick(rng, WARM)
        scene.things.append(Thing("sign", pick(rng, (-1, 1)) * (scene.half_road + 0.3), near_z(rng),
                                  uni(rng, 0.6, 0.9), uni(rng, 2.0, 2.8), colour, variant=4 if diamond else 3,
                                  lookalike="a yellow warning sign" if diamond else "an orange street sign"))


def lookalike_road_damage(rng, scene: Scene) -> None:
    """One to three potholes on the road."""
    r = scene.half_road
    for _ in range(randint(rng, 1, 4)):
        x, z = uni(rng, -r + 1, r - 1), near_z(rng)
        a = np.linspace(0, 2 * np.pi, 9)[:-1]
        rad = uni(rng, 0.3, 1.2) * rng.uniform(0.7, 1.3, 8)
        hole = np.stack([x + rad * np.cos(a), np.zeros(8), z + 1.5 * rad * np.sin(a)], -1)
        scene.ground.append(([hole], pick(rng, ((40, 38, 36), (55, 52, 50), (75, 75, 78)))))
        scene.notes.append(("a pothole", x, z))


def lookalike_bins(rng, scene: Scene) -> None:
    """One to three litter bins of one orange or yellow colour on the sidewalks."""
    colour = pick(rng, WARM)
    for _ in range(randint(rng, 1, 4)):
        scene.things.append(Thing("bin", sidewalk_x(rng, scene), near_z(rng), uni(rng, 0.5, 0.7),
                                  uni(rng, 0.8, 1.1), colour, lookalike="an orange litter bin"))


def lookalike_autumn(rng, scene: Scene) -> None:
    """Autumn colours for the scene's trees, and one or two more autumn trees by the building line or verge."""
    for t in scene.things:
        if t.kind == "tree":
            t.colour, t.lookalike = pick(rng, AUTUMN), "autumn trees"
    for _ in range(randint(rng, 1, 3)):
        w = uni(rng, 3, 5.5)
        scene.things.append(Thing("tree", pick(rng, (-1, 1)) * (scene.outer - 0.8), near_z(rng), w, w * 1.7,
                                  pick(rng, AUTUMN), lookalike="autumn trees"))


LOOKALIKES = (lookalike_vehicle, lookalike_vehicle, lookalike_people, lookalike_zebra, lookalike_traffic_light,
              lookalike_striped_poles, lookalike_awning, lookalike_signs, lookalike_road_damage, lookalike_bins,
              lookalike_autumn)


# --- roadwork ---------------------------------------------------------------------------------

def roadwork_thing(rng, kind: str, x: float, z: float, night: bool) -> Thing:
    """One roadwork object of ``kind`` with sampled size, colours and variant."""
    if kind == "cone":
        h = uni(rng, 0.5, 1.0)
        return Thing("cone", x, z, 0.55 * h, h, pick(rng, CONE_ORANGE), roadwork=True, variant=randint(rng, 0, 2))
    if kind == "barrel":
        return Thing("barrel", x, z, uni(rng, 0.55, 0.65), uni(rng, 0.9, 1.05), pick(rng, CONE_ORANGE),
                     roadwork=True, variant=randint(rng, 0, 2))
    if kind == "barrier":
        return Thing("barrier", x, z, uni(rng, 1.2, 2.0), uni(rng, 1.0, 1.2), pick(rng, STRIPE_RED),
                     roadwork=True, variant=randint(rng, 0, 3), lamp=rng.random() < (0.7 if night else 0.3))
    if kind == "worksign":
        return Thing("worksign", x, z, uni(rng, 0.6, 0.9), uni(rng, 1.6, 2.3),
                     pick(rng, ((250, 140, 20), (255, 120, 0), (245, 165, 30))), roadwork=True,
                     variant=randint(rng, 0, 3))
    if kind == "worker":
        return Thing("worker", x, z, 0.6, uni(rng, 1.6, 1.9), pick(rng, SHIRTS), pick(rng, SHIRTS[:4]),
                     variant=int(rng.random() < 0.4), variant2=randint(rng, 0, 4), roadwork=True,
                     vest=pick(rng, ((255, 120, 20), (255, 150, 30), (200, 240, 40), (230, 250, 60))),
                     helmet=pick(rng, ((250, 210, 20), (240, 240, 240), (255, 130, 20))))
    if kind == "gravel":
        w = uni(rng, 1.8, 3.5)
        return Thing("gravel", x, z, w, w * uni(rng, 0.3, 0.45), pick(rng, ((120, 105, 90), (140, 135, 125),
                                                                             (105, 85, 65))), roadwork=True)
    h = uni(rng, 2.6, 3.4) if kind == "excavator" else uni(rng, 2.4, 2.8)
    return Thing(kind, x, z, h * (5 / 3 if kind == "excavator" else 3.4 / 2.6), h, pick(rng, MACHINE),
                 roadwork=True, flip=pick(rng, (-1, 1)))


def work_zone(rng, scene: Scene, x: float, z: float, lane_width: float, pattern: str, hard: bool) -> None:
    """One roadwork pattern around (x, z): cone or barrel lines, barriers, a dig, a machine, workers, signs."""
    night, add = scene.time == "night", scene.things.append
    few = randint(rng, 1, 3)
    if pattern in ("cone", "barrel"):
        n, step = (few if hard else randint(rng, 2, 10)), uni(rng, 2, 4.5)
        x0, dx = x + uni(rng, -0.5, 0.5) * lane_width, uni(rng, -0.35, 0.35)
        for i in range(n):
            add(roadwork_thing(rng, pattern, x0 + i * dx, z + i * step, night))
    elif pattern == "barrier":
        n = 1 if hard else randint(rng, 1, 4)
        for i in range(n):
            add(roadwork_thing(rng, "barrier", x + (i - (n - 1) / 2) * 1.7, z, night))
    elif pattern == "dig":
        a = np.linspace(0, 2 * np.pi, 11)[:-1]
        rad = rng.uniform(0.75, 1.2, 10)
        patch = np.stack([x + lane_width * 0.45 * rad * np.cos(a), np.zeros(10), z + 3 + 3.5 * rad * np.sin(a)], -1)
        scene.ground.append(([patch], pick(rng, ((95, 75, 55), (80, 70, 60), (110, 95, 75)))))
        add(roadwork_thing(rng, "gravel", x + uni(rng, -1, 1), z + uni(rng, 5, 7), night))
        add(roadwork_thing(rng, "barrier", x + uni(rng, -0.5, 0.5), z - 0.5, night))
    elif pattern == "machine":
        add(roadwork_thing(rng, pick(rng, ("excavator", "roller")), x, z + uni(rng, 2, 8), night))
        for _ in range(randint(rng, 0, 3)):
            add(roadwork_thing(rng, "worker", x + uni(rng, -2.5, 2.5), z + uni(rng, 0, 6), night))
    elif pattern == "worker":
        for _ in range(few if hard else randint(rng, 1, 4)):
            add(roadwork_thing(rng, "worker", x + uni(rng, -1.5, 1.5), z + uni(rng, 0, 5), night))
    else:
        for _ in range(1 if hard else few):
            side_x = float(np.clip(x + pick(rng, (-1, 1)) * uni(rng, 0.8, 2.5), 0.3 - scene.outer, scene.outer - 0.3))
            add(roadwork_thing(rng, "worksign", side_x, z + uni(rng, 0, 4), night))


def add_roadwork(rng, scene: Scene, lane_width: float) -> None:
    """A work zone: clearly visible (most), medium, or hard (few small objects, far, maybe occluded)."""
    mode = int(rng.choice(3, p=[0.7, 0.2, 0.1]))
    cam, lim = scene.cameras[0], scene.outer - 0.5
    z = nearest_ground(cam) * uni(rng, *((1.15, 2.2), (1.8, 3.2), (3.0, 8.0))[mode])
    x = float(np.clip(cam.x + uni(rng, -0.3, 0.3) * z, -lim, lim))   # in front of the main camera
    patterns = ("cone", "barrel", "barrier", "worksign", "worker") if mode == 2 else \
        ("cone", "barrel", "barrier", "dig", "machine", "worker", "worksign")
    chosen = list(rng.choice(patterns, size=(randint(rng, 1, 3), randint(rng, 1, 3), 1)[mode], replace=False))
    if mode == 0:   # clear cases always hold one large element
        chosen.append(pick(rng, [p for p in ("barrier", "dig", "machine", "worker") if p not in chosen]))
    for pattern in chosen:
        work_zone(rng, scene, x, z + uni(rng, 0, 6), lane_width, str(pattern), hard=mode == 2)
    if mode == 2 and rng.random() < 0.5:
        add_vehicle(rng, scene, x + rng.normal(0, 0.6), z - uni(rng, 2, 5), oncoming=False)


def nearest_ground(cam: Camera) -> float:
    """Distance of the ground seen at 95 % of the image height (nearer things are cut off at the bottom)."""
    return cam.focal * cam.height / (0.95 * cam.size - cam.cv)


def ensure_roadwork_in_view(rng, scene: Scene, cameras: list) -> None:
    """Add a roadwork object in front of any camera that would otherwise see none (else its label lies)."""
    for _ in range(2):   # a second pass in case a later addition hid an earlier camera's roadwork
        for cam in cameras:
            if not roadwork_visible(scene, cam):
                place_roadwork_in_front(rng, scene, cam)


def place_roadwork_in_front(rng, scene: Scene, cam: Camera) -> None:
    """Try random spots in the lower part of the view; failing that, clear the way for a cone straight ahead."""
    nearest, lim, night = nearest_ground(cam), scene.outer - 0.4, scene.time == "night"
    for attempt in range(12):
        kind = pick(rng, ("cone", "barrel", "worksign", "barrier", "worker") if attempt < 6 else ("cone", "barrel"))
        d = nearest * uni(rng, 1.1, 3.0 if attempt < 6 else 1.6)
        angle = cam.yaw + uni(rng, -0.2, 0.2) * cam.size / cam.focal
        x, z = cam.x + d * np.sin(angle), cam.z + d * np.cos(angle)
        if abs(x) > lim:
            continue
        scene.things.append(roadwork_thing(rng, kind, float(x), float(z), night))
        if roadwork_visible(scene, cam):
            return
        scene.things.pop()
    d = nearest * 1.3
    cone = roadwork_thing(rng, "cone", cam.x + d * np.sin(cam.yaw), cam.z + d * np.cos(cam.yaw), night)
    depth = cam.to_camera(np.array([(t.x, 0.0, t.z) for t in scene.things]).reshape(-1, 3))[:, 2]
    scene.things[:] = [t for t, z in zip(scene.things, depth) if t.roadwork or not 0 < z < d + 1]
    scene.things.append(cone)


# --- visibility, difficulty, description -----------------------------------------------------

def visibility(scene: Scene, cam: Camera) -> dict:
    """Per thing: visible fraction (in frame, not hidden by nearer things), visible px area, px height."""
    things, size = scene.things, cam.size
    attrs = np.array([(t.x, t.z, t.width, t.height, OPACITY.get(t.kind, 0.15), t.roadwork) for t in things],
                     np.float64).reshape(-1, 6)
    c = cam.to_camera(np.stack([attrs[:, 0], np.zeros(len(things)), attrs[:, 1]], -1))
    depth = c[:, 2]
    ok = depth > 0.8
    s = np.where(ok, cam.focal / np.maximum(depth, 0.8), 0.0)
    u, v = cam.cu + c[:, 0] * s, cam.cv + cam.height * s
    w, h = attrs[:, 2] * s, attrs[:, 3] * s
    box = np.stack([u - w / 2, v - h, u + w / 2, v], -1)
    clip = np.clip(box, 0, size)
    full = np.maximum(w * h, 1e-6)
    area = (clip[:, 2] - clip[:, 0]) * (clip[:, 3] - clip[:, 1])
    lo, hi = np.maximum(clip[:, None, :2], clip[None, :, :2]), np.minimum(clip[:, None, 2:], clip[None, :, 2:])
    overlap = np.prod(np.clip(hi - lo, 0, None), -1)   # (i, j): pixels of box i also covered by box j
    nearer = (depth[None, :] < depth[:, None]) & ok[None, :]
    hidden = np.clip((overlap * nearer * attrs[None, :, 4]).sum(1) / np.maximum(area, 1e-6), 0, 1)
    frac = np.where(ok, area / full * (1 - hidden), 0.0)
    return dict(frac=frac, area=frac * full, height=np.where(ok, h, 0.0), roadwork=attrs[:, 5] > 0,
                seen=(frac >= 0.25) & (h >= 0.015 * size) & ok)


def roadwork_visible(scene: Scene, cam: Camera) -> bool:
    """Whether a telling roadwork object (not just a gravel pile) is not tiny and mostly (or largely) visible."""
    vis = visibility(scene, cam)
    telling = vis["roadwork"] & np.array([t.kind != "gravel" for t in scene.things], bool)
    shown = (vis["frac"] >= 0.6) | (vis["area"] >= 0.01 * cam.size ** 2)
    return bool((telling & shown & (vis["height"] >= 0.04 * cam.size)).any())


def notes_in_view(scene: Scene, cam: Camera) -> list[str]:
    """Phrases of ground features (zebra crossings, potholes, awnings) whose spot is in the frame."""
    seen = []
    for phrase, x, z in scene.notes:
        xc, _, zc = cam.to_camera(np.array([x, 0.0, z]))
        if zc > 1 and 0 <= cam.cu + cam.focal * xc / zc < cam.size:
            seen.append(phrase)
    return seen


def view_difficulty(scene: Scene, vis: dict, label: int, fx: dict, n_lookalikes: int) -> float:
    """0 = large, many, clearly visible roadwork on a clear day; 1 = tiny, cut off, at night in fog."""
    cond = (0.2 * (scene.time == "night") + 0.05 * (scene.time == "dusk") + 0.2 * ("fog" in fx)
            + 0.1 * (scene.weather == "rain") + 0.08 * (fx["blur"] is not None) + 0.05 * (fx["noise"] is not None))
    look = min(1.0, n_lookalikes / 3)
    if not label:
        return float(np.clip(0.1 + 0.35 * look + cond, 0, 1))
    rw, size = vis["roadwork"], scene.size
    area = float(vis["area"][rw].sum()) / size ** 2
    small = np.clip(np.log(0.08 / max(area, 1e-6)) / np.log(160), 0, 1)
    n_seen = int((vis["seen"] & rw).sum())
    cut = 1 - n_seen / max(int(rw.sum()), 1)
    return float(np.clip(0.55 * small + 0.1 / max(n_seen, 1) + 0.1 * cut + 0.1 * look + cond, 0, 1))


def counted(n: int, noun: str) -> str:
    """'a traffic cone', 'three traffic cones', 'many ...'."""
    plural = noun.replace("worker in a hi-vis vest", "workers in hi-vis vests")
    plural = plural if plural != noun else noun + "s"
    if n == 1:
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else 'many'} {plural}"


def joined(items: list[str]) -> str:
    """``items`` as an English list: 'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(scene: Scene, vis: dict, lookalikes: list[str], label: int) -> str:
    """A sentence like NATIX's ``scene_description``, from what this view shows."""
    seen = [t for t, s in zip(scene.things, vis["seen"]) if s]
    kinds = [t.kind for t in seen if t.roadwork]
    items = [counted(kinds.count(k), noun) for k, noun in ROADWORK_NOUNS.items() if k in kinds]
    if label and not items:
        items = ["roadwork in the distance"]
    items += lookalikes
    plain = {t.kind for t in seen if not t.lookalike}
    context = [word for word, kinds_ in (("traffic", {"car", "truck"}), ("pedestrians", {"person"}),
                                         ("trees", {"tree"})) if plain & kinds_]
    when = {"day": "by day", "dusk": "at dusk", "night": "at night"}[scene.time]
    weather = {"clear": "", "rain": " in the rain", "fog": " in fog"}[scene.weather]
    text = f"A {LANE_WORDS[scene.lanes]} {scene.kind} {when}{weather}"
    if items:
        text += " with " + joined(items)
    if context:
        text += (", near " if items else " with ") + joined(context)
    return text + "."
