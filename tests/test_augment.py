"""NVlabs' training augmentations: mmseg's semantics (order of draws, retries, quirks), OpenCV's HSV, and image and
mask staying aligned through every transform; the batches, deterministic and resumable from (seed, step)."""

from itertools import islice

import numpy as np
import pytest
from PIL import Image

from mininp_segformer.errors import SegformerError
from mininp_segformer.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocess
from mininp_segformer.training.augment import (Augment, ade20k_augment, batches, hsv_to_rgb, pad,
                                               photometric_distortion, random_crop, random_flip, random_resize,
                                               rgb_to_hsv, sample_index, train_sample)
from mininp_segformer.training.data import open_dataset, read_sample

# colours that OpenCV's 8-bit RGB -> HSV -> RGB round trip keeps exactly (most colours move a level or two)
PALETTE = np.array([[255, 0, 0], [0, 128, 64], [0, 0, 191], [255, 255, 0], [128, 128, 128], [191, 191, 255]],
                   dtype=np.uint8)


NEUTRAL = dict(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)


class ScriptedRng:
    """Stands in for np.random.Generator: returns scripted values and records each call (name, args)."""

    def __init__(self, *values):
        self.values, self.calls = list(values), []

    def _next(self, name, *args):
        self.calls.append((name, args))
        return self.values.pop(0)

    def integers(self, *args):
        return self._next("integers", *args)

    def uniform(self, *args):
        return self._next("uniform", *args)

    def random(self, *args):
        return self._next("random", *args)


