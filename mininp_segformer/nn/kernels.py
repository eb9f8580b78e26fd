"""numba kernels for the hot loops; each has a plain-NumPy twin in `layers.py`, and tests hold the pairs equal.

`TWINS` names them: each is `layers.<name>` with the same signature. The building blocks that have no kernel
(BatchNorm, ReLU, the bilinear resize: NumPy does them as fast) are taken from `layers` as they are, so that this
module is a complete `ops` namespace for the network (`backend="numba"`), float32 only.

They work on channels-last float32 arrays, run their outer loop in parallel over rows (`prange`), and keep the
inner loop over channels free of calls and branches so LLVM turns it into SIMD code. Compiled on first use and
cached on disk (`cache=True`), so only the first process pays the compile time.

Two transcendental functions are spelled out because numba would otherwise call libm once per element:

- exp(x): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation < 5e-9 relative),
  and 2^n written straight into a float32's exponent bits;
- erfc(z), z >= 0: Numerical Recipes' Chebyshev fit erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), with a
  fractional error below 1.2e-7 everywhere (Press et al., Numerical Recipes, 2nd ed., Sec. 6.2), which keeps
  GELU(x) = x Phi(x) = x erfc(-x / sqrt 2) / 2 accurate in relative terms far into the negative tail.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numba
import numpy as np
from numba import njit, prange
from numba.core import event

from ..config import LAYER_NORM_EPS
from .layers import (batch_norm, bilinear_taps, conv_output_size, conv_weight_matrix,  # noqa: F401
                     depthwise_conv3x3_weight_grad, relu, resize_bilinear)

TWINS = ("linear", "layer_norm", "gelu", "softmax", "im2col", "conv2d", "depthwise_conv3x3", "depthwise_conv3x3_gelu",
         "add_resized", "resized_argmax")

# numba's threading layer: workqueue, whose threads sleep between parallel loops; OpenMP's keep spinning and compete
# with OpenBLAS's threads for the same cores (measured in docs/performance.md, "Threads"). workqueue runs one
# parallel region at a time per process, so the public kernels below take _LOCK: callers on several Python threads
# queue instead of aborting. NUMBA_THREADING_LAYER, if set, is left to rule.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_LOCK = threading.Lock()

# The first run after an install compiles the kernels and stores them in numba's disk cache; later runs load them
# (docs/installation.md gives the measured times). Tell a person at a terminal why the first run is slow: numba fires
# "numba:compile" only when it really compiles, not when it loads a kernel from its cache.
COMPILE_NOTICE = "mininp_segformer: compiling numba kernels, first run only (~20-60 s) ..."


class _CompileNotice(event.Listener):
    """Prints COMPILE_NOTICE to stderr once per process, when numba starts compiling and stderr is a terminal."""

    shown = False

    def on_start(self, ev):
        if not self.shown and sys.stderr is not None and sys.stderr.isatty():
            print(COMPILE_NOTICE, file=sys.stderr, flush=True)
        self.shown = True

    def on_end(self, ev):
        pass


event.register("numba:compile", _CompileNotice())

# fastmath "contract" lets LLVM fuse a * b + c into one FMA. The other fastmath flags are left off on purpose:
# with "reassoc" the compiler may reorder sums and polynomials as it likes, and numba 0.68 reordered them differently
# in the process that compiled a kernel and in later ones that load it from the disk cache (1 ulp apart; measured
# for GELU and LayerNorm). Results must not depend on that, so the reductions below (`_sum`) fix their own order.
_FLAGS = dict(cache=True, fastmath={"contract"})

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that n * ln2 is subtracted without rounding error
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always", **_FLAGS)
def _sum(x):
    """sum(x[:]) of a float32 vector in a fixed order: 8 interleaved partial sums (which map onto SIMD lanes),
    combined pairwise, then the tail. The same bits however the compiler vectorises."""
    n = x.shape[0]
    n8 = n - n % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
    for j in range(0, n8, 8):
        s0 += x[j]
        s1 += x[j + 1]
        s2 += x[j + 2]
        s3 += x[j + 3]
        s4 += x[j + 4]
        s5 += x[j + 5]
        s6 += x[j + 6]
        s7 += x[j + 7]
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for j in range(n8, n):
        s += x[j]
    return s


@njit(inline="always", **_FLAGS)
def _exp_into(x, out, bits):
    """out[:] = exp(x[:]) for float32 vectors; `bits` is int32 scratch of the same length, viewed as float32."""
    scale = bits.view(np.float32)
    for j in range(x.shape[0]):
        v = min(max(x[j], np.float32(-87.0)), np.float32(88.0))
        n = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - n * _LN2_HI - n * _LN2_LO
        p = np.float32(1 / 5040)
        p = p * r + np.float32(1 / 720)
        p = p * r + np.float32(1 / 120)
        p = p * r + np.float32(1 / 24)
        p = p * r + np.float32(1 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1)
        out[j] = p * r + np.float32(1)
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)  # the float32 2^n
    for j in range(x.shape[0]):
        out[j] *= scale[j]


@njit(inline="always", **_FLAGS)
def gelu_into(x, out, t, z, bits):
    """out[:] = GELU(x[:]) through erfc (see the module docstring); t, z, bits are scratch. `out` may be `x`."""
    for j in range(x.shape[0]):
        a = abs(x[j]) * np.float32(0.7071067811865476)
        tj = np.float32(1) / (np.float32(1) + np.float32(0.5) * a)
        p = np.float32(0.17087277)
        p = p * tj + np.float32(-0.82215223)
        p = p * tj + np.float32(1.48851587)
        p = p * tj + np.float32(-1.13520398)
        p = p * tj + np.float32(0.27886807)
        p = p * tj + np.float32(-0.18628806)
        p = p * tj + np.float32(0.09678418)
        p = p * tj + np.float32(0.37409196)
        p = p * tj + np.float32(1.00002368)
        z[j] = p * tj - np.float32(1.26551223) - a * a
        t[j] = tj  # erfc(a) = t exp(z)
    _exp_into(z, z, bits)
    for j in range(x.shape[0]):
        half_erfc = np.float32(0.5) * t[j] * z[j]  # = Phi(-|x|)
        phi = half_erfc if x[j] < 0 else np.float32(1) - half_erfc
        out[j] = x[j] * phi


@njit(parallel=True, **_FLAGS)
def _gelu(x):
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    c = rows.shape[1]
    for i in prange(rows.shape[0]):
        gelu_into(rows[i], out[i], np.empty(c, np.float32), np.empty(c, np.float32), np.empty(c, np.int32))
    return out.reshape(x.shape)


@njit(parallel=True, **_FLAGS)
def _softmax(x):
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[1]
    for i in prange(rows.shape[0]):
        row = rows[i]
        m = row[0]
        for j in range(1, n):
            m = max(m, row[j])
        for j in range(n):
            row[j] -= m
        _exp_into(row, row, np.empty(n, np.int32))
        inv = np.float32(1) / _sum(row)
        for j in range(n):
            row[j] *= inv
    return x


@njit(parallel=True, **_FLAGS)
def layer_norm_rows(x, weight, bias, eps):
    """The compiled LayerNorm behind `layer_norm`: each row of `x: (..., C)` in parallel, its sums in a fixed order."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    c = rows.shape[1]
    inv_c = np.float32(1 / c)
    eps = np.float32(eps)
    for i in prange(rows.shape[0]):
        row, o = rows[i], out[i]
        mean = _sum(row) * inv_c
        for j in range(c):
            d = row[j] - mean
            o[j] = d * d  # the output row as scratch for the squared deviations
        inv = np.float32(1) / np.sqrt(_sum(o) * inv_c + eps)  # biased variance, as torch
        for j in range(c):
            o[j] = (row[j] - mean) * inv * weight[j] + bias[j]
    return out.reshape(x.shape)


