"""Shared helpers for the parity tests (and the input generators that tests/make_fixtures.py uses too).

Nothing here imports torch or transformers: the tests compare mininp_segformer against the committed `.npz`
fixtures in tests/fixtures/, which tests/make_fixtures.py wrote from Hugging Face transformers. Everything random
(weights, pixel values, logits, synthetic images) is regenerated here from the seeds recorded in each fixture, with
the very same NumPy calls the fixture script used; a SHA-256 digest stored beside each input proves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES_DIR = TESTS_DIR / "fixtures"
REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / "shared"  # data beside the repo (see ../shared/README.md)

WEIGHT_STATS_FIXTURE = "b0_ade_weight_stats.json"
PHOTOS = {
    "coco": "coco_000000039769.png",
    "cityscapes": "cityscapes_street_demo.png",
    "ade": "ADE_train_00000001.jpg",
}


# ----------------------------------------------------------------------------------------------------------------
# Deterministic inputs. The fixture script imports these functions, so both sides make the same arrays.
# ----------------------------------------------------------------------------------------------------------------

def random_pixel_values(seed: int, shape) -> np.ndarray:
    """Standard-normal float32 `pixel_values`, e.g. shape (B, 3, H, W)."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def random_labels(seed: int, shape, num_labels: int, ignore_index: int = 255) -> np.ndarray:
    """int64 class ids `(B, H, W)` in [0, num_labels) -- 0 or 1 when num_labels == 1, HF's binary case -- with
    ignored pixels: a rectangle per image (rows H/4..H/2, columns W/3..W/2) and 5 % scattered."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(num_labels, 2), tuple(shape), dtype=np.int64)
    b, h, w = labels.shape
    labels[:, h // 4 : h // 2, w // 3 : w // 2] = ignore_index
    labels[rng.random(labels.shape) < 0.05] = ignore_index
    return labels


N_GRAD_SAMPLES = 1024  # gradient entries a fixture keeps of a tensor it does not store whole


def grad_sample_index(size: int, k: int = N_GRAD_SAMPLES) -> np.ndarray:
    """The flat indices of a tensor of `size` entries whose gradients a fixture stores: all of them when
    size <= 2k, else k spread over the tensor by a multiplicative hash (2654435761 is prime, so they are distinct),
    the same on every machine and NumPy version."""
    if size <= 2 * k:
        return np.arange(size)
    return np.sort(np.arange(k, dtype=np.int64) * 2654435761 % size)


def random_logits(seed: int, shape, scale: float = 3.0) -> np.ndarray:
    """Normal float32 logits with std `scale`."""
    return (np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32) * np.float32(scale))


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 RGB image: a coarse random grid, linearly interpolated, plus mild noise."""
    rng = np.random.default_rng(seed)
    gh, gw = max(2, height // 8), max(2, width // 8)
    coarse = rng.uniform(0.0, 255.0, size=(gh, gw, 3))
    ys = np.linspace(0.0, gh - 1.0, height)
    xs = np.linspace(0.0, gw - 1.0, width)
    rows = np.stack([np.stack([np.interp(xs, np.arange(gw), coarse[r, :, c]) for c in range(3)], axis=-1)
                     for r in range(gh)])  # (gh, W, 3)
    img = np.stack([np.stack([np.interp(ys, np.arange(gh), rows[:, x, c]) for c in range(3)], axis=-1)
                    for x in range(width)], axis=1)  # (H, W, 3)
    img = img + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_segmentation_pair(seed: int, height: int, width: int, num_labels: int, ignore_index: int = 255,
                             ignore_fraction: float = 0.1, error_fraction: float = 0.4):
    """(prediction, label map), both (H, W) uint8, for the metric tests.

    The label map is made of 8 x 8 blocks of classes 0..num_labels-3 with `ignore_fraction` of its pixels set to
    `ignore_index`; the prediction copies it, then `error_fraction` of its pixels (and all ignored ones) get a
    random class in 0..num_labels-2. So class num_labels-2 can only be predicted, and num_labels-1 is in neither.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_labels - 2, size=(-(-height // 8), -(-width // 8)))
    label = np.kron(coarse, np.ones((8, 8), dtype=np.int64))[:height, :width]
    label[rng.random((height, width)) < ignore_fraction] = ignore_index
    pred = label.copy()
    wrong = (rng.random((height, width)) < error_fraction) | (label == ignore_index)
    pred[wrong] = rng.integers(0, num_labels - 1, size=int(wrong.sum()))
    return pred.astype(np.uint8), label.astype(np.uint8)


def perturbed_ade_prediction(annotation: np.ndarray, seed: int, num_labels: int = 150, shift=(3, -5),
                             noise: float = 0.05) -> np.ndarray:
    """A deterministic, imperfect prediction for an ADE annotation (mode L: 0 = other, v = class v - 1).

    The classes (v - 1) are shifted by `shift` pixels (rows, columns; wrapping around) and `noise` of the pixels,
    plus those that were "other", get a random class of 0..num_labels-1. Returns (H, W) uint8.
    """
    rng = np.random.default_rng(seed)
    classes = np.where(annotation == 0, 255, annotation.astype(np.int64) - 1)
    pred = np.roll(classes, shift, axis=(0, 1))
    wrong = (pred == 255) | (rng.random(annotation.shape) < noise)
    pred[wrong] = rng.integers(0, num_labels, size=int(wrong.sum()))
    return pred.astype(np.uint8)


def array_digest(*arrays) -> str:
    """SHA-256 over shapes, dtypes and bytes: proves that a test regenerated exactly the fixture's input."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_digest(state: dict) -> str:
    """SHA-256 of a state dict's float tensors (sorted by key; torch bookkeeping like num_batches_tracked left out)."""
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith("num_batches_tracked"):
            continue
        a = np.ascontiguousarray(state[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_weight_stats() -> dict:
    """{hub key: {"mean", "std"}} of the real B0-ADE checkpoint, from the committed fixture."""
    d = json.loads((FIXTURES_DIR / WEIGHT_STATS_FIXTURE).read_text(encoding="utf-8"))
    return d["tensors"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures on disk
# ----------------------------------------------------------------------------------------------------------------

def load_fixture(name: str) -> tuple[dict, dict]:
    """(arrays, meta) of tests/fixtures/<name>.npz; `meta` is the JSON the script stored under the key "meta"."""
    path = FIXTURES_DIR / f"{name}.npz"
    if not path.exists():
        pytest.fail(f"fixture {path} is missing; regenerate it with `python tests/make_fixtures.py` (needs torch + "
                    "transformers)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    return arrays, meta


BACKENDS = ("numba", "numpy")  # Segformer(backend=...): the numba kernels, and the plain-NumPy functions


def build_model(meta: dict, decoder: str = "fused", backend: str = "numba", dtype: str = "float32"):
    """Our Segformer with the weights the fixture script gave HF: same config, head, seed (and statistics)."""
    from mininp_segformer import Segformer, SegformerConfig

    config = SegformerConfig.from_dict(meta["config"])
    state = weights_for(meta)
    return Segformer(config, state, decoder=decoder, backend=backend, dtype=dtype), config, state


def weights_for(meta: dict) -> dict:
    """random_state_dict(...) as recorded in `meta["weights"]`, checked against the fixture's digest."""
    from mininp_segformer import SegformerConfig
    from mininp_segformer.weights import random_state_dict

    w = meta["weights"]
    config = SegformerConfig.from_dict(meta["config"])
    stats = load_weight_stats() if w.get("stats") else None
    state = random_state_dict(config, w["head"], seed=w["seed"], stats=stats)
    assert state_digest(state) == w["sha256"], (
        f"random_state_dict(config, {w['head']!r}, seed={w['seed']}, stats={w.get('stats')}) no longer makes the "
        "weights the fixtures were generated with (weights.py or NumPy's generator changed): regenerate the fixtures "
        "with `python tests/make_fixtures.py`"
    )
    return state


def check_input_digest(name: str, array: np.ndarray, meta: dict, key: str = "input_sha256") -> None:
    assert array_digest(array) == meta[key], (
        f"{name}: the input regenerated from its seed differs from the fixture's (NumPy's generator changed?); "
        "regenerate the fixtures with `python tests/make_fixtures.py`"
    )


# ----------------------------------------------------------------------------------------------------------------
# Comparisons. Every one prints "max|err| <name> = ..." (run pytest with -s to see them).
#
# Every tolerance is scaled to the magnitude of what it compares: BLAS kernels (AVX2, AVX-512), SIMD widths and fused
# multiply-adds change the order and rounding of float32 sums from one CPU to the next, so only a bound that follows
# from float32 arithmetic itself holds on every x86-64 CPU. CI checks this by running the tests a second time with
# OPENBLAS_CORETYPE=Sandybridge NUMBA_CPU_NAME=generic.
# ----------------------------------------------------------------------------------------------------------------

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23, the gap between 1 and the next float32


def float32_sum_bound(abs_sum, n_terms: int):
    """The worst-case rounding error of a float32 sum of `n_terms` terms whose absolute values add up to `abs_sum`.

    Higham, *Accuracy and Stability of Numerical Algorithms* (2002), eq. 3.5: |fl(x.y) - x.y| <= gamma_n |x|.|y|,
    gamma_n = n u / (1 - n u), u = eps / 2 -- for any order of summation, with or without fused multiply-adds. So a
    check against it holds whichever BLAS kernel or SIMD width a CPU gets. (The float64 reference's own error is
    2**29 times smaller.)
    """
    u = F32_EPS / 2
    return n_terms * u / (1 - n_terms * u) * np.asarray(abs_sum, dtype=np.float64)


def assert_within(name: str, ours, ref, bound) -> float:
    """Assert |ours - ref| <= bound element by element (`bound` an array or a scalar); prints the worst ratio."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} (ours) != {ref.shape} (reference)"
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), diff.shape)
    ratio = float(np.max(diff / np.maximum(bound, np.finfo(np.float64).tiny)))
    print(f"max|err|/bound {name} = {ratio:.3f}  (max|err| {diff.max():.3e}, shape {ref.shape})")
    assert (diff <= bound).all(), (f"{name}: error above its bound at {int((diff > bound).sum())} of {diff.size} "
                                   f"elements, worst {ratio:.3g} x the bound")
    return ratio

def assert_close(name: str, ours, ref, rtol_of_max: float = 1e-4, atol: float | None = None,
                 dtype=np.float32) -> float:
    """Assert max|ours - ref| <= rtol_of_max * max|ref| (or <= atol if given); same shape; prints the error.

    `dtype`: the dtype `ours` must have (None: don't check). Returns the max absolute error.
    """
    assert ours is not None, f"{name}: ours is None"
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} (ours) != {ref.shape} (reference)"
    if dtype is not None:
        assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} (ours), expected {np.dtype(dtype)}"
    assert ref.size > 0, f"{name}: empty reference"
    assert np.isfinite(ours).all(), f"{name}: ours has NaN/inf"
    ref64 = ref.astype(np.float64)
    diff = np.abs(ours.astype(np.float64) - ref64)
    err = float(diff.max())
    scale = float(np.abs(ref64).max())
    tol = atol if atol is not None else rtol_of_max * scale
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    print(f"max|err| {name} = {err:.3e}  (tol {tol:.1e}, max|ref| {scale:.4g}, shape {ref.shape}, "
          f"worst at {tuple(int(i) for i in where)})")
    assert err <= tol, (f"{name}: max|err| {err:.3e} > tol {tol:.1e} (max|ref| {scale:.4g}); worst at index "
                        f"{tuple(int(i) for i in where)}: ours {ours[where]!r}, reference {ref[where]!r}")
    return err


def bilinear_at(scores: np.ndarray, size, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """`scores: (C, h, w)` bilinearly resized to `size` (torch, align_corners=False) at output pixels (ys, xs) only.

    Float64 and independent of mininp_segformer: used to look at the logits where two argmax maps disagree
    without resizing a whole (150, H, W) stack. Returns (C, len(ys)).
    """
    c, h, w = scores.shape
    out_h, out_w = size

    def taps(i, n_in, n_out):
        x = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, x - i0

    y0, y1, ty = taps(np.asarray(ys, np.float64), h, out_h)
    x0, x1, tx = taps(np.asarray(xs, np.float64), w, out_w)
    s = scores.astype(np.float64)
    top = s[:, y0, x0] * (1 - tx) + s[:, y0, x1] * tx
    bottom = s[:, y1, x0] * (1 - tx) + s[:, y1, x1] * tx
    return top * (1 - ty) + bottom * ty


def assert_maps_match(name: str, ours, ref, scores=None, tie_atol: float = 1e-4) -> int:
    """Argmax maps must be identical except where our two competing scores are within `tie_atol` of each other.

    `scores`: a function (ys, xs) -> (C, n) of OUR scores (logits, resized as the map was) at those pixels; where
    the maps disagree, |score[ours] - score[ref]| must be <= tie_atol (a near tie), and ref must be our top-2.
    Prints and returns the number of disagreeing pixels.
    """
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} (ours) != {ref.shape} (reference)"
    assert np.issubdtype(ours.dtype, np.integer), f"{name}: map dtype {ours.dtype} is not integer"
    ys, xs = np.nonzero(ours != ref)
    n = len(ys)
    worst = 0.0
    if n:
        assert scores is not None, f"{name}: {n} pixels disagree and no scores were given to check for near ties"
        s = scores(ys, xs)
        idx = np.arange(n)
        gap = s[ours[ys, xs], idx] - s[ref[ys, xs], idx]  # >= 0 if ours is our argmax
        second = np.sort(s, axis=0)[-2]
        worst = float(np.abs(gap).max())
        bad = (np.abs(gap) > tie_atol) | (s[ref[ys, xs], idx] < second - tie_atol)
        print(f"map {name}: {n} of {ours.size} pixels differ, all near ties? {not bad.any()} "
              f"(largest score gap there {worst:.2e}, tie tolerance {tie_atol:.0e})")
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {n} disagreeing pixels are not near ties (score gap up to {worst:.3e} > "
            f"{tie_atol:.0e}); first at (y, x) = ({int(ys[bad][0])}, {int(xs[bad][0])}): ours "
            f"{int(ours[ys[bad][0], xs[bad][0]])}, reference {int(ref[ys[bad][0], xs[bad][0]])}")
    else:
        print(f"map {name}: identical ({ours.size} pixels, {len(np.unique(ref))} classes present)")
    return n


# ----------------------------------------------------------------------------------------------------------------
# pytest fixtures
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (the photos). Absent: fail on CI (env CI set), else skip with the reason."""
    if (SHARED_DIR / "images").is_dir():
        return SHARED_DIR
    if os.environ.get("CI"):
        pytest.fail(f"../shared is required in CI: {SHARED_DIR} (with images/) was not found beside the repo")
    pytest.skip(f"{SHARED_DIR} not found: the photo parity tests read ../shared/images/ (clone the repo beside "
                "shared/ to run them)")


@pytest.fixture()
def memory_limit():
    """`memory.set_max_memory` for one test (e.g. `memory_limit("8G")`), back to the default after it."""
    from mininp_segformer import memory

    yield memory.set_max_memory
    memory.set_max_memory(None)


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the block if it runs longer than `seconds` (a hang guard, not a speed test)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
