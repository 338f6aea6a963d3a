"""Calibrate the float64 tolerance of the property tests: how far can the closed form's equivalent gradient
be from the exact projection, as a function of the factors' condition number?

Prints the table of docs/reliability.md, "Honest tolerances (property tests)". Each random LoRA problem is
A (r x n) and B (m x r) with prescribed singular values, a full gradient g (m x n), a scaling s, and
LoRA's own gradients grad_A = s B^T g, grad_B = s g A^T (as tests/reference.py's lora_grads). Measured:

    error = |s (B gA + gB A) - (P_B g + (I - P_B) g P_A)| / |g|     (Frobenius norms)

for (gA, gB) = lorapro.optimal_gradients(A, B, grad_A, grad_B, s), the worst of the three x_modes (in
exact arithmetic the equivalent gradient does not depend on X; the tests check every x_mode). The
reference projection uses orthonormal bases of B's column space and A's row space from an SVD of each
factor, truncated to the rank known from the construction (as the tests' reference): no Gram matrix and no
pseudo-inverse, so its own error is ~eps (~eps K where a factor is rank-deficient), not ~eps K^2.

K = max(K_A, K_B), K of a factor = sigma_max / sigma_min of its nonzero singular values (measured), as in
tests/test_property.py. Per K band the table gives the worst error / (eps K^2), the worst error / (eps K^3)
and the worst error / tol with the tests' tol = eps (100 K^2 + 0.1 K^3), each worst taken over the
problems of the band, each problem divided by its own K. The strict float64 test keeps K <= 10^4.5, so
the ratio to tol must stay below 1 in the bands up to 10^4.5; the 10^4.5 - 10^5 band is shown for the
margin above it (the default cut-off keeps singular value ratios down to 6.1e-6, i.e. K up to 1.6e5).

Two sweeps, --problems each:

- broad: the tests' input ranges (r in 1..64, m and n in 1..300, scales 10^[-6, 6], s in 10^[-2, 2])
  with r, m, n drawn log-uniformly so that r close to or above min(m, n) is common; ranks 1..r as the
  tests draw them; log10 K_A and log10 K_B independent, uniform in [0, 5];
- targeted: the hardest case seen, m <= r with both factors ill-conditioned (B of full row rank, so
  P_B = I and (I - P_B) g is an exact zero formed by cancellation, whose rounding error (A A^T)^+
  amplifies); A and B of full rank, log10 K_A uniform in [0, 5] and log10 K_B within half a decade of it.

    python benchmarks/tolerance_sweep.py                       # ~50 s on a busy 2-core machine
    python benchmarks/tolerance_sweep.py --problems 5000 --seed 1
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from lorapro.closed_form import X_MODES, optimal_gradients

EPS = float(np.finfo(np.float64).eps)
MAX_DECADES = 5.0  # condition numbers up to 1e5
BANDS = [  # (label, upper edge of log10 K); the last band takes the rest (measured K may round above 1e5)
    ("1 - 10", 1.0),
    ("10 - 10^3", 3.0),
    ("10^3 - 10^4.5", 4.5),
    ("10^4.5 - 10^5", math.inf),
]
STRICT_DECADES = 4.5  # the strict float64 property test keeps K <= 10^4.5


def tolerance(kappa: float) -> float:
    """The property tests' tolerance (tests/test_property.py, ``tolerance``)."""
    return EPS * (100.0 * kappa**2 + 0.1 * kappa**3)


def log_uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high], log-uniform: small sizes (r >= min(m, n)) come up as often as large."""
    return int(min(high, math.floor(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def factor(rng: np.random.Generator, rows: int, cols: int, rank: int, decades: float) -> np.ndarray:
    """A rows x cols matrix of the given rank whose singular values span ``decades`` (largest 1), in random
    order: the tests' "spectral" kind."""
    U, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    values = np.logspace(0.0, -decades, rank)
    rng.shuffle(values)
    return (U * values) @ V.T


def svd_of_rank(M: np.ndarray, rank: int):
    """Orthonormal bases of the column and row space of M and its condition number, from an SVD truncated
    to the rank known from the construction (as the tests' ``Factor.of``): the singular values beyond it
    are rounding noise (~1e-16 of the largest), those within it at least 1e-5 of it."""
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return U[:, :rank], Vt[:rank].T, float(S[0] / S[rank - 1])


