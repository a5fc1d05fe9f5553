"""Scale out: a check's stacked chunks as tasks on a Dask cluster (``check(..., client=...)``).

The perturbation rows are independent, so a full check is embarrassingly parallel over
chunks of rows. This is the only module that knows Dask, and ``check`` imports it only when
a ``client`` is passed: ``import gcbackend`` and a local check never import dask.

What crosses the network:

* once per check, to every worker (``client.scatter(..., broadcast=True)``): the cost, the
  args, the parameters, the steps, the multipliers and the layout, with every array as a
  host NumPy copy plus the name of the namespace to rebuild it with;
* per task, only its chunk ``(tensor, start, stop)``: the worker rebuilds those rows itself
  with the engine's own code (``engine.evaluate_chunk``), evaluates them with the check's
  namespace on its own default device (NumPy on CPU workers, CuPy on GPU workers), and
  returns only the costs, a (stop - start,) host NumPy array.

The chunks are exactly the local pass's (``engine.chunk_bounds``), so where the workers run
the same library on the same kind of machine the costs, and the report, are bitwise the
local ones. A worker that dies mid-check is handled by Dask: its tasks are rescheduled on
the others (up to ``distributed.scheduler.allowed-failures`` deaths per task) and the
scattered inputs are fetched from a surviving worker, so the result is still complete.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import array_api_compat

from . import evaluation as engine
from .backends import Backend, is_array, to_backend, to_host
from .errors import BackendUnavailableError, InputError, InputTypeError

__all__ = ["DaskRunner", "runner"]


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailableError(
            f"client= needs Dask's distributed scheduler, which is not installed "
            f"(pip install 'gcbackend[dask]'): {exc}"
        ) from exc
    return distributed


def runner(client: Any, backend: Backend, cost: Any, args: tuple[Any, ...]) -> DaskRunner:
    """The engine runner for ``client``, after checking what will be sent to the workers.

    Raises InputTypeError if ``client`` is not a ``dask.distributed.Client``, and InputError
    if the cost (or a non-array arg) cannot be pickled: both before the cost is first called.
    """
    distributed = _import_distributed()
    if not isinstance(client, distributed.Client):
        raise InputTypeError(
            f"client must be a dask.distributed.Client, not {type(client).__name__}; e.g. "
            "client=Client('tcp://scheduler:8786'), or Client(LocalCluster()) on this machine"
        )
    _require_picklable(cost, "the cost")
    for index, arg in enumerate(args):
        if not is_array(arg):  # arrays travel as host NumPy copies
            _require_picklable(arg, f"args[{index}]")
    return DaskRunner(client, backend)


def _require_picklable(value: Any, what: str) -> None:
    # cloudpickle is what distributed falls back to when pickle fails: if it cannot, neither
    # can the scatter, which would fail later with a long serialization traceback.
    import cloudpickle

    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise InputError(
            f"client= sends {what} to the Dask workers, so it must be picklable, but pickling "
            f"it failed ({type(exc).__name__}: {exc}). Define the cost as a module-level "
            "function (with functools.partial for fixed options) that holds no locks, open "
            "files, connections or threads; or run the check without client="
        ) from exc


class DaskRunner:
    """An ``engine.Runner``: every chunk a Dask task, the stencil sent to each worker once.

    Results come back in the order of the chunks, as arrays of ``backend`` on its device.
    ``progress(rows)`` is told as each task finishes. When a task fails (CostError), the
    error of the first failing chunk in chunk order is raised here, as the local pass would
    raise it, and the other tasks are cancelled.
    """

    def __init__(self, client: Any, backend: Backend) -> None:
        self.client = client
        self.backend = backend

    def __call__(
        self,
        stencil: engine.Stencil,
        chunks: list[engine.Chunk],
        progress: Callable[[int], Any] | None = None,
    ) -> list[Any]:
        distributed = _import_distributed()
        client = self.client
        payload = client.scatter(_Payload(stencil, self.backend), broadcast=True, hash=False)
        token = uuid.uuid4().hex[:8]
        keys = [f"gradient-check-{tensor or 'all'}-{start}:{stop}-{token}" for tensor, start, stop in chunks]
        futures = client.map(_evaluate_chunk, chunks, key=keys, payload=payload)
        rows = {future.key: stop - start for future, (_, start, stop) in zip(futures, chunks)}
        order = {future.key: index for index, future in enumerate(futures)}
        try:
            for future in distributed.as_completed(futures):
                if future.status == "error":
                    # The local pass stops at the first chunk that fails, in order: raise
                    # that one (its rows named), not whichever failed first here.
                    earlier = futures[: order[future.key]]
                    if earlier:
                        distributed.wait(earlier)
                    next(f for f in [*earlier, future] if f.status == "error").result()
                if progress is not None:
                    progress(rows[future.key])
            results = client.gather(futures)
        except BaseException:
            client.cancel([*futures, payload])
            raise
        return [to_backend(costs, self.backend) for costs in results]


class _Payload:
    """The stencil with host copies of its arrays; each worker rebuilds them once, lazily."""

    def __init__(self, stencil: engine.Stencil, backend: Backend) -> None:
        self.namespace = backend.xp.__name__  # e.g. array_api_compat.numpy: imported by name
        self.stencil = _mapped(stencil, to_host)
        self._local: tuple[engine.Stencil, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "stencil": self.stencil}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=None)

    def local(self) -> tuple[engine.Stencil, Any]:
        """The stencil on this worker's backend and default device, and the namespace."""
        if self._local is None:
            xp = importlib.import_module(self.namespace)
            here = Backend(self.namespace, xp, array_api_compat.device(xp.asarray(0.0)))
            self._local = (_mapped(self.stencil, lambda array: to_backend(array, here)), xp)
        return self._local


def _mapped(stencil: engine.Stencil, move: Callable[[Any], Any]) -> engine.Stencil:
    """The stencil with ``move`` applied to every array in it (not to the cost)."""

    def each(mapping):
        return None if mapping is None else {name: move(array) for name, array in mapping.items()}

    return replace(
        stencil,
        parts=each(stencil.parts),
        args=tuple(move(a) if is_array(a) else a for a in stencil.args),
        steps=each(stencil.steps),
        elements=each(stencil.elements),
        directions=each(stencil.directions),
    )


def _evaluate_chunk(chunk: engine.Chunk, *, payload: _Payload) -> Any:
    """A task: the costs of one chunk, as a host NumPy array (only they travel back)."""
    stencil, xp = payload.local()
    return to_host(engine.evaluate_chunk(stencil, chunk, xp=xp))
