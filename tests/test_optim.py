"""training.optim: AdamW, NVlabs' parameter groups and mmcv's schedule, against torch and against hand computation.

The proof is tests/fixtures/o_adamw_10_steps_*.npz: ten steps of torch.optim.AdamW on a tiny SegFormer in eval mode
(tests/make_fixtures.py, case w), with the groups decided there from the module types and the learning rate set by
mmcv's formula written out there. Here the same ten steps run through `value_and_grad` and `adamw_step`.
"""

import math

import numpy as np
import pytest

from mininp_segformer import Segformer, SegformerConfig, SegformerError, value_and_grad
from mininp_segformer.errors import CheckpointError
from mininp_segformer.training.optim import (NVLABS_CUSTOM_KEYS, AdamW, PolySchedule, adamw_step, adamw_update,
                                             init_state, learning_rate, load_state, param_groups, state_arrays)
from mininp_segformer.weights import is_parameter, random_state_dict
from tests.conftest import load_fixture, random_pixel_values, weights_for


def fixture_run(dtype):
    """(model, pixel_values, labels, settings, schedule, arrays, meta) of case w in `dtype`."""
    arrays, meta = load_fixture(f"o_adamw_10_steps_{dtype}")
    config = SegformerConfig.from_dict(meta["config"])
    backend = "numpy" if dtype == "float64" else "numba"
    model = Segformer(config, weights_for(meta), backend=backend, dtype=dtype)
    x = random_pixel_values(meta["input"]["seed"], meta["input"]["shape"])
    adamw = meta["adamw"]
    settings = AdamW(lr=adamw["lr"], betas=tuple(adamw["betas"]), eps=adamw["eps"],
                     weight_decay=adamw["weight_decay"])
    return model, x, arrays["labels"].astype(np.int64), settings, PolySchedule(**meta["schedule"]), arrays, meta


def train(model, x, labels, settings, schedule, steps):
    params = {k: v for k, v in model.state_dict().items() if is_parameter(k)}
    state = init_state(params)
    losses = []
    for _ in range(steps):
        loss, grads = value_and_grad(model, x, labels)
        losses.append(float(loss))
        adamw_step(params, grads, state, settings, schedule)
    return np.array(losses), params


def final_weights(params, arrays):
    """(name, ours, torch's) for every tensor of the fixture, at its sampled indices."""
    for name, p in params.items():
        ours = p.reshape(-1)
        if f"final_index.{name}" in arrays:
            ours = ours[arrays[f"final_index.{name}"]]
        yield name, ours.astype(np.float64), arrays[f"final.{name}"].astype(np.float64)


def test_ten_steps_equal_torch_float64():
    """float64 on both sides (torch with sdpa attention, whose softmax stays float64): the update, the groups and
    the schedule are torch's and mmcv's exactly (measured: losses 4e-15 relative, weights 2e-11 x max|w|)."""
    model, x, labels, settings, schedule, arrays, meta = fixture_run("float64")
    losses, params = train(model, x, labels, settings, schedule, meta["steps"])
    rel = np.abs(losses / arrays["losses"] - 1)
    print(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}; max relative error {rel.max():.2e}")
    assert losses[-1] < 0.8 * losses[0]  # the run does train
    assert rel.max() <= 1e-5
    worst = 0.0
    for name, ours, ref in final_weights(params, arrays):
        err = np.abs(ours - ref).max() / meta["final_max_abs"][name]
        worst = max(worst, err)
        assert err <= 1e-5, f"{name}: max|ours - torch| = {err:.2e} x max|w|"
    print(f"final weights: worst max|ours - torch| = {worst:.2e} x max|w|")


def test_ten_steps_follow_torch_float32():
    """float32 (numba kernels): both runs round differently, and Adam's division by the running gradient size turns
    gradients that are only rounding noise (the key biases': softmax ignores a shift shared by all keys, so their
    true gradient is 0) into steps of about lr in a direction the noise picks. Two such runs part by at most
    2 x sum_t lr_t per element (normalised steps within [-1, 1]); measured: 0.16 of that, on a key bias, and the
    losses 1.3e-4 relative after ten steps (6e-7 at the first)."""
    model, x, labels, settings, schedule, arrays, meta = fixture_run("float32")
    losses, params = train(model, x, labels, settings, schedule, meta["steps"])
    rel = np.abs(losses / arrays["losses"] - 1)
    print(f"losses max relative error {rel.max():.2e} (first step {rel[0]:.1e})")
    assert rel[0] <= 1e-5 and rel.max() <= 1e-3
    groups = param_groups(params, settings.custom_keys)
    for name, ours, ref in final_weights(params, arrays):
        travel = sum(learning_rate(t, settings.lr * groups[name][0], schedule) for t in range(meta["steps"]))
        bound = 1e-5 * meta["final_max_abs"][name] + 2 * travel
        assert np.abs(ours - ref).max() <= bound, name


