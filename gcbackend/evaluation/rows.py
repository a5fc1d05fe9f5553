"""The rows θ + D_r a check evaluates, and the groups they are evaluated in.

Rows are grouped by the parameter tensor they perturb (``row_group``): only that tensor is
batched, the others are shared by broadcasting. A small θ has one group for every tensor at
once (``tensor=None``). Row r of a group depends only on the ``Stencil`` and on r, so any
machine rebuilds any chunk of rows from (tensor, start, stop).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
from array_api_compat import device

from ..backends import to_host
from ..params import Layout
from .chunks import MAX_CHUNK_ROWS, WHOLE_ROWS
from .directions import Displacements
from .limits import call_weight

if TYPE_CHECKING:
    from .paths import Path

__all__ = [
    "Chunk",
    "RowGroup",
    "Rows",
    "Source",
    "Stencil",
    "coordinate_rows",
    "direction_rows",
    "flattened",
    "jitted",
    "points_at",
    "reuses",
    "row_group",
    "scatters",
    "split",
]

Rows = Callable[[int, int], Any]
"""rows(start, stop) → the perturbed points θ + D_r of rows [start, stop), shape (stop - start, n)."""

Chunk = tuple["str | None", int, int]
"""(tensor, start, stop): rows [start, stop) of the rows perturbing parameter ``tensor``, or
of the rows perturbing every tensor at once (``None``: the one-call path of a small θ)."""


@dataclass(frozen=True)
class Stencil:
    """Everything the rows of a ``stencil_costs`` call are rebuilt from, on any machine.

    Row r of a chunk depends only on these and on (tensor, r), so a runner that sends a
    Stencil to each worker once can then describe every task by its ``Chunk`` alone.
    """

    cost: Callable[..., Any]
    parts: Mapping[str, Any]
    args: tuple[Any, ...]
    layout: Layout
    steps: Mapping[str, Any]
    multipliers: tuple[float, ...]
    elements: Mapping[str, Any] | None = None
    directions: Mapping[str, Any] | None = None
    paths: Mapping[str | None, Path] | None = None
    """tensor → the path chosen on the driver (None: broadcast): it travels with the tasks."""


class RowGroup(NamedTuple):
    """The rows of one tensor (or of all at once) as the evaluation takes them.

    ``points`` (coordinate rows only) gives, for rows [start, stop), the flat position each
    row moves and its perturbed and original values, for the loop's in-place perturbation;
    ``describe(r)`` names row r for messages, e.g. ``J(W1[0, 3] + h)``.
    """

    flat: Any
    rows: Rows
    n_rows: int
    batched: Callable[[Any], Any]
    single: Callable[[Any], Any]
    name: str
    most: int = MAX_CHUNK_ROWS
    tensor: str | None = None
    shape: tuple[int, ...] = ()
    points: Any = None
    describe: Callable[[int], str] = str
    memo: dict | None = None
    source: Source | None = None
    weight: int = 0
    """Bytes one unbatched call reads, where PyTorch's threads may be held (``limits.call_weight``)."""


class Source(NamedTuple):
    """What a group's rows are computed from, as arrays, for ``points_at`` (a compiled
    function takes them as arguments: one compilation serves every θ of these shapes).

    Coordinate rows: ``spread`` is h (n,), ``table`` the elements that get rows (None: all),
    ``count`` their number. Direction rows: ``spread`` is U (k, n), ``count`` k."""

    flat: Any
    spread: Any
    factors: Any
    table: Any
    count: int
    directions: bool


