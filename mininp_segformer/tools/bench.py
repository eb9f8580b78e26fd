"""Benchmark: mininp_segformer beside PyTorch (transformers) and ONNX Runtime, same checkpoint, same input.

    python -m mininp_segformer.tools.bench                         # B0 at 512 x 512, random weights
    python -m mininp_segformer.tools.bench --variant b2 --runs 10
    python -m mininp_segformer.tools.bench --model path/to/checkpoint --threads 2
    python -m mininp_segformer.tools.bench --cold-start            # README's first command, empty numba cache
    python -m mininp_segformer.tools.bench --slide 4000 6000       # slide mode, as it was and as it is
    python -m mininp_segformer.tools.bench --cpu avx2              # every framework on its AVX2 code (tools/avx2.py)

Each framework runs in a worker process of its own, loaded and warmed up once; the timed runs then alternate
between the workers round-robin, so that a slow spell of the machine hits every framework alike and no two
thread pools compete. Reported: the median of the timed forward passes (pixel_values -> logits), each ratio to
mininp_segformer, the model's GFLOP/s at that speed, and each worker's peak RSS. Then, unless --quick: the peak
RSS of a fresh process that loads the model and runs one predict() on a 512 x 512 image, per framework, and the
cold start of mininp_segformer (a second process, numba cache warm: import + load + first predict()).

torch, transformers and onnxruntime are optional (`pip install ".[bench]"`); a framework that is not installed is
left out of the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import MachineError
from . import avx2

FRAMEWORKS = ("mininp_segformer", "onnxruntime", "torch")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _setup(framework: str, model_dir: str, onnx_path: str | None, threads: int):
    """Load `framework`'s model in this process; returns (version, forward(pixel_values) -> logits)."""
    if framework == "mininp_segformer":
        import mininp_segformer as ms

        ms.set_num_threads(threads)
        model = ms.load(model_dir)
        return ms.__version__, lambda x: model(x).logits
    if framework == "torch":
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        model = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()

        def forward(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).logits.numpy()

        return f"torch {torch.__version__}, transformers {transformers.__version__}", forward
    if framework == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        return ort.__version__, lambda x: session.run(None, {"pixel_values": x})[0]
    raise ValueError(framework)


def _step_worker(framework, setup, setup_args, warmup, conn):
    """`setup(framework, *setup_args) -> (version, step)` in this process, `warmup` steps, then answer "run" with
    one timed step and "stop" with the peak RSS."""
    try:
        version, step = setup(framework, *setup_args)
        for _ in range(warmup):
            step()
        conn.send(("ready", version))
        while conn.recv() == "run":
            t = time.perf_counter()
            step()
            conn.send(time.perf_counter() - t)
        conn.send(_peak_rss_mb())
    except Exception as e:  # report, don't hang the coordinator
        conn.send(("error", f"{type(e).__name__}: {e}"))


def run_workers(frameworks, setup, setup_args, runs, warmup) -> dict:
    """One worker process per framework (`_step_worker`), timed steps alternating between them round-robin.
    Returns {framework: {"version", "times", "median_s", "peak_rss_mb"} or {"error"}}."""
    ctx = mp.get_context("spawn")
    workers, results = {}, {}
    for fw in frameworks:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_step_worker, args=(fw, setup, setup_args, warmup, child), daemon=True)
        proc.start()
        workers[fw] = (proc, parent)
    for fw, (proc, conn) in list(workers.items()):
        status, version = conn.recv()
        if status == "error":
            results[fw] = {"error": version}
            proc.join()
            del workers[fw]
            continue
        results[fw] = {"version": version, "times": []}
    for _ in range(runs):
        for fw, (_, conn) in workers.items():
            # Let the previous framework's threads go idle first: ONNX Runtime's pool, torch's OpenMP and OpenBLAS
            # all spin-wait for a while after a run, and would slow whichever framework runs next.
            time.sleep(0.5)
            conn.send("run")
            results[fw]["times"].append(conn.recv())
    for fw, (proc, conn) in workers.items():
        conn.send("stop")
        results[fw]["peak_rss_mb"] = conn.recv()
        proc.join()
        results[fw]["median_s"] = statistics.median(results[fw]["times"])
    return results


