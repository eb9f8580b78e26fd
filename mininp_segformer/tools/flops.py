"""Multiply-accumulate counts of a SegFormer forward pass, from the config alone.

One MAC is one `a * b + c`; FLOPs are about 2 x MACs. What the SegFormer paper reports as "GFLOPs" (B0 at 512 x 512:
8.4) is counted the usual way (fvcore / mmcv), which is MACs: every matmul and convolution, nothing else.
Counted, per image:

    encoder.patch_embed           overlapping patch merging convs (im2col: H_i W_i x C_i x k^2 C_{i-1})
    encoder.attention_linears     query + output on N tokens, key + value on N_r reduced tokens (C x C each)
    encoder.spatial_reduction     the R x R stride-R convs that make the N_r = N / R^2 keys (stages with R > 1)
    encoder.attention_matmuls     Q K^T and A V: 2 x N x N_r x C per block (summed over heads)
    encoder.ffn_dense1 / ffn_dwconv / ffn_dense2   Mix-FFN: C -> 4C, 3 x 3 depthwise (9 per channel), 4C -> C
    decoder "literal" (Eq. 4):    decoder.stage_linears (C_i -> D at stage i's size), decoder.fuse (the 1 x 1 conv
                                  4D -> D at H/4), decoder.classifier (D -> labels at H/4)
    decoder "fused" (decoder.fold_decode_head): decoder.stage_projections (the folded D x C_i at stage i's size),
                                  decoder.classifier

Not counted (as in the paper's numbers): LayerNorm, GELU, softmax, BatchNorm, biases, residual adds and the
bilinear upsampling.
"""

from __future__ import annotations

from ..config import SegformerConfig
from ..errors import ImageError
from ..nn.encoder import min_input_size, reduced_tokens, stage_sizes


def _encoder_macs(config: SegformerConfig, sizes) -> dict[str, int]:
    macs = dict.fromkeys(("patch_embed", "attention_linears", "spatial_reduction", "attention_matmuls",
                          "ffn_dense1", "ffn_dwconv", "ffn_dense2"), 0)
    c_in = config.num_channels
    for s, (h, w) in enumerate(sizes):
        c, k, r = config.hidden_sizes[s], config.patch_sizes[s], config.sr_ratios[s]
        n = h * w
        n_r = reduced_tokens(h, w, r)
        hidden = int(c * config.mlp_ratios[s])
        macs["patch_embed"] += n * c * k * k * c_in
        depth = config.depths[s]
        macs["attention_linears"] += depth * (2 * n + 2 * n_r) * c * c
        macs["spatial_reduction"] += depth * (n_r * c * r * r * c if r > 1 else 0)
        macs["attention_matmuls"] += depth * 2 * n * n_r * c
        macs["ffn_dense1"] += depth * n * c * hidden
        macs["ffn_dwconv"] += depth * n * hidden * 9
        macs["ffn_dense2"] += depth * n * hidden * c
        c_in = c
    return {f"encoder.{k}": v for k, v in macs.items()}


def _decoder_macs(config: SegformerConfig, sizes, decoder: str) -> dict[str, int]:
    d, labels = config.decoder_hidden_size, config.num_labels
    n1 = sizes[0][0] * sizes[0][1]
    projections = sum(h * w * c * d for (h, w), c in zip(sizes, config.hidden_sizes))
    if decoder == "literal":
        return {"decoder.stage_linears": projections, "decoder.fuse": n1 * len(sizes) * d * d,
                "decoder.classifier": n1 * d * labels}
    # fused: A_i = s * W_fuse,i @ W_i is D x C_i, applied at stage i's resolution -- the same count as the stage
    # linears, and the 4D -> D fuse conv is gone.
    return {"decoder.stage_projections": projections, "decoder.classifier": n1 * d * labels}


def count_macs(config: SegformerConfig, height: int, width: int, decoder: str | None = "fused") -> dict[str, int]:
    """MACs of one `height x width` image through the encoder and the decode head, by part (see the module doc).

    `decoder`: "fused" (what Segformer runs by default), "literal" (Eq. 4 as written) or None (encoder only).
    Keys start with "encoder." or "decoder."; `sum(count_macs(...).values())` is the total.
    """
    if decoder not in ("fused", "literal", None):
        raise ValueError(f"decoder must be 'fused', 'literal' or None, got {decoder!r}")
    smallest = min_input_size(config)
    if min(height, width) < smallest:
        raise ImageError(f"an input of {height} x {width} is smaller than this model's minimum, {smallest} x "
                         f"{smallest} (each spatial-reduction conv needs one full window); count a larger size")
    sizes = stage_sizes(config, height, width)
    macs = _encoder_macs(config, sizes)
    if decoder is not None:
        macs.update(_decoder_macs(config, sizes, decoder))
    return macs


def attention_bytes(config: SegformerConfig, height: int, width: int) -> int:
    """Bytes of the largest attention-score array of one image, `(heads, N, N_r)` float32 -- twice that is held
    while its softmax is computed. It grows with the square of the pixel count: 1.07 GB for B0 at 1024 x 2048."""
    largest = 0
    for s, (h, w) in enumerate(stage_sizes(config, height, width)):
        r = config.sr_ratios[s]
        largest = max(largest, config.num_attention_heads[s] * h * w * reduced_tokens(h, w, r) * 4)
    return largest


def summarize(macs: dict[str, int]) -> dict[str, int]:
    """{"encoder": ..., "decoder": ..., "total": ...} of a `count_macs` result."""
    encoder = sum(v for k, v in macs.items() if k.startswith("encoder."))
    decoder = sum(v for k, v in macs.items() if k.startswith("decoder."))
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}
