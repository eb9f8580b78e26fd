"""Train mode, as torch's: dropout and stochastic depth (their semantics), BatchNorm's batch statistics and running
estimates, `model.train()` / `model.eval()`, `out.loss`, `load_state_dict`, and value_and_grad in train mode
against finite differences (float64, a tiny MiT, every dropout switched on, masks fixed by reseeding)."""

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.config import BATCH_NORM_MOMENTUM
from mininp_segformer.nn import decoder, layers
from mininp_segformer.weights import CLASSIFICATION, random_state_dict
from tests.test_value_and_grad import TINY, check_every_parameter, tiny_model

SEMANTIC = "SegformerForSemanticSegmentation"


# --- dropout and drop path ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeroes_with_probability_p_and_scales_the_rest(p):
    x = np.random.default_rng(0).standard_normal((100, 1000)).astype(np.float32) + 5  # no zero in x
    out, keep = layers.dropout(x, p, np.random.default_rng(1))
    n = x.size
    assert abs((~keep).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # five standard deviations of the fraction
    assert (out[~keep] == 0).all()
    np.testing.assert_array_equal(out[keep], x[keep] * np.float32(1 / (1 - p)))  # 1 / (1 - p): E[out] = x
    assert out.dtype == np.float32
    dout = np.ones_like(x)
    np.testing.assert_array_equal(layers.dropout_backward(dout, keep, p), keep * np.float32(1 / (1 - p)))


def test_dropout_is_the_identity_in_eval_mode_and_at_p_0():
    x = np.ones((3, 4))
    for p, rng in ((0.5, None), (0.0, np.random.default_rng(0))):
        out, keep = layers.dropout(x, p, rng)
        assert out is x and keep is None
        assert layers.dropout_backward(x, keep, p) is x
    out, keep = layers.dropout(x, 1.0, np.random.default_rng(0))  # p = 1: everything dropped, no division by 0
    assert (out == 0).all() and np.isfinite(layers.dropout_backward(x, keep, 1.0)).all()


def test_drop_path_makes_one_decision_per_sample():
    p, batch = 0.3, 4000
    x = np.random.default_rng(2).standard_normal((batch, 5, 6)) + 10
    out, keep = layers.drop_path(x, p, np.random.default_rng(3))
    assert keep.shape == (batch, 1, 1)
    kept = keep.reshape(-1)
    assert (out[~kept] == 0).all()  # a dropped sample loses its whole branch
    np.testing.assert_array_equal(out[kept], x[kept] * (1 / (1 - p)))
    assert abs((~kept).mean() - p) < 5 * np.sqrt(p * (1 - p) / batch)


def test_seeded_masks_repeat_and_differ_between_seeds():
    x = np.ones((64, 64))
    a, b, c = (layers.dropout(x, 0.5, np.random.default_rng(s))[1] for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --- BatchNorm's running estimates ------------------------------------------------------------------------------

def test_a_train_mode_forward_updates_the_running_statistics_as_torch():
    """running = 0.9 running + 0.1 batch, with the unbiased variance (n / (n - 1)); the biased one normalises."""
    model = tiny_model(SEMANTIC, seed=3)
    bn = model.params["decode_head"]["batch_norm"]
    before = {k: bn[k].copy() for k in ("running_mean", "running_var")}
    rng = np.random.default_rng(4)
    stages = [rng.standard_normal((2, h, w, c)) for (h, w), c in zip([(9, 11), (5, 6), (3, 3), (2, 2)],
                                                                      TINY["hidden_sizes"])]
    cache = {}
    decoder.all_mlp_decode_head(stages, model.params["decode_head"], mode=layers.Mode(training=True), cache=cache)
    fused = cache["fused"].reshape(-1, cache["fused"].shape[-1])
    m = BATCH_NORM_MOMENTUM
    np.testing.assert_allclose(bn["running_mean"], (1 - m) * before["running_mean"] + m * fused.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn["running_var"], (1 - m) * before["running_var"] + m * fused.var(0, ddof=1),
                               rtol=1e-12)
    assert not np.allclose(fused.var(0, ddof=1), fused.var(0))  # the two variances differ enough to tell apart


def test_model_modes():
    model = tiny_model(SEMANTIC, seed=4)
    assert model.training is False and model.mode is layers.EVAL  # as after from_pretrained
    x = np.random.default_rng(5).standard_normal((2, 3, 35, 37))
    running = model.state_dict()["decode_head.batch_norm.running_mean"].copy()
    eval_logits = model(x).logits
    assert model.train() is model and model.training
    mode = model.mode
    assert (mode.hidden_dropout, mode.classifier_dropout, mode.drop_path_rate) == (0.0, 0.1, 0.1)
    model.rng = np.random.default_rng(0)
    first = model(x).logits
    moved = model.state_dict()["decode_head.batch_norm.running_mean"].copy()
    assert not np.array_equal(moved, running)  # a train-mode forward updates the running statistics
    model.rng = np.random.default_rng(0)
    np.testing.assert_array_equal(model(x).logits, first)  # the same seed, the same masks
    assert not np.array_equal(model(x).logits, first)  # the next draw differs
    assert model.eval() is model and not model.training
    after = model.state_dict()["decode_head.batch_norm.running_mean"].copy()
    model(x)
    np.testing.assert_array_equal(model.state_dict()["decode_head.batch_norm.running_mean"], after)  # eval: no update
    assert not np.array_equal(model(x).logits, eval_logits)  # the running statistics moved


def test_train_mode_without_dropout_is_batch_statistics_only():
    """Probabilities 0: train mode is deterministic and differs from eval only by BatchNorm's statistics."""
    config = ms.variant_config("b0", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               classifier_dropout_prob=0.0, drop_path_rate=0.0, **TINY)
    model = ms.Segformer(config, random_state_dict(config, SEMANTIC, seed=6), backend="numpy", dtype="float64")
    x = np.random.default_rng(7).standard_normal((2, 3, 33, 41))
    stages = model(x, output_hidden_states=True).hidden_states
    p = model.params["decode_head"]
    expected = decoder.all_mlp_decode_head([np.ascontiguousarray(f.transpose(0, 2, 3, 1)) for f in stages], p,
                                           mode=layers.Mode(training=True))
    model.train()
    a, b = model(x).logits, model(x).logits
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, expected.transpose(0, 3, 1, 2), rtol=1e-12, atol=1e-12)


# --- the loss in the forward, value_and_grad in train mode ----------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_out_loss_is_value_and_grads_loss(train):
    model = tiny_model(SEMANTIC, seed=8).train(train)
    rng = np.random.default_rng(9)
    x, labels = rng.standard_normal((2, 3, 35, 37)), rng.integers(0, 3, (2, 35, 37))
    model.rng = np.random.default_rng(1)
    out = model(x, labels=labels)
    model.rng = np.random.default_rng(1)
    loss, _ = ms.value_and_grad(model, x, labels)
    assert isinstance(out.loss, float) and out.loss == pytest.approx(float(loss), rel=1e-9)  # eval: the fused head
    assert model(x).loss is None


class Reseeded:
    """A stand-in for `model.rng` that restarts the same stream at every draw: each mask of a forward is the same
    at every call, so the masks stay fixed while finite differences call value_and_grad again and again."""

    def __init__(self, seed):
        self.seed = seed

    def __getattr__(self, name):
        return getattr(np.random.default_rng(self.seed), name)


def test_train_mode_value_and_grad_with_every_dropout():
    """Every parameter and the input against finite differences, float64, in train mode with hidden, attention and
    classifier dropout and stochastic depth all on (each forward draws the same masks)."""
    config = ms.variant_config("b0", num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
                               classifier_dropout_prob=0.3, drop_path_rate=0.5, **{**TINY, "depths": (1, 2, 1, 1)})
    model = ms.Segformer(config, random_state_dict(config, SEMANTIC, seed=9), backend="numpy", dtype="float64")
    model.train()
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 35, 37))
    labels = rng.integers(0, 3, (2, 35, 37))
    labels[1, :, :9] = 255
    model.rng = Reseeded(12)
    check_every_parameter(model, x, labels, rng)