@njit(parallel=True, **_FLAGS)
def _depthwise_conv3x3(x, weight, bias, apply_gelu):
    """Depthwise 3x3 conv (zero padding 1) on `x: (B, H, W, C)`, `weight: (3, 3, C)`, then optionally GELU.

    One output row at a time: for each of the 9 taps, the shifted input row times the tap is added to the whole
    output row -- long contiguous loops over (W, C) that vectorise, with the borders handled by the loop bounds.
    """
    b, h, w, c = x.shape
    out = np.empty_like(x)
    for bi in prange(b * h):
        n, i = bi // h, bi % h
        row = out[n, i]  # (W, C)
        for j in range(w):
            for ch in range(c):
                row[j, ch] = bias[ch]
        for ky in range(3):
            y = i + ky - 1
            if y < 0 or y >= h:
                continue
            for kx in range(3):
                dx = kx - 1
                for j in range(max(0, -dx), min(w, w - dx)):
                    for ch in range(c):  # elements, not row views: a numba view costs an atomic refcount
                        row[j, ch] += x[n, y, j + dx, ch] * weight[ky, kx, ch]
        if apply_gelu:
            flat = row.reshape(w * c)
            gelu_into(flat, flat, np.empty(w * c, np.float32), np.empty(w * c, np.float32),
                       np.empty(w * c, np.int32))
    return out


