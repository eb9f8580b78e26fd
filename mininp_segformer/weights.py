"""Checkpoints in the Hugging Face layout: a directory with `config.json` + `model.safetensors`.

Tensors keep the Hub's on-disk key names (`segformer.encoder.block.S.B.attention.self.query.weight`, ...), which
transformers 4.x and 5.x both read and write. `expected_shapes` spells out every key a checkpoint must hold, so a
load is strict: missing, unexpected and mis-shaped tensors are all reported together in one error.

The header of a safetensors file is validated here before the `safetensors` package reads it, so a truncated or
corrupt file gets a message that says what is wrong, and bf16 tensors (which NumPy cannot represent) are widened
to float32 from their raw bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from .config import SegformerConfig
from .errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"

# Heads a checkpoint can carry: the architectures of transformers that these weights map onto.
SEMANTIC = "SegformerForSemanticSegmentation"
CLASSIFICATION = "SegformerForImageClassification"
BACKBONE = "SegformerModel"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}




def expected_shapes(config: SegformerConfig, head: str = SEMANTIC) -> dict[str, tuple[int, ...]]:
    """Every float tensor a checkpoint of `head` must hold, keyed by its Hub name, with its shape."""
    prefix = "" if head == BACKBONE else "segformer."
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def conv(name, n_in, n_out, k, groups=1, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in // groups, k, k)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    c_in = config.num_channels
    for s in range(config.num_encoder_blocks):
        c = config.hidden_sizes[s]
        enc = f"{prefix}encoder"
        conv(f"{enc}.patch_embeddings.{s}.proj", c_in, c, config.patch_sizes[s])
        norm(f"{enc}.patch_embeddings.{s}.layer_norm", c)
        for b in range(config.depths[s]):
            blk = f"{enc}.block.{s}.{b}"
            norm(f"{blk}.layer_norm_1", c)
            for qkv in ("query", "key", "value"):
                linear(f"{blk}.attention.self.{qkv}", c, c)
            if config.sr_ratios[s] > 1:
                conv(f"{blk}.attention.self.sr", c, c, config.sr_ratios[s])
                norm(f"{blk}.attention.self.layer_norm", c)
            linear(f"{blk}.attention.output.dense", c, c)
            norm(f"{blk}.layer_norm_2", c)
            hidden = int(c * config.mlp_ratios[s])
            linear(f"{blk}.mlp.dense1", c, hidden)
            conv(f"{blk}.mlp.dwconv.dwconv", hidden, hidden, 3, groups=hidden)
            linear(f"{blk}.mlp.dense2", hidden, c)
        norm(f"{enc}.layer_norm.{s}", c)
        c_in = c

    if head == SEMANTIC:
        d = config.decoder_hidden_size
        for s, c in enumerate(config.hidden_sizes):
            linear(f"decode_head.linear_c.{s}.proj", c, d)
        conv("decode_head.linear_fuse", d * config.num_encoder_blocks, d, 1, bias=False)
        norm("decode_head.batch_norm", d)
        shapes["decode_head.batch_norm.running_mean"] = (d,)
        shapes["decode_head.batch_norm.running_var"] = (d,)
        conv("decode_head.classifier", d, config.num_labels, 1)
    elif head == CLASSIFICATION:
        linear("classifier", config.hidden_sizes[-1], config.num_labels)
    elif head != BACKBONE:
        raise ValueError(f"unknown head {head!r}")
    return shapes


# transformers 5 renamed SegFormer's modules (its conversion_mapping.py), though it still reads and writes the
# names above on disk. A state dict taken from a transformers-5 model in memory has the new names; this table maps
# between the two. "{i}" stands for a stage index.
_TRANSFORMERS5_NAMES = [
    ("encoder.patch_embeddings.{i}.", "stages.{i}.patch_embeddings."),
    ("encoder.block.{i}.", "stages.{i}.blocks."),
    ("encoder.layer_norm.{i}.", "stages.{i}.layer_norm."),
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.self.sr.", "attention.sequence_reduction.sequence_reduction."),
    ("attention.self.layer_norm.", "attention.sequence_reduction.layer_norm."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
    ("layer_norm_1.", "layernorm_before."),
    ("layer_norm_2.", "layernorm_after."),
    ("decode_head.linear_c.", "decode_head.linear_projections."),
]


def _renamer(pairs):
    def rule(src, dst):
        pattern = re.escape(src).replace(r"\{i\}", r"(\d+)")
        return re.compile(r"(?:^|(?<=\.))" + pattern), dst.replace("{i}", r"\1")

    rules = [rule(src, dst) for src, dst in pairs]

    def rename(key: str) -> str:
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key

    return rename


to_transformers5_name = _renamer(_TRANSFORMERS5_NAMES)
to_hub_name = _renamer([(new, old) for old, new in _TRANSFORMERS5_NAMES])
to_transformers5_name.__doc__ = "Hub on-disk key -> the name transformers 5 gives it in memory."
to_hub_name.__doc__ = "A transformers-5 in-memory key (or a Hub key, unchanged) -> the Hub on-disk key."

# Bookkeeping tensors that torch writes and inference never reads.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse and sanity-check a safetensors header; returns (header, offset of the data section)."""
    size = path.stat().st_size
    fix = f"re-download or re-export {path.name}"
    if size < 8:
        raise CheckpointError(f"{path} is {'empty' if size == 0 else 'truncated'} ({size} bytes): {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file: its header claims {n} bytes but the file has {size}; {fix}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a valid safetensors file (its header is not JSON); {fix}") from None
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} is malformed; {fix}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= begin <= end and end - begin == int(np.prod(shape, dtype=np.int64)) * itemsize):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets that do not match its shape; {fix}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}; {fix}"
            )
    return header, data_start


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; float16/bfloat16 are upcast to float32."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    header, data_start = _read_header(path)
    bf16 = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"]
    try:
        if bf16:
            # NumPy has no bfloat16: read the raw 16 bits and put them in the top half of a float32.
            out = {}
            with open(path, "rb") as f:
                for k, v in header.items():
                    if k == "__metadata__":
                        continue
                    begin, end = v["data_offsets"]
                    f.seek(data_start + begin)
                    buf = np.frombuffer(f.read(end - begin), dtype=_DTYPES[v["dtype"]] or "<u2")
                    if v["dtype"] == "BF16":
                        buf = (buf.astype(np.uint32) << 16).view(np.float32)
                    out[k] = buf.reshape(v["shape"])
        else:
            out = load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path} could not be read as safetensors ({e}); re-download or re-export it") from None
    for k, v in out.items():
        if v.dtype in (np.float16, np.float64):
            out[k] = v.astype(np.float32)
    return out


