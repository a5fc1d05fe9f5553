"""Any cost as written (issue 12): a catalogue of costs the way people write them.

Each style comes with its correct backprop and a buggy one. With the defaults
(``mode="auto"``) every style gets the true verdict on every backend it applies to; each
style that does not broadcast raises CostError under ``mode="stacked"``; the project's own
broadcasting models are still evaluated broadcast (no false downgrade).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from array_api_compat import array_namespace
from helpers import assert_bitwise_equal, host, snapshot

import gcbackend as gc
from gcbackend.models import linear, mlp

LAMBD = 0.7
NP = gc.backends.resolve("numpy", []).xp


# --------------------------------------------------------------------------- the MLP styles


def forward_propagation(X, Y, parameters):
    """The course's forward_propagation: np.dot, a cache tuple returned with the cost."""
    W1, b1, W2, b2, W3, b3 = (parameters[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
    Z1 = np.dot(W1, X) + b1
    A1 = np.maximum(0, Z1)
    Z2 = np.dot(W2, A1) + b2
    A2 = np.maximum(0, Z2)
    Z3 = np.dot(W3, A2) + b3
    A3 = 1 / (1 + np.exp(-Z3))
    m = X.shape[1]
    logprobs = np.multiply(-np.log(A3), Y) + np.multiply(-np.log(1 - A3), 1 - Y)
    cost = 1.0 / m * np.sum(logprobs)
    return cost, (Z1, A1, W1, b1, Z2, A2, W2, b2, Z3, A3, W3, b3)


def compute_cost_with_regularization(parameters, X, Y):
    """The course's L2 cost: broadcasts, but np.sum(np.square(W)) sums over all B copies."""
    m = X.shape[1]
    L2 = (LAMBD / (2 * m)) * (
        np.sum(np.square(parameters["W1"]))
        + np.sum(np.square(parameters["W2"]))
        + np.sum(np.square(parameters["W3"]))
    )
    return mlp.cost(parameters, X, Y) + L2


def cost_with_norm(parameters, X, Y):
    m = X.shape[1]
    L2 = (LAMBD / (2 * m)) * sum(np.linalg.norm(parameters[k]) ** 2 for k in ("W1", "W2", "W3"))
    return mlp.cost(parameters, X, Y) + L2


def cost_with_xp_sum(parameters, X, Y):
    """The same L2 mistake in the array API: xp.sum(W * W) over all axes."""
    xp = array_namespace(*parameters.values())
    m = X.shape[1]
    L2 = (LAMBD / (2 * m)) * sum(xp.sum(parameters[k] * parameters[k]) for k in ("W1", "W2", "W3"))
    return mlp.cost(parameters, X, Y) + L2


def cost_as_float(parameters, X, Y):
    return float(mlp.cost(parameters, X, Y))


def cost_with_transposes(parameters, X, Y):
    """Row-major: A @ W.T + b.T, examples as rows."""
    A = X.T
    for layer in (1, 2, 3):
        Z = np.dot(A, parameters[f"W{layer}"].T) + parameters[f"b{layer}"].T
        A = np.maximum(0, Z) if layer < 3 else 1 / (1 + np.exp(-Z))
    y = Y.T
    return float(np.mean(-y * np.log(A) - (1 - y) * np.log(1 - A)))


def cost_mean_over_everything(parameters, X, Y):
    """BCE as xp.mean over every axis: the batch axis included."""
    xp = array_namespace(*parameters.values())
    A = mlp.forward(parameters, X)[-1][1]
    return -xp.mean(Y * xp.log(A) + (1 - Y) * xp.log(1 - A))


def mlp_case(xp, device, *, l2=False):
    X, Y, params = mlp.random_case([4, 5, 3, 1], 6, seed=7, xp=xp, device=device)
    grads = mlp.backward(params, X, Y)
    if l2:
        m = X.shape[1]
        grads = {k: g + (LAMBD / m) * params[k] if k.startswith("W") else g for k, g in grads.items()}
    return (X, Y), params, grads


# --------------------------------------------------------------------------- CS231n, row-major


def _softmax_case(xp, device, two_layer):
    rng = np.random.default_rng(3)
    N, D, H, C = 7, 4, 5, 3
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    if two_layer:
        params = {"W1": 0.5 * rng.standard_normal((D, H)), "b1": 0.1 * rng.standard_normal(H),
                  "W2": 0.5 * rng.standard_normal((H, C)), "b2": 0.1 * rng.standard_normal(C)}  # fmt: skip
    else:
        params = {"W": 0.5 * rng.standard_normal((D, C)), "b": 0.1 * rng.standard_normal(C)}
    return X, y, params


def softmax_loss(params, X, y, reg=0.1):
    scores = X.dot(params["W"]) + params["b"]
    scores = scores - np.max(scores, axis=1, keepdims=True)
    probs = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
    N = X.shape[0]
    return -np.sum(np.log(probs[np.arange(N), y])) / N + reg * np.sum(params["W"] * params["W"])


def softmax_grads(params, X, y, reg=0.1):
    scores = X.dot(params["W"]) + params["b"]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(X.shape[0]), y] -= 1
    dscores = probs / X.shape[0]
    return {"W": X.T.dot(dscores) + 2 * reg * params["W"], "b": dscores.sum(axis=0)}


def two_layer_loss(params, X, y, reg=0.05):
    h = np.maximum(0, X.dot(params["W1"]) + params["b1"])
    scores = h.dot(params["W2"]) + params["b2"]
    scores = scores - np.max(scores, axis=1, keepdims=True)
    probs = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
    N = X.shape[0]
    loss = -np.sum(np.log(probs[np.arange(N), y])) / N
    return loss + reg * (np.sum(params["W1"] * params["W1"]) + np.sum(params["W2"] * params["W2"]))


def two_layer_grads(params, X, y, reg=0.05):
    Z = X.dot(params["W1"]) + params["b1"]
    h = np.maximum(0, Z)
    scores = h.dot(params["W2"]) + params["b2"]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(X.shape[0]), y] -= 1
    dscores = probs / X.shape[0]
    dh = dscores.dot(params["W2"].T) * (Z > 0)
    return {
        "W1": X.T.dot(dh) + 2 * reg * params["W1"],
        "b1": dh.sum(axis=0),
        "W2": h.T.dot(dscores) + 2 * reg * params["W2"],
        "b2": dscores.sum(axis=0),
    }