def points_at(source: Source, index: Any, *, xp: ModuleType) -> Any:
    """The rows at positions ``index`` (an int array (B,)): pure array code, the operations
    of ``coordinate_rows``/``direction_rows`` on the same values (so bitwise their rows),
    traceable by ``jax.jit``."""
    flat, spread, factors, count = source.flat, source.spread, source.factors, source.count
    scale = xp.take(factors, index // count)
    if source.directions:
        return flat[None, :] + xp.take(spread, index % count, axis=0) * scale[:, None]
    element = index % count if source.table is None else xp.take(source.table, index % count)
    values = xp.take(flat, element) + scale * xp.take(spread, element)
    at = (xp.arange(index.shape[0], device=device(flat)), element)
    return xpx.at(xp.tile(flat[None, :], (index.shape[0], 1)), at).set(values, xp=xp)


def flattened(layout: Layout, parts: Mapping[str, Any], xp: ModuleType) -> Any:
    """θ of shape (N,) from name → array (``Layout.flatten``): one compiled call on JAX,
    where a reshape per tensor and a concatenation would each be dispatched on its own."""
    if array_api_compat.is_jax_namespace(xp):
        return jitted(_flatten, layout, xp)(dict(parts))
    return _flatten(layout, xp)(parts)


def split(layout: Layout, costs: Any, n_stencil: int, xp: ModuleType) -> dict[str, Any]:
    """name → (K, *shape) from the costs (K·N,) of the whole-θ group, in layout order."""
    if array_api_compat.is_jax_namespace(xp):
        return jitted(_splitter, layout, xp, n_stencil)(costs)
    return _splitter(layout, xp, n_stencil)(costs)


def _flatten(layout: Layout, xp: ModuleType) -> Callable[[Any], Any]:
    return lambda parts: layout.flatten(layout.wrap(parts), xp=xp)


def _splitter(layout: Layout, xp: ModuleType, n_stencil: int) -> Callable[[Any], Any]:
    def split(costs):
        grid = layout.as_dict(layout.unflatten(xp.reshape(costs, (n_stencil, layout.size)), xp=xp))
        return {name: grid[name] for name in layout.names}

    return split


@functools.lru_cache(maxsize=64)
def _jit_of(make: Callable[..., Any], *key: Any) -> Any:
    import jax

    return jax.jit(make(*key))


def jitted(make: Callable[..., Any], *key: Any) -> Any:
    """JAX: ``jax.jit(make(*key))``, kept per key (the function ``make`` builds from it)."""
    try:
        return _jit_of(make, *key)
    except TypeError:  # an unhashable layout: compiled for this call only
        import jax

        return jax.jit(make(*key))


def scatters(xp: ModuleType) -> bool:
    """Whether ``xpx.at(x)[rows, cols]`` can write integer-array indices (in place, or as
    JAX's functional ``.at``). The standard has no such assignment (array-api-strict
    refuses it); those namespaces get rows built from ``one_hot`` instead."""
    return (
        array_api_compat.is_numpy_namespace(xp)
        or array_api_compat.is_cupy_namespace(xp)
        or array_api_compat.is_torch_namespace(xp)
        or array_api_compat.is_jax_namespace(xp)
    )


def reuses(xp: ModuleType) -> bool:
    """Whether arrays can be written in place cheaply (NumPy, CuPy, PyTorch: reshaped slices
    are views; JAX's arrays are immutable, array-api-strict has no integer scatter): rows
    are then written into the previous call's buffer, the loop perturbs one vector in place,
    and the costs are copied out of every call, in case the cost returned a view of its inputs."""
    return scatters(xp) and not array_api_compat.is_jax_namespace(xp)


def _coordinates(steps: Any, multipliers: tuple[float, ...], elements: Any, xp: ModuleType):
    """(device, the count of elements that get rows, the multipliers as an array, and
    element(index) → the element each row index moves): what coordinate rows are built
    from, shared by ``coordinate_rows`` and ``_points``. Every element by default, with no
    index array of the tensor's size: nothing here grows with the rows."""
    where = device(steps)
    chosen = steps.shape[0] if elements is None else elements.shape[0]

    @functools.cache
    def factors() -> Any:  # made when first needed: a group of JAX's compiled path never is
        return xp.asarray(multipliers, dtype=steps.dtype, device=where)

    def element(index: Any) -> Any:
        return index % chosen if elements is None else xp.take(elements, index % chosen)

    return where, chosen, factors, element


def coordinate_rows(
    flat: Any, steps: Any, multipliers: tuple[float, ...], *, xp: ModuleType, elements: Any = None
) -> tuple[Rows, int]:
    """rows(start, stop) of the points θ + [m_1·diag(h); m_2·diag(h); …], and their count.

    ``flat`` is θ and ``steps`` h, both (n,): one step per element. ``elements`` (an int
    array) limits the rows to those elements (a sampled check); by default every element
    has its rows. Row r = k·s + i moves element ``elements[i]`` by m_k·h: it is θ copied
    once with that one element changed (θ_j + m_k·h_j, bitwise the notebook's
    ``theta_plus``/``theta_minus``). Where the library cannot assign at integer indices,
    θ + one_hot·m·h gives the same numbers with two more passes over the (B, n) rows.
    """
    size = steps.shape[0]
    where, chosen, factors, moved = _coordinates(steps, multipliers, elements, xp)
    scatter, reuse = scatters(xp), reuses(xp)
    held: list[Any] = []  # the (B, n) buffer of the previous call, where it can be reused

    def rows(start: int, stop: int) -> Any:
        count = stop - start
        index = xp.arange(start, stop, device=where)
        element = moved(index)
        scale = xp.take(factors(), index // chosen) * xp.take(steps, element)
        if not scatter:
            return flat[None, :] + xpx.one_hot(element, size, dtype=steps.dtype, xp=xp) * scale[:, None]
        at = (xp.arange(count, device=where), element)
        values = xp.take(flat, element) + scale
        if held and held[0].shape[0] >= count:
            # Refill the previous call's buffer (all of it, so a cost that wrote into its
            # inputs cannot leak into these rows): memory already touched, where fresh
            # rows of a large tensor page-fault in at every call.
            points = held[0][:count, ...]
            points[...] = flat
            return xpx.at(points, at).set(values, copy=False, xp=xp)
        # tile, not asarray(broadcast_to(...), copy=True): NumPy copies a broadcast view in
        # its own stride order, which is Fortran order here, and the GEMMs reading these
        # rows then run much slower (bench/run.py, L model).
        points = xpx.at(xp.tile(flat[None, :], (count, 1)), at).set(values, xp=xp)
        if reuse:
            held[:] = [points]
        return points

    return rows, len(multipliers) * chosen


def direction_rows(
    flat: Any, directions: Any, multipliers: tuple[float, ...], *, xp: ModuleType
) -> tuple[Rows, int]:
    """rows(start, stop) of θ + [m_1·U; m_2·U; …] for k directions U of shape (k, n) (steps
    included): an array, or ``Displacements`` drawn for each chunk's rows only (the same values)."""
    count = directions.shape[0]
    if isinstance(directions, Displacements):
        return _drawn_rows(flat, directions, multipliers, xp=xp), len(multipliers) * count
    factors = xp.asarray(multipliers, dtype=directions.dtype, device=device(directions))

    def rows(start: int, stop: int) -> Any:
        index = xp.arange(start, stop, device=device(directions))
        scale = xp.take(factors, index // count)
        return flat[None, :] + xp.take(directions, index % count, axis=0) * scale[:, None]

    return rows, len(multipliers) * count


def _drawn_rows(
    flat: Any, directions: Displacements, multipliers: tuple[float, ...], *, xp: ModuleType
) -> Rows:
    """``direction_rows`` for directions drawn per chunk: the chunk's displacements on the host,
    moved to θ's device in θ's dtype, then the same operations (so bitwise the held rows)."""
    import numpy as np

    count = directions.shape[0]
    where = device(flat)
    factors = xp.asarray(multipliers, dtype=flat.dtype, device=where)

    def rows(start: int, stop: int) -> Any:
        index = np.arange(start, stop)
        drawn = xp.asarray(directions.host_rows(index % count), device=where)
        scale = xp.take(factors, xp.arange(start, stop, device=where) // count)
        return flat[None, :] + xp.astype(drawn, flat.dtype, copy=False) * scale[:, None]

    return rows


def _points(flat: Any, steps: Any, multipliers: tuple[float, ...], *, xp: ModuleType, elements: Any = None):
    """points(start, stop) → (positions, values, originals) of coordinate rows [start, stop): the
    flat position each row moves, its value there (θ_j + m·h_j, the same operations as
    ``coordinate_rows``, so bitwise its rows) and θ_j, as host lists: one transfer per call,
    built for those rows only (a tensor of 10⁶ elements has 4·10⁶ rows: host lists of them
    all would hold ~400 MB to perturb a few)."""
    where, chosen, factors, moved = _coordinates(steps, multipliers, elements, xp)

    def points(start: int, stop: int) -> tuple[list[int], list[float], list[float]]:
        index = xp.arange(start, stop, device=where)
        element = moved(index)
        scale = xp.take(factors(), index // chosen) * xp.take(steps, element)
        original = xp.take(flat, element)
        values, originals = to_host(xp.stack([original + scale, original])).tolist()
        return to_host(element).tolist(), values, originals

    return points


def _describer(layout: Layout, tensor: str | None, multipliers, elements: Any, directions: bool, per: int):
    """describe(r): row r in words, e.g. ``J(W1[0, 3] + h)``, ``J(b1[2] − 2h)``, ``direction 3 × 2``."""

    def step(m: float) -> str:
        sign = "+" if m > 0 else "−"
        return f"{sign} {'' if abs(m) == 1 else f'{abs(m):g}'}h"

    def describe(r: int) -> str:
        m = multipliers[r // per]
        i = r % per
        if directions:
            return f"J(θ + {m:g}·u{i}) for {tensor} (direction {i})"
        flat = int(to_host(elements[i])) if elements is not None else i  # one element to the host
        if tensor is None:
            k = bisect.bisect_right(layout.offsets, flat) - 1
            name, shape, flat = layout.names[k], layout.shapes[k], flat - layout.offsets[k]
        else:
            name, shape = tensor, layout.shapes[layout.names.index(tensor)]
        index = []
        for extent in reversed(shape):
            index.append(flat % extent)
            flat //= extent
        where = ", ".join(map(str, reversed(index)))
        return f"J({name}[{where}] {step(m)})"

    return describe


def row_group(stencil: Stencil, tensor: str | None, *, xp: ModuleType) -> RowGroup:
    """The rows perturbing parameter ``tensor`` (only it batched, the others unbatched and
    shared by broadcasting), or with ``tensor=None`` every tensor's rows at once (all batched)."""
    layout, parts, steps, multipliers = stencil.layout, stencil.parts, stencil.steps, stencil.multipliers
    if tensor is None:
        flat, flat_steps = flattened(layout, parts, xp), flattened(layout, steps, xp)
        rows, n_rows = coordinate_rows(flat, flat_steps, multipliers, xp=xp)
        factors = xp.asarray(multipliers, dtype=flat_steps.dtype, device=device(flat_steps))
        return RowGroup(
            flat,
            rows,
            n_rows,
            lambda batch: layout.unflatten(batch, xp=xp),
            lambda vector: layout.unflatten(vector, xp=xp),
            ", ".join(layout.names),
            WHOLE_ROWS,
            None,
            (layout.size,),
            _points(flat, flat_steps, multipliers, xp=xp),
            _describer(layout, None, multipliers, None, False, layout.size),
            {},
            Source(flat, flat_steps, factors, None, layout.size, False),
            call_weight(xp, [*parts.values(), *stencil.args]),
        )
    base = parts[tensor]
    shape = tuple(base.shape)

    def batched(batch):
        return layout.wrap({**parts, tensor: xp.reshape(batch, (batch.shape[0], *shape))})

    def single(vector):
        return layout.wrap({**parts, tensor: xp.reshape(vector, shape)})

    flat = xp.reshape(base, (-1,))
    if stencil.directions is not None:
        spread = stencil.directions[tensor]
        rows, n_rows = direction_rows(flat, spread, multipliers, xp=xp)
        points, chosen = None, None
        describe = _describer(layout, tensor, multipliers, None, True, n_rows // len(multipliers))
    else:
        chosen = None if stencil.elements is None else stencil.elements[tensor]
        spread = xp.reshape(steps[tensor], (-1,))
        rows, n_rows = coordinate_rows(flat, spread, multipliers, xp=xp, elements=chosen)
        points = _points(flat, spread, multipliers, xp=xp, elements=chosen)
        describe = _describer(layout, tensor, multipliers, chosen, False, n_rows // len(multipliers))
    like = flat if stencil.directions is not None else spread  # (drawn directions have no dtype)
    factors = xp.asarray(multipliers, dtype=like.dtype, device=device(like))
    source = Source(flat, spread, factors, chosen, n_rows // len(multipliers), stencil.directions is not None)
    return RowGroup(
        flat,
        rows,
        n_rows,
        batched,
        single,
        tensor,
        MAX_CHUNK_ROWS,
        tensor,
        shape,
        points,
        describe,
        {},
        source,
        call_weight(xp, [*parts.values(), *stencil.args]),
    )
