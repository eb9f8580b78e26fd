"""The model: a config + the checkpoint's tensors, called on `pixel_values` like HF's SegFormer classes.

    model = load("nvidia/segformer-b0-finetuned-ade-512-512")     # or a local directory
    out = model(pixel_values, output_hidden_states=True)           # out.logits: (B, num_labels, H/4, W/4)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SegformerConfig, check_int, read_json, show_value
from .errors import ConfigError, SegformerError
from .memory import check_memory, estimate_forward_bytes
from .nn import BACKENDS
from .nn.decoder import (FoldedDecodeHead, all_mlp_decode_head, all_mlp_decode_head_backward, classification_head,
                         classification_head_backward, fold_decode_head, fused_decode_head)
from .nn.encoder import min_input_size, mix_transformer, mix_transformer_backward
from .nn.layers import EVAL, Mode
from .preprocessing import load_image, postprocess, preprocess
from .threads import keep_cores_awake
from .weights import (BACKBONE, CLASSIFICATION, PREPROCESSOR_NAME, SEMANTIC, check_state_dict, detect_head, flatten,
                      is_parameter, load_checkpoint, save_pretrained, unflatten)

DEFAULT_MODEL = "nvidia/segformer-b0-finetuned-ade-512-512"
SLIDE_HINT = ("segment large images in windows instead: inference.segment(image, model, mode='slide') (command "
              "line: --mode slide), or resize them down")


@dataclass
class SegformerOutput:
    """What HF's SemanticSegmenterOutput / ImageClassifierOutput / BaseModelOutput hold, as NumPy arrays.

    The maps are (B, C, H, W) views of channels-last memory (`np.ascontiguousarray` gives a packed copy).

    logits: `(B, num_labels, H/4, W/4)` (segmentation) or `(B, num_labels)` (classification); None for a backbone.
    loss: HF's loss for the `labels` given to the call (a float), else None.
    last_hidden_state: the last stage, `(B, C_4, H/32, W/32)` (or `(B, N_4, C_4)` if not `reshape_last_stage`).
    hidden_states: the four stage maps `(B, C_i, H_i, W_i)`, if asked for.
    attentions: one `(B, heads, N, N_reduced)` per block, stage-major, if asked for.
    """

    logits: np.ndarray | None
    last_hidden_state: np.ndarray
    hidden_states: tuple[np.ndarray, ...] | None = None
    attentions: tuple[np.ndarray, ...] | None = None
    loss: float | None = None


class Segformer:
    """SegFormer with the head its checkpoint has: the all-MLP decoder (SegformerForSemanticSegmentation), a
    linear classifier (SegformerForImageClassification) or none (SegformerModel).

    `backend`: "numba" (the default: the numba kernels, float32) or "numpy" (every component on the plain-NumPy
    functions of `nn.layers`, the readable truth), in `dtype` float32 or float64. `decoder`: "fused" (the folded
    decode head, `nn.decoder.fold_decode_head`) or "literal" (Eq. 4 as written); train mode always runs the literal
    one.

    Modes, as torch's modules: a model starts in eval mode (as `from_pretrained` leaves it); `model.train()` turns on
    dropout, stochastic depth and BatchNorm's batch statistics (whose forward then also updates the running ones),
    `model.eval()` turns them off. Train mode's masks are drawn from `model.rng`, a NumPy Generator (`seed`).
    """

    def __init__(self, config: SegformerConfig, state_dict: dict[str, np.ndarray], head: str | None = None,
                 image_size: tuple[int, int] = (512, 512), decoder: str = "fused", backend: str = "numba",
                 dtype="float32", seed: int | None = None):
        config.validate()  # a config built in code has not been checked yet; its sizes bound what is built next
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        if backend == "numba" and np.dtype(dtype) != np.float32:
            raise ValueError("the numba kernels are float32 only; use backend='numpy' for float64")
        self.config = config
        self.backend, self.ops, self.dtype = backend, BACKENDS[backend], np.dtype(dtype)
        self.head = head or detect_head(state_dict, config)
        check_state_dict(state_dict, config, self.head)
        self.params = unflatten({k: v.astype(self.dtype, copy=False) for k, v in state_dict.items()})
        self.image_size = tuple(image_size)  # what preprocess() resizes to for this model
        self.min_size = min_input_size(config)  # smallest height / width it accepts
        # "fused": the algebraically folded decode head (decoder.fold_decode_head); "literal": Eq. 4 as written.
        if decoder not in ("fused", "literal"):
            raise ValueError(f"decoder must be 'fused' or 'literal', got {decoder!r}")
        self.decoder = decoder
        self._folded = None  # (copies of the decoder weights it was folded from, FoldedDecodeHead): folded_decode_head
        self.training = False
        self.rng = np.random.default_rng(seed)
        if self.head == SEMANTIC and not config.reshape_last_stage:
            raise ValueError(
                "reshape_last_stage=False with the decode head is not supported: transformers' decode head would "
                "reshape the last stage by its channel count. Set reshape_last_stage to true in config.json."
            )

    def __repr__(self):
        c = self.config
        default = (self.backend, self.dtype) == ("numba", np.float32)
        extra = "" if default else f", backend={self.backend!r}, dtype={self.dtype.name}"
        return (f"Segformer(head={self.head}, hidden_sizes={list(c.hidden_sizes)}, depths={list(c.depths)}, "
                f"num_labels={c.num_labels}, image_size={self.image_size}{extra})")

    @property
    def id2label(self) -> dict[int, str]:
        return self.config.id2label

    def train(self, mode: bool = True) -> "Segformer":
        """Train mode (`mode=False`: eval mode), as torch's `module.train()`; returns the model."""
        self.training = bool(mode)
        return self

    def eval(self) -> "Segformer":
        """Eval mode, as torch's `module.eval()`: no dropout, BatchNorm on its running statistics."""
        return self.train(False)

    @property
    def mode(self) -> Mode:
        """What the components get: `nn.layers.EVAL`, or train mode with the config's probabilities and `rng`."""
        if not self.training:
            return EVAL
        c = self.config
        return Mode(training=True, rng=self.rng, hidden_dropout=c.hidden_dropout_prob,
                    attention_dropout=c.attention_probs_dropout_prob, classifier_dropout=c.classifier_dropout_prob,
                    drop_path_rate=c.drop_path_rate)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor of the model under its checkpoint's Hub names, BatchNorm's running statistics included: the
        model's own arrays (an optimiser updates them in place), as torch's `state_dict()`."""
        return flatten(self.params)

    def load_state_dict(self, state_dict: dict[str, np.ndarray]) -> None:
        """Replace every tensor by `state_dict`'s (strict, as torch's default: exactly this model's Hub names and
        shapes, float and finite, else a CheckpointError listing what differs), cast to the model's dtype."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict of Hub names to arrays, got {type(state_dict).__name__}")
        state = {k: np.asarray(v) for k, v in state_dict.items()}
        check_state_dict(state, self.config, self.head, source="state_dict")
        current = self.state_dict()
        self.params = unflatten({k: (state[k] if k in state else v).astype(self.dtype) for k, v in current.items()})

    def forward_bytes(self, batch: int, height: int, width: int, output_attentions: bool = False) -> int:
        """`memory.estimate_forward_bytes` of a forward pass of this model on `(batch, C, height, width)`."""
        decoder = self.decoder if self.head == SEMANTIC else None
        return estimate_forward_bytes(self.config, batch, height, width, decoder, output_attentions)

    def check_forward(self, batch: int, height: int, width: int, output_attentions: bool = False) -> None:
        """A ResourceError, before anything is allocated, if that forward pass would need more memory than
        `memory.max_memory()` allows."""
        check_memory(self.forward_bytes(batch, height, width, output_attentions),
                     f"a forward pass on {batch} x {height} x {width} pixel values", SLIDE_HINT)

    def _check_pixel_values(self, pixel_values, output_attentions: bool = False) -> np.ndarray:
        if not isinstance(pixel_values, np.ndarray):
            raise TypeError(f"pixel_values must be a NumPy array (B, C, H, W); got {type(pixel_values).__name__}. "
                            "For images use mininp_segformer.preprocess(image) or predict(image)")
        x = pixel_values
        c = self.config.num_channels
        if x.ndim == 3 and x.shape[0] == c:
            raise ValueError(f"pixel_values must be 4-D (B, C, H, W); got {x.shape}. Add the batch axis: x[None]")
        if x.ndim != 4:
            raise ValueError(f"pixel_values must be 4-D (B, C, H, W); got shape {x.shape}")
        if x.shape[1] != c:
            hint = " (channels-last? use x.transpose(0, 3, 1, 2))" if x.shape[-1] == c else ""
            raise ValueError(f"pixel_values must have {c} channels on axis 1; got shape {x.shape}{hint}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"pixel_values must be float (normalized); got {x.dtype}. Raw images go through "
                            "mininp_segformer.preprocess(image) first")
        if x.shape[0] == 0:
            raise ValueError("pixel_values has an empty batch")
        h, w = x.shape[2:]
        if min(h, w) < self.min_size:
            raise ValueError(
                f"pixel_values of {h} x {w} are too small: this model needs at least {self.min_size} x "
                f"{self.min_size} (its spatial-reduction convs need one full window). Resize the input up."
            )
        self.check_forward(x.shape[0], h, w, output_attentions)
        x = x.astype(self.dtype, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("pixel_values contain NaN or inf; check the image and the preprocessing")
        return x

    @keep_cores_awake()  # the pass hands work between threads some hundred times (threads.keep_cores_awake)
    def __call__(self, pixel_values, labels=None, output_hidden_states: bool = False, output_attentions: bool = False):
        """`pixel_values: (B, C, H, W)` float32 -> SegformerOutput (see there for shapes); with `labels` (`(B, H, W)`
        class ids for segmentation, `(B,)` or `(B, num_labels)` for classification) also HF's loss, `out.loss`."""
        x = self._check_pixel_values(pixel_values, output_attentions)
        if labels is not None:
            labels = self.check_labels(labels, x.shape[0])
        mode = self.mode
        encoder = self.params["encoder"] if self.head == BACKBONE else self.params["segformer"]["encoder"]
        stages, attentions = mix_transformer(channels_last(x), encoder, self.config, output_attentions, self.ops,
                                             mode=mode)
        # HF's layout: (B, C, H, W) maps; the last stage as (B, N, C) tokens when reshape_last_stage is off.
        # Transposed views of our channels-last arrays: the same numbers, nothing copied.
        hidden_states = tuple(f.transpose(0, 3, 1, 2) for f in stages)
        if not self.config.reshape_last_stage:
            b, h, w, c = stages[-1].shape
            hidden_states = hidden_states[:-1] + (stages[-1].reshape(b, h * w, c),)
        if self.head == SEMANTIC:
            if self.decoder == "fused" and not mode.training:
                logits = fused_decode_head(stages, self.folded_decode_head(), self.ops)
            else:
                logits = all_mlp_decode_head(stages, self.params["decode_head"], self.ops, mode)
            logits = logits.transpose(0, 3, 1, 2)
        elif self.head == CLASSIFICATION:
            logits = classification_head(stages[-1], self.params["classifier"], self.ops)
        else:
            logits = None
        last = hidden_states[-1]
        return SegformerOutput(
            logits=logits,
            last_hidden_state=last,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            loss=None if labels is None else float(self.loss(logits, labels)[0]),
        )

    def folded_decode_head(self) -> FoldedDecodeHead:
        """`fold_decode_head` of the current decoder weights, kept from one call to the next and folded again only
        when a weight has changed since (an optimizer step, `load_state_dict`, an edit in place): compared value by
        value against a copy of the weights it was folded from, which takes a tenth of the time of folding (B2: 1.1
        against 14 ms; B0: 0.1 against 1.4 ms). The copy costs as much memory as the decoder's weights (B2-B5: 13
        MB in float32)."""
        weights = flatten(self.params["decode_head"])
        kept = self._folded  # read once: other threads may replace it meanwhile
        if kept is not None and kept[0].keys() == weights.keys() and all(
                np.array_equal(a, weights[k], equal_nan=True) for k, a in kept[0].items()):
            return kept[1]
        copies = {k: a.copy() for k, a in weights.items()}
        folded = fold_decode_head(unflatten(copies), self.dtype)  # from the copies: what the next calls compare
        self._folded = (copies, folded)
        return folded

    def check_labels(self, labels, batch: int) -> np.ndarray:
        """`labels` for a batch of `batch`, checked before a forward runs (in train mode a forward changes
        BatchNorm's running statistics, so bad labels must not get that far): a LabelError says what is wrong."""
        from .nn.loss import check_classification_labels, check_segmentation_labels

        if self.head == BACKBONE:
            raise SegformerError("labels need a head to compute a loss: this model is a backbone (SegformerModel); "
                                 "load a segmentation or classification checkpoint")
        labels = np.asarray(labels)
        c = self.config
        if self.head == SEMANTIC:
            check_segmentation_labels(labels, batch, c.num_labels, c.semantic_loss_ignore_index)
        else:
            check_classification_labels(labels, batch, c.num_labels)
        return labels

    def loss(self, logits, labels):
        """HF's loss of this model's head and its gradient with respect to `logits` -> (loss, dlogits):
        `nn.loss.semantic_segmentation_loss` (`logits: (B, num_labels, h, w)`, labels `(B, H, W)`) or
        `nn.loss.classification_loss` (`(B, num_labels)`)."""
        from .nn.loss import classification_loss, semantic_segmentation_loss  # scipy: imported when training starts

        if self.head == SEMANTIC:
            return semantic_segmentation_loss(logits, labels, ignore_index=self.config.semantic_loss_ignore_index)
        return classification_loss(logits, labels)

    def save_pretrained(self, directory) -> Path:
        """Write the model to `directory` as transformers' `save_pretrained` does: `config.json` (architectures
        set to this head), `model.safetensors` (float32, Hub names, BatchNorm's running statistics and
        num_batches_tracked) and `preprocessor_config.json` (SegformerImageProcessor's, at `image_size`).
        Atomic (`weights.save_pretrained`): a failure raises a SegformerError and leaves `directory` as it was.
        `load(directory)` and transformers' `from_pretrained(directory)` read it back."""
        config = dataclasses.replace(self.config, architectures=(self.head,))
        return save_pretrained(directory, config, self.state_dict(), self.image_size)


# preprocessor_config.json's `size`, as HF's SegformerImageProcessor reads it (get_size_dict, then resize): an
# integer (square), [height, width] or {"height": H, "width": W}; 512 x 512 when absent. Other forms HF knows
# ({"shortest_edge": ...}) pass get_size_dict but SegFormer's resize() rejects them, and so do we.
DEFAULT_IMAGE_SIZE = (512, 512)
MAX_IMAGE_SIDE = 8192  # the published checkpoints use 512, 640 and 1024


def channels_last(x: np.ndarray) -> np.ndarray:
    """`(B, C, H, W)` -> a C-contiguous `(B, H, W, C)` copy, the layout the network works in. Channel by channel:
    NumPy copies a 3-channel 512 x 512 image that way in 0.46 ms, through one 4-D transpose in 0.96 ms."""
    out = np.empty((x.shape[0], *x.shape[2:], x.shape[1]), x.dtype)
    for c in range(x.shape[1]):
        out[..., c] = x[:, c]
    return out


def _image_size(directory: Path, min_size: int) -> tuple[int, int]:
    """The input size from `preprocessor_config.json` (checked: a ConfigError names the file and the value)."""
    path = directory / PREPROCESSOR_NAME
    try:
        processor = read_json(path)
    except FileNotFoundError:
        return DEFAULT_IMAGE_SIZE
    if not isinstance(processor, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {show_value(processor)}")
    size = processor.get("size")
    if size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        size = [size["height"], size["width"]]
    elif isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2):
        raise ConfigError(f'{path}: size {show_value(size)} is not a size SegFormer\'s image processor accepts: write '
                          '{"height": H, "width": W}, [H, W] or one integer (square)')
    try:
        h, w = (check_int(f"size ({side})", v, min_size, MAX_IMAGE_SIDE) for side, v in zip(("height", "width"), size))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e} (this model's minimum input is {min_size} pixels)") from None
    return (h, w)


def load(name_or_path, revision: str = "main", backend: str = "numba", dtype="float32", *, head: str | None = None,
         num_labels: int | None = None, id2label: dict | None = None, label2id: dict | None = None,
         seed: int | None = None) -> Segformer:
    """Load a checkpoint: a local directory (config.json + model.safetensors), the bundled demo model's name, or a
    Hugging Face Hub name such as "nvidia/segformer-b0-finetuned-ade-512-512" (downloaded once, then cached).
    `backend` and `dtype` as for `Segformer`.

    To fine-tune, give the model another head or label set, as HF's `from_pretrained(..., num_labels=,
    id2label=, label2id=, ignore_mismatched_sizes=True)` does: `head` ("semantic", "classification" or
    "backbone"; default: the checkpoint's own) and the labels (`config.with_labels`). Tensors the new model
    lacks or whose shape changed are initialised as transformers does (`weights.init_weights`, from
    `np.random.default_rng(seed)`), e.g. `load("nvidia/mit-b0", head="semantic", id2label={0: "road", ...})`
    gives an ImageNet encoder with a fresh decode head; one warning line (`warnings.warn`) says what changed.
    A decode head always reads the last stage as a map: the `reshape_last_stage: false` of the mit-b* configs is
    set to true (HF keeps it and then reshapes by the channel count, right only when tokens == channels).
    """
    from .config import with_labels
    from .hub import resolve
    from .weights import fit_state_dict, head_class

    directory = resolve(name_or_path, revision=revision)
    config, source_head, state = load_checkpoint(directory)
    head = head_class(head) if head is not None else source_head
    new_config = with_labels(config, num_labels, id2label, label2id)
    if head != source_head:
        new_config = dataclasses.replace(new_config, architectures=(head,),
                                         reshape_last_stage=new_config.reshape_last_stage or head == SEMANTIC)
    if new_config != config or head != source_head:
        config, (state, surgery) = new_config, fit_state_dict(state, new_config, head, seed)
        if surgery:
            warnings.warn(surgery.summary(head, str(name_or_path)), stacklevel=2)
    image_size = _image_size(directory, min_input_size(config))
    return Segformer(config, state, head=head, image_size=image_size, backend=backend, dtype=dtype)


def predict(image, model=None) -> np.ndarray:
    """Segment one image: a path, PIL image or `(H, W, 3)` uint8 array -> `(H, W)` int64 class ids at its own size.

    `model`: a loaded Segformer, a directory or a Hub name; default "nvidia/segformer-b0-finetuned-ade-512-512".
    """
    if not isinstance(model, Segformer):
        model = load(model if model is not None else DEFAULT_MODEL)
    if model.head != SEMANTIC:
        raise ValueError(f"predict() needs a segmentation checkpoint; this one is {model.head}")
    rgb = load_image(image)
    model.check_forward(1, *model.image_size)  # before preprocess allocates the resized image
    logits = model(preprocess(rgb, size=model.image_size)).logits
    return postprocess(logits, target_sizes=[rgb.shape[:2]])[0]


@keep_cores_awake()
def value_and_grad(model: Segformer, pixel_values, labels, input_grad: bool = False):
    """The loss of HF's head for `labels` and its gradient with respect to every trainable parameter.

    Returns `(loss, grads)`: `grads` maps each parameter's Hub name (BatchNorm's running statistics are state, not
    parameters) to an array of its shape; with `input_grad`, also the gradient with respect to `pixel_values`,
    `(loss, grads, dpixel_values)` (for saliency maps). The loss is `SegformerForSemanticSegmentation`'s
    (`nn.loss.semantic_segmentation_loss`, labels `(B, H, W)`) or `SegformerForImageClassification`'s
    (`nn.loss.classification_loss`).

    Computed in the model's mode, as `loss.backward()` after a forward in torch: eval mode (after `load`) uses
    BatchNorm's running statistics and no dropout; after `model.train()` dropout and stochastic depth draw from
    `model.rng`, BatchNorm normalises with the batch's statistics and updates its running ones. The segmentation
    head runs as written (Eq. 4, `decoder="literal"`): the fused one is for inference. float64
    (`backend="numpy", dtype="float64"`) gives exact gradients for checking.
    """
    x = model._check_pixel_values(pixel_values)
    labels = model.check_labels(labels, x.shape[0])
    mode = model.mode
    encoder_params = model.params["segformer"]["encoder"]
    encoder_cache, head_cache = {}, {}
    stages, _ = mix_transformer(channels_last(x), encoder_params, model.config, ops=model.ops,
                                cache=encoder_cache, mode=mode)
    if model.head == SEMANTIC:
        head_params = model.params["decode_head"]
        logits = all_mlp_decode_head(stages, head_params, model.ops, mode, head_cache)  # (B, h, w, labels)
        loss, dlogits = model.loss(logits.transpose(0, 3, 1, 2), labels)
        dstages, head_grads = all_mlp_decode_head_backward(dlogits.transpose(0, 2, 3, 1), head_cache, head_params)
        head_name = "decode_head"
    else:
        head_params = model.params["classifier"]
        logits = classification_head(stages[-1], head_params, model.ops, cache=head_cache)
        loss, dlogits = model.loss(logits, labels)
        dlast, head_grads = classification_head_backward(dlogits, head_cache, head_params)
        dstages = [None] * (len(stages) - 1) + [dlast]
        head_name = "classifier"
    del head_cache, logits, dlogits  # the head's activations go before the encoder's backward allocates its own
    dx, encoder_grads = mix_transformer_backward(dstages, encoder_cache, model.config, encoder_params)
    grads = {**flatten(encoder_grads, "segformer.encoder"), **flatten(head_grads, head_name)}
    expected = {k for k in model.state_dict() if is_parameter(k)}
    assert set(grads) == expected, f"gradients for {sorted(set(grads) ^ expected)[:5]}"  # the trees must match
    if input_grad:
        return loss, grads, np.ascontiguousarray(dx.transpose(0, 3, 1, 2))
    return loss, grads
