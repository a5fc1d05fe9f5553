"""Prepare a check: validate params, grads and options, and put them on the backend.

``prepare`` is the first of check()'s three steps (prepare → evaluate → judge). Everything
the user passes is checked here, at the edge, with the parameter's name and the fix in the
message; the evaluation and the judge trust what comes out. The user's arrays are copied to
the backend (never modified), in the dtype of evaluation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat

from . import evaluation
from .backends import (
    Backend,
    float64_of,
    is_array,
    is_meta,
    namespace,
    prime_host_allocator,
    resolve,
    to_backend,
    to_host,
)
from .errors import InputError, InputTypeError
from .params import Layout, flatten_tree, match_tree

__all__ = ["MODES", "Prepared", "nonfinite_args", "prepare"]

MODES = (*evaluation.MODES, "directions")


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


def _refuse_swapped(params: Mapping[str, Any], grads: Mapping[str, Any]) -> None:
    """params keyed like gradients ('dW1') whose bare names ('W1') key grads: swapped."""
    swapped = [
        key
        for key in params
        if isinstance(key, str)
        and key.startswith("d")
        and key[1:] in grads
        and key not in grads
        and "d" + key not in grads
    ]
    if swapped:
        raise InputError(
            f"params has keys {', '.join(map(repr, swapped))} and grads has "
            f"{', '.join(repr(k[1:]) for k in swapped)}: params and grads look swapped; call "
            "check(cost, params, grads, *args) with the parameters first and the gradients second"
        )


_MATERIALIZE = (
    "create the tensors on a real device (e.g. device='cpu' or 'cuda'); for a module built on "
    "'meta', call module.to_empty(device='cpu') and initialize its parameters first"
)


def _is_option_number(x: object) -> bool:
    # Any real scalar (NumPy's float32 too), but not bool: epsilon=True is a mistake.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _option_number(value: Any, name: str, example: str) -> float | str:
    """``value`` of the option ``name`` as ``"auto"`` or a float: a Python or NumPy real
    number, or a 0-d real array of any library; an array of one or more dimensions is an
    InputTypeError (one value serves every element), anything else an InputError."""
    if isinstance(value, str) and value == "auto":
        return value
    if is_array(value) and not _is_option_number(value):
        shape = tuple(value.shape)
        if shape != ():
            raise InputTypeError(
                f"{name} is an array of shape {shape}; pass one number, which serves every "
                f"element, e.g. {name}={example}, or {name}='auto'"
            )
        if not array_api_compat.array_namespace(value).isdtype(value.dtype, ("real floating", "integral")):
            raise InputTypeError(
                f"{name} is a 0-d array of dtype {value.dtype}; pass a real number, e.g. {name}={example}"
            )
        value = float(value)
    if not _is_option_number(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name}={value!r} must be 'auto' or a finite number > 0, e.g. {name}={example}")
    return float(value)


def _options(
    epsilon, threshold, mode, memory_budget, order, directions, sample, top_k
) -> tuple[Any, Any, int]:
    """epsilon and threshold as floats (or 'auto'), and the memory budget in bytes."""
    epsilon = _option_number(epsilon, "epsilon", "1e-7")
    threshold = _option_number(threshold, "threshold", "2e-7")
    if threshold != "auto" and threshold >= 1:
        raise InputError(
            f"threshold={threshold!r} must be below 1, e.g. threshold=2e-7: the difference "
            "‖grad − gradapprox‖ / (‖grad‖ + ‖gradapprox‖) is at most 1 (a gradient of the "
            "opposite sign scores exactly 1), so a threshold ≥ 1 would pass any gradient"
        )
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is unknown; use one of {', '.join(map(repr, MODES))}")
    if order not in (2, 4) or isinstance(order, bool):
        raise InputError(f"order={order!r} is not supported; use order=2 (±h) or order=4 (±h, ±2h)")
    for label, value in (("directions", directions), ("top_k", top_k)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise InputError(f"{label}={value!r} must be a positive integer")
    if sample is not None and (
        not isinstance(sample, numbers.Integral) or isinstance(sample, bool) or sample < 1
    ):
        raise InputError(f"sample={sample!r} must be None (check every element) or a positive integer")
    if sample is not None and mode == "directions":
        raise InputError("sample= and mode='directions' exclude each other; pick one")
    if memory_budget is None:
        return epsilon, threshold, evaluation.DEFAULT_MEMORY_BUDGET
    if (
        not isinstance(memory_budget, numbers.Integral)
        or isinstance(memory_budget, bool)
        or memory_budget <= 0
    ):
        raise InputError(f"memory_budget={memory_budget!r} must be a positive number of bytes, or None")
    return epsilon, threshold, int(memory_budget)


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


def _dtype_name(dtype: Any) -> str:
    """'float32', not 'torch.float32'."""
    return str(dtype).split(".")[-1]


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


def nonfinite_args(args: tuple[Any, ...], xp: ModuleType) -> str:
    """Which args hold NaN or Inf, in words, or "" when none does: what to add to the error
    when J(θ) itself is not finite, e.g. ``args[0] holds NaN at 1 of 15 elements (first at
    index (1, 2))``. Floating arrays of ``xp`` (the check's args, after ``prepare``) and real
    numbers are examined; other args (integer arrays, objects) cannot hold NaN or are the
    cost's own business. Only for the error path: a few device syncs per floating arg."""
    found = []
    for position, arg in enumerate(args):
        what = f"args[{position}]"
        if _is_option_number(arg):
            if not math.isfinite(arg):
                found.append(f"{what} is {float(arg)}")
            continue
        if not (is_array(arg) and namespace(arg) is xp and xp.isdtype(arg.dtype, "real floating")):
            continue
        counts = to_host(
            xp.stack([xp.sum(xp.astype(xp.isnan(arg), xp.int64)), xp.sum(xp.astype(xp.isinf(arg), xp.int64))])
        )
        nans, infs = (int(c) for c in counts.tolist())
        if not nans + infs:
            continue
        kind = " and ".join(k for k, n in (("NaN", nans), ("Inf", infs)) if n)
        shape = tuple(arg.shape)
        if shape == ():
            found.append(f"{what} is {float(arg)}")
            continue
        first = _first_index(~xp.isfinite(arg), shape, xp)
        found.append(
            f"{what} holds {kind} at {nans + infs} of {math.prod(shape)} elements (first at index {first})"
        )
    return "; ".join(found)


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
    dtype = _dtype_name(theta.dtype)
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


def _require_valid(parts: dict[str, Any], analytic: dict[str, Any], epsilon: float | str, xp) -> None:
    """No NaN/Inf in params or grads, and θ ± ε moves every element (a fixed epsilon).

    The common case costs a few operations over all tensors joined (one per dtype) and one
    device sync; only when something is wrong are the tensors examined one by one, to name
    the parameter and the first bad index.
    """
    flags = []
    for dtype in {p.dtype for p in parts.values()}:
        names = [name for name, p in parts.items() if p.dtype == dtype]
        theta = xp.concat([xp.reshape(parts[name], (-1,)) for name in names])
        flags.append(xp.all(xp.isfinite(theta)))
        if epsilon != "auto" and float(epsilon) < float(xp.finfo(dtype).max):
            plus, minus = theta + epsilon, theta - epsilon
            moved = (plus != theta) & (minus != theta) & xp.isfinite(plus) & xp.isfinite(minus)
            flags.append(xp.all(moved))
        elif epsilon != "auto":
            flags.append(xp.asarray(False, device=array_api_compat.device(theta)))
    for dtype in {g.dtype for g in analytic.values()}:
        grad = xp.concat([xp.reshape(g, (-1,)) for g in analytic.values() if g.dtype == dtype])
        flags.append(xp.all(xp.isfinite(grad)))
    if bool(xp.all(xp.stack(flags))):  # one device sync on the common path
        return
    for name in parts:
        _require_finite(parts[name], f"params[{name!r}]", xp)
        _require_finite(analytic[name], f"grads[{name!r}]", xp)
        if epsilon != "auto":
            _require_step(parts[name], epsilon, name, xp)
    raise AssertionError("unreachable: a flagged tensor always raises above")  # pragma: no cover


def _require_budget(parts: dict[str, Any], budget: int, xp, upcast: bool) -> None:
    """A stacked call holds at least one perturbed copy of a tensor: the largest must fit, in
    the dtype it will be evaluated in. Asked before the gradients and data are copied, so a
    refused check has allocated one copy of θ, no more."""

    def itemsize(p):
        own = xp.finfo(p.dtype).bits // 8
        return max(own, 8) if upcast and float64_of(xp) is not None else own

    row_bytes = {name: math.prod(p.shape) * itemsize(p) for name, p in parts.items()}
    name = max(row_bytes, key=row_bytes.get)
    if budget < row_bytes[name]:
        size = math.prod(parts[name].shape)
        raise InputError(
            f"memory_budget={budget} bytes is too small for one perturbed copy of params[{name!r}] "
            f"({size} elements × {itemsize(parts[name])} bytes); pass at least memory_budget="
            f"{row_bytes[name]} (a batch of B rows takes {evaluation.ROW_FOOTPRINT}·B copies), or "
            f"mode='loop', which needs no batch but calls the cost once per row ({2 * size:,} calls "
            "or more here)"
        )


class Prepared(NamedTuple):
    """What the evaluation and the judge start from: everything on ``backend``, validated."""

    backend: Backend
    parts: dict[str, Any]
    """name → θ of that parameter, in the dtype of evaluation (float64 after upcasting)."""
    analytic: dict[str, Any]
    """name → the backprop's gradient, in its own dtype (the precision it is judged to)."""
    args: tuple[Any, ...]
    layout: Layout
    epsilon: float | str
    threshold: float | str
    budget: int
    notes: list[str]
    dtypes: dict[str, Any]
    """name → the parameter's dtype as given (before upcasting): the precision its forward
    pass (and so its backprop) may be computed in."""


def prepare(
    cost: Callable[..., Any],
    params: Any,
    grads: Any,
    args: tuple[Any, ...],
    *,
    backend: Any,
    device: Any,
    epsilon: float | str,
    threshold: float | str,
    order: int,
    mode: str,
    directions: int,
    sample: int | None,
    top_k: int,
    upcast: bool,
    memory_budget: int | None,
    client: Any,
    workers: int,
) -> Prepared:
    """Validate every input of ``check`` and move params, grads and args to the backend.

    Raises InputError / InputTypeError (naming the parameter and the fix) or
    BackendUnavailableError; never modifies the user's arrays.
    """
    if not callable(cost):
        raise InputTypeError(f"cost must be callable as cost(params, *args), not {type(cost).__name__}")
    epsilon, threshold, budget = _options(
        epsilon, threshold, mode, memory_budget, order, directions, sample, top_k
    )
    if (
        not isinstance(workers, numbers.Integral)
        or isinstance(workers, bool)
        or not (workers >= 1 or workers == -1)
    ):
        raise InputError(f"workers={workers!r} must be a positive number of threads, or -1 for one per CPU")
    if workers != 1 and client is not None:
        raise InputError(
            f"workers={workers} evaluates chunks on threads, but client= sends them to Dask "
            "workers; drop workers= (or client=)"
        )

    # params and grads: any tree of dicts/lists/tuples/NamedTuples of arrays (params.py),
    # read into name → leaf here; the Layout's treedef rebuilds the user's structure.
    if params is None:  # not an empty tree: a mistake, as before trees
        _refuse_containers(params, "params")
    tree = flatten_tree(params)
    single = tree.single
    if not tree.names:
        raise InputError(
            "params is empty; pass a mapping name → array (or a tree of arrays) with at least one entry"
        )
    for name, value in zip(tree.names, tree.leaves):
        _refuse_containers(value, "params" if single else f"params[{name!r}]")
    if isinstance(params, Mapping) and isinstance(grads, Mapping):
        _refuse_swapped(params, grads)
    picked = match_tree(params, grads)
    params = dict(zip(tree.names, tree.leaves))
    for name, value in picked.items():
        _refuse_containers(value, f"grads[{name!r}]")

    named = [
        *(("params" if single else f"params[{name!r}]", value) for name, value in params.items()),
        *(("grads" if single else f"grads[{name!r}]", value) for name, value in picked.items()),
        *((f"args[{index}]", value) for index, value in enumerate(args)),
    ]
    for what, value in named:
        if is_meta(value):
            raise InputError(
                f"{what} is a PyTorch tensor on the 'meta' device: it has a shape and a dtype but no "
                f"values, so there is nothing to evaluate or compare; {_MATERIALIZE}"
            )
    inputs = [*params.values(), *picked.values(), *args]
    chosen = resolve(backend, [a for a in inputs if is_array(a)], device)
    if array_api_compat.is_torch_namespace(chosen.xp) and str(chosen.device) == "meta":
        raise InputError(f"device={device!r} holds no values (PyTorch's 'meta' device); {_MATERIALIZE}")
    xp = chosen.xp
    prime_host_allocator()

    parts = {name: _to_float_array(value, chosen, f"params[{name!r}]") for name, value in params.items()}
    for name, part in parts.items():
        if math.prod(part.shape) == 0:
            raise InputError(
                f"params[{name!r}] has shape {tuple(part.shape)}, no elements: there is nothing to "
                "check; drop it from params (and grads)"
            )
    if mode != "loop":
        _require_budget(parts, budget, xp, upcast)
    analytic = {}
    for name, value in picked.items():
        # In its own dtype: a gradient is judged to the precision it was computed in.
        grad = _to_float_array(value, chosen, f"grads[{name!r}]")
        if tuple(grad.shape) != tuple(parts[name].shape):
            raise InputError(
                f"grads[{name!r}] has shape {tuple(grad.shape)} but params[{name!r}] has shape "
                f"{tuple(parts[name].shape)}; they must match exactly"
            )
        analytic[name] = grad
    moved_args = tuple(to_backend(a, chosen) if is_array(a) else a for a in args)
    notes: list[str] = []
    # Validation and the memory budget in the dtype the cost will be evaluated in: an epsilon
    # too small for float32 is fine once θ is float64, and float64 copies take twice the bytes.
    dtypes = {name: part.dtype for name, part in parts.items()}
    parts, moved_args = _upcast(parts, moved_args, xp, notes) if upcast else (parts, moved_args)
    _require_valid(parts, analytic, epsilon, xp)

    layout = Layout(
        tuple(parts), tuple(tuple(p.shape) for p in parts.values()), single=single, treedef=tree.treedef
    )
    return Prepared(chosen, parts, analytic, moved_args, layout, epsilon, threshold, budget, notes, dtypes)


def _upcast(parts, args, xp, notes):
    """Evaluate lower-precision parameters (and floating args) in float64 where it exists.

    A float32 cost's rounding (~1e-7·|J|) divided by any usable step swamps the comparison;
    in float64 the finite differences are exact to far below float32's own resolution, so
    a float32 backprop is judged against the truth, to its own precision.
    """
    low = sorted({_dtype_name(p.dtype) for p in parts.values() if xp.finfo(p.dtype).bits < 64})
    if float64_of(xp) is None:  # JAX without x64
        notes.append(
            "JAX runs without float64 here (jax_enable_x64 is off): everything was evaluated in "
            "float32, float64 inputs too; for float64, run jax.config.update('jax_enable_x64', True) "
            "before creating arrays"
        )
        return parts, args
    if not low:
        return parts, args
    notes.append(
        f"{'/'.join(low)} parameters and floating args were evaluated in float64 (upcast=False to keep them)"
    )
    wide = {name: xp.astype(p, xp.float64) for name, p in parts.items()}
    moved = tuple(
        xp.astype(a, xp.float64) if is_array(a) and xp.isdtype(a.dtype, "real floating") else a for a in args
    )
    return wide, moved
