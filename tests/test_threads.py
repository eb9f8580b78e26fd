"""threads.parallel_rows: the kernels' rows split across threads -- every row once, the same bits for any number of
threads, errors reaching the caller, and a forked child that does not wait for its parent's threads; and
keep_cores_awake's spinners, which run only while a body does."""

import multiprocessing
import os
import threading
import time

import numba
import numpy as np
import pytest

from mininp_segformer import threads
from mininp_segformer.nn import kernels


@pytest.fixture
def thread_count():
    """Set the threads for one test; every core again afterwards."""
    yield threads.set_num_threads
    threads.set_num_threads()


@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("rows", [1, 2, 7, 1000])
def test_every_row_is_done_once(thread_count, n_threads, rows):
    thread_count(n_threads)
    done = np.zeros(rows, np.int64)
    lock = threading.Lock()

    def kernel(out, start, stop):
        with lock:
            out[start:stop] += 1

    threads.parallel_rows(kernel, rows, done, row_size=threads.MIN_BLOCK)
    assert (done == 1).all()


def test_small_work_stays_in_the_calling_thread(thread_count):
    thread_count(4)
    seen = []
    threads.parallel_rows(lambda start, stop: seen.append((threading.get_ident(), start, stop)), 64, row_size=16)
    assert seen == [(threading.get_ident(), 0, 64)]  # 64 x 16 elements: less than a block's worth


