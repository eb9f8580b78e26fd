"""Bounding work before it starts: an estimate of a forward pass's peak memory, and the limit it is checked against.

Attention over N tokens costs memory in N^2: B0 at 4096 x 4096 would ask NumPy for 64 GiB of stage-1 scores. So
`Segformer.__call__`, `predict` and `inference.segment` estimate what they will need first and raise `ResourceError`
(suggesting sliding windows) when it exceeds `max_memory()`:

    from mininp_segformer import memory
    memory.estimate_forward_bytes(config, 1, 1024, 2048)   # about 2.2 GiB for B0 (fused decoder)
    memory.set_max_memory("8G")                            # or MININP_SEGFORMER_MAX_MEMORY=8G, or --max-memory 8G

The default limit is the memory the machine has available now (/proc/meminfo's MemAvailable, else the physical
memory), or the container's limit (cgroup v2 memory.max) if that is lower.

And one setting of the C allocator, made at import (`keep_freed_memory`): NumPy allocates every intermediate array
anew, so the allocator's handling of large blocks decides how often the kernel has to hand the process fresh pages.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from pathlib import Path

from .config import SegformerConfig
from .errors import ResourceError
from .nn.decoder import BAND_ELEMENTS
from .nn.encoder import reduced_tokens, stage_sizes
from .threads import get_num_threads

MEMORY_ENV = "MININP_SEGFORMER_MAX_MEMORY"
# glibc's mallopt parameters and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 512 * 2**20  # freed memory a process keeps before returning it to the system
HEAP_BLOCK_BYTES = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)  # glibc's largest mmap threshold: 32 MB on 64-bit
FLOAT32 = 4
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_limit: int | float | None = None  # set_max_memory's bytes (math.inf: no limit); None: the default


def estimate_forward_bytes(config: SegformerConfig, batch: int, height: int, width: int,
                           decoder: str | None = "fused", output_attentions: bool = False) -> int:
    """An estimate of the peak memory of one forward pass on `(batch, C, height, width)` float32 `pixel_values`, in
    bytes: within about 10% of the measured rise of peak RSS for B0..B2 at 0.1 to 2 megapixels. Counted in float32
    elements per image, then times `batch`:

        input          2 x C H W                 the pixel values and their channels-last copy
        stage i        the earlier stages' maps (kept for the decoder), the block's tokens -- its input, LayerNorm,
                       query, context, output, residual sums: 8 x N_i C_i -- and the largest of
                           patch embedding   N_i k_i^2 C_{i-1}     the im2col buffer
                           attention         heads_i N_i N_r       the scores (the softmax overwrites them), plus
                                                                   the previous block's probabilities, which the
                                                                   encoder's loop holds until the block returns
                           Mix-FFN           2 x N_i m_i C_i       the expansion (mlp ratio m_i) and its dwconv
        decoder        the four stage maps + the logits, N_1 labels, + (fused) stages 2-4 projected at their own
                       sizes, (N_2 + N_3 + N_4) D, and per thread 3 bands of rows of the 1/4-resolution map in
                       flight (`decoder.BAND_ELEMENTS`, at least a row W_1 D), or (literal) 11 x N_1 D: the
                       projections upsampled to 1/4 resolution and their concatenation
        attentions     with `output_attentions`, every block's probabilities are kept: sum of depth_i heads_i N_i N_r

    `decoder`: "fused", "literal" or None (no decode head: a backbone or a classifier).
    """
    sizes = stage_sizes(config, height, width)
    tokens = [h * w for h, w in sizes]
    inputs = 2 * config.num_channels * height * width
    kept, peak, channels_in, attentions, previous = 0, 0, config.num_channels, 0, 0
    for s, ((h, w), n) in enumerate(zip(sizes, tokens)):
        c, k, heads = config.hidden_sizes[s], config.patch_sizes[s], config.num_attention_heads[s]
        scores = heads * n * reduced_tokens(h, w, config.sr_ratios[s])
        largest = max(n * k * k * channels_in, scores + max(scores, previous), 2 * n * config.mlp_ratios[s] * c)
        peak = max(peak, kept + 8 * n * c + largest)
        attentions += config.depths[s] * scores
        kept, channels_in, previous = kept + n * c, c, scores
    if decoder is not None:
        d, n1 = config.decoder_hidden_size, tokens[0]
        band = min(n1, max(BAND_ELEMENTS // d, sizes[0][1])) * d  # a band's rows of the (N_1, D) sum
        head = sum(tokens[1:]) * d + 3 * band * get_num_threads() if decoder == "fused" else 11 * n1 * d
        peak = max(peak, kept + head + n1 * config.num_labels)
    held = attentions if output_attentions else 0
    return FLOAT32 * batch * (inputs + peak + held)


def on_glibc() -> bool:
    """Whether the process runs on GNU libc (not musl, macOS or Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or no such name (macOS, musl)
        return False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, instead of returning it to the system at once; True if done.

    With glibc's defaults, blocks over 128 KB -- every activation of a forward pass -- are mmap'd and unmapped one by
    one (its adaptive threshold only follows blocks up to the largest freed so far), so each pass has the kernel fault
    in and zero fresh pages: about 7000 page faults per B0 pass at 512 x 512, which cost 15-25 % of its time
    (docs/performance.md, "Memory"). Here blocks up to HEAP_BLOCK_BYTES come from the heap, and the heap keeps up to
    KEEP_FREED_BYTES of freed memory. A pass needs no more memory than before, but the process keeps what it freed,
    so its RSS stays nearer its peak (and a peak RSS measured over many steps can come out a little higher).

    Left alone off glibc, and when the environment already tunes malloc (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, or glibc.malloc.* in GLIBC_TUNABLES; set MALLOC_TRIM_THRESHOLD_=131072, glibc's
    default, to opt out).
    """
    if (any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")) or not on_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already uses
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    heap = mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)
    kept = mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    return bool(heap and kept)


def parse_size(text) -> int | float:
    """A memory size -> bytes: a number, or text such as "8G", "512M", "1.5GiB", "4000000000"; "none" ->
    math.inf (no limit). Units are powers of 1024. A ResourceError for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = text
    elif str(text).strip().lower() == "none":
        return math.inf
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
        if match is None:
            raise ResourceError(f"{text!r} is not a memory size; give bytes or a number with K, M, G or T (e.g. "
                                "8G), or 'none' for no limit")
        value = int(float(match[1]) * UNITS[match[2].upper()])
    if not value >= 1:  # NaN fails too
        raise ResourceError(f"a memory limit must be at least 1 byte, got {text!r}")
    return value


def set_max_memory(limit) -> None:
    """Set the memory limit of this process: bytes, a size text (see `parse_size`), "none" (no limit), or None to
    go back to the default (the environment variable MININP_SEGFORMER_MAX_MEMORY, else `available_memory()`)."""
    global _limit
    _limit = None if limit is None else parse_size(limit)


def available_memory() -> int | float:
    """Bytes this process may still use: MemAvailable of /proc/meminfo (else the physical memory), or the cgroup
    v2 limit minus its usage if that is lower. math.inf if nothing can be read."""
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        found += [int(m[1]) * 1024 for m in re.finditer(r"^MemAvailable:\s+(\d+) kB", meminfo, flags=re.M)]
    except OSError:
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found, default=math.inf)


