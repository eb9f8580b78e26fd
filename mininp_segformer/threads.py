"""Threads and CPU code paths: the numba kernels' threads and BLAS's together, and what a run's float32 rounding
depends on (for logs and bug reports).

The kernels are compiled as plain serial loops over a range of rows that release the GIL (`nogil=True`);
`parallel_rows` runs one block of rows per thread on a small thread pool. numba's own `parallel=True` (prange) would
do the same, but compiles each kernel 4-7 times slower, and that compile is what a fresh install waits for
(docs/performance.md, "Cold start").

Work made of independent pieces too small to split well (slide mode's windows: batch-1 forward passes whose thin
products OpenBLAS splits poorly) goes the other way: `map_one_thread_each` runs one piece per thread, each on one
thread (its kernels and its BLAS calls).

While a forward or backward pass runs on every core, `keep_cores_awake` keeps the cores from sleeping between its
hand-overs of work from one thread to another (as ONNX Runtime's and OpenMP's spinning thread pools do).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import llvmlite.binding as llvm
import numba
import numpy as np
from numba.core import event

MIN_BLOCK = 16384  # elements: a block of rows smaller than this is not worth handing to another thread (~20 us)
# A pass that only streams its rows through once (a bias add after a product) gains nothing from a second thread
# until the array outgrows the caches (likely because the rows the other thread reads sit in the cache of the core
# that wrote them). After a product on 2 cores (docs/performance.md, "Threads"): the bias add of a 2 MB output takes
# 0.09 ms on one thread and 0.25 ms split in two; of 8 MB, 0.34 and 0.38 ms; of 64 MB, 4.7 and 2.8 ms.
STREAM_MIN_BLOCK = 1 << 21  # elements (8 MB of float32) per block: on 2 threads, outputs of 16 MB and more split
_threads = None  # set_num_threads's n; None: every core numba may use
_pool, _pool_size = None, 0  # the ThreadPoolExecutor of the blocks after the first, made on first use
_pool_lock = threading.Lock()
# .threads: 1 in the workers of `map_one_thread_each` and `parallel_bands`, whose kernels must not split further
_local = threading.local()
_each_lock = threading.Lock()
# the map_one_thread_each and split parallel_bands calls running; BLAS's threads before the first of them
_each_calls, _each_blas = 0, None
SPIN = os.environ.get("MININP_SEGFORMER_SPIN", "1") != "0"  # keep_cores_awake on (the default) or off
_spin_lock = threading.Lock()  # nothing may compile under it (`_spin_compiled` says why)
_spin_flags: dict[int, np.ndarray] = {}  # CPU -> its spinner's flag (int32: a futex word), 1 while it must spin
_spin_bodies: dict[int, int] = {}  # CPU -> keep_cores_awake bodies running that keep it awake
_compiling = 0  # numba compiles in progress, during which the spinners sleep (`_SleepWhileCompiling`)


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
    """The threads `parallel_rows` uses: `set_num_threads`'s, else every core numba may use (1 inside the workers of
    `map_one_thread_each` and `parallel_bands`)."""
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


def parallel_bands(fn, rows: int, band: int) -> None:
    """Call `fn(start, stop)` on each band of `band` rows that tiles 0:rows, one contiguous run of bands per thread.

    For work that goes through several products and kernels per band, such as the fused decoder's sum, ReLU and
    classifier: a band's data stays in its core's cache from its first step to its last, and the threads meet once
    instead of at every step. Meanwhile each thread runs its kernels on one thread and BLAS is on one thread,
    process-wide, as in `map_one_thread_each`; bands write disjoint rows, and neither depends on the thread counts,
    so the result does not depend on the split. A single band (or a single thread) runs in the calling thread as
    usual.
    """
    bands = -(-rows // band)

    def run(first, last):  # the bands first:last
        for k in range(first, last):
            fn(k * band, min(rows, (k + 1) * band))

    def run_one_thread(first, last):
        outer, _local.threads = getattr(_local, "threads", None), 1
        try:
            run(first, last)
        finally:
            _local.threads = outer

    if min(get_num_threads(), bands) == 1:  # in turn, each band free to use every thread
        run(0, bands)
        return
    _blas_one_thread(True)
    try:
        parallel_rows(run_one_thread, bands, min_block=1)
    finally:
        _blas_one_thread(False)


@contextlib.contextmanager
def keep_cores_awake():
    """While the body runs on every core this thread may use (Linux on x86-64), keep those cores from sleeping.

    A pass hands work from one thread to another a few hundred times (each `parallel_rows` and each BLAS product),
    and a hand-over that finds the other core asleep waits for it to wake. On a virtual machine that wait is long:
    B0 at 512 x 512 on 2 cores took 100 ms back to back but 130 ms with half a second between passes
    (docs/performance.md, "The cores kept awake"). So each core gets a spinner thread, pinned to it, that gives the core
    away (`sched_yield`) in a loop while a body runs. It runs at the lowest priority Linux has (SCHED_IDLE): a
    thread with work to do takes the core from it at once. Between bodies it sleeps in the kernel (a futex), and it
    never holds the GIL after it starts; it also sleeps while numba compiles (`_SleepWhileCompiling`). Nested
    bodies and bodies on several Python threads share the spinners.

    No spinners when the pass does not use every core this thread may run on (the work may run on the others),
    under a cgroup CPU quota (spinning would spend it), or with MININP_SEGFORMER_SPIN=0 / `threads.SPIN = False`
    (e.g. on a machine shared with other work, where an idle core is worth more than the time).
    """
    cpus = _spinner_cpus()
    if cpus and not _spin_compiled():
        cpus = []
    kept = []  # the CPUs this body has counted so far, so that an interruption undoes exactly those
    try:
        with _spin_lock:
            for cpu in cpus:
                if _spin_bodies.get(cpu, 0) == 0 and not _start_spinning(cpu):
                    break  # could not start a spinner here: none at all from now on (`SPIN` is now False)
                _spin_bodies[cpu] = _spin_bodies.get(cpu, 0) + 1
                kept.append(cpu)
        yield
    finally:
        with _spin_lock:
            for cpu in kept:
                if cpu not in _spin_bodies:  # forked inside the body: the child started over (`_forget_pool`)
                    continue
                _spin_bodies[cpu] -= 1
                if _spin_bodies[cpu] == 0:
                    _spin_flags[cpu][0] = 0  # the spinner sees it at its next yield and goes to sleep


_sched_yield = numba.types.ExternalFunction("sched_yield", numba.types.int32())  # libc's, found by name
_syscall = numba.types.ExternalFunction("syscall", numba.types.int64(*[numba.types.int64] * 5))
_SYS_SCHED_SETSCHEDULER, _SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 144, 202, 128, 129  # x86-64 Linux; _PRIVATE futexes


@numba.njit(nogil=True, cache=True)
def _spin(flag, policy, param):
    """A spinner thread's whole life, never back in Python (a thread at the lowest priority must not hold the GIL,
    which the work needs): its scheduling policy set to `policy` (SCHED_IDLE, `param` its sched_param), -1 if that
    is refused; then for good: while flag[0] is 1, give the core away; while it is 0, sleep in the kernel until
    `_wake_spinner` sets it. The calls to C make the loop read flag[0] anew each time."""
    if _syscall(_SYS_SCHED_SETSCHEDULER, 0, policy, param.ctypes.data, 0) != 0:  # 0: this thread
        return -1
    while True:
        if flag[0] != 0:
            _sched_yield()
        else:  # FUTEX_WAIT returns at once if flag[0] is no longer 0: no wake can be missed
            _syscall(_SYS_FUTEX, flag.ctypes.data, _FUTEX_WAIT, 0, 0)
    return 0  # never reached: it gives numba the return type


def _spinner(cpu: int, flag: np.ndarray) -> None:
    """A spinner thread: pinned to `cpu`, then `_spin` (which puts it at the lowest priority) for good."""
    try:
        os.sched_setaffinity(0, {cpu})  # 0: this thread
        refused = _spin(flag, os.SCHED_IDLE, np.zeros(1, np.int32)) != 0
    except OSError:
        refused = True
    if refused:  # a spinner at normal priority would take time from the work: none at all
        _spinning_off(f"no SCHED_IDLE thread on CPU {cpu} here")


def _spinning_off(reason) -> None:
    """No spinners from now on in this process, and a warning that says why. Spinning only ever saves time: without
    it a pass runs as before."""
    global SPIN
    SPIN = False
    warnings.warn(f"mininp_segformer: keep_cores_awake turned off ({reason})", RuntimeWarning, stacklevel=3)


def _spin_compiled() -> bool:
    """Compile `_spin` (here, not in its thread) unless done; False, and spinning off for good, if numba cannot.

    Called before `_spin_lock` is taken, never under it: numba compiles under its own global lock and fires its
    compile events there, and `_SleepWhileCompiling` takes `_spin_lock` in them, so compiling under `_spin_lock`
    could deadlock with another thread's compile. Once compiled, numba's lock is not touched again."""
    if _spin.signatures:
        return True
    try:
        _spin.compile((numba.types.int32[::1], numba.types.int64, numba.types.int32[::1]))
    except Exception as e:  # noqa: BLE001 -- `_spinning_off`
        _spinning_off(e)
        return False
    return True


def _start_spinning(cpu: int) -> bool:
    """Make `cpu`'s spinner spin (its thread started on first use; `_spin` compiled already); False, and spinning
    off for good, if it cannot be started (no threads left)."""
    try:
        if cpu not in _spin_flags:
            _spin_flags[cpu] = np.zeros(1, np.int32)
            threading.Thread(target=_spinner, args=(cpu, _spin_flags[cpu]), daemon=True,
                             name=f"mininp_segformer_spin{cpu}").start()
    except Exception as e:  # noqa: BLE001 -- `_spinning_off`
        _spinning_off(e)
        return False
    if _compiling == 0:
        _wake_spinner(_spin_flags[cpu])
    return True


class _SleepWhileCompiling(event.Listener):
    """The spinners sleep while numba compiles. A compile runs on one core for up to a second or two (the first run
    after an install compiles every kernel, docs/performance.md "Cold start"), and spinners kept running beside it
    slowed that run down: the README's first command with a fresh numba cache on 2 cores took 5.7-5.9 s with them
    spinning, 4.9 s without spinners, 5.0-5.4 s with them asleep during the compiles. numba compiles one function at
    a time (under its global lock), a callee inside its caller's compile: the events nest, and are counted. numba
    fires them only when it compiles, not when it loads a kernel from its disk cache."""

    def on_start(self, ev):
        global _compiling
        with _spin_lock:
            _compiling += 1
            for flag in _spin_flags.values():
                flag[0] = 0  # each spinner sees it at its next yield and goes to sleep

    def on_end(self, ev):
        global _compiling
        with _spin_lock:
            # never below 0: another listener that raises in numba's broadcast can skip an on_start of ours
            _compiling = max(0, _compiling - 1)
            if _compiling == 0:
                for cpu, flag in _spin_flags.items():
                    if _spin_bodies.get(cpu, 0):
                        _wake_spinner(flag)


event.register("numba:compile", _SleepWhileCompiling())


def _wake_spinner(flag: np.ndarray) -> None:
    flag[0] = 1
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(flag.ctypes.data), ctypes.c_long(_FUTEX_WAKE),
                  ctypes.c_long(1))


def _spinner_cpus() -> list[int]:
    """The CPUs to keep awake now: every one this thread may run on, if the threads in use are as many (and no
    CPU quota applies); else none."""
    if not (SPIN and _CAN_SPIN):
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) > 1 and get_num_threads() >= len(cpus) and not _cpu_quota() else []


@functools.cache
def _cpu_quota() -> bool:
    """True if a cgroup (v2) caps this process's CPU time (docker --cpus, Kubernetes limits)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            return f.read().split()[0] != "max"
    except (OSError, IndexError):
        return False


