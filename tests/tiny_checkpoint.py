"""A small synthetic SegFormer checkpoint on disk, for the command-line, inference and scaling tests."""

from __future__ import annotations

import json
import struct
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


def safetensors_parts(state: dict, float_dtype: str = "BF16") -> tuple[dict, bytes]:
    """The header (a dict) and data section of `state` as a safetensors file, laid out by hand so that tests can
    corrupt either. Float tensors are stored as `float_dtype`: "F32", or "BF16" (NumPy has no bfloat16: the top 16
    bits of each float32); others keep their dtype (int64 -> "I64")."""
    header, chunks, offset = {}, [], 0
    for k, v in state.items():
        if v.dtype == np.float32:
            data = (v.view(np.uint32) >> 16).astype("<u2").tobytes() if float_dtype == "BF16" else v.tobytes()
            dtype = float_dtype
        else:
            data, dtype = v.tobytes(), "I64"
        header[k] = {"dtype": dtype, "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return header, b"".join(chunks)


def write_safetensors(path, header, data: bytes) -> Path:
    """Write the 8-byte little-endian header length, the header (a dict as JSON, or raw bytes) and the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Path(path)
