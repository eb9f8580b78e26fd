"""Pictures of segmentations: palettes, colour-coded label maps, overlays on the photo, and a legend.

    from mininp_segformer.tools import viz
    palette = viz.palette_for(model.config.num_labels)   # ADE20K's for 150 labels, Cityscapes' for 19, else generated
    viz.colorize(seg, palette).save("seg.png")           # a mode "P" PNG: the pixel values are the class ids
    rgb = viz.overlay("photo.jpg", seg, alpha=0.5, palette=palette)   # (H, W, 3) uint8
    viz.legend(seg, model.id2label, palette)             # [(id, name, share, colour), ...] largest share first
    viz.plot_segmentation(photo, seg, model.id2label)    # image | prediction | overlay, with a legend (matplotlib)

The ADE20K and Cityscapes palettes and class names are in `data/palettes.json` (mmsegmentation's colours, copied
with their sources named). Only NumPy and Pillow are needed; `plot_legend` and `plot_segmentation` import
matplotlib when called.
"""

from __future__ import annotations

import colorsys
import functools
import json
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .metrics import check_label_map
from ..preprocessing import load_image

PALETTES_JSON = Path(__file__).resolve().parent.parent / "data" / "palettes.json"
PALETTE_ALIASES = {"ade": "ade20k", "ade20k": "ade20k", "cityscapes": "cityscapes", "city": "cityscapes"}
OVERLAY_BAND_ROWS = 512  # rows blended at a time, so a 6000 x 4000 overlay needs no float copy of the photo
# Figures for the documentation site: its content column is ~830 px wide, so a 7.5-inch figure at 110 dpi fills it
# at its own size and a 9-point label stays ~14 px high (at 72 dpi and 13 inches wide it was shrunk to 8 px).
SITE_DPI = 110
COLUMN_INCHES = 7.5
NOTEBOOK_RC = {"figure.dpi": SITE_DPI, "figure.figsize": (COLUMN_INCHES, 3.0), "font.size": 9,
               "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8, "figure.titlesize": 10}


@functools.lru_cache(maxsize=1)
def dataset_palettes() -> dict[str, dict]:
    """{"ade20k": {...}, "cityscapes": {...}}: each with num_labels, id2label, palette_rgb and sources."""
    return json.loads(PALETTES_JSON.read_text(encoding="utf-8"))["palettes"]


GOLDEN_STEPS = 6144  # golden-angle hues tried: by step 5,777 the rounded colours repeat (2,755 of them, then none new)
RGB_CODES = 2**24  # colours of the 8-bit RGB cube, as codes 0xRRGGBB
SCRAMBLE = 10368889  # round(2**24 / golden ratio), odd: k -> k * SCRAMBLE mod 2**24 visits every code once


def distinct_palette(n: int) -> np.ndarray:
    """`(n, 3)` uint8 of n different colours, the same for every call: black for class 0 (usually "background"),
    then hues a golden angle apart, cycling through three saturation/brightness levels, so that neighbouring class
    ids get unlike colours. Those give 2,755 colours; the rest (up to all 2**24) are the unused colours of the RGB
    cube in a fixed scrambled order (codes k * SCRAMBLE mod 2**24)."""
    if n < 1 or n > RGB_CODES:
        raise ValueError(f"a palette holds 1 to {RGB_CODES:,} different colours, got n={n}")
    colours, seen = [(0, 0, 0)], {(0, 0, 0)}
    for i in range(GOLDEN_STEPS):
        if len(colours) == n:
            break
        hue = (i * 0.618033988749895) % 1.0
        sat, val = ((0.75, 0.95), (0.95, 0.70), (0.50, 0.85))[i % 3]
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        if rgb not in seen:  # quantization repeats colours once n is in the thousands
            seen.add(rgb)
            colours.append(rgb)
    palette = np.array(colours, dtype=np.uint8)
    used = (palette.astype(np.int64) << [16, 8, 0]).sum(axis=1)  # as 0xRRGGBB codes
    extra, missing, start = [], n - len(palette), 0
    while missing:  # 2**16 codes at a time; n <= 2**24 ends the loop by the last code
        codes = np.arange(start, start + 2**16, dtype=np.int64) * SCRAMBLE % RGB_CODES
        extra.append(codes[~np.isin(codes, used)][:missing])
        missing -= len(extra[-1])
        start += 2**16
    if extra:
        codes = np.concatenate(extra)
        palette = np.concatenate([palette, ((codes[:, None] >> [16, 8, 0]) & 255).astype(np.uint8)])
    return palette


def palette_for(labels) -> np.ndarray:
    """The palette `(N, 3)` uint8 for a number of labels or a dataset name.

    150 -> ADE20K's (mmseg), 19 -> Cityscapes', any other number -> `distinct_palette(n)`. Names: "ade20k" (or
    "ade"), "cityscapes" (or "city"), case-insensitive.
    """
    if isinstance(labels, str):
        key = PALETTE_ALIASES.get(labels.strip().lower())
        if key is None:
            raise ValueError(f"unknown palette {labels!r}: choose one of {sorted(set(PALETTE_ALIASES.values()))} "
                             "or give a number of labels")
        return np.array(dataset_palettes()[key]["palette_rgb"], dtype=np.uint8)
    if isinstance(labels, bool) or not isinstance(labels, (int, np.integer)):
        raise TypeError(f"palette_for takes a number of labels or a palette name, got {type(labels).__name__}")
    for entry in dataset_palettes().values():
        if entry["num_labels"] == labels:
            return np.array(entry["palette_rgb"], dtype=np.uint8)
    return distinct_palette(int(labels))


def as_palette(palette, num_labels: int) -> np.ndarray:
    """`palette` (None, a number of labels, a name, or an `(N, 3)` array of 0..255) -> `(N, 3)` uint8 with
    N >= num_labels. None means `palette_for(num_labels)`."""
    if palette is None:
        return palette_for(max(int(num_labels), 1))
    if isinstance(palette, (str, int, np.integer)):
        palette = palette_for(palette)
    p = np.asarray(palette)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"a palette is an (N, 3) array of RGB colours; got shape {p.shape}")
    if p.dtype.kind == "f" or p.min() < 0 or p.max() > 255:
        raise ValueError("palette colours must be integers in 0..255")
    if len(p) < num_labels:
        raise ValueError(f"the label map has class ids up to {num_labels - 1} but the palette has only {len(p)} "
                         "colours; pass the model's number of labels or a longer palette")
    return p.astype(np.uint8)


