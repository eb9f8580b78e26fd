"""The training loop: batches -> `value_and_grad` (train mode) -> `adamw_step`, with validation, checkpoints and
exact resume.

    model = mininp_segformer.load("segformer-b0-shapes", id2label={0: "background", 1: "round", ...})
    settings = TrainSettings(steps=2000, batch_size=8, crop=512, lr=6e-5)
    result = train(model, dataset_batches(train_set, settings), settings, "runs/drone",
                   validation=dataset_samples(val_set))

What `--out` holds, in Hugging Face Trainer's layout:

    out/config.json, model.safetensors, preprocessor_config.json     the final model (model.save_pretrained)
    out/trainer_state.json                                            the log: loss and lr per step, eval mIoU
    out/training_curves.png                                           loss and mIoU curves (if matplotlib is there)
    out/checkpoint-STEP/                                              every `save_every` steps, and at Ctrl-C:
        config.json, model.safetensors, preprocessor_config.json      the model at STEP (HF layout: transformers
                                                                      and `load` read it)
        optimizer.safetensors                                         AdamW's state (`optim.state_arrays`)
        trainer_state.json                                            step, settings, model.rng's state, the log

Resume is exact: a run resumed from checkpoint-STEP ends with the same weights, bit for bit, as one that never
stopped (same seed and threads), because everything a step draws from is in the checkpoint: the weights (float32,
saved as float32), AdamW's moments and step count (which also gives the schedule's learning rate), the state of
`model.rng` (dropout and drop path masks), and the step number, from which `augment.batches` rebuilds the batch
stream (it is a function of (seed, step)). A checkpoint is written in a staging directory and renamed into place,
so a full disk or a kill while saving leaves the previous checkpoints as they were.

Ctrl-C (SIGINT) is deferred to the end of the running step (a step interrupted half-way would leave half the
parameters updated); the loop then saves a checkpoint and raises KeyboardInterrupt. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from safetensors import SafetensorError

from ..config import SegformerConfig, read_json
from ..errors import CheckpointError, SegformerError
from ..model import Segformer, value_and_grad
from ..preprocessing import postprocess, preprocess
from ..tools.metrics import evaluate
from ..weights import fsync_dir, is_parameter, load_checkpoint, read_safetensors, write_safetensors
from .augment import batches
from .data import Dataset, read_sample
from .optim import NVLABS_CUSTOM_KEYS, AdamW, AdamWState, PolySchedule, adamw_step, init_state, load_state, state_arrays

OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"  # HF Trainer's name
CURVES_NAME = "training_curves.png"
CHECKPOINT_PREFIX = "checkpoint-"  # HF Trainer's PREFIX_CHECKPOINT_DIR


@dataclass(frozen=True)
class TrainSettings:
    """What a run does (HF TrainingArguments' names where one exists). The fields above `eval_every` decide the
    weights and must be equal when a run is resumed; the others may change.

    The learning rate follows NVlabs' schedule (`optim.PolySchedule`, power 1) over `steps`, after a linear warmup
    of `warmup_steps` (HF Trainer's default: 0; NVlabs warms up for 1,500 of its 160,000); AdamW's other values
    and the parameter groups (decode head lr x `head_lr_mult`, no weight decay on norms) are `optim.AdamW`'s.
    """
    steps: int = 1000
    batch_size: int = 8
    crop: int = 512  # the side of the square training crops (augment.batches)
    lr: float = 6e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    head_lr_mult: float = 10.0  # the decode head's lr multiplier (NVlabs: 10)
    max_grad_norm: float | None = None  # clip the gradients' global norm to this (HF Trainer: 1.0; NVlabs: none)
    seed: int = 0  # the batches (augment.batches) and model.rng (dropout, drop path)
    augment: bool = True  # NVlabs' ADE20K augmentations; False: each image resized to the crop, as HF's processor
    eval_every: int = 500  # validation mIoU every this many steps (and at the end); 0: only at the end
    save_every: int = 500  # a checkpoint every this many steps; 0: none (but still one at Ctrl-C)

    def __post_init__(self):
        for name in ("steps", "batch_size", "crop", "warmup_steps", "seed", "eval_every", "save_every"):
            value = getattr(self, name)
            low = 1 if name in ("steps", "batch_size", "crop") else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise SegformerError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and 0 < self.max_grad_norm < math.inf):
            raise SegformerError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        self.optimiser()  # lr, weight decay and warmup checked by optim's own rules

    def optimiser(self) -> tuple[AdamW, PolySchedule]:
        """optim's AdamW settings and schedule for this run."""
        custom_keys = {**NVLABS_CUSTOM_KEYS, "head": {"lr_mult": self.head_lr_mult}}
        return (AdamW(lr=self.lr, weight_decay=self.weight_decay, custom_keys=custom_keys),
                PolySchedule(max_iters=int(self.steps), warmup_iters=int(self.warmup_steps)))

    def trajectory(self) -> dict:
        """The fields that decide the weights: a resumed run must have the same."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ("steps", "batch_size", "crop", "lr", "weight_decay", "warmup_steps",
                                  "head_lr_mult", "max_grad_norm", "seed", "augment")}


@dataclass
class TrainResult:
    """What `train` returns: the last step, the log (HF's `log_history`: {"step", "loss", "lr"} per step and
    {"step", "eval_mean_iou"} per validation), the last validation mIoU (NaN without validation)."""
    step: int
    log_history: list
    eval_mean_iou: float = math.nan


# ----------------------------------------------------------------------------------------------------------------
# Data


def dataset_batches(dataset: Dataset, settings: TrainSettings) -> Callable[[int], Iterator]:
    """The batch stream of `train` for a dataset on disk: `start_step -> augment.batches(...)` from that step."""
    def from_step(start_step: int):
        return batches(dataset, settings.batch_size, settings.seed, settings.crop, settings.augment, start_step)
    return from_step


def dataset_samples(dataset: Dataset) -> Callable[[], Iterable]:
    """The validation samples of `train` for a dataset on disk: each call reads the (image, mask) pairs anew."""
    return lambda: (read_sample(dataset, i) for i in range(len(dataset)))


def validation_miou(model: Segformer, samples: Iterable, batch_size: int = 8) -> float:
    """Mean IoU (`metrics.evaluate`) of the model's predictions on (image `(H, W, 3)` uint8, mask `(H, W)`) pairs,
    as `predict` makes them: resized to `model.image_size`, logits resized back to the mask's size. Eval mode;
    `batch_size` images at a time, each scored as it comes (a large set never sits in memory)."""
    training = model.training
    model.eval()

    def predictions(pairs):
        images, masks = [], []
        for image, mask in pairs:
            images.append(image)
            masks.append(mask)
            if len(images) == batch_size:
                yield from _predict_batch(model, images, masks)
                images, masks = [], []
        if images:
            yield from _predict_batch(model, images, masks)

    try:
        preds, masks = itertools.tee(predictions(samples))  # evaluate takes the two in step: tee keeps one pair
        scores = evaluate((p for p, _ in preds), (m for _, m in masks), model.config.num_labels,
                          ignore_index=model.config.semantic_loss_ignore_index)
    except SegformerError:
        raise
    except ValueError as e:  # metrics' own: no samples, a mask of another size
        raise SegformerError(f"the validation set cannot be scored: {e}") from None
    finally:
        model.train(training)
    return scores["mean_iou"]


def _predict_batch(model, images, masks):
    logits = model(preprocess(images, size=model.image_size)).logits
    preds = postprocess(logits, target_sizes=[m.shape for m in masks])
    return zip(preds, masks)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def trainable(model: Segformer) -> dict[str, np.ndarray]:
    """The model's own parameter arrays by Hub name (BatchNorm's running statistics are state, not parameters)."""
    return {k: v for k, v in model.state_dict().items() if is_parameter(k)}


def save_training_checkpoint(out, model: Segformer, state: AdamWState, settings: TrainSettings,
                             log_history: list) -> Path:
    """Write `out/checkpoint-STEP/` (STEP = state.step; the layout in the module doc) atomically: everything goes
    to a staging directory, is fsync'ed, then renamed into place. A failure (a full disk) removes the staging
    directory, leaves every earlier checkpoint as it was and raises a SegformerError."""
    out = Path(out)
    final = out / f"{CHECKPOINT_PREFIX}{state.step}"
    staging = out / f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.saving"
    trainer_state = {"global_step": state.step, "settings": dataclasses.asdict(settings),
                     "rng_state": model.rng.bit_generator.state, "log_history": log_history}
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging)  # itself atomic: staging appears whole or not at all
        write_safetensors(staging / OPTIMIZER_NAME, state_arrays(state))
        (staging / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")
        for name in (OPTIMIZER_NAME, TRAINER_STATE_NAME):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        old = final.with_name(staging.name.replace(".saving", ".old"))
        if final.exists():  # the same step saved before (a resumed run, or an earlier run in this folder)
            os.replace(final, old)
        os.replace(staging, final)
        fsync_dir(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:  # a full disk, a permission, a second Ctrl-C: no staging directory is left behind
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, (OSError, SafetensorError, SegformerError)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SegformerError(f"saving the checkpoint {final} failed ({reason}); the earlier checkpoints are intact. "
                             "Free some disk space, then continue from the last one with --resume") from None
    return final


def latest_checkpoint(directory) -> Path | None:
    """`directory` itself if it is a checkpoint, else its `checkpoint-STEP` of the highest STEP (or None)."""
    directory = Path(directory)
    if (directory / TRAINER_STATE_NAME).is_file() and (directory / OPTIMIZER_NAME).is_file():
        return directory
    steps = [(int(m.group(1)), p) for p in (directory.iterdir() if directory.is_dir() else [])
             if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)) and (p / TRAINER_STATE_NAME).is_file()]
    return max(steps)[1] if steps else None


def checkpoint_settings(directory) -> dict:
    """The TrainSettings fields a checkpoint (or the latest one of a run's `out`) was saved with."""
    checkpoint = _find_checkpoint(directory)
    try:
        return dict(read_json(checkpoint / TRAINER_STATE_NAME)["settings"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / TRAINER_STATE_NAME} is damaged ({e}); resume from another "
                              "checkpoint") from None


def _find_checkpoint(directory) -> Path:
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        raise CheckpointError(f"{directory} is not a training checkpoint (it has no {TRAINER_STATE_NAME} and "
                              f"{OPTIMIZER_NAME}, nor a {CHECKPOINT_PREFIX}STEP folder holding them); pass a "
                              f"{CHECKPOINT_PREFIX}STEP folder of an earlier run's --out")
    return checkpoint


def check_resume(directory, model: Segformer, settings: TrainSettings) -> tuple[Path, dict, dict]:
    """The checkpoint to resume from (`directory`, or the latest one in a run's `--out`), checked against the model
    and settings -> (its folder, its weights, its trainer_state.json). A CheckpointError if it is not a checkpoint,
    was saved from another model (config or labels), or with other settings (`TrainSettings.trajectory`)."""
    checkpoint = _find_checkpoint(directory)
    config, head, weights = load_checkpoint(checkpoint)
    differ = sorted(k for k, v in _comparable(config).items() if _comparable(model.config).get(k) != v)
    if head != model.head or differ:
        raise CheckpointError(f"{checkpoint} was saved from another model ({head}; differs in "
                              f"{', '.join(differ) or 'head'}) than the one being trained ({model.head}); resume "
                              "with the --model and --labels it was trained with, or start a new run")
    trainer_state = read_json(checkpoint / TRAINER_STATE_NAME)
    saved = TrainSettings(**checkpoint_settings(checkpoint)).trajectory()
    now = settings.trajectory()
    changed = [f"{k} {v!r}, now {now[k]!r}" for k, v in saved.items() if now[k] != v]
    if changed:
        raise CheckpointError(f"{checkpoint} was trained with other settings ({', '.join(changed)}); an exact "
                              "resume needs the same ones: pass them again, or start a new run")
    return checkpoint, weights, trainer_state


def load_training_checkpoint(directory, model: Segformer, settings: TrainSettings) -> tuple[AdamWState, list]:
    """Resume from a checkpoint (`check_resume`): the model takes its weights and rng state; returns (the optimiser
    state, the log so far)."""
    checkpoint, weights, trainer_state = check_resume(directory, model, settings)
    try:
        rng_state, log_history = trainer_state["rng_state"], list(trainer_state["log_history"])
        step = int(trainer_state["global_step"])
        model.rng.bit_generator.state = rng_state
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / TRAINER_STATE_NAME} is damaged ({e}); resume from another "
                              "checkpoint") from None
    model.load_state_dict(weights)
    state = load_state(read_safetensors(checkpoint / OPTIMIZER_NAME), trainable(model))
    if state.step != step:
        raise CheckpointError(f"{checkpoint}: the optimiser has made {state.step} steps but the trainer state says "
                              f"{step}; resume from another checkpoint")
    return state, log_history


