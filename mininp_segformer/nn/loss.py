"""The losses of HF's SegFormer heads, each returning `(loss, dlogits)`: the value and its gradient.

Read from transformers' `SegformerForSemanticSegmentation.forward(labels=...)` and
`SegformerForImageClassification.forward(labels=...)`. Where torch would return NaN (no labelled pixel) or fail
deep inside (a class id out of range, float class ids), these raise a `LabelError` that says what is wrong.

Semantic segmentation upsamples the 1/4-resolution logits to the labels' size before the loss. That map is 16 times
the logits (150 classes at 2048 x 1024 would be 1.2 GB in float32), so the loss is computed in bands of output rows
(`layers.resize_rows`), and its gradient goes back band by band through the resize's adjoint
(`layers.resize_rows_backward`): the upsampled logits never exist whole, neither do their gradients.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from ..errors import ConfigError, LabelError
from .layers import resize_rows, resize_rows_backward

SEMANTIC_IGNORE_INDEX = 255  # config.semantic_loss_ignore_index's default
TORCH_IGNORE_INDEX = -100  # nn.CrossEntropyLoss()'s default ignore_index, which the classification head keeps
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# Output rows of the upsampled logits the segmentation loss holds at a time: a band's few arrays of B x C x rows x W
# (B0-ADE at 512 x 512, batch 2: 10 MB each) stay small beside the activations training keeps anyway.
LOSS_BAND_ROWS = 16


def cross_entropy_sum(z, labels, valid):
    """Summed cross-entropy over the last axis: `z: (..., C)` logits, `labels: (...)` class ids, `valid: (...)` bool.

    With m = max(z) and s = sum(exp(z - m)): -log softmax(z)[label] = log(s) + m - z[label], stable for any z (the
    log-sum-exp trick); dz = exp(z - m) / s - onehot(label) on valid rows, 0 elsewhere. One exp per logit serves
    both. Returns (loss as a float, dz with z's shape and dtype).
    """
    m = z.max(axis=-1, keepdims=True)
    dz = np.exp(z - m)
    s = dz.sum(axis=-1, keepdims=True)
    target = np.where(valid, labels, 0)[..., None]  # ignored entries point at class 0, then are masked out
    nll = np.log(s) + m - np.take_along_axis(z, target, axis=-1)
    loss = np.sum(nll[..., 0], where=valid, dtype=np.float64)
    dz /= s
    np.put_along_axis(dz, target, np.take_along_axis(dz, target, axis=-1) - 1, axis=-1)
    dz *= valid[..., None]
    return float(loss), dz


def bce_with_logits(z, y):
    """Elementwise nn.BCEWithLogitsLoss(reduction="none"): -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))].

    Written as softplus(z) - y z, stable for any z (logaddexp); d/dz = sigmoid(z) - y. Returns (loss, dloss/dz).
    """
    return np.logaddexp(0, z) - y * z, expit(z) - y


def _check_class_ids(labels, num_classes: int, ignore_index: int, what: str):
    """Integer `labels` whose values are class ids in [0, num_classes) or `ignore_index`; returns the valid mask."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(f"{what} must be integer class ids, got dtype {labels.dtype}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise LabelError(f"{what} must be in [0, {num_classes}) or the ignore index {ignore_index}: found "
                         f"{labels[bad][0]} (and {int(bad.sum()) - 1} more out of range)")
    return valid


def check_segmentation_labels(labels, batch: int, num_labels: int, ignore_index=SEMANTIC_IGNORE_INDEX):
    """`semantic_segmentation_loss`'s checks of `labels: (B, H, W)` on their own (a model runs them before its
    forward, which in train mode changes BatchNorm's running statistics) -> the mask of labelled pixels."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != batch or labels.size == 0:
        raise LabelError(f"labels must be a non-empty (B, H, W) with B = {batch} as the logits, got shape "
                         f"{labels.shape}")
    binary = num_labels == 1
    valid = _check_class_ids(labels, 2 if binary else num_labels, ignore_index, "labels")
    if not binary and not valid.any():
        raise LabelError(f"no labelled pixel: every label is the ignore index {ignore_index}, so the mean "
                         "cross-entropy is 0 / 0 (torch returns NaN)")
    return valid


def semantic_segmentation_loss(logits, labels, ignore_index=SEMANTIC_IGNORE_INDEX, band_rows=LOSS_BAND_ROWS):
    """HF's segmentation loss and its gradient: `logits: (B, C, h, w)`, `labels: (B, H, W)` int -> (loss, dlogits).

    The logits are upsampled bilinearly (align_corners=False) to (H, W), as HF does, then:
    - C > 1: cross-entropy averaged over the pixels whose label != ignore_index (nn.CrossEntropyLoss(ignore_index)).
      No labelled pixel at all: torch returns NaN (0 / 0); here a `LabelError`.
    - C == 1 (binary): BCE-with-logits of the single channel against the label as a float target (so labels are 0
      or 1), times the mask label != ignore_index, then averaged over ALL B * H * W pixels, ignored ones included --
      HF's quirk `(loss * valid_mask).mean()`, replicated, so the loss shrinks with the ignored fraction. With no
      labelled pixel that is 0 with a zero gradient, as in HF. (HF's mask also drops negative labels; here any
      label other than 0, 1 and ignore_index is an error.)
    Computed `band_rows` output rows at a time: memory O(B * C * band_rows * W) beyond the inputs.
    `dlogits` has the logits' shape and dtype.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 4 or logits.shape[1] < 1:
        raise LabelError(f"logits must be (B, C, h, w) with C >= 1, got shape {logits.shape}")
    b, c = logits.shape[:2]
    valid = check_segmentation_labels(labels, b, c, ignore_index)
    binary = c == 1
    denominator = labels.size if binary else int(valid.sum())  # HF's binary quirk: mean over all pixels

    size = labels.shape[1:]
    h, w = logits.shape[2:]
    x = logits.transpose(2, 3, 0, 1).reshape(h, w, b * c)  # resize_rows takes (rows, width, channels) maps
    dx = np.zeros(x.shape, dtype=logits.dtype)
    total = 0.0
    for start in range(0, size[0], band_rows):
        stop = min(start + band_rows, size[0])
        z = resize_rows(x, size, start, stop).reshape(stop - start, size[1], b, c)  # this band, upsampled
        band_labels = labels[:, start:stop].transpose(1, 2, 0)  # (rows, W, B)
        band_valid = valid[:, start:stop].transpose(1, 2, 0)
        if binary:
            loss, dz = bce_with_logits(z[..., 0], band_labels.astype(z.dtype))
            loss, dz = float(np.sum(loss, where=band_valid)), (dz * band_valid)[..., None]
        else:
            loss, dz = cross_entropy_sum(z, band_labels, band_valid)
        total += loss
        resize_rows_backward((dz / denominator).reshape(stop - start, size[1], b * c), dx, size, start, stop)
    dtype = logits.dtype.type
    return dtype(total / denominator), np.ascontiguousarray(dx.reshape(h, w, b, c).transpose(2, 3, 0, 1))


