"""numba kernels for the hot loops; each has a plain-NumPy twin in `layers.py`, and tests hold the pairs equal.

Compiled on first use and cached on disk (`cache=True`), so only the first process pays the compile time.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.vectorize(["float32(float32)"], cache=True)
def _gelu32(x):
    # erf in double precision, rounded once to float32: within 1 ulp of torch's float32 erf-GELU.
    xd = np.float64(x)
    return np.float32(0.5 * xd * (1.0 + math.erf(xd * 0.7071067811865476)))


def gelu(x):
    """Exact-erf GELU on a float32 array (twin of `layers.gelu`)."""
    return _gelu32(x)
