"""Threads and CPU code paths: the numba kernels' threads and BLAS's together, and what a run's float32 rounding
depends on (for logs and bug reports)."""

from __future__ import annotations

import ctypes
import os

import llvmlite.binding as llvm
import numba


def set_num_threads(n: int | None = None) -> int:
    """Use `n` threads (default: all cores) for the numba kernels and for BLAS; returns the number set.

    Also read at import from the environment variable MININP_SEGFORMER_THREADS.
    """
    n = int(n or os.cpu_count() or 1)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _set_blas_threads(n)
    return n


def _set_blas_threads(n: int) -> None:
    """Tell NumPy's BLAS (OpenBLAS, or MKL / BLIS through threadpoolctl when installed) to use n threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(n, user_api="blas")
        return
    # Without threadpoolctl: call OpenBLAS's own setter in the library NumPy loaded (Linux, macOS).
    setter = _openblas_function("set_num_threads")
    if setter is not None:
        setter(ctypes.c_int(n))


def code_paths() -> dict[str, str]:
    """The CPU code paths that float32 results depend on, for logs and bug reports.

    `blas`: the kernel set OpenBLAS chose for this CPU (e.g. SkylakeX for AVX-512, Haswell or Zen for AVX2; set by
    OPENBLAS_CORETYPE); `numba`: the CPU numba compiles the kernels for (set by NUMBA_CPU_NAME). Two machines that
    differ in either round float32 sums differently.
    """
    corename = _openblas_function("get_corename")
    if corename is not None:
        corename.restype = ctypes.c_char_p
    blas = corename().decode() if corename is not None else "unknown (not OpenBLAS, or not found)"
    return {"blas": blas, "numba": numba.config.CPU_NAME or llvm.get_host_cpu_name()}


def _openblas_function(name: str):
    """OpenBLAS's C function `openblas_<name>` (under the names NumPy's and SciPy's builds give it), or None."""
    for path in _loaded_libraries():
        if "openblas" not in os.path.basename(path).lower():
            continue
        lib = ctypes.CDLL(path)
        for symbol in (f"scipy_openblas_{name}64_", f"openblas_{name}64_", f"openblas_{name}"):
            function = getattr(lib, symbol, None)
            if function is not None:
                return function
    return None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line})
    except OSError:
        return []
