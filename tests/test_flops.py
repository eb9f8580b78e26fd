"""mininp_segformer.tools.flops.count_macs against hand-computed counts, the paper's GFLOPs, and the model itself."""

import numpy as np
import pytest

from mininp_segformer import Segformer, SegformerConfig, variant_config
from mininp_segformer.nn.decoder import fold_decode_head
from mininp_segformer.tools.flops import attention_bytes, count_macs, stage_sizes, summarize
from mininp_segformer.weights import random_state_dict, unflatten

TINY = SegformerConfig(num_encoder_blocks=2, depths=(1, 2), sr_ratios=(2, 1), hidden_sizes=(4, 8), patch_sizes=(3, 3),
                       strides=(2, 2), num_attention_heads=(1, 2), mlp_ratios=(2, 3), decoder_hidden_size=6,
                       id2label={0: "a", 1: "b", 2: "c"})

# TINY on an 8 x 12 input. Stage 1: conv 3/2 pad 1 -> 4 x 6 = 24 tokens, C = 4 (from 3 channels); reduction
# R = 2 -> 2 x 3 = 6 keys; FFN hidden 8; one block. Stage 2: 2 x 3 = 6 tokens, C = 8 (from 4); R = 1 -> 6 keys;
# FFN hidden 24; two blocks. Decoder D = 6, 3 labels, at stage 1's 24 pixels.
TINY_ENCODER = {
    "encoder.patch_embed": 24 * 4 * (3 * 3 * 3) + 6 * 8 * (3 * 3 * 4),                 # 2592 + 1728
    "encoder.attention_linears": 1 * (24 + 24 + 6 + 6) * 4 * 4 + 2 * (6 * 4) * 8 * 8,  # q, o on N; k, v on N_r
    "encoder.spatial_reduction": 6 * 4 * (2 * 2 * 4),                                  # stage 2 has none
    "encoder.attention_matmuls": 2 * 24 * 6 * 4 + 2 * (2 * 6 * 6 * 8),                 # QK^T + AV
    "encoder.ffn_dense1": 24 * 4 * 8 + 2 * (6 * 8 * 24),
    "encoder.ffn_dwconv": 24 * 8 * 9 + 2 * (6 * 24 * 9),
    "encoder.ffn_dense2": 24 * 8 * 4 + 2 * (6 * 24 * 8),
}
TINY_LITERAL = {"decoder.stage_linears": 24 * 4 * 6 + 6 * 8 * 6, "decoder.fuse": 24 * (2 * 6) * 6,
                "decoder.classifier": 24 * 6 * 3}
TINY_FUSED = {"decoder.stage_projections": 24 * 4 * 6 + 6 * 8 * 6, "decoder.classifier": 24 * 6 * 3}


def test_tiny_config_by_hand():
    assert count_macs(TINY, 8, 12, decoder="literal") == {**TINY_ENCODER, **TINY_LITERAL}
    assert count_macs(TINY, 8, 12, decoder="fused") == {**TINY_ENCODER, **TINY_FUSED}
    assert count_macs(TINY, 8, 12, decoder=None) == TINY_ENCODER
    s = summarize(count_macs(TINY, 8, 12, decoder="literal"))
    assert s["encoder"] == sum(TINY_ENCODER.values()) == 21504
    assert s["total"] == s["encoder"] + s["decoder"] == 21504 + 864 + 1728 + 432


# SegFormer paper, Table 1: GFLOPs (counted as MACs, fvcore/mmcv style) of the ADE20K models with Eq. 4's decoder.
PAPER_ADE_GMACS = {"b0": (512, 8.4), "b1": (512, 15.9), "b2": (512, 62.4), "b3": (512, 79.0), "b4": (512, 95.7),
                   "b5": (640, 183.3)}


@pytest.mark.parametrize("variant", sorted(PAPER_ADE_GMACS))
def test_paper_gflops(variant):
    side, paper = PAPER_ADE_GMACS[variant]
    total = summarize(count_macs(variant_config(variant, 150), side, side, decoder="literal"))["total"] / 1e9
    print(f"{variant} at {side}: {total:.3f} GMAC (paper {paper})")
    assert total == pytest.approx(paper, rel=5e-3)


def test_b0_decoder_split():
    literal = summarize(count_macs(variant_config("b0", 150), 512, 512, decoder="literal"))
    fused = summarize(count_macs(variant_config("b0", 150), 512, 512, decoder="fused"))
    assert literal["decoder"] / 1e9 == pytest.approx(5.18, abs=0.01)
    assert fused["decoder"] / 1e9 == pytest.approx(0.89, abs=0.01)
    assert fused["encoder"] == literal["encoder"]


def test_fused_count_matches_the_folded_weights():
    """The fused decoder's MACs are those of the matrices fold_decode_head really builds, at each stage's size."""
    config = variant_config("b0", 11)
    folded = fold_decode_head(unflatten(random_state_dict(config, seed=0))["decode_head"])
    sizes = stage_sizes(config, 96, 160)
    expected = sum(h * w * a.size for (h, w), a in zip(sizes, folded.stage_weights))
    macs = count_macs(config, 96, 160, decoder="fused")
    assert macs["decoder.stage_projections"] == expected
    assert macs["decoder.classifier"] == sizes[0][0] * sizes[0][1] * folded.classifier_weight.size


def test_stage_sizes_are_the_models():
    config = variant_config("b0", 3)
    model = Segformer(config, random_state_dict(config, seed=1))
    x = np.zeros((1, 3, 65, 77), dtype=np.float32)
    out = model(x, output_hidden_states=True)
    assert stage_sizes(config, 65, 77) == [h.shape[2:] for h in out.hidden_states]


def test_attention_bytes():
    assert attention_bytes(TINY, 8, 12) == max(1 * 24 * 6 * 4, 2 * 6 * 6 * 4)  # heads x N x N_r float32, per stage
    assert attention_bytes(variant_config("b0"), 1024, 2048) == 1 * (256 * 512) * (32 * 64) * 4  # stage 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="decoder"):
        count_macs(TINY, 8, 8, decoder="folded")
    with pytest.raises(ValueError, match="minimum"):
        count_macs(TINY, 0, 8)
