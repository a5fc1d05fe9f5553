"""Verdicts (issue 4): auto steps and thresholds, localisation, float32, kinks, order 4,
the fast screen and the sampled check — on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import host

import gcbackend as gc
from gcbackend import differences
from gcbackend.models import mlp

# J's rounding is measured along random directions (5 points each) once stencils are needed.
_ROUNDING = 4 * differences.ROUNDING_DIRECTIONS


def _seed(backend):
    return mlp.seed_case(xp=backend.xp, device=backend.device)


@pytest.mark.parametrize("options", [{}, {"mode": "directions"}, {"mode": "loop"}, {"order": 4}])
def test_planted_bugs_fail_and_only_they(backend, options):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, **options)
    assert report.verdict == "fail" and not report.passed
    assert report.faults == ("b1", "W2")
    for name in ("W1", "b2", "W3", "b3"):
        assert report.parameters[name].verdict == "pass", (name, str(report))
    assert report.parameters["b1"].difference == pytest.approx(0.6, rel=1e-6)
    assert report.parameters["W2"].difference == pytest.approx(1 / 3, rel=1e-6)


def test_correct_backprop_passes_with_a_wide_margin(backend):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y)
    assert report.verdict == "pass"
    for result in report.parameters.values():
        assert result.verdict == "pass"
        # ≥ 100× below the notebook's 2e-7 threshold, and below our own noise-based one.
        assert result.difference <= 2e-7 / 100
        assert result.difference <= result.threshold
        assert result.expected is not None and result.expected < 1e-8
    assert report.expected is not None and report.difference <= report.threshold
    assert "threshold=auto" in str(report)


def test_top_k_localises_the_planted_bug(backend):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, top_k=3)
    top = report.parameters["b1"].top
    assert len(top) == 3
    assert top[0].index == (0, 0) and top[0].index == report.parameters["b1"].worst_index
    # Worst first by how far each is beyond its own tolerance (|error| / tolerance), not by |error|.
    assert [e.absolute / e.tolerance for e in top] == sorted(
        (e.absolute / e.tolerance for e in top), reverse=True
    )
    for e in top:  # db1 = 4× the truth: relative error 3/4 wherever the gradient is nonzero
        assert e.analytic == pytest.approx(4 * e.numeric, rel=1e-6)
        assert e.relative == pytest.approx(0.75, rel=1e-6)
    assert "b1[0, 0]: analytic" in str(report)


def test_top_k_orders_each_parameter_worst_first_and_ties_by_index(backend):
    # J = Σ θ over three tensors, halves and a step of 2⁻¹⁰: every J(θ ± h) is exact, so every
    # finite difference is exactly 1 and the errors are exactly what the gradients plant:
    # ties everywhere, which the top-k (two sorts over all parameters at once) must break by
    # index within each parameter, as a sort of that parameter alone would.
    xp, where = backend.xp, backend.device
    shapes = {"A": (2, 3), "B": (4,), "C": (3, 2)}
    params = {k: xp.full(s, 0.5, dtype=xp.float64, device=where) for k, s in shapes.items()}
    planted = {"A": {}, "B": {3: 0.25, 1: 0.25, 2: 0.5}, "C": {5: 0.125}}
    grads = {}
    for name, shape in shapes.items():
        flat = np.ones(int(np.prod(shape)))
        for i, extra in planted[name].items():
            flat[i] += extra
        grads[name] = xp.asarray(flat.reshape(shape), device=where)

    def cost(p):
        return sum(xp.sum(v, axis=tuple(range(-len(shapes[k]), 0))) for k, v in p.items())

    report = gc.check(cost, params, grads, epsilon=2.0**-10, threshold=1e-3, top_k=4)
    order = {name: [e.index for e in result.top] for name, result in report.parameters.items()}
    assert order == {
        "A": [(0, 0), (0, 1), (0, 2), (1, 0)],
        "B": [(2,), (1,), (3,), (0,)],
        "C": [(2, 1), (0, 0), (0, 1), (1, 0)],
    }
    assert [e.absolute for e in report.parameters["B"].top] == [0.5, 0.25, 0.25, 0.0]
    assert report.parameters["A"].difference == 0.0 and report.parameters["A"].verdict == "pass"
    assert report.faults == ("B", "C")


@pytest.mark.parametrize(
    ("dims", "m", "seed"), [([30, 20, 1], 16, 0), ([8, 16, 8, 1], 32, 1), ([50, 10, 5, 1], 8, 2)]
)
def test_float32_no_false_alarm_with_the_defaults(backend, dims, m, seed):
    X, Y, params = mlp.random_case(dims, m, seed=seed, dtype="float32", xp=backend.xp, device=backend.device)
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y)
    assert report.verdict == "pass", str(report)
    assert report.dtype == "float32"
    assert any("evaluated in float64" in note for note in report.notes)


def test_float32_single_wrong_element_is_caught_and_located(backend):
    X, Y, params = mlp.random_case(
        [100, 100, 1], 8, seed=5, dtype="float32", xp=backend.xp, device=backend.device
    )
    grads = dict(mlp.backward(params, X, Y))
    wrong = host(grads["W1"]).copy()  # W1 has 10⁴ elements
    magnitudes = np.abs(wrong)
    index = np.unravel_index(np.argsort(magnitudes, axis=None)[len(magnitudes.ravel()) // 2], wrong.shape)
    wrong[index] *= np.float32(1.01)  # relative error 1e-2 at a median-sized element
    grads["W1"] = wrong
    report = gc.check(mlp.cost, params, grads, X, Y, backend=backend.xp, device=backend.device)
    assert report.verdict == "fail"
    assert report.faults == ("W1",)
    assert report.parameters["W1"].worst_index == tuple(int(i) for i in index)


def _kinked_case(backend):
    """A ReLU net whose hidden unit 1 has pre-activation exactly 0 on example 0 (dyadic data)."""
    xp = backend.xp
    X = np.array([[1.0, 2.0, -1.0], [3.0, -1.0, 2.0]])
    W1 = np.array([[0.5, -0.25], [0.25, 0.5], [-0.5, 0.75]])
    b1 = np.array([[0.125], [-(0.25 * 1.0 + 0.5 * 3.0)], [0.25]])  # unit 1: Z = 0 exactly at example 0
    W2 = np.array([[0.75, -0.5, 0.5]])
    b2 = np.array([[-0.125]])
    Y = np.array([[1.0, 0.0, 1.0]])
    params = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    moved = {k: xp.asarray(v, device=backend.device) for k, v in params.items()}
    return xp.asarray(X, device=backend.device), xp.asarray(Y, device=backend.device), moved


def test_kink_is_judged_as_a_subgradient(backend):
    X, Y, params = _kinked_case(backend)
    assert float(host(mlp.forward(params, X)[0][0])[1, 0]) == 0.0
    grads = mlp.backward(params, X, Y)
    report = gc.check(mlp.cost, params, grads, X, Y)
    assert report.verdict == "pass", str(report)
    kinks = {(name, index) for name, r in report.parameters.items() for index in r.kinks}
    assert ("b1", (1, 0)) in kinks and ("W1", (1, 0)) in kinks and ("W1", (1, 1)) in kinks
    assert all(name in ("W1", "b1") and index[0] == 1 for name, index in kinks)
    assert "at a kink, judged as subgradients" in str(report)
    # The notebook's way cannot: at the kink the central difference averages the slopes.
    notebook = gc.check(mlp.cost, params, grads, X, Y, epsilon=1e-7, threshold=2e-7)
    assert notebook.parameters["b1"].verdict == "fail"


def test_wrong_gradient_away_from_the_kink_still_fails(backend):
    X, Y, params = _kinked_case(backend)
    grads = dict(mlp.backward(params, X, Y))
    bad = host(grads["W2"]).copy()
    bad[0, 0] += 0.01
    grads["W2"] = bad
    report = gc.check(mlp.cost, params, grads, X, Y, backend=backend.xp, device=backend.device)
    assert report.verdict == "fail" and report.faults == ("W2",)
    assert report.parameters["W2"].worst_index == (0, 0)


def _near_kink(backend, distance):
    """J = |θ₀ − c| + Σ sin θᵢ (i ≥ 1), the kink ``distance`` auto steps above θ₀ = 1.

    Returns θ, c, the cost and its gradient."""
    xp = backend.xp
    values = [1.0, -0.5, 0.25, 2.0, 0.1, -1.2, 0.7, 0.3]
    theta = xp.asarray(values, dtype=xp.float64, device=backend.device)
    h = float(host(differences.auto_steps({"t": theta}, order=2, xp=xp)["t"])[0])
    c = xp.asarray(1.0 + distance * h, dtype=xp.float64, device=backend.device)

    def cost(t, c):
        return xp.abs(t[..., 0] - c) + xp.sum(xp.sin(t[..., 1:]), axis=-1)

    grad = xp.asarray(
        [-1.0] + [float(np.cos(v)) for v in values[1:]], dtype=xp.float64, device=backend.device
    )
    return theta, c, cost, grad, h


def test_a_kink_crossed_within_2h_is_refined_not_averaged(backend):
    """A kink between θ + h and θ + 2h spoils D(2h): θ₀'s error bar would be ~0.08 and the
    threshold with it. Such elements are evaluated again with REFINE_FACTOR× smaller steps."""
    theta, c, cost, grad, h = _near_kink(backend, 1.5)
    report = gc.check(cost, theta, grad, c)
    assert report.verdict == "pass", str(report)
    assert report.expected < 1e-8 and report.difference < 1e-9
    # Five points per element (8 elements, one call), J(θ) twice, J's rounding along random
    # directions, and θ₀ alone again at h/10.
    assert report.evaluations == 4 * 8 + 2 + _ROUNDING + 4 * 1
    assert any("1 value(s) evaluated again at smaller steps" in n for n in report.notes)
    # A gradient 1 % off right next to the kink: the refined error bar catches it.
    scale = backend.xp.asarray([0.99] + [1.0] * 7, dtype=backend.xp.float64, device=backend.device)
    wrong = gc.check(cost, theta, grad * scale, c)
    assert wrong.verdict == "fail" and wrong.parameters["theta"].worst_index == (0,)
    # With the user's own step nothing is re-evaluated, and the error bar stays wide.
    fixed = gc.check(cost, theta, grad * scale, c, epsilon=h)
    assert fixed.evaluations == 4 * 8 + 2 + _ROUNDING and fixed.parameters["theta"].verdict != "fail"


def test_fast_screen_refines_directions_that_cross_a_kink(backend):
    # The kink 1.6·h₀ above θ₀; rows are u·max(h) = 2h₀·u, so the unit directions with
    # |u₀| > 0.4 cross it within ±2 rows (2 of these 8: the other 6 still measure δ), and
    # none within ±2 rows / 100.
    theta, c, cost, grad, _ = _near_kink(backend, 1.6)
    report = gc.check(cost, theta, grad, c, mode="directions", directions=8)
    assert report.verdict == "pass", str(report)
    assert report.difference < 1e-8
    assert report.evaluations > 4 * 8 + 1
    assert any("evaluated again" in note for note in report.notes)
    scale = backend.xp.asarray([0.99] + [1.0] * 7, dtype=backend.xp.float64, device=backend.device)
    assert gc.check(cost, theta, grad * scale, c, mode="directions", directions=8).verdict == "fail"


def test_no_refinement_away_from_kinks(backend):
    theta, c, cost, grad, _ = _near_kink(backend, 1000.0)
    report = gc.check(cost, theta, grad, c)
    assert report.verdict == "pass" and report.evaluations == 4 * 8 + 2 + _ROUNDING
    assert not any("evaluated again" in note for note in report.notes)


def test_mid_size_relu_net_keeps_a_tight_threshold(backend):
    """ReLU units crossing zero within ±2h used to inflate the rounding estimate δ (and so
    every error bar) a million-fold: threshold 5e-3 on the bench's M model. Now δ leaves
    gross outliers out and the crossed elements are refined."""
    X, Y, params = mlp.random_case([64, 32, 16, 1], 128, seed=0, xp=backend.xp, device=backend.device)
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, progress=False)
    assert report.verdict == "pass" and report.difference < 1e-8
    assert report.threshold < 1e-6, str(report)
    # Most elements settle at ±h (2N rows); the crossed ones are evaluated again, closer in.
    assert 2 * 2625 + 2 < report.evaluations < 4 * 2625 + 1
    assert any("evaluated again at smaller steps" in note for note in report.notes)


def test_order_4_beats_order_2_at_the_same_step(backend):
    # Logistic regression: the net without hidden ReLUs, so smooth at any step.
    X, Y, params = mlp.random_case([6, 1], 12, seed=3, xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    errors = {}
    for order in (2, 4):
        report = gc.check(mlp.cost, params, grads, X, Y, epsilon=1e-3, order=order)
        errors[order] = report.difference
    assert errors[4] < errors[2] / 10


def test_sampled_check_covers_every_tensor(backend):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, sample=2, seed=1)
    for result in report.parameters.values():
        assert result.checked == min(2, result.size)
        assert len(result.worst_index) == 2  # an index into the parameter's shape
    assert set(report.faults) <= {"b1", "W2"} and report.verdict == "fail"
    # Few values: five points each in one stage, and J(θ) at the start and the end.
    # …and each parameter at fault has its worst value confirmed at a second step.
    assert report.evaluations == (
        4 * sum(min(2, r.size) for r in report.parameters.values()) + 2 + _ROUNDING + 4 * len(report.faults)
    )
    again = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, sample=2, seed=1)
    assert [r.worst_index for r in again.parameters.values()] == [
        r.worst_index for r in report.parameters.values()
    ]


def test_fast_screen_catches_a_bug_nonnegative_directions_miss(backend):
    """A gradient whose elements are permuted keeps its sum: 1ᵀg is right, the gradient is not.

    PyTorch's fast mode projects on non-negative vectors (pytorch#57166); signed Gaussian
    directions see the permutation."""
    X, Y, params = _seed(backend)
    grads = dict(mlp.backward(params, X, Y))
    w1 = host(grads["W1"])
    grads["W1"] = w1[::-1, :].copy()
    assert np.sum(w1) == pytest.approx(np.sum(grads["W1"]))
    report = gc.check(
        mlp.cost,
        params,
        grads,
        X,
        Y,
        mode="directions",
        directions=4,
        backend=backend.xp,
        device=backend.device,
    )
    assert report.faults == ("W1",)
    assert report.evaluations == 4 * 4 * 6 + 2 + _ROUNDING + 4 * len(report.faults)


def test_fast_screen_on_a_wide_relu_net_no_false_alarm_and_one_element_caught(backend):
    """Unit directions move θ by h, like a coordinate step. Raw Gaussian ones moved a
    40,000-element W1 by h·200 and crossed ReLU kinks in every direction: the correct
    backprop of this net failed the screen (difference 2.6e-3 > 10× its error bar)."""
    X, Y, params = mlp.random_case([200, 200, 1], 64, seed=0, xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    report = gc.check(mlp.cost, params, grads, X, Y, mode="directions")
    assert report.verdict == "pass", str(report)
    assert report.difference < 1e-8
    wrong = dict(grads)
    w1 = host(grads["W1"]).copy()
    flat = w1.reshape(-1)
    flat[np.argmax(np.abs(flat))] *= 1.01  # one element of 40,000, off by 1 %
    wrong["W1"] = w1
    caught = gc.check(
        mlp.cost, params, wrong, X, Y, mode="directions", backend=backend.xp, device=backend.device
    )
    assert caught.faults == ("W1",), str(caught)


def test_inconclusive_when_the_cost_is_too_noisy(backend):
    xp = backend.xp
    theta = xp.asarray([1.0, -2.0, 0.5], dtype=xp.float64, device=backend.device)

    def noisy(t):  # J = Σ sin θ + 1e12: the constant swamps J's last digits (ulp 1.2e-4), and no
        return (
            xp.sum(xp.sin(t), axis=-1) + 1e12
        )  # step is both large against it and small against sin's curvature

    report = gc.check(noisy, theta, xp.cos(theta))
    assert report.verdict == "inconclusive", str(report)
    assert "inconclusive" in str(report)
    wrong = gc.check(noisy, theta, -xp.cos(theta))
    assert wrong.verdict == "fail"


def test_options_are_validated():
    with pytest.raises(gc.InputError, match="order=3"):
        gc.check(lambda t: t * t, 1.0, 2.0, order=3)
    with pytest.raises(gc.InputError, match="directions=0"):
        gc.check(lambda t: t * t, 1.0, 2.0, mode="directions", directions=0)
    with pytest.raises(gc.InputError, match="sample=0"):
        gc.check(lambda t: t * t, 1.0, 2.0, sample=0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_auto_steps_follow_the_dtype_and_the_magnitude(backend, dtype):
    # h = (1000·eps)^(1/3)·max(1, |θ|) for order 2 in float64, eps^(1/3)·max(1, |θ|) where J is
    # evaluated in float32 (a smaller step: ReLU corners), power 1/5 for order 4, rounded so
    # that θ + h is exact: the step the cost sees is the step the quotient divides by.
    xp = backend.xp
    values = np.array([0.0, 0.5, -1.0, 3.0, -1e3, 123.456], dtype=dtype)
    theta = xp.asarray(values, device=backend.device)
    rounding = differences.STEP_ROUNDING if dtype == "float64" else differences.COARSE_STEP_ROUNDING
    for order, power in ((2, 1 / 3), (4, 1 / 5)):
        h = differences.auto_steps({"t": theta}, order=order, xp=xp)["t"]
        assert h.dtype == theta.dtype and tuple(h.shape) == (6,)
        steps = host(h)
        nominal = (rounding * float(np.finfo(dtype).eps)) ** power * np.maximum(1.0, np.abs(values))
        np.testing.assert_allclose(steps, nominal, rtol=float(np.finfo(dtype).eps) * 1e4)
        assert np.all((values + steps) - values == steps)  # exact in the dtype
    # About 6.1e-5 in float64 and 4.9e-3 in float32 at |θ| ≤ 1: the dtype sets the scale.
    first = float(host(differences.auto_steps({"t": theta}, order=2, xp=xp)["t"])[0])
    assert (5e-5 < first < 1e-4) if dtype == "float64" else (4e-3 < first < 6e-3)


@pytest.mark.parametrize("options", [{"mode": "directions"}, {"sample": 4}], ids=str)
def test_screens_and_samples_never_touch_the_users_rng(options):
    # Directions and samples come from their own seeded generator: the global NumPy state
    # is untouched, the same seed gives the same report, another seed other directions.
    X, Y, params = mlp.seed_case()
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    np.random.seed(12345)
    before = np.random.get_state()[1].copy()
    first = gc.check(mlp.cost, params, grads, X, Y, seed=7, **options)
    assert np.array_equal(np.random.get_state()[1], before)
    again = gc.check(mlp.cost, params, grads, X, Y, seed=7, **options)
    other = gc.check(mlp.cost, params, grads, X, Y, seed=8, **options)
    assert str(first) == str(again)
    assert first.faults == again.faults == ("b1", "W2")
    assert (
        host(other.parameters["W1"].numeric_grad).tobytes()
        != host(first.parameters["W1"].numeric_grad).tobytes()
    )
