"""check(): compare a backward pass's gradients with central finite differences, and judge them."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import array_api_compat

from . import differences, engine
from .backends import (
    Backend,
    host_random,
    is_array,
    prime_host_allocator,
    resolve,
    to_backend,
    to_host,
)
from .errors import InputError, InputTypeError
from .params import SINGLE, Layout, match_grads
from .report import ElementError, ParameterResult, Report

MODES = (*engine.MODES, "directions")
NOTEBOOK: Mapping[str, float] = MappingProxyType({"epsilon": 1e-7, "threshold": 2e-7})
"""The course notebook's settings: ``gc.check(..., **gc.NOTEBOOK)`` reproduces its numbers
(J(θ ± 1e-7), 2N evaluations, pass when the overall difference is at most 2e-7)."""

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


def _options(epsilon, threshold, mode, memory_budget, order, directions, sample, top_k) -> int:
    if epsilon != "auto" and (not _is_option_number(epsilon) or not math.isfinite(epsilon) or epsilon <= 0):
        raise InputError(f"epsilon={epsilon!r} must be 'auto' or a finite number > 0, e.g. epsilon=1e-7")
    if threshold != "auto" and (
        not _is_option_number(threshold) or not math.isfinite(threshold) or threshold <= 0
    ):
        raise InputError(
            f"threshold={threshold!r} must be 'auto' or a finite number > 0, e.g. threshold=2e-7"
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


def _cast(x: Any, dtype: Any, xp) -> Any:
    """``x`` in ``dtype``: itself when it already is (``astype`` copies by default)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


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
        grad = xp.concat([xp.reshape(analytic[name], (-1,)) for name in names])
        flags.append(xp.all(xp.isfinite(theta)) & xp.all(xp.isfinite(grad)))
        if epsilon != "auto" and float(epsilon) < float(xp.finfo(dtype).max):
            plus, minus = theta + epsilon, theta - epsilon
            moved = (plus != theta) & (minus != theta) & xp.isfinite(plus) & xp.isfinite(minus)
            flags.append(xp.all(moved))
        elif epsilon != "auto":
            flags.append(xp.asarray(False, device=array_api_compat.device(theta)))
    if bool(xp.all(xp.stack(flags))):  # one device sync on the common path
        return
    for name in parts:
        _require_finite(parts[name], f"params[{name!r}]", xp)
        _require_finite(analytic[name], f"grads[{name!r}]", xp)
        if epsilon != "auto":
            _require_step(parts[name], epsilon, name, xp)
    raise AssertionError("unreachable: a flagged tensor always raises above")  # pragma: no cover


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
    epsilon: float | str = "auto",
    threshold: float | str = "auto",
    order: int = 2,
    mode: str = "stacked",
    directions: int = 8,
    sample: int | None = None,
    seed: int = 0,
    top_k: int = 5,
    upcast: bool = True,
    memory_budget: int | None = None,
    progress: bool | None = None,
    client: Any = None,
    workers: int = 1,
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
        ``"auto"`` (default): a step per element from the dtype and |θ|, and a threshold of
        10× the difference a correct gradient shows, measured in the same stacked pass
        (J at ±h and ±2h, and J(θ) once: 4N + 1 evaluations). Numbers: the notebook's way,
        ``**gc.NOTEBOOK`` (epsilon=1e-7, threshold=2e-7), 2N evaluations, no error bars.
    order
        2 (default) or 4: the 4-point stencil (±h, ±2h) of the same evaluations.
    mode
        ``"stacked"`` (one cost call per chunk of perturbation rows), ``"loop"`` (one call
        per row: the notebook's algorithm) or ``"directions"``: the fast screen, ``directions``
        seeded unit Gaussian directions per tensor, 4·k·(number of tensors) + 1 evaluations
        whatever N is.
    sample, seed
        ``sample=k`` checks k seeded coordinates per tensor (every tensor covered); ``seed``
        seeds sampling and directions (never the user's RNG).
    top_k
        How many of the worst elements each parameter's result lists.
    upcast
        Evaluate float32/float16 parameters (and floating args) in float64 where the backend
        has it, so a float32 backprop is judged to its own precision (the report notes it).
    memory_budget
        Bytes of perturbed parameter copies per stacked call (default 256 MiB).
    progress
        A tqdm bar on stderr for checks that run longer than 2 s. None (default): only when
        stderr is a terminal; False: never; True: always.
    client
        A ``dask.distributed.Client``: the stacked chunks become tasks on its cluster (see
        ``gcbackend.distributed``). The cost and args are sent to each worker once, so they
        must be picklable (a module-level function, or a ``functools.partial`` of one);
        workers need gcbackend installed. The report is the one a local check gives.
        Needs ``pip install 'gcbackend[dask]'``; not with ``mode="loop"``.
    workers
        Threads that evaluate stacked chunks side by side in this process (1, the default:
        none; -1: one per CPU). For NumPy on a multi-core CPU, whose elementwise operations
        use one core each: the cost is then called from several threads at once, so it
        must not mutate shared state; BLAS is held to one thread per call meanwhile. Each
        thread holds its own chunk, so up to ``workers × memory_budget`` bytes of perturbed
        copies are live. The report equals the one-thread report. Not with ``mode="loop"``
        or ``client=``.

    Returns
    -------
    Report
        ``difference`` (formula (2) over all checked values), ``verdict`` ("pass", "fail",
        "inconclusive"), ``passed``, ``expected``, per-parameter results with top-k elements.

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
    budget = _options(epsilon, threshold, mode, memory_budget, order, directions, sample, top_k)
    if client is not None and mode == "loop":
        raise InputError(
            "client= spreads stacked chunks over Dask workers, but mode='loop' makes one call "
            "per row on this machine; drop client=, or use mode='stacked' with a cost that broadcasts"
        )
    if (
        not isinstance(workers, numbers.Integral)
        or isinstance(workers, bool)
        or not (workers >= 1 or workers == -1)
    ):
        raise InputError(f"workers={workers!r} must be a positive number of threads, or -1 for one per CPU")
    if workers != 1 and (mode == "loop" or client is not None):
        raise InputError(
            f"workers={workers} evaluates stacked chunks on threads, but "
            + (
                "mode='loop' makes one call per row"
                if mode == "loop"
                else "client= sends them to Dask workers"
            )
            + "; drop workers= (or use mode='stacked' without client=)"
        )
    epsilon = epsilon if epsilon == "auto" else float(epsilon)
    threshold = threshold if threshold == "auto" else float(threshold)

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
    prime_host_allocator()

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
    _require_valid(parts, analytic, epsilon, xp)
    if mode != "loop":
        _require_budget(parts, budget, xp)
    moved_args = tuple(to_backend(a, chosen) if is_array(a) else a for a in args)

    layout = Layout(tuple(parts), tuple(tuple(p.shape) for p in parts.values()), single=single)
    notes: list[str] = []
    parts, moved_args = _upcast(parts, moved_args, xp, notes) if upcast else (parts, moved_args)
    runner = None
    if client is not None:
        from . import distributed  # only here: a check without a client never imports dask

        runner = distributed.runner(client, chosen, cost, moved_args)
    elif (threads := engine.worker_count(int(workers))) > 1:
        runner = engine.ThreadRunner(threads, xp)
        notes.append(f"stacked chunks evaluated on {threads} threads (BLAS on 1 thread each)")
    notebook = (
        epsilon != "auto" and threshold != "auto" and order == 2 and mode != "directions" and sample is None
    )
    bar = _progress_bar(progress, _rows(parts, notebook, order, mode, directions, sample))
    evaluation = dict(
        layout=layout,
        xp=xp,
        mode="loop" if mode == "loop" else "stacked",
        memory_budget=budget,
        progress=bar.update,
        runner=runner,
    )
    try:
        if notebook:
            # The notebook's way: J(θ ± ε), 2N evaluations, no error bars, its numbers exactly.
            numeric = engine.central_differences(cost, parts, moved_args, epsilon=epsilon, **evaluation)
            estimate, checked, evaluations, positions = None, analytic, 2 * layout.size, None
        else:
            estimate, checked, evaluations, positions = _estimate(
                cost,
                parts,
                moved_args,
                analytic,
                epsilon=epsilon,
                order=order,
                mode=mode,
                directions=directions,
                sample=sample,
                seed=seed,
                notes=notes,
                chosen=chosen,
                evaluation=evaluation,
            )
            numeric = estimate.numeric
            if estimate.refined:
                evaluations += 4 * estimate.refined
                notes.append(
                    f"{estimate.refined} element(s) evaluated again with steps "
                    f"{differences.REFINE_FACTOR:g}× smaller: their truncation error dominated "
                    "(a kink crossed within ±2h, e.g. a ReLU unit changing sign)"
                )
    finally:
        bar.close()
    # A cost that returns Python floats (fine in mode='loop') yields costs on the namespace's
    # default device, not necessarily the one the check runs on.
    numeric = {
        name: value if array_api_compat.device(value) == chosen.device else to_backend(value, chosen)
        for name, value in numeric.items()
    }
    return _compare(
        parts,
        checked,
        numeric,
        estimate,
        xp=xp,
        backend=chosen,
        epsilon=epsilon,
        threshold=threshold,
        mode=mode,
        order=order,
        top_k=int(top_k),
        notes=tuple(notes),
        evaluations=evaluations,
        positions=positions,
    )


def _rows(parts, notebook, order, mode, directions, sample) -> int:
    """How many perturbed rows the check will evaluate (the progress bar's total)."""
    if mode == "directions":
        return 4 * directions * len(parts)
    sizes = [math.prod(p.shape) for p in parts.values()]
    if sample is not None:
        sizes = [min(int(sample), n) for n in sizes]
    return (2 if notebook else 4) * sum(sizes)


def _progress_bar(progress: bool | None, total: int) -> Any:
    """A tqdm bar that appears only after 2 s (so quick checks print nothing), on a terminal."""
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped environment just gets no bar
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, delay=2.0, unit="row", desc="gradient check", file=sys.stderr, leave=False)


class _NoBar:
    def update(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


def _upcast(parts, args, xp, notes):
    """Evaluate lower-precision parameters (and floating args) in float64 where it exists.

    A float32 cost's rounding (~1e-7·|J|) divided by any usable step swamps the comparison;
    in float64 the finite differences are exact to far below float32's own resolution, so
    a float32 backprop is judged against the truth, to its own precision.
    """
    low = sorted({_dtype_name(p.dtype) for p in parts.values() if xp.finfo(p.dtype).bits < 64})
    if not low or xp.asarray(1.0, dtype=xp.float64).dtype != xp.float64:  # JAX without x64
        return parts, args
    notes.append(
        f"{'/'.join(low)} parameters and floating args were evaluated in float64 (upcast=False to keep them)"
    )
    wide = {name: xp.astype(p, xp.float64) for name, p in parts.items()}
    moved = tuple(
        xp.astype(a, xp.float64) if is_array(a) and xp.isdtype(a.dtype, "real floating") else a for a in args
    )
    return wide, moved


def _estimate(
    cost, parts, args, analytic, *, epsilon, order, mode, directions, sample, seed, notes, chosen, evaluation
):
    """Derivatives with error bars (differences.estimate) for every, sampled or directional check.

    Returns the estimate, the analytic values they compare with, the evaluation count, and
    where the compared values sit: ``"directions"``, name → sampled flat indices, or None.
    """
    xp = chosen.xp
    # A step the user chose is the step used; an automatic one moves closer where a kink is crossed.
    refine = differences.REFINE_ROUNDS if epsilon == "auto" else 0
    if epsilon == "auto":
        steps = differences.auto_steps(parts, order=order, xp=xp)
    else:
        steps = {
            name: xp.full(tuple(p.shape), epsilon, dtype=p.dtype, device=chosen.device)
            for name, p in parts.items()
        }
    rng = host_random(seed)
    if mode == "directions":
        rows, checked = {}, {}
        for name, part in parts.items():
            size = math.prod(part.shape)
            u = to_backend(rng.standard_normal((directions, size)), chosen, dtype=part.dtype)
            # Unit directions: θ moves by h, as in a coordinate step, whatever the size. A
            # raw Gaussian moves it by h·√n, and a million-element W1 then crosses dozens
            # of ReLU kinks per direction (a false alarm on a correct 1000-1000-1 net).
            u = u / xp.linalg.vector_norm(u, axis=1, keepdims=True)
            h = xp.max(xp.reshape(steps[name], (-1,)))
            rows[name] = u * h
            checked[name] = xp.reshape(
                rows[name] @ xp.reshape(xp.astype(analytic[name], part.dtype), (-1,)), (-1,)
            )
        notes.append(
            f"fast screen: {directions} seeded unit Gaussian directions per tensor (seed={seed}); each value is a "
            "directional derivative, index (k,) is the k-th direction"
        )
        estimate = differences.estimate(
            cost, parts, args, steps=steps, order=order, directions=rows, refine=refine, **evaluation
        )
        return estimate, checked, 4 * directions * len(parts) + 1, "directions"
    if sample is not None:
        elements, checked, positions = {}, {}, {}
        for name, part in parts.items():
            size = math.prod(part.shape)
            chosen_idx = sorted(rng.choice(size, size=min(int(sample), size), replace=False).tolist())
            positions[name] = chosen_idx
            elements[name] = xp.asarray(chosen_idx, dtype=xp.int64, device=chosen.device)
            checked[name] = xp.take(xp.reshape(analytic[name], (-1,)), elements[name])
        notes.append(f"sampled check: {sample} element(s) per tensor (seed={seed})")
        estimate = differences.estimate(
            cost, parts, args, steps=steps, order=order, elements=elements, refine=refine, **evaluation
        )
        return estimate, checked, 4 * sum(len(v) for v in positions.values()) + 1, positions
    estimate = differences.estimate(cost, parts, args, steps=steps, order=order, refine=refine, **evaluation)
    return estimate, analytic, 4 * sum(math.prod(p.shape) for p in parts.values()) + 1, None


SAFETY = 10.0
"""A difference (or element error) up to this many times the expected one is noise."""
ANALYTIC_ULPS = 32.0
"""Rounding a backprop accumulates in the gradient itself, in ulps of its dtype, relative to
|g_j| + rms(g): a float32 backward pass is judged to float32's precision, not float64's."""
INCONCLUSIVE = 1e-3
"""With threshold='auto', a parameter whose expected difference exceeds this cannot be
told apart from a gradient that is off by 0.1 %: inconclusive rather than pass."""


def _verdict(difference, expected, threshold, outliers, nonfinite, auto, floor):
    if nonfinite:
        return "fail"
    if auto:
        if difference > max(SAFETY * expected, floor) or outliers:
            return "fail"
        return "inconclusive" if expected > INCONCLUSIVE else "pass"
    if difference <= threshold:
        return "pass"
    return "inconclusive" if expected is not None and difference <= SAFETY * expected else "fail"


def _compare(
    parts,
    analytic,
    numeric,
    estimate,
    *,
    xp,
    backend,
    epsilon,
    threshold,
    mode,
    order,
    top_k,
    notes,
    evaluations,
    positions,
) -> Report:
    """Formula (2) overall and per parameter, error bars, top-k; one transfer to the host.

    Elements whose finite difference is NaN or Inf (the cost returned NaN/Inf at θ ± ε) are
    left out of every difference, on both sides, and listed in ``nonfinite``: the rest is
    still judged, and the parameter fails. Elements at a kink are compared with the nearest
    subgradient between their one-sided slopes.
    """
    auto = threshold == "auto"
    names = tuple(parts)
    sizes = [math.prod(tuple(numeric[name].shape)) for name in names]
    dtype = xp.result_type(*(numeric[name].dtype for name in names))

    def joined(values: Mapping[str, Any], kind: Any = dtype) -> Any:
        flat = [_cast(xp.reshape(values[name], (-1,)), kind, xp) for name in names]
        return flat[0] if len(flat) == 1 else xp.concat(flat)

    # Elementwise work and the top-k sort run once over every parameter's values,
    # concatenated; only the sums go parameter by parameter, on slices.
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(names))]
    n, a = joined(numeric), joined(analytic)
    finite = xp.isfinite(n)
    zero = xp.zeros_like(a)
    if estimate is not None:
        err, kink = joined(estimate.error), joined(estimate.kink, xp.bool) & finite
        low, high = joined(estimate.low), joined(estimate.high)
        n = xp.where(kink, xp.minimum(xp.maximum(a, low - err), high + err), n)
        # Rounding the backprop itself may carry: ANALYTIC_ULPS of each parameter's own
        # dtype, relative to |g_j| + rms(g) of that parameter.
        slack = xp.concat(
            [
                ANALYTIC_ULPS
                * float(xp.finfo(analytic[name].dtype).eps)
                * (xp.abs(a[start:stop]) + xp.sqrt(xp.mean(a[start:stop] * a[start:stop])))
                for name, (start, stop) in zip(names, bounds)
            ]
        )
        tol = xp.where(finite, err + slack, zero)
    else:
        kink = xp.zeros_like(finite)
        tol = zero
    a_kept, n_kept = xp.where(finite, a, zero), xp.where(finite, n, zero)
    gap = a_kept - n_kept
    error = xp.abs(gap)
    # Per element: what each parameter sums (squares for its norms, then its counts).
    columns = xp.stack(
        [
            gap * gap,
            a_kept * a_kept,
            n_kept * n_kept,
            tol * tol,
            xp.astype((error > SAFETY * tol) & (tol > 0), dtype),
            xp.astype(~finite, dtype),
            xp.astype(kink, dtype),
        ],
        axis=1,
    )
    # The top-k of every parameter from two sorts over all elements, not one per parameter
    # (per-call overhead is what a small check costs): largest error first, then grouped
    # by parameter; both sorts stable, so ties keep index order, as a per-parameter sort.
    counts = {name: (min(top_k, stop - start), stop - start) for name, (start, stop) in zip(names, bounds)}
    if len(names) == 1:
        order = xp.argsort(error, descending=True, stable=True)
    else:
        where = array_api_compat.device(error)
        stops = xp.asarray([stop for _, stop in bounds], device=where)
        owner = xp.searchsorted(stops, xp.arange(bounds[-1][1], device=where), side="right")
        order = xp.argsort(error, descending=True, stable=True)
        order = xp.take(order, xp.argsort(xp.take(owner, order), stable=True))
    picks = [start + j for (start, _), (k, _) in zip(bounds, counts.values()) for j in range(k)]
    worst = xp.take(order, xp.asarray(picks, device=array_api_compat.device(order)))
    top = xp.take(xp.stack([a, n], axis=1), worst, axis=0)
    sums = xp.stack([xp.sum(columns[start:stop, :], axis=0) for start, stop in bounds])
    overall = xp.astype(
        xp.stack(
            [
                xp.linalg.vector_norm(a_kept - n_kept),
                xp.linalg.vector_norm(a_kept) + xp.linalg.vector_norm(n_kept),
                xp.linalg.vector_norm(tol),
            ]
        ),
        xp.float64,
    )
    # Everything the report prints crosses to the host in one transfer (one device sync).
    packed = xp.concat([overall, *(_cast(xp.reshape(v, (-1,)), xp.float64, xp) for v in (sums, worst, top))])
    values = to_host(packed).tolist()
    sums_at, worst_at_all, top_at = 3, 3 + 7 * len(names), 3 + 7 * len(names) + len(picks)
    masks = {name: (~finite[start:stop], kink[start:stop]) for name, (start, stop) in zip(names, bounds)}
    compared = {name: n[start:stop] for name, (start, stop) in zip(names, bounds)}

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else math.inf)

    floor = 4 * float(xp.finfo(dtype).eps)
    results, picked = {}, 0
    for i, (name, (start, _)) in enumerate(zip(names, bounds)):
        k, checked = counts[name]
        gap2, a2, n2, tol2, outliers, n_bad, n_kinks = values[sums_at + 7 * i : sums_at + 7 * i + 7]
        num, den, tol_norm = math.sqrt(gap2), math.sqrt(a2) + math.sqrt(n2), math.sqrt(tol2)
        worst_at = [int(v) - start for v in values[worst_at_all + picked : worst_at_all + picked + k]]
        top_a = values[top_at + 2 * picked : top_at + 2 * (picked + k) : 2]
        top_n = values[top_at + 2 * picked + 1 : top_at + 2 * (picked + k) : 2]
        picked += k
        shape = tuple(parts[name].shape)

        def where(flat: int, shape=shape, name=name) -> tuple[int, ...]:
            if positions == "directions":
                return (flat,)
            return _unravel(positions[name][flat] if positions else flat, shape)

        top = tuple(
            ElementError(where(i), ta, tn, abs(ta - tn), ratio(abs(ta - tn), max(abs(ta), abs(tn))))
            for i, ta, tn in zip(worst_at, top_a, top_n)
        )
        bad, kinks = masks[name]
        nonfinite = tuple(where(i[0]) for i in _indices(bad, (checked,))) if n_bad else ()
        kink_list = tuple(where(i[0]) for i in _indices(kinks, (checked,))) if n_kinks else ()
        difference = ratio(num, den)
        expected = ratio(tol_norm, den) if estimate is not None else None
        results[name] = ParameterResult(
            name=name,
            shape=shape,
            difference=difference,
            worst_index=top[0].index,
            analytic=top[0].analytic,
            numeric=top[0].numeric,
            threshold=max(SAFETY * expected, floor) if auto else threshold,
            analytic_grad=analytic[name],
            numeric_grad=compared[name] if positions else xp.reshape(compared[name], shape),
            nonfinite=nonfinite,
            verdict=_verdict(difference, expected, threshold, int(outliers), bool(n_bad), auto, floor),
            expected=expected,
            top=top,
            kinks=kink_list,
            checked=checked,
        )
    difference = ratio(values[0], values[1])
    expected = ratio(values[2], values[1]) if estimate is not None else None
    verdicts = {r.verdict for r in results.values()}
    if estimate is None:  # the notebook's rule: the overall difference decides
        nonfinite = any(r.nonfinite for r in results.values())
        verdict = "pass" if difference <= threshold and not nonfinite else "fail"
    else:
        verdict = "fail" if "fail" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "pass")
    dtypes = sorted(map(_dtype_name, {p.dtype for p in analytic.values()}))
    return Report(
        difference=difference,
        threshold=max(SAFETY * expected, floor) if auto else float(threshold),
        epsilon=epsilon,
        mode=mode,
        backend=backend.name,
        device=str(backend.device),
        dtype="/".join(dtypes),
        evaluations=evaluations,
        parameters=MappingProxyType(results),
        verdict=verdict,
        expected=expected,
        order=order,
        notes=notes,
        auto_threshold=auto,
    )