# --------------------------------------------------------------------------- 1-D θ regressions


def _regression_data(xp, device):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((9, 3))
    y = X @ np.array([0.5, -1.0, 2.0]) + 0.1 * rng.standard_normal(9)
    theta = np.array([0.3, -0.2, 0.8])
    on = (lambda a: xp.asarray(a, device=device)) if xp is not None else (lambda a: a)
    return on(X), on(y), on(theta), (X, y, theta)


def linear_regression_cost(theta, X, y):
    xp = array_namespace(theta)
    residual = X @ theta - y
    return xp.sum(residual * residual) / (2 * X.shape[0])


def logistic_regression_cost(theta, X, y):
    xp = array_namespace(theta)
    p = 1 / (1 + xp.exp(-(X @ theta)))
    labels = xp.astype(y > 0, p.dtype)
    return -xp.mean(labels * xp.log(p) + (1 - labels) * xp.log(1 - p))


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Style:
    """A cost style: ``make(xp, device)`` → (cost, params, correct grads, args)."""

    make: Callable
    backends: tuple[str, ...]  # where it applies
    broadcasts: bool = False


def _numpy_only(backend):
    return backend.name == "numpy"


def _mlp_style(cost, l2=False):
    def make(xp, device):
        args, params, grads = mlp_case(xp, device, l2=l2)
        return cost, params, grads, args

    return make


def _softmax_style(two_layer):
    def make(xp, device):
        X, y, params = _softmax_case(xp, device, two_layer)
        grads = (two_layer_grads if two_layer else softmax_grads)(params, X, y)
        return (two_layer_loss if two_layer else softmax_loss), params, grads, (X, y)

    return make


def _regression_style(kind):
    def make(xp, device):
        X, y, theta, (hX, hy, htheta) = _regression_data(xp, device)
        if kind == "linear":
            grad = hX.T @ (hX @ htheta - hy) / hX.shape[0]
            cost = linear_regression_cost
        else:
            p = 1 / (1 + np.exp(-(hX @ htheta)))
            grad = hX.T @ (p - (hy > 0)) / hX.shape[0]
            cost = logistic_regression_cost
        return cost, theta, xp.asarray(grad, device=device), (X, y)

    return make


