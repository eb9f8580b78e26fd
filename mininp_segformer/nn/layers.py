"""The building blocks, each a short NumPy function on arrays.

Layout: feature maps are channels-last, `(B, H, W, C)`, so that the transformer's tokens `(B, N, C)` with
`N = H * W` are the same memory reshaped. Weights keep PyTorch's layouts as stored in the checkpoint
(`nn.Linear`: `(C_out, C_in)`; `nn.Conv2d`: `(C_out, C_in / groups, kH, kW)`) and are re-ordered where used.

This module is the `backend="numpy"` of the model and the readable truth of `kernels.py`, whose numba functions
have the same names and signatures (`kernels.TWINS`). Every function keeps its input's dtype: float32 as the model
runs, or float64 (for gradient checks and for measuring float32's own rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import BATCH_NORM_EPS, BATCH_NORM_MOMENTUM, LAYER_NORM_EPS


def linear(x, weight, bias=None):
    """nn.Linear: `x: (..., C_in)`, `weight: (C_out, C_in)`, `bias: (C_out,)` -> `(..., C_out)`."""
    y = rows(x) @ weight.T  # a transposed view: BLAS reads it in place, no copy
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def rows(x):
    """`(..., C)` -> `(M, C)`, the leading axes flattened (a view when they are contiguous): one matrix product
    instead of NumPy's matmul looping over the leading axes of a stack (a feature map (B, H, W, C) would otherwise
    be B * H separate products of W rows each)."""
    return x.reshape(-1, x.shape[-1])


def linear_backward(dout, x, weight):
    """Gradients of `linear`: `dout: (..., C_out)`, `x: (..., C_in)`, `weight: (C_out, C_in)` -> (dx, dW, db).

    dx = dout W; dW = dout^T x and db = sum(dout), both summed over all leading axes (every token uses one W).
    """
    dout2 = rows(dout)
    return (dout2 @ weight).reshape(x.shape), dout2.T @ rows(x), dout2.sum(axis=0)


def moments(x, axis):
    """Mean and biased variance of `x` over `axis` (an int or a tuple), kept as size-1 axes: torch's statistics."""
    mean = x.mean(axis=axis, keepdims=True)
    centered = x - mean
    return mean, np.mean(centered * centered, axis=axis, keepdims=True)


def layer_norm(x, weight, bias, eps=LAYER_NORM_EPS):
    """nn.LayerNorm over the last axis: `x: (..., C)`; biased variance, as torch. eps is torch's 1e-5 (see config)."""
    mean, var = moments(x, axis=-1)
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * weight + bias


def layer_norm_backward(dout, x, weight, eps=LAYER_NORM_EPS):
    """Gradients of `layer_norm`: `dout, x: (..., C)`, `weight: (C,)` -> (dx, dweight, dbias).

    With xhat = (x - mean) / sigma and g = dout * weight, means over the last axis (llm.c's doc/layernorm):
    dx = (1 / sigma) (g - mean(g) - xhat mean(g xhat)); dweight = sum(dout xhat), dbias = sum(dout) over tokens.
    """
    return normalize_backward(dout, x, weight, eps, axis=-1)


