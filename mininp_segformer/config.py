"""SegFormer hyper-parameters: Hugging Face's `config.json` read into a small dataclass.

The field names and defaults are those of `transformers.SegformerConfig`, so a Hub `config.json` maps onto it
one to one. `VARIANTS` holds the MiT-b0..b5 encoder shapes of the paper (Xie et al. 2021, Table 6).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Bounds on config.json values: far above every published SegFormer (MiT-b5: depths 3/6/40/3, hidden sizes up to
# 512, decoder 768; the mit-b* ImageNet heads: 1000 labels; 4 stages), far below what would exhaust a machine
# before a single weight is read (a depth or a label count of 1e9 would build a billion-entry key list or label map).
INT_RANGES = {
    "num_encoder_blocks": (1, 8),
    "num_channels": (1, 64),
    "depths": (1, 1000),
    "hidden_sizes": (1, 16384),
    "num_attention_heads": (1, 1024),
    "mlp_ratios": (1, 64),
    "patch_sizes": (1, 64),
    "strides": (1, 64),
    "sr_ratios": (1, 64),
    "decoder_hidden_size": (1, 16384),
    "num_labels": (1, 100_000),
    "semantic_loss_ignore_index": (-2**31, 2**31 - 1),
}
PER_STAGE = ("depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios")
# Read and stored, never used at inference: any finite number in range.
FLOAT_RANGES = {"hidden_dropout_prob": (0.0, 1.0), "attention_probs_dropout_prob": (0.0, 1.0),
                "classifier_dropout_prob": (0.0, 1.0), "drop_path_rate": (0.0, 1.0),
                "initializer_range": (0.0, math.inf), "layer_norm_eps": (0.0, math.inf)}
# config.json of a 1000-label model is ~60 KB; this leaves room for 100,000 long label names.
MAX_JSON_BYTES = 16 * 1024 * 1024


def open_regular_file(path: str | Path, error: type[Exception]):
    """`path` opened for binary reading if it is a regular file; a directory, FIFO, socket or device raises `error`.

    O_NONBLOCK makes open() return at once even on a FIFO (a plain open would wait for a writer, forever); fstat on
    the opened descriptor then says what was opened, with no gap between a check and the open for a swap to slip in.
    A missing file raises FileNotFoundError, which callers word for their own file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path} cannot be opened ({e.strerror}); pass a readable regular file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{path} is {kind}; it must be a regular file (re-download or re-export the checkpoint)")
    return os.fdopen(fd, "rb")


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES):
    """Parse a small JSON file (`config.json`, `preprocessor_config.json`); every way it can be broken -- not a
    regular file, too large, not UTF-8, not JSON, nested too deeply -- is a ConfigError naming the file."""
    fix = f"re-download or re-export {Path(path).name}"
    with open_regular_file(path, ConfigError) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{path} is larger than {max_bytes:,} bytes, far more than any SegFormer needs; {fix}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); {fix}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; arrays nested thousands deep
        reason = "it nests too deeply" if isinstance(e, RecursionError) else e
        raise ConfigError(f"{path} cannot be parsed as JSON ({reason}); {fix}") from None


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", tuple: "list",
               dict: "object", type(None): "null"}