ALL = ("numpy", "array_api_strict", "torch")
STYLES = {
    "course forward_propagation (np.dot, cache tuple)": Style(
        _mlp_style(lambda p, X, Y: forward_propagation(X, Y, p)[0]), ("numpy",)
    ),
    "compute_cost_with_regularization (np.sum(np.square(W)))": Style(
        _mlp_style(compute_cost_with_regularization, l2=True), ("numpy",)
    ),
    "np.linalg.norm(W)**2": Style(_mlp_style(cost_with_norm, l2=True), ("numpy",)),
    "xp.sum(W * W) over all axes": Style(_mlp_style(cost_with_xp_sum, l2=True), ALL),
    "float(...)": Style(_mlp_style(cost_as_float), ("numpy",)),
    "row-major with .T": Style(_mlp_style(cost_with_transposes), ("numpy",)),
    "xp.mean over everything": Style(_mlp_style(cost_mean_over_everything), ALL),
    "CS231n softmax X.dot(W) + b": Style(_softmax_style(False), ("numpy",)),
    "CS231n two-layer net": Style(_softmax_style(True), ("numpy",)),
    "linear regression, 1-D θ": Style(_regression_style("linear"), ALL),
    "logistic regression, 1-D θ": Style(_regression_style("logistic"), ALL),
}


def _make(style, backend):
    if backend.name not in style.backends:
        pytest.skip(f"written for {', '.join(style.backends)}")
    return style.make(backend.xp, backend.device)


def _buggy(grads):
    """The backprop with one element of one tensor off: grads[first][0...] + 0.1·(1 + |g|)."""
    if not isinstance(grads, dict):
        xp = array_namespace(grads)
        return grads + 0.1 * (1 + xp.abs(grads))
    first = next(iter(grads))
    xp = array_namespace(grads[first])
    return {**grads, first: grads[first] * 1.5 + 0.1}


@pytest.mark.parametrize("style", list(STYLES), ids=list(STYLES))
def test_every_style_gets_the_true_verdict_with_the_defaults(backend, style):
    cost, params, grads, args = _make(STYLES[style], backend)
    saved = snapshot(params)
    correct = gc.check(cost, params, grads, *args)
    assert correct.verdict == "pass", str(correct)
    wrong = gc.check(cost, params, _buggy(grads), *args)
    assert wrong.verdict == "fail", str(wrong)
    assert_bitwise_equal(params, saved)
    for result in correct.parameters.values():
        assert result.path in ("broadcast", "vmap", "loop")


@pytest.mark.parametrize("style", list(STYLES), ids=list(STYLES))
def test_every_style_gets_the_notebooks_verdict(backend, style):
    cost, params, grads, args = _make(STYLES[style], backend)
    assert gc.check(cost, params, grads, *args, **gc.NOTEBOOK).verdict == "pass"
    assert gc.check(cost, params, _buggy(grads), *args, **gc.NOTEBOOK).verdict == "fail"


@pytest.mark.parametrize("style", list(STYLES), ids=list(STYLES))
def test_a_style_that_does_not_broadcast_is_refused_by_mode_stacked(backend, style):
    cost, params, grads, args = _make(STYLES[style], backend)
    with pytest.raises(gc.CostError) as info:
        gc.check(cost, params, grads, *args, mode="stacked")
    message = str(info.value)
    assert "leading batch axis" in message and "mode='auto'" in message
    assert "np.sum(np.square(" in message and "np.dot" in message and ".T" in message


def test_a_broadcast_that_sums_over_the_batch_is_caught_not_misjudged():
    """The issue's silent misjudgement: shape (B,), wrong numbers. Never used batched."""
    (X, Y), params, grads = mlp_case(NP, None, l2=True)
    report = gc.check(compute_cost_with_regularization, params, grads, X, Y)
    assert report.verdict == "pass"
    for name in ("W1", "W2", "W3"):
        result = report.parameters[name]
        assert result.path == "loop"
        assert "batched values differ from single calls at J(" in result.path_reason
    # The report's line is short (issue 19): it names the paths; why is in each path_reason.
    line = next(line for line in str(report).splitlines() if line.startswith("evaluation: "))
    assert "W1, W2, W3 loop" in line and "path_reason" in line and "differ from single calls" not in line
    notebook = gc.check(compute_cost_with_regularization, params, grads, X, Y, **gc.NOTEBOOK)
    assert notebook.passed and notebook.difference < 2e-7
    with pytest.raises(gc.CostError) as info:
        gc.check(compute_cost_with_regularization, params, grads, X, Y, mode="stacked")
    message = str(info.value)
    assert "parameter 'W1' of shape (5, 4)" in message and "differ from single calls" in message
    assert "shape (B, 5, 4)" in message and "np.sum(np.square(W1))" in message


