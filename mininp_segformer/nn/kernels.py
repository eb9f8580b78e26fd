"""numba kernels for the hot loops; each has a plain-NumPy twin in `layers.py`, and tests hold the pairs equal.

`TWINS` names them: each is `layers.<name>` with the same signature. The building blocks that have no kernel
(BatchNorm, ReLU, the bilinear resize: NumPy does them as fast) are taken from `layers` as they are, so that this
module is a complete `ops` namespace for the network (`backend="numba"`), float32 only.

They work on channels-last float32 arrays and keep the inner loop over channels free of calls and branches so LLVM
turns it into SIMD code. Each compiled kernel is a plain loop over a range of rows, `start:stop`, that releases the
GIL; the public function splits the rows across threads (`threads.parallel_rows`). numba's `parallel=True` (prange)
would split them itself, but compiles 4-7 times slower, and a fresh install waits for that compile. Each public
function also hands its kernel one array type (C-contiguous float32 of a fixed number of dimensions), so that numba
compiles one specialisation per kernel. Compiled on first use and cached on disk (`cache=True`), so only the first
process pays the compile time (a few seconds; docs/performance.md, "Cold start").

Two functions are spelled out because numba would otherwise call libm once per element:

- exp(x) (softmax): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation < 5e-9
  relative), and 2^n written straight into a float32's exponent bits;
- GELU(x) = x Phi(x), the normal CDF Phi by a rational function: Phi(x) - 1/2 = x P(x^2) / Q(x^2) for |x| <= 4 sqrt 2,
  P and Q of degree 5, fitted by `tools/fit_gelu.py` (largest error 2.1e-8 with these float32 coefficients, under
  half of float32's spacing at 1/2), and 0 or 1 beyond. One division and a dozen multiply-adds, no exp: 3x faster
  than the erfc form it replaced, with the same absolute accuracy; in the far negative tail it shares PyTorch's
  relative error (chapter 9).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, event
from numba.extending import intrinsic, overload

from ..config import LAYER_NORM_EPS
from ..threads import STREAM_MIN_BLOCK, parallel_bands, parallel_rows
from .layers import (attention_scores, batch_norm, bilinear_taps, conv_output_size,  # noqa: F401
                     conv_weight_matrix, depthwise_conv3x3_weight_grad, relu, resize_bilinear, resized_band, rows)

TWINS = ("attention", "linear", "layer_norm", "gelu", "softmax", "im2col", "conv2d", "depthwise_conv3x3",
         "depthwise_conv3x3_gelu", "add_resized", "resized_argmax")

# For a kernel compiled with parallel=True (prange; the kernels below split their rows with `parallel_rows` instead):
# numba's threading layer is workqueue, whose threads sleep between parallel loops; OpenMP's keep spinning and compete
# with OpenBLAS's threads for the same cores (measured in docs/performance.md, "Threads"). workqueue runs one
# parallel region at a time per process, so such a kernel's caller takes _LOCK: callers on several Python threads
# queue instead of aborting. NUMBA_THREADING_LAYER, if set, is left to rule.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_LOCK = threading.Lock()

# The first run after an install compiles the kernels and stores them in numba's disk cache; later runs load them
# (docs/performance.md, "Cold start", gives the measured times). Tell a person at a terminal why the first run is
# slow: numba fires "numba:compile" only when it really compiles, not when it loads a kernel from its cache.
COMPILE_NOTICE = "mininp_segformer: compiling numba kernels, first run only (~5-10 s) ..."


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
# error_model="numpy": a float division by zero gives inf as in NumPy, instead of Python's ZeroDivisionError, whose
# check per element kept LLVM from vectorising a division (GELU's, then 1 / (1 + a / 2): 2.6x slower;
# docs/performance.md).
_FLAGS = dict(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that n * ln2 is subtracted without rounding error
_LN2_LO = np.float32(-2.12194440e-4)


LANES = 8  # the partial sums and maxima of `_sum` and `_max`: one 8-wide SIMD register (AVX's 256 bits)


def _lane_sums(x):
    """The 8 interleaved partial sums of a 1-D float32 array: lane k = x[k] + x[k + 8] + x[k + 16] + ..., in that
    order, over the whole multiples of 8. The readable definition; compiled, numba runs `_lane_loop`'s IR."""
    lanes = np.zeros(LANES, np.float32)
    for j in range(0, len(x) - len(x) % LANES, LANES):
        lanes += x[j : j + LANES]
    return tuple(lanes)


