"""Scale out: a check's stacked chunks as tasks on a Dask cluster (``check(..., client=...)``).

The perturbation rows are independent, so a full check is embarrassingly parallel over
chunks of rows. This is the only module that knows Dask, and ``check`` imports it only when
a ``client`` is passed: ``import gcbackend`` and a local check never import dask.

What crosses the network:

* once per check, to every worker (``client.scatter(..., broadcast=True)``): the cost, the
  args, the parameters, the steps, the multipliers and the layout, with every array as a
  host NumPy copy plus the name of the namespace to rebuild it with;
* per task, only its chunk ``(tensor, start, stop)``: the worker rebuilds those rows itself
  with the evaluation's own code (``evaluation.evaluate_chunk``), evaluates them with the check's
  namespace on its own default device (NumPy on CPU workers, CuPy on GPU workers), and
  returns only the costs, a (stop - start,) host NumPy array.

The chunks are exactly the local pass's (``evaluation.chunk_bounds``), so where the workers run
the same library on the same kind of machine the costs, and the report, are bitwise the
local ones.

Failures. A worker that dies mid-check is first Dask's to handle: its tasks are rescheduled
on the others (up to ``distributed.scheduler.allowed-failures`` deaths per task) and the
scattered inputs are fetched from a surviving worker. Each chunk's costs are brought here as
soon as it finishes, so a later death cannot lose them. When the workers holding the inputs
all die, Dask forgets every task that needs them: those chunks are sent again with fresh
inputs, once no task of the check still runs anywhere (a cancelled task runs on, and may
still kill its worker), the first of them alone, then twice as many per round that loses
nothing, so the chunk at fault is known. A chunk that loses its workers ``RETRIES`` times
while it runs alone (or that Dask gives up on, ``KilledWorker``) is the cost's doing: a
CostError naming its parameter and rows. A client closed, a scheduler lost, no worker back,
or inputs the workers cannot rebuild is a ClusterError naming the rows not evaluated;
whatever Dask raised is chained as ``__cause__``, never hidden by the cleanup's own errors.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import importlib
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import array_api_compat

from . import evaluation
from .backends import Backend, is_array, to_backend, to_host
from .errors import (
    BackendUnavailableError,
    ClusterError,
    CostError,
    GradCheckError,
    InputError,
    InputTypeError,
)

__all__ = ["RETRIES", "WORKER_WAIT", "DaskRunner", "runner"]

RETRIES = 2
"""How many times a chunk may lose its workers while it runs alone (the inputs sent to them
lost with them, then sent again) before the check gives up on it with a CostError."""
WORKER_WAIT = 60.0
"""Seconds to wait for a worker to come back before the inputs are sent again."""


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
    """The evaluation runner for ``client``, after checking what will be sent to the workers.

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
    """An ``evaluation.Runner``: every chunk a Dask task, the stencil sent to each worker once.

    Results come back in the order of the chunks, as arrays of ``backend`` on its device.
    ``progress(rows)`` is told as each chunk's costs arrive. When a task fails, the error of
    the first failing chunk in chunk order is raised here, as the local pass would raise it
    (the cost's own CostError as it was raised on the worker), and the later tasks are
    cancelled. Chunks lost with their workers are sent again (see the module's docstring).
    """

    def __init__(self, client: Any, backend: Backend) -> None:
        self.client = client
        self.backend = backend

    def __call__(
        self,
        stencil: evaluation.Stencil,
        chunks: list[evaluation.Chunk],
        progress: Callable[[int], Any] | None = None,
    ) -> list[Any]:
        tasks = _Tasks(self.client, _Payload(stencil, self.backend), chunks, progress)
        return [to_backend(costs, self.backend) for costs in tasks.run()]


