"""Issue 18, classes 6, 7 and 9: tied kinks, reductions over the whole batch, a kink nearby.

6. Ties: a max-pool backward that routes dout to EVERY tied maximum never passes (through
   ``gc.check`` and ``gc.check_layer``, windows apart and overlapping, quantised inputs with
   many ties); routing to one maximum (the first) passes; g = ones(4) for ‖t‖₂ at t = 0 never
   passes.
7. Batched reductions: a cost that divides by a reduction over ALL axes (max, sum, norm of W,
   written as a user writes it: no axis) is wrong when stacked only in the chunk that moves
   the special element: correct gradients pass, two elements halved never pass.
9. Next to a kink: J = Σ sin θ + relu(±(θ₀ − corner)) with the corner a distance d from θ₀
   (d = frac·h, h the base commit's automatic step, or d anywhere in [1e-7, 2e-4]); J is
   smooth at θ: the correct gradient never fails, θ₀'s off by 0.3–0.7 never passes.

Truth: the subdifferential of a max-pool cost is the sum over windows of c_w × the simplex
over the window's tied maxima (plus the smooth part), so Σ_j g_j − (smooth part) must equal
Σ_w c_w: routing to all k_w tied maxima gives Σ_w c_w·k_w, not a subgradient wherever the
two differ (asserted per case). Reductions: mpmath central differences at 40 digits.
"""

from __future__ import annotations

import math
import re

import array_api_compat
import numpy as np
import pytest
from frontier import mpmath_or_skip, never_fail, never_pass, on, passes
from hypothesis import assume, given
from hypothesis import strategies as st

import gcbackend as gc

# ---------------------------------------------------------------------------------------------
# 6. Ties


def _windows(height, width, pool, stride):
    """Top-left corners of the pooling windows."""
    return [(i, j) for i in range(0, height - pool + 1, stride) for j in range(0, width - pool + 1, stride)]


def _pool_cost(c, pool, stride, shape):
    """J = Σ_w c_w · max(x in window w) + 0.05·Σx², x of shape (H, W), batched over leading axes."""
    corners = _windows(*shape, pool, stride)

    def cost(x, c):
        xp = array_api_compat.array_namespace(x)
        maxima = xp.stack(
            [xp.max(x[..., i : i + pool, j : j + pool], axis=(-2, -1)) for i, j in corners], axis=-1
        )
        return xp.sum(maxima * c, axis=-1) + 0.05 * xp.sum(x * x, axis=(-2, -1))

    return cost


def _pool_backward(x, c, pool, stride, route_all):
    """The hand-written backward: dout c_w to the first maximum of each window, or to all."""
    g = 0.1 * x
    for w, (i, j) in enumerate(_windows(*x.shape, pool, stride)):
        window = x[i : i + pool, j : j + pool]
        mask = window == window.max()
        if not route_all:
            first = np.zeros(mask.size, dtype=bool)
            first[np.argmax(mask.reshape(-1))] = True
            mask = first.reshape(mask.shape)
        g[i : i + pool, j : j + pool] += c[w] * mask
    return g


def _routing_all_is_no_subgradient(x, c, pool, stride) -> bool:
    """Σ_j (g_j − 0.1·x_j) of every subgradient is Σ_w c_w; routing to all gives Σ_w c_w·k_w."""
    ties = []
    for i, j in _windows(*x.shape, pool, stride):
        window = x[i : i + pool, j : j + pool]
        ties.append(int(np.sum(window == window.max())))
    excess = sum(cw * (k - 1) for cw, k in zip(c, ties))
    return abs(excess) > 0.1 * max(np.abs(c).max(), 1e-300)