def _check_label_map(seg) -> np.ndarray:
    seg = check_label_map(seg)
    if seg.size and seg.min() < 0:
        raise ValueError(f"a label map holds class ids >= 0; found {int(seg.min())}")
    return seg


def _num_ids(seg: np.ndarray) -> int:
    return int(seg.max()) + 1 if seg.size else 1


def colorize(seg, palette=None) -> Image.Image:
    """`seg: (H, W)` class ids -> a PIL mode "P" image whose pixel values are the ids and whose palette colours them.

    Saved as PNG it is both a picture and the exact label map (`np.asarray(Image.open(path))` gives the ids back).
    At most 256 classes fit a palette image.
    """
    seg = _check_label_map(seg)
    n = _num_ids(seg)
    if n > 256:
        raise ValueError(f"class id {n - 1} does not fit a palette image (ids 0..255); save such maps as 16-bit "
                         "grayscale, e.g. Image.fromarray(seg.astype(np.uint16))")
    p = as_palette(palette, n)[:256]
    img = Image.fromarray(seg.astype(np.uint8, copy=False))  # mode "L"; putpalette makes it "P"
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(p)] = p
    img.putpalette(flat.reshape(-1).tolist())
    return img


def outline(seg, width: int = 1) -> np.ndarray:
    """`(H, W)` bool: the pixels within `width` pixels (steps left, right, up or down) of a pixel of another class.

    Both sides of every class boundary are marked, so each region gets a rim `width` pixels wide in its own colour.
    """
    seg = _check_label_map(seg)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 0:
        raise ValueError(f"outline width is a number of pixels >= 0, got {width!r}")
    edge = np.zeros(seg.shape, dtype=bool)
    if width == 0:
        return edge
    across_rows, across_cols = seg[1:] != seg[:-1], seg[:, 1:] != seg[:, :-1]
    edge[1:] |= across_rows
    edge[:-1] |= across_rows
    edge[:, 1:] |= across_cols
    edge[:, :-1] |= across_cols
    for _ in range(int(width) - 1):  # grow by one pixel in the four directions
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def overlay(image, seg, alpha: float = 0.5, palette=None, outline_width: int = 0) -> np.ndarray:
    """Blend the class colours over the photo: `(1 - alpha) * image + alpha * palette[seg]`, `(H, W, 3)` uint8.

    `image`: a path, PIL image or `(H, W, 3)` array; `seg: (H, W)` must have the image's size. `outline_width > 0`
    paints the pixels within that distance of a class boundary (see `outline`) in their class's own colour,
    unblended: a blend shifts the colours (magenta over green reads as grey), the rims keep them true.
    """
    rgb = load_image(image)
    seg = _check_label_map(seg)
    if seg.shape != rgb.shape[:2]:
        raise ValueError(f"the label map is {seg.shape[0]} x {seg.shape[1]} but the image is {rgb.shape[0]} x "
                         f"{rgb.shape[1]} (height x width); segment this image, or resize the map with "
                         "nearest-neighbour first")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = as_palette(palette, _num_ids(seg)).astype(np.float32)
    a = np.float32(alpha)
    out = np.empty_like(rgb)
    for start in range(0, rgb.shape[0], OVERLAY_BAND_ROWS):
        rows = slice(start, start + OVERLAY_BAND_ROWS)
        blend = (1 - a) * rgb[rows].astype(np.float32) + a * colours[seg[rows]]
        out[rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if outline_width:
        rim = outline(seg, outline_width)
        out[rim] = colours[seg[rim]].astype(np.uint8)
    return out


class LegendEntry(NamedTuple):
    id: int
    name: str
    share: float  # fraction of the map's pixels
    color: tuple[int, int, int]


def legend(seg, id2label: dict, palette=None) -> list[LegendEntry]:
    """The classes present in `seg`, largest pixel share first: `LegendEntry(id, name, share, color)`.

    Ids missing from `id2label` are named "class <id>". Ties are broken by id.
    """
    seg = _check_label_map(seg)
    counts = np.bincount(seg.reshape(-1).astype(np.int64, copy=False), minlength=1)
    colours = as_palette(palette, max(len(id2label), len(counts)))
    total = max(seg.size, 1)
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return [LegendEntry(int(i), str(id2label.get(int(i), f"class {int(i)}")).strip(), float(counts[i] / total),
                        tuple(int(c) for c in colours[i])) for i in present]


def plot_legend(seg, id2label: dict, palette=None, max_entries: int = 20, ax=None):
    """A matplotlib figure of `legend(...)`: one coloured bar per class, labelled with its name and share.

    Needs matplotlib (`pip install matplotlib`, or the project's `notebooks` extra). Returns the Figure.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_legend needs matplotlib: pip install matplotlib (or mininp_segformer[notebooks]); "
                          "legend() gives the same entries without it") from None
    entries = legend(seg, id2label, palette)[:max_entries]
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(5, 0.35 * max(len(entries), 1) + 0.6))
    else:
        fig = ax.figure
    ys = np.arange(len(entries))[::-1]
    ax.barh(ys, [e.share * 100 for e in entries], color=[np.array(e.color) / 255 for e in entries],
            edgecolor="black", linewidth=0.5)
    ax.set_yticks(ys, [f"{e.name} ({e.share:.1%})" for e in entries])
    ax.set_xlabel("share of pixels (%)")
    ax.set_xlim(0, 100)
    if own_figure:  # a caller's figure keeps the layout its caller chose
        fig.tight_layout()
    return fig


def plot_segmentation(image, seg, id2label: dict, palette=None, labels=None, alpha: float = 0.5,
                      outline_width: int | None = None, title: str = "", width: float = COLUMN_INCHES):
    """A matplotlib figure: the image | the ground truth `labels` (if given) | the prediction `seg` | the overlay
    (`overlay` with class outlines), and below them a legend of the classes shown, with their share of `seg`.

    `image`: a path, PIL image or `(H, W, 3)` array; `seg` and `labels`: `(H, W)` class ids. `outline_width`:
    the rim in pixels, default about 1 % of the image's longer side. `width`: the figure's width in inches (the
    default fills the documentation's column at `SITE_DPI`). Needs matplotlib; returns the Figure.
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("plot_segmentation needs matplotlib: pip install matplotlib (or "
                          "mininp_segformer[notebooks])") from None
    rgb, seg = load_image(image), _check_label_map(seg)
    if labels is not None:
        labels = _check_label_map(labels)
        if labels.shape != seg.shape:
            raise ValueError(f"the ground truth is {labels.shape[0]} x {labels.shape[1]} but the prediction is "
                             f"{seg.shape[0]} x {seg.shape[1]}; both must have the image's size")
    n = max(_num_ids(seg), len(id2label), _num_ids(labels) if labels is not None else 1)
    colours = as_palette(palette, n)
    if outline_width is None:
        outline_width = max(1, round(max(seg.shape) / 100))
    panels = [("image", rgb)]
    if labels is not None:
        panels.append(("ground truth", colours[labels]))
    panels += [("prediction", colours[seg]),
               (f"overlay (alpha {alpha:g}), outlined", overlay(rgb, seg, alpha, colours, outline_width))]
    shares = {e.id: e.share for e in legend(seg, id2label, colours)}
    shown = sorted(set(shares) | (set(np.unique(labels).tolist()) if labels is not None else set()))
    handles = [Patch(facecolor=colours[i] / 255, edgecolor="black", linewidth=0.5,
                     label=f"{str(id2label.get(i, f'class {i}')).strip()} {shares.get(i, 0.0):.1%}") for i in shown]
    legend_rows = -(-len(handles) // 6)
    top, bottom = (0.55 if title else 0.3), 0.35 + 0.22 * legend_rows  # inches for the titles, for the legend
    h, w = rgb.shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(width, width / len(panels) * h / w + top + bottom),
                             squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
               title="predicted share of the pixels", title_fontsize="small")
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.005, right=0.995, top=1 - top / fig.get_figheight(),
                        bottom=bottom / fig.get_figheight(), wspace=0.04)
    return fig


def save_atomically(image: Image.Image, path, **save_kwargs) -> Path:
    """Write a PIL image to `path` through a temporary file in the same directory and `os.replace`, so that
    `path` holds either its old content or the complete new file, never a partial one. The format comes from
    the suffix."""
    path = Path(path)
    Image.preinit()  # PNG, JPEG, BMP, GIF, PPM: what the CLI writes, without importing every plugin (50 ms)
    suffix = path.suffix.lower()
    image_format = Image.EXTENSION.get(suffix) or Image.registered_extensions().get(suffix, "PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as f:  # a new file with the usual permissions (umask), unlike mkstemp's 0600
            image.save(f, format=image_format, **save_kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
