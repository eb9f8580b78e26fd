"""value_and_grad against torch autograd: HF's `model(pixel_values, labels=labels).loss.backward()`, recorded by
tests/make_fixtures.py (cases u, v, w; torch in float64, stored as float32) for synthetic weights that the tests
rebuild from their seeds. Each case runs twice: the numpy backend in float64 (the same mathematics as torch: errors
at float32's storage precision) and the default numba backend in float32 (what a user trains with).

Per tensor: max|ours - torch| <= 1e-4 max|torch| of that tensor (whole, or on the entries the fixture kept, with
the whole tensor's max|torch| as the scale); the loss within 1e-5 relative. Two kinds of gradient are 0 in exact
arithmetic, so both sides hold only rounding noise and a relative check would compare noise with noise: the keys'
biases (q . b_k is the same for every key of a query, and softmax ignores it) and, in train mode, what only adds a
per-channel constant before the decode head's BatchNorm, which subtracts the batch mean: the per-stage projections'
biases and the last stage's LayerNorm bias. Those must be <= 1e-4 of the gradient of the weight beside them, on both
sides.
"""

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.nn import layers
from tests.conftest import build_model, check_input_digest, grad_sample_index, load_fixture, random_pixel_values

GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5


def zero_in_exact_arithmetic(name: str, train: bool, last_stage: int) -> bool:
    before_batch_norm = (name.startswith("decode_head.linear_c.") and name.endswith("proj.bias")) or \
        name == f"segformer.encoder.layer_norm.{last_stage}.bias"
    return name.endswith("key.bias") or (train and before_batch_norm)


def check_gradients(label: str, ours: dict, arrays: dict, prefix: str, samples: int | None, semantic: bool = True):
    """`ours`: {name: gradient}; the fixture's "<prefix>names/grads/absmax" (whole if samples is None)."""
    last_stage = max(int(n.split(".")[3]) for n in ours if n.startswith("segformer.encoder.layer_norm.")) \
        if semantic else -1
    names = [str(n) for n in arrays[f"{prefix}names"]]
    assert set(names) == set(ours), sorted(set(names) ^ set(ours))[:5]
    absmax = dict(zip(names, arrays[f"{prefix}absmax"].astype(np.float64)))
    ref_all, offset, worst, train = arrays[f"{prefix}grads"], 0, (0.0, ""), prefix.startswith("train")
    for name in names:
        flat = ours[name].reshape(-1)
        idx = np.arange(flat.size) if samples is None else grad_sample_index(flat.size, samples)
        ref = ref_all[offset : offset + idx.size].astype(np.float64)
        offset += idx.size
        got = flat[idx].astype(np.float64)
        if zero_in_exact_arithmetic(name, train, last_stage):
            scale = absmax[name.rsplit(".", 1)[0] + ".weight"]
            for side, g in (("ours", got), ("torch", ref)):
                assert np.abs(g).max() <= GRAD_RTOL * scale, f"{label} {name} ({side}) should be ~0: {g[:4]}"
            continue
        err = float(np.abs(got - ref).max()) / absmax[name]
        assert err <= GRAD_RTOL, f"{label} {name}: max|err| = {err:.2e} of max|torch| {absmax[name]:.3g}"
        worst = max(worst, (err, name))
    assert offset == ref_all.size
    print(f"{label}: worst gradient error {worst[0]:.2e} of max|torch| ({worst[1]})")
    return worst[0]


def case_inputs(name: str):
    arrays, meta = load_fixture(name)
    x = random_pixel_values(meta["input"]["seed"], meta["input"]["shape"])
    check_input_digest(name, x, meta)
    labels = arrays["labels"].astype(np.int64)
    return arrays, meta, x, labels


def check_loss(label, loss, ref):
    assert abs(float(loss) - float(ref)) <= LOSS_RTOL * abs(float(ref)), f"{label}: loss {loss} vs torch {ref}"


