"""The notebook's fraud-detection net, for any layer sizes, in the array API.

LINEAR → RELU → … → LINEAR → RELU → LINEAR → SIGMOID, mean binary cross-entropy:

    Z_l = W_l A_{l-1} + b_l,   A_l = relu(Z_l) (l < L),   A_L = sigmoid(Z_L)
    J = (1/m) Σ −Y log A_L − (1 − Y) log(1 − A_L)

``X`` has shape (n_x, m) (one example per column, as in the notebook), ``Y`` shape (m,) or
(1, m), ``W_l`` shape (n_l, n_{l-1}) and ``b_l`` shape (n_l, 1). ``cost`` broadcasts over
leading batch axes of any of the parameters, so one call evaluates a stack of perturbed
parameter sets and returns their costs, shape (B,). ``backward`` is the notebook's
backprop (unbatched), with optional planted bugs.

Dropout (inverted, as in the course): every hidden activation is multiplied by a fixed 0/1
mask D_l of shape (n_l, m) and divided by ``keep_prob``, A_l = relu(Z_l) · D_l / keep_prob.
The notebook says gradient checking "doesn't work with dropout" because each forward pass
draws new masks, so J is a different function at θ + ε and θ − ε. Here the masks are drawn
once (``dropout_masks``, or from ``seed``) and are the same in every call: the mask (n_l, m)
broadcasts over the leading batch axis of stacked parameters, so every perturbed row sees
the same network, and ``backward`` applies the same masks.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

__all__ = [
    "PLANTED_BUGS",
    "backward",
    "backward_with_dropout_bug",
    "backward_with_planted_bugs",
    "cost",
    "dropout_masks",
    "forward",
    "init",
    "random_case",
    "seed_case",
]

PLANTED_BUGS: Mapping[str, float] = {"W2": 2.0, "b1": 4.0}
"""The notebook's planted bugs: dW2 is doubled, db1 is multiplied by 4."""


def _layers(params: Mapping[str, Any]) -> int:
    return len(params) // 2


