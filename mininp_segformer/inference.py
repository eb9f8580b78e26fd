"""Segmenting real photos: whole-image or sliding-window inference, HF's or mmseg's resizing, test-time augmentation,
with memory bounded by the window and not by the photo.

    seg = segment("drone.jpg", model, mode="slide", crop=512, stride=512)   # (H, W) int64 class ids, any size
    seg = segment("room.jpg", model, resize="mmseg", tta=True)              # SegFormer's multi-scale + flip test

Resizing (`resize`) decides the resolution the network sees (the "working" size):
    "hf"     stretch to the checkpoint's input size (`model.image_size`, 512 x 512 for ADE), as HF's processor and
             `predict` do; the logits are resized once, straight to the photo's size. Default for mode "whole".
    "mmseg"  keep the aspect ratio within (2048, short side of model.image_size) -- mmseg's Resize(scale=(2048, 512),
             keep_ratio=True) for ADE -- then round both sides up to a multiple of 32 by resizing (SegFormer's
             AlignedResize, its own evaluation pipeline). The logits are resized to the network input, then to the
             photo (mmseg's encode_decode + rescale).
    "none"   the photo's own resolution. Default for mode "slide": a 6000 x 4000 drone photo is segmented at full
             detail, window by window.

Modes: "whole" runs the network once on the working image. "slide" is mmseg's `slide_inference`: crop x crop windows
every `stride` pixels, h_grids = max(H - crop + stride - 1, 0) // stride + 1 (the same across), each window clamped
to the image's far edge (y1 = max(y2 - crop, 0)); every window's logits are resized to the window's size, summed
where windows overlap and divided by the count of windows at each pixel.

Test-time augmentation (mmseg's `aug_test`): the working size is scaled by each ratio of `scales` (default: the
paper's 0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and, with `flip`, each scale is also run on the mirrored image; the softmax
probabilities, resized to the photo's size and mirrored back, are averaged before the argmax.

Memory: nothing of size classes x photo is ever held. Scores flow top to bottom as bands of rows ("band streams":
iterators of channels-last `(rows, W, C)` blocks, so that the argmax and the softmax run over contiguous classes).
A slide keeps the low-resolution logits of the windows whose rows are not yet finished -- at most
ceil(crop / stride) rows of windows -- and finishes output rows as soon as no later window touches them; resizing
and the argmax work band by band as well (`resize_bands`, `argmax_bands`). With TTA every augmentation keeps its
own rows of windows and its own resized copy of the photo. Before the first run, `segment` adds all this up
(`segment_bytes`) and raises ResourceError if it exceeds `memory.max_memory()`.
"""

from __future__ import annotations

import math

import numpy as np

from .nn.encoder import stage_sizes
from .nn.kernels import window_average
from .nn.layers import bilinear_taps, resize_rows, softmax
from .memory import FLOAT32, check_memory
from .model import SLIDE_HINT
from .preprocessing import load_image, normalize, resize_image
from .threads import get_num_threads, map_one_thread_each
from .weights import SEMANTIC

MODES = ("whole", "slide")
RESIZE_MODES = ("hf", "mmseg", "none")
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's aug_test ratios, as in SegFormer's ADE evaluation
MAX_TTA_SCALE = 8.0  # a bound for scale ratios: 8 x the paper's largest is still an image size, 1e300 is not
BAND_ROWS = 32  # output rows finished at a time: (32, W, C) float32 blocks

# mmseg's test-time resize (SegFormer's own evaluation): keep the aspect ratio within a (long, short) bound, then
# round both sides up to a multiple of 32 (SegFormer's AlignedResize). See docs/cli.md, "Resizing".
MMSEG_LONG_SIDE = 2048
SIZE_DIVISOR = 32


# ---------------------------------------------------------------------------------------------------------------
# Sizes


