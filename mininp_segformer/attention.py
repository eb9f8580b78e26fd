"""Efficient self-attention (SegFormer Sec. 3.1, after PVT): keys and values come from a spatially reduced sequence.

Plain attention over N = H * W tokens costs O(N^2). Reshaping the tokens back to an (H, W) map and applying a
conv with kernel = stride = R (the "sequence reduction") leaves N / R^2 keys and values, so the cost is O(N^2 / R^2).
Queries keep full resolution; every output token still sees the whole image.
"""

from __future__ import annotations

import numpy as np

from .kernels import layer_norm, linear, softmax  # numba twins of the functions in layers.py


def spatial_reduction(x, height: int, width: int, p: dict, sr_ratio: int):
    """`x: (B, N, C)` -> `(B, N / R^2, C)`: conv(kernel = stride = R, no padding) on the token map, then LayerNorm.

    A conv whose kernel equals its stride sees every pixel once: cut the map into R x R tiles (rows and columns past
    the last whole tile are dropped, as torch's conv drops them), flatten each tile, and one matmul does the conv.
    """
    b, n, c = x.shape
    r = sr_ratio
    h, w = height // r, width // r
    tiles = x.reshape(b, height, width, c)[:, : h * r, : w * r]
    tiles = tiles.reshape(b, h, r, w, r, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, r * r * c)
    weight = p["sr"]["weight"].transpose(0, 2, 3, 1).reshape(c, r * r * c)  # (C_out, C_in, ky, kx) -> (ky, kx, C_in)
    return layer_norm(linear(tiles, weight, p["sr"]["bias"]), p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def split_heads(x, num_heads: int):
    """`(B, N, C)` -> `(B, heads, N, C / heads)`."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)


def efficient_self_attention(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int):
    """`x: (B, N, C)` -> (output `(B, N, C)`, attention probabilities `(B, heads, N, N_reduced)`).

    `p` is the checkpoint's `attention` subtree: `self.{query,key,value,sr,layer_norm}` and `output.dense`.
    """
    ps = p["self"]
    b, n, c = x.shape
    head_dim = c // num_heads
    q = split_heads(linear(x, ps["query"]["weight"], ps["query"]["bias"]), num_heads)
    kv = spatial_reduction(x, height, width, ps, sr_ratio) if sr_ratio > 1 else x
    k = split_heads(linear(kv, ps["key"]["weight"], ps["key"]["bias"]), num_heads)
    v = split_heads(linear(kv, ps["value"]["weight"], ps["value"]["bias"]), num_heads)
    # Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V   (paper Eq. 1). The scale is applied to Q, which is
    # N_reduced / d_head times smaller than the scores it would otherwise multiply.
    scores = (q * np.float32(head_dim**-0.5)) @ k.transpose(0, 1, 3, 2)
    probs = softmax(scores)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, c)  # merge heads back
    out = linear(context, p["output"]["dense"]["weight"], p["output"]["dense"]["bias"])
    return out, probs