def show_value(value) -> str:
    """A value for an error message: its repr, cut short, and its JSON type (`'3' (string)`)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({_JSON_TYPES.get(type(value), type(value).__name__)})"


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` if it is an integer (not a bool, not a float) in [low, high]; else a ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {show_value(value)}")
    return value


def _check_float(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low} to {high}, got {show_value(value)}")


def _labels_from_json(value) -> dict:
    """`id2label` as config.json writes it, {"0": "wall", ...} -> {0: "wall", ...}; its size is checked before the
    map is built, the keys and names by `validate`."""
    if not isinstance(value, dict):
        raise ConfigError(f'id2label must be a JSON object {{"0": "name", ...}}, got {show_value(value)}')
    check_int("the number of labels in id2label", len(value), *INT_RANGES["num_labels"])
    return {int(k) if isinstance(k, str) and re.fullmatch("[0-9]+", k) else k: v for k, v in value.items()}


@dataclass(frozen=True)
class SegformerConfig:
    num_channels: int = 3
    num_encoder_blocks: int = 4
    depths: tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    drop_path_rate: float = 0.1
    # Stored in every Hub config, but HF's modeling code never passes it on: every nn.LayerNorm in
    # SegFormer uses PyTorch's default eps=1e-5. We keep the field for round-tripping and use LAYER_NORM_EPS.
    layer_norm_eps: float = 1e-6
    decoder_hidden_size: int = 256
    semantic_loss_ignore_index: int = 255
    reshape_last_stage: bool = True
    id2label: dict[int, str] = field(default_factory=dict)
    architectures: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SegformerConfig":
        """Build from a parsed `config.json`; unknown keys (HF bookkeeping) are ignored. Every field is checked
        (type and range, `validate`) and the label count before the label map is built."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "segformer":
            raise ConfigError(
                f"config.json has model_type={show_value(model_type)}, not 'segformer': this is not a SegFormer "
                "checkpoint. Pass the directory of a SegFormer model (e.g. nvidia/segformer-b0-finetuned-ade-512-512)."
            )
        if "num_labels" in d:
            check_int("num_labels", d["num_labels"], *INT_RANGES["num_labels"])
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name == "id2label":
                value = _labels_from_json(value)
            elif f.name == "architectures" and value is None:  # HF writes null when it has no class to record
                value = ()
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        if "id2label" not in kwargs:
            # HF's PretrainedConfig default: num_labels (else 2) labels named LABEL_i. With both given, HF keeps
            # id2label (it overrides num_labels), and so do we.
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(d.get("num_labels", 2))}
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "SegformerConfig":
        """Read and check a `config.json`; every problem is a ConfigError that names the file and the field."""
        path = Path(path)
        try:
            d = read_json(path)
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a SegFormer checkpoint directory needs a config.json") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The `config.json` form, with HF's `model_type`, `num_labels` bookkeeping and string label keys."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["id2label"] = {str(i): name for i, name in self.id2label.items()}
        d["label2id"] = {name: i for i, name in self.id2label.items()}
        d["model_type"] = "segformer"
        return d

    def validate(self) -> None:
        """Raise a ConfigError naming the first field whose type or range is wrong (bounds: INT_RANGES,
        FLOAT_RANGES) or that does not fit the others (stage counts, heads dividing hidden sizes, label ids)."""
        n = check_int("num_encoder_blocks", self.num_encoder_blocks, *INT_RANGES["num_encoder_blocks"])
        for name in PER_STAGE:
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)):
                raise ConfigError(f"{name} must be a list of {n} integers (one per stage), got {show_value(values)}")
            if len(values) != n:
                raise ConfigError(f"{name} has {len(values)} entries but num_encoder_blocks is {n}")
            for i, v in enumerate(values):
                check_int(f"{name}[{i}]", v, *INT_RANGES[name])
        for name in ("num_channels", "decoder_hidden_size", "semantic_loss_ignore_index"):
            check_int(name, getattr(self, name), *INT_RANGES[name])
        for name, (low, high) in FLOAT_RANGES.items():
            _check_float(name, getattr(self, name), low, high)
        for i, (c, h) in enumerate(zip(self.hidden_sizes, self.num_attention_heads)):
            if c % h:
                raise ConfigError(f"hidden_sizes[{i}] = {c} is not divisible by its num_attention_heads[{i}] = {h}")
        if self.hidden_act != "gelu":
            raise ConfigError(f"hidden_act={show_value(self.hidden_act)} is not supported; SegFormer uses 'gelu'")
        if not isinstance(self.reshape_last_stage, bool):
            raise ConfigError(f"reshape_last_stage must be true or false, got {show_value(self.reshape_last_stage)}")
        if not isinstance(self.architectures, (tuple, list)) or not all(isinstance(a, str) for a in self.architectures):
            raise ConfigError(f"architectures must be a list of class names, got {show_value(self.architectures)}")
        if not isinstance(self.id2label, dict):
            raise ConfigError(f"id2label must map class ids to names, got {show_value(self.id2label)}")
        labels = check_int("the number of labels in id2label", len(self.id2label), *INT_RANGES["num_labels"])
        odd = [k for k in self.id2label if isinstance(k, bool) or k not in range(labels)]
        if odd:  # n distinct keys, all in 0..n-1: exactly the class ids
            raise ConfigError(f"id2label keys must be the class ids 0..{labels - 1}, got {show_value(odd[0])}")
        odd = [(k, v) for k, v in self.id2label.items() if not isinstance(v, str)]
        if odd:
            raise ConfigError(f"id2label names must be strings, got {odd[0][0]}: {show_value(odd[0][1])}")