def infer_problem_type(num_labels: int, labels) -> str:
    """HF's rule when `config.problem_type` is None: one label is regression; integer labels (torch's long or int)
    are single-label classification; anything else (float labels) multi-label classification.

    HF stores the answer in the config at the first call; we take the rule and leave the caller to keep it.
    """
    if num_labels == 1:
        return "regression"
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return "single_label_classification"
    return "multi_label_classification"


def check_classification_labels(labels, batch: int, num_labels: int, problem_type=None):
    """`classification_loss`'s checks of `labels` for `(batch, num_labels)` logits on their own -> (problem_type,
    the labels as the loss reads them: (B,) class ids, or real-valued targets of the logits' shape)."""
    labels = np.asarray(labels)
    problem_type = infer_problem_type(num_labels, labels) if problem_type is None else problem_type
    if problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")
    if problem_type == "single_label_classification":
        if labels.size != batch or labels.ndim > 2:
            raise LabelError(f"single-label classification needs labels of shape ({batch},), got {labels.shape}")
        labels = labels.reshape(-1)  # HF: labels.view(-1)
        if not _check_class_ids(labels, num_labels, TORCH_IGNORE_INDEX, "labels").any():
            raise LabelError(f"no labelled sample: every label is the ignore index {TORCH_IGNORE_INDEX}, so the "
                             "mean cross-entropy is 0 / 0 (torch returns NaN)")
        return problem_type, labels
    if labels.dtype.kind not in "biuf":  # bool (multi-hot), integer or float
        raise LabelError(f"{problem_type} needs real-valued labels, got dtype {labels.dtype}")
    squeeze = problem_type == "regression" and num_labels == 1  # HF squeezes both sides: (B,) or (B, 1) fit
    shape = tuple(n for n in (batch, num_labels) if n != 1) if squeeze else (batch, num_labels)
    if (labels.squeeze() if squeeze else labels).shape != shape:
        raise LabelError(f"{problem_type} needs labels of shape {shape} (after HF's squeeze for one label), "
                         f"got {labels.shape}")
    return problem_type, labels


def classification_loss(logits, labels, problem_type=None):
    """HF's image-classification loss and its gradient: `logits: (B, num_labels)` -> (loss, dlogits).

    problem_type (`infer_problem_type` when None):
    - "regression": MSE, mean over elements; with one label both sides are squeezed first (`logits.squeeze()`),
      so labels (B,) or (B, 1) both fit. d = 2 (logits - labels) / n.
    - "single_label_classification": cross-entropy of `labels: (B,)` int class ids, mean over the labels that are
      not -100 (the default ignore_index HF leaves in place); none left is a `LabelError` (torch: NaN).
    - "multi_label_classification": BCE-with-logits of float `labels: (B, num_labels)` targets, mean over elements.
    `dlogits` has the logits' shape and dtype.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise LabelError(f"logits must be (B, num_labels), got shape {logits.shape}")
    b, num_labels = logits.shape
    problem_type, labels = check_classification_labels(labels, b, num_labels, problem_type)
    if problem_type == "single_label_classification":
        valid = labels != TORCH_IGNORE_INDEX
        n_valid = int(valid.sum())
        loss, dz = cross_entropy_sum(logits, labels, valid)
        return logits.dtype.type(loss / n_valid), dz / logits.dtype.type(n_valid)
    labels = labels.astype(logits.dtype)
    squeeze = problem_type == "regression" and num_labels == 1
    z, y = (logits.squeeze(), labels.squeeze()) if squeeze else (logits, labels)
    if problem_type == "regression":
        loss, dz = (z - y) ** 2, 2 * (z - y)
    else:
        loss, dz = bce_with_logits(z, y)
    return logits.dtype.type(loss.mean()), (dz / logits.dtype.type(z.size)).reshape(logits.shape)
