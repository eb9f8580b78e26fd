"""An AVX2 machine on an AVX-512 one, for the benchmark: every library in a process takes its AVX2 code path.

NumPy, OpenBLAS, LLVM (numba), ONNX Runtime and torch each pick their SIMD kernels from what the CPU's `cpuid`
instruction reports. `OPENBLAS_CORETYPE=Haswell NUMBA_CPU_NAME=haswell` moves only mininp_segformer's two libraries
to AVX2, while ONNX Runtime and torch keep their AVX-512 kernels: a ratio measured that way sets an AVX2 engine
against AVX-512 ones. `environment()` gives a process a CPU without AVX-512 instead, for every library alike. Linux's
cpuid faulting (`arch_prctl(ARCH_SET_CPUID, 0)`; Intel CPUs since Ivy Bridge, `cpuid_fault` in /proc/cpuinfo) makes
each `cpuid` trap, and a small preloaded library, `hide_avx512.c`, answers it with the AVX-512 bits cleared. The
core stays the same (its caches, its two FMA ports), so this measures the AVX2 code on this CPU, not another CPU.

    python -m mininp_segformer.tools.bench --cpu avx2     # the benchmark, every framework on its AVX2 code
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ..errors import MachineError

SOURCE = Path(__file__).with_name("hide_avx512.c")


def cpu_features() -> dict[str, bool]:
    """The CPU features this process sees, as LLVM reads them from `cpuid` (hidden ones read False)."""
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def is_x86_64() -> bool:
    """Whether this is an x86-64 machine (Linux and macOS say "x86_64", Windows "AMD64")."""
    return platform.machine().lower() in ("x86_64", "amd64")


def simd_level() -> str:
    """"AVX-512", "AVX2" or "SSE" on x86-64 (the widest vectors this process's libraries may use, and whether
    AVX-512 is hidden from it); the machine's name elsewhere."""
    if not is_x86_64():
        return platform.machine()
    features = cpu_features()
    level = "AVX-512" if features.get("avx512f") else "AVX2" if features.get("avx2") else "SSE"
    return f"{level}, AVX-512 hidden" if preloaded() else level


def preloaded() -> bool:
    """Whether this process runs with the shim preloaded (started with `environment()`'s variables)."""
    return "hide_avx512" in os.environ.get("LD_PRELOAD", "")


def environment(env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) in which new processes see no AVX-512: `hide_avx512.c` is built
    once into the user's cache and preloaded. Python's faulthandler is turned off in it: its SIGSEGV handler would
    take the trapped cpuid instructions from the shim's. Raises `MachineError` where this cannot work."""
    if platform.system() != "Linux" or not is_x86_64():
        raise MachineError(f"hiding AVX-512 needs Linux on x86-64, not {platform.system()} on {platform.machine()}; "
                           "run the benchmark on an AVX2 machine instead")
    if "cpuid_fault" not in _cpu_flags():
        raise MachineError("this CPU (or its hypervisor) offers no cpuid faulting ('cpuid_fault' is missing from "
                           "/proc/cpuinfo), which hiding AVX-512 needs; run the benchmark on an AVX2 machine, or set "
                           "OPENBLAS_CORETYPE=Haswell NUMBA_CPU_NAME=haswell to move mininp_segformer alone to AVX2")
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), str(_build())]))  # after any sanitiser's
    for name in ("PYTHONFAULTHANDLER", "PYTHONDEVMODE"):  # both turn faulthandler on
        env.pop(name, None)
    return env


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build() -> Path:
    """hide_avx512.c compiled into ~/.cache/mininp_segformer (or $XDG_CACHE_HOME's), named by a hash of the source."""
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mininp_segformer"
    lib = cache / f"hide_avx512-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if any(c in str(lib) for c in " :"):
        raise MachineError(f"LD_PRELOAD cannot name {lib} (a space or colon in the path): set XDG_CACHE_HOME to a "
                           "directory without one")
    if lib.exists():
        return lib
    compiler = _compiler()
    if compiler is None:
        raise MachineError("hiding AVX-512 builds a small C library (tools/hide_avx512.c), and no C compiler was "
                           "found: install gcc (or set CC)")
    partial = lib.with_name(f"{lib.name}.{os.getpid()}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise MachineError(f"{compiler} could not build {SOURCE.name} (exit status {done.returncode}): "
                               f"{done.stderr.strip()[-500:] or 'no message'}")
        os.replace(partial, lib)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MachineError(f"could not build {SOURCE.name} into {cache}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)
    return lib
