"""Train the demo checkpoint from scratch on procedural scenes with PyTorch and transformers (dev-only): the script
that made the first demo model (held-out mIoU 0.9133; log: `train_demo_torch.log`). `weights/train_demo.py` is the
same recipe on mininp_segformer's own trainer, without torch; its model (0.9317) replaced this one as the shipped
`weights/segformer-b0-shapes/` on 2026-11-27.

    pip install torch==2.13.0 transformers==5.23.0
    python weights/train_demo_torch.py                                  # ~1 h on one CPU core; logs to stdout
    python weights/train_demo_torch.py --phases 64:300 --out /tmp/pilot   # a few-minute pilot of the same recipe

A MiT-b0 SegFormer (`transformers.SegformerForSemanticSegmentation`, random init) learns to label the shapes of
`mininp_segformer.tools.scenes`: every training step draws a fresh batch of scenes (seeds from TRAIN_SEED_START = 1e6
upwards, so no scene is ever repeated and no augmentation is needed). Validation during training uses seeds
900_000.. ; the final held-out test uses seeds 0..199, which neither training nor validation ever sees.

Progressive resizing: the scenes are scale-free (object sizes are fractions of the image), and SegFormer has no
position embeddings, so most steps run on cheap 64x64 scenes (~4x the images/s of 128x128) to learn the shapes,
and the last steps at 128x128, the export resolution, to sharpen the boundaries. AdamW with linear warmup and a
cosine decay over all steps.

The export is the Hugging Face layout that `mininp_segformer.load` reads: config.json, model.safetensors (fp16,
Hub key names, checked by `mininp_segformer.weights.check_state_dict`) and preprocessor_config.json.
Everything is seeded (torch, NumPy, scene seeds), and torch runs on one thread, so a rerun gives the same weights
on the same CPU and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not
from mininp_segformer.config import variant_config  # noqa: E402
from mininp_segformer.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mininp_segformer.tools.metrics import intersect_and_union, metrics_from_areas  # noqa: E402
from mininp_segformer.tools.scenes import (CLASS_NAMES, HELD_OUT_SEEDS, ID2LABEL, TRAIN_SEED_START,  # noqa: E402
                                           make_scene)
from mininp_segformer.weights import SEMANTIC, check_state_dict, to_hub_name  # noqa: E402

VAL_SEED_START = 900_000  # periodic validation; below TRAIN_SEED_START, disjoint from HELD_OUT_SEEDS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batch(seeds, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes for `seeds` as (pixel_values float32 (B, 3, H, W), labels int64 (B, H, W)).

    Scenes are rendered at the training size, so preprocessing is HF's without the resize: 1/255, ImageNet norm.
    """
    scenes = [make_scene(int(s), size) for s in seeds]
    images = np.stack([im for im, _ in scenes]).astype(np.float32) / 255.0
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    pixels = ((images - mean) / std).transpose(0, 3, 1, 2)
    labels = np.stack([lab for _, lab in scenes]).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(labels)


@torch.no_grad()
def evaluate(model, seeds, size, batch_size=25) -> tuple[float, np.ndarray]:
    """(mIoU, IoU per class) over `seeds`, as `mininp_segformer.tools.metrics` scores a data set: per class,
    intersection and union summed over all scenes; the mean over the classes present."""
    model.eval()
    areas = np.zeros((4, len(CLASS_NAMES)), dtype=np.int64)
    seeds = list(seeds)
    for i in range(0, len(seeds), batch_size):
        pixels, labels = batch(seeds[i:i + batch_size], size)
        logits = model(pixel_values=pixels).logits
        preds = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1).numpy()
        for pred, label in zip(preds, labels.numpy()):
            areas += np.stack(intersect_and_union(pred, label, len(CLASS_NAMES)))
    model.train()
    scores = metrics_from_areas(*areas)
    return scores["mean_iou"], scores["per_class_iou"]


