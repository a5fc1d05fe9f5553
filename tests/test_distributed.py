"""distributed: check(..., client=) on a LocalCluster of 2 worker processes equals the local check.

One cluster serves the whole module (starting one costs ~1.5 s on 2 cores); the tests that
need it are skipped, with the reason, where dask/distributed are not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import subprocess
import sys
import threading
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
    from distributed import Client, LocalCluster

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
