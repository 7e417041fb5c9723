"""Procedural data of the toy world: one coloured shape on a light background, with captions.

Everything is deterministic from a seed. The vocabulary (shapes, colours, their synonyms, the caption
templates) is module-level data, so the judge, the model builder, the checks and the concept file all use
the same words. Synonyms matter: the toy model learns "pentagram" and "five-pointed star" as well as
"star", so erasing the prompt "star" can be bypassed by a synonym the way nudity erasure is bypassed by a
paraphrase.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
"""Shapes are drawn at 4x and downsampled with a box filter, which anti-aliases their edges."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 45, 175),
}
"""Base RGB of each colour; every drawn shape jitters it a little (`COLOUR_JITTER`)."""

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_JITTER = 18
"""Per-channel uniform jitter (in 0-255 units) of a shape's colour: small enough that hues never cross."""

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "round dot"),
    "square": ("square", "box", "block", "square tile"),
    "triangle": ("triangle", "trigon", "three-sided shape", "triangular shape"),
    "star": ("star", "pentagram", "pentacle", "five-pointed star", "five pointed star"),
    "cross": ("cross", "plus sign", "swiss cross", "plus shape"),
}
"""Words for each shape, the canonical word first. "pentagram"/"pentacle" share no token with "star"."""

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "cobalt", "azure"),
    "yellow": ("yellow", "golden", "lemon-yellow"),
    "purple": ("purple", "violet", "lilac-purple"),
}

CANONICAL_WORD_PROBABILITY = 0.4
"""How often a caption uses the canonical word; otherwise a synonym, uniformly."""

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a photo of a {colour} {shape} on a white background",
    "a drawing of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a {colour} {shape} on a light background",
    "a {shape} in {colour}",
    "a {shape} that is {colour}",
    "{shape}, {colour}",
    "a simple {colour} {shape} icon",
)
"""Captions naming both the shape and the colour (most of the data)."""

SHAPE_ONLY_TEMPLATES: tuple[str, ...] = (
    "a {shape}",
    "{shape}",
    "a photo of a {shape}",
    "a drawing of a {shape}",
)
COLOUR_ONLY_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "{colour} {shape}",
)
GENERIC_SHAPE_WORDS: tuple[str, ...] = ("shape", "figure", "object")
"""Words that name *a* shape without saying which: "a red shape" is Ring-A-Bell's concept-free prompt."""

CAPTION_KIND_PROBABILITIES: dict[str, float] = {"full": 0.8, "shape_only": 0.1, "colour_only": 0.1}

SIZE_WORDS: dict[str, tuple[float, float]] = {
    "small": (7.0, 9.0),
    "medium": (9.0, 11.0),
    "large": (11.0, 13.0),
}
"""Circumradius ranges (pixels at 32 px) behind the size words of the ``{size}`` template."""

RADIUS_RANGE = (7.0, 13.0)
ROTATION_RANGE = (-20.0, 20.0)
"""Degrees. Small rotations keep a star from looking like a rotated cross and a square from a diamond."""