def test_np_dot_on_batched_weights_fails_small_and_falls_back():
    (X, Y), params, grads = mlp_case(NP, None)
    shapes = []

    def cost(p, X, Y):
        shapes.extend(v.shape[0] for v in p.values() if v.ndim == 3)
        return forward_propagation(X, Y, p)[0]

    report = gc.check(cost, params, grads, X, Y)
    assert report.passed
    assert max(shapes) == 2  # only the 2-row probe is ever batched: no B×B products
    assert all(r.path == "loop" for r in report.parameters.values())


def test_a_cost_that_forgets_return_is_told_so(backend):
    (X, Y), params, grads = mlp_case(backend.xp, backend.device)

    def cost(p, X, Y):
        mlp.cost(p, X, Y)

    with pytest.raises(gc.CostError, match=r"returned None .*forget `return`"):
        gc.check(cost, params, grads, X, Y)


def test_a_cost_raising_on_one_point_is_its_own_error_not_a_batching_essay(backend):
    (X, Y), params, grads = mlp_case(backend.xp, backend.device)

    def cost(p, X, Y):
        return mlp.cost(p, X, Y) + p["W4"]  # a KeyError, batched or not

    for mode in ("auto", "stacked"):
        with pytest.raises(gc.CostError) as info:
            gc.check(cost, params, grads, X, Y, mode=mode)
        message = str(info.value)
        assert "KeyError" in message and "leading batch axis" not in message
        assert isinstance(info.value.__cause__, KeyError)


def test_mode_vmap_is_for_torch_and_jax_only():
    (X, Y), params, grads = mlp_case(NP, None)
    with pytest.raises(gc.CostError, match=r"mode='vmap' needs PyTorch or JAX"):
        gc.check(mlp.cost, params, grads, X, Y, mode="vmap")


# --------------------------------------------------------------------------- no false downgrade


def test_the_projects_models_stay_broadcast(backend):
    (X, Y), params, grads = mlp_case(backend.xp, backend.device)
    for options in ({}, gc.NOTEBOOK, {"mode": "directions"}, {"sample": 3}, {"memory_budget": 20 * 8}):
        report = gc.check(mlp.cost, params, grads, X, Y, **options)
        assert report.passed or options.get("mode") == "directions", options
        for result in report.parameters.values():
            assert (result.path, result.path_reason) == ("broadcast", ""), (options, result.name)
        assert "evaluation:" not in str(report)
    xp = backend.xp
    theta = xp.asarray([1.0, -2.0, 0.5], device=backend.device)
    x = xp.asarray([3.0, 1.0, 2.0], device=backend.device)
    report = gc.check(linear.cost, theta, linear.gradient(theta, x), x)
    assert report.parameters["theta"].path == "broadcast" and report.passed


def test_mlp_batched_and_single_costs_agree_bitwise_on_numpy():
    from gcbackend import evaluation

    (X, Y), params, _ = mlp_case(NP, None)
    paths = {}
    evaluation.central_differences(
        mlp.cost,
        params,
        (X, Y),
        layout=gc.params.Layout.of(params),
        epsilon=1e-7,
        xp=NP,
        mode="stacked",
        memory_budget=20 * 8,
        paths=paths,
    )
    assert {name: (p.name, p.discrepancy) for name, p in paths.items()} == {
        name: ("broadcast", 0.0) for name in params
    }


# --------------------------------------------------------------------------- inputs the cost cannot corrupt


@pytest.mark.parametrize("mode", ["loop", "auto", "stacked"])
def test_a_cost_writing_into_its_inputs_never_corrupts_the_verdict(backend, mode):
    if backend.name not in ("numpy", "torch", "array_api_strict"):
        pytest.skip("needs in-place writes through the arrays the cost receives")
    (X, Y), params, grads = mlp_case(backend.xp, backend.device)
    saved = snapshot(params), snapshot(X)

    def cost(p, X, Y):
        J = mlp.cost(p, X, Y)
        for value in p.values():
            value *= 0  # a buggy cost that reuses its inputs as scratch space
        X *= 2
        return J

    report = gc.check(cost, params, grads, X, Y, mode=mode)
    assert report.verdict == "pass", str(report)
    assert report.difference < 1e-6
    assert_bitwise_equal(params, saved[0])
    assert_bitwise_equal(X, saved[1])
    assert all(
        r.path == "loop" and "writes into the arrays" in r.path_reason for r in report.parameters.values()
    )
    buggy = gc.check(cost, params, _buggy(grads), X, Y, mode=mode)
    assert buggy.verdict == "fail"


