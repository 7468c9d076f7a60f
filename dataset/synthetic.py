"""Procedural aerial-scene image-text dataset for the demo and the tests.

Every image shows one of ten scene layouts plus per-image attributes (colour and number of the
main objects, an optional road) that its captions state, so that a retrieval model has to read
the captions, not only the scene class, to rank well. Each image also gets a segmentation mask in the
RSITMD-SS format (``masks/mask_<name>.png``: 10 x class index), computed from the same pixel sets that paint
it. Only numpy and Pillow are used so that the module imports instantly and generation needs no model code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # 2: masks/ beside images/ (the images are those of version 1)
REF = 64.0  # all geometry is designed in a 64 x 64 reference frame and scaled to image_size

# Mask classes the demo draws, by their RSITMD-SS index (dataset/masks.py: CLASS_NAMES; a test keeps the two
# equal, since this module imports no project code); a mask stores MASK_VALUE_STEP x index.
MASK_CLASSES: dict[str, int] = {"Background": 0, "Plane": 1, "Boat": 2, "Pond": 4, "River": 5, "Beach": 6,
                                "Playground": 7}
MASK_VALUE_STEP = 10
# Objects of a foreground class; the others (houses, umbrellas, tents, buses) are background, like roads.
OBJECT_CLASSES: dict[str, int] = {"plane": MASK_CLASSES["Plane"], "boat": MASK_CLASSES["Boat"]}


@dataclass(frozen=True)
class DemoSpec:
    """Size and seed of the generated dataset; part of the completeness stamp."""

    train_per_class: int = 80
    val_per_class: int = 10
    test_per_class: int = 20
    image_size: int = 64
    seed: int = 0


SCENE_CLASSES: tuple[str, ...] = (
    "farmland", "forest", "lake", "beach", "desert",
    "residential", "parking", "airport", "river", "playground",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 30),
    "white": (245, 245, 245),
    "blue": (30, 70, 215),
    "yellow": (245, 210, 25),
    "black": (20, 20, 20),
}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Background = (rgb float array, mask of allowed object centres, long axis of objects or None,
#               uint8 map of mask classes).
Background = tuple[np.ndarray, np.ndarray, int | None, np.ndarray]
Painter = Callable[[np.random.Generator, np.ndarray, np.ndarray], Background]

# ----------------------------------------------------------------------------- backgrounds


def _rgb(colour: tuple[float, float, float]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in about [0, 1]: a coarse random grid upsampled, for natural textures."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def _textured(rng: np.random.Generator, size: int, base: tuple[int, int, int],
              amount: float = 0.15, cells: int = 8) -> np.ndarray:
    """A flat colour with low-frequency brightness variation (grass, sand, water)."""
    shade = 1.0 + amount * (_smooth_noise(rng, size, cells) - 0.5)
    return _rgb(base) * shade[..., None]


def _everywhere(y: np.ndarray) -> np.ndarray:
    return np.ones(y.shape, dtype=bool)


def _class_map(region: np.ndarray, class_name: str) -> np.ndarray:
    """The mask classes of a background: ``class_name`` on ``region``, background elsewhere."""
    return np.where(region, np.uint8(MASK_CLASSES[class_name]), np.uint8(0))


def _no_classes(y: np.ndarray) -> np.ndarray:
    return np.zeros(y.shape, dtype=np.uint8)


def _farmland(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Parallel fields of alternating crop colours with fine furrows."""
    palette = np.array([(105, 150, 60), (150, 125, 75), (85, 125, 50), (175, 165, 95)],
                       dtype=np.float32)[rng.permutation(4)[:3]]
    theta = rng.uniform(0.0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0.0, 30.0)
    rgb = palette[np.floor(u / rng.uniform(6.0, 10.0)).astype(int) % 3]
    rgb *= (1.0 + 0.07 * np.sin(2.0 * np.pi * u / 2.5))[..., None]
    return rgb, _everywhere(y), None, _no_classes(y)


