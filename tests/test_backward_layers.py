"""Each backward in nn/layers.py against central finite differences of its forward, in float64 on small shapes.

The loss is L = sum(forward(...) * g) with a fixed random `g`, so dL/d(output) = g is the `dout` handed to the
backward; every gradient it returns must agree with the numerical one to max|analytic - numeric| <= 1e-6 max|numeric|.
No torch: the forward is the definition. The last tests feed in classic mistakes and check that this comparison
rejects them, so a passing test means something.
"""

import numpy as np
import pytest
from scipy.special import ndtr

from mininp_segformer.nn import layers
from tests.conftest import assert_close

RTOL = 1e-6


def numerical_grad(loss, x, eps=1e-6):
    """Central differences (L(x + eps e_i) - L(x - eps e_i)) / 2 eps of the scalar `loss()` in every element of `x`.

    `x` is changed in place and restored, so `loss` reads it through its closure.
    """
    assert x.flags.c_contiguous, "x.reshape(-1) must be a view of x"
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        plus = loss()
        flat[i] = orig - eps
        minus = loss()
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def check_grads(name, forward, inputs, grads, g):
    """Each of `grads` (same order as `inputs`) against the finite differences of sum(forward(*inputs) * g)."""
    assert len(grads) == len(inputs)
    for i, (x, dx) in enumerate(zip(inputs, grads)):
        numeric = numerical_grad(lambda: float(np.sum(forward(*inputs) * g)), x)
        assert np.max(np.abs(numeric)) > 0, f"{name}: input {i} does not reach the loss, the check would be empty"
        assert_close(f"{name} d(input {i})", dx, numeric, rtol_of_max=RTOL, dtype=np.float64)


def randn(rng, *shape):
    return rng.standard_normal(shape)


# --- linear, layer norm, GELU, softmax, ReLU ---------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3)])
def test_linear_backward(lead):
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, *lead, 4), randn(rng, 3, 4), randn(rng, 3)
    g = randn(rng, *lead, 3)
    check_grads("linear", layers.linear, (x, w, b), layers.linear_backward(g, x, w), g)


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 6)])
def test_layer_norm_backward(shape):
    rng = np.random.default_rng(1)
    c = shape[-1]
    x, w, b = randn(rng, *shape) * 2 + 1, randn(rng, c), randn(rng, c)
    g = randn(rng, *shape)
    check_grads("layer_norm", layers.layer_norm, (x, w, b), layers.layer_norm_backward(g, x, w), g)


def test_gelu_backward():
    rng = np.random.default_rng(2)
    x = np.concatenate([randn(rng, 40) * 3, [-8.0, -3.0, -0.5, 0.0, 0.5, 3.0, 8.0]])
    g = randn(rng, x.size)
    check_grads("gelu", layers.gelu, (x,), (layers.gelu_backward(g, x),), g)


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_backward(axis):
    rng = np.random.default_rng(3)
    x, g = randn(rng, 2, 4, 5) * 2, randn(rng, 2, 4, 5)
    probs = layers.softmax(x, axis=axis)
    check_grads("softmax", lambda x: layers.softmax(x, axis=axis), (x,),
                (layers.softmax_backward(g, probs, axis=axis),), g)


def test_relu_backward():
    rng = np.random.default_rng(4)
    x = randn(rng, 3, 7)
    x[np.abs(x) < 1e-3] = 0.5  # finite differences must not straddle the kink
    g = randn(rng, 3, 7)
    check_grads("relu", layers.relu, (x,), (layers.relu_backward(g, x),), g)
    assert (layers.relu_backward(np.ones(3), np.zeros(3)) == 0).all()  # torch's choice at the kink: 0


# --- batch norm: inference and train mode --------------------------------------------------------------------------

def test_batch_norm_backward():
    rng = np.random.default_rng(6)
    x, w, b, mean = randn(rng, 2, 3, 4, 5), randn(rng, 5), randn(rng, 5), randn(rng, 5)
    var = rng.uniform(0.5, 2.0, 5)
    g = randn(rng, 2, 3, 4, 5)
    check_grads("batch_norm", lambda x, w, b: layers.batch_norm(x, w, b, mean, var), (x, w, b),
                layers.batch_norm_backward(g, x, w, mean, var), g)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3)])