@st.composite
def pooling_cases(draw):
    pool, stride = draw(st.sampled_from([(2, 2), (2, 1), (3, 2)]), label="pool, stride")
    height, width = draw(st.integers(pool + 1, 6)), draw(st.integers(pool, 6))
    levels = draw(st.sampled_from([1, 2, 4]), label="quantisation levels per unit")
    seed = draw(st.integers(0, 10_000))
    positive = draw(st.booleans(), label="dout > 0")
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(height, width)) * levels) / levels
    n = len(_windows(height, width, pool, stride))
    c = rng.uniform(0.5, 2.0, n) * (1 if positive else rng.choice([-1.0, 1.0], n))
    return x, c, pool, stride, positive


@given(case=pooling_cases())
def test_maxpool_routing_to_every_tied_maximum_never_passes(backend, case):
    x, c, pool, stride, positive = case
    cost = _pool_cost(c, pool, stride, x.shape)
    first = gc.check(
        cost, on(backend, x), on(backend, _pool_backward(x, c, pool, stride, False)), on(backend, c)
    )
    overlapping = stride < pool
    if overlapping and not positive:
        # Overlapping windows whose douts have both signs: a valid subgradient can lie outside
        # every one-sided bracket, so inconclusive is an honest answer; fail is not.
        never_fail(first, "route to the first maximum")
    else:
        passes(first, "route to the first maximum")
    assume(_routing_all_is_no_subgradient(x, c, pool, stride))
    every = _pool_backward(x, c, pool, stride, True)
    never_pass(
        gc.check(cost, on(backend, x), on(backend, every), on(backend, c)), "route to every tied maximum"
    )


# maxpool_ties_pass.py: windows of 2 on a vector, two of them tied.
def test_maxpool_ties_repro(backend):
    xp = backend.xp
    x = np.array([1.0, 1.0, 0.3, 2.0, -0.5, -0.5, 0.7, 0.1])
    c = np.array([1.5, -0.7, 2.0, 0.4])

    def cost(x, c):
        windows = xp.reshape(x, (*x.shape[:-1], 4, 2))
        return xp.sum(xp.max(windows, axis=-1) * c, axis=-1) + 0.1 * xp.sum(x * x, axis=-1)

    def backward(route_all):
        w = x.reshape(4, 2)
        mask = (w == w.max(axis=1, keepdims=True)).astype(float)
        if not route_all:
            first = np.zeros_like(mask)
            first[np.arange(4), mask.argmax(1)] = 1
            mask = first
        return (mask * c[:, None]).reshape(-1) + 0.2 * x

    # The truth: tied windows 0 (c = 1.5) and 2 (c = 2.0); routing to all sums 2·c_w there.
    assert backward(True).sum() - backward(False).sum() == pytest.approx(1.5 + 2.0)
    passes(gc.check(cost, on(backend, x), on(backend, backward(False)), on(backend, c)), "first max")
    every = gc.check(cost, on(backend, x), on(backend, backward(True)), on(backend, c))
    never_pass(every, "all ties")
    if every.verdict == "fail":  # what failed is said: the tied directions, not "no element is off"
        result = every.parameters["theta"]
        assert result.ties_off and len(result.ties_off) <= result.ties
        line = next(line for line in str(every).splitlines() if line.startswith("  theta: "))
        assert re.fullmatch(
            rf"  theta: no single element is off by more than its error bar, but moving its tied kink elements "
            rf"together \({len(result.ties_off)} of {result.ties} such directions\) J changes otherwise than the "
            r"gradient says \(worst: analytic \S+, numeric \S+\): does the backward route to every tied "
            r"maximum\? \(a subgradient routes to one\)",
            line,
        ), line
        analytic, numeric = result.ties_off[0]
        assert abs(analytic - numeric) > 0.1 * abs(numeric)  # the routed-to-all excess, not rounding