def _lane_maxima(x):
    """The 8 interleaved running maxima of a 1-D float32 array, each lane starting from x[0] and taking
    x[k + 8 i] where it is greater (the scalar `x[j] if x[j] > m else m`, so a NaN never wins)."""
    lanes = np.full(LANES, x[0], np.float32)
    for j in range(0, len(x) - len(x) % LANES, LANES):
        lanes = np.where(x[j : j + LANES] > lanes, x[j : j + LANES], lanes)
    return tuple(lanes)


def _lane_loop(python_twin, start, step):
    """Compile `python_twin` (`_lane_sums` or `_lane_maxima`) as a loop over one 8-wide vector register, written in
    LLVM IR: `start(builder, data, vector_type)` is the lanes' first value, `step(builder, lanes, v)` folds in the
    next 8 elements `v`.

    Written out because numba turns LLVM's SLP vectoriser off (`NUMBA_SLP_VECTORIZE`, since numba issue 8705), so 8
    interleaved scalar partial sums in Python stay 8 scalar chains, and the loop vectoriser reorders a plain sum
    only under fastmath "reassoc" (see _FLAGS). The lanes are the same 8 partial results either way, so the bits do
    not change; only the time: softmax on (16384, 256) 4.1 -> 3.2 ms, LayerNorm on (16384, 32) 0.45 -> 0.28 ms on
    one thread (docs/performance.md). Takes C-contiguous 1-D float32 arrays only (numba refuses others when it
    compiles the caller). Under NUMBA_DISABLE_JIT the Python twin runs instead."""

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        i64, vector = ir.IntType(64), ir.VectorType(ir.FloatType(), LANES)
        whole = builder.and_(builder.extract_value(array.shape, 0), ir.Constant(i64, -LANES))  # n - n % 8
        first = start(builder, array.data, vector)
        entry, test = builder.block, builder.append_basic_block("lanes.test")
        body, done = builder.append_basic_block("lanes.body"), builder.append_basic_block("lanes.done")
        builder.branch(test)
        builder.position_at_end(test)  # for (j = 0; j < whole; j += 8) lanes = step(lanes, x[j : j + 8])
        j, lanes = builder.phi(i64), builder.phi(vector)
        j.add_incoming(ir.Constant(i64, 0), entry)
        lanes.add_incoming(first, entry)
        builder.cbranch(builder.icmp_signed("<", j, whole), body, done)
        builder.position_at_end(body)
        v = builder.load(builder.bitcast(builder.gep(array.data, [j]), vector.as_pointer()), align=4)
        j.add_incoming(builder.add(j, ir.Constant(i64, LANES)), body)
        lanes.add_incoming(step(builder, lanes, v), body)
        builder.branch(test)
        builder.position_at_end(done)
        return cgutils.pack_array(builder, [builder.extract_element(lanes, ir.Constant(ir.IntType(32), k))
                                            for k in range(LANES)])

    def typer(typingctx, x):
        if isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32 and x.layout == "C":
            return types.UniTuple(types.float32, LANES)(x), codegen

    typer.__name__ = f"{python_twin.__name__}_ir"
    compiled = intrinsic(typer)
    overload(python_twin)(lambda x: lambda x: compiled(x))  # inside numba, a call of the twin runs the IR


def _splat_first(builder, data, vector):  # all 8 lanes = x[0]
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), builder.load(data), ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


_lane_loop(_lane_sums, lambda builder, data, vector: ir.Constant(vector, [0.0] * LANES),
           lambda builder, lanes, v: builder.fadd(lanes, v))
