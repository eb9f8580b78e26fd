"""Semantic segmentation scores: mean IoU, per-class IoU, pixel accuracy -- the definition mmseg and Hugging Face's
`evaluate` "mean_iou" metric use.

Over the whole set (not per image), for each class c, counting only pixels whose label is not `ignore_index`:

    intersect_c = #{pred == c and label == c},  area_pred_c = #{pred == c},  area_label_c = #{label == c}
    union_c = area_pred_c + area_label_c - intersect_c
    IoU_c = intersect_c / union_c           (NaN when c is in neither the predictions nor the labels)
    accuracy_c = intersect_c / area_label_c (NaN when c is not in the labels)
    mean_iou = nanmean(IoU),  mean_accuracy = nanmean(accuracy),  pixel_accuracy = sum(intersect) / sum(area_label)

A class that appears only in the predictions has IoU 0 and counts in the mean; a class absent from both is left
out of it.

ADE20K's annotations (ADEChallengeData2016, PNG mode "L") use 0 for "other" -- pixels that belong to none of the
150 classes and are not scored -- and v = 1..150 for class v - 1 of the models' id2label. `reduce_labels=True`
(the function `reduce_zero_label`) maps them as mmseg's `reduce_zero_label` and HF's `do_reduce_labels` do:
0 -> ignore_index, v -> v - 1 (255 stays ignored). Cityscapes' trainId maps already use 0..18 with 255 for
ignore: no reduction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageError
from ..preprocessing import open_image_file


def reduce_zero_label(label, ignore_index: int = 255) -> np.ndarray:
    """ADE's convention: annotation 0 ("other") -> `ignore_index`, v -> v - 1; 255 (already ignore) stays ignored."""
    label = np.asarray(label).astype(np.int64)
    out = label - 1
    out[(label == 0) | (label == 255)] = ignore_index
    return out


def read_label_map(path) -> np.ndarray:
    """A label map saved as an image (mode "P", "L", "I;16" or "I" PNG): its pixel values, `(H, W)` int64."""
    with open_image_file(path) as img:  # refuses FIFOs, decompression bombs, undecodable files
        if img.mode not in ("P", "L", "I;16", "I;16L", "I;16B", "I"):
            raise ImageError(f"{path} is a mode {img.mode!r} image, not a label map (expected a palette or "
                             "grayscale PNG holding class ids)")
        return np.asarray(img).astype(np.int64)


def check_label_map(x, what: str = "a label map") -> np.ndarray:
    """`x` as an array if it is a 2-D `(H, W)` map of integer class ids, else a ValueError naming `what`."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) map of class ids; got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer class ids; got dtype {a.dtype}")
    return a


def _as_label_map(x, what: str) -> np.ndarray:
    return check_label_map(read_label_map(x) if isinstance(x, (str, Path)) else x, what)


def intersect_and_union(pred, label, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False):
    """One image's `(area_intersect, area_union, area_pred, area_label)`, each `(num_labels,)` int64.

    `pred`, `label`: `(H, W)` integer maps of the same size. Pixels whose label (after the optional ADE reduction,
    see the module doc) is `ignore_index` are left out. Raises ValueError for ids outside 0..num_labels-1 (except
    the ignore index in the labels): a sign of the wrong num_labels or of a missing `reduce_labels`.
    """
    pred = _as_label_map(pred, "the prediction")
    label = _as_label_map(label, "the label map")
    if pred.shape != label.shape:
        raise ValueError(f"the prediction is {pred.shape[0]} x {pred.shape[1]} but its label map is "
                         f"{label.shape[0]} x {label.shape[1]}; predictions must be at the label map's size")
    if reduce_labels:
        label = reduce_zero_label(label, ignore_index)
    keep = label != ignore_index
    pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    _check_ids(pred, num_labels, "the prediction", "")
    hint = "" if reduce_labels else " (ADE annotations need reduce_labels=True)"
    _check_ids(label, num_labels, "the label map", f" and is not the ignore index {ignore_index}{hint}")
    area_intersect = np.bincount(pred[pred == label], minlength=num_labels)
    area_pred = np.bincount(pred, minlength=num_labels)
    area_label = np.bincount(label, minlength=num_labels)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def _check_ids(ids: np.ndarray, num_labels: int, what: str, extra: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{what} holds class id {bad}, outside 0..{num_labels - 1} (num_labels={num_labels}){extra}")


def _pairs(preds, labels):
    """Accept one map each or sequences / iterables of them; yield (pred, label) pairs."""
    single = isinstance(preds, np.ndarray) and preds.ndim == 2 or isinstance(preds, (str, Path))
    if single:
        yield preds, labels
        return
    preds_it, labels_it = iter(preds), iter(labels)
    sentinel = object()
    n = 0
    while True:
        p, lab = next(preds_it, sentinel), next(labels_it, sentinel)
        if p is sentinel and lab is sentinel:
            break
        if p is sentinel or lab is sentinel:
            more = "labels" if p is sentinel else "predictions"
            raise ValueError(f"there are more {more} than {'predictions' if more == 'labels' else 'labels'} "
                             f"(after {n} pairs); pass one label map per prediction")
        yield p, lab
        n += 1
    if n == 0:
        raise ValueError("no predictions given")


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def evaluate(preds, labels, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False) -> dict:
    """mmseg's / HF's mean IoU over a set: `preds`, `labels` are one `(H, W)` map each, or equally long sequences
    (any iterables, consumed one pair at a time, so a folder of thousands never sits in memory) of maps or of
    label-map image paths.

    Returns {"mean_iou", "per_class_iou" (num_labels,), "pixel_accuracy" (overall accuracy), "mean_accuracy",
    "per_class_accuracy" (num_labels,)}, NaN for classes without a defined value (see the module doc).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    totals = np.zeros((4, num_labels), dtype=np.int64)
    for i, (pred, label) in enumerate(_pairs(preds, labels)):
        try:
            totals += np.stack(intersect_and_union(pred, label, num_labels, ignore_index, reduce_labels))
        except ValueError as e:
            raise ValueError(f"pair {i}: {e}") from None
    return metrics_from_areas(*totals)


def metrics_from_areas(area_intersect, area_union, area_pred, area_label) -> dict:
    """The scores of `evaluate` from summed areas (e.g. accumulated by `intersect_and_union` over a data set)."""
    inter, union, label = (np.asarray(a, dtype=np.float64) for a in (area_intersect, area_union, area_label))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
        pixel_accuracy = float(inter.sum() / label.sum()) if label.sum() else float("nan")
    return {"mean_iou": _nanmean(iou), "per_class_iou": iou, "pixel_accuracy": pixel_accuracy,
            "mean_accuracy": _nanmean(acc), "per_class_accuracy": acc}