@given(n=st.integers(2, 6), length=st.sampled_from([1.5, 2.0, math.sqrt(2.0)]), seed=st.integers(0, 1000))
def test_norm_at_zero_with_a_gradient_outside_the_unit_ball_never_passes(backend, n, length, seed):
    xp = backend.xp
    u = np.random.default_rng(seed).normal(size=n)
    u = np.abs(u) if seed % 2 else u  # ones(n)-like directions too
    g = length * u / np.linalg.norm(u)
    assert np.linalg.norm(g) > 1.25  # the subdifferential of ‖t‖₂ at 0 is the unit ball

    def cost(t):
        return xp.sqrt(xp.sum(t * t, axis=-1))

    never_pass(gc.check(cost, on(backend, np.zeros(n)), on(backend, g)), f"‖g‖ = {length}")


def test_norm_at_zero_with_ones_never_passes(backend):
    xp = backend.xp
    report = gc.check(
        lambda t: xp.linalg.vector_norm(t, axis=-1), on(backend, np.zeros(4)), on(backend, np.ones(4))
    )
    never_pass(report, "g = ones(4), ‖g‖ = 2")


# layer_maxpool_ties.py: the CS231n-style naive layer, checked with check_layer.
def _maxpool_forward(x, pool_param):
    N, C, H, W = x.shape
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    Ho, Wo = 1 + (H - ph) // s, 1 + (W - pw) // s
    out = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            out[:, :, i, j] = x[:, :, i * s : i * s + ph, j * s : j * s + pw].max(axis=(2, 3))
    return out, (x, pool_param)


def _maxpool_backward(dout, cache, all_ties=False):
    x, pool_param = cache
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    dx = np.zeros_like(x)
    N, C, Ho, Wo = dout.shape
    for i in range(Ho):
        for j in range(Wo):
            window = x[:, :, i * s : i * s + ph, j * s : j * s + pw]
            mask = window == window.max(axis=(2, 3), keepdims=True)
            if not all_ties:
                flat = mask.reshape(N, C, -1)
                first = np.zeros_like(flat)
                first[np.arange(N)[:, None], np.arange(C)[None, :], flat.argmax(-1)] = True
                mask = first.reshape(mask.shape)
            dx[:, :, i * s : i * s + ph, j * s : j * s + pw] += mask * dout[:, :, i, j][:, :, None, None]
    return dx


@pytest.mark.parametrize(
    ("pool", "stride", "seed"), [(2, 2, 0), (2, 2, 1), (2, 2, 2), (2, 1, 0), (3, 1, 1), (3, 2, 2)]
)
def test_check_layer_maxpool_routing_to_every_tie_never_passes(pool, stride, seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(2, 2, 5, 5)), 0)  # quantised inputs: many ties
    pp = {"pool_height": pool, "pool_width": pool, "stride": stride}
    out, _ = _maxpool_forward(x, pp)
    # The truth: count the ties under each window; routing to every tied maximum adds
    # Σ_w (k_w − 1)·dout_w to Σ_j dx_j, which check_layer's continuous random dout makes
    # nonzero (with probability 1), so dx is no subgradient.
    ties = np.zeros(out.shape, dtype=int)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            window = x[:, :, i * stride : i * stride + pool, j * stride : j * stride + pool]
            ties[:, :, i, j] = (window == window.max(axis=(2, 3), keepdims=True)).sum(axis=(2, 3))
    assert (ties > 1).sum() >= 2
    first = gc.check_layer(_maxpool_forward, _maxpool_backward, x, pp)
    if stride == pool:
        passes(first, "first-max routing")
    else:
        never_fail(first, "first-max routing, overlapping windows")
    every = gc.check_layer(_maxpool_forward, lambda d, c: _maxpool_backward(d, c, all_ties=True), x, pp)
    never_pass(every, "route to every tied maximum")


