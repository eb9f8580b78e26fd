"""The training loop and `mininp-segformer train`: the HF layout of --out and its checkpoints, exact resume after
SIGKILL and after Ctrl-C (in subprocesses), refusals (another model's checkpoint, other settings, bad options), and
a disk that fills while a checkpoint is written. A tiny MiT on 48 x 48 procedural scenes keeps every run short."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mininp_segformer as ms
from mininp_segformer.tools.cli import main
from mininp_segformer.tools.scenes import make_scene
from mininp_segformer.tools.metrics import evaluate
from mininp_segformer.training.data import open_dataset, read_sample
from mininp_segformer.training.trainer import (CHECKPOINT_PREFIX, OPTIMIZER_NAME, TRAINER_STATE_NAME, TrainSettings,
                                               clip_grad_norm, dataset_batches, latest_checkpoint, train,
                                               plot_curves, validation_miou)
from mininp_segformer.weights import read_safetensors, random_state_dict, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 1, 2), decoder_hidden_size=8)
RUN_TIMEOUT = 300  # seconds a subprocess run may take (a few on a free machine; numba's first compile included)


def write_scenes(root, seeds, size=(48, 48), remap=None) -> Path:
    """A dataset on disk, DIR/images/<seed>.png + DIR/annotations/<seed>.png, from `tools.scenes` (class ids
    0..5; `remap`: an array old id -> new id)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        image, mask = make_scene(seed, size)
        if remap is not None:
            mask = np.asarray(remap, dtype=np.uint8)[mask]
        Image.fromarray(image).save(root / "images" / f"{seed}.png")
        Image.fromarray(mask).save(root / "annotations" / f"{seed}.png")
    return root


