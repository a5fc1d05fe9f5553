"""The engine: evaluate the cost at θ + D for many displacement rows D, by the fastest path
proved right for this cost.

Rows are grouped by the parameter tensor they perturb. Each group is evaluated by one of
three paths, chosen once per tensor per check (``choose_path``) and remembered in a
``paths`` mapping for every later round (refinement, every chunk, every worker):

* **broadcast** — a chunk of B rows becomes ONE cost call in which that tensor carries a
  leading batch axis, shape (B, *shape), and every other tensor is passed unbatched, so
  broadcasting shares it: nothing of size (2N, N) is built, memory is bounded by the budget;
* **vmap** — PyTorch's ``torch.func.vmap`` or JAX's ``jax.jit(jax.vmap(...))`` of the cost
  written for one point, mapped over the chunk's rows;
* **loop** — one row per call (the notebook's algorithm) in one reused vector, one element
  perturbed in place per row.

A batched path is used only after it is *verified* on this cost: a small probe (2 rows)
first, then the first full chunk, each compared with the same rows evaluated one at a time
(``AGREEMENT_ULPS``). The largest discrepancy accepted is recorded (``Path.discrepancy``) so
the error bars can include it. ``mode="stacked"`` verifies too and raises CostError where
the cost does not broadcast; ``mode="unverified"`` (engine-internal: tests, benchmarks) is
the stacked path without verification.

Every array the cost receives is the check's own: rows are refilled for every call, and the
unbatched tensors and array args are private copies compared with the originals after each
pass; a cost that wrote into them is evaluated again with fresh copies for every call.

The engine knows nothing of models or of checking; it sees a cost, arrays and rows.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
from array_api_compat import device

from .backends import to_host
from .errors import CostError, InputError
from .params import Layout

__all__ = [
    "AGREEMENT_ULPS",
    "CACHE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "MODES",
    "PATHS",
    "VMAP_ROWS",
    "WHOLE_ROWS",
    "Chunk",
    "Path",
    "RowGroup",
    "Runner",
    "Stencil",
    "ThreadRunner",
    "can_vmap",
    "central_differences",
    "choose_path",
    "chunk_bounds",
    "contract",
    "coordinate_rows",
    "direction_rows",
    "evaluate_center",
    "evaluate_chunk",
    "evaluate_rows",
    "path_of",
    "row_group",
    "stencil_costs",
    "worker_count",
]

MODES = ("auto", "stacked", "vmap", "loop")
"""How check() may evaluate the rows: ``auto`` (the fastest path verified for this cost),
``stacked`` (broadcast only, verified, CostError otherwise), ``vmap`` (PyTorch/JAX only),
``loop`` (one call per row). The engine also takes ``unverified``: broadcast, trusted."""
PATHS = ("broadcast", "vmap", "loop")
AGREEMENT_ULPS = 64.0
"""Batched and single evaluations of a row must agree within AGREEMENT_ULPS·eps·(|J_b| + |J_s|).

Legitimate re-association (a batched GEMM blocks its sums differently) moves J by a few
ulps of the terms summed: README's bound 4·eps·(max|J| + S), S the sum of |terms|, which a
black-box cost does not reveal. 64 ulps of |J| admits S up to ~16·|J|; a cost that does not
broadcast (a sum over all B copies, an outer product) is off by O(|J|), 10^13 times more.
A legitimate cost refused here only runs slower (the loop); one accepted is off by at most
the discrepancy measured, which the error bars then include (``Path.discrepancy``)."""
DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of perturbed parameter copies one stacked call may hold (256 MiB)."""
MAX_CHUNK_ROWS = 64
"""Rows per stacked call, at most: beyond this, batched GEMMs stop getting faster and the
activations (which grow with the batch too) stop fitting in cache. Measured on the L model
of bench/run.py (2-core Xeon, 2 MiB L2): rows perturbing W1 cost ~0.5 ms each in calls of
16 to 64 rows, ~0.85 ms in calls of 256; rows perturbing b1 0.13 ms against 0.16 ms."""
CACHE_BYTES = 8 * 2**20
"""Perturbed copies per stacked call, at most (with at least MIN_CHUNK_ROWS rows): the
copies of a large tensor are read once by the first GEMM and should still be in cache."""
MIN_CHUNK_ROWS = 8
TUNE_MIN_ROWS = 2048
"""A tensor with at least this many rows, on a library that computes on the host, has its
rows per call measured rather than fixed (see ``_tuned_sizes``)."""
TUNE_SIZES = (4, 8, 16, 32, 64, 128, 256)
TUNE_CALLS = 2
WHOLE_ROWS = 256
VMAP_ROWS = 512
"""Rows per vmapped call, at most (and within the memory budget): vmap's per-call overhead
(tracing the cost's Python once per call, batching rules) is what a vmapped check costs,
so its calls are larger than broadcast's; JAX pads every call to this size, so jit
compiles once per tensor."""
"""A θ whose stencil has at most this many rows is done in ONE call with every tensor
batched (the seed case: 94 or 188 rows), where per-call overhead dominates."""


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


@dataclass(frozen=True)
class Path:
    """How a row group is evaluated, and why.

    ``name`` is ``"broadcast"``, ``"vmap"`` or ``"loop"``; ``reason`` says why the faster
    paths were not taken ("" when none was refused); ``discrepancy`` is the largest
    |J_batched − J_single| seen while verifying (0 when bitwise equal, or not batched);
    ``fresh`` means every call gets fresh copies of every input (the cost writes into them);
    ``verified`` that batched calls are checked against single calls (every new batch size:
    a cost may broadcast by coincidence at one size, e.g. a batch as long as the examples).
    """

    name: str
    reason: str = ""
    discrepancy: float = 0.0
    fresh: bool = False
    verified: bool = False


BROADCAST = Path("broadcast")

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


Runner = Callable[[Stencil, list[Chunk], "Callable[[int], Any] | None"], list[Any]]
"""runner(stencil, chunks, progress) → the costs of each chunk, in order: (stop - start,)
arrays of the check's namespace and device, each equal to ``evaluate_chunk(stencil, chunk)``.
It evaluates them elsewhere (``gcbackend.distributed``: on a Dask cluster) and tells
``progress(rows)`` of each chunk done."""