_lane_loop(_lane_maxima, _splat_first,  # lanes = v if v > lanes else lanes, lane by lane
           lambda builder, lanes, v: builder.select(builder.fcmp_ordered(">", v, lanes), v, lanes))


@njit(inline="always", **_FLAGS)
def _sum(x):
    """sum(x[:]) of a C-contiguous float32 vector in a fixed order: 8 interleaved partial sums (`_lane_sums`: one
    SIMD register), combined pairwise, then the tail. The same bits however the compiler vectorises."""
    s0, s1, s2, s3, s4, s5, s6, s7 = _lane_sums(x)
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    n = x.shape[0]
    for j in range(n - n % LANES, n):
        s += x[j]
    return s


@njit(inline="always", **_FLAGS)
def _max(x):
    """max(x[:]) of a C-contiguous float32 vector, as 8 interleaved running maxima like `_sum` (`_lane_maxima`):
    a plain `m = max(m, x[j])` keeps Python's NaN rules per element, and LLVM leaves that loop scalar (softmax 2x
    slower; the rows here hold no NaN)."""
    m0, m1, m2, m3, m4, m5, m6, m7 = _lane_maxima(x)
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    n = x.shape[0]
    for j in range(n - n % LANES, n):
        m = max(m, x[j])
    return m


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


# Phi(x) - 1/2 = x P(x^2) / Q(x^2) for |x| <= GELU_L, the fit of tools/fit_gelu.py (largest error 2.1e-8 with these
# float32 coefficients, under half of float32's spacing at 1/2); past GELU_L, Phi is 0 or 1 in float32
GELU_L = np.float32(4 * math.sqrt(2))
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(v) for v in (3.98942215e-01, 3.46989017e-02, 4.72611220e-03,
                                                       1.76963823e-04, 6.36150475e-06, 2.17945276e-08))
_Q1, _Q2, _Q3, _Q4, _Q5 = (np.float32(v) for v in (2.53642851e-01, 2.91223839e-02, 1.93076778e-03, 7.60103994e-05,
                                                   1.17029173e-06))


@njit(inline="always", **_FLAGS)
def gelu_into(x, out):
    """out[:] = GELU(x[:]) = x Phi(x), Phi by a rational function (see the module docstring). `out` may be `x`."""
    for j in range(x.shape[0]):
        v = x[j]
        c = min(max(v, -GELU_L), GELU_L)
        s = c * c
        p = _P5 * s + _P4
        p = p * s + _P3
        p = p * s + _P2
        p = p * s + _P1
        p = p * s + _P0
        q = _Q5 * s + _Q4
        q = q * s + _Q3
        q = q * s + _Q2
        q = q * s + _Q1
        q = q * s + np.float32(1)
        phi = min(max(np.float32(0.5) + c * p / q, np.float32(0)), np.float32(1))  # its rounding may step outside
        out[j] = v * (np.float32(0) if v < -GELU_L else phi)  # exactly -0.0 far left, as torch's 1 + erf(x / sqrt 2)


@njit(**_FLAGS)
def _gelu_rows(x, out, start, stop):
    """out[i] = GELU(x[i]) for the rows start:stop of `x, out: (rows, C)`."""
    for i in range(start, stop):
        gelu_into(x[i], out[i])


@njit(**_FLAGS)
def _softmax_rows(x, start, stop):
    """Softmax of the rows start:stop of `x: (rows, N)`, in place."""
    n = x.shape[1]
    bits = np.empty(n, np.int32)
    for i in range(start, stop):
        row = x[i]
        m = _max(row)
        for j in range(n):
            row[j] -= m
        _exp_into(row, row, bits)
        inv = np.float32(1) / _sum(row)
        for j in range(n):
            row[j] *= inv


