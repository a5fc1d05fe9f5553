"""backend="dask" (issue 13, item 9): every mode, refinement and the fast screen, and the demo.

Dask arrays are lazy: their chunk sizes after a boolean selection are unknown, and NumPy
1.26's ndarray has no ``.device``. The whole suite does not run on Dask (its per-test
graph building would multiply the suite's time); this module runs every mode on it and
compares each report with NumPy's.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import host

import gcbackend as gc
from gcbackend import differences
from gcbackend.cli import main
from gcbackend.models import mlp

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("dask") is None, reason="dask not installed (pip install 'gcbackend[dask]')"
)

# mode="loop" is below on a small case: one Dask graph per row takes ~0.3 s (the evaluation's loop).
MODES = [{}, {"mode": "directions"}, {"sample": 3}, {"order": 4}, dict(gc.NOTEBOOK)]


@pytest.mark.parametrize("options", MODES, ids=str)
def test_every_mode_matches_numpy(options):
    X, Y, params = mlp.seed_case()
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    local = gc.check(mlp.cost, params, grads, X, Y, backend="numpy", **options)
    lazy = gc.check(mlp.cost, params, grads, X, Y, backend="dask", **options)
    assert lazy.backend == "dask" and lazy.faults == local.faults == ("b1", "W2")
    assert lazy.evaluations == local.evaluations
    for name, result in local.parameters.items():
        assert lazy.parameters[name].verdict == result.verdict
        assert lazy.parameters[name].difference == pytest.approx(result.difference, rel=1e-6, abs=1e-12)


def test_loop_mode_runs_on_dask():
    from gcbackend.models import linear

    for options in ({}, dict(gc.NOTEBOOK)):
        report = gc.check(
            linear.cost, 4.0, linear.gradient(4.0, 2.0), 2.0, backend="dask", mode="loop", **options
        )
        assert report.backend == "dask" and report.verdict == "pass", str(report)
    assert report.difference == 2.919335883291695e-10
    wrong = gc.check(linear.cost, 4.0, 3.0, 2.0, backend="dask", mode="loop")
    assert wrong.verdict == "fail"


def _near_kink(distance):
    values = np.array([1.0, -0.5, 0.25, 2.0, 0.1, -1.2, 0.7, 0.3])
    h = float(
        host(differences.auto_steps({"t": values}, order=2, xp=gc.backends.resolve("numpy", []).xp)["t"])[0]
    )
    c = np.asarray(1.0 + distance * h)

    def cost(t, c):
        xp = gc.backends.namespace(t)
        return xp.abs(t[..., 0] - c) + xp.sum(xp.sin(t[..., 1:]), axis=-1)

    return values, c, cost, np.concatenate([[-1.0], np.cos(values[1:])])


@pytest.mark.parametrize(("distance", "options"), [(1.5, {}), (1.6, {"mode": "directions"})], ids=str)
def test_refinement_runs_on_dask(distance, options):
    theta, c, cost, grad = _near_kink(distance)
    report = gc.check(cost, theta, grad, c, backend="dask", **options)
    assert report.verdict == "pass", str(report)
    assert any("evaluated again" in note for note in report.notes)
    wrong = grad * np.array([0.99] + [1.0] * 7)
    assert gc.check(cost, theta, wrong, c, backend="dask", **options).verdict == "fail"


def test_demo_runs_on_dask(capsys):
    assert main(["demo", "--backend", "dask"]) == 0
    out = capsys.readouterr().out
    assert "difference = 2.919335883291695e-10" in out and "backend dask" in out
