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

import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
from array_api_compat import device

from .errors import CostError, InputError
from .params import Layout

__all__ = [
    "CACHE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "MODES",
    "WHOLE_ROWS",
    "Chunk",
    "RowGroup",
    "Runner",
    "Stencil",
    "ThreadRunner",
    "central_differences",
    "chunk_bounds",
    "coordinate_rows",
    "direction_rows",
    "evaluate_center",
    "evaluate_chunk",
    "evaluate_rows",
    "row_group",
    "stencil_costs",
    "worker_count",
]

MODES = ("stacked", "loop")
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
"""A θ whose stencil has at most this many rows is done in ONE call with every tensor
batched (the seed case: 94 or 188 rows), where per-call overhead dominates."""

_CONTRACT = (
    "In mode='stacked' some parameters carry a leading batch axis of size B (e.g. W1 of shape "
    "(B, 5, 4) instead of (5, 4)) and the cost must broadcast over it and return shape (B,): "
    "use matmul/@ and reduce over the trailing axes only (axis=(-2, -1)), never over all axes. "
    "If the cost cannot be written that way, pass mode='loop'."
)

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


Runner = Callable[[Stencil, list[Chunk], "Callable[[int], Any] | None"], list[Any]]
"""runner(stencil, chunks, progress) → the costs of each chunk, in order: (stop - start,)
arrays of the check's namespace and device, each equal to ``evaluate_chunk(stencil, chunk)``.
It evaluates them elsewhere (``gcbackend.distributed``: on a Dask cluster) and tells
``progress(rows)`` of each chunk done."""


class RowGroup(NamedTuple):
    """The rows of one tensor (or of all at once) as ``evaluate_rows`` takes them."""

    flat: Any
    rows: Rows
    n_rows: int
    batched: Callable[[Any], Any]
    single: Callable[[Any], Any]
    name: str
    most: int = MAX_CHUNK_ROWS


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
    if tuple(out.shape) != expected:
        what = "a batch of" if stacked else "one unbatched evaluation at"
        raise CostError(
            f"the cost returned shape {tuple(out.shape)} for {what} rows {start}..{stop - 1} "
            f"perturbing parameter {name!r}; expected shape {expected}. "
            + (_CONTRACT if stacked else "In mode='loop' the cost must return a scalar.")
        )
    # A copy where rows live in a reused buffer: a cost may return a view of its inputs.
    return xp.asarray(out, copy=True) if _reuses(xp) else out