def detect_head(keys, config: SegformerConfig | None = None) -> str:
    """Which transformers class a set of keys was saved from."""
    keys = set(keys)
    if any(k.startswith("decode_head.") for k in keys):
        return SEMANTIC
    if "classifier.weight" in keys:
        return CLASSIFICATION
    if any(k.startswith("encoder.") for k in keys):
        return BACKBONE
    if config is not None and config.architectures:
        return {SEMANTIC: SEMANTIC, CLASSIFICATION: CLASSIFICATION}.get(config.architectures[0], SEMANTIC)
    return SEMANTIC


def check_state_dict(state: dict[str, np.ndarray], config: SegformerConfig, head: str, source: str = "checkpoint"):
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor (strict loading)."""
    expected = expected_shapes(config, head)
    present = {k for k in state if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, config expects {expected[k]}"
        for k in set(expected) & present
        if tuple(state[k].shape) != expected[k]
    )
    not_float = sorted(k for k in set(expected) & present if state[k].dtype != np.float32)
    if not (missing or unexpected or wrong or not_float):
        return

    def listing(title, items, limit=12):
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more

    msg = f"{source} does not match its config ({head}):"
    if missing:
        msg += listing("missing", missing)
    if unexpected:
        msg += listing("unexpected", unexpected)
    if wrong:
        msg += listing("wrong shape", wrong)
    if not_float:
        msg += listing("not floating point", not_float)
    msg += "\n  Check that config.json and model.safetensors come from the same model (same variant and num_labels)."
    raise CheckpointError(msg)


def load_checkpoint(directory: str | Path) -> tuple[SegformerConfig, str, dict[str, np.ndarray]]:
    """Read and strictly check a checkpoint directory. Returns (config, head, tensors by Hub name)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(
            f"{directory} does not exist; pass a directory holding config.json and model.safetensors, "
            "or a Hub name such as nvidia/segformer-b0-finetuned-ade-512-512"
        )
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the directory holding config.json and model.safetensors")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        if (directory / "pytorch_model.bin").exists():
            raise CheckpointError(
                f"{directory} holds only pytorch_model.bin, a pickle that mininp_segformer never loads (unpickling "
                "can run arbitrary code). Convert it once with torch installed: "
                f"python weights/export_safetensors.py {directory}"
            )
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}; a checkpoint directory needs config.json and "
                              f"{WEIGHTS_NAME} (Hugging Face layout)")
    try:
        config = SegformerConfig.from_json(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    state = {to_hub_name(k): v for k, v in read_safetensors(weights).items()}
    head = detect_head(state, config)
    check_state_dict(state, config, head, source=str(weights))
    return config, head, {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def save_checkpoint(directory: str | Path, config: SegformerConfig, state: dict[str, np.ndarray],
                    dtype=np.float32) -> Path:
    """Write `config.json` + `model.safetensors` (Hub layout) to `directory`; `dtype` float16 halves the size."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = config.to_dict()
    d.setdefault("architectures", [detect_head(state)])
    if not d["architectures"]:
        d["architectures"] = [detect_head(state)]
    (directory / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    # .copy(order="C"), not np.ascontiguousarray, which would turn the 0-d num_batches_tracked into shape (1,)
    tensors = {k: (v.astype(dtype) if v.dtype.kind == "f" else v).copy(order="C") for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def unflatten(state: dict[str, np.ndarray]) -> dict:
    """`{"a.b.0.c": x}` -> `{"a": {"b": [{"c": x}]}}`: the HF module tree, with numbered children as lists."""
    tree: dict = {}
    for key, value in state.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(tree)


def random_state_dict(config: SegformerConfig, head: str = SEMANTIC, seed: int = 0,
                      stats: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Synthetic float32 weights in the real layout, deterministic for `seed` (NumPy's PCG64).

    With `stats` ({key: {"mean": m, "std": s}}, e.g. the per-tensor statistics of a real checkpoint) each tensor is
    drawn from N(m, s); otherwise matrices get std 1/sqrt(fan_in), norms weight ~ N(1, 0.1), biases ~ N(0, 0.1).
    BatchNorm's running_var is kept positive. Used by the tests, the fixture script and the benchmark.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in sorted(expected_shapes(config, head).items()):
        if stats is not None and key in stats:
            mean, std = stats[key]["mean"], stats[key]["std"]
        elif key.endswith("running_var"):
            mean, std = 1.0, 0.2
        elif len(shape) == 1:
            is_norm_weight = key.endswith(".weight")  # 1-D weights belong to LayerNorm / BatchNorm
            mean, std = (1.0, 0.1) if is_norm_weight else (0.0, 0.1)
        else:
            mean, std = 0.0, 1.0 / np.sqrt(np.prod(shape[1:]))
        x = rng.standard_normal(shape, dtype=np.float64) * std + mean
        if key.endswith("running_var"):
            x = np.abs(x) + 0.1 * max(mean, 1e-3)
        state[key] = x.astype(np.float32)
    if head == SEMANTIC:  # torch's BatchNorm bookkeeping, present in every real checkpoint
        state["decode_head.batch_norm.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return state
