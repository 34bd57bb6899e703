"""Coloured shapes on coloured backgrounds: the pictures `builtin:shapes` learns, and a checker for them.

The data generator draws one flat shape (circle, square or triangle) in one of eight colours on a
background of another colour, at a random size and position, and captions it the way a user would
ask for it: "a red circle on a blue background". The checker reads those three attributes back out
of any picture (a drawn one or a generated one) with plain pixel arithmetic, so tests and
`bench/quality.py` can say whether a model drew what it was told.

Some (colour, shape, background) combinations are held out of training (`is_held_out`); every
pair of attributes still appears in training, so the held-out ones test whether the model composes
words it knows into pictures it has never seen.

Example:
    >>> scene = random_scene(random.Random(0))
    >>> image = draw(scene)
    >>> describe(image) == (scene.colour, scene.shape, scene.background)
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

SIDE = 64  # the size the model is trained at, in pixels
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (245, 225, 40),
    "green": (35, 165, 65),
    "blue": (35, 85, 225),
    "purple": (140, 55, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shapes `builtin:shapes` never saw in training: the demonstration LoRAs of generation/train_extras.py
# teach it these, one each. `draw` draws them and `describe` tells them too.
NEW_SHAPES = ("ring", "cross")
MIN_SIZE, MAX_SIZE = 24, 44  # the shape's width and height, in pixels of a 64x64 picture
MARGIN = 4  # the shape never touches the border, so the border shows the background

_SUPERSAMPLE = 4  # draw large, then shrink: smooth edges like a rendered picture


class Description(NamedTuple):
    """What a picture shows, in caption words."""

    colour: str
    shape: str
    background: str


@dataclass(frozen=True)
class Scene:
    """One training picture: what is drawn and where (size and centre in pixels of a SIDE picture)."""

    colour: str
    shape: str
    background: str
    size: int
    centre: tuple[int, int]

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def description(self) -> Description:
        return Description(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    """The prompt for a combination: "a red circle on a blue background", "an orange ..."."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def all_combinations() -> list[Description]:
    """Every (colour, shape, background) with a background that differs from the shape's colour."""
    return [Description(colour, shape, background)
            for colour, shape, background in product(COLOURS, SHAPES, COLOURS) if colour != background]


def is_held_out(colour: str, shape: str, background: str) -> bool:
    """About one combination in seven never appears in training.

    The rule picks at most one shape per (colour, background) pair and at most two backgrounds per
    (colour, shape) pair, so every pair of attributes is still seen in training.
    """
    names = list(COLOURS)
    return (names.index(colour) + 2 * names.index(background) + SHAPES.index(shape)) % 7 == 0


def training_combinations() -> list[Description]:
    return [combo for combo in all_combinations() if not is_held_out(*combo)]


def held_out_combinations() -> list[Description]:
    return [combo for combo in all_combinations() if is_held_out(*combo)]


def random_scene(rng: random.Random, combinations: list[Description] | None = None) -> Scene:
    """A scene with a random combination (from `combinations`, default: the training ones),
    size and position."""
    colour, shape, background = rng.choice(combinations or training_combinations())
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    low, high = MARGIN + size // 2, SIDE - MARGIN - (size - size // 2)
    return Scene(colour, shape, background, size, (rng.randint(low, high), rng.randint(low, high)))


def draw(scene: Scene, side: int = SIDE) -> PIL.Image.Image:
    """The scene as an RGB picture, `side` pixels square (positions scale with it)."""
    big = side * _SUPERSAMPLE
    scale = big / SIDE
    image = PIL.Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = PIL.ImageDraw.Draw(image)
    half = scene.size * scale / 2
    x, y = (coordinate * scale for coordinate in scene.centre)
    box = (x - half, y - half, x + half - 1, y + half - 1)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    elif scene.shape == "triangle":  # an upright isosceles triangle filling half its bounding box
        pen.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    elif scene.shape == "ring":  # a disc with a hole half its width
        pen.ellipse(box, fill=fill)
        pen.ellipse((x - half / 2, y - half / 2, x + half / 2 - 1, y + half / 2 - 1), fill=COLOURS[scene.background])
    elif scene.shape == "cross":  # an upright plus sign, arms a third of its width
        arm = half / 3
        pen.rectangle((x - arm, box[1], x + arm - 1, box[3]), fill=fill)
        pen.rectangle((box[0], y - arm, box[2], y + arm - 1), fill=fill)
    else:
        raise ValueError(f"no such shape: {scene.shape!r}; the shapes are {', '.join(SHAPES + NEW_SHAPES)}")
    return image.resize((side, side), PIL.Image.Resampling.BOX)


def describe(image: PIL.Image.Image) -> Description:
    """Read colour, shape and background back out of a picture.

    Every pixel is given the nearest of the eight colours. The background is the commonest colour
    on the border; the shape's colour is the commonest other colour; the shape is told by which
    corners of its bounding box the largest blob of that colour fills (see `_shape_of`).
    """
    labels = _nearest_colour(np.asarray(image.convert("RGB"), dtype=np.float32))
    names = list(COLOURS)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(),
                             labels[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    inside = labels[labels != background]
    if inside.size == 0:
        return Description("none", "none", names[background])
    colour = int(np.bincount(inside, minlength=len(names)).argmax())
    return Description(names[colour], _shape_of(labels == colour), names[background])


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def _shape_of(mask: np.ndarray) -> str:
    """Tell the shape of the largest blob by which corners of its bounding box it fills.

    A square fills all four, an upright triangle the bottom two (about 3/4 each), a circle none.
    Corners, unlike the share of the box the blob fills, barely move when the sides of a shape
    bow a little or its edges are soft, as a diffusion model's often are. Of the new shapes, a ring
    encloses a hole (or leaves the middle of its box empty), and a cross is the one shape far from
    convex: it fills about 70% of its convex hull, the others all of it (a lumpy one over 80%),
    however it is turned.
    """
    blobs, count = ndimage.label(mask)
    if count == 0:
        return "none"
    largest = blobs == (np.bincount(blobs.ravel())[1:].argmax() + 1)
    rows, columns = np.nonzero(largest)
    box = largest[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    side = max(2, round(0.15 * min(box.shape)))  # a corner patch: 15% of the box's shorter side
    height, width = box.shape
    top = (box[:side, :side].mean() + box[:side, -side:].mean()) / 2
    bottom = (box[-side:, :side].mean() + box[-side:, -side:].mean()) / 2
    if top >= 0.3 and bottom >= 0.3:
        return "square"
    hole = ndimage.binary_fill_holes(box).sum() - box.sum()
    if hole >= 0.08 * box.size or _patch(box, height // 2, width // 2, side) < 0.3:
        return "ring"
    if bottom >= 0.3:
        return "triangle"
    return "cross" if _solidity(box) < 0.8 else "circle"


def _solidity(box: np.ndarray) -> float:
    """The blob's area over its convex hull's (pixels as unit squares)."""
    rows, columns = np.nonzero(box)
    corners = np.concatenate([np.stack([rows + dy, columns + dx], axis=1) for dy in (0, 1) for dx in (0, 1)])
    try:
        hull = ConvexHull(corners)
    except QhullError:  # a line of pixels: no area to speak of
        return 1.0
    return float(box.sum() / hull.volume)  # in 2-D, `volume` is the area


def _patch(box: np.ndarray, row: int, column: int, side: int) -> float:
    """How much of a side x side patch centred on (row, column) the blob fills."""
    low = side // 2
    return float(box[max(0, row - low) : row - low + side, max(0, column - low) : column - low + side].mean())
