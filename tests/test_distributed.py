"""distributed: check(..., client=) on a LocalCluster of 2 worker processes equals the local check.

One cluster serves the whole module (starting one costs ~1.5 s on 2 cores); the tests that
need it are skipped, with the reason, where dask/distributed are not installed. The fault
tests at the end kill its workers for real (``os._exit``, SIGKILL) and wait for their nannies
to restart them; each check there runs in a thread, bounded by a timeout.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from typing import Any, NamedTuple

import numpy as np
import pytest
from array_api_compat import array_namespace
from helpers import assert_on, host

import gcbackend as gc
from gcbackend import evaluation
from gcbackend.models import mlp

HAVE_DASK = all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed"))
needs_dask = pytest.mark.skipif(
    not HAVE_DASK, reason="dask/distributed not installed (pip install 'gcbackend[dask]')"
)

SETTINGS = {"notebook": dict(gc.NOTEBOOK), "auto": {}}


def _seed():
    X, Y, params = mlp.seed_case()
    return X, Y, params, mlp.backward_with_planted_bugs(params, X, Y)  # a failing report


def _mid():
    X, Y, params = mlp.random_case([30, 20, 10, 1], 16)  # 841 parameters: per-tensor chunks
    return X, Y, params, mlp.backward(params, X, Y)


CASES = {"seed": _seed, "mid": _mid}


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # A LocalCluster closes for good a nanny whose worker is still gone 15 s after a death
    # (distributed.deploy.lost-worker-timeout); on this loaded 2-core machine a restart takes
    # up to ~4 s, and the fault tests below kill the workers several times in a row.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "10 minutes"}):
        cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None)
        with cluster, Client(cluster) as dask_client:
            yield dask_client


def assert_same_report(remote, local):
    """Bitwise the same report: every number, every per-element array, the printed table."""
    assert str(remote) == str(local)
    for field in ("difference", "threshold", "expected", "verdict", "evaluations", "epsilon", "mode"):
        assert getattr(remote, field) == getattr(local, field), field
    assert remote.parameters.keys() == local.parameters.keys()
    for name, result in local.parameters.items():
        other = remote.parameters[name]
        assert other.difference == result.difference and other.verdict == result.verdict, name
        assert other.top == result.top and other.kinks == result.kinks, name
        numeric, expected = host(other.numeric_grad), host(result.numeric_grad)
        assert numeric.dtype == expected.dtype and numeric.tobytes() == expected.tobytes(), name


def test_import_and_a_local_check_never_import_dask():
    code = (
        "import sys, gcbackend as gc; from gcbackend.models import mlp; X, Y, p = mlp.seed_case(); "
        "gc.check(mlp.cost, p, mlp.backward(p, X, Y), X, Y); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed') "
        "or m == 'gcbackend.distributed'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs_dask
@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_report_is_bitwise_the_local_one(client, case, settings):
    X, Y, params, grads = CASES[case]()
    local = gc.check(mlp.cost, params, grads, X, Y, **SETTINGS[settings])
    remote = gc.check(mlp.cost, params, grads, X, Y, client=client, **SETTINGS[settings])
    assert_same_report(remote, local)
    assert remote.verdict == ("fail" if case == "seed" else "pass")
    assert isinstance(remote.parameters["W1"].numeric_grad, np.ndarray)  # back on the backend


@needs_dask
def test_inputs_travel_once_and_a_task_is_only_its_chunk_bounds(client, monkeypatch):
    # The design: the cost, args and parameters go to every worker once per check (one
    # broadcast scatter), and each task carries only (tensor, start, stop); the workers
    # rebuild their rows. Nothing of size N (let alone (2N, N)) rides with a task.
    X, Y, params, grads = _mid()
    scatters, task_lists = [], []
    real_scatter, real_map = client.scatter, client.map

    def scatter(data, **options):
        scatters.append(options)
        return real_scatter(data, **options)

    def spy_map(func, chunks, **options):
        task_lists.append(list(chunks))
        assert set(options) == {"key", "payload"}  # the scattered payload, by reference
        return real_map(func, task_lists[-1], **options)

    monkeypatch.setattr(client, "scatter", scatter)
    monkeypatch.setattr(client, "map", spy_map)
    report = gc.check(mlp.cost, params, grads, X, Y, client=client, **gc.NOTEBOOK)
    assert report.verdict == "pass" and report.evaluations == 2 * 841
    assert len(scatters) == 1 and scatters[0]["broadcast"] is True
    assert len(task_lists) == 1
    tasks = task_lists[0]
    assert all(
        len(task) == 3 and task[0] in params and isinstance(task[1], int) and isinstance(task[2], int)
        for task in tasks
    ), tasks[:3]
    for name, p in params.items():  # every row of every tensor, once, in order
        spans = [(start, stop) for tensor, start, stop in tasks if tensor == name]
        # issue 12: each tensor's first chunk is evaluated here, to choose (and verify) its path.
        bounds = evaluation.chunk_bounds(2 * p.size, p.size, 8, evaluation.DEFAULT_MEMORY_BUDGET, name)
        assert spans == bounds[1:]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@needs_dask
@pytest.mark.parametrize("options", [{"mode": "directions"}, {"sample": 5, "order": 4}], ids=str)
def test_screens_and_samples_spread_too(client, options):
    X, Y, params, grads = _mid()
    local = gc.check(mlp.cost, params, grads, X, Y, **options)
    assert_same_report(gc.check(mlp.cost, params, grads, X, Y, client=client, **options), local)


@needs_dask
def test_screen_directions_too_large_to_hold_travel_as_seeds(client, monkeypatch):
    # Directions too large to hold are drawn per chunk, on the worker that evaluates it.
    from gcbackend import plan

    X, Y, params, grads = _mid()
    local = gc.check(mlp.cost, params, grads, X, Y, mode="directions")
    monkeypatch.setattr(plan, "HELD_BYTES", 0)
    assert_same_report(gc.check(mlp.cost, params, grads, X, Y, client=client, mode="directions"), local)


def _raising_cost(params, X, Y):
    if params["W2"].ndim == 3:  # W2 batched: its rows are being evaluated
        raise ValueError("W2 is broken")
    return mlp.cost(params, X, Y)


@needs_dask
@pytest.mark.parametrize("case", list(CASES))
def test_a_cost_that_raises_on_a_worker_gives_the_local_error(client, case):
    X, Y, params, grads = CASES[case]()
    # issue 12: mode='stacked' (the default, mode='auto', would loop W2's rows)
    with pytest.raises(gc.CostError) as local:
        gc.check(_raising_cost, params, grads, X, Y, mode="stacked")
    with pytest.raises(gc.CostError) as remote:
        gc.check(_raising_cost, params, grads, X, Y, client=client, mode="stacked")
    assert str(remote.value) == str(local.value)
    assert "ValueError: W2 is broken" in str(remote.value) and "'W2'" in str(remote.value)


class _Guarded:
    """A cost object holding a lock, defined in a test: typical of what cannot be pickled."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, params, X, Y):
        with self.lock:
            self.calls += 1
        return mlp.cost(params, X, Y)


