"""value_and_grad: the loss of HF's heads and its gradient for every parameter, against central finite differences.

float64 on the numpy backend, a tiny MiT (the encoder and heads' own backward functions are checked one by one in
tests/test_backward_*.py; here the whole chain, as a user calls it, with gradients keyed by Hub names).
"""

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.weights import BACKBONE, CLASSIFICATION, count_parameters, is_parameter, random_state_dict
from tests.test_backward_layers import numerical_grad

TINY = dict(hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 1, 2), decoder_hidden_size=8)


def tiny_model(head, num_labels=3, seed=0):
    config = ms.variant_config("b0", num_labels=num_labels, **TINY)
    return ms.Segformer(config, random_state_dict(config, head, seed=seed), backend="numpy", dtype="float64")


def finite_difference(f, array, flat_index):
    """d f / d array.flat[flat_index], by `numerical_grad` on a one-element view of the array."""
    return float(numerical_grad(f, array.reshape(-1)[flat_index : flat_index + 1])[0])


def check_every_parameter(model, x, labels, rng):
    loss, grads, dx = ms.value_and_grad(model, x, labels, input_grad=True)
    state = model.state_dict()  # the model's own arrays: perturbing them perturbs the model
    assert set(grads) == {k for k in state if is_parameter(k)}
    assert sum(g.size for g in grads.values()) == count_parameters(state)
    scale = max(float(np.abs(g).max()) for g in grads.values())
    worst = 0.0
    for name, g in grads.items():
        assert g.shape == state[name].shape and g.dtype == np.float64, name
        i = int(rng.integers(0, g.size))  # one entry of every parameter
        numeric = finite_difference(lambda: ms.value_and_grad(model, x, labels)[0], state[name], i)
        worst = max(worst, abs(g.reshape(-1)[i] - numeric) / scale)
    assert worst <= 1e-6, f"worst gradient error {worst:.2e} of the largest gradient"
    for _ in range(3):  # the input gradient (saliency)
        i = int(rng.integers(0, x.size))
        numeric = finite_difference(lambda: ms.value_and_grad(model, x, labels)[0], x, i)
        assert abs(dx.reshape(-1)[i] - numeric) <= 1e-6 * max(float(np.abs(dx).max()), 1e-12)
    return loss


def test_segmentation_value_and_grad():
    rng = np.random.default_rng(0)
    model = tiny_model("SegformerForSemanticSegmentation")
    x = rng.standard_normal((2, 3, 35, 37))
    labels = rng.integers(0, 3, (2, 35, 37))
    labels[0, :7] = 255  # ignored rows
    loss = check_every_parameter(model, x, labels, rng)
    assert 0 < loss < 10


def test_classification_value_and_grad():
    rng = np.random.default_rng(1)
    model = tiny_model(CLASSIFICATION, num_labels=4)
    x = rng.standard_normal((3, 3, 33, 33))
    check_every_parameter(model, x, np.array([0, 3, 1]), rng)


def test_value_and_grad_needs_a_head_and_good_labels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 33, 33))
    with pytest.raises(ValueError, match="backbone"):
        ms.value_and_grad(tiny_model(BACKBONE), x, np.zeros((1, 33, 33), int))
    model = tiny_model("SegformerForSemanticSegmentation")
    with pytest.raises(ms.LabelError):
        ms.value_and_grad(model, x, np.full((1, 33, 33), 255))  # no labelled pixel
    with pytest.raises(ms.LabelError):
        ms.value_and_grad(model, x, np.full((1, 33, 33), 7))  # class 7 of 3


def test_state_dict_round_trip():
    model = tiny_model("SegformerForSemanticSegmentation", seed=5)
    state = model.state_dict()
    assert "decode_head.batch_norm.running_mean" in state  # buffers are state too
    x = np.random.default_rng(3).standard_normal((1, 3, 40, 36))
    again = ms.Segformer(model.config, state, backend="numpy", dtype="float64")
    np.testing.assert_array_equal(again(x).logits, model(x).logits)