def test_workers_thread_the_loop_and_give_the_same_report():
    (X, Y), params, grads = mlp_case(NP, None, l2=True)
    one = gc.check(compute_cost_with_regularization, params, grads, X, Y)
    two = gc.check(compute_cost_with_regularization, params, grads, X, Y, workers=2)
    assert "chunks of rows evaluated on 2 threads (BLAS on 1 thread each)" in two.notes
    assert two.difference == one.difference
    assert [r.path for r in two.parameters.values()] == [r.path for r in one.parameters.values()]


# --------------------------------------------------------------------------- torch and JAX


def test_torch_f_linear_is_vmapped():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    Y = (torch.rand(16, 1, generator=gen) > 0.5).to(torch.float64)
    params = {
        "W1": torch.randn(5, 6, generator=gen, dtype=torch.float64) * 0.5,
        "b1": torch.randn(5, generator=gen, dtype=torch.float64) * 0.1,
        "W2": torch.randn(1, 5, generator=gen, dtype=torch.float64) * 0.5,
        "b2": torch.randn(1, generator=gen, dtype=torch.float64) * 0.1,
    }

    def cost(p, X, Y):
        h = torch.tanh(F.linear(X, p["W1"], p["b1"]))
        return F.binary_cross_entropy(torch.sigmoid(F.linear(h, p["W2"], p["b2"])), Y)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    cost(leaves, X, Y).backward()
    grads = {k: v.grad.detach() for k, v in leaves.items()}
    report = gc.check(cost, params, grads, X, Y)
    assert report.passed, str(report)
    assert {r.path for r in report.parameters.values()} == {"vmap"}
    assert "broadcast:" in report.parameters["W1"].path_reason
    assert gc.check(cost, params, _buggy(grads), X, Y).verdict == "fail"
    with pytest.raises(gc.CostError):
        gc.check(cost, params, grads, X, Y, mode="stacked")
    assert gc.check(cost, params, grads, X, Y, mode="vmap").passed


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'gcbackend[test]')")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def test_a_jax_cost_with_jnp_mean_is_vmapped(jax_x64):
    jax = jax_x64
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.standard_normal((6, 20)))
    Y = jnp.asarray((rng.random((1, 20)) > 0.5).astype(np.float64))
    params = {
        "W1": jnp.asarray(0.5 * rng.standard_normal((4, 6))),
        "b1": jnp.asarray(0.1 * rng.standard_normal((4, 1))),
        "W2": jnp.asarray(0.5 * rng.standard_normal((1, 4))),
        "b2": jnp.asarray(0.1 * rng.standard_normal((1, 1))),
    }

    def cost(p, X, Y):
        A = jnp.tanh(p["W1"] @ X + p["b1"])
        out = jax.nn.sigmoid(p["W2"] @ A + p["b2"])
        return -jnp.mean(Y * jnp.log(out) + (1 - Y) * jnp.log(1 - out))

    grads = jax.grad(cost)(params, X, Y)
    report = gc.check(cost, params, grads, X, Y)
    assert report.passed, str(report)
    assert {r.path for r in report.parameters.values()} == {"vmap"}
    assert gc.check(cost, params, _buggy(grads), X, Y).verdict == "fail"
    assert math.isclose(
        gc.check(cost, params, grads, X, Y, mode="loop").difference,
        report.difference,
        rel_tol=1e-3,
        abs_tol=1e-9,
    )


def test_report_line_names_the_path_and_why():
    (X, Y), params, grads = mlp_case(NP, None)
    report = gc.check(cost_mean_over_everything, params, grads, X, Y)
    line = next(line for line in str(report).splitlines() if line.startswith("evaluation: "))
    assert "loop" in line and "W1" in line and len(line) < 120  # one short line, never cut mid-word
    assert report.parameters["W1"].path_reason.startswith("broadcast: ")
    assert host(report.parameters["W1"].numeric_grad).shape == (5, 4)


