"""Issue 13, one test per numbered item: verdicts that were wrong on ac756ad, on every backend."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from helpers import host

import gcbackend as gc
from gcbackend.models import mlp


def _on(backend, values, dtype="float64"):
    return backend.xp.asarray(np.asarray(values, dtype=dtype), device=backend.device)


def _seed(backend):
    return mlp.seed_case(xp=backend.xp, device=backend.device)


# 1. The README's dropout example: a correct backprop failed (W1 at seed 0; b1, W1, W2 at seed 5).
@pytest.mark.parametrize("seed", [0, 5])
def test_dropout_example_passes_and_its_bug_fails(backend, seed):
    X, Y, params = _seed(backend)
    masks = mlp.dropout_masks(params, 3, keep_prob=0.8, seed=seed)
    cost = functools.partial(mlp.cost, keep_prob=0.8, masks=masks)
    report = gc.check(cost, params, mlp.backward(params, X, Y, keep_prob=0.8, masks=masks), X, Y)
    assert report.verdict == "pass" and report.faults == (), str(report)
    buggy = mlp.backward_with_dropout_bug(params, X, Y, keep_prob=0.8, masks=masks)
    assert gc.check(cost, params, buggy, X, Y).verdict == "fail"


# 2. Exact kinks: judged per element, and they never widen another element's error bar.
def _relu_case(backend, shape, zeros, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x.reshape(-1)[rng.choice(x.size, zeros, replace=False)] = 0.0
    return x, rng.standard_normal(shape)


@pytest.mark.parametrize(("shape", "zeros"), [((20,), 11), ((4, 5), 10), ((4, 5), 20)])
def test_relu_with_exact_zeros_passes_and_finds_every_kink(backend, shape, zeros):
    x, dout = _relu_case(backend, shape, zeros, seed=len(shape))
    xp, axes = backend.xp, tuple(range(-len(shape), 0))
    d = _on(backend, dout)

    def layer(t):  # CS231n's check of a layer: J = Σ relu(x)·dout
        return xp.sum(xp.maximum(t, xp.zeros_like(t)) * d, axis=axes)

    report = gc.check(layer, _on(backend, x), _on(backend, (x > 0) * dout))
    assert report.verdict == "pass", str(report)
    assert len(report.parameters["theta"].kinks) == zeros
    wrong = (x > 0) * dout
    at = np.flatnonzero(x.reshape(-1) == 0)[0]
    wrong.reshape(-1)[at] = 2 * abs(dout.reshape(-1)).max() + 1
    # Outside the one-sided slopes at a kink: never a pass, but no proof of a bug either (a
    # correct gradient can be there where kinks of both signs meet: tied max-pool windows).
    judged = gc.check(layer, _on(backend, x), _on(backend, wrong))
    assert judged.verdict == "inconclusive", str(judged)
    assert judged.parameters["theta"].unbracketed == (tuple(int(i) for i in np.unravel_index(at, shape)),)
    if (x > 0).any():  # a wrong smooth element next to the kinks still fails
        smooth = (x > 0) * dout
        smooth.reshape(-1)[np.flatnonzero(x.reshape(-1) > 0)[0]] *= 1.01
        assert gc.check(layer, _on(backend, x), _on(backend, smooth)).verdict == "fail"


def test_abs_with_exact_zeros_passes(backend):
    x, dout = _relu_case(backend, (20,), 11, seed=3)
    xp, d = backend.xp, _on(backend, dout)
    report = gc.check(
        lambda t: xp.sum(xp.abs(t) * d, axis=-1), _on(backend, x), _on(backend, np.sign(x) * dout)
    )
    assert report.verdict == "pass" and len(report.parameters["theta"].kinks) == 11, str(report)


def test_hinge_on_the_hinge_with_a_bug_in_a_smooth_element_fails(backend):
    # Example 0's margin is exactly 1 (on the hinge); its x has a 0 in coordinate 2, so w[2]
    # is smooth there. A bug halves w[2]'s gradient: fail, not inconclusive.
    xp = backend.xp
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0], [2.0, 1.0, -1.0]])
    y = np.array([1.0, -1.0, 1.0])
    w = np.array([0.5, 0.25, 0.5])
    assert (y * (X @ w))[0] == 1.0
    Xb, yb = _on(backend, X), _on(backend, y)

    def hinge(t):
        margins = yb * xp.sum(t[..., None, :] * Xb, axis=-1)
        return xp.sum(xp.maximum(1.0 - margins, xp.zeros_like(margins)), axis=-1) + 0.5 * xp.sum(
            t * t, axis=-1
        )

    active = (1.0 - y * (X @ w)) > 0
    grad = -np.sum((active * y)[:, None] * X, axis=0) + w
    assert gc.check(hinge, _on(backend, w), _on(backend, grad)).verdict == "pass"
    wrong = grad.copy()
    wrong[2] *= 0.5
    report = gc.check(hinge, _on(backend, w), _on(backend, wrong))
    assert report.verdict == "fail" and report.parameters["theta"].worst_index == (2,), str(report)


def test_relu_net_on_integer_data_judges_the_smooth_layers_tightly(backend):
    rng = np.random.default_rng(1)
    X = rng.integers(-2, 3, (4, 6)).astype(float)
    Y = (rng.random((1, 6)) < 0.5).astype(float)
    _, _, params = mlp.random_case([4, 5, 3, 1], 6, seed=2)
    params = {k: np.round(v * 4) / 4 for k, v in params.items()}  # kinks at exact zeros
    grads = mlp.backward(params, X, Y)
    moved = {k: _on(backend, v) for k, v in params.items()}
    Xb, Yb = _on(backend, X), _on(backend, Y)
    report = gc.check(mlp.cost, moved, {k: _on(backend, v) for k, v in grads.items()}, Xb, Yb)
    assert report.verdict == "pass", str(report)
    assert sum(len(r.kinks) for r in report.parameters.values()) > 0
    for name in ("W3", "b3"):
        assert report.parameters[name].expected < 1e-8, str(report)
    wrong = {k: _on(backend, v * (1.01 if k == "W3" else 1.0)) for k, v in grads.items()}
    assert gc.check(mlp.cost, moved, wrong, Xb, Yb).faults == ("W3",)


# 3. Scale: formula (2) from raw sums of squares overflowed to NaN, and NaN passed.
@pytest.mark.parametrize(
    ("scale", "options"), [(1e155, {}), (1e200, {}), (1e-200, {}), (1e-200, dict(gc.NOTEBOOK))]
)
def test_doubled_gradient_fails_at_any_scale(backend, scale, options):
    xp = backend.xp
    theta = _on(backend, [0.3, -1.2, 2.0, 0.7, -0.1])

    def cost(t):
        return scale * xp.sum(xp.sin(t), axis=-1)

    right = scale * xp.cos(theta)
    assert gc.check(cost, theta, right, **options).verdict == "pass"
    report = gc.check(cost, theta, 2 * right, **options)
    assert report.verdict == "fail", str(report)
    assert report.difference == pytest.approx(1 / 3, rel=1e-6)


def test_float32_at_1e20_without_upcast_fails_a_doubled_gradient(backend):
    xp = backend.xp
    theta = _on(backend, [0.3, -1.2, 2.0, 0.7], "float32")

    def cost(t):
        return 1e20 * xp.sum(xp.sin(t), axis=-1)

    report = gc.check(cost, theta, 2e20 * xp.cos(theta), upcast=False)
    assert report.verdict == "fail" and math.isfinite(report.difference), str(report)


# 4. Zero gradients: exact agreement at zero is a pass.
def test_a_parameter_the_cost_ignores_passes(backend):
    xp = backend.xp
    params = {"used": _on(backend, [0.3, -1.2, 2.0]), "unused": _on(backend, [1.0, 2.0])}

    def cost(p):
        return xp.sum(xp.sin(p["used"]), axis=-1) + 0.0 * xp.sum(p["unused"], axis=-1)

    grads = {"used": xp.cos(params["used"]), "unused": xp.zeros_like(params["unused"])}
    report = gc.check(cost, params, grads)
    assert report.verdict == "pass", str(report)
    assert report.parameters["unused"].difference == 0.0 and report.parameters["unused"].expected == 0.0
    wrong = dict(grads, unused=_on(backend, [0.0, 1e-3]))
    assert gc.check(cost, params, wrong).faults == ("unused",)


def test_sampled_seed_case_passes(backend):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, sample=2)
    assert report.verdict == "pass", str(report)


# 5. dtype: each gradient is judged to the precision of its own dtype.
def test_float32_backprop_of_float64_params_passes(backend):
    X, Y, params = _seed(backend)
    grads = {k: backend.xp.astype(v, backend.xp.float32) for k, v in mlp.backward(params, X, Y).items()}
    report = gc.check(mlp.cost, params, grads, X, Y)
    assert report.verdict == "pass" and report.dtype == "float32", str(report)
    assert str(report.parameters["W1"].analytic_grad.dtype).endswith("float32")
    grads["W2"] = grads["W2"] * 2
    assert gc.check(mlp.cost, params, grads, X, Y).faults == ("W2",)


def test_float32_backprop_passes_the_fast_screen(backend):
    X, Y, params = mlp.random_case(
        [8, 16, 8, 1], 32, seed=1, dtype="float32", xp=backend.xp, device=backend.device
    )
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, mode="directions")
    assert report.verdict == "pass", str(report)


def test_float16_backprop_can_pass_and_a_wrong_one_fails(backend):
    xp = backend.xp
    if getattr(xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16 (the standard does not require it)")
    values = np.array([0.3, -1.2, 2.0, 0.7, -0.1, 1.5])
    theta = _on(backend, values, "float16")

    def cost(t):
        return xp.sum(xp.sin(t), axis=-1)

    grad = _on(backend, np.cos(values.astype(np.float16).astype(np.float64)), "float16")
    report = gc.check(cost, theta, grad)
    assert report.verdict == "pass" and report.dtype == "float16", str(report)
    wrong = np.cos(values.astype(np.float16).astype(np.float64))
    wrong[0] *= 1.1
    assert gc.check(cost, theta, _on(backend, wrong, "float16")).verdict == "fail"


def test_validation_runs_in_the_dtype_of_evaluation(backend):
    xp = backend.xp
    values = [2.5, -3.0, 4.0]
    theta = _on(backend, values, "float32")

    def cost(t):
        return xp.sum(xp.sin(t), axis=-1)

    grad = xp.cos(theta)
    # ε = 1e-7 does not move 2.5 in float32, but θ is evaluated in float64.
    report = gc.check(cost, theta, grad, **gc.NOTEBOOK)
    assert report.passed, str(report)
    with pytest.raises(gc.InputError, match=r"epsilon=1e-07 is too small for params\['theta'\] in float32"):
        gc.check(cost, theta, grad, upcast=False, **gc.NOTEBOOK)
    # The budget is checked in float64 too, before the cost is ever called.
    calls = []

    def counted(t):
        calls.append(1)
        return cost(t)

    big = {"W": xp.ones((64,), dtype=xp.float32, device=backend.device)}
    with pytest.raises(gc.InputError, match=r"memory_budget=300 bytes .*\(64 elements × 8 bytes\)"):
        gc.check(
            counted, big, {"W": xp.ones((64,), dtype=xp.float32, device=backend.device)}, memory_budget=300
        )
    assert calls == []


# 6. Notebook settings: per-parameter verdicts consistent with the overall one.
def test_notebook_settings_per_parameter_verdicts_are_consistent(backend):
    X, Y, params = _seed(backend)
    correct = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, **gc.NOTEBOOK)
    assert correct.passed and correct.faults == ()
    assert correct.difference == pytest.approx(1.1890913024229996e-07, rel=1e-4)  # rounding noise: BLAS order
    planted = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, **gc.NOTEBOOK)
    assert planted.faults == ("b1", "W2")
    assert planted.difference == pytest.approx(0.2850931567761623, rel=1e-8)
    assert "Parameters at fault, worst first: b1 (difference 0.6), W2 (difference 0.33)\n" in str(planted)


# 7. order=4 is at least as sensitive as order 2.
@pytest.mark.parametrize("order", [2, 4])
def test_order_4_is_as_sensitive_as_order_2(backend, order):
    X, Y, params = _seed(backend)
    grads = dict(mlp.backward(params, X, Y))
    assert gc.check(mlp.cost, params, grads, X, Y, order=order).verdict == "pass"
    grads["b2"] = grads["b2"] * (1 + 1e-6)
    report = gc.check(mlp.cost, params, grads, X, Y, order=order)
    assert report.faults == ("b2",), str(report)


# 8. The fast screen's values are directional derivatives uᵀ∇J, labelled as directions.
def test_fast_screen_values_are_directional_derivatives(backend):
    X, Y, params = _seed(backend)
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    report = gc.check(mlp.cost, params, grads, X, Y, mode="directions", directions=4)
    b1 = report.parameters["b1"]
    # The analytic values are uᵀg for unit u: |uᵀg| ≤ ‖g‖, and with db1 = 4× the truth the
    # numeric ones are a quarter of them.
    analytic, numeric = host(b1.analytic_grad), host(b1.numeric_grad)
    assert analytic.shape == (4,) and np.all(
        np.abs(analytic) <= np.linalg.norm(host(grads["b1"])) * (1 + 1e-12)
    )
    np.testing.assert_allclose(numeric, analytic / 4, rtol=1e-6)
    text = str(report)
    assert f"  b1 direction {b1.top[0].index[0]}: analytic" in text and "b1[" not in text
    assert "directional derivative uᵀ∇J" in text


# 10. report.order is the order.
@pytest.mark.parametrize("order", [2, 4])
def test_report_order_is_the_order(backend, order):
    X, Y, params = _seed(backend)
    report = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, order=order)
    assert report.order == order and f"order={order}," in str(report)


def test_inconclusive_no_longer_recommends_order_4(backend):
    xp = backend.xp
    theta = _on(backend, [1.0, -2.0, 0.5])

    def noisy(t):  # J = Σ sin θ + 1e12: the constant swamps J's last digits, at every step
        return xp.sum(xp.sin(t), axis=-1) + 1e12

    report = gc.check(noisy, theta, xp.cos(theta))
    assert report.verdict == "inconclusive"
    text = str(report)
    # The parameters are float64 already: the advice names J's own rounding, never "try float64"
    # (issue 18: that advice misled users whose parameters were float64), nor order=4.
    assert "J is a small difference of large numbers" in text
    assert "try float64" not in text and "order=4" not in text.split("\n", 1)[1]


def test_fast_screen_error_strip_is_titled_by_directions(backend):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    X, Y, params = _seed(backend)
    report = gc.check(
        mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, mode="directions", directions=6
    )
    ax = report.plot_errors("b1")
    assert ax.get_title().startswith("b1: 6 random directions") and "(5, 1)" not in ax.get_title()
    assert ax.get_xlabel().startswith("direction k")
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


# Found by an audit of costs written as users write them (float32 models).
@pytest.mark.parametrize("seed", range(6))
def test_a_float32_cost_that_casts_its_weights_back_is_judged_right(seed):
    # Upcast to float64, θ ± h must still be exact in float32: the cost rounds it there, and
    # a step off by half a float32 ulp (5e-4 of h, the same at h and 2h) failed a correct backprop.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((8, 3)).astype(np.float32)
    w = rng.standard_normal(3).astype(np.float32)

    def cost(w, X):
        return np.sum(np.tanh(X @ w.astype(np.float32)))

    g = X.T @ (1 - np.tanh(X @ w) ** 2)
    assert gc.check(cost, w, g, X).verdict == "pass"
    g[0] *= 1.01
    assert gc.check(cost, w, g, X).verdict == "fail"


@pytest.mark.parametrize("seed", range(4))
def test_a_float64_gradient_from_a_float32_forward_is_allowed_float32s_rounding(seed):
    # The course's np.int64(A > 0) mask promotes a float32 backprop to float64; its errors
    # are float32's, and it is judged to the coarser of its own and its parameter's dtype.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4, 6)).astype(np.float32)
    W = rng.standard_normal((3, 4)).astype(np.float32)

    def cost(p, X):
        return np.sum(np.maximum(p["W"] @ X, 0) ** 2) / 2

    Z = W @ X
    dW = (Z * np.int64(Z > 0)) @ X.T
    assert dW.dtype == np.float64
    assert gc.check(cost, {"W": W}, {"W": dW}, X).verdict == "pass"
    dW[0, 0] *= 1.01
    assert gc.check(cost, {"W": W}, {"W": dW}, X).verdict == "fail"


@pytest.mark.parametrize("epsilon", [0.03, 0.1])
def test_a_large_fixed_step_across_relu_corners_is_no_false_alarm(epsilon):
    # Found by the newcomer audit: at ε = 0.1 a step on W1[1, 1] of the seed case crosses a
    # ReLU corner (Z1 = 0.079, X = −2.3), and the correct backprop was failed. Where the
    # fourth difference says a kink lies within ±2h, the error bar covers it.
    X, Y, params = mlp.seed_case()
    correct = gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, epsilon=epsilon)
    assert correct.verdict != "fail", str(correct)
    planted = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, epsilon=epsilon)
    assert planted.verdict == "fail" and set(planted.faults) == {"b1", "W2"}, str(planted)


def test_the_fast_screen_never_passes_a_tensor_whose_directions_cross_kinks(backend):
    # Found by the deep profile: five ReLU corners and one smooth element doubled; a direction
    # through the corners brackets uᵀg widely enough to hide the doubling. Inconclusive, with why.
    xp = backend.xp
    theta = _on(backend, [0.0, 0.0, 0.0, 0.7, 0.0, 0.0])
    smooth = _on(backend, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0])

    def cost(t):
        return xp.sum(0.5 * xp.maximum(t, xp.zeros_like(t)) * (1 - smooth) + 0.5 * t * t * smooth, axis=-1)

    correct = _on(backend, [0.0, 0.0, 0.0, 0.7, 0.0, 0.0])
    doubled = _on(backend, [0.0, 0.0, 0.0, 1.4, 0.0, 0.0])
    screened = [gc.check(cost, theta, grads, mode="directions") for grads in (correct, doubled)]
    assert [report.verdict for report in screened] == ["inconclusive", "inconclusive"]
    assert "the fast screen's directions through theta cross kinks" in str(screened[0])
    assert gc.check(cost, theta, correct).verdict == "pass"
    assert gc.check(cost, theta, doubled).verdict == "fail"


def test_a_cost_returning_float32_for_float64_parameters_is_named_as_the_limit():
    # Found by the costs audit: "try float64" misled a user whose params were float64 already.
    rng = np.random.default_rng(0)
    X, w = rng.standard_normal((8, 3)), rng.standard_normal(3)
    grad = X.T @ (1 - np.tanh(X @ w) ** 2)
    report = gc.check(lambda w, X: np.float32(np.sum(np.tanh(X @ w))), w, grad, X)
    assert report.verdict != "fail"
    assert report.notes[0] == (
        "the cost returns float32 for float64 parameters: its rounding limits the finite differences; "
        "return J in the parameters' dtype (or pass a larger epsilon, e.g. epsilon=1e-3)"
    )
    assert gc.check(lambda w, X: np.sum(np.tanh(X @ w)), w, grad, X).notes == ()