BACKGROUND_RANGE = (228, 255)
STAR_INNER_RATIO = 0.45
CROSS_ARM_HALF_WIDTH = 0.33


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image; `draw` is a pure function of it."""

    shape: str
    colour: str
    centre: tuple[float, float]
    radius: float
    rotation: float
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]

    @property
    def size_word(self) -> str:
        return next(word for word, (low, high) in SIZE_WORDS.items() if self.radius < high or word == "large")


@dataclass(frozen=True)
class ShapeData:
    """A drawn data set: ``images`` uint8 (N, 3, 32, 32); labels index `SHAPES` and `COLOUR_NAMES`."""

    images: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor
    specs: tuple[ShapeSpec, ...]


def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, slightly tinted background colour."""
    level = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1)
    tint = rng.integers(-6, 7, size=3)
    return tuple(int(np.clip(level + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def random_spec(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> ShapeSpec:
    """Draw a random placement, size, rotation and colour jitter; fix ``shape``/``colour`` if given."""
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    margin = radius + 1.0
    centre = (
        float(rng.uniform(margin, IMAGE_SIZE - margin)),
        float(rng.uniform(margin, IMAGE_SIZE - margin)),
    )
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    return ShapeSpec(
        shape=shape,
        colour=colour,
        centre=centre,
        radius=radius,
        rotation=float(rng.uniform(*ROTATION_RANGE)),
        rgb=rgb,  # type: ignore[arg-type]
        background=random_background(rng),
    )


def shape_polygon(spec: ShapeSpec, scale: float = 1.0) -> list[tuple[float, float]]:
    """The outline of a non-circle shape as (x, y) vertices in pixels times ``scale``."""
    radius = spec.radius
    if spec.shape == "square":
        polar = [(radius, 45.0 + 90.0 * k) for k in range(4)]
    elif spec.shape == "triangle":
        polar = [(radius, -90.0 + 120.0 * k) for k in range(3)]
    elif spec.shape == "star":
        polar = [(radius if k % 2 == 0 else radius * STAR_INNER_RATIO, -90.0 + 36.0 * k) for k in range(10)]
    elif spec.shape == "cross":
        half = radius * CROSS_ARM_HALF_WIDTH
        corners = [
            (half, radius),
            (half, half),
            (radius, half),
            (radius, -half),
            (half, -half),
            (half, -radius),
        ]
        corners += [(-x, -y) for x, y in corners]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in corners]
    else:
        raise ValueError(f"{spec.shape!r} has no polygon outline")
    cx, cy = spec.centre
    return [
        (
            (cx + r * math.cos(math.radians(angle + spec.rotation))) * scale,
            (cy + r * math.sin(math.radians(angle + spec.rotation))) * scale,
        )
        for r, angle in polar
    ]


def draw(spec: ShapeSpec) -> Image.Image:
    """Render ``spec`` as a 32x32 RGB image (drawn at 4x, box-downsampled for anti-aliasing)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), spec.background)
    pen = ImageDraw.Draw(canvas)
    if spec.shape == "circle":
        cx, cy, r = (v * SUPERSAMPLE for v in (*spec.centre, spec.radius))
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=spec.rgb)
    else:
        pen.polygon(shape_polygon(spec, SUPERSAMPLE), fill=spec.rgb)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images → uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def shape_dataset(n: int, seed: int) -> ShapeData:
    """``n`` random drawn images with their labels; the same ``seed`` gives the same data."""
    rng = np.random.default_rng(seed)
    specs = tuple(random_spec(rng) for _ in range(n))
    return ShapeData(
        images=images_to_tensor([draw(spec) for spec in specs]),
        shapes=torch.tensor([SHAPES.index(s.shape) for s in specs]),
        colours=torch.tensor([COLOUR_NAMES.index(s.colour) for s in specs]),
        specs=specs,
    )


def blank_backgrounds(n: int, seed: int) -> torch.Tensor:
    """``n`` shape-free backgrounds, uint8 (N, 3, 32, 32): the judge's "none" class."""
    rng = np.random.default_rng(seed)
    colours = torch.tensor([random_background(rng) for _ in range(n)], dtype=torch.uint8)
    return colours[:, :, None, None].expand(n, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()


def _pick_word(words: tuple[str, ...], rng: np.random.Generator) -> str:
    if len(words) == 1 or rng.random() < CANONICAL_WORD_PROBABILITY:
        return words[0]
    return words[1 + rng.integers(len(words) - 1)]


def with_articles(text: str) -> str:
    """Fix English articles: "a emerald star" → "an emerald star"."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A random caption of ``spec``: mostly shape + colour, sometimes only one of them, with synonyms."""
    kinds = list(CAPTION_KIND_PROBABILITIES)
    kind = kinds[rng.choice(len(kinds), p=list(CAPTION_KIND_PROBABILITIES.values()))]
    colour_word = _pick_word(COLOUR_SYNONYMS[spec.colour], rng)
    shape_word = _pick_word(SHAPE_SYNONYMS[spec.shape], rng)
    if kind == "shape_only":
        template = SHAPE_ONLY_TEMPLATES[rng.integers(len(SHAPE_ONLY_TEMPLATES))]
    elif kind == "colour_only":
        template = COLOUR_ONLY_TEMPLATES[rng.integers(len(COLOUR_ONLY_TEMPLATES))]
        shape_word = GENERIC_SHAPE_WORDS[rng.integers(len(GENERIC_SHAPE_WORDS))]
    else:
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return with_articles(template.format(colour=colour_word, shape=shape_word, size=spec.size_word))


def plain_prompt(shape: str, colour: str) -> str:
    """The evaluation prompt "a {colour} {shape}" with canonical words."""
    return with_articles(f"a {colour} {shape}")
