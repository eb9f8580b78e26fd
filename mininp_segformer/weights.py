"""Checkpoints in the Hugging Face layout: a directory with `config.json` + `model.safetensors`.

Tensors keep the Hub's on-disk key names (`segformer.encoder.block.S.B.attention.self.query.weight`, ...), which
transformers 4.x and 5.x both read and write. `expected_shapes` spells out every key a checkpoint must hold, so a
load is strict: missing, unexpected and mis-shaped tensors are all reported together in one error.

A safetensors file is read here, by one path for every dtype: its header is checked with the rules of safetensors'
own validator (and a far smaller size limit) before a byte of tensor data is read, so a truncated, corrupt or
crafted file gets a message that says what is wrong; then each tensor is read from its own bytes, and float16 and
bfloat16 (which NumPy cannot represent) are widened to float32. Nothing is ever unpickled.

For fine-tuning, `fit_state_dict` fits a checkpoint to another head or label set as transformers'
`from_pretrained(..., ignore_mismatched_sizes=True)` does (new tensors from `init_weights`, transformers' rules), and
`save_pretrained` writes a model back in the Hub layout, atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from .config import SegformerConfig, open_regular_file
from .errors import CheckpointError, ConfigError, SegformerError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"

# Heads a checkpoint can carry: the architectures of transformers that these weights map onto.
SEMANTIC = "SegformerForSemanticSegmentation"
CLASSIFICATION = "SegformerForImageClassification"
BACKBONE = "SegformerModel"

# safetensors allows a 100 MB header; a SegFormer-B5 header is ~150 KB. 8 MiB rejects a header built to exhaust
# time and memory (100 MB: 40 s and 2.8 GB to parse) before it is read, and leaves room for 50 times the largest
# real one.
MAX_HEADER_BYTES = 8 * 1024 * 1024
# safetensors dtype -> how its bytes are read (little-endian). NumPy has no bfloat16: its 16 bits are read as uint16
# and widened by `_as_float32`. (The 8-bit float formats are refused: no SegFormer checkpoint uses them.)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in _DTYPES.items()}
_USIZE = 2**64  # safetensors' shapes and offsets are Rust usize: larger values overflow its validator


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
# Buffers, not parameters: BatchNorm's running statistics (read by inference, never trained) and the bookkeeping.
_BUFFER_SUFFIXES = ("running_mean", "running_var", *_IGNORED_SUFFIXES)


def is_parameter(name: str) -> bool:
    """Whether the tensor of Hub name `name` is a trainable parameter (not a BatchNorm buffer)."""
    return not name.endswith(_BUFFER_SUFFIXES)


def count_parameters(state_or_config, head: str = SEMANTIC) -> int:
    """Trainable parameters, as transformers' `num_parameters()` counts them: BatchNorm's running statistics and
    num_batches_tracked are buffers and left out.

    `state_or_config`: a state dict ({Hub name: array}), or a SegformerConfig, counted from the tensors
    `expected_shapes(config, head)` lists (so no weights are needed).
    """
    if isinstance(state_or_config, SegformerConfig):
        sizes = {k: math.prod(shape) for k, shape in expected_shapes(state_or_config, head).items()}
    else:
        sizes = {k: np.size(v) for k, v in state_or_config.items()}
    return sum(int(n) for k, n in sizes.items() if is_parameter(k))


def _no_duplicate_keys(pairs):
    """json.loads hook: a key given twice would let two readers see two different tensors under one name."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice[:80]!r} appears twice")
    return out


