"""Each building block against an independent, plainly written computation (float64 where it helps).

Parity with torch itself lives in test_parity.py; here the layers are checked against their definitions, and
each numba kernel against its NumPy twin on awkward shapes.
"""

import math

import numpy as np
import pytest

from mininp_segformer import threads
from mininp_segformer.nn import kernels, layers
from mininp_segformer.nn.attention import efficient_self_attention
from mininp_segformer.config import variant_config
from mininp_segformer.model import min_input_size
from tests.conftest import F32_EPS, assert_close, assert_within, float32_sum_bound

rng = np.random.default_rng(1234)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def on_one_and_two_threads(fn) -> list:
    """[fn() on one thread, fn() on two], every core again afterwards."""
    runs = []
    try:
        for n in (1, 2):
            threads.set_num_threads(n)
            runs.append(fn())
    finally:
        threads.set_num_threads()
    return runs


def conv2d_direct(x, w, b, stride, pad):
    """Convolution as the textbook sum, one output pixel at a time (float64): the independent reference."""
    bsz, h, wd, c = x.shape
    co, ci, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((bsz, ho, wo, co))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]  # (B, k, k, C)
            out[:, i, j, :] = np.einsum("byxc,ocyx->bo", window, w.astype(np.float64)) + b
    return out


def conv2d_bound(x, w, b, stride, pad):
    """The float32 rounding bound of each output of conv2d(x, w, b): a sum of C*k*k products and the bias."""
    _, c, k, _ = w.shape
    abs_sum = conv2d_direct(np.abs(x), np.abs(w), np.abs(b), stride, pad)
    return float32_sum_bound(abs_sum, c * k * k + 1)


@pytest.mark.parametrize("shape,k,stride,pad", [
    ((2, 13, 17, 3), 7, 4, 3),   # stage-1 patch embedding on an odd size
    ((1, 9, 6, 5), 3, 2, 1),     # later stages
    ((2, 16, 24, 4), 8, 8, 0),   # spatial reduction: kernel = stride
    ((1, 5, 7, 2), 3, 1, 1),     # 1-pixel borders
    ((1, 3, 3, 2), 3, 2, 1),
])
def test_conv2d_im2col_matches_direct_sum(shape, k, stride, pad):
    x = randn(*shape)
    w, b = randn(4, shape[-1], k, k), randn(4)
    ours = layers.conv2d(x, w, b, stride, pad)
    ref = conv2d_direct(x, w, b, stride, pad)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert_within("conv2d vs direct sum", ours, ref, conv2d_bound(x, w, b, stride, pad))


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 9, 7), (1, 12, 3, 16)])
def test_depthwise_conv_is_a_grouped_conv(shape):
    x = randn(*shape)
    c = shape[-1]
    w, b = randn(c, 1, 3, 3), randn(c)
    dense = np.zeros((c, c, 3, 3), dtype=np.float32)  # groups = C: a block-diagonal dense conv
    dense[np.arange(c), np.arange(c)] = w[:, 0]
    bound = float32_sum_bound(conv2d_direct(np.abs(x), np.abs(dense), np.abs(b), 1, 1), 10)  # 9 taps + bias
    assert_within("depthwise vs grouped conv", layers.depthwise_conv3x3(x, w, b), conv2d_direct(x, dense, b, 1, 1),
                  bound)


def test_gelu_kernel_equals_reference_and_definition():
    x = np.concatenate([randn(1000) * 4, np.linspace(-30, 30, 20001, dtype=np.float32),
                        np.array([0, -0.0, 1e-8, -1e-8, 1e4, -1e4], np.float32)])
    fast = kernels.gelu(x.reshape(-1, 7)).reshape(-1)
    assert fast.dtype == np.float32
    # Compare Phi(x) = GELU(x) / x against math.erfc in float64: the kernel is within 2.5e-7 (2 float32 ulps of 1)
    # everywhere. Below x = -8, 1 + erf(x / sqrt 2) cancels to 0 even in float64, so layers.gelu is 0 there, as is
    # the kernel (exactly -0.0 below -4 sqrt 2).
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_array_less(np.abs(fast - exact), 2.5e-7 * np.abs(x) + 1e-37)
    reference = layers.gelu(x)  # the readable twin: 0.5 x (1 + erf(x / sqrt 2))
    np.testing.assert_array_less(np.abs(fast - reference), 2.5e-7 * np.abs(x) + 1e-37)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert np.abs(tanh_form - fast).max() > 1e-4  # the erf form, not the tanh approximation
    assert np.all(fast[x < -kernels.GELU_L] == 0) and np.all(np.signbit(fast[x < -kernels.GELU_L]))


