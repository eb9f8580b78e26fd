"""From images to `pixel_values` and from logits to a segmentation map, as HF's `SegformerImageProcessor` does.

preprocess: PIL bilinear resize of the uint8 RGB image to (height, width) -- 512 x 512 for the ADE checkpoints,
which stretches the aspect ratio -- then x / 255 (in float64, cast to float32, exactly as HF's `rescale`), then
(x - mean) / std with ImageNet's mean and std in float32.

With `segmentation_maps` (training labels), as the processor's segmentation-map path: labels reduced first when
`do_reduce_labels` (0 -> 255, k -> k - 1, 255 stays: ADE20K's "other" becomes the ignore index), then a NEAREST
resize to the images' size, returned as int64 `labels: (B, height, width)`.

postprocess: bilinear resize of the logits to each image's size (torch `align_corners=False`) and argmax.

The other convention, mmseg's keep-ratio test resize that SegFormer's own evaluation used, is in
mininp_segformer.inference (`mmseg_size`), which selects between the two.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .nn import kernels
from .errors import ImageError, LabelError, SegformerError
from .memory import check_memory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESCALE_FACTOR = 1 / 255  # HF's preprocessor_config: 0.00392156862745098
DEFAULT_SIZE = (512, 512)
# What Pillow's decoders raise on damaged or hostile data (besides DecompressionBombError): OSError for truncated
# or undecodable files (UnidentifiedImageError is one), ValueError for limits such as PngImagePlugin.MAX_TEXT_CHUNK
# (a zTXt / iTXt chunk that inflates past 1 MB), SyntaxError / struct.error / EOFError / IndexError from parsers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError)


def _too_large(path: Path, detail: str) -> ImageError:
    return ImageError(
        f"{path} is {detail}, more than the limit of {Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS, "
        "Pillow's guard against decompression bombs). If you trust this image, raise the limit: --max-pixels N "
        "on the command line, or PIL.Image.MAX_IMAGE_PIXELS = N in Python"
    )


@contextlib.contextmanager
def open_image_file(path):
    """Open an image file and decode it, refusing -- with an ImageError naming the file -- what would hang or
    exhaust memory: a FIFO, device or socket (reading one waits forever), an image of more than
    `PIL.Image.MAX_IMAGE_PIXELS` pixels (89,478,485 by default; None: no limit), a text chunk that inflates past
    Pillow's `PngImagePlugin.MAX_TEXT_CHUNK`, and anything Pillow cannot decode. Yields the loaded PIL image;
    Pillow's errors in the caller's block (e.g. while applying the EXIF rotation) are reported the same way.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"image file {path} does not exist") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path} is not a regular file (a FIFO, device or socket, whose reading may never end); "
                         "pass an image file")
    try:
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its limit; we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            pixels = img.size[0] * img.size[1]
            if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
                raise _too_large(path, f"{img.size[0]} x {img.size[1]} = {pixels:,} pixels")
            img.load()
            yield img
    except Image.DecompressionBombError:  # above twice its limit Pillow refuses to open the file at all
        raise _too_large(path, f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except SegformerError:  # ours, from the caller's block too (LabelError is a ValueError)
        raise
    except DECODE_ERRORS as e:
        raise ImageError(f"{path} is not a readable image ({e}); pass a PNG, JPEG or other format Pillow reads") \
            from None


def _gray_range(img: Image.Image, a: np.ndarray) -> float:
    """The white level of a 16-bit or 32-bit grayscale image: 65535 for the I;16 modes; for mode "I" (signed
    32-bit) the smallest of 255, 65535 (Pillow opens some 16-bit files as "I") and 2**31 - 1 that holds the data."""
    if img.mode == "F":
        raise ImageError("float (mode F) images have no defined range; convert them to 8-bit RGB first")
    if img.mode.startswith("I;16"):
        return 65535.0
    if a.size and a.min() < 0:
        raise ImageError(f"a 32-bit (mode I) image with negative values ({a.min():.0f}) has no defined range; "
                         "convert it to 8-bit RGB first")
    top = a.max() if a.size else 0
    return next(white for white in (255.0, 65535.0, 2.0**31 - 1) if top <= white)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, explicitly.

    Transparent images are composited onto white first (what HF's `convert_to_rgb` does); 16-bit and 32-bit
    grayscale are scaled to 0..255 by their full range, see `_gray_range` (PIL's own convert would clip at 255).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.round(a * (255.0 / _gray_range(img, a))), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """An `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` uint8/uint16 array -> `(H, W, 3)` uint8."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        hint = " (it looks channels-first: use a.transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}{hint}")
    if a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)  # 65535 -> 255
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageError(
            f"image arrays must be uint8 (0..255) or uint16; got {a.dtype}. A float image has no agreed range: "
            "convert it, e.g. (np.clip(a, 0, 1) * 255).round().astype(np.uint8), or pass pixel_values to the model"
        )
    if a.ndim == 2:
        return np.stack([a] * 3, axis=-1)
    if a.shape[-1] == 4:
        return np.asarray(_to_rgb(Image.fromarray(a)))
    return np.ascontiguousarray(a)


def load_image(image) -> np.ndarray:
    """A path, a PIL image or an array -> the `(H, W, 3)` uint8 RGB array the model sees."""
    if isinstance(image, (str, Path)):
        with open_image_file(image) as img:
            # Camera photos store their rotation in EXIF; apply it, as transformers' load_image does.
            image = _to_rgb(ImageOps.exif_transpose(img))
    if isinstance(image, Image.Image):
        a = np.asarray(_to_rgb(image))
    elif isinstance(image, np.ndarray):
        a = _array_to_rgb(image)
    else:
        raise ImageError(f"expected a path, a PIL image or a NumPy array; got {type(image).__name__}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"the image is empty (shape {a.shape})")
    return a


def _as_size(size) -> tuple[int, int]:
    if size is None:
        return DEFAULT_SIZE
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    if isinstance(size, dict):  # HF's {"height": h, "width": w}
        size = (size["height"], size["width"])
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


def normalize(rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(3, H, W)` float32: x / 255 (in float64, as HF) then (x - mean) / std in float32."""
    x = (rgb.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return x.transpose(2, 0, 1)


def preprocess(images, size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, segmentation_maps=None,
               do_reduce_labels: bool = False):
    """Images -> `pixel_values: (B, 3, height, width)` float32, exactly HF's SegformerImageProcessor (PIL backend).

    `images`: a path, PIL image or `(H, W, 3)` uint8 array, or a list of them. Grayscale, palette, RGBA and 16-bit
    images are converted to 8-bit RGB explicitly. `size`: (height, width) or an int, default 512 x 512.

    With `segmentation_maps` (one per image: a path, PIL image or `(H, W)` integer array of class ids, see
    `load_mask`) the result is the pair `(pixel_values, labels)`, `labels: (B, height, width)` int64: each map
    reduced by `reduce_labels` when `do_reduce_labels`, then resized with NEAREST (HF's processor, which returns
    them as "labels"). Unlike HF, a map of another size than its image is refused (HF would stretch it silently).
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ImageError("no images given")
    h, w = _as_size(size)
    # bytes per pixel: 2 x 12 per image (3 float32 channels, in the list and in the stack) + one image's float64
    # rescale in `normalize` (2 x 24); with segmentation maps, 2 x 8 more per image (int64 labels, list and stack)
    per_image = 24 if segmentation_maps is None else 40
    check_memory((per_image * len(images) + 48) * h * w, f"preprocessing {len(images)} image(s) to {h} x {w}",
                 "choose a smaller size")
    rgbs = [load_image(image) for image in images]
    pixel_values = np.stack([normalize(resize_image(rgb, (h, w)), mean, std) for rgb in rgbs])
    if segmentation_maps is None:
        return pixel_values
    maps = segmentation_maps if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
    if len(maps) != len(rgbs):
        raise LabelError(f"got {len(maps)} segmentation map(s) for {len(rgbs)} image(s); pass one per image")
    labels = []
    for i, (rgb, seg) in enumerate(zip(rgbs, maps)):
        mask = load_mask(seg)
        if mask.shape != rgb.shape[:2]:
            raise LabelError(f"segmentation map {i} is {mask.shape[0]} x {mask.shape[1]} but its image is "
                             f"{rgb.shape[0]} x {rgb.shape[1]} (height x width); pass the map made for that image")
        labels.append(resize_mask(reduce_labels(mask) if do_reduce_labels else mask, (h, w)))
    return pixel_values, np.stack(labels)


MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes whose pixels are class ids


def load_mask(mask) -> np.ndarray:
    """A segmentation map -> `(H, W)` int64 class ids.

    `mask`: a path or PIL image of mode P (an indexed PNG: the palette indices are the ids), L (grayscale), 1 or
    I / I;16 (16-bit ids), or an `(H, W)` (or `(H, W, 1)`) non-negative integer array. Colour-coded (RGB) masks
    have no ids of their own: map their colours first (`training.data` does, through a class CSV).
    """
    if isinstance(mask, (str, Path)):
        with open_image_file(mask) as img:
            return _mask_of(img, f"the mask {mask}")
    if isinstance(mask, Image.Image):
        return _mask_of(mask, "the mask")
    if isinstance(mask, np.ndarray):
        a = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
        if a.ndim != 2:
            raise LabelError(f"a segmentation map must be (H, W) class ids; got shape {mask.shape}. A colour-coded "
                             "(H, W, 3) mask needs its colours mapped to ids (mininp_segformer.training.data)")
        if a.dtype == np.bool_:
            a = a.astype(np.int64)
        if not np.issubdtype(a.dtype, np.integer):
            raise LabelError(f"a segmentation map must hold integer class ids; got dtype {a.dtype}. Round and cast "
                             "it, e.g. np.rint(m).astype(np.int64), if it really holds ids")
        if a.size and a.min() < 0:
            raise LabelError(f"a segmentation map holds a negative class id ({a.min()}); use 255 for ignored pixels")
        if a.size == 0:
            raise LabelError(f"the segmentation map is empty (shape {mask.shape})")
        return a.astype(np.int64)
    raise LabelError(f"expected a segmentation map as a path, a PIL image or a NumPy array; got {type(mask).__name__}")


def _mask_of(img: Image.Image, what: str) -> np.ndarray:
    if img.mode not in MASK_MODES:
        raise LabelError(f"{what} is a mode {img.mode} image; class ids come from an indexed (P), grayscale (L) or "
                         "16-bit PNG. A colour-coded mask needs a class CSV (name, r, g, b) to map its colours")
    return load_mask(np.asarray(img))


def reduce_labels(mask: np.ndarray) -> np.ndarray:
    """HF's `do_reduce_labels` (mmseg's `reduce_zero_label`): 0 -> 255, k -> k - 1, 255 stays 255. For ADE20K,
    whose annotations use 0 for "other" and 1..150 for the classes. Returns a new int64 array."""
    mask = np.asarray(mask, dtype=np.int64)
    return np.where((mask == 0) | (mask == 255), 255, mask - 1)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """`(H, W)` class ids -> `(height, width)` int64, PIL's NEAREST filter (HF's processor for segmentation maps).

    PIL's nearest neighbour of output pixel x is input pixel floor((x + 0.5) * W / width).
    """
    h, w = _as_size(size)
    mask = np.asarray(mask)
    if mask.shape == (h, w):
        return mask.astype(np.int64)
    small = mask.size == 0 or mask.max() <= 255
    img = Image.fromarray(mask.astype(np.uint8) if small else mask.astype(np.int32))  # mode L or I
    return np.asarray(img.resize((w, h), resample=Image.Resampling.NEAREST)).astype(np.int64)


def resize_image(rgb: np.ndarray, size) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(height, width, 3)` uint8, PIL's bilinear filter (HF's resample=2); same size: as is."""
    h, w = _as_size(size)
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BILINEAR))  # PIL: (w, h)


def postprocess(logits, target_sizes=None) -> list[np.ndarray]:
    """HF's `post_process_semantic_segmentation`: `logits: (B, C, h, w)` -> a list of B `(H, W)` int64 class maps.

    With `target_sizes` (one (H, W) per image) the logits are resized bilinearly before the argmax; without, the
    maps stay at the logits' size.
    """
    logits = np.asarray(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, num_labels, h, w); got shape {logits.shape}")
    if target_sizes is None:
        return list(logits.argmax(axis=1))
    if len(target_sizes) != len(logits):
        raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits; pass one each")
    # kernels.resized_argmax: one pass and no (C, H, W) intermediate (its readable twin: layers.resized_argmax)
    return [kernels.resized_argmax(lg, _as_size(size)) for lg, size in zip(logits, target_sizes)]