@njit(**_FLAGS)
def layer_norm_rows(x, weight, bias, eps, out, start, stop):
    """The compiled LayerNorm behind `layer_norm`: rows start:stop of `x: (rows, C)` into `out`, sums in a fixed
    order."""
    c = x.shape[1]
    inv_c = np.float32(1 / c)
    eps = np.float32(eps)
    for i in range(start, stop):
        mean = _sum(x[i]) * inv_c
        for j in range(c):
            d = x[i, j] - mean
            out[i, j] = d * d  # the output row as scratch for the squared deviations
        inv = np.float32(1) / np.sqrt(_sum(out[i]) * inv_c + eps)  # biased variance, as torch
        for j in range(c):
            out[i, j] = (x[i, j] - mean) * inv * weight[j] + bias[j]


@njit(**_FLAGS)
def _depthwise_conv3x3(x, weight, bias, apply_gelu, out, start, stop):
    """Depthwise 3x3 conv (zero padding 1) on `x: (B, H, W, C)`, `weight: (3, 3, C)`, then optionally GELU, into
    the output rows start:stop of `out` (rows numbered across the batch: n * H + i).

    One output pixel at a time: its 9 taps are summed in registers over the channels (a loop that vectorises),
    the bias first, then the taps in (ky, kx) order. A row above or below the map reads a row of zeros; the first
    and last pixel of a row, whose left or right taps fall in the padding, skip those taps
    (`_depthwise_edge_pixel`). Summing a pixel in registers instead of adding each tap to the whole output row
    halves the conv's time (B0's stage 1: 2.7 -> 1.4 ms a block on one thread), with the same bits (where a sum
    is zero its sign may differ: a row of zeros adds +0.0).
    """
    b, h, w, c = x.shape
    zeros = np.zeros((w, c), np.float32)
    for bi in range(start, stop):
        n, i = bi // h, bi % h
        above = x[n, i - 1] if i > 0 else zeros
        here = x[n, i]
        below = x[n, i + 1] if i < h - 1 else zeros
        row = out[n, i]
        for j in range(w):
            if j == 0 or j == w - 1:
                _depthwise_edge_pixel(above, here, below, weight, bias, row, j)
                continue
            for ch in range(c):  # elements, not row views: a numba view costs an atomic refcount
                s = bias[ch]
                s += above[j - 1, ch] * weight[0, 0, ch]
                s += above[j, ch] * weight[0, 1, ch]
                s += above[j + 1, ch] * weight[0, 2, ch]
                s += here[j - 1, ch] * weight[1, 0, ch]
                s += here[j, ch] * weight[1, 1, ch]
                s += here[j + 1, ch] * weight[1, 2, ch]
                s += below[j - 1, ch] * weight[2, 0, ch]
                s += below[j, ch] * weight[2, 1, ch]
                s += below[j + 1, ch] * weight[2, 2, ch]
                row[j, ch] = s
        if apply_gelu:
            flat = row.reshape(w * c)
            gelu_into(flat, flat)


@njit(inline="always", **_FLAGS)
def _depthwise_edge_pixel(above, here, below, weight, bias, row, j):
    """row[j] of `_depthwise_conv3x3` for a pixel at the left or right end of its row: the taps that fall past the
    end are left out, the others summed in the same order."""
    w, c = row.shape
    for ch in range(c):
        row[j, ch] = bias[ch]
    for ky in range(3):
        src = above if ky == 0 else here if ky == 1 else below
        for kx in range(3):
            jj = j + kx - 1
            if 0 <= jj < w:
                for ch in range(c):
                    row[j, ch] += src[jj, ch] * weight[ky, kx, ch]


