"""Segformer.save_pretrained: the Hub layout transformers reads (tests/fixtures/s_save_pretrained.npz: transformers
loaded what save_pretrained wrote strictly and computed these logits), read back by our loader, written atomically."""

import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.numpy

import mininp_segformer as ms
from mininp_segformer.errors import SegformerError
from mininp_segformer.weights import CONFIG_NAME, PREPROCESSOR_NAME, SEMANTIC, WEIGHTS_NAME, read_safetensors
from tests.conftest import assert_close, build_model, load_fixture, random_pixel_values
from tests.test_parity import MODEL_RTOL


@pytest.fixture(scope="module")
def case():
    """(model at the fixture's image size, pixel_values, arrays, meta) of case s."""
    arrays, meta = load_fixture("n_save_pretrained")
    _, config, state = build_model(meta)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as load() leaves it
    model = ms.Segformer(config, state, image_size=tuple(meta["image_size"]))
    return model, random_pixel_values(meta["input"]["seed"], meta["input"]["shape"]), arrays, meta


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_round_trip_and_transformers_logits(case, tmp_path):
    model, x, arrays, meta = case
    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no staging directory left beside it
    again = ms.load(tmp_path / "saved")
    ours, back = model.state_dict(), again.state_dict()
    assert sorted(ours) == sorted(back) and all(np.array_equal(ours[k], back[k]) for k in ours)
    assert again.image_size == model.image_size
    assert again.config == dataclasses.replace(model.config, architectures=(SEMANTIC,))  # the head it was saved with
    logits = model(x).logits
    assert np.array_equal(again(x).logits, logits)
    assert_close("logits vs transformers on our saved checkpoint", logits, arrays["logits"], MODEL_RTOL)


def test_the_files_are_the_hubs(case, tmp_path):
    model, _, _, meta = case
    model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / WEIGHTS_NAME)
    nbt = tensors.pop("decode_head.batch_norm.num_batches_tracked")  # torch's bookkeeping, as HF saves it
    assert nbt.dtype == np.int64 and nbt.shape == ()
    assert sorted(tensors) == sorted(model.state_dict())  # running_mean / running_var included
    assert all(v.dtype == np.float32 for v in tensors.values())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architectures"] == [SEMANTIC] and config["model_type"] == "segformer"
    assert config["id2label"] == {str(k): v for k, v in model.id2label.items()}
    processor = json.loads((tmp_path / PREPROCESSOR_NAME).read_text())
    assert processor["size"] == {"height": meta["image_size"][0], "width": meta["image_size"][1]}
    assert processor["image_processor_type"] == "SegformerImageProcessor" and processor["resample"] == 2


def test_the_files_get_the_usual_permissions(case, tmp_path):
    """model.safetensors too: safetensors' writer alone leaves it 0o600 (its issue #782), unreadable to other users."""
    model, _, _, _ = case
    old_umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(old_umask)
    assert {(tmp_path / "saved" / name).stat().st_mode & 0o777 for name in os.listdir(tmp_path / "saved")} == {0o644}


def test_float64_model_saves_float32(case, tmp_path):
    model, x, _, meta = case
    f64 = ms.Segformer(model.config, model.state_dict(), backend="numpy", dtype="float64")
    f64.save_pretrained(tmp_path)
    back = ms.load(tmp_path)
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def full_disk(monkeypatch, error):
    """safetensors' writer, patched to write half a file and then fail as a full disk makes it fail."""
    real = safetensors.numpy.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise error

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   safetensors.SafetensorError("Error while serializing: I/O error: No space left "
                                                               "on device (os error 28)")])
def test_a_full_disk_keeps_the_previous_checkpoint(case, tmp_path, monkeypatch, error):
    model, _, _, _ = case
    directory = tmp_path / "out"
    model.save_pretrained(directory)
    (directory / "README.md").write_text("mine")
    before = files(directory)
    relabelled = ms.Segformer(ms.config.with_labels(model.config, id2label={0: "x", 1: "y", 2: "z"}),
                              model.state_dict())
    full_disk(monkeypatch, error)
    with pytest.raises(SegformerError, match="failed .*No space left on device.* still holds what it held before"):
        relabelled.save_pretrained(directory)
    assert files(directory) == before  # byte for byte, and no staging directory inside
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()
    relabelled.save_pretrained(directory)  # space again: replaced, other files kept
    assert ms.load(directory).id2label == {0: "x", 1: "y", 2: "z"}
    assert (directory / "README.md").read_text() == "mine"


def test_a_full_disk_creates_nothing(case, tmp_path, monkeypatch):
    model, _, _, _ = case
    full_disk(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(SegformerError, match="was not created"):
        model.save_pretrained(tmp_path / "new" / "model")
    assert os.listdir(tmp_path / "new") == []


def test_saving_onto_a_file_is_refused(case, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SegformerError, match="it is a file"):
        case[0].save_pretrained(tmp_path / "f")


def test_a_failed_rename_says_what_was_replaced(case, tmp_path, monkeypatch):
    """The renames come after every byte is on disk; should one still fail, the message says which files are new."""
    model = case[0]
    model.save_pretrained(tmp_path)
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(SegformerError, match=r"has only model.safetensors replaced"):
        model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
