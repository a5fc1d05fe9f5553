"""The notebook's fraud-detection net, for any layer sizes, in the array API.

LINEAR → RELU → … → LINEAR → RELU → LINEAR → SIGMOID, mean binary cross-entropy:

    Z_l = W_l A_{l-1} + b_l,   A_l = relu(Z_l) (l < L),   A_L = sigmoid(Z_L)
    J = (1/m) Σ −Y log A_L − (1 − Y) log(1 − A_L)

``X`` has shape (n_x, m) (one example per column, as in the notebook), ``Y`` shape (m,) or
(1, m), ``W_l`` shape (n_l, n_{l-1}) and ``b_l`` shape (n_l, 1). ``cost`` broadcasts over
leading batch axes of any of the parameters, so one call evaluates a stack of perturbed
parameter sets and returns their costs, shape (B,). ``backward`` is the notebook's
backprop (unbatched), with optional planted bugs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace

__all__ = [
    "PLANTED_BUGS",
    "backward",
    "backward_with_planted_bugs",
    "cost",
    "forward",
    "init",
    "random_case",
    "seed_case",
]

PLANTED_BUGS: Mapping[str, float] = {"W2": 2.0, "b1": 4.0}
"""The notebook's planted bugs: dW2 is doubled, db1 is multiplied by 4."""


def _layers(params: Mapping[str, Any]) -> int:
    return len(params) // 2


def forward(params: Mapping[str, Any], X: Any) -> list[tuple[Any, Any]]:
    """[(Z_l, A_l)] for l = 1..L; batched where the parameters are."""
    xp = array_namespace(*params.values(), X)
    L = _layers(params)
    A = X
    cache = []
    for layer in range(1, L + 1):
        Z = params[f"W{layer}"] @ A + params[f"b{layer}"]
        A = xp.clip(Z, min=0.0) if layer < L else 1.0 / (1.0 + xp.exp(-Z))
        cache.append((Z, A))
    return cache


def cost(params: Mapping[str, Any], X: Any, Y: Any) -> Any:
    """Mean binary cross-entropy; shape () unbatched, (B,) when some parameters are (B, …)."""
    xp = array_namespace(*params.values(), X)
    A = forward(params, X)[-1][1]
    m = X.shape[-1]
    # The notebook's expression, term for term, so its numbers reproduce.
    log_probs = (-xp.log(A)) * Y + (-xp.log(1 - A)) * (1 - Y)
    return 1.0 / m * xp.sum(log_probs, axis=(-2, -1))


def backward(
    params: Mapping[str, Any], X: Any, Y: Any, *, bugs: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The gradients of ``cost`` by backpropagation, keyed like ``params`` (unbatched).

    ``bugs`` maps a parameter name to a factor its gradient is wrongly multiplied by, the
    way the notebook plants them (``dW2 = 1/m · dZ2 A1ᵀ · 2``, ``db1 = 4/m · Σ dZ1``).
    """
    xp = array_namespace(*params.values(), X)
    bugs = dict(bugs or {})
    L = _layers(params)
    m = X.shape[-1]
    cache = forward(params, X)
    grads: dict[str, Any] = {}
    dZ = cache[-1][1] - Y
    for layer in range(L, 0, -1):
        A_prev = cache[layer - 2][1] if layer > 1 else X
        W = params[f"W{layer}"]
        grads[f"W{layer}"] = 1.0 / m * (dZ @ xp.matrix_transpose(A_prev)) * bugs.get(f"W{layer}", 1.0)
        grads[f"b{layer}"] = bugs.get(f"b{layer}", 1.0) / m * xp.sum(dZ, axis=1, keepdims=True)
        if layer > 1:
            dA = xp.matrix_transpose(W) @ dZ
            dZ = dA * xp.astype(A_prev > 0, dA.dtype)
    return {name: grads[name] for name in params}


def backward_with_planted_bugs(params: Mapping[str, Any], X: Any, Y: Any) -> dict[str, Any]:
    """The notebook's buggy backprop: dW2 × 2 and db1 × 4 (see ``PLANTED_BUGS``)."""
    return backward(params, X, Y, bugs=PLANTED_BUGS)


def _place(arrays: Sequence[Any], xp: Any, device: Any) -> list[Any]:
    """NumPy arrays as they are, or copies on namespace ``xp`` (a module or name) and ``device``."""
    if xp is None:
        return list(arrays)
    from ..backends import resolve, to_backend

    backend = resolve(xp, [], device)
    return [to_backend(a, backend) for a in arrays]


def seed_case(*, xp: Any = None, device: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """X, Y, params of the notebook's ``gradient_check_n_test_case``, float64.

    NumPy's legacy ``np.random.seed(1)`` then ``randn`` in the notebook's order: X (4, 3),
    W1 (5, 4), b1 (5, 1), W2 (3, 5), b2 (3, 1), W3 (1, 3), b3 (1, 1); Y = [1., 1., 0.].
    NumPy arrays, or arrays of namespace ``xp`` on ``device`` when given.
    """
    import numpy as np  # host-side data generation, the notebook's legacy RNG

    np.random.seed(1)
    X = np.random.randn(4, 3)
    Y = np.array([1.0, 1.0, 0.0])
    shapes = {"W1": (5, 4), "b1": (5, 1), "W2": (3, 5), "b2": (3, 1), "W3": (1, 3), "b3": (1, 1)}
    params = {name: np.random.randn(*shape) for name, shape in shapes.items()}
    X, Y, *values = _place([X, Y, *params.values()], xp, device)
    return X, Y, dict(zip(shapes, values))


def init(
    layer_dims: Sequence[int], *, seed: int = 0, dtype: str = "float64", xp: Any = None, device: Any = None
) -> dict[str, Any]:
    """He-initialised W_l (n_l, n_{l-1}) and small random b_l (n_l, 1), from ``seed``.

    Biases are random, not zero, so a check exercises them. Drawn on the host with NumPy's
    ``default_rng(seed)`` (the same numbers on every backend), then placed on ``xp``/``device``.
    """
    if len(layer_dims) < 2 or any(int(n) < 1 for n in layer_dims):
        raise ValueError(f"layer_dims must list ≥ 2 positive sizes (inputs … outputs), got {layer_dims}")
    import numpy as np  # host-side data generation

    rng = np.random.default_rng(seed)
    params = {}
    for layer in range(1, len(layer_dims)):
        n_in, n_out = int(layer_dims[layer - 1]), int(layer_dims[layer])
        params[f"W{layer}"] = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        params[f"b{layer}"] = (0.1 * rng.standard_normal((n_out, 1))).astype(dtype)
    return dict(zip(params, _place(list(params.values()), xp, device)))


def random_case(
    layer_dims: Sequence[int],
    m: int,
    *,
    seed: int = 0,
    dtype: str = "float64",
    xp: Any = None,
    device: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """X (n_x, m) standard normal, Y (1, m) random 0/1 labels, and ``init`` parameters."""
    import numpy as np  # host-side data generation

    rng = np.random.default_rng(seed + 1_000_003)
    X = rng.standard_normal((int(layer_dims[0]), m)).astype(dtype)
    Y = (rng.random((1, m)) < 0.5).astype(dtype)
    params = init(layer_dims, seed=seed, dtype=dtype, xp=xp, device=device)
    X, Y = _place([X, Y], xp, device)
    return X, Y, params