class RowGroup(NamedTuple):
    """The rows of one tensor (or of all at once) as ``evaluate_rows`` takes them.

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


def chunk_rows(
    n_rows: int, size: int, itemsize: int, memory_budget: int, name: str, most: int = MAX_CHUNK_ROWS
) -> int:
    """How many rows of a size-``size`` tensor one stacked call may hold: at most ``most``,
    as many copies as fit CACHE_BYTES (but MIN_CHUNK_ROWS), and always within the budget."""
    row_bytes = size * itemsize
    if memory_budget < row_bytes:
        raise InputError(
            f"memory_budget={memory_budget} bytes is too small for one perturbed copy of "
            f"parameter {name!r} ({size} elements × {itemsize} bytes); pass at least "
            f"memory_budget={row_bytes}"
        )
    cache = max(MIN_CHUNK_ROWS, CACHE_BYTES // row_bytes)
    return max(1, min(n_rows, most, cache, memory_budget // row_bytes))


def chunk_bounds(
    n_rows: int, size: int, itemsize: int, memory_budget: int, name: str, most: int = MAX_CHUNK_ROWS
) -> list[tuple[int, int]]:
    """The (start, stop) of every stacked call over ``n_rows`` rows: one place decides them,
    so a runner's chunks are exactly the local ones (and so are their floating-point ops)."""
    step = chunk_rows(n_rows, size, itemsize, memory_budget, name, most)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _call(cost, params, args, *, name, start, stop, stacked, shape=()):
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


def _as_costs(out: Any, expected: tuple[int, ...], *, xp, name, start, stop, stacked, shape=()) -> Any:
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
            out = xp.asarray(out, dtype=xp.float64)
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
    # A copy where rows live in a reused buffer: a cost may return a view of its inputs.
    return xp.asarray(out, copy=True) if _reuses(xp) else out