def scene(seed, h=60, w=90, block=6):
    """(image, mask): block x block squares of classes 0..5, each class painted its PALETTE colour -- a mask
    derivable from the image."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 6, size=(-(-h // block), -(-w // block))), np.ones((block, block), np.int64))
    mask = mask[:h, :w]
    return PALETTE[mask], mask


def assert_aligned(image, mask, min_interior=0.3, radius=1):
    """Where the mask is uniform over a (2 radius + 1)^2 neighbourhood (away from class edges, which bilinear
    resizing blends over about the scale factor's pixels, and from padding), the image has the colour of the
    mask's class."""
    m = np.pad(mask, radius, constant_values=-1)  # what lies past the border is unknown: not interior
    same = np.ones(mask.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= m[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    interior = same & (mask != 255)
    assert interior.mean() >= min_interior, f"only {interior.mean():.0%} of the pixels are interior"
    np.testing.assert_array_equal(image[interior], PALETTE[mask[interior]])


# ----------------------------------------------------------------------------------------------------------------
# OpenCV's 8-bit HSV (values recorded with cv2.cvtColor, opencv-python-headless 4.10 and 5.0)

CV2_RGB2HSV = {(255, 0, 0): (0, 255, 255), (0, 255, 0): (60, 255, 255), (0, 0, 255): (120, 255, 255),
               (200, 99, 99): (0, 129, 200), (12, 200, 130): (79, 240, 200), (250, 3, 128): (165, 252, 250),
               (7, 7, 7): (0, 0, 7), (1, 2, 3): (105, 170, 3), (255, 254, 0): (30, 255, 255),
               (100, 50, 51): (179, 128, 100)}
CV2_HSV2RGB = {(0, 1, 1): (1, 0, 0), (0, 128, 200): (200, 99, 99), (10, 77, 99): (99, 79, 69),
               (179, 255, 255): (255, 0, 8), (45, 200, 13): (7, 13, 2), (1, 90, 85): (85, 56, 55),
               (120, 255, 255): (0, 0, 255), (90, 0, 77): (77, 77, 77)}


def test_hsv_equals_opencv():
    rgb = np.array(list(CV2_RGB2HSV), np.uint8)
    np.testing.assert_array_equal(rgb_to_hsv(rgb), list(CV2_RGB2HSV.values()))
    hsv = np.array(list(CV2_HSV2RGB), np.uint8)  # (0, 1, 1) -> 1, 0, 0: truncated; (1, 90, 85): the fused 1 - s f
    np.testing.assert_array_equal(hsv_to_rgb(hsv), list(CV2_HSV2RGB.values()))
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert np.abs(hsv_to_rgb(rgb_to_hsv(image)).astype(int) - image).max() <= 8  # a lossy round trip, but close


# ----------------------------------------------------------------------------------------------------------------
# PhotoMetricDistortion: mmseg's order of draws and its modes

def test_photometric_contrast_first_in_mode_1():
    image, mask = scene(1)
    # brightness: yes, +10; mode 1; contrast: yes, x1.5; saturation: no; hue: no
    rng = ScriptedRng(1, 10.0, 1, 1, 1.5, 0, 0)
    out, out_mask = photometric_distortion(image, mask, rng)
    expected = np.clip(np.clip(image.astype(np.float32) + 10, 0, 255).astype(np.uint8) * np.float32(1.5), 0, 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert out_mask is mask and not rng.values
    assert rng.calls == [("integers", (2,)), ("uniform", (-32, 32)), ("integers", (2,)), ("integers", (2,)),
                         ("uniform", (0.5, 1.5)), ("integers", (2,)), ("integers", (2,))]


def test_photometric_hue_then_contrast_last_in_mode_0():
    red = np.zeros((4, 5, 3), np.uint8)
    red[..., 0] = 255
    # brightness: no; mode 0; saturation: no; hue: yes, +60 units (120 degrees); contrast: yes, x0.5
    rng = ScriptedRng(0, 0, 0, 1, 60, 1, 0.5)
    out, _ = photometric_distortion(red, red[..., 0], rng, hue_delta=18)
    np.testing.assert_array_equal(out[0, 0], [0, 127, 0])  # red -> green, then halved (truncated)
    assert ("integers", (-18, 18)) in rng.calls  # numpy's randint(-18, 18): -18..17
    # hue wraps modulo 180; saturation scales S
    rng = ScriptedRng(0, 0, 0, 1, 17, 0)
    hue = rgb_to_hsv(photometric_distortion(np.full((1, 1, 3), [200, 99, 99], np.uint8), None, rng)[0])
    assert hue[0, 0, 0] in (16, 17, 18)  # (0 + 17) % 180, give or take the 8-bit round trip
    rng = ScriptedRng(0, 0, 1, 0.5, 0, 0)
    grey = photometric_distortion(np.full((1, 1, 3), [200, 99, 99], np.uint8), None, rng)[0]
    assert rgb_to_hsv(grey)[0, 0, 1] in (64, 65)  # S 129 x 0.5 = 64 (truncated), give or take the round trip


def test_photometric_is_seeded_and_neutral_settings_change_nothing():
    image, mask = scene(2)
    a = photometric_distortion(image, mask, np.random.default_rng(5))[0]
    b = photometric_distortion(image, mask, np.random.default_rng(5))[0]
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(photometric_distortion(image, mask, np.random.default_rng(s))[0], a)
               for s in range(6, 10))
    for seed in range(5):  # whenever a coin says yes, the HSV round trip runs, as in mmseg; PALETTE survives it
        same = photometric_distortion(image, mask, np.random.default_rng(seed), **NEUTRAL)[0]
        np.testing.assert_array_equal(same, image)


# ----------------------------------------------------------------------------------------------------------------
# Geometry: each keeps image and mask aligned

def test_random_resize_draws_mmseg_scale_and_keeps_alignment():
    image, mask = scene(3)  # 60 x 90
    rng = ScriptedRng(0.5)  # ratio 0.5 * (2 - 0.5) + 0.5 = 1.25: scale (2560, 640); 60 x 90 -> 640 x 960
    big_image, big_mask = random_resize(image, mask, rng, scale=(2048, 512), ratio_range=(0.5, 2.0))
    assert big_image.shape == (640, 960, 3) and big_mask.shape == (640, 960)
    assert_aligned(big_image, big_mask, radius=6)  # 10.7 x larger
    small = random_resize(image, mask, ScriptedRng(0.0), scale=(64, 16))  # ratio 0.5: (32, 8): 8 x 12
    assert small[0].shape == (8, 12, 3)
    for seed in range(3):
        assert_aligned(*random_resize(image, mask, np.random.default_rng(seed), scale=(360, 90)))


def test_random_crop_retries_until_no_class_dominates():
    mask = np.zeros((10, 40), np.int64)
    mask[:, :5] = 1  # only crops starting at column 0..2 hold class 1 in more than a quarter
    mask[:, 36:] = 255
    image = PALETTE[np.minimum(mask, 5)]
    rng = ScriptedRng(0, 20, 0, 25, 0, 1)  # two crops of class 0 only, then one at x = 1
    _, m = random_crop(image, mask, rng, (10, 10), cat_max_ratio=0.75)
    np.testing.assert_array_equal(m, mask[:, 1:11])
    rng = ScriptedRng(*[0, 20] * 11)  # never satisfied: the 11th draw is kept
    random_crop(image, mask, rng, (10, 10), cat_max_ratio=0.75)
    assert not rng.values
    # ignored pixels are not counted: columns 30..39 hold class 0 (6 columns) and 255 (4): one class -> retry
    rng = ScriptedRng(0, 30, 0, 2)
    assert random_crop(image, mask, rng, (10, 10), cat_max_ratio=0.75)[1][0, 0] == 1
    rng = ScriptedRng(0, 30)  # cat_max_ratio 1: no retry
    assert random_crop(image, mask, rng, (10, 10), cat_max_ratio=1.0)[1].shape == (10, 10)
    # smaller than the crop: the whole image; the offsets are drawn from [0, 0]
    rng = ScriptedRng(0, 0)
    out_image, out_mask = random_crop(image, mask, rng, (16, 50), cat_max_ratio=1.0)
    assert out_image.shape == (10, 40, 3) and rng.calls == [("integers", (0, 1)), ("integers", (0, 1))]
    for seed in range(3):
        assert_aligned(*random_crop(*scene(seed), np.random.default_rng(seed), (32, 32)))


def test_flip_and_pad():
    image, mask = scene(4)
    flipped = random_flip(image, mask, ScriptedRng(0.49), prob=0.5)
    np.testing.assert_array_equal(flipped[1], mask[:, ::-1])
    assert_aligned(*flipped)
    assert random_flip(image, mask, ScriptedRng(0.5), prob=0.5)[1] is mask
    padded_image, padded_mask = pad(image, mask, (64, 100))
    assert padded_image.shape == (64, 100, 3) and padded_mask.shape == (64, 100)
    assert (padded_image[60:] == 0).all() and (padded_mask[:, 90:] == 255).all()
    np.testing.assert_array_equal(padded_mask[:60, :90], mask)
    assert_aligned(padded_image, padded_mask)
    assert pad(image, mask, (30, 30))[0].shape == image.shape  # never cropped


@pytest.mark.parametrize("seed", range(4))
def test_the_whole_pipeline_keeps_image_and_mask_aligned(seed):
    image, mask = scene(seed, 70, 110, block=14)
    aug = Augment(crop_size=(48, 64), scale=(220, 55), **NEUTRAL)
    x, labels = train_sample(image, mask, np.random.default_rng(seed), aug)
    assert x.shape == (3, 48, 64) and x.dtype == np.float32 and labels.shape == (48, 64) and labels.dtype == np.int64
    rgb = np.rint((x.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255)
    padded = labels == 255
    np.testing.assert_allclose(x[:, padded], 0)  # padded after Normalize: 0 = the mean colour
    assert_aligned(np.clip(rgb, 0, 255).astype(np.uint8), labels, min_interior=0.1, radius=2)


def test_augment_values_and_ade_defaults():
    assert Augment() == ade20k_augment(512)
    assert ade20k_augment((256, 320)).scale == (1280, 256)
    with pytest.raises(SegformerError, match="crop"):
        ade20k_augment(0)


# ----------------------------------------------------------------------------------------------------------------
# Batches

@pytest.fixture
def tiny_dataset(tmp_path):
    for i in range(5):
        image, mask = scene(10 + i, 40 + 4 * i, 56)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "annotations").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp_path / "annotations" / f"{i}.png")
    return open_dataset(tmp_path)


def test_batches_are_a_function_of_seed_and_step(tiny_dataset):
    run = list(islice(batches(tiny_dataset, 2, seed=7, crop=32), 4))
    for x, y in run:
        assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and y.shape == (2, 32, 32) and y.dtype == np.int64
    resumed = list(islice(batches(tiny_dataset, 2, seed=7, crop=32, start_step=2), 2))
    for (x, y), (rx, ry) in zip(run[2:], resumed):
        np.testing.assert_array_equal(rx, x)
        np.testing.assert_array_equal(ry, y)
    other = next(batches(tiny_dataset, 2, seed=8, crop=32))
    assert not np.array_equal(other[0], run[0][0])
    # each epoch visits every sample once, in its own order
    epochs = [[sample_index(5, 7, e * 5 + k) for k in range(5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and epochs[0] != epochs[1]


def test_batches_without_augmentation_are_the_processor(tiny_dataset):
    x, y = next(batches(tiny_dataset, 3, seed=1, crop=(24, 40), augment=False))
    first = sample_index(len(tiny_dataset), 1, 0)
    image, mask = read_sample(tiny_dataset, first)
    ref_x, ref_y = preprocess(image, (24, 40), segmentation_maps=mask)
    np.testing.assert_array_equal(x[0], ref_x[0])
    np.testing.assert_array_equal(y[0], ref_y[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch size"), (dict(seed=-1), "seed"),
    (dict(aug=Augment(crop_size=(16, 16))), "differ"),
])
def test_bad_batch_settings(tiny_dataset, kwargs, message):
    args = dict(batch_size=2, seed=0, crop=32) | kwargs
    with pytest.raises(SegformerError, match=message):
        batches(tiny_dataset, **args)  # at once, not at the first batch
