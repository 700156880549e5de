"""Scenes of simple coloured shapes: sampling them from a seeded RNG and drawing them with PIL.

A `Scene` is pure data (picture size, format, background, shapes with their attributes and geometry);
`render` turns it into a PIL image and `encode` into file bytes, both deterministic functions of the scene.
The corpus writer (`data_tools.synth`) and the wording (`data_tools.synth_text`) only ever see scenes.

Layout rules that keep every shape learnable by a small vision encoder:
- Shapes live in the central square of the picture (side = the shorter side), so the CLIP-style
  "resize shortest side, centre crop" preprocessing never cuts one off. Positions name the 3x3 cell of
  that square that holds the shape's centre.
- A single shape spans at least a third of that square; several shapes each stay inside their own cell,
  so they never overlap.
- Backgrounds are light (every channel >= 200, optionally with mild noise); every shape colour has a
  channel <= 60, so a shape never blends into its background.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 84, 220),
    "yellow": (245, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
# Reading order of the 3x3 grid: index = row * 3 + column.
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
SIZES = ("small", "large")
BACKGROUNDS = (
    (255, 255, 255),
    (236, 236, 236),
    (250, 245, 228),
    (228, 238, 250),
    (230, 246, 232),
    (250, 234, 238),
)

# Shape extent as a fraction of the central square's side, by (several shapes?, size).
_EXTENT = {
    (False, "small"): (0.34, 0.40),
    (False, "large"): (0.48, 0.55),
    (True, "small"): (0.20, 0.24),
    (True, "large"): (0.28, 0.32),
}
_SHAPE_COUNT_WEIGHTS = ((1, 0.5), (2, 0.3), (3, 0.2))
_SUPERSAMPLE = 4  # masks are drawn this many times larger and box-filtered down: smooth edges


@dataclass(frozen=True)
class Shape:
    """One shape: its attributes (the words the corpus uses) and its geometry in pixels."""

    kind: str
    colour: str
    position: str
    size: str
    cx: float
    cy: float
    extent: float
    angle: float

    def truth(self, grayscale: bool = False) -> dict:
        """The attributes as stored in eval records; a grayscale picture has no colour (None)."""
        return {"kind": self.kind, "colour": None if grayscale else self.colour,
                "position": self.position, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """A picture to draw. `mode` is the PIL mode of the written file: "RGB", "RGBA" or "L" (grayscale)."""

    width: int
    height: int
    mode: str
    fmt: str
    background: tuple[int, int, int]
    noise: int
    noise_seed: int
    shapes: tuple[Shape, ...]

    @property
    def grayscale(self) -> bool:
        """True for a grayscale ("L") picture, whose shapes then have no colour."""
        return self.mode == "L"


def sample_scene(rng: random.Random, n_shapes: int | None = None, allow_grayscale: bool = True) -> Scene:
    """Draw a random scene: size, format, background and 1-3 shapes (or exactly `n_shapes`)."""
    width, height = _sample_size(rng)
    mode, fmt = _sample_format(rng, allow_grayscale)
    background = tuple(min(255, c + rng.randint(-4, 0)) for c in rng.choice(BACKGROUNDS))
    noise = rng.randint(6, 16) if rng.random() < 0.4 else 0
    if mode == "L":
        # Without colour a yellow shape is a light grey: keep the most contrast a light background allows.
        background, noise = (255, 255, 255), 0
    noise_seed = rng.getrandbits(32)
    if n_shapes is None:
        counts, weights = zip(*_SHAPE_COUNT_WEIGHTS)
        n_shapes = rng.choices(counts, weights)[0]
    shapes = _sample_shapes(rng, n_shapes, min(width, height), width, height, distinct_kinds=mode == "L")
    return Scene(width, height, mode, fmt, background, noise, noise_seed, shapes)


def _sample_size(rng: random.Random) -> tuple[int, int]:
    """Half the pictures square, the rest up to 3:2 either way; sides between 64 and 320 pixels."""
    short = rng.randint(64, 256)
    if rng.random() < 0.5:
        return short, short
    long = min(320, round(short * rng.uniform(1.1, 1.5)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _sample_format(rng: random.Random, allow_grayscale: bool) -> tuple[str, str]:
    """About 60% RGB JPEG, 28% RGB PNG, 6% RGBA PNG and 6% grayscale (JPEG or PNG)."""
    u = rng.random()
    if u < 0.06 and allow_grayscale:
        return "L", rng.choice(("jpg", "png"))
    if u < 0.12:
        return "RGBA", "png"
    if u < 0.40:
        return "RGB", "png"
    return "RGB", "jpg"


def _sample_shapes(rng: random.Random, n: int, side: int, width: int, height: int,
                   distinct_kinds: bool) -> tuple[Shape, ...]:
    """`n` shapes in distinct cells, distinct (colour, kind) pairs, listed in reading order."""
    if not 1 <= n <= len(POSITIONS):
        raise ValueError(f"a scene holds 1..{len(POSITIONS)} shapes, got {n}")
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    kinds = rng.sample(KINDS, n) if distinct_kinds else [rng.choice(KINDS) for _ in cells]
    used: set[tuple[str, str]] = set()
    ox, oy = (width - side) / 2, (height - side) / 2
    shapes = []
    for cell, kind in zip(cells, kinds):
        colour = rng.choice([c for c in COLOURS if (c, kind) not in used])
        used.add((colour, kind))
        size = rng.choice(SIZES)
        extent = side * rng.uniform(*_EXTENT[(n > 1, size)])
        cx = ox + _centre(rng, cell % 3, side, extent, inside_cell=n > 1)
        cy = oy + _centre(rng, cell // 3, side, extent, inside_cell=n > 1)
        angle = rng.uniform(-12.0, 12.0) if kind in ("triangle", "star") else 0.0
        shapes.append(Shape(kind, colour, POSITIONS[cell], size, cx, cy, extent, angle))
    return tuple(shapes)


def _centre(rng: random.Random, index: int, side: int, extent: float, inside_cell: bool) -> float:
    """A centre coordinate on one axis for grid column/row `index`.

    With several shapes the whole shape stays inside its cell. A single shape may be larger than a cell:
    its centre stays in the middle two thirds of the cell (so the position name is unambiguous) and the
    shape stays inside the picture.
    """
    cell = side / 3
    if inside_cell:
        lo, hi = index * cell + extent / 2 + 1, (index + 1) * cell - extent / 2 - 1
    else:
        lo = max(index * cell + cell / 6, extent / 2 + 1)
        hi = min((index + 1) * cell - cell / 6, side - extent / 2 - 1)
    if lo >= hi:
        return (lo + hi) / 2
    return rng.uniform(lo, hi)


def shape_outline(shape: Shape) -> list[tuple[float, float]] | None:
    """Polygon vertices in picture pixels, or None for a circle (drawn as an ellipse)."""
    e, cx, cy = shape.extent, shape.cx, shape.cy
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        h = 0.41 * e
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape.kind == "triangle":
        # Circumradius r: width r*sqrt(3), height 1.5r; shifted down by r/4 so its box is centred.
        r, dy = e / 1.75, e / 1.75 / 4
        points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + dy) for a in (-90, 30, 150)]
    elif shape.kind == "star":
        # Fat five-pointed star (inner radius 0.48 of outer) so it stays a star at 64 pixels.
        r, dy = 0.53 * e, 0.53 * e * (1 - math.cos(math.radians(36))) / 2
        points = [((r if k % 2 == 0 else 0.48 * r) * math.cos(math.radians(-90 + 36 * k)),
                   (r if k % 2 == 0 else 0.48 * r) * math.sin(math.radians(-90 + 36 * k)) + dy)
                  for k in range(10)]
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; known kinds: {', '.join(KINDS)}")
    c, s = math.cos(math.radians(shape.angle)), math.sin(math.radians(shape.angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_mask(shape: Shape, width: int, height: int) -> Image.Image:
    """A full-size "L" coverage mask (255 inside), drawn supersampled only around the shape's box."""
    outline = shape_outline(shape)
    half = 0.6 * shape.extent
    x0, y0 = max(0, int(shape.cx - half) - 2), max(0, int(shape.cy - half) - 2)
    x1, y1 = min(width, int(shape.cx + half) + 3), min(height, int(shape.cy + half) + 3)
    k = _SUPERSAMPLE
    local = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(local)
    if outline is None:
        r = shape.extent / 2
        draw.ellipse([(shape.cx - r - x0) * k, (shape.cy - r - y0) * k,
                      (shape.cx + r - x0) * k, (shape.cy + r - y0) * k], fill=255)
    else:
        draw.polygon([((x - x0) * k, (y - y0) * k) for x, y in outline], fill=255)
    mask = Image.new("L", (width, height), 0)
    mask.paste(local.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return mask


def _background(scene: Scene) -> Image.Image:
    """Plain light colour, or that colour with mild monochrome noise of +-`scene.noise` levels."""
    size = (scene.width, scene.height)
    if not scene.noise:
        return Image.new("RGB", size, scene.background)
    a = scene.noise
    noise = Image.frombytes("L", size, random.Random(scene.noise_seed).randbytes(size[0] * size[1]))
    noise = noise.point(lambda v: v * (2 * a + 1) // 256)  # uniform in 0..2a
    base = Image.new("RGB", size, tuple(max(0, c - a) for c in scene.background))
    return ImageChops.add(base, Image.merge("RGB", (noise, noise, noise)))


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a PIL image in `scene.mode`; RGBA pictures have a transparent background."""
    image = _background(scene)
    alpha = Image.new("L", image.size, 0)
    for shape in scene.shapes:
        mask = _shape_mask(shape, scene.width, scene.height)
        image.paste(COLOURS[shape.colour], (0, 0, scene.width, scene.height), mask)
        alpha = ImageChops.lighter(alpha, mask)
    if scene.mode == "RGBA":
        image.putalpha(alpha)
        return image
    return image.convert(scene.mode)


def encode(scene: Scene, image: Image.Image) -> bytes:
    """File bytes: JPEG at fixed quality 90 or PNG at fixed compression, no metadata (byte-reproducible)."""
    buf = io.BytesIO()
    if scene.fmt == "jpg":
        image.save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
