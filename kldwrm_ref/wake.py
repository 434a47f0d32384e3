"""The wake: weights, KLD-WRM objectives and the recursive steps (THEORY.md sections 2-4).

Recorded history of steps j = 0..K: iterates theta_j, gradients g_j, curvature estimates F_j
(undamped; the wake uses the damped M_j = F_j + eta I), current curvatures B_j (Q, QE) and step
sizes alpha_j (lambda_j = 1 / alpha_j).  Every objective is evaluable (value, gradient, and for
the quadratic ones the constant Hessian) and minimised *directly* in two independent ways: the
assembled linear system, and ``scipy.optimize``.  The recursive formulas the optimisers call -
:func:`wake_corrected_gradient`, :func:`damped_solve_step`, :func:`recursive_trajectory` - live here
too, so the checks exercise the production code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.linalg
import scipy.optimize

from kldwrm_ref.validation import check_choice, check_finite, check_nonnegative, check_positive, check_positive_int, check_rho

METHODS = ("ea-cm", "so-kld-wrm", "q-kld-wrm")


# ------------------------------------------------------------------------------ weights
def wake_weights(rho: float, k: int) -> np.ndarray:
    """w_{k,j}, j = 0..k (section 2): w_{k,0} = rho^k, w_{k,j} = (1 - rho) rho^(k-j) for j >= 1."""
    rho = check_rho(rho)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = (1.0 - rho) * rho ** np.arange(k, -1, -1, dtype=np.float64)
    weights[0] = rho**k
    return weights


def truncated_wake_weights(rho: float, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """QE's wake over the last m iterates (section 4.3): (indices j, weights wtilde_{k,j}).

    The oldest kept iterate absorbs the tail mass rho^(m-1); for k < m - 1 the full wake.
    """
    m = check_positive_int(m, "m")
    if k < m - 1:
        return np.arange(k + 1), wake_weights(rho, k)
    first = k - m + 1
    weights = (1.0 - rho) * rho ** np.arange(k - first, -1, -1, dtype=np.float64)
    weights[0] = rho ** (m - 1)
    return np.arange(first, k + 1), weights


def step_size_at(step_size, k: int) -> float:
    """alpha_k from a constant or a callable of the step number."""
    alpha = step_size(k) if callable(step_size) else step_size
    return check_positive(alpha, f"step size at step {k}")


# ------------------------------------------------------------------------------ recursion
def wake_corrected_gradient(g: np.ndarray, previous_model_gradient: np.ndarray | None, rho: float, alpha: float, previous_alpha: float | None) -> np.ndarray:
    """ghat_k = g_k - rho (lambda_k / lambda_{k-1}) grad h_{k-1}(theta_k)   (sections 4.1, 4.2).

    grad h_{k-1}(theta_k) is g_{k-1} for SO-KLD-WRM and g_{k-1} + B_{k-1} s_{k-1} for Q-KLD-WRM;
    None at k = 0 (ghat_0 = g_0).  lambda_k / lambda_{k-1} = alpha_{k-1} / alpha_k.
    """
    if previous_model_gradient is None:
        return g
    return g - rho * (previous_alpha / alpha) * previous_model_gradient


def authors_corrected_gradient(g: np.ndarray, previous_gradient: np.ndarray, previous_corrected: np.ndarray, x_term: np.ndarray, rho: float, alpha: float, previous_alpha: float) -> np.ndarray:
    """The authors' closed form for Q/QE (docs/theory.md 7), lf = alpha_{k-1} / alpha_k:

    ghat_k = g_k + rho lf (ghat_{k-1} - g_{k-1}) - rho lf X_k

    On a step whose B_{k-1} = Mbar_{k-1}, without damping, weight decay or clipping,
    s_{k-1} = -alpha_{k-1}/(1 + alpha_{k-1}) Mbar^{-1} ghat_{k-1}, so X_k = ghat_{k-1}/(1 + alpha_{k-1})
    = -B_{k-1} s_{k-1} / alpha_{k-1} and this equals Theorem 3's ghat_k; elsewhere it differs.
    """
    lf = previous_alpha / alpha
    return g + (rho * lf) * (previous_corrected - previous_gradient) - (rho * lf) * x_term


def damped_solve_step(inverse, vector: np.ndarray, alpha: float) -> np.ndarray:
    """s = -alpha P^{-1} v for a (damped) curvature inverse operator P^{-1}."""
    return -alpha * inverse.matvec(vector)


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
        return sum(w * M for w, M, _ in self.quadratic)

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

    With constant alpha this is alpha * THEORY's Q_k (same minimiser); the alpha_j factor on the
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
    already damped).  The eta term is the damping wake of section 2; without it E_k has no
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
    """D(theta_j || theta) -> 1/2 |theta - theta_j|^2_M, its second-order expansion (section 1)."""

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
def recursive_trajectory(method: str, theta0: np.ndarray, grads: Sequence[np.ndarray], curvatures: Sequence[np.ndarray], alphas: Sequence[float], rho: float, damping: float, currents: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Iterates theta_0..theta_{K+1} of EA-CM / SO / Q on a *given* stream of g_j, F_j, B_j.

    Uses the production pieces: :class:`~kldwrm_ref.averaging.ExponentialAverage`,
    :class:`~kldwrm_ref.linalg.DenseInverse`, :func:`wake_corrected_gradient`,
    :func:`damped_solve_step`.  The step k solves with (Fbar_k + alpha_k B_k + eta I) for Q.
    """
    from kldwrm_ref.averaging import ExponentialAverage
    from kldwrm_ref.linalg import DenseInverse

    method = check_choice(method, "method", METHODS)
    if method == "q-kld-wrm" and currents is None:
        raise ValueError("q-kld-wrm needs currents (B_j)")
    ea = ExponentialAverage.create(rho)
    state = ea.init()
    thetas = [np.array(theta0, dtype=np.float64)]
    previous_model_gradient, previous_alpha = None, None
    for k, (g, F) in enumerate(zip(grads, curvatures)):
        alpha = float(alphas[k])
        state = ea.update(state, (F,))
        (Fbar,) = ea.value(state)
        if method == "ea-cm":
            step = damped_solve_step(DenseInverse(Fbar, damping), g, alpha)
        else:
            ghat = wake_corrected_gradient(g, previous_model_gradient, rho, alpha, previous_alpha)
            if method == "so-kld-wrm":
                step = damped_solve_step(DenseInverse(Fbar, damping), ghat, alpha)
                previous_model_gradient = g
            else:
                step = damped_solve_step(DenseInverse(Fbar + alpha * currents[k], damping), ghat, alpha)
                previous_model_gradient = g + currents[k] @ step
        previous_alpha = alpha
        thetas.append(thetas[-1] + step)
    return np.array(thetas)
