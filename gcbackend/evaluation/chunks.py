"""How many rows one batched call holds: the memory budget, cache-sized copies, measured sizes.

One place decides the chunks of a tensor's rows (``chunk_bounds``), so a runner's chunks
are exactly the local ones, and so are their floating-point operations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import array_api_compat
from array_api_compat import device

from ..errors import InputError

__all__ = [
    "CACHE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "ROW_FOOTPRINT",
    "TUNE_CALLS",
    "TUNE_MIN_ROWS",
    "TUNE_SIZES",
    "VMAP_ROWS",
    "WHOLE_ROWS",
    "budget_rows",
    "chunk_bounds",
    "chunk_rows",
    "timed_on_host",
    "tuned_sizes",
    "vmap_rows",
]

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes the rows of one stacked call may hold (256 MiB), ROW_FOOTPRINT row-sized arrays each."""
ROW_FOOTPRINT = 4
"""Row-sized arrays the check itself holds per row of a stacked call while it builds and
evaluates it: the perturbed copy, the displacement (one-hot step or drawn direction) and its
product with the step, and the drawn direction on the host. ``memory_budget`` is divided by
this many copies of a row (the cost's own temporaries for the batch come on top)."""
MAX_CHUNK_ROWS = 64
"""Rows per stacked call, at most: beyond this, batched GEMMs stop getting faster and the
activations (which grow with the batch too) stop fitting in cache (bench/run.py, L model)."""
CACHE_BYTES = 8 * 2**20
"""Perturbed copies per stacked call, at most (with at least MIN_CHUNK_ROWS rows): the
copies of a large tensor are read once by the first GEMM and should still be in cache."""
MIN_CHUNK_ROWS = 8
TUNE_MIN_ROWS = 2048
"""A tensor with at least this many rows, on a library that computes on the host, has its
rows per call measured rather than fixed (see ``tuned_sizes``)."""
TUNE_SIZES = (4, 8, 16, 32, 64, 128, 256)
TUNE_CALLS = 2
WHOLE_ROWS = 256
"""A θ whose stencil has at most this many rows is done in ONE call with every tensor
batched (the seed case: 94 or 188 rows), where per-call overhead dominates."""
VMAP_ROWS = 512
"""Rows per vmapped call, at most (and within the memory budget): vmap's per-call overhead
(tracing the cost's Python once per call, batching rules) is what a vmapped check costs,
so its calls are larger than broadcast's; JAX pads every call to this size, so jit
compiles once per tensor."""


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
    return max(1, min(n_rows, most, cache, budget_rows(memory_budget, row_bytes)))


def budget_rows(memory_budget: int, row_bytes: int) -> int:
    """Rows whose ROW_FOOTPRINT row-sized arrays fit ``memory_budget`` (at least 1: a budget
    of one perturbed copy or more evaluates a row at a time)."""
    return max(1, memory_budget // (ROW_FOOTPRINT * row_bytes))


def chunk_bounds(
    n_rows: int, size: int, itemsize: int, memory_budget: int, name: str, most: int = MAX_CHUNK_ROWS
) -> list[tuple[int, int]]:
    """The (start, stop) of every stacked call over ``n_rows`` rows: one place decides them,
    so a runner's chunks are exactly the local ones (and so are their floating-point ops)."""
    step = chunk_rows(n_rows, size, itemsize, memory_budget, name, most)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def vmap_rows(size: int, itemsize: int, memory_budget: int) -> int:
    """Rows per vmapped call over a size-``size`` tensor: VMAP_ROWS, within the budget."""
    return min(VMAP_ROWS, budget_rows(memory_budget, size * itemsize))


def timed_on_host(xp: ModuleType, array: Any) -> bool:
    """Whether a wall clock around a cost call measures its work: NumPy, and PyTorch on the
    CPU, compute eagerly on the host. A GPU library returns before its kernels finish (and
    wants the largest batch anyway); the other namespaces are not used for speed."""
    if array_api_compat.is_numpy_namespace(xp):
        return True
    return array_api_compat.is_torch_namespace(xp) and str(device(array)) == "cpu"


def tuned_sizes(limit: int, seconds: Sequence[float], static: int) -> Iterator[int]:
    """Rows per stacked call, chosen by measuring: the caller appends each call's seconds
    per row to ``seconds`` (only the last is read) before asking for the next size.

    The fastest batch cannot be predicted from sizes alone. Larger batches make larger,
    faster GEMMs, until the cost's temporaries outgrow what the allocator keeps: with
    glibc's malloc, freed blocks of a few hundred KiB go back to the OS and page-fault in
    again at every call, and a check of bench/run.py's M model was twice as slow at 12 rows
    per call as at 8. So the first calls over a tensor with many rows try TUNE_SIZES in
    turn (TUNE_CALLS calls each, the fastest counts, stopping once a size is 25 % slower
    than the best so far), and the rest go at the fastest. Trial calls are real rows, so
    nothing is evaluated twice; trials use at most ``limit`` rows in all (a quarter of the
    tensor's rows, and the memory budget caps every size). The results do not depend on
    the batch size: each row's cost is computed on its own. (Since check() primes glibc's
    malloc, see ``backends.prime_host_allocator``, that knee mostly moves beyond
    TUNE_SIZES there; the trials still find it with other allocators.)
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