def _comparable(config: SegformerConfig) -> dict:
    d = config.to_dict()
    d.pop("architectures", None)
    return d


def write_log(out, log_history: list, settings: TrainSettings) -> Path | None:
    """`out/trainer_state.json` (the log) and `out/training_curves.png` (if matplotlib is installed: its path is
    returned, else None)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TRAINER_STATE_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"settings": dataclasses.asdict(settings), "log_history": log_history}, indent=1)
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return plot_curves(log_history, out / CURVES_NAME)


def plot_curves(log_history: list, path) -> Path | None:
    """A PNG of the training loss (per step, and its running mean) and the validation mIoU against the step.
    matplotlib is optional (as for `viz.plot_legend`): without it, nothing is written and None is returned."""
    try:  # a bare Figure draws with the Agg canvas: no display, and pyplot's backend (a notebook's) is left alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    path = Path(path)
    steps = np.array([e["step"] for e in log_history if "loss" in e])
    losses = np.array([e["loss"] for e in log_history if "loss" in e])
    evals = [(e["step"], e["eval_mean_iou"]) for e in log_history if "eval_mean_iou" in e]
    fig = Figure(figsize=(9, 3.2), constrained_layout=True)
    ax = fig.subplots(1, 2)
    ax[0].plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 10:
        k = max(1, len(losses) // 20)
        ax[0].plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log" if len(losses) and losses.min() > 0 else "linear")
    ax[0].legend()
    if evals:
        ax[1].plot(*zip(*evals), marker="o")
    ax[1].set(xlabel="step", ylabel="validation mIoU", ylim=(0, 1))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The loop


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: scale every gradient (in place) by min(1, max_norm / (total + 1e-6)), total
    being the L2 norm of all gradients together (the norm of the per-tensor norms); returns total."""
    total = float(np.linalg.norm([np.linalg.norm(g) for g in grads.values()]))
    scale = min(1.0, max_norm / (total + 1e-6))
    if scale < 1.0:
        for g in grads.values():
            g *= g.dtype.type(scale)
    return total


