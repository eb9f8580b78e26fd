"""Segmenting many files: one call per image that writes its outputs atomically and loads the model once per process.

    from mininp_segformer.tools.batch import segment_file
    segment_file("photos/a.jpg", model="segformer-b0-shapes", out_dir="out", overlay=True)
    # -> {"image": "photos/a.jpg", "label_map": "out/a.png", "overlay": "out/a_overlay.jpg", ...}

`segment_file` takes only picklable arguments (paths, names, options) and returns a small dict, so it is what a
process pool, a Dask bag or a Ray task maps over a list of paths (the command line's `--jobs`, docs/scaling.md);
`segment_file_or_error` returns a failure as {"image", "error"} instead of raising, so that one unreadable file
does not stop the others.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SegformerError
from ..model import DEFAULT_MODEL, load
from ..preprocessing import load_image
from .viz import colorize, legend, overlay, palette_for, save_atomically

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
OVERLAY_FORMATS = ("jpg", "png")


@functools.lru_cache(maxsize=2)
def cached_model(name_or_dir: str, revision: str = "main"):
    """`load(name_or_dir, revision)`, once per process (each pool or cluster worker keeps its own copy)."""
    return load(name_or_dir, revision=revision)


def output_stem(stem) -> Path:
    """`stem` as a relative path that stays below the output directory: an anchor ("/", "C:\\") and empty parts
    are dropped, the parts "." and ".." become "_" and "__" (an input named "..png" has the stem "."); nothing
    left: "_"."""
    path = Path(stem)
    parts = [{".": "_", "..": "__"}.get(p, p) for p in path.parts if p != path.anchor]
    return Path(*parts) if parts else Path("_")


def output_paths(stem, out_dir, overlay_format: str | None = None) -> dict[str, Path]:
    """{"label_map": out_dir/<stem>.png, "overlay": out_dir/<stem>_overlay.<format> (if a format is given)}.

    `stem` may hold sub-directories ("holiday/img_001"), mirrored below out_dir; it is made safe by `output_stem`.
    A path that would still resolve outside out_dir (through a symbolic link) is a SegformerError.
    """
    base = Path(out_dir) / output_stem(stem)
    paths = {"label_map": base.with_name(base.name + ".png")}
    if overlay_format is not None:
        paths["overlay"] = base.with_name(f"{base.name}_overlay.{overlay_format}")
    root = Path(out_dir).resolve()
    for path in paths.values():
        if root not in path.resolve().parents:
            raise SegformerError(f"the output {path} for {stem!r} would land outside the output directory "
                                 f"{out_dir} (a symbolic link?); choose another output directory")
    return paths


def label_map_image(seg: np.ndarray, palette) -> Image.Image:
    """The PNG to save: a palette ("P") image for up to 256 classes, 16-bit grayscale beyond."""
    if seg.size and int(seg.max()) > 255:
        return Image.fromarray(seg.astype(np.uint16))
    return colorize(seg, palette)


def segment_file(path, model=DEFAULT_MODEL, out_dir=".", overlay_format: str | None = None, alpha: float = 0.5,
                 stem=None, revision: str = "main", palette=None, progress=None, **options) -> dict:
    """Segment the image at `path` and write `<out_dir>/<stem>.png` (a palette PNG of class ids, the image's
    size) and, if `overlay_format` ("jpg" or "png") is given, `<stem>_overlay.<format>`.

    `model`: a loaded Segformer, or a directory / bundled / Hub name (loaded once per process); `options` go to
    `inference.segment` (mode, crop, stride, resize, tta, scales, flip). Returns {"image", "label_map", "overlay",
    "size", "seconds", "classes": the three largest (name, share)}. Raises on an unreadable image or an output
    that cannot be written; files written before stay as they were.
    """
    from ..inference import segment

    start = time.perf_counter()
    net = model if hasattr(model, "config") else cached_model(str(model), revision)
    if overlay_format is not None and overlay_format not in OVERLAY_FORMATS:
        raise ValueError(f"overlay_format must be one of {OVERLAY_FORMATS}, got {overlay_format!r}")
    rgb = load_image(path)
    seg = segment(rgb, net, progress=progress, **options)
    colours = palette_for(net.config.num_labels) if palette is None else palette
    paths = output_paths(Path(path).stem if stem is None else stem, out_dir, overlay_format)
    paths["label_map"].parent.mkdir(parents=True, exist_ok=True)
    save_atomically(label_map_image(seg, colours), paths["label_map"])
    if overlay_format is not None:
        blended = Image.fromarray(overlay(rgb, seg, alpha=alpha, palette=colours))
        save_atomically(blended, paths["overlay"], **({"quality": 90} if overlay_format == "jpg" else {}))
    top = legend(seg, net.id2label, colours)[:3]
    return {"image": os.fspath(path), "label_map": os.fspath(paths["label_map"]),
            "overlay": os.fspath(paths["overlay"]) if "overlay" in paths else None, "size": seg.shape,
            "seconds": time.perf_counter() - start, "classes": [(e.name, e.share) for e in top], "pid": os.getpid()}


def one_line(error: BaseException, expected=(ValueError, OSError)) -> str:
    """An exception as one line: its message with newlines folded; kinds not `expected` keep their type name."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, expected) else f"{type(error).__name__}: {text}"


def segment_file_or_error(path, debug: bool = False, **kwargs) -> dict:
    """`segment_file(path, **kwargs)`, or {"image", "error": one line, "traceback": (if `debug`)} if it fails."""
    try:
        return segment_file(path, **kwargs)
    except Exception as e:  # one bad image must not stop the others
        return {"image": os.fspath(path), "error": one_line(e), "traceback": traceback.format_exc() if debug else None}