def max_memory() -> int | float:
    """The limit in bytes that work is checked against (math.inf: none): `set_max_memory`'s value, else
    $MININP_SEGFORMER_MAX_MEMORY, else `available_memory()`."""
    if _limit is not None:
        return _limit
    if os.environ.get(MEMORY_ENV):
        try:
            return parse_size(os.environ[MEMORY_ENV])
        except ResourceError as e:
            raise ResourceError(f"{MEMORY_ENV}: {e}") from None
    return available_memory()


def size_text(n: float) -> str:
    """Bytes for people: "512 B", "37.5 MiB", "129.4 GiB"."""
    unit = max((u for u in UNITS if UNITS[u] <= max(n, 1)), key=UNITS.get)
    return f"{n:.0f} B" if unit == "" else f"{n / UNITS[unit]:.1f} {unit}iB"


def check_memory(need: int, what: str, hint: str) -> None:
    """A ResourceError if `need` bytes exceed `max_memory()`: it names `what` would need them, and `hint` how to
    need less."""
    limit = max_memory()
    if need > limit:
        raise ResourceError(f"{what} would need about {size_text(need)} of memory, more than the limit of "
                            f"{size_text(limit)}; {hint}. (The limit defaults to the memory available; set it with "
                            f"--max-memory or {MEMORY_ENV}, e.g. 16G.)")