def _parse_header(raw: bytes) -> dict:
    """The header bytes as a JSON object, checked as safetensors does: UTF-8, starts with "{", valid JSON."""
    if not raw.startswith(b"{"):
        raise ValueError("its header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise ValueError(f"its header is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise ValueError("its header nests too deeply") from None
    except ValueError as e:
        raise ValueError(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def _tensor_entry(name: str, info) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, checked as safetensors' TensorInfo and validate() do:
    a known dtype, non-negative integer dims and offsets, byte size == dtype size x prod(shape)."""
    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _USIZE

    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
        raise ValueError(f"tensor {name!r} needs dtype, shape and data_offsets, got {str(info)[:80]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and all(count(d) for d in shape)):
        raise ValueError(f"tensor {name!r} has shape {str(shape)[:80]}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(o) for o in offsets)):
        raise ValueError(f"tensor {name!r} has data_offsets {str(offsets)[:80]}, not [begin, end]")
    begin, end = offsets
    nbytes = _ITEMSIZE[dtype]
    for d in shape:  # safetensors' checked_mul: stop at the first overflow, never build a huge integer
        nbytes *= d
        if nbytes >= _USIZE:
            raise ValueError(f"tensor {name!r}: shape {shape} overflows")
    if end < begin or end - begin != nbytes:
        raise ValueError(f"tensor {name!r} has data_offsets [{begin}, {end}] but its {dtype} shape {shape} needs "
                         f"{nbytes} bytes")
    return begin, end, dtype, tuple(shape)


def _validate(header: dict, data_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Check a parsed header against a data section of `data_size` bytes with the rules of safetensors' validator
    (safetensors/src/tensor.rs, Metadata::validate and read_metadata): `__metadata__` a map of string to string;
    every tensor well formed (`_tensor_entry`); sorted by offset, the tensors lie back to back from byte 0 --
    no gap, no overlap -- and the last ends exactly at the end of the file.
    Returns (name, dtype, shape) in file order."""
    meta = header.pop("__metadata__", None)  # safetensors reads it as Option<HashMap<String, String>>
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"its __metadata__ must map strings to strings, got {str(meta)[:80]}")
    entries = sorted((*_tensor_entry(name, info), name) for name, info in header.items())
    start = 0
    for begin, end, _, _, name in entries:
        if begin != start:
            problem = "overlaps the tensor before it" if begin < start else f"leaves a gap of {begin - start} bytes"
            raise ValueError(f"tensor {name!r} starts at byte {begin} of the data, where the previous tensor ends at "
                             f"{start}: it {problem} (tensors must lie back to back)")
        start = end
    if start > data_size:
        raise ValueError(f"its tensors need {start:,} bytes of data but the file holds {data_size:,} (it is truncated)")
    if start < data_size:
        raise ValueError(f"it holds {data_size - start:,} bytes after its last tensor, which no tensor accounts for")
    return [(name, dtype, shape) for _, _, dtype, shape, name in entries]


def _as_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float16 / float64 -> float32; bfloat16 (read as uint16) -> float32 by putting its bits in the top half."""
    if dtype == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32) if dtype in ("F16", "F64") else x


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; float16/bfloat16/float64 become float32.

    One path for every dtype: the header is checked first (`_validate`), then each tensor is read from its own
    bytes into a fresh array. A file that is not a regular file, too small, too large in its header, not JSON or
    inconsistent raises a CheckpointError that names the file and the problem.
    """
    path = Path(path)
    fix = f"re-download or re-export {path.name}"
    with open_regular_file(path, CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path} is {'empty' if size == 0 else 'truncated'} ({size} bytes): {fix}")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a SegFormer safetensors file: its header claims {n:,} bytes, more "
                                  f"than the {MAX_HEADER_BYTES:,} this reader accepts (real headers are < 1 MB); "
                                  f"{fix}")
        if n > size - 8:
            raise CheckpointError(f"{path} is not a valid safetensors file: its header claims {n:,} bytes but the "
                                  f"file has {size:,}; {fix}")
        try:
            tensors = _validate(_parse_header(f.read(n)), data_size=size - 8 - n)
        except ValueError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}; {fix}") from None
        out = {}
        for name, dtype, shape in tensors:  # in file order: the data is read front to back, once
            x = np.empty(shape, dtype=_DTYPES[dtype])
            if f.readinto(x.reshape(-1).view(np.uint8)) != x.nbytes:
                raise CheckpointError(f"{path} changed while it was read (tensor {name!r} is cut short); {fix}")
            out[name] = _as_float32(x, dtype)
    return out


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """safetensors' `save_file`, and then the mode any new file gets (`give_usual_mode`)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    give_usual_mode(path)


def give_usual_mode(path: str | Path) -> None:
    """Set `path` to the mode any new file gets: 0o666 less the umask. safetensors 0.8 writes through a temporary file
    created 0o600 and renames it into place (safetensors issue #782), which would keep a saved model from the other
    users of a shared machine, or from a container's unprivileged user. A file system without Unix modes (FAT, some
    network mounts) refuses the chmod: the file is written all the same."""
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError:
        pass


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it, the only way to read it, and straight back
    (for an instant the whole process has umask 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped, non-float and non-finite (NaN, inf)
    tensor (strict loading: NaN classifier weights would otherwise give class 0 everywhere, silently)."""
    expected = expected_shapes(config, head)
    present = {k for k in state if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, config expects {expected[k]}"
        for k in set(expected) & present
        if tuple(state[k].shape) != expected[k]
    )
    not_float = sorted(k for k in set(expected) & present if state[k].dtype not in (np.float32, np.float64))
    not_finite = sorted(
        f"{k}: {np.count_nonzero(~np.isfinite(state[k])):,} of {state[k].size:,} values are NaN or inf"
        for k in set(expected) & present
        if state[k].dtype.kind == "f" and not np.isfinite(state[k]).all()
    )
    mismatch = missing or unexpected or wrong or not_float
    if not (mismatch or not_finite):
        return

    def listing(title, items, limit=12):
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more

    msg = f"{source} does not match its config ({head}):" if mismatch else f"{source} cannot be used ({head}):"
    if missing:
        msg += listing("missing", missing)
    if unexpected:
        msg += listing("unexpected", unexpected)
    if wrong:
        msg += listing("wrong shape", wrong)
    if not_float:
        msg += listing("not floating point", not_float)
    if not_finite:
        msg += listing("not finite", not_finite)
    if mismatch:
        msg += ("\n  Check that config.json and model.safetensors come from the same model (same variant and "
                "num_labels).")
    if not_finite:
        msg += ("\n  NaN or inf weights make every output meaningless (a diverged training run or a damaged file): "
                "re-download or re-export the weights.")
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = config.to_dict()
    d.setdefault("architectures", [detect_head(state)])
    if not d["architectures"]:
        d["architectures"] = [detect_head(state)]
    if np.dtype(dtype) != np.float32:  # transformers 5 loads a model in the stored dtype unless the config names
        d["dtype"] = "float32"  # one, and its CPU convolutions reject fp16: this makes it upcast on loading
    (directory / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    # .copy(order="C"), not np.ascontiguousarray, which would turn the 0-d num_batches_tracked into shape (1,)
    tensors = {k: (v.astype(dtype) if v.dtype.kind == "f" else v).copy(order="C") for k, v in state.items()}
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
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


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `unflatten`: `{"a": {"b": [{"c": x}]}}` -> `{"a.b.0.c": x}`, Hub names again."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, np.ndarray] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Model surgery: a checkpoint fitted to another head or label set, as HF's
# `from_pretrained(..., num_labels=..., ignore_mismatched_sizes=True)` fits it.

# load(head=...) accepts these short names as well as the transformers class names.
HEADS = {"semantic": SEMANTIC, "classification": CLASSIFICATION, "backbone": BACKBONE}


def head_class(head: str) -> str:
    """"semantic" / "classification" / "backbone" (or a transformers class name) -> the class name."""
    if head in HEADS.values():
        return head
    if head not in HEADS:
        raise CheckpointError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
    return HEADS[head]


def init_weights(shapes: dict[str, tuple[int, ...]], initializer_range: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh float32 tensors for `shapes` ({Hub name: shape}), as transformers initialises a new SegFormer layer.

    `SegformerPreTrainedModel._init_weights` (transformers 4.x; 5.x's generic `PreTrainedModel._init_weights` does
    the same): nn.Linear / nn.Conv2d weights ~ N(0, initializer_range) (no fan-in or fan-out scaling), their biases
    0; LayerNorm and BatchNorm weights 1, biases 0; BatchNorm's running_mean 0, running_var 1 (torch's reset). A
    weight of 2 or more dimensions is a Linear or Conv2d one, a 1-D weight a norm's. Drawn in the order of `shapes`
    from `rng`, so a seeded Generator gives the same tensors every time.
    """
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) >= 2:
            x = rng.normal(0.0, initializer_range, size=shape)
        elif key.endswith((".bias", "running_mean")):
            x = np.zeros(shape)
        elif key.endswith((".weight", "running_var")):
            x = np.ones(shape)
        else:
            raise ValueError(f"no initialisation rule for {key!r}")
        out[key] = x.astype(np.float32)
    return out


def _rename_for(key: str, head: str) -> str:
    """A Hub key under the layout of `head`: the encoder is `encoder.*` in a bare SegformerModel and
    `segformer.encoder.*` under a head (HF's base_model_prefix)."""
    bare = key.removeprefix("segformer.")
    if head == BACKBONE:
        return bare
    return f"segformer.{bare}" if bare.startswith("encoder.") else key


@dataclass(frozen=True)
class Surgery:
    """What `fit_state_dict` changed: keys newly initialised (absent from the checkpoint), keys re-initialised
    because their shape changed ((key, shape in the checkpoint, shape now)), checkpoint keys left unused."""

    new: tuple[str, ...] = ()
    resized: tuple[tuple[str, tuple, tuple], ...] = ()
    unused: tuple[str, ...] = ()

    def __bool__(self):
        return bool(self.new or self.resized or self.unused)

    def summary(self, model: str, source: str) -> str:
        """One line, as transformers warns after such a load."""
        def grouped(keys):
            groups: dict[str, int] = {}
            for k in keys:
                top = k.split(".")[0]
                groups[top] = groups.get(top, 0) + 1
            return ", ".join(f"{top}.* ({n})" for top, n in groups.items())

        parts = []
        if self.new:
            parts.append(f"{len(self.new)} tensors newly initialised, not in the checkpoint: {grouped(self.new)}")
        if self.resized:
            parts.append(f"{len(self.resized)} re-initialised, their shapes differ: " + ", ".join(
                f"{k} {tuple(a)} -> {tuple(b)}" for k, a, b in self.resized))
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint tensors unused: {grouped(self.unused)}")
        return (f"{model} from {source}: " + "; ".join(parts)
                + (". Train the model before using it for predictions." if self.new or self.resized else "."))


def fit_state_dict(state: dict[str, np.ndarray], config: SegformerConfig, head: str,
                   seed: int | None = None) -> tuple[dict[str, np.ndarray], Surgery]:
    """The tensors of a (strictly loaded) checkpoint fitted to `config` and `head`, and what was changed.

    Tensors whose name (after moving the encoder under or out of `segformer.`) and shape fit are kept; those the
    new layout lacks or whose shape differs (a classifier for another number of labels) get `init_weights` from
    `np.random.default_rng(seed)` (None: fresh entropy, like an unseeded torch); the rest is left unused -- as
    HF's `from_pretrained(..., ignore_mismatched_sizes=True)` does. `config` must differ from the checkpoint's
    only in its labels and head (its encoder shapes are those of the checkpoint), so only heads are re-initialised.
    """
    expected = expected_shapes(config, head)
    renamed = {_rename_for(k, head): v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    kept = {k: v for k, v in renamed.items() if k in expected and tuple(v.shape) == expected[k]}
    resized = tuple((k, tuple(renamed[k].shape), expected[k]) for k in expected
                    if k in renamed and k not in kept)
    fresh = init_weights({k: s for k, s in expected.items() if k not in kept}, config.initializer_range,
                         np.random.default_rng(seed))
    if any(not k.startswith(("decode_head.", "classifier.")) for k, _, _ in resized):
        raise CheckpointError("the checkpoint's encoder does not fit the config (" + ", ".join(
            f"{k} {a} vs {b}" for k, a, b in resized[:3]) + "); only a head can be re-initialised")
    surgery = Surgery(new=tuple(k for k in expected if k not in renamed), resized=resized,
                      unused=tuple(sorted(k for k in renamed if k not in expected)))
    out = {k: kept[k] if k in kept else fresh[k] for k in expected}
    check_state_dict(out, config, head, source="the fitted checkpoint")
    return out, surgery


# ---------------------------------------------------------------------------------------------------------------
# Saving a model in the Hub layout, atomically


def preprocessor_config(image_size: tuple[int, int]) -> dict:
    """`preprocessor_config.json` of SegformerImageProcessor for inputs of `image_size` (H, W): its defaults
    (resize with PIL's bilinear filter, rescale by 1/255, ImageNet mean and std, no label reduction)."""
    from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESCALE_FACTOR

    return {"do_normalize": True, "do_reduce_labels": False, "do_rescale": True, "do_resize": True,
            "image_mean": list(IMAGENET_MEAN), "image_processor_type": "SegformerImageProcessor",
            "image_std": list(IMAGENET_STD), "resample": 2,  # PIL.Image.BILINEAR
            "rescale_factor": RESCALE_FACTOR, "size": {"height": int(image_size[0]), "width": int(image_size[1])}}


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SAVED_FILES = (WEIGHTS_NAME, PREPROCESSOR_NAME, CONFIG_NAME)  # save_pretrained renames them in this order


def save_pretrained(directory: str | Path, config: SegformerConfig, state: dict[str, np.ndarray],
                    image_size: tuple[int, int]) -> Path:
    """Write `config.json`, `model.safetensors` (float32, Hub names) and `preprocessor_config.json` to `directory`,
    atomically: all three are written and fsync'ed in a staging directory beside or inside `directory` first, then
    renamed into place. A new `directory` appears whole (one rename); an existing one gets the three files
    replaced one by one (other files in it are left alone). A failure while writing (a full disk) removes the
    staging directory, leaves what `directory` held untouched, and raises a SegformerError.
    """
    directory = Path(directory)
    state = dict(state)
    for key in [k for k in state if k.endswith(".running_mean")]:  # torch's BatchNorm bookkeeping, as HF saves it
        tracked = key.replace(".running_mean", ".num_batches_tracked")
        state[tracked] = np.asarray(state.get(tracked, 0)).astype(np.int64).reshape(())
    if directory.exists() and not directory.is_dir():
        raise SegformerError(f"cannot save to {directory}: it is a file; pass a directory")
    fresh = not directory.exists()
    parent = directory.parent if fresh else directory
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{directory.name}.{os.getpid()}.{os.urandom(4).hex()}.saving"
        staging.mkdir()
    except OSError as e:
        raise SegformerError(f"cannot save to {directory}: {e.strerror or e}") from None
    replaced = []
    try:
        save_checkpoint(staging, config, state)
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_config(image_size), indent=2) + "\n",
                                                 encoding="utf-8")
        for name in SAVED_FILES:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        if fresh:
            os.replace(staging, directory)
        else:
            for name in SAVED_FILES:
                os.replace(staging / name, directory / name)
                replaced.append(name)
            staging.rmdir()
        fsync_dir(parent)
    except BaseException as e:  # a full disk, a permission, Ctrl-C: no staging directory is left behind
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        kept = ("was not created" if fresh else "still holds what it held before" if not replaced
                else f"has only {', '.join(replaced)} replaced (the rest is the previous checkpoint's)")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SegformerError(f"saving the model to {directory} failed ({reason}); {directory} {kept}. "
                             "Free some disk space (or choose another directory) and save again") from None
    return directory
