"""The heads' backward (nn/decoder.py) against central finite differences of their forward, float64, tiny shapes.

As in test_backward_layers.py: L = sum(head(...) * g) with a fixed random `g`, so `dout = g`, and every gradient
must agree with the numerical one to max|analytic - numeric| <= 1e-6 max|numeric|. The decode head is checked in
inference mode (BatchNorm with the running statistics) and in train mode (with the batch's statistics), on every
entry of every parameter and of each stage map: the whole tiny head takes well under a second per mode.
"""

import numpy as np
import pytest

from mininp_segformer import weights
from mininp_segformer.config import BATCH_NORM_EPS, SegformerConfig
from mininp_segformer.nn import decoder, kernels, layers
from tests.conftest import assert_close
from tests.test_backward_layers import RTOL, check_grads, numerical_grad

TINY = SegformerConfig(hidden_sizes=(4, 6, 10, 12), num_attention_heads=(1, 1, 1, 1), decoder_hidden_size=8,
                       id2label={i: f"class {i}" for i in range(3)})
STAGE_SIZES = [(9, 11), (5, 6), (3, 3), (2, 2)]  # odd, uneven downsampling: the bilinear taps overlap and clamp
BATCH = 2
TRAIN = layers.Mode(training=True)  # batch statistics; no rng, so no dropout
BN_STATE = ("running_mean", "running_var", "num_batches_tracked")  # state, not parameters: no gradient


def tiny_params(head=None, seed=0, dtype=np.float64):
    """The tiny config's random weights in the checkpoint's tree, cast to `dtype`; the head's subtree only."""
    args = (TINY,) if head is None else (TINY, head)
    state = weights.random_state_dict(*args, seed=seed)
    tree = weights.unflatten({k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in state.items()})
    return tree["decode_head"] if head is None else tree["classifier"]


def tiny_stages(rng, dtype=np.float64):
    return [rng.standard_normal((BATCH, h, w, c)).astype(dtype) for (h, w), c in zip(STAGE_SIZES, TINY.hidden_sizes)]


