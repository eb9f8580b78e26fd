"""Training data: the processor's segmentation-map path (against HF's saved outputs) and the dataset reader."""

import json

import numpy as np
import pytest
from PIL import Image

import mininp_segformer as ms
from mininp_segformer.errors import ConfigError, ImageError, LabelError, SegformerError
from mininp_segformer.preprocessing import reduce_labels, resize_mask
from mininp_segformer.training.data import (Labels, check_dataset, colours_to_ids, holdout, open_dataset,
                                            read_labels, read_sample)
from tests.conftest import array_digest, load_fixture, smooth_image

# ----------------------------------------------------------------------------------------------------------------
# preprocess(..., segmentation_maps=...) == SegformerImageProcessorPil (fixture case s)

SEGMAP_NAMES = ["odd_41x67_to_64_reduce", "odd_41x67_to_29x48_keep", "pil_P_and_L_to_50x70_reduce",
                "default_512_keep"]


@pytest.mark.parametrize("name", SEGMAP_NAMES)
def test_segmentation_maps_equal_hf_exactly(name):
    ref, meta = load_fixture("m_segmentation_maps")
    case = next(c for c in meta["cases"] if c["name"] == name)
    images, masks = [], []
    for i, item in enumerate(case["images"]):
        images.append(smooth_image(item["seed"], item["height"], item["width"]))
        mask = ref[f"{name}.mask_{i}"]
        masks.append(Image.fromarray(mask, mode="L").convert("P") if item["mask"] == "P"
                     else Image.fromarray(mask, mode="L") if item["mask"] == "L" else mask)
    assert [array_digest(im) for im in images] == case["image_sha256"], "smooth_image changed"
    size = None if case["hf_size"] is None else (case["hf_size"]["height"], case["hf_size"]["width"])
    pixel_values, labels = ms.preprocess(images, size=size, segmentation_maps=masks,
                                         do_reduce_labels=case["do_reduce_labels"])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, ref[f"{name}.labels"])
    np.testing.assert_array_equal(pixel_values, ms.preprocess(images, size=size))  # the image path is unchanged


