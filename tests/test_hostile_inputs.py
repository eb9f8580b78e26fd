"""Hostile and absurd inputs: each must end quickly in one of the package's own errors (or, where it can, do the
documented thing) -- never a hang, a raw traceback from Pillow or NumPy, a file written outside --out, or a request
for more memory than the machine has. Anything that could hang runs under a deadline (SIGALRM) or in a subprocess
with a timeout; anything that could allocate without bound runs in a subprocess with an address-space limit."""

import os
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mininp_segformer as ms
from mininp_segformer import inference, memory
from mininp_segformer.tools import viz
from mininp_segformer.tools.batch import output_paths
from mininp_segformer.preprocessing import load_image
from mininp_segformer.weights import random_state_dict
from tests.conftest import REPO_ROOT, deadline, smooth_image
from tests.test_cli import error_lines, run
from tests.tiny_checkpoint import gradient_image, make_checkpoint

CONFIG = ms.variant_config("b0", num_labels=4)


@pytest.fixture(scope="module")
def model():
    return ms.Segformer(CONFIG, random_state_dict(CONFIG, seed=3), image_size=(64, 64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", num_labels=5, image_size=(64, 64))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png(width: int, height: int, before_idat=b"", after_idat=b"") -> bytes:
    """An 8-bit RGB PNG whose IHDR says width x height; its IDAT holds only a few rows (enough for a header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\0" + b"\0" * 3 * width for _ in range(min(height, 4))))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + before_idat + png_chunk(b"IDAT", rows)
            + after_idat + png_chunk(b"IEND", b""))


# ---- 1. hangs -------------------------------------------------------------------------------------------------------

def test_a_palette_of_any_length_is_made():
    with deadline(60):  # b13de29 looped forever past 2,755 colours
        big = viz.distinct_palette(5000)
    assert big.shape == (5000, 3) and len(np.unique(big, axis=0)) == 5000
    np.testing.assert_array_equal(big[:256], viz.palette_for(256))  # the short palettes are its beginning
    assert big[0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="1 to 16,777,216 different colours"):
        viz.distinct_palette(2**24 + 1)


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with deadline(60), pytest.raises(ms.ImageError, match=f"{fifo} is not a regular file"):
        load_image(fifo)


# ---- 2. images ------------------------------------------------------------------------------------------------------

def test_a_60000_x_60000_png_header_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(tiny_png(60000, 60000))
    with pytest.raises(ms.ImageError, match=rf"{bomb} is over 178,956,970 pixels, more than the limit of "
                                            r"89,478,485 pixels \(PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(bomb)
    big = tmp_path / "big.png"  # between Pillow's limit and twice it, where Pillow itself only warns
    big.write_bytes(tiny_png(10000, 10000))
    with pytest.raises(ms.ImageError, match=rf"{big} is 10000 x 10000 = 100,000,000 pixels, more than the limit"):
        load_image(big)


def test_the_pixel_limit_is_settable(tmp_path, monkeypatch):
    Image.fromarray(smooth_image(0, 30, 40)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ms.ImageError, match=r"small.png is over 200 pixels, more than the limit of 100 pixels"):
        load_image(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    assert load_image(tmp_path / "small.png").shape == (30, 40, 3)


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_text_chunk_decompression_bomb_is_refused(tmp_path, kind, where):
    inflated = zlib.compress(b"A" * (64 * 2**20), 9)  # 64 MB of text in 64 kB
    fields = b"Comment\0\0" if kind == b"zTXt" else b"Comment\0\1\0\0\0"  # keyword, (flag,) method, (lang, key)
    chunk = png_chunk(kind, fields + inflated)
    path = tmp_path / "text.png"
    path.write_bytes(tiny_png(4, 4, **{f"{where}_idat": chunk}))
    with pytest.raises(ms.ImageError, match=rf"{path} is not a readable image \(.*MAX_TEXT_CHUNK"):
        load_image(path)


def test_32_bit_gray_is_scaled_by_its_full_range():
    values = np.array([[0, 2**20, 2**30, 2**31 - 1]], dtype=np.int32)
    img = Image.fromarray(values)
    assert img.mode == "I"
    expected = np.round(values * (255 / (2**31 - 1))).astype(np.uint8)  # 0, 0, 128, 255: not clipped at 255
    np.testing.assert_array_equal(load_image(img)[..., 0], expected)
    sixteen = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))  # how Pillow opens some 16-bit files
    assert load_image(sixteen)[..., 0].tolist() == [[0, 1, 255]]
    with pytest.raises(ms.ImageError, match="negative values"):
        load_image(Image.fromarray(np.array([[-5, 7]], dtype=np.int32)))


# ---- 3. paths -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem, expected", [(".", "_"), ("..", "__"), ("", "_"), ("/etc/x", "etc/x"),
                                            ("a/../b", "a/__/b")])
def test_output_paths_stay_below_the_output_directory(tmp_path, stem, expected):
    for out_dir in (tmp_path, Path(".")):
        paths = output_paths(stem, out_dir, "jpg")
        assert paths["label_map"] == out_dir / f"{expected}.png"
        assert paths["overlay"] == out_dir / f"{expected}_overlay.jpg"


def test_an_input_named_dotdot_png_is_written_inside_out(checkpoint, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    Image.fromarray(smooth_image(4, 40, 40)).save(work / "..png", format="PNG")
    Image.fromarray(smooth_image(5, 40, 40)).save(work / "x.jpg")
    r = run("predict", "..png", "--model", checkpoint, "--out", "seg", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == ["..png", "seg", "x.jpg"] and os.listdir(work / "seg") == ["_.png"]
    r = run("predict", "..png", "x.jpg", "--model", checkpoint, "--out", ".", cwd=work)  # b13de29: "empty name"
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == ["..png", "_.png", "seg", "x.jpg", "x.png"]
    assert sorted(os.listdir(tmp_path)) == ["work"]


def test_a_symbolic_link_out_of_out_is_refused(checkpoint, tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    Image.fromarray(smooth_image(6, 40, 40)).save(tmp_path / "photos" / "sub" / "y.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere")
    r = run("predict", tmp_path / "photos", "-r", "--model", checkpoint, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert error_lines(r.stderr) == [f"mininp-segformer: error: the output {tmp_path / 'out' / 'sub' / 'y.png'} for "
                                     f"'sub/y' would land outside the output directory {tmp_path / 'out'} (a "
                                     "symbolic link?); choose another output directory"]
    assert os.listdir(tmp_path / "elsewhere") == []


# ---- 4. memory ------------------------------------------------------------------------------------------------------

UNBOUNDED_FORWARD = textwrap.dedent("""
    import sys, tracemalloc
    import numpy as np
    import mininp_segformer as ms
    from mininp_segformer.weights import random_state_dict
    config = ms.variant_config("b0", num_labels=4)
    model = ms.Segformer(config, random_state_dict(config, seed=0), image_size=(4096, 4096))
    tracemalloc.start()
    try:
        if sys.argv[1] == "model":
            model(np.broadcast_to(np.float32(0.5), (1, 3, 4096, 4096)))  # a view: the input itself takes no memory
        else:
            ms.predict(np.zeros((40, 50, 3), np.uint8), model)  # preprocess would resize to 4096 x 4096 first
    except ms.ResourceError as e:
        print("ResourceError", tracemalloc.get_traced_memory()[1], e)
    except BaseException as e:
        print(type(e).__name__, e)
""")


@pytest.mark.parametrize("entry", ["model", "predict"])
def test_a_4096_squared_forward_is_refused_before_it_allocates(entry):
    """b13de29 asked NumPy for 64 GiB of attention scores; run where that fails fast (a 6 GiB address space)."""

    def small_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MININP_SEGFORMER_THREADS="1",
               MININP_SEGFORMER_MAX_MEMORY="4G")
    r = subprocess.run([sys.executable, "-c", UNBOUNDED_FORWARD, entry], capture_output=True, text=True, env=env,
                       preexec_fn=small_address_space, timeout=300)
    kind, traced, message = (r.stdout.split(" ", 2) + ["", ""])[:3]
    assert kind == "ResourceError", r.stdout + r.stderr
    assert int(traced) < 2**20  # refused before anything of the image's size was allocated
    assert message.startswith("a forward pass on 1 x 4096 x 4096 pixel values would need about")
    assert "more than the limit of 4.0 GiB" in message and "--mode slide" in message


def test_the_limit_is_settable_and_defaults_to_the_memory_available(model, memory_limit, monkeypatch):
    assert 0 < memory.available_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.delenv(memory.MEMORY_ENV, raising=False)
    monkeypatch.setattr(memory, "available_memory", lambda: 3 * 2**30)
    assert memory.max_memory() == 3 * 2**30
    monkeypatch.setenv(memory.MEMORY_ENV, "1.5G")
    assert memory.max_memory() == 1.5 * 2**30
    memory_limit("64M")  # the setter wins over the environment
    assert memory.max_memory() == 64 * 2**20
    with pytest.raises(ms.ResourceError, match=r"1 x 1024 x 1024 pixel values would need about [\d.]+ MiB of "
                                               r"memory, more than the limit of 64.0 MiB"):
        model(np.broadcast_to(np.float32(0), (1, 3, 1024, 1024)))
    with pytest.raises(ms.ResourceError, match=r"preprocessing 1 image\(s\) to 2000 x 3000 would need about"):
        ms.preprocess(np.zeros((4, 4, 3), np.uint8), size=(2000, 3000))
    memory_limit("none")
    assert memory.max_memory() == float("inf")
    with pytest.raises(ms.ResourceError, match="'lots' is not a memory size"):
        memory_limit("lots")


def test_slide_tta_at_huge_scales_is_refused_before_any_run(model, memory_limit):
    """At scale 8 a 2000 x 3000 photo becomes 16000 x 24000: 1.1 GB as 8-bit RGB before any window is run."""
    photo = gradient_image(2000, 3000)
    runs = []
    memory_limit("512M")
    with pytest.raises(ms.ResourceError, match=r"segmenting a 2000 x 3000 image \(slide mode, 4 pass\(es\), the "
                                               r"largest at 16000 x 24000\) would need about [\d.]+ GiB of memory, "
                                               r"more than the limit of 512.0 MiB; use fewer or smaller TTA scales"):
        inference.segment(photo, model, mode="slide", crop=48, tta=True, scales=[1.0, 8.0],
                          progress=lambda *done: runs.append(done))
    assert runs == []
    photo = photo[:75, :109]
    for bad in ([1e300], [float("inf")], [float("nan")], [8.5], ["x"]):
        with deadline(60), pytest.raises(ValueError, match="TTA scales must be"):
            inference.segment(photo, model, mode="slide", crop=48, tta=True, scales=bad)


def test_the_estimate_is_near_the_measured_peak():
    """The forward's estimated peak against the rise of the resident set of a process that runs it (B0, 768 x 768).

    The peak is reset just before the forward (Linux: "5" to /proc/self/clear_refs resets VmHWM), so what came
    before it -- imports, numba compiling or loading the kernels -- cannot hide it."""
    script = textwrap.dedent("""
        import numpy as np
        import mininp_segformer as ms
        from mininp_segformer.memory import estimate_forward_bytes
        from mininp_segformer.weights import random_state_dict

        def status_kb(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        config = ms.variant_config("b0", num_labels=150)
        model = ms.Segformer(config, random_state_dict(config, seed=0))
        model(np.zeros((1, 3, 64, 64), np.float32))  # compile or load the kernels, warm up
        x = np.zeros((1, 3, 768, 768), np.float32)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        before = status_kb("VmRSS")
        model(x)
        print((status_kb("VmHWM") - before) * 1024, estimate_forward_bytes(config, 1, 768, 768))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MININP_SEGFORMER_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    measured, estimate = map(int, r.stdout.split())
    assert 0.75 * measured < estimate < 1.5 * measured, (measured, estimate)


# ---- 5. the command line --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--jobs", "-1"], "argument --jobs: must be at least 0, got -1"),
    (["--tta", "--scales", "1e300"], "argument --scales: TTA scales must be positive numbers up to 8"),
    (["--tta", "--scales", "nan"], "argument --scales: TTA scales must be positive numbers up to 8"),
    (["--palette", "-3"], "--palette: a palette holds 1 to 16,777,216 different colours, got n=-3"),
    (["--max-memory", "lots"], "argument --max-memory: 'lots' is not a memory size"),
])
def test_usage_errors_are_one_line_before_the_model_loads(tmp_path, argv, message):
    """The model does not exist: a usage error found before loading it exits 2, a later one would exit 1."""
    Image.fromarray(smooth_image(8, 40, 40)).save(tmp_path / "x.png")
    r = run("predict", tmp_path / "x.png", "--model", tmp_path / "no-model", "--out", tmp_path / "o", *argv)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert message in line and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_runtime_errors_are_one_line_each(checkpoint, tmp_path):
    os.mkfifo(tmp_path / "camera.png")
    Image.fromarray(smooth_image(9, 40, 40)).save(tmp_path / "x.png")
    r = run("predict", tmp_path / "camera.png", tmp_path / "x.png", "--model", checkpoint, "--out", tmp_path / "o",
            "--max-memory", "1M", "--palette", "5000")
    assert r.returncode == 1
    fifo, memory_line, summary = error_lines(r.stderr)
    assert fifo.startswith(f"mininp-segformer: {tmp_path / 'camera.png'}: {tmp_path / 'camera.png'} is not a "
                           "regular file")
    assert memory_line.startswith(f"mininp-segformer: {tmp_path / 'x.png'}: segmenting a 40 x 40 image")
    assert "more than the limit of 1.0 MiB" in memory_line
    assert summary.endswith("; 2 failed (see above)")
