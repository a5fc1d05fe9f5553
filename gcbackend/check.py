"""check(): compare a backward pass's gradients with central finite differences."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import array_api_compat

from . import engine
from .backends import Backend, is_array, resolve, to_backend, to_host
from .errors import InputError, InputTypeError
from .params import SINGLE, Layout, match_grads
from .report import ParameterResult, Report

__all__ = ["check"]


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _refuse_containers(value: Any, what: str) -> None:
    if isinstance(value, (list, tuple)):
        raise InputTypeError(
            f"{what} is a Python {type(value).__name__}; pass an array (e.g. numpy.asarray(...)) "
            "so its dtype and shape are explicit"
        )
    if not (is_array(value) or _is_number(value)):
        raise InputTypeError(f"{what} must be an array or a real number, not {type(value).__name__}")


def _is_option_number(x: object) -> bool:
    # Any real scalar (NumPy's float32 too), but not bool: epsilon=True is a mistake.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _options(epsilon: float, threshold: float, mode: str, memory_budget: int | None) -> int:
    if not _is_option_number(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise InputError(f"epsilon={epsilon!r} must be a finite number > 0, e.g. epsilon=1e-7")
    if not _is_option_number(threshold) or not math.isfinite(threshold) or threshold <= 0:
        raise InputError(f"threshold={threshold!r} must be a finite number > 0, e.g. threshold=2e-7")
    if mode not in engine.MODES:
        raise InputError(f"mode={mode!r} is unknown; use one of {', '.join(map(repr, engine.MODES))}")
    if memory_budget is None:
        return engine.DEFAULT_MEMORY_BUDGET
    if (
        not isinstance(memory_budget, numbers.Integral)
        or isinstance(memory_budget, bool)
        or memory_budget <= 0
    ):
        raise InputError(f"memory_budget={memory_budget!r} must be a positive number of bytes, or None")
    return int(memory_budget)


def _to_float_array(value: Any, backend: Backend, what: str, dtype: Any = None) -> Any:
    """``value`` on the backend as a real floating array (Python numbers → float64)."""
    xp = backend.xp
    if _is_number(value):
        return xp.asarray(float(value), dtype=dtype or xp.float64, device=backend.device)
    array = to_backend(value, backend)
    if not xp.isdtype(array.dtype, "real floating"):
        raise InputTypeError(
            f"{what} has dtype {array.dtype}; supported dtypes are real floating ones "
            "(float32, float64): cast it, e.g. x.astype('float64')"
        )
    if dtype is not None and array.dtype != dtype:
        array = xp.astype(array, dtype)
    return array


def _first_index(mask: Any, shape: tuple[int, ...], xp) -> tuple[int, ...]:
    flat = int(to_host(xp.argmax(xp.astype(xp.reshape(mask, (-1,)), xp.int8))))
    return _unravel(flat, shape)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for extent in reversed(shape):
        index.append(flat % extent)
        flat //= extent
    return tuple(reversed(index))


def _require_finite(array: Any, what: str, xp) -> None:
    bad = ~xp.isfinite(array)
    if bool(xp.any(bad)):
        index = _first_index(bad, tuple(array.shape), xp)
        raise InputError(f"{what} contains NaN or Inf (first at index {index}); fix it before checking")


def _indices(mask: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The indices (into ``shape``) where a boolean backend array is true, in C order."""
    flags = to_host(mask).reshape(-1).tolist()  # one transfer; only on the rare error paths
    return tuple(_unravel(i, shape) for i, flag in enumerate(flags) if flag)


def _listed(indices: tuple[tuple[int, ...], ...], most: int = 5) -> str:
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


def _require_step(theta: Any, epsilon: float, name: str, xp) -> None:
    """θ ± ε must differ from θ, and stay finite, at every element in θ's own dtype.

    Where θ ± ε rounds back to θ the finite difference is 0 / (2ε) whatever the gradient, a
    silent false alarm; the usual cause is ε below the dtype's resolution at |θ| (ε = 1e-7
    in float16, or large θ in float32).
    """
    info = xp.finfo(theta.dtype)
    dtype = str(theta.dtype).split(".")[-1]  # float32, not torch.float32
    shape = tuple(theta.shape)
    if epsilon >= float(info.max):
        raise InputError(
            f"epsilon={epsilon:g} overflows {dtype} (largest {float(info.max):g}) for "
            f"params[{name!r}]; pass a smaller epsilon, e.g. 1e-3 in float32"
        )
    plus, minus = theta + epsilon, theta - epsilon
    unmoved = (plus == theta) | (minus == theta)
    overflow = ~(xp.isfinite(plus) & xp.isfinite(minus))
    if not bool(xp.any(unmoved | overflow)):  # one device sync on the common path
        return
    stuck = _indices(unmoved, shape)
    if stuck:
        largest = float(to_host(xp.max(xp.abs(theta))))
        raise InputError(
            f"epsilon={epsilon:g} is too small for params[{name!r}] in {dtype}: θ + ε or "
            f"θ − ε rounds back to θ at {len(stuck)} of {math.prod(shape)} elements "
            f"({_listed(stuck)}), so their finite differences would be 0; pass an epsilon well "
            f"above max|θ|·eps = {largest * float(info.eps):.2g} (e.g. 1e-7 in float64, 1e-3 in "
            "float32), or use a wider dtype"
        )
    raise InputError(
        f"epsilon={epsilon:g} makes θ ± ε overflow to Inf in {dtype} for params[{name!r}] "
        f"at {_listed(_indices(overflow, shape))}; pass a smaller epsilon or a wider dtype"
    )