class _Tasks:
    """One runner call on the cluster: its chunks, the costs come back, the failures seen."""

    def __init__(self, client: Any, payload: _Payload, chunks: list[evaluation.Chunk], progress) -> None:
        self.distributed = _import_distributed()
        self.client, self.payload, self.chunks, self.progress = client, payload, chunks, progress
        self.token = uuid.uuid4().hex[:8]
        self.costs: dict[int, Any] = {}  # chunk index → its costs (host), once they are here
        self.failures: dict[int, GradCheckError] = {}  # chunk index → the error it ends the check with

    def needed(self) -> list[int]:
        """The chunks still to evaluate: those before the first failing one, not yet here."""
        return [i for i in range(min(self.failures, default=len(self.chunks))) if i not in self.costs]

    def closed(self) -> bool:
        return self.client.status in ("closing", "closed")

    def run(self) -> list[Any]:
        """Every chunk's costs in order (host arrays), or the first failing chunk's error.

        All chunks go out at once. After a round that lost chunks (their inputs died with
        the workers) the next round sends only the first chunk still needed, and each round
        that loses nothing twice as many: a chunk that kills its workers is found alone and
        blamed after RETRIES such rounds, while after a transient loss the rounds soon carry
        every chunk again."""
        losses: collections.Counter[int] = collections.Counter()  # chunk index → rounds lost alone
        unsent = 0  # retry rounds whose inputs could not be sent (a worker dying meanwhile)
        window = len(self.chunks)
        for attempt in itertools.count():
            todo = self.needed()[:window]
            if not todo:
                break
            try:
                if attempt:
                    self.settle()
                lost = self.round(todo, attempt)
            except _Unsent as unsent_error:
                unsent += 1
                if unsent > RETRIES:
                    raise self.cluster_error(self.needed(), unsent_error.error) from unsent_error.error
                continue
            except GradCheckError:
                raise
            except Exception as exc:  # the client closed, the scheduler gone, no worker back
                raise self.cluster_error(self.needed(), exc) from exc
            if not lost:
                window = min(2 * window, len(self.chunks))
                continue
            first, cause = next(iter(lost.items()))
            if self.closed():
                raise self.cluster_error(list(lost), cause) from cause
            if len(todo) == 1:  # it ran alone: nothing else of this check can have killed its workers
                losses[first] += 1
                if losses[first] >= RETRIES:
                    self.failures[first] = _caused(_died(self.chunks[first]), cause)
            window = 1
        if self.failures:
            raise self.failures[min(self.failures)]
        return [self.costs[i] for i in range(len(self.chunks))]

    def settle(self) -> None:
        """Wait until no worker still runs a task of this call, and one worker is up.

        A cancelled task runs on to its end (a thread cannot be stopped), and may still kill
        its worker: it must not do so while a chunk runs alone, or that chunk is blamed."""
        deadline = time.monotonic() + WORKER_WAIT
        while time.monotonic() < deadline:
            running = self.client.run(_running, self.token, on_error="return")
            if all(value == [] for value in running.values()):
                break
            time.sleep(0.1)  # a task still running, or a worker dying (its answer an error)
        self.client.wait_for_workers(1, timeout=max(deadline - time.monotonic(), 1.0))

    def round(self, todo: list[int], attempt: int) -> dict[int, BaseException]:
        """Send the inputs and the chunks ``todo``; keep their costs and failures as tasks end.

        Returns the chunks lost (cancelled by Dask: their inputs died with the workers, or
        the client closed), each with the exception that says so. Whatever is still running
        when this returns or raises is cancelled, and an error while cancelling is not raised."""
        client, chunks = self.client, self.chunks
        try:
            scattered = client.scatter(self.payload, broadcast=True, hash=False)
        except Exception as exc:
            if self.closed():
                raise
            if attempt:  # a worker died or joined while the inputs were sent again
                raise _Unsent(exc) from exc
            raise ClusterError(
                f"sending the cost, args and parameters to the Dask workers failed ({type(exc).__name__}: "
                f"{exc}), so {_rows(chunks[todo[0]])} could not be evaluated; the workers need the "
                "libraries (and versions) this process uses"
            ) from exc
        suffix = f"-{self.token}" + (f"-retry{attempt}" if attempt else "")
        keys = [
            f"gradient-check-{tensor or 'all'}-{start}:{stop}{suffix}"
            for tensor, start, stop in (chunks[i] for i in todo)
        ]
        futures = client.map(_evaluate_chunk, [chunks[i] for i in todo], key=keys, payload=scattered)
        index = {future.key: i for future, i in zip(futures, todo)}
        lost: dict[int, BaseException] = {}
        try:
            for batch in self.distributed.as_completed(futures, loop=client.loop).batches():
                for future, outcome, value in _outcomes(client, batch):
                    i = index[future.key]
                    if i >= min(self.failures, default=len(chunks)):
                        continue  # after the first failing chunk: not needed, cancelled
                    if outcome == "lost":
                        lost[i] = value
                    elif outcome == "error":
                        self.failures[i] = _failure(value, chunks[i], self.distributed)
                        client.cancel([f for f in futures if index[f.key] > i and not f.done()])
                    else:
                        self.costs[i] = value
                        if self.progress is not None:
                            self.progress(chunks[i][2] - chunks[i][1])
        finally:
            with contextlib.suppress(Exception):  # never hide what ended the round
                client.cancel([*(f for f in futures if not f.done()), scattered])
        return dict(sorted(lost.items()))

    def cluster_error(self, missing: list[int], error: BaseException | None) -> ClusterError:
        """A ClusterError naming the chunks ``missing`` and why: the client closed, or ``error``."""
        rows = _rows(self.chunks[missing[0]]) if missing else "no rows"
        more = f" and {len(missing) - 1} more chunks" if len(missing) > 1 else ""
        if self.closed():
            why = "the Dask client was closed while the check ran; keep it open until check() returns"
        else:
            why = (
                f"the Dask cluster failed ({type(error).__name__}: {error}); check that its scheduler "
                "is reachable and its workers are up"
            )
        return ClusterError(f"{rows}{more} could not be evaluated: {why}")


