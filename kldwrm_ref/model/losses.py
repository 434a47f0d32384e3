"""The losses of a softmax classifier on its logits (docs/theory.md §1.1, §1.4).

Thin, backend-dispatched wrappers: the kernels themselves live in :mod:`kldwrm_ref.backends`.
"""

from __future__ import annotations

import numpy as np

from kldwrm_ref.backends import Backend, reference

KL_KINDS = ("forward", "symmetric")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log softmax (stable)."""
    return reference.log_softmax(logits)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """pi = softmax(logits), row-wise."""
    return np.exp(reference.log_softmax(logits))


def cross_entropy(logits: np.ndarray, labels: np.ndarray, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample -log p(y|x) and its gradient softmax(z) - e_y with respect to the logits."""
    return backend.softmax_cross_entropy(logits, labels)


def kl(ref_logits: np.ndarray, logits: np.ndarray, kind: str, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample KL(p_ref || p) ("forward") or 1/2 [KL(p_ref || p) + KL(p || p_ref)] ("symmetric"),
    and its gradient with respect to ``logits``."""
    return backend.kl_and_grad(ref_logits, logits, kind)