def draw_problem(rng: np.random.Generator, mode: str):
    """Shapes, ranks and log10 condition numbers of one problem of the given sweep."""
    if mode == "broad":
        r, m, n = log_uniform_int(rng, 1, 64), log_uniform_int(rng, 1, 300), log_uniform_int(rng, 1, 300)
        rank_A = min(int(rng.integers(1, r + 1)), n)
        rank_B = min(int(rng.integers(1, r + 1)), m)
        dec_A, dec_B = rng.uniform(0.0, MAX_DECADES, size=2)
    else:  # targeted: m <= r, both factors of full rank and ill-conditioned together
        r = log_uniform_int(rng, 2, 64)
        m, n = int(rng.integers(1, r + 1)), log_uniform_int(rng, 1, 300)
        rank_A, rank_B = min(r, n), m
        dec_A = rng.uniform(0.0, MAX_DECADES)
        dec_B = float(np.clip(dec_A + rng.uniform(-0.5, 0.5), 0.0, MAX_DECADES))
    return r, m, n, rank_A, rank_B, dec_A, dec_B


def run_problem(seed: int, mode: str, index: int) -> tuple[float, float, tuple]:
    """(K, worst error over x_modes relative to |g|, description) of problem ``index`` of a sweep.
    Each problem has its own generator, so that any one can be rerun alone."""
    rng = np.random.default_rng((seed, ("broad", "targeted").index(mode), index))
    r, m, n, rank_A, rank_B, dec_A, dec_B = draw_problem(rng, mode)
    # The tests' scales: A, B and g over 12 decades, s over 4 (the closed form must be scale-free).
    A = factor(rng, r, n, rank_A, dec_A) * 10.0 ** rng.uniform(-6, 6)
    B = factor(rng, m, r, rank_B, dec_B) * 10.0 ** rng.uniform(-6, 6)
    g = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-6, 6)
    s = 10.0 ** rng.uniform(-2, 2)

    _, V_A, kappa_A = svd_of_rank(A, rank_A)  # row space of A: columns of V_A
    U_B, _, kappa_B = svd_of_rank(B, rank_B)  # column space of B: columns of U_B
    pb_g = U_B @ (U_B.T @ g)
    optimum = pb_g + ((g - pb_g) @ V_A) @ V_A.T
    tensors = [torch.from_numpy(t) for t in (A, B, s * B.T @ g, s * g @ A.T)]
    error = 0.0
    for x_mode in X_MODES:
        gA, gB = (t.numpy() for t in optimal_gradients(*tensors, s, x_mode=x_mode))
        error = max(error, float(np.linalg.norm(s * (B @ gA + gB @ A) - optimum)))
    k = max(kappa_A, kappa_B)
    where = f"{mode} #{index}: m={m} n={n} r={r} rank_A={rank_A} rank_B={rank_B} K={k:.3g}"
    return k, error / float(np.linalg.norm(g)), where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--problems", type=int, default=2000, help="problems per sweep (broad, targeted)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the tests: tiny matmuls are slower multi-threaded on a busy machine

    start = time.perf_counter()
    rows = []  # (band, sweep, count, worst err/(eps K^2), worst err/(eps K^3), worst err/tol, where)
    strict_worst = 0.0  # worst err/tol over the problems with K <= 10^4.5
    for mode in ("broad", "targeted"):
        stats = [[0, 0.0, 0.0, 0.0, ""] for _ in BANDS]
        for index in range(args.problems):
            k, error, where = run_problem(args.seed, mode, index)
            band = next(i for i, (_, upper) in enumerate(BANDS) if math.log10(k) <= upper)
            st = stats[band]
            st[0] += 1
            st[1] = max(st[1], error / (EPS * k**2))
            st[2] = max(st[2], error / (EPS * k**3))
            if error / tolerance(k) >= st[3]:
                st[3], st[4] = error / tolerance(k), where
            if math.log10(k) <= STRICT_DECADES:
                strict_worst = max(strict_worst, error / tolerance(k))
        rows += [(label, mode, *st) for (label, _), st in zip(BANDS, stats, strict=True)]

    print("| K = max(K_A, K_B) | sweep | problems | worst error / (eps K^2) | / (eps K^3) | / tol |")
    print("|---|---|---|---|---|---|")
    for label, mode, count, k2, k3, ratio, _ in rows:
        cells = [f"{k2:.3g}", f"{k3:.3g}", f"{ratio:.3g}"] if count else ["-", "-", "-"]
        print(f"| {label} | {mode} | {count} | " + " | ".join(cells) + " |")
    print()
    print("tol = eps (100 K^2 + 0.1 K^3), the property tests' tolerance; worst ratio to it per band at:")
    for label, _, count, *_, where in rows:
        if count:
            print(f"  {label}: {where}")
    print(f"worst error / tol for K <= 10^{STRICT_DECADES}: {strict_worst:.3g} (must stay below 1)")
    print(
        f"{2 * args.problems} problems, seed {args.seed}, {time.perf_counter() - start:.0f} s, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )


if __name__ == "__main__":
    main()
