"""check(): the notebook's numbers on every backend, verdicts, reports, nothing mutated."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_bitwise_equal, assert_on, host, snapshot

import gcbackend as gc
from gcbackend.models import linear, mlp

EPS64 = float(np.finfo(np.float64).eps)

# The notebook's settings: these tests pin its numbers, rows and error paths.
check = functools.partial(gc.check, **gc.NOTEBOOK)


@pytest.mark.parametrize(("x", "expected"), [(2, 2.919335883291695e-10), (3, 7.814075313343006e-11)])
@pytest.mark.parametrize("mode", ["stacked", "loop"])
def test_one_dimensional_matches_notebook(backend, x, expected, mode):
    theta = 4
    report = check(
        linear.cost, theta, linear.gradient(theta, x), x, backend=backend.xp, device=backend.device, mode=mode
    )
    # θ ± ε are formed exactly as in the notebook and J = θx is one multiplication: the
    # difference is the notebook's bit for bit.
    assert report.difference == expected
    assert report.passed
    result = report.parameters["theta"]
    assert result.shape == () and result.worst_index == ()
    assert result.analytic == float(x)
    assert abs(result.numeric - x) < 1e-8
    assert_on(result.numeric_grad, backend)
    assert str(result.numeric_grad.dtype).endswith("float64")


def test_one_dimensional_on_backend_arrays(backend):
    xp = backend.xp
    theta = xp.asarray(4.0, dtype=xp.float64, device=backend.device)
    x = xp.asarray(2.0, dtype=xp.float64, device=backend.device)
    report = check(linear.cost, theta, linear.gradient(theta, x), x)
    assert report.difference == 2.919335883291695e-10
    assert report.backend == backend.name and report.device == str(backend.device)


@pytest.mark.parametrize("mode", ["stacked", "loop"])
def test_seed_case_with_planted_bugs(backend, mode):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    report = check(mlp.cost, params, grads, X, Y, mode=mode)
    assert report.difference == pytest.approx(0.2850931567761623, rel=1e-8)
    assert not report.passed
    assert report.faults[:2] == ("b1", "W2")
    # db1 is 4× and dW2 2× the truth, so formula (2) gives |4g−g|/(4|g|+|g|) = 3/5 and 1/3.
    assert report.parameters["b1"].difference == pytest.approx(0.6, rel=1e-6)
    assert report.parameters["W2"].difference == pytest.approx(1 / 3, rel=1e-6)
    for name in ("W1", "b2", "W3"):
        assert report.parameters[name].difference < 2e-7
    worst = report.parameters["b1"]
    assert worst.analytic == pytest.approx(4 * worst.numeric, rel=1e-5)
    text = str(report)
    assert "There is a mistake in the backward propagation!" in text
    # Only the planted bugs are at fault: b3 (correct, over 2e-7 on its own) is not.
    faults_line = next(
        line for line in text.splitlines() if line.startswith("Parameters at fault, worst first")
    )
    assert "b3" not in faults_line
    assert faults_line.index("b1") < faults_line.index("W2")
    for name in params:
        assert name in text


@pytest.mark.parametrize("mode", ["stacked", "loop"])
def test_seed_case_correct_backprop(backend, mode):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    report = check(mlp.cost, params, grads, X, Y, mode=mode)
    assert np.isclose(report.difference, 1.1890913024229996e-07)  # the notebook's own assertion
    assert report.passed
    assert "Your backward propagation works perfectly fine!" in str(report)
    for name, result in report.parameters.items():
        assert result.shape == tuple(params[name].shape)
        assert_on(result.numeric_grad, backend)
        assert_on(result.analytic_grad, backend)
        assert np.max(np.abs(host(result.numeric_grad) - host(grads[name]))) < 1e-6


def test_numpy_inputs_moved_to_the_chosen_backend(backend):
    X, Y, params = mlp.seed_case()  # NumPy arrays
    grads = mlp.backward(params, X, Y)
    report = check(mlp.cost, params, grads, X, Y, backend=backend.xp, device=backend.device)
    assert report.backend == backend.name
    assert_on(report.parameters["W2"].numeric_grad, backend)
    assert np.isclose(report.difference, 1.1890913024229996e-07)  # the notebook's own assertion


def test_notebook_gradient_keys(backend):
    """The notebook's gradients dict: dW1…db3 plus dZ3, dA2, … which name no parameter."""
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = {"d" + k: v for k, v in mlp.backward_with_planted_bugs(params, X, Y).items()}
    grads.update(dZ3=X, dA2=X, dZ2=X, dA1=X, dZ1=X)
    report = check(mlp.cost, params, grads, X, Y)
    assert report.difference == pytest.approx(0.2850931567761623, rel=1e-8)