_CAN_SPIN = sys.platform == "linux" and platform.machine() == "x86_64" and hasattr(os, "SCHED_IDLE")
_libc = ctypes.CDLL(None, use_errno=True) if _CAN_SPIN else None


def _blas_one_thread(enter: bool) -> None:
    """BLAS on one thread while any `map_one_thread_each` or split `parallel_bands` runs (callers on several
    threads may overlap); its threads as they were when the last one leaves."""
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
    """In a forked child the parent's pool and spinner threads do not exist: start over (new locks too, they may be
    held)."""
    global _pool, _pool_size, _pool_lock, _spin_lock, _compiling
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()
    _spin_lock = threading.Lock()  # and no spinners: they start again on first use
    _compiling = 0  # (a compile in progress at the fork goes on in the parent only)
    _spin_flags.clear()
    _spin_bodies.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _set_blas_threads(n: int) -> None:
    """Tell NumPy's BLAS to use n threads: NumPy's OpenBLAS through its own setter (a C call), else (MKL, BLIS)
    through threadpoolctl when installed."""
    setter = _openblas_function("set_num_threads")
    if setter is not None:
        setter(ctypes.c_int(n))
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n, user_api="blas")


def _blas_threads() -> int | None:
    """The threads NumPy's BLAS uses now (OpenBLAS's getter, else through threadpoolctl when installed), or None."""
    getter = _openblas_function("get_num_threads")
    if getter is not None:
        return int(getter())
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
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
    """NumPy's OpenBLAS's C function `openblas_<name>` (under the names OpenBLAS builds give it), or None."""
    lib = _numpy_openblas()
    if lib is None:
        return None
    for symbol in (f"scipy_openblas_{name}64_", f"scipy_openblas_{name}", f"openblas_{name}64_", f"openblas_{name}"):
        function = getattr(lib, symbol, None)
        if function is not None:
            return function
    return None


@functools.cache  # looked up once: reading /proc/self/maps each time cost 2 ms a BLAS thread switch
def _numpy_openblas():
    """The OpenBLAS library NumPy uses (ctypes), or None if NumPy's BLAS is another one (MKL, BLIS: threadpoolctl's
    business) or none is found. Of the OpenBLAS libraries loaded (SciPy brings its own), NumPy's is the one in
    NumPy's wheel (numpy.libs, numpy/.dylibs), else the only one."""
    try:
        blas = str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except Exception:  # noqa: BLE001 -- NumPy < 1.26 does not say: look for OpenBLAS by name
        blas = "openblas"
    if "openblas" not in blas.lower():
        return None
    paths = [path for path in _loaded_libraries() if "openblas" in os.path.basename(path).lower()]
    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))
    ours = [path for path in paths if path.startswith(numpy_dir)]  # numpy/.dylibs or numpy.libs
    chosen = ours or (paths if len(paths) == 1 else [])
    return ctypes.CDLL(chosen[0]) if chosen else None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line})
    except OSError:
        return []
