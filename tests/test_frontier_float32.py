"""Issue 18, classes 1, 2 and 10: float32 models, float32 evaluation, the stated resolution.

1. Float32 frameworks. The standard PyTorch workflow (a float32 ``nn.Sequential``, its float32
   autograd gradient, ``gc.check`` with the defaults): correct gradients PASS at
   initialisation, never fail after training (Adam), and one whole tensor × 1.01 at
   initialisation FAILS. The same for a JAX float32 model with x64 off.
2. Float32 evaluation (``upcast=False``, JAX with x64 off) of the package's ReLU MLP: correct
   gradients never fail and pass in ≥ 80 % of seeds; one tensor doubled never passes.
10. Resolution as stated: ``ParameterResult.resolution`` is the largest formula-(2) difference
   from the TRUE gradient a passing tensor can have; whenever a tensor passes, its true
   difference is at most that, and ``str(report)`` prints it.

Truth: float64 autograd (PyTorch) or a float64 backprop written out here at the same weights;
each test asserts that the float32 gradient it calls correct is the float64 one to float32
rounding, and that the error it plants dominates that rounding.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest
from frontier import (
    count,
    fails,
    formula2,
    never_fail,
    never_pass,
    on,
    passes,
    printed,
    torch_or_skip,
)
from helpers import host
from hypothesis import assume, given
from hypothesis import strategies as st

import gcbackend as gc
from gcbackend.models import mlp

# ---------------------------------------------------------------------------------------------
# 1. Float32 frameworks: PyTorch


def _torch_model(seed, d, hidden, activation, loss, batch, target="sin"):
    """A float32 nn.Sequential, its data and its cost, as a PyTorch user writes them."""
    torch = torch_or_skip()
    from torch.func import functional_call

    torch.manual_seed(seed)
    sizes = (d, *hidden, 1 if loss == "mse" else 3)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh() if activation == "tanh" else torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    X = torch.randn(batch, d)
    if loss == "mse":
        y = torch.randn(batch, 1) if target == "randn" else torch.sin(X.sum(1, keepdim=True))
        loss_fn = torch.nn.functional.mse_loss
    else:
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
        loss_fn = torch.nn.functional.cross_entropy

    def cost(p, X, y):
        return loss_fn(functional_call(model, p, (X,)), y)

    return model, cost, X, y


def _train(model, cost, X, y, steps):
    torch = torch_or_skip()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        cost(dict(model.named_parameters()), X, y).backward()
        optimiser.step()


def _torch_grads(model, cost, X, y):
    """float32 params, their float32 autograd gradient, and float64 autograd at the same weights."""
    torch = torch_or_skip()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g32 = dict(zip(leaves, torch.autograd.grad(cost(leaves, X, y), list(leaves.values()))))
    wide = {k: v.double().requires_grad_(True) for k, v in params.items()}
    y64 = y.double() if y.is_floating_point() else y
    g64 = dict(zip(wide, torch.autograd.grad(cost(wide, X.double(), y64), list(wide.values()))))
    assert all(g.dtype == torch.float32 for g in g32.values())
    return params, g32, {k: v.numpy() for k, v in g64.items()}


def _assert_float32_rounding_only(g32, g64, relative=1e-3):
    """The truth: the float32 gradient is the float64 one up to float32 rounding (per tensor,
    1e-3 of its norm, plus 1e-6 of the largest tensor's for tensors that cancel to ~0)."""
    largest = max(np.linalg.norm(v) for v in g64.values())
    for k, exact in g64.items():
        error = np.linalg.norm(host(g32[k]).astype(np.float64) - exact)
        assert error <= relative * np.linalg.norm(exact) + 1e-6 * largest, (k, error)


@st.composite
def torch_models(draw):
    return (
        draw(st.integers(0, 10_000), label="seed"),
        draw(st.sampled_from([3, 6, 10]), label="inputs"),
        tuple(draw(st.lists(st.sampled_from([4, 10, 16]), min_size=1, max_size=2), label="hidden")),
        draw(st.sampled_from(["tanh", "relu"]), label="activation"),
        draw(st.sampled_from(["mse", "cross_entropy"]), label="loss"),
        draw(st.sampled_from([16, 32, 64]), label="batch"),
    )


@given(case=torch_models(), which=st.integers(0, 100))
def test_torch_float32_model_at_initialisation_passes_and_one_percent_fails(case, which):
    model, cost, X, y = _torch_model(*case)
    params, g32, g64 = _torch_grads(model, cost, X, y)
    _assert_float32_rounding_only(g32, g64)
    passes(gc.check(cost, params, g32, X, y), f"correct float32 autograd, {case}")

    name = list(params)[which % len(params)]
    planted = 0.01 * np.linalg.norm(g64[name])
    rounding = np.linalg.norm(host(g32[name]).astype(np.float64) - g64[name])
    # A tensor the loss hardly depends on (a dead ReLU's bias) has nothing to be 1 % off.
    assume(planted > 100 * rounding and planted > 1e-4 * max(np.linalg.norm(v) for v in g64.values()))
    wrong = {**g32, name: g32[name] * 1.01}
    report = gc.check(cost, params, wrong, X, y)
    fails(report, f"{name} × 1.01, {case}")
    assert name in report.faults, str(report)


# torch_f32_false_fail.py: the two seeds of 200 whose correct 2.bias failed on the base commit (4ed7bfd).
@pytest.mark.parametrize("seed", [15, 91])
def test_torch_float32_repro_seeds_pass(seed):
    model, cost, X, y = _torch_model(seed, 6, (10,), "tanh", "mse", 32, target="randn")
    params, g32, g64 = _torch_grads(model, cost, X, y)
    _assert_float32_rounding_only(g32, g64)
    # The output bias's gradient is a cancelling sum over the batch: its float32 rounding is
    # eps32 · Σ|2(out − y)/m|, far above 32 ulps of the small result.
    assert abs(float(g32["2.bias"]) - g64["2.bias"][0]) > 32 * 2**-23 * abs(g64["2.bias"][0])
    passes(gc.check(cost, params, g32, X, y), f"seed {seed}")


@given(
    seed=st.integers(0, 10_000),
    activation=st.sampled_from(["tanh", "relu"]),
    loss=st.sampled_from(["mse", "cross_entropy"]),
    steps=st.sampled_from([100, 200]),
)
def test_torch_float32_trained_model_never_fails(seed, activation, loss, steps):
    torch = torch_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread
    try:
        model, cost, X, y = _torch_model(seed, 6, (16,), activation, loss, 64)
        _train(model, cost, X, y, steps)
    finally:
        torch.set_num_threads(threads)
    params, g32, g64 = _torch_grads(model, cost, X, y)
    _assert_float32_rounding_only(g32, g64, relative=3e-3)
    never_fail(gc.check(cost, params, g32, X, y), f"trained {steps} Adam steps, seed {seed}")


# ---------------------------------------------------------------------------------------------
# 1. Float32 frameworks: JAX with x64 off


@pytest.fixture
def jax32():
    """JAX with jax_enable_x64 off (JAX's default), restored afterwards."""
    jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'gcbackend[test]')")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield jax
    jax.config.update("jax_enable_x64", before)


