"""The bilinear resize's adjoint and HF's SegFormer losses, with their gradients, in float64 (no torch).

Each backward against central finite differences (max |analytic - numeric| / max |numeric| <= 1e-6), each loss
against a direct whole-array formula written plainly here, and the band-wise losses against the whole-array ones.
"""

import numpy as np
import pytest

from mininp_segformer.errors import ConfigError, LabelError, SegformerError
from mininp_segformer.nn import layers
from mininp_segformer.nn.loss import classification_loss, infer_problem_type, semantic_segmentation_loss

FD_TOL = 1e-6


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar `f(x)` with respect to every element of `x` (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f(x)
        x[i] = old - eps
        down = f(x)
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def rel_error(analytic, numeric):
    return np.max(np.abs(analytic - numeric)) / np.max(np.abs(numeric))


def assert_grad(name, analytic, f, x):
    numeric = numerical_grad(f, x)
    assert analytic.shape == x.shape and analytic.dtype == x.dtype, name
    err = rel_error(analytic, numeric)
    assert err <= FD_TOL, f"{name}: relative error {err:.2e} > {FD_TOL}"


# ----------------------------------------------------------------------------------------------------------------
# The adjoint of the bilinear resize
# ----------------------------------------------------------------------------------------------------------------

RESIZES = [((3, 4), (7, 10)),    # up
           ((9, 8), (4, 3)),     # down
           ((5, 6), (5, 6)),     # equal: an identity
           ((4, 9), (4, 13)),    # height equal, width up
           ((2, 7), (8, 3)),     # up one way, down the other
           ((1, 1), (3, 2))]     # a single pixel spread everywhere


def resize_case(seed, in_size, out_size, channels_last):
    rng = np.random.default_rng(seed)
    shape = (2, *in_size, 3) if channels_last else (2, 3, *in_size)
    out_shape = (2, *out_size, 3) if channels_last else (2, 3, *out_size)
    axes = (1, 2) if channels_last else (-2, -1)
    return rng.standard_normal(shape), rng.standard_normal(out_shape), axes


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_size,out_size", RESIZES)
def test_resize_bilinear_backward_is_the_adjoint(in_size, out_size, channels_last):
    """<resize(x), y> == <x, resize_backward(y)> for random x, y: the definition of the transpose."""
    x, y, axes = resize_case(0, in_size, out_size, channels_last)
    dx = layers.resize_bilinear_backward(y, in_size, axes=axes)
    assert dx.shape == x.shape and dx.dtype == np.float64
    lhs, rhs = np.sum(layers.resize_bilinear(x, out_size, axes=axes) * y), np.sum(x * dx)
    assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(x)) * np.max(np.abs(y))
    assert layers.resize_bilinear_backward(y.astype(np.float32), in_size, axes=axes).dtype == np.float32


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_size,out_size", RESIZES[:3])
def test_resize_bilinear_backward_finite_differences(in_size, out_size, channels_last):
    x, g, axes = resize_case(1, in_size, out_size, channels_last)
    assert_grad("resize_bilinear", layers.resize_bilinear_backward(g, in_size, axes=axes),
                lambda x: np.sum(layers.resize_bilinear(x, out_size, axes=axes) * g), x)


