"""evaluation on JAX: the cost runs compiled (jit of vmap), once per tensor shape, and the
evaluation's own arithmetic is never dispatched op by op (issue 21 item 3)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gcbackend as gc
from gcbackend import evaluation
from gcbackend.models import mlp
from gcbackend.params import Layout

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'gcbackend[test]')")
jnp = jax.numpy


@pytest.fixture(params=[True, False], ids=["x64", "x32"])
def x64(request):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", previous)


def _case(dims, m, seed):
    X, Y, params = mlp.random_case(dims, m, seed=seed)
    grads = mlp.backward(params, X, Y)
    move = {k: jnp.asarray(v) for k, v in params.items()}
    return jnp.asarray(X), jnp.asarray(Y), move, {k: jnp.asarray(v) for k, v in grads.items()}


def _mean_cost(runs, act=None):
    """A cost that averages over every axis (does not broadcast), counting its Python runs:
    under jit each run is a trace, i.e. a compilation."""
    act = jax.nn.relu if act is None else act

    def cost(p, X, Y):
        runs.append(1)
        A = X
        for layer in (1, 2):
            A = act(p[f"W{layer}"] @ A + p[f"b{layer}"])
        out = jax.nn.sigmoid(p["W3"] @ A + p["b3"])
        return -jnp.mean(Y * jnp.log(out) + (1 - Y) * jnp.log(1 - out))

    return cost


@pytest.mark.parametrize(("dims", "m"), [([4, 5, 3, 1], 3), ([12, 10, 6, 1], 20)])
def test_a_jax_check_compiles_each_tensor_once_and_then_never_again(x64, dims, m):
    X, Y, params, _ = _case(dims, m, seed=4)
    runs = []
    cost = _mean_cost(runs)
    layout = Layout.of(params)
    options = dict(layout=layout, epsilon=1e-3 if not x64 else 1e-6, xp=gc.backends.resolve("jax", []).xp)
    paths = {}
    first = evaluation.central_differences(cost, params, (X, Y), mode="auto", paths=paths, **options)
    traced = len(runs)
    # A small θ is one group (every tensor at once), a larger one a group per tensor: each
    # compiles its batched program and its single-row program (the chunks' checks), no more.
    groups = 1 if 2 * layout.size <= evaluation.WHOLE_ROWS else len(params)
    assert traced == 2 * groups
    assert {evaluation.path_of(paths, name).name for name in params} == {"vmap"}
    runs.clear()
    again = evaluation.central_differences(cost, params, (X, Y), mode="auto", paths={}, **options)
    assert runs == []  # the same cost and shapes: nothing compiled, nothing run op by op
    moved = {k: v * 1.01 for k, v in params.items()}  # another θ, same shapes
    evaluation.central_differences(cost, moved, (X, Y), mode="auto", paths={}, **options)
    assert runs == []
    loop = evaluation.central_differences(cost, params, (X, Y), mode="loop", **options)
    for name in params:
        assert again[name].dtype == params[name].dtype and again[name].shape == params[name].shape
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(first[name]))
        scale = float(jnp.max(jnp.abs(loop[name]))) + 1.0
        np.testing.assert_allclose(np.asarray(first[name]), np.asarray(loop[name]), rtol=0, atol=1e-3 * scale)


def test_a_jax_check_emits_no_warning_of_the_evaluations_own(x64):
    X, Y, params, _ = _case([12, 10, 6, 1], 20, seed=5)
    cost = _mean_cost([], jnp.tanh)  # smooth: float32's automatic steps cross no ReLU corner
    grads = jax.grad(cost)(params, X, Y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = gc.check(cost, params, grads, X, Y)
        floats = gc.check(lambda p, X, Y: float(cost(p, X, Y)), params, grads, X, Y, mode="loop")
    # (the verdicts are the judge's business; a float32 check may be inconclusive)
    assert report.verdict != "fail" and floats.verdict != "fail"
    assert {r.path for r in report.parameters.values()} == {"vmap"}
    ours = [w for w in caught if "gcbackend/evaluation" in w.filename.replace("\\", "/")]
    assert ours == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