@needs_dask
def test_a_cost_that_cannot_be_pickled_is_refused_before_any_call(client):
    X, Y, params, grads = _seed()
    lock, calls = threading.Lock(), []

    def closure(params, X, Y):
        calls.append(1)
        with lock:
            return mlp.cost(params, X, Y)

    for cost in (closure, lambda params, X, Y: closure(params, X, Y), _Guarded()):
        with pytest.raises(gc.InputError, match="must be picklable") as info:
            gc.check(cost, params, grads, X, Y, client=client)
        message = str(info.value)
        assert "module-level function" in message and "lock" in message
    assert calls == []


@needs_dask
def test_bad_client_options_are_refused(client):
    X, Y, params, grads = _seed()
    with pytest.raises(gc.InputTypeError, match=r"dask\.distributed\.Client"):
        gc.check(mlp.cost, params, grads, X, Y, client="tcp://scheduler:8786")
    # issue 12: client= runs loop rows too (the path chosen here travels with the tasks).
    looped = gc.check(mlp.cost, params, grads, X, Y, client=client, mode="loop")
    assert looped.difference == gc.check(mlp.cost, params, grads, X, Y, mode="loop").difference
    assert looped.parameters["W1"].path == "loop"


def _dying_cost(params, X, Y, *, flag, driver):
    """mlp.cost, but the first worker to evaluate rows of W2 kills its own process."""
    if params["W2"].ndim == 3 and os.getpid() != driver:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))  # only the first attempt dies
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return mlp.cost(params, X, Y)