def _forward_step(framework, model_dir, onnx_path, threads, x):
    """`_setup`'s model as a step: one forward pass on `x`."""
    version, forward = _setup(framework, model_dir, onnx_path, threads)
    return version, lambda: forward(x)


def available(framework: str) -> bool:
    import importlib.util

    needs = {"mininp_segformer": [], "torch": ["torch", "transformers"], "onnxruntime": ["onnxruntime"]}[framework]
    return all(importlib.util.find_spec(m) is not None for m in needs)


def export_onnx(model_dir: str, size: tuple[int, int], out: Path) -> Path:
    """Export the transformers model to ONNX in a subprocess (needs torch + transformers + onnx)."""
    code = f"""
import torch, transformers
m = transformers.AutoModelForSemanticSegmentation.from_pretrained({model_dir!r}).eval()
x = torch.zeros(1, m.config.num_channels, {size[0]}, {size[1]})
torch.onnx.export(m, (x,), {str(out)!r}, input_names=["pixel_values"], output_names=["logits"], opset_version=17,
                  dynamic_axes={{"pixel_values": {{0: "batch", 2: "height", 3: "width"}}}}, dynamo=False)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return out


def time_frameworks(frameworks, model_dir, onnx_path, threads, x, runs, warmup):
    """Alternate timed forward passes between one worker process per framework (`run_workers`). Returns
    {framework: result dict}; a framework whose worker failed is left out, with a line on stderr."""
    results = run_workers(frameworks, _forward_step, (model_dir, onnx_path, threads, x), runs, warmup)
    for fw in [fw for fw, r in results.items() if "error" in r]:
        print(f"  {fw}: left out ({results.pop(fw)['error']})", file=sys.stderr)
    return results


_PREDICT_SNIPPETS = {
    "mininp_segformer": """
import mininp_segformer as ms
ms.set_num_threads({threads})
model = ms.load({model_dir!r})
seg = ms.predict(img, model)
""",
    "torch": """
import torch, transformers
transformers.utils.logging.disable_progress_bar()
import mininp_segformer as ms  # only its NumPy preprocessing, identical to HF's processor
torch.set_num_threads({threads})
model = transformers.AutoModelForSemanticSegmentation.from_pretrained({model_dir!r}).eval()
with torch.inference_mode():
    logits = model(torch.from_numpy(ms.preprocess(img))).logits
    seg = torch.nn.functional.interpolate(logits, size=img.shape[:2], mode="bilinear").argmax(1)[0].numpy()
""",
    "onnxruntime": """
import onnxruntime as ort
import mininp_segformer as ms
from mininp_segformer.preprocessing import postprocess
o = ort.SessionOptions(); o.intra_op_num_threads = {threads}
session = ort.InferenceSession({onnx_path!r}, o, providers=["CPUExecutionProvider"])
seg = postprocess(session.run(None, {{"pixel_values": ms.preprocess(img)}})[0], [img.shape[:2]])[0]
""",
}


def predict_process(framework, model_dir, onnx_path, threads) -> dict:
    """A fresh process that imports, loads and runs one predict() on a 512 x 512 image: seconds and peak RSS."""
    code = (
        "import resource, time, json\nt0 = time.perf_counter()\nimport numpy as np\n"
        "img = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)\n"
        + _PREDICT_SNIPPETS[framework].format(model_dir=model_dir, onnx_path=onnx_path, threads=threads)
        + "print(json.dumps({'seconds': time.perf_counter() - t0, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    r = run_process([sys.executable, "-c", code])
    return r if "error" in r else json.loads(r.pop("stdout").strip().splitlines()[-1])


def run_process(command, env=None, timeout: float = 3600) -> dict:
    """Run `command`; returns its wall `seconds`, `cpu_seconds` (user + system) and `stdout`, or {"error": the last
    line of its stderr}."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "stdout": r.stdout}