def _forest(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Dark-green canopy: large shading blobs plus small tree crowns."""
    size = y.shape[0]
    blobs = _smooth_noise(rng, size, 6)[..., None]
    crowns = _smooth_noise(rng, size, 22)[..., None]
    rgb = _rgb((25, 60, 28)) + blobs * _rgb((20, 40, 15)) + crowns * _rgb((15, 35, 12))
    return rgb, _everywhere(y), None, _no_classes(y)


def _lake(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """An irregular blue blob in grassland; boats float on it."""
    size = y.shape[0]
    cy, cx = REF / 2 + rng.uniform(-5.0, 5.0, 2)
    angle = np.arctan2(y - cy, x - cx)
    radius = np.hypot(y - cy, x - cx)
    edge = rng.uniform(20.0, 25.0) * (1.0 + sum(
        rng.uniform(0.04, 0.1) * np.sin(k * angle + rng.uniform(0.0, 2.0 * np.pi))
        for k in (2, 3, 5)))
    water = radius < edge
    rgb = np.where(water[..., None], _textured(rng, size, (40, 95, 165), 0.1),
                   _textured(rng, size, (95, 140, 70), 0.25))
    return rgb, radius < edge - 7.0, None, _class_map(water, "Pond")


def _beach(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Sand on one side, sea on the other, a foam line between; umbrellas stand on the sand."""
    size = y.shape[0]
    across, along = [(x, y), (REF - x, y), (y, x), (REF - y, x)][rng.integers(4)]
    shore = rng.uniform(28.0, 38.0) + 3.0 * np.sin(
        2.0 * np.pi * along / rng.uniform(20.0, 40.0) + rng.uniform(0.0, 2.0 * np.pi))
    sea = across > shore
    foam = np.abs(across - shore) < 1.2
    rgb = np.where(sea[..., None], _textured(rng, size, (50, 110, 170), 0.15),
                   _textured(rng, size, (215, 195, 140), 0.1))
    rgb[foam] = _rgb((230, 235, 235))
    return rgb, across < shore - 8.0, None, _class_map(~sea | foam, "Beach")  # the sand up to the surf line


def _desert(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Sand with wavy dune ridges lit from one side."""
    theta = rng.uniform(0.0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    phase = 2.0 * np.pi * (u + 4.0 * np.sin(2.0 * np.pi * v / rng.uniform(25.0, 45.0))) \
        / rng.uniform(11.0, 16.0) + rng.uniform(0.0, 2.0 * np.pi)
    rgb = _rgb((205, 165, 105)) * (1.0 + 0.13 * np.sin(phase))[..., None]
    return rgb, _everywhere(y), None, _no_classes(y)


def _residential(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Light-grey ground covered by a grid of small muted roofs."""
    muted = np.array([(120, 110, 105), (150, 140, 130), (95, 95, 100)], dtype=np.float32)
    row = y + rng.uniform(0.0, 8.0)
    col = x + rng.uniform(0.0, 8.0)
    tone = muted[rng.integers(0, 3, (10, 10))][(row // 8).astype(int), (col // 8).astype(int)]
    roof = ((row % 8) >= 2) & ((row % 8) < 6) & ((col % 8) >= 2) & ((col % 8) < 6)
    rgb = np.where(roof[..., None], tone, _rgb((175, 170, 160)))
    return rgb, _everywhere(y), None, _no_classes(y)


def _parking(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Asphalt with painted bays and rows of small grey cars; buses park like the cars."""
    horizontal_cars = bool(rng.random() < 0.5)
    across, along = (x, y) if horizontal_cars else (y, x)
    across = across + rng.uniform(0.0, 16.0)
    along = along + rng.uniform(0.0, 6.0)
    in_row, in_bay = across % 16, along % 6
    bay = ((across // 16).astype(int), (along // 6).astype(int))
    parked = (rng.random((6, 14)) < 0.6)[bay]
    tone = np.array([(150, 150, 155), (110, 110, 115), (165, 160, 150)],
                    dtype=np.float32)[rng.integers(0, 3, (6, 14))][bay]
    rgb = np.broadcast_to(_rgb((70, 70, 75)), (*y.shape, 3)).copy()
    rgb[(in_bay < 0.8) & (in_row >= 1) & (in_row < 10)] = _rgb((200, 200, 200))
    car = parked & (in_row >= 2) & (in_row < 9) & (in_bay >= 1.5) & (in_bay < 5)
    rgb[car] = tone[car]
    return rgb, _everywhere(y), 0 if horizontal_cars else 1, _no_classes(y)


def _airport(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """Grass-grey apron crossed by a dark runway with a dashed centre line."""
    across, along = (y, x) if rng.random() < 0.5 else (x, y)
    dist = np.abs(across - rng.uniform(20.0, 44.0))
    rgb = _textured(rng, y.shape[0], (125, 135, 110), 0.15)
    rgb[dist < 6.0] = _rgb((70, 70, 75))
    rgb[(dist < 0.8) & ((along + rng.uniform(0.0, 8.0)) % 8 < 4)] = _rgb((230, 230, 230))
    return rgb, _everywhere(y), None, _no_classes(y)


def _river(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """A winding blue band through green land; boats sail along it."""
    vertical = bool(rng.random() < 0.5)
    across, along = (x, y) if vertical else (y, x)
    centre = rng.uniform(24.0, 40.0) + rng.uniform(4.0, 8.0) * np.sin(
        2.0 * np.pi * along / rng.uniform(45.0, 70.0) + rng.uniform(0.0, 2.0 * np.pi))
    dist = np.abs(across - centre)
    half_width = rng.uniform(6.5, 8.0)
    size = y.shape[0]
    water = dist < half_width
    rgb = np.where(water[..., None], _textured(rng, size, (40, 95, 165), 0.1),
                   _textured(rng, size, (90, 135, 65), 0.25))
    return rgb, dist < half_width - 3.0, 1 if vertical else 0, _class_map(water, "River")


def _playground(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> Background:
    """A terracotta oval running track with a lawn inside; buildings stand around it."""
    cy, cx = REF / 2 + rng.uniform(-4.0, 4.0, 2)
    semi = (rng.uniform(22.0, 25.0), rng.uniform(13.0, 16.0))
    a, b = semi if rng.random() < 0.5 else semi[::-1]
    rho = np.hypot((x - cx) / a, (y - cy) / b)
    rgb = _textured(rng, y.shape[0], (80, 140, 60), 0.2)
    rgb[rho < 0.7] = _rgb((95, 165, 75))
    rgb[(rho >= 0.7) & (rho < 1.0)] = _rgb((180, 95, 65))
    rgb[np.abs(rho - 0.85) < 0.02] = _rgb((235, 235, 235))
    return rgb, (rho > 1.15) | (rho < 0.45), None, _class_map(rho < 1.0, "Playground")  # track and its lawn


# ----------------------------------------------------------------------------- objects

Polygon = list[tuple[float, float]]


def _box(x0: float, x1: float, y0: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(radius: float, corners: int = 16) -> Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, corners, endpoint=False)
    return list(zip(radius * np.cos(t), radius * np.sin(t)))


# Object outlines in units of the object length, long axis along x, within [-0.5, 0.5]^2:
# (body polygons in the object colour, shade polygons in a darker tone of it).
SHAPES: dict[str, tuple[list[Polygon], list[Polygon]]] = {
    "house": ([_box(-0.5, 0.5, -0.4, 0.4)], [_box(-0.5, 0.5, -0.06, 0.06)]),
    "boat": ([[(-0.5, 0.0), (-0.3, -0.25), (0.35, -0.25), (0.5, 0.0), (0.35, 0.25),
               (-0.3, 0.25)]], [_box(-0.15, 0.15, -0.12, 0.12)]),
    "umbrella": ([_circle(0.45)], [_box(-0.45, 0.45, -0.05, 0.05), _box(-0.05, 0.05, -0.45, 0.45)]),
    "tent": ([[(-0.5, 0.4), (0.5, 0.4), (0.0, -0.45)]], [[(0.0, 0.4), (0.5, 0.4), (0.0, -0.45)]]),
    "bus": ([_box(-0.5, 0.5, -0.25, 0.25)], [_box(-0.4, 0.4, -0.08, 0.08)]),
    "plane": ([_box(-0.5, 0.5, -0.12, 0.12), _box(-0.05, 0.2, -0.5, 0.5),
               _box(-0.5, -0.35, -0.25, 0.25)], []),
}


def _box_size(shape: str, length: float, axis: int | None) -> np.ndarray:
    """(height, width) in ref units that the object covers in any of its allowed rotations."""
    points = np.concatenate([np.asarray(p) for p in SHAPES[shape][0]])
    along, across = 2.0 * np.abs(points).max(axis=0) * length
    if axis is None:
        return np.full(2, max(along, across))
    return np.array([across, along] if axis == 0 else [along, across])


def _pick_centres(candidates: np.ndarray, count: int, spacing: np.ndarray) -> list[np.ndarray]:
    """Greedily keep shuffled candidates whose boxes stay `spacing` apart along y or x, so
    objects never overlap and the drawn count matches the caption."""
    chosen: list[np.ndarray] = []
    while candidates.size and len(chosen) < count:
        chosen.append(candidates[0])
        candidates = candidates[(np.abs(candidates - candidates[0]) >= spacing).any(axis=1)]
    return chosen


def _place_objects(rng: np.random.Generator, y: np.ndarray, x: np.ndarray,
                   masks: list[np.ndarray], count: int, box: np.ndarray,
                   attempts: int = 6) -> list[np.ndarray]:
    """Centres (ref units) inside the first mask that fits `count` objects, else the next one.

    The last mask is the whole frame: its four corner candidates are pairwise far enough
    apart, so the greedy packing there always holds at least four objects."""
    low = box / 2.0 + 1.0
    inside = (y >= low[0]) & (y <= REF - low[0]) & (x >= low[1]) & (x <= REF - low[1])
    for mask in masks:
        candidates = np.stack([y[mask & inside], x[mask & inside]], axis=1)
        for _ in range(attempts):
            centres = _pick_centres(rng.permutation(candidates), count, box + 2.0)
            if len(centres) == count:
                return centres
    raise RuntimeError("object placement failed")  # unreachable for counts up to four


def _draw_objects(size: int, shape: str, centres: list[np.ndarray], length: float,
                  axis: int | None, rng: np.random.Generator) -> np.ndarray:
    """Label map of the objects: 0 background, 1 body, 2 shade."""
    labels = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(labels)
    scale = size / REF
    bodies, shades = SHAPES[shape]
    for cy, cx in centres:
        turns = int(rng.integers(4)) if axis is None else axis + 2 * int(rng.integers(2))
        rotation = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), turns)
        for value, polygons in ((1, bodies), (2, shades)):
            for polygon in polygons:
                points = np.asarray(polygon) @ rotation.T * length + (cx, cy)
                draw.polygon([tuple(p) for p in points * scale], fill=value)
    return np.asarray(labels)


def _road(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Distance (ref units) to a straight road crossing the frame at a random angle."""
    angle = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10.0, 10.0))
    py, px = REF / 2 + rng.uniform(-14.0, 14.0, 2)
    return np.abs((x - px) * np.cos(angle) + (y - py) * np.sin(angle))


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Scene:
    """How one class looks and how captions talk about it."""

    painter: Painter
    shape: str
    colours: tuple[str, ...]  # only colours that stand out against this background
    names: tuple[str, ...]
    objects: tuple[str, ...]
    prep: str
    flavour: str


_SCENES: dict[str, _Scene] = {
    "farmland": _Scene(
        _farmland, "house", ("red", "white", "blue", "yellow", "black"),
        ("farmland", "cropland", "farming area"), ("barns", "farmhouses"), "in",
        "{count} {colour} {obj} stand beside striped crop fields in the {cls}."),
    "forest": _Scene(
        _forest, "house", ("red", "white", "blue", "yellow"),
        ("forest", "woodland", "dense forest"), ("cabins", "huts"), "in",
        "{count} {colour} {obj} are hidden among the dense trees of the {cls}."),
    "lake": _Scene(
        _lake, "boat", ("red", "white", "yellow", "black"),
        ("lake", "pond", "small lake"), ("boats",), "on",
        "{count} {colour} {obj} float on the calm water of the {cls}."),
    "beach": _Scene(
        _beach, "umbrella", ("red", "white", "blue", "black"),
        ("beach", "sandy beach", "seaside beach"), ("umbrellas", "parasols"), "on",
        "{count} {colour} {obj} stand on the sand of the {cls} near the sea."),
    "desert": _Scene(
        _desert, "tent", ("red", "white", "blue", "black"),
        ("desert", "sandy desert", "desert area"), ("tents",), "in",
        "{count} {colour} {obj} are pitched among the sand dunes of the {cls}."),
    "residential": _Scene(
        _residential, "house", ("red", "blue", "yellow", "black"),
        ("residential area", "neighborhood", "housing estate"), ("houses", "buildings"), "in",
        "{count} large {colour} {obj} stand among small roofs in the {cls}."),
    "parking": _Scene(
        _parking, "bus", ("red", "white", "blue", "yellow"),
        ("parking lot", "car park", "parking area"), ("buses", "coaches"), "in",
        "{count} {colour} {obj} are parked among rows of cars in the {cls}."),
    "airport": _Scene(
        _airport, "plane", ("red", "white", "blue", "yellow"),
        ("airport", "airfield"), ("planes", "airplanes", "aircraft"), "at",
        "{count} {colour} {obj} are parked near the runway of the {cls}."),
    "river": _Scene(
        _river, "boat", ("red", "white", "yellow", "black"),
        ("river", "winding river"), ("boats", "ships"), "on",
        "{count} {colour} {obj} sail along the flowing water of the {cls}."),
    "playground": _Scene(
        _playground, "house", ("white", "blue", "yellow", "black"),
        ("playground", "sports ground"), ("buildings",), "around",
        "{count} {colour} {obj} stand around the oval running track of the {cls}."),
}

_FULL_TEMPLATES = (
    "{count} {colour} {obj} are {prep} the {cls}.",
    "there are {count} {colour} {obj} {prep} this {cls}.",
    "this {cls} has {count} {obj} and they are all {colour}.",
    "an aerial view of the {cls} with {count} {colour} {obj}.",
    "{count} {obj} colored {colour} can be seen {prep} the {cls}.",
)
_COLOUR_TEMPLATES = (
    "the {obj} {prep} this {cls} are {colour}.",
    "some {colour} {obj} are located {prep} the {cls}.",
    "the {cls} is dotted with {colour} {obj}.",
)
_COUNT_TEMPLATES = (
    "the {cls} contains exactly {count} {obj}.",
    "{count} {obj} can be found {prep} the {cls}.",
    "in this picture there are {count} {obj} {prep} the {cls}.",
)
_ROAD_TEMPLATE = "a grey road passes by {count} {colour} {obj} {prep} the {cls}."
_ROAD_CLAUSE = ", and a road passes by."
MAX_CAPTION_WORDS = 16


@dataclass(frozen=True)
class _Attributes:
    colour: str
    count: int
    road: bool


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _captions(rng: np.random.Generator, scene: _Scene, attrs: _Attributes) -> list[str]:
    """Five captions from different templates; together they state every attribute."""
    full = [_FULL_TEMPLATES[i] for i in rng.choice(len(_FULL_TEMPLATES), 2, replace=False)]
    if attrs.road:
        full[0] = _ROAD_TEMPLATE
    templates = [*full, scene.flavour, _pick(rng, _COLOUR_TEMPLATES),
                 _pick(rng, _COUNT_TEMPLATES)]
    captions = [t.format(count=COUNT_WORDS[attrs.count], colour=attrs.colour,
                         obj=_pick(rng, scene.objects), prep=scene.prep,
                         cls=_pick(rng, scene.names)) for t in templates]
    if attrs.road:  # a second, differently worded mention where the sentence stays short
        room = MAX_CAPTION_WORDS - len(_words(_ROAD_CLAUSE))
        short = [i for i, c in enumerate(captions[1:], 1) if len(_words(c)) <= room]
        if short:
            i = short[int(rng.integers(len(short)))]
            captions[i] = captions[i][:-1] + _ROAD_CLAUSE
    return [captions[i] for i in rng.permutation(len(captions))]


def _render(rng: np.random.Generator, scene: _Scene, attrs: _Attributes,
            size: int) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 RGB image of one sample and its uint8 map of mask classes (painted alike)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) * np.float32(REF / size)
    rgb, allowed, axis, classes = scene.painter(rng, y, x)
    length = rng.uniform(11.0, 13.0)
    everywhere = np.ones_like(allowed)
    masks = [allowed, everywhere]
    if attrs.road:
        dist = _road(rng, y, x)
        rgb[dist < 4.0] = _rgb((215, 215, 210))  # light kerb lines on both sides
        rgb[dist < 3.0] = _rgb((128, 128, 132))
        classes[dist < 4.0] = MASK_CLASSES["Background"]
        off_road = dist >= 4.0 + 0.75 * length  # keeps even a diagonal road uncovered
        masks = [allowed & off_road, allowed, off_road, everywhere]
    box = _box_size(scene.shape, length, axis)
    centres = _place_objects(rng, y, x, masks, attrs.count, box)
    labels = _draw_objects(size, scene.shape, centres, length, axis, rng)
    colour = _rgb(COLOURS[attrs.colour])
    rgb[labels == 1] = colour
    rgb[labels == 2] = colour * 0.6 + 30.0
    classes[labels > 0] = OBJECT_CLASSES.get(scene.shape, MASK_CLASSES["Background"])
    rgb = rgb * rng.uniform(0.95, 1.05) + rng.normal(0.0, 4.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), classes


def _sample(rng: np.random.Generator, class_name: str,
            size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Draw attributes, then the image, its mask classes and the captions that describe them."""
    scene = _SCENES[class_name]
    attrs = _Attributes(colour=_pick(rng, scene.colours),
                        count=int(rng.choice(list(COUNT_WORDS))),
                        road=bool(rng.random() < 0.5))
    pixels, classes = _render(rng, scene, attrs, size)
    return pixels, classes, _captions(rng, scene, attrs)


# ----------------------------------------------------------------------------- vocabulary


def demo_vocabulary() -> list[str]:
    """Every word any caption can contain (after lower-casing and stripping punctuation), sorted."""
    texts = [*_FULL_TEMPLATES, *_COLOUR_TEMPLATES, *_COUNT_TEMPLATES, _ROAD_TEMPLATE,
             _ROAD_CLAUSE, *COUNT_WORDS.values()]
    for scene in _SCENES.values():
        texts += [*scene.colours, *scene.names, *scene.objects, scene.prep, scene.flavour]
    return sorted({w for t in texts for w in _words(re.sub(r"\{\w+\}", " ", t))})


def _vocab_tokens() -> list[str]:
    """WordPiece vocabulary: whole caption words, plus single characters so that any other
    lower-case word still splits into known pieces instead of [UNK]."""
    chars = list(string.ascii_lowercase + string.digits)
    tokens = [*SPECIAL_TOKENS, *demo_vocabulary(), *chars, ".", ",", *("##" + c for c in chars)]
    return list(dict.fromkeys(tokens))


# ----------------------------------------------------------------------------- files


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: pathlib.Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, indent=None, ensure_ascii=False))


def _stamp(spec: DemoSpec) -> dict[str, Any]:
    return {"spec": dataclasses.asdict(spec), "format_version": FORMAT_VERSION}


def _is_complete(root: pathlib.Path, spec: DemoSpec) -> bool:
    try:
        stamp = json.loads((root / ".complete").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == _stamp(spec)


def _generate_splits(images: pathlib.Path, masks: pathlib.Path, spec: DemoSpec) -> dict[str, list[dict[str, Any]]]:
    """Write all images and their masks; return the JSON entries per split (train: one entry per caption)."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    per_class = {"train": spec.train_per_class, "val": spec.val_per_class,
                 "test": spec.test_per_class}
    image_id = 0
    for split, entries in splits.items():
        for label, class_name in enumerate(SCENE_CLASSES):
            for _ in range(per_class[split]):
                rng = np.random.default_rng([spec.seed, image_id])
                pixels, classes, captions = _sample(rng, class_name, spec.image_size)
                name = f"{class_name}_{image_id}.png"
                Image.fromarray(pixels).save(images / name)
                Image.fromarray(classes * np.uint8(MASK_VALUE_STEP)).save(masks / f"mask_{name}")
                meta = {"image": name, "image_id": image_id,
                        "label_name": class_name, "label": label}
                if split == "train":
                    entries += [{**meta, "caption": c} for c in captions]
                else:
                    entries.append({**meta, "caption": captions})
                image_id += 1
    return splits


def ensure_demo_dataset(root: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> pathlib.Path:
    """Generate the dataset under `root` (images/, masks/, the split JSONs, tokenizer/vocab.txt) unless a
    complete one with the same spec and format version is already there; return root."""
    root = pathlib.Path(root)
    if _is_complete(root, spec):
        return root
    (root / ".complete").unlink(missing_ok=True)
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for split, entries in _generate_splits(images, masks, spec).items():
        _write_json(root / f"demo_{split}.json", entries)
    _write_atomic(root / "tokenizer" / "vocab.txt", "\n".join(_vocab_tokens()) + "\n")
    _write_json(root / ".complete", _stamp(spec))
    return root