JAX_NET = [5, 8, 4, 1]
"""The JAX tests share the shapes of the package's MLP case (X (5, 16)): JAX compiles each
operation per shape, and the first check at new shapes costs most of a JAX test's time."""


def _jax_model(jax, seed, steps):
    """A float32 tanh net in jax.numpy (x64 off; mlp's layout: X (n_x, m), W_l (n_l, n_l−1)),
    optionally trained by Adam, its jax.grad, and the float64 gradient of the same math at
    the same weights (a backprop written out in NumPy)."""
    jnp = jax.numpy
    L = len(JAX_NET) - 1
    X, _, params = mlp.random_case(JAX_NET, 16, seed=seed, dtype="float32")
    Y = np.sin(X.sum(0, keepdims=True)).astype(np.float32)
    m = X.shape[1]

    def cost(p, X, Y):
        A = X
        for layer in range(1, L):
            A = jnp.tanh(p[f"W{layer}"] @ A + p[f"b{layer}"])
        return jnp.mean((p[f"W{L}"] @ A + p[f"b{L}"] - Y) ** 2)

    Xj, Yj = jnp.asarray(X), jnp.asarray(Y)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    if steps:
        first = {k: jnp.zeros_like(v) for k, v in p.items()}
        second = {k: jnp.zeros_like(v) for k, v in p.items()}

        @jax.jit
        def adam(p, first, second, t):
            g = jax.grad(cost)(p, Xj, Yj)
            first = {k: 0.9 * first[k] + 0.1 * g[k] for k in p}
            second = {k: 0.999 * second[k] + 0.001 * g[k] ** 2 for k in p}
            step = {
                k: 1e-2 * (first[k] / (1 - 0.9**t)) / (jnp.sqrt(second[k] / (1 - 0.999**t)) + 1e-8) for k in p
            }
            return {k: p[k] - step[k] for k in p}, first, second

        for t in range(1, steps + 1):
            p, first, second = adam(p, first, second, float(t))
    g32 = jax.grad(cost)(p, Xj, Yj)
    assert all(str(v.dtype) == "float32" for v in g32.values())
    P = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
    activations = [X.astype(np.float64)]
    for layer in range(1, L):
        activations.append(np.tanh(P[f"W{layer}"] @ activations[-1] + P[f"b{layer}"]))
    dZ = 2 * (P[f"W{L}"] @ activations[-1] + P[f"b{L}"] - Y.astype(np.float64)) / m
    g64 = {}
    for layer in range(L, 0, -1):
        g64[f"W{layer}"] = dZ @ activations[layer - 1].T
        g64[f"b{layer}"] = dZ.sum(axis=1, keepdims=True)
        if layer > 1:
            dZ = (P[f"W{layer}"].T @ dZ) * (1 - activations[layer - 1] ** 2)
    return cost, p, g32, g64, (Xj, Yj)


