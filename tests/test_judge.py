"""judge.py: scale-safe norms, per-element verdicts against error bars and the backprop's own
rounding, the notebook's consistent per-parameter verdicts, and where each compared value is
reported. The judge works on the host over one flat vector of probes; the arrays a report holds
are on the check's backend and device (every backend)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_on, host

from gcbackend import judge, plan
from gcbackend.differences import SENSITIVITY_FLOOR, SENSITIVITY_SAFETY, Estimate, judged


def _plan(analytic, *, grad_eps=2.0**-52, ulps=plan.ANALYTIC_ULPS, notebook=False):
    a = np.asarray(analytic, dtype=np.float64)
    size = a.shape[0]
    return plan.Plan(
        names=("t",),
        shapes=((size,),),
        coverage=plan.Coverage("elements"),
        notebook=notebook,
        fixed=notebook,
        order=2,
        segment=np.zeros(size, dtype=np.int64),
        index=np.arange(size),
        target=a,
        magnitude=np.abs(a),
        grad_eps=np.full(size, grad_eps),
        ulps=np.full(size, ulps),
        step=np.full(size, 1e-5),
        directions=None,
        eval_eps=2.0**-52,
        counts=(size,),
    )


def _estimate(numeric, error, kink=None, low=None, high=None, sensitivity=None):
    n = np.asarray(numeric, dtype=np.float64)
    size = n.shape[0]
    kink = np.asarray(kink if kink is not None else [False] * size)
    return Estimate(
        numeric=n,
        error=np.asarray(error, dtype=np.float64),
        kink=kink,
        low=np.asarray(low if low is not None else numeric, dtype=np.float64),
        high=np.asarray(high if high is not None else numeric, dtype=np.float64),
        undetermined=~np.isfinite(n),
        still=np.zeros(size, dtype=bool),
        sensitivity=np.asarray(sensitivity if sensitivity is not None else [0.0] * size, dtype=np.float64),
        rounding=1e-16,
    )


def _report(backend, analytic, numeric, error, dtype="float64", **estimate):
    planned = _plan(analytic, grad_eps=float(np.finfo(dtype).eps))
    xp = backend.xp
    grad = xp.asarray(np.asarray(analytic, dtype=dtype), device=backend.device)
    return judge.judge(
        planned,
        _estimate(numeric, error, **estimate),
        backend=backend,
        analytic={"t": grad},
        grad_dtypes={"t": dtype},
        epsilon="auto",
        threshold="auto",
        mode="auto",
        top_k=3,
        notes=(),
        evaluations=0,
        paths={},
    )


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1.0, 1e200, 1e300])
def test_norm_is_scale_safe_and_exact_for_powers_of_two(scale):
    assert judge.norm(np.array([3.0 * scale, -4.0 * scale])) == pytest.approx(5.0 * scale, rel=1e-15)
    # Dividing by a power of two is exact: the notebook's bits where nothing overflows.
    y = np.array([0.1, 0.7, -0.3])
    assert judge.norm(y) == float(np.linalg.norm(y))


def test_allowance_is_in_ulps_of_the_precision_judged_to_and_never_vanishes_at_zero():
    # A float32 gradient: 32 ulps of float32 of |a| + |n|; an element whose true gradient cannot
    # be told from 0 (|n| ≤ SAFETY × its error bar) gets the model's gradient scale on top, the
    # root mean square of the clearly nonzero finite differences.
    eps = float(np.finfo(np.float32).eps)
    planned = _plan([1.0, -3.0, 5e-9], grad_eps=eps)
    estimate = _estimate([1.0, -3.0, 1e-12], [1e-10, 1e-10, 1e-10])
    result = judged(planned, estimate)
    scale = math.sqrt((1 + 9) / 2)
    expected = plan.ANALYTIC_ULPS * eps * np.array([2.0, 6.0, 5e-9 + 1e-12 + scale])
    np.testing.assert_allclose(result.allowance, expected, rtol=1e-12)
    np.testing.assert_allclose(result.tolerance, 10 * 1e-10 + expected, rtol=1e-12)
    assert not result.off.any()
    # A measured sensitivity (the forward's rounding, for 32 ulps of every input) adds a quarter
    # of itself: 8 ulps' worth.
    # Every value of that low-precision gradient gets SENSITIVITY_FLOOR × the root mean square of
    # the changes measured (here one: 4e-7).
    moved = judged(planned, _estimate([1.0, -3.0, 1e-12], [1e-10] * 3, sensitivity=[4e-7, 0.0, 0.0]))
    floor = SENSITIVITY_FLOOR * 4e-7
    assert moved.allowance[0] == pytest.approx(expected[0] + SENSITIVITY_SAFETY * 4e-7 + floor, rel=1e-12)
    assert moved.allowance[1] == pytest.approx(expected[1] + floor, rel=1e-12)
    assert SENSITIVITY_SAFETY == 0.25 and SENSITIVITY_FLOOR == 30.0


def test_a_zero_gradient_with_float32_rounding_passes_a_real_bias_fails(backend):
    # A bias before batch norm: J does not depend on it; a float32 backprop leaves ±5e-9.
    report = _report(
        backend, [0.3, -0.2, 5e-9, -4e-9], [0.3, -0.2, 1e-13, -2e-13], [1e-11] * 4, dtype="float32"
    )
    assert report.verdict == "pass", str(report)
    wrong = _report(
        backend, [0.3, -0.2, 0.03, -4e-9], [0.3, -0.2, 1e-13, -2e-13], [1e-11] * 4, dtype="float32"
    )
    assert wrong.verdict == "fail" and wrong.parameters["t"].worst_index == (2,)


def test_coverage_labels():
    assert plan.Coverage("elements").label("W", 5, (2, 3)) == (1, 2)
    assert plan.Coverage("sample", {"W": [1, 4]}).label("W", 1, (2, 3)) == (1, 1)
    assert plan.Coverage("directions").label("W", 6, (5, 1)) == (6,)


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
    # A parameter far off fails the check even when the overall difference hides it…
    verdict, per = judge._notebook_verdicts(1e-7, {"a": 1.0, "b": 1e-8, "c": 1e-9}, nonfinite, 2e-7)
    assert verdict == "fail" and per["a"] == "fail"
    # …unless both its sides are rounding noise (a bias J does not depend on scores ≈ 1).
    quiet = {"a": True, "b": False, "c": False}
    verdict, per = judge._notebook_verdicts(1e-7, {"a": 1.0, "b": 1e-8, "c": 1e-9}, nonfinite, 2e-7, quiet)
    assert verdict == "pass" and set(per.values()) == {"pass"}
    # NaN is never a pass.
    verdict, per = judge._notebook_verdicts(math.nan, {"a": math.nan, "b": 0.0, "c": 0.0}, nonfinite, 2e-7)
    assert verdict == "fail" and per["a"] == "fail"
    # A finite difference that is not finite: inconclusive, never a pass nor a fail of the rest.
    verdict, per = judge._notebook_verdicts(
        1e-8, {"a": 1e-8, "b": 0.0, "c": 0.0}, {**nonfinite, "a": True}, 2e-7
    )
    assert verdict == "inconclusive" and per["a"] == "inconclusive"


def test_kinks_and_zeros_never_widen_another_elements_error_bar(backend):
    # Element 0 smooth and 1 % off, element 1 exactly zero on both sides, elements 2 and 3
    # kinks with wide brackets (and wide error bars): the smooth bug still fails.
    kinks = dict(kink=[False, False, True, True], low=[1.0, 0.0, 0.0, -1.0], high=[1.0, 0.0, 1.0, 1.0])
    report = _report(backend, [1.01, 0.0, 0.5, -0.2], [1.0, 0.0, 0.5, 0.0], [1e-9, 0.0, 0.1, 0.1], **kinks)
    result = report.parameters["t"]
    assert result.verdict == "fail" and result.worst_index == (0,)
    assert result.kinks == ((2,), (3,))
    # Without the bug: a pass, not inconclusive, though the kinks' error bars are 10 %.
    fine = _report(backend, [1.0, 0.0, 0.5, -0.2], [1.0, 0.0, 0.5, 0.0], [1e-9, 0.0, 0.1, 0.1], **kinks)
    assert fine.verdict == "pass" and fine.parameters["t"].expected < 1e-8
    # The arrays the report holds are on the check's backend and device.
    assert_on(fine.parameters["t"].analytic_grad, backend)
    assert_on(fine.parameters["t"].numeric_grad, backend)
    np.testing.assert_allclose(host(fine.parameters["t"].numeric_grad), [1.0, 0.0, 0.5, 0.0])


def test_all_zero_gradient_agreeing_exactly_passes(backend):
    report = _report(backend, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert report.verdict == "pass" and report.difference == 0.0 and report.expected == 0.0


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_extreme_scales_judge_like_unit_scale(backend, scale):
    report = _report(backend, [2 * scale, 4 * scale], [scale, 2 * scale], [0.0, 0.0])
    assert report.verdict == "fail" and report.difference == pytest.approx(1 / 3, rel=1e-12)
    right = _report(backend, [scale, 2 * scale], [scale, 2 * scale], [1e-9 * scale] * 2)
    assert right.verdict == "pass" and right.difference == 0.0


def test_error_bars_too_wide_to_tell_are_inconclusive_never_pass(backend):
    report = _report(backend, [1.0, 2.0], [1.0, 2.0], [0.01, 0.01])
    assert report.verdict == "inconclusive" and report.parameters["t"].reason == "noise"
    infinite = _report(backend, [1.0, 2.0], [1.0, math.nan], [math.inf, 0.0])
    assert infinite.verdict == "inconclusive" and infinite.parameters["t"].reason == "nonfinite"
    assert infinite.parameters["t"].nonfinite == ((1,),)


def test_the_resolution_is_what_a_pass_guarantees(backend):
    # (SAFETY + 1) × the error bars plus the allowance, relative to |a| + |n|: every passing
    # element is within SAFETY × its bar (plus allowance) of n, and n within its bar of the truth.
    report = _report(backend, [1.0, 2.0], [1.0, 2.0], [1e-6, 1e-6])
    result = report.parameters["t"]
    bars = 1e-6 * math.sqrt(2)
    allowance = judge.norm(judged(_plan([1.0, 2.0]), _estimate([1.0, 2.0], [1e-6] * 2)).allowance)
    assert result.resolution == pytest.approx((11 * bars + allowance) / (2 * math.sqrt(5)), rel=1e-12)
    assert result.verdict == "pass"