@needs_dask
def test_a_worker_that_dies_mid_check_is_retried_and_the_report_is_complete(client, tmp_path):
    X, Y, params, grads = _mid()
    flag = tmp_path / "died"
    cost = functools.partial(_dying_cost, flag=str(flag), driver=os.getpid())
    local = gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK)
    remote = gc.check(cost, params, grads, X, Y, client=client, **gc.NOTEBOOK)
    assert flag.exists()  # a worker did die, with W2's chunk in hand
    assert_same_report(remote, local)
    assert remote.verdict == "pass"


@needs_dask
def test_every_backend_evaluates_on_the_workers_and_lands_back_on_its_device(client, backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    local = gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK)
    remote = gc.check(mlp.cost, params, grads, X, Y, client=client, **gc.NOTEBOOK)
    assert_same_report(remote, local)
    assert_on(remote.parameters["W2"].numeric_grad, backend)
    assert np.isclose(remote.difference, 1.1890913024229996e-07)


# --------------------------------------------------------------------------- layers and trees


class _Dense(NamedTuple):
    W: Any
    b: Any


def _tree_cost(params, X):
    """Broadcasts over a leading batch axis of any leaf of a tree of dicts, lists, NamedTuples."""
    hidden = np.tanh(X @ params["encoder"]["W"] + params["encoder"]["b"][..., None, :])
    dense = params["layers"][0]
    return np.sum(hidden @ dense.W + dense.b[..., None, :], axis=(-2, -1))


@needs_dask
def test_a_parameter_tree_travels_and_the_report_is_the_local_one(client):
    rng = np.random.default_rng(13)
    X = rng.standard_normal((4, 3))
    params = {
        "encoder": {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)},
        "layers": [_Dense(rng.standard_normal((2, 2)), rng.standard_normal(2))],
    }
    hidden = np.tanh(X @ params["encoder"]["W"] + params["encoder"]["b"])
    dz = (np.ones((4, 2)) @ params["layers"][0].W.T) * (1 - hidden**2)
    grads = {
        "encoder": {"W": X.T @ dz, "b": dz.sum(0) * 1.01},  # planted in a nested leaf
        "layers": [_Dense(hidden.T @ np.ones((4, 2)), np.full(2, 4.0))],
    }
    local = gc.check(_tree_cost, params, grads, X)
    remote = gc.check(_tree_cost, params, grads, X, client=client)
    assert local.faults == ("encoder.b",)
    assert_same_report(remote, local)


def _affine_forward(x, w, b):
    return x @ w + b[..., None, :], (x, w, b)


def _affine_backward_with_bug(dout, cache):
    x, w, _ = cache
    return dout @ w.T, x.T @ dout / x.shape[0], dout.sum(0)  # planted: dw averaged


@needs_dask
def test_a_layer_check_on_the_cluster_is_the_local_one(client):
    rng = np.random.default_rng(14)
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    local = gc.check_layer(_affine_forward, _affine_backward_with_bug, x, w, b, mode="stacked")
    remote = gc.check_layer(
        _affine_forward, _affine_backward_with_bug, x, w, b, mode="stacked", client=client
    )
    assert local.faults == ("w",)
    assert_same_report(remote, local)


def _l2_over_everything(params, X, Y):
    """Broadcasts in shape but sums the L2 term over all B copies: never used batched."""
    xp = array_namespace(*params.values())
    return mlp.cost(params, X, Y) + 0.1 * xp.sum(params["W2"] * params["W2"])