@pytest.mark.parametrize("in_size,out_size", RESIZES)
@pytest.mark.parametrize("band", [1, 3, 64])
def test_resize_rows_backward_bands_sum_to_the_whole_adjoint(in_size, out_size, band):
    _, dout, _ = resize_case(2, in_size, out_size, channels_last=True)
    dout = dout.transpose(1, 2, 0, 3)  # (H, W, B, C): resize_rows works on the two leading axes
    dx = np.zeros((*in_size, *dout.shape[2:]))
    for start in range(0, out_size[0], band):
        stop = min(start + band, out_size[0])
        assert layers.resize_rows_backward(dout[start:stop], dx, out_size, start, stop) is dx
    np.testing.assert_allclose(dx, layers.resize_bilinear_backward(dout, in_size, axes=(0, 1)), rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Semantic segmentation: direct whole-array formulas
# ----------------------------------------------------------------------------------------------------------------

def direct_cross_entropy(logits, labels, ignore_index=255):
    """Upsample everything, log-softmax over classes, pick each pixel's label, mean over the labelled pixels."""
    up = layers.resize_bilinear(logits, labels.shape[1:])  # (B, C, H, W)
    m = up.max(axis=1, keepdims=True)
    log_p = up - m - np.log(np.sum(np.exp(up - m), axis=1, keepdims=True))  # log-softmax over the classes
    b, _, h, w = up.shape
    total, count = 0.0, 0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                if labels[n, i, j] != ignore_index:
                    total -= log_p[n, labels[n, i, j], i, j]
                    count += 1
    return total / count


def direct_binary(logits, labels, ignore_index=255):
    """HF's binary loss: BCE-with-logits against the label, masked to labelled pixels, mean over all pixels."""
    z = layers.resize_bilinear(logits, labels.shape[1:])[:, 0]  # (B, H, W)
    y = labels.astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return np.mean(bce * (labels != ignore_index))


def segmentation_case(seed, b, c, small, big, ignore_index=255):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((b, c, *small)) * 2
    labels = rng.integers(0, max(c, 2), (b, *big))
    labels[0, : big[0] // 2, : big[1] // 3] = ignore_index  # an ignored block
    labels[rng.random(labels.shape) < 0.2] = ignore_index  # and scattered ignored pixels
    return logits, labels


SEG_SHAPES = [((3, 4), (12, 15)),  # 4x-ish upsampling, as HF's logits to the labels
              ((4, 4), (4, 4)),    # equal sizes
              ((5, 3), (2, 7))]    # down one way


@pytest.mark.parametrize("small,big", SEG_SHAPES)
@pytest.mark.parametrize("band_rows", [1, 5, 64])
def test_segmentation_cross_entropy_matches_the_direct_formula(small, big, band_rows):
    logits, labels = segmentation_case(3, 2, 4, small, big)
    loss, dlogits = semantic_segmentation_loss(logits, labels, band_rows=band_rows)
    assert np.ndim(loss) == 0 and loss.dtype == np.float64
    np.testing.assert_allclose(loss, direct_cross_entropy(logits, labels), rtol=1e-12)
    assert_grad("segmentation cross-entropy", dlogits, lambda x: direct_cross_entropy(x, labels), logits)


def test_segmentation_bands_equal_the_whole():
    logits, labels = segmentation_case(4, 2, 5, (4, 5), (17, 19))
    whole_loss, whole_grad = semantic_segmentation_loss(logits, labels, band_rows=17)  # one band
    for band_rows in (1, 2, 7):
        loss, grad = semantic_segmentation_loss(logits, labels, band_rows=band_rows)
        np.testing.assert_allclose(loss, whole_loss, rtol=1e-13)
        np.testing.assert_allclose(grad, whole_grad, rtol=0, atol=1e-15)


def test_segmentation_ignore_index_is_honoured():
    logits, labels = segmentation_case(5, 1, 3, (3, 3), (9, 8), ignore_index=-100)
    loss, dlogits = semantic_segmentation_loss(logits, labels, ignore_index=-100)
    np.testing.assert_allclose(loss, direct_cross_entropy(logits, labels, ignore_index=-100), rtol=1e-12)
    changed = np.where(labels == -100, (labels + 101) % 3, labels)  # give the ignored pixels labels: loss moves
    assert abs(semantic_segmentation_loss(logits, changed, ignore_index=-100)[0] - loss) > 1e-3


@pytest.mark.parametrize("small,big", SEG_SHAPES)
def test_segmentation_binary_matches_hf_masked_mean(small, big):
    logits, labels = segmentation_case(6, 2, 1, small, big)
    loss, dlogits = semantic_segmentation_loss(logits, labels, band_rows=3)
    np.testing.assert_allclose(loss, direct_binary(logits, labels), rtol=1e-12)
    assert_grad("segmentation binary", dlogits, lambda x: direct_binary(x, labels), logits)


def test_segmentation_binary_divides_by_all_pixels():
    """HF's quirk: ignoring half the pixels halves the loss, rather than leaving the mean of the rest."""
    logits = np.zeros((1, 1, 2, 2))
    labels = np.zeros((1, 4, 4), dtype=np.int64)
    full, _ = semantic_segmentation_loss(logits, labels)
    labels[0, :2] = 255
    half, _ = semantic_segmentation_loss(logits, labels)
    np.testing.assert_allclose([full, half], [np.log(2), np.log(2) / 2], rtol=1e-15)
    none, grad = semantic_segmentation_loss(logits, np.full((1, 4, 4), 255))
    assert none == 0 and not grad.any()  # HF: a mean of zeros, not NaN


def test_segmentation_keeps_float32():
    logits, labels = segmentation_case(7, 1, 3, (3, 4), (12, 16))
    loss, dlogits = semantic_segmentation_loss(logits.astype(np.float32), labels, band_rows=5)
    assert loss.dtype == np.float32 and dlogits.dtype == np.float32
    ref_loss, ref_grad = semantic_segmentation_loss(logits, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dlogits, ref_grad, rtol=0, atol=1e-5 * np.abs(ref_grad).max())


def test_segmentation_without_labelled_pixels_raises():
    logits = np.zeros((2, 3, 2, 2))
    with pytest.raises(LabelError, match="no labelled pixel"):
        semantic_segmentation_loss(logits, np.full((2, 8, 8), 255))


@pytest.mark.parametrize("labels,match", [
    (np.zeros((2, 8)), "shape"),                              # missing an axis
    (np.zeros((3, 8, 8), dtype=np.int64), "B = 2"),           # another batch
    (np.zeros((2, 0, 8), dtype=np.int64), "non-empty"),        # no pixel at all
    (np.zeros((2, 8, 8)), "integer class ids"),              # float labels
    (np.full((2, 8, 8), 3), r"\[0, 3\)"),                    # a class the logits don't have
    (np.full((2, 8, 8), -1), r"\[0, 3\)"),                   # negative, not the ignore index
])
def test_segmentation_bad_labels_raise(labels, match):
    with pytest.raises(LabelError, match=match) as info:
        semantic_segmentation_loss(np.zeros((2, 3, 2, 2)), labels)
    assert isinstance(info.value, SegformerError) and isinstance(info.value, ValueError)


def test_segmentation_binary_labels_are_0_or_1():
    with pytest.raises(LabelError, match=r"\[0, 2\)"):
        semantic_segmentation_loss(np.zeros((1, 1, 2, 2)), np.full((1, 4, 4), 2))


def test_segmentation_bad_logits_raise():
    with pytest.raises(LabelError, match="logits"):
        semantic_segmentation_loss(np.zeros((2, 2, 2)), np.zeros((2, 8, 8), dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Image classification: HF's problem_type rules
# ----------------------------------------------------------------------------------------------------------------

def direct_classification(problem_type, logits, labels):
    if problem_type == "regression":
        if logits.shape[1] == 1:
            return np.mean((logits.squeeze() - labels.squeeze()) ** 2)
        return np.mean((logits - labels) ** 2)
    if problem_type == "single_label_classification":
        keep = labels != -100
        log_p = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
        return -np.mean(log_p[np.arange(len(labels))[keep], labels[keep]])
    p = 1 / (1 + np.exp(-logits))
    return -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))


CLASSIFICATION_CASES = [  # problem_type, num_labels, labels' shape and kind
    ("regression", 1, (4,), "float"),
    ("regression", 1, (4, 1), "float"),
    ("regression", 3, (4, 3), "float"),
    ("single_label_classification", 5, (4,), "int"),
    ("multi_label_classification", 5, (4, 5), "float"),
]


def classification_case(seed, num_labels, label_shape, kind):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((4, num_labels)) * 2
    if kind == "int":
        labels = rng.integers(0, num_labels, label_shape)
        labels[1] = -100  # torch's default ignore_index, left in place by HF
    else:
        labels = rng.random(label_shape)
    return logits, labels


@pytest.mark.parametrize("problem_type,num_labels,label_shape,kind", CLASSIFICATION_CASES)
def test_classification_loss_matches_the_direct_formula(problem_type, num_labels, label_shape, kind):
    logits, labels = classification_case(8, num_labels, label_shape, kind)
    loss, dlogits = classification_loss(logits, labels, problem_type)
    np.testing.assert_allclose(loss, direct_classification(problem_type, logits, labels), rtol=1e-12)
    assert_grad(problem_type, dlogits, lambda x: direct_classification(problem_type, x, labels), logits)
    f32 = classification_loss(logits.astype(np.float32), labels, problem_type)
    assert f32[0].dtype == np.float32 and f32[1].dtype == np.float32


def test_problem_type_is_inferred_as_hf_does():
    assert infer_problem_type(1, np.zeros(4, dtype=np.int64)) == "regression"
    assert infer_problem_type(3, np.zeros(4, dtype=np.int64)) == "single_label_classification"
    assert infer_problem_type(3, np.zeros(4, dtype=np.int32)) == "single_label_classification"
    assert infer_problem_type(3, np.zeros((4, 3))) == "multi_label_classification"
    logits, labels = classification_case(9, 5, (4, 5), "float")
    assert classification_loss(logits, labels)[0] == \
        classification_loss(logits, labels, "multi_label_classification")[0]
    logits, labels = classification_case(9, 5, (4,), "int")
    assert classification_loss(logits, labels)[0] == \
        classification_loss(logits, labels, "single_label_classification")[0]


def test_regression_of_one_sample_squeezes_to_a_scalar():
    loss, dlogits = classification_loss(np.array([[2.0]]), np.array([0.5]))  # HF: logits.squeeze() is 0-d
    assert loss == 2.25 and dlogits.shape == (1, 1) and dlogits[0, 0] == 3.0


@pytest.mark.parametrize("logits_shape,labels,problem_type,error,match", [
    ((4, 3), np.zeros(5, dtype=np.int64), None, LabelError, r"shape \(4,\)"),
    ((4, 3), np.zeros(4), "single_label_classification", LabelError, "integer class ids"),
    ((4, 3), np.array([0, 1, 3, 2]), None, LabelError, r"\[0, 3\)"),
    ((4, 3), np.full(4, -100), None, LabelError, "no labelled sample"),
    ((4, 3), np.zeros((4, 2)), None, LabelError, r"shape \(4, 3\)"),
    ((4, 1), np.zeros(3), None, LabelError, r"shape \(4,\)"),
    ((4, 3), np.zeros((4, 3)), "ranking", ConfigError, "problem_type"),
    ((4,), np.zeros(4), None, LabelError, "logits"),
    ((4, 3), np.array(["a"] * 12).reshape(4, 3), "multi_label_classification", LabelError, "real-valued"),
])
def test_classification_bad_labels_raise(logits_shape, labels, problem_type, error, match):
    with pytest.raises(error, match=match):
        classification_loss(np.zeros(logits_shape), labels, problem_type)