def cold_start(threads: int) -> dict:
    """The README's first command -- the bundled demo model on its example scene, with an overlay -- twice, each in
    a fresh process: first with an empty numba cache (a fresh install: the kernels compile), then with the cache
    the first run left (every later run). Returns {"cold": run_process's dict, "warm": ...}."""
    from ..hub import resolve

    image = resolve("segformer-b0-shapes") / "example_scene.png"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / "numba_cache"))
        command = [sys.executable, "-m", "mininp_segformer", "predict", str(image), "--model", "segformer-b0-shapes",
                   "--overlay", "--overlay-format", "png", "--out", str(Path(tmp) / "out"), "--threads",
                   str(threads), "-q"]
        return {run: run_process(command, env) for run in ("cold", "warm")}


_SLIDE_SNIPPET = """
import json, resource, time
import numpy as np
import mininp_segformer as ms
from mininp_segformer import inference
ms.set_num_threads({threads})
model = ms.load({model_dir!r})
rgb = np.random.default_rng(0).integers(0, 256, ({h}, {w}, 3), dtype=np.uint8)
crop, stride = inference.slide_geometry(model)
average = {average}
if {in_turn}:  # every window on all the threads, one after the other (before threads.map_one_thread_each)
    each = inference.map_one_thread_each
    inference.map_one_thread_each = lambda fn, items, on_done=None, workers=None: each(fn, items, on_done, workers=1)
inference.segment(rgb[:crop[0], :crop[1]], model, mode="slide", crop=crop)  # kernels loaded (or compiled) first
t = time.perf_counter()
bands = inference.slide_bands(model, rgb, crop, stride, argmax=True, average=average)
seg = inference.stack_bands(bands, rgb.shape[:2])
print(json.dumps({{"slide_seconds": time.perf_counter() - t, "windows": inference.window_count({h}, crop[0], stride[0])
                  * inference.window_count({w}, crop[1], stride[1]), "crop": crop, "stride": stride,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


SLIDE_VARIANTS = {  # name: (label, window average, windows one after the other)
    "numpy": ("NumPy average, in turn", "inference.window_average_numpy", True),  # the first slide mode
    "kernel": ("kernel average, in turn", "None", True),
    "each": ("kernel, a window a thread", "None", False),  # what segment runs
}


def slide_processes(model_dir: str, size, threads: int) -> dict:
    """`segment(photo, model, mode="slide")` with the default windows on a random `size = (H, W)` photo, in a fresh
    process each (`SLIDE_VARIANTS`): "numpy" averages the windows with `inference.window_average_numpy` (in NumPy, as
    before the kernel) and runs them one after the other, each on all the threads; "kernel" the same with
    `kernels.window_average`; "each" is what `segment` runs: the kernel, and the windows of a row side by side, one
    thread each (`threads.map_one_thread_each`). Each: seconds, windows, peak RSS."""
    runs = {}
    for name, (_, average, in_turn) in SLIDE_VARIANTS.items():
        code = _SLIDE_SNIPPET.format(threads=threads, model_dir=model_dir, h=size[0], w=size[1], average=average,
                                     in_turn=in_turn)
        r = run_process([sys.executable, "-c", code])
        runs[name] = r if "error" in r else json.loads(r["stdout"].strip().splitlines()[-1])
    return runs


# What the profile attributes time to. Components are the network's functions that the forward pass calls by name
# (wrapped in their modules while profiling); ops are the building blocks, timed through a wrapped `ops` namespace
# and labelled by the component they run in. Times are exclusive: a call's own time without its timed callees.
PROFILED_COMPONENTS = {
    ("nn.encoder", "overlap_patch_merging"): "patch merging",
    ("nn.encoder", "transformer_block"): "block",
    ("nn.encoder", "efficient_self_attention"): "attention",
    ("nn.attention", "spatial_reduction"): "spatial reduction",
    ("nn.encoder", "mix_ffn"): "Mix-FFN",
    ("model", "fused_decode_head"): "decoder, fused",
    ("model", "all_mlp_decode_head"): "decoder, literal",
}
PROFILE_LABELS = {  # (component, op; None: the component's own time) -> label
    ("patch merging", None): "patch merging conv (im2col + matmul)",
    ("patch merging", "conv2d"): "patch merging conv (im2col + matmul)",
    ("block", None): "residual adds and reshapes",
    ("attention", None): "attention head reshapes (and QK^T, AV in train mode)",
    ("attention", "linear"): "attention linears (q, k, v, out, reduction)",
    ("attention", "softmax"): "attention softmax",
    ("attention", "attention"): "attention QK^T, softmax and AV (ops.attention)",
    ("spatial reduction", None): "spatial-reduction tiling (reshape)",
    ("spatial reduction", "linear"): "attention linears (q, k, v, out, reduction)",
    ("Mix-FFN", None): "residual adds and reshapes",
    ("Mix-FFN", "linear"): "Mix-FFN linears",
    ("Mix-FFN", "depthwise_conv3x3_gelu"): "Mix-FFN depthwise conv + GELU",
    ("decoder, fused", None): "decoder, fused (products, upsample-add, classifier)",
    ("decoder, literal", None): "decoder, literal (Eq. 4 as written)",
}


def _label(component: str | None, op: str | None) -> str:
    if op == "layer_norm":
        return "LayerNorm"
    return PROFILE_LABELS.get((component, op)) or PROFILE_LABELS.get((component, None)) or "other (model glue)"


def exclusive_profile(step, patches: dict, model, label, glue: str, repeats: int) -> list[tuple[str, float]]:
    """Where `step()`'s time goes, largest first: the median over `repeats` runs (after one warm-up) of each label's
    exclusive time -- a call's own time without its timed callees.

    Timed: each function `patches` names ({(module, name): component}, replaced in its module while profiling) and
    each op of `model.ops`. A call is labelled `label(component, op)`: its own component, or for an op the innermost
    component it runs in, and the op's name (None for a component's own time). What no timed call covers is `glue`.
    """
    import types

    totals: dict[str, list[float]] = {}
    run: dict[str, float] = {}  # this pass's exclusive times
    open_calls: list[list] = []  # [component, time spent in timed callees] of each call in progress

    def timed(fn, component=None, op=None):
        def wrapper(*args, **kwargs):
            inside = component or (open_calls[-1][0] if open_calls else None)
            open_calls.append([inside, 0.0])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                _, children = open_calls.pop()
                name = label(inside, op)
                run[name] = run.get(name, 0.0) + elapsed - children
                if open_calls:
                    open_calls[-1][1] += elapsed
        return wrapper

    originals = {(mod, name): getattr(mod, name) for mod, name in patches}
    for (mod, name), component in patches.items():
        setattr(mod, name, timed(originals[mod, name], component=component))
    ops = model.ops
    model.ops = types.SimpleNamespace(**{name: timed(fn, op=name) for name, fn in vars(ops).items()
                                         if callable(fn) and not name.startswith("_")})
    try:
        step()  # warm-up
        for _ in range(repeats):
            run.clear()
            t = time.perf_counter()
            step()
            run[glue] = run.get(glue, 0.0) + time.perf_counter() - t - sum(run.values())
            for name, sec in run.items():
                totals.setdefault(name, []).append(sec)
    finally:
        model.ops = ops
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
    return sorted(((name, statistics.median(v)) for name, v in totals.items()), key=lambda kv: -kv[1])


def profile(model, x, repeats: int = 3) -> list[tuple[str, float]]:
    """The exclusive time of each labelled op in one forward pass (median of `repeats`), largest first."""
    import importlib

    patches = {(importlib.import_module(f"mininp_segformer.{mod_name}"), fn_name): component
               for (mod_name, fn_name), component in PROFILED_COMPONENTS.items()}
    return exclusive_profile(lambda: model(x), patches, model, _label, "other (model glue)", repeats)


def format_profile(rows, macs: dict[str, int], title: str) -> str:
    total = sum(sec for _, sec in rows)
    lines = [title, f"{'op':<52}{'ms':>8}{'share':>8}"]
    lines += [f"{label:<52}{sec * 1e3:>8.1f}{100 * sec / total:>7.1f}%" for label, sec in rows]
    lines.append(f"{'total':<52}{total * 1e3:>8.1f}   ({2 * sum(macs.values()) / total / 1e9:.0f} GFLOP/s on the "
                 f"{2 * sum(macs.values()) / 1e9:.1f} GFLOP it computes)")
    return "\n".join(lines)


def prepare_model(args, tmp: Path) -> tuple[str, object]:
    """The checkpoint directory to benchmark and its config: --model, or random weights for --variant."""
    from ..config import SegformerConfig, variant_config
    from ..weights import random_state_dict, save_checkpoint

    if args.model:
        from ..hub import resolve

        directory = resolve(args.model)
        return str(directory), SegformerConfig.from_json(directory / "config.json")
    config = variant_config(args.variant, num_labels=args.num_labels)
    directory = save_checkpoint(tmp / f"random-{args.variant}", config, random_state_dict(config, seed=0))
    return str(directory), config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mininp_segformer.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory or Hub name (default: random weights of --variant)")
    p.add_argument("--variant", default="b0", choices=["b0", "b1", "b2", "b3", "b4", "b5"])
    p.add_argument("--num-labels", type=int, default=150)
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every framework (default: all)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per framework (default 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--quick", action="store_true", help="only the timed runs: no predict() memory, no cold start")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="instead: where mininp_segformer's time goes, op by op (--decoder to pick the head)")
    p.add_argument("--decoder", default="fused", choices=["fused", "literal"], help="with --profile")
    p.add_argument("--train", action="store_true", help="time one training step instead (tools/bench_train.py)")
    p.add_argument("--batch", type=int, default=2, help="with --train: the batch size (default 2)")
    p.add_argument("--cold-start", action="store_true",
                   help="instead: the README's first command in fresh processes, with an empty numba cache and again")
    p.add_argument("--cpu", default="native", choices=["native", "avx2"],
                   help="avx2: run everything (every framework, all its processes) with AVX-512 hidden, on the code "
                        "paths of an AVX2 machine (tools/avx2.py; Linux x86-64 with cpuid faulting and a C compiler)")
    p.add_argument("--slide", type=int, nargs=2, metavar=("H", "W"),
                   help="instead: slide mode on an H x W photo (e.g. 4000 6000): the window average in NumPy and in "
                        "its kernel, the windows in turn and a window a thread")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu == "avx2" and not avx2.is_x86_64():
        parser.error(f"--cpu avx2: AVX2 is an x86-64 instruction set; this machine is {platform.machine()}")
    if args.cpu == "avx2" and avx2.cpu_features().get("avx512f"):  # AVX-512 to hide: run again in a process that
        if avx2.preloaded():                                            # sees none (its children inherit that)
            parser.error("--cpu avx2: AVX-512 is still visible in a process started to hide it")
        try:
            env = avx2.environment()
        except MachineError as e:
            parser.error(f"--cpu avx2: {e}")
        argv = sys.argv[1:] if argv is None else list(argv)
        status = subprocess.call([sys.executable, "-m", "mininp_segformer.tools.bench", *argv], env=env)
        return status if status >= 0 else 128 - status  # killed by a signal: the shell's 128 + its number
    if args.train:
        from .bench_train import format_train_report, run_train_benchmark, run_train_profile

        print(run_train_profile(args) if args.profile else format_train_report(run_train_benchmark(args)))
        return 0
    if args.profile:
        print(run_profile(args))
        return 0
    if args.cold_start:
        print(format_cold_start(cold_start(args.threads), args.threads))
        return 0
    if args.slide:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, _ = prepare_model(args, Path(tmp))
            print(format_slide(slide_processes(model_dir, args.slide, args.threads), args))
        return 0
    report = run_benchmark(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def random_input(config, size) -> np.ndarray:
    """The benchmark's input: `(1, channels, H, W)` float32 pixel values, the same in every run."""
    return np.random.default_rng(0).standard_normal((1, config.num_channels, *size)).astype(np.float32)


