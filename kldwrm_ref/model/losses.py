"""The losses of a softmax classifier on its logits (docs/theory.md §1.1, §1.4).

The losses and their gradients are the backend's kernels (:mod:`kldwrm_ref.backends`);
:func:`log_softmax` and :func:`probabilities` work in the logits' own array namespace.
"""

from __future__ import annotations

from typing import Any

from kldwrm_ref.arrays import array_namespace
from kldwrm_ref.backends import Backend

KL_KINDS = ("forward", "symmetric")


def log_softmax(logits: Any) -> Any:
    """Row-wise log softmax, stable: z - max(z) - log sum exp(z - max(z)) (the namespace-generic
    form of :func:`kldwrm_ref.backends.reference.log_softmax`, same operations in the same order)."""
    xp = array_namespace(logits)
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def probabilities(logits: Any) -> Any:
    """pi = softmax(logits), row-wise."""
    return array_namespace(logits).exp(log_softmax(logits))


def cross_entropy(logits: Any, labels: Any, backend: Backend) -> tuple[Any, Any]:
    """Per-sample -log p(y|x) and its gradient softmax(z) - e_y with respect to the logits."""
    return backend.softmax_cross_entropy(logits, labels)


def kl(ref_logits: Any, logits: Any, kind: str, backend: Backend) -> tuple[Any, Any]:
    """Per-sample KL(p_ref || p) ("forward") or 1/2 [KL(p_ref || p) + KL(p || p_ref)] ("symmetric"),
    and its gradient with respect to ``logits``."""
    return backend.kl_and_grad(ref_logits, logits, kind)
