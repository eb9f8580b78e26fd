"""The `mininp-segformer` command (also `python -m mininp_segformer`).

    mininp-segformer predict photo.jpg photos/ --out seg/ --overlay      # label-map PNGs (+ overlays) per image
    mininp-segformer predict drone.jpg --mode slide --crop 512 --stride 512
    mininp-segformer models                                               # known checkpoints; cached, bundled
    mininp-segformer download nvidia/segformer-b0-finetuned-ade-512-512
    mininp-segformer info nvidia/segformer-b0-finetuned-ade-512-512 --size 512 512
    mininp-segformer evaluate seg/ annotations/ --num-labels 150 --reduce-labels
    mininp-segformer train --model segformer-b0-shapes --data shapes/ --labels labels.json --out runs/shapes
    mininp-segformer bench ...                                            # mininp_segformer.tools.bench, if installed

Exit codes: 0 success; 1 a runtime failure (also when some of many images failed -- the others' outputs are
kept); 2 a usage error. Errors go to stderr as one line each; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tempfile
import traceback
from pathlib import Path

from tqdm import tqdm

PROG = "mininp-segformer"
DEMO_MODEL = "segformer-b0-shapes"


class UsageError(Exception):
    """Options that do not fit together: exit status 2."""


class CommandError(Exception):
    """A runtime failure with a message meant for the user: exit status 1."""


def one_line(error: BaseException) -> str:
    """An exception as a single line: its message with newlines folded (unexpected kinds keep their type name)."""
    from .batch import one_line as fold

    return fold(error, expected=(ValueError, OSError, UsageError, CommandError))


# ---------------------------------------------------------------------------------------------------------------
# predict


def expand_inputs(inputs, recursive: bool, exclude: Path | None = None):
    """Paths and directories -> ([(path, output stem)], number of non-image files skipped in directories).

    A directory contributes its image files (by suffix, hidden files left out; with `recursive` also those below,
    their sub-directories mirrored in the stems); files inside `exclude` (the output directory) are skipped. A
    path given by name is always tried, whatever its suffix.
    """
    from .batch import IMAGE_SUFFIXES

    items, skipped = [], 0
    for arg in inputs:
        path = Path(arg)
        if not path.is_dir():
            items.append((path, path.stem))
            continue
        found = sorted(path.rglob("*") if recursive else path.iterdir())
        for f in found:
            if not f.is_file() or (exclude is not None and exclude in f.resolve().parents):
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                items.append((f, f.relative_to(path).with_suffix("").as_posix()))
            else:
                skipped += 1
    return items, skipped


def _check_outputs(items, out_dir: Path, overlay_format):
    """Usage errors for two inputs writing the same output, an output that would overwrite an input, or one that
    would land outside the output directory."""
    from .batch import output_paths
    from ..errors import SegformerError

    seen, inputs = {}, {p.resolve() for p, _ in items}
    for path, stem in items:
        try:
            outputs = output_paths(stem, out_dir, overlay_format)
        except SegformerError as e:
            raise UsageError(str(e)) from None
        for out in outputs.values():
            key = out.resolve()
            if key in seen:
                raise UsageError(f"{seen[key]} and {path} would both be written to {out}; segment them into "
                                 "different --out directories")
            if key in inputs:
                raise UsageError(f"the output {out} would overwrite the input image {path}; choose another --out")
            seen[key] = path


def _prepare_out_dir(out_dir: Path) -> None:
    """Create the output directory and prove that a file can be written there (runtime error otherwise)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OSError(f"cannot write to the output directory {out_dir}: {e.strerror or e}") from None


def _segment_options(args) -> dict:
    options = {"mode": args.mode, "resize": args.resize, "tta": args.tta, "flip": not args.no_flip}
    if args.mode == "slide":
        options.update(crop=args.crop, stride=args.stride)
    if args.scales is not None:
        options["scales"] = args.scales
    return options