def test_user_arrays_bitwise_unchanged(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    saved = snapshot(params), snapshot(grads), snapshot(X), snapshot(Y)
    for mode in ("stacked", "loop"):
        report = check(mlp.cost, params, grads, X, Y, mode=mode, memory_budget=8 * 20)
        assert not report.passed
    assert_bitwise_equal(params, saved[0])
    assert_bitwise_equal(grads, saved[1])
    assert_bitwise_equal(X, saved[2])
    assert_bitwise_equal(Y, saved[3])


def test_report_holds_no_views_of_user_arrays(backend):
    xp = backend.xp
    X, Y, params = mlp.seed_case()
    grads = mlp.backward(params, X, Y)
    report = check(mlp.cost, params, grads, X, Y, backend=xp, device=backend.device)
    before = host(report.parameters["W1"].analytic_grad)
    grads["W1"][...] = 1e6  # the user reuses their buffer
    assert host(report.parameters["W1"].analytic_grad).tobytes() == before.tobytes()


def test_report_is_frozen_and_typed(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    report = check(mlp.cost, params, mlp.backward(params, X, Y), X, Y)
    assert type(report.difference) is float and type(report.passed) is bool
    assert report.threshold == 2e-7 and report.epsilon == 1e-7
    assert list(report.parameters) == list(params)
    assert report.evaluations == 2 * 47
    assert report.dtype == "float64"
    with pytest.raises(AttributeError):
        report.difference = 0.0
    with pytest.raises(TypeError):
        report.parameters["W1"] = None


def test_threshold_decides_the_verdict(backend):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    strict = check(mlp.cost, params, grads, X, Y, threshold=1e-7)
    loose = check(mlp.cost, params, grads, X, Y, threshold=1e-6)
    assert not strict.passed and loose.passed
    assert strict.difference == loose.difference
    assert "There is a mistake" in str(strict)


def test_wider_epsilon_separates_noise_from_bugs(backend):
    """At ε = 1e-4 every correct parameter is far below 2e-7 and only the bugs fail."""
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    report = check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, epsilon=1e-4)
    assert set(report.faults) == {"W2", "b1"}
    assert max(p.difference for n, p in report.parameters.items() if n not in ("W2", "b1")) < 1e-8


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_localises_a_single_wrong_element(backend, dtype):
    X, Y, params = mlp.random_case(
        [6, 5, 4, 1], 16, seed=3, dtype=dtype, xp=backend.xp, device=backend.device
    )
    grads = dict(mlp.backward(params, X, Y))
    wrong = host(grads["W2"])
    wrong[2, 3] += 0.5 + abs(wrong[2, 3])
    grads["W2"] = wrong
    epsilon = 1e-3 if dtype == "float32" else 1e-6
    report = check(mlp.cost, params, grads, X, Y, backend=backend.xp, device=backend.device, epsilon=epsilon)
    assert report.faults[0] == "W2"
    assert report.parameters["W2"].worst_index == (2, 3)
    assert report.parameters["W2"].analytic == pytest.approx(float(wrong[2, 3]), rel=1e-6)
    assert report.dtype == dtype
    # float32 parameters are evaluated in float64 (upcast=True), and the report says so.
    assert str(report.parameters["W2"].numeric_grad.dtype).endswith("float64")
    assert any("evaluated in float64" in note for note in report.notes) == (dtype == "float32")


def test_progress_bar_counts_every_row(monkeypatch):
    """progress=True draws a tqdm bar whose total and final count are the rows evaluated."""
    import tqdm.auto

    seen = []

    class Recording(tqdm.auto.tqdm):
        def close(self):
            if not self.disable:  # tqdm closes once more when collected
                seen.append((self.total, self.n, self.delay))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    X, Y, params = mlp.seed_case()
    reports = [gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, progress=True)]
    reports.append(check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, progress=True, mode="loop"))
    X, Y, params = mlp.random_case([8, 16, 8, 1], 32, seed=3)  # 289 parameters, many small calls
    reports.append(
        gc.check(
            mlp.cost, params, mlp.backward(params, X, Y), X, Y, progress=True, workers=2, memory_budget=8192
        )
    )
    # The staircase decides its rows as it goes: the total grows with each stage and ends at the
    # rows evaluated (every evaluation but J(θ), twice under the defaults; 2N under the notebook's).
    rows = [r.evaluations - (0 if r.epsilon == 1e-7 else 2) for r in reports]
    assert seen == [(rows[0], rows[0], 2.0), (2 * 47, 2 * 47, 2.0), (rows[2], rows[2], 2.0)]
    assert rows[1] == 2 * 47 and 2 * 289 <= rows[2] < 4 * 289


