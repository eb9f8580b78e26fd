"""Segmentation datasets on disk: pairs of an image and its mask, and the class names from a labels file.

Two layouts are recognised (`open_dataset`):

    DIR/images/<stem>.jpg|png|...    DIR/annotations/<stem>.png                 one split, "train"
    DIR/images/training/...          DIR/annotations/training/<stem>.png        mmseg's ADE20K layout:
    DIR/images/validation/...        DIR/annotations/validation/<stem>.png      splits "train" and "validation"

(`holdout` draws a validation split from a layout that has one split only.)

A mask holds class ids -- an indexed (mode P) or grayscale PNG, 255 = ignore -- or colours: an RGB mask whose
colours the labels CSV maps to ids (row i of the CSV is class i, like the drone dataset's `class_dict_seg.csv`).
ADE20K's annotations use 0 for "other" and v for class v - 1: open it with `reduce_labels=True` (NVlabs'
`reduce_zero_label=True`, HF's `do_reduce_labels`), which `read_sample` applies as soon as the mask is read.

The labels file (`read_labels`) is HF's `id2label` as JSON -- {"0": "wall", ...}, or any object holding an
"id2label" key such as a model's config.json -- or a CSV with the header `name, r, g, b`.

Listing and pairing the files is done once (`open_dataset`); each image and mask is read and checked when it is
used (`read_sample`), and `check_dataset` reads them all up front. Every problem is an error naming the file and
the fix: an image without a mask, a mask of another size, a class id past the labels, a colour not in the CSV.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import SegformerConfig, read_json
from ..errors import ConfigError, LabelError, SegformerError
from ..preprocessing import MASK_MODES, load_image, load_mask, open_image_file, reduce_labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE_INDEX = 255
# mmseg's ADE20K folder names for our split names
SPLIT_DIRS = {"train": "training", "validation": "validation"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation"}


@dataclass(frozen=True, eq=False)  # (compared by identity: an array field has no single truth value)
class Labels:
    """Class names, and the colour of each class when they came from a CSV.

    id2label: {0: name, ...} (HF's `id2label`, ids 0..num_labels-1); colours: `(num_labels, 3)` uint8 or None.
    """
    id2label: dict
    colours: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


@dataclass(frozen=True)
class Dataset:
    """The image and mask paths of one split, in sorted order of their stems.

    `labels` (or None: ids are then checked only against 255 by the loss) bounds the class ids;
    `reduce_labels` is applied to every mask as it is read.
    """
    root: Path
    split: str
    images: tuple
    masks: tuple
    labels: Labels | None = None
    reduce_labels: bool = False

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------------------------------------
# Labels files


def read_labels(path) -> Labels:
    """A labels file -> `Labels`: JSON (an object id -> name, or one with an "id2label" key) or a CSV with the
    header `name, r, g, b` (any case and spacing; row i is class i)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist (or is not a file); pass a JSON id2label or a CSV "
                          "with the header name, r, g, b")
    if path.suffix.lower() == ".csv":
        return _read_label_csv(path)
    d = read_json(path)
    if isinstance(d, dict) and "id2label" in d:
        d = d["id2label"]
    try:
        return Labels(SegformerConfig.from_dict({"id2label": d}).id2label)
    except ConfigError as e:
        raise ConfigError(f"labels file {path}: {e}") from None


