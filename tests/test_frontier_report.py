"""Issue 18, classes 11 and 12: what a sampled or screened report claims; other inputs.

11. Sampled and screened checks: with ``sample=20`` (and with ``mode="directions"``) on a
    5,560-parameter net, the first line of ``str(report)`` and the verdict sentence say what
    was covered ("<checked> of 5560"), and the table never claims "all N=5560".
12. Other inputs: a cost returning an integer array → CostError (not AttributeError); a
    complex-valued cost → CostError saying complex; complex params → InputTypeError; in a
    failing report the elements listed under the faults are ranked by |error| / tolerance,
    and the report never says "no single element is off by more than its error bar" for a
    parameter that failed because of its elements.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from frontier import coverage, never_fail, on, table_end
from hypothesis import assume, given
from hypothesis import strategies as st

import gcbackend as gc
from gcbackend.models import mlp

# ---------------------------------------------------------------------------------------------
# 11. Sampled and screened checks

BIG_NET = [256, 20, 20]  # W1 (20, 256), b1 (20, 1), W2 (20, 20), b2 (20, 1): 5,560 parameters


def _big_net(backend):
    X, Y, params = mlp.random_case(BIG_NET, 16, seed=0, xp=backend.xp, device=backend.device)
    assert sum(int(np.prod(v.shape)) for v in params.values()) == 5560
    return X, Y, params, mlp.backward(params, X, Y)


def _assert_states_its_coverage(report, checked):
    lines = str(report).splitlines()
    text = "\n".join(lines)
    assert 0 < checked < 5560
    assert (checked, 5560) in coverage(lines[0]), f"the first line does not say '{checked} of 5560'\n{text}"
    verdict_line = lines[table_end(report)]
    assert (checked, 5560) in coverage(verdict_line), f"the verdict sentence does not say it\n{text}"
    assert not any(re.match(r"all\s+N=5560\b", line) for line in lines), text
    assert "all N=5560" not in text


@pytest.mark.parametrize("bug", [None, "W2"])
def test_a_sampled_check_says_what_it_covered(backend, bug):
    X, Y, params, grads = _big_net(backend)
    if bug:
        grads = {**grads, bug: 2 * grads[bug]}
    report = gc.check(mlp.cost, params, grads, X, Y, sample=20)
    assert report.verdict == ("fail" if bug else "pass"), str(report)
    checked = sum(p.checked for p in report.parameters.values())
    assert checked == 80  # 20 of each of the four tensors
    _assert_states_its_coverage(report, checked)


@pytest.mark.parametrize("bug", [None, "W2"])
def test_a_screened_check_says_what_it_covered(backend, bug):
    X, Y, params, grads = _big_net(backend)
    if bug:
        grads = {**grads, bug: 2 * grads[bug]}
    report = gc.check(mlp.cost, params, grads, X, Y, mode="directions")
    assert report.verdict != ("pass" if bug else "fail"), str(report)
    checked = sum(p.checked for p in report.parameters.values())
    _assert_states_its_coverage(report, checked)


# ---------------------------------------------------------------------------------------------
# 12. Other inputs


def test_a_cost_returning_integers_is_a_cost_error(backend):
    xp = backend.xp

    def cost(p):
        return xp.astype(xp.round(xp.sum(p * 1000.0, axis=-1)), xp.int64)

    with pytest.raises(gc.CostError, match=r"(?i)int"):
        gc.check(cost, on(backend, np.ones(3)), on(backend, np.full(3, 1000.0)))


@pytest.mark.parametrize("imaginary", ["zero", "cubic", "sqrt of negatives"])
def test_a_complex_valued_cost_is_a_cost_error(backend, imaginary):
    xp = backend.xp
    theta = on(backend, [0.3, -1.2, 0.7])

    def cost(t):
        real = xp.astype(xp.sum(t * t, axis=-1), xp.complex128)
        if imaginary == "zero":
            return real + 0j
        if imaginary == "cubic":
            return real + 1j * xp.astype(xp.sum(t * t * t, axis=-1), xp.complex128)
        return xp.sum(xp.sqrt(xp.astype(t - 1.0, xp.complex128)), axis=-1)

    with pytest.raises(gc.CostError, match=r"(?i)complex"):
        gc.check(cost, theta, 2 * theta)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_params_are_an_input_type_error(backend, dtype):
    xp = backend.xp
    theta = xp.asarray(np.array([0.3 + 0.1j, -1.2 + 0j]).astype(dtype), device=backend.device)
    with pytest.raises(gc.InputTypeError, match=r"complex"):
        gc.check(lambda t: xp.sum(xp.real(t * xp.conj(t)), axis=-1), theta, 2 * theta)


NO_SINGLE = "no single element is off by more than"


def _element_lines(text, name):
    """The indices of the element lines under the faults, ``  name[i, j]: analytic …``, in order."""
    pattern = re.compile(rf"^  {re.escape(name)}\[([0-9, ]+)\]: analytic")
    return [tuple(int(v) for v in m.group(1).split(",")) for m in map(pattern.match, text.splitlines()) if m]


@given(
    seed=st.integers(0, 10_000),
    n=st.integers(6, 24),
    wrong=st.integers(2, 5),
    exponents=st.lists(st.floats(-6, -1), min_size=5, max_size=5),
)
def test_failing_elements_are_ranked_by_error_over_tolerance(backend, seed, n, wrong, exponents):
    xp = backend.xp
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1.5, 1.5, n)
    a = 10.0 ** rng.uniform(-3, 3, n)
    exact = a * np.cos(theta)
    given_grad = exact.copy()
    where = rng.choice(n, wrong, replace=False)
    given_grad[where] *= 1 + 10.0 ** np.array(exponents[:wrong])

    def cost(t, a):
        return xp.sum(a * xp.sin(t), axis=-1)

    args = (on(backend, theta), on(backend, given_grad), on(backend, a))
    everything = gc.check(cost, *args, top_k=n)
    assume(everything.verdict == "fail")
    top = everything.parameters["theta"].top
    assert len(top) == n and all(e.tolerance is not None and e.tolerance > 0 for e in top)
    ratio = {e.index: e.absolute / e.tolerance for e in top}
    ranked = [ratio[e.index] for e in top]
    assert ranked == sorted(ranked, reverse=True), f"top is not ranked by |error| / tolerance: {ranked}"
    text = str(everything)
    listed = _element_lines(text, "theta")
    assert listed, text
    assert [ratio[i] for i in listed] == sorted((ratio[i] for i in listed), reverse=True), text
    assert listed[0] == max(ratio, key=ratio.get), text
    if any(r > 1 for r in ratio.values()):
        assert NO_SINGLE not in text, text
    # With the default top_k, the element most beyond its own error bar still comes first.
    report = gc.check(cost, *args)
    assert report.verdict == "fail"
    assert _element_lines(str(report), "theta")[0] == max(ratio, key=ratio.get), str(report)


# report_message.py: Σθ² at θ ~ 1e-8, the exact gradient.
def test_report_message_repro(backend):
    xp = backend.xp
    theta = 1e-8 * np.random.default_rng(0).uniform(0.5, 1.5, 6)
    report = gc.check(lambda p: xp.sum(p * p, axis=-1), on(backend, theta), on(backend, 2 * theta))
    never_fail(report, "exact gradient")
    full = gc.check(lambda p: xp.sum(p * p, axis=-1), on(backend, theta), on(backend, 2 * theta), top_k=6)
    if full.verdict == "fail" and any(e.absolute > e.tolerance for e in full.parameters["theta"].top):
        assert NO_SINGLE not in str(full), str(full)