def init_like_segformer(model: torch.nn.Module) -> None:
    """Re-initialise the weights as the original SegFormer code does (mmseg's MiT backbone).

    transformers' `_init_weights` draws every Linear *and Conv2d* weight from N(0, 0.02). For the 3x3 depthwise
    convolution inside each Mix-FFN (fan-in 9) that is ~20x too small, so at step 0 the MLP branches, and the only
    positional signal SegFormer has, are almost switched off; from scratch, training then crawls (see
    docs/demo_model.md). Here: Linear ~ TruncNormal(0, 0.02), Conv2d ~ N(0, sqrt(2 / fan_out)) (He, fan-out
    mode), zero biases, LayerNorm / BatchNorm weight 1 and bias 0.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.trunc_normal_(module.weight, std=0.02)
        elif isinstance(module, torch.nn.Conv2d):
            k_h, k_w = module.kernel_size
            fan_out = k_h * k_w * module.out_channels // module.groups
            torch.nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            torch.nn.init.ones_(module.weight)
        else:
            continue
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 1% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def export(model, our_config, out: Path, size) -> None:
    """Write config.json + fp16 model.safetensors (Hub names, strictly checked) + preprocessor_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = load_file(str(Path(tmp) / "model.safetensors"))
        config_json = json.loads((Path(tmp) / "config.json").read_text())
    state = {to_hub_name(k): v for k, v in state.items()}  # should a transformers version save its in-memory names
    check_state_dict(state, our_config, SEMANTIC, source="the trained model")  # the Hub layout, strictly
    state = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    config_json["architectures"] = [SEMANTIC]
    config_json["dtype"] = "float32"  # stored as fp16 to halve the file; run in fp32
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    preprocessor = {
        "do_normalize": True,
        "do_reduce_labels": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_MEAN),  # exactly as in the Hub configs
        "image_processor_type": "SegformerImageProcessor",
        "image_std": list(IMAGENET_STD),
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": size[0], "width": size[1]},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="64/128:5000,128:800",
                   help="SIZES:STEPS,... with SIZES one square size or several (64/128: alternate step by step); "
                        "the last size is the export and validation size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-scenes", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--init", type=Path, help="continue from this exported checkpoint instead of a random init")
    p.add_argument("--first-seed", type=int, default=TRAIN_SEED_START,
                   help="scene seed of the first training image (use a fresh range when continuing with --init)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "train_demo_torch",
                   help="where the fp16 model goes (weights/segformer-b0-shapes is the NumPy-trained one now)")
    args = p.parse_args(argv)

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # unused by the scenes (each has its own Generator) but fixed all the same
    phases = []  # [(sizes, steps)]: in a phase, the step cycles through its sizes
    for phase in args.phases.split(","):
        sizes, steps = phase.split(":")
        phases.append(([int(v) for v in sizes.split("/")], int(steps)))
    total = sum(steps for _, steps in phases)
    ends = np.cumsum([steps for _, steps in phases])
    export_size = (phases[-1][0][-1],) * 2

    def size_at(step):
        """The (square) scene size of a 0-based step."""
        sizes = phases[min(int(np.searchsorted(ends, step, side="right")), len(phases) - 1)][0]
        return (sizes[step % len(sizes)],) * 2


    # MiT-b0 as in mininp_segformer.config; no stochastic depth / classifier dropout: every batch is new data.
    our_config = variant_config("b0", num_labels=len(CLASS_NAMES), id2label=ID2LABEL, drop_path_rate=0.0,
                                classifier_dropout_prob=0.0, architectures=(SEMANTIC,))
    hf_dict = our_config.to_dict()
    hf_dict.pop("model_type")
    if args.init:
        model = transformers.SegformerForSemanticSegmentation.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**hf_dict))
        init_like_segformer(model)
    model.train()
    n_params = sum(t.numel() for t in model.parameters())
    log(f"MiT-b0 SegFormer, {n_params / 1e6:.2f}M parameters; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {args.threads} thread(s)")
    log(f"{total} steps x batch {args.batch_size}, phases (size:steps) {args.phases}, AdamW lr {args.lr} "
        f"(warmup {args.warmup}, cosine), weight decay {args.weight_decay}")

    decay = [t for n, t in model.named_parameters() if t.ndim > 1]
    no_decay = [t for n, t in model.named_parameters() if t.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    val_seeds = range(VAL_SEED_START, VAL_SEED_START + args.val_scenes)
    start = window = time.time()
    running, seen = 0.0, 0
    for step in range(total):
        size = size_at(step)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total, args.lr, args.warmup)
        first = args.first_seed + step * args.batch_size
        pixels, labels = batch(range(first, first + args.batch_size), size)
        loss = model(pixel_values=pixels, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        seen += 1
        done = step + 1
        if done % args.log_every == 0 or done == total:
            now = time.time()
            log(f"step {done}/{total}  {size[0]}px  loss {running / seen:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{seen * args.batch_size / (now - window):.1f} img/s  elapsed {(now - start) / 60:.1f} min")
            running, seen, window = 0.0, 0, now
        if done % args.val_every == 0 or done == total:
            miou, iou = evaluate(model, val_seeds, export_size)
            log(f"step {done}  validation mIoU {miou:.4f} at {export_size[0]}px ({len(val_seeds)} scenes, seeds "
                f"{VAL_SEED_START}..)  " + " ".join(f"{name} {v:.3f}" for name, v in zip(CLASS_NAMES, iou)))
            export(model, our_config, args.out, export_size)  # a usable checkpoint at every validation

    size = export_size
    train_minutes = (time.time() - start) / 60
    log(f"training done in {train_minutes:.1f} min ({total * args.batch_size} scenes)")
    export(model, our_config, args.out, size)
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    log(f"exported {args.out} (model.safetensors {size_mb:.1f} MB, fp16, Hub key names verified)")

    # Held-out test, on the exported (fp16) weights re-read by transformers: checks the round trip too.
    reloaded = transformers.SegformerForSemanticSegmentation.from_pretrained(args.out, dtype=torch.float32)
    miou, iou = evaluate(reloaded, HELD_OUT_SEEDS, size)
    log(f"held-out mIoU {miou:.4f} (torch, exported weights, seeds {HELD_OUT_SEEDS.start}..{HELD_OUT_SEEDS.stop - 1} "
        f"at {size[0]}x{size[1]})  " + " ".join(f"{name} {v:.3f}" for name, v in zip(CLASS_NAMES, iou)))


if __name__ == "__main__":
    main()
