"""Benchmark of one training step: mininp_segformer's `value_and_grad` beside PyTorch's `loss.backward()`.

    python -m mininp_segformer.tools.bench --train                 # B0 at 512 x 512, batch 2, 150 labels
    python -m mininp_segformer.tools.bench --train --profile       # where mininp_segformer's step goes

A step is what fine-tuning repeats: a forward pass in train mode with labels (dropout, stochastic depth, BatchNorm
on the batch's statistics, HF's loss on the logits upsampled to the labels' size) and the backward pass to every
parameter's gradient -- `value_and_grad(model, pixel_values, labels)` here, `model(pixel_values=x,
labels=y).loss.backward()` in torch + transformers (the optimiser's update, a few ms, is left out of both). Each
framework runs in a worker process of its own with the same threads, the same random weights in the Hub layout and
the same batch; the timed steps alternate between the workers, so a slow spell of the machine hits both alike.
Reported: median seconds per step, the ratio to torch, the step's GFLOP/s (three times the forward's FLOPs: the
forward, and the backward's two products per forward product) and each worker's peak RSS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .bench import available, exclusive_profile, machine, prepare_model, run_workers

TRAIN_FRAMEWORKS = ("mininp_segformer", "torch")


def training_batch(config, batch: int, size) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's batch: float32 pixel values `(B, C, H, W)` and int64 labels `(B, H, W)`, the same every run."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, config.num_channels, *size)).astype(np.float32)
    return x, rng.integers(0, config.num_labels, (batch, *size))


def setup_step(framework: str, model_dir: str, threads: int, batch):
    """Load `framework`'s model in train mode in this process -> (version, step() -> loss)."""
    x, labels = batch
    if framework == "mininp_segformer":
        import mininp_segformer as ms

        ms.set_num_threads(threads)
        model = ms.load(model_dir, seed=0).train()
        return ms.__version__, lambda: float(ms.value_and_grad(model, x, labels)[0])
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir).train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(pixel_values=xt, labels=yt).loss
        loss.backward()
        return float(loss.detach())

    return f"torch {torch.__version__}, transformers {transformers.__version__}", step


def run_train_benchmark(args) -> dict:
    """Time every installed framework of TRAIN_FRAMEWORKS; the report."""
    from .flops import count_macs

    frameworks = [fw for fw in TRAIN_FRAMEWORKS if available(fw)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, config = prepare_model(args, Path(tmp))
        batch = training_batch(config, args.batch, args.size)
        results = run_workers(frameworks, setup_step, (model_dir, args.threads, batch), args.runs, args.warmup)
    h, w = args.size
    gmac = sum(count_macs(config, h, w, decoder="literal").values()) * args.batch / 1e9
    return {"machine": machine(), "variant": args.model or args.variant, "size": [h, w], "batch": args.batch,
            "threads": args.threads, "runs": args.runs, "gmac_forward": gmac, "results": results,
            "skipped": sorted(set(TRAIN_FRAMEWORKS) - set(frameworks))}


def format_train_report(r: dict) -> str:
    gflop = 3 * 2 * r["gmac_forward"]  # forward + backward (two products per forward product)
    lines = [f"one training step (forward with labels + backward, train mode): {r['variant']} at {r['size'][0]} x "
             f"{r['size'][1]}, batch {r['batch']}, {r['threads']} threads; {r['machine']}",
             f"{'framework':<44}{'median s':>10}{'ratio':>8}{'GFLOP/s':>9}{'peak RSS MB':>13}{'RSS ratio':>11}"]
    res = r["results"]
    torch_s = res.get("torch", {}).get("median_s")
    torch_rss = res.get("torch", {}).get("peak_rss_mb")
    for fw, v in res.items():
        if "error" in v:
            lines.append(f"{fw:<44}  failed: {v['error']}")
            continue
        ratio = f"{v['median_s'] / torch_s:.2f}x" if torch_s and fw != "torch" else ""
        rss_ratio = f"{v['peak_rss_mb'] / torch_rss:.2f}x" if torch_rss and fw != "torch" else ""
        lines.append(f"{v['version'][:43]:<44}{v['median_s']:>10.2f}{ratio:>8}{gflop / v['median_s']:>9.1f}"
                     f"{v['peak_rss_mb']:>13.0f}{rss_ratio:>11}")
    lines.append(f"ratio: mininp_segformer's over torch's (below 1: faster / smaller); {gflop:.1f} GFLOP a step")
    if r["skipped"]:
        lines.append(f"not installed: {', '.join(r['skipped'])} (pip install '.[bench]')")
    return "\n".join(lines)


def profile_step(model, x, labels, repeats: int = 2) -> list[tuple[str, float]]:
    """The exclusive time of each function of `nn.layers` and `nn.loss` (and of the model's ops, the numba kernels
    for the default backend) in one training step, median of `repeats`, largest first (`bench.exclusive_profile`)."""
    import types

    from .. import value_and_grad
    from ..nn import layers, loss

    patches = {(module, name): f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
               for module in (layers, loss) for name, fn in vars(module).items()
               if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__ and not name.startswith("_")}
    return exclusive_profile(lambda: value_and_grad(model, x, labels), patches, model,
                             lambda component, op: f"ops.{op}" if op else component, "other (model glue, copies)",
                             repeats)


def run_train_profile(args) -> str:
    from .. import load, set_num_threads
    from .bench import format_profile
    from .flops import count_macs

    set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, config = prepare_model(args, Path(tmp))
        model = load(model_dir, seed=0).train()
    x, labels = training_batch(config, args.batch, args.size)
    h, w = args.size
    macs = {k: 3 * v * args.batch for k, v in count_macs(config, h, w, decoder="literal").items()}
    title = (f"one training step of {args.model or args.variant} at {h} x {w}, batch {args.batch}, {args.threads} "
             f"thread(s); {machine()}")
    return format_profile(profile_step(model, x, labels), macs, title)