@njit(**_FLAGS)
def _im2col(x, kernel, stride, padding, cols, start, stop):
    """The output rows start:stop (n * H_out + i) of im2col into `cols: (B, H_out, W_out, k * k * C)` from `x: (B,
    H, W * C)`, a map with each row's pixels side by side. A window row that lies inside the map is k * C
    consecutive numbers in both: one loop copies it; the others go tap by tap, zeros where a tap falls in the
    padding."""
    b, h, wc = x.shape
    h_out, w_out, cc = cols.shape[1], cols.shape[2], cols.shape[3]
    c = cc // (kernel * kernel)
    w = wc // c
    kc = kernel * c
    for bi in range(start, stop):
        n, i = bi // h_out, bi % h_out
        for j in range(w_out):
            x0 = j * stride - padding
            for ky in range(kernel):
                y = i * stride + ky - padding
                col = ky * kc
                if 0 <= y < h and 0 <= x0 and x0 + kernel <= w:
                    for t in range(kc):
                        cols[n, i, j, col + t] = x[n, y, x0 * c + t]
                    continue
                for kx in range(kernel):
                    xx = x0 + kx
                    inside = 0 <= y < h and 0 <= xx < w
                    for ch in range(c):
                        cols[n, i, j, col + kx * c + ch] = x[n, y, xx * c + ch] if inside else np.float32(0)


@njit(**_FLAGS)
def _add_resized(out, x, i0, i1, th, j0, j1, tw, start, stop):
    """out[n, i] += the bilinear resize of `x` at output row i, for the rows start:stop (n * H + i)."""
    b, oh, ow, c = out.shape
    for bi in range(start, stop):
        n, i = bi // oh, bi % oh
        a, bb = np.float32(1) - th[i], th[i]
        r0, r1 = i0[i], i1[i]
        for j in range(ow):
            wa, wb = np.float32(1) - tw[j], tw[j]
            p, q = j0[j], j1[j]
            for ch in range(c):
                # torch's order: along the width first, then the height
                out[n, i, j, ch] += (a * (wa * x[n, r0, p, ch] + wb * x[n, r0, q, ch])
                                     + bb * (wa * x[n, r1, p, ch] + wb * x[n, r1, q, ch]))


@njit(**_FLAGS)
def _add_bias(y, bias, start, stop):
    """y[i, :] += bias for the rows start:stop of `y: (rows, C)`, in place."""
    for i in range(start, stop):
        for j in range(bias.shape[0]):
            y[i, j] += bias[j]


@njit(**_FLAGS)
def _resized_argmax(x, i0, i1, th, j0, j1, tw, seg, start, stop):
    """Rows start:stop of `seg: (H, W)` = argmax over C of `x: (h, w, C)` bilinearly resized by the given taps,
    without the resized (H, W, C) stack."""
    ow, c = tw.shape[0], x.shape[2]
    v = np.empty(c, np.float32)
    for i in range(start, stop):
        a, bb = np.float32(1) - th[i], th[i]
        r0, r1 = i0[i], i1[i]
        for j in range(ow):
            wa, wb = np.float32(1) - tw[j], tw[j]
            p, q = j0[j], j1[j]
            for ch in range(c):
                v[ch] = a * (wa * x[r0, p, ch] + wb * x[r0, q, ch]) + bb * (wa * x[r1, p, ch] + wb * x[r1, q, ch])
            best = 0
            for ch in range(1, c):
                if v[ch] > v[best]:  # strictly greater: ties go to the first class, as np.argmax and torch
                    best = ch
            seg[i, j] = best


@njit(cache=True, nogil=True)  # no fastmath: numpy's operations in numpy's order, so the same bits as the twin
def _window_average(logits, y0, x0, slots, i0, i1, th, j0, j1, tw, count_y, count_x, argmax, out, seg, row0,
                    start, stop):
    """Rows row0 + start : row0 + stop of mmseg's slide average (see `window_average`), written to `out[start:stop]`
    or, with `argmax`, as class ids to `seg[start:stop]`. Each output row is summed in a buffer of its own: every
    covering window, resized to the window (width first, then height, as `layers.resize_bilinear`), is added in
    window order."""
    wh, ww, width, c = th.shape[0], tw.shape[0], count_x.shape[0], logits.shape[3]
    buf = np.empty((width, c), np.float32)
    for k in range(start, stop):
        i = row0 + k
        acc = buf if argmax else out[k]
        acc[:] = 0
        for s in slots:
            r = i - y0[s]
            if r < 0 or r >= wh:
                continue
            ta, tb = np.float32(1) - th[r], th[r]
            la, lb, left = logits[s, i0[r]], logits[s, i1[r]], x0[s]  # locals, so that LLVM vectorises over ch
            for q in range(ww):
                p0, p1, ua, ub, o = j0[q], j1[q], np.float32(1) - tw[q], tw[q], left + q
                for ch in range(c):
                    wa = la[p0, ch] * ua + la[p1, ch] * ub
                    wb = lb[p0, ch] * ua + lb[p1, ch] * ub
                    acc[o, ch] += wa * ta + wb * tb
        for j in range(width):
            count = count_y[i] * count_x[j]
            for ch in range(c):
                acc[j, ch] /= count
            if argmax:
                best = 0
                for ch in range(1, c):
                    if acc[j, ch] > acc[j, best]:  # strictly greater: ties go to the first class, as np.argmax
                        best = ch
                seg[k, j] = best