def test_classification_value_and_grad_in_train_mode():
    model = tiny_model(CLASSIFICATION, num_labels=4, seed=11).train()
    model.rng = Reseeded(13)
    rng = np.random.default_rng(12)
    check_every_parameter(model, rng.standard_normal((3, 3, 33, 33)), np.array([0, 3, 1]), rng)


@pytest.mark.parametrize("labels", [np.full((2, 35, 37), 255), np.full((2, 35, 37), 9), np.zeros((2, 35, 37)),
                                    np.zeros((1, 35, 37), int)], ids=["unlabelled", "class 9 of 3", "float",
                                                                      "batch 1 of 2"])
def test_bad_labels_fail_before_the_forward_changes_anything(labels):
    model = tiny_model(SEMANTIC, seed=14).train()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    x = np.random.default_rng(15).standard_normal((2, 3, 35, 37))
    for call in (lambda: model(x, labels=labels), lambda: ms.value_and_grad(model, x, labels)):
        with pytest.raises(ms.LabelError):
            call()
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)  # the running statistics did not move


def test_labels_on_a_backbone_are_an_error():
    x = np.random.default_rng(16).standard_normal((1, 3, 33, 33))
    with pytest.raises(ms.SegformerError, match="backbone"):
        tiny_model("SegformerModel")(x, labels=np.zeros((1, 33, 33), int))