def rescale_size(size, scale) -> tuple[int, int]:
    """mmcv's `rescale_size` for a tuple scale: the keep-ratio size of `size = (H, W)` that fits `scale`.

    `scale = (long, short)` (order does not matter) bounds the long side by max(scale) and the short side by
    min(scale), whichever limits more: factor = min(max(scale) / max(H, W), min(scale) / min(H, W)); each side
    becomes int(side * factor + 0.5). E.g. ADE's (2048, 512): (512, 683) stays, (4000, 6000) -> (512, 768).
    """
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def align_size(size, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """Both sides rounded up to a multiple of `divisor` (SegFormer's AlignedResize resizes to this size; mmseg's
    Pad(size_divisor) would pad to it instead)."""
    return tuple(-(-int(s) // divisor) * divisor for s in size)


def mmseg_size(size, scale, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """The size SegFormer's ADE/Cityscapes test pipeline resizes an `(H, W)` image to: AlignedResize(scale,
    keep_ratio=True, size_divisor=32) = `align_size(rescale_size(size, scale), divisor)`."""
    return align_size(rescale_size(size, scale), divisor)


def default_mmseg_scale(model_size) -> tuple[int, int]:
    """mmseg's test `scale` (long, short) for a model trained on `model_size` crops: (2048, 512) for the 512 x 512
    ADE checkpoints, (2048, 640) for B5-640, (2048, 1024) for the 1024 x 1024 Cityscapes ones."""
    return max(MMSEG_LONG_SIDE, max(model_size)), min(model_size)


def working_size(image_size, resize: str, model_size, ratio: float = 1.0, mmseg_scale=None) -> tuple[int, int]:
    """The `(h, w)` the network sees for an `image_size = (H, W)` photo (see the module doc for `resize`).

    `ratio` scales the target as mmseg's MultiScaleFlipAug does: "hf" -> int(side * ratio) of the model size;
    "mmseg" -> the scale (int(long * ratio), int(short * ratio)), then the keep-ratio rescale and the 32-alignment;
    "none" -> the photo rescaled within (int(W * ratio), int(H * ratio)).
    """
    h, w = image_size
    if resize == "hf":
        return max(1, int(model_size[0] * ratio)), max(1, int(model_size[1] * ratio))
    if resize == "mmseg":
        long, short = mmseg_scale or default_mmseg_scale(model_size)
        return mmseg_size((h, w), (int(long * ratio), int(short * ratio)))
    if resize == "none":
        return (h, w) if ratio == 1.0 else rescale_size((h, w), (int(w * ratio), int(h * ratio)))
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def window_count(size: int, crop: int, stride: int) -> int:
    """mmseg's number of sliding windows along one axis: `max(size - crop + stride - 1, 0) // stride + 1`."""
    return max(size - crop + stride - 1, 0) // stride + 1


def window_spans(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's sliding-window grid along one axis: `window_count` windows, the i-th spanning
    [max(min(i * stride + crop, size) - crop, 0), min(i * stride + crop, size)).

    So the last window is pushed back to end at the edge, and a crop larger than `size` gives one window: all of it.
    """
    spans = []
    for i in range(window_count(size, crop, stride)):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def _coverage(spans, size: int) -> np.ndarray:
    """How many of the windows `spans` cover each pixel along one axis: `(size,)` float32."""
    count = np.zeros(size, dtype=np.float32)
    for a, b in spans:
        count[a:b] += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# Band streams: an (H, W, C) map as consecutive (rows, W, C) blocks, top to bottom


def resize_bands(bands, in_h: int, size, band_rows: int = BAND_ROWS):
    """Resize a band stream of an `(in_h, w, C)` map to `size = (H, W)` lazily; yields `(<= band_rows, W, C)` blocks
    of exactly `band_rows` rows (the last one shorter), whatever the blocks coming in. Keeps only the input rows
    the next output band needs."""
    out_h = size[0]
    taps = None if in_h == out_h else bilinear_taps(in_h, out_h)
    source = iter(bands)
    buf, offset = None, 0  # buf: input rows offset .. offset + len(buf); None: nothing held, next block at offset
    for start in range(0, out_h, band_rows):
        stop = min(start + band_rows, out_h)
        lo, hi = (start, stop) if taps is None else (int(taps[0][start]), int(taps[1][stop - 1]) + 1)
        buf, offset = _drop_rows_above(buf, offset, lo)
        while buf is None or offset + len(buf) < hi:
            block = next(source)
            buf = block if buf is None else np.concatenate([buf, block])
            buf, offset = _drop_rows_above(buf, offset, lo)
        yield resize_rows(buf, size, start, stop, in_h, offset)


def _drop_rows_above(buf, offset: int, row: int):
    """Keep the rows >= `row` of `buf` (which holds rows offset ..); returns (buf or None, its first row)."""
    if buf is None or row <= offset:
        return buf, offset
    if row >= offset + len(buf):
        return None, offset + len(buf)
    return buf[row - offset :], row


def argmax_bands(bands, size) -> np.ndarray:
    """The class map `(H, W)` int64 of a band stream of scores at size (H, W): argmax over classes, band by band."""
    return stack_bands((block.argmax(axis=-1) for block in bands), size)


def stack_bands(blocks, size) -> np.ndarray:
    """The `(H, W)` int64 map whose consecutive rows the `(rows, W)` blocks are."""
    seg = np.empty(size, dtype=np.int64)
    row = 0
    for block in blocks:
        seg[row : row + block.shape[0]] = block
        row += block.shape[0]
    if row != size[0]:
        raise RuntimeError(f"the score stream ended after {row} of {size[0]} rows")
    return seg


def probability_sum_bands(streams):
    """TTA's merge, as a band stream: per band, the sum of the softmax probabilities of `streams`, a list of (band
    stream, mirrored?), each mirrored back first (the sum has the mean's argmax). All streams must yield the same
    bands, as `resize_bands` to one size does."""
    for blocks in zip(*(bands for bands, _ in streams)):
        total = None
        for block, (_, mirrored) in zip(blocks, streams):
            p = softmax(block[:, ::-1] if mirrored else block, axis=-1)
            total = p if total is None else total + p
        yield total


# ---------------------------------------------------------------------------------------------------------------
# The network on an image or a window


def image_logits(model, rgb) -> np.ndarray:
    """`(h, w, 3)` uint8 (any view) -> the model's logits, channels-last `(h', w', C)` (h' = h / 4 for the MiT
    configs)."""
    return np.ascontiguousarray(model(normalize(rgb)[None]).logits[0].transpose(1, 2, 0))


def whole_bands(model, rgb, resize: str, size, band_rows: int = BAND_ROWS):
    """Whole-image inference on the working image `rgb`, as a band stream at the photo's `size`.

    "hf": the logits are resized once, to `size` (HF's post_process). "mmseg"/"none": first to the network input's
    size, then to `size` (mmseg's encode_decode, then its rescale).
    """
    logits = image_logits(model, rgb)
    if resize == "hf":
        return resize_bands([logits], logits.shape[0], size, band_rows)
    at_input = resize_bands([logits], logits.shape[0], rgb.shape[:2], band_rows)
    return resize_bands(at_input, rgb.shape[0], size, band_rows)


def slide_bands(model, rgb, crop, stride, band_rows: int = BAND_ROWS, on_window=None, argmax: bool = False,
                average=None):
    """mmseg's slide_inference on `rgb: (H, W, 3)` as a band stream of the averaged logits `(rows, W, C)`, or with
    `argmax` of their class ids `(rows, W)` int64.

    `crop`, `stride`: (height, width). Windows are run a row of windows at a time, one window per forward pass and
    one thread per window (`threads.map_one_thread_each`: batching windows, or splitting one window's products over
    the threads, measured slower, docs/performance.md); their logits stay at the network's output resolution, in
    slots for the rows of windows that can still cover an unfinished output row, until the output rows they cover
    are finished (`average`: `kernels.window_average` on the numba backend, else `window_average_numpy`).
    `on_window()` is called after each window (progress).
    """
    h, w = rgb.shape[:2]
    rows = window_spans(h, crop[0], stride[0])
    cols = window_spans(w, crop[1], stride[1])
    counts = _coverage(rows, h), _coverage(cols, w)
    window = (rows[0][1] - rows[0][0], cols[0][1] - cols[0][0])  # every window has this size
    held = min(len(rows), slide_rows_held(crop, stride))  # rows of windows that can overlap an unfinished row
    average = average or (window_average if model.backend == "numba" else window_average_numpy)
    origins, done = np.zeros((held * len(cols), 2), dtype=np.int64), 0
    logits = np.empty((len(origins), *stage_sizes(model.config, *window)[0], model.config.num_labels), np.float32)
    for k, (y0, y1) in enumerate(rows):
        slot = (k % held) * len(cols)  # overwrites row k - held, which no unfinished row needs (slide_rows_held)

        def run(c, y0=y0, y1=y1, slot=slot):  # each window into its own slot
            x0, x1 = cols[c]
            logits[slot + c], origins[slot + c] = image_logits(model, rgb[y0:y1, x0:x1]), (y0, x0)

        # in train mode (dropout from model.rng, BatchNorm's running statistics) the windows must run in order
        map_one_thread_each(run, range(len(cols)), on_window, workers=1 if model.training else None)
        # the windows held, oldest row first and left to right: mmseg's order of summing
        slots = [(m % held) * len(cols) + c for m in range(max(0, k + 1 - held), k + 1) for c in range(len(cols))]
        finished = rows[k + 1][0] if k + 1 < len(rows) else h  # no later window starts above this row
        for start in range(done, finished, band_rows):
            yield average(logits, origins, slots, window, counts, (start, min(start + band_rows, finished)), argmax)
        done = finished


def slide_rows_held(crop, stride) -> int:
    """Rows of windows whose logits `slide_bands` keeps: the ceil(crop / stride) rows that can cover an output row,
    and the row being run. Enough for mmseg's last row too, which is pushed back to end at the image's edge: row
    k - held ends at (k - held) stride + crop <= (k - 1) stride, before the last row starts (H - crop > (k - 1)
    stride, or there would be no k-th row)."""
    return -(-crop[0] // stride[0]) + 1


def window_average_numpy(logits, origins, slots, window, counts, rows, argmax=False) -> np.ndarray:
    """`kernels.window_average` in NumPy, its readable twin: rows `rows = (start, stop)` of the sum over the
    windows in `slots` of their logits resized to the window (mmseg's `preds`), divided by the number of windows at
    each pixel (its `count_mat`); with `argmax`, the class ids of it. See `kernels.window_average` for the rest."""
    (start, stop), (count_y, count_x) = rows, counts
    acc = np.zeros((stop - start, len(count_x), logits.shape[-1]), dtype=np.float32)
    for s in slots:
        (y0, x0), (wh, ww) = origins[s], window
        lo, hi = max(start, y0), min(stop, y0 + wh)
        if lo < hi:
            acc[lo - start : hi - start, x0 : x0 + ww] += resize_rows(logits[s], window, lo - y0, hi - y0)
    acc /= (count_y[start:stop, None] * count_x)[:, :, None]
    return acc.argmax(axis=-1) if argmax else acc


def slide_logits(model, image, crop=None, stride=None) -> np.ndarray:
    """mmseg's slide_inference at the image's own resolution: the window-averaged logits `(C, H, W)` float32.

    Holds the whole (C, H, W) array: for large photos use `segment(..., mode="slide")`, which never does.
    """
    rgb = load_image(image)
    crop, stride = slide_geometry(model, crop, stride)
    return np.concatenate(list(slide_bands(model, rgb, crop, stride))).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Checking the options


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer or a (height, width) pair, got {value!r}") from None
    return h, w


def slide_geometry(model, crop=None, stride=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) as (height, width) pairs. Defaults: the model's input size, and 2/3 of the crop (mmseg's
    SegFormer-B5-640 setting, 640 / 426)."""
    crop = _pair(model.image_size if crop is None else crop, "crop")
    stride = tuple(max(1, c * 2 // 3) for c in crop) if stride is None else _pair(stride, "stride")
    if min(crop) < model.min_size:
        raise ValueError(f"crop {crop[0]} x {crop[1]} is smaller than the {model.min_size} x {model.min_size} "
                         "pixels this model needs")
    if min(stride) < 1:
        raise ValueError(f"stride must be at least 1 pixel, got {stride[0]} x {stride[1]}")
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise ValueError(f"stride {stride[0]} x {stride[1]} is larger than the crop {crop[0]} x {crop[1]}: windows "
                         "would leave gaps. Use a stride <= the crop (equal: no overlap)")
    return crop, stride


def _check_options(model, mode, resize, tta, scales):
    if getattr(model, "head", None) != SEMANTIC:
        raise ValueError(f"segmenting needs a semantic-segmentation checkpoint; this one is "
                         f"{getattr(model, 'head', type(model).__name__)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    resize = ("hf" if mode == "whole" else "none") if resize is None else resize
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize, check_scales(TTA_SCALES if scales is None else scales) if tta else (1.0,)


def check_scales(scales) -> tuple[float, ...]:
    """TTA scale ratios as a tuple of floats, each in (0, MAX_TTA_SCALE]; a ValueError otherwise (NaN, inf, 0,
    1e300 -- whose image sizes no memory holds -- or no scales at all)."""
    try:
        ratios = tuple(float(r) for r in scales)
    except (TypeError, ValueError):
        raise ValueError(f"TTA scales must be a list of numbers, got {scales!r}") from None
    if not ratios or not all(0 < r <= MAX_TTA_SCALE for r in ratios):  # NaN fails the comparison too
        raise ValueError(f"TTA scales must be positive numbers up to {MAX_TTA_SCALE:g} (mmseg's are 0.5 to 1.75), "
                         f"got {scales!r}")
    return ratios


def segment_bytes(model, size, sizes, runs_per_scale: int, mode: str, crop=None, stride=None,
                  band_rows: int = BAND_ROWS) -> int:
    """An estimate of `segment`'s peak memory in bytes: a photo of `size = (H, W)` worked on at `sizes` (one
    `(h, w)` per TTA scale), each run `runs_per_scale` times (2: also mirrored). With C classes:

        the photo and its class map        H W (3 + 8)          uint8 RGB, int64 ids
        per scale: the resized photo       h w 3                its mirrored run shares it
        per run, float32: the logits held  whole: the network's output, (h/4) (w/4) C; slide: the windows of
                                           `slide_rows_held` rows, each (crop/4)^2 C
                          bands in flight  3 x band_rows W C    resized, softmax, running sum
        forward passes                     the largest whole image, or one crop window per thread, as many as
                                           a row has windows (`model.forward_bytes`, `slide_bands`)
    """
    h, w = size
    classes = model.config.num_labels
    total = h * w * (3 + 8)
    for s in sizes:
        total += s[0] * s[1] * 3
        if mode == "whole":
            held = classes * math.prod(stage_sizes(model.config, *s)[0])
        else:
            rows = min(slide_rows_held(crop, stride), window_count(s[0], crop[0], stride[0]))
            window = classes * math.prod(stage_sizes(model.config, *crop)[0])
            held = rows * window_count(s[1], crop[1], stride[1]) * window
        total += runs_per_scale * FLOAT32 * (held + 3 * band_rows * w * classes)
    if mode == "whole":
        return int(total + max(model.forward_bytes(1, *s) for s in sizes))
    at_once = min(get_num_threads(), max(window_count(s[1], crop[1], stride[1]) for s in sizes))
    return int(total + at_once * model.forward_bytes(1, *crop))


def _check_sizes(model, mode, ratios, sizes, base, crop) -> None:
    """Errors for working images the network cannot take: below its minimum, or a crop larger than the image."""
    for r, s in zip(ratios, sizes):
        if min(s) < model.min_size:
            raise ValueError(f"at scale {r:g} the image would be {s[0]} x {s[1]}, smaller than the {model.min_size} "
                             f"x {model.min_size} pixels this model needs; leave that scale out")
    if mode == "slide" and (crop[0] > base[0] or crop[1] > base[1]):
        raise ValueError(f"the crop {crop[0]} x {crop[1]} is larger than the image ({base[0]} x {base[1]} at the "
                         "working resolution); use a smaller crop or mode 'whole'")


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def segment(image, model, mode: str = "whole", crop=None, stride=None, resize: str | None = None, tta: bool = False,
            scales=None, flip: bool = True, mmseg_scale=None, band_rows: int = BAND_ROWS, progress=None) -> np.ndarray:
    """Segment one photo (path, PIL image or `(H, W, 3)` uint8) -> `(H, W)` int64 class ids at its own size.

    mode: "whole" or "slide"; crop / stride (slide): pixels, an int or (h, w), default the model's input size and
    2/3 of it; resize: "hf" (default for whole), "mmseg" or "none" (default for slide), see the module doc;
    tta: average over `scales` (default TTA_SCALES) x {as is, mirrored if `flip`}; mmseg_scale: (long, short) for
    resize="mmseg" (default `default_mmseg_scale(model.image_size)`); progress: called as progress(done, total)
    after every network run.

    `segment(img, model)` gives exactly `predict(img, model)`.
    """
    resize, ratios = _check_options(model, mode, resize, tta, scales)
    rgb = load_image(image)
    size = rgb.shape[:2]
    flips = (False, True) if tta and flip else (False,)
    sizes = [working_size(size, resize, model.image_size, r, mmseg_scale) for r in ratios]
    if mode == "slide":
        crop, stride = slide_geometry(model, crop, stride)
    _check_sizes(model, mode, ratios, sizes, working_size(size, resize, model.image_size, 1.0, mmseg_scale), crop)
    need = segment_bytes(model, size, sizes, len(flips), mode, crop, stride, band_rows)
    largest = max(sizes, key=lambda s: s[0] * s[1])
    check_memory(need, f"segmenting a {size[0]} x {size[1]} image ({mode} mode, {len(sizes) * len(flips)} "
                 f"pass(es), the largest at {largest[0]} x {largest[1]})",
                 SLIDE_HINT if mode == "whole" else "use fewer or smaller TTA scales, or a smaller image")
    runs = [window_count(s[0], crop[0], stride[0]) * window_count(s[1], crop[1], stride[1])
            if mode == "slide" else 1 for s in sizes] * len(flips)
    counter = _run_counter(sum(runs), progress)
    if mode == "slide" and len(runs) == 1 and sizes[0] == size:  # the argmax in the kernel: no score bands at all
        return stack_bands(slide_bands(model, rgb, crop, stride, band_rows, counter, argmax=True), size)
    streams = []
    for s in sizes:
        scaled = resize_image(rgb, s)
        for mirrored in flips:
            img = scaled[:, ::-1] if mirrored else scaled  # a view: mmseg flips after resizing
            if mode == "whole":
                bands = whole_bands(model, img, resize, size, band_rows)
                counter()
            else:
                bands = resize_bands(slide_bands(model, img, crop, stride, band_rows, counter), s[0], size, band_rows)
            streams.append((bands, mirrored))
    return argmax_bands(streams[0][0] if len(streams) == 1 else probability_sum_bands(streams), size)



def _run_counter(total: int, progress):
    """A function to call after every network run; it reports progress(done, total) if `progress` is given."""
    done = 0

    def count():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return count
