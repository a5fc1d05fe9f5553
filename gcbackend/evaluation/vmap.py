"""The vmap path: the library maps a cost written for one point over a batch of rows.

PyTorch's ``torch.func.vmap`` traces the cost's Python at every call. On JAX everything runs
compiled: one ``jax.jit`` program per (cost, tensor, shapes, batch size) builds the rows
itself from their positions and maps the cost over them (``jax_rows``), so no operation of
the evaluation's own is dispatched one by one; it is kept for the next check of the same
cost (``_compiled``). Every call over a tensor's rows has the same batch size (the last
is padded), so a tensor compiles once, plus once for single rows (the chunks' checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import array_api_compat

from ..params import Layout
from .calls import is_backend_array
from .rows import RowGroup, Source, Stencil, points_at

__all__ = ["JIT_CACHE", "can_vmap", "jax_rows", "padded_size", "vmapped"]

JIT_CACHE = 64
"""JAX: how many compiled programs the process keeps (least recently used go first)."""


def can_vmap(xp: ModuleType) -> bool:
    """Whether the library maps a function over a batch axis itself: PyTorch and JAX."""
    return array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp)


class _Fixed:
    """The non-array args of a cost, as part of a cache key: compared by identity (an object
    the cost reads need not be hashable or comparable), and kept alive by the key itself,
    so an id in the key can never be reused by another object."""

    def __init__(self, values: tuple[tuple[int, Any], ...]) -> None:
        self.values = values

    def __hash__(self) -> int:
        return hash(tuple((i, id(value)) for i, value in self.values))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Fixed)
            and len(self.values) == len(other.values)
            and all(i == j and a is b for (i, a), (j, b) in zip(self.values, other.values))
        )


def _compile(
    cost: Callable[..., Any],
    tensor: str | None,
    layout: Layout,
    arrays: tuple[int, ...],
    fixed: _Fixed,
    n_args: int,
    shape: tuple[int, ...],
    xp: ModuleType,
    directions: bool,
    size: int,
):
    """jit of: rows at positions start … start + size − 1 (clipped to ``last``: padding
    repeats the last row), then the cost of each. The parameters, the rows' sources and
    the array args are arguments, not constants, so one compilation serves any θ."""
    import jax

    constants = dict(fixed.values)

    def one(row, parts, given):
        values = dict(zip(arrays, given))
        full = [values[i] if i in values else constants[i] for i in range(n_args)]
        params = (
            layout.unflatten(row, xp=xp)
            if tensor is None
            else layout.wrap({**parts, tensor: xp.reshape(row, shape)})
        )
        return cost(params, *full)

    mapped = jax.vmap(one, in_axes=(0, None, None))

    def run(start, last, count, flat, spread, factors, table, parts, given):
        index = xp.minimum(start + xp.arange(size, dtype=start.dtype), last)
        points = points_at(Source(flat, spread, factors, table, count, directions), index, xp=xp)
        return mapped(points, parts, given)

    return jax.jit(run)


_compiled = functools.lru_cache(maxsize=JIT_CACHE)(_compile)


def jax_rows(stencil: Stencil, group: RowGroup, xp: ModuleType, size: int) -> Callable[[int, int], Any]:
    """costs(start, stop): J at rows [start, stop) of ``group``, (stop − start,), by one
    compiled call of ``size`` rows (stop − start ≤ size; the rest is padding, dropped)."""
    cost, args, source = stencil.cost, stencil.args, group.source
    arrays = tuple(i for i, a in enumerate(args) if is_backend_array(a, xp))
    fixed = _Fixed(tuple((i, a) for i, a in enumerate(args) if i not in arrays))
    key = (
        cost,
        group.tensor,
        stencil.layout,
        arrays,
        fixed,
        len(args),
        group.shape,
        xp,
        source.directions,
        size,
    )
    try:
        program = _compiled(*key)
    except TypeError:  # an unhashable callable object (or layout): compiled for this check only
        program = _compile(*key)
    parts = {} if group.tensor is None else dict(stencil.parts)
    given = tuple(args[i] for i in arrays)
    index = xp.asarray(0).dtype  # the default integer: int32 with x64 off
    last, count = xp.asarray(group.n_rows - 1, dtype=index), xp.asarray(source.count, dtype=index)
    # Sources padded to a power of two: a refinement's few elements or directions reuse the
    # compiled program of an earlier round of a similar size (shapes are what jit compiles for).
    table, spread = source.table, source.spread
    if table is not None:
        table = _padded(table, xp)
    elif source.directions:
        spread = _padded(spread, xp)

    def costs(start: int, stop: int) -> Any:
        first = xp.asarray(start, dtype=index)
        out = program(first, last, count, source.flat, spread, source.factors, table, parts, given)
        return out if stop - start == size else out[: stop - start]

    return costs


def padded_size(rows: int) -> int:
    """The batch size a JAX call over ``rows`` rows is compiled for: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def _padded(array: Any, xp: ModuleType) -> Any:
    """``array`` with zero rows appended up to a power of two along its first axis."""
    extra = padded_size(array.shape[0]) - array.shape[0]
    if extra == 0:
        return array
    filler = xp.zeros((extra, *array.shape[1:]), dtype=array.dtype, device=array_api_compat.device(array))
    return xp.concat([array, filler])


def vmapped(stencil: Stencil, group: RowGroup, xp: ModuleType) -> Callable[[Any], Any]:
    """PyTorch: the cost of one point, mapped over the rows of a (B, n) stack."""
    from torch.func import vmap

    cost, args, single = stencil.cost, stencil.args, group.single
    return vmap(lambda row: cost(single(row), *args))