def test_no_progress_bar_off_a_terminal(capsys):
    X, Y, params = mlp.seed_case()
    gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y)  # pytest's stderr is no tty
    gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- workers= (threads)


def _threads_case(backend):
    # 289 parameters, 578 or 1157 rows: several chunks of 64 rows for W1 and W2.
    return mlp.random_case([8, 16, 8, 1], 32, seed=3, xp=backend.xp, device=backend.device)


@pytest.mark.parametrize("options", [gc.NOTEBOOK, {}, {"mode": "directions"}, {"sample": 20}])
def test_workers_give_the_one_thread_report(backend, options):
    X, Y, params = _threads_case(backend)
    grads = mlp.backward_with_planted_bugs(params, X, Y)
    saved = snapshot(params)
    kwargs = dict(options)  # the default budget: W1's 256 first-stage rows in chunks of 64
    one = gc.check(mlp.cost, params, grads, X, Y, **kwargs)
    two = gc.check(mlp.cost, params, grads, X, Y, workers=2, **kwargs)
    assert two.difference == one.difference and two.verdict == one.verdict == "fail"
    for name, result in one.parameters.items():
        other = two.parameters[name]
        assert other.top == result.top and other.verdict == result.verdict, name
        assert host(other.numeric_grad).tobytes() == host(result.numeric_grad).tobytes(), name
        assert_on(other.numeric_grad, backend)
    assert "chunks of rows evaluated on 2 threads (BLAS on 1 thread each)" in two.notes
    assert_bitwise_equal(params, saved)


def test_workers_call_the_cost_from_several_threads_with_blas_on_one():
    import threading
    import time

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    X, Y, params = mlp.random_case([8, 16, 8, 1], 32, seed=3)
    calls = []

    def cost(p, X, Y):
        calls.append((threading.get_ident(), blas_threads()))
        time.sleep(0.002)  # long enough that both threads take chunks
        return mlp.cost(p, X, Y)

    before = blas_threads()
    check(cost, params, mlp.backward(params, X, Y), X, Y, workers=2)  # chunks of 64 rows
    assert blas_threads() == before  # restored
    # The calling thread only decides each tensor's path (mode='auto': a 2-row probe, two
    # single calls and the first chunk, per tensor) and evaluates J(θ); the rest is threaded.
    main = threading.get_ident()
    assert sum(ident == main for ident, _ in calls) <= 4 * len(params) + 1
    assert len({ident for ident, _ in calls} - {main}) == 2
    assert all(threads == [1] * len(before) for ident, threads in calls if ident != main)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True, "2", None])
def test_workers_must_be_a_count_or_minus_one(workers):
    X, Y, params = mlp.seed_case()
    with pytest.raises(gc.InputError, match=r"workers=.* must be a positive number of threads, or -1"):
        gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, workers=workers)


def test_workers_exclude_a_client_and_apply_to_the_loop():
    X, Y, params = mlp.seed_case()
    grads = mlp.backward(params, X, Y)
    # issue 12: workers= threads loop rows too (the cost is then called concurrently).
    one = gc.check(mlp.cost, params, grads, X, Y, mode="loop")
    two = gc.check(mlp.cost, params, grads, X, Y, workers=2, mode="loop")
    assert two.difference == one.difference and two.parameters["W1"].path == "loop"
    with pytest.raises(gc.InputError, match=r"workers=-1 .*client=.*drop workers="):
        gc.check(mlp.cost, params, grads, X, Y, workers=-1, client=object())


