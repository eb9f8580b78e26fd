"""Efficient self-attention (SegFormer Sec. 3.1, after PVT): keys and values come from a spatially reduced sequence.

Plain attention over N = H * W tokens costs O(N^2). Reshaping the tokens back to an (H, W) map and applying a
conv with kernel = stride = R (the "sequence reduction") leaves N / R^2 keys and values, so the cost is O(N^2 / R^2).
Queries keep full resolution; every output token still sees the whole image.
"""

from __future__ import annotations

from . import layers


def spatial_reduction(x, height: int, width: int, p: dict, sr_ratio: int, ops=layers):
    """`x: (B, N, C)` -> `(B, N / R^2, C)`: conv(kernel = stride = R, no padding) on the token map, then LayerNorm.

    A conv whose kernel equals its stride sees every pixel once: cut the map into R x R tiles (rows and columns past
    the last whole tile are dropped, as torch's conv drops them), flatten each tile, and one matmul does the conv.
    """
    b, n, c = x.shape
    r = sr_ratio
    h, w = height // r, width // r
    tiles = x.reshape(b, height, width, c)[:, : h * r, : w * r]
    tiles = tiles.reshape(b, h, r, w, r, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, r * r * c)
    reduced = ops.linear(tiles, layers.conv_weight_matrix(p["sr"]["weight"]), p["sr"]["bias"])  # tiles in (ky, kx, c)
    return ops.layer_norm(reduced, p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def split_heads(x, num_heads: int):
    """`(B, N, C)` -> `(B, heads, N, C / heads)`."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)


def efficient_self_attention(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int, ops=layers):
    """`x: (B, N, C)` -> (output `(B, N, C)`, attention probabilities `(B, heads, N, N_reduced)`).

    `p` is the checkpoint's `attention` subtree: `self.{query,key,value,sr,layer_norm}` and `output.dense`; `ops`
    the namespace of the building blocks (`layers`, or the numba `kernels`).
    """
    ps = p["self"]
    b, n, c = x.shape
    head_dim = c // num_heads
    q = split_heads(ops.linear(x, ps["query"]["weight"], ps["query"]["bias"]), num_heads)
    kv = spatial_reduction(x, height, width, ps, sr_ratio, ops) if sr_ratio > 1 else x
    k = split_heads(ops.linear(kv, ps["key"]["weight"], ps["key"]["bias"]), num_heads)
    v = split_heads(ops.linear(kv, ps["value"]["weight"], ps["value"]["bias"]), num_heads)
    # Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V   (paper Eq. 1). The scale is applied to Q, which is
    # N_reduced / d_head times smaller than the scores it would otherwise multiply.
    scores = (q * x.dtype.type(head_dim**-0.5)) @ k.transpose(0, 1, 3, 2)
    probs = ops.softmax(scores, out=scores)  # in place: the scores are not needed again
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, c)  # merge heads back
    out = ops.linear(context, p["output"]["dense"]["weight"], p["output"]["dense"]["bias"])
    return out, probs