@contextmanager
def deferred_interrupt():
    """Within: a first SIGINT (Ctrl-C) only sets a flag, read by calling the yielded function; a second one raises
    KeyboardInterrupt at once. Outside the main thread (where Python delivers no signal) the flag stays False."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def train(model: Segformer, batches_from: Callable[[int], Iterator], settings: TrainSettings, out,
          validation: Callable[[], Iterable] | None = None, resume=None, progress: bool = True,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` (its arrays updated in place) for `settings.steps` steps and write it to `out` (see the module
    doc for what `out` holds).

    batches_from: `start_step -> iterator of (pixel_values (B, 3, h, w), labels (B, h, w))`, the same batches for
    the same step whatever the start (`dataset_batches`). validation: `() -> iterable of (image, mask)`
    (`dataset_samples`), scored by `validation_miou` every `settings.eval_every` steps and at the end. resume: a
    checkpoint folder, or a run's `out` (its latest checkpoint). progress: a tqdm line (step, loss, lr, images/s,
    ETA). log: where the one-line messages go (default: tqdm.write, above the progress line). A new run re-seeds
    `model.rng` from `settings.seed`; a resumed one takes the checkpoint's.
    """
    from tqdm.auto import tqdm

    log = log or tqdm.write
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SegformerError(f"--out {out} is a file; pass a directory")
    optimiser, schedule = settings.optimiser()
    if resume is not None:
        state, log_history = load_training_checkpoint(resume, model, settings)
        log(f"resumed from {latest_checkpoint(resume)} at step {state.step}")
    else:
        model.rng = np.random.default_rng(settings.seed)
        state, log_history = init_state(trainable(model)), []
    params = trainable(model)  # after load_state_dict, which gives the model new arrays
    last_miou = next((e["eval_mean_iou"] for e in reversed(log_history) if "eval_mean_iou" in e), math.nan)
    model.train()
    stream = batches_from(state.step)
    bs, first, start = settings.batch_size, state.step, time.perf_counter()
    saved_at = None
    with deferred_interrupt() as interrupted, tqdm(total=settings.steps * bs, initial=state.step * bs, unit="img",
                                                   disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        while state.step < settings.steps and not interrupted():
            pixel_values, labels = next(stream)
            loss, grads = value_and_grad(model, pixel_values, labels)
            if settings.max_grad_norm is not None:
                clip_grad_norm(grads, settings.max_grad_norm)
            lr = adamw_step(params, grads, state, optimiser, schedule)
            log_history.append({"step": state.step, "loss": float(loss), "lr": lr})
            bar.update(bs)
            bar.set_postfix_str(f"step {state.step}/{settings.steps} loss {loss:.4f} lr {lr:.2e}", refresh=False)
            done = state.step == settings.steps
            if validation is not None and (done or settings.eval_every and state.step % settings.eval_every == 0):
                last_miou = validation_miou(model, validation(), batch_size=bs)
                log_history.append({"step": state.step, "eval_mean_iou": last_miou})
                log(f"step {state.step}: validation mIoU {last_miou:.4f}")
                write_log(out, log_history, settings)
            if settings.save_every and state.step % settings.save_every == 0 and not done:
                save_training_checkpoint(out, model, state, settings, log_history)
                saved_at = state.step
        if interrupted() and state.step < settings.steps:
            if saved_at != state.step:
                checkpoint = save_training_checkpoint(out, model, state, settings, log_history)
            else:
                checkpoint = out / f"{CHECKPOINT_PREFIX}{state.step}"
            raise KeyboardInterrupt(f"at step {state.step}; saved {checkpoint}: continue with --resume {checkpoint}")
    seconds = time.perf_counter() - start
    if state.step > first:
        log(f"{state.step - first} steps in {seconds:.0f} s ({(state.step - first) * bs / seconds:.2f} images/s)")
    model.eval()
    model.save_pretrained(out)
    if write_log(out, log_history, settings) is None:
        log(f"no {CURVES_NAME}: plotting needs matplotlib (pip install matplotlib)")
    return TrainResult(state.step, log_history, last_miou)


__all__ = ["TrainSettings", "TrainResult", "dataset_batches", "dataset_samples", "validation_miou", "trainable",
           "save_training_checkpoint", "latest_checkpoint", "checkpoint_settings", "check_resume",
           "load_training_checkpoint", "write_log", "plot_curves",
           "clip_grad_norm", "deferred_interrupt", "train", "OPTIMIZER_NAME", "TRAINER_STATE_NAME",
           "CHECKPOINT_PREFIX", "CURVES_NAME"]