def run_profile(args) -> str:
    """--profile: the table of where mininp_segformer's time goes (`profile`, `format_profile`)."""
    from .. import load, set_num_threads
    from .flops import count_macs

    set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, config = prepare_model(args, Path(tmp))
        model = load(model_dir)
    model.decoder = args.decoder
    h, w = args.size
    title = f"{args.model or args.variant} at {h} x {w}, {args.threads} thread(s), {args.decoder} decoder; {machine()}"
    return format_profile(profile(model, random_input(config, args.size)),
                          count_macs(config, h, w, decoder=args.decoder), title)


def run_benchmark(args) -> dict:
    """Time every installed framework of --frameworks (and, unless --quick, its predict() process); the report."""
    from .flops import count_macs

    frameworks = [fw for fw in args.frameworks if available(fw)]
    skipped = sorted(set(args.frameworks) - set(frameworks))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, config = prepare_model(args, Path(tmp))
        onnx_path = _onnx_model(frameworks, skipped, model_dir, args.size, Path(tmp))
        results = time_frameworks(frameworks, model_dir, onnx_path, args.threads, random_input(config, args.size),
                                  args.runs, args.warmup)
        if not args.quick:
            _measure_predict(results, model_dir, onnx_path, args.threads)
    h, w = args.size
    macs = {d: sum(count_macs(config, h, w, decoder=d).values()) for d in ("literal", "fused")}
    return {"machine": machine(), "variant": args.model or args.variant, "size": [h, w], "threads": args.threads,
            "runs": args.runs, "warmup": args.warmup, "gmac_literal": macs["literal"] / 1e9,
            "gmac_fused": macs["fused"] / 1e9, "results": results, "skipped": skipped}


