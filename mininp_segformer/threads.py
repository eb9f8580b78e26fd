"""Threads and CPU code paths: the numba kernels' threads and BLAS's together, and what a run's float32 rounding
depends on (for logs and bug reports).

The kernels are compiled as plain serial loops over a range of rows that release the GIL (`nogil=True`);
`parallel_rows` runs one block of rows per thread on a small thread pool. numba's own `parallel=True` (prange) would
do the same, but compiles each kernel 4-7 times slower, and that compile is what a fresh install waits for
(docs/performance.md, "Cold start").

Work made of independent pieces too small to split well (slide mode's windows: batch-1 forward passes whose thin
products OpenBLAS splits poorly) goes the other way: `map_one_thread_each` runs one piece per thread, each on one
thread (its kernels and its BLAS calls).

While a forward or backward pass runs on several threads, `keep_cores_awake` keeps the cores it uses from sleeping
between those hand-overs (as ONNX Runtime's and OpenMP's spinning thread pools do).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import llvmlite.binding as llvm
import numba
import numpy as np

MIN_BLOCK = 16384  # elements: a block of rows smaller than this is not worth handing to another thread (~20 us)
# A pass that only streams its rows through once (a bias add after a product) gains nothing from a second thread
# until the array outgrows the caches (likely because the rows the other thread reads sit in the cache of the core
# that wrote them). After a product on 2 cores (docs/performance.md, "Threads"): the bias add of a 2 MB output takes
# 0.09 ms on one thread and 0.25 ms split in two; of 8 MB, 0.34 and 0.38 ms; of 64 MB, 4.7 and 2.8 ms.
STREAM_MIN_BLOCK = 1 << 21  # elements (8 MB of float32) per block: on 2 threads, outputs of 16 MB and more split
_threads = None  # set_num_threads's n; None: every core numba may use
_pool, _pool_size = None, 0  # the ThreadPoolExecutor of the blocks after the first, made on first use
_pool_lock = threading.Lock()
_local = threading.local()  # .threads: 1 in `map_one_thread_each`'s workers, whose kernels must not split further
_each_lock = threading.Lock()
_each_calls, _each_blas = 0, None  # map_one_thread_each calls running; BLAS's threads before the first of them
SPIN = os.environ.get("MININP_SEGFORMER_SPIN", "1") != "0"  # keep_cores_awake on (the default) or off
SPIN_YIELDS = 1 << 20  # a spinner goes back to Python after this many yields (0.2 s here), so it never spins lost
_awake_lock = threading.Lock()
_awake_calls = 0  # keep_cores_awake bodies running
_awake_cpus: list[int] = []  # the CPUs a spinner is running on (or was started for)
_running = np.zeros(1, np.int64)  # 1 while a keep_cores_awake body runs: the spinners read it
_wake = threading.Event()  # set while a body runs: the spinners wait on it in between


def set_num_threads(n: int | None = None) -> int:
    """Use `n` threads (default: all cores) for the numba kernels and for BLAS; returns the number set.

    Also read at import from the environment variable MININP_SEGFORMER_THREADS.
    """
    global _threads
    n = int(n or os.cpu_count() or 1)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)  # for any kernel compiled with parallel=True
    _set_blas_threads(n)
    _threads = n
    return n


def get_num_threads() -> int:
    """The threads `parallel_rows` uses: `set_num_threads`'s, else every core numba may use (1 inside
    `map_one_thread_each`)."""
    return getattr(_local, "threads", None) or _threads or max(1, min(os.cpu_count() or 1,
                                                                        numba.config.NUMBA_NUM_THREADS))


def parallel_rows(kernel, rows: int, *args, row_size: int = 1, min_block: int = MIN_BLOCK) -> None:
    """Run `kernel(*args, start, stop)` over the rows 0:rows, split into one contiguous block per thread.

    The first block runs in the calling thread, the others on the pool; `kernel` must release the GIL (numba's
    `nogil=True`) for them to run at once. Fewer blocks when a block would hold fewer than `min_block` elements
    (`row_size`: elements per row; STREAM_MIN_BLOCK for a pass that only streams memory). Blocks write disjoint
    rows, so the result does not depend on the split.
    """
    blocks = max(1, min(get_num_threads(), rows, rows * row_size // min_block))
    if blocks == 1:
        kernel(*args, 0, rows)
        return
    bounds = [rows * k // blocks for k in range(blocks + 1)]
    pool = _worker_pool(blocks - 1)
    others = [pool.submit(kernel, *args, bounds[k], bounds[k + 1]) for k in range(1, blocks)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for f in others:
            f.result()


def map_one_thread_each(fn, items, on_done=None, workers: int | None = None) -> list:
    """[fn(item) for item in items], computed `workers` (default `get_num_threads()`) items at a time, each in a
    thread of its own that runs its kernels and BLAS on one thread; `on_done()` is called in the calling thread as
    each result arrives, in order. `fn` must not depend on which thread runs it (the kernels' results do not depend
    on their split, and OpenBLAS's products do not depend on its thread count: tested bit for bit in
    tests/test_inference.py). An error in any item reaches the caller, and the items not started are dropped.

    Two batch-1 forward passes of B0 at 512 x 512 side by side take 130-142 ms a window against 180-186 ms for one
    after the other on two threads (docs/performance.md, "Slide mode").
    """
    items = list(items)
    workers = min(workers or get_num_threads(), len(items))

    def collect(results):  # in order, calling on_done as each arrives
        done = []
        for result in results:
            done.append(result)
            if on_done is not None:
                on_done()
        return done

    if workers <= 1:
        return collect(map(fn, items))

    def one_thread(item):
        _local.threads = 1
        return fn(item)

    _blas_one_thread(True)  # process-wide: the calling thread only waits meanwhile
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mininp_segformer_each")
    try:
        return collect(pool.map(one_thread, items))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error (or Ctrl-C) the items not started are not run
        _blas_one_thread(False)


@contextlib.contextmanager
def keep_cores_awake():
    """While the body runs on more than one thread, keep the cores it runs on from sleeping (Linux).

    A pass hands work between threads a few hundred times (each `parallel_rows` and each BLAS product) and every
    hand-over that finds a core asleep waits for it to wake. On a virtual machine that wait is long: B0 at 512 x 512
    on 2 cores takes 100 ms back to back but 130 ms after half a second idle (docs/performance.md, "Threads").
    So a spinner thread per core yields the core in a loop for as long as the body runs: it runs at the lowest
    priority there is (SCHED_IDLE), so any other thread that wants the core gets it at once. Nested bodies share
    the spinners. Off with MININP_SEGFORMER_SPIN=0 (or `threads.SPIN = False`), e.g. on a shared machine where an
    idle core is worth more than the time.
    """
    global _awake_calls
    cpus = _spinner_cpus()
    if not cpus:
        yield
        return
    with _awake_lock:
        if _awake_calls == 0:
            _start_spinners(cpus)
            _running[0] = 1
            _wake.set()
        _awake_calls += 1
    try:
        yield
    finally:
        with _awake_lock:
            _awake_calls -= 1
            if _awake_calls == 0:
                _wake.clear()  # before _running: a spinner that returns now then waits, it does not spin again
                _running[0] = 0


_sched_yield = numba.types.ExternalFunction("sched_yield", numba.types.int32())  # libc's, found by name


@numba.njit(nogil=True, cache=True)
def _spin(running, limit):
    """Give the core away (`sched_yield`) until running[0] is 0, at most `limit` times; returns the times. The call
    to C makes the loop read running[0] anew each time."""
    n = 0
    while running[0] != 0 and n < limit:
        _sched_yield()
        n += 1
    return n


def _spinner(cpu: int) -> None:
    """A spinner's thread: pinned to `cpu` at the lowest priority, it spins while `_wake` is set."""
    try:
        os.sched_setaffinity(0, {cpu})  # 0: this thread
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # not allowed here: a spinner at normal priority would take time from the work, so none
        return
    while True:
        _wake.wait()
        _spin(_running, SPIN_YIELDS)


