"""Runners: who evaluates the chunks of a pass once the paths are chosen.

``stencil_costs`` evaluates locally by default; a ``Runner`` takes every chunk of a pass at
once and returns their costs in order: ``ThreadRunner`` on threads of this process,
``gcbackend.distributed.DaskRunner`` on a Dask cluster.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from .limits import one_blas_thread
from .passes import evaluate_chunk
from .rows import Chunk, Stencil

__all__ = ["Runner", "ThreadRunner", "worker_count"]

Runner = Callable[[Stencil, list[Chunk], "Callable[[int], Any] | None"], list[Any]]
"""runner(stencil, chunks, progress) → the costs of each chunk, in order: (stop - start,)
arrays of the check's namespace and device, each equal to ``evaluate_chunk(stencil, chunk)``.
It evaluates them elsewhere (``gcbackend.distributed``: on a Dask cluster) and tells
``progress(rows)`` of each chunk done."""


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
    oversubscribe the cores, and restored afterwards by the last check holding it
    (``limits.one_blas_thread``: checks running at once must not restore each other's limit). Each thread keeps its own row groups,
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
        pool = ThreadPoolExecutor(min(self.workers, len(chunks)), thread_name_prefix="gcbackend")
        try:
            with one_blas_thread():  # process-wide: concurrent checks share it, the last restores it
                futures = [pool.submit(run, chunk) for chunk in chunks]
                return [_told(future.result(), chunk, progress) for future, chunk in zip(futures, chunks)]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _told(costs: Any, chunk: Chunk, progress: Callable[[int], Any] | None) -> Any:
    if progress is not None:
        progress(chunk[2] - chunk[1])
    return costs
