"""The Mix Transformer (MiT) encoder: four stages, each overlap patch merging -> N blocks -> LayerNorm.

Stage i works at 1/4, 1/8, 1/16, 1/32 of the input resolution with hidden size C_i (Sec. 3.1). A block is
pre-norm: x + Attention(LN(x)), then x + MixFFN(LN(x)). No position embeddings: the Mix-FFN's 3x3 depthwise
conv leaks enough position information (zero padding) for the model to work at any resolution.
"""

from __future__ import annotations

from .attention import efficient_self_attention
from .config import SegformerConfig
from .kernels import conv2d, depthwise_conv3x3_gelu, layer_norm, linear  # numba twins of layers.conv2d, ...


def overlap_patch_merging(x, p: dict, patch_size: int, stride: int):
    """`x: (B, H, W, C_in)` -> tokens `(B, H', W', C)`: a conv whose kernel overlaps its stride
    (7/4 pad 3 in stage 1, 3/2 pad 1 after), then LayerNorm. Overlap keeps local continuity across patches."""
    x = conv2d(x, p["proj"]["weight"], p["proj"]["bias"], stride=stride, padding=patch_size // 2)
    return layer_norm(x, p["layer_norm"]["weight"], p["layer_norm"]["bias"])


def mix_ffn(x, height: int, width: int, p: dict):
    """Mix-FFN (Eq. 3): x_out = MLP(GELU(Conv3x3(MLP(x_in)))) on `x: (B, N, C)`; the residual is added by the block."""
    b, n, _ = x.shape
    h = linear(x, p["dense1"]["weight"], p["dense1"]["bias"])
    # GELU(DWConv3x3(h)) in one pass: layers.gelu(layers.depthwise_conv3x3(h, ...)) is the same, step by step
    h = depthwise_conv3x3_gelu(h.reshape(b, height, width, -1), **p["dwconv"]["dwconv"])
    return linear(h.reshape(b, n, -1), p["dense2"]["weight"], p["dense2"]["bias"])


def transformer_block(x, height: int, width: int, p: dict, num_heads: int, sr_ratio: int):
    """One pre-norm block on `x: (B, N, C)`; returns (x, attention probabilities)."""
    attn, probs = efficient_self_attention(layer_norm(x, **p["layer_norm_1"]), height, width, p["attention"],
                                           num_heads, sr_ratio)
    x = x + attn
    x = x + mix_ffn(layer_norm(x, **p["layer_norm_2"]), height, width, p["mlp"])
    return x, probs


def mix_transformer(pixel_values, p: dict, config: SegformerConfig, output_attentions: bool = False):
    """The MiT encoder on channels-last `pixel_values: (B, H, W, C)`.

    `p` is the checkpoint's `encoder` subtree. Returns (the four stage maps `(B, H_i, W_i, C_i)`, the attention
    probabilities of every block in stage-major order -- an empty list unless `output_attentions`).
    """
    x = pixel_values
    stages, attentions = [], []
    for s in range(config.num_encoder_blocks):
        x = overlap_patch_merging(x, p["patch_embeddings"][s], config.patch_sizes[s], config.strides[s])
        b, height, width, c = x.shape
        x = x.reshape(b, height * width, c)  # map -> tokens: the same memory
        for block in p["block"][s]:
            x, probs = transformer_block(x, height, width, block, config.num_attention_heads[s], config.sr_ratios[s])
            if output_attentions:  # else let them go: at stage 1 of B0@512 each is 16 MB
                attentions.append(probs)
        x = layer_norm(x, **p["layer_norm"][s]).reshape(b, height, width, c)
        stages.append(x)
    return stages, attentions
