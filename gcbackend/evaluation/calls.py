"""One call of the cost: its errors, its result validated, J(θ), and the loop path.

Every array the cost receives is the check's own: rows are refilled for every call, and the
unbatched tensors and array args are private copies compared with the originals after each
pass (``intact``); a cost that wrote into them raises ``Scribbled`` here or is caught there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import array_api_compat

from ..backends import is_array, namespace
from ..errors import CostError
from ..params import Layout
from .limits import intra_op
from .rows import RowGroup, Stencil, reuses

__all__ = [
    "Scribbled",
    "as_costs",
    "call",
    "contract",
    "copied",
    "evaluate_center",
    "first_line",
    "fresh_inputs",
    "intact",
    "is_backend_array",
    "looped",
    "python_float",
    "single_cost",
]


def contract(name: str, shape: tuple[int, ...]) -> str:
    """What broadcasting asks of the cost, with the actual parameter, and the usual culprits."""
    batched = "(B" + "".join(f", {extent}" for extent in shape) + (")" if shape else ",)")
    return (
        f"To be evaluated stacked, the cost receives {name} with a leading batch axis, shape "
        f"{batched} instead of {tuple(shape)}, must broadcast over it and return shape (B,). "
        f"Usual culprits: a reduction over all axes (np.sum(np.square({name})), "
        f"np.linalg.norm({name}), float(...): reduce over the trailing axes, axis=(-2, -1)); "
        "np.dot (use @ / matmul); .T (use .mT or swapaxes(-1, -2)); a bias that does not "
        "broadcast (b1.unsqueeze(-2) in row-major code: index b1[..., None, :]). Or leave the "
        "default mode='auto' (it verifies and falls back to vmap or a loop), or pass mode='loop'."
    )


def call(cost, params, args, *, name, start, stop, stacked, shape=()):
    """``cost(params, *args)``; an exception becomes a CostError naming the rows and the fix."""
    try:
        return cost(params, *args)
    except Exception as exc:
        where = (
            f"a batch of {stop - start} perturbed copies of parameter {name!r}"
            if stacked
            else f"row {start} perturbing parameter {name!r}"
            if stop - start == 1
            else f"rows {start}..{stop - 1} perturbing parameter {name!r}"
        )
        advice = contract(name, shape) if stacked else "Check that cost(params, *args) runs on the inputs."
        raise CostError(f"the cost raised {type(exc).__name__}: {exc} (at {where}). {advice}") from exc


def as_costs(out: Any, expected: tuple[int, ...], *, xp, name, start, stop, stacked, shape=()) -> Any:
    """The cost's result as an array of ``xp`` of shape ``expected``, or a CostError saying what
    it returned instead (None, a tuple, a string, another library's array, a wrong shape)."""
    if out is None:
        raise CostError(
            f"the cost returned None (at rows {start}..{stop - 1} perturbing {name!r}); did the "
            "cost forget `return`? Return the cost J"
        )
    if isinstance(out, tuple):
        raise CostError(
            f"the cost returned a tuple of {len(out)} items (at rows {start}..{stop - 1} perturbing "
            f"{name!r}); return only the cost J, e.g. lambda params, *args: f(params, *args)[0]"
        )

    if isinstance(out, (str, bytes)):
        raise CostError(
            f"the cost returned a {type(out).__name__} (at rows {start}..{stop - 1} perturbing "
            f"{name!r}); return the cost J as a number or an array of the parameters' library"
        )
    if not hasattr(out, "shape"):
        try:
            # A Python float is a float64; xp's default float may be float32 (torch's is).
            out = xp.asarray(out, dtype=python_float(xp))
        except Exception as exc:
            raise CostError(
                f"the cost returned {type(out).__name__} (at rows {start}..{stop - 1} perturbing "
                f"{name!r}); return the cost J as a number or an array of the parameters' library"
            ) from exc
    elif array_api_compat.is_array_api_obj(out) and array_api_compat.array_namespace(out) is not xp:
        # e.g. a NumPy result for torch parameters: concatenating them later fails obscurely.
        raise CostError(
            f"the cost returned a {type(out).__module__.split('.')[0]} array for parameters of "
            f"{xp.__name__} (at rows {start}..{stop - 1} perturbing {name!r}); compute the cost "
            "with the namespace of its inputs (array_api_compat.array_namespace(...)) or pass "
            "backend= to run the check on the library the cost uses"
        )
    if not stacked and expected == () and tuple(out.shape) != () and math.prod(tuple(out.shape)) == 1:
        # J as a 1-element array: the course's np.dot(Y, np.log(A).T) is (1, 1), torch's
        # sum(0, keepdim=True) is (1,). One number, unambiguous: taken as J.
        out = xp.reshape(out, ())
    if tuple(out.shape) != expected:
        what = (
            f"a batch of {expected[0]} perturbed copies of parameter {name!r}"
            if stacked
            else f"one point (row {start} perturbing parameter {name!r})"
        )
        raise CostError(
            f"the cost returned shape {tuple(out.shape)} for {what}; expected shape {expected}. "
            + (
                contract(name, shape)
                if stacked
                else "Evaluated one point at a time, the cost must return a scalar."
            )
        )
    if not xp.isdtype(out.dtype, "real floating"):
        complex_ = xp.isdtype(out.dtype, "complex floating")
        raise CostError(
            f"the cost returned a {'complex' if complex_ else 'non-floating'} value (dtype {out.dtype}) "
            f"(at rows {start}..{stop - 1} perturbing {name!r}); "
            + (
                "J must be real: a gradient check of a complex J is not defined here (return its real "
                "part, e.g. xp.real(J), if that is the cost your gradients are of)"
                if complex_
                else "return J as a real floating number (an integer J has no finite differences: "
                "cast before rounding, or return the unrounded cost)"
            )
        )
    # A copy where rows live in a reused buffer: a cost may return a view of its inputs.
    return xp.asarray(out, copy=True) if reuses(xp) else out


def looped(stencil: Stencil, group: RowGroup, start: int, stop: int, *, xp: ModuleType, fresh: bool) -> Any:
    """Rows [start, stop) one call each, shape (stop - start,).

    On NumPy, CuPy and PyTorch one vector is reused: each row writes its element, calls the
    cost on views of the vector (built once), and writes the element back: no per-row
    allocation and no per-row device sync (the values come to the host once). Elsewhere (and
    for direction rows) each row is built on its own. ``fresh``: every call gets fresh copies
    of every array (a cost that writes into its inputs). A cost that wrote into the vector is
    caught at the end (one comparison) and raises ``Scribbled``.
    """
    with intra_op(group.weight):  # one point per call: PyTorch on one thread if it reads little
        return _looped(stencil, group, start, stop, xp=xp, fresh=fresh)


def _looped(stencil: Stencil, group: RowGroup, start: int, stop: int, *, xp: ModuleType, fresh: bool) -> Any:
    cost, args, name = stencil.cost, stencil.args, group.name
    costs: list[Any] = []
    kind = None  # the type of the first row's result, once validated: the rest are checked cheaply
    in_place = reuses(xp)

    def collect(out: Any, r: int) -> None:
        nonlocal kind
        if type(out) is float:  # a Python float is valid as it is: all made an array at the end
            costs.append(out)
            return
        if type(out) is not kind or out.shape != ():
            raw = type(out)
            out = as_costs(out, (), xp=xp, name=name, start=r, stop=r + 1, stacked=False)
            kind = raw if hasattr(raw, "shape") else None  # a Python float is converted every time
        elif in_place and not isinstance(out, float):  # (NumPy's float64 scalars are floats: immutable)
            out = xp.asarray(out, copy=True)  # a cost may return a view of the reused vector
        costs.append(out)

    if fresh or group.points is None or not in_place:
        for r in range(start, stop):
            point = xp.asarray(group.rows(r, r + 1)[0, ...], copy=True)
            params, call_args = (
                fresh_inputs(stencil, group, point, xp) if fresh else (group.single(point), args)
            )
            collect(call(cost, params, call_args, name=name, start=r, stop=r + 1, stacked=False), r)
        return _stacked(costs, xp)
    positions, values, originals = group.points(start, stop)
    vector = xp.asarray(group.flat, copy=True)
    layout, parts, tensor = stencil.layout, stencil.parts, group.tensor
    view = None if tensor is None else xp.reshape(vector, group.shape)  # sees every write
    for position, value, original, r in zip(positions, values, originals, range(start, stop)):
        vector[position] = value
        # A new container each call (of views of the vector, which see every write): a cost
        # that rebinds an entry (params["W"] = np.array(params["W"])) must not hand that
        # stale array to the next call, as the notebook's fresh dict per row never does.
        params = group.single(vector) if view is None else layout.wrap({**parts, tensor: view})
        collect(call(cost, params, args, name=name, start=r, stop=r + 1, stacked=False), r)
        vector[position] = original  # after collect: the result may be a view of the vector
    if not bool(xp.all(vector == group.flat)):
        raise Scribbled
    return _stacked(costs, xp)


def python_float(xp: ModuleType) -> Any:
    """The dtype a Python float becomes: float64, or the default where the library has none
    (JAX with x64 off, where asking for float64 warns and gives float32)."""
    info = xp.__array_namespace_info__()
    if "float64" in info.dtypes(kind="real floating"):
        return xp.float64
    return info.default_dtypes()["real floating"]


def _stacked(costs: list[Any], xp: ModuleType) -> Any:
    """The looped costs as one (k,) array: Python floats all at once, arrays stacked."""
    if all(type(c) is float for c in costs):
        return xp.asarray(costs, dtype=python_float(xp))
    return xp.stack([xp.asarray(c, dtype=python_float(xp)) if type(c) is float else c for c in costs])


def single_cost(stencil: Stencil, group: RowGroup, row: int, *, xp: ModuleType) -> Any:
    """J at one row, by one unbatched call, as a 0-d array: a batched chunk's check.

    The point is the row itself (bitwise the loop's), in the group's row buffer where the
    library reuses one: a cost that writes into it spoils only that buffer, refilled whole
    before its next use; what it writes elsewhere ``intact`` finds after the pass."""
    point = group.rows(row, row + 1)[0, ...]
    with intra_op(group.weight):
        out = call(
            stencil.cost,
            group.single(point),
            stencil.args,
            name=group.name,
            start=row,
            stop=row + 1,
            stacked=False,
        )
    return as_costs(out, (), xp=xp, name=group.name, start=row, stop=row + 1, stacked=False)


class Scribbled(Exception):
    """The cost wrote into the arrays it received: the pass is redone with fresh copies."""


def is_backend_array(value: Any, xp: ModuleType) -> bool:
    """Whether ``value`` is an array of ``xp`` (not a Python number, not another library's)."""
    return is_array(value) and namespace(value) is xp


def copied(value: Any, xp: ModuleType) -> Any:
    """A fresh copy of an array of ``xp``; anything else as it is."""
    return xp.asarray(value, copy=True) if is_backend_array(value, xp) else value


def fresh_inputs(stencil: Stencil, group: RowGroup, point: Any, xp: ModuleType) -> tuple[Any, tuple]:
    """Params at ``point`` and args, every array a fresh copy (for a cost that writes into them)."""
    args = tuple(copied(a, xp) for a in stencil.args)
    if group.tensor is None:
        return group.single(point), args
    parts = {name: xp.asarray(p, copy=True) for name, p in stencil.parts.items()}
    parts[group.tensor] = xp.reshape(point, tuple(stencil.parts[group.tensor].shape))
    return stencil.layout.wrap(parts), args


def intact(stencil: Stencil, parts: Mapping[str, Any], args: tuple[Any, ...], xp: ModuleType) -> bool:
    """Whether the copies the cost received still equal the originals (one device sync)."""
    flags = [xp.all(stencil.parts[name] == p) for name, p in parts.items()]
    for copy, original in zip(stencil.args, args):
        if copy is not original and is_backend_array(original, xp):
            same = copy == original
            if xp.isdtype(original.dtype, "real floating"):
                same = same | (xp.isnan(copy) & xp.isnan(original))
            flags.append(xp.all(same))
    return bool(xp.all(xp.stack(flags)))


def evaluate_center(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    xp: ModuleType,
    explain: Callable[[], str] | None = None,
) -> Any:
    """J(θ) itself, as a 0-d array, with the same error handling as the perturbed rows.

    The cost gets copies of the parameters (in the user's structure, any tree) and of the
    array args: the check's own stay pristine for every later row. Where J(θ) is not finite,
    ``explain()`` (if given) names a likely culprit for the CostError (NaN in a data argument)."""
    params = layout.wrap({name: copied(value, xp) for name, value in parts.items()})
    args = tuple(copied(a, xp) for a in args)
    out = call(cost, params, args, name="(none: J at θ)", start=0, stop=1, stacked=False)
    value = as_costs(out, (), xp=xp, name="(none: J at θ)", start=0, stop=1, stacked=False)
    if not bool(xp.isfinite(value)):  # one sync per check: every difference would be meaningless
        culprit = explain() if explain is not None else ""
        raise CostError(
            f"the cost is {float(value)} at θ itself, before any step: there is nothing to compare "
            "the gradients with; check the cost at these parameters and args (a log of 0, a "
            "division by 0, an overflow)"
            + (f"; {culprit} (clean the data, or mask it in the cost)" if culprit else "")
        )
    return value


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, at most 160 characters: a reason in the report."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else str(text)
    return line if len(line) <= 160 else line[:157] + "..."
