"""models: the notebook's data, costs that broadcast over a batch axis, correct backprop."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_on, host

import gcbackend as gc
from gcbackend.models import linear, mlp


def test_seed_case_is_the_notebooks_data():
    X, Y, params = mlp.seed_case()
    assert list(params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    shapes = [(5, 4), (5, 1), (3, 5), (3, 1), (1, 3), (1, 1)]
    assert [p.shape for p in params.values()] == shapes
    # np.random.seed(1); randn(...) — the first draws are the well-known 1.62434536, -0.61175641, ...
    assert X.shape == (4, 3) and X.dtype == np.float64
    np.testing.assert_allclose(X[0], [1.62434536, -0.61175641, -0.52817175], rtol=0, atol=5e-9)
    assert Y.tolist() == [1.0, 1.0, 0.0] and Y.dtype == np.float64
    # randn draws continue in order: W1 starts with the 13th draw of seed 1.
    draws = np.random.RandomState(1).randn(12 + 20 + 5 + 15)
    np.testing.assert_array_equal(params["W1"].ravel(), draws[12:32])
    np.testing.assert_array_equal(params["b1"].ravel(), draws[32:37])
    np.testing.assert_array_equal(params["W2"].ravel(), draws[37:52])


def test_seed_case_leaves_the_global_random_stream_alone():
    np.random.seed(123)
    before = np.random.get_state()
    X, _, params = mlp.seed_case()
    after = np.random.get_state()
    assert after[0] == before[0] and after[2:] == before[2:]
    np.testing.assert_array_equal(after[1], before[1])
    # The same numbers as the notebook's np.random.seed(1); randn(...) in its order.
    np.random.seed(1)
    np.testing.assert_array_equal(X, np.random.randn(4, 3))
    for name, value in params.items():
        np.testing.assert_array_equal(value, np.random.randn(*value.shape), err_msg=name)


def test_seed_case_on_a_backend(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    for array in (X, Y, *params.values()):
        assert_on(array, backend)
    assert float(host(mlp.cost(params, X, Y))) == pytest.approx(float(mlp.cost(*_np_seed())), rel=1e-15)


def _np_seed():
    X, Y, params = mlp.seed_case()
    return params, X, Y


def test_cost_matches_the_notebook_forward_pass():
    params, X, Y = _np_seed()

    def relu(x):
        return np.maximum(0, x)

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    Z1 = np.dot(params["W1"], X) + params["b1"]
    A2 = relu(np.dot(params["W2"], relu(Z1)) + params["b2"])
    A3 = sigmoid(np.dot(params["W3"], A2) + params["b3"])
    log_probs = np.multiply(-np.log(A3), Y) + np.multiply(-np.log(1 - A3), 1 - Y)
    expected = 1.0 / 3 * np.sum(log_probs)
    assert float(mlp.cost(params, X, Y)) == pytest.approx(expected, rel=1e-15)


def test_cost_broadcasts_over_a_batch_axis(backend):
    xp = backend.xp
    X, Y, params = mlp.random_case([5, 4, 3, 1], 6, seed=2, xp=xp, device=backend.device)
    scales = [1.0, 0.5, -0.25]
    for name in ("W1", "b2", "W3"):
        batch = xp.stack([params[name] * s for s in scales])
        costs = mlp.cost({**params, name: batch}, X, Y)
        assert tuple(costs.shape) == (3,)
        assert_on(costs, backend)
        for i, s in enumerate(scales):
            single = mlp.cost({**params, name: params[name] * s}, X, Y)
            assert float(host(costs)[i]) == pytest.approx(float(host(single)), rel=1e-12)
    everything = mlp.cost({k: xp.stack([v, v]) for k, v in params.items()}, X, Y)
    assert tuple(everything.shape) == (2,)


def test_backward_is_correct_and_bugs_are_planted(backend):
    xp = backend.xp
    X, Y, params = mlp.random_case([7, 6, 5, 1], 10, seed=4, xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    assert list(grads) == list(params)
    report = gc.check(mlp.cost, params, grads, X, Y, epsilon=1e-5, threshold=1e-7)
    assert report.passed, str(report)
    buggy = mlp.backward_with_planted_bugs(params, X, Y)
    np.testing.assert_allclose(host(buggy["W2"]), 2 * host(grads["W2"]), rtol=1e-15)
    np.testing.assert_allclose(host(buggy["b1"]), 4 * host(grads["b1"]), rtol=1e-15)
    for name in ("W1", "b2", "W3", "b3"):
        assert host(buggy[name]).tobytes() == host(grads[name]).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_init_shapes_and_dtypes(backend, dtype):
    params = mlp.init([3, 8, 2, 1], seed=7, dtype=dtype, xp=backend.xp, device=backend.device)
    assert [tuple(p.shape) for p in params.values()] == [(8, 3), (8, 1), (2, 8), (2, 1), (1, 2), (1, 1)]
    for p in params.values():
        assert_on(p, backend)
        assert str(p.dtype).endswith(dtype)
    again = mlp.init([3, 8, 2, 1], seed=7, dtype=dtype)
    assert host(params["W2"]).tobytes() == again["W2"].tobytes()
    assert np.any(host(params["b1"]) != 0)
    with pytest.raises(ValueError, match="layer_dims"):
        mlp.init([3])


def test_linear_model(backend):
    xp = backend.xp
    theta = xp.asarray([1.0, 2.0, 3.0], dtype=xp.float64, device=backend.device)
    x = xp.asarray([4.0, 5.0, 6.0], dtype=xp.float64, device=backend.device)
    assert float(host(linear.cost(theta, x))) == 32.0
    assert host(linear.gradient(theta, x)).tolist() == [4.0, 5.0, 6.0]
    batch = linear.cost(xp.stack([theta, 2 * theta]), x)
    assert host(batch).tolist() == [32.0, 64.0]
    assert linear.cost(4.0, 2) == 8.0 and linear.gradient(4, 3) == 3
    report = gc.check(linear.cost, theta, linear.gradient(theta, x), x)
    assert report.passed and report.parameters["theta"].shape == (3,)


# Dropout: masks drawn once, shared by every stacked row and by the backward pass.

KEEP_PROB = 0.8


def _dropout_case(backend, seed=5):
    X, Y, params = mlp.random_case([6, 5, 4, 1], 12, seed=seed, xp=backend.xp, device=backend.device)
    masks = mlp.dropout_masks(params, 12, KEEP_PROB, seed=seed)
    return X, Y, params, masks


def test_dropout_masks_are_seeded_0_1_and_on_the_backend(backend):
    xp = backend.xp
    state = np.random.get_state()
    masks = mlp.dropout_masks([6, 5, 4, 1], 12, KEEP_PROB, 3, xp=xp, device=backend.device)
    assert np.random.get_state()[1].tobytes() == state[1].tobytes()  # the user's global RNG is untouched
    assert list(masks) == ["D1", "D2"]
    assert [tuple(d.shape) for d in masks.values()] == [(5, 12), (4, 12)]
    expected = np.random.default_rng(3)
    for mask in masks.values():
        assert_on(mask, backend)
        assert mask.dtype == xp.float64
        drawn = expected.random(tuple(mask.shape)) < KEEP_PROB
        assert host(mask).tolist() == drawn.astype(float).tolist()
    # From parameters: their namespace, device and dtype; the same draws as from layer sizes.
    params = mlp.init([6, 5, 4, 1], seed=0, dtype="float32", xp=xp, device=backend.device)
    again = mlp.dropout_masks(params, 12, KEEP_PROB, 3)
    for name, mask in again.items():
        assert_on(mask, backend)
        assert mask.dtype == xp.float32
        assert host(mask).tolist() == host(masks[name]).tolist()
    ones = mlp.dropout_masks([6, 5, 4, 1], 12, 1.0, 3)
    assert all(np.all(d == 1.0) for d in ones.values())
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="keep_prob"):
            mlp.dropout_masks([6, 5, 1], 12, bad, 3)


def test_cost_with_dropout_is_the_courses_inverted_dropout():
    X, Y, params = mlp.random_case([6, 5, 4, 1], 12, seed=5)
    masks = mlp.dropout_masks(params, 12, KEEP_PROB, seed=5)

    def relu(x):
        return np.maximum(0, x)

    # The course's forward_propagation_with_dropout, step by step.
    A1 = relu(np.dot(params["W1"], X) + params["b1"])
    A1 = A1 * masks["D1"]
    A1 = A1 / KEEP_PROB
    A2 = relu(np.dot(params["W2"], A1) + params["b2"])
    A2 = A2 * masks["D2"]
    A2 = A2 / KEEP_PROB
    A3 = 1 / (1 + np.exp(-(np.dot(params["W3"], A2) + params["b3"])))
    expected = 1.0 / 12 * np.sum(np.multiply(-np.log(A3), Y) + np.multiply(-np.log(1 - A3), 1 - Y))
    assert float(mlp.cost(params, X, Y, keep_prob=KEEP_PROB, masks=masks)) == pytest.approx(
        expected, rel=1e-14
    )
    # seed= draws the same masks as dropout_masks(params, m, keep_prob, seed).
    assert mlp.cost(params, X, Y, keep_prob=KEEP_PROB, seed=5) == mlp.cost(
        params, X, Y, keep_prob=KEEP_PROB, masks=masks
    )
    # keep_prob=1 without masks is the plain cost, bit for bit.
    assert mlp.cost(params, X, Y, keep_prob=1.0) == mlp.cost(params, X, Y)


def test_dropout_needs_fixed_masks_of_the_right_shapes():
    X, Y, params = mlp.random_case([6, 5, 4, 1], 12, seed=5)
    with pytest.raises(ValueError, match="fixed masks"):
        mlp.cost(params, X, Y, keep_prob=KEEP_PROB)
    with pytest.raises(ValueError, match="fixed masks"):
        mlp.backward(params, X, Y, keep_prob=KEEP_PROB)
    wrong = mlp.dropout_masks([6, 5, 4, 1], 11, KEEP_PROB, 0)
    with pytest.raises(ValueError, match=r"\(n_l, m\)"):
        mlp.cost(params, X, Y, keep_prob=KEEP_PROB, masks=wrong)


def test_dropout_backprop_passes_and_the_planted_dropout_bug_fails(backend):
    X, Y, params, masks = _dropout_case(backend)
    cost = functools.partial(mlp.cost, keep_prob=KEEP_PROB, masks=masks)
    grads = mlp.backward(params, X, Y, keep_prob=KEEP_PROB, masks=masks)
    for grad in grads.values():
        assert_on(grad, backend)
    report = gc.check(cost, params, grads, X, Y, epsilon=1e-6, threshold=1e-6)
    assert report.passed and not report.faults, str(report)
    # Dropout really changed the gradients (a check of the plain backprop would not pass).
    plain = mlp.backward(params, X, Y)
    assert not np.allclose(host(plain["W1"]), host(grads["W1"]))

    buggy = mlp.backward_with_dropout_bug(params, X, Y, keep_prob=KEEP_PROB, masks=masks)
    report = gc.check(cost, params, buggy, X, Y, epsilon=1e-6, threshold=1e-6)
    assert not report.passed
    assert set(report.faults) == {"W1", "b1", "W2", "b2"}, str(report)  # the hidden layers; W3, b3 are right
    # Forgetting 1/keep_prob once per hidden layer above: layer 2 is short by keep_prob, layer 1 by keep_prob².
    np.testing.assert_allclose(host(buggy["W2"]), KEEP_PROB * host(grads["W2"]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(host(buggy["W1"]), KEEP_PROB**2 * host(grads["W1"]), rtol=1e-12, atol=1e-15)
    same = mlp.backward(params, X, Y, keep_prob=KEEP_PROB, masks=masks, bugs={"dropout_scale": True})
    assert host(same["W1"]).tobytes() == host(buggy["W1"]).tobytes()


def test_dropout_mask_is_the_same_in_every_stacked_row(backend):
    xp = backend.xp
    X, Y, params, masks = _dropout_case(backend)
    # The cost of a stack of parameter sets is the cost of each, under the same masks.
    scales = [1.0, 0.5, -0.25]
    batch = xp.stack([params["W2"] * s for s in scales])
    costs = mlp.cost({**params, "W2": batch}, X, Y, keep_prob=KEEP_PROB, masks=masks)
    assert tuple(costs.shape) == (3,)
    for i, s in enumerate(scales):
        single = mlp.cost({**params, "W2": params["W2"] * s}, X, Y, keep_prob=KEEP_PROB, masks=masks)
        assert float(host(costs)[i]) == pytest.approx(float(host(single)), rel=1e-12)
    # One stacked pass per tensor agrees with the notebook's 2N separate calls.
    cost = functools.partial(mlp.cost, keep_prob=KEEP_PROB, masks=masks)
    grads = mlp.backward(params, X, Y, keep_prob=KEEP_PROB, masks=masks)
    stacked = gc.check(cost, params, grads, X, Y, epsilon=1e-6, threshold=1e-6, mode="stacked")
    looped = gc.check(cost, params, grads, X, Y, epsilon=1e-6, threshold=1e-6, mode="loop")
    for name in params:
        np.testing.assert_allclose(
            host(stacked.parameters[name].numeric_grad),
            host(looped.parameters[name].numeric_grad),
            rtol=0,
            atol=1e-9,
        )