def _require_budget(parts: dict[str, Any], budget: int, xp) -> None:
    """A stacked call holds at least one perturbed copy of a tensor: the largest must fit."""
    row_bytes = {name: math.prod(p.shape) * (xp.finfo(p.dtype).bits // 8) for name, p in parts.items()}
    name = max(row_bytes, key=row_bytes.get)
    if budget < row_bytes[name]:
        part = parts[name]
        raise InputError(
            f"memory_budget={budget} bytes is too small for one perturbed copy of params[{name!r}] "
            f"({math.prod(part.shape)} elements × {xp.finfo(part.dtype).bits // 8} bytes); pass at "
            f"least memory_budget={row_bytes[name]}, or mode='loop'"
        )


def check(
    cost: Callable[..., Any],
    params: Mapping[str, Any] | Any,
    grads: Mapping[str, Any] | Any,
    *args: Any,
    backend: Any = None,
    device: Any = None,
    epsilon: float = 1e-7,
    threshold: float = 2e-7,
    mode: str = "stacked",
    memory_budget: int | None = None,
) -> Report:
    """Check ``grads`` against central finite differences of ``cost(params, *args)``.

    Parameters
    ----------
    cost
        ``cost(params, *args)`` → the scalar cost J. In ``mode="stacked"`` it must also accept
        parameters with a leading batch axis (some tensors of shape (B, *shape)) and return
        shape (B,); write it with broadcasting (``@``, reductions over trailing axes).
    params
        A mapping name → array, or one array or Python number (reported as ``"theta"``).
        Real floating dtypes (Python numbers become float64). Never modified.
    grads
        The same structure; keys ``"W1"`` or ``"dW1"``. Keys that name no parameter and do
        not look like one (``dZ3``, ``dA2``) are ignored. Never modified.
    *args
        Passed to the cost unchanged after arrays among them are copied to the backend.
    backend, device
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``, ``"array_api_strict"``, ``"dask"``,
        a namespace module, or None to infer it from the arrays. Inputs are copied there.
    epsilon, threshold
        The step of the central difference, and the largest ``difference`` that passes.
    mode
        ``"stacked"`` (one cost call per chunk of perturbation rows) or ``"loop"`` (one call
        per row, 2N calls: the notebook's algorithm).
    memory_budget
        Bytes of perturbed parameter copies per stacked call (default 256 MiB).

    Returns
    -------
    Report
        ``difference`` (formula (2) over all parameters), ``passed``, per-parameter results.

    Raises
    ------
    InputError, InputTypeError
        Bad params, grads or options (the message names the parameter and the fix).
    CostError
        The cost raised or broke the shape contract.
    BackendUnavailableError
        The backend is not installed or has no usable device.
    """
    if not callable(cost):
        raise InputTypeError(f"cost must be callable as cost(params, *args), not {type(cost).__name__}")
    budget = _options(epsilon, threshold, mode, memory_budget)
    epsilon, threshold = float(epsilon), float(threshold)

    single = not isinstance(params, Mapping)
    if not single:
        if not params:
            raise InputError("params is empty; pass a mapping name → array with at least one entry")
        for name, value in params.items():
            _refuse_containers(value, f"params[{name!r}]")
        if not isinstance(grads, Mapping):
            raise InputTypeError(
                f"params is a mapping but grads is a {type(grads).__name__}; pass grads as a "
                "mapping with the same names (or 'd' + name)"
            )
        picked = match_grads(tuple(params), grads)
    else:
        _refuse_containers(params, "params")
        if isinstance(grads, Mapping):
            raise InputTypeError(
                "params is a single array/number but grads is a mapping; pass one array/number"
            )
        picked = {SINGLE: grads}
        params = {SINGLE: params}
    for name, value in picked.items():
        _refuse_containers(value, f"grads[{name!r}]")

    inputs = [*params.values(), *picked.values(), *args]
    chosen = resolve(backend, [a for a in inputs if is_array(a)], device)
    xp = chosen.xp

    parts = {name: _to_float_array(value, chosen, f"params[{name!r}]") for name, value in params.items()}
    for name, part in parts.items():
        if math.prod(part.shape) == 0:
            raise InputError(
                f"params[{name!r}] has shape {tuple(part.shape)}, no elements: there is nothing to "
                "check; drop it from params (and grads)"
            )
    analytic = {}
    for name, value in picked.items():
        grad = _to_float_array(value, chosen, f"grads[{name!r}]", dtype=parts[name].dtype)
        if tuple(grad.shape) != tuple(parts[name].shape):
            raise InputError(
                f"grads[{name!r}] has shape {tuple(grad.shape)} but params[{name!r}] has shape "
                f"{tuple(parts[name].shape)}; they must match exactly"
            )
        analytic[name] = grad
    for name in parts:
        _require_finite(parts[name], f"params[{name!r}]", xp)
        _require_finite(analytic[name], f"grads[{name!r}]", xp)
        _require_step(parts[name], epsilon, name, xp)
    if mode == "stacked":
        _require_budget(parts, budget, xp)
    moved_args = tuple(to_backend(a, chosen) if is_array(a) else a for a in args)

    layout = Layout(tuple(parts), tuple(tuple(p.shape) for p in parts.values()), single=single)
    numeric = engine.central_differences(
        cost, parts, moved_args, epsilon=epsilon, layout=layout, xp=xp, mode=mode, memory_budget=budget
    )
    # A cost that returns Python floats (fine in mode='loop') yields costs on the namespace's
    # default device, not necessarily the one the check runs on.
    numeric = {
        name: value if array_api_compat.device(value) == chosen.device else to_backend(value, chosen)
        for name, value in numeric.items()
    }
    return _compare(
        parts, analytic, numeric, xp=xp, backend=chosen, epsilon=epsilon, threshold=threshold, mode=mode
    )


def _compare(parts, analytic, numeric, *, xp, backend, epsilon, threshold, mode) -> Report:
    """Formula (2) overall and per parameter; one transfer to the host for every scalar.

    Elements whose finite difference is NaN or Inf (the cost returned NaN/Inf at θ ± ε) are
    left out of every difference, on both sides, and listed in ``nonfinite``: the rest is
    still judged, and the parameter does not pass.
    """
    summaries, finite_a, finite_n, nonfinite_masks = [], [], [], {}
    for name in parts:
        a = xp.reshape(analytic[name], (-1,))
        n = xp.reshape(numeric[name], (-1,))
        finite = xp.isfinite(n)
        nonfinite_masks[name] = ~finite
        a_kept = xp.where(finite, a, xp.zeros_like(a))
        n_kept = xp.where(finite, n, xp.zeros_like(n))
        finite_a.append(a_kept)
        finite_n.append(n_kept)
        worst = xp.argmax(xp.abs(a_kept - n_kept))
        at_worst = xp.reshape(worst, (1,))
        summaries.append(
            xp.stack(
                [
                    xp.astype(xp.linalg.vector_norm(a_kept - n_kept), xp.float64),
                    xp.astype(xp.linalg.vector_norm(a_kept) + xp.linalg.vector_norm(n_kept), xp.float64),
                    xp.astype(worst, xp.float64),
                    xp.astype(xp.take(a, at_worst)[0], xp.float64),
                    xp.astype(xp.take(n, at_worst)[0], xp.float64),
                    xp.astype(xp.sum(xp.astype(~finite, xp.int64)), xp.float64),
                ]
            )
        )
    all_a = xp.concat(finite_a)
    all_n = xp.concat(finite_n)
    overall = xp.astype(
        xp.stack(
            [
                xp.linalg.vector_norm(all_a - all_n),
                xp.linalg.vector_norm(all_a) + xp.linalg.vector_norm(all_n),
            ]
        ),
        xp.float64,
    )
    # Everything the report prints crosses to the host in one transfer (one device sync).
    host = to_host(xp.concat([overall, *summaries]))
    values = [float(v) for v in host.tolist()]

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else math.inf)

    results = {}
    for i, name in enumerate(parts):
        num, den, worst, a_at, n_at, n_bad = values[2 + 6 * i : 8 + 6 * i]
        shape = tuple(parts[name].shape)
        nonfinite = _indices(nonfinite_masks[name], shape) if n_bad else ()
        results[name] = ParameterResult(
            name=name,
            shape=shape,
            difference=ratio(num, den),
            worst_index=_unravel(int(worst), shape),
            analytic=a_at,
            numeric=n_at,
            threshold=threshold,
            analytic_grad=analytic[name],
            numeric_grad=numeric[name],
            nonfinite=nonfinite,
        )
    dtypes = sorted({str(p.dtype).split(".")[-1] for p in parts.values()})
    evaluations = 2 * sum(r.size for r in results.values())
    return Report(
        difference=ratio(values[0], values[1]),
        threshold=float(threshold),
        epsilon=float(epsilon),
        mode=mode,
        backend=backend.name,
        device=str(backend.device),
        dtype="/".join(dtypes),
        evaluations=evaluations,
        parameters=MappingProxyType(results),
    )
