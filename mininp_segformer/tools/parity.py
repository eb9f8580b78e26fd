"""Checking mininp_segformer against reference outputs (PyTorch's, saved by `tests/make_fixtures.py`), as the chapters do.

    from mininp_segformer.tools.parity import compare
    compare("logits", out.logits, fixture["logits"])   # prints the error, raises AssertionError if it is too large

Float32 results differ in their last bits from one CPU to the next: OpenBLAS picks other kernels on AVX2 and
AVX-512, numba compiles for the CPU it runs on, and each sums in its own order. So an error figure such as
`1.3e-05` is a fact about this machine, not about the code. Figures like that are printed behind `≈` (see `approx`);
the notebooks' checker (nbval, `notebooks/nbval_sanitize.cfg`) masks what follows a `≈`, and compares everything
else -- shapes, the tolerance and whether it holds -- digit for digit.
"""

from __future__ import annotations

import numpy as np

MODEL_RTOL = 2e-5  # max|ours - torch| <= 2e-5 * max|torch|, per tensor: the tolerance of tests/test_parity.py
APPROX = "\u2248"  # ≈: marks a figure that depends on the CPU's float32 rounding


def approx(value: float, spec: str = ".1e") -> str:
    """`value` formatted with `spec` behind `≈`: a figure that depends on the machine's float rounding."""
    return f"{APPROX}{format(float(value), spec)}"


def max_error(ours, ref) -> tuple[float, float]:
    """(max|ours - ref|, max|ref|), in float64. Shapes must match."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} (ours) != {ref.shape} (reference)")
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def relative_error(ours, ref) -> float:
    """max|ours - ref| / max|ref|: the error the tolerances of this project are written in."""
    err, scale = max_error(ours, ref)
    return err / scale if scale else err


def compare(name: str, ours, ref, rtol: float = MODEL_RTOL, width: int = 26) -> None:
    """Print `name`, the shape, max|ref|, max|ours - ref| and that error relative to max|ref|; check the tolerance.

    Raises AssertionError when max|ours - ref| > rtol * max|ref|. The two error figures are machine-dependent and
    printed behind `≈`; the verdict `<= rtol` is what must hold everywhere.
    """
    err, scale = max_error(ours, ref)
    if not err <= rtol * scale:  # also catches NaN
        raise AssertionError(f"{name}: max|err| {err:.2e} > {rtol:g} * max|ref| {scale:.4g}")
    print(f"{name:<{width}} {str(np.shape(ref)):<18} max|ref| {scale:7.3f}   max|err| {approx(err)}   "
          f"relative {approx(relative_error(ours, ref))} <= {rtol:g}")
