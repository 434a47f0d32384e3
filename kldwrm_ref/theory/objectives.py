"""The wake objectives the theorems name, evaluable and minimised *directly* (docs/theory.md §3-§4).

Recorded history of steps j = 0..K: iterates theta_j, gradients g_j, curvature estimates F_j
(undamped; the wake uses the damped M_j = F_j + eta I), current curvatures B_j (Q, QE) and step
sizes alpha_j (lambda_j = 1 / alpha_j).  Every objective gives its value, gradient and (for the
quadratic ones) constant Hessian, and is minimised in two independent ways: the assembled linear
system, and ``scipy.optimize``.  ``kldwrm verify`` compares these minimisers with the recursions
the optimisers run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.optimize

from kldwrm_ref.curvature.averaging import wake_weights
from kldwrm_ref.validation import check_finite, check_nonnegative, check_positive, check_rho


class History(NamedTuple):
    """A recorded trajectory, one row per step j = 0..K (see module docstring)."""

    thetas: np.ndarray  # (K+1, n)
    grads: np.ndarray  # (K+1, n)
    curvatures: np.ndarray  # (K+1, n, n) F_j, undamped
    alphas: np.ndarray  # (K+1,)
    rho: float
    damping: float
    currents: np.ndarray | None = None  # (K+1, n, n) B_j, undamped

    @property
    def n_steps(self) -> int:
        return self.thetas.shape[0]

    def damped(self, j: int) -> np.ndarray:
        return self.curvatures[j] + self.damping * np.eye(self.curvatures.shape[1])


def check_history(history: History) -> History:
    """Lengths agree, rho in [0, 1), alphas > 0, every damped M_j SPD, every B_j PSD; else ValueError."""
    check_rho(history.rho)
    check_nonnegative(history.damping, "damping")
    K1, n = history.thetas.shape
    shapes = {"grads": (history.grads.shape, (K1, n)), "curvatures": (history.curvatures.shape, (K1, n, n)), "alphas": (np.shape(history.alphas), (K1,))}
    if history.currents is not None:
        shapes["currents"] = (history.currents.shape, (K1, n, n))
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"history.{name} has shape {got}, expected {want} to match {K1} iterates of size {n}")
    for name in ("thetas", "grads", "curvatures", "alphas"):
        check_finite(f"history.{name}", getattr(history, name))
    for j, alpha in enumerate(history.alphas):
        check_positive(float(alpha), f"history.alphas[{j}]")
    for j in range(K1):
        try:
            np.linalg.cholesky(history.damped(j))
        except np.linalg.LinAlgError:
            raise ValueError(f"history curvature M_{j} = F_{j} + damping I is not symmetric positive definite") from None
        if history.currents is not None and np.linalg.eigvalsh(history.currents[j]).min() < -1e-10 * max(1.0, np.abs(history.currents[j]).max()):
            raise ValueError(f"history current curvature B_{j} is not positive semi-definite")
    return history


# ------------------------------------------------------------------------------ objectives
class QuadraticObjective(NamedTuple):
    """f(theta) = sum_i l_i^T (theta - c_i) + sum_j (w_j / 2) (theta - d_j)^T M_j (theta - d_j)."""

    linear: list[tuple[np.ndarray, np.ndarray]]  # (l_i, c_i)
    quadratic: list[tuple[float, np.ndarray, np.ndarray]]  # (w_j, M_j, d_j)

    def value(self, theta: np.ndarray) -> float:
        total = sum(float(l @ (theta - c)) for l, c in self.linear)
        return total + sum(0.5 * w * float((theta - d) @ M @ (theta - d)) for w, M, d in self.quadratic)

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        grad = sum(l for l, _ in self.linear)
        return grad + sum(w * (M @ (theta - d)) for w, M, d in self.quadratic)

    def hessian(self) -> np.ndarray:
        return np.sum([w * M for w, M, _ in self.quadratic], axis=0)

    def minimise_linear(self) -> np.ndarray:
        """Solve grad = 0: (sum w_j M_j) theta = sum w_j M_j d_j - sum l_i (Cholesky)."""
        rhs = sum(w * (M @ d) for w, M, d in self.quadratic) - sum(l for l, _ in self.linear)
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(self.hessian()), rhs)

    def minimise_scipy(self, start: np.ndarray) -> np.ndarray:
        """scipy.optimize's trust-exact on value / gradient / Hessian, from ``start``."""
        H = self.hessian()
        result = scipy.optimize.minimize(self.value, start, jac=self.gradient, hess=lambda _: H, method="trust-exact", options={"gtol": 1e-14, "maxiter": 200})
        return result.x