def test_gelu_kernel_keeps_the_sign_and_the_bound_everywhere():
    """A 2^-15 grid of [-8, 8] (524,288 points) and 100,000 values up to a few hundred: GELU(x) = x Phi(x) with
    0 <= Phi <= 1, so the kernel's value has x's sign (or is zero) and is no larger than x, and it is within
    2.5e-7 |x| of x Phi(x) in float64."""
    from scipy.special import ndtr

    x = np.concatenate([np.arange(-8, 8, 2**-15, dtype=np.float32), randn(100000) * 100])
    fast = kernels.gelu(x.reshape(-1, 16)).reshape(-1)
    assert np.all(fast[x < 0] <= 0) and np.all(fast[x > 0] >= 0), "GELU's sign"
    assert np.all(np.abs(fast) <= np.abs(x)), "Phi above 1"
    x64 = x.astype(np.float64)
    np.testing.assert_array_less(np.abs(fast - x64 * ndtr(x64)), 2.5e-7 * np.abs(x64) + 1e-37)


def test_gelu_kernel_coefficients_are_the_fit():
    """kernels.gelu's P and Q are tools/fit_gelu.py's (rounded to float32), and as accurate as its docstring says:
    |x P(x^2) / Q(x^2) - (Phi(x) - 1/2)| <= 2.5e-8 on [0, 4 sqrt 2] (2.1e-8 in the docstrings), evaluated in
    float64 on a grid finer than the fit's."""
    from scipy.special import ndtr

    from mininp_segformer.tools import fit_gelu

    p, q, worst = fit_gelu.fit()
    assert worst < 1.2e-8
    ours_p = np.array([getattr(kernels, f"_P{k}") for k in range(6)], np.float64)
    ours_q = np.array([1.0] + [getattr(kernels, f"_Q{k}") for k in range(1, 6)], np.float64)
    np.testing.assert_allclose(ours_p, p, rtol=1e-3)  # a rational fit's coefficients move with LAPACK's rounding
    np.testing.assert_allclose(ours_q, q, rtol=1e-3)  # (1.7e-6 on OpenBLAS's Sandybridge path); its error does not
    x = np.linspace(0, float(kernels.GELU_L), 400001)
    s = x * x
    error = x * np.polynomial.polynomial.polyval(s, ours_p) / np.polynomial.polynomial.polyval(s, ours_q)
    assert np.abs(error - (ndtr(x) - 0.5)).max() <= 2.5e-8
    assert kernels.GELU_L == np.float32(fit_gelu.L) and ndtr(-fit_gelu.L) < 2 ** -25  # 1 - Phi(L): below half a
    # float32 step below 1 (2^-24), so Phi past L is 1 (and 0 left of -L) to float32 precision


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 2, 5), (2, 5, 9, 7), (1, 12, 3, 16), (3, 2, 17, 33)])
def test_depthwise_conv_kernels_equal_their_twins(shape):
    x, c = randn(*shape) * 2, shape[-1]
    w, b = randn(c, 1, 3, 3), randn(c)
    ref = layers.depthwise_conv3x3(x, w, b)
    dense = np.zeros((c, c, 3, 3), dtype=np.float32)
    dense[np.arange(c), np.arange(c)] = w[:, 0]
    # kernel and twin each within the bound of the exact sum, so within twice it of each other
    bound = 2 * float32_sum_bound(conv2d_direct(np.abs(x), np.abs(dense), np.abs(b), 1, 1), 10)
    assert_within("depthwise kernel vs twin", kernels.depthwise_conv3x3(x, w, b), ref, bound)
    fused = kernels.depthwise_conv3x3_gelu(x, w, b)
    # GELU's slope is at most 1.13: the conv's rounding passes through scaled by that, plus GELU's own 2 ulps
    assert_within("depthwise+gelu kernel vs gelu(twin)", fused, layers.gelu(ref), 2.5e-7 * np.abs(ref) + 1.13 * bound)


