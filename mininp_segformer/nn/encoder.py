"""The Mix Transformer (MiT) encoder: four stages, each overlap patch merging -> N blocks -> LayerNorm.

Stage i works at 1/4, 1/8, 1/16, 1/32 of the input resolution with hidden size C_i (Sec. 3.1). A block is
pre-norm: x + Attention(LN(x)), then x + MixFFN(LN(x)). No position embeddings: the Mix-FFN's 3x3 depthwise
conv leaks enough position information (zero padding) for the model to work at any resolution.
"""

from __future__ import annotations

from .attention import efficient_self_attention
from ..config import SegformerConfig
from . import layers
from .layers import conv_output_size


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

def overlap_patch_merging(x, p: dict, patch_size: int, stride: int, ops=layers):
    """`x: (B, H, W, C_in)` -> tokens `(B, H', W', C)`: a conv whose kernel overlaps its stride
    (7/4 pad 3 in stage 1, 3/2 pad 1 after), then LayerNorm. Overlap keeps local continuity across patches."""
    x = ops.conv2d(x, p["proj"]["weight"], p["proj"]["bias"], stride=stride, padding=patch_size // 2)
    return ops.layer_norm(x, p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def mix_ffn(x, height: int, width: int, p: dict, ops=layers):
    """Mix-FFN (Eq. 3): x_out = MLP(GELU(Conv3x3(MLP(x_in)))) on `x: (B, N, C)`; the residual is added by the block."""
    b, n, _ = x.shape
    h = ops.linear(x, p["dense1"]["weight"], p["dense1"]["bias"])
    dw = p["dwconv"]["dwconv"]
    # GELU(DWConv3x3(h)): the numba twin does both in one pass over memory
    h = ops.depthwise_conv3x3_gelu(h.reshape(b, height, width, -1), dw["weight"], dw["bias"])
    return ops.linear(h.reshape(b, n, -1), p["dense2"]["weight"], p["dense2"]["bias"])


def transformer_block(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int, ops=layers):
    """One pre-norm block on `x: (B, N, C)`; returns (x, attention probabilities)."""
    ln1, ln2 = p["layer_norm_1"], p["layer_norm_2"]
    attn, probs = efficient_self_attention(ops.layer_norm(x, ln1["weight"], ln1["bias"]), height, width,
                                           p["attention"], num_heads, sr_ratio, ops)
    x = x + attn
    x = x + mix_ffn(ops.layer_norm(x, ln2["weight"], ln2["bias"]), height, width, p["mlp"], ops)
    return x, probs


def mix_transformer(pixel_values, p: dict, config: SegformerConfig, output_attentions: bool = False, ops=layers):
    """The MiT encoder on channels-last `pixel_values: (B, H, W, C)`.

    `p` is the checkpoint's `encoder` subtree. Returns (the four stage maps `(B, H_i, W_i, C_i)`, the attention
    probabilities of every block in stage-major order -- an empty list unless `output_attentions`).
    """
    x = pixel_values
    stages, attentions = [], []
    for s in range(config.num_encoder_blocks):
        x = overlap_patch_merging(x, p["patch_embeddings"][s], config.patch_sizes[s], config.strides[s], ops)
        b, height, width, c = x.shape
        x = x.reshape(b, height * width, c)  # map -> tokens: the same memory
        for block in p["block"][s]:
            x, probs = transformer_block(x, height, width, block, config.num_attention_heads[s], config.sr_ratios[s],
                                         ops)
            if output_attentions:  # else let them go: at stage 1 of B0@512 each is 16 MB
                attentions.append(probs)
        ln = p["layer_norm"][s]
        x = ops.layer_norm(x, ln["weight"], ln["bias"]).reshape(b, height, width, c)
        stages.append(x)
    return stages, attentions
