"""What the report says about the cost itself (issue 19, item 4): a random J, a J that does not
read the parameters it is given, the evaluation line — diagnoses instead of wrong advice."""

from __future__ import annotations

import numpy as np
import pytest

import gcbackend as gc
from gcbackend.models import mlp


def test_a_random_cost_is_named_random_not_noisy(backend):
    # A fresh dropout mask per call: J(θ) differs between two calls with the same parameters.
    xp = backend.xp
    X, Y, params = mlp.seed_case(xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    rng = np.random.default_rng(0)

    def cost(p, X, Y):
        mask = xp.asarray(rng.random(X.shape) < 0.9, dtype=X.dtype, device=backend.device)
        return mlp.cost(p, X * mask / 0.9, Y)

    report = gc.check(cost, params, grads, X, Y)
    assert report.verdict == "inconclusive" and report.random is not None
    assert report.random[0] != report.random[1]
    assert {p.reason for p in report.parameters.values()} == {"random"}
    text = str(report)
    assert "J(θ) changed between two calls with the same parameters" in text
    assert "a random dropout mask? a module in train mode?" in text
    assert "try float64" not in text and "larger epsilon" not in text


def test_a_cost_that_ignores_its_parameters_is_named(backend):
    # CS231n style: the loss reads the model's own parameters, not the ones it is given.
    xp = backend.xp
    X, Y, params = mlp.seed_case(xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    frozen = {k: xp.asarray(v, copy=True) for k, v in params.items()}

    def cost(p, X, Y):
        return mlp.cost(frozen, X, Y)  # never reads p

    report = gc.check(cost, params, grads, X, Y)
    assert report.verdict == "fail"
    assert all(r.independent for r in report.parameters.values())
    text = str(report)
    assert "J does not depend on W1: J was bit for bit unchanged under every perturbation of it" in text
    assert "Does the cost read the parameters it is given?" in text and "gc.check_in_place" in text


def test_a_parameter_the_cost_ignores_with_a_zero_gradient_is_not_named(backend):
    xp = backend.xp
    theta = {
        "w": xp.asarray([0.5, -1.0], device=backend.device),
        "unused": xp.zeros(3, device=backend.device),
    }
    grads = {"w": xp.cos(theta["w"]), "unused": xp.zeros(3, device=backend.device)}
    report = gc.check(lambda p: xp.sum(xp.sin(p["w"]), axis=-1), theta, grads)
    assert report.verdict == "pass" and not report.parameters["unused"].independent
    assert "J does not depend on" not in str(report)


def test_the_evaluation_line_is_short_and_the_reasons_are_in_the_results():
    X, Y, params = mlp.seed_case()
    grads = mlp.backward(params, X, Y)

    def scalar(p, X, Y):  # cannot broadcast: every tensor loops
        return float(mlp.cost(p, X, Y))

    report = gc.check(scalar, params, grads, X, Y)
    lines = [line for line in str(report).splitlines() if line.startswith("evaluation: ")]
    assert len(lines) == 1 and len(lines[0]) <= 110
    assert "W1, b1, W2, b2, W3, b3 loop" in lines[0]
    for result in report.parameters.values():
        assert result.path == "loop" and result.path_reason  # the full reason, never cut
        assert not result.path_reason.endswith("...")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_at_theta_itself_is_a_cost_error(bad):
    theta = np.array([0.5, 2.0])

    def cost(t):
        return np.sum(t, axis=-1) * float(bad)

    with pytest.raises(gc.CostError, match="at θ itself"):
        gc.check(cost, theta, np.ones(2))
