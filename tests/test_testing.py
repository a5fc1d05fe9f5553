"""testing: assert_gradients passes a correct backprop and fails a wrong one with the report."""

from __future__ import annotations

import pytest

import gcbackend as gc
from gcbackend.models import mlp
from gcbackend.testing import assert_gradients

# At the notebook's ε = 1e-7 rounding noise of correct parameters reaches the 2e-7 threshold;
# ε = 1e-4 separates noise from the planted bugs cleanly on the seed case.
OPTIONS = {"epsilon": 1e-4, "threshold": 2e-7}


def test_a_correct_backprop_passes_and_returns_the_report(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    report = assert_gradients(mlp.cost, params, mlp.backward(params, X, Y), X, Y, **OPTIONS)
    assert isinstance(report, gc.Report) and report.passed
    assert report.difference < 2e-7


def test_a_wrong_backprop_fails_with_the_report_as_message(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    buggy = mlp.backward_with_planted_bugs(params, X, Y)
    with pytest.raises(AssertionError) as caught:
        assert_gradients(mlp.cost, params, buggy, X, Y, **OPTIONS)
    message = str(caught.value)
    first, blank, rest = message.split("\n", 2)
    # The first line is what pytest's one-line summary shows: the parameters at fault.
    assert first == "gradient check fail: b1 (difference 0.6), W2 (difference 0.33)"
    assert blank == ""
    assert rest == str(gc.check(mlp.cost, params, buggy, X, Y, **OPTIONS))
    assert "There is a mistake in the backward propagation!" in message
    assert "b1" in message and "W2" in message


def test_pytests_one_line_summary_names_the_faulty_parameters(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # pytest cuts the summary line at the terminal's width
    pytester.makepyfile(
        """
        from gcbackend.models import mlp
        from gcbackend.testing import assert_gradients

        def test_backprop():
            X, Y, params = mlp.seed_case()
            assert_gradients(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y)
        """
    )
    result = pytester.runpytest("-rf", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "FAILED test_pytests_one_line_summary_names_the_faulty_parameters.py::test_backprop - "
            "AssertionError: gradient check fail: b1 (difference 0.6), W2 (difference 0.33)"
        ]
    )


def test_bad_input_is_not_an_assertion_error():
    X, Y, params = mlp.seed_case()
    grads = mlp.backward(params, X, Y)
    with pytest.raises(gc.InputError, match="epsilon"):
        assert_gradients(mlp.cost, params, grads, X, Y, epsilon=-1.0)


def test_the_suite_prints_one_line_for_all_skips(pytester, monkeypatch):
    # The same hook as tests/conftest.py, loaded into a child pytest with skips of two reasons.
    from pathlib import Path

    monkeypatch.setenv("GCBACKEND_TEST_BACKENDS", "numpy")
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_gpu(i):
            pytest.skip("cupy: backend='cupy': CuPy is not installed")

        def test_other():
            pytest.skip("needs in-place writes")

        def test_runs():
            assert True
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rfEX")
    result.assert_outcomes(passed=1, skipped=4)
    assert (
        "skipped 4: 3 × backend='cupy': CuPy is not installed; 1 × needs in-place writes" in result.outlines
    )
    assert not [line for line in result.outlines if line.startswith("SKIPPED")]