@needs_dask
def test_the_paths_chosen_here_travel_with_the_tasks(client):
    # issue 12: W2's rows are looped on the workers as here, the other tensors broadcast.
    X, Y, params = mlp.random_case([12, 10, 6, 1], 20, seed=3)
    grads = mlp.backward(params, X, Y)
    grads["W2"] = grads["W2"] + 0.2 * params["W2"]
    options = {"memory_budget": 40 * 120 * 8}
    local = gc.check(_l2_over_everything, params, grads, X, Y, **options)
    remote = gc.check(_l2_over_everything, params, grads, X, Y, client=client, **options)
    assert_same_report(remote, local)
    assert local.passed
    assert {name: r.path for name, r in remote.parameters.items()} == {
        name: "loop" if name == "W2" else "broadcast" for name in params
    }


# --------------------------------------------------------------------------- faults (issue 20)


def _bounded(seconds, function, *args, **kwargs):
    """``function(*args, **kwargs)``, failing the test if it has not returned within ``seconds``."""
    box = {}

    def target():
        try:
            box["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} did not return within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _when_flagged(flag, action, seconds=120):
    """A started thread that runs ``action()`` once ``flag`` exists (or gives up after ``seconds``)."""

    def wait():
        deadline = time.monotonic() + seconds
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.path.exists(flag):
            action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _flag_once(flag):
    """True for the first caller on any process (the flag file is created atomically)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _crashing_cost(params, X, Y, *, driver):
    """mlp.cost, but every worker evaluating rows of W2 ends its own process."""
    if params["W2"].ndim == 3 and os.getpid() != driver:
        os._exit(1)
    return mlp.cost(params, X, Y)


@needs_dask
def test_a_chunk_that_keeps_killing_its_workers_is_a_cost_error_naming_its_rows(client):
    # issue 20: raw KilledWorker or FutureCancelledError (listing W1 chunks), by the run.
    from distributed import KilledWorker

    X, Y, params, grads = _mid()
    cost = functools.partial(_crashing_cost, driver=os.getpid())
    client.wait_for_workers(2, timeout=120)
    with pytest.raises(gc.CostError) as info:
        _bounded(240, gc.check, cost, params, grads, X, Y, client=client, **gc.NOTEBOOK)
    # W2's first chunk is evaluated here (to choose its path), its second is the first sent.
    start, stop = evaluation.chunk_bounds(
        2 * params["W2"].size, params["W2"].size, 8, evaluation.DEFAULT_MEMORY_BUDGET, "W2"
    )[1]
    assert str(info.value) == (
        f"the Dask workers evaluating rows {start}..{stop - 1} perturbing parameter 'W2' died every time "
        "they were sent these rows: the cost ends the worker's process on them (os._exit, sys.exit, a "
        "crash in native code) or needs more memory than a worker may use. See the workers' logs; a "
        "smaller memory_budget= makes smaller chunks, and a check without client= runs the same rows "
        "in this process"
    )
    assert isinstance(info.value.__cause__, (KilledWorker, CancelledError))
    client.wait_for_workers(2, timeout=120)  # restarted by their nannies: the cluster still serves
    local = gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK)
    assert_same_report(
        _bounded(120, gc.check, mlp.cost, params, grads, X, Y, client=client, **gc.NOTEBOOK), local
    )


def _waiting_cost(params, X, Y, *, flag, driver):
    """mlp.cost, but the first worker to evaluate rows of W2 raises ``flag`` and waits there."""
    if params["W2"].ndim == 3 and os.getpid() != driver and _flag_once(flag):
        time.sleep(60)  # killed long before
    return mlp.cost(params, X, Y)


@needs_dask
def test_every_worker_killed_at_once_mid_check_gives_the_local_report(client, tmp_path):
    # issue 20: the scattered inputs die with both workers; they are sent again, the report
    # is the local one bit for bit (before: FutureCancelledError, 'already forgotten').
    X, Y, params, grads = _mid()
    flag = str(tmp_path / "waiting")
    client.wait_for_workers(2, timeout=120)
    pids = list(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids

    def kill():
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    killer = _when_flagged(flag, kill)
    cost = functools.partial(_waiting_cost, flag=flag, driver=os.getpid())
    remote = _bounded(240, gc.check, cost, params, grads, X, Y, client=client, **gc.NOTEBOOK)
    killer.join(10)
    assert os.path.exists(flag) and not killer.is_alive()
    assert all(pid not in client.run(os.getpid).values() for pid in pids)  # both were replaced
    assert_same_report(remote, gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK))


def _slow_cost(params, X, Y, *, flag, driver):
    """mlp.cost, slowed on the workers for rows of W1, with ``flag`` raised by the first."""
    if params["W1"].ndim == 3 and os.getpid() != driver:
        _flag_once(flag)
        time.sleep(0.2)
    return mlp.cost(params, X, Y)


@needs_dask
def test_a_client_closed_mid_check_is_a_cluster_error_not_the_cleanups_error(client, tmp_path):
    # issue 20: the cleanup's ClosedClientError used to replace what had happened.
    from distributed import Client
    from distributed.client import ClosedClientError

    X, Y, params, grads = _mid()
    flag = str(tmp_path / "started")
    client.wait_for_workers(2, timeout=120)
    other = Client(client.scheduler.address)
    closer = _when_flagged(flag, other.close)
    cost = functools.partial(_slow_cost, flag=flag, driver=os.getpid())
    with pytest.raises(gc.ClusterError) as info:
        _bounded(120, gc.check, cost, params, grads, X, Y, client=other, **gc.NOTEBOOK)
    closer.join(30)
    assert other.status == "closed"
    assert re.fullmatch(
        r"rows \d+\.\.\d+ perturbing parameter 'W1'( and \d+ more chunks)? could not be evaluated: the "
        r"Dask client was closed while the check ran; keep it open until check\(\) returns",
        str(info.value),
    ), str(info.value)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert info.value.__cause__ is not None
    assert not any(isinstance(e, ClosedClientError) for e in chain[1:]), chain


def _rebuild_here(driver):
    if os.getpid() != driver:
        raise ModuleNotFoundError("No module named 'installed_only_here'")
    return _OnlyHere(driver)


class _OnlyHere:
    """An arg that unpickles only in this process, like an object of a library the workers lack."""

    def __init__(self, driver):
        self.driver = driver

    def __reduce__(self):
        return _rebuild_here, (self.driver,)


def _cost_with_extra(params, X, Y, extra):
    return mlp.cost(params, X, Y)


@needs_dask
def test_inputs_the_workers_cannot_rebuild_are_a_cluster_error_naming_the_rows(client):
    # issue 20: a raw Exception from the scatter.
    X, Y, params, grads = _mid()
    client.wait_for_workers(2, timeout=120)
    with pytest.raises(gc.ClusterError) as info:
        _bounded(120, gc.check, _cost_with_extra, params, grads, X, Y, _OnlyHere(os.getpid()), client=client)
    message = str(info.value)
    assert message.startswith("sending the cost, args and parameters to the Dask workers failed (")
    assert "installed_only_here" in message and "perturbing parameter 'W1' could not be evaluated" in message
    assert "installed_only_here" in str(info.value.__cause__)
    local = gc.check(_cost_with_extra, params, grads, X, Y, _OnlyHere(os.getpid()))
    assert local.passed  # the same check runs here


@needs_dask
def test_what_a_failed_task_becomes():
    # A task's own GradCheckError stands; Dask's KilledWorker is the cost's (CostError, rows
    # named); anything else from a task is the cluster's (ClusterError), chained either way.
    from types import SimpleNamespace

    import distributed

    from gcbackend.distributed import _failure

    chunk = ("b1", 8, 16)
    own = gc.CostError("the cost raised ValueError")
    assert _failure(own, chunk, distributed) is own
    killed = distributed.KilledWorker("gradient-check-b1-8:16-x", SimpleNamespace(address="tcp://w:1"), 3)
    error = _failure(killed, chunk, distributed)
    assert type(error) is gc.CostError and error.__cause__ is killed
    assert str(error).startswith(
        "the Dask workers evaluating rows 8..15 perturbing parameter 'b1' died every time"
    )
    missing = ModuleNotFoundError("No module named 'torch'")
    error = _failure(missing, ("W1", 0, 1), distributed)
    assert type(error) is gc.ClusterError and error.__cause__ is missing
    assert str(error) == (
        "a Dask worker failed on row 0 perturbing parameter 'W1' outside the cost (ModuleNotFoundError: "
        "No module named 'torch'); the workers need the libraries and versions this process uses"
    )
