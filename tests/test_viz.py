"""mininp_segformer.tools.viz: palettes, colour-coded label maps, overlays, legends."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from mininp_segformer.tools import viz


def test_dataset_palettes_are_shareds(shared_dir):
    for n, name, filename in ((150, "ade20k", "ade20k_150.json"), (19, "cityscapes", "cityscapes_19.json")):
        src = json.loads((shared_dir / "labels" / filename).read_text(encoding="utf-8"))
        np.testing.assert_array_equal(viz.palette_for(n), np.array(src["palette_rgb"], dtype=np.uint8))
        np.testing.assert_array_equal(viz.palette_for(name), viz.palette_for(n))
        assert viz.dataset_palettes()[name]["id2label"] == src["id2label"]


def test_palette_for():
    ade = viz.palette_for(150)
    assert ade.shape == (150, 3) and ade.dtype == np.uint8
    assert ade[:3].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]  # wall, building, sky (mmseg)
    assert viz.palette_for(19)[0].tolist() == [128, 64, 128]  # Cityscapes road
    assert viz.palette_for("ADE").tolist() == ade.tolist() and viz.palette_for(" city ")[0].tolist() == [128, 64, 128]
    six = viz.palette_for(6)
    assert six.shape == (6, 3) and len({tuple(c) for c in six}) == 6 and six[0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(six, viz.palette_for(6))  # deterministic
    assert len(np.unique(viz.palette_for(256), axis=0)) == 256
    with pytest.raises(ValueError, match=r"unknown palette 'pascal'.*ade20k.*cityscapes"):
        viz.palette_for("pascal")
    with pytest.raises(TypeError):
        viz.palette_for(6.0)


def test_colorize_round_trip(tmp_path):
    seg = np.array([[0, 1, 2], [149, 2, 0]], dtype=np.int64)
    img = viz.colorize(seg, 150)
    assert img.mode == "P" and img.size == (3, 2)
    img.save(tmp_path / "seg.png")
    back = Image.open(tmp_path / "seg.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), seg)
    np.testing.assert_array_equal(np.asarray(back.convert("RGB")), viz.palette_for(150)[seg])


def test_colorize_bad_input():
    with pytest.raises(ValueError, match="does not fit a palette image"):
        viz.colorize(np.array([[0, 300]]))
    with pytest.raises(ValueError, match="class ids up to 7 but the palette has only 6"):
        viz.colorize(np.array([[0, 7]]), 6)
    with pytest.raises(ValueError, match="ids >= 0"):
        viz.colorize(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="integer class ids"):
        viz.colorize(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        viz.colorize(np.zeros((2, 2), dtype=np.int64), palette=np.zeros((4, 4)))


def test_overlay():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    seg = rng.integers(0, 4, size=(5, 7))
    palette = viz.palette_for(4)
    np.testing.assert_array_equal(viz.overlay(img, seg, alpha=0.0, palette=palette), img)
    np.testing.assert_array_equal(viz.overlay(img, seg, alpha=1.0, palette=palette), palette[seg])
    half = viz.overlay(Image.fromarray(img), seg, alpha=0.5, palette=palette)
    assert half.dtype == np.uint8 and half.shape == img.shape
    expected = np.rint(0.5 * img.astype(np.float64) + 0.5 * palette[seg]).astype(np.int64)
    assert np.abs(half.astype(np.int64) - expected).max() <= 1


def test_overlay_bad_input():
    img = np.zeros((5, 7, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"label map is 7 x 5 but the image is 5 x 7"):
        viz.overlay(img, np.zeros((7, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(img, np.zeros((5, 7), dtype=np.int64), alpha=1.5)
    with pytest.raises(ValueError, match="unknown palette"):
        viz.overlay(img, np.zeros((5, 7), dtype=np.int64), palette="nope")


def test_legend():
    seg = np.array([[2, 2, 2, 0], [2, 9, 0, 0]])
    entries = viz.legend(seg, {0: "wall", 1: "building", 2: "sky "}, palette=150)
    assert [(e.id, e.name) for e in entries] == [(2, "sky"), (0, "wall"), (9, "class 9")]
    assert [e.share for e in entries] == [0.5, 0.375, 0.125]
    assert entries[0].color == (6, 230, 230)


def test_plot_legend():
    import matplotlib

    matplotlib.use("Agg")
    seg = np.array([[2, 2, 2, 0], [2, 1, 0, 0]])
    fig = viz.plot_legend(seg, {0: "wall", 1: "building", 2: "sky"}, palette=150)
    ax = fig.axes[0]
    top_down = [t.get_text() for _, t in sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda p: -p[0])]
    assert top_down == ["sky (50.0%)", "wall (37.5%)", "building (12.5%)"]  # the largest share on top
    bars = ax.patches
    assert [round(b.get_width(), 6) for b in bars] == [50.0, 37.5, 12.5]
    np.testing.assert_allclose(bars[0].get_facecolor()[:3], np.array([6, 230, 230]) / 255)


def test_plot_legend_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="plot_legend needs matplotlib"):
        viz.plot_legend(np.zeros((2, 2), dtype=np.int64), {0: "a"})


def test_save_atomically_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "seg.png"
    viz.save_atomically(viz.colorize(np.zeros((2, 2), dtype=np.int64)), target)
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        viz.save_atomically(viz.colorize(np.ones((2, 2), dtype=np.int64)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.png"]  # no temporary file left behind


def test_outline_marks_both_sides_of_each_boundary():
    seg = np.zeros((5, 6), dtype=np.int64)
    seg[:, 3:] = 2  # a vertical boundary between columns 2 and 3
    rim = viz.outline(seg)
    assert rim.dtype == bool and rim.shape == seg.shape
    assert rim[:, 2:4].all() and not rim[:, [0, 1, 4, 5]].any()
    wide = viz.outline(seg, width=2)
    assert wide[:, 1:5].all() and not wide[:, [0, 5]].any()
    assert not viz.outline(seg, width=0).any()
    assert not viz.outline(np.ones((3, 3), dtype=np.int64), width=3).any()  # one class: no boundary
    with pytest.raises(ValueError, match="outline width"):
        viz.outline(seg, width=-1)


def test_overlay_outline_keeps_the_class_colours_true():
    img = np.full((6, 6, 3), 200, dtype=np.uint8)
    seg = np.zeros((6, 6), dtype=np.int64)
    seg[2:4, 2:4] = 1
    palette = np.array([[0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    out = viz.overlay(img, seg, alpha=0.5, palette=palette, outline_width=1)
    rim = viz.outline(seg, 1)
    np.testing.assert_array_equal(out[rim], palette[seg[rim]])  # unblended on the rims
    np.testing.assert_array_equal(out[~rim], viz.overlay(img, seg, alpha=0.5, palette=palette)[~rim])
    assert out[2, 2].tolist() == [255, 0, 255] and out[0, 0].tolist() == [100, 228, 100]


def test_plot_segmentation():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.zeros((20, 30, 3), dtype=np.uint8)
    seg = np.zeros((20, 30), dtype=np.int64)
    seg[5:15, 5:20] = 2
    labels = seg.copy()
    labels[0, 0] = 1  # a class only in the ground truth is still explained by the legend
    names = {0: "background", 1: "circle", 2: "square"}
    fig = viz.plot_segmentation(img, seg, names, labels=labels, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction",
                                                    "overlay (alpha 0.5), outlined"]
    assert fig.get_figwidth() == viz.COLUMN_INCHES
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["background 75.0%", "circle 0.0%", "square 25.0%"]
    shown = fig.axes[3].images[0].get_array()
    np.testing.assert_array_equal(shown, viz.overlay(img, seg, 0.5, viz.palette_for(3), outline_width=1))
    plt.close(fig)
    fig = viz.plot_segmentation(img, seg, names)
    assert [ax.get_title() for ax in fig.axes][:2] == ["image", "prediction"]
    plt.close(fig)
    with pytest.raises(ValueError, match="label map is"):
        viz.plot_segmentation(img, seg[:10], names)


def test_plot_segmentation_bad_ground_truth():
    import matplotlib

    matplotlib.use("Agg")
    img, seg = np.zeros((20, 30, 3), dtype=np.uint8), np.zeros((20, 30), dtype=np.int64)
    with pytest.raises(ValueError, match=r"ground truth is 30 x 20 but the prediction is 20 x 30"):
        viz.plot_segmentation(img, seg, {0: "background"}, labels=seg.T)