def test_an_accepted_discrepancy_widens_the_error_bars_not_the_verdict():
    """A cost whose batched values differ from single ones by a hair (1e-14·|J|, within the
    agreement bound) is used batched, and that hair is in every error bar (d/h)."""
    (X, Y), params, grads = mlp_case(NP, None)

    def cost(p, X, Y):
        J = mlp.cost(p, X, Y)
        batched = any(v.ndim == 3 for v in p.values())
        return J * (1 + 1e-14) if batched else J

    plain = gc.check(mlp.cost, params, grads, X, Y)
    hair = gc.check(cost, params, grads, X, Y)
    assert hair.passed and {r.path for r in hair.parameters.values()} == {"broadcast"}
    for name in params:
        assert hair.parameters[name].expected > plain.parameters[name].expected, name
    # ... while a difference beyond the bound is never used batched.
    gross = gc.check(
        lambda p, X, Y: cost(p, X, Y) * (1 + 1e-10 * any(v.ndim == 3 for v in p.values())),
        params,
        grads,
        X,
        Y,
    )
    assert gross.passed and {r.path for r in gross.parameters.values()} == {"loop"}


def test_a_cost_that_broadcasts_right_only_at_some_batch_sizes_is_caught():
    """Verified on its first chunks, wrong at a later batch size (4 rows): never trusted there."""
    (X, Y), params, grads = mlp_case(NP, None)

    def cost(p, X, Y):
        J = mlp.cost(p, X, Y)
        return J * 1.5 if any(v.ndim == 3 and v.shape[0] == 4 for v in p.values()) else J

    budget = (
        8 * 15 * 8 * gc.evaluation.ROW_FOOTPRINT
    )  # 8 rows of W2 (15 elements) per call: its 60 rows end with a call of 4
    report = gc.check(cost, params, grads, X, Y, memory_budget=budget)
    assert report.passed, str(report)
    assert report.parameters["W2"].path == "loop"
    assert "(batch of 4)" in report.parameters["W2"].path_reason
    assert report.parameters["b1"].path == "broadcast"
    # (b3's 4 rows are its first chunk: refused at its own verification, before W2's last call)
    with pytest.raises(gc.CostError, match=r"parameter 'b3' of shape \(1, 1\).* in a batch of 4 rows"):
        gc.check(cost, params, grads, X, Y, memory_budget=budget, mode="stacked")


def test_a_looped_cost_returning_a_view_of_its_inputs_keeps_its_own_values(backend):
    # The loop perturbs one reused vector in place: a result that is a view of it (J = w[0])
    # must be copied before the element is written back.
    xp = backend.xp
    w = xp.asarray([0.5, -1.0, 2.0], dtype=xp.float64, device=backend.device)
    grad = xp.asarray([1.0, 0.0, 0.0], dtype=xp.float64, device=backend.device)
    report = gc.check(lambda theta: theta[..., 0], w, grad, mode="loop", **gc.NOTEBOOK)
    assert report.passed and report.difference < 1e-9
    assert host(report.parameters["theta"].numeric_grad).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-8)


def _rebinding_cost(p, X, Y):
    """Writes a defensive copy back into the params it receives, and returns a float (loops)."""
    p["W"] = np.array(p["W"])
    return 0.5 * float(np.sum((X @ p["W"] - Y) ** 2))


def test_a_cost_that_rebinds_an_entry_of_its_params_is_judged_right():
    # The loop hands every call a new container: the rebound (stale) array never reaches
    # the next row, where it froze J and an all-zero gradient "passed".
    rng = np.random.default_rng(0)
    X, Y, W = rng.standard_normal((5, 3)), rng.standard_normal(5), rng.standard_normal(3)
    correct = X.T @ (X @ W - Y)
    assert gc.check(_rebinding_cost, {"W": W}, {"W": correct}, X, Y).verdict == "pass"
    zero = gc.check(_rebinding_cost, {"W": W}, {"W": np.zeros(3)}, X, Y)
    assert zero.verdict == "fail" and zero.faults == ("W",)
    assert zero.parameters["W"].path == "loop"


def test_a_cost_scribbling_into_a_list_of_params_leaves_the_check_intact():
    # J(θ) too gets copies in the user's structure (a list here), so a cost that writes into
    # its parameters cannot move θ under the later rows.
    rng = np.random.default_rng(1)
    X, W, b = rng.standard_normal((5, 3)), rng.standard_normal(3), np.array([0.3])
    saved = W.copy()

    def cost(p, X):
        weights, bias = p
        value = 0.5 * float(np.sum((X @ weights + bias) ** 2))
        weights *= 1.5
        return value

    residual = X @ W + b
    grads = [X.T @ residual, np.array([residual.sum()])]
    assert gc.check(cost, [W, b], grads, X).verdict == "pass"
    grads[0] = grads[0] * 1.01
    assert gc.check(cost, [W, b], grads, X).faults == ("[0]",)
    assert np.array_equal(W, saved)
