"""The encoder's backward (nn/attention.py, nn/encoder.py) against central finite differences, float64, tiny shapes.

As in test_backward_layers.py: L = sum(forward(...) * g) for a fixed random `g`, so `g` is the `dout` handed to
the backward, and each gradient must agree with the numerical one to max|analytic - numeric| <= 1e-6 max|numeric|.
Inputs and parameters are checked as one tree `{"x": x, "p": p}` against the backward's `{"x": dx, "p": grads}`,
which must have exactly the parameter tree's structure (the checkpoint's names). Large tensors are checked on a
random sample of their entries.
"""

import numpy as np
import pytest

from mininp_segformer.config import variant_config
from mininp_segformer.nn import attention, encoder, layers
from mininp_segformer.weights import BACKBONE, random_state_dict, unflatten
from tests.conftest import assert_close
from tests.test_backward_layers import RTOL, numerical_grad

MAX_ENTRIES = 50  # finite differences on at most this many entries of a tensor

# B0's layout shrunk: tiny hidden sizes, one block per stage, sr_ratios whose tiling drops rows and columns of the
# 35 x 37 input's 9 x 10 and 5 x 5 token maps (stage 1: R = 4, stage 2: R = 2); heads 1 and 2.
TINY = dict(hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 1, 2), sr_ratios=(4, 2, 1, 1),
            mlp_ratios=(2, 2, 2, 2), decoder_hidden_size=8)
IMAGE = (35, 37)


def encoder_params(seed=0, dtype=np.float64, **overrides):
    """(config, the `encoder` subtree as `dtype`) of the TINY config with `overrides`."""
    config = variant_config("b0", num_labels=3, **{**TINY, **overrides})
    tree = unflatten(random_state_dict(config, head=BACKBONE, seed=seed))["encoder"]
    return config, cast(tree, dtype)


def cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [cast(v, dtype) for v in tree]
    return tree.astype(dtype)


