"""Model surgery: load(..., head=, num_labels=, id2label=, label2id=, seed=) against what transformers'
from_pretrained does with the same checkpoints (tests/fixtures/s_save_pretrained.npz, "surgery": the keys it newly
initialised, re-initialised for their shape, or left unused, and how each fresh tensor looked)."""

import warnings

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.config import SegformerConfig, with_labels
from mininp_segformer.errors import CheckpointError, ConfigError
from mininp_segformer.weights import (BACKBONE, CLASSIFICATION, SEMANTIC, Surgery, fit_state_dict, init_weights,
                                      random_state_dict, save_checkpoint)
from tests.conftest import load_fixture

# name in the fixture -> (source checkpoint, our load() arguments)
CASES = {
    "classification_to_semantic": ("classification", dict(head="semantic", id2label={0: "road", 1: "car", 2: "tree",
                                                                                      3: "sky"})),
    "backbone_to_semantic": ("backbone", dict(head="semantic", num_labels=4)),
    "semantic_to_2_labels": ("semantic", dict(num_labels=2)),
    "semantic_to_classification": ("semantic", dict(head="classification")),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The fixture's source checkpoints, rebuilt from their configs and seed; (directory, state) by name."""
    _, meta = load_fixture("n_save_pretrained")
    out = {}
    for name, src in meta["surgery_sources"].items():
        config = SegformerConfig.from_dict(src["config"])
        state = random_state_dict(config, src["head"], seed=meta["surgery_seed"])
        directory = tmp_path_factory.mktemp(name)
        save_checkpoint(directory, config, state)
        out[name] = (directory, state)
    return out, meta["surgery"]


def load_warning(directory, **kwargs):
    """(model, the one warning load() gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ms.load(directory, backend="numpy", seed=0, **kwargs)
    assert len(caught) == 1, [str(w.message) for w in caught]
    return model, str(caught[0].message)


@pytest.mark.parametrize("case", CASES)
def test_surgery_is_transformers(sources, case):
    checkpoints, reference = sources
    source, kwargs = CASES[case]
    directory, source_state = checkpoints[source]
    hf = reference[case]
    model, message = load_warning(directory, **kwargs)
    assert "\n" not in message  # one line, as transformers' warning
    print(message)

    # transformers counts num_batches_tracked among the missing and unexpected keys; we leave it out (it is set
    # on saving)
    hf_fresh = {k for k in hf["missing"] + hf["mismatched"] if not k.endswith("num_batches_tracked")}
    state = model.state_dict()
    bare = {k.removeprefix("segformer."): v for k, v in source_state.items()}
    kept = {k for k in state if k not in hf_fresh}
    assert model.config.num_labels == hf["num_labels"]
    for k in kept:  # everything transformers loaded, we loaded, bit for bit
        assert np.array_equal(state[k], bare[k.removeprefix("segformer.")]), k
    for k in hf_fresh:  # everything it initialised, we initialised alike
        init, ours = hf["init"][k], state[k].astype(np.float64)
        if init["kind"] == "zeros":
            assert (ours == 0).all(), k
        elif init["kind"] == "ones":
            assert (ours == 1).all(), k
        else:  # both N(0, initializer_range): each sample's std within 6 standard errors of 0.02
            n, std = ours.size, model.config.initializer_range
            assert abs(ours.std() - std) < 6 * std / np.sqrt(2 * n) and abs(ours.mean()) < 6 * std / np.sqrt(n), k
            assert abs(init["std"] - std) < 6 * std / np.sqrt(2 * n), k
    assert ("newly initialised" in message) == bool(hf_fresh - set(hf["mismatched"]))
    assert (f"{len(hf['mismatched'])} re-initialised" in message) == bool(hf["mismatched"])
    unexpected = {k.removeprefix("segformer.") for k in hf["unexpected"] if not k.endswith("num_batches_tracked")}
    assert (f"{len(unexpected)} checkpoint tensors unused" in message) == bool(unexpected)
    assert {k for k in bare if not k.endswith("num_batches_tracked")} - {
        k.removeprefix("segformer.") for k in state} == unexpected


def test_classification_checkpoint_gets_a_working_decode_head(sources):
    """mit-b* configs say reshape_last_stage false (HF keeps it, and its decode head then reshapes the last stage by
    its channel count); ours turns it on, so the decode head reads a map, at any input size."""
    checkpoints, reference = sources
    assert reference["classification_to_semantic"]["reshape_last_stage"] is False
    model, _ = load_warning(checkpoints["classification"][0], **CASES["classification_to_semantic"][1])
    assert model.config.reshape_last_stage and model.config.architectures == (SEMANTIC,)
    assert model.config.id2label == {0: "road", 1: "car", 2: "tree", 3: "sky"}
    out = model(np.random.default_rng(0).standard_normal((1, 3, 40, 72), dtype=np.float32))
    assert out.logits.shape == (1, 4, 10, 18)


def test_seeded_and_deterministic(sources):
    directory = sources[0]["semantic"][0]
    a = load_warning(directory, num_labels=5)[0].state_dict()
    b = load_warning(directory, num_labels=5)[0].state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = ms.load(directory, backend="numpy", num_labels=5, seed=1).state_dict()
    w = "decode_head.classifier.weight"
    assert np.array_equal(a[w], b[w]) and not np.array_equal(a[w], c[w])


def test_no_change_no_warning(sources):
    directory, state = sources[0]["semantic"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ms.load(directory, backend="numpy", head="semantic", num_labels=3)  # as saved: nothing to do
    assert all(np.array_equal(v, state[k]) for k, v in model.state_dict().items())


def test_renaming_labels_reinitialises_nothing(sources):
    directory, state = sources[0]["semantic"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ms.load(directory, backend="numpy", label2id={"x": 0, "y": 1, "z": 2})
    assert model.id2label == {0: "x", 1: "y", 2: "z"}
    assert all(np.array_equal(v, state[k]) for k, v in model.state_dict().items())


def test_to_backbone_drops_the_head(sources):
    model, message = load_warning(sources[0]["semantic"][0], head="backbone")
    assert model.head == BACKBONE and "unused: decode_head.* (" in message and "newly" not in message


def test_init_weights_rules():
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "n.weight": (4,), "n.bias": (4,), "bn.running_mean": (4,),
              "bn.running_var": (4,), "c.weight": (2, 3, 1, 1)}
    out = init_weights(shapes, 0.5, np.random.default_rng(0))
    assert all(out[k].dtype == np.float32 and out[k].shape == s for k, s in shapes.items())
    assert (out["a.bias"] == 0).all() and (out["n.bias"] == 0).all() and (out["bn.running_mean"] == 0).all()
    assert (out["n.weight"] == 1).all() and (out["bn.running_var"] == 1).all()
    rng = np.random.default_rng(0)  # the order of `shapes`, one draw per matrix
    np.testing.assert_array_equal(out["a.weight"], rng.normal(0, 0.5, (3, 4)).astype(np.float32))
    np.testing.assert_array_equal(out["c.weight"], rng.normal(0, 0.5, (2, 3, 1, 1)).astype(np.float32))


def test_fit_state_dict_report():
    config = ms.variant_config("b0", num_labels=3, hidden_sizes=(4, 8, 8, 8), num_attention_heads=(1, 2, 1, 2),
                               decoder_hidden_size=8)
    state = random_state_dict(config, SEMANTIC)
    fitted, surgery = fit_state_dict(state, with_labels(config, 5), SEMANTIC, seed=0)
    assert surgery == Surgery(resized=(("decode_head.classifier.weight", (3, 8, 1, 1), (5, 8, 1, 1)),
                                       ("decode_head.classifier.bias", (3,), (5,))))
    assert fitted["decode_head.classifier.weight"].shape == (5, 8, 1, 1)
    assert not fit_state_dict(state, config, SEMANTIC)[1]  # nothing to change: an empty (false) report
    _, surgery = fit_state_dict(state, config, CLASSIFICATION, seed=0)
    assert surgery.new == ("classifier.weight", "classifier.bias") and len(surgery.unused) == 15


def test_an_encoder_that_does_not_fit_is_refused():
    config = ms.variant_config("b0", num_labels=3, hidden_sizes=(4, 8, 8, 8), num_attention_heads=(1, 2, 1, 2),
                               decoder_hidden_size=8)
    wider = ms.variant_config("b0", num_labels=3, hidden_sizes=(4, 8, 8, 16), num_attention_heads=(1, 2, 1, 2),
                              decoder_hidden_size=8)
    with pytest.raises(CheckpointError, match="encoder does not fit"):
        fit_state_dict(random_state_dict(config, SEMANTIC), wider, SEMANTIC)


def test_with_labels():
    config = SegformerConfig()
    assert with_labels(config) is config
    assert with_labels(config, 3).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert with_labels(config, id2label={"0": "a", "1": "b"}).id2label == {0: "a", 1: "b"}  # JSON's keys
    assert with_labels(config, label2id={"b": 1, "a": 0}).id2label == {0: "a", 1: "b"}
    assert with_labels(config, 2, {0: "a", 1: "b"}, {"a": 0, "b": 1}).label2id == {"a": 0, "b": 1}


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_labels=0), "num_labels"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels=3 but"),
    (dict(id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0}), "disagree"),
    (dict(id2label={0: "a", 2: "b"}), "class ids"),
    (dict(label2id={"a": 0, "b": 0}), "same class id"),
    (dict(id2label=["a", "b"]), "JSON object"),
])
def test_bad_labels_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        with_labels(SegformerConfig(), **kwargs)


def test_bad_head_is_a_checkpoint_error(sources):
    with pytest.raises(CheckpointError, match="head must be one of"):
        ms.load(sources[0]["semantic"][0], head="panoptic")