def test_groups_are_nvlabs():
    """mmcv's rule on the Hub names picks what torch's module types pick: decode head x10 (its BatchNorm too, with
    weight decay), every encoder LayerNorm without weight decay, the rest (1, 1)."""
    _, meta = load_fixture("o_adamw_10_steps_float64")
    ours = param_groups(meta["multipliers"], NVLABS_CUSTOM_KEYS)
    assert {k: list(v) for k, v in ours.items()} == meta["multipliers"]
    assert ours["decode_head.batch_norm.weight"] == (10.0, 1.0)
    assert ours["segformer.encoder.block.0.0.attention.self.layer_norm.bias"] == (1.0, 0.0)
    assert ours["segformer.encoder.block.0.0.mlp.dwconv.dwconv.weight"] == (1.0, 1.0)


def test_group_key_order_is_mmcv():
    """Longest key first, then alphabetical: 'norm_x' beats 'head' and 'norm'; of 'head' and 'norm', 'head'."""
    keys = {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}, "norm_x": {"lr_mult": 3.0}}
    groups = param_groups(["decode_head.batch_norm.w", "a.norm_x.head", "b.layer_norm.w", "c.w"], keys)
    assert groups == {"decode_head.batch_norm.w": (10.0, 1.0), "a.norm_x.head": (3.0, 1.0),
                      "b.layer_norm.w": (1.0, 0.0), "c.w": (1.0, 1.0)}


def test_schedule_is_mmcvs():
    """mmcv's poly + linear warmup at hand-computed points of NVlabs' B0 schedule (6e-5, 1500 warmup iterations from
    1e-6 of the rate, 160k iterations, power 1), of power 0.9 with a floor, and torch's run of case w."""
    s = PolySchedule()
    assert learning_rate(0, 6e-5, s) == pytest.approx(6e-5 * 1e-6, rel=1e-12)  # regular 6e-5, k = 1 - 1e-6
    # step 750: regular 6e-5 (1 - 750/160000) = 5.971875e-5, k = 0.5 (1 - 1e-6), lr = regular (0.5 + 5e-7)
    assert learning_rate(750, 6e-5, s) == pytest.approx(5.971875e-5 * 0.5000005, rel=1e-12)
    assert learning_rate(1500, 6e-5, s) == pytest.approx(6e-5 * 0.990625, rel=1e-12)  # warmup over
    assert learning_rate(80_000, 6e-5, s) == pytest.approx(3e-5, rel=1e-12)
    assert learning_rate(160_000, 6e-5, s) == 0.0
    s = PolySchedule(max_iters=100, power=0.9, min_lr=1e-4, warmup_iters=0)
    assert learning_rate(50, 1e-2, s) == pytest.approx((1e-2 - 1e-4) * 0.5**0.9 + 1e-4, rel=1e-12)
    arrays, meta = load_fixture("o_adamw_10_steps_float64")
    s = PolySchedule(**meta["schedule"])
    ours = [learning_rate(t, meta["adamw"]["lr"], s) for t in range(meta["steps"])]
    np.testing.assert_allclose(ours, arrays["lrs"], rtol=1e-12)


