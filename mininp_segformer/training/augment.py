"""NVlabs SegFormer's training augmentations (its ADE20K pipeline, mmseg 0.x's transforms) on NumPy arrays.

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))   random_resize     keep-ratio, a random scale
    RandomCrop(crop_size, cat_max_ratio=0.75)               random_crop       up to 10 tries at a varied crop
    RandomFlip(prob=0.5)                                    random_flip       horizontal
    PhotoMetricDistortion()                                 photometric_distortion
    Normalize(mean, std)                                    preprocessing.normalize
    Pad(size=crop_size, pad_val=0, seg_pad_val=255)         pad               bottom and right

Each function takes and returns an (image `(H, W, 3)` uint8 RGB, mask `(H, W)` class ids) pair and draws from the
`np.random.Generator` it is passed, in mmseg's order of draws (`np.random.X` -> `rng.X`); `train_sample` runs the
whole pipeline with the values of an `Augment`, all settable. `batches` makes training batches from a dataset,
deterministic given (seed, step) so that a run can resume at any step.

Where we differ from mmcv (which calls OpenCV): resizing uses PIL (the bilinear filter of HF's processor, which
averages over the source pixels when shrinking, where cv2's INTER_LINEAR samples 2 x 2 of them; and PIL's NEAREST,
which picks source pixel floor((x + 0.5) * scale) where cv2 picks floor(x * scale)); Normalize is HF's
(x / 255 - mean) / std rather than mmseg's (x - 255 mean) / (255 std), the same up to float32 rounding. The HSV
conversions are OpenCV's 8-bit ones written in NumPy (`rgb_to_hsv`, `hsv_to_rgb`), not PIL's (other units, other
rounding): equal to cv2.cvtColor of opencv-python-headless 4.10 and 5.0 on all 16,777,216 RGB colours and all
11,796,480 8-bit HSV triples (measured once; the tests keep a few of its values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SegformerError
from ..inference import rescale_size
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize, preprocess, resize_image, resize_mask
from .data import IGNORE_INDEX, Dataset, read_sample


@dataclass(frozen=True)
class Augment:
    """The values of the training pipeline; the defaults are NVlabs' ADE20K config (512 x 512 crops)."""
    crop_size: tuple = (512, 512)        # (height, width)
    scale: tuple = (2048, 512)           # Resize img_scale: (long side, short side) bounds before the ratio
    ratio_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75          # RandomCrop: at most this share of the crop's labelled pixels in one class
    crop_tries: int = 10                 # mmseg's fixed retry count
    flip_prob: float = 0.5
    brightness_delta: float = 32
    contrast_range: tuple = (0.5, 1.5)
    saturation_range: tuple = (0.5, 1.5)
    hue_delta: int = 18                  # in OpenCV's 8-bit hue units: 2 degrees each
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pad_val: float = 0.0                 # after Normalize: 0 is the mean colour, not black
    seg_pad_val: int = IGNORE_INDEX
    ignore_index: int = IGNORE_INDEX


def ade20k_augment(crop=512) -> Augment:
    """NVlabs' ADE20K values for crops of `crop` (a side, or (h, w)), the resize scale in proportion:
    (4 long, short) = (2048, 512) at 512."""
    size = (crop, crop) if isinstance(crop, (int, np.integer)) else tuple(int(c) for c in crop)
    if len(size) != 2 or min(size) < 1:
        raise SegformerError(f"the crop must be a positive side or (height, width), got {crop!r}")
    return Augment(crop_size=size, scale=(4 * max(size), min(size)))


# ----------------------------------------------------------------------------------------------------------------
# Geometry: resize, crop, flip, pad