# ---- the public kernels: the signatures of their twins in layers.py ------------------------------------------------
# Each hands its compiled kernel C-contiguous float32 arrays of a fixed number of dimensions (rows of 2-D, maps of
# 4-D), so that numba compiles one specialisation per kernel, and splits the rows across threads (`parallel_rows`).

def _f32(x):
    return np.ascontiguousarray(x, dtype=np.float32)


def _ints(x):
    return np.ascontiguousarray(x, dtype=np.int64)


def _rows(x):
    """`x: (..., C)` as C-contiguous float32 rows `(N, C)`."""
    return _f32(x).reshape(-1, x.shape[-1])


def gelu(x):
    """Exact-erf GELU, Phi by a rational function that vectorises (twin of `layers.gelu`)."""
    rows = _rows(x)
    out = np.empty_like(rows)
    parallel_rows(_gelu_rows, rows.shape[0], rows, out, row_size=rows.shape[1])
    return out.reshape(np.shape(x))


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
    rows = out.reshape(-1, out.shape[-1])
    parallel_rows(_softmax_rows, rows.shape[0], rows, row_size=rows.shape[1])
    return out


ATTENTION_ROWS = 8192  # queries of one head per piece of `attention`: B0's stage 1 at 512 x 512 in two


def attention(q, k, v):
    """Attention(Q, K, V) per head in pieces of up to ATTENTION_ROWS queries of one head, a run of pieces per
    thread, each piece's scores, softmax and P V on that thread with BLAS on one thread (twin of `layers.attention`).
    The later stages' products are small (B0: 5 heads of 1024 queries, 8 of 256), and OpenBLAS's two threads run
    each of them slower than two such products side by side on one thread each: B0's eight attentions at 512 x 512
    on 2 threads 23.4 -> 21.3 ms (docs/performance.md). The output is written head by head into a `(B, N, heads,
    d_head)` array, of which it returns the `(B, heads, N, d_head)` view: merging the heads again copies nothing."""
    b, heads, n, d = q.shape
    probs = np.empty((b, heads, n, k.shape[2]), np.float32)
    out = np.empty((b, n, heads, d), np.float32)
    per_head = -(-n // ATTENTION_ROWS)

    def pieces(first, last):
        for piece in range(first, last):
            head, r = divmod(piece, per_head)  # pieces in (batch, head, r) order
            i, h = divmod(head, heads)
            queries = slice(r * ATTENTION_ROWS, min(n, (r + 1) * ATTENTION_ROWS))
            scores = attention_scores(q[i, h, queries], k[i, h], out=probs[i, h, queries])
            softmax(scores, out=scores)
            np.matmul(scores, v[i, h], out=out[i, queries, h])

    parallel_bands(pieces, b * heads * per_head, band=1)
    return out.transpose(0, 2, 1, 3), probs


def layer_norm(x, weight, bias, eps=LAYER_NORM_EPS):
    """LayerNorm over the last axis: per row mean, variance and output in three short loops, no temporaries (twin of
    `layers.layer_norm`)."""
    rows = _rows(x)
    out = np.empty_like(rows)
    # One pass over memory, like the bias add: split only past the caches (B0 at 512 x 512 on 2 threads, back to
    # back: 104 -> 100 ms; docs/performance.md, "The cores kept awake")
    parallel_rows(layer_norm_rows, rows.shape[0], rows, _f32(weight), _f32(bias), float(eps), out,
                  row_size=rows.shape[1], min_block=STREAM_MIN_BLOCK)
    return out.reshape(np.shape(x))


def depthwise_conv3x3(x, weight, bias):
    """Depthwise 3x3 conv on `x: (B, H, W, C)`, `weight: (C, 1, 3, 3)`: pixel by pixel, each one's 9 taps summed in
    registers, no padded copy (twin of `layers.depthwise_conv3x3`)."""
    return _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu=False)


