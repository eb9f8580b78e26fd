"""The `mininp-segformer` command end to end: subprocesses running `python -m mininp_segformer` (and the installed
console script), on tiny synthetic checkpoints and images."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mininp_segformer import inference, load
from mininp_segformer.tools import cli, viz
from mininp_segformer.tools.flops import count_macs, summarize
from mininp_segformer.tools.metrics import evaluate
from mininp_segformer.weights import count_parameters
from tests.conftest import REPO_ROOT, smooth_image
from tests.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", num_labels=5, image_size=(64, 64))


@pytest.fixture()
def photos(tmp_path):
    """A folder with two photos, a text file and a corrupt 'JPEG'."""
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(smooth_image(1, 61, 90)).save(d / "street.png")
    Image.fromarray(smooth_image(2, 80, 50)).save(d / "room.jpg", quality=95)
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return d


def run(*args, env=None, cwd=REPO_ROOT):
    """`python -m mininp_segformer ARGS` in a fresh process (one thread, an empty model cache, offline)."""
    environ = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MININP_SEGFORMER_THREADS="1", HF_HUB_OFFLINE="1",
                   **(env or {}))
    environ.setdefault("MININP_SEGFORMER_HOME", str(Path(cwd) / ".no-cache"))
    return subprocess.run([sys.executable, "-m", "mininp_segformer", *map(str, args)], capture_output=True,
                          text=True, env=environ, cwd=cwd, timeout=300)


def error_lines(stderr: str):
    lines = [line for line in stderr.splitlines() if "error" in line or ": " in line]
    assert "Traceback" not in stderr, stderr
    return lines


def test_predict_folder_keeps_going_past_a_broken_file(checkpoint, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")
    r = run("predict", photos, "--model", checkpoint, "--out", out, "--overlay")
    assert r.returncode == 1, r.stderr
    broken = [line for line in error_lines(r.stderr) if "broken.jpg" in line]
    assert len(broken) == 1 and "not a readable image" in broken[0], r.stderr
    assert "skipped 1 non-image file" in r.stderr and "segmented 2 of 3" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "room.png", "room_overlay.jpg", "street.png",
                                                     "street_overlay.jpg"]
    assert (out / "keep.txt").read_text() == "written before"
    model = load(checkpoint)
    for name in ("street.png", "room.jpg"):
        photo = Image.open(photos / name)
        seg = Image.open(out / (Path(name).stem + ".png"))
        assert seg.mode == "P" and seg.size == photo.size
        np.testing.assert_array_equal(np.asarray(seg), inference.segment(photo, model))
        palette = np.array(seg.getpalette()[: 3 * 5]).reshape(5, 3)
        np.testing.assert_array_equal(palette, viz.palette_for(5))
        assert Image.open(out / (Path(name).stem + "_overlay.jpg")).size == photo.size


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_predict_on_a_terminal_draws_a_bar_with_messages_above_it(checkpoint, photos, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli.main(["predict", str(photos), "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--mode",
                     "slide", "--crop", "48", "--stride", "32"]) == 1  # broken.jpg
    err = terminal.getvalue()
    assert "\r" in err and "100%|" in err and "3/3 [" in err  # tqdm's bar, redrawn in place
    assert "[1/3]" not in err  # the plain lines are for logs
    assert "\nmininp-segformer: segmented 2 of 3 image(s)" in err  # below the finished bar
    broken = next(line for line in err.split("\r") if "broken.jpg" in line)
    assert broken.strip().startswith("mininp-segformer:") and "not a readable image" in broken


def test_predict_slide_tta_with_a_pool_of_processes(checkpoint, photos, tmp_path):
    (photos / "broken.jpg").unlink()
    options = ["--mode", "slide", "--crop", "48", "--stride", "32", "--tta", "--scales", "1.0", "1.25"]
    r = run("predict", photos, "--model", checkpoint, "--out", tmp_path / "out", "--jobs", "2", *options)
    assert r.returncode == 0, r.stderr
    assert "[2/2]" in r.stderr  # not a terminal: one plain line per image
    model = load(checkpoint)
    for name in ("street.png", "room.jpg"):
        expected = inference.segment(photos / name, model, mode="slide", crop=48, stride=32, tta=True,
                                     scales=(1.0, 1.25))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / (Path(name).stem + ".png"))),
                                      expected)


def test_usage_errors_exit_2(checkpoint, photos, tmp_path):
    r = run("predict", photos / "street.png", "--model", checkpoint, "--mode", "slide", "--crop", "48",
            "--stride", "64", "--out", tmp_path / "o")
    assert r.returncode == 2 and "stride 64 x 64 is larger than the crop 48 x 48" in r.stderr
    assert len(error_lines(r.stderr)) == 1
    assert not (tmp_path / "o").exists()  # nothing written
    r = run("predict", photos / "street.png", "--stride", "0")
    assert r.returncode == 2 and "--stride: must be at least 1" in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["--crop", "48"], "--crop and --stride apply to --mode slide"),
    (["--scales", "1.0"], "--scales applies with --tta"),
    (["--palette", "pascal"], "unknown palette 'pascal'"),
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--mode", "slide", "--crop", "16"], "smaller than the 29 x 29"),
    (["--palette", "3"], "class ids up to 4 but the palette has only 3 colours"),
])
def test_more_usage_errors(checkpoint, photos, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", str(photos / "street.png"), "--model", str(checkpoint), "--out", str(tmp_path / "o"),
                  *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_collisions_are_usage_errors(checkpoint, tmp_path, capsys):
    for sub, suffix in (("a", ".png"), ("b", ".jpg")):
        (tmp_path / sub).mkdir()
        Image.fromarray(smooth_image(3, 40, 40)).save(tmp_path / sub / f"x{suffix}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.jpg"), "--model",
                  str(checkpoint), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "would both be written to" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # writing next to the inputs must not overwrite a PNG input
        cli.main(["predict", str(tmp_path / "a" / "x.png"), "--model", str(checkpoint), "--out", str(tmp_path / "a")])
    assert "would overwrite the input image" in capsys.readouterr().err


def test_runtime_errors_are_one_line(checkpoint, photos, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should go")
    r = run("predict", photos / "street.png", "--model", checkpoint, "--out", blocker / "out")
    assert r.returncode == 1
    expected = f"mininp-segformer: error: cannot write to the output directory {blocker / 'out'}: Not a directory"
    assert error_lines(r.stderr) == [expected]
    r = run("predict", photos / "street.png", "--model", tmp_path / "missing")
    assert r.returncode == 1 and len(error_lines(r.stderr)) == 1 and "does not exist" in r.stderr
    r = run("predict", photos / "notes.txt", photos / "street.png", "--model", checkpoint, "--out", tmp_path / "o2",
            "--mode", "slide", "--crop", "64")
    assert r.returncode == 1
    assert error_lines(r.stderr) == [
        f"mininp-segformer: {photos / 'notes.txt'}: {photos / 'notes.txt'} is not a readable image (cannot identify "
        f"image file '{photos / 'notes.txt'}'); pass a PNG, JPEG or other format Pillow reads",
        f"mininp-segformer: {photos / 'street.png'}: the crop 64 x 64 is larger than the image (61 x 90 at the "
        "working resolution); use a smaller crop or mode 'whole'",
        "mininp-segformer: segmented 0 of 2 image(s) into " + str(tmp_path / "o2") + "; 2 failed (see above)"]
    r = run("--debug", "predict", photos / "street.png", "--model", tmp_path / "missing")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_default_model_offline_points_to_the_demo(photos, tmp_path):
    r = run("predict", photos / "street.png", "--out", tmp_path / "o", env={"MININP_SEGFORMER_HOME": str(tmp_path)})
    assert r.returncode == 1
    (line,) = error_lines(r.stderr)
    assert "nvidia/segformer-b0-finetuned-ade-512-512" in line and "--model segformer-b0-shapes" in line


def test_models_download_info(checkpoint, tmp_path):
    home = tmp_path / "cache"
    cached = home / "acme--segformer-tiny" / "main"
    shutil.copytree(checkpoint, cached)
    files = {f: {"size": (cached / f).stat().st_size,
                 "sha256": hashlib.sha256((cached / f).read_bytes()).hexdigest()}
             for f in ("config.json", "model.safetensors")}
    (cached / "manifest.json").write_text(json.dumps({"name": "acme/segformer-tiny", "revision": "main",
                                                      "files": files}))
    env = {"MININP_SEGFORMER_HOME": str(home)}
    r = run("models", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "nvidia/segformer-b0-finetuned-ade-512-512" in rows and rows["acme/segformer-tiny"].endswith("cached: main")

    r = run("download", "acme/segformer-tiny", env=env)
    assert r.returncode == 0 and r.stdout.strip() == str(cached)
    r = run("download", "acme/not-cached", env=env)
    assert r.returncode == 1 and len(error_lines(r.stderr)) == 1 and "HF_HUB_OFFLINE" in r.stderr

    r = run("info", checkpoint, "--size", "64", "96")
    assert r.returncode == 0, r.stderr
    model = load(checkpoint)
    assert f"parameters:   {count_parameters(model.config, model.head):,}" in r.stdout
    fused = summarize(count_macs(model.config, 64, 96, "fused"))["total"] / 1e9
    assert f"MACs at 64 x 96 (fused decoder): {fused:.3f} G" in r.stdout


def test_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    preds, labels = [], []
    for i in range(2):
        label = rng.integers(0, 4, size=(20, 30)).astype(np.uint8)
        pred = np.where(rng.random((20, 30)) < 0.7, label, rng.integers(0, 4, size=(20, 30))).astype(np.uint8)
        viz.colorize(pred, 4).save(tmp_path / "pred" / f"img{i}.png")
        Image.fromarray(label + 1).save(tmp_path / "gt" / f"img{i}.png")  # ADE-style: 0 = other, v = class v-1
        preds.append(pred)
        labels.append(label + 1)
    r = run("evaluate", tmp_path / "pred", tmp_path / "gt", "--num-labels", "4", "--reduce-labels", "--json",
            tmp_path / "scores.json")
    assert r.returncode == 0, r.stderr
    expected = evaluate(preds, labels, 4, reduce_labels=True)
    assert f"mean IoU: {expected['mean_iou']:.4f}" in r.stdout
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["mean_iou"] == pytest.approx(expected["mean_iou"])


def test_bench_is_delegated(monkeypatch):
    seen = []
    fake = types.ModuleType("mininp_segformer.tools.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "mininp_segformer.tools.bench", fake)
    # `from . import bench` in tools/cli.py reads the package's attribute, set once the real module was imported
    monkeypatch.setattr(sys.modules["mininp_segformer.tools"], "bench", fake, raising=False)
    assert cli.main(["bench", "--runs", "2", "--quick"]) == 3
    assert seen == [["--runs", "2", "--quick"]]


def test_console_script_is_installed():
    """CI installs the project (`pip install .[dev]`): the entry point must sit next to the interpreter."""
    script = shutil.which("mininp-segformer", path=str(Path(sys.executable).parent))
    if script is None:
        if os.environ.get("CI"):
            pytest.fail(f"no mininp-segformer script beside {sys.executable}: is [project.scripts] in pyproject.toml?")
        pytest.skip("mininp_segformer is not installed in this environment (pip install -e . to get the script)")
    r = subprocess.run([script, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--mode {whole,slide}" in r.stdout
