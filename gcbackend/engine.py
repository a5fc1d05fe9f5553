"""The engine: evaluate the cost at θ + D for many displacement rows D, stacked or looped.

Rows are grouped by the parameter tensor they perturb. A chunk of B rows that perturb
tensor ``name`` becomes ONE cost call in which that tensor carries a leading batch axis,
shape (B, *shape), and every other tensor is passed unbatched, so broadcasting shares it:
nothing of size (2N, N) is ever built, and memory is bounded by the budget whatever N is.
The cost contract is therefore: *some* parameters may carry a leading batch axis, and the
cost returns one value per row, shape (B,) (SciPy's ``differentiate.jacobian`` asks the same
of its ``f``). ``mode="loop"`` calls the cost once per row with unbatched parameters: the
notebook's algorithm, the reference the stacked path is tested against, and the fallback
for a cost that cannot broadcast.

The engine knows nothing of models or of checking; it sees a cost, arrays and rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import array_api_extra as xpx

from .errors import CostError, InputError

__all__ = ["DEFAULT_MEMORY_BUDGET", "MAX_CHUNK_ROWS", "MODES", "central_differences", "evaluate_rows"]

MODES = ("stacked", "loop")
DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of perturbed parameter copies one stacked call may hold (256 MiB)."""
MAX_CHUNK_ROWS = 256
"""Rows per stacked call, at most: beyond this, batched GEMMs stop getting faster and the
activations (which grow with the batch too) stop fitting in cache."""

_CONTRACT = (
    "In mode='stacked' some parameters carry a leading batch axis of size B (e.g. W1 of shape "
    "(B, 5, 4) instead of (5, 4)) and the cost must broadcast over it and return shape (B,): "
    "use matmul/@ and reduce over the trailing axes only (axis=(-2, -1)), never over all axes. "
    "If the cost cannot be written that way, pass mode='loop'."
)

Rows = Callable[[int, int], Any]
"""rows(start, stop) → the displacements of rows [start, stop), shape (stop - start, n)."""


def chunk_rows(n_rows: int, size: int, itemsize: int, memory_budget: int, name: str) -> int:
    """How many rows of a size-``size`` tensor one stacked call may hold under the budget."""
    row_bytes = size * itemsize
    if memory_budget < row_bytes:
        raise InputError(
            f"memory_budget={memory_budget} bytes is too small for one perturbed copy of "
            f"parameter {name!r} ({size} elements × {itemsize} bytes); pass at least "
            f"memory_budget={row_bytes}"
        )
    return max(1, min(n_rows, MAX_CHUNK_ROWS, memory_budget // row_bytes))


def _call(cost, params, args, *, name, start, stop, stacked):
    try:
        return cost(params, *args)
    except Exception as exc:
        where = f"rows {start}..{stop - 1} perturbing parameter {name!r}"
        advice = _CONTRACT if stacked else "Check that cost(params, *args) runs on the inputs."
        raise CostError(f"the cost raised {type(exc).__name__}: {exc} (at {where}). {advice}") from exc


def _as_costs(out: Any, expected: tuple[int, ...], *, xp, name, start, stop, stacked) -> Any:
    if isinstance(out, tuple):
        raise CostError(
            f"the cost returned a tuple of {len(out)} items (at rows {start}..{stop - 1} perturbing "
            f"{name!r}); return only the cost J, e.g. lambda params, *args: f(params, *args)[0]"
        )
    if not hasattr(out, "shape"):
        out = xp.asarray(out)
    if tuple(out.shape) != expected:
        what = "a batch of" if stacked else "one unbatched evaluation at"
        raise CostError(
            f"the cost returned shape {tuple(out.shape)} for {what} rows {start}..{stop - 1} "
            f"perturbing parameter {name!r}; expected shape {expected}. "
            + (_CONTRACT if stacked else "In mode='loop' the cost must return a scalar.")
        )
    return out


def evaluate_rows(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    name: str,
    n_rows: int,
    rows: Rows,
    wrap: Callable[[Mapping[str, Any]], Any],
    xp: ModuleType,
    mode: str = "stacked",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Any:
    """Costs J(θ + D_r) for the ``n_rows`` displacement rows D_r of tensor ``name``, shape (n_rows,).

    ``parts`` maps names to the unbatched parameter arrays; ``wrap`` turns a mapping into
    what the cost receives. Stacked: ⌈n_rows / B⌉ calls, B from ``memory_budget``. Loop:
    n_rows calls. Raises CostError if the cost raises or breaks the shape contract.
    """
    base = parts[name]
    shape = tuple(base.shape)
    flat = xp.reshape(base, (-1,))
    size = flat.shape[0]
    costs = []
    if mode == "loop":
        for r in range(n_rows):
            perturbed = xp.reshape(flat + rows(r, r + 1)[0, :], shape)
            out = _call(
                cost, wrap({**parts, name: perturbed}), args, name=name, start=r, stop=r + 1, stacked=False
            )
            costs.append(_as_costs(out, (), xp=xp, name=name, start=r, stop=r + 1, stacked=False))
        return xp.stack(costs)
    step = chunk_rows(n_rows, size, xp.finfo(base.dtype).bits // 8, memory_budget, name)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        perturbed = xp.reshape(flat[None, :] + rows(start, stop), (stop - start, *shape))
        out = _call(
            cost, wrap({**parts, name: perturbed}), args, name=name, start=start, stop=stop, stacked=True
        )
        costs.append(_as_costs(out, (stop - start,), xp=xp, name=name, start=start, stop=stop, stacked=True))
    return costs[0] if len(costs) == 1 else xp.concat(costs)


def central_differences(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    epsilon: float,
    wrap: Callable[[Mapping[str, Any]], Any],
    xp: ModuleType,
    mode: str = "stacked",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, Any]:
    """The central-difference gradient (J(θ + εe_i) − J(θ − εe_i)) / (2ε) of every element.

    Per tensor of n elements the rows are +εI then −εI (2n rows). Each row differs from θ
    in exactly one element, by exactly ±ε (θ_j + ±0 is θ_j bitwise), so the perturbed
    parameters equal the notebook's ``theta_plus``/``theta_minus`` bit for bit, and the
    quotient is formed in the notebook's order. Returns name → array of the tensor's shape.
    """
    numeric = {}
    for name, base in parts.items():
        size = 1
        for extent in base.shape:
            size *= extent
        device = base.device

        def rows(start, stop, size=size, dtype=base.dtype, device=device):
            index = xp.arange(start, stop, device=device)
            signs = xp.where(
                index < size,
                xp.asarray(epsilon, dtype=dtype, device=device),
                xp.asarray(-epsilon, dtype=dtype, device=device),
            )
            return xpx.one_hot(index % size, size, dtype=dtype, xp=xp) * signs[:, None]

        costs = evaluate_rows(
            cost,
            parts,
            args,
            name=name,
            n_rows=2 * size,
            rows=rows,
            wrap=wrap,
            xp=xp,
            mode=mode,
            memory_budget=memory_budget,
        )
        numeric[name] = xp.reshape((costs[:size] - costs[size:]) / (2 * epsilon), tuple(base.shape))
    return numeric
