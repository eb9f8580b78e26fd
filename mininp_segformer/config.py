"""SegFormer hyper-parameters: Hugging Face's `config.json` read into a small dataclass.

The field names and defaults are those of `transformers.SegformerConfig`, so a Hub `config.json` maps onto it
one to one. `VARIANTS` holds the MiT-b0..b5 encoder shapes of the paper (Xie et al. 2021, Table 6).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


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
        """Build from a parsed `config.json`; unknown keys (HF bookkeeping) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "segformer":
            raise ConfigError(
                f"config.json has model_type={model_type!r}, not 'segformer': this is not a SegFormer checkpoint. "
                "Pass the directory of a SegFormer model (e.g. nvidia/segformer-b0-finetuned-ade-512-512)."
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name == "id2label":
                value = {int(k): str(v) for k, v in value.items()}
            elif isinstance(f.default, tuple) or f.name == "architectures":
                value = tuple(value)
            kwargs[f.name] = value
        if "id2label" not in kwargs:
            # HF's PretrainedConfig default: num_labels (else 2) labels named LABEL_i.
            n = int(d.get("num_labels", 2))
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "SegformerConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a SegFormer checkpoint directory needs a config.json") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                "re-download or re-export the checkpoint's config.json"
            ) from None
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
        n = self.num_encoder_blocks
        per_stage = ("depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads",
                     "mlp_ratios")
        for name in per_stage:
            values = getattr(self, name)
            if len(values) != n:
                raise ConfigError(f"{name} has {len(values)} entries but num_encoder_blocks is {n}")
            if any(int(v) != v or v < 1 for v in values):
                raise ConfigError(f"{name} must hold positive integers, got {list(values)}")
        for c, h in zip(self.hidden_sizes, self.num_attention_heads):
            if c % h:
                raise ConfigError(f"hidden size {c} is not divisible by its {h} attention heads")
        if self.hidden_act != "gelu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; SegFormer uses 'gelu'")
        if self.num_channels < 1 or self.decoder_hidden_size < 1:
            raise ConfigError("num_channels and decoder_hidden_size must be positive")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ConfigError("id2label keys must be 0..num_labels-1")


# PyTorch's nn.LayerNorm / nn.BatchNorm2d default; what HF's SegFormer actually runs with.
LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5

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