def _read_label_csv(path: Path) -> Labels:
    fix = "the first line must be the header name, r, g, b and each row a name and three integers 0..255"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"labels file {path} cannot be read as CSV text ({e}); {fix}") from None
    if not rows or [c.lower() for c in rows[0]] != ["name", "r", "g", "b"]:
        raise ConfigError(f"labels file {path} has the header {rows[0] if rows else 'nothing'}; {fix}")
    if len(rows) == 1:
        raise ConfigError(f"labels file {path} lists no class; {fix}")
    names, colours = [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            rgb = [int(c) for c in row[1:]]
        except ValueError:
            rgb = []
        if len(row) != 4 or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ConfigError(f"labels file {path}, row {line}: {row}; {fix}")
        names.append(row[0])
        colours.append(rgb)
    seen = {}
    for name, rgb in zip(names, colours):
        if tuple(rgb) in seen:
            raise ConfigError(f"labels file {path}: the colour {tuple(rgb)} of {name!r} is also that of "
                              f"{seen[tuple(rgb)]!r}; give every class its own colour")
        seen[tuple(rgb)] = name
    colours = np.array(colours, dtype=np.uint8)
    return Labels(dict(enumerate(names)), colours)


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 colours -> `(...)` int64 codes r * 65536 + g * 256 + b."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_ids(rgb: np.ndarray, colours: np.ndarray, what: str = "the mask") -> np.ndarray:
    """`(H, W, 3)` uint8 colour-coded mask -> `(H, W)` int64 class ids, id i where the pixel has `colours[i]`.

    A colour not in `colours` is a LabelError naming it, its pixel count and first position (row, column).
    """
    codes = colour_codes(rgb)
    table = colour_codes(colours)
    order = np.argsort(table)
    pos = np.clip(np.searchsorted(table[order], codes), 0, len(table) - 1)
    found = table[order][pos] == codes
    if not found.all():
        r, c = np.argwhere(~found)[0]
        missing = tuple(int(v) for v in rgb[r, c])
        count = int((codes == codes[r, c]).sum())
        raise LabelError(f"{what} has the colour {missing} (RGB) at {count} pixel(s), the first at row {r}, column "
                         f"{c}, which the labels CSV does not list; add a row for it (name, {missing[0]}, "
                         f"{missing[1]}, {missing[2]}) or fix the mask")
    return order[pos].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Layouts


def _files(folder: Path, suffixes) -> dict:
    """{stem: path} of the files in `folder` with one of `suffixes`; two files of one stem is an error."""
    found = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise SegformerError(f"{found[p.stem]} and {p} have the same stem, so which one {p.stem!r} means "
                                     "is ambiguous; rename or remove one")
            found[p.stem] = p
    return found


def split_dirs(root, split: str = "train") -> tuple[Path, Path]:
    """The (images, annotations) folders of `split` ("train" or "validation") under `root`, by its layout."""
    root = Path(root)
    split = SPLIT_ALIASES.get(split)
    if split is None:
        raise SegformerError(f"unknown split; choose one of {sorted(SPLIT_ALIASES)}")
    images, annotations = root / "images", root / "annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise SegformerError(f"{root} has no images/ and annotations/ folders; lay it out as DIR/images/<name>.jpg "
                             "with DIR/annotations/<name>.png, or as mmseg's images/training, annotations/training, "
                             "images/validation, annotations/validation")
    if (images / "training").is_dir() or (images / "validation").is_dir():  # mmseg's ADE20K layout
        sub = SPLIT_DIRS[split]
        if not (images / sub).is_dir() or not (annotations / sub).is_dir():
            raise SegformerError(f"{root} has the mmseg layout but no images/{sub} and annotations/{sub} folders "
                                 f"for the {split} split; add them")
        return images / sub, annotations / sub
    if split != "train":
        raise SegformerError(f"{root} has one split (images/ and annotations/); for a {split} split lay it out as "
                             f"images/training + annotations/training and images/{SPLIT_DIRS[split]} + "
                             f"annotations/{SPLIT_DIRS[split]}")
    return images, annotations


def open_dataset(root, split: str = "train", labels=None, reduce_labels: bool = False) -> Dataset:
    """The image/mask pairs of `split` under `root` (see the module doc for the layouts).

    labels: a `Labels`, a labels file path (`read_labels`) or None. Every image must have a mask of its stem in
    the annotations folder (a .png); masks without an image are left out.
    """
    image_dir, mask_dir = split_dirs(root, split)
    if labels is not None and not isinstance(labels, Labels):
        labels = read_labels(labels)
    try:
        images = _files(image_dir, IMAGE_SUFFIXES)
        masks = _files(mask_dir, (".png",))
    except OSError as e:
        raise SegformerError(f"cannot list {e.filename}: {e.strerror}; check that the folder is readable") from None
    if not images:
        raise SegformerError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training images "
                             "there, each with its mask of the same name in the annotations folder")
    unpaired = [p for stem, p in images.items() if stem not in masks]
    if unpaired:
        raise LabelError(f"{unpaired[0]} has no mask {mask_dir / (unpaired[0].stem + '.png')} ({len(unpaired)} of "
                         f"{len(images)} images have none); add the masks or move those images out of {image_dir}")
    stems = sorted(images)
    return Dataset(Path(root), SPLIT_ALIASES[split], tuple(images[s] for s in stems), tuple(masks[s] for s in stems),
                   labels, reduce_labels)


