"""Procedural scenes for the demo model: textured backgrounds with overlapping, randomly coloured shapes.

Every scene is a pure function of its seed, so a data set is just a range of seeds. The demo checkpoint in
`weights/segformer-b0-shapes/` was trained on seeds >= `TRAIN_SEED_START`; seeds `0..199` are the held-out test
set (`HELD_OUT_SEEDS`) and were never shown to it.

    from mininp_segformer.tools.scenes import make_scene, CLASS_NAMES
    image, labels = make_scene(2026, size=(128, 128))   # uint8 (128, 128, 3), uint8 (128, 128)

Colours are drawn independently of the class, so a model has to recognise *shape*: circle, square, triangle,
ring and star (ids 1..5) on background (id 0). Later objects occlude earlier ones; each object keeps at least
70% of its area visible so it stays recognisable. Only NumPy and Pillow are used.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("background", "circle", "square", "triangle", "ring", "star")
ID2LABEL = dict(enumerate(CLASS_NAMES))
SHAPES = CLASS_NAMES[1:]

HELD_OUT_SEEDS = range(0, 200)  # the test scenes; never used for training
TRAIN_SEED_START = 1_000_000  # training scenes use seeds from here on

# Object radius (centre to outermost point) as a fraction of the scene's shorter side: at least 23 pixels in a
# 128x128 scene, i.e. almost 6 cells of SegFormer's 1/4-resolution output.
MIN_RADIUS, MAX_RADIUS = 0.18, 0.36
MIN_VISIBLE = 0.7  # fraction of an object's own area that must stay unoccluded
MIN_CONTRAST = 100.0  # minimum RGB distance between an object's colour and the background beneath it


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """A (H, W) float field in [0, 1]: a `cells`x`cells` grid of random values, bilinearly upsampled."""
    h, w = size
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR))


def gradient(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) linear ramp in [0, 1] along a random direction."""
    h, w = size
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * np.cos(angle) + y * np.sin(angle)
    return (t - t.min()) / (t.max() - t.min() + 1e-6)


def stripes(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) field of soft parallel stripes in [0, 1], with random direction, period and phase.

    The period is 6..24 pixels at 128x128 and scales with the image, so larger scenes look like enlarged ones.
    """
    h, w = size
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24) * min(h, w) / 128
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * np.cos(angle) + y * np.sin(angle)
    return 0.5 + 0.5 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))


def random_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A (H, W, 3) float RGB background: a pattern (noise, gradient or stripes) blending two random colours."""
    kind = rng.integers(3)
    if kind == 0:
        t = smooth_noise(rng, size, cells=int(rng.integers(3, 9)))
    elif kind == 1:
        t = gradient(rng, size)
    else:
        t = stripes(rng, size)
    c0 = rng.uniform(0, 255, size=3)
    c1 = c0 + rng.uniform(-60, 60, size=3)  # a visible but moderate texture contrast
    # Mix in low-frequency noise so that no background is perfectly regular.
    t = 0.75 * t + 0.25 * smooth_noise(rng, size, cells=5)
    return c0 + t[..., None] * (c1 - c0)


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or 5-pointed star of outer radius `r`, centred at (cx, cy), rotated."""
    if shape == "square":
        radii, n = [r], 4
    elif shape == "triangle":
        radii, n = [r], 3
    elif shape == "star":
        radii, n = [r, 0.5 * r], 10  # alternate outer tips and inner corners; 0.5 keeps the arms thick
    else:
        raise ValueError(f"{shape!r} is not a polygon")
    pts = []
    for i in range(n):
        a = angle + 2 * np.pi * i / n
        rad = radii[i % len(radii)]
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """A (H, W) bool mask of one shape. Circles and rings ignore `angle`; a ring's hole is 55% of its radius."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if shape == "ring":
            hole = 0.55 * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def random_fill(rng: np.random.Generator, size: tuple[int, int], avoid: np.ndarray) -> np.ndarray:
    """A (H, W, 3) float fill: a random colour at least MIN_CONTRAST from the RGB `avoid`, with gentle shading."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - avoid) >= MIN_CONTRAST:
            break
    shade = (gradient(rng, size) - 0.5) * rng.uniform(0, 30)
    return colour + shade[..., None]


def make_scene(seed: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Render scene number `seed`: (image uint8 (H, W, 3), labels uint8 (H, W) with ids into CLASS_NAMES).

    1 to 3 objects of random class, size, rotation, position and colour are painted back to front over a
    textured background; Gaussian pixel noise is added last.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    image = random_background(rng, size)
    labels = np.zeros(size, dtype=np.uint8)
    owner = np.full(size, -1)  # which object each pixel currently shows, to enforce MIN_VISIBLE
    areas = []
    n_objects = int(rng.integers(1, 4))
    for _ in range(n_objects):
        for _attempt in range(10):
            cls = int(rng.integers(1, len(CLASS_NAMES)))
            r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * min(h, w)
            # Keep the centre at least 0.75 r inside the frame: shapes are never cut down to an ambiguous sliver.
            cx, cy = rng.uniform(0.75 * r, w - 0.75 * r), rng.uniform(0.75 * r, h - 0.75 * r)
            mask = shape_mask(CLASS_NAMES[cls], size, cx, cy, r, angle=rng.uniform(0, 2 * np.pi))
            # Accept the placement only if every earlier object keeps at least MIN_VISIBLE of its area.
            remaining = np.bincount(owner[~mask] + 1, minlength=len(areas) + 1)[1:]
            if all(remaining[i] >= MIN_VISIBLE * areas[i] for i in range(len(areas))) and mask.sum() > 0:
                break
        else:
            continue  # no room for another object
        fill = random_fill(rng, size, avoid=image[mask].mean(axis=0))
        image[mask] = fill[mask]
        labels[mask] = cls
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
    image += rng.normal(0, rng.uniform(2, 8), size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), labels


def make_dataset(seed: int, n: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Scenes `seed .. seed+n-1` stacked: images uint8 (n, H, W, 3) and labels uint8 (n, H, W)."""
    scenes = [make_scene(s, size) for s in range(seed, seed + n)]
    return np.stack([im for im, _ in scenes]), np.stack([lab for _, lab in scenes])
