"""Where `kernels.gelu`'s coefficients come from: Phi(x) - 1/2 = x P(x^2) / Q(x^2) on [0, 4 sqrt 2].

    python -m mininp_segformer.tools.fit_gelu      # prints the fit and its largest error

Phi is the standard normal CDF (GELU(x) = x Phi(x)), odd about 1/2, so one rational function of x^2 times x covers
both signs; past 4 sqrt 2 it is 1 (or 0) to within 7.7e-9, below float32's resolution near 1. The fit minimises the
largest absolute error over [0, L] (minimax), as a sequence of weighted linear least-squares problems: x P(s) -
f Q(s) = 0 (s = x^2) is linear in the coefficients once Q(0) = 1 is fixed; each solve is re-weighted by the previous Q
(Sanathanan and Koerner, 1963, so that it minimises (P / Q - f) rather than (P - f Q)), and between solves the
weights grow where the error is large (Lawson's iteration), which drives the error towards equal ripples. With
P and Q of degree 5 in x^2 the largest error is 1.1e-8, and 2.1e-8 with the kernel's float32 coefficients (these,
printed to 9 digits and rounded), under half of float32's spacing at 1/2; the kernel's float32 arithmetic adds
its own rounding to that (tests/test_layers.py bounds the result).
"""

from __future__ import annotations

import math

import numpy as np

L = 4 * math.sqrt(2)  # Phi(-L) = 7.7e-9: past L, Phi is 0 or 1 in float32
DEGREES = (5, 5)  # of P and Q in x^2


def fit(degrees: tuple[int, int] = DEGREES, points: int = 20000, rounds: int = 300):
    """(P's coefficients, Q's coefficients, lowest first, Q[0] = 1; the largest absolute error) of the fit."""
    from scipy.special import ndtr  # Phi in float64

    dp, dq = degrees
    x = L * (0.5 - 0.5 * np.cos(np.pi * (np.arange(points) + 0.5) / points))  # denser near 0 and L
    s, f = x * x, ndtr(x) - 0.5
    # columns: x s^k for P's coefficients, -f s^k (k >= 1) for Q's; right-hand side f (from Q's fixed 1)
    a = np.hstack([x[:, None] * np.vander(s, dp + 1, increasing=True),
                   -f[:, None] * np.vander(s, dq + 1, increasing=True)[:, 1:]])
    weights, q_prev, best = np.full(points, 1.0 / points), np.ones(points), (math.inf, None, None)
    for _ in range(rounds):
        for _ in range(3):  # Sanathanan-Koerner: divide each row by the previous denominator
            w = np.sqrt(weights) / q_prev
            c = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)[0]
            p, q = c[:dp + 1], np.concatenate([[1.0], c[dp + 1:]])
            q_prev = np.polynomial.polynomial.polyval(s, q)
        error = x * np.polynomial.polynomial.polyval(s, p) / q_prev - f
        worst = float(np.abs(error).max())
        if worst < best[0] and np.all(q_prev > 0):
            best = (worst, p, q)
        weights = weights * np.abs(error) ** 0.7 + 1e-300  # Lawson: more weight where the error is large
        weights /= weights.sum()
    worst, p, q = best
    return p, q, worst


def main() -> int:
    p, q, worst = fit()
    print(f"Phi(x) - 1/2 = x P(x^2) / Q(x^2) on [0, {L:.6f}], largest absolute error {worst:.2e}")
    print("P:", ", ".join(f"{v:.8e}" for v in p))
    print("Q:", ", ".join(f"{v:.8e}" for v in q))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