def dropout_masks(
    layer_dims_or_params: Sequence[int] | Mapping[str, Any],
    m: int,
    keep_prob: float,
    seed: int,
    xp: Any = None,
    device: Any = None,
    *,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Fixed dropout masks ``{"D1": …, "D{L-1}": …}`` for every hidden layer, shape (n_l, m).

    Entries are 1 with probability ``keep_prob`` and 0 otherwise (the course's
    ``D = (rand(n_l, m) < keep_prob)``), drawn on the host from NumPy's ``default_rng(seed)``
    — never the global RNG — so the same seed gives the same masks on every backend.

    ``layer_dims_or_params`` is either the layer sizes ``[n_x, n_1, …, n_L]`` or a parameter
    mapping (``W_l`` of shape (…, n_l, n_{l-1}); a batch axis is allowed). Given parameters
    and no ``xp``, the masks take the parameters' namespace, device and dtype; otherwise they
    are NumPy arrays (float64, or ``dtype``), or arrays of ``xp`` on ``device``.
    Raises ``ValueError`` for ``keep_prob`` outside (0, 1] or ``m`` < 1.
    """
    _check_keep_prob(keep_prob)
    if int(m) < 1:
        raise ValueError(f"m={m!r} must be the number of examples (columns of X), ≥ 1")
    import numpy as np  # host-side mask generation, independent of the user's global RNG

    if isinstance(layer_dims_or_params, Mapping):
        params = layer_dims_or_params
        hidden = [int(params[f"W{layer}"].shape[-2]) for layer in range(1, _layers(params))]
        if xp is None:
            xp = array_namespace(*params.values())
            device = device_of(params["W1"])
        dtype = dtype or params["W1"].dtype
    else:
        dims = [int(n) for n in layer_dims_or_params]
        if len(dims) < 2:
            raise ValueError(f"layer_dims must list ≥ 2 sizes (inputs … outputs), got {dims}")
        hidden = dims[1:-1]
    rng = np.random.default_rng(seed)
    masks = {f"D{layer}": rng.random((n, int(m))) < keep_prob for layer, n in enumerate(hidden, start=1)}
    if xp is None:
        return {name: mask.astype(dtype or "float64") for name, mask in masks.items()}
    # Placed as bool (every backend has it), then cast: no float64 detour on the device.
    placed = _place(list(masks.values()), xp, device)
    namespace = array_namespace(*placed) if placed else None
    if dtype is None or isinstance(dtype, str):
        dtype = getattr(namespace, dtype or "float64", None)
    return {name: namespace.astype(mask, dtype) for name, mask in zip(masks, placed)}


def _check_keep_prob(keep_prob: float) -> None:
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob!r} must lie in (0, 1]: the probability of keeping a unit")


def _dropout(
    params: Mapping[str, Any], X: Any, keep_prob: float, masks: Mapping[str, Any] | None, seed: int | None
) -> Mapping[str, Any] | None:
    """The masks to apply (validated), or None when there is no dropout."""
    _check_keep_prob(keep_prob)
    if masks is None:
        if keep_prob == 1.0:
            return None
        if seed is None:
            raise ValueError(
                f"keep_prob={keep_prob} needs fixed masks: pass masks=dropout_masks(...) or seed=…, "
                "the same in cost and backward (fresh random masks per call make J a different "
                "function at θ + ε and θ − ε, and no gradient check can pass)"
            )
        return dropout_masks(params, X.shape[-1], keep_prob, seed)
    expected = {
        f"D{layer}": (int(params[f"W{layer}"].shape[-2]), int(X.shape[-1]))
        for layer in range(1, _layers(params))
    }
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    if shapes != expected:
        raise ValueError(
            f"masks must have the shapes {expected} (one (n_l, m) mask per hidden layer), got {shapes}"
        )
    return masks


def _affine(W: Any, A: Any, b: Any, xp: Any) -> Any:
    """W A + b, broadcasting over leading batch axes, with as few and as large GEMMs as it can.

    A stack of weights against shared activations, W (B, n, k) and A (k, m), is ONE GEMM
    (B·n, k) @ (k, m) instead of B small ones (the rows perturbing W1 in a stacked check):
    each output element is the same dot product either way. The bias is added in place
    where the shapes allow, so a layer allocates one (…, n, m) array, not two: fresh
    memory is paid for in page faults, and on a 2-core VM three live 2 MiB temporaries
    cost ~2 ms to fault in against ~0.2 ms to fill.
    """
    if W.ndim > 2 and A.ndim == 2:
        n, k = W.shape[-2:]
        Z = xp.reshape(xp.reshape(W, (-1, k)) @ A, (*W.shape[:-2], n, A.shape[-1]))
    else:
        Z = W @ A
    if b.ndim <= Z.ndim:
        Z += b  # in place (a new array on libraries without in-place updates, e.g. JAX)
        return Z
    return Z + b


def _layers_out(
    params: Mapping[str, Any], X: Any, keep_prob: float, masks: Mapping[str, Any] | None, xp: Any
) -> Iterator[tuple[Any, Any]]:
    """(Z_l, A_l) for l = 1..L, one layer at a time: the caller decides what to keep."""
    L = _layers(params)
    A = X
    for layer in range(1, L + 1):
        Z = _affine(params[f"W{layer}"], A, params[f"b{layer}"], xp)
        # maximum(Z, 0), the notebook's relu: one ufunc, where array-api-compat's clip for
        # NumPy is a Python wrapper costing ~11 µs a call (a quarter of the seed case's cost).
        A = xp.maximum(Z, 0.0) if layer < L else 1.0 / (1.0 + xp.exp(-Z))
        if masks is not None and layer < L:
            # Inverted dropout, the course's two steps: A = A * D; A = A / keep_prob. The
            # (n_l, m) mask broadcasts over a leading batch axis of A.
            A = A * masks[f"D{layer}"] / keep_prob
        yield Z, A


def forward(
    params: Mapping[str, Any],
    X: Any,
    *,
    keep_prob: float = 1.0,
    masks: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> list[tuple[Any, Any]]:
    """[(Z_l, A_l)] for l = 1..L; batched where the parameters are.

    With dropout, the hidden A_l are after the mask and the 1/keep_prob scaling.
    """
    masks = _dropout(params, X, keep_prob, masks, seed)
    return list(_layers_out(params, X, keep_prob, masks, array_namespace(*params.values(), X)))


def cost(
    params: Mapping[str, Any],
    X: Any,
    Y: Any,
    *,
    keep_prob: float = 1.0,
    masks: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Any:
    """Mean binary cross-entropy; shape () unbatched, (B,) when some parameters are (B, …).

    ``keep_prob`` < 1 applies inverted dropout with fixed ``masks`` (from ``dropout_masks``)
    or masks drawn from ``seed`` (identical in every call). ``gcbackend.check`` passes its
    extra arguments positionally, so bind the dropout options with ``functools.partial``::

        masks = mlp.dropout_masks(params, X.shape[1], keep_prob=0.8, seed=0)
        cost = functools.partial(mlp.cost, keep_prob=0.8, masks=masks)
        grads = mlp.backward(params, X, Y, keep_prob=0.8, masks=masks)
        gc.check(cost, params, grads, X, Y)

    (or ``lambda p, X, Y: mlp.cost(p, X, Y, keep_prob=0.8, masks=masks)``). The masks must be
    arrays of the backend the check runs on; ``seed=`` draws them there.
    """
    xp = array_namespace(*params.values(), X)
    masks = _dropout(params, X, keep_prob, masks, seed)
    # Layer by layer, keeping nothing behind: each (Z, A) is dropped once the next exists
    # (unpacking the generator at once would hold every layer's arrays until the end).
    ((_, A),) = collections.deque(_layers_out(params, X, keep_prob, masks, xp), maxlen=1)
    m = X.shape[-1]
    # The notebook's expression, term for term, so its numbers reproduce.
    log_probs = (-xp.log(A)) * Y + (-xp.log(1 - A)) * (1 - Y)
    return 1.0 / m * xp.sum(log_probs, axis=(-2, -1))


def backward(
    params: Mapping[str, Any],
    X: Any,
    Y: Any,
    *,
    keep_prob: float = 1.0,
    masks: Mapping[str, Any] | None = None,
    seed: int | None = None,
    bugs: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The gradients of ``cost`` by backpropagation, keyed like ``params`` (unbatched).

    ``keep_prob``, ``masks`` and ``seed`` must be the ones given to ``cost``: the backward
    pass applies the same masks, dA_l = dA_l · D_l / keep_prob.

    ``bugs`` maps a parameter name to a factor its gradient is wrongly multiplied by, the
    way the notebook plants them (``dW2 = 1/m · dZ2 A1ᵀ · 2``, ``db1 = 4/m · Σ dZ1``);
    ``{"dropout_scale": True}`` forgets the 1/keep_prob in the backward pass, which makes
    every hidden layer's gradient wrong (by 1/keep_prob per hidden layer above it).
    """
    xp = array_namespace(*params.values(), X)
    bugs = dict(bugs or {})
    forget_scale = bool(bugs.pop("dropout_scale", False))
    masks = _dropout(params, X, keep_prob, masks, seed)
    L = _layers(params)
    m = X.shape[-1]
    cache = forward(params, X, keep_prob=keep_prob, masks=masks)
    grads: dict[str, Any] = {}
    dZ = cache[-1][1] - Y
    for layer in range(L, 0, -1):
        A_prev = cache[layer - 2][1] if layer > 1 else X
        W = params[f"W{layer}"]
        grads[f"W{layer}"] = 1.0 / m * (dZ @ xp.matrix_transpose(A_prev)) * bugs.get(f"W{layer}", 1.0)
        grads[f"b{layer}"] = bugs.get(f"b{layer}", 1.0) / m * xp.sum(dZ, axis=1, keepdims=True)
        if layer > 1:
            dA = xp.matrix_transpose(W) @ dZ
            if masks is not None:
                dA = dA * masks[f"D{layer - 1}"]
                if not forget_scale:
                    dA = dA / keep_prob
            dZ = dA * xp.astype(A_prev > 0, dA.dtype)
    return {name: grads[name] for name in params}


def backward_with_dropout_bug(
    params: Mapping[str, Any],
    X: Any,
    Y: Any,
    *,
    keep_prob: float,
    masks: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Dropout backprop that forgets the 1/keep_prob (``bugs={"dropout_scale": True}``).

    The output layer's gradients stay right; every hidden layer's are too small by a factor
    keep_prob per hidden layer above it.
    """
    return backward(params, X, Y, keep_prob=keep_prob, masks=masks, seed=seed, bugs={"dropout_scale": True})


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

    NumPy's legacy ``np.random.seed(1)`` then ``randn`` in the notebook's order (drawn from a
    private ``RandomState(1)``, the same numbers, so the caller's global random stream is
    left as it was): X (4, 3),
    W1 (5, 4), b1 (5, 1), W2 (3, 5), b2 (3, 1), W3 (1, 3), b3 (1, 1); Y = [1., 1., 0.].
    NumPy arrays, or arrays of namespace ``xp`` on ``device`` when given.
    """
    import numpy as np  # host-side data generation, the notebook's legacy RNG

    rng = np.random.RandomState(1)
    X = rng.randn(4, 3)
    Y = np.array([1.0, 1.0, 0.0])
    shapes = {"W1": (5, 4), "b1": (5, 1), "W2": (3, 5), "b2": (3, 1), "W3": (1, 3), "b3": (1, 1)}
    params = {name: rng.randn(*shape) for name, shape in shapes.items()}
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