def test_check_layer_maxpool_ties_repro():
    rng = np.random.default_rng(0)
    rng.normal(size=(2, 3, 4)), rng.normal(size=(12, 5)), rng.normal(size=5), rng.normal(size=(4, 5))
    rng.normal(size=(4, 5)), rng.normal(size=(2, 2, 4, 4))  # the repro's earlier draws
    xt = np.round(rng.normal(size=(2, 2, 4, 4)), 0)
    pp = {"pool_height": 2, "pool_width": 2, "stride": 2}
    windows = xt.reshape(2, 2, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 2, 4, 4)
    assert ((windows == windows.max(-1, keepdims=True)).sum(-1) > 1).any()  # there are ties
    passes(gc.check_layer(_maxpool_forward, _maxpool_backward, xt, pp), "first-max routing")
    every = gc.check_layer(_maxpool_forward, lambda d, c: _maxpool_backward(d, c, all_ties=True), xt, pp)
    never_pass(every, "route to every tied maximum (the bug)")


# ---------------------------------------------------------------------------------------------
# 7. Batched reductions over all axes

REDUCTIONS = ("max", "sum", "norm")


def _reduced_cost(kind):
    def cost(W, C):
        xp = array_api_compat.array_namespace(W, C)
        if kind == "max":
            M = xp.max(W)  # over ALL axes, the batch axis too when stacked
        elif kind == "sum":
            M = xp.sum(W)
        else:
            M = xp.sqrt(xp.sum(W * W))
        return xp.sum(xp.sin(W / M) * C, axis=(-2, -1))

    return cost


def _reduced_case(kind, seed, shape, special):
    rng = np.random.default_rng(seed)
    W = rng.uniform(0.1, 1.0, size=shape)
    W.reshape(-1)[special] = 1.5  # the unique maximum
    C = rng.normal(size=shape)
    M = {"max": W.max(), "sum": W.sum(), "norm": np.sqrt((W * W).sum())}[kind]
    dM = {"max": (W == W.max()).astype(float), "sum": np.ones_like(W), "norm": W / M}[kind]
    S = np.cos(W / M) * C
    g = S / M - np.sum(S * W) / M**2 * dM
    return W, C, g


def _assert_reduced_truth(kind, W, C, g, indices):
    mpmath = mpmath_or_skip(40)
    flat, weights = (
        [mpmath.mpf(float(w)) for w in W.reshape(-1)],
        [mpmath.mpf(float(c)) for c in C.reshape(-1)],
    )

    def J(values):
        if kind == "max":
            M = max(values)
        elif kind == "sum":
            M = mpmath.fsum(values)
        else:
            M = mpmath.sqrt(mpmath.fsum(v * v for v in values))
        return mpmath.fsum(mpmath.sin(v / M) * c for v, c in zip(values, weights))

    e = mpmath.mpf("1e-20")
    for j in indices:
        up, down = list(flat), list(flat)
        up[j] += e
        down[j] -= e
        exact = (J(up) - J(down)) / (2 * e)
        assert abs(exact - g.reshape(-1)[j]) <= 1e-12 * (1 + abs(exact)), (j, float(exact), g.reshape(-1)[j])


@given(
    kind=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 10_000),
    shape=st.sampled_from([(20, 20), (20, 24), (24, 21)]),
    special=st.integers(0, 10_000),
    other=st.one_of(st.integers(-12, 12), st.integers(0, 10_000)),
)
def test_a_cost_reducing_over_all_axes_is_judged_right(backend, kind, seed, shape, special, other):
    # `other` near `special` (offsets −12…12) puts both in the chunk that moves the special
    # element, where a cost reducing over the batch axis is wrong; far, in another chunk.
    size = shape[0] * shape[1]
    special, other = special % size, (special + other) % size
    assume(special != other)
    W, C, g = _reduced_case(kind, seed, shape, special)
    _assert_reduced_truth(kind, W, C, g, (special, other))
    cost = _reduced_cost(kind)
    passes(
        gc.check(cost, on(backend, W), on(backend, g), on(backend, C)), f"correct, {kind}, max at {special}"
    )
    bad = g.copy()
    bad.reshape(-1)[[special, other]] *= 0.5
    never_pass(
        gc.check(cost, on(backend, W), on(backend, bad), on(backend, C)), f"halved at {special}, {other}"
    )