def test_batch_norm_train_backward(shape):
    rng = np.random.default_rng(7)
    c = shape[-1]
    x, w, b = randn(rng, *shape) * 2 + 1, randn(rng, c), randn(rng, c)
    g = randn(rng, *shape)
    check_grads("batch_norm_train", lambda x, w, b: layers.batch_norm_train(x, w, b)[0], (x, w, b),
                layers.batch_norm_train_backward(g, x, w), g)


def test_batch_norm_train_statistics():
    """Train mode normalises each channel by its batch statistics (biased variance): out has mean bias, std weight."""
    rng = np.random.default_rng(8)
    x, w, b = randn(rng, 2, 3, 4, 5) * 3 + 2, randn(rng, 5), randn(rng, 5)
    out, mean, var = layers.batch_norm_train(x, w, b, eps=0.0)
    flat = x.reshape(-1, 5)
    assert_close("batch mean", mean, flat.mean(axis=0), rtol_of_max=1e-12, dtype=np.float64)
    assert_close("batch var", var, flat.var(axis=0, ddof=0), rtol_of_max=1e-12, dtype=np.float64)
    assert_close("out mean", out.reshape(-1, 5).mean(axis=0), b, rtol_of_max=1e-12, dtype=np.float64)
    assert_close("out std", out.reshape(-1, 5).std(axis=0), np.abs(w), rtol_of_max=1e-12, dtype=np.float64)


# --- im2col, convolutions ----------------------------------------------------------------------------------------

CONV_CASES = [  # (x shape, kernel, stride, padding), as in test_layers.py's conv tests
    ((2, 7, 9, 3), 7, 4, 3),   # patch embedding on an odd size
    ((1, 9, 6, 2), 3, 2, 1),   # later stages
    ((1, 6, 5, 2), 3, 2, 0),   # x's last row is never read: its gradient is 0
    ((1, 8, 8, 2), 4, 4, 0),   # spatial reduction: kernel = stride
    ((1, 5, 7, 2), 3, 1, 1),   # overlapping windows
    ((1, 3, 3, 2), 3, 2, 1),
]


@pytest.mark.parametrize("shape,k,stride,pad", CONV_CASES)
def test_im2col_backward_is_its_adjoint(shape, k, stride, pad):
    """<im2col(x), c> = <x, im2col_backward(c)> for random x and c: col2im is im2col's transpose."""
    rng = np.random.default_rng(9)
    x = randn(rng, *shape)
    cols = layers.im2col(x, k, stride, pad)
    c = randn(rng, *cols.shape)
    dx = layers.im2col_backward(c, x.shape, k, stride, pad)
    assert dx.shape == x.shape and dx.dtype == np.float64
    lhs, rhs = np.sum(cols * c), np.sum(x * dx)
    assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(cols * c)), (lhs, rhs)


@pytest.mark.parametrize("shape,k,stride,pad", CONV_CASES)
def test_conv2d_backward(shape, k, stride, pad):
    rng = np.random.default_rng(10)
    x, w, b = randn(rng, *shape), randn(rng, 3, shape[-1], k, k), randn(rng, 3)
    g = randn(rng, *layers.conv2d(x, w, b, stride, pad).shape)
    check_grads("conv2d", lambda x, w, b: layers.conv2d(x, w, b, stride, pad), (x, w, b),
                layers.conv2d_backward(g, x, w, stride, pad), g)


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (1, 1, 1, 2), (1, 2, 6, 1)])
def test_depthwise_conv3x3_backward(shape):
    rng = np.random.default_rng(11)
    c = shape[-1]
    x, w, b = randn(rng, *shape), randn(rng, c, 1, 3, 3), randn(rng, c)
    g = randn(rng, *shape)
    grads = layers.depthwise_conv3x3_backward(g, x, w)
    check_grads("depthwise_conv3x3", layers.depthwise_conv3x3, (x, w, b), grads, g)
    if shape[1:3] == (1, 1):  # a 1 x 1 map sees only the centre tap: the other taps' gradient is exactly 0
        assert (np.delete(grads[1].reshape(c, 9), 4, axis=1) == 0).all()


# --- float32 in, float32 out ----------------------------------------------------------------------------------------