def _check_predict_args(args) -> None:
    """Usage errors that need no model: options that do not fit together."""
    from .viz import palette_for

    if args.mode == "whole" and (args.crop is not None or args.stride is not None):
        raise UsageError("--crop and --stride apply to --mode slide")
    if args.scales is not None and not args.tta:
        raise UsageError("--scales applies with --tta")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.palette is not None:
        try:
            args.palette = int(args.palette)  # a number of colours, else a name
        except ValueError:
            pass
        try:
            palette_for(args.palette)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--palette: {e}") from None


def _check_model_args(args, model) -> None:
    """Usage errors that depend on the model: its head, the crop it can take, the palette's length."""
    from ..inference import slide_geometry
    from .viz import as_palette
    from ..weights import SEMANTIC

    if model.head != SEMANTIC:
        raise UsageError(f"predict needs a semantic-segmentation checkpoint; {args.model} is {model.head}")
    try:
        if args.mode == "slide":
            slide_geometry(model, args.crop, args.stride)
        if args.palette is not None:
            as_palette(args.palette, model.config.num_labels)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _set_limits(threads: int | None, max_memory: int | float | None, max_pixels: int | None) -> None:
    """This process's threads and limits: in the command's own process, and in each worker of --jobs."""
    from PIL import Image

    from .. import set_num_threads
    from ..memory import set_max_memory

    if threads:
        set_num_threads(threads)
    if max_memory is not None:
        set_max_memory(max_memory)
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels  # what preprocessing.open_image_file checks against


class _Progress:
    """Images done: tqdm's bar on a terminal, one plain line per image elsewhere (logs, pipes), only errors when
    `quiet`. Messages go above the bar."""

    def __init__(self, total: int, stream, quiet: bool):
        self.total, self.done, self.stream, self.quiet = total, 0, stream, quiet
        self.bar = tqdm(total=total, unit="image", mininterval=0.1, miniters=0, file=stream,
                        disable=True if quiet else None)  # miniters=0: `windows` may redraw (update(0))

    def windows(self, done: int, total: int) -> None:
        """Progress within the current image (sliding windows, TTA runs), redrawn at most ten times a second."""
        self.bar.set_postfix_str(f"current image: {done}/{total} network runs", refresh=False)
        self.bar.update(0)

    def finished(self, result: dict) -> None:
        self.done += 1
        self.bar.set_postfix_str("", refresh=False)
        self.bar.update(1)
        if "error" in result:
            self.message(f"{PROG}: {result['image']}: {result['error']}")
            if result.get("traceback"):
                self.message(result["traceback"].rstrip())
        elif self.bar.disable and not self.quiet:
            self.message(f"[{self.done}/{self.total}] {result['image']} -> {result['label_map']} "
                         f"({result['seconds']:.1f} s)")

    def message(self, line: str) -> None:
        tqdm.write(line, file=self.stream)  # clears the bar, writes the line, redraws the bar below it
        self.stream.flush()

    def close(self) -> None:
        self.bar.close()


def _run_all(items, args, model, directory, options, progress: _Progress) -> list[dict]:
    """Segment every item, in this process (--jobs 1) or in a pool of processes each loading the model once."""
    from .batch import segment_file_or_error

    common = dict(out_dir=Path(args.out), overlay_format=args.overlay_format if args.overlay else None,
                  alpha=args.alpha, palette=args.palette, revision=args.revision, debug=args.debug, **options)
    jobs = args.jobs or os.cpu_count() or 1
    if jobs == 1 or len(items) == 1:
        results = []
        for path, stem in items:
            results.append(segment_file_or_error(path, model=model, stem=stem, progress=progress.windows, **common))
            progress.finished(results[-1])
        return results
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    results = []
    context = multiprocessing.get_context("spawn")  # numba's threads and fork do not mix
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(items)), mp_context=context, initializer=_set_limits,
                                                initargs=(threads, args.max_memory, args.max_pixels)) as pool:
        futures = {pool.submit(segment_file_or_error, path, model=os.fspath(directory), stem=stem, **common): path
                   for path, stem in items}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    result = {"image": os.fspath(futures[future]),
                              "error": "a worker process died (out of memory?); try fewer --jobs"}
                results.append(result)
                progress.finished(result)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # drop what has not started; the workers got ^C too
            raise
    return results