# --- load_state_dict ---------------------------------------------------------------------------------------------

def test_load_state_dict_replaces_every_tensor():
    a, b = tiny_model(SEMANTIC, seed=17), tiny_model(SEMANTIC, seed=18)
    x = np.random.default_rng(19).standard_normal((1, 3, 40, 36))
    assert not np.array_equal(a(x).logits, b(x).logits)
    a.load_state_dict({k: v.astype(np.float32) for k, v in b.state_dict().items()})  # cast to the model's dtype
    assert all(v.dtype == np.float64 for v in a.state_dict().values())
    np.testing.assert_allclose(a(x).logits, b(x).logits, rtol=1e-6, atol=1e-6)  # the fused head sees the new weights
    a.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(a(x).logits, b(x).logits)


def test_the_folded_head_follows_every_change_of_the_decoder_weights(monkeypatch):
    """The fused head's folded weights are kept from one call to the next, and folded again as soon as a decoder
    weight or running statistic has changed: in place (an optimizer step, an edit) or by load_state_dict."""
    from mininp_segformer import model as model_module

    folds = []
    fold = model_module.fold_decode_head
    monkeypatch.setattr(model_module, "fold_decode_head", lambda *a: folds.append(1) or fold(*a))
    a, b = tiny_model(SEMANTIC, seed=21), tiny_model(SEMANTIC, seed=22)
    x = np.random.default_rng(23).standard_normal((1, 3, 40, 36))

    def literal(model):  # Eq. 4 as written, from the weights as they are now
        model.decoder = "literal"
        try:
            return model(x).logits
        finally:
            model.decoder = "fused"

    first = a(x).logits
    np.testing.assert_array_equal(a(x).logits, first)
    assert len(folds) == 1  # the second call reused the first fold
    head = a.params["decode_head"]
    for array in (head["batch_norm"]["running_mean"], head["classifier"]["weight"],
                  head["linear_c"][-1]["proj"]["bias"]):
        array[0] += 0.5  # in place: the same array objects
        logits = a(x).logits
        assert not np.allclose(logits, first)
        np.testing.assert_allclose(logits, literal(a), rtol=1e-6, atol=1e-6)
    assert len(folds) == 4
    a.load_state_dict(b.state_dict())
    np.testing.assert_allclose(a(x).logits, b(x).logits, rtol=1e-12, atol=1e-12)
    assert len(folds) == 6  # a's and b's own


def test_load_state_dict_is_strict():
    model = tiny_model(SEMANTIC, seed=20)
    state = model.state_dict()
    name = "decode_head.classifier.weight"
    cases = {
        "missing": {k: v for k, v in state.items() if k != name},
        "unexpected": {**state, "decode_head.extra.weight": np.zeros(3)},
        "config expects": {**state, name: np.zeros((5, 8, 1, 1))},
        "NaN": {**state, name: np.full(state[name].shape, np.nan)},
    }
    before = {k: v.copy() for k, v in state.items()}
    for word, bad in cases.items():
        with pytest.raises(ms.CheckpointError, match=word):
            model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # a refused state dict changes nothing
    with pytest.raises(TypeError, match="dict"):
        model.load_state_dict([("a", 1)])
