"""The heads: SegFormer's all-MLP decoder (Sec. 3.2) and the classification head of the mit-b* checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import BATCH_NORM_EPS
from ..threads import parallel_bands
from . import layers
from .layers import EVAL, Mode


def all_mlp_decode_head(stages, p: dict, ops=layers, mode: Mode = EVAL, cache: dict | None = None):
    """The all-MLP decoder on the four stage maps `(B, H_i, W_i, C_i)` -> logits `(B, H_1, W_1, num_labels)`.

    Eq. 4: each F_i is projected to C = decoder_hidden_size by a linear layer, upsampled (bilinear) to H/4 x W/4,
    the four are concatenated -- in reversed order, stage 4 first, as HF and the original code do -- fused by a
    1x1 conv (no bias) + BatchNorm + ReLU, and classified by a 1x1 conv. `p` is the `decode_head` subtree.

    `mode`: in train mode (`layers.Mode`) BatchNorm normalises with the batch's statistics
    (`layers.batch_norm_train`) and updates its running estimates in `p`, as torch's forward does; dropout acts
    before the classifier. `cache`: a dict to fill for `all_mlp_decode_head_backward`.
    """
    b, h, w, _ = stages[0].shape
    n = len(stages)
    projected = [ops.linear(f, c["proj"]["weight"], c["proj"]["bias"]) for f, c in zip(stages, p["linear_c"])]
    d = projected[0].shape[-1]
    concat = np.empty((b, h, w, n * d), dtype=projected[0].dtype)
    for i, f in enumerate(projected):  # upsampled straight into their block of the concatenation, stage n first
        concat[..., (n - 1 - i) * d : (n - i) * d] = ops.resize_bilinear(f, (h, w), axes=(1, 2))
    fused = ops.linear(concat, p["linear_fuse"]["weight"][:, :, 0, 0])  # 1x1 conv
    bn = p["batch_norm"]
    if mode.training:
        normed, mean, var = layers.batch_norm_train(fused, bn["weight"], bn["bias"])  # no numba twin: NumPy's
        layers.update_running_stats(bn, mean, var, count=fused.size // fused.shape[-1])
    else:
        normed = ops.batch_norm(fused, bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"])
    activated, keep = layers.dropout(ops.relu(normed), mode.classifier_dropout, mode.rng)
    if cache is not None:  # the projections at their own resolution: the backward upsamples them again
        cache.update(stages=stages, projected=projected, ops=ops, fused=fused, normed=normed, activated=activated,
                     train=mode.training, dropout=(keep, mode.classifier_dropout))
    return ops.linear(activated, p["classifier"]["weight"][:, :, 0, 0], p["classifier"]["bias"])


def all_mlp_decode_head_backward(dlogits, cache: dict, p: dict):
    """Gradients of `all_mlp_decode_head`: `dlogits: (B, H_1, W_1, num_labels)` -> (dstages, grads).

    `dstages`: the four `(B, H_i, W_i, C_i)` gradients; `grads`: the `decode_head` subtree's layout, BatchNorm with
    `weight` and `bias` only (its running statistics are state, not parameters). Each step undone in reverse: the
    classifier, dropout, ReLU, BatchNorm (the batch statistics' three-term formula in train mode), the fuse conv, the
    concatenation (split in its reversed stage order), the upsampling (its adjoint) and the per-stage linears.
    The fuse conv's input, the concatenation (4 D channels at 1/4 resolution: the head's largest array), is not
    kept: each stage's block of it is upsampled again from the cached projection when its weight gradient is made.
    """
    classifier, fuse, bn = p["classifier"], p["linear_fuse"], p["batch_norm"]
    dactivated, dw_cls, db_cls = layers.linear_backward(dlogits, cache["activated"], classifier["weight"][:, :, 0, 0])
    dnormed = layers.relu_backward(layers.dropout_backward(dactivated, *cache["dropout"]), cache["normed"])
    del dactivated  # (each of these full-resolution gradients goes as soon as the next exists: memory)
    if cache["train"]:
        dfused, dgamma, dbeta = layers.batch_norm_train_backward(dnormed, cache["fused"], bn["weight"])
    else:
        dfused, dgamma, dbeta = layers.batch_norm_backward(dnormed, cache["fused"], bn["weight"],
                                                           bn["running_mean"], bn["running_var"])
    del dnormed
    n, size = len(p["linear_c"]), dfused.shape[1:3]
    w_fuse = fuse["weight"][:, :, 0, 0]
    d = w_fuse.shape[1] // n
    dw_fuse = np.empty_like(w_fuse)
    dstages, linear_c = [], []
    for i, (f, c, proj) in enumerate(zip(cache["stages"], p["linear_c"], cache["projected"])):
        block = slice((n - 1 - i) * d, (n - i) * d)  # stage i's block of the concatenation (stage n first)
        up = cache["ops"].resize_bilinear(proj, size, axes=(1, 2))  # what the forward concatenated, again
        dup, dw_fuse[:, block], _ = layers.linear_backward(dfused, up, w_fuse[:, block])  # the 1x1 conv, no bias
        dprojected = layers.resize_bilinear_backward(dup, f.shape[1:3], axes=(1, 2))
        df, dw, db = layers.linear_backward(dprojected, f, c["proj"]["weight"])
        dstages.append(df)
        linear_c.append({"proj": {"weight": dw, "bias": db}})
    grads = {
        "linear_c": linear_c,
        "linear_fuse": {"weight": dw_fuse.reshape(fuse["weight"].shape)},
        "batch_norm": {"weight": dgamma, "bias": dbeta},
        "classifier": {"weight": dw_cls.reshape(classifier["weight"].shape), "bias": db_cls},
    }
    return dstages, grads


BAND_ELEMENTS = 1 << 18  # fused_decode_head's bands: 1 MB of float32 of the (B, rows, W_1, D) sum


@dataclass(frozen=True)
class FoldedDecodeHead:
    """The fused decoder's weights (`fold_decode_head`): per stage A_i `(D, C_i)`, the constant c `(D,)`, and the
    classifier `(num_labels, D)`, `(num_labels,)`."""

    stage_weights: list
    bias: np.ndarray
    classifier_weight: np.ndarray
    classifier_bias: np.ndarray


def fold_decode_head(p: dict, dtype=np.float32) -> FoldedDecodeHead:
    """Precompute the fused decoder: the same function as `all_mlp_decode_head`, about 6x fewer multiply-adds.

    Up to the ReLU the head is linear: BN(W_fuse [up(F_4 W_4^T + b_4), ..., up(F_1 W_1^T + b_1)]). Bilinear
    upsampling mixes pixels, never channels, and its weights sum to 1, so it commutes with any per-pixel linear map
    and lets constants through. Hence

        BN(fuse) = sum_i up(F_i A_i^T) + c,   A_i = s * (W_fuse,i @ W_i),   s = gamma / sqrt(var + eps),
        c = s * (sum_i W_fuse,i b_i - mean) + beta,

    where W_fuse,i is the block of the 1x1 fuse conv that sees stage i (blocks in reversed stage order). Each
    A_i : (D, C_i) runs at stage i's own resolution, before upsampling. For B0 at 512 x 512 the decoder drops
    from about 5.2 to 0.9 GMAC. Folded in float64, then stored as `dtype`.
    """
    bn = p["batch_norm"]
    scale = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + BATCH_NORM_EPS)
    w_fuse = p["linear_fuse"]["weight"][:, :, 0, 0].astype(np.float64)  # (D, 4D)
    d = w_fuse.shape[0]
    n = len(p["linear_c"])
    stage_weights, const = [], bn["bias"] - bn["running_mean"] * scale
    for i, proj in enumerate(p["linear_c"]):
        block = w_fuse[:, (n - 1 - i) * d : (n - i) * d]  # concatenation order is stage n..1
        stage_weights.append((scale[:, None] * (block @ proj["proj"]["weight"])).astype(dtype))
        const = const + scale * (block @ proj["proj"]["bias"])
    return FoldedDecodeHead(stage_weights=stage_weights, bias=const.astype(dtype),
                            classifier_weight=p["classifier"]["weight"][:, :, 0, 0].astype(dtype),
                            classifier_bias=p["classifier"]["bias"].astype(dtype))


def fused_decode_head(stages, folded: FoldedDecodeHead, ops=layers):
    """`all_mlp_decode_head` computed through `fold_decode_head`'s weights: stage maps -> `(B, H_1, W_1, labels)`.

    Inference only, so it has no backward: the folded weights are functions of the trained ones (and of the running
    statistics, which train mode does not normalise with); training runs the literal `all_mlp_decode_head`.

    Once stages 2-4 are projected at their own resolutions, every step is per output row, so the rest runs in bands
    of rows of (H_1, W_1) small enough to stay in the cache from the sum to the logits, split across the threads
    (`threads.parallel_bands`). B0 at 512 x 512 on 2 threads, the head alone: 14.2 -> 12.9 ms.
    """
    b, h, w, _ = stages[0].shape
    first, *rest = folded.stage_weights
    low = [ops.linear(f, a) for f, a in zip(stages[1:], rest)]  # F_i A_i^T at stage i's resolution, i = 2..4
    logits = np.empty((b, h, w, folded.classifier_bias.shape[0]), dtype=stages[0].dtype)

    def output_rows(start, stop):
        fused = ops.linear(stages[0][:, start:stop], first, folded.bias)  # F_1 A_1^T + c
        for p in low:
            ops.add_resized(fused, p, (h, w), start)  # += rows start:stop of resize_bilinear(F_i A_i^T, (H_1, W_1))
        logits[:, start:stop] = ops.linear(ops.relu(fused), folded.classifier_weight, folded.classifier_bias)

    parallel_bands(output_rows, h, band=max(1, BAND_ELEMENTS // (b * w * first.shape[0])))
    return logits


def classification_head(last_stage, p: dict, ops=layers, cache: dict | None = None):
    """`(B, H_4, W_4, C_4)` -> `(B, num_labels)`: mean over the last stage's tokens, then a linear layer."""
    pooled = last_stage.mean(axis=(1, 2))
    if cache is not None:
        cache.update(pooled=pooled, shape=last_stage.shape)
    return ops.linear(pooled, p["weight"], p["bias"])


def classification_head_backward(dlogits, cache: dict, p: dict):
    """Gradients of `classification_head`: `dlogits: (B, num_labels)` -> (dlast_stage `(B, H_4, W_4, C_4)`, grads).

    The mean's gradient is spread evenly: every one of the H_4 W_4 tokens gets dpooled / (H_4 W_4).
    """
    dpooled, dw, db = layers.linear_backward(dlogits, cache["pooled"], p["weight"])
    b, h, w, c = cache["shape"]
    dlast_stage = np.broadcast_to(dpooled[:, None, None, :] / (h * w), (b, h, w, c)).copy()
    return dlast_stage, {"weight": dw, "bias": db}