def test_a_streaming_pass_splits_only_past_its_larger_block(thread_count):
    thread_count(2)
    for rows, blocks in ((threads.STREAM_MIN_BLOCK // 64, 1), (2 * threads.STREAM_MIN_BLOCK // 64, 2)):
        seen = []
        threads.parallel_rows(lambda start, stop: seen.append((start, stop)), rows, row_size=64,
                              min_block=threads.STREAM_MIN_BLOCK)
        assert len(seen) == blocks  # while the default MIN_BLOCK splits both in two
        assert sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == rows


def test_an_error_in_any_block_reaches_the_caller(thread_count):
    thread_count(3)

    def kernel(start, stop):
        if start > 0:
            raise ValueError(f"rows {start}:{stop}")

    with pytest.raises(ValueError, match="rows"):
        threads.parallel_rows(kernel, 90, row_size=threads.MIN_BLOCK)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("rows,band", [(1, 4), (10, 3), (64, 8), (7, 100)])
def test_parallel_bands_does_each_band_once_on_one_thread_each(thread_count, n_threads, rows, band):
    """Every band of `band` rows (the last one short) once; inside, the kernels' and BLAS's threads are 1 when the
    bands are split across threads; BLAS has its threads back afterwards."""
    n_threads = thread_count(n_threads)  # no more than the machine has
    seen, lock = [], threading.Lock()

    def fn(start, stop):
        with lock:
            seen.append((start, stop, threads.get_num_threads(), threads._blas_threads()))

    threads.parallel_bands(fn, rows, band)
    assert sorted((start, stop) for start, stop, _, _ in seen) == [
        (start, min(rows, start + band)) for start in range(0, rows, band)]
    inside = 1 if min(n_threads, len(seen)) > 1 else n_threads  # one band, or one thread: in the caller as usual
    assert {(n, blas) for _, _, n, blas in seen} <= {(inside, inside), (inside, None)}
    assert threads.get_num_threads() == n_threads and threads._blas_threads() in (n_threads, None)


@pytest.mark.parametrize("failing", [0, 20], ids=["the caller's band", "another thread's band"])
def test_parallel_bands_passes_errors_on_and_restores_blas(thread_count, failing):
    thread_count(2)

    def fn(start, stop):  # 10 bands of 4 rows: 0-4 in the calling thread, 5-9 in the pool's on 2 threads
        if start == failing:
            raise ValueError(f"band {start}:{stop}")

    with pytest.raises(ValueError, match="band"):
        threads.parallel_bands(fn, 40, 4)
    assert threads._blas_threads() in (2, None) and threads.get_num_threads() == 2


def _kernel_outputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 40, 50, 64), dtype=np.float32)  # 4000 rows of 64: several blocks per thread count
    w = rng.standard_normal((64, 1, 3, 3), dtype=np.float32)
    b = rng.standard_normal(64, dtype=np.float32)
    small = rng.standard_normal((2, 10, 13, 64), dtype=np.float32)
    lw = rng.standard_normal((32, 64), dtype=np.float32)
    streamed = rng.standard_normal((3 * threads.STREAM_MIN_BLOCK // 64 + 7, 64), dtype=np.float32)  # 2-3 blocks
    return {
        "gelu": kernels.gelu(x), "softmax": kernels.softmax(x), "layer_norm": kernels.layer_norm(streamed, b, b),
        "linear_streamed": kernels.linear(streamed, np.eye(64, dtype=np.float32), b),
        "depthwise_conv3x3_gelu": kernels.depthwise_conv3x3_gelu(x, w, b), "linear": kernels.linear(x, lw, b[:32]),
        "im2col": kernels.im2col(x, 7, 4, 3), "add_resized": kernels.add_resized(x.copy(), small),
        "resized_argmax": kernels.resized_argmax(x[0].transpose(2, 0, 1), (97, 203)),
    }


def test_kernels_give_the_same_bits_on_any_number_of_threads(thread_count):
    thread_count(1)
    one = _kernel_outputs()
    for n in (2, 3):
        thread_count(n)
        for name, out in _kernel_outputs().items():
            np.testing.assert_array_equal(out, one[name], err_msg=f"{name} on {n} threads")


def _softmax_in_child(queue):
    with threads.keep_cores_awake():  # the parent's spinners are not here either
        queue.put(float(kernels.softmax(np.ones((4096, 64), np.float32)).sum()))


def test_a_forked_child_runs_the_kernels(thread_count):
    """A child forked after the parent's pool and spinners started has none of their threads: it must make its
    own, not wait."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    thread_count(2)
    with threads.keep_cores_awake():
        kernels.softmax(np.ones((4096, 64), np.float32))  # pool up (two blocks of MIN_BLOCK or more)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_softmax_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a kernel")
    assert child.exitcode == 0 and queue.get(timeout=5) == 4096  # each row's softmax sums to 1


def test_map_one_thread_each_runs_each_item_on_one_thread_in_order(thread_count):
    """Results in the items' order whatever finishes first; inside, the kernels' and BLAS's threads are 1; after,
    BLAS has its threads back; `on_done` once per item, in the calling thread."""
    thread_count(2)
    caller, seen, done = threading.get_ident(), [], []

    def fn(item):
        seen.append((threading.get_ident(), threads.get_num_threads(), threads._blas_threads()))
        if item == 0:
            threading.Event().wait(0.05)  # the first item finishes last
        return item * item

    assert threads.map_one_thread_each(fn, range(5), lambda: done.append(threading.get_ident())) == [0, 1, 4, 9, 16]
    assert {(n, blas) for _, n, blas in seen} == {(1, 1)} and caller not in {t for t, _, _ in seen}
    assert done == [caller] * 5
    assert threads.get_num_threads() == 2 and threads._blas_threads() in (2, None)


def test_map_one_thread_each_passes_errors_on_drops_the_rest_and_restores_blas(thread_count):
    thread_count(2)
    started = []

    def fn(item):
        started.append(item)
        if item == 1:
            raise ValueError("item 1")
        threading.Event().wait(0.02)
        return item

    with pytest.raises(ValueError, match="item 1"):
        threads.map_one_thread_each(fn, range(40))
    assert len(started) < 40  # the items not started when the error came are not run
    assert threads._blas_threads() in (2, None)


def test_overlapping_callers_leave_blas_as_it_was(thread_count):
    """Two callers on two threads: A enters, B enters, A leaves while B still runs -- BLAS stays on one thread
    until the last one leaves, then has its two threads back."""
    thread_count(2)
    started = {name: threading.Event() for name in "AB"}
    release = {name: threading.Event() for name in "AB"}

    def caller(name):
        def item(_):
            started[name].set()
            release[name].wait(10)
        threads.map_one_thread_each(item, range(2))

    a, b = (threading.Thread(target=caller, args=(name,)) for name in "AB")
    a.start()
    assert started["A"].wait(10)
    b.start()
    assert started["B"].wait(10)
    release["A"].set()
    a.join(10)
    assert threads._blas_threads() in (1, None)  # B is still inside its map
    release["B"].set()
    b.join(10)
    assert threads._blas_threads() in (2, None)


def test_map_one_thread_each_with_one_worker_runs_in_turn(thread_count):
    thread_count(2)
    caller = threading.get_ident()
    assert threads.map_one_thread_each(lambda item: threading.get_ident(), range(3), workers=1) == [caller] * 3


def test_map_one_thread_each_on_one_thread_stays_in_the_caller(thread_count):
    thread_count(1)
    caller = threading.get_ident()
    assert threads.map_one_thread_each(lambda item: threading.get_ident(), range(3)) == [caller] * 3


spinners_here = pytest.mark.skipif(not threads._CAN_SPIN or len(os.sched_getaffinity(0)) < 2 or threads._cpu_quota(),
                                   reason="keep_cores_awake spins on Linux x86-64, with 2 cores or more, no CPU quota")


def _spinner_states() -> dict[str, str]:
    """Each spinner thread's state in /proc, by name: "R" (runnable) while it gives its core away in a loop, "S"
    while it sleeps on its futex."""
    states = {}
    for t in threading.enumerate():
        if t.name.startswith("mininp_segformer_spin"):
            with open(f"/proc/self/task/{t.native_id}/stat") as stat:
                states[t.name] = stat.read().rsplit(")", 1)[1].split()[0]  # after the name, which may hold spaces
    return states


def _assert_spinning(expected: list[str], timeout: float = 30.0) -> None:
    """The spinners named in `expected` spin and every other one sleeps, in 20 samples in a row (0.2 s). On a
    busy machine a spinner at the lowest priority may wait a while for the core that lets it start or stop, hence
    the timeout; one that never stops fails."""
    in_a_row, deadline = 0, time.monotonic() + timeout
    while True:
        states = _spinner_states()
        ok = set(expected) <= set(states) and all((state == "R") == (name in expected)
                                                  for name, state in states.items())
        in_a_row = in_a_row + 1 if ok else 0
        if in_a_row == 20:
            return
        assert time.monotonic() < deadline, f"spinners {states}, expected spinning: {expected}"
        time.sleep(0.01)


def _all_cpus() -> list[str]:
    return [f"mininp_segformer_spin{cpu}" for cpu in sorted(os.sched_getaffinity(0))]


@spinners_here
def test_keep_cores_awake_spins_at_the_lowest_priority_only_while_the_body_runs(thread_count):
    thread_count(len(os.sched_getaffinity(0)))
    with threads.keep_cores_awake():
        _assert_spinning(_all_cpus())  # one on each core
        for t in threading.enumerate():
            if t.name.startswith("mininp_segformer_spin"):
                assert os.sched_getscheduler(t.native_id) == os.SCHED_IDLE
                assert os.sched_getaffinity(t.native_id) == {int(t.name.removeprefix("mininp_segformer_spin"))}
    _assert_spinning([])  # stopped: asleep, not spinning
    with threads.keep_cores_awake():  # and woken again
        _assert_spinning(_all_cpus())
    _assert_spinning([])


@spinners_here
def test_nested_bodies_share_the_spinners_and_an_error_stops_them(thread_count):
    thread_count(len(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="inner"):
        with threads.keep_cores_awake():
            with threads.keep_cores_awake():
                pass
            _assert_spinning(_all_cpus())  # the inner body has ended, the outer one has not
            raise ValueError("inner")
    _assert_spinning([])


@spinners_here
def test_the_spinners_sleep_while_numba_compiles(thread_count):
    """A compile runs on one core for up to seconds: the spinners sleep through it, and spin again after it."""
    from numba.core import event

    thread_count(len(os.sched_getaffinity(0)))
    compiles = []

    class WhileCompiling(event.Listener):
        def on_start(self, ev):
            _assert_spinning([])
            compiles.append(ev)

        def on_end(self, ev):
            pass

    listener = WhileCompiling()
    with threads.keep_cores_awake():
        _assert_spinning(_all_cpus())
        event.register("numba:compile", listener)
        try:
            numba.njit(lambda x: x + 1)(1)  # a new function: compiled here and now
        finally:
            event.unregister("numba:compile", listener)
        _assert_spinning(_all_cpus())
    _assert_spinning([])
    assert compiles


_FIRST_BODY_DURING_A_COMPILE = """
import os, threading
import numba, numpy as np
from numba.core import event
from mininp_segformer import threads

threads.set_num_threads(len(os.sched_getaffinity(0)))
compiling = threading.Event()

class Mark(event.Listener):
    def on_start(self, ev):
        compiling.set()

    def on_end(self, ev):
        pass

event.register("numba:compile", Mark())

@numba.njit
def callee(x):
    return np.sort(x)[::-1].cumsum()

def caller(x):  # a compile of a second or so, with a callee: nested compile events
    s = 0.0
    for i in range(x.shape[0]):
        s += np.linalg.norm(callee(x)) + np.median(x)
    return s

def first_body():  # the process's first keep_cores_awake, while another thread compiles
    compiling.wait()
    with threads.keep_cores_awake():
        pass

body = threading.Thread(target=first_body, daemon=True)
body.start()
numba.njit(caller)(np.arange(5.0))
body.join(60)
assert not body.is_alive(), "keep_cores_awake still waiting"
print("ok")
"""


@spinners_here
def test_the_first_body_during_another_threads_compile_does_not_deadlock(tmp_path):
    """keep_cores_awake's first body compiles the spinner while another thread compiles: numba's compile lock and
    the spinners' lock must not be taken in opposite orders (a fresh process, a fresh numba cache)."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _FIRST_BODY_DURING_A_COMPILE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _spinners_sleep_in_body(_):
    with threads.keep_cores_awake():
        _assert_spinning([])


@spinners_here
def test_no_spinning_on_fewer_threads_than_cores_or_when_turned_off(thread_count, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    thread_count(cores)
    threads.map_one_thread_each(_spinners_sleep_in_body, range(2))  # each item on one thread: no spinners
    for n, spin in ((cores - 1, True), (cores, False)):
        thread_count(n)
        monkeypatch.setattr(threads, "SPIN", spin)
        _spinners_sleep_in_body(None)


class _NoCompiler:
    signatures = []  # nothing compiled yet

    def compile(self, signature):
        raise RuntimeError("numba cannot compile here")


@spinners_here
def test_a_spinner_that_cannot_start_turns_spinning_off_and_the_body_runs(thread_count, monkeypatch):
    thread_count(len(os.sched_getaffinity(0)))
    for name, value in (("SPIN", True), ("_spin", _NoCompiler()), ("_spin_flags", {}), ("_spin_bodies", {})):
        monkeypatch.setattr(threads, name, value)  # as in a process whose spinners have not started yet
    ran = []
    with pytest.warns(RuntimeWarning, match="keep_cores_awake turned off"):
        with threads.keep_cores_awake():
            ran.append(True)
    assert ran and threads.SPIN is False and threads._spin_bodies == {}


@spinners_here
def test_a_forward_and_a_backward_pass_keep_the_cores_awake(thread_count, monkeypatch):
    """`Segformer.__call__` and `value_and_grad` run inside keep_cores_awake: every core is counted while the
    encoder runs, none after."""
    import mininp_segformer as ms
    from mininp_segformer import model as model_module
    from mininp_segformer.weights import random_state_dict

    thread_count(len(os.sched_getaffinity(0)))
    config = ms.variant_config("b0", num_labels=3)
    model = ms.Segformer(config, random_state_dict(config, seed=0))
    seen, encoder = [], model_module.mix_transformer

    def recording_encoder(*args, **kwargs):
        seen.append(sorted(cpu for cpu, bodies in threads._spin_bodies.items() if bodies))
        return encoder(*args, **kwargs)

    monkeypatch.setattr(model_module, "mix_transformer", recording_encoder)
    x = np.zeros((1, 3, 64, 64), np.float32)
    model(x)
    ms.value_and_grad(model, x, np.zeros((1, 64, 64), np.int64))
    assert seen == [sorted(os.sched_getaffinity(0))] * 2
    assert not any(threads._spin_bodies.values())