def test_a_cost_failing_on_a_thread_raises_the_one_thread_error():
    X, Y, params = mlp.random_case([8, 16, 8, 1], 32, seed=3)
    last = float(params["W2"][-1, -1])

    def cost(p, X, Y):
        # The last chunk of W2's first-stage rows (256 = 4·64: rows 192..255 move elements 64..127
        # by −h) is the only batch whose last row moves W2's last element.
        if p["W2"].ndim == 3 and p["W2"].shape[0] > 1 and float(p["W2"][-1, -1, -1]) != last:
            raise ValueError("not the last chunk")
        return mlp.cost(p, X, Y)

    errors = []
    for workers in (1, 2):
        with pytest.raises(gc.CostError) as caught:
            check(cost, params, mlp.backward(params, X, Y), X, Y, workers=workers)  # chunks of 64 rows
        errors.append(str(caught.value))
    assert errors[0] == errors[1]
    assert "ValueError: not the last chunk (at a batch of 64 perturbed copies of parameter 'W2')" in errors[0]


def test_workers_minus_one_is_one_per_cpu():
    import os

    from gcbackend import evaluation

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert evaluation.worker_count(-1) == cpus and evaluation.worker_count(3) == 3


def _notebook_gradient_check_n(params, grads, X, Y, epsilon=1e-7):
    """The course notebook's gradient_check_n, as written there (NumPy, one row at a time)."""
    names = ("W1", "b1", "W2", "b2", "W3", "b3")
    theta = np.concatenate([params[k].reshape(-1, 1) for k in names])
    grad = np.concatenate([grads[k].reshape(-1, 1) for k in names])
    shapes = [params[k].shape for k in names]

    def unpack(vector):
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            out[name] = vector[start : start + size].reshape(shape)
            start += size
        return out

    gradapprox = np.zeros_like(theta)
    for i in range(theta.shape[0]):
        plus, minus = np.copy(theta), np.copy(theta)
        plus[i][0] += epsilon
        minus[i][0] -= epsilon
        gradapprox[i] = (mlp.cost(unpack(plus), X, Y) - mlp.cost(unpack(minus), X, Y)) / (2 * epsilon)
    numerator = np.linalg.norm(grad - gradapprox)
    return numerator / (np.linalg.norm(grad) + np.linalg.norm(gradapprox))


@pytest.mark.parametrize("buggy", [True, False])
def test_notebook_settings_reproduce_the_notebooks_own_loop(buggy):
    """The notebook's gradient_check_n, run here as written, gives the same number to the last
    ulp or so (np.linalg.norm sums squares with a BLAS dot, the array API's vector_norm pairwise)."""
    X, Y, params = mlp.seed_case()
    grads = mlp.backward_with_planted_bugs(params, X, Y) if buggy else mlp.backward(params, X, Y)
    reference = _notebook_gradient_check_n(params, grads, X, Y)
    for mode in ("loop", "stacked"):
        report = check(mlp.cost, params, grads, X, Y, mode=mode, **gc.NOTEBOOK)
        assert report.difference == pytest.approx(reference, rel=4e-16 if buggy else 1e-9)
        assert report.verdict == ("fail" if buggy else "pass")


def test_the_loop_with_workers_needs_no_budget(backend):
    # mode='loop' is not refused below one perturbed copy (it perturbs one row in place), and
    # with workers= it was: choosing the threads and handing out chunks asked the budget for a
    # batch ("… too small for one perturbed copy of parameter ''").
    X, Y, params = mlp.random_case([4, 5, 3, 1], 3, seed=2, xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    alone = gc.check(mlp.cost, params, grads, X, Y, mode="loop")
    both = gc.check(mlp.cost, params, grads, X, Y, mode="loop", workers=2, memory_budget=8)
    assert both.verdict == alone.verdict == "pass" and both.difference == alone.difference
    assert both.notes == (
        *alone.notes,
        "workers=2: 1 thread(s), as memory_budget=8 holds one of the largest parameter's chunks at once",
    )