def test_backwards_keep_float32():
    rng = np.random.default_rng(5)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x, g = f32(2, 3, 4), f32(2, 3, 4)
    cases = {
        "linear": layers.linear_backward(f32(2, 3, 5), x, f32(5, 4)),
        "layer_norm": layers.layer_norm_backward(g, x, f32(4)),
        "gelu": (layers.gelu_backward(g, x),),
        "softmax": (layers.softmax_backward(g, layers.softmax(x)),),
        "relu": (layers.relu_backward(g, x),),
        "batch_norm": layers.batch_norm_backward(g, x, f32(4), f32(4), np.abs(f32(4))),
        "batch_norm_train": layers.batch_norm_train(x, f32(4), f32(4)) + layers.batch_norm_train_backward(g, x, f32(4)),
        "im2col": (layers.im2col_backward(f32(1, 2, 2, 27), (1, 3, 4, 3), 3, 2, 1),),
        "conv2d": layers.conv2d_backward(f32(1, 2, 2, 5), f32(1, 3, 4, 3), f32(5, 3, 3, 3), 2, 1),
        "depthwise_conv3x3": layers.depthwise_conv3x3_backward(f32(1, 3, 4, 5), f32(1, 3, 4, 5), f32(5, 1, 3, 3)),
    }
    for name, grads in cases.items():
        for grad in grads:
            assert grad.dtype == np.float32, f"{name}: {grad.dtype}"


# --- the checks can fail: classic mistakes are rejected ------------------------------------------------------------

def _mistakes():
    """{name: (forward, inputs, wrong gradients, g)}: a plausible bug in each family of backward."""
    rng = np.random.default_rng(12)
    x, w, b, g = randn(rng, 2, 3, 4), randn(rng, 4), randn(rng, 4), randn(rng, 2, 3, 4)
    mean, var = randn(rng, 4), rng.uniform(0.5, 2.0, 4)
    wl, bl, gl = randn(rng, 5, 4), randn(rng, 5), randn(rng, 2, 3, 5)
    _, dw, db = layers.layer_norm_backward(g, x, w)
    gw, sigma = g * w, np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5)
    probs = layers.softmax(x)
    xc, wc, bc, gc = randn(rng, 1, 5, 6, 2), randn(rng, 3, 2, 3, 3), randn(rng, 3), randn(rng, 1, 3, 3, 3)
    dxc, dwc, dbc = layers.conv2d_backward(gc, xc, wc, 2, 1)
    xd, wd, bd, gd = randn(rng, 1, 3, 4, 4), randn(rng, 4, 1, 3, 3), randn(rng, 4), randn(rng, 1, 3, 4, 4)
    dxd, dwd, dbd = layers.depthwise_conv3x3_backward(gd, xd, wd)
    return {
        "linear: bias gradient averaged over tokens": (
            layers.linear, (x, wl, bl), layers.linear_backward(gl, x, wl)[:2] + (gl.reshape(-1, 5).mean(axis=0),), gl),
        "layer_norm: third term dropped": (
            layers.layer_norm, (x, w, b), ((gw - gw.mean(axis=-1, keepdims=True)) / sigma, dw, db), g),
        "gelu: x phi(x) forgotten": (layers.gelu, (x,), (g * ndtr(x),), g),
        "softmax: the Jacobian's diagonal only": (layers.softmax, (x,), (g * probs * (1 - probs),), g),
        "relu: gradient passed through": (layers.relu, (x,), (g,), g),
        "batch_norm: 1 / sigma forgotten": (
            lambda x, w, b: layers.batch_norm(x, w, b, mean, var), (x, w, b),
            (g * w,) + layers.batch_norm_backward(g, x, w, mean, var)[1:], g),
        "batch_norm_train: batch statistics held constant": (
            lambda x, w, b: layers.batch_norm_train(x, w, b)[0], (x, w, b),
            layers.batch_norm_backward(g, x, w, *layers.batch_norm_train(x, w, b)[1:]), g),
        "conv2d: weight matrix read back in torch's (c, ky, kx) order": (
            lambda x, w, b: layers.conv2d(x, w, b, 2, 1), (xc, wc, bc),
            (dxc, np.moveaxis(dwc, 1, -1).reshape(wc.shape), dbc), gc),
        "depthwise_conv3x3: taps transposed": (
            layers.depthwise_conv3x3, (xd, wd, bd), (dxd, dwd.transpose(0, 1, 3, 2), dbd), gd),
    }


@pytest.mark.parametrize("mistake", list(_mistakes()))
def test_a_wrong_gradient_fails_the_check(mistake):
    forward, inputs, grads, g = _mistakes()[mistake]
    with pytest.raises(AssertionError, match="> tol"):  # over the tolerance, not a shape or dtype slip
        check_grads(mistake, forward, inputs, grads, g)