@pytest.mark.parametrize("seed", range(count(1, 10)))
def test_jax_float32_model_at_initialisation_passes_and_one_percent_fails(jax32, seed):
    cost, params, g32, g64, args = _jax_model(jax32, seed, 0)
    _assert_float32_rounding_only(g32, g64)
    passes(gc.check(cost, params, g32, *args), f"JAX float32, seed {seed}")
    name = ("W1", "W2", "W3")[seed % 3]
    report = gc.check(cost, params, {**g32, name: g32[name] * 1.01}, *args)
    fails(report, f"JAX float32 {name} × 1.01, seed {seed}")
    assert name in report.faults, str(report)


@pytest.mark.parametrize("seed", range(count(1, 6)))
def test_jax_float32_trained_model_never_fails(jax32, seed):
    cost, params, g32, g64, args = _jax_model(jax32, seed, 200)
    _assert_float32_rounding_only(g32, g64, relative=3e-3)
    never_fail(gc.check(cost, params, g32, *args), f"JAX float32 trained, seed {seed}")


@pytest.mark.parametrize(
    "options",
    [{}, {"mode": "directions"}, {"sample": 5}, {"mode": "loop"}, {"upcast": False}, {"epsilon": 1e-3}],
    ids=["defaults", "directions", "sample", "loop", "float32", "fixed-epsilon"],
)
def test_jax_without_x64_raises_no_warning_from_the_check(jax32, options):
    # issue 21: asking JAX for a float64 array to learn whether it has float64 made it warn
    # ("Explicitly requested dtype float64 ... will be truncated") on every check.
    import warnings

    cost, params, g32, _, args = _jax_model(jax32, 0, 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = gc.check(cost, params, g32, *args, **options)
    ours = [w for w in seen if "gcbackend" in w.filename]
    assert ours == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert report.verdict == "pass", str(report)
    # the x64 note explains an upcast that could not happen; upcast=False asked for none
    assert ("jax_enable_x64 is off" in str(report)) == options.get("upcast", True), str(report)


# ---------------------------------------------------------------------------------------------
# 2. Float32 evaluation: upcast=False and JAX with x64 off

RELU_NETS = ([5, 8, 4, 1], [4, 6, 1], [3, 10, 5, 1])


def _float32_relu_case(seed, xp=None, device=None, dims=None):
    dims = dims or RELU_NETS[seed % len(RELU_NETS)]
    X, Y, params = mlp.random_case(dims, 16, seed=seed, dtype="float32", xp=xp, device=device)
    grads = mlp.backward(params, X, Y)
    # The truth: the float32 backprop is the float64 one (of the same float32 weights) to
    # float32 rounding.
    Xh, Yh = host(X).astype(np.float64), host(Y).astype(np.float64)
    exact = mlp.backward({k: host(v).astype(np.float64) for k, v in params.items()}, Xh, Yh)
    _assert_float32_rounding_only(grads, exact)
    return X, Y, params, grads, exact


def _tally_float32_evaluation(check, seeds):
    """Run ``check(seed)`` → (correct report, doubled report, doubled name) over the seeds."""
    verdicts = []
    for seed in seeds:
        correct, doubled, name = check(seed)
        never_fail(correct, f"correct float32 ReLU net, seed {seed}")
        never_pass(doubled, f"{name} doubled, seed {seed}")
        verdicts.append(correct.verdict)
    decisive = verdicts.count("pass") / len(verdicts)
    assert decisive >= 0.8, f"correct float32 gradients passed in {decisive:.0%} of seeds: {verdicts}"


def test_float32_evaluation_without_upcast_is_decisive(backend):
    def check(seed):
        X, Y, params, grads, _ = _float32_relu_case(seed, backend.xp, backend.device)
        correct = gc.check(mlp.cost, params, grads, X, Y, upcast=False)
        assert correct.dtype == "float32", str(correct)
        name = list(params)[seed % len(params)]
        doubled = gc.check(mlp.cost, params, {**grads, name: 2 * grads[name]}, X, Y, upcast=False)
        return correct, doubled, name

    _tally_float32_evaluation(check, range(count(10, 40)))


def test_float32_evaluation_on_jax_without_x64_is_decisive(jax32):
    def check(seed):
        X, Y, params, grads, _ = _float32_relu_case(seed, dims=JAX_NET)
        correct = gc.check(mlp.cost, params, grads, X, Y, backend="jax")
        assert correct.dtype == "float32", str(correct)
        name = ("W1", "b1", "W2")[seed % 3]
        doubled = gc.check(mlp.cost, params, {**grads, name: 2 * grads[name]}, X, Y, backend="jax")
        return correct, doubled, name

    _tally_float32_evaluation(check, range(count(5, 20)))


# jax_x32_false_fail.py: float64 NumPy inputs checked on JAX (x64 off: evaluated in float32).
@pytest.mark.parametrize("seed", [1, 2])
def test_jax_x32_repro_seeds_never_fail(jax32, seed):
    X, Y, params = mlp.random_case([5, 8, 4, 1], 16, seed=seed)
    grads = mlp.backward(params, X, Y)
    passes(gc.check(mlp.cost, params, grads, X, Y), "the float64 NumPy check")
    never_fail(gc.check(mlp.cost, params, grads, X, Y, backend="jax"), f"JAX x64 off, seed {seed}")


# f32_noupcast_false_fail.py: 9 of 20 seeds failed with upcast=False.
@pytest.mark.parametrize("seed", range(count(6, 20)))
def test_float32_noupcast_repro_seeds_never_fail(seed):
    X, Y, params, grads, _ = _float32_relu_case(seed, dims=[5, 8, 4, 1])
    never_fail(gc.check(mlp.cost, params, grads, X, Y, upcast=False), f"seed {seed}")


# ---------------------------------------------------------------------------------------------
# 10. Resolution as stated


def _assert_resolution_holds(report, given, exact):
    """Every passing tensor's true difference is within its stated resolution, printed."""
    text = str(report)
    for name, result in report.parameters.items():
        resolution = result.resolution
        assert isinstance(resolution, float) and resolution >= 0 and not math.isnan(resolution), name
        if result.verdict == "pass":
            true = formula2(host(given[name]), exact[name])
            assert true <= resolution, (
                f"{name}: true difference {true:.3g} > resolution {resolution:.3g}\n{text}"
            )
            assert printed(resolution, text), f"{name}'s resolution {resolution:.3g} is not printed\n{text}"


def _sin_case(backend, seed, scale):
    rng = np.random.default_rng(seed)
    xp = backend.xp
    theta = {"a": rng.uniform(-2, 2, 5), "b": rng.uniform(-2, 2, (2, 3))}
    coefficient = {k: rng.choice([-2.0, -0.5, 0.5, 1.0, 2.0], v.shape) for k, v in theta.items()}
    moved = {k: backend.xp.asarray(v, device=backend.device) for k, v in coefficient.items()}

    def cost(p):
        return scale * sum(
            xp.sum(moved[k] * xp.sin(v), axis=tuple(range(-moved[k].ndim, 0))) for k, v in p.items()
        )

    exact = {k: scale * coefficient[k] * np.cos(v) for k, v in theta.items()}
    params = {k: backend.xp.asarray(v, device=backend.device) for k, v in theta.items()}
    return cost, params, exact, ()


def _float32_forward_case(seed):
    """fuzz_f32.py's case: float32 params, the forward computed in float32 inside the cost, the
    loss averaged in float64; its float32 backprop, and the float64 gradient of the same math."""
    rng = np.random.default_rng(seed)
    m, d, k = 16, 8, 6
    X = rng.normal(size=(m, d)).astype(np.float32)
    y = rng.normal(size=m).astype(np.float32)
    P = {
        "W1": (rng.normal(size=(d, k)) / np.sqrt(d)).astype(np.float32),
        "b1": (0.1 * rng.normal(size=k)).astype(np.float32),
        "W2": (rng.normal(size=k) / np.sqrt(k)).astype(np.float32),
        "b2": np.float32(0.1) * np.ones(1, np.float32),
    }

    def cost(P, X, y):
        xp = array_api_compat.array_namespace(P["W1"], X)
        W1, b1, W2, b2 = (xp.astype(P[n], xp.float32) for n in ("W1", "b1", "W2", "b2"))
        Z = xp.astype(X, xp.float32) @ W1 + b1[..., None, :]
        out = xp.sum(xp.maximum(Z, xp.zeros_like(Z)) * W2[..., None, :], axis=-1) + b2
        return xp.mean(xp.astype((out - xp.astype(y, xp.float32)) ** 2, xp.float64), axis=-1)

    def backprop(P, X, y, dtype):
        W1, b1, W2, b2 = (P[n].astype(dtype) for n in ("W1", "b1", "W2", "b2"))
        X, y = X.astype(dtype), y.astype(dtype)
        Z = X @ W1 + b1
        H = np.maximum(Z, 0)
        r = (2 / m) * (H @ W2 + b2 - y)
        dZ = np.outer(r, W2) * (Z > 0)
        return {"W1": X.T @ dZ, "b1": dZ.sum(0), "W2": H.T @ r, "b2": np.array([r.sum()])}

    G = {n: v.astype(np.float32) for n, v in backprop(P, X, y, np.float32).items()}
    exact = backprop(P, X, y, np.float64)
    _assert_float32_rounding_only(G, exact)
    # How far the nearest ReLU corner is (the gradient is defined where no corner is within
    # float32's reach, |Z| > 1e-5).
    corner = float(np.abs(X.astype(np.float64) @ P["W1"].astype(np.float64) + P["b1"]).min())
    return cost, P, G, exact, (X, y), corner


@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["sin", "mlp float64", "mlp float32 grads", "float32 forward"]),
    factor=st.sampled_from([0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),
    which=st.integers(0, 100),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_a_passing_tensor_is_within_its_stated_resolution(backend, seed, kind, factor, which, scale):
    if kind == "sin":
        cost, params, exact, args = _sin_case(backend, seed, scale)
        given_grads = {k: backend.xp.asarray(v, device=backend.device) for k, v in exact.items()}
    elif kind.startswith("mlp"):
        X, Y, params = mlp.random_case([4, 5, 1], 8, seed=seed)
        exact = mlp.backward(params, X, Y)
        dtype = "float32" if kind.endswith("float32 grads") else "float64"
        given_grads = {k: on(backend, v, dtype) for k, v in exact.items()}
        params = {k: on(backend, v) for k, v in params.items()}
        cost, args = mlp.cost, (on(backend, X), on(backend, Y))
    else:
        cost, params, given_grads, exact, args, corner = _float32_forward_case(seed)
        assume(corner > 1e-5)
        params = {k: on(backend, v, "float32") for k, v in params.items()}
        given_grads = {k: on(backend, v, "float32") for k, v in given_grads.items()}
        args = tuple(on(backend, a, "float32") for a in args)
    name = list(params)[which % len(params)]
    given_grads = {**given_grads, name: given_grads[name] * (1 + factor)}
    report = gc.check(cost, params, given_grads, *args)
    _assert_resolution_holds(report, given_grads, exact)


# f32_forward_pass.py: W1 × (1 + f) passed 3 of 20 seeds at f = 0.003 with a float32 forward.
@pytest.mark.parametrize("f", [0.001, 0.003, 0.005])
def test_float32_forward_passes_only_within_the_stated_resolution(f):
    for seed in range(count(6, 20)):
        cost, P, G, exact, args, corner = _float32_forward_case(seed)
        assert corner > 1e-5
        given_grads = {**G, "W1": G["W1"] * np.float32(1 + f)}
        report = gc.check(cost, P, given_grads, *args)
        _assert_resolution_holds(report, given_grads, exact)
        assert formula2(given_grads["W1"], exact["W1"]) > 0.3 * f  # the truth: f dominates the rounding
