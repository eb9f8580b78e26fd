"""mininp_segformer.tools.metrics against an independent torch implementation (tests/make_fixtures.py, case j)."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from mininp_segformer.tools.metrics import evaluate, intersect_and_union, read_label_map, reduce_zero_label
from mininp_segformer.tools.viz import colorize
from tests.conftest import array_digest, load_fixture, perturbed_ade_prediction, random_segmentation_pair

METRICS = ("mean_iou", "per_class_iou", "pixel_accuracy", "mean_accuracy", "per_class_accuracy")


def compare(prefix: str, ours: dict, ref: dict) -> float:
    """Same NaN pattern, max |ours - ref| over every metric <= 1e-12; returns that error (printed)."""
    worst = 0.0
    for key in METRICS:
        a, b = np.atleast_1d(np.asarray(ours[key], dtype=np.float64)), np.atleast_1d(ref[f"{prefix}__{key}"])
        assert a.shape == b.shape, key
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{key}: NaN where the reference has none (or vice versa)"
        ok = ~np.isnan(b)
        worst = max(worst, float(np.abs(a[ok] - b[ok]).max(initial=0.0)))
    print(f"max|err| metrics {prefix} = {worst:.2e}")
    assert worst <= 1e-12
    return worst


def areas(pairs, num_labels, **kw):
    return sum(np.stack(intersect_and_union(p, lab, num_labels, **kw)) for p, lab in pairs)


def test_random_pairs_match_the_torch_reference():
    ref, meta = load_fixture("j_metrics")
    m = meta["random"]
    pairs = [random_segmentation_pair(seed, h, w, m["num_labels"]) for seed, h, w in m["pairs"]]
    assert array_digest(*[a for p in pairs for a in p]) == m["input_sha256"], "regenerate with make_fixtures.py j"
    ours = evaluate([p for p, _ in pairs], [lab for _, lab in pairs], m["num_labels"])
    compare("random", ours, ref)
    got = areas(pairs, m["num_labels"])
    for i, key in enumerate(("area_intersect", "area_union", "area_pred", "area_label")):
        np.testing.assert_array_equal(got[i], ref[f"random__{key}"])
    # the pairs were made so that one class is only predicted (IoU 0, accuracy NaN) and one is in neither (NaN)
    assert ours["per_class_iou"][-2] == 0 and np.isnan(ours["per_class_accuracy"][-2])
    assert np.isnan(ours["per_class_iou"][-1])


def test_ade_annotation_matches_the_torch_reference(shared_dir):
    ref, meta = load_fixture("j_metrics")
    m = meta["ade"]
    path = shared_dir / "images" / "ADE_train_00000001_seg.png"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m["annotation_sha256"]
    annotation = read_label_map(path)
    pred = perturbed_ade_prediction(np.asarray(Image.open(path)), m["seed"])
    assert array_digest(pred) == m["prediction_sha256"]
    ours = evaluate(pred, annotation, 150, reduce_labels=True)
    compare("ade", ours, ref)
    print(f"ADE annotation vs its perturbed prediction: mIoU {ours['mean_iou']:.4f}, "
          f"pixel accuracy {ours['pixel_accuracy']:.4f}")


def test_by_hand():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    label = np.array([[0, 1, 2], [2, 255, 1]])
    s = evaluate(pred, label, 4)
    # the ignored pixel (1, 1) is left out. class 0: I 1, P 2, L 1 -> IoU 1/2; class 1: I 1, P 2, L 2 -> 1/3;
    # class 2: I 1, P 1, L 2 -> 1/2; class 3: in neither -> NaN, not in the mean
    np.testing.assert_allclose(s["per_class_iou"][:3], [1 / 2, 1 / 3, 1 / 2])
    assert np.isnan(s["per_class_iou"][3])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(s["per_class_accuracy"][:3], [1.0, 0.5, 0.5])
    assert s["mean_accuracy"] == pytest.approx(2 / 3)


def test_reduce_zero_label():
    np.testing.assert_array_equal(reduce_zero_label(np.array([0, 1, 2, 150, 255])), [255, 0, 1, 149, 255])


def test_streams_and_paths(tmp_path):
    pairs = [random_segmentation_pair(s, 20, 30, 6) for s in (1, 2)]
    whole = evaluate([p for p, _ in pairs], [lab for _, lab in pairs], 6)
    paths = []
    for i, (p, lab) in enumerate(pairs):
        colorize(p, 6).save(tmp_path / f"p{i}.png")
        Image.fromarray(lab).save(tmp_path / f"l{i}.png")
        paths.append((tmp_path / f"p{i}.png", tmp_path / f"l{i}.png"))
    streamed = evaluate((p for p, _ in paths), (lab for _, lab in paths), 6)
    for key in METRICS:
        np.testing.assert_array_equal(whole[key], streamed[key])


def test_bad_input():
    p, lab = random_segmentation_pair(3, 10, 12, 5)
    with pytest.raises(ValueError, match="10 x 12 but its label map is 10 x 11"):
        evaluate(p, lab[:, :11], 5)
    with pytest.raises(ValueError, match="prediction holds class id 3, outside 0..2"):
        evaluate(p, lab, 3)
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        evaluate(p, lab, 0)
    with pytest.raises(ValueError, match="integer class ids"):
        evaluate(p.astype(np.float32), lab, 5)
    with pytest.raises(ValueError, match="more labels than predictions"):
        evaluate([p], [lab, lab], 5)
    with pytest.raises(ValueError, match="no predictions"):
        evaluate([], [], 5)
    with pytest.raises(ValueError, match="2-D"):
        evaluate(p[0], lab[0], 5)
    with pytest.raises(ValueError, match=r"outside 0\.\.4 .*ADE annotations need reduce_labels=True"):
        evaluate(p, np.full_like(lab, 200), 5)
    batched, single = evaluate(p[None], lab[None], 5), evaluate(p, lab, 5)  # an (N, H, W) batch is a sequence
    for key in METRICS:
        np.testing.assert_array_equal(batched[key], single[key])