def _onnx_model(frameworks: list, skipped: list, model_dir: str, size, tmp: Path) -> str | None:
    """The ONNX export ONNX Runtime runs, when it is among `frameworks`; without torch to export it, ONNX Runtime
    moves from `frameworks` to `skipped`."""
    if "onnxruntime" not in frameworks:
        return None
    if available("torch"):
        return str(export_onnx(model_dir, size, tmp / "model.onnx"))
    frameworks.remove("onnxruntime")
    skipped.append("onnxruntime (exporting the model needs torch)")
    return None


def _measure_predict(results: dict, model_dir: str, onnx_path: str | None, threads: int) -> None:
    """Add each framework's `predict_process` and mininp_segformer's cold start (numba cache warm) to `results`."""
    for fw in results:
        results[fw]["predict_process"] = predict_process(fw, model_dir, onnx_path, threads)
    if "mininp_segformer" in results:
        predict_process("mininp_segformer", model_dir, None, threads)  # warms the numba cache
        results["mininp_segformer"]["cold_start"] = predict_process("mininp_segformer", model_dir, None, threads)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the code paths: AVX-512, AVX2 or AVX-512 hidden (--cpu avx2); the variables that move OpenBLAS's and numba's
    paths = ", ".join([avx2.simd_level()] + [f"{v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "NUMBA_CPU_NAME")
                                              if os.environ.get(v)])
    return f"{cpu} ({paths}), {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def format_cold_start(runs: dict, threads: int) -> str:
    lines = [f"The README's first command in a fresh process, {threads} thread(s); {machine()}",
             f"{'numba cache':<40}{'wall s':>8}{'CPU s':>8}"]
    for run, label in (("cold", "empty (first run after an install)"), ("warm", "as the first run left it")):
        r = runs[run]
        lines.append(f"{label:<40}" + (r["error"] if "error" in r else f"{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}"))
    return "\n".join(lines)