def normalize_backward(dout, x, weight, eps, axis):
    """Backward of y = xhat * weight + bias, xhat = (x - mean) / sqrt(var + eps), statistics over `axis`.

    The three-term formula: the mean and the variance depend on every x of their group, which adds the two
    mean terms to g / sigma. LayerNorm's groups are the last axis; BatchNorm's (train mode) all the others.
    The parameters are per channel (last axis), so their gradients sum over all leading axes.
    """
    mean, var = moments(x, axis)
    rstd = 1 / np.sqrt(var + x.dtype.type(eps))
    xhat = (x - mean) * rstd
    g = dout * weight
    dx = rstd * (g - g.mean(axis=axis, keepdims=True) - xhat * (g * xhat).mean(axis=axis, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return dx, (dout * xhat).sum(axis=leading), dout.sum(axis=leading)


def gelu(x):
    """GELU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)): the exact form torch's nn.GELU() uses, not the tanh one.

    Evaluated in float64 (scipy's erf) and rounded once to `x`'s dtype.
    """
    from scipy.special import erf  # here, not at the top: the default (numba) path never needs scipy's 0.1 s import

    x64 = np.asarray(x, dtype=np.float64)
    return (0.5 * x64 * (1.0 + erf(x64 / np.sqrt(2.0)))).astype(x.dtype)


def gelu_backward(dout, x):
    """Gradient of the exact GELU: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Evaluated in float64, like `gelu`, and rounded once to `x`'s dtype.
    """
    from scipy.special import erf  # as in gelu

    x64 = np.asarray(x, dtype=np.float64)
    cdf = 0.5 * (1.0 + erf(x64 / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x64 * x64) / np.sqrt(2.0 * np.pi)
    return (dout * (cdf + x64 * pdf)).astype(x.dtype)


def softmax(x, axis=-1, out=None):
    """Numerically stable softmax: subtracting the max changes nothing mathematically but avoids overflow.

    `out`: where to write the result (may be `x` itself); a new array by default.
    """
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return np.divide(e, e.sum(axis=axis, keepdims=True), out=out)


def attention_scores(q, k, out=None):
    """S = Q K^T / sqrt(d_head) (paper Eq. 1), per head: `q: (..., N, d_head)`, `k: (..., N_r, d_head)` ->
    `(..., N, N_r)`, into `out` if given. The scale is applied to Q, which is N_r / d_head times smaller than the
    scores it would otherwise multiply."""
    return np.matmul(q * q.dtype.type(q.shape[-1] ** -0.5), np.swapaxes(k, -1, -2), out=out)


def attention(q, k, v):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V (paper Eq. 1), per head: `q: (B, heads, N, d_head)`,
    `k, v: (B, heads, N_r, d_head)` -> (output `(B, heads, N, d_head)`, the probabilities P `(B, heads, N, N_r)`)."""
    scores = attention_scores(q, k)
    probs = softmax(scores, out=scores)  # in place: the scores are not needed again
    return probs @ v, probs


def softmax_backward(dout, probs, axis=-1):
    """Gradient of `softmax` from its output `probs`: the Jacobian diag(p) - p p^T times `dout`, never formed:

    dx = p * (dout - sum(dout * p)), the sum over `axis`.
    """
    return probs * (dout - (dout * probs).sum(axis=axis, keepdims=True))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after nn.Conv2d: floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x, kernel: int, stride: int, padding: int):
    """Unfold every k x k window of `x: (B, H, W, C)` into a row: `(B, H_out, W_out, k * k * C)`.

    Row layout is (ky, kx, c). One strided slice per kernel tap, so the loop runs k*k times, never per pixel.
    """
    b, h, w, c = x.shape
    h_out, w_out = conv_output_size(h, kernel, stride, padding), conv_output_size(w, kernel, stride, padding)
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = np.empty((b, h_out, w_out, kernel, kernel, c), dtype=x.dtype)
    for ky in range(kernel):
        for kx in range(kernel):
            cols[:, :, :, ky, kx, :] = xp[:, ky : ky + stride * h_out : stride, kx : kx + stride * w_out : stride, :]
    return cols.reshape(b, h_out, w_out, kernel * kernel * c)


def im2col_backward(dcols, x_shape, kernel: int, stride: int, padding: int):
    """col2im, the adjoint of `im2col`: `dcols: (B, H_out, W_out, k * k * C)` -> `dx` of shape `x_shape` (B, H, W, C).

    Each kernel tap's slice is added back where im2col read it (overlapping windows sum), then the padding is
    dropped. One strided slice per tap, as in im2col.
    """
    b, h, w, c = x_shape
    _, h_out, w_out, _ = dcols.shape
    dcols = dcols.reshape(b, h_out, w_out, kernel, kernel, c)
    dxp = np.zeros((b, h + 2 * padding, w + 2 * padding, c), dtype=dcols.dtype)
    for ky in range(kernel):
        for kx in range(kernel):
            dxp[:, ky : ky + stride * h_out : stride, kx : kx + stride * w_out : stride, :] += dcols[:, :, :, ky, kx, :]
    return dxp[:, padding : padding + h, padding : padding + w, :]


def conv_weight_matrix(weight):
    """A conv weight `(C_out, C_in, k, k)` as the matrix `(C_out, k * k * C_in)` that multiplies im2col's rows:
    torch's (c, ky, kx) order becomes our channels-last (ky, kx, c)."""
    c_out, c_in, k, _ = weight.shape
    return weight.transpose(0, 2, 3, 1).reshape(c_out, k * k * c_in)


def conv2d(x, weight, bias, stride: int, padding: int):
    """nn.Conv2d as one matmul: `x: (B, H, W, C_in)`, `weight: (C_out, C_in, k, k)` -> `(B, H_out, W_out, C_out)`."""
    k = weight.shape[-1]
    return linear(im2col(x, k, stride, padding), conv_weight_matrix(weight), bias)


def conv2d_backward(dout, x, weight, stride: int, padding: int):
    """Gradients of `conv2d` -> (dx, dweight, dbias): `linear_backward` of the matmul, then `im2col_backward` for
    dx and the weight matrix's gradient put back into torch's `(C_out, C_in, k, k)` layout."""
    c_out, c_in, k, _ = weight.shape
    dcols, dmatrix, dbias = linear_backward(dout, im2col(x, k, stride, padding), conv_weight_matrix(weight))
    dweight = dmatrix.reshape(c_out, k, k, c_in).transpose(0, 3, 1, 2)  # (ky, kx, c) columns back to (c, ky, kx)
    return im2col_backward(dcols, x.shape, k, stride, padding), dweight, dbias


def depthwise_conv3x3(x, weight, bias):
    """Depthwise 3x3 conv, stride 1, zero padding 1 (groups = C): `x: (B, H, W, C)`, `weight: (C, 1, 3, 3)`.

    Each channel is convolved with its own 3x3 filter; summed over the 9 taps as shifted slices.
    """
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.broadcast_to(bias, x.shape).astype(x.dtype)
    for ky in range(3):
        for kx in range(3):
            out += xp[:, ky : ky + h, kx : kx + w, :] * weight[:, 0, ky, kx]
    return out


def depthwise_conv3x3_backward(dout, x, weight):
    """Gradients of `depthwise_conv3x3` -> (dx, dweight, dbias); `dout, x: (B, H, W, C)`, `weight: (C, 1, 3, 3)`.

    out = sum over the 9 taps (ky, kx) of shift(x, ky, kx) * w[:, ky, kx] + b, each channel on its own, so
    dweight[:, ky, kx] = sum over pixels of dout * shift(x, ky, kx), and dx is the same conv run backwards: dout
    correlated with the kernel rotated by 180 degrees (the transpose of a stride-1, pad-1 conv is that conv).
    """
    dx = depthwise_conv3x3(dout, weight[:, :, ::-1, ::-1], np.zeros(x.shape[-1], dtype=dout.dtype))
    return dx, depthwise_conv3x3_weight_grad(dout, x), dout.sum(axis=(0, 1, 2))


def depthwise_conv3x3_weight_grad(dout, x):
    """dweight of `depthwise_conv3x3`, `(C, 1, 3, 3)`: per tap (ky, kx), the sum over pixels of dout times the
    input shifted by that tap (each channel on its own)."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dweight = np.empty((c, 1, 3, 3), dtype=x.dtype)
    for ky in range(3):
        for kx in range(3):
            dweight[:, 0, ky, kx] = np.einsum("bhwc,bhwc->c", xp[:, ky : ky + h, kx : kx + w, :], dout)
    return dweight


def depthwise_conv3x3_gelu(x, weight, bias):
    """GELU(depthwise_conv3x3(x)): Mix-FFN's conv and its activation (the numba twin does both in one pass)."""
    return gelu(depthwise_conv3x3(x, weight, bias))


def batch_norm(x, weight, bias, running_mean, running_var, eps=BATCH_NORM_EPS):
    """nn.BatchNorm2d at inference, over the last (channel) axis: (x - mean) / sqrt(var + eps) * weight + bias."""
    return (x - running_mean) / np.sqrt(running_var + x.dtype.type(eps)) * weight + bias


def batch_norm_backward(dout, x, weight, running_mean, running_var, eps=BATCH_NORM_EPS):
    """Gradients of the inference `batch_norm` -> (dx, dweight, dbias); `dout, x: (..., C)`, the rest `(C,)`.

    The statistics are constants here, so it is a per-channel affine map: dx = dout * weight / sqrt(var + eps);
    dweight = sum(dout * xhat), dbias = sum(dout) over all leading axes.
    """
    rstd = 1 / np.sqrt(running_var + x.dtype.type(eps))
    leading = tuple(range(x.ndim - 1))
    return dout * (weight * rstd), (dout * (x - running_mean) * rstd).sum(axis=leading), dout.sum(axis=leading)


def batch_norm_train(x, weight, bias, eps=BATCH_NORM_EPS):
    """nn.BatchNorm2d in train mode, channels-last `x: (..., C)` -> (out, mean, var), each `(C,)` statistic taken
    over all axes but the last; `var` is the biased one, which is what normalises, as torch.

    torch then updates its running estimates from these: `update_running_stats`.
    """
    mean, var = moments(x, tuple(range(x.ndim - 1)))
    mean, var = mean.reshape(-1), var.reshape(-1)
    return batch_norm(x, weight, bias, mean, var, eps), mean, var


def batch_norm_train_backward(dout, x, weight, eps=BATCH_NORM_EPS):
    """Gradients of `batch_norm_train`'s `out` -> (dx, dweight, dbias): layer norm's three-term formula with the
    means taken over all axes but the channels (the batch statistics depend on every x of their channel)."""
    return normalize_backward(dout, x, weight, eps, axis=tuple(range(x.ndim - 1)))


def update_running_stats(bn: dict, mean, var, count: int, momentum=BATCH_NORM_MOMENTUM):
    """What a train-mode forward of nn.BatchNorm2d does to its buffers, in place on `bn` (a `batch_norm` subtree):
    running = (1 - momentum) running + momentum batch, with the *unbiased* variance var * n / (n - 1) although the
    biased one normalised (torch's rule); n = `count`, the values per channel. num_batches_tracked, if present,
    counts the batches (torch's bookkeeping: with a set momentum nothing reads it)."""
    for name, batch in (("running_mean", mean), ("running_var", var * (count / (count - 1)))):
        bn[name] *= 1 - momentum
        bn[name] += momentum * batch.astype(bn[name].dtype, copy=False)
    if "num_batches_tracked" in bn:
        bn["num_batches_tracked"] = bn["num_batches_tracked"] + 1


# ---- train mode: dropout and stochastic depth

@dataclass(frozen=True)
class Mode:
    """torch's `module.training` and what train mode draws from: passed down to every component that behaves
    differently in training. `EVAL` (the default everywhere) is inference: no dropout, BatchNorm on its running
    statistics. The probabilities are the config's; `rng` is the seedable NumPy Generator every mask comes from."""

    training: bool = False
    rng: np.random.Generator | None = None
    hidden_dropout: float = 0.0  # hidden_dropout_prob: the attention's output dense, twice in the Mix-FFN
    attention_dropout: float = 0.0  # attention_probs_dropout_prob: on the attention probabilities
    classifier_dropout: float = 0.0  # classifier_dropout_prob: the decode head, before its classifier
    drop_path_rate: float = 0.0  # the last block's stochastic depth; block k gets linspace(0, rate, blocks)[k]


EVAL = Mode()


def dropout(x, p: float, rng, shape=None):
    """nn.Dropout in train mode ("inverted" dropout) -> (out, keep): each element is zeroed with probability p and
    the survivors are scaled by 1 / (1 - p), so E[out] = x and nothing needs rescaling at inference.

    `keep`: the boolean mask drawn, of `shape` (default x's; a shape that broadcasts against x drops whole slices),
    None when nothing is drawn: p = 0, or no `rng` (eval mode), where out is x itself.
    """
    if rng is None or p == 0:
        return x, None
    keep = rng.random(x.shape if shape is None else shape, dtype=np.float32) >= p
    return x * keep * x.dtype.type(0 if p >= 1 else 1 / (1 - p)), keep


def dropout_backward(dout, keep, p: float):
    """Gradient of `dropout` (and of `drop_path`): the same mask and scale, `dout * keep / (1 - p)`."""
    return dout if keep is None else dout * keep * dout.dtype.type(0 if p >= 1 else 1 / (1 - p))


def drop_path(x, p: float, rng):
    """Stochastic depth (HF's `drop_path`) on a residual branch `x: (B, ...)` -> (out, keep `(B, 1, ...)`): per
    sample, the whole branch is dropped with probability p or kept and scaled by 1 / (1 - p).

    HF draws keep = floor((1 - p) + U[0, 1)), which is 1 exactly when U >= p: `dropout` with one draw per sample.
    """
    return dropout(x, p, rng, shape=(x.shape[0],) + (1,) * (x.ndim - 1))


def relu(x):
    return np.maximum(x, 0)


def relu_backward(dout, x):
    """dx = dout where x > 0, else 0 (at x = 0 too, as torch)."""
    return dout * (x > 0)


def bilinear_taps(size_in: int, size_out: int):
    """Source indices and weights of 1-D linear interpolation, torch's `align_corners=False` convention.

    Output pixel i samples the input at x = (i + 0.5) * size_in / size_out - 0.5 (pixel centres aligned), clamped
    at 0 below; the two neighbours floor(x) and floor(x) + 1 (clamped to the last pixel) are weighted 1 - t and t.
    torch's CPU kernel takes the scale in float32 and evaluates x with one fused multiply-add (a single rounding
    to float32); evaluating in float64 and rounding once reproduces its weights bit for bit.
    """
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    x = (scale * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
    x = np.maximum(x, np.float32(0))
    i0 = np.minimum(x.astype(np.int64), size_in - 1)  # x >= 0, so the cast is floor
    i1 = np.minimum(i0 + 1, size_in - 1)
    t = x - i0.astype(np.float32)
    return i0, i1, t, np.float32(1) - t


def _resize_axis(x, axis: int, size_out: int):
    """Linear interpolation of `x` along one axis to `size_out` samples."""
    size_in = x.shape[axis]
    if size_in == size_out:
        return x  # torch: scale 1 gives weights (1, 0) exactly, an identity
    i0, i1, t, one_minus_t = bilinear_taps(size_in, size_out)
    shape = [1] * x.ndim
    shape[axis] = size_out
    t, one_minus_t = t.astype(x.dtype), one_minus_t.astype(x.dtype)  # float32 taps, as torch: exact in float64 too
    return np.take(x, i0, axis=axis) * one_minus_t.reshape(shape) + np.take(x, i1, axis=axis) * t.reshape(shape)


def resize_bilinear(x, size, axes=(-2, -1)):
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False) on two axes of `x`.

    `size` is (height, width); `axes` names the height and width axes: the default (-2, -1) fits (B, C, H, W),
    (1, 2) fits channels-last (B, H, W, C). Separable: along width first, then height, which is the same sum, in
    the same order, as torch's h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d).
    """
    ax_h, ax_w = (a % x.ndim for a in axes)
    out_h, out_w = size
    return _resize_axis(_resize_axis(x, ax_w, out_w), ax_h, out_h)



def _taps_backward(dout, i0, i1, t, one_minus_t, size_in: int):
    """The adjoint of `y[i] = x[i0[i]] (1 - t[i]) + x[i1[i]] t[i]` along axis 0: `dout: (size_out, ...)` ->
    `dx: (size_in, ...)`. The taps are a (size_out, size_in) matrix R with two entries a row (summed where i0 = i1
    at the border), so dx = R^T dout: one BLAS product, not a scatter of every element."""
    rows = np.arange(len(i0))
    r = np.zeros((len(i0), size_in), dtype=dout.dtype)
    np.add.at(r, (rows, i0), one_minus_t.astype(dout.dtype))  # small: R itself, not the gradient
    np.add.at(r, (rows, i1), t.astype(dout.dtype))
    return (r.T @ dout.reshape(len(i0), -1)).reshape((size_in,) + dout.shape[1:])


def _resize_axis_backward(dout, axis: int, size_in: int):
    """The adjoint of `_resize_axis` (a linear map, so its transpose): back from `dout.shape[axis]` to `size_in`."""
    if dout.shape[axis] == size_in:
        return dout  # the forward is an identity at equal sizes
    dx = _taps_backward(np.moveaxis(dout, axis, 0), *bilinear_taps(size_in, dout.shape[axis]), size_in)
    return np.moveaxis(dx, 0, axis)


def resize_bilinear_backward(dout, in_size, axes=(-2, -1)):
    """The adjoint (transpose) of `resize_bilinear`: `dout` has the resized shape, `in_size` is the input's
    (height, width); returns `dx` with the input's shape.

    resize = R_h R_w (width first), so dx = R_w^T R_h^T dout: the height pass undone first, then the width pass.
    """
    ax_h, ax_w = (a % dout.ndim for a in axes)
    in_h, in_w = in_size
    return _resize_axis_backward(_resize_axis_backward(dout, ax_h, in_h), ax_w, in_w)

def add_resized(out, x, size=None, start: int = 0):
    """`out += resize_bilinear(x, size, axes=(1, 2))[:, start : start + H]` on channels-last maps, `out: (B, H, W,
    C)`; returns `out`. `size` defaults to out's own (H, W): then the whole resized map is added.

    The fused decoder's upsample-and-sum (`decoder.fused_decode_head`), which works in bands of output rows."""
    size = resized_band(out.shape, size, start)
    for n in range(out.shape[0]):  # each image: its rows start:stop of resize_bilinear(x[n], size)
        out[n] += resize_rows(x[n], size, start, start + out.shape[1])
    return out


def resized_band(shape, size, start: int) -> tuple[int, int]:
    """`size` (default: the band's own (H, W)) once checked: a band of `shape` (B, H, W, C) must be rows
    start:start + H of a map of that size, as wide as it (`add_resized`)."""
    size = tuple(shape[1:3]) if size is None else tuple(size)
    if size[1] != shape[2] or not 0 <= start <= size[0] - shape[1]:
        raise ValueError(f"add_resized: out {tuple(shape)} is not rows {start}:{start + shape[1]} of a map of size "
                         f"{size}")
    return size


BAND_ROWS = 64  # output rows `resized_argmax` makes at a time


def resized_argmax(logits, size):
    """argmax over classes of `logits: (C, h, w)` bilinearly resized to `size` -> `(H, W)` int64 class ids.

    HF's post-processing, in bands of output rows (`resize_rows`): the same numbers as resizing the whole (C, H, W)
    stack at once, but memory stays O(C * BAND_ROWS * W) -- a 150-class map of a 6000 x 4000 photo would need 14 GB.
    """
    x = logits.transpose(1, 2, 0)  # (h, w, C), a view
    seg = np.empty(size, dtype=np.int64)
    for start in range(0, size[0], BAND_ROWS):
        stop = min(start + BAND_ROWS, size[0])
        seg[start:stop] = resize_rows(x, size, start, stop).argmax(axis=-1)
    return seg


def resize_rows(x, size, start: int, stop: int, in_h: int | None = None, offset: int = 0):
    """Rows `start:stop` of `resize_bilinear(full, size, axes=(0, 1))`, computed from the rows of `full` they need.

    `x: (r, w, C)` holds rows `offset .. offset + r` of an `(in_h, w, C)` map `full` (default: all of it). Same
    numbers, bit for bit, as resizing the whole map (width first, then the same two-tap sum along the height); what
    lets huge outputs be made band by band (`resized_argmax`, and the sliding-window inference).
    """
    in_h = x.shape[0] if in_h is None else in_h
    out_h, out_w = size
    if in_h == out_h:
        return resize_bilinear(x[start - offset : stop - offset], (stop - start, out_w), axes=(0, 1))
    i0, i1, t, one_minus_t = (a[start:stop] for a in bilinear_taps(in_h, out_h))
    lo, hi = int(i0[0]), int(i1[-1]) + 1  # the taps rise with the row, so these bound the rows needed
    wide = resize_bilinear(x[lo - offset : hi - offset], (hi - lo, out_w), axes=(0, 1))  # along the width only
    t, one_minus_t = t.astype(x.dtype)[:, None, None], one_minus_t.astype(x.dtype)[:, None, None]
    return wide[i0 - lo] * one_minus_t + wide[i1 - lo] * t


def resize_rows_backward(dout, dx, size, start: int, stop: int):
    """The adjoint of `resize_rows(full, size, start, stop)`, accumulated (llm.c style) into `dx`, the gradient of
    the whole `(in_h, w, ...)` map `full`; returns `dx`.

    `dout: (stop - start, W, ...)` is the gradient of those output rows. It goes back through the height taps into
    the width-resized rows `lo:hi` they read, then through the width adjoint onto rows `lo:hi` of `dx`; summed over
    bands that tile the output, it is `resize_bilinear_backward(dout, (in_h, w), axes=(0, 1))`.
    """
    in_h, in_w = dx.shape[:2]
    out_h, out_w = size
    if in_h == out_h:
        dx[start:stop] += resize_bilinear_backward(dout, (stop - start, in_w), axes=(0, 1))
        return dx
    i0, i1, t, one_minus_t = (a[start:stop] for a in bilinear_taps(in_h, out_h))
    lo, hi = int(i0[0]), int(i1[-1]) + 1
    dwide = _taps_backward(dout, i0 - lo, i1 - lo, t, one_minus_t, hi - lo)  # (hi - lo, W, ...)
    dx[lo:hi] += resize_bilinear_backward(dwide, (hi - lo, in_w), axes=(0, 1))  # the width adjoint only
    return dx