def test_backward_kernels_equal_their_twins():
    """The two backward twins the numba backend uses in training: GELU's (float64 inside both, rounded once) and the depthwise conv's (dx a rotated-kernel conv: the forward's bound; dweight, dbias the same code)."""
    x, dout = randn(2, 9, 11, 24) * 3, randn(2, 9, 11, 24)
    ref = layers.gelu_backward(dout, x)
    # 1 ulp of the result, plus float64's own rounding where Phi(x) + x phi(x) cancels to 0 (x near -0.75)
    bound = F32_EPS * np.abs(ref) + 1e-15 * np.abs(dout)
    assert_within("gelu_backward kernel vs twin", kernels.gelu_backward(dout, x), ref, bound)
    w = randn(24, 1, 3, 3)
    got, want = kernels.depthwise_conv3x3_backward(dout, x, w), layers.depthwise_conv3x3_backward(dout, x, w)
    dense = np.zeros((24, 24, 3, 3), dtype=np.float32)
    dense[np.arange(24), np.arange(24)] = w[:, 0, ::-1, ::-1]
    bound = 2 * float32_sum_bound(conv2d_direct(np.abs(dout), np.abs(dense), np.zeros(24), 1, 1), 9)
    assert_within("depthwise backward dx kernel vs twin", got[0], want[0], bound)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,k,stride,pad", [((2, 13, 17, 3), 7, 4, 3), ((1, 9, 6, 5), 3, 2, 1),
                                                ((2, 16, 24, 4), 8, 8, 0), ((1, 3, 3, 2), 3, 2, 1)])
def test_im2col_and_conv_kernels_equal_their_twins(shape, k, stride, pad):
    x = randn(*shape)
    np.testing.assert_array_equal(kernels.im2col(x, k, stride, pad), layers.im2col(x, k, stride, pad))
    w, b = randn(4, shape[-1], k, k), randn(4)
    assert_within("conv2d kernel vs twin", kernels.conv2d(x, w, b, stride, pad), layers.conv2d(x, w, b, stride, pad),
                  2 * conv2d_bound(x, w, b, stride, pad))


def test_im2col_kernel_on_an_empty_batch():
    x = np.zeros((0, 9, 6, 5), np.float32)
    assert kernels.im2col(x, 3, 2, 1).shape == layers.im2col(x, 3, 2, 1).shape == (0, 5, 3, 45)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 1), (2, 7, 33), (4, 300)])
def test_layer_norm_and_softmax_kernels_equal_their_twins(shape):
    x = randn(*shape) * 5 + 3
    w, b = randn(shape[-1]), randn(shape[-1])
    # the kernel sums the mean and variance in another order: a few float32 ulps of the largest output
    assert_close("layer_norm kernel vs twin", kernels.layer_norm(x, w, b), layers.layer_norm(x, w, b),
                 rtol_of_max=4 * F32_EPS)
    ref = layers.softmax(x.astype(np.float64) * 4)
    got = kernels.softmax(x * 4)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)  # float32 rounding of (x - max) sets the floor
    big = np.array([[1e4, -1e4, 0, 88, -88]], np.float32)
    np.testing.assert_allclose(kernels.softmax(big.copy()), layers.softmax(big.astype(np.float64)), rtol=1e-6,
                               atol=1e-9)


@pytest.mark.parametrize("src,dst", [((1, 1), (5, 4)), ((4, 6), (4, 6)), ((3, 5), (7, 13)), ((16, 9), (5, 4)), ((1, 1), (1, 1))])
def test_add_resized_kernel_equals_resize_then_add(src, dst):
    x, base = randn(2, *src, 6), randn(2, *dst, 6)
    ref = base + layers.resize_bilinear(x, dst, axes=(1, 2))
    # each output is base + a 4-tap weighted sum: within the float32 bound of a 5-term sum, taken twice
    abs_sum = np.abs(base) + layers.resize_bilinear(np.abs(x).astype(np.float64), dst, axes=(1, 2))
    assert_within("add_resized kernel vs twin", kernels.add_resized(base.copy(), x), ref,
                  2 * float32_sum_bound(abs_sum, 5))


