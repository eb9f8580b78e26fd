"""Loading checkpoints: strictness, dtypes, and a clear error for every way a checkpoint can be broken."""

import json
import struct

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.config import variant_config
from mininp_segformer.weights import (BACKBONE, CLASSIFICATION, SEMANTIC, CheckpointError, count_parameters,
                                      expected_shapes, load_checkpoint, random_state_dict, save_checkpoint)
from tests.tiny_checkpoint import safetensors_parts, write_safetensors

CONFIG = variant_config("b0", num_labels=5)
X = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(CONFIG, SEMANTIC, seed=3)


@pytest.fixture
def ckpt(tmp_path, state):
    return save_checkpoint(tmp_path / "ckpt", CONFIG, state)


def test_roundtrip_loads_strictly_and_runs(ckpt, state):
    model = ms.load(ckpt)
    assert model.head == SEMANTIC and model.config.num_labels == 5 and model.image_size == (512, 512)
    logits = model(X).logits
    assert logits.shape == (1, 5, 16, 16) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, ms.Segformer(CONFIG, state)(X).logits)


def test_key_layout_is_the_hub_layout():
    shapes = expected_shapes(variant_config("b0", 150))
    assert len(shapes) == 207  # the real B0-ADE checkpoint's float tensors
    assert shapes["segformer.encoder.block.0.1.attention.self.sr.weight"] == (32, 32, 8, 8)
    assert shapes["segformer.encoder.block.3.0.mlp.dwconv.dwconv.weight"] == (1024, 1, 3, 3)
    assert shapes["decode_head.linear_fuse.weight"] == (256, 1024, 1, 1)
    assert "segformer.encoder.block.3.0.attention.self.sr.weight" not in shapes  # sr_ratio 1: no reduction
    assert set(expected_shapes(CONFIG, CLASSIFICATION)) - set(expected_shapes(CONFIG)) == {
        "classifier.weight", "classifier.bias"}


def test_parameter_count_leaves_out_the_buffers(state):
    ade = variant_config("b0", 150)
    assert count_parameters(ade) == 3_752_694  # transformers' num_parameters() of the B0-ADE model; the paper's 3.8M
    buffers = 2 * CONFIG.decoder_hidden_size + 1  # running_mean, running_var, num_batches_tracked
    assert count_parameters(state) == count_parameters(CONFIG) == sum(v.size for v in state.values()) - buffers
    assert count_parameters(CONFIG, BACKBONE) < count_parameters(CONFIG, CLASSIFICATION) < count_parameters(CONFIG)


@pytest.mark.parametrize("dtype", [np.float16, "bf16"])
def test_half_precision_checkpoints_are_upcast(tmp_path, state, dtype):
    if dtype == "bf16":
        # NumPy has no bfloat16: write the file by hand, each float32 truncated to its top 16 bits.
        save_checkpoint(tmp_path, CONFIG, state)
        write_safetensors(tmp_path / "model.safetensors", *safetensors_parts(state, "BF16"))
        expected = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in state.items() if v.ndim}
    else:
        save_checkpoint(tmp_path, CONFIG, state, dtype=np.float16)
        expected = {k: v.astype(np.float16).astype(np.float32) for k, v in state.items() if v.ndim}
    _, _, loaded = load_checkpoint(tmp_path)
    assert all(loaded[k].dtype == np.float32 for k in expected)
    for k in expected:
        np.testing.assert_array_equal(loaded[k], expected[k])


def test_missing_path_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        ms.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ms.load(tmp_path / "empty")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        ms.load(ckpt)


def test_pickle_only_directory_is_refused_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(CheckpointError, match="export_safetensors.py"):
        ms.load(tmp_path)


@pytest.mark.parametrize("mutate,message", [
    (lambda raw: b"", "empty"),
    (lambda raw: raw[:5], "truncated"),
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: struct.pack("<Q", 1 << 60) + raw[8:], "header claims"),
    (lambda raw: raw[:8] + b"{" * struct.unpack("<Q", raw[:8])[0] + raw[8 + struct.unpack("<Q", raw[:8])[0]:],
     "not JSON"),
])
def test_corrupt_safetensors(ckpt, mutate, message):
    path = ckpt / "model.safetensors"
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        ms.load(ckpt)


def test_mismatched_tensors_are_all_reported_together(tmp_path, state):
    broken = dict(state)
    del broken["decode_head.classifier.bias"]
    del broken["segformer.encoder.block.1.1.mlp.dense1.weight"]
    broken["segformer.encoder.block.0.2.layer_norm_1.weight"] = np.ones(32, np.float32)
    broken["decode_head.linear_c.0.proj.weight"] = np.ones((256, 31), np.float32)
    save_checkpoint(tmp_path, CONFIG, broken)
    with pytest.raises(CheckpointError) as e:
        ms.load(tmp_path)
    text = str(e.value)
    assert "missing (2)" in text and "decode_head.classifier.bias" in text and "block.1.1.mlp.dense1.weight" in text
    assert "unexpected (1)" in text and "block.0.2.layer_norm_1.weight" in text
    assert "wrong shape (1)" in text and "(256, 31)" in text and "(256, 32)" in text


def test_config_and_weights_from_different_models(tmp_path, state):
    save_checkpoint(tmp_path, variant_config("b0", num_labels=150), state)  # labels disagree with the classifier
    with pytest.raises(CheckpointError, match=r"decode_head.classifier.weight: checkpoint \(5, 256, 1, 1\)"):
        ms.load(tmp_path)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "bert", "hidden_size": 768}', "not a SegFormer checkpoint"),
    ('[1, 2]', "JSON object"),
    ('{"model_type": "segformer", "depths": [2, 2]}', "depths has 2 entries"),
])
def test_bad_config_json(ckpt, text, message):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        ms.load(ckpt)


def test_classification_checkpoint(tmp_path):
    config = variant_config("b0", num_labels=4, architectures=(CLASSIFICATION,))
    save_checkpoint(tmp_path, config, random_state_dict(config, CLASSIFICATION, seed=1))
    model = ms.load(tmp_path)
    assert model.head == CLASSIFICATION
    assert model(np.concatenate([X, X])).logits.shape == (2, 4)
    with pytest.raises(ValueError, match="segmentation checkpoint"):
        ms.predict(np.zeros((40, 40, 3), np.uint8), model)


def test_transformers5_in_memory_names_load_too(tmp_path, state):
    from mininp_segformer.weights import to_hub_name, to_transformers5_name
    renamed = {to_transformers5_name(k): v for k, v in state.items()}
    assert "segformer.stages.1.blocks.0.attention.sequence_reduction.sequence_reduction.weight" in renamed
    assert "decode_head.linear_projections.3.proj.bias" in renamed
    assert {to_hub_name(k) for k in renamed} == set(state)
    save_checkpoint(tmp_path, CONFIG, renamed)
    np.testing.assert_array_equal(ms.load(tmp_path)(X).logits, ms.Segformer(CONFIG, state)(X).logits)
