"""Independent float64 references for LoRA-Pro's closed form (numpy / scipy only).

Nothing here imports lorapro: tests compare the package against these.

Notation (PEFT shapes): A is (r, n), B is (m, r), the merged weight is W0 + s B A and
g is the (m, n) full gradient. LoRA's own gradients are gA_lora = s B^T g and
gB_lora = s g A^T. The equivalent gradient of an update (gA, gB) is s (B gA + gB A).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def lora_grads(A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """LoRA's gradients (gA_lora, gB_lora) for the full gradient g."""
    return s * B.T @ g, s * g @ A.T


def kron_system(A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    """Matrix M with M @ [vec(gA); vec(gB)] = vec(s B gA + s gB A) (row-major vec).

    vec(B gA) = (B kron I_n) vec(gA) and vec(gB A) = (I_m kron A^T) vec(gB).
    numpy.kron is used on purpose: torch.kron was seen to fail on r = 1 operands.
    """
    r, n = A.shape
    m = B.shape[0]
    assert B.shape == (m, r)
    return s * np.hstack([np.kron(B, np.eye(n)), np.kron(np.eye(m), A.T)])


def min_norm_lstsq(A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-norm minimiser of ||s B gA + s gB A - g||_F over (gA, gB), by brute force.

    Uses LAPACK's plain SVD driver gelss. Two others were seen to return a wrong minimiser on
    this rank-deficient system: gelsy, and gelsd (numpy's lstsq), which on one (r=2, m=10, n=3,
    rank-1 factors) case counted a null singular value as nonzero and returned entries of 1e13.
    """
    r, n = A.shape
    m = B.shape[0]
    system = kron_system(A, B, s)
    cond = np.finfo(system.dtype).eps * max(system.shape)  # numpy's rcond=None cut-off
    sol = scipy.linalg.lstsq(system, g.reshape(-1), cond=cond, lapack_driver="gelss")[0]
    return sol[: r * n].reshape(r, n), sol[r * n :].reshape(m, r)


def projected_gradient(A: np.ndarray, B: np.ndarray, g: np.ndarray) -> np.ndarray:
    """P_B g + (I - P_B) g P_A: the projection of g onto {B X + Y A}, i.e. the optimal g~.

    P_B = B B^+ and P_A = A^+ A, with SVD pseudo-inverses (rank-deficient inputs allowed).
    """
    P_B = B @ np.linalg.pinv(B)
    P_A = np.linalg.pinv(A) @ A
    return P_B @ g + (g - P_B @ g) @ P_A


def gram_pinv(M: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD Gram matrix (SVD based, cut-off rtol relative to the largest
    singular value; numpy's default is max(M.shape) * eps, i.e. r * eps for an r x r Gram matrix)."""
    if rtol is None:
        return np.linalg.pinv(M, hermitian=True)
    return np.linalg.pinv(M, hermitian=True, rtol=rtol)


def theorem_grads(
    A: np.ndarray,
    B: np.ndarray,
    gA_lora: np.ndarray,
    gB_lora: np.ndarray,
    s: float,
    x_mode: str,
    rtol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 2.1 written out directly with numpy (any gA_lora, gB_lora, consistent or not).

    gA = (1/s^2) (B^T B)^+ gA_lora + X A
    gB = (1/s^2) [I - B (B^T B)^+ B^T] gB_lora (A A^T)^+ - B X
    "sylvester": X solves B^T B X + X A A^T = -(1/s^2) (B^T B)^+ gA_lora A^T (scipy's Bartels-Stewart;
    needs B^T B and -A A^T without a common eigenvalue, i.e. not both singular).
    "zero": X = 0. "symmetric": X = -(1/(2 s^2)) (B^T B)^+ gA_lora A^T (A A^T)^+.
    """
    BtB_pinv = gram_pinv(B.T @ B, rtol)
    AAt_pinv = gram_pinv(A @ A.T, rtol)
    base_A = BtB_pinv @ gA_lora / s**2
    base_B = (gB_lora - B @ (BtB_pinv @ (B.T @ gB_lora))) @ AAt_pinv / s**2
    if x_mode == "zero":
        X = np.zeros((A.shape[0], A.shape[0]))
    elif x_mode == "symmetric":
        X = -BtB_pinv @ gA_lora @ A.T @ AAt_pinv / (2 * s**2)
    elif x_mode == "sylvester":
        X = scipy.linalg.solve_sylvester(B.T @ B, A @ A.T, -BtB_pinv @ gA_lora @ A.T / s**2)
    else:
        raise ValueError(x_mode)
    return base_A + X @ A, base_B - B @ X


def sylvester_x_brute_force(
    A: np.ndarray, B: np.ndarray, gA0: np.ndarray, gB0: np.ndarray, gA_lora: np.ndarray, gB_lora: np.ndarray
) -> np.ndarray:
    """Minimiser over X of ||gA0 + X A - gA_lora||^2 + ||gB0 - B X - gB_lora||^2 by least squares in vec(X).

    Row-major: vec(X A) = (I_r kron A^T) vec(X), vec(B X) = (B kron I_r) vec(X).
    Minimum-norm X when the minimiser is not unique.
    """
    r = A.shape[0]
    M = np.vstack([np.kron(np.eye(r), A.T), -np.kron(B, np.eye(r))])
    rhs = np.concatenate([(gA_lora - gA0).reshape(-1), (gB_lora - gB0).reshape(-1)])
    return np.linalg.lstsq(M, rhs, rcond=None)[0].reshape(r, r)


def theorem_grads_from_full(
    A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float, x_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 2.1 in terms of the full gradient, with SVD pseudo-inverses of A and B themselves.

    (B^T B)^+ gA_lora / s^2 = B^+ g / s and [I - P_B] gB_lora (A A^T)^+ / s^2 = (I - P_B) g A^+ / s,
    so no Gram matrix is formed. "zero": X = 0; "symmetric": X = -B^+ g A^+ / (2 s).
    """
    B_pinv = np.linalg.pinv(B)
    A_pinv = np.linalg.pinv(A)
    base_A = B_pinv @ g / s
    base_B = (g - B @ (B_pinv @ g)) @ A_pinv / s
    if x_mode == "zero":
        return base_A, base_B
    if x_mode == "symmetric":
        X = -B_pinv @ g @ A_pinv / (2 * s)
        return base_A + X @ A, base_B - B @ X
    raise ValueError(x_mode)


def one_factor_grads(
    A: np.ndarray, B: np.ndarray, gA_lora: np.ndarray, gB_lora: np.ndarray, s: float, frozen: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Theorem 2.1's problem min ||g~ - g||_F with one factor frozen (its gradient fixed at zero).

    A frozen: g~ = s gB A, least squares gives gB = g A^+ / s = gB_lora (A A^T)^+ / s^2 (LoRA-FA).
    B frozen: g~ = s B gA, so gA = B^+ g / s = (B^T B)^+ gA_lora / s^2. The frozen factor's entry is None.
    """
    if frozen == "A":
        return None, gB_lora @ np.linalg.pinv(A @ A.T, hermitian=True) / s**2
    if frozen == "B":
        return np.linalg.pinv(B.T @ B, hermitian=True) @ gA_lora / s**2, None
    raise ValueError(frozen)


def one_factor_brute_force(A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float, frozen: str) -> np.ndarray:
    """The same one-factor least-squares problem solved by vectorising it (SVD driver)."""
    r, n = A.shape
    m = B.shape[0]
    system = kron_system(A, B, s)
    cols = slice(r * n, None) if frozen == "A" else slice(0, r * n)
    sol = scipy.linalg.lstsq(system[:, cols], g.reshape(-1), lapack_driver="gelss")[0]
    return sol.reshape(m, r) if frozen == "A" else sol.reshape(r, n)


def full_mode_first_step(
    A: np.ndarray,
    B: np.ndarray,
    gA_lora: np.ndarray,
    gB_lora: np.ndarray,
    s: float,
    lr: float,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 3's first AdamW step (zero moments, no weight decay), X from Theorem 2.3.

    The equivalent gradient g~ = s (B gA + gB A) of Theorem 2.1's gradients gets Adam's first step,
    whose bias-corrected direction is D = g~ / (|g~| + eps); D is mapped back to the factors as
    LoRA's gradients of D (s B^T D, s D A^T), adjusted by Theorem 2.1 again and applied with lr.
    """
    gA, gB = theorem_grads(A, B, gA_lora, gB_lora, s, "zero")
    g_eq = s * (B @ gA + gB @ A)
    D = g_eq / (np.abs(g_eq) + eps)
    uA, uB = theorem_grads(A, B, s * B.T @ D, s * D @ A.T, s, "sylvester")
    return A - lr * uA, B - lr * uB


def ridge_grads(
    A: np.ndarray, B: np.ndarray, gA_lora: np.ndarray, gB_lora: np.ndarray, s: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Minimiser of ||s B gA + s gB A - g||_F^2 + lam (||gA||_F^2 + ||gB||_F^2), by a dense solve of its
    normal equations (M^T M + lam I) x = M^T vec(g) = [vec(gA_lora); vec(gB_lora)] (M of kron_system),
    so g is needed only through LoRA's gradients. lam = 0 falls back to the minimum-norm solution
    (an SVD least-squares solve of the singular normal equations)."""
    r, n = A.shape
    m = B.shape[0]
    system = kron_system(A, B, s)
    normal = system.T @ system + lam * np.eye(system.shape[1])
    rhs = np.concatenate([gA_lora.reshape(-1), gB_lora.reshape(-1)])
    if lam > 0:
        sol = np.linalg.solve(normal, rhs)
    else:
        sol = scipy.linalg.lstsq(normal, rhs, lapack_driver="gelss")[0]
    return sol[: r * n].reshape(r, n), sol[r * n :].reshape(m, r)