def tiny_checkpoint(directory, num_labels=6, seed=0) -> Path:
    """A tiny random MiT with a decode head in the Hub layout, input 32 x 32."""
    config = ms.variant_config("b0", num_labels=num_labels, **TINY)
    save_checkpoint(directory, config, random_state_dict(config, seed=seed))
    (Path(directory) / "preprocessor_config.json").write_text(json.dumps({"size": 32}), encoding="utf-8")
    return Path(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return tiny_checkpoint(root / "model"), write_scenes(root / "data", range(12))


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--crop", "32", "--lr", "1e-3", "--threads", "2", "-q", *extra]


def weights(directory) -> dict:
    return read_safetensors(Path(directory) / "model.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), f"{k} differs"


def test_train_writes_the_hf_layout_and_checkpoints(setup, tmp_path, capsys):
    model_dir, data = setup
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--steps", "4", "--save-every", "2", "--eval-every", "2")) == 0
    assert "validation mIoU" in capsys.readouterr().out
    model = ms.load(out)  # the final model, in the Hub layout
    assert model.id2label == ms.load(model_dir).id2label
    assert any(not np.array_equal(v, weights(model_dir)[k]) for k, v in weights(out).items())  # it trained
    checkpoint = out / f"{CHECKPOINT_PREFIX}2"
    assert {p.name for p in checkpoint.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                      OPTIMIZER_NAME, TRAINER_STATE_NAME}
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == 2 and state["settings"]["batch_size"] == 2 and "bit_generator" in state["rng_state"]
    log = json.loads((out / TRAINER_STATE_NAME).read_text())["log_history"]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in log if "eval_mean_iou" in e] == [2, 4]
    assert (out / "training_curves.png").stat().st_size > 0
    assert latest_checkpoint(out) == checkpoint  # no checkpoint at the last step: the final model is out itself
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    # every file readable as any new file is (umask), the safetensors ones too: safetensors' writer alone gives 0o600
    assert {p.stat().st_mode for p in [*checkpoint.iterdir(), *out.glob("*.safetensors")]} == {
        (out / "config.json").stat().st_mode}


def run(args, **kwargs):
    """`python -m mininp_segformer ARGS` in a fresh process (Popen)."""
    return subprocess.Popen([sys.executable, "-m", "mininp_segformer", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path: Path, process, timeout=RUN_TIMEOUT):
    """Poll until `path` exists (then return True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return path.exists()
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"{path} did not appear within {timeout} s")


STEPS = ["--steps", "24", "--save-every", "2", "--eval-every", "0", "--holdout", "0"]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted run of 24 steps."""
    model_dir, data = setup
    out = tmp_path_factory.mktemp("straight") / "run"
    finish(train_args(model_dir, data, out, *STEPS))
    return out


def stop(args, checkpoint: Path, sig) -> tuple[int, str]:
    """Start a run, send it `sig` once `checkpoint` exists; (its exit status, its stderr)."""
    p = run(args)
    wait_for(checkpoint, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=RUN_TIMEOUT)
    return p.returncode, err


def finish(args):
    p = run(args)
    _, err = p.communicate(timeout=RUN_TIMEOUT)
    assert p.returncode == 0, err


def test_sigkill_then_resume_is_bit_identical(setup, straight, tmp_path):
    model_dir, data = setup
    out = tmp_path / "run"
    status, _ = stop(train_args(model_dir, data, out, *STEPS), out / f"{CHECKPOINT_PREFIX}4", signal.SIGKILL)
    assert status == -signal.SIGKILL, "the run ended before it could be killed: make it longer"
    assert not (out / "model.safetensors").exists()
    finish(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--threads", "2", "-q",
            "--holdout", "0", "--resume", str(out)])  # the other settings: the checkpoint's
    assert_same_weights(out, straight)


def test_ctrl_c_leaves_a_resumable_checkpoint(setup, straight, tmp_path):
    model_dir, data = setup
    out = tmp_path / "run"
    status, err = stop(train_args(model_dir, data, out, *STEPS), out / f"{CHECKPOINT_PREFIX}2", signal.SIGINT)
    assert status == 130, err
    checkpoint = latest_checkpoint(out)
    assert f"--resume {checkpoint}" in err
    step = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["global_step"]
    assert 2 <= step < 24
    finish(train_args(model_dir, data, out, *STEPS, "--resume", str(checkpoint)))
    assert_same_weights(out, straight)


def test_resume_refuses_another_model_or_other_settings(setup, straight, tmp_path, capsys):
    model_dir, data = setup
    other = tiny_checkpoint(tmp_path / "other", num_labels=4)
    checkpoint = straight / f"{CHECKPOINT_PREFIX}2"
    (tmp_path / "labels.json").write_text(json.dumps({str(i): f"c{i}" for i in range(6)}))
    for model, extra, expected in [
            (other, [], "another model"),
            (model_dir, ["--labels", str(tmp_path / "labels.json")], "id2label"),  # other class names
            (model_dir, ["--lr", "2e-3"], "other settings (lr 0.001, now 0.002)"),
            (model_dir, ["--seed", "5"], "seed 0, now 5")]:
        assert main(train_args(model, data, tmp_path / "out", "--resume", str(checkpoint), *extra)) == 1
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert main(train_args(model_dir, data, tmp_path / "out", "--resume", str(data))) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


def test_bad_options_are_clear_errors(setup, tmp_path, capsys):
    model_dir, data = setup
    with pytest.raises(SystemExit) as e:
        main(train_args(model_dir, data, tmp_path / "out", "--batch-size", "0"))
    assert e.value.code == 2 and "--batch-size: must be at least 1" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "annotations").mkdir()
    assert main(train_args(model_dir, empty, tmp_path / "out")) == 1
    assert "holds no images" in capsys.readouterr().err
    assert main(train_args(model_dir, tmp_path / "nowhere", tmp_path / "out")) == 1
    assert "has no images/ and annotations/ folders" in capsys.readouterr().err
    for bad in (dict(batch_size=0), dict(steps=0), dict(lr=-1.0), dict(save_every=-1), dict(crop=2.5)):
        with pytest.raises(ms.SegformerError):
            TrainSettings(**bad)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    model_dir, data = setup
    model = ms.load(model_dir)
    settings = TrainSettings(steps=5, batch_size=2, crop=32, lr=1e-3, save_every=2, eval_every=0)
    out = tmp_path / "run"
    import safetensors.numpy

    real_save, calls = safetensors.numpy.save_file, []

    def save_file(tensors, filename, metadata=None):  # the disk is full when the second checkpoint is written
        if Path(filename).name == OPTIMIZER_NAME:
            calls.append(filename)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    with pytest.raises(ms.SegformerError, match="No space left on device.*earlier checkpoints are intact"):
        train(model, dataset_batches(open_dataset(data), settings), settings, out, progress=False, log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == [f"{CHECKPOINT_PREFIX}2"]  # no staging folder, no checkpoint-4
    ms.load(out / f"{CHECKPOINT_PREFIX}2")
    assert read_safetensors(out / f"{CHECKPOINT_PREFIX}2" / OPTIMIZER_NAME)["step"] == 2


def test_clip_grad_norm_is_torchs():
    grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert clip_grad_norm(grads, 10.0) == pytest.approx(5.0)  # under the bound: unchanged
    assert grads["a"][0] == 3.0 and grads["b"][0, 0] == 4.0
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)  # torch: scale max_norm / (total + 1e-6)
    assert np.allclose(grads["a"], [3.0 / (5.0 + 1e-6), 0.0]) and np.allclose(grads["b"], [[4.0 / (5.0 + 1e-6)]])
    with pytest.raises(ms.SegformerError, match="max_grad_norm"):
        TrainSettings(max_grad_norm=0.0)


def test_validation_miou_is_evaluate_of_predict(setup):
    model_dir, data = setup
    model = ms.load(model_dir)
    samples = [read_sample(open_dataset(data), i) for i in range(5)]
    expected = evaluate([ms.predict(image, model) for image, _ in samples], [m for _, m in samples], 6)["mean_iou"]
    assert validation_miou(model.train(), samples, batch_size=2) == expected  # batched as predict, one at a time
    assert model.training  # the mode is given back
    with pytest.raises(ms.SegformerError, match="no predictions"):
        validation_miou(model, [])


def test_the_curves_need_matplotlib_only_if_it_is_there(tmp_path, monkeypatch):
    log = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.0, "lr": 1e-4}, {"step": 2, "eval_mean_iou": 0.5}]
    assert plot_curves(log, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert Image.open(tmp_path / "curves.png").size[0] > 100
    for name in ("matplotlib", "matplotlib.figure"):  # as if not installed: importing either raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    assert plot_curves(log, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