def evaluate_rows(
    stencil: Stencil,
    group: RowGroup,
    path: Path,
    *,
    xp: ModuleType,
    start: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
) -> Any:
    """Costs J(flat + D_r) for rows r in [start, n_rows) of ``group`` by ``path``, shape (n_rows - start,).

    Batched paths: ⌈rows / B⌉ calls, B from ``memory_budget`` (measured, for many rows on a
    host library: see ``_tuned_sizes``). Loop: one call per row, told to ``progress`` by
    blocks. Raises CostError if the cost raises or returns the wrong shape.
    """
    n_rows, size = group.n_rows, group.flat.shape[0]
    costs = []
    if path.name == "loop":
        step = max(1, group.most if group.tensor is None else MAX_CHUNK_ROWS)
        for first in range(start, n_rows, step):
            stop = min(first + step, n_rows)
            costs.append(_looped(stencil, group, first, stop, xp=xp, fresh=path.fresh))
            if progress is not None:
                progress(stop - first)
        return _joined(costs, xp)
    itemsize = xp.finfo(group.flat.dtype).bits // 8
    static = chunk_rows(
        n_rows, size, itemsize, memory_budget, group.name, group.most
    )  # validates the budget too
    seconds: list[float] = []
    if path.name == "vmap":
        sizes = itertools.repeat(_vmap_rows(group, memory_budget, xp))
    elif n_rows - start >= TUNE_MIN_ROWS and _timed_on_host(xp, group.flat):
        sizes = _tuned_sizes(min((n_rows - start) // 4, memory_budget // (size * itemsize)), seconds, static)
    else:
        sizes = itertools.repeat(static)
    while start < n_rows:
        stop = min(start + next(sizes), n_rows)
        began = time.perf_counter()
        costs.append(_batched(stencil, group, path, start, stop, xp=xp))
        seconds.append((time.perf_counter() - began) / (stop - start))
        if progress is not None:
            progress(stop - start)
        start = stop
    return _joined(costs, xp)


def _vmap_rows(group: RowGroup, memory_budget: int, xp: ModuleType) -> int:
    row_bytes = group.flat.shape[0] * (xp.finfo(group.flat.dtype).bits // 8)
    return max(1, min(VMAP_ROWS, memory_budget // row_bytes))


def _rest_bounds(
    group: RowGroup, path: Path, start: int, memory_budget: int, xp: ModuleType
) -> list[tuple[int, int]]:
    """The (start, stop) of the calls over rows [start, n_rows) once the path is known."""
    if path.name == "vmap":
        step = _vmap_rows(group, memory_budget, xp)
        return [(first, min(first + step, group.n_rows)) for first in range(start, group.n_rows, step)]
    itemsize = xp.finfo(group.flat.dtype).bits // 8
    rest = chunk_bounds(
        group.n_rows - start, group.flat.shape[0], itemsize, memory_budget, group.name, group.most
    )
    return [(start + a, start + b) for a, b in rest]


def _joined(costs: list[Any], xp: ModuleType) -> Any:
    return costs[0] if len(costs) == 1 else xp.concat(costs)


def _timed_on_host(xp: ModuleType, array: Any) -> bool:
    """Whether a wall clock around a cost call measures its work: NumPy, and PyTorch on the
    CPU, compute eagerly on the host. A GPU library returns before its kernels finish (and
    wants the largest batch anyway); the other namespaces are not used for speed."""
    if array_api_compat.is_numpy_namespace(xp):
        return True
    return array_api_compat.is_torch_namespace(xp) and str(device(array)) == "cpu"


def _tuned_sizes(limit: int, seconds: list[float], static: int) -> Iterator[int]:
    """Rows per stacked call, chosen by measuring: the caller appends each call's seconds
    per row to ``seconds`` before asking for the next size.

    The fastest batch cannot be predicted from sizes alone. Larger batches make larger,
    faster GEMMs, until the cost's temporaries outgrow what the allocator keeps: with
    glibc's malloc, freed blocks of a few hundred KiB go back to the OS and page-fault in
    again at every call (~1.4 µs a page on the 2-core VM of bench/run.py). On its M model
    (64-32-16-1, m = 128) the whole check took 138 ms at 8 rows per call and 298 ms at 12,
    with 88,000 page faults against 250. So the first calls over a tensor with many rows
    try TUNE_SIZES in turn (TUNE_CALLS calls each, the fastest counts, stopping once a size
    is 25 % slower than the best so far), and the rest go at the fastest. Trial calls are
    real rows, so nothing is evaluated twice; trials use at most ``limit`` rows in all (a
    quarter of the tensor's rows, and the memory budget caps every size). The results do
    not depend on the batch size: each row's cost is computed on its own. (Since check()
    primes glibc's malloc, see ``backends.prime_host_allocator``, that knee mostly moves
    beyond TUNE_SIZES there; the trials still find it with other allocators.)
    """
    trials, used = [], 0
    for size in TUNE_SIZES:
        used += TUNE_CALLS * size
        if size > limit or used > limit:
            break
        trials.append(size)
    best, best_rate = static, math.inf
    for size in trials if len(trials) >= 2 else ():  # too few rows to try: the fixed rule
        rate = math.inf
        for _ in range(TUNE_CALLS):
            yield size
            rate = min(rate, seconds[-1])
        if rate < best_rate:
            best, best_rate = size, rate
        elif rate > 1.25 * best_rate:
            break
    yield from itertools.repeat(best)


def _batched(stencil: Stencil, group: RowGroup, path: Path, start: int, stop: int, *, xp: ModuleType) -> Any:
    """One batched call (broadcast or vmap): the costs of rows [start, stop), shape (stop - start,).

    On a verified path, the first call of every batch size not seen yet in this group has its
    first row compared with a single call; a disagreement raises ``_Mismatch``."""
    costs = _batch_call(stencil, group, path.name, group.rows(start, stop), start, stop, xp=xp)
    sizes = None if group.memo is None or not path.verified else group.memo.setdefault("sizes", set())
    if sizes is not None and stop - start not in sizes:
        single = _looped(stencil, group, start, start + 1, xp=xp, fresh=False)
        batched_value, single_value = to_host(
            xp.stack([xp.astype(costs[0], single.dtype), single[0]])
        ).tolist()
        if not _agree(batched_value, single_value, float(xp.finfo(single.dtype).eps)):
            where = group.describe(start)
            reason = (
                f"batched values differ from single calls at {where}: {batched_value:.10g} (batch of "
                f"{stop - start}) vs {single_value:.10g}"
            )
            error = CostError(
                f"parameter {group.name!r} of shape {group.shape}: the cost's {path.name} values differ "
                f"from single calls at {where}: {batched_value:.10g} in a batch of {stop - start} rows, "
                f"{single_value:.10g} alone. "
                + (contract(group.name, group.shape) if path.name == "broadcast" else "Use mode='loop'.")
            )
            raise _Mismatch(group.tensor, reason, error)
        sizes.add(stop - start)
    return costs


class _Mismatch(Exception):
    """A verified batched path disagreed with a single call at a new batch size."""

    def __init__(self, tensor: str | None, reason: str, error: CostError) -> None:
        super().__init__(tensor, reason, error)
        self.tensor, self.reason, self.error = tensor, reason, error


def _agree(batched_value: float, single_value: float, eps: float) -> bool:
    """Whether a batched and a single evaluation agree within AGREEMENT_ULPS (NaN agrees with NaN)."""
    if batched_value == single_value or (math.isnan(batched_value) and math.isnan(single_value)):
        return True
    return abs(batched_value - single_value) <= AGREEMENT_ULPS * eps * (
        abs(batched_value) + abs(single_value)
    )


def _batch_call(stencil, group, name, points, start, stop, *, xp):
    """The costs of the rows ``points`` (some of rows [start, stop), named so in errors)."""
    count = points.shape[0]
    if name == "vmap":
        memo = {} if group.memo is None else group.memo
        mapped = memo.get("vmap")
        if mapped is None:
            mapped = memo["vmap"] = _vmapped(stencil, group, xp)
        padded = memo.get("rows", 0)
        if array_api_compat.is_jax_namespace(xp) and count < padded:
            # One shape per tensor, so jit compiles once: repeat the last row, drop its costs.
            filler = xp.broadcast_to(points[-1:, ...], (padded - count, points.shape[1]))
            points = xp.concat([points, filler])
        memo["rows"] = max(padded, points.shape[0])
        try:
            out = mapped(points)
            out = out[:count] if points.shape[0] > count else out
        except Exception as exc:
            raise CostError(
                f"the cost raised {type(exc).__name__} under vmap: {exc} (at rows {start}..{stop - 1} "
                f"perturbing parameter {group.name!r}). Pass mode='auto' or mode='loop'."
            ) from exc
        return _as_costs(out, (count,), xp=xp, name=group.name, start=start, stop=stop, stacked=False)
    params = group.batched(points)
    out = _call(
        stencil.cost,
        params,
        stencil.args,
        name=group.name,
        start=start,
        stop=stop,
        stacked=True,
        shape=group.shape,
    )
    return _as_costs(
        out, (count,), xp=xp, name=group.name, start=start, stop=stop, stacked=True, shape=group.shape
    )


def can_vmap(xp: ModuleType) -> bool:
    """Whether the library maps a function over a batch axis itself: PyTorch and JAX."""
    return array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp)


_JITTED: dict[tuple, Any] = {}
"""JAX: jit(vmap(cost)) per (cost, tensor, layout, non-array args), so a second check of the
same cost compiles nothing; the parameters and array args are arguments, not constants."""
_JITTED_MOST = 32


def _vmapped(stencil: Stencil, group: RowGroup, xp: ModuleType) -> Callable[[Any], Any]:
    """The cost of one point, mapped over the rows of a (B, n) stack by the library."""
    cost, args, single = stencil.cost, stencil.args, group.single
    if array_api_compat.is_torch_namespace(xp):
        from torch.func import vmap

        return vmap(lambda row: cost(single(row), *args))
    import jax

    tensor, layout, shape = group.tensor, stencil.layout, group.shape
    arrays = [i for i, a in enumerate(args) if _is_backend_array(a, xp)]
    others = tuple((i, id(a)) for i, a in enumerate(args) if i not in arrays)
    key = (cost, tensor, layout, others)
    try:
        mapped = _JITTED.get(key)
    except TypeError:  # an unhashable callable object: compiled for this check only
        key, mapped = None, None
    if mapped is None:
        fixed = {i: a for i, a in enumerate(args) if i not in arrays}

        def one(row, parts, given):
            values = dict(zip(arrays, given))
            full = [values[i] if i in values else fixed[i] for i in range(len(args))]
            return cost(layout.wrap({**parts, tensor: xp.reshape(row, shape)}), *full)

        mapped = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
        if key is not None:
            if len(_JITTED) >= _JITTED_MOST:
                _JITTED.pop(next(iter(_JITTED)))
            _JITTED[key] = mapped
    parts = dict(stencil.parts)
    given = tuple(args[i] for i in arrays)
    return lambda points: mapped(points, parts, given)


def _looped(stencil: Stencil, group: RowGroup, start: int, stop: int, *, xp: ModuleType, fresh: bool) -> Any:
    """Rows [start, stop) one call each, shape (stop - start,).

    On NumPy, CuPy and PyTorch one vector is reused: each row writes its element, calls the
    cost on views of the vector (built once), and writes the element back: no per-row
    allocation and no per-row device sync (the values come to the host once). Elsewhere (and
    for direction rows) each row is built on its own. ``fresh``: every call gets fresh copies
    of every array (a cost that writes into its inputs). A cost that wrote into the vector is
    caught at the end (one comparison) and raises ``_Scribbled``.
    """
    cost, args, name = stencil.cost, stencil.args, group.name
    costs: list[Any] = []
    kind = None  # the type of the first row's result, once validated: the rest are checked cheaply
    reuses = _reuses(xp)

    def collect(out: Any, r: int) -> None:
        nonlocal kind
        if type(out) is not kind or out.shape != ():
            raw = type(out)
            out = _as_costs(out, (), xp=xp, name=name, start=r, stop=r + 1, stacked=False)
            kind = raw if hasattr(raw, "shape") else None  # a Python float is converted every time
        elif reuses and not isinstance(out, float):  # (NumPy's float64 scalars are floats: immutable)
            out = xp.asarray(out, copy=True)  # a cost may return a view of the reused vector
        costs.append(out)

    if fresh or group.points is None or not _in_place(xp):
        for r in range(start, stop):
            point = xp.asarray(group.rows(r, r + 1)[0, ...], copy=True)
            params, call_args = (
                _fresh_inputs(stencil, group, point, xp) if fresh else (group.single(point), args)
            )
            collect(_call(cost, params, call_args, name=name, start=r, stop=r + 1, stacked=False), r)
        return xp.stack(costs)
    positions, values, originals = group.points(start, stop)
    vector = xp.asarray(group.flat, copy=True)
    for position, value, original, r in zip(positions, values, originals, range(start, stop)):
        vector[position] = value
        # A new container each call (of views of the vector, which see every write): a cost
        # that rebinds an entry (params["W"] = np.array(params["W"])) must not hand that
        # stale array to the next call, as the notebook's fresh dict per row never does.
        params = group.single(vector)
        collect(_call(cost, params, args, name=name, start=r, stop=r + 1, stacked=False), r)
        vector[position] = original  # after collect: the result may be a view of the vector
    if not bool(xp.all(vector == group.flat)):
        raise _Scribbled
    return xp.stack(costs)


class _Scribbled(Exception):
    """The cost wrote into the arrays it received: the pass is redone with fresh copies."""


def _in_place(xp: ModuleType) -> bool:
    """Libraries whose reshaped slices are views, written in place cheaply: NumPy, CuPy, PyTorch."""
    return (
        array_api_compat.is_numpy_namespace(xp)
        or array_api_compat.is_cupy_namespace(xp)
        or array_api_compat.is_torch_namespace(xp)
    )


def _copied(value: Any, xp: ModuleType) -> Any:
    return xp.asarray(value, copy=True) if _is_backend_array(value, xp) else value


def _is_backend_array(value: Any, xp: ModuleType) -> bool:
    return (
        array_api_compat.is_array_api_obj(value)
        and not isinstance(value, (bool, int, float, complex))
        and array_api_compat.array_namespace(value) is xp
    )


def _fresh_inputs(stencil: Stencil, group: RowGroup, point: Any, xp: ModuleType) -> tuple[Any, tuple]:
    """Params at ``point`` and args, every array a fresh copy (for a cost that writes into them)."""
    args = tuple(_copied(a, xp) for a in stencil.args)
    if group.tensor is None:
        return group.single(point), args
    parts = {name: xp.asarray(p, copy=True) for name, p in stencil.parts.items()}
    parts[group.tensor] = xp.reshape(point, tuple(stencil.parts[group.tensor].shape))
    return stencil.layout.wrap(parts), args


def evaluate_chunk(
    stencil: Stencil, chunk: Chunk, *, xp: ModuleType, groups: dict[str | None, RowGroup] | None = None
) -> Any:
    """The costs of one chunk of a stencil's rows, shape (stop - start,): what a worker runs.

    It rebuilds the rows from (tensor, start, stop) with the same code and the same
    operations as the local pass, by the path chosen on the driver (``stencil.paths``), so
    on the same library the costs are bitwise the local ones. ``groups`` (tensor →
    RowGroup), when given, keeps the row groups from one chunk to the next, and with them
    their row buffers. Raises CostError like ``evaluate_rows``.
    """
    tensor, start, stop = chunk
    if groups is None:
        group = row_group(stencil, tensor, xp=xp)
    else:
        if tensor not in groups:
            groups[tensor] = row_group(stencil, tensor, xp=xp)
        group = groups[tensor]
    path = path_of(stencil.paths, tensor)
    if path.name == "loop":
        return _looped(stencil, group, start, stop, xp=xp, fresh=path.fresh)
    return _batched(stencil, group, path, start, stop, xp=xp)


def path_of(paths: Mapping[str | None, Path] | None, tensor: str | None) -> Path:
    """The path of ``tensor``'s rows: its own, else the whole-θ group's, else broadcast."""
    if not paths:
        return BROADCAST
    return paths.get(tensor) or paths.get(None) or BROADCAST


def worker_count(workers: int) -> int:
    """``workers`` threads, or every CPU this process may use for ``workers=-1``."""
    if workers != -1:
        return workers
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(available) if available else os.cpu_count() or 1


class ThreadRunner:
    """A ``Runner`` that evaluates the chunks on ``workers`` threads of this process, each by
    the path chosen for its tensor (a loop chunk's rows one call each: the cost is then
    called from several threads at once).

    NumPy computes elementwise operations on one core and releases the GIL while it does;
    the stacked forward of a small network is mostly such operations (bias, ReLU, the
    loss), so on a machine with k cores the chunks run up to k times faster side by side.
    BLAS is held to one thread per call meanwhile (threadpoolctl), so the threads do not
    oversubscribe the cores, and restored afterwards. Each thread keeps its own row groups,
    so its row buffer is reused from chunk to chunk; a chunk's rows and operations are the
    local pass's, so the costs are too (bitwise on NumPy, where OpenBLAS splits a GEMM
    across threads without splitting its dot products). ``progress`` is told in chunk
    order, from the calling thread. The first failing chunk (in chunk order) raises its
    CostError here, and the chunks not yet started are cancelled. A lone chunk runs in the
    calling thread, as it would without a runner.
    """

    def __init__(self, workers: int, xp: ModuleType) -> None:
        self.workers, self.xp = workers, xp

    def __call__(
        self, stencil: Stencil, chunks: list[Chunk], progress: Callable[[int], Any] | None
    ) -> list[Any]:
        local = threading.local()

        def run(chunk: Chunk) -> Any:  # each thread keeps its own row groups and buffers
            return evaluate_chunk(stencil, chunk, xp=self.xp, groups=local.__dict__.setdefault("groups", {}))

        if len(chunks) == 1 or self.workers == 1:
            return [_told(run(chunk), chunk, progress) for chunk in chunks]
        from threadpoolctl import threadpool_limits

        pool = ThreadPoolExecutor(min(self.workers, len(chunks)), thread_name_prefix="gcbackend")
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                futures = [pool.submit(run, chunk) for chunk in chunks]
                return [_told(future.result(), chunk, progress) for future, chunk in zip(futures, chunks)]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _told(costs: Any, chunk: Chunk, progress: Callable[[int], Any] | None) -> Any:
    if progress is not None:
        progress(chunk[2] - chunk[1])
    return costs


def evaluate_center(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    xp: ModuleType,
) -> Any:
    """J(θ) itself, as a 0-d array, with the same error handling as the perturbed rows.

    The cost gets copies of the parameters (in the user's structure, any tree) and of the
    array args: the check's own stay pristine for every later row."""
    params = layout.wrap({name: _copied(value, xp) for name, value in parts.items()})
    args = tuple(_copied(a, xp) for a in args)
    out = _call(cost, params, args, name="(none: J at θ)", start=0, stop=1, stacked=False)
    value = _as_costs(out, (), xp=xp, name="(none: J at θ)", start=0, stop=1, stacked=False)
    if not bool(xp.isfinite(value)):  # one sync per check: every difference would be meaningless
        raise CostError(
            f"the cost is {float(value)} at θ itself, before any step: there is nothing to compare "
            "the gradients with; check the cost at these parameters and args (a log of 0, a "
            "division by 0, an overflow)"
        )
    return value


class _Refused(Exception):
    """A batched path does not hold for this cost: ``reason`` (one line) and ``error``."""

    def __init__(self, reason: str, error: CostError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


def choose_path(
    stencil: Stencil, group: RowGroup, stop: int, *, xp: ModuleType, requested: str
) -> tuple[Path, Any]:
    """The path for ``group``'s rows, decided on its first chunk, rows [0, stop), and their costs.

    ``requested``: ``"auto"`` tries broadcast, then vmap (PyTorch, JAX), then loops;
    ``"stacked"`` / ``"vmap"`` try only that path and raise CostError when it fails
    verification; ``"loop"`` loops. A batched path is verified: a probe of 2 rows (the
    first and last of the chunk) so a cost that builds B×B intermediates or fails does so
    small and fast, those rows evaluated singly, then the full chunk, whose first and last
    rows must agree with the singles too (within AGREEMENT_ULPS). A CostError raised by a
    single evaluation is the cost's own error and is raised whatever the mode.
    """
    if requested == "loop":
        return Path("loop", "mode='loop'"), _looped(stencil, group, 0, stop, xp=xp, fresh=False)
    candidates = {"auto": ("broadcast", "vmap"), "stacked": ("broadcast",), "vmap": ("vmap",)}[requested]
    if group.tensor is None or not can_vmap(xp):
        candidates = tuple(c for c in candidates if c != "vmap")
    if requested == "vmap" and not candidates:
        raise CostError(
            f"mode='vmap' needs PyTorch or JAX (torch.func.vmap, jax.vmap); the check runs on "
            f"{xp.__name__}. Use mode='auto' (the default) or mode='loop'"
        )
    picks = sorted({0, stop - 1})
    singles: list[Any] = []
    reasons = []
    for name in candidates:
        try:
            costs, discrepancy = _verified(stencil, group, name, picks, stop, singles, xp=xp)
        except _Refused as refused:
            if requested != "auto":
                raise refused.error from refused.error.__cause__
            reasons.append(f"{name}: {refused.reason}")
            continue
        if group.memo is not None:
            group.memo["sizes"] = {stop} | ({len(picks)} if name == "broadcast" else set())
        return Path(name, "; ".join(reasons), discrepancy, verified=True), costs
    return Path("loop", "; ".join(reasons)), _looped(stencil, group, 0, stop, xp=xp, fresh=False)


def _verified(stencil, group, name, picks, stop, singles, *, xp):
    """The costs of rows [0, stop) by batched path ``name``, verified against single calls."""

    def single_costs() -> list[Any]:
        if not singles:  # evaluated once, shared by the candidates
            singles.extend(_looped(stencil, group, r, r + 1, xp=xp, fresh=False) for r in picks)
        return singles

    def attempt(points, start, last):
        try:
            return _batch_call(stencil, group, name, points, start, last, xp=xp)
        except CostError as error:
            single_costs()  # a cost that fails on one point too: its own error, raised as such
            cause = error.__cause__
            what = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
            raise _Refused(_first_line(what), error) from None

    # vmap maps the cost over rows one by one (no B×B intermediates to fear): no probe.
    found = []
    if name == "broadcast":
        probe_points = xp.concat([xp.asarray(group.rows(r, r + 1), copy=True) for r in picks])
        probe = attempt(probe_points, 0, len(picks))
        found.append(probe)
    if stop > len(picks) or not found:
        full = attempt(group.rows(0, stop), 0, stop)
        found.append(xp.stack([full[0], full[stop - 1]]))
        costs = full
    else:
        costs = probe
    reference = xp.concat([xp.reshape(s, (1,)) for s in single_costs()])
    values = to_host(
        xp.stack([xp.astype(xp.concat(found), reference.dtype), xp.concat([reference] * len(found))])
    )
    batched_values, single_values = values.tolist()
    eps = float(xp.finfo(reference.dtype).eps)
    worst = 0.0
    for i, (b, s) in enumerate(zip(batched_values, single_values)):
        if b == s or (math.isnan(b) and math.isnan(s)):
            continue
        gap = abs(b - s)
        if not _agree(b, s, eps):
            r = picks[i % len(picks)]
            size = len(picks) if i < len(picks) else stop
            reason = (
                f"batched values differ from single calls at {group.describe(r)}: {b:.10g} (batch of "
                f"{size}) vs {s:.10g}"
            )
            error = CostError(
                f"parameter {group.name!r} of shape {group.shape}: the cost's {name} values differ from "
                f"single calls at {group.describe(r)}: {b:.10g} evaluated in a batch of {size} rows, "
                f"{s:.10g} alone, so the batched values cannot be trusted. "
                + (
                    contract(group.name, group.shape)
                    if name == "broadcast"
                    else "Use mode='auto' or mode='loop'."
                )
            )
            raise _Refused(reason, error)
        worst = max(worst, gap)
    return costs, worst


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else str(text)
    return line if len(line) <= 160 else line[:157] + "..."


def _scatters(xp: ModuleType) -> bool:
    """Whether ``xpx.at(x)[rows, cols]`` can write integer-array indices (in place, or as
    JAX's functional ``.at``). The standard has no such assignment (array-api-strict
    refuses it); those namespaces get rows built from ``one_hot`` instead."""
    return (
        array_api_compat.is_numpy_namespace(xp)
        or array_api_compat.is_cupy_namespace(xp)
        or array_api_compat.is_torch_namespace(xp)
        or array_api_compat.is_jax_namespace(xp)
    )


def _reuses(xp: ModuleType) -> bool:
    """Whether rows can be written into the previous call's buffer: the libraries with
    in-place integer scatter (JAX's arrays are immutable). The costs are then copied out
    of every call, in case the cost returned a view of its inputs."""
    return _scatters(xp) and not array_api_compat.is_jax_namespace(xp)


def _coordinates(steps: Any, multipliers: tuple[float, ...], elements: Any, xp: ModuleType):
    """(n, device, the elements that get rows (all by default), their count, the multipliers as
    an array): what coordinate rows are built from, shared by ``coordinate_rows`` and ``_points``."""
    size = steps.shape[0]
    where = device(steps)
    if elements is None:
        elements = xp.arange(size, device=where)
    return size, where, elements, elements.shape[0], xp.asarray(multipliers, dtype=steps.dtype, device=where)


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
    size, where, elements, chosen, factors = _coordinates(steps, multipliers, elements, xp)
    scatter, reuse = _scatters(xp), _reuses(xp)
    held: list[Any] = []  # the (B, n) buffer of the previous call, where it can be reused

    def rows(start: int, stop: int) -> Any:
        count = stop - start
        index = xp.arange(start, stop, device=where)
        element = xp.take(elements, index % chosen)
        scale = xp.take(factors, index // chosen) * xp.take(steps, element)
        if not scatter:
            return flat[None, :] + xpx.one_hot(element, size, dtype=steps.dtype, xp=xp) * scale[:, None]
        at = (xp.arange(count, device=where), element)
        values = xp.take(flat, element) + scale
        if held and held[0].shape[0] >= count:
            # Refill the previous call's buffer (all of it, so a cost that wrote into its
            # inputs cannot leak into these rows): memory already touched, where fresh
            # rows page-fault in at every call. On the L model of bench/run.py a row of
            # W1 (256 KiB) took ~90 µs to fault in and ~15 µs to refill.
            points = held[0][:count, ...]
            points[...] = flat
            return xpx.at(points, at).set(values, copy=False, xp=xp)
        # tile, not asarray(broadcast_to(...), copy=True): NumPy copies a broadcast view in
        # its own stride order, which is Fortran order here, and the GEMMs reading these
        # rows then ran ~2x slower (measured on the L model of bench/run.py).
        points = xpx.at(xp.tile(flat[None, :], (count, 1)), at).set(values, xp=xp)
        if reuse:
            held[:] = [points]
        return points

    return rows, len(multipliers) * chosen


def direction_rows(
    flat: Any, directions: Any, multipliers: tuple[float, ...], *, xp: ModuleType
) -> tuple[Rows, int]:
    """rows(start, stop) of θ + [m_1·U; m_2·U; …] for k directions U of shape (k, n) (steps included)."""
    count = directions.shape[0]
    factors = xp.asarray(multipliers, dtype=directions.dtype, device=device(directions))

    def rows(start: int, stop: int) -> Any:
        index = xp.arange(start, stop, device=device(directions))
        scale = xp.take(factors, index // count)
        return flat[None, :] + xp.take(directions, index % count, axis=0) * scale[:, None]

    return rows, len(multipliers) * count


def _points(flat: Any, steps: Any, multipliers: tuple[float, ...], *, xp: ModuleType, elements: Any = None):
    """points(start, stop) → (positions, values, originals) of coordinate rows [start, stop): the
    flat position each row moves, its value there (θ_j + m·h_j, the same operations as
    ``coordinate_rows``, so bitwise its rows) and θ_j, as host lists: one transfer per group."""
    _, where, elements, chosen, factors = _coordinates(steps, multipliers, elements, xp)
    held: list[Any] = []

    def points(start: int, stop: int) -> tuple[list[int], list[float], list[float]]:
        if not held:
            index = xp.arange(0, len(multipliers) * chosen, device=where)
            element = xp.take(elements, index % chosen)
            scale = xp.take(factors, index // chosen) * xp.take(steps, element)
            original = xp.take(flat, element)
            values = original + scale
            held.append(to_host(xp.stack([xp.astype(element, values.dtype), values, original])).tolist())
        positions, values, originals = held[0]
        return [int(p) for p in positions[start:stop]], values[start:stop], originals[start:stop]

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
        flat = int(to_host(elements)[i]) if elements is not None else i
        if tensor is None:
            k = max(j for j, offset in enumerate(layout.offsets) if offset <= flat)
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
        flat = layout.flatten(layout.wrap(parts), xp=xp)
        flat_steps = layout.flatten(layout.wrap(steps), xp=xp)
        rows, n_rows = coordinate_rows(flat, flat_steps, multipliers, xp=xp)
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
        )
    base = parts[tensor]
    shape = tuple(base.shape)

    def batched(batch):
        return layout.wrap({**parts, tensor: xp.reshape(batch, (batch.shape[0], *shape))})

    def single(vector):
        return layout.wrap({**parts, tensor: xp.reshape(vector, shape)})

    flat = xp.reshape(base, (-1,))
    if stencil.directions is not None:
        rows, n_rows = direction_rows(flat, stencil.directions[tensor], multipliers, xp=xp)
        points = None
        describe = _describer(layout, tensor, multipliers, None, True, n_rows // len(multipliers))
    else:
        chosen = None if stencil.elements is None else stencil.elements[tensor]
        flat_steps = xp.reshape(steps[tensor], (-1,))
        rows, n_rows = coordinate_rows(flat, flat_steps, multipliers, xp=xp, elements=chosen)
        points = _points(flat, flat_steps, multipliers, xp=xp, elements=chosen)
        describe = _describer(layout, tensor, multipliers, chosen, False, n_rows // len(multipliers))
    return RowGroup(
        flat, rows, n_rows, batched, single, tensor, MAX_CHUNK_ROWS, tensor, shape, points, describe, {}
    )


def _group_costs(
    stencil: Stencil,
    tensors: tuple[str | None, ...],
    *,
    xp: ModuleType,
    mode: str,
    memory_budget: int,
    progress: Callable[[int], Any] | None,
    runner: Runner | None,
    paths: dict[str | None, Path],
) -> dict[str | None, Any]:
    """tensor → the costs of all its rows, (n_rows,). Locally one tensor after the other; a
    runner gets the chunks of ALL the tensors in one list, so a cluster runs them together.

    A tensor without a path in ``paths`` gets one (``choose_path``) on its first chunk,
    here, before any runner sees its chunks; the runner's stencil carries the paths."""
    groups = {tensor: row_group(stencil, tensor, xp=xp) for tensor in tensors}
    bounds = {
        tensor: chunk_bounds(
            group.n_rows,
            group.flat.shape[0],
            xp.finfo(group.flat.dtype).bits // 8,
            memory_budget,
            group.name,
            group.most,
        )
        for tensor, group in groups.items()
    }
    first: dict[str | None, Any] = {}
    for tensor, group in groups.items():
        if mode == "unverified":
            paths.setdefault(tensor, BROADCAST)
        elif tensor not in paths:
            stop = bounds[tensor][0][1]
            requested = "stacked" if tensor is None else mode
            paths[tensor], first[tensor] = choose_path(stencil, group, stop, xp=xp, requested=requested)
            if progress is not None:
                progress(stop)
    stencil = replace(stencil, paths={tensor: paths[tensor] for tensor in tensors})
    for tensor, head in first.items():
        bounds[tensor] = _rest_bounds(groups[tensor], paths[tensor], head.shape[0], memory_budget, xp)
    if runner is None:
        out = {}
        for tensor, group in groups.items():
            head = first.get(tensor)
            start = 0 if head is None else head.shape[0]
            rest = (
                evaluate_rows(
                    stencil,
                    group,
                    paths[tensor],
                    xp=xp,
                    start=start,
                    memory_budget=memory_budget,
                    progress=progress,
                )
                if start < group.n_rows
                else None
            )
            pieces = [p for p in (head, rest) if p is not None]
            out[tensor] = _joined(pieces, xp)
        return out
    chunks = [(tensor, start, stop) for tensor in groups for start, stop in bounds[tensor]]
    results = runner(stencil, chunks, progress) if chunks else []
    out = {}
    for tensor in groups:
        pieces = [first[tensor]] if tensor in first else []
        pieces += [costs for (owner, _, _), costs in zip(chunks, results) if owner == tensor]
        out[tensor] = _joined(pieces, xp)
    return out


def stencil_costs(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    steps: Mapping[str, Any],
    multipliers: tuple[float, ...],
    xp: ModuleType,
    mode: str = "unverified",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    elements: Mapping[str, Any] | None = None,
    directions: Mapping[str, Any] | None = None,
    runner: Runner | None = None,
    paths: dict[str | None, Path] | None = None,
) -> dict[str, Any]:
    """J(θ + m_k·h_j·e_j) for every multiplier m_k and element j: name → (K, *shape).

    With ``elements`` (name → flat int indices) only those elements get rows and the result
    is name → (K, s). With ``directions`` (name → (k, n) displacements, steps included) the
    rows are m·u instead of coordinate steps and the result is name → (K, k).

    ``steps`` maps each name to h, an array of the tensor's shape. A row differs from θ in
    exactly one element, by exactly m_k·h_j (θ_i + ±0 is θ_i bitwise); with m = ±1 the
    perturbed parameters equal the notebook's ``theta_plus``/``theta_minus`` bit for bit.
    A small θ (all rows fit one stacked call) is done in ONE call with every tensor
    batched, where per-call overhead dominates; otherwise each tensor's rows are evaluated
    with only that tensor batched, so the others are shared by broadcasting and the layers
    before it run once.

    ``mode`` is one of MODES or ``"unverified"`` (broadcast without verification, the
    default here: check() always says what it wants). ``paths`` (tensor → Path, None for
    the whole-θ group) is filled with the path each group takes and read for the groups
    already decided, so a check decides once per tensor; pass the same dict to every call.

    The cost never sees ``parts`` or ``args`` themselves: it gets copies, compared with
    them afterwards (one device sync); a cost that wrote into them has the whole pass
    redone with fresh copies for every call (``Path.fresh``), so no result is computed from
    corrupted inputs.

    ``runner`` evaluates the chunks elsewhere: it receives the Stencil (with the paths) and
    every (tensor, start, stop) chunk at once, and returns their costs in order (see
    ``Runner``); the chunks are the local ones, so are the results.
    """
    paths = {} if paths is None else paths
    n_stencil = len(multipliers)
    dtypes = {p.dtype for p in parts.values()}
    n_total = layout.size
    itemsize = xp.finfo(next(iter(dtypes))).bits // 8
    whole = (
        elements is None
        and directions is None
        and mode in ("auto", "stacked", "unverified")
        and len(dtypes) == 1
        and n_stencil * n_total <= WHOLE_ROWS
        and n_stencil * n_total * n_total * itemsize <= memory_budget
        and not any(p.fresh for p in paths.values())
        and not (len(paths) and None not in paths)  # a check that went per tensor stays so
    )
    mutable = not array_api_compat.is_jax_namespace(xp)
    work_parts = {name: xp.asarray(p, copy=True) for name, p in parts.items()} if mutable else dict(parts)
    work_args = tuple(_copied(a, xp) for a in args) if mutable else args
    stencil = Stencil(cost, work_parts, work_args, layout, steps, multipliers, elements, directions)
    evaluation = dict(xp=xp, mode=mode, memory_budget=memory_budget, progress=progress, runner=runner)
    # A tensor with no elements or directions (a refinement that left it alone) gets no call.
    chosen = elements if elements is not None else directions
    tensors = tuple(name for name in parts if chosen is None or chosen[name].shape[0] > 0)
    try:
        costs = None
        if whole and paths.get(None, BROADCAST).name == "broadcast":
            try:
                costs = _group_costs(stencil, (None,), **evaluation, paths=paths)[None]
            except (CostError, _Mismatch):
                paths.pop(None, None)  # the per-tensor pass below redoes it and names the parameter at fault
        if costs is None:
            per_tensor = _per_tensor(stencil, tensors, evaluation, paths)
        intact = not mutable or _intact(stencil, parts, args, xp)
    except _Scribbled:
        intact = False
    except CostError:
        # A verification that failed because the cost had written into its inputs meanwhile
        # is no verdict on batching: redo it with fresh copies below. Any other error stands.
        if not mutable or _intact(stencil, parts, args, xp):
            raise
        intact = False
    if not intact:
        # The cost wrote into what it received: every call again, with fresh copies of everything.
        reason = "the cost writes into the arrays it receives: every call got fresh copies"
        paths.clear()
        paths.update({name: Path("loop", reason, fresh=True) for name in parts})
        clean = Stencil(cost, dict(parts), args, layout, steps, multipliers, elements, directions)
        evaluation["runner"] = None
        costs, per_tensor = None, _group_costs(clean, tensors, **evaluation, paths=paths)
    if costs is not None:
        grid = layout.as_dict(layout.unflatten(xp.reshape(costs, (n_stencil, n_total)), xp=xp))
        return {name: grid[name] for name in layout.names}
    full = elements is None and directions is None
    return {
        name: xp.reshape(per_tensor[name], (n_stencil, *tuple(base.shape)) if full else (n_stencil, -1))
        if name in per_tensor
        else xp.zeros((n_stencil, 0), dtype=base.dtype, device=device(base))
        for name, base in parts.items()
    }


def _per_tensor(stencil: Stencil, tensors, evaluation: dict, paths: dict) -> dict:
    """``_group_costs`` per tensor; a tensor whose verified batched path disagrees with a
    single call at a later batch size is looped instead (mode='auto'), or its CostError raised."""
    while True:
        try:
            return _group_costs(stencil, tensors, **evaluation, paths=paths)
        except _Mismatch as mismatch:
            if evaluation["mode"] != "auto" or path_of(paths, mismatch.tensor).name == "loop":
                raise mismatch.error from None
            paths[mismatch.tensor] = Path(
                "loop", f"{path_of(paths, mismatch.tensor).name}: {mismatch.reason}"
            )


def _intact(stencil: Stencil, parts: Mapping[str, Any], args: tuple[Any, ...], xp: ModuleType) -> bool:
    """Whether the copies the cost received still equal the originals (one device sync)."""
    flags = [xp.all(stencil.parts[name] == p) for name, p in parts.items()]
    for copy, original in zip(stencil.args, args):
        if copy is not original and _is_backend_array(original, xp):
            same = copy == original
            if xp.isdtype(original.dtype, "real floating"):
                same = same | (xp.isnan(copy) & xp.isnan(original))
            flags.append(xp.all(same))
    return bool(xp.all(xp.stack(flags)))


def central_differences(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    epsilon: float,
    xp: ModuleType,
    mode: str = "unverified",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    runner: Runner | None = None,
    paths: dict[str | None, Path] | None = None,
) -> dict[str, Any]:
    """The central-difference gradient (J(θ + εe_i) − J(θ − εe_i)) / (2ε) of every element.

    The stencil ±1 with one step ε for all elements; the quotient is formed in the
    notebook's order, so its numbers reproduce. Returns name → array of the tensor's shape.
    """
    steps = {
        name: xp.full(tuple(p.shape), epsilon, dtype=p.dtype, device=device(p)) for name, p in parts.items()
    }
    costs = stencil_costs(
        cost,
        parts,
        args,
        layout=layout,
        steps=steps,
        multipliers=(1.0, -1.0),
        xp=xp,
        mode=mode,
        memory_budget=memory_budget,
        progress=progress,
        runner=runner,
        paths=paths,
    )
    return {name: (c[0, ...] - c[1, ...]) / (2 * epsilon) for name, c in costs.items()}
