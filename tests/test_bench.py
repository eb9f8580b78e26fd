"""tools.bench: the slide-mode comparison runs each of its variants end to end (fresh processes, a small photo);
--cpu avx2 hides AVX-512 from a process, or says why it cannot."""

import os
import re
import signal
import subprocess
import sys

import pytest

from mininp_segformer.errors import MachineError
from mininp_segformer.tools import avx2, bench


def test_slide_benchmark_runs_every_variant(capsys):
    assert bench.main(["--slide", "520", "700", "--threads", "2"]) == 0  # 2 x 2 windows of 512 x 512
    out = capsys.readouterr().out
    assert "4 windows" in out
    for label, _, _ in bench.SLIDE_VARIANTS.values():
        assert re.search(rf"{re.escape(label)}\s+[\d.]+\s+[\d.]+\s+\d+ MB", out), out


# --cpu avx2 (tools/avx2.py): AVX-512 hidden from every library of a process, where the machine allows it
HAS_AVX512 = avx2.is_x86_64() and bool(avx2.cpu_features().get("avx512f"))
PROBE = """
try:
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_sees
except ImportError:  # NumPy 1.x
    from numpy.core._multiarray_umath import __cpu_features__ as numpy_sees
from mininp_segformer.tools import avx2
print(avx2.simd_level(), "|", avx2.cpu_features().get("avx512f"), numpy_sees["AVX512F"], numpy_sees["AVX2"])
"""


def hidden_environment(env=None):
    """avx2.environment(env), or None where this machine cannot hide AVX-512, after checking that the error says
    which of its needs is missing (Linux on x86-64, cpuid faulting, a C compiler)."""
    try:
        return avx2.environment(env)
    except MachineError as e:
        assert re.search(r"needs Linux on x86-64|no cpuid faulting|no C compiler was found", str(e)), e
        return None


def test_avx2_environment_hides_avx512_from_llvm_and_numpy():
    env = hidden_environment(dict(os.environ, PYTHONFAULTHANDLER="1"))
    if env is None:
        return  # this machine cannot; the error was checked
    assert "PYTHONFAULTHANDLER" not in env  # its SIGSEGV handler would take the shim's traps
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    has_avx2 = avx2.cpu_features().get("avx2", False)
    assert run.stdout.split() == ["AVX2," if has_avx2 else "SSE,", "AVX-512", "hidden", "|", "False", "False",
                                  str(has_avx2)], run.stdout


@pytest.mark.parametrize("fault", ["import ctypes; ctypes.string_at(0)",  # a real fault
                                   "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])  # one sent by kill
def test_avx2_environment_leaves_a_real_segfault_a_segfault(fault):
    env = hidden_environment()
    if env is None:
        return  # nothing is preloaded where the machine cannot hide AVX-512
    run = subprocess.run([sys.executable, "-c", fault + "; print('survived')"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -signal.SIGSEGV and "survived" not in run.stdout


def test_avx2_environment_names_what_the_machine_lacks(monkeypatch, tmp_path):
    if not (sys.platform == "linux" and avx2.is_x86_64()):
        with pytest.raises(MachineError, match="needs Linux on x86-64"):
            avx2.environment()
        return
    monkeypatch.setattr(avx2, "_cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(MachineError, match=r"no cpuid faulting \('cpuid_fault' is missing from /proc/cpuinfo\)"):
        avx2.environment()
    monkeypatch.setattr(avx2, "_cpu_flags", lambda: {"cpuid_fault"})
    source = tmp_path / "hide_avx512.c"
    source.write_text("int this_does_not_compile(\n")  # a source no cached build was made from
    monkeypatch.setattr(avx2, "SOURCE", source)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(avx2, "_compiler", lambda: None)
    with pytest.raises(MachineError, match="no C compiler was found: install gcc"):
        avx2.environment()
    failing = tmp_path / "failing-cc"  # a compiler that fails without a word
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(avx2, "_compiler", lambda: str(failing))
    with pytest.raises(MachineError, match=r"failing-cc could not build hide_avx512.c \(exit status 1\): no message"):
        avx2.environment()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "with space"))
    with pytest.raises(MachineError, match="a space or colon in the path"):
        avx2.environment()
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no/such/dir")  # cannot be created
    with pytest.raises(MachineError, match="could not build hide_avx512.c into /proc/no/such/dir/mininp_segformer"):
        avx2.environment()
    assert not list(tmp_path.rglob("*.so*"))  # no half-built library left behind


def test_bench_cpu_avx2_runs_the_profile_on_avx2_code(capfd):
    if not avx2.is_x86_64() or (HAS_AVX512 and hidden_environment() is None):
        with pytest.raises(SystemExit) as e:  # nothing to run it on: an error that says so, before any work
            bench.main(["--cpu", "avx2", "--profile"])
        assert e.value.code == 2 and "--cpu avx2:" in capfd.readouterr().err
        return
    # AVX-512 to hide: a process with it hidden runs the profile; none: it runs here, on the AVX2 code it already has
    assert bench.main(["--cpu", "avx2", "--profile", "--size", "64", "64", "--threads", "1"]) == 0
    out = capfd.readouterr().out
    level = r"\((AVX2|SSE), AVX-512 hidden[,)]" if HAS_AVX512 else r"\((AVX2|SSE)[,)]"
    assert re.search(rf"^b0 at 64 x 64, 1 thread\(s\), fused decoder; .*{level}", out, re.M), out
    assert re.search(r"^total\s+[\d.]+", out, re.M), out