def test_reduce_labels_happens_before_the_resize():
    # 0 ("other") -> 255, k -> k - 1, 255 stays; reducing after a resize would give the same here, so the point
    # is the mapping and that the input is not modified (HF's reduce_label writes into its argument)
    mask = np.array([[0, 1, 2], [255, 3, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_labels(mask), [[255, 0, 1], [255, 2, 255]])
    assert mask[0, 0] == 0
    # NEAREST keeps ids: no value appears that is not in the input
    big = np.kron(np.arange(12).reshape(3, 4), np.ones((5, 5), dtype=np.int64))
    assert set(np.unique(resize_mask(big, (7, 11)))) <= set(range(12))
    assert resize_mask(np.array([[300, 2]]), (1, 4)).tolist() == [[300, 300, 2, 2]]  # 16-bit ids survive


@pytest.mark.parametrize("masks, error, message", [
    ([np.zeros((41, 67), np.uint8)] * 2, LabelError, "2 segmentation map"),
    ([np.zeros((40, 67), np.uint8)], LabelError, "40 x 67 but its image is 41 x 67"),
    ([np.zeros((41, 67), np.float32)], LabelError, "integer class ids"),
    ([np.full((41, 67), -1)], LabelError, "negative"),
    ([np.zeros((41, 67, 3), np.uint8)], LabelError, "colour-coded"),
    ([Image.new("RGB", (67, 41))], LabelError, "mode RGB"),
    (["/nonexistent/mask.png"], ImageError, "does not exist"),
])
def test_bad_segmentation_maps(masks, error, message):
    with pytest.raises(error, match=message):
        ms.preprocess(smooth_image(1, 41, 67), size=32, segmentation_maps=masks)


# ----------------------------------------------------------------------------------------------------------------
# Dataset layouts

def write_pair(image_dir, mask_dir, stem, mask, mode="P", suffix=".jpg", seed=0):
    """An image (smooth, JPEG or PNG) and its mask (PNG of `mode`) of the mask's size."""
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    h, w = mask.shape[:2]
    Image.fromarray(smooth_image(seed, h, w)).save(image_dir / f"{stem}{suffix}")
    img = Image.fromarray(mask) if mode == "RGB" else Image.fromarray(mask.astype(np.uint8), mode="L")
    (img.convert("P") if mode == "P" else img).save(mask_dir / f"{stem}.png")


def blocks(seed, h, w, high):
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, high, size=(-(-h // 4), -(-w // 4))), np.ones((4, 4), np.int64))[:h, :w]


def test_flat_layout_with_json_labels(tmp_path):
    masks = {"b": blocks(1, 30, 40, 3), "a": blocks(2, 25, 19, 3)}
    masks["a"][:5, :5] = 255
    for i, (stem, m) in enumerate(masks.items()):
        write_pair(tmp_path / "images", tmp_path / "annotations", stem, m, mode="P" if i else "L", seed=i)
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "sky", "1": "road", "2": "car"}))
    ds = open_dataset(tmp_path, labels=tmp_path / "id2label.json")
    assert len(ds) == 2 and [p.stem for p in ds.images] == ["a", "b"] and ds.split == "train"
    assert ds.labels.id2label == {0: "sky", 1: "road", 2: "car"} and ds.labels.colours is None
    image, mask = read_sample(ds, 0)
    assert image.shape == (25, 19, 3) and image.dtype == np.uint8 and mask.dtype == np.int64
    np.testing.assert_array_equal(mask, masks["a"])
    assert check_dataset(ds).sum() == 30 * 40 + 25 * 19 - 25
    with pytest.raises(SegformerError, match="one split"):
        open_dataset(tmp_path, split="validation")
    train, val = holdout(ds, 1, seed=3)  # a validation split made from the one split, seeded
    assert sorted(train.images + val.images) == sorted(ds.images) and len(val) == 1 and val.split == "validation"
    assert holdout(ds, 1, seed=3)[1].images == val.images
    with pytest.raises(SegformerError, match="from 1 to 1"):
        holdout(ds, 2)


def test_ade_layout_splits_and_reduce_labels(tmp_path):
    for split, seed in (("training", 3), ("validation", 4)):
        m = blocks(seed, 32, 48, 5)  # ADE style: 0 = other, k = class k - 1
        write_pair(tmp_path / "images" / split, tmp_path / "annotations" / split, f"ADE_{split}_1", m)
    labels = tmp_path / "config.json"  # a model's config.json works as a labels file
    labels.write_text(json.dumps({"model_type": "segformer", "id2label": {str(i): f"c{i}" for i in range(4)}}))
    train = open_dataset(tmp_path, "train", labels, reduce_labels=True)
    val = open_dataset(tmp_path, "val", labels, reduce_labels=True)
    assert train.images[0].parent.name == "training" and val.images[0].parent.name == "validation"
    _, mask = read_sample(val, 0)
    np.testing.assert_array_equal(mask, reduce_labels(blocks(4, 32, 48, 5)))
    with pytest.raises(LabelError, match="class id 4 .*reduce_labels=True"):  # without the reduction: 4 >= 4
        read_sample(open_dataset(tmp_path, "train", labels), 0)


DRONE_CSV = "name, r, g, b\nunlabeled, 0, 0, 0\npaved-area, 128, 64, 128\ndirt, 130, 76, 0\n"


def test_rgb_masks_through_a_class_csv(tmp_path):
    (tmp_path / "class_dict_seg.csv").write_text(DRONE_CSV)
    labels = read_labels(tmp_path / "class_dict_seg.csv")
    assert labels.id2label == {0: "unlabeled", 1: "paved-area", 2: "dirt"}
    ids = blocks(5, 20, 28, 3)
    write_pair(tmp_path / "images", tmp_path / "annotations", "001", labels.colours[ids], mode="RGB")
    _, mask = read_sample(open_dataset(tmp_path, labels=labels), 0)
    np.testing.assert_array_equal(mask, ids)
    # the same classes as an indexed PNG need no colours
    write_pair(tmp_path / "images", tmp_path / "annotations", "001", ids, mode="P")
    np.testing.assert_array_equal(read_sample(open_dataset(tmp_path, labels=labels), 0)[1], ids)


def test_a_colour_missing_from_the_csv_is_named(tmp_path):
    (tmp_path / "classes.csv").write_text(DRONE_CSV)
    rgb = read_labels(tmp_path / "classes.csv").colours[blocks(6, 12, 12, 3)]
    rgb[7, 9] = (1, 2, 3)
    write_pair(tmp_path / "images", tmp_path / "annotations", "x", rgb, mode="RGB")
    with pytest.raises(LabelError, match=r"x\.png has the colour \(1, 2, 3\) .* 1 pixel.* row 7, column 9"):
        read_sample(open_dataset(tmp_path, labels=tmp_path / "classes.csv"), 0)
    with pytest.raises(LabelError, match="colour-coded .*labels CSV"):  # RGB masks but no CSV
        read_sample(open_dataset(tmp_path), 0)
    with pytest.raises(LabelError, match=r"\(9, 9, 9\)"):
        colours_to_ids(np.full((2, 2, 3), 9, np.uint8), np.array([[0, 0, 0], [255, 255, 255]], np.uint8))


def test_bad_datasets(tmp_path):
    with pytest.raises(SegformerError, match="no images/ and annotations/"):
        open_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    with pytest.raises(SegformerError, match="holds no images"):
        open_dataset(tmp_path)
    write_pair(tmp_path / "images", tmp_path / "annotations", "a", blocks(7, 16, 16, 3))
    Image.fromarray(smooth_image(8, 16, 16)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(LabelError, match=r"lonely\.png has no mask .*annotations/lonely\.png"):
        open_dataset(tmp_path)
    Image.fromarray(np.zeros((15, 16), np.uint8)).save(tmp_path / "annotations" / "lonely.png")
    ds = open_dataset(tmp_path, labels=Labels({0: "a", 1: "b", 2: "c"}))
    with pytest.raises(LabelError, match=r"lonely\.png is 15 x 16 but its image .*lonely\.png is 16 x 16"):
        read_sample(ds, 1)
    with pytest.raises(LabelError, match="class id 2 .*3 classes|class id 2"):
        read_sample(open_dataset(tmp_path, labels=Labels({0: "a", 1: "b"})), 0)
    (tmp_path / "annotations" / "lonely.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"lonely\.png is not a readable image"):
        check_dataset(ds)
    Image.fromarray(smooth_image(8, 16, 16)).save(tmp_path / "images" / "a.png")  # a.jpg and a.png
    with pytest.raises(SegformerError, match="same stem"):
        open_dataset(tmp_path)
    with pytest.raises(SegformerError, match="unknown split"):
        open_dataset(tmp_path, split="test")


@pytest.mark.parametrize("text, suffix, message", [
    ("name,r,g\nsky,1,2\n", ".csv", "header"),
    ("name,r,g,b\n", ".csv", "no class"),
    ("name,r,g,b\nsky,1,2,300\n", ".csv", "row 2"),
    ("name,r,g,b\nsky,1,2,3\nsea,1,2,3\n", ".csv", r"\(1, 2, 3\) of 'sea' is also that of 'sky'"),
    ('{"0": "a", "2": "b"}', ".json", "class ids 0..1"),
    ('["a", "b"]', ".json", "JSON object"),
    ("{", ".json", "not valid JSON"),
])
def test_bad_labels_files(tmp_path, text, suffix, message):
    path = tmp_path / f"labels{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_labels(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_labels(tmp_path / "missing.json")
