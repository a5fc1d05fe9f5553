"""The notebook's 1-D model: J(θ) = θ·x, with dJ/dθ = x.

``theta`` may carry leading batch axes: for a scalar x, J = θ·x elementwise (θ of shape
(B,) gives (B,)); for a vector x of shape (n,), J = Σ θ_i x_i over the last axis of θ.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

__all__ = ["cost", "gradient"]


def cost(theta: Any, x: Any) -> Any:
    """J = θ·x; shape θ.shape for scalar x, θ.shape[:-1] for a vector x."""
    if getattr(x, "ndim", 0) == 0:
        return theta * x
    return array_namespace(theta, x).sum(theta * x, axis=-1)


def gradient(theta: Any, x: Any) -> Any:
    """dJ/dθ = x: an array of θ's shape, dtype and device (a number when θ and x are numbers)."""
    if isinstance(theta, (int, float)):
        return x
    xp = array_namespace(theta)
    return xp.zeros_like(theta) + x
