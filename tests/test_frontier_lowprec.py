"""Issue 18, class 8: float16 / bfloat16 parameters and gradients, and mixed magnitudes.

* A cost that casts its low-precision parameters back to their dtype (mixed-precision code:
  ``W.astype(float16)``, ``.to(bfloat16)``) and one that does not: the exact gradient, rounded
  to the params' dtype, never fails; bfloat16 gradients × 1.5 and float16 gradients × 1.1
  never pass; one small element sign-flipped (× −3) beside large ones never passes.
* Mixed magnitudes: a tensor with a few huge elements and many small ones, the small ones
  sign-flipped, never passes (float32 and float16); the correct one never fails.

Truth: the given gradient is the exact (float64) gradient of the cost's ideal math at the
parameters' values, rounded once to its dtype (asserted); the linear cost's gradient is its
coefficient vector exactly.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from frontier import has_dtype, never_fail, never_pass, on, torch_or_skip
from hypothesis import assume, given
from hypothesis import strategies as st

import gcbackend as gc

EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
WRONG = {"float16": 1.1, "bfloat16": 1.5}


def _round_to(values, dtype):
    """float64 values rounded to ``dtype`` and back (bfloat16 through torch)."""
    if dtype == "bfloat16":
        torch = torch_or_skip()
        return torch.tensor(values).to(torch.bfloat16).double().numpy()
    return np.asarray(values).astype(dtype).astype(np.float64)


def _low(xp, dtype):
    return getattr(xp, dtype)


def _cast_cost(dtype):
    """Σ tanh(X W_lowᵀ) computed in ``dtype`` (params and X cast), summed in float64."""

    def cost(W, X):
        xp = array_api_compat.array_namespace(W, X)
        Z = xp.astype(X, _low(xp, dtype)) @ xp.matrix_transpose(xp.astype(W, _low(xp, dtype)))
        return xp.sum(xp.astype(xp.tanh(Z), xp.float64), axis=(-2, -1))

    return cost


def _plain_cost(W, X):
    """Σ sin(W)·X, no casts: the check evaluates it in float64."""
    xp = array_api_compat.array_namespace(W, X)
    return xp.sum(xp.sin(W) * X, axis=(-2, -1))


def _lowprec_case(dtype, kind, seed, k, d, m):
    """Host float64 W (exactly representable in dtype), X, and the exact gradient of the cost's math."""
    rng = np.random.default_rng(seed)
    W = _round_to(rng.normal(size=(k, d)), dtype)
    if kind == "cast":
        X = rng.normal(size=(m, d))
        Xl = _round_to(X, dtype)  # the cost sees X rounded to dtype
        exact = (1 - np.tanh(Xl @ W.T) ** 2).T @ Xl
    else:
        X = rng.normal(size=(k, d))
        exact = np.cos(W) * X
    return W, X, exact


def _assert_rounded_once(given, exact, dtype):
    """The truth: ``given`` is ``exact`` rounded to dtype, no more (half an ulp; float16's
    subnormals below 6.1e-5 are spaced 2**-24 apart)."""
    assert np.all(np.abs(given - exact) <= EPS[dtype] * np.abs(exact) + 2.0**-25)


def _judge(report_of, W, X, exact, dtype, context):
    correct = _round_to(exact, dtype)
    _assert_rounded_once(correct, exact, dtype)
    never_fail(report_of(correct), f"correct, {context}")
    wrong = _round_to(WRONG[dtype] * exact, dtype)
    # The planted error dominates the dtype's rounding where the gradient is not tiny.
    assert np.max(np.abs(wrong - exact)) > 20 * EPS[dtype] * np.max(np.abs(exact))
    never_pass(report_of(wrong), f"× {WRONG[dtype]}, {context}")


@st.composite
def lowprec_cases(draw):
    return (
        draw(st.sampled_from(["cast", "plain"]), label="cost"),
        draw(st.integers(0, 10_000), label="seed"),
        draw(st.integers(2, 4), label="k"),
        draw(st.integers(3, 6), label="d"),
        draw(st.sampled_from([4, 8]), label="m"),
        draw(st.booleans(), label="upcast"),
    )


@given(case=lowprec_cases())
def test_float16_params_correct_never_fails_and_times_1_1_never_passes(backend, case):
    if not has_dtype(backend, "float16"):
        pytest.skip(f"{backend.name} has no float16 (the standard does not require it)")
    kind, seed, k, d, m, upcast = case
    W, X, exact = _lowprec_case("float16", kind, seed, k, d, m)
    cost = _cast_cost("float16") if kind == "cast" else _plain_cost
    params, args = on(backend, W, "float16"), on(backend, X)

    def report_of(g):
        return gc.check(cost, params, on(backend, g, "float16"), args, upcast=upcast)

    _judge(report_of, W, X, exact, "float16", str(case))


@given(case=lowprec_cases())
def test_bfloat16_params_correct_never_fails_and_times_1_5_never_passes(case):
    torch = torch_or_skip()
    kind, seed, k, d, m, upcast = case
    W, X, exact = _lowprec_case("bfloat16", kind, seed, k, d, m)
    cost = _cast_cost("bfloat16") if kind == "cast" else _plain_cost
    params, args = torch.tensor(W, dtype=torch.bfloat16), torch.tensor(X)

    def report_of(g):
        return gc.check(cost, params, torch.tensor(g, dtype=torch.bfloat16), args, upcast=upcast)

    _judge(report_of, W, X, exact, "bfloat16", str(case))