def random_resize(image, mask, rng, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """mmseg's Resize(img_scale=scale, ratio_range, keep_ratio=True): ratio ~ U[low, high), the scale becomes
    (int(long * ratio), int(short * ratio)) and the pair is resized, keeping its aspect, to fit it
    (`inference.rescale_size`): the image bilinearly, the mask with NEAREST."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    size = rescale_size(image.shape[:2], (int(scale[0] * ratio), int(scale[1] * ratio)))
    return resize_image(image, size), resize_mask(mask, size)


def crop_box(shape, crop_size, rng) -> tuple[int, int, int, int]:
    """mmseg's get_crop_bbox: a uniformly drawn (y1, y2, x1, x2) of crop_size within `shape` (the whole image
    along a side shorter than the crop)."""
    offset_h = rng.integers(0, max(shape[0] - crop_size[0], 0) + 1)
    offset_w = rng.integers(0, max(shape[1] - crop_size[1], 0) + 1)
    return int(offset_h), int(offset_h + crop_size[0]), int(offset_w), int(offset_w + crop_size[1])


def random_crop(image, mask, rng, crop_size=(512, 512), cat_max_ratio=0.75, ignore_index=IGNORE_INDEX, tries=10):
    """mmseg's RandomCrop: with cat_max_ratio < 1, a crop is redrawn (up to `tries` times) while one class holds
    cat_max_ratio or more of its labelled pixels, or it holds fewer than two classes; the last draw is kept."""
    y1, y2, x1, x2 = crop_box(image.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            labels, counts = np.unique(mask[y1:y2, x1:x2], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y1, y2, x1, x2 = crop_box(image.shape, crop_size, rng)
    return image[y1:y2, x1:x2], mask[y1:y2, x1:x2]


def random_flip(image, mask, rng, prob=0.5):
    """mmseg's RandomFlip(prob, "horizontal"): both mirrored left-right when rng.random() < prob."""
    if rng.random() < prob:
        return image[:, ::-1], mask[:, ::-1]
    return image, mask


def pad(image, mask, size, pad_val=0, seg_pad_val=IGNORE_INDEX):
    """mmseg's Pad(size): `(H, W, C)` image and `(H, W)` mask padded at the bottom and right to size = (h, w)
    (a side already as long stays), with pad_val and seg_pad_val."""
    extra = (max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0))
    image = np.pad(image, ((0, extra[0]), (0, extra[1]), (0, 0)), constant_values=pad_val)
    return image, np.pad(mask, ((0, extra[0]), (0, extra[1])), constant_values=seg_pad_val)


# ----------------------------------------------------------------------------------------------------------------
# Colour: PhotoMetricDistortion and OpenCV's 8-bit HSV


_HSV_SHIFT = 12  # OpenCV's fixed point: 12 fractional bits
_DIVISORS = np.maximum(np.arange(256), 1).astype(np.float64)
# its rounded division tables, indexed by v and by max - min (0 at 0)
_SDIV = np.where(np.arange(256) > 0, np.rint((255 << _HSV_SHIFT) / _DIVISORS), 0).astype(np.int64)
_HDIV = np.where(np.arange(256) > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * _DIVISORS)), 0).astype(np.int64)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 RGB -> uint8 HSV as OpenCV's COLOR_RGB2HSV: H in 0..179 (2 degrees a unit), S and V 0..255.

    OpenCV's fixed-point arithmetic (12 fractional bits, its rounded division tables), in NumPy.
    """
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# OpenCV's HSV2RGB: which of (v, p, q, t) = tab[0..3] each of r, g, b takes in each 60-degree sector
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 HSV (OpenCV's 8-bit units) -> uint8 RGB as OpenCV's COLOR_HSV2RGB.

    OpenCV's vectorised 8-bit path: float32 arithmetic, S and V times float32(1 / 255), 1 - s * f fused into one
    rounding (the FMA its x86-64 builds compile to; computed here in float64, where the product is exact), and
    the result x 255 truncated, not rounded. Equal to OpenCV 4.10 and 5.0 on all 11,796,480 8-bit HSV triples.
    """
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.trunc(h)  # 8-bit hues are below 180, so below sector 6
    f = h - sector

    def one_minus(a, b):  # 1 - a * b with one rounding, as a fused multiply-add
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)

    tab = np.stack([v, v * (f32(1.0) - s), v * one_minus(s, f), v * one_minus(s, f32(1.0) - f)], axis=-1)
    rgb = np.take_along_axis(tab, _SECTOR_RGB[sector.astype(np.int64)], axis=-1)
    return np.trunc(rgb * f32(255.0)).astype(np.uint8)


