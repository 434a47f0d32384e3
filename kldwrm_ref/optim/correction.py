"""The KLD-WRM wake corrections of the gradient (docs/theory.md §4.2, §4.3, §7).

SO- and Q-KLD-WRM precondition ghat_k, the gradient minus what the wake of earlier models
already accounts for.  ``correction="exact"`` is Theorems 2-3; ``"authors"`` the closed form of
the authors' Q/QE code.
"""

from __future__ import annotations

import numpy as np


def wake_corrected_gradient(g: np.ndarray, previous_model_gradient: np.ndarray | None, rho: float, alpha: float, previous_alpha: float | None) -> np.ndarray:
    """ghat_k = g_k - rho (lambda_k / lambda_{k-1}) grad h_{k-1}(theta_k)   (§4.2, §4.3).

    grad h_{k-1}(theta_k) is g_{k-1} for SO-KLD-WRM and g_{k-1} + B_{k-1} s_{k-1} for Q-KLD-WRM;
    None at k = 0 (ghat_0 = g_0).  lambda_k / lambda_{k-1} = alpha_{k-1} / alpha_k.
    """
    if previous_model_gradient is None or previous_alpha is None:
        return g
    return g - rho * (previous_alpha / alpha) * previous_model_gradient


def authors_corrected_gradient(g: np.ndarray, previous_gradient: np.ndarray, previous_corrected: np.ndarray, x_term: np.ndarray, rho: float, alpha: float, previous_alpha: float) -> np.ndarray:
    """The authors' closed form for Q/QE (§7), lf = alpha_{k-1} / alpha_k:

    ghat_k = g_k + rho lf (ghat_{k-1} - g_{k-1}) - rho lf X_k

    On a step whose B_{k-1} = Mbar_{k-1}, without damping, weight decay or clipping,
    s_{k-1} = -alpha_{k-1}/(1 + alpha_{k-1}) Mbar^{-1} ghat_{k-1}, so X_k = ghat_{k-1}/(1 + alpha_{k-1})
    = -B_{k-1} s_{k-1} / alpha_{k-1} and this equals Theorem 3's ghat_k; elsewhere it differs.
    """
    lf = previous_alpha / alpha
    return g + (rho * lf) * (previous_corrected - previous_gradient) - (rho * lf) * x_term