@njit(parallel=True, cache=True)
def _im2col(x, kernel, stride, padding, h_out, w_out):
    b, h, w, c = x.shape
    cols = np.zeros((b, h_out, w_out, kernel, kernel, c), np.float32)
    for bi in prange(b * h_out):
        n, i = bi // h_out, bi % h_out
        for j in range(w_out):
            for ky in range(kernel):
                y = i * stride + ky - padding
                if 0 <= y < h:
                    for kx in range(kernel):
                        xx = j * stride + kx - padding
                        if 0 <= xx < w:
                            cols[n, i, j, ky, kx] = x[n, y, xx]
    return cols.reshape(b, h_out, w_out, kernel * kernel * c)


@njit(parallel=True, **_FLAGS)
def _add_resized(out, x, i0, i1, th, j0, j1, tw):
    b, oh, ow, c = out.shape
    for bi in prange(b * oh):
        n, i = bi // oh, bi % oh
        a, bb = np.float32(1) - th[i], th[i]
        r0, r1 = x[n, i0[i]], x[n, i1[i]]
        for j in range(ow):
            wa, wb = np.float32(1) - tw[j], tw[j]
            p, q = j0[j], j1[j]
            for ch in range(c):
                # torch's order: along the width first, then the height
                out[n, i, j, ch] += a * (wa * r0[p, ch] + wb * r0[q, ch]) + bb * (wa * r1[p, ch] + wb * r1[q, ch])
    return out



@njit(parallel=True, **_FLAGS)
def _add_bias(y, bias):
    """y[..., :] += bias, in place, rows in parallel."""
    rows = y.reshape(-1, bias.shape[0])
    for i in prange(rows.shape[0]):
        for j in range(bias.shape[0]):
            rows[i, j] += bias[j]
    return y


@njit(parallel=True, **_FLAGS)
def _resized_argmax(x, i0, i1, th, j0, j1, tw):
    """argmax over C of `x: (h, w, C)` bilinearly resized by the given taps, without the resized (H, W, C) stack."""
    oh, ow, c = th.shape[0], tw.shape[0], x.shape[2]
    seg = np.empty((oh, ow), np.int64)
    for i in prange(oh):
        a, bb = np.float32(1) - th[i], th[i]
        r0, r1 = x[i0[i]], x[i1[i]]
        v = np.empty(c, np.float32)
        for j in range(ow):
            wa, wb = np.float32(1) - tw[j], tw[j]
            p, q = j0[j], j1[j]
            for ch in range(c):
                v[ch] = a * (wa * r0[p, ch] + wb * r0[q, ch]) + bb * (wa * r1[p, ch] + wb * r1[q, ch])
            best = 0
            for ch in range(1, c):
                if v[ch] > v[best]:  # strictly greater: ties go to the first class, as np.argmax and torch
                    best = ch
            seg[i, j] = best
    return seg


# ---- the public kernels: the signatures of their twins in layers.py ------------------------------------------------

def _f32(x):
    return np.ascontiguousarray(x, dtype=np.float32)


def gelu(x):
    """Exact-erf GELU, erfc by a Chebyshev fit that vectorises (twin of `layers.gelu`)."""
    x = _f32(x)
    with _LOCK:
        return _gelu(x)


def softmax(x, axis=-1, out=None):
    """Softmax over the last axis, exp by a degree-7 polynomial that vectorises (twin of `layers.softmax`).

    `out`: where to write it (may be `x`: in place, as attention does), else a new array."""
    if axis not in (-1, np.ndim(x) - 1):
        raise ValueError(f"kernels.softmax works over the last axis only; got axis={axis} (use layers.softmax)")
    if out is None:
        out = np.array(x, dtype=np.float32)
    elif out is not x:
        out[...] = x
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("kernels.softmax: out must be a C-contiguous float32 array")
    with _LOCK:
        return _softmax(out)


def layer_norm(x, weight, bias, eps=LAYER_NORM_EPS):
    """LayerNorm over the last axis: per row mean, variance and output in three short loops, no temporaries (twin of
    `layers.layer_norm`)."""
    x = _f32(x)
    with _LOCK:
        return layer_norm_rows(x, weight, bias, eps)


def depthwise_conv3x3(x, weight, bias):
    """Depthwise 3x3 conv on `x: (B, H, W, C)`, `weight: (C, 1, 3, 3)`: row by row, the borders by loop bounds, no
    padded copy (twin of `layers.depthwise_conv3x3`)."""
    return _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu=False)