def _convert(x, alpha=1.0, beta=0.0):
    """mmseg's PhotoMetricDistortion.convert: x * alpha + beta in float32, clipped to 0..255, truncated to uint8."""
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photometric_distortion(image, mask, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion: each step with probability 1/2, in its order -- brightness (+ U(-delta,
    delta)); contrast (x U(range)) first when a coin says "mode 1", else last; saturation (S x U(range)); hue
    (H + an integer in [-hue_delta, hue_delta), numpy's randint excluding the top, modulo 180). The mask passes
    through. (mmseg's docstring says the opposite of its code about which mode puts contrast first; this follows
    the code.)"""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        shift = rng.integers(-hue_delta, hue_delta) if hue_delta > 0 else 0  # (mmseg's randint fails at 0)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
        image = hsv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image, mask


# ----------------------------------------------------------------------------------------------------------------
# The pipeline and the batches


def train_sample(image, mask, rng, aug: Augment = Augment()):
    """One training sample through NVlabs' pipeline -> (pixel_values `(3, h, w)` float32, labels `(h, w)` int64),
    (h, w) = aug.crop_size."""
    image, mask = random_resize(image, mask, rng, aug.scale, aug.ratio_range)
    image, mask = random_crop(image, mask, rng, aug.crop_size, aug.cat_max_ratio, aug.ignore_index, aug.crop_tries)
    image, mask = random_flip(image, mask, rng, aug.flip_prob)
    image, mask = photometric_distortion(image, mask, rng, aug.brightness_delta, aug.contrast_range,
                                         aug.saturation_range, aug.hue_delta)
    x = normalize(np.ascontiguousarray(image), aug.mean, aug.std).transpose(1, 2, 0)  # (h, w, 3) float32
    x, mask = pad(x, mask, aug.crop_size, aug.pad_val, aug.seg_pad_val)
    return np.ascontiguousarray(x.transpose(2, 0, 1)), mask.astype(np.int64)


def sample_index(dataset_size: int, seed: int, position: int) -> int:
    """The dataset index at stream `position` (step * batch_size + j): epoch e = position // size visits the
    samples in the order of a permutation seeded by (seed, e) -- a pure function, so any position is found
    without replaying the ones before it."""
    epoch, k = divmod(position, dataset_size)
    return int(np.random.default_rng([seed, 0, epoch]).permutation(dataset_size)[k])


def sample_rng(seed: int, step: int, j: int) -> np.random.Generator:
    """The generator of sample j of batch `step`: its own stream, seeded by (seed, step, j)."""
    return np.random.default_rng([seed, 1, step, j])


def batches(dataset: Dataset, batch_size: int, seed: int, crop, augment: bool = True, start_step: int = 0,
            aug: Augment | None = None):
    """Endless training batches: an iterator of (pixel_values `(B, 3, h, w)` float32, labels `(B, h, w)` int64).

    crop: the side (int) or (h, w) of the batches. augment=True runs `train_sample` with `aug` (default:
    `ade20k_augment(crop)`); augment=False resizes image and mask to the crop as HF's
    processor (`preprocess(..., segmentation_maps=...)`). Batch `step` depends only on (seed, step): the samples
    are `sample_index(n, seed, step * batch_size + j)` and each draws from `sample_rng(seed, step, j)`. So a run
    resumed with `start_step=s` yields exactly what an uninterrupted one yields from step s on: (seed, step) is
    all a checkpoint needs to store. The settings are checked at once, the samples as they are read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise SegformerError(f"the batch size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegformerError(f"the seed must be a non-negative integer, got {seed!r}")
    if len(dataset) == 0:
        raise SegformerError(f"the dataset under {dataset.root} has no samples")
    size = ade20k_augment(crop).crop_size
    aug = ade20k_augment(crop) if aug is None else aug
    if tuple(aug.crop_size) != size:
        raise SegformerError(f"the crop {size} and aug.crop_size {aug.crop_size} differ; pass one crop size")
    return _stream(dataset, batch_size, seed, size, augment, start_step, aug)


def _stream(dataset, batch_size, seed, size, augment, step, aug):
    while True:
        xs, ys = [], []
        for j in range(batch_size):
            image, mask = read_sample(dataset, sample_index(len(dataset), seed, step * batch_size + j))
            if augment:
                x, y = train_sample(image, mask, sample_rng(seed, step, j), aug)
            else:
                x, y = preprocess(image, size, aug.mean, aug.std, segmentation_maps=mask)
                x, y = x[0], y[0]
            xs.append(x)
            ys.append(y)
        yield np.stack(xs), np.stack(ys)
        step += 1