def with_labels(config: SegformerConfig, num_labels: int | None = None, id2label: dict | None = None,
                label2id: dict | None = None) -> SegformerConfig:
    """`config` with a new label set, as HF's `from_pretrained(..., num_labels=, id2label=, label2id=)` sets it.

    `id2label` ({0: "sky", ...}; JSON's string keys "0" accepted) wins, as in HF; else `label2id` ({"sky": 0, ...})
    is inverted; else `num_labels` labels are named LABEL_0 .. LABEL_{n-1} (HF's default names). Given together,
    they must agree (a ConfigError says where they do not). None of them: `config` itself. Validated.
    """
    if id2label is None and label2id is None and num_labels is None:
        return config
    if label2id is not None:
        if not isinstance(label2id, dict):
            raise ConfigError(f'label2id must map names to class ids {{"sky": 0, ...}}, got {show_value(label2id)}')
        check_int("the number of labels in label2id", len(label2id), *INT_RANGES["num_labels"])
        inverted = _labels_from_json({str(i) if isinstance(i, int) and not isinstance(i, bool) else i: name
                                      for name, i in label2id.items()})
        if len(inverted) != len(label2id):
            raise ConfigError("label2id gives two names the same class id; each class needs its own id")
    if id2label is not None:
        labels = _labels_from_json({str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v
                                    for k, v in id2label.items()} if isinstance(id2label, dict) else id2label)
        if label2id is not None and inverted != labels:
            raise ConfigError("id2label and label2id disagree; pass one of them (label2id is id2label inverted)")
    elif label2id is not None:
        labels = inverted
    else:
        labels = {i: f"LABEL_{i}" for i in range(check_int("num_labels", num_labels, *INT_RANGES["num_labels"]))}
    if num_labels is not None and check_int("num_labels", num_labels, *INT_RANGES["num_labels"]) != len(labels):
        raise ConfigError(f"num_labels={num_labels} but the label map names {len(labels)} classes; pass one of them")
    new = dataclasses.replace(config, id2label=labels)
    new.validate()
    return new


# PyTorch's nn.LayerNorm / nn.BatchNorm2d default; what HF's SegFormer actually runs with.
LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # nn.BatchNorm2d's default: how fast train mode moves the running statistics

# MiT encoder shapes (paper Table 6 / the Hub configs). Stage-wise: hidden sizes C_i, depths L_i; all variants
# share heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), mlp ratios 4 and the patch embeddings (7/4, 3/2, 3/2, 3/2).
VARIANTS: dict[str, dict] = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b1": dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_hidden_size=768),
    "b3": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_hidden_size=768),
    "b4": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_hidden_size=768),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_hidden_size=768),
}


def variant_config(name: str, num_labels: int = 150, **overrides) -> SegformerConfig:
    """The config of MiT-`name` (b0..b5) with `num_labels` generic labels, e.g. `variant_config("b2", 19)`."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    fields = dict(VARIANTS[name], id2label={i: f"LABEL_{i}" for i in range(num_labels)})
    fields.update(overrides)
    config = SegformerConfig(**fields)
    config.validate()
    return config
