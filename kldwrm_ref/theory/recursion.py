"""The optimisers' recursions run on a *given* stream of gradients and curvatures (docs/theory.md §3-§4).

:func:`recursive_trajectory` uses the production pieces - the exponential average
(:class:`~kldwrm_ref.curvature.averaging.ExponentialAverage`), dense damped solves
(:class:`~kldwrm_ref.curvature.linalg.DenseInverse`) and the wake correction
(:func:`~kldwrm_ref.optim.correction.wake_corrected_gradient`) - so that ``kldwrm verify``
checks the code the optimisers run against the direct minimisers of :mod:`.objectives`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kldwrm_ref.curvature.averaging import ExponentialAverage
from kldwrm_ref.curvature.linalg import DenseInverse
from kldwrm_ref.optim.correction import wake_corrected_gradient
from kldwrm_ref.validation import check_choice

METHODS = ("ea-cm", "so-kld-wrm", "q-kld-wrm")


def damped_solve_step(inverse, vector: np.ndarray, alpha: float) -> np.ndarray:
    """s = -alpha P^{-1} v for a (damped) curvature inverse operator P^{-1}."""
    return -alpha * inverse.matvec(vector)


def recursive_trajectory(method: str, theta0: np.ndarray, grads: Sequence[np.ndarray], curvatures: Sequence[np.ndarray], alphas: Sequence[float], rho: float, damping: float, currents: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Iterates theta_0..theta_{K+1} of EA-CM / SO / Q on a given stream of g_j, F_j, B_j; the
    step k solves with (Fbar_k + alpha_k B_k + eta I) for Q."""
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
                assert currents is not None
                step = damped_solve_step(DenseInverse(Fbar + alpha * currents[k], damping), ghat, alpha)
                previous_model_gradient = g + currents[k] @ step
        previous_alpha = alpha
        thetas.append(thetas[-1] + step)
    return np.array(thetas)