def leaves(tree, path=()):
    """(path, array) of every array in a tree of dicts and lists, in a fixed order."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from leaves(tree[k], path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from leaves(v, path + (i,))
    else:
        yield path, tree


def sampled_numerical_grad(loss, x, idx):
    """`numerical_grad` at the flat indices `idx` of `x` only: the perturbation is a small vector added there."""
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x)
    base, delta = flat[idx].copy(), np.zeros(len(idx))

    def shifted():
        flat[idx] = base + delta
        return loss()

    try:
        return numerical_grad(shifted, delta)
    finally:
        flat[idx] = base


def check_tree(name, forward, inputs, grads, g, rng, max_entries=MAX_ENTRIES, dead=()):
    """Every leaf of `grads` against finite differences of L = sum(forward() * g) in the same leaf of `inputs`
    (which `forward` reads). `grads` must have the structure of `inputs`. Leaves whose path starts with one of
    `dead` must not reach the loss: their gradient must be exactly 0. The keys' bias has a zero gradient in exact
    arithmetic (it adds q . b_k to a whole row of scores, which softmax ignores), so both its gradients must be
    0 to the check's precision: <= 1e-6 of the largest numeric gradient of the tree. Returns the worst
    error / max|numeric| over the other leaves."""
    expected, got = list(leaves(inputs)), list(leaves(grads))
    assert [p for p, _ in got] == [p for p, _ in expected], f"{name}: the gradients' tree differs from the inputs'"

    def loss():
        out = forward()
        return float(sum(np.sum(o * go) for o, go in zip(out, g))) if isinstance(out, list) else float(np.sum(out * g))

    worst, largest, flat = 0.0, 0.0, []
    for (path, x), (_, dx) in zip(expected, got):
        assert dx.shape == x.shape and dx.dtype == x.dtype, f"{name} {path}: {dx.shape} {dx.dtype}"
        idx = rng.choice(x.size, min(x.size, max_entries), replace=False)
        numeric = sampled_numerical_grad(loss, x, idx)
        if any(path[: len(d)] == d for d in dead):
            assert (dx == 0).all() and (numeric == 0).all(), f"{name} {path}: should not reach the loss"
            continue
        if path[-2:] == ("key", "bias"):
            flat.append((path, dx, numeric))
            continue
        scale = np.max(np.abs(numeric))
        assert scale > 0, f"{name} {path}: does not reach the loss, the check would be empty"
        err = assert_close(f"{name} {path}", dx.reshape(-1)[idx], numeric, rtol_of_max=RTOL, dtype=np.float64)
        worst, largest = max(worst, err / scale), max(largest, scale)
    for path, dx, numeric in flat:
        for what, grad in (("analytic", dx), ("numeric", numeric)):
            assert np.max(np.abs(grad)) <= RTOL * largest, f"{name} {path}: {what} gradient {grad} is not 0"
    print(f"{name}: worst error / max|numeric| = {worst:.2e}")
    return worst


# --- attention ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,r", [(5, 7, 2), (6, 6, 3), (4, 9, 4)])
def test_spatial_reduction_backward(height, width, r):
    rng = np.random.default_rng(20)
    _, p = encoder_params(hidden_sizes=(3, 8, 8, 8), sr_ratios=(r, 2, 1, 1), num_attention_heads=(1, 1, 1, 1))
    ps = p["block"][0][0]["attention"]["self"]
    x = rng.standard_normal((2, height * width, 3))
    cache = {}
    out = attention.spatial_reduction(x, height, width, ps, r, cache=cache)
    g = rng.standard_normal(out.shape)
    dx, grads = attention.spatial_reduction_backward(g, cache, height, width, r, ps)
    sub = {"sr": ps["sr"], "layer_norm": ps["layer_norm"]}  # the two subtrees it reads
    check_tree("spatial_reduction", lambda: attention.spatial_reduction(x, height, width, ps, r),
               {"x": x, "p": sub}, {"x": dx, "p": grads}, g, rng)
    dmap = dx.reshape(2, height, width, 3)  # rows and columns past the last whole R x R tile: exactly 0
    assert (dmap[:, height // r * r :] == 0).all() and (dmap[:, :, width // r * r :] == 0).all()
    assert bool(height % r or width % r) == (dmap == 0).any()  # and nothing else is


ATTENTION_CASES = [  # (heads, sr_ratio, height, width)
    (1, 1, 3, 4),
    (2, 1, 2, 3),
    (2, 2, 5, 7),  # the reduction drops the last row and column
    (1, 3, 7, 6),
]


@pytest.mark.parametrize("heads,r,height,width", ATTENTION_CASES)
def test_efficient_self_attention_backward(heads, r, height, width):
    rng = np.random.default_rng(21)
    _, p = encoder_params(num_attention_heads=(heads, 2, 1, 2), sr_ratios=(r, 2, 1, 1), hidden_sizes=(4, 8, 8, 8))
    pa = p["block"][0][0]["attention"]
    x = rng.standard_normal((2, height * width, 4))

    def forward():
        return attention.efficient_self_attention(x, height, width, pa, heads, r)[0]

    cache = {}
    out, probs = attention.efficient_self_attention(x, height, width, pa, heads, r, cache=cache)
    assert np.array_equal(attention.attention_probs(cache["q"], cache["k"]), probs)  # the backward recomputes them
    assert np.allclose(probs.sum(axis=-1), 1)  # the probabilities, not the scores
    g = rng.standard_normal(out.shape)
    dx, grads = attention.efficient_self_attention_backward(g, cache, height, width, heads, r, pa)
    check_tree("efficient_self_attention", forward, {"x": x, "p": pa}, {"x": dx, "p": grads}, g, rng)


# --- encoder components ----------------------------------------------------------------------------------------

def test_mix_ffn_backward():
    rng = np.random.default_rng(22)
    _, p = encoder_params()
    pm = p["block"][0][0]["mlp"]
    height, width = 3, 5
    x = rng.standard_normal((2, height * width, 4))
    cache = {}
    out = encoder.mix_ffn(x, height, width, pm, cache=cache)
    g = rng.standard_normal(out.shape)
    dx, grads = encoder.mix_ffn_backward(g, cache, height, width, pm)
    check_tree("mix_ffn", lambda: encoder.mix_ffn(x, height, width, pm), {"x": x, "p": pm}, {"x": dx, "p": grads},
               g, rng)


@pytest.mark.parametrize("stage,shape", [(0, (2, 9, 11, 3)), (1, (1, 5, 6, 4))])
def test_overlap_patch_merging_backward(stage, shape):
    rng = np.random.default_rng(23)
    config, p = encoder_params()
    pp = p["patch_embeddings"][stage]
    k, s = config.patch_sizes[stage], config.strides[stage]
    x = rng.standard_normal(shape)
    cache = {}
    out = encoder.overlap_patch_merging(x, pp, k, s, cache=cache)
    g = rng.standard_normal(out.shape)
    dx, grads = encoder.overlap_patch_merging_backward(g, cache, k, s, pp)
    check_tree("overlap_patch_merging", lambda: encoder.overlap_patch_merging(x, pp, k, s),
               {"x": x, "p": pp}, {"x": dx, "p": grads}, g, rng)


def _block_case(r, seed=24):
    """(forward, inputs tree, gradients tree, g) of one transformer block with sr_ratio r on a 5 x 7 map."""
    rng = np.random.default_rng(seed)
    _, p = encoder_params(sr_ratios=(r, 2, 1, 1), num_attention_heads=(2, 2, 1, 2))
    pb = p["block"][0][0]
    height, width = 5, 7
    x = rng.standard_normal((2, height * width, 4))
    cache = {}
    out, _ = encoder.transformer_block(x, height, width, pb, 2, r, cache=cache)
    g = rng.standard_normal(out.shape)
    dx, grads = encoder.transformer_block_backward(g, cache, height, width, 2, r, pb)
    return lambda: encoder.transformer_block(x, height, width, pb, 2, r)[0], {"x": x, "p": pb}, \
        {"x": dx, "p": grads}, g


@pytest.mark.parametrize("r", [1, 2])
def test_transformer_block_backward(r):
    forward, inputs, grads, g = _block_case(r)
    check_tree("transformer_block", forward, inputs, grads, g, np.random.default_rng(25))


# --- the whole encoder --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", [(0, 1, 2, 3), (1,)])
def test_mix_transformer_backward(given):
    """All four stage gradients, or stage 2's only: stages 3 and 4 then get exactly zero gradients."""
    rng = np.random.default_rng(26)
    config, p = encoder_params()
    pixels = rng.standard_normal((1, *IMAGE, 3))
    cache = {}
    stages, _ = encoder.mix_transformer(pixels, p, config, cache=cache)
    assert [f.shape[1:3] for f in stages] == [(9, 10), (5, 5), (3, 3), (2, 2)]
    g = [rng.standard_normal(f.shape) if s in given else np.zeros(f.shape) for s, f in enumerate(stages)]
    dpixels, grads = encoder.mix_transformer_backward([g[s] if s in given else None for s in range(4)], cache,
                                                      config, p)
    dead = [(name, s) for name in ("patch_embeddings", "block", "layer_norm") for s in range(max(given) + 1, 4)]
    check_tree("mix_transformer", lambda: encoder.mix_transformer(pixels, p, config)[0],
               {"x": pixels, "p": p}, {"x": dpixels, "p": grads}, g, rng, max_entries=4,
               dead=[("p",) + d for d in dead])
    # the parameters on the sr path (stage 1: R = 4, stage 2: R = 2), beyond the four entries above
    for s in (0, 1):
        sr = {"p": p["block"][s][0]["attention"]["self"]["sr"]}
        check_tree(f"mix_transformer stage {s + 1} sr", lambda: encoder.mix_transformer(pixels, p, config)[0], sr,
                   {"p": grads["block"][s][0]["attention"]["self"]["sr"]}, g, rng, max_entries=20)