def evaluate_rows(
    cost: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    flat: Any,
    rows: Rows,
    n_rows: int,
    batched: Callable[[Any], Any],
    single: Callable[[Any], Any],
    name: str,
    xp: ModuleType,
    mode: str = "stacked",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    most: int = MAX_CHUNK_ROWS,
) -> Any:
    """Costs J(flat + D_r) for the ``n_rows`` displacement rows D_r = rows(r, r + 1), shape (n_rows,).

    ``batched`` turns a (B, n) stack of perturbed vectors into what the cost receives
    (parameters with a leading batch axis); ``single`` does the same for one (n,) vector.
    Stacked: ⌈n_rows / B⌉ calls, B from ``memory_budget``. Loop: n_rows calls. ``name`` says
    what is perturbed, for error messages; ``progress(rows)`` is told of every call's rows. Raises CostError if the cost raises or returns
    the wrong shape.
    """
    size = flat.shape[0]
    costs = []
    if mode == "loop":
        for r in range(n_rows):
            params = single(rows(r, r + 1)[0, :])
            out = _call(cost, params, args, name=name, start=r, stop=r + 1, stacked=False)
            costs.append(_as_costs(out, (), xp=xp, name=name, start=r, stop=r + 1, stacked=False))
            if progress is not None:
                progress(1)
        return xp.stack(costs)
    itemsize = xp.finfo(flat.dtype).bits // 8
    static = chunk_rows(n_rows, size, itemsize, memory_budget, name, most)  # validates the budget too
    seconds: list[float] = []
    if n_rows >= TUNE_MIN_ROWS and _timed_on_host(xp, flat):
        sizes = _tuned_sizes(min(n_rows // 4, memory_budget // (size * itemsize)), seconds, static)
    else:
        sizes = itertools.repeat(static)
    start = 0
    while start < n_rows:
        stop = min(start + next(sizes), n_rows)
        began = time.perf_counter()
        costs.append(
            _stacked(
                cost, args, flat=flat, rows=rows, batched=batched, name=name, start=start, stop=stop, xp=xp
            )
        )
        seconds.append((time.perf_counter() - began) / (stop - start))
        if progress is not None:
            progress(stop - start)
        start = stop
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


def _stacked(cost, args, *, flat, rows, batched, name, start, stop, xp):
    """One stacked call: the costs of rows [start, stop), shape (stop - start,)."""
    params = batched(rows(start, stop))
    out = _call(cost, params, args, name=name, start=start, stop=stop, stacked=True)
    return _as_costs(out, (stop - start,), xp=xp, name=name, start=start, stop=stop, stacked=True)


def evaluate_chunk(
    stencil: Stencil, chunk: Chunk, *, xp: ModuleType, groups: dict[str | None, RowGroup] | None = None
) -> Any:
    """The costs of one chunk of a stencil's rows, shape (stop - start,): what a worker runs.

    It rebuilds the rows from (tensor, start, stop) with the same code and the same
    operations as the local stacked pass, so on the same library the costs are bitwise the
    local ones. ``groups`` (tensor → RowGroup), when given, keeps the row groups from one
    chunk to the next, and with them their row buffers. Raises CostError like ``evaluate_rows``.
    """
    tensor, start, stop = chunk
    if groups is None:
        group = row_group(stencil, tensor, xp=xp)
    else:
        if tensor not in groups:
            groups[tensor] = row_group(stencil, tensor, xp=xp)
        group = groups[tensor]
    return _stacked(
        stencil.cost,
        stencil.args,
        flat=group.flat,
        rows=group.rows,
        batched=group.batched,
        name=group.name,
        start=start,
        stop=stop,
        xp=xp,
    )


def worker_count(workers: int) -> int:
    """``workers`` threads, or every CPU this process may use for ``workers=-1``."""
    if workers != -1:
        return workers
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(available) if available else os.cpu_count() or 1


class ThreadRunner:
    """A ``Runner`` that evaluates the chunks on ``workers`` threads of this process.

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


def evaluate_center(cost: Callable[..., Any], params: Any, args: tuple[Any, ...], *, xp: ModuleType) -> Any:
    """J(θ) itself, as a 0-d array, with the same error handling as the perturbed rows."""
    out = _call(cost, params, args, name="(none: J at θ)", start=0, stop=1, stacked=False)
    return _as_costs(out, (), xp=xp, name="(none: J at θ)", start=0, stop=1, stacked=False)


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
    where = device(steps)
    if elements is None:
        elements = xp.arange(size, device=where)
    chosen = elements.shape[0]
    factors = xp.asarray(multipliers, dtype=steps.dtype, device=where)
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


def row_group(stencil: Stencil, tensor: str | None, *, xp: ModuleType) -> RowGroup:
    """The rows perturbing parameter ``tensor`` (only it batched, the others unbatched and
    shared by broadcasting), or with ``tensor=None`` every tensor's rows at once (all batched)."""
    layout, parts, steps, multipliers = stencil.layout, stencil.parts, stencil.steps, stencil.multipliers
    if tensor is None:
        flat = layout.flatten(layout.wrap(parts), xp=xp)
        rows, n_rows = coordinate_rows(flat, layout.flatten(layout.wrap(steps), xp=xp), multipliers, xp=xp)
        return RowGroup(
            flat,
            rows,
            n_rows,
            lambda batch: layout.unflatten(batch, xp=xp),
            lambda vector: layout.unflatten(vector, xp=xp),
            ", ".join(layout.names),
            WHOLE_ROWS,
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
    else:
        chosen = None if stencil.elements is None else stencil.elements[tensor]
        rows, n_rows = coordinate_rows(
            flat, xp.reshape(steps[tensor], (-1,)), multipliers, xp=xp, elements=chosen
        )
    return RowGroup(flat, rows, n_rows, batched, single, tensor)


def _group_costs(
    stencil: Stencil,
    tensors: tuple[str | None, ...],
    *,
    xp: ModuleType,
    mode: str,
    memory_budget: int,
    progress: Callable[[int], Any] | None,
    runner: Runner | None,
) -> dict[str | None, Any]:
    """tensor → the costs of all its rows, (n_rows,). Locally one tensor after the other; a
    runner gets the chunks of ALL the tensors in one list, so a cluster runs them together."""
    groups = {tensor: row_group(stencil, tensor, xp=xp) for tensor in tensors}
    if runner is None or mode == "loop":
        return {
            tensor: evaluate_rows(
                stencil.cost,
                stencil.args,
                **group._asdict(),
                xp=xp,
                mode=mode,
                memory_budget=memory_budget,
                progress=progress,
            )
            for tensor, group in groups.items()
        }
    chunks = [
        (tensor, start, stop)
        for tensor, group in groups.items()
        for start, stop in chunk_bounds(
            group.n_rows,
            group.flat.shape[0],
            xp.finfo(group.flat.dtype).bits // 8,
            memory_budget,
            group.name,
            group.most,
        )
    ]
    results = runner(stencil, chunks, progress)
    out = {}
    for tensor in groups:
        pieces = [costs for (owner, _, _), costs in zip(chunks, results) if owner == tensor]
        out[tensor] = pieces[0] if len(pieces) == 1 else xp.concat(pieces)
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
    mode: str = "stacked",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    elements: Mapping[str, Any] | None = None,
    directions: Mapping[str, Any] | None = None,
    runner: Runner | None = None,
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

    ``runner`` (stacked mode only) evaluates the stacked calls elsewhere: it receives the
    Stencil and every (tensor, start, stop) chunk at once, and returns their costs in order
    (see ``Runner``); the chunks are the local ones, so are the results.
    """
    n_stencil = len(multipliers)
    dtypes = {p.dtype for p in parts.values()}
    n_total = layout.size
    itemsize = xp.finfo(next(iter(dtypes))).bits // 8
    whole = (
        elements is None
        and directions is None
        and mode == "stacked"
        and len(dtypes) == 1
        and n_stencil * n_total <= WHOLE_ROWS
        and n_stencil * n_total * n_total * itemsize <= memory_budget
    )
    stencil = Stencil(cost, parts, args, layout, steps, multipliers, elements, directions)
    evaluation = dict(xp=xp, mode=mode, memory_budget=memory_budget, progress=progress, runner=runner)
    if whole:
        try:
            costs = _group_costs(stencil, (None,), **evaluation)[None]
        except CostError:
            pass  # the per-tensor pass below redoes it and names the parameter at fault
        else:
            grid = layout.as_dict(layout.unflatten(xp.reshape(costs, (n_stencil, n_total)), xp=xp))
            return {name: grid[name] for name in layout.names}

    # A tensor with no elements or directions (a refinement that left it alone) gets no call.
    chosen = elements if elements is not None else directions
    tensors = tuple(name for name in parts if chosen is None or chosen[name].shape[0] > 0)
    costs = _group_costs(stencil, tensors, **evaluation)
    full = elements is None and directions is None
    return {
        name: xp.reshape(costs[name], (n_stencil, *tuple(base.shape)) if full else (n_stencil, -1))
        if name in costs
        else xp.zeros((n_stencil, 0), dtype=base.dtype, device=device(base))
        for name, base in parts.items()
    }


def central_differences(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    epsilon: float,
    xp: ModuleType,
    mode: str = "stacked",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    runner: Runner | None = None,
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
    )
    return {name: (c[0, ...] - c[1, ...]) / (2 * epsilon) for name, c in costs.items()}