def depthwise_conv3x3_gelu(x, weight, bias):
    """GELU(depthwise_conv3x3(x)): Mix-FFN's conv and activation in one pass over memory (twin of
    `layers.depthwise_conv3x3_gelu`)."""
    return _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu=True)


def _depthwise_conv3x3_taps_last(x, weight, bias, apply_gelu):
    x, taps_last = _f32(x), _f32(weight[:, 0].transpose(1, 2, 0))  # (C, 1, 3, 3) -> (3, 3, C)
    out = np.empty_like(x)
    b, h, w, c = x.shape
    parallel_rows(_depthwise_conv3x3, b * h, x, taps_last, _f32(bias), apply_gelu, out, row_size=9 * w * c)
    return out


def linear(x, weight, bias=None):
    """nn.Linear (twin of `layers.linear`): the product goes to BLAS, the bias add to a kernel, split across the
    cores only for an output larger than the caches (8 MB a thread, `threads.STREAM_MIN_BLOCK`)."""
    y = rows(x) @ weight.T  # one product over all leading axes (layers.rows)
    if bias is not None:
        parallel_rows(_add_bias, y.shape[0], y, _f32(bias), row_size=y.shape[1], min_block=STREAM_MIN_BLOCK)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def im2col(x, kernel: int, stride: int, padding: int):
    """`x: (B, H, W, C)` -> `(B, H_out, W_out, k * k * C)`, in parallel over output rows, no padded copy (twin of
    `layers.im2col`)."""
    b, _, _, c = x.shape
    h_out = conv_output_size(x.shape[1], kernel, stride, padding)
    w_out = conv_output_size(x.shape[2], kernel, stride, padding)
    cols = np.empty((b, h_out, w_out, kernel * kernel * c), np.float32)
    parallel_rows(_im2col, b * h_out, _f32(x).reshape(b, x.shape[1], x.shape[2] * c), kernel, stride, padding, cols,
                  row_size=w_out * kernel * kernel * c)
    return cols


def conv2d(x, weight, bias, stride: int, padding: int):
    """nn.Conv2d as `kernels.im2col` + one product (twin of `layers.conv2d`)."""
    return linear(im2col(x, weight.shape[-1], stride, padding), conv_weight_matrix(weight), bias)


def add_resized(out, x, size=None, start: int = 0):
    """`out += resize_bilinear(x, size, axes=(1, 2))[:, start : start + H]` on channels-last maps: upsample and
    accumulate in one pass; returns out (twin of `layers.add_resized`)."""
    (b, oh, ow, c), (_, h, w, _) = out.shape, x.shape
    size = resized_band(out.shape, size, start)
    i0, i1, th, _ = (a[start : start + oh] for a in bilinear_taps(h, size[0]))  # at the same size: an exact copy
    j0, j1, tw, _ = bilinear_taps(w, ow)
    acc = _f32(out)  # `out` itself when it is C-contiguous float32, as the decoder's is
    parallel_rows(_add_resized, b * oh, acc, _f32(x), i0, i1, th, j0, j1, tw, row_size=ow * c)
    if acc is not out:
        out[...] = acc
    return out