def depthwise_conv3x3_gelu(x, weight, bias):
    """GELU(depthwise_conv3x3(x)): Mix-FFN's conv and activation in one pass over memory (twin of
    `layers.depthwise_conv3x3_gelu`)."""
    return _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu=True)


def _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu):
    x, taps_last = _f32(x), _f32(weight[:, 0].transpose(1, 2, 0))  # (C, 1, 3, 3) -> (3, 3, C)
    with _LOCK:
        return _depthwise_conv3x3(x, taps_last, bias, apply_gelu)


def linear(x, weight, bias=None):
    """nn.Linear (twin of `layers.linear`): the product goes to BLAS, the bias add to all cores."""
    y = x @ weight.T
    if bias is not None:
        with _LOCK:
            _add_bias(y, bias)
    return y


def im2col(x, kernel: int, stride: int, padding: int):
    """`x: (B, H, W, C)` -> `(B, H_out, W_out, k * k * C)`, in parallel over output rows, no padded copy (twin of
    `layers.im2col`)."""
    h_out = conv_output_size(x.shape[1], kernel, stride, padding)
    w_out = conv_output_size(x.shape[2], kernel, stride, padding)
    x = _f32(x)
    with _LOCK:
        return _im2col(x, kernel, stride, padding, h_out, w_out)


def conv2d(x, weight, bias, stride: int, padding: int):
    """nn.Conv2d as `kernels.im2col` + one product (twin of `layers.conv2d`)."""
    return linear(im2col(x, weight.shape[-1], stride, padding), conv_weight_matrix(weight), bias)


def add_resized(out, x):
    """`out += resize_bilinear(x, out's size, axes=(1, 2))` on channels-last maps: upsample and accumulate in one
    pass; returns out (twin of `layers.add_resized`)."""
    (_, oh, ow, _), (_, h, w, _) = out.shape, x.shape
    i0, i1, th, _ = bilinear_taps(h, oh)  # at the same size: weights 1 and 0, an exact copy
    j0, j1, tw, _ = bilinear_taps(w, ow)
    x = _f32(x)
    with _LOCK:
        return _add_resized(out, x, i0, i1, th, j0, j1, tw)


def resized_argmax(logits, size):
    """`logits: (C, h, w)` -> `(H, W)` int64 argmax of their bilinear resize to `size` (twin of
    `layers.resized_argmax`): HF's post-processing in one pass, with no (C, H, W) intermediate."""
    (out_h, out_w), (_, h, w) = size, logits.shape
    x = _f32(logits.transpose(1, 2, 0))  # channels-last, so the inner loop over classes is contiguous
    i0, i1, th, _ = bilinear_taps(h, out_h)
    j0, j1, tw, _ = bilinear_taps(w, out_w)
    with _LOCK:
        return _resized_argmax(x, i0, i1, th, j0, j1, tw)


# ---- backward twins: what training measured to pay (docs/performance.md, "Training") -----------------------------

TWINS += ("gelu_backward", "depthwise_conv3x3_backward")
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(parallel=True, **_FLAGS)
def _gelu_backward(dout, x):
    """dout * (Phi(x) + x phi(x)) elementwise, in float64 through libm's erf, rounded once to float32."""
    d, v = dout.reshape(-1), x.reshape(-1)
    out = np.empty(v.size, np.float32)
    for i in prange(v.size):
        xi = np.float64(v[i])
        cdf = 0.5 * (1.0 + math.erf(xi * _SQRT_HALF))  # as layers.gelu_backward writes it
        out[i] = np.float32(d[i] * (cdf + xi * math.exp(-0.5 * xi * xi) * _INV_SQRT_2PI))
    return out.reshape(x.shape)


def gelu_backward(dout, x):
    """Gradient of the exact GELU, one parallel pass (twin of `layers.gelu_backward`)."""
    dout, x = _f32(dout), _f32(x)
    with _LOCK:
        return _gelu_backward(dout, x)


def depthwise_conv3x3_backward(dout, x, weight):
    """Gradients of `depthwise_conv3x3` (twin of `layers.depthwise_conv3x3_backward`): dx is the numba conv with the
    kernel rotated by 180 degrees, dweight `layers.depthwise_conv3x3_weight_grad`."""
    dx = depthwise_conv3x3(dout, weight[:, :, ::-1, ::-1], np.zeros(x.shape[-1], dtype=np.float32))
    return dx, depthwise_conv3x3_weight_grad(dout, x), dout.sum(axis=(0, 1, 2))
