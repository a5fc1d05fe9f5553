"""judge.py: scale-safe norms, per-element verdicts, the notebook's consistent per-parameter
verdicts, and where each compared value is reported — on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_on, host

from gcbackend import judge
from gcbackend.differences import Estimate


def _on(backend, values, dtype="float64"):
    return backend.xp.asarray(np.asarray(values, dtype=dtype), device=backend.device)


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1.0, 1e200, 1e300])
def test_norm_is_scale_safe_and_exact_for_powers_of_two(backend, scale):
    x = _on(backend, [3.0 * scale, -4.0 * scale])
    result = judge.norm(x, backend.xp)
    assert_on(result, backend)
    assert float(host(result)) == pytest.approx(5.0 * scale, rel=1e-15)
    # Dividing by a power of two is exact: the notebook's bits where nothing overflows.
    y = _on(backend, [0.1, 0.7, -0.3])
    assert float(host(judge.norm(y, backend.xp))) == float(host(backend.xp.linalg.vector_norm(y)))


def test_backprop_rounding_is_in_ulps_of_the_gradients_own_dtype(backend):
    xp = backend.xp
    grad = _on(backend, [1.0, -3.0, 0.0], "float32")
    allowance = host(judge.backprop_rounding(grad, xp))
    rms = math.sqrt((1 + 9) / 3)
    expected = judge.ANALYTIC_ULPS * float(np.finfo(np.float32).eps) * (np.abs([1.0, -3.0, 0.0]) + rms)
    np.testing.assert_allclose(allowance, expected, rtol=1e-6)
    assert allowance.dtype == np.float64


def test_coverage_labels():
    assert judge.Coverage("elements").label("W", 5, (2, 3)) == (1, 2)
    assert judge.Coverage("sample", {"W": [1, 4]}).label("W", 1, (2, 3)) == (1, 1)
    assert judge.Coverage("directions").label("W", 6, (5, 1)) == (6,)


def test_notebook_verdicts_never_contradict_the_overall_one():
    nonfinite = {"a": False, "b": False, "c": False}
    # A passing check has no faults, even with a parameter over the threshold.
    verdict, per = judge._notebook_verdicts(1e-7, {"a": 3e-7, "b": 1e-8, "c": 1e-9}, nonfinite, 2e-7)
    assert verdict == "pass" and set(per.values()) == {"pass"}
    # Failing: beyond SAFETY × threshold is a fault, over the threshold only inconclusive.
    verdict, per = judge._notebook_verdicts(0.28, {"a": 0.6, "b": 2.5e-7, "c": 1e-9}, nonfinite, 2e-7)
    assert verdict == "fail" and per == {"a": "fail", "b": "inconclusive", "c": "pass"}
    # Failing with nothing far off: those over the threshold are the faults.
    verdict, per = judge._notebook_verdicts(3e-7, {"a": 4e-7, "b": 2.5e-7, "c": 1e-9}, nonfinite, 2e-7)
    assert verdict == "fail" and per == {"a": "fail", "b": "fail", "c": "pass"}
    # A parameter far off fails the check even when the overall difference hides it.
    verdict, per = judge._notebook_verdicts(1e-7, {"a": 1.0, "b": 1e-8, "c": 1e-9}, nonfinite, 2e-7)
    assert verdict == "fail" and per["a"] == "fail"
    # NaN is never a pass.
    verdict, per = judge._notebook_verdicts(math.nan, {"a": math.nan, "b": 0.0, "c": 0.0}, nonfinite, 2e-7)
    assert verdict == "fail" and per["a"] == "fail"


def _report(backend, analytic, numeric, error, kink=None, low=None, high=None, dtype="float64"):
    xp = backend.xp
    a, n = _on(backend, analytic, dtype), _on(backend, numeric)
    e = _on(backend, error)
    k = xp.asarray(np.asarray(kink if kink is not None else [False] * len(analytic)), device=backend.device)
    lo = _on(backend, low if low is not None else numeric)
    hi = _on(backend, high if high is not None else numeric)
    estimate = Estimate({"t": n}, {"t": e}, {"t": k}, {"t": lo}, {"t": hi}, 1e-16)
    return judge.judge(
        {"t": n},
        {"t": a},
        {"t": n},
        estimate,
        xp=xp,
        backend=backend,
        epsilon="auto",
        threshold="auto",
        mode="stacked",
        order=2,
        top_k=3,
        notes=(),
        evaluations=0,
        coverage=judge.Coverage("elements"),
        allowance={"t": judge.backprop_rounding(a, xp)},
    )


def test_kinks_and_zeros_never_widen_another_elements_error_bar(backend):
    # Element 0 smooth and 1 % off, element 1 exactly zero on both sides, elements 2 and 3
    # kinks with wide brackets (and wide error bars): the smooth bug still fails.
    report = _report(
        backend,
        analytic=[1.01, 0.0, 0.5, -0.2],
        numeric=[1.0, 0.0, 0.5, 0.0],
        error=[1e-9, 0.0, 0.1, 0.1],
        kink=[False, False, True, True],
        low=[1.0, 0.0, 0.0, -1.0],
        high=[1.0, 0.0, 1.0, 1.0],
    )
    result = report.parameters["t"]
    assert result.verdict == "fail" and result.worst_index == (0,)
    assert result.kinks == ((2,), (3,))
    # Without the bug: a pass, not inconclusive, though the kinks' error bars are 10 %.
    fine = _report(
        backend,
        analytic=[1.0, 0.0, 0.5, -0.2],
        numeric=[1.0, 0.0, 0.5, 0.0],
        error=[1e-9, 0.0, 0.1, 0.1],
        kink=[False, False, True, True],
        low=[1.0, 0.0, 0.0, -1.0],
        high=[1.0, 0.0, 1.0, 1.0],
    )
    assert fine.verdict == "pass" and fine.parameters["t"].expected < 1e-8


def test_all_zero_gradient_agreeing_exactly_passes(backend):
    report = _report(backend, analytic=[0.0, 0.0], numeric=[0.0, 0.0], error=[0.0, 0.0])
    assert report.verdict == "pass" and report.difference == 0.0 and report.expected == 0.0


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_extreme_scales_judge_like_unit_scale(backend, scale):
    report = _report(backend, analytic=[2 * scale, 4 * scale], numeric=[scale, 2 * scale], error=[0.0, 0.0])
    assert report.verdict == "fail" and report.difference == pytest.approx(1 / 3, rel=1e-12)
    right = _report(
        backend, analytic=[scale, 2 * scale], numeric=[scale, 2 * scale], error=[1e-9 * scale] * 2
    )
    assert right.verdict == "pass" and right.difference == 0.0


def test_error_bars_too_wide_to_tell_are_inconclusive_never_pass(backend):
    report = _report(backend, analytic=[1.0, 2.0], numeric=[1.0, 2.0], error=[0.01, 0.01])
    assert report.verdict == "inconclusive"
    infinite = _report(backend, analytic=[1.0, 2.0], numeric=[1.0, 2.0], error=[math.inf, 0.0])
    assert infinite.verdict != "pass"