class _Unsent(Exception):
    """The inputs could not be sent again in a retry round (``error`` says why)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _running(token: str, dask_worker: Any = None) -> list[str]:
    """On a worker: the keys of the tasks of call ``token`` it is still running (cancelled or not)."""
    state = getattr(dask_worker, "state", None)
    tasks = [*getattr(state, "executing", ()), *getattr(state, "long_running", ())]
    return [str(task.key) for task in tasks if token in str(task.key)]


def _outcomes(client: Any, futures: list[Any]) -> list[tuple[Any, str, Any]]:
    """(future, outcome, value) for futures that are done: ``"costs"`` and the chunk's costs,
    ``"error"`` and the exception its task raised, or ``"lost"`` and the exception saying
    why there is neither (cancelled, or gone with the client). The finished ones travel in
    one transfer; one by one if one of them was lost meanwhile."""
    finished = [f for f in futures if f.status == "finished"]
    try:
        values = dict(zip((f.key for f in finished), client.gather(finished))) if finished else {}
    except Exception:
        values = {}
    out = []
    for future in futures:
        if future.key in values:
            out.append((future, "costs", values[future.key]))
            continue
        if client.status in ("closing", "closed"):  # result() would wait for ever
            out.append((future, "lost", concurrent.futures.CancelledError("the Dask client was closed")))
            continue
        try:
            if future.status == "error":
                out.append((future, "error", future.exception(timeout=WORKER_WAIT)))
            else:
                out.append((future, "costs", future.result(timeout=WORKER_WAIT)))
        except Exception as exc:  # cancelled: its inputs were lost, or the client closed meanwhile
            out.append((future, "lost", exc))
    return out


def _rows(chunk: evaluation.Chunk) -> str:
    tensor, start, stop = chunk
    which = "every parameter" if tensor is None else f"parameter {tensor!r}"
    return (
        f"row {start} perturbing {which}"
        if stop - start == 1
        else f"rows {start}..{stop - 1} perturbing {which}"
    )


def _caused(error: GradCheckError, cause: BaseException | None) -> GradCheckError:
    """``error`` with ``cause`` chained, as ``raise error from cause`` would when it is raised."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error


def _died(chunk: evaluation.Chunk) -> CostError:
    return CostError(
        f"the Dask workers evaluating {_rows(chunk)} died every time they were sent these rows: "
        "the cost ends the worker's process on them (os._exit, sys.exit, a crash in native code) or "
        "needs more memory than a worker may use. See the workers' logs; a smaller memory_budget= "
        "makes smaller chunks, and a check without client= runs the same rows in this process"
    )


def _failure(error: BaseException, chunk: evaluation.Chunk, distributed: Any) -> GradCheckError:
    """What a failed task of ``chunk`` ends the check with: the cost's own error as it was
    raised on the worker, a CostError for a chunk whose workers kept dying, else a ClusterError."""
    if isinstance(error, GradCheckError):
        return error
    if isinstance(error, distributed.KilledWorker):
        return _caused(_died(chunk), error)
    return _caused(
        ClusterError(
            f"a Dask worker failed on {_rows(chunk)} outside the cost ({type(error).__name__}: "
            f"{error}); the workers need the libraries and versions this process uses"
        ),
        error,
    )


class _Payload:
    """The stencil with host copies of its arrays; each worker rebuilds them once, lazily."""

    def __init__(self, stencil: evaluation.Stencil, backend: Backend) -> None:
        self.namespace = backend.xp.__name__  # e.g. array_api_compat.numpy: imported by name
        self.stencil = _mapped(stencil, to_host)
        self._local: tuple[evaluation.Stencil, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "stencil": self.stencil}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=None)

    def local(self) -> tuple[evaluation.Stencil, Any]:
        """The stencil on this worker's backend and default device, and the namespace."""
        if self._local is None:
            xp = importlib.import_module(self.namespace)
            here = Backend(self.namespace, xp, array_api_compat.device(xp.asarray(0.0)))
            self._local = (_mapped(self.stencil, lambda array: to_backend(array, here)), xp)
        return self._local


def _mapped(stencil: evaluation.Stencil, move: Callable[[Any], Any]) -> evaluation.Stencil:
    """The stencil with ``move`` applied to every array in it (not to the cost)."""

    def each(mapping):
        return None if mapping is None else {name: move(array) for name, array in mapping.items()}

    return replace(
        stencil,
        parts=each(stencil.parts),
        args=tuple(move(a) if is_array(a) else a for a in stencil.args),
        steps=each(stencil.steps),
        elements=each(stencil.elements),
        # Directions too large to hold travel as their seeds (each worker draws its chunks' rows).
        directions=None
        if stencil.directions is None
        else {name: move(d) if is_array(d) else d for name, d in stencil.directions.items()},
    )


def _evaluate_chunk(chunk: evaluation.Chunk, *, payload: _Payload) -> Any:
    """A task: the costs of one chunk, as a host NumPy array (only they travel back)."""
    stencil, xp = payload.local()
    return to_host(evaluation.evaluate_chunk(stencil, chunk, xp=xp))