def format_slide(runs: dict, args) -> str:
    ok = {name: r for name, r in runs.items() if "error" not in r}
    first = next(iter(ok.values()), {})
    lines = [f"slide mode on a {args.slide[0]} x {args.slide[1]} photo, {args.model or args.variant} "
             f"({args.num_labels} labels), crop {first.get('crop')} stride {first.get('stride')}, "
             f"{first.get('windows')} windows, {args.threads} thread(s); {machine()}",
             f"{'windows':<28}{'seconds':>9}{'s/window':>10}{'peak RSS':>10}{'speed-up':>10}"]
    for name, (label, _, _) in SLIDE_VARIANTS.items():
        r = runs[name]
        if "error" in r:
            lines.append(f"{label:<28}{r['error']}")
            continue
        ratio = (f"{runs['numpy']['slide_seconds'] / r['slide_seconds']:.2f}x"
                 if name != "numpy" and "numpy" in ok else "")
        lines.append(f"{label:<28}{r['slide_seconds']:>9.1f}{r['slide_seconds'] / r['windows']:>10.3f}"
                     f"{r['peak_rss_mb']:>7.0f} MB{ratio:>10}")
    return "\n".join(lines)


def format_report(r: dict) -> str:
    gflop = 2 * r["gmac_literal"]
    lines = [
        f"{r['variant']} at {r['size'][0]} x {r['size'][1]}, batch 1, {r['threads']} threads; {r['machine']}",
        f"model: {r['gmac_literal']:.2f} GMAC = {gflop:.1f} GFLOP as written; mininp_segformer's fused decoder "
        f"computes {r['gmac_fused']:.2f} GMAC",
        f"{r['runs']} timed runs each after {r['warmup']} warm-up, alternating between the frameworks",
        "",
        f"{'framework':<18}{'median ms':>10}{'ratio':>8}{'GFLOP/s':>9}{'peak RSS':>10}  version",
    ]
    res = r["results"]
    ours = res.get("mininp_segformer", {}).get("median_s")
    for fw, v in res.items():
        ratio = f"{ours / v['median_s']:.2f}x" if ours and fw != "mininp_segformer" else ""
        lines.append(f"{fw:<18}{v['median_s'] * 1e3:>10.1f}{ratio:>8}{gflop / v['median_s']:>9.1f}"
                     f"{v['peak_rss_mb']:>8.0f} MB  {v['version']}")
    if ours:
        lines.append("(ratio = mininp_segformer's median / the framework's: below 1 means mininp_segformer is faster)")
    preds = {fw: v["predict_process"] for fw, v in res.items() if "predict_process" in v}
    if preds:
        lines += ["", "one predict() on a 512 x 512 image in a fresh process (import + load + run):"]
        for fw, pr in preds.items():
            lines.append(f"  {fw:<18}" + (f"peak RSS {pr['peak_rss_mb']:.0f} MB, {pr['seconds']:.2f} s"
                                          if "error" not in pr else pr["error"]))
    cold = res.get("mininp_segformer", {}).get("cold_start")
    if cold and "error" not in cold:
        lines.append(f"  cold start of mininp_segformer, numba cache warm: {cold['seconds']:.2f} s")
    if r["skipped"]:
        lines.append(f"not installed, left out: {', '.join(r['skipped'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
