"""Efficient self-attention (SegFormer Sec. 3.1, after PVT): keys and values come from a spatially reduced sequence.

Plain attention over N = H * W tokens costs O(N^2). Reshaping the tokens back to an (H, W) map and applying a
conv with kernel = stride = R (the "sequence reduction") leaves N / R^2 keys and values, so the cost is O(N^2 / R^2).
Queries keep full resolution; every output token still sees the whole image.
"""

from __future__ import annotations

from . import layers
from .layers import EVAL, Mode


def child_cache(cache: dict | None, key):
    """`cache[key]`, a new dict there if absent; None without a cache: how a forward hands a sub-component its own."""
    return None if cache is None else cache.setdefault(key, {})


def spatial_reduction(x, height: int, width: int, p: dict, sr_ratio: int, ops=layers, cache: dict | None = None):
    """`x: (B, N, C)` -> `(B, N / R^2, C)`: conv(kernel = stride = R, no padding) on the token map, then LayerNorm.

    A conv whose kernel equals its stride sees every pixel once: cut the map into R x R tiles (rows and columns past
    the last whole tile are dropped, as torch's conv drops them), flatten each tile, and one matmul does the conv.
    `cache`: a dict to fill with what `spatial_reduction_backward` needs.
    """
    b, n, c = x.shape
    r = sr_ratio
    h, w = height // r, width // r
    tiles = x.reshape(b, height, width, c)[:, : h * r, : w * r]
    tiles = tiles.reshape(b, h, r, w, r, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, r * r * c)
    reduced = ops.linear(tiles, layers.conv_weight_matrix(p["sr"]["weight"]), p["sr"]["bias"])  # tiles in (ky, kx, c)
    if cache is not None:
        cache.update(x=x, reduced=reduced)
    return ops.layer_norm(reduced, p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def spatial_reduction_backward(dout, cache, height: int, width: int, sr_ratio: int, p: dict):
    """Gradients of `spatial_reduction`: `dout: (B, N / R^2, C)` -> (dx `(B, N, C)`, grads of `p`'s `sr` and
    `layer_norm`, the two subtrees it reads).

    The tiling and its matmul are the conv kernel = stride = R, padding 0 on the token map, so its backward is
    `conv2d_backward`'s: col2im leaves the dropped rows and columns (H or W not a multiple of R) a zero gradient.
    """
    x, r = cache["x"], sr_ratio
    b, n, c = x.shape
    ln = p["layer_norm"]
    dreduced, dln_weight, dln_bias = layers.layer_norm_backward(dout, cache["reduced"], ln["weight"])
    dreduced = dreduced.reshape(b, height // r, width // r, -1)
    dx, dweight, dbias = layers.conv2d_backward(dreduced, x.reshape(b, height, width, c), p["sr"]["weight"],
                                                stride=r, padding=0)
    return dx.reshape(b, n, c), {"sr": {"weight": dweight, "bias": dbias},
                                 "layer_norm": {"weight": dln_weight, "bias": dln_bias}}


def split_heads(x, num_heads: int):
    """`(B, N, C)` -> `(B, heads, N, C / heads)`."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """`(B, heads, N, C / heads)` -> `(B, N, C)`: the inverse of `split_heads`."""
    b, heads, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, heads * d)


def attention_probs(q, k, ops=layers):
    """P = softmax(Q K^T / sqrt(d_head)) (paper Eq. 1) per head: `q: (B, heads, N, d_head)`, `k: (B, heads, N_r,
    d_head)` -> `(B, heads, N, N_r)`. The softmax runs in place on the scores, which are not needed again."""
    scores = layers.attention_scores(q, k)
    return ops.softmax(scores, out=scores)


def efficient_self_attention(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int, ops=layers,
                             cache: dict | None = None, mode: Mode = EVAL):
    """`x: (B, N, C)` -> (output `(B, N, C)`, attention probabilities `(B, heads, N, N_reduced)`).

    `p` is the checkpoint's `attention` subtree: `self.{query,key,value,sr,layer_norm}` and `output.dense`; `ops`
    the namespace of the building blocks (`layers`, or the numba `kernels`); `cache` a dict to fill with what
    `efficient_self_attention_backward` needs; `mode` train or eval (`layers.Mode`): in train mode dropout acts on
    the probabilities (which are returned dropped, as HF returns them) and on the output.
    """
    ps = p["self"]
    q = split_heads(ops.linear(x, ps["query"]["weight"], ps["query"]["bias"]), num_heads)
    kv = (spatial_reduction(x, height, width, ps, sr_ratio, ops, child_cache(cache, "spatial_reduction"))
          if sr_ratio > 1 else x)
    k = split_heads(ops.linear(kv, ps["key"]["weight"], ps["key"]["bias"]), num_heads)
    v = split_heads(ops.linear(kv, ps["value"]["weight"], ps["value"]["bias"]), num_heads)
    if cache is None and not mode.training:  # inference: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V
        context, probs = ops.attention(q, k, v)  # (Eq. 1); the numba twin spreads pieces of queries over threads
        dropped = probs  # nothing is dropped in eval mode
    else:  # the same, with P at hand: train mode drops out some of it, and the backward makes it again
        probs = attention_probs(q, k, ops)
        # HF drops whole attended tokens' weights here ("taken from the original Transformer paper")
        dropped, probs_keep = layers.dropout(probs, mode.attention_dropout, mode.rng)  # cache is set: it is used
        context = dropped @ v
    context = merge_heads(context)
    out = ops.linear(context, p["output"]["dense"]["weight"], p["output"]["dense"]["bias"])
    out, out_keep = layers.dropout(out, mode.hidden_dropout, mode.rng)  # SegformerSelfOutput's dropout
    if cache is not None:  # not the probabilities: the largest activation of a stage, recomputed by the backward
        cache.update(x=x, kv=kv, q=q, k=k, v=v, ops=ops, context=context,
                     probs_dropout=(probs_keep, mode.attention_dropout), out_dropout=(out_keep, mode.hidden_dropout))
    return out, dropped


def efficient_self_attention_backward(dout, cache, height: int, width: int, num_heads: int, sr_ratio: int, p: dict):
    """Gradients of `efficient_self_attention`'s output: `dout: (B, N, C)` -> (dx `(B, N, C)`, grads of `p`).

    Eq. 1 backwards, with O = P V, P = softmax(S), S = (s Q) K^T, s = 1 / sqrt(d_head), per head:
    dV = P^T dO, dP = dO V^T, dS = softmax_backward(dP), dQ = s dS K, dK = dS^T (s Q). Keys and values both
    read `kv` (the reduced sequence when R > 1), so their two gradients add before the spatial reduction's backward;
    the queries' gradient adds to x's directly. (The probabilities as an output are for inspection: no gradient.)
    Train mode's dropout on P: O = D(P) V, so dV = D(P)^T dO and dP = D(dO V^T), D the forward's mask and scale.
    P itself is recomputed from Q and K with the forward's own functions (the same numbers): N x N_r per head is the
    largest thing a stage would otherwise keep (32 MB a block in B0's stage 1 at 512 x 512, batch 2), and costs one
    small product to make again.
    """
    ps = p["self"]
    x, kv, q, k, v = (cache[name] for name in ("x", "kv", "q", "k", "v"))
    probs = attention_probs(q, k, cache["ops"])
    scale = x.dtype.type((x.shape[-1] // num_heads) ** -0.5)
    dout = layers.dropout_backward(dout, *cache["out_dropout"])
    dcontext, dwo, dbo = layers.linear_backward(dout, cache["context"], p["output"]["dense"]["weight"])
    dcontext = split_heads(dcontext, num_heads)  # (B, heads, N, d_head)
    probs_keep, attention_dropout = cache["probs_dropout"]
    dropped = layers.dropout_backward(probs, probs_keep, attention_dropout)  # D(P) again: the same multiply
    dv = dropped.transpose(0, 1, 3, 2) @ dcontext
    dprobs = layers.dropout_backward(dcontext @ v.transpose(0, 1, 3, 2), probs_keep, attention_dropout)
    dscores = layers.softmax_backward(dprobs, probs)
    dq = (dscores @ k) * scale
    dk = dscores.transpose(0, 1, 3, 2) @ (q * scale)
    grads = {"self": {}, "output": {"dense": {"weight": dwo, "bias": dbo}}}

    def linear_heads_backward(name, d, inp):  # the backward of split_heads(linear(inp)), d: (B, heads, N, d_head)
        dinp, dweight, dbias = layers.linear_backward(merge_heads(d), inp, ps[name]["weight"])
        grads["self"][name] = {"weight": dweight, "bias": dbias}
        return dinp

    dx = linear_heads_backward("query", dq, x)
    dkv = linear_heads_backward("key", dk, kv) + linear_heads_backward("value", dv, kv)
    if sr_ratio > 1:
        dkv, sr_grads = spatial_reduction_backward(dkv, cache["spatial_reduction"], height, width, sr_ratio, ps)
        grads["self"].update(sr_grads)
    return dx + dkv, grads
