"""Process-wide settings a check holds while it evaluates: BLAS threads, PyTorch's threads.

Such a setting belongs to the process, not to a check: two checks that each saved it, set
it and restored it on their own would race (the second saves the first one's limit and
"restores" it last, leaving the process limited for good). So each is a ``Hold``: the
first check in sets it, later ones only count themselves in, and the last one out
restores what the first one found.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import array_api_compat

__all__ = ["ONE_THREAD_BYTES", "Hold", "call_weight", "intra_op", "one_blas_thread", "one_torch_thread"]

ONE_THREAD_BYTES = 2**20
"""PyTorch on the CPU: a call that reads fewer bytes than this (rows × the parameters and
array args of one point) runs with one intra-op thread: waking torch's thread pool for
every small operation costs more than the work (bench/evaluation.py measures it). Single
calls of most costs, the loop, and the batched calls of small costs are held; a chunk of
64 rows of bench/run.py's M model (86 KB a point) is not."""


class Hold:
    """A process-wide setting held by any number of checks at once (threads included).

    ``take()`` applies the setting and returns the function that undoes it; it is called
    by the first holder and undone by the last one to leave."""

    def __init__(self, take: Callable[[], Callable[[], Any]]) -> None:
        self._take = take
        self._lock = threading.Lock()
        self._count = 0
        self._undo: Callable[[], Any] | None = None

    @property
    def holders(self) -> int:
        """How many holders are in now."""
        return self._count

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._count == 0:
                self._undo = self._take()
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0:
                    undo, self._undo = self._undo, None
                    undo()


_CONTROLLER: list[Any] = []  # [ThreadpoolController, len(sys.modules) when it was made]


def _blas_controller() -> Any:
    """One threadpoolctl controller (finding the loaded libraries takes about a millisecond),
    made again only when modules were imported since: a library loaded later is seen too."""
    from threadpoolctl import ThreadpoolController

    if not _CONTROLLER or _CONTROLLER[1] != len(sys.modules):
        _CONTROLLER[:] = [ThreadpoolController(), len(sys.modules)]
    return _CONTROLLER[0]


def _release_openblas() -> None:
    """Let any thread set OpenBLAS's limit next. threadpoolctl (3.8) lets only one thread,
    the first to set a pthreads OpenBLAS's process-wide limit, change it until that thread
    clears the claim; the last check out, which restores the limit, may be another thread."""
    from threadpoolctl import OpenBLASController

    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear()


def _take_blas() -> Callable[[], Any]:
    limiter = _blas_controller().limit(limits=1, user_api="blas")
    _release_openblas()

    def undo() -> None:
        limiter.restore_original_limits()
        _release_openblas()

    return undo


def _take_torch() -> Callable[[], Any]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return lambda: torch.set_num_threads(before)


one_blas_thread = Hold(_take_blas)
"""BLAS held to one thread (threadpoolctl), while chunks run on several threads of ours."""
one_torch_thread = Hold(_take_torch)
"""PyTorch's intra-op pool held to one thread, while a small torch cost is evaluated."""


def call_weight(xp: ModuleType, arrays: Iterable[Any]) -> int:
    """Bytes one unbatched call of a cost reads (its parameters and array args) where the
    evaluation may hold PyTorch's threads (torch on the CPU); 0 elsewhere (nothing held)."""
    if not array_api_compat.is_torch_namespace(xp):
        return 0
    import torch

    arrays = [a for a in arrays if isinstance(a, torch.Tensor)]
    if any(a.device.type != "cpu" for a in arrays):
        return 0
    return max(1, sum(a.nelement() * a.element_size() for a in arrays))


def intra_op(weight: int, rows: int = 1) -> AbstractContextManager[None]:
    """What a call over ``rows`` rows of a cost of ``weight`` (``call_weight``) holds: one
    PyTorch thread when it reads under ONE_THREAD_BYTES in all, nothing otherwise."""
    if weight == 0 or weight * rows >= ONE_THREAD_BYTES:
        return contextlib.nullcontext()
    import torch

    if torch.get_num_threads() == 1 and one_torch_thread.holders == 0:
        return contextlib.nullcontext()  # one thread already, and no check of ours set it
    return one_torch_thread()