@pytest.mark.parametrize("ops", [layers, kernels], ids=["numpy", "numba"])
def test_add_resized_in_bands_equals_the_whole(ops):
    """`add_resized(out, x, size, start)`: `out` holds rows start:start + H of the map resized to `size`; bands that
    tile it give the same bits as one call on the whole."""
    x, base = randn(2, 5, 7, 6), randn(2, 19, 13, 6)
    whole = ops.add_resized(base.copy(), x)
    banded = base.copy()
    for start, stop in ((0, 1), (1, 8), (8, 18), (18, 19)):
        band = np.ascontiguousarray(banded[:, start:stop])
        banded[:, start:stop] = ops.add_resized(band, x, (19, 13), start)
    np.testing.assert_array_equal(banded, whole)
    for bad_start, bad_size in ((12, (19, 13)), (0, (19, 12)), (-1, (19, 13))):  # past the map; another width
        with pytest.raises(ValueError, match="is not rows"):
            ops.add_resized(base[:, :8].copy(), x, bad_size, bad_start)


@pytest.mark.parametrize("ops", [layers, kernels], ids=["numpy", "numba"])
def test_fused_decoder_in_bands_on_any_threads_equals_the_literal_head(ops, monkeypatch):
    """fused_decode_head works through the rows of (H_1, W_1) in bands split across the threads: many bands, the
    last one short, batch 2 -- the same bits on 1 and 2 threads, and within float32 rounding of one band and of the
    literal head. (Not the same bits as one band: OpenBLAS rounds a small product, such as a band's, its own way.)"""
    from mininp_segformer.nn import decoder
    from mininp_segformer.weights import random_state_dict, unflatten

    config = variant_config("b0", num_labels=7)
    p = unflatten(random_state_dict(config, seed=2))["decode_head"]
    stages = [randn(2, 23 // 2**i + 1, 18 // 2**i + 1, c) for i, c in enumerate(config.hidden_sizes)]  # 24 x 19, ...
    folded = decoder.fold_decode_head(p)
    one = decoder.fused_decode_head(stages, folded, ops)  # 2 x 19 x 256 a row: one band holds all 24 rows
    literal = decoder.all_mlp_decode_head(stages, p, ops)
    for elements in (5 * 2 * 19 * 256, 1):  # bands of 5 rows (5, 5, 5, 5, 4); of 1 row, the least there is
        monkeypatch.setattr(decoder, "BAND_ELEMENTS", elements)
        banded = on_one_and_two_threads(lambda: decoder.fused_decode_head(stages, folded, ops))
        np.testing.assert_array_equal(banded[1], banded[0])
        assert_close("fused head, bands vs one band", banded[0], one, 2e-6)
        assert_close("fused head (bands) vs literal head", banded[0], literal, 2e-6)


def test_layer_norm_and_softmax_match_their_formulas():
    x = randn(3, 5, 7) * 3 + 2
    w, b = randn(7), randn(7)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
    assert_close("layer_norm vs formula", layers.layer_norm(x, w, b), ref, rtol_of_max=8 * F32_EPS)
    s = layers.softmax(x * 100)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s.sum(-1), 1, atol=1e-6)
    np.testing.assert_allclose(layers.softmax(x), np.exp(x64) / np.exp(x64).sum(-1, keepdims=True), atol=1e-6)


def test_bilinear_align_corners_false_worked_example():
    x = np.array([[[[1.0, 3.0]]]], dtype=np.float32)  # (1, 1, 1, 2)
    # 2 -> 4: sample points (i + 0.5) * 2 / 4 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    np.testing.assert_allclose(layers.resize_bilinear(x, (1, 4))[0, 0, 0], [1.0, 1.5, 2.5, 3.0])
    # 4 -> 2 samples at 0.5 and 2.5: the means of neighbouring pairs (no antialiasing)
    y = np.array([[[[0.0, 2.0, 4.0, 8.0]]]], dtype=np.float32)
    np.testing.assert_allclose(layers.resize_bilinear(y, (1, 2))[0, 0, 0], [1.0, 6.0])


def test_bilinear_preserves_constants_and_channels_last_equals_channels_first():
    x = randn(2, 3, 5, 7)
    up = layers.resize_bilinear(x, (11, 4))
    last = layers.resize_bilinear(x.transpose(0, 2, 3, 1), (11, 4), axes=(1, 2))
    np.testing.assert_array_equal(up, last.transpose(0, 3, 1, 2))
    const = np.full((1, 1, 3, 4), 2.5, np.float32)
    np.testing.assert_allclose(layers.resize_bilinear(const, (7, 9)), 2.5, rtol=1e-7)
    assert layers.resize_bilinear(x, (5, 7)) is x or np.array_equal(layers.resize_bilinear(x, (5, 7)), x)


def _attention_params(c, sr):
    p = {"self": {n: {"weight": randn(c, c) * 0.3, "bias": randn(c) * 0.1} for n in ("query", "key", "value")},
         "output": {"dense": {"weight": randn(c, c) * 0.3, "bias": randn(c)}}}
    if sr > 1:
        p["self"]["sr"] = {"weight": randn(c, c, sr, sr) * 0.1, "bias": randn(c)}
        p["self"]["layer_norm"] = {"weight": randn(c), "bias": randn(c)}
    return p


@pytest.mark.parametrize("ops", [layers, kernels], ids=["numpy", "numba"])
def test_attention_without_reduction_is_plain_multi_head_attention(ops):
    b, h, w, c, heads = 2, 3, 5, 8, 2
    x, p = randn(b, h * w, c), _attention_params(c, 1)
    out, probs = efficient_self_attention(x, h, w, p, heads, sr_ratio=1, ops=ops)
    x64 = x.astype(np.float64)
    ps = p["self"]
    q, k, v = (x64 @ ps[n]["weight"].T.astype(np.float64) + ps[n]["bias"] for n in ("query", "key", "value"))
    ctx = np.zeros_like(q)
    d = c // heads
    for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        s = q[:, :, sl] @ k[:, :, sl].transpose(0, 2, 1) / math.sqrt(d)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        np.testing.assert_allclose(probs[:, hd], a, atol=1e-6)
        ctx[:, :, sl] = a @ v[:, :, sl]
    ref = ctx @ p["output"]["dense"]["weight"].T + p["output"]["dense"]["bias"]
    assert_close("attention vs plain multi-head attention", out, ref, rtol_of_max=5e-6, dtype=None)


@pytest.mark.parametrize("b,heads,n,n_r,d", [(2, 3, 37, 5, 11), (1, 1, 20, 3, 8), (1, 8, 4, 4, 32)])
def test_attention_kernel_in_pieces_on_any_threads_equals_its_twin(b, heads, n, n_r, d, monkeypatch):
    """kernels.attention works through pieces of up to ATTENTION_ROWS queries of one head, a run of pieces per
    thread: whatever the pieces (one per head; 7 rows, the last one short; single rows), the same bits on 1 and 2
    threads, and within float32 rounding of the float64 twin. Its output merges into (B, N, C) without a copy."""
    from mininp_segformer.nn.attention import merge_heads

    q, k, v = randn(b, heads, n, d), randn(b, heads, n_r, d), randn(b, heads, n_r, d) * 3
    ref_out, ref_probs = layers.attention(*(a.astype(np.float64) for a in (q, k, v)))
    for rows in (kernels.ATTENTION_ROWS, 7, 1):
        monkeypatch.setattr(kernels, "ATTENTION_ROWS", rows)
        runs = on_one_and_two_threads(lambda: kernels.attention(q, k, v))
        for one, two in zip(*runs):
            np.testing.assert_array_equal(two, one)
        out, probs = runs[0]
        assert out.dtype == probs.dtype == np.float32
        # P: the scores' rounding (d-term sums) through exp; the output: an N_r-term sum of P times V on top
        assert_close(f"attention P, kernel ({rows} rows a piece) vs float64", probs, ref_probs, 2e-6)
        assert_close(f"attention output, kernel ({rows} rows a piece) vs float64", out, ref_out, 4e-6)
        assert np.shares_memory(merge_heads(out), out)


def test_spatial_reduction_shrinks_keys_by_r_squared():
    b, h, w, c = 1, 8, 12, 4
    _, probs = efficient_self_attention(randn(b, h * w, c), h, w, _attention_params(c, 4), 1, sr_ratio=4)
    assert probs.shape == (b, 1, h * w, (h // 4) * (w // 4))


def test_min_input_size_is_set_by_stage_one_reduction():
    assert min_input_size(variant_config("b0")) == 29  # ceil(29 / 4) = 8 = stage 1's sr_ratio
    assert min_input_size(variant_config("b0", sr_ratios=(1, 1, 1, 1))) == 1


@pytest.mark.parametrize("h,w,r", [(16, 24, 8), (17, 23, 4), (9, 9, 2), (8, 8, 8)])
def test_spatial_reduction_reshape_is_the_strided_conv(h, w, r):
    from mininp_segformer.nn.attention import spatial_reduction
    c = 6
    x = randn(2, h * w, c)
    p = {"sr": {"weight": randn(c, c, r, r), "bias": randn(c)}, "layer_norm": {"weight": randn(c), "bias": randn(c)}}
    conv = conv2d_direct(x.reshape(2, h, w, c), p["sr"]["weight"], p["sr"]["bias"], stride=r, pad=0)
    ref = layers.layer_norm(conv.reshape(2, -1, c).astype(np.float32), p["layer_norm"]["weight"], p["layer_norm"]["bias"])
    assert_close("spatial reduction vs strided conv", spatial_reduction(x, h, w, p, r), ref, rtol_of_max=4e-6)



def test_set_num_threads_sets_numba_and_blas_together():
    import ctypes
    import os

    import numba

    def blas_threads():
        for path in threads._loaded_libraries():
            if "openblas" in os.path.basename(path).lower():
                lib = ctypes.CDLL(path)
                for symbol in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                               "openblas_get_num_threads"):
                    if hasattr(lib, symbol):
                        return getattr(lib, symbol)()
        pytest.fail("NumPy's OpenBLAS was not found among the loaded libraries")

    try:
        assert threads.set_num_threads(1) == 1
        assert numba.get_num_threads() == 1 and blas_threads() == 1 and threads.get_num_threads() == 1
        n = threads.set_num_threads()  # default: every core
        assert n == min(os.cpu_count(), numba.config.NUMBA_NUM_THREADS)
        assert numba.get_num_threads() == n and blas_threads() == n and threads.get_num_threads() == n
    finally:
        threads.set_num_threads()


def test_every_kernel_has_a_twin_with_its_signature():
    """kernels.TWINS: each numba kernel stands in for the layers function of the same name and parameters, and the
    kernels module is a complete ops namespace for the network (what it has no kernel for, it takes from layers)."""
    import inspect

    for name in kernels.TWINS:
        assert inspect.signature(getattr(kernels, name)) == inspect.signature(getattr(layers, name)), name
    for name in ("batch_norm", "relu", "resize_bilinear"):
        assert getattr(kernels, name) is getattr(layers, name)


def test_kernel_softmax_leaves_its_input_unless_asked():
    x = randn(3, 7) * 4
    before = x.copy()
    p = kernels.softmax(x)
    np.testing.assert_array_equal(x, before)  # like layers.softmax: a new array
    assert kernels.softmax(x, out=x) is x
    np.testing.assert_array_equal(x, p)
    out = np.empty_like(x)
    assert kernels.softmax(before, out=out) is out
    with pytest.raises(ValueError, match="last axis"):
        kernels.softmax(before, axis=0)


# The same computation summed in another order, with a polynomial exp and a rational Phi in the kernels: float32
# rounding that grows with depth. Measured max|numba - numpy| / max|numpy| (2026-11-28, with the rational GELU): b0
# 1.0e-6 (AVX-512 code paths) and 9e-7 (OpenBLAS Sandybridge + numba generic); b1 up to 1.6e-6; b3 1.2e-6 at 65 x 77
# -- as far apart as each is from torch, and as far as our float32 is from our float64
# (test_parity.test_float64_numpy_backend).
@pytest.mark.parametrize("variant,size,decoder,rtol", [("b0", (61, 93), "fused", 2e-6), ("b1", (33, 40), "literal", 2e-6)])
def test_the_two_backends_agree(variant, size, decoder, rtol):
    """backend="numba" and backend="numpy" in float32: every hidden state and the logits within `rtol` of the
    tensor's max (the same computation, summed in another order)."""
    import mininp_segformer as ms
    from mininp_segformer.weights import random_state_dict

    config = variant_config(variant, num_labels=5)
    state = random_state_dict(config, seed=3)
    x = randn(2, 3, *size)
    outs = [ms.Segformer(config, state, decoder=decoder, backend=b)(x, output_hidden_states=True)
            for b in ("numba", "numpy")]
    for i in range(4):
        assert_close(f"{variant} hidden_state_{i}", outs[0].hidden_states[i], outs[1].hidden_states[i], rtol)
    assert_close(f"{variant} logits", outs[0].logits, outs[1].logits, rtol)


def test_backend_and_dtype_are_checked():
    import mininp_segformer as ms
    from mininp_segformer.weights import random_state_dict

    config = variant_config("b0", num_labels=3)
    state = random_state_dict(config, seed=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ms.Segformer(config, state, backend="torch")
    with pytest.raises(ValueError, match="float32 only"):
        ms.Segformer(config, state, backend="numba", dtype="float64")
    with pytest.raises(ValueError, match="float32 or float64"):
        ms.Segformer(config, state, backend="numpy", dtype="float16")


def test_linear_kernel_equals_its_twin():
    x, w, b = randn(2, 37, 19), randn(23, 19), randn(23)
    np.testing.assert_array_equal(kernels.linear(x, w, b), layers.linear(x, w, b))
    np.testing.assert_array_equal(kernels.linear(x, w), layers.linear(x, w))


_KERNEL_DIGESTS = """
import hashlib, numpy as np
from mininp_segformer.nn import kernels
rng = np.random.default_rng(0)
digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
outs = {}
for c in (16, 32, 64, 160):  # row lengths that do and do not fill whole SIMD vectors
    x = rng.standard_normal((2, 9, 13, c)).astype(np.float32) * 3
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    lw = rng.standard_normal((5, c)).astype(np.float32)
    outs.update({f"gelu {c}": kernels.gelu(x.copy()), f"depthwise_conv3x3_gelu {c}": kernels.depthwise_conv3x3_gelu(x, w, b),
                 f"depthwise_conv3x3 {c}": kernels.depthwise_conv3x3(x, w, b), f"softmax {c}": kernels.softmax(x.copy()),
                 f"layer_norm {c}": kernels.layer_norm(x, b, b), f"linear {c}": kernels.linear(x, lw, b[:5])})
print("\\n".join(f"{k}: {digest(v)}" for k, v in outs.items()))
"""


def test_kernels_give_the_same_bits_compiled_or_loaded_from_the_cache(tmp_path):
    """The first process compiles the kernels and writes numba's cache; the second loads them. Their results must be
    identical. With fastmath "reassoc", numba 0.68's GELU and LayerNorm differed by 1 ulp between the two."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    runs = [subprocess.run([sys.executable, "-c", _KERNEL_DIGESTS], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert any((tmp_path / "numba_cache").rglob("*.nbi")), "the first run wrote no numba cache"
    compiled, cached = (r.stdout.strip().splitlines() for r in runs)
    assert len(compiled) == 24
    differ = [a.split(":")[0] for a, b in zip(compiled, cached) if a != b]
    assert not differ, f"compiled and cached kernels give different results: {differ}"


_ONE_KERNEL = "import numpy as np; from mininp_segformer.nn import kernels; kernels.gelu(np.ones((2, 3), np.float32))"


def _stderr_of(code: str, env: dict, terminal: bool) -> str:
    """What a Python process running `code` writes to stderr: a pseudo-terminal if `terminal`, else a pipe."""
    import os
    import pty
    import subprocess
    import sys

    if not terminal:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=300).stderr
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", code], env=env, stderr=follower, stdout=subprocess.DEVNULL,
                       timeout=300, check=True)
        os.set_blocking(leader, False)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(leader)
        os.close(follower)


def test_first_compile_says_so_on_a_terminal_only(tmp_path):
    """A fresh numba cache: the notice on a terminal; loaded from the cache: no notice; a pipe: never."""
    import os

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    assert kernels.COMPILE_NOTICE in _stderr_of(_ONE_KERNEL, env, terminal=True)  # compiles gelu
    assert kernels.COMPILE_NOTICE not in _stderr_of(_ONE_KERNEL, env, terminal=True)  # loads it from the cache
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "another_cache")
    assert kernels.COMPILE_NOTICE not in _stderr_of(_ONE_KERNEL, env, terminal=False)  # compiles, but no terminal
