"""Train the demo model from scratch with mininp_segformer's own trainer: NumPy, no torch (dev-only script).

    python weights/train_demo.py --threads 1 --out runs/demo        # the full recipe: about 70 min on an idle core
    python weights/train_demo.py --phases 64:20 --val-every 10 --out /tmp/pilot    # a pilot of a few steps
    python weights/train_demo.py --out runs/demo --resume runs/demo                # continue after Ctrl-C

This script made the shipped weights/segformer-b0-shapes (log: weights/train_demo.log). It is the recipe of
`weights/train_demo_torch.py` (the torch script that made the first demo model; docs/demo_model.md) on
`training.trainer.train`: a MiT-b0 SegFormer, initialised as the original SegFormer code
does, learns the shapes of `tools.scenes` from fresh scenes every step (seeds TRAIN_SEED_START + step x batch .., so
a step's batch is a function of the step and a resumed run is exact); progressive resizing (64 and 128 px steps
alternating, then 128 px); periodic validation on seeds 900_000.. and the held-out test on seeds 0..199 at the end.

Where it differs from the torch script, because the trainer does it NVlabs' way: the schedule is mmcv's poly
(power 1) after a linear warmup, not cosine; no weight decay on the norms' weights
and biases (`optim.NVLABS_CUSTOM_KEYS`), where torch's script exempted every 1-D tensor (biases too).
`--head-lr-mult 1` (the default here) gives the decode head the encoder's learning rate, as the torch script did.

The trainer writes its run to --out (checkpoints, log, curves; float32). If the held-out mIoU reaches that of the
model already in --export (default: the shipped weights/segformer-b0-shapes), the model is exported there as fp16;
otherwise the export is skipped and the log says by how much it fell short, so a weaker run never replaces a
stronger model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not
import mininp_segformer as ms  # noqa: E402
from mininp_segformer.preprocessing import normalize  # noqa: E402
from mininp_segformer.tools.scenes import HELD_OUT_SEEDS, ID2LABEL, TRAIN_SEED_START, make_scene  # noqa: E402
from mininp_segformer.training.trainer import TrainSettings, train, validation_miou  # noqa: E402
from mininp_segformer.weights import (CONFIG_NAME, PREPROCESSOR_NAME, SEMANTIC, WEIGHTS_NAME,  # noqa: E402
                                      expected_shapes, init_weights, load_checkpoint, preprocessor_config,
                                      read_safetensors, save_checkpoint)

VAL_SEED_START = 900_000  # periodic validation; below TRAIN_SEED_START, disjoint from HELD_OUT_SEEDS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init_like_segformer(config, seed: int) -> dict[str, np.ndarray]:
    """Fresh weights as the original SegFormer code draws them (mmseg's MiT), not as transformers' `_init_weights`
    (`weights.init_weights`: every Conv2d ~ N(0, 0.02), which all but switches off the 3 x 3 depthwise convolutions
    of Mix-FFN, SegFormer's only positional signal; docs/demo_model.md): Linear ~ N(0, 0.02), Conv2d ~ N(0,
    sqrt(2 / fan_out)) (He, fan-out), biases 0, norms' weights 1."""
    rng = np.random.default_rng(seed)
    state = init_weights(expected_shapes(config, SEMANTIC), config.initializer_range, rng)
    for key, w in state.items():
        if key.endswith(".weight") and w.ndim == 4:  # (out, in / groups, kh, kw); depthwise: in / groups == 1
            out_channels, per_group, kh, kw = w.shape
            groups = out_channels if per_group == 1 else 1
            fan_out = kh * kw * out_channels // groups
            state[key] = rng.normal(0.0, math.sqrt(2.0 / fan_out), size=w.shape).astype(np.float32)
    return state


def scene_batch(seeds, size) -> tuple[np.ndarray, np.ndarray]:
    """Scenes rendered at `size`: (pixel_values (B, 3, H, W) float32 as HF's processor without its resize, labels
    (B, H, W) int64)."""
    scenes = [make_scene(int(s), size) for s in seeds]
    return (np.stack([normalize(image) for image, _ in scenes]),
            np.stack([labels for _, labels in scenes]).astype(np.int64))


def scene_batches(size_at, batch_size: int, first_seed: int):
    """The trainer's `batches_from`: batch `step` is scenes first_seed + step * batch_size + (0..batch_size - 1) at
    `size_at(step)`, so every scene is new and a resumed run sees what an uninterrupted one would."""
    def from_step(step: int):
        while True:
            first = first_seed + step * batch_size
            yield scene_batch(range(first, first + batch_size), size_at(step))
            step += 1
    return from_step


def scenes(seeds, size):
    """Validation samples: (image, mask) pairs."""
    return lambda: (make_scene(s, size) for s in seeds)


def parse_phases(text: str):
    """"64/128:5000,128:800" -> (size_at(step) -> (s, s), total steps, the last size)."""
    phases = []
    for phase in text.split(","):
        sizes, steps = phase.split(":")
        phases.append(([int(v) for v in sizes.split("/")], int(steps)))
    ends = np.cumsum([steps for _, steps in phases])

    def size_at(step):
        sizes = phases[min(int(np.searchsorted(ends, step, side="right")), len(phases) - 1)][0]
        return (sizes[step % len(sizes)],) * 2
    return size_at, int(ends[-1]), phases[-1][0][-1]


def export_fp16(run: Path, directory: Path, size: int) -> None:
    """The run's final model as the trainer saved it (`--out`: float32, BatchNorm's num_batches_tracked included) ->
    config.json + fp16 model.safetensors + preprocessor_config.json at size x size, as the shipped model."""
    config, _, _ = load_checkpoint(run)  # checked strictly; the tensors again with num_batches_tracked, which it drops
    save_checkpoint(directory, config, read_safetensors(run / WEIGHTS_NAME), dtype=np.float16)
    (directory / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_config((size, size)), indent=2) + "\n",
                                               encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="64/128:5000,128:800",
                   help="SIZES:STEPS,... with SIZES one square size or several (64/128: alternate step by step); "
                        "the last size is the export and validation size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--head-lr-mult", type=float, default=1.0, help="the decode head's lr multiplier (NVlabs: 10)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, as the torch script")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--val-scenes", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--seed", type=int, default=1, help="the initial weights")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "train_demo")
    p.add_argument("--resume", type=Path, default=None, help="a checkpoint, or a run's --out (its latest)")
    p.add_argument("--export", type=Path, default=ROOT / "weights" / "segformer-b0-shapes",
                   help="where the fp16 model goes if its held-out mIoU is at least that of the model there")
    args = p.parse_args(argv)

    threads = ms.set_num_threads(args.threads)
    size_at, total, size = parse_phases(args.phases)
    # MiT-b0 as the shipped model: no stochastic depth / classifier dropout, every batch is new data
    config = ms.variant_config("b0", num_labels=len(ID2LABEL), id2label=ID2LABEL, drop_path_rate=0.0,
                               classifier_dropout_prob=0.0, architectures=(SEMANTIC,))
    model = ms.Segformer(config, init_like_segformer(config, args.seed), image_size=(size, size))
    settings = TrainSettings(steps=total, batch_size=args.batch_size, crop=size, lr=args.lr,
                             weight_decay=args.weight_decay, warmup_steps=args.warmup, head_lr_mult=args.head_lr_mult,
                             max_grad_norm=args.max_grad_norm, seed=args.seed, augment=False,
                             eval_every=args.val_every, save_every=args.save_every)
    log(f"MiT-b0 SegFormer from scratch, mininp_segformer {ms.__version__} (NumPy + numba), {threads} thread(s); "
        f"{total} steps x batch {args.batch_size}, phases {args.phases}, AdamW lr {args.lr} (head x "
        f"{args.head_lr_mult}, warmup {args.warmup}, poly), weight decay {args.weight_decay}, gradient norm clipped "
        f"to {args.max_grad_norm}")
    start = time.time()
    result = train(model, scene_batches(size_at, args.batch_size, TRAIN_SEED_START), settings, args.out,
                   validation=scenes(range(VAL_SEED_START, VAL_SEED_START + args.val_scenes), (size, size)),
                   resume=args.resume, log=log)
    log(f"training done in {(time.time() - start) / 60:.1f} min; the run is in {args.out}")

    # The candidate is what would be shipped, the fp16 export, written beside --export first; it and the model already
    # in --export are scored alike, on the held-out seeds at that model's input size (tests/test_scenes.py's test)
    candidate_dir = args.export.with_name(f".{args.export.name}.candidate")
    shutil.rmtree(candidate_dir, ignore_errors=True)
    export_fp16(args.out, candidate_dir, size)
    candidate = ms.load(candidate_dir)
    incumbent = ms.load(args.export) if (args.export / WEIGHTS_NAME).exists() else None
    test_size = (incumbent if incumbent is not None else candidate).image_size
    held_out = validation_miou(candidate, scenes(HELD_OUT_SEEDS, test_size)())
    to_beat = validation_miou(incumbent, scenes(HELD_OUT_SEEDS, test_size)()) if incumbent is not None else 0.0
    log(f"held-out mIoU {held_out:.4f} (the fp16 export; seeds {HELD_OUT_SEEDS.start}..{HELD_OUT_SEEDS.stop - 1} at "
        f"{test_size[0]} x {test_size[1]}); the model in {args.export}: {to_beat:.4f}")
    if held_out >= to_beat:
        args.export.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME):
            os.replace(candidate_dir / name, args.export / name)
        log(f"exported to {args.export} (fp16)")
    else:
        log(f"not exported: {to_beat - held_out:.4f} short of the model in {args.export}")
    shutil.rmtree(candidate_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