# batch_global_max.py: W[15, 0] the maximum; grad[14, 8] and grad[15, 0] halved passed.
def test_batch_global_max_repro(backend):
    rng = np.random.default_rng(0)
    W = rng.uniform(0.1, 1.0, size=(20, 20))
    W[15, 0] = 1.5
    C = rng.normal(size=(20, 20))
    M = W.max()
    S = np.cos(W / M) * C
    g = S / M
    g.flat[300] -= np.sum(S * W) / M**2
    _assert_reduced_truth("max", W, C, g, (290, 300))
    cost = _reduced_cost("max")
    report = gc.check(cost, on(backend, W), on(backend, g), on(backend, C))
    passes(report, "correct")
    assert report.parameters["theta"].kinks == (), str(report)  # J is smooth at W: no kinks
    bad = g.copy()
    bad[14, 8] *= 0.5
    bad[15, 0] *= 0.5
    never_pass(gc.check(cost, on(backend, W), on(backend, bad), on(backend, C)), "two elements halved")


# ---------------------------------------------------------------------------------------------
# 9. Next to a kink

H_BASE = 6.055454452393342e-05
"""The automatic float64 step at θ = 0 on the base commit: (1000·eps)^(1/3), θ + h exact."""


def _near_kink_cost(d, side):
    """Σ sin θ + relu(θ₀ − d) (side +1: flat at θ₀ = 0) or relu(θ₀ + d) (side −1: slope 1 there)."""

    def cost(t):
        xp = array_api_compat.array_namespace(t)
        hinge = t[..., 0] - side * d
        return xp.sum(xp.sin(t), axis=-1) + xp.maximum(hinge, xp.zeros_like(hinge))

    return cost


@given(
    n=st.sampled_from([3, 30, 300, 3000]),
    distance=st.one_of(
        st.floats(0.01, 2.0).map(lambda frac: frac * H_BASE),
        st.floats(-7, math.log10(2e-4)).map(lambda e: 10.0**e),
    ),
    side=st.sampled_from([1, -1]),
    wrong=st.floats(0.3, 0.7),
    seed=st.integers(0, 10_000),
)
def test_next_to_a_kink_correct_never_fails_and_wrong_never_passes(backend, n, distance, side, wrong, seed):
    theta = np.random.default_rng(seed).uniform(-1, 1, n)
    theta[0] = 0.0
    # The truth: the corner is at θ₀ = side·d ≠ 0, so J is smooth at θ with relu' = 0 (side +1)
    # or 1 (side −1); the wrong value lies between the one-sided slopes of the corner.
    assert side * distance != 0.0
    true = np.cos(theta)
    true[0] += 0.0 if side == 1 else 1.0
    cost = _near_kink_cost(distance, side)
    never_fail(
        gc.check(cost, on(backend, theta), on(backend, true)), f"correct, d = {distance:.3g}, side {side}"
    )
    bad = true.copy()
    bad[0] += wrong * side
    never_pass(
        gc.check(cost, on(backend, theta), on(backend, bad)), f"θ₀ off by {wrong:.2f}, d = {distance:.3g}"
    )


# near_kink_pass.py: the corner at h/4 and at 2h/3 of θ₀ = 0 in a 3,000-element tensor.
@pytest.mark.parametrize("frac", [0.25, 2 / 3])
@pytest.mark.parametrize("wrong", [0.3, 0.5, 0.7])
def test_near_kink_repro(backend, frac, wrong):
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, 3000)
    theta[0] = 0.0
    cost = _near_kink_cost(frac * H_BASE, 1)
    bad = np.cos(theta)
    bad[0] += wrong
    never_pass(gc.check(cost, on(backend, theta), on(backend, bad)), f"corner at {frac:.3g}h, +{wrong}")