def test_first_step_by_hand():
    """Step 1 of AdamW: m_hat = g, v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps)."""
    rng = np.random.default_rng(0)
    p0, g = rng.normal(size=50), rng.normal(size=50)
    p, m, v = p0.copy(), np.zeros(50), np.zeros(50)
    adamw_update(p, g, m, v, step=1, lr=0.1, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    np.testing.assert_allclose(p, p0 * (1 - 0.1 * 0.01) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-12, atol=1e-15)


def test_adamw_minimises_a_quadratic():
    """f(p) = 1/2 sum a_i (p_i - c_i)^2, constant learning rate, no weight decay: p reaches c."""
    a, c = np.array([1.0, 10.0, 0.1]), np.array([1.0, -2.0, 3.0])
    params = {"w": np.zeros(3)}
    state = init_state(params)
    settings = AdamW(lr=0.05, weight_decay=0.0)
    schedule = PolySchedule(max_iters=3000, power=0.0, warmup_iters=0)
    for _ in range(3000):
        adamw_step(params, {"w": a * (params["w"] - c)}, state, settings, schedule)
    np.testing.assert_allclose(params["w"], c, atol=1e-3)
    assert state.step == 3000


def test_weight_decay_alone_shrinks_by_its_factor():
    """A zero gradient leaves only decoupled weight decay: p <- p (1 - lr wd) each step (torch: before the moments)."""
    params = {"w": np.array([2.0, -4.0])}
    state = init_state(params)
    settings = AdamW(lr=0.1, weight_decay=0.5, custom_keys={})
    schedule = PolySchedule(max_iters=10, power=0.0, warmup_iters=0)
    for _ in range(3):
        adamw_step(params, {"w": np.zeros(2)}, state, settings, schedule)
    np.testing.assert_allclose(params["w"], np.array([2.0, -4.0]) * 0.95**3, rtol=1e-15)


def tiny_params(seed=0):
    config = SegformerConfig(hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 1, 2),
                             decoder_hidden_size=8, id2label={0: "a", 1: "b"})
    state = random_state_dict(config, seed=seed)
    return {k: v for k, v in state.items() if is_parameter(k) and not k.endswith("num_batches_tracked")}


def test_state_round_trip_resumes_exactly(tmp_path):
    """state_arrays -> safetensors -> load_state: the resumed run is bit-identical to the uninterrupted one."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in tiny_params().items()} for _ in range(6)]
    settings, schedule = AdamW(lr=1e-3), PolySchedule(max_iters=6, warmup_iters=2)

    straight = tiny_params()
    state = init_state(straight)
    for g in grads:
        adamw_step(straight, g, state, settings, schedule)

    resumed = tiny_params()
    state = init_state(resumed)
    for g in grads[:3]:
        adamw_step(resumed, g, state, settings, schedule)
    save_file(state_arrays(state), str(tmp_path / "optimizer.safetensors"))
    state = load_state(load_file(str(tmp_path / "optimizer.safetensors")), resumed)
    assert state.step == 3
    for g in grads[3:]:
        adamw_step(resumed, g, state, settings, schedule)
    for k in straight:
        assert np.array_equal(straight[k], resumed[k]), k


def test_state_of_another_model_is_refused():
    params = tiny_params()
    arrays = state_arrays(init_state(params))
    other = {k: np.zeros(v.shape + (1,), v.dtype) for k, v in params.items()}
    with pytest.raises(CheckpointError, match="does not belong to this model"):
        load_state(arrays, other)
    with pytest.raises(CheckpointError, match="does not belong to this model"):
        load_state({k: v for k, v in arrays.items() if "decode_head" not in k}, params)
    with pytest.raises(CheckpointError, match="step count"):
        load_state({k: v for k, v in arrays.items() if k != "step"}, params)
    with pytest.raises(SegformerError, match="name different tensors"):
        adamw_step(params, {}, init_state(params), AdamW(), PolySchedule())


def test_non_finite_gradients_change_nothing():
    params = tiny_params()
    before = {k: v.copy() for k, v in params.items()}
    grads = {k: np.ones_like(v) for k, v in params.items()}
    grads["decode_head.classifier.bias"][0] = np.nan
    state = init_state(params)
    with pytest.raises(SegformerError, match="NaN or inf .*decode_head.classifier.bias"):
        adamw_step(params, grads, state, AdamW(), PolySchedule())
    assert state.step == 0 and all(np.array_equal(before[k], params[k]) for k in params)


@pytest.mark.parametrize("make", [
    lambda: AdamW(lr=-1.0), lambda: AdamW(lr=math.nan), lambda: AdamW(betas=(0.9, 1.0)), lambda: AdamW(eps=0.0),
    lambda: AdamW(weight_decay=-0.1), lambda: AdamW(custom_keys={"head": {"lr_multiplier": 10}}),
    lambda: PolySchedule(max_iters=0), lambda: PolySchedule(warmup_iters=-1), lambda: PolySchedule(warmup_ratio=0.0),
    lambda: PolySchedule(power=-1.0), lambda: learning_rate(11, 1e-3, PolySchedule(max_iters=10)),
])
def test_bad_settings_are_clear_errors(make):
    with pytest.raises(SegformerError):
        make()