def window_average(logits, origins, slots, window, counts, rows, argmax=False):
    """Rows `rows = (start, stop)` of mmseg's slide average: at each pixel, the sum of the logits of the windows
    covering it, each bilinearly resized to the window's size, divided by the number of windows there; the same
    bits as `inference.window_average_numpy`, its readable twin.

    `logits: (K, h, w, C)`: the channels-last logits of K window slots; `origins: (K, 2)`: the (y0, x0) of each
    slot's window; `slots`: the slots to sum, in the order to sum them; `window`: (height, width) of every window;
    `counts`: (count_y `(H,)`, count_x `(W,)`) float32, the windows covering each row and column. Returns
    `(stop - start, W, C)` float32, or with `argmax` the `(stop - start, W)` int64 class ids of it (the scores are
    then never written to memory).
    """
    (start, stop), (count_y, count_x) = rows, counts
    _, h, w, c = logits.shape
    i0, i1, th, _ = bilinear_taps(h, window[0])
    j0, j1, tw, _ = bilinear_taps(w, window[1])
    width = count_x.shape[0]
    out = np.empty((0 if argmax else stop - start, width, c), np.float32)
    seg = np.empty((stop - start if argmax else 0, width), np.int64)
    origins = np.asarray(origins, dtype=np.int64)
    parallel_rows(_window_average, stop - start, _f32(logits), _ints(origins[:, 0]), _ints(origins[:, 1]),
                  _ints(slots), i0, i1, th, j0, j1, tw, _f32(count_y), _f32(count_x), argmax, out, seg, start,
                  row_size=width * c * 4)
    return seg if argmax else out


def resized_argmax(logits, size):
    """`logits: (C, h, w)` -> `(H, W)` int64 argmax of their bilinear resize to `size` (twin of
    `layers.resized_argmax`): HF's post-processing in one pass, with no (C, H, W) intermediate."""
    (out_h, out_w), (c, h, w) = size, logits.shape
    x = _f32(logits.transpose(1, 2, 0))  # channels-last, so the inner loop over classes is contiguous
    i0, i1, th, _ = bilinear_taps(h, out_h)
    j0, j1, tw, _ = bilinear_taps(w, out_w)
    seg = np.empty((out_h, out_w), np.int64)
    parallel_rows(_resized_argmax, out_h, x, i0, i1, th, j0, j1, tw, seg, row_size=out_w * c)
    return seg


# ---- backward twins: what training measured to pay (docs/performance.md, "Training") -----------------------------

TWINS += ("gelu_backward", "depthwise_conv3x3_backward")
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(**_FLAGS)
def _gelu_backward_rows(dout, x, out, start, stop):
    """out = dout * (Phi(x) + x phi(x)) on the rows start:stop of `(rows, C)` arrays, in float64 through libm's erf,
    rounded once to float32."""
    for i in range(start, stop):
        for j in range(x.shape[1]):
            xi = np.float64(x[i, j])
            cdf = 0.5 * (1.0 + math.erf(xi * _SQRT_HALF))  # as layers.gelu_backward writes it
            out[i, j] = np.float32(dout[i, j] * (cdf + xi * math.exp(-0.5 * xi * xi) * _INV_SQRT_2PI))


def gelu_backward(dout, x):
    """Gradient of the exact GELU, rows split over the threads (twin of `layers.gelu_backward`)."""
    x = _f32(x)
    d, v = _f32(dout).reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1])
    out = np.empty_like(v)
    parallel_rows(_gelu_backward_rows, v.shape[0], d, v, out, row_size=v.shape[1])
    return out.reshape(x.shape)


def depthwise_conv3x3_backward(dout, x, weight):
    """Gradients of `depthwise_conv3x3` (twin of `layers.depthwise_conv3x3_backward`): dx is the numba conv with the
    kernel rotated by 180 degrees, dweight `layers.depthwise_conv3x3_weight_grad`."""
    dx = depthwise_conv3x3(dout, weight[:, :, ::-1, ::-1], np.zeros(x.shape[-1], dtype=np.float32))
    return dx, depthwise_conv3x3_weight_grad(dout, x), dout.sum(axis=(0, 1, 2))