def test_the_cache_leaves_the_forward_unchanged():
    """float32, as the model runs: the same stage maps, bit for bit, with or without a cache (the unfused
    depthwise conv + GELU of the cached path is what `layers.depthwise_conv3x3_gelu` computes)."""
    config, p = encoder_params(dtype=np.float32)
    pixels = np.random.default_rng(27).standard_normal((1, *IMAGE, 3)).astype(np.float32)
    plain, attn_plain = encoder.mix_transformer(pixels, p, config, output_attentions=True)
    cached, attn_cached = encoder.mix_transformer(pixels, p, config, output_attentions=True, cache={})
    for a, b in zip(plain + attn_plain, cached + attn_cached):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_backward_keeps_float32():
    config, p = encoder_params(dtype=np.float32)
    rng = np.random.default_rng(28)
    pixels = rng.standard_normal((1, *IMAGE, 3)).astype(np.float32)
    cache = {}
    stages, _ = encoder.mix_transformer(pixels, p, config, cache=cache)
    dstages = [rng.standard_normal(f.shape).astype(np.float32) for f in stages]
    dpixels, grads = encoder.mix_transformer_backward(dstages, cache, config, p)
    for path, grad in [(("pixel_values",), dpixels)] + list(leaves(grads)):
        assert grad.dtype == np.float32, f"{path}: {grad.dtype}"


# --- the checks can fail ----------------------------------------------------------------------------------------

def test_a_dropped_residual_fails_the_check():
    """dx without the identity path of the Mix-FFN's residual (dx - dout) is rejected."""
    forward, inputs, grads, g = _block_case(2)
    grads["x"] = grads["x"] - g
    with pytest.raises(AssertionError, match="> tol"):
        check_tree("transformer_block", forward, inputs, grads, g, np.random.default_rng(29))


def test_a_wrong_softmax_backward_fails_the_attention_check(monkeypatch):
    """Attention's check rejects the classic softmax mistake (the Jacobian's diagonal only) in the building block."""
    monkeypatch.setattr(layers, "softmax_backward", lambda dout, probs: dout * probs * (1 - probs))
    with pytest.raises(AssertionError, match="> tol"):
        test_efficient_self_attention_backward(*ATTENTION_CASES[2])