def qwrm_objective(history: History, k: int) -> QuadraticObjective:
    """Theorem 1's wake of quadratic regularised models, divided by lambda_k:

    Q_k(theta) = sum_j rho^(k-j) [alpha_j g_j^T (theta - theta_j) + (c_j / 2) |theta - theta_j|^2_{M_j}].

    With constant alpha this is alpha * Q_k of §3.1 (same minimiser); the alpha_j factor on the
    linear terms extends Theorem 1 to step sizes that change with j (argmin Q_k is then
    theta_k - alpha_k Mbar_k^{-1} g_k, by the same subtraction argument).
    """
    rho = history.rho
    linear, quadratic = [], []
    for j in range(k + 1):
        decay = rho ** (k - j)
        c_j = 1.0 if j == 0 else 1.0 - rho
        linear.append((decay * history.alphas[j] * history.grads[j], history.thetas[j]))
        quadratic.append((decay * c_j, history.damped(j), history.thetas[j]))
    return QuadraticObjective(linear, quadratic)


def so_objective(history: History, k: int) -> QuadraticObjective:
    """Theorem 2: g_k^T (theta - theta_k) + lambda_k sum_j w_{k,j} 1/2 |theta - theta_j|^2_{M_j}."""
    lam = 1.0 / history.alphas[k]
    weights = wake_weights(history.rho, k)
    quadratic = [(lam * weights[j], history.damped(j), history.thetas[j]) for j in range(k + 1)]
    return QuadraticObjective([(history.grads[k], history.thetas[k])], quadratic)


def q_objective(history: History, k: int) -> QuadraticObjective:
    """Theorem 3: the SO objective plus the current model's curvature 1/2 s^T B_k s."""
    if history.currents is None:
        raise ValueError("the Q objective needs history.currents (B_j)")
    base = so_objective(history, k)
    return QuadraticObjective(base.linear, base.quadratic + [(1.0, history.currents[k], history.thetas[k])])


OBJECTIVES: dict[str, Callable[[History, int], QuadraticObjective]] = {
    "ea-cm": qwrm_objective,
    "so-kld-wrm": so_objective,
    "q-kld-wrm": q_objective,
}


class QEObjective(NamedTuple):
    """Section 4.3: E_k(theta) = g_k^T s + 1/2 s^T B_k s
    + lambda_k kappa sum_j wtilde_{k,j} [D(theta_j || theta) + (eta / 2) |theta - theta_j|^2].

    ``divergences[j](theta)`` returns (value, gradient in theta) - the exact KL on the current
    batch, or its quadratic expansion (consistency check (a), with eta = 0 there since M_j is
    already damped).  The eta term is the damping wake of §2.4; without it E_k has no
    minimiser when the batch Fisher is singular (more parameters than batch rows x classes).
    """

    g: np.ndarray
    B: np.ndarray
    theta_k: np.ndarray
    lam: float
    kappa: float
    centres: list[np.ndarray]
    weights: np.ndarray
    divergences: list[Callable[[np.ndarray], tuple[float, np.ndarray]]]
    damping: float = 0.0

    def value_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        s = theta - self.theta_k
        Bs = self.B @ s
        value = float(self.g @ s + 0.5 * s @ Bs)
        grad = self.g + Bs
        for w, div, centre in zip(self.weights, self.divergences, self.centres):
            d_val, d_grad = div(theta)
            d = theta - centre
            value += self.lam * self.kappa * w * (d_val + 0.5 * self.damping * float(d @ d))
            grad = grad + self.lam * self.kappa * w * (d_grad + self.damping * d)
        return value, grad

    def minimise_scipy(self, start: np.ndarray, gtol: float = 1e-12) -> np.ndarray:
        result = scipy.optimize.minimize(self.value_and_gradient, start, jac=True, method="BFGS", options={"gtol": gtol, "maxiter": 10000})
        return result.x


def quadratic_divergence(centre: np.ndarray, M: np.ndarray) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """D(theta_j || theta) -> 1/2 |theta - theta_j|^2_M, its second-order expansion (§1.4)."""

    def divergence(theta):
        d = theta - centre
        Md = M @ d
        return 0.5 * float(d @ Md), Md

    return divergence


def qe_objective(g, B, theta_k, alpha, kappa, centres, weights, divergences, damping: float = 0.0) -> QEObjective:
    """Assemble E_k; ``divergences[j]`` is theta -> (D(centres[j] || theta), gradient)."""
    if not (len(centres) == len(weights) == len(divergences)):
        raise ValueError("centres, weights and divergences must have the same length")
    lam = 1.0 / check_positive(alpha, "alpha")
    return QEObjective(g, B, theta_k, lam, check_positive(kappa, "kappa"), list(centres), np.asarray(weights), list(divergences), check_nonnegative(damping, "damping"))


# ------------------------------------------------------------------------------ recursive runner