@pytest.mark.parametrize("seed", range(3))
def test_bfloat16_one_small_element_sign_flipped_beside_large_ones_never_passes(seed):
    torch = torch_or_skip()
    rng = np.random.default_rng(seed)
    W = _round_to(rng.normal(size=(4, 5)), "bfloat16")
    X = rng.normal(size=(4, 5))
    X[0, 0], X[0, 1] = 1e-2 / np.cos(W[0, 0]), 50.0 / np.cos(W[0, 1])
    exact = np.cos(W) * X  # exact[0, 0] = 1e-2, exact[0, 1] = 50
    bad = exact.copy()
    bad[0, 0] *= -3
    report = gc.check(
        _plain_cost,
        torch.tensor(W, dtype=torch.bfloat16),
        torch.tensor(bad, dtype=torch.bfloat16),
        torch.tensor(X),
    )
    never_pass(report, "element [0, 0] = −3 × true")


# lowprec_cast.py: numpy float16 params (grads float16 or float64, upcast on or off) and torch
# bfloat16 params, the exact gradient: all failed or were left inconclusive with numeric 0.
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("grad_dtype", ["float16", "float64"])
def test_lowprec_cast_repro_float16(grad_dtype, upcast):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 4))
    W = rng.normal(size=(3, 4)).astype(np.float16)
    W64, X16 = W.astype(np.float64), X.astype(np.float16).astype(np.float64)
    g = (1 - np.tanh(X16 @ W64.T) ** 2).T @ X16
    never_fail(gc.check(_cast_cost("float16"), W, g.astype(grad_dtype), X, upcast=upcast), "exact gradient")


def test_lowprec_cast_repro_bfloat16():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 4))
    W = rng.normal(size=(3, 4)).astype(np.float16).astype(np.float64)
    Wt, Xt = torch.tensor(W, dtype=torch.bfloat16), torch.tensor(X)
    Wd, Xb = Wt.double(), Xt.to(torch.bfloat16).double()
    g = ((1 - torch.tanh(Xb @ Wd.T) ** 2).T @ Xb).to(torch.bfloat16)
    never_fail(gc.check(_cast_cost("bfloat16"), Wt, g, Xt), "exact gradient")


# bf16_allowance.py: bfloat16 × 1.5 passed.
def test_bf16_allowance_repro():
    torch = torch_or_skip()
    torch.manual_seed(0)
    W = torch.randn(4, 5, dtype=torch.bfloat16)
    X = torch.randn(4, 5, dtype=torch.float64)
    true = torch.cos(W.double()) * X
    never_fail(gc.check(_plain_cost, W, true.to(torch.bfloat16), X), "exact")
    never_pass(gc.check(_plain_cost, W, (1.5 * true).to(torch.bfloat16), X), "× 1.5")


# ---------------------------------------------------------------------------------------------
# Mixed magnitudes

MIXED = {
    # dtype: (large magnitudes, small range): small ones below a tenth of the large
    "float32": ([1e4, 1e5, 1e7], (0.1, 1.0)),
    "float16": ([1.0, 3.0, 30.0], (1e-3, 1e-2)),
}


@given(
    dtype=st.sampled_from(["float32", "float16"]),
    n=st.sampled_from([20, 100, 200]),
    large=st.integers(1, 30),
    magnitude=st.integers(0, 2),
    seed=st.integers(0, 10_000),
)
def test_mixed_magnitudes_small_ones_sign_flipped_never_pass(backend, dtype, n, large, magnitude, seed):
    assume(has_dtype(backend, dtype))  # array-api-strict has no float16 (not required by the standard)
    assume(large < n // 2)
    xp = backend.xp
    magnitudes, (low, high) = MIXED[dtype]
    rng = np.random.default_rng(seed)
    c = rng.uniform(low, high, n) * rng.choice([-1.0, 1.0], n)
    c[rng.choice(n, large, replace=False)] = magnitudes[magnitude] * rng.choice([-1.0, 1.0], large)
    c = _round_to(c, dtype)  # the gradient is c exactly, in its dtype
    small = np.abs(c) < np.abs(c).max() / 10
    bad = np.where(small, -c, c)
    assert small.sum() == n - large and np.all(bad[small] == -c[small])

    def cost(w, c):
        return xp.sum(w * c, axis=-1)

    params, args = on(backend, np.zeros(n), dtype), on(backend, c)
    never_fail(gc.check(cost, params, on(backend, c, dtype), args), "correct")
    never_pass(
        gc.check(cost, params, on(backend, bad, dtype), args), f"{n - large} small elements sign-flipped"
    )


# mixed_magnitude.py: float32, three 1e7 elements and 97 small ones sign-flipped, passed.
def test_mixed_magnitude_repro(backend):
    xp = backend.xp
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 1.0, 100)
    c[:3] = 1e7
    bad = c.copy()
    bad[3:] *= -1
    report = gc.check(
        lambda w, c: xp.sum(w * c, axis=-1),
        on(backend, np.zeros(100), "float32"),
        on(backend, bad, "float32"),
        on(backend, c),
    )
    never_pass(report, "97 of 100 sign-flipped")