# --- train mode: dropout and stochastic depth --------------------------------------------------------------------

def train_mode(seed=7, hidden=0.3, attention=0.3):
    """A train Mode whose masks are the same at every call: a fresh Generator of the same seed each time, so that
    finite differences see one fixed function."""
    return lambda: layers.Mode(training=True, rng=np.random.default_rng(seed), hidden_dropout=hidden,
                               attention_dropout=attention)


def test_efficient_self_attention_backward_with_dropout():
    rng = np.random.default_rng(30)
    heads, r, height, width = 2, 2, 5, 7
    _, p = encoder_params(num_attention_heads=(heads, 2, 1, 2), sr_ratios=(r, 2, 1, 1), hidden_sizes=(4, 8, 8, 8))
    pa, mode = p["block"][0][0]["attention"], train_mode()
    x = rng.standard_normal((2, height * width, 4))
    cache = {}
    out, dropped = attention.efficient_self_attention(x, height, width, pa, heads, r, cache=cache, mode=mode())
    keep = cache["probs_dropout"][0]
    assert 0 < keep.mean() < 1 and 0 < cache["out_dropout"][0].mean() < 1  # both masks drop something
    probs = attention.attention_probs(cache["q"], cache["k"])
    np.testing.assert_array_equal(dropped, probs * keep * (1 / 0.7))  # HF returns the dropped probabilities
    g = rng.standard_normal(out.shape)
    dx, grads = attention.efficient_self_attention_backward(g, cache, height, width, heads, r, pa)
    check_tree("efficient_self_attention (dropout)",
               lambda: attention.efficient_self_attention(x, height, width, pa, heads, r, mode=mode())[0],
               {"x": x, "p": pa}, {"x": dx, "p": grads}, g, rng)


def test_mix_ffn_backward_with_dropout():
    rng = np.random.default_rng(31)
    _, p = encoder_params()
    pm, mode = p["block"][0][0]["mlp"], train_mode(hidden=0.4)
    height, width = 3, 5
    x = rng.standard_normal((2, height * width, 4))
    cache = {}
    out = encoder.mix_ffn(x, height, width, pm, cache=cache, mode=mode())
    assert 0 < cache["gelu_dropout"][0].mean() < 1 and 0 < cache["out_dropout"][0].mean() < 1
    g = rng.standard_normal(out.shape)
    dx, grads = encoder.mix_ffn_backward(g, cache, height, width, pm)
    check_tree("mix_ffn (dropout)", lambda: encoder.mix_ffn(x, height, width, pm, mode=mode()),
               {"x": x, "p": pm}, {"x": dx, "p": grads}, g, rng)


def test_transformer_block_backward_with_drop_path():
    """Stochastic depth 0.5 on a batch of 4: the seed drops some samples' branches and keeps others'."""
    rng = np.random.default_rng(32)
    _, p = encoder_params(sr_ratios=(2, 2, 1, 1), num_attention_heads=(2, 2, 1, 2))
    pb, mode = p["block"][0][0], train_mode(seed=3, hidden=0.2, attention=0.1)
    height, width = 5, 7
    x = rng.standard_normal((4, height * width, 4))
    cache = {}
    out, _ = encoder.transformer_block(x, height, width, pb, 2, 2, cache=cache, mode=mode(), drop_path=0.5)
    kept = [cache[k][0].reshape(-1) for k in ("attention_drop_path", "mlp_drop_path")]
    assert all(0 < k.mean() < 1 for k in kept), kept  # both outcomes occur
    dropped = ~kept[0] & ~kept[1]
    if dropped.any():  # a sample whose two branches were both dropped passes through unchanged
        np.testing.assert_array_equal(out[dropped], x[dropped])
    g = rng.standard_normal(out.shape)
    dx, grads = encoder.transformer_block_backward(g, cache, height, width, 2, 2, pb)
    check_tree("transformer_block (drop path)",
               lambda: encoder.transformer_block(x, height, width, pb, 2, 2, mode=mode(), drop_path=0.5)[0],
               {"x": x, "p": pb}, {"x": dx, "p": grads}, g, rng)


def test_drop_path_rates_rise_linearly_over_the_blocks():
    config, _ = encoder_params(depths=(2, 2, 3, 1))
    rates = encoder.drop_path_rates(config, 0.1)
    assert len(rates) == 8 and rates[0] == 0.0 and rates[-1] == float(np.float32(0.1))
    np.testing.assert_allclose(np.diff(rates), 0.1 / 7, rtol=1e-6)  # torch.linspace's float32 values
