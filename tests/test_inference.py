"""mininp_segformer.inference: whole / slide / TTA against straightforward full-array references, and the memory
bound of sliding-window inference on a real-size 6000 x 4000 photo."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from PIL import Image

import mininp_segformer as ms
from mininp_segformer import inference as inf
from mininp_segformer.nn.layers import resize_bilinear, softmax
from mininp_segformer.inference import align_size, mmseg_size, rescale_size
from mininp_segformer.memory import on_glibc
from mininp_segformer.preprocessing import normalize, resize_image
from mininp_segformer.weights import CLASSIFICATION, random_state_dict
from tests.conftest import REPO_ROOT
from tests.tiny_checkpoint import gradient_image, make_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: one thread keeps these runs quick and steady."""
    before = numba.get_num_threads()
    ms.set_num_threads(1)
    yield
    ms.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    config = ms.variant_config("b0", num_labels=7)
    return ms.Segformer(config, random_state_dict(config, seed=11), image_size=(64, 64))


@pytest.fixture(scope="module")
def photo():
    return np.random.default_rng(5).integers(0, 256, size=(75, 109, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# References: the pipelines written out on whole arrays, (C, H, W), as mmseg / HF do them


def logits_of(model, rgb):
    return model(normalize(rgb)[None]).logits[0]  # (C, h, w)


def mmseg_slide_reference(model, rgb, crop, stride):
    """mmseg's EncoderDecoder.slide_inference, line by line, on full-size arrays."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_img, w_img = rgb.shape[:2]
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = np.zeros((model.config.num_labels, h_img, w_img), dtype=np.float32)
    count_mat = np.zeros((h_img, w_img), dtype=np.float32)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_seg_logit = resize_bilinear(logits_of(model, rgb[y1:y2, x1:x2]), (y2 - y1, x2 - x1))
            preds[:, y1:y2, x1:x2] += crop_seg_logit
            count_mat[y1:y2, x1:x2] += 1
    assert (count_mat > 0).all()
    return preds / count_mat


def tta_reference(model, rgb, resize, scales, mode, crop=None, stride=None):
    """mmseg's aug_test: per scale and flip, softmax of the logits at the photo's size, mirrored back, summed."""
    size = rgb.shape[:2]
    total = 0.0
    for r in scales:
        work = inf.working_size(size, resize, model.image_size, r)
        for flip in (False, True):
            img = resize_image(rgb, work)
            img = img[:, ::-1] if flip else img
            if mode == "slide":
                scores = mmseg_slide_reference(model, img, crop, stride)
            else:
                scores = resize_bilinear(logits_of(model, img), work)
            p = softmax(resize_bilinear(scores, size).astype(np.float64), axis=0)
            total = total + (p[:, :, ::-1] if flip else p)
    return total


def assert_argmax_of(name, seg, probs, tol=1e-5):
    """`seg` is the argmax of `probs: (C, H, W)` except where the top two are within `tol` (float rounding)."""
    ref = probs.argmax(axis=0)
    ys, xs = np.nonzero(seg != ref)
    gap = probs[ref[ys, xs], ys, xs] - probs[seg[ys, xs], ys, xs]
    print(f"{name}: {len(ys)} of {seg.size} pixels differ from the reference argmax "
          f"(largest gap {gap.max(initial=0):.1e})")
    assert (gap <= tol).all()


# ----------------------------------------------------------------------------------------------------------------
# Sizes and grids


def test_mmseg_sizes():
    assert rescale_size((512, 683), (2048, 512)) == (512, 683)  # the ADE photo: short side already 512
    assert rescale_size((4000, 6000), (2048, 512)) == (512, 768)  # short side is the limit
    assert rescale_size((100, 3000), (2048, 512)) == (68, 2048)  # long side is the limit
    assert align_size((512, 683)) == (512, 704) and align_size((68, 2048)) == (96, 2048)
    assert mmseg_size((512, 683), (2048, 512)) == (512, 704)
    assert inf.default_mmseg_scale((512, 512)) == (2048, 512)
    assert inf.default_mmseg_scale((1024, 1024)) == (2048, 1024)
    assert inf.working_size((512, 683), "mmseg", (512, 512), ratio=0.5) == (256, 352)  # scale (1024, 256)
    assert inf.working_size((512, 683), "hf", (512, 512), ratio=0.75) == (384, 384)
    assert inf.working_size((512, 683), "none", (512, 512)) == (512, 683)


def test_window_spans():
    assert inf.window_spans(100, 40, 30) == [(0, 40), (30, 70), (60, 100)]
    assert inf.window_spans(100, 40, 40) == [(0, 40), (40, 80), (60, 100)]  # the last one pushed back to the edge
    assert inf.window_spans(4000, 512, 512)[-2:] == [(3072, 3584), (3488, 4000)]
    assert inf.window_spans(30, 40, 20) == [(0, 30)]  # crop larger than the image: one window, all of it


@pytest.mark.parametrize("in_h, out_h, blocks", [(20, 53, [1, 5, 3, 11]), (53, 20, [7, 7, 7, 7, 7, 7, 11]),
                                                 (31, 31, [4, 27]), (9, 1, [9]), (40, 7, [1] * 40)])
def test_resize_bands_equals_resizing_the_whole_map(in_h, out_h, blocks):
    x = np.random.default_rng(in_h).standard_normal((in_h, 13, 4), dtype=np.float32)
    pieces = np.split(x, np.cumsum(blocks)[:-1])
    out = np.concatenate(list(inf.resize_bands(pieces, in_h, (out_h, 17), band_rows=6)))
    np.testing.assert_array_equal(out, resize_bilinear(x, (out_h, 17), axes=(0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# The modes against their references


def test_whole_hf_is_predict(model, photo):
    np.testing.assert_array_equal(inf.segment(photo, model), ms.predict(photo, model))


@pytest.mark.parametrize("crop, stride", [((64, 64), (40, 40)), ((64, 64), (64, 64)), ((48, 64), (17, 50)),
                                          ((75, 109), (30, 30))])
def test_slide_is_mmseg_slide_inference(model, photo, crop, stride):
    ref = mmseg_slide_reference(model, photo, crop, stride)
    ours = inf.slide_logits(model, photo, crop, stride)
    np.testing.assert_array_equal(ours, ref)  # same operations in the same order: bit for bit
    np.testing.assert_array_equal(inf.segment(photo, model, mode="slide", crop=crop, stride=stride),
                                  ref.argmax(axis=0))


def test_slide_on_two_threads_gives_the_same_bits(model):
    """Two threads: each window of a row runs on a thread of its own (`threads.map_one_thread_each`, BLAS on one
    thread); the result is the same bits as every window run in turn on two threads (the mmseg reference)."""
    photo = np.random.default_rng(8).integers(0, 256, size=(160, 300, 3), dtype=np.uint8)
    crop, stride = (128, 128), (96, 86)  # stage 1 of a window: 32 x 32 x 32 values, split over two threads
    try:
        ms.set_num_threads(2)
        ref = mmseg_slide_reference(model, photo, crop, stride)
        np.testing.assert_array_equal(inf.slide_logits(model, photo, crop, stride), ref)
    finally:
        ms.set_num_threads(1)


def test_whole_mmseg(model, photo):
    work = mmseg_size(photo.shape[:2], (2048, 64))  # the model's input is 64 x 64: scale (2048, 64)
    assert work == (64, 96)
    scores = resize_bilinear(resize_bilinear(logits_of(model, resize_image(photo, work)), work), photo.shape[:2])
    np.testing.assert_array_equal(inf.segment(photo, model, resize="mmseg"), scores.argmax(axis=0))


def test_tta_whole(model, photo):
    scales = (0.75, 1.0, 1.5)
    ours = inf.segment(photo, model, resize="mmseg", tta=True, scales=scales)
    assert_argmax_of("TTA whole", ours, tta_reference(model, photo, "mmseg", scales, "whole"))
    single = inf.segment(photo, model, resize="mmseg")
    assert (ours != single).any()  # the augmentations change something


def test_tta_slide(model, photo):
    scales = (0.75, 1.25)
    ours = inf.segment(photo, model, mode="slide", crop=48, stride=32, tta=True, scales=scales)
    ref = tta_reference(model, photo, "none", scales, "slide", (48, 48), (32, 32))
    assert_argmax_of("TTA slide", ours, ref)


def test_progress_counts_network_runs(model, photo):
    calls = []
    inf.segment(photo, model, mode="slide", crop=48, stride=32, progress=lambda *done_total: calls.append(done_total))
    n = len(inf.window_spans(75, 48, 32)) * len(inf.window_spans(109, 48, 32))
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_bad_options(model, photo, memory_limit):
    with pytest.raises(ValueError, match="stride 64 x 64 is larger than the crop 48 x 48"):
        inf.segment(photo, model, mode="slide", crop=48, stride=64)
    with pytest.raises(ValueError, match="stride must be at least 1"):
        inf.segment(photo, model, mode="slide", crop=48, stride=0)
    with pytest.raises(ValueError, match=r"crop 128 x 128 is larger than the image \(75 x 109"):
        inf.segment(photo, model, mode="slide", crop=128)
    with pytest.raises(ValueError, match="smaller than the 29 x 29"):
        inf.segment(photo, model, mode="slide", crop=20)
    with pytest.raises(ValueError, match="mode must be one of"):
        inf.segment(photo, model, mode="tiles")
    with pytest.raises(ValueError, match="resize must be one of"):
        inf.segment(photo, model, resize="stretch")
    with pytest.raises(ValueError, match="TTA scales must be positive"):
        inf.segment(photo, model, tta=True, scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="at scale 0.1 the image would be 6 x 6"):
        inf.segment(photo, model, tta=True, scales=[0.1])
    memory_limit("8G")
    with pytest.raises(ms.ResourceError, match=r"segmenting a 4000 x 6000 image \(whole mode, 1 pass\(es\), the "
                       r"largest at 4000 x 6000\) would need about [\d.]+ GiB of memory, more than the limit of 8.0 "
                       r"GiB; segment large images in windows instead: .*mode='slide'"):
        inf.segment(np.zeros((4000, 6000, 3), dtype=np.uint8), model, resize="none")
    config = ms.variant_config("b0", num_labels=3)
    classifier = ms.Segformer(config, random_state_dict(config, CLASSIFICATION, seed=0), head=CLASSIFICATION)
    with pytest.raises(ValueError, match="semantic-segmentation checkpoint"):
        inf.segment(photo, classifier)


# ----------------------------------------------------------------------------------------------------------------
# A 6000 x 4000 photo: the peak memory of the whole command, in a process of its own

MEASURE = textwrap.dedent("""
    import resource, subprocess, sys, time
    start = time.perf_counter()
    status = subprocess.run(sys.argv[1:]).returncode
    seconds = time.perf_counter() - start
    print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)  # ru_maxrss: KiB on Linux
""")


def test_6000x4000_slide_peak_memory(tmp_path):
    """150 labels, crop 512, stride 512 (96 windows): the (150, 4000, 6000) float32 scores alone would be 14.4 GB.
    The whole command -- reading the PNG, segmenting, writing the label map -- must stay under 2 GB, with two threads
    running two windows at a time."""
    checkpoint = make_checkpoint(tmp_path / "b0-150", num_labels=150, image_size=(512, 512))
    Image.fromarray(gradient_image(4000, 6000)).save(tmp_path / "drone.png", compress_level=1)
    command = [sys.executable, "-m", "mininp_segformer", "predict", str(tmp_path / "drone.png"), "--model",
               str(checkpoint), "--out", str(tmp_path / "out"), "--mode", "slide", "--crop", "512", "--stride",
               "512", "--threads", "2", "-q"]  # two windows at a time
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env=env,
                         cwd=REPO_ROOT, timeout=600)
    status, max_rss_kib, seconds = out.stdout.split()
    peak_mb = int(max_rss_kib) / 1024
    print(f"6000 x 4000, 150 labels, slide 512/512: peak RSS {peak_mb:.0f} MB, {float(seconds):.1f} s")
    assert status == "0", out.stderr
    seg = Image.open(tmp_path / "out" / "drone.png")
    assert seg.mode == "P" and seg.size == (6000, 4000)
    assert int(np.asarray(seg).max()) < 150
    assert peak_mb < 2048


# ----------------------------------------------------------------------------------------------------------------
# The slide average: the numba kernel and its NumPy twin


@pytest.mark.parametrize("argmax", [False, True])
def test_window_average_kernel_equals_its_twin(argmax):
    """kernels.window_average and inference.window_average_numpy: the same bits, scores and class ids, on windows
    of 3 rows of slots summed in a rotated order, rows that two or three windows cover, and empty slots left out."""
    from mininp_segformer.nn import kernels

    rng = np.random.default_rng(2)
    h, w, crop, stride = 70, 90, (24, 30), (10, 20)
    rows, cols = inf.window_spans(h, crop[0], stride[0]), inf.window_spans(w, crop[1], stride[1])
    logits = rng.standard_normal((3 * len(cols), 6, 8, 5), dtype=np.float32)
    origins = np.array([(rows[k][0], x0) for k in (3, 4, 2) for x0, _ in cols])  # slots hold rows 3, 4, 2
    slots = [s + 2 * len(cols) for s in range(len(cols))] + list(range(2 * len(cols)))  # rows 2, 3, 4
    counts = inf._coverage(rows, h), inf._coverage(cols, w)
    band = (rows[4][0] - 7, rows[4][0] + 5)  # covered by rows 2 and 3, then by 2, 3 and 4
    ours = kernels.window_average(logits, origins, slots, crop, counts, band, argmax)
    twin = inf.window_average_numpy(logits, origins, slots, crop, counts, band, argmax)
    assert ours.shape == ((12, w) if argmax else (12, w, 5))
    np.testing.assert_array_equal(ours, twin)


def test_slide_keeps_few_rows_of_windows_and_any_backend_gives_mmseg(model, photo):
    """Many rows of windows (their slots reused), the last pushed back to the edge: still mmseg's numbers, bit for
    bit, on the numba backend (kernels.window_average) and through the NumPy twin."""
    photo = np.random.default_rng(6).integers(0, 256, size=(150, 109, 3), dtype=np.uint8)
    crop, stride = (32, 40), (19, 23)
    rows = inf.window_spans(150, 32, 19)
    assert len(rows) > inf.slide_rows_held(crop, stride) + 2 and rows[-1][0] - rows[-2][0] < 19
    ref = mmseg_slide_reference(model, photo, crop, stride)
    np.testing.assert_array_equal(inf.slide_logits(model, photo, crop, stride), ref)
    np.testing.assert_array_equal(inf.segment(photo, model, mode="slide", crop=crop, stride=stride),
                                  ref.argmax(axis=0))
    numpy_model = ms.Segformer(model.config, model.state_dict(), image_size=model.image_size, backend="numpy")
    ref = mmseg_slide_reference(numpy_model, photo, crop, stride)
    np.testing.assert_array_equal(inf.segment(photo, numpy_model, mode="slide", crop=crop, stride=stride),
                                  ref.argmax(axis=0))


# ----------------------------------------------------------------------------------------------------------------
# The allocator: freed activations reused, not fresh pages at every pass (memory.keep_freed_memory)

PAGE_FAULTS = textwrap.dedent("""
    import resource, numpy as np
    import mininp_segformer as ms
    from mininp_segformer.weights import random_state_dict
    ms.set_num_threads(1)
    config = ms.variant_config("b0", num_labels=150)
    model = ms.Segformer(config, random_state_dict(config, seed=0), image_size=(256, 256))
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    for _ in range(3):
        model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not on_glibc(), reason="a setting of glibc's malloc: other C libraries are left alone")
def test_a_forward_pass_reuses_freed_memory():
    """On glibc, `import mininp_segformer` keeps freed memory for reuse, so a warm forward pass takes (almost) no
    fresh pages from the kernel; with the user's own MALLOC_* settings (here glibc's initial 128 KB, which also turn
    its adaptive threshold off) it is left alone, and every pass faults its large activations in anew."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(**env):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, timeout=300,
                             env=dict(own, PYTHONPATH=str(REPO_ROOT), **env), cwd=REPO_ROOT)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    kept = faults()
    default = faults(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    print(f"page faults of a warm B0 pass at 256 x 256: {kept} (freed memory kept), {default} (glibc's defaults)")
    assert default > 1000 and kept < default / 10
