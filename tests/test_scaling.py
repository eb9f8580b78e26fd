"""docs/scaling.md's example: a Dask bag mapping batch.segment_file_or_error over image paths, on a local cluster of
processes (dask's "processes" scheduler: each worker is a separate Python process that loads the model once)."""

import os

import numpy as np
from PIL import Image

import mininp_segformer as ms
from mininp_segformer.tools.batch import segment_file_or_error
from mininp_segformer.inference import segment
from tests.conftest import REPO_ROOT, smooth_image
from tests.tiny_checkpoint import make_checkpoint


def test_dask_bag_on_local_processes(tmp_path, monkeypatch):
    import dask.bag as db

    monkeypatch.setenv("MININP_SEGFORMER_THREADS", "1")  # one thread per worker process
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the workers import this checkout
    checkpoint = make_checkpoint(tmp_path / "tiny", num_labels=4, image_size=(64, 64))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(smooth_image(100 + i, 40 + 7 * i, 60)).save(photos / f"img{i}.png")
    (photos / "img9.png").write_bytes(b"not a PNG")
    paths = sorted(str(p) for p in photos.iterdir())

    bag = db.from_sequence(paths, npartitions=3)
    results = bag.map(segment_file_or_error, model=str(checkpoint), out_dir=str(tmp_path / "out"),
                      overlay_format="png").compute(scheduler="processes", num_workers=2)

    by_name = {os.path.basename(r["image"]): r for r in results}
    assert sorted(by_name) == [f"img{i}.png" for i in (0, 1, 2, 3, 9)]
    assert "not a readable image" in by_name["img9.png"]["error"]
    done = [r for r in results if "error" not in r]
    assert all(r["pid"] != os.getpid() for r in done)  # the work ran in the worker processes
    model = ms.load(checkpoint)
    for r in done:
        np.testing.assert_array_equal(np.asarray(Image.open(r["label_map"])), segment(r["image"], model))
        assert Image.open(r["overlay"]).size == Image.open(r["image"]).size


def test_errors_come_back_as_values(tmp_path):
    r = segment_file_or_error(tmp_path / "missing.png", model=str(make_checkpoint(tmp_path / "m", num_labels=3)),
                              out_dir=str(tmp_path))
    assert r["image"].endswith("missing.png") and "does not exist" in r["error"] and "\n" not in r["error"]