def run_steps(name: str, modes, monkeypatch):
    """value_and_grad in each of `modes` ("train" / "eval", in order, on one model), in float64 on the numpy
    backend, then in float32 on the numba one, each checked against the fixture -> the float32 model.

    The decode head's ReLU is a coin toss in float32 for an input within rounding of 0, in torch as here: with
    ~10^5 values one such pixel is likely, and the side it falls on moves its channel's BatchNorm gradients by a few
    1e-4 of their scale (measured: b2, one pixel at 1.7e-6). The float32 run therefore takes the ReLU's decisions
    from the float64 run (`layers.relu_backward` reads them in order); every other number is its own.
    """
    arrays, meta, x, labels = case_inputs(name)
    decisions = []
    real_relu_backward = layers.relu_backward

    def recording(dout, x):
        decisions.append(x > 0)
        return real_relu_backward(dout, x)

    def replaying(dout, x):
        return dout * decisions.pop(0)

    model = None
    for backend, dtype, relu_backward in (("numpy", "float64", recording), ("numba", "float32", replaying)):
        monkeypatch.setattr(layers, "relu_backward", relu_backward)
        model, _, _ = build_model(meta, decoder="literal", backend=backend, dtype=dtype)
        label = f"{name.split('_gradients')[0]} {backend} {dtype}"
        for mode in modes:
            loss, grads, dx = ms.value_and_grad(model.train(mode == "train"), x, labels, input_grad=True)
            check_loss(f"{label} {mode}", loss, arrays[f"{mode}.loss"])
            whole = name.startswith("u_") and mode == "train"
            check_gradients(f"{label} {mode}", {**grads, "pixel_values": dx}, arrays, f"{mode}.",
                            None if whole else meta["samples"], model.head == "SegformerForSemanticSegmentation")
            if mode == "train" and "train.running_mean" in arrays:
                state = model.state_dict()
                for stat in ("running_mean", "running_var"):
                    ref = arrays[f"train.{stat}"]
                    err = np.abs(state[f"decode_head.batch_norm.{stat}"] - ref).max() / np.abs(ref).max()
                    assert err <= LOSS_RTOL, f"{label}: {stat} after one train-mode step: {err:.2e}"
    assert not decisions  # the float32 run used every decision of the float64 one
    return model


def test_b0_ade_train_then_eval_gradients_match_torch(monkeypatch):
    """B0-ADE (150 labels), batch 2 at 67 x 93: train mode (BatchNorm on batch statistics), whole gradients; the
    running statistics after that step; then eval mode with them (sampled gradients)."""
    run_steps("u_b0_ade_gradients_67x93", ("train", "eval"), monkeypatch)


@pytest.mark.parametrize("name", [f"v_{v}_gradients_77x85" for v in ("b1", "b2", "b3", "b4", "b5")] +
                         ["w_b0_binary_gradients_77x85", "w_b0_classification_gradients_77x85"])
def test_train_mode_gradients_match_torch(name, monkeypatch):
    """b1..b5, num_labels = 1 (HF's BCE) and the classification head: train mode, sampled gradients."""
    run_steps(name, ("train",), monkeypatch)


def test_the_gradient_check_can_fail():
    """A gradient off by 2e-4 of its scale in one entry, or a loss off by 2e-5, is caught."""
    arrays, meta, x, labels = case_inputs("w_b0_classification_gradients_77x85")
    model, _, _ = build_model(meta, decoder="literal")
    loss, grads, dx = ms.value_and_grad(model.train(), x, labels, input_grad=True)
    name = "classifier.weight"
    scale = float(arrays["train.absmax"][list(arrays["train.names"]).index(name)])
    grads[name] = grads[name].copy()
    grads[name].reshape(-1)[grad_sample_index(grads[name].size, meta["samples"])[0]] += 2e-4 * scale
    with pytest.raises(AssertionError, match=name):
        check_gradients("perturbed", {**grads, "pixel_values": dx}, arrays, "train.", meta["samples"], False)
    with pytest.raises(AssertionError, match="loss"):
        check_loss("perturbed", float(arrays["train.loss"]) * (1 + 2e-5), arrays["train.loss"])