def holdout(dataset: Dataset, count: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, validation): `count` samples drawn at random (seeded) for validation, for a layout with one split.
    Both keep the sorted order of their stems."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count < len(dataset):
        raise SegformerError(f"the validation count must be an integer from 1 to {len(dataset) - 1} (the dataset "
                             f"has {len(dataset)} samples), got {count!r}")
    held = set(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False).tolist())

    def part(keep, split):
        idx = [i for i in range(len(dataset)) if (i in held) == keep]
        return replace(dataset, split=split, images=tuple(dataset.images[i] for i in idx),
                       masks=tuple(dataset.masks[i] for i in idx))
    return part(False, "train"), part(True, "validation")


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_mask(path, labels: Labels | None = None) -> np.ndarray:
    """A mask file -> `(H, W)` int64 class ids: an indexed/grayscale/16-bit PNG as is; an RGB(A) one through the
    colours of `labels` (from a CSV)."""
    with open_image_file(path) as img:
        if img.mode in MASK_MODES:
            return load_mask(img)
        if img.mode not in ("RGB", "RGBA"):
            raise LabelError(f"the mask {path} is a mode {img.mode} image; save it as an indexed (P), grayscale (L) "
                             "or RGB PNG")
        if labels is None or labels.colours is None:
            raise LabelError(f"the mask {path} is colour-coded (RGB); pass a labels CSV (name, r, g, b) that maps "
                             "its colours to classes, or save the masks as class ids (indexed or grayscale PNG)")
        return colours_to_ids(np.asarray(img.convert("RGB")), labels.colours, f"the mask {path}")


def check_ids(mask: np.ndarray, num_labels: int, what: str, reduced: bool) -> None:
    """A LabelError if `mask` holds a class id >= num_labels other than the ignore index 255."""
    bad = (mask >= num_labels) & (mask != IGNORE_INDEX)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        hint = "" if reduced else (" (if 0 means 'other' and k class k - 1, as in ADE20K, open the dataset with "
                                   "reduce_labels=True)")
        raise LabelError(f"{what} holds the class id {mask[r, c]} at row {r}, column {c} ({int(bad.sum())} pixel(s)), "
                         f"but the labels have {num_labels} classes (ids 0..{num_labels - 1}, 255 = ignore); fix the "
                         f"mask or the labels file{hint}")


def read_sample(dataset: Dataset, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i -> (image `(H, W, 3)` uint8 RGB, mask `(H, W)` int64 class ids, reduced if the dataset says so)."""
    image_path, mask_path = dataset.images[i], dataset.masks[i]
    image = load_image(image_path)
    mask = read_mask(mask_path, dataset.labels)
    if mask.shape != image.shape[:2]:
        raise LabelError(f"the mask {mask_path} is {mask.shape[0]} x {mask.shape[1]} but its image {image_path} is "
                         f"{image.shape[0]} x {image.shape[1]} (height x width); each mask must be the size of its "
                         "image (re-export it, or check that the image has no EXIF rotation the mask lacks)")
    if dataset.reduce_labels:
        mask = reduce_labels(mask)
    if dataset.labels is not None:
        check_ids(mask, dataset.labels.num_labels, f"the mask {mask_path}", dataset.reduce_labels)
    return image, mask


def check_dataset(dataset: Dataset, progress=None) -> np.ndarray:
    """Read every sample (so every error surfaces now, not hours into training); returns the pixel count of each
    class id 0..max (255 = ignore excluded), int64. `progress`: called with each index, e.g. a tqdm's update."""
    counts = np.zeros(0, dtype=np.int64)
    for i in range(len(dataset)):
        _, mask = read_sample(dataset, i)
        c = np.bincount(mask[mask != IGNORE_INDEX].ravel())
        counts = np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(c, (0, max(0, len(counts) - len(c))))
        if progress is not None:
            progress(i)
    return counts


__all__ = ["Labels", "Dataset", "read_labels", "colour_codes", "colours_to_ids", "split_dirs", "open_dataset", "holdout",
           "read_mask", "check_ids", "read_sample", "check_dataset", "IMAGE_SUFFIXES", "IGNORE_INDEX"]
