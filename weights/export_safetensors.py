"""Convert a SegFormer checkpoint directory's `pytorch_model.bin` into `model.safetensors` (dev-only, needs torch).

    python weights/export_safetensors.py path/to/checkpoint            # writes path/to/checkpoint/model.safetensors
    python weights/export_safetensors.py path/to/checkpoint -o out/    # writes out/ (config.json copied along)

mininp_segformer never unpickles: it reads only safetensors. This script is the one place a pickle is opened, with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

Accepted inputs, in the directory (with its config.json):
  * pytorch_model.bin, or sharded pytorch_model-0000x-of-0000y.bin + pytorch_model.bin.index.json (Hub repos,
    transformers 4.x `save_pretrained(safe_serialization=False)`),
  * model.safetensors (+ shards / index) whose keys need renaming, e.g. from a bare
    `safetensors.torch.save_file(model.state_dict(), ...)` under transformers 5,
  * a bare `torch.save(model.state_dict(), "pytorch_model.bin")`, also under transformers 5.

transformers 5 renamed SegFormer's modules (see transformers/conversion_mapping.py): its in-memory state_dict says
`segformer.stages.0.blocks.0.attention.q_proj.weight` where the Hub files say
`segformer.encoder.block.0.0.attention.self.query.weight`. `save_pretrained` maps the names back, a bare
`state_dict()` does not; this script does, so the output always has the Hub's on-disk names. The result is then
re-read and strictly checked with `mininp_segformer.weights.load_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

def shard_files(directory: Path, single: str, index: str) -> list[Path]:
    """[single] if it exists, else the shards an index.json lists, else []."""
    if (directory / single).is_file():
        return [directory / single]
    if (directory / index).is_file():
        weight_map = json.loads((directory / index).read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    return []


def read_tensors(directory: Path) -> tuple[dict, str]:
    """All tensors of the directory's checkpoint (torch tensors), and a description of where they came from."""
    import torch

    pickles = shard_files(directory, "pytorch_model.bin", "pytorch_model.bin.index.json")
    if pickles:
        state = {}
        for path in pickles:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict) and set(loaded) <= {"state_dict", "model"} and len(loaded) == 1:
                loaded = next(iter(loaded.values()))  # {"state_dict": {...}} wrappers
            state.update(loaded)
        return state, ", ".join(p.name for p in pickles)
    safetensors = shard_files(directory, "model.safetensors", "model.safetensors.index.json")
    if safetensors:
        from safetensors.torch import load_file

        state = {}
        for path in safetensors:
            state.update(load_file(str(path)))
        return state, ", ".join(p.name for p in safetensors)
    raise SystemExit(f"{directory} holds neither pytorch_model.bin nor model.safetensors (nor their sharded forms)")


def export(directory: Path, output: Path) -> Path:
    """Write `output/model.safetensors` (Hub names) + config.json, and check it strictly. Returns the output path."""
    import torch
    from safetensors.torch import save_file

    from mininp_segformer.weights import (CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME, CheckpointError,
                                          count_parameters, give_usual_mode, load_checkpoint, to_hub_name)

    if not (directory / CONFIG_NAME).is_file():
        raise SystemExit(f"{directory} has no config.json; the checkpoint's config is needed next to its weights")
    state, source = read_tensors(directory)
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SystemExit(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; is this a "
                             "transformers SegFormer checkpoint?")
        tensors[to_hub_name(key)] = value.detach().to("cpu").contiguous().clone()  # clone: no shared storage
    renamed = sum(to_hub_name(k) != k for k in state)
    if len(tensors) != len(state):
        raise SystemExit(f"{source}: renaming made two keys collide; the checkpoint mixes old and new names")

    # Write and strictly check in a staging directory first, so a failed export never replaces a good file.
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".export-"))
    try:
        shutil.copy2(directory / CONFIG_NAME, staging / CONFIG_NAME)
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        give_usual_mode(staging / WEIGHTS_NAME)  # safetensors' writer leaves it 0o600
        try:
            config, head, checked = load_checkpoint(staging)  # strict: one error listing every mismatch
        except CheckpointError as e:
            raise SystemExit(f"{e}\nNothing was written: the converted tensors do not fit {directory / CONFIG_NAME}")
        for extra in (CONFIG_NAME, PREPROCESSOR_NAME):
            if (directory / extra).is_file() and directory.resolve() != output.resolve():
                shutil.copy2(directory / extra, output / extra)
        target = output / WEIGHTS_NAME
        os.replace(staging / WEIGHTS_NAME, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{source} -> {target}: {len(tensors)} tensors ({renamed} renamed to Hub names), "
          f"{count_parameters(checked) / 1e6:.2f} M parameters; strict load OK ({head}, {config.num_labels} labels)")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="checkpoint directory (config.json + pytorch_model.bin)")
    parser.add_argument("-o", "--output", type=Path, help="output directory (default: the input directory)")
    args = parser.parse_args(argv)
    export(args.directory, args.output or args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