def leaves(tree, path=""):
    """{"a.b.0.c": array} of a nested dict/list tree (the Hub's dotted names)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {path: tree}
    return {k: v for key, sub in items for k, v in leaves(sub, f"{path}.{key}" if path else str(key)).items()}


def check_tree(name, forward, p, grads, g, zero=()):
    """`grads` has p's leaves (BatchNorm's state excepted), each equal to the finite differences in that leaf.

    `zero`: leaves the output does not depend on (up to rounding): their gradient, analytic and numeric, must be 0
    within RTOL of the largest parameter gradient.
    """
    params = {k: v for k, v in leaves(p).items() if k.rsplit(".", 1)[-1] not in BN_STATE}
    dparams = leaves(grads)
    assert sorted(dparams) == sorted(params), f"{name}: gradient keys {sorted(dparams)} != {sorted(params)}"
    atol = RTOL * max(np.abs(d).max() for d in dparams.values())
    for key, x in params.items():
        assert dparams[key].shape == x.shape and dparams[key].dtype == x.dtype, key
        if key in zero:
            numeric = numerical_grad(lambda: float(np.sum(forward() * g)), x)
            assert_close(f"{name} {key} (no effect)", dparams[key], np.zeros_like(x), atol=atol, dtype=np.float64)
            assert_close(f"{name} {key} (no effect, numeric)", numeric, np.zeros_like(x), atol=atol, dtype=np.float64)
        else:
            check_grads(f"{name} {key}", lambda _: forward(), (x,), (dparams[key],), g)


# --- the all-MLP decode head -----------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_all_mlp_decode_head_backward(train):
    rng = np.random.default_rng(20)
    p, stages = tiny_params(), tiny_stages(rng)
    cache = {}
    logits = decoder.all_mlp_decode_head(stages, p, mode=layers.Mode(training=train), cache=cache)
    assert logits.shape == (BATCH, *STAGE_SIZES[0], TINY.num_labels)
    assert np.abs(cache["normed"]).min() > 1e-4  # no finite difference straddles the ReLU's kink
    g = rng.standard_normal(logits.shape)
    dstages, grads = decoder.all_mlp_decode_head_backward(g, cache, p)

    def forward():
        return decoder.all_mlp_decode_head(stages, p, mode=layers.Mode(training=train))

    # In train mode BatchNorm subtracts each channel's batch mean, so a constant added before it -- the per-stage
    # biases, which the upsampling and the (bias-free) fuse conv pass on as constants -- changes nothing (up to
    # the float32 bilinear taps, whose two weights sum to 1 only within 3e-8).
    zero = [f"linear_c.{i}.proj.bias" for i in range(len(stages))] if train else []
    check_tree("decode_head", forward, p, grads, g, zero)
    assert len(dstages) == len(stages)
    for i, (f, df) in enumerate(zip(stages, dstages)):
        check_grads(f"decode_head d(stage {i + 1})", lambda _: forward(), (f,), (df,), g)


def test_all_mlp_decode_head_train_mode_is_batch_norm_by_hand():
    """mode=TRAIN: the fused map normalised per channel by its own mean and biased variance over (B, H, W)."""
    rng = np.random.default_rng(21)
    p, stages = tiny_params(), tiny_stages(rng)
    cache = {}
    inference = decoder.all_mlp_decode_head(stages, p, cache=cache)
    fused, bn, cls = cache["fused"], p["batch_norm"], p["classifier"]
    mean, var = fused.mean(axis=(0, 1, 2)), fused.var(axis=(0, 1, 2))
    normed = (fused - mean) / np.sqrt(var + BATCH_NORM_EPS) * bn["weight"] + bn["bias"]
    expected = np.maximum(normed, 0) @ cls["weight"][:, :, 0, 0].T + cls["bias"]
    train = decoder.all_mlp_decode_head(stages, p, mode=TRAIN)
    assert_close("train-mode logits", train, expected, rtol_of_max=1e-12, dtype=np.float64)
    assert np.abs(train - inference).max() > 0.1 * np.abs(expected).max()  # the running statistics are not used


@pytest.mark.parametrize("ops", [layers, kernels], ids=["numpy", "numba"])
def test_all_mlp_decode_head_default_is_unchanged(ops):
    """Without train and cache the forward is today's: the same calls, so the same float32 numbers, bit for bit."""
    p, stages = tiny_params(dtype=np.float32), tiny_stages(np.random.default_rng(22), dtype=np.float32)
    size = stages[0].shape[1:3]
    projected = [ops.linear(f, c["proj"]["weight"], c["proj"]["bias"]) for f, c in zip(stages, p["linear_c"])]
    upsampled = [ops.resize_bilinear(f, size, axes=(1, 2)) for f in projected]
    fused = ops.linear(np.concatenate(upsampled[::-1], axis=-1), p["linear_fuse"]["weight"][:, :, 0, 0])
    bn = p["batch_norm"]
    fused = ops.relu(ops.batch_norm(fused, bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"]))
    before = ops.linear(fused, p["classifier"]["weight"][:, :, 0, 0], p["classifier"]["bias"])
    for out in (decoder.all_mlp_decode_head(stages, p, ops),
                decoder.all_mlp_decode_head(stages, p, ops, mode=layers.EVAL, cache={})):
        assert out.dtype == np.float32 and np.array_equal(out, before)


def test_train_mode_backward_needs_the_batch_statistics():
    """The check can fail: a train-mode forward undone with the inference BatchNorm's backward is rejected."""
    rng = np.random.default_rng(23)
    p, stages = tiny_params(), tiny_stages(rng)
    cache = {}
    logits = decoder.all_mlp_decode_head(stages, p, mode=TRAIN, cache=cache)
    g = rng.standard_normal(logits.shape)
    dstages, _ = decoder.all_mlp_decode_head_backward(g, {**cache, "train": False}, p)
    with pytest.raises(AssertionError, match="> tol"):
        check_grads("decode_head d(stage 4), wrong mode",
                    lambda _: decoder.all_mlp_decode_head(stages, p, mode=TRAIN), (stages[3],), (dstages[3],), g)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_all_mlp_decode_head_backward_keeps_float32(train):
    rng = np.random.default_rng(24)
    p, stages = tiny_params(dtype=np.float32), tiny_stages(rng, dtype=np.float32)
    cache = {}
    logits = decoder.all_mlp_decode_head(stages, p, mode=layers.Mode(training=train), cache=cache)
    dstages, grads = decoder.all_mlp_decode_head_backward(rng.standard_normal(logits.shape, np.float32), cache, p)
    for name, grad in {**{f"stage {i}": d for i, d in enumerate(dstages)}, **leaves(grads)}.items():
        assert grad.dtype == np.float32, f"{name}: {grad.dtype}"


# --- the classification head -----------------------------------------------------------------------------------

def test_classification_head_backward():
    rng = np.random.default_rng(25)
    p = tiny_params(weights.CLASSIFICATION)
    last = rng.standard_normal((BATCH, 3, 2, TINY.hidden_sizes[-1]))
    cache = {}
    logits = decoder.classification_head(last, p, cache=cache)
    assert np.array_equal(logits, decoder.classification_head(last, p))
    g = rng.standard_normal(logits.shape)
    dlast, grads = decoder.classification_head_backward(g, cache, p)

    def forward():
        return decoder.classification_head(last, p)

    check_tree("classifier", forward, p, grads, g)
    check_grads("classifier d(last stage)", lambda _: forward(), (last,), (dlast,), g)
    assert dlast.dtype == np.float64 and dlast.flags.writeable  # a real array, not a broadcast view
