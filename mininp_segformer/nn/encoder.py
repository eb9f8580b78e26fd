"""The Mix Transformer (MiT) encoder: four stages, each overlap patch merging -> N blocks -> LayerNorm.

Stage i works at 1/4, 1/8, 1/16, 1/32 of the input resolution with hidden size C_i (Sec. 3.1). A block is
pre-norm: x + Attention(LN(x)), then x + MixFFN(LN(x)). No position embeddings: the Mix-FFN's 3x3 depthwise
conv leaks enough position information (zero padding) for the model to work at any resolution.
"""

from __future__ import annotations

import numpy as np

from .attention import child_cache, efficient_self_attention, efficient_self_attention_backward
from ..config import SegformerConfig
from . import layers
from .layers import EVAL, Mode, conv_output_size


# ---- the encoder's geometry: sizes from the config alone

def stage_sizes(config: SegformerConfig, height: int, width: int) -> list[tuple[int, int]]:
    """`(H_i, W_i)` of each stage's token map for an input of height x width (H/4, H/8, ... for the MiT configs)."""
    sizes, h, w = [], height, width
    for k, s in zip(config.patch_sizes, config.strides):
        h, w = conv_output_size(h, k, s, k // 2), conv_output_size(w, k, s, k // 2)
        sizes.append((h, w))
    return sizes


def reduced_tokens(height: int, width: int, sr_ratio: int) -> int:
    """N_r: the keys (and values) of a height x width token map after the R x R stride-R spatial reduction."""
    r = sr_ratio
    return conv_output_size(height, r, r, 0) * conv_output_size(width, r, r, 0) if r > 1 else height * width


def min_input_size(config: SegformerConfig) -> int:
    """The smallest height (or width) the encoder accepts: every spatial-reduction conv needs at least one
    window, i.e. each stage's size must be >= its sr_ratio (B0..B5: 29 pixels, set by stage 1's 8 x 8 reduction).

    Stage sizes never shrink as the input grows, so doubling finds a size that fits and bisection the smallest:
    ~2 log2(answer) calls of `stage_sizes`, whatever the strides (a linear search would never end on absurd ones).
    """
    def fits(n: int) -> bool:
        return all(h >= max(r, 1) for (h, _), r in zip(stage_sizes(config, n, n), config.sr_ratios))

    high = 1
    while not fits(high):
        high *= 2
    low = high // 2  # does not fit (or is 0); high fits
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


# ---- the encoder

def overlap_patch_merging(x, p: dict, patch_size: int, stride: int, ops=layers, cache: dict | None = None):
    """`x: (B, H, W, C_in)` -> tokens `(B, H', W', C)`: a conv whose kernel overlaps its stride
    (7/4 pad 3 in stage 1, 3/2 pad 1 after), then LayerNorm. Overlap keeps local continuity across patches."""
    conv = ops.conv2d(x, p["proj"]["weight"], p["proj"]["bias"], stride=stride, padding=patch_size // 2)
    if cache is not None:
        cache.update(x=x, conv=conv)
    return ops.layer_norm(conv, p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def overlap_patch_merging_backward(dout, cache, patch_size: int, stride: int, p: dict):
    """Gradients of `overlap_patch_merging`: `dout: (B, H', W', C)` -> (dx `(B, H, W, C_in)`, grads of `p`)."""
    ln = p["layer_norm"]
    dconv, dln_weight, dln_bias = layers.layer_norm_backward(dout, cache["conv"], ln["weight"])
    dx, dweight, dbias = layers.conv2d_backward(dconv, cache["x"], p["proj"]["weight"], stride, patch_size // 2)
    return dx, {"proj": {"weight": dweight, "bias": dbias}, "layer_norm": {"weight": dln_weight, "bias": dln_bias}}


def mix_ffn(x, height: int, width: int, p: dict, ops=layers, cache: dict | None = None, mode: Mode = EVAL):
    """Mix-FFN (Eq. 3): x_out = MLP(GELU(Conv3x3(MLP(x_in)))) on `x: (B, N, C)`; the residual is added by the block.
    In train mode HF's one dropout module acts twice: after the GELU and after the second MLP."""
    b, n, _ = x.shape
    h = ops.linear(x, p["dense1"]["weight"], p["dense1"]["bias"]).reshape(b, height, width, -1)
    dw = p["dwconv"]["dwconv"]
    if cache is None:  # GELU(DWConv3x3(h)): the numba twin does both in one pass over memory
        a = ops.depthwise_conv3x3_gelu(h, dw["weight"], dw["bias"])
    else:  # the backward needs GELU's input, so the two steps run apart
        conv = ops.depthwise_conv3x3(h, dw["weight"], dw["bias"])
        a = ops.gelu(conv)
    a, gelu_keep = layers.dropout(a, mode.hidden_dropout, mode.rng)
    out = ops.linear(a.reshape(b, n, -1), p["dense2"]["weight"], p["dense2"]["bias"])
    out, out_keep = layers.dropout(out, mode.hidden_dropout, mode.rng)
    if cache is not None:  # not GELU's output: the backward makes it again from `conv` (one pass, 4 C channels)
        cache.update(x=x, h=h, conv=conv, ops=ops, gelu_dropout=(gelu_keep, mode.hidden_dropout),
                     out_dropout=(out_keep, mode.hidden_dropout))
    return out


def mix_ffn_backward(dout, cache, height: int, width: int, p: dict):
    """Gradients of `mix_ffn`: `dout: (B, N, C)` -> (dx `(B, N, C)`, grads of `p`): dense2, GELU, the depthwise
    conv and dense1 backwards, in that order."""
    b, n, _ = dout.shape
    dout = layers.dropout_backward(dout, *cache["out_dropout"])
    a = layers.dropout_backward(cache["ops"].gelu(cache["conv"]), *cache["gelu_dropout"])  # dense2's input again
    da, dw2, db2 = layers.linear_backward(dout, a.reshape(b, n, -1), p["dense2"]["weight"])
    dgelu = layers.dropout_backward(da.reshape(b, height, width, -1), *cache["gelu_dropout"])
    ops = cache["ops"]  # the forward's: the numba backend has twins of these two
    dconv = ops.gelu_backward(dgelu, cache["conv"])
    dh, dwdw, dbdw = ops.depthwise_conv3x3_backward(dconv, cache["h"], p["dwconv"]["dwconv"]["weight"])
    dx, dw1, db1 = layers.linear_backward(dh.reshape(b, n, -1), cache["x"], p["dense1"]["weight"])
    return dx, {"dense1": {"weight": dw1, "bias": db1}, "dwconv": {"dwconv": {"weight": dwdw, "bias": dbdw}},
                "dense2": {"weight": dw2, "bias": db2}}


def transformer_block(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int, ops=layers,
                      cache: dict | None = None, mode: Mode = EVAL, drop_path: float = 0.0):
    """One pre-norm block on `x: (B, N, C)`; returns (x, attention probabilities).

    In train mode each residual branch passes stochastic depth (`layers.drop_path`, this block's rate `drop_path`),
    drawn anew for each of the two branches, as HF's one DropPath module called twice."""
    ln1, ln2 = p["layer_norm_1"], p["layer_norm_2"]
    attn, probs = efficient_self_attention(ops.layer_norm(x, ln1["weight"], ln1["bias"]), height, width,
                                           p["attention"], num_heads, sr_ratio, ops, child_cache(cache, "attention"),
                                           mode)
    attn, attn_keep = layers.drop_path(attn, drop_path, mode.rng)
    mid = np.add(x, attn, out=attn)  # the residual, into the branch's output: a new array no cache holds
    mlp = mix_ffn(ops.layer_norm(mid, ln2["weight"], ln2["bias"]), height, width, p["mlp"], ops,
                  child_cache(cache, "mlp"), mode)
    mlp, mlp_keep = layers.drop_path(mlp, drop_path, mode.rng)
    if cache is not None:  # the two LayerNorms' inputs, the two branches' masks
        cache.update(x=x, mid=mid, attention_drop_path=(attn_keep, drop_path), mlp_drop_path=(mlp_keep, drop_path))
    return np.add(mid, mlp, out=mlp), probs


def transformer_block_backward(dout, cache, height: int, width: int, num_heads: int, sr_ratio: int, p: dict):
    """Gradients of `transformer_block`'s x: `dout: (B, N, C)` -> (dx, grads of `p`).

    Each residual branch passes `dout` through unchanged and adds its own path's gradient: for mid = x + attn(LN1 x)
    and out = mid + mlp(LN2 mid), d mid = d out + LN2'(mlp'(d out)), then dx = d mid + LN1'(attn'(d mid)).
    """
    ln1, ln2 = p["layer_norm_1"], p["layer_norm_2"]
    dmlp = layers.dropout_backward(dout, *cache["mlp_drop_path"])
    dnorm2, mlp_grads = mix_ffn_backward(dmlp, cache["mlp"], height, width, p["mlp"])
    dmid, dln2_weight, dln2_bias = layers.layer_norm_backward(dnorm2, cache["mid"], ln2["weight"])
    dmid += dout
    dattn = layers.dropout_backward(dmid, *cache["attention_drop_path"])
    dnorm1, attn_grads = efficient_self_attention_backward(dattn, cache["attention"], height, width, num_heads,
                                                           sr_ratio, p["attention"])
    dx, dln1_weight, dln1_bias = layers.layer_norm_backward(dnorm1, cache["x"], ln1["weight"])
    dx += dmid
    return dx, {"layer_norm_1": {"weight": dln1_weight, "bias": dln1_bias}, "attention": attn_grads,
                "layer_norm_2": {"weight": dln2_weight, "bias": dln2_bias}, "mlp": mlp_grads}


def drop_path_rates(config: SegformerConfig, rate: float) -> list[float]:
    """Stochastic depth per block, stage-major: rising linearly from 0 at the first block to `rate` at the last
    (HF: `torch.linspace(0, drop_path_rate, sum(depths))`, float32 values)."""
    return [float(r) for r in np.linspace(0, rate, sum(config.depths), dtype=np.float32)]


def mix_transformer(pixel_values, p: dict, config: SegformerConfig, output_attentions: bool = False, ops=layers,
                    cache: dict | None = None, mode: Mode = EVAL):
    """The MiT encoder on channels-last `pixel_values: (B, H, W, C)`.

    `p` is the checkpoint's `encoder` subtree. Returns (the four stage maps `(B, H_i, W_i, C_i)`, the attention
    probabilities of every block in stage-major order -- an empty list unless `output_attentions`). `cache`: a
    dict to fill with what `mix_transformer_backward` needs, keyed `("patch_embeddings", stage)`,
    `("block", stage, i)` and `("layer_norm", stage)` (that LayerNorm's input). `mode`: train or eval
    (`layers.Mode`); in train mode block k's residual branches see stochastic depth `drop_path_rates(...)[k]`.
    """
    x = pixel_values
    stages, attentions = [], []
    rates = iter(drop_path_rates(config, mode.drop_path_rate if mode.training else 0.0))
    if cache is not None:
        cache["input_shape"] = x.shape
    for s in range(config.num_encoder_blocks):
        x = overlap_patch_merging(x, p["patch_embeddings"][s], config.patch_sizes[s], config.strides[s], ops,
                                  child_cache(cache, ("patch_embeddings", s)))
        b, height, width, c = x.shape
        x = x.reshape(b, height * width, c)  # map -> tokens: the same memory
        for i, block in enumerate(p["block"][s]):
            x, probs = transformer_block(x, height, width, block, config.num_attention_heads[s], config.sr_ratios[s],
                                         ops, child_cache(cache, ("block", s, i)), mode, next(rates))
            if output_attentions:  # else let them go: at stage 1 of B0@512 each is 16 MB
                attentions.append(probs)
        if cache is not None:
            cache["layer_norm", s] = x
        ln = p["layer_norm"][s]
        x = ops.layer_norm(x, ln["weight"], ln["bias"]).reshape(b, height, width, c)
        stages.append(x)
    return stages, attentions


def mix_transformer_backward(dstages, cache, config: SegformerConfig, p: dict):
    """Gradients of `mix_transformer`'s stage maps -> (d pixel_values, grads of `p`, the `encoder` subtree).

    `dstages`: the gradient of each stage map `(B, H_i, W_i, C_i)`, None for one that does not reach the loss.
    Stage i's map is both an output and stage i+1's input, so its gradient is the sum of the two; the stages are
    undone last to first: final LayerNorm, the blocks in reverse, patch merging.
    """
    n = config.num_encoder_blocks
    b, height, width, _ = cache["input_shape"]
    grads = {"patch_embeddings": [None] * n, "block": [None] * n, "layer_norm": [None] * n}
    dx = None  # the gradient of the current stage's output map through the next stage
    for s, (h, w) in reversed(list(enumerate(stage_sizes(config, height, width)))):
        tokens = cache["layer_norm", s]
        dmap = np.zeros((b, h, w, tokens.shape[-1]), tokens.dtype) if dstages[s] is None else dstages[s]
        if dx is not None:
            dmap = dmap + dx
        dx, dln_weight, dln_bias = layers.layer_norm_backward(dmap.reshape(tokens.shape), tokens,
                                                              p["layer_norm"][s]["weight"])
        grads["layer_norm"][s] = {"weight": dln_weight, "bias": dln_bias}
        grads["block"][s] = [None] * len(p["block"][s])
        for i in reversed(range(len(p["block"][s]))):
            dx, grads["block"][s][i] = transformer_block_backward(
                dx, cache["block", s, i], h, w, config.num_attention_heads[s], config.sr_ratios[s], p["block"][s][i])
        dx, grads["patch_embeddings"][s] = overlap_patch_merging_backward(
            dx.reshape(b, h, w, -1), cache["patch_embeddings", s], config.patch_sizes[s], config.strides[s],
            p["patch_embeddings"][s])
    return dx, grads