def _spinner_cpus() -> list[int]:
    """The CPUs to keep awake now: as many as the threads in use, of those this process may run on."""
    n = get_num_threads()
    if not SPIN or n < 2 or not hasattr(os, "SCHED_IDLE"):
        return []
    return sorted(os.sched_getaffinity(0))[:n]


def _start_spinners(cpus: list[int]) -> None:
    """A spinner thread for each CPU of `cpus` that has none yet (daemons: they never hold up the exit)."""
    if not _awake_cpus:
        _spin(_running, 0)  # compiled (or loaded from numba's cache) here, not at the spinners' lowest priority
    for cpu in cpus:
        if cpu not in _awake_cpus:
            threading.Thread(target=_spinner, args=(cpu,), name=f"mininp_segformer_spin{cpu}", daemon=True).start()
            _awake_cpus.append(cpu)


def _blas_one_thread(enter: bool) -> None:
    """BLAS on one thread while any `map_one_thread_each` runs (callers on several threads may overlap); its
    threads as they were when the last one leaves."""
    global _each_calls, _each_blas
    with _each_lock:
        if enter:
            if _each_calls == 0:
                _each_blas = _blas_threads() or get_num_threads()
                _set_blas_threads(1)
            _each_calls += 1
        else:
            _each_calls -= 1
            if _each_calls == 0:
                _set_blas_threads(_each_blas)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """The pool, with at least `workers` threads (made anew when more are needed: the old one's threads exit once
    no caller holds it any more)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="mininp_segformer"), workers
        return _pool


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start over (a new lock too, it may be held)."""
    global _pool, _pool_size, _pool_lock, _awake_lock, _awake_calls, _awake_cpus, _wake
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()
    _awake_lock, _awake_calls, _awake_cpus, _wake = threading.Lock(), 0, [], threading.Event()
    _running[0] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


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


def _blas_threads() -> int | None:
    """The threads NumPy's BLAS uses now (through threadpoolctl when installed, else OpenBLAS's getter), or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        getter = _openblas_function("get_num_threads")
        return int(getter()) if getter is not None else None
    counts = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    return counts[0] if counts else None


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
