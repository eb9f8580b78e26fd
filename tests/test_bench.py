"""tools.bench's slide-mode comparison runs each of its variants end to end (fresh processes, a small photo)."""

import re

from mininp_segformer.tools import bench


def test_slide_benchmark_runs_every_variant(capsys):
    assert bench.main(["--slide", "520", "700", "--threads", "2"]) == 0  # 2 x 2 windows of 512 x 512
    out = capsys.readouterr().out
    assert "4 windows" in out
    for label, _, _ in bench.SLIDE_VARIANTS.values():
        assert re.search(rf"{re.escape(label)}\s+[\d.]+\s+[\d.]+\s+\d+ MB", out), out