def cmd_predict(args) -> int:
    from ..hub import resolve
    from ..model import load

    _check_predict_args(args)
    out_dir = Path(args.out)
    overlay_format = args.overlay_format if args.overlay else None
    items, skipped = expand_inputs(args.inputs, args.recursive, exclude=out_dir.resolve())
    if not items:
        raise CommandError(f"no image files found in {', '.join(args.inputs)}"
                           + (f" ({skipped} other files skipped)" if skipped else ""))
    _check_outputs(items, out_dir, overlay_format)
    _set_limits(args.threads, args.max_memory, args.max_pixels)
    try:
        directory = resolve(args.model, revision=args.revision)  # the workers of --jobs load this directory
        model = load(directory)
    except (ValueError, OSError) as e:
        hint = f" (the bundled demo model works offline: --model {DEMO_MODEL})" if args.model_is_default else ""
        raise CommandError(one_line(e) + hint) from None
    _check_model_args(args, model)
    _prepare_out_dir(out_dir)
    progress = _Progress(len(items), sys.stderr, args.quiet)
    if skipped and not args.quiet:
        progress.message(f"{PROG}: skipped {skipped} non-image file(s) in the input directories")
    try:
        results = _run_all(items, args, model, directory, _segment_options(args), progress)
    finally:
        progress.close()
    failed = [r for r in results if "error" in r]
    if not args.quiet:
        print(f"{PROG}: segmented {len(results) - len(failed)} of {len(results)} image(s) into {out_dir}"
              + (f"; {len(failed)} failed (see above)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# models, download, info, evaluate, bench


def cmd_models(args) -> int:
    from ..hub import KNOWN_CHECKPOINTS, bundled_models, cached_models

    cached = {}
    entries = cached_models()
    for c in entries:
        cached.setdefault(c.name, []).append(f"{c.revision}{'' if c.complete else ' (incomplete)'}")
    bundled = set(bundled_models())
    rows = [("NAME", "TASK", "LABELS", "INPUT", "STATUS")]
    for name, info in KNOWN_CHECKPOINTS.items():
        status = "bundled" if name in bundled else ("cached: " + ", ".join(cached[name]) if name in cached else "-")
        if info["bundled"] and name not in bundled:
            status = "not in this installation"
        size = "x".join(map(str, info["input_size"])) if info["input_size"] else "-"
        rows.append((name, info["task"], str(info["num_labels"] or "-"), size, status))
    for name in sorted(set(cached) - set(KNOWN_CHECKPOINTS)):
        rows.append((name, "?", "?", "?", "cached: " + ", ".join(cached[name])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    incomplete = [str(c.path) for c in entries if not c.complete]
    if incomplete:
        print("\nIncomplete or damaged (downloaded again on next use, or delete them):\n  " + "\n  ".join(incomplete))
    return 0


def cmd_download(args) -> int:
    from ..errors import CheckpointError
    from ..hub import bundled_models, check_hub_name, check_revision, resolve

    if args.name not in bundled_models():  # a bundled model's name prints its directory
        try:  # before anything touches the disk: the name becomes a cache directory
            check_hub_name(args.name)
            check_revision(args.revision)
        except CheckpointError as e:
            raise UsageError(f"{e} (download takes a Hub name; a local directory needs no download)") from None
    print(resolve(args.name, revision=args.revision))
    return 0


def _describe_model(name: str, revision: str):
    """(config, head, image size, source) of a checkpoint or of a variant name b0..b5."""
    from ..config import VARIANTS, variant_config
    from ..weights import SEMANTIC

    if name.lower() in VARIANTS:
        return (variant_config(name.lower()), SEMANTIC, (512, 512),
                f"MiT-{name.upper()} variant (150 generic labels, no weights)")
    from ..model import load

    model = load(name, revision=revision)
    return model.config, model.head, model.image_size, str(name)


def cmd_info(args) -> int:
    from ..errors import ImageError
    from .flops import count_macs, summarize
    from ..weights import SEMANTIC, count_parameters

    config, head, image_size, source = _describe_model(args.name, args.revision)
    h, w = args.size or image_size
    labels = [config.id2label[i].strip() for i in range(min(config.num_labels, 8))]
    more = f", ... ({config.num_labels} in all)" if config.num_labels > 8 else ""
    lines = [
        f"model:        {source}",
        f"head:         {head}",
        f"encoder:      hidden sizes {list(config.hidden_sizes)}, depths {list(config.depths)}, heads "
        f"{list(config.num_attention_heads)}, sr ratios {list(config.sr_ratios)}",
        f"decoder:      hidden size {config.decoder_hidden_size}",
        f"labels:       {', '.join(labels)}{more}",
        f"input size:   {image_size[0]} x {image_size[1]}",
        f"parameters:   {count_parameters(config, head):,}",
    ]
    decoders = ("fused", "literal") if head == SEMANTIC else (None,)
    for decoder in decoders:
        try:
            macs = count_macs(config, h, w, decoder=decoder)
        except ImageError as e:  # --size below the model's minimum input
            raise UsageError(f"--size {h} {w}: {e}") from None
        s = summarize(macs)
        label = f"{decoder} decoder" if decoder else "encoder only"
        lines.append(f"MACs at {h} x {w} ({label}): {s['total'] / 1e9:.3f} G (encoder {s['encoder'] / 1e9:.3f} G, "
                     f"decoder {s['decoder'] / 1e9:.3f} G)")
        lines += [f"    {part:<32} {n / 1e9:8.3f} G" for part, n in macs.items()]
    print("\n".join(lines))
    return 0


def cmd_evaluate(args) -> int:
    from .batch import IMAGE_SUFFIXES
    from .metrics import evaluate
    from .viz import dataset_palettes

    preds = {p.stem: p for p in sorted(Path(args.predictions).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in sorted(Path(args.labels).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    common = sorted(set(preds) & set(labels))
    if not common:
        raise CommandError(f"no prediction in {args.predictions} has a label map of the same name in {args.labels}")
    missing = sorted(set(labels) - set(preds))
    if missing:
        print(f"{PROG}: {len(missing)} label map(s) have no prediction, e.g. {missing[0]}; scoring the "
              f"{len(common)} pairs", file=sys.stderr)
    scores = evaluate((preds[k] for k in common), (labels[k] for k in common), args.num_labels,
                      ignore_index=args.ignore_index, reduce_labels=args.reduce_labels)
    names = next((d["id2label"] for d in dataset_palettes().values() if d["num_labels"] == args.num_labels), {})
    print(f"images: {len(common)}\nmean IoU: {scores['mean_iou']:.4f}\npixel accuracy: "
          f"{scores['pixel_accuracy']:.4f}\nmean accuracy: {scores['mean_accuracy']:.4f}")
    for i, (iou, acc) in enumerate(zip(scores["per_class_iou"], scores["per_class_accuracy"])):
        if iou == iou:  # not NaN: the class occurs somewhere
            print(f"  {i:>3} {names.get(str(i), '').strip():<20} IoU {iou:.4f}  acc {acc:.4f}")
    if args.json:
        data = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in scores.items()}
        Path(args.json).write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    return 0


def cmd_bench(args) -> int:
    try:
        from . import bench
    except ImportError as e:
        if getattr(e, "name", None) != f"{__package__}.bench":
            raise
        raise CommandError("the benchmark (mininp_segformer/bench.py) is not part of this installation") from None
    return int(bench.main(args.args) or 0)


# ---------------------------------------------------------------------------------------------------------------
# train


def train_settings(args):
    """TrainSettings from the options given; with --resume, the options not given are the checkpoint's."""
    from ..training.trainer import TrainSettings, checkpoint_settings

    given = {k: getattr(args, k) for k in ("steps", "batch_size", "crop", "lr", "weight_decay", "warmup_steps",
                                            "max_grad_norm", "seed", "eval_every", "save_every")
             if getattr(args, k) is not None}
    if args.no_augment:
        given["augment"] = False
    saved = checkpoint_settings(args.resume) if args.resume else {}
    return TrainSettings(**{**saved, **given})


def train_data(args, labels):
    """(train, validation or None): the dataset's validation split (mmseg's layout) or --holdout samples of it."""
    from ..training.data import check_dataset, holdout, open_dataset

    train_set = open_dataset(args.data, "train", labels=labels, reduce_labels=args.reduce_labels)
    if (Path(args.data) / "images" / "validation").is_dir():  # mmseg's layout
        validation = open_dataset(args.data, "validation", labels=labels, reduce_labels=args.reduce_labels)
    else:
        count = args.holdout if args.holdout is not None else max(1, len(train_set) // 10)
        validation = None
        if count and len(train_set) > 1:
            train_set, validation = holdout(train_set, min(count, len(train_set) - 1), seed=0)
    for part in (train_set, validation) if validation is not None else (train_set,):
        with tqdm(total=len(part), desc=f"checking the {part.split} set", unit="img", disable=args.quiet,
                  leave=False) as bar:
            check_dataset(part, progress=lambda i: bar.update())
    return train_set, validation


def cmd_train(args) -> int:
    import warnings

    from ..model import load
    from ..threads import set_num_threads
    from ..training.data import Labels, read_labels
    from ..training.trainer import check_resume, dataset_batches, dataset_samples, train

    settings = train_settings(args)
    if args.threads:
        set_num_threads(args.threads)
    labels = read_labels(args.labels) if args.labels else None
    with warnings.catch_warnings(record=True) as caught:  # the surgery's one line, shown as a message
        warnings.simplefilter("always")
        model = load(args.model, revision=args.revision, head="semantic", seed=settings.seed,
                     id2label=labels.id2label if labels else None)
    log = (lambda line: None) if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    for w in caught:
        log(str(w.message))
    if args.resume:
        check_resume(args.resume, model, settings)  # before the data check, which can take minutes
    train_set, validation = train_data(args, labels or Labels(model.id2label))
    log(f"training {model} on {len(train_set)} images ({args.data}), validating on "
        f"{len(validation) if validation is not None else 0}; {settings.steps} steps of {settings.batch_size} "
        f"crops of {settings.crop} px, lr {settings.lr}")
    result = train(model, dataset_batches(train_set, settings), settings, args.out,
                   validation=dataset_samples(validation) if validation is not None else None, resume=args.resume,
                   progress=not args.quiet, log=log)
    score = "" if result.eval_mean_iou != result.eval_mean_iou else f"; validation mIoU {result.eval_mean_iou:.4f}"
    print(f"saved the model to {args.out}{score}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parser


def _positive(convert, zero_ok: bool = False):
    """An argparse type: `convert` (int or float) of the text, which must be > 0 (>= 0 if `zero_ok`)."""
    what, bound = ("a whole number", f"at least {int(not zero_ok)}") if convert is int else ("a number", "positive")

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= 0 if zero_ok else value > 0):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _checked(convert):
    """An argparse type: `convert(text)`, whose ValueError becomes the usage error's message."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: the message, and where the usage is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="SegFormer in pure NumPy: segment, inspect and score.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(sub)
    _add_checkpoint_commands(sub)
    _add_evaluate(sub)
    _add_train(sub)
    sub.add_parser("bench", help="the speed benchmark (mininp_segformer.tools.bench; its options follow)")
    return parser


def _add_revision(p: argparse.ArgumentParser) -> None:
    """The option of every command that names a checkpoint: which Hub revision to take."""
    p.add_argument("--revision", default="main", help="Hub revision (branch, tag or commit; default main)")


def _add_predict(sub) -> None:
    from ..model import DEFAULT_MODEL

    p = sub.add_parser("predict", help="segment images; write palette PNG label maps (and overlays)",
                       description="Segment images and write one palette PNG label map per image (the image's "
                                   "size; pixel values are class ids), optionally a blended overlay.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--model", default=None,
                   help=f"a checkpoint directory, bundled model or Hub name (default {DEFAULT_MODEL}, downloaded "
                        f"once; the bundled offline demo: {DEMO_MODEL})")
    _add_revision(p)
    p.add_argument("--out", default="segmentations", help="output directory (default ./segmentations)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.jpg, the classes over the photo")
    p.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours (0..1, default 0.5)")
    p.add_argument("--palette", default=None, help="ade20k or cityscapes (default: by the model's number of labels)")
    _add_inference_options(p)
    _add_limit_options(p)
    p.add_argument("-r", "--recursive", action="store_true", help="also segment images in sub-directories")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")
    p.set_defaults(func=cmd_predict)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """predict's options of `inference.segment`: mode, windows, resizing, test-time augmentation."""
    from ..inference import MODES, RESIZE_MODES, TTA_SCALES, check_scales

    p.add_argument("--mode", choices=MODES, default="whole", help="whole image at once, or sliding windows")
    p.add_argument("--crop", type=_positive(int), default=None, help="slide window size (default: the model's input)")
    p.add_argument("--stride", type=_positive(int), default=None, help="slide step (default: 2/3 of the crop)")
    p.add_argument("--resize", choices=RESIZE_MODES, default=None,
                   help="hf: stretch to the model's input (default for whole); mmseg: keep the aspect ratio within "
                        "(2048, input), sides a multiple of 32; none: the image's own size (default for slide)")
    p.add_argument("--tta", action="store_true", help="average over scales and horizontal flips")
    p.add_argument("--scales", type=_checked(lambda text: check_scales([text])[0]), nargs="+", default=None,
                   help=f"TTA scale ratios (default {' '.join(map(str, TTA_SCALES))})")
    p.add_argument("--no-flip", action="store_true", help="TTA without the mirrored images")


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """predict's options of the resources it may take: threads, processes, memory, image size."""
    from ..memory import MEMORY_ENV, parse_size

    p.add_argument("--threads", type=_positive(int), default=None, help="threads per process (numba and BLAS)")
    p.add_argument("--jobs", type=_positive(int, zero_ok=True), default=1,
                   help="processes (default 1; 0: one per core)")
    p.add_argument("--max-memory", type=_checked(parse_size), default=None, metavar="SIZE",
                   help=f"refuse images whose inference would need more, e.g. 8G or none (default: the memory "
                        f"available, or ${MEMORY_ENV})")
    p.add_argument("--max-pixels", type=_positive(int), default=None, metavar="N",
                   help="refuse image files of more pixels, a guard against decompression bombs (default: Pillow's "
                        "89,478,485)")


def _add_checkpoint_commands(sub) -> None:
    """models, download and info: the commands about checkpoints rather than images."""
    p = sub.add_parser("models", help="list the known checkpoints and which are cached or bundled")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="download a Hub checkpoint into the cache; print its directory")
    p.add_argument("name")
    _add_revision(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("info", help="config summary, parameter count and MACs of a checkpoint (or b0..b5)")
    p.add_argument("name", metavar="DIR|NAME")
    _add_revision(p)
    p.add_argument("--size", type=_positive(int), nargs=2, metavar=("H", "W"), default=None,
                   help="input size for the MAC count (default: the model's input size)")
    p.set_defaults(func=cmd_info)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="mean IoU of predicted label maps against annotations (matched by name)")
    p.add_argument("predictions", metavar="PRED_DIR")
    p.add_argument("labels", metavar="LABEL_DIR")
    p.add_argument("--num-labels", type=_positive(int), required=True)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--reduce-labels", action="store_true", help="ADE20K annotations: 0 = ignore, v -> v - 1")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.set_defaults(func=cmd_evaluate)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune or train a model on a folder of images and masks",
                       description="Train a SegFormer on DIR/images + DIR/annotations (or mmseg's layout) with "
                                   "AdamW and NVlabs' poly schedule; write the model to --out in the Hugging Face "
                                   "layout, with checkpoints in --out/checkpoint-STEP/. See docs/fine_tuning.md.")
    p.add_argument("--model", required=True,
                   help=f"where to start: a checkpoint directory, bundled model ({DEMO_MODEL}) or Hub name (e.g. "
                        "nvidia/mit-b0: an ImageNet encoder, given a fresh decode head)")
    _add_revision(p)
    p.add_argument("--data", required=True, metavar="DIR", help="DIR/images/* with DIR/annotations/*.png")
    p.add_argument("--labels", metavar="FILE",
                   help="the class names: a JSON id2label or a CSV name,r,g,b (colour masks); a new label set gets "
                        "a fresh decode head (default: the model's labels)")
    p.add_argument("--reduce-labels", action="store_true", help="ADE20K annotations: 0 = ignore, v -> v - 1")
    p.add_argument("--holdout", type=_positive(int, zero_ok=True), default=None, metavar="N",
                   help="validation images drawn from a one-split dataset (default: 10%%; 0: no validation)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the model and the checkpoints go")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint-STEP folder (or --out's latest); options not given are its own")
    p.add_argument("--steps", type=_positive(int), default=None, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=_positive(int), default=None, help="images per step (default 8)")
    p.add_argument("--crop", type=_positive(int), default=None, help="side of the square training crops (default 512)")
    p.add_argument("--lr", type=_positive(float), default=None,
                   help="AdamW learning rate (default 6e-5; the decode head gets 10x)")
    p.add_argument("--weight-decay", type=_positive(float, zero_ok=True), default=None, help="default 0.01")
    p.add_argument("--warmup-steps", type=_positive(int, zero_ok=True), default=None,
                   help="linear warmup (default 0)")
    p.add_argument("--max-grad-norm", type=_positive(float), default=None,
                   help="clip the gradients' global norm (HF Trainer's 1.0; default: no clipping, as NVlabs)")
    p.add_argument("--no-augment", action="store_true",
                   help="no NVlabs augmentations: each image resized to the crop, as HF's processor")
    p.add_argument("--seed", type=_positive(int, zero_ok=True), default=None,
                   help="batches, dropout and new weights (default 0)")
    p.add_argument("--threads", type=_positive(int), default=None, help="threads (numba and BLAS; default all)")
    p.add_argument("--eval-every", type=_positive(int, zero_ok=True), default=None,
                   help="validation mIoU every N steps (default 500; 0: at the end only)")
    p.add_argument("--save-every", type=_positive(int, zero_ok=True), default=None,
                   help="a checkpoint every N steps (default 500; 0: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and the last line")
    p.set_defaults(func=cmd_train)


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 runtime failure, 2 usage error)."""
    from ..model import DEFAULT_MODEL

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, a in enumerate(argv) if a != "--debug"), len(argv))
    if argv[first:first + 1] == ["bench"]:  # everything after "bench" is the benchmark's, options included
        args = argparse.Namespace(command="bench", func=cmd_bench, args=argv[first + 1 :], debug="--debug" in argv)
    else:
        args = parser.parse_args(argv)  # exits with status 2 on a usage error
    if args.command == "predict":
        args.model_is_default = args.model is None
        args.model = args.model or DEFAULT_MODEL
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    except KeyboardInterrupt as e:  # train's says where it saved the run
        print(f"{PROG}: interrupted{' ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
