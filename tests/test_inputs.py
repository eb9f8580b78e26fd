"""Images and pixel_values: explicit conversions for what can be converted, a clear error for what cannot."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import mininp_segformer as ms
from mininp_segformer.config import variant_config
from mininp_segformer.preprocessing import ImageError, load_image
from mininp_segformer.weights import SEMANTIC, random_state_dict, save_checkpoint

CONFIG = variant_config("b0", num_labels=4)
rng = np.random.default_rng(7)


@pytest.fixture(scope="module")
def model():
    return ms.Segformer(CONFIG, random_state_dict(CONFIG, SEMANTIC, seed=5), image_size=(64, 96))


def rgb(h=23, w=31):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- images -------------------------------------------------------------------------------------------------------

def test_the_accepted_forms_agree(tmp_path):
    a = rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    ref = ms.preprocess(a, size=(40, 30))
    assert ref.shape == (1, 3, 40, 30) and ref.dtype == np.float32
    np.testing.assert_array_equal(ms.preprocess(Image.fromarray(a), size=(40, 30)), ref)
    np.testing.assert_array_equal(ms.preprocess(tmp_path / "x.png", size=(40, 30)), ref)
    np.testing.assert_array_equal(ms.preprocess(str(tmp_path / "x.png"), size=(40, 30)), ref)
    batch = ms.preprocess([a, a[::-1]], size=(40, 30))
    assert batch.shape == (2, 3, 40, 30)
    np.testing.assert_array_equal(batch[:1], ref)


def test_normalization_constants():
    white = np.full((4, 4, 3), 255, np.uint8)
    x = ms.preprocess(white, size=4)[0, :, 0, 0]
    np.testing.assert_allclose(x, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6)


def test_grayscale_palette_rgba_and_16bit_are_converted_explicitly():
    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    as_rgb = np.stack([gray] * 3, -1)
    np.testing.assert_array_equal(load_image(gray), as_rgb)
    np.testing.assert_array_equal(load_image(gray[..., None]), as_rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(gray)), as_rgb)
    pal = Image.fromarray(gray).convert("P")
    np.testing.assert_array_equal(load_image(pal), np.asarray(pal.convert("RGB")))
    # RGBA: composited onto white, like HF's convert_to_rgb; fully transparent -> white, opaque -> itself
    rgba = np.concatenate([rgb(9, 11), np.zeros((9, 11, 1), np.uint8)], -1)
    rgba[0, 0, 3] = 255
    out = load_image(rgba)
    assert (out[1:, :] == 255).all() and (out[0, 0] == rgba[0, 0, :3]).all()
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba)), out)
    # 16-bit: scaled by the full range, not clipped at 255
    g16 = (gray.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(g16), as_rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(g16)), as_rgb)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((5, 5, 3), np.float32), "uint8"),
    (np.zeros((3, 5, 5), np.uint8), "channels-first"),
    (np.zeros((5, 5, 2), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    ("no/such/image.png", "does not exist"),
    (42, "expected a path"),
])
def test_bad_images(bad, message):
    with pytest.raises(ImageError, match=message):
        ms.preprocess(bad)


def test_unreadable_file_and_directory(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        ms.preprocess(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="directory"):
        ms.preprocess(tmp_path)


# ---- pixel_values -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,error,message", [
    (np.zeros((3, 64, 64), np.float32), ValueError, r"x\[None\]"),
    (np.zeros((1, 64, 64, 3), np.float32), ValueError, "channels-last"),
    (np.zeros((1, 1, 64, 64), np.float32), ValueError, "3 channels"),
    (np.zeros((1, 3, 64, 64), np.uint8), TypeError, "preprocess"),
    (np.zeros((1, 3, 28, 64), np.float32), ValueError, "at least 29 x 29"),
    (np.full((1, 3, 64, 64), np.nan, np.float32), ValueError, "NaN"),
    ([[1.0]], TypeError, "NumPy array"),
])
def test_bad_pixel_values(model, bad, error, message):
    with pytest.raises(error, match=message):
        model(bad)


def test_smallest_input_runs_and_float64_is_accepted(model):
    out = model(rng.standard_normal((1, 3, 29, 29)), output_hidden_states=True, output_attentions=True)
    assert out.logits.dtype == np.float32 and out.logits.shape == (1, 4, 8, 8)
    assert [h.shape[2:] for h in out.hidden_states] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert out.attentions[0].shape == (1, 1, 64, 1)


def test_predict_returns_a_map_at_the_image_size(model):
    img = rgb(37, 53)
    seg = model_seg = ms.predict(img, model)
    assert seg.shape == (37, 53) and seg.dtype == np.int64
    assert seg.min() >= 0 and seg.max() < 4
    logits = model(ms.preprocess(img, size=model.image_size)).logits
    np.testing.assert_array_equal(model_seg, ms.postprocess(logits, [(37, 53)])[0])


def test_postprocess_kernel_and_bands_equal_a_whole_resize(monkeypatch):
    from mininp_segformer.nn import layers
    from mininp_segformer.nn.layers import resize_bilinear, resized_argmax

    monkeypatch.setattr(layers, "BAND_ROWS", 7)  # many bands, a short last one
    logits = rng.standard_normal((2, 6, 9, 13)).astype(np.float32)
    logits[0, 3] = logits[0, 1]  # exact ties: the first class wins, as in np.argmax and torch
    maps = ms.postprocess(logits, [(300, 41), (5, 7)])
    for lg, m in zip(logits, maps):
        whole = resize_bilinear(lg, m.shape).argmax(0)
        np.testing.assert_array_equal(m, whole)
        np.testing.assert_array_equal(resized_argmax(lg, m.shape), whole)
    assert [m.shape for m in ms.postprocess(logits)] == [(9, 13), (9, 13)]
    with pytest.raises(ValueError, match="target sizes"):
        ms.postprocess(logits, [(3, 3)])


def test_predict_works_where_torch_cannot_be_imported(tmp_path, model):
    """The whole path -- load, preprocess, model, postprocess -- with torch and transformers made unimportable."""
    save_checkpoint(tmp_path / "m", CONFIG, random_state_dict(CONFIG, SEMANTIC, seed=5))
    Image.fromarray(rgb(40, 50)).save(tmp_path / "img.png")
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnxruntime", "tensorflow", "jax"):
            sys.modules[name] = None  # any import of these now raises ImportError
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch still importable")
        import mininp_segformer as ms
        seg = ms.predict({str(tmp_path / 'img.png')!r}, model={str(tmp_path / 'm')!r})
        assert seg.shape == (40, 50), seg.shape
        print("ok", seg.shape)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "ok (40, 50)" in r.stdout


def test_exif_orientation_of_a_photo_file_is_applied(tmp_path):
    a = rgb(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, display rotated 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "turned.jpg")
    assert loaded.shape == (20, 10, 3)
    plain = load_image(Image.open(tmp_path / "turned.jpg"))  # a PIL image is taken as given
    assert plain.shape == (10, 20, 3)
    np.testing.assert_array_equal(loaded, np.rot90(plain, k=-1))


def test_concurrent_callers_on_threads_get_the_same_answers(model):
    """The kernels run one parallel region at a time; callers on several Python threads must queue, not crash."""
    from concurrent.futures import ThreadPoolExecutor
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    expected = model(x).logits
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model(x).logits, range(8)))
    for r in results:
        np.testing.assert_array_equal(r, expected)
