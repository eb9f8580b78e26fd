"""A small synthetic SegFormer checkpoint on disk, for the command-line, inference and scaling tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mininp_segformer.config import variant_config
from mininp_segformer.weights import random_state_dict, save_checkpoint


def make_checkpoint(directory, num_labels: int = 5, image_size=(64, 64), seed: int = 0) -> Path:
    """A random B0 with `num_labels` labels saved in the Hub layout, with a preprocessor_config.json of
    `image_size` (so that whole-image inference is cheap). Returns the directory."""
    config = variant_config("b0", num_labels=num_labels)
    directory = save_checkpoint(directory, config, random_state_dict(config, seed=seed))
    size = {"height": int(image_size[0]), "width": int(image_size[1])}
    (Path(directory) / "preprocessor_config.json").write_text(json.dumps({"size": size}), encoding="utf-8")
    return Path(directory)


def gradient_image(height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 test photo built from broadcast ramps: cheap at any size (no (H, W) index arrays)."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (np.arange(height) * 255 // max(height - 1, 1)).astype(np.uint8)[:, None]
    img[..., 2] = (np.arange(width) * 7 % 256).astype(np.uint8)
    return img
