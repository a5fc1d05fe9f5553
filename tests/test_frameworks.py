"""check_function, check_module, check_in_place: what users already have, checked as it is.

* ``check_function``: custom ``torch.autograd.Function``s written here, correct and with one
  planted bug each (wrong scale, wrong input, transposed, missing term), in float64, float32
  and float16, several inputs, tuple outputs, non-floating inputs; a ``jax.custom_vjp`` and a
  ``jax.custom_jvp``; forward-mode rules. A planted bug must fail exactly the inputs whose
  gradient it corrupts; a correct backward must pass.
* ``check_module``: nn.Modules (Linear, Conv, LayerNorm, BatchNorm, a custom Function inside),
  left bit for bit unchanged, the user's RNG state too; dropout; a float32 buffer under the
  default upcast.
* ``check_in_place``: a CS231n-style ``TwoLayerNet`` whose ``loss`` reads ``net.params``, on
  every backend; the arrays restored bit for bit, also after an exception or a
  KeyboardInterrupt in the loss.

PyTorch and JAX tests skip, with the reason, where the library is absent. A saturated tanh
in float32 (1 − y² formed in float32 is off by far more than 32 ulps) and a bias before batch
norm (a true gradient of 0 with float32 rounding) are tested too: the judge measures the
forward's rounding and judges a zero gradient against the model's scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_api_compat import array_namespace, device
from helpers import assert_bitwise_equal, assert_on, host, snapshot
from hypothesis import assume, given
from hypothesis import strategies as st

import gcbackend as gc
from gcbackend.backends import to_backend


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'gcbackend[torch]')")


@pytest.fixture
def jax():
    jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'gcbackend[jax]')")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'gcbackend[torch]')")


# --------------------------------------------------------------------------- custom Functions

BUGS = (None, "scale", "input", "transposed", "missing")
# Which inputs each planted bug of AffineTanh corrupts.
AFFINE_FAULTS = {None: set(), "scale": {"w"}, "input": {"b"}, "transposed": {"x"}, "missing": {"x", "w", "b"}}


def affine_tanh(bug=None):
    """y = tanh(x @ w + b) as a custom autograd.Function (old style: forward(ctx, ...)),
    with one planted bug in backward: ``scale`` dw doubled; ``input`` db summed from the
    incoming gradient instead of dz; ``transposed`` dx through w instead of wᵀ; ``missing``
    the (1 − y²) factor left out."""
    torch = _torch()

    class AffineTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y = torch.tanh(x @ w + b)
            ctx.save_for_backward(x, w, y)
            return y

        @staticmethod
        def backward(ctx, grad):
            x, w, y = ctx.saved_tensors
            dz = grad if bug == "missing" else grad * (1 - y * y)
            dx = dz @ (w if bug == "transposed" else w.T)
            dw = x.T @ dz * (2 if bug == "scale" else 1)
            db = grad.sum(0) if bug == "input" else dz.sum(0)
            return dx, dw, db

    return AffineTanh


PAIR_BUGS = (None, "input", "missing")
PAIR_FAULTS = {None: set(), "input": {"a"}, "missing": {"b"}}


def sine_pair(bug=None):
    """(a·sin(b), a + b): two inputs, a tuple of two outputs (new style: setup_context);
    ``input`` da uses sin(a) instead of sin(b); ``missing`` db leaves out the second
    output's term."""
    torch = _torch()

    class SinePair(torch.autograd.Function):
        @staticmethod
        def forward(a, b):
            return a * torch.sin(b), a + b

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, g_product, g_sum):
            a, b = ctx.saved_tensors
            da = g_product * torch.sin(a if bug == "input" else b) + g_sum
            db = g_product * a * torch.cos(b) + (0 if bug == "missing" else g_sum)
            return da, db

    return SinePair


def _affine_host(m=4, k=3, seed=0):
    """NumPy x, w, b with pre-activations of standard deviation ~0.6: tanh far from saturation."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((k, k)) * 0.5 / math.sqrt(k)
    b = rng.standard_normal(k) * 0.2
    return x, w, b


def _affine_inputs(torch, dtype, m=4, k=3, seed=0):
    return tuple(torch.asarray(a, dtype=dtype) for a in _affine_host(m, k, seed))


DTYPES = ("float64", "float32", "float16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bug", BUGS)
def test_custom_function_verdicts(torch, dtype, bug):
    x, w, b = _affine_inputs(torch, getattr(torch, dtype))
    report = gc.check_function(affine_tanh(bug).apply, x, w, b)
    assert tuple(report.parameters) == ("x", "w", "b")  # named after forward(ctx, x, w, b)
    assert set(report.faults) == AFFINE_FAULTS[bug]
    assert report.verdict == ("pass" if bug is None else "fail")
    for name in ("x", "w", "b"):  # judged to the precision of the framework's own gradient
        assert report.parameters[name].analytic_grad.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bug", PAIR_BUGS)
def test_tuple_outputs_and_two_inputs(torch, dtype, bug):
    rng = np.random.default_rng(1)
    a, b = (torch.asarray(rng.standard_normal((3, 4)), dtype=getattr(torch, dtype)) for _ in range(2))
    report = gc.check_function(sine_pair(bug).apply, a, b)
    assert tuple(report.parameters) == ("a", "b")  # named after forward(a, b)
    assert set(report.faults) == PAIR_FAULTS[bug]
    assert report.verdict == ("pass" if bug is None else "fail")


# A planted bug is visible to a check in a dtype when some element of the gradient it
# corrupts moves by more than 4× the float judge's allowance for that dtype's backprop
# (32 ulps × (|g_j| + rms(g))): below that it is within the dtype's own rounding, and a
# check that passes it is right. The properties below draw bugs on both sides and demand
# a fail on the visible side only; a bug below the dtype's resolution must not be blamed on
# another input either.
VISIBLE_ULPS = 4 * 32


def _corruption(make, bug, inputs):
    """Per input name, max_j |Δ_j| / (|g_j| + rms(g)) between the buggy and the correct
    backward's gradients, in float64 at the inputs' values, for check_function's dout."""
    torch = _torch()
    rng = np.random.default_rng(0)  # check_function(seed=0) draws its douts so
    wide = [t.detach().double().requires_grad_() for t in inputs]
    outs = make().apply(*wide)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = [torch.asarray(rng.standard_normal(tuple(o.shape)), dtype=inputs[0].dtype).double() for o in outs]
    good = torch.autograd.grad(outs, wide, douts)
    outs = make(bug).apply(*wide)
    outs = outs if isinstance(outs, tuple) else (outs,)
    bad = torch.autograd.grad(outs, wide, douts)
    sizes = []
    for g, h in zip(good, bad):
        scale = g.abs() + torch.sqrt(torch.mean(g * g))
        sizes.append(float(torch.max((h - g).abs() / torch.where(scale > 0, scale, 1.0))))
    return sizes


def _expected_faults(make, bug, names, inputs, dtype):
    """The inputs a check must fail (a visible corruption), or None where some input's
    corruption is neither zero nor visible (hypothesis then draws another case)."""
    if bug is None:
        return set()
    resolution = VISIBLE_ULPS * float(np.finfo(dtype).eps)
    sizes = _corruption(make, bug, inputs)
    if any(0 < size <= resolution for size in sizes):
        return None
    return {name for name, size in zip(names, sizes) if size > resolution}


@given(
    dtype=st.sampled_from(DTYPES),
    bug=st.sampled_from(BUGS),
    m=st.integers(1, 6),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_custom_function_verdicts(dtype, bug, m, k, seed):
    torch = _torch()
    x, w, b = _affine_inputs(torch, getattr(torch, dtype), m, k, seed)
    faults = _expected_faults(affine_tanh, bug, ("x", "w", "b"), (x, w, b), dtype)
    assume(faults is not None)
    report = gc.check_function(affine_tanh(bug).apply, x, w, b)
    assert set(report.faults) == faults
    assert faults <= AFFINE_FAULTS[bug]
    assert report.verdict == ("fail" if faults else "pass")


@given(
    dtype=st.sampled_from(DTYPES),
    bug=st.sampled_from(PAIR_BUGS),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_tuple_outputs(dtype, bug, shape, seed):
    torch = _torch()
    rng = np.random.default_rng(seed)
    a, b = (torch.asarray(rng.standard_normal(shape), dtype=getattr(torch, dtype)) for _ in range(2))
    faults = _expected_faults(sine_pair, bug, ("a", "b"), (a, b), dtype)
    assume(faults is not None)
    report = gc.check_function(sine_pair(bug).apply, a, b)
    assert set(report.faults) == faults
    assert faults <= PAIR_FAULTS[bug]
    assert report.verdict == ("fail" if faults else "pass")


def test_saturated_tanh_in_float32_passes(torch):
    # Pre-activations of |z| ≈ 3.6: 1 − y² ≈ 0.003 formed in float32 is off by ~2e-5
    # relative, a correct float32 backward beyond 32 ulps.
    rng = np.random.default_rng(4)
    x, w, b = (torch.asarray(rng.standard_normal(s), dtype=torch.float32) for s in ((3, 2), (2, 2), (2,)))
    x, w, b = x * 3, w * 3, b * 3
    assert gc.check_function(affine_tanh().apply, x, w, b).verdict == "pass"


def test_a_small_float32_bug_fails_where_gradcheck_cannot_tell(torch):
    # dw off by a relative 1e-3: float32 gradcheck (default tolerances) cannot see it, and
    # false-alarms on the correct one; check_function fails exactly w, passes the correct one.
    torch_ = torch

    class Slightly(affine_tanh()):
        @staticmethod
        def backward(ctx, grad):
            dx, dw, db = affine_tanh().backward(ctx, grad)
            return dx, dw * (1 + 1e-3), db

    x, w, b = _affine_inputs(torch_, torch_.float32)
    assert gc.check_function(affine_tanh().apply, x, w, b).verdict == "pass"
    report = gc.check_function(Slightly.apply, x, w, b)
    assert report.faults == ("w",) and report.parameters["x"].verdict == "pass"


def test_the_user_inputs_and_rng_are_unchanged(torch):
    x, w, b = _affine_inputs(torch, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    saved = {"x": snapshot(x), "w": snapshot(w), "b": snapshot(b)}
    state = torch.get_rng_state()
    report = gc.check_function(affine_tanh("scale").apply, x, w, b)
    assert report.faults == ("w",)
    assert torch.equal(state, torch.get_rng_state())
    for name, value in (("x", x), ("w", w), ("b", b)):
        assert_bitwise_equal(value, saved[name])
        assert value.grad is None  # autograd ran on copies: nothing accumulated in .grad


# --------------------------------------------------------------------------- names and inputs


def test_names_come_from_the_signature_and_args(torch):
    def fn(x, weight, *rest):
        return x * weight + sum(r.sum() for r in rest)

    values = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    report = gc.check_function(fn, *values)
    assert tuple(report.parameters) == ("x", "weight", "rest[0]", "rest[1]")
    assert report.verdict == "pass"
    star = gc.check_function(lambda *args: args[0] * args[1], *values[:2])
    assert tuple(star.parameters) == ("args[0]", "args[1]")


def test_a_module_passed_as_fn_is_named_after_its_forward(torch):
    layer = torch.nn.Linear(3, 2).double()
    report = gc.check_function(layer, torch.randn(4, 3, dtype=torch.float64))
    assert tuple(report.parameters) == ("input",)  # Linear.forward(self, input)
    assert report.verdict == "pass"


def test_non_floating_inputs_pass_through(torch):
    seen = []

    def gather(x, index, scale, flag, nothing):
        seen.append((index.dtype, scale, flag, nothing))
        picked = x[index] * scale
        return picked if flag else -picked

    x = torch.randn(5, 3, dtype=torch.float32)
    index = torch.tensor([0, 2, 2, 4])
    report = gc.check_function(gather, x, index, 3, True, None)
    assert tuple(report.parameters) == ("x",)  # index, scale, flag, None are constants
    assert report.verdict == "pass"
    assert all(s == (torch.int64, 3, True, None) for s in seen)
    # Rows 1 and 3 are never gathered: their gradient is exactly zero, and so is J's change.
    assert host(report.parameters["x"].analytic_grad)[1].tolist() == [0.0, 0.0, 0.0]


def test_requires_grad_selects_the_inputs_checked(torch):
    # A float "mask" the backward returns None for: marked constant by leaving it without
    # requires_grad while the inputs to check have it (gradcheck's convention).
    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, mask):
            ctx.save_for_backward(mask)
            return x * mask

        @staticmethod
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return grad * mask, None

    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    report = gc.check_function(Masked.apply, x, mask)
    assert tuple(report.parameters) == ("x",) and report.verdict == "pass"
    # Without any requires_grad every floating input is checked, and the missing gradient
    # of mask (None, taken as zero) fails, with a note saying how to mark constants.
    everything = gc.check_function(Masked.apply, x.detach(), mask)
    assert everything.faults == ("mask",)
    assert any(
        "no gradient for mask (None)" in note and "requires_grad=True" in note for note in everything.notes
    )


def test_a_random_function_is_evaluated_under_one_rng_state(torch):
    def noisy(x):
        return torch.nn.functional.dropout(x, p=0.5, training=True) * x

    x = torch.randn(6, 2, dtype=torch.float32)
    state = torch.get_rng_state()
    report = gc.check_function(noisy, x)
    assert report.verdict == "pass"
    assert any("fn's forward is random" in note for note in report.notes)
    assert torch.equal(state, torch.get_rng_state())
    deterministic = gc.check_function(torch.sin, x)
    assert not any("random" in note for note in deterministic.notes)


# --------------------------------------------------------------------------- forward mode


def _with_jvp(bug=None):
    torch = _torch()

    class SinTimes(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            ctx.save_for_forward(x, w)
            return torch.sin(x) * w

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad * torch.cos(x) * w, grad * torch.sin(x)

        @staticmethod
        def jvp(ctx, dx, dw):
            x, w = ctx.saved_tensors
            return dx * torch.cos(x) * w * (2 if bug == "scale" else 1) + dw * torch.sin(x)

    return SinTimes


@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("bug", (None, "scale"))
def test_a_torch_jvp_rule_is_checked_too(torch, dtype, bug):
    rng = np.random.default_rng(2)
    x, w = (torch.asarray(rng.standard_normal((3, 4)), dtype=getattr(torch, dtype)) for _ in range(2))
    report = gc.check_function(_with_jvp(bug).apply, x, w)
    assert tuple(report.parameters) == ("x", "w", "jvp(x)", "jvp(w)")
    assert report.parameters["jvp(x)"].shape == (4,)  # four seeded directions
    assert report.faults == (() if bug is None else ("jvp(x)",))  # the backward is right
    assert any("forward-mode rule" in note for note in report.notes)
    skipped = gc.check_function(_with_jvp(bug).apply, x, w, jvp=False)
    assert tuple(skipped.parameters) == ("x", "w") and skipped.verdict == "pass"


def test_jvp_is_checked_only_where_fn_defines_one(torch):
    x = torch.randn(5, dtype=torch.float64)
    assert tuple(gc.check_function(torch.sin, x).parameters) == ("args[0]",)  # a builtin: no signature

    def sin(x):
        return torch.sin(x)

    assert tuple(gc.check_function(sin, x).parameters) == ("x",)
    forced = gc.check_function(sin, x, jvp=True)  # PyTorch's own rule for sin
    assert tuple(forced.parameters) == ("x", "jvp(x)") and forced.verdict == "pass"
    assert forced.parameters["jvp(x)"].shape == (4,)
    tiny = gc.check_function(sin, torch.randn(2, dtype=torch.float64), jvp=True)
    assert tiny.parameters["jvp(x)"].shape == (2,)  # at most x.size directions
    with pytest.raises(gc.InputError, match="jvp=True: fn's forward-mode derivative failed"):
        gc.check_function(affine_tanh().apply, *_affine_inputs(torch, torch.float64), jvp=True)


# --------------------------------------------------------------------------- JAX


def _jax_tanh(bug=None):
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def dense(x, w):
        return jnp.tanh(x @ w)

    def forward(x, w):
        y = jnp.tanh(x @ w)
        return y, (x, w, y)

    def backward(residuals, grad):
        x, w, y = residuals
        dz = grad * (1 - y**2)
        return dz @ w.T, x.T @ dz * (2 if bug == "scale" else 1)

    dense.defvjp(forward, backward)
    return dense


@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("bug", (None, "scale"))
def test_jax_custom_vjp(jax, dtype, bug):
    jnp = jax.numpy
    x, w, _ = (jnp.asarray(a, dtype=dtype) for a in _affine_host())
    report = gc.check_function(_jax_tanh(bug), x, w)
    assert tuple(report.parameters) == ("x", "w")  # a custom_vjp has no forward-mode rule
    assert report.faults == (() if bug is None else ("w",))
    assert report.backend == "jax" and report.parameters["w"].analytic_grad.dtype == jnp.dtype(dtype)
    with pytest.raises(gc.InputError, match="jvp=True"):
        gc.check_function(_jax_tanh(bug), x, w, jvp=True)


def test_jax_custom_jvp_rule_is_checked(jax):
    jnp = jax.numpy

    def soft(scale):
        @jax.custom_jvp
        def softplus(x):
            return jnp.log1p(jnp.exp(x))

        @softplus.defjvp
        def rule(primals, tangents):
            (x,), (dx,) = primals, tangents
            return softplus(x), jax.nn.sigmoid(x) * dx * scale

        return softplus

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3)), dtype=jnp.float32)
    good = gc.check_function(lambda x: soft(1.0)(x) * 2, x)
    assert tuple(good.parameters) == ("x", "jvp(x)") and good.verdict == "pass"
    # JAX derives the VJP of a custom_jvp by transposing its rule: both rows fail.
    bad = gc.check_function(soft(1.01), x)
    assert set(bad.faults) == {"x", "jvp(x)"}


# --------------------------------------------------------------------------- errors


def test_check_function_errors(torch):
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(gc.InputTypeError, match="needs a callable fn"):
        gc.check_function(None, x)
    with pytest.raises(gc.InputTypeError, match=r"gc\.check_layer"):
        gc.check_function(np.sin, np.ones(3))
    with pytest.raises(gc.InputError, match=r"none of fn's inputs \(index\)"):
        gc.check_function(lambda index: index * 2.0, torch.tensor([1, 2]))
    with pytest.raises(gc.InputTypeError, match="input 'z' is complex"):
        gc.check_function(lambda z: z.abs(), torch.ones(2, dtype=torch.complex128))
    with pytest.raises(
        gc.InputError, match=r"fn takes 1 positional input\(s\) \(x\) but check_function got 2"
    ):
        gc.check_function(lambda x: x, x, x)
    with pytest.raises(gc.CostError, match="fn\\(\\*inputs\\) raised ZeroDivisionError") as info:
        gc.check_function(lambda x: 1 / 0, x)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(gc.CostError, match="no floating-point array"):
        gc.check_function(lambda x: torch.argmax(x), x)
    with pytest.raises(gc.InputError, match="workers=2: check_function pins PyTorch's global RNG"):
        gc.check_function(torch.sin, x, workers=2)


def test_mixed_frameworks_are_refused(torch, jax):
    with pytest.raises(gc.InputTypeError, match="torch tensors and JAX arrays together"):
        gc.check_function(lambda a, b: a, torch.ones(2), jax.numpy.ones(2))


def test_a_float32_only_function_says_upcast_false(torch):
    def kernel(x):  # a float32-only op, like a Triton kernel
        return x @ torch.ones(3, 2)

    x = torch.randn(4, 3)
    with pytest.raises(gc.CostError, match="evaluated in float64") as info:
        gc.check_function(kernel, x)
    assert "pass upcast=False" in str(info.value) and "dtype=x.dtype" in str(info.value)
    assert gc.check_function(kernel, x, upcast=False).parameters["x"].analytic_grad.dtype == torch.float32


# --------------------------------------------------------------------------- check_module


def _module_state(module):
    return {name: snapshot(t) for name, t in module.state_dict(keep_vars=True).items()}


def _assert_module_unchanged(module, saved, training):
    now = module.state_dict(keep_vars=True)
    assert now.keys() == saved.keys()
    for name, value in now.items():
        assert_bitwise_equal(value, saved[name])
    assert all(m.training == training for m in module.modules())
    assert all(p.grad is None for p in module.parameters())


def _modules(torch, dtype):
    nn = torch.nn
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (5, 3)),
        "conv": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()), (2, 2, 4, 4)),
        "layernorm": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (5, 3)),
        "batchnorm-eval": (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval(), (5, 3)),
    }


@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("kind", ("linear", "conv", "layernorm", "batchnorm-eval"))
def test_modules_pass_and_are_left_unchanged(torch, dtype, kind):
    module, shape = _modules(torch, dtype)[kind]
    module = module.to(getattr(torch, dtype))
    inputs = torch.asarray(np.random.default_rng(5).standard_normal(shape), dtype=getattr(torch, dtype))
    saved, training, state = _module_state(module), module.training, torch.get_rng_state()
    report = gc.check_module(module, inputs)
    assert report.verdict == "pass"
    assert tuple(report.parameters) == tuple(name for name, _ in module.named_parameters())
    _assert_module_unchanged(module, saved, training)
    assert torch.equal(state, torch.get_rng_state())


def test_a_float32_buffer_under_upcast_is_evaluated_in_float64(torch):
    # BatchNorm's float32 running statistics met float64 parameters: "expected scalar type
    # Double" on a functional_call of the parameters alone. Buffers are upcast with them.
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    module[1].running_mean.uniform_(-1, 1)
    module[1].running_var.uniform_(0.5, 2)
    report = gc.check_module(module, torch.randn(5, 3))
    assert report.verdict == "pass"
    assert report.parameters["1.weight"].analytic_grad.dtype == torch.float32
    assert any("evaluated in float64" in note for note in report.notes)


def test_a_float32_tensor_outside_the_buffers_is_named_with_upcast_false(torch):
    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.proj = torch.randn(2, 2)  # a plain attribute, not a buffer: not upcast

        def forward(self, x):
            return self.lin(x) @ self.proj

    module = torch.nn.Sequential(Projected())
    with pytest.raises(gc.CostError) as info:
        gc.check_module(module, torch.randn(4, 3))
    message = str(info.value)
    assert "failed when evaluated in float64" in message and "0.proj (float32)" in message
    assert "register_buffer('proj', tensor)" in message and "upcast=False" in message
    assert gc.check_module(module, torch.randn(4, 3), upcast=False).verdict == "pass"


def test_dropout_in_train_mode_is_deterministic_and_noted(torch):
    torch.manual_seed(1)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs = torch.randn(3, 4, dtype=torch.float64)
    saved, state = _module_state(module), torch.get_rng_state()
    report = gc.check_module(module, inputs)
    assert report.verdict == "pass" and module.training
    assert any("the module's forward is random" in note for note in report.notes)
    assert torch.equal(state, torch.get_rng_state())
    _assert_module_unchanged(module, saved, True)
    quiet = gc.check_module(module.eval(), inputs)
    assert quiet.verdict == "pass" and not any("random" in note for note in quiet.notes)


def test_batchnorm_in_train_mode_passes_in_float32(torch):
    # Batch statistics remove any shift: the first bias's gradient is zero up to float32's
    # rounding (~1e-7) and J does not move, which the float32 judge calls a fault.
    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    saved = _module_state(module)
    report = gc.check_module(module, torch.randn(4, 3))
    _assert_module_unchanged(module, saved, True)  # running statistics too
    assert report.verdict == "pass"


def test_batchnorm_in_train_mode_leaves_running_statistics_alone(torch):
    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.BatchNorm1d(2), nn.Linear(2, 1)).double()
    saved = _module_state(module)
    report = gc.check_module(module, torch.randn(6, 3, dtype=torch.float64))
    _assert_module_unchanged(module, saved, True)
    assert report.parameters["3.weight"].verdict == "pass"


class _ScaledLinear:
    """y = x @ wᵀ + b through a custom Function; ``bug``: dw doubled."""

    @staticmethod
    def function(bug=None):
        torch = _torch()

        class Linear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                ctx.save_for_backward(x, w)
                return x @ w.mT + b

            @staticmethod
            def backward(ctx, grad):
                x, w = ctx.saved_tensors
                return grad @ w, grad.T @ x * (2 if bug else 1), grad.sum(0)

        return Linear


def _custom_net(torch, bug=None):
    nn = torch.nn
    function = _ScaledLinear.function(bug)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(3, 4)
            self.out_w = nn.Parameter(torch.randn(2, 4) * 0.5)
            self.out_b = nn.Parameter(torch.randn(2) * 0.1)

        def forward(self, x):
            return function.apply(torch.tanh(self.hidden(x)), self.out_w, self.out_b)

    return Net()


@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("bug", (None, "scale"))
def test_a_custom_function_inside_a_module(torch, dtype, bug):
    torch.manual_seed(2)
    module = _custom_net(torch, bug).to(getattr(torch, dtype))
    inputs = torch.randn(5, 3, dtype=getattr(torch, dtype))
    report = gc.check_module(module, inputs)
    assert tuple(report.parameters) == (
        "out_w",
        "out_b",
        "hidden.weight",
        "hidden.bias",
    )  # named_parameters()
    assert report.faults == (() if bug is None else ("out_w",))


def test_loss_frozen_parameters_and_names(torch):
    torch.manual_seed(3)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    module[0].weight.requires_grad_(False)
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    report = gc.check_module(module, X, loss=lambda out: ((out - y) ** 2).mean())
    assert tuple(report.parameters) == ("0.bias", "2.weight", "2.bias")  # the frozen weight is a constant
    assert report.verdict == "pass"
    assert module[0].weight.requires_grad is False


def test_check_module_errors(torch):
    with pytest.raises(gc.InputTypeError, match=r"needs a torch\.nn\.Module"):
        gc.check_module(lambda x: x, torch.ones(2))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(gc.InputError, match="no parameter of Linear requires grad"):
        gc.check_module(frozen, torch.ones(1, 2))
    with pytest.raises(gc.InputError, match=r"not \.item\(\)"):
        gc.check_module(torch.nn.Linear(2, 1), torch.ones(3, 2), loss=lambda out: out.sum().item())
    with pytest.raises(gc.InputError, match="workers=-1: check_module pins"):
        gc.check_module(torch.nn.Linear(2, 1), torch.ones(3, 2), workers=-1)
    with pytest.raises(gc.CostError, match="module\\(\\*inputs\\) or loss raised RuntimeError"):
        gc.check_module(torch.nn.Linear(2, 1), torch.ones(3, 5))


@given(
    dtype=st.sampled_from(("float64", "float32")),
    width=st.integers(1, 5),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    bug=st.booleans(),
)
def test_property_modules(dtype, width, m, seed, bug):
    torch = _torch()
    torch.manual_seed(seed % 2**31)
    module = _custom_net(torch, bug).to(getattr(torch, dtype))
    with torch.no_grad():  # keep tanh away from saturation (see the module docstring)
        module.hidden.weight.mul_(0.5)
    inputs = torch.randn(m, 3, dtype=getattr(torch, dtype))
    saved = _module_state(module)
    report = gc.check_module(module, inputs)
    assert report.faults == (("out_w",) if bug else ())
    _assert_module_unchanged(module, saved, True)


# --------------------------------------------------------------------------- check_in_place


class TwoLayerNet:
    """CS231n's two-layer net: ``loss(X, y)`` reads ``self.params`` and returns (loss, grads).

    Written in xp (any backend); softmax cross-entropy on one-hot labels plus L2. ``bug``:
    ``"reg"`` leaves the regularisation out of dW1, ``"relu"`` lets the gradient through
    dead ReLUs (both classics)."""

    def __init__(self, backend, seed=0, sizes=(4, 6, 3), dtype=None, bug=None):
        rng = np.random.default_rng(seed)
        d, h, c = sizes
        host_params = {
            "W1": rng.standard_normal((d, h)) * 0.5,
            "b1": rng.standard_normal(h) * 0.1,
            "W2": rng.standard_normal((h, c)) * 0.5,
            "b2": rng.standard_normal(c) * 0.1,
        }
        self.params = {k: to_backend(v, backend, dtype=dtype) for k, v in host_params.items()}
        self.classes, self.bug = c, bug

    def loss(self, X, y, reg=0.05):
        p = self.params
        xp = array_namespace(X, p["W1"])
        z = X @ p["W1"] + p["b1"]
        alive = xp.astype(z > 0, z.dtype)
        hidden = z * alive
        scores = hidden @ p["W2"] + p["b2"]
        scores = scores - xp.max(scores, axis=1, keepdims=True)
        probs = xp.exp(scores) / xp.sum(xp.exp(scores), axis=1, keepdims=True)
        onehot = xp.astype(y[:, None] == xp.arange(self.classes, device=device(y))[None, :], z.dtype)
        n = X.shape[0]
        loss = -xp.sum(onehot * xp.log(probs)) / n + reg * (xp.sum(p["W1"] ** 2) + xp.sum(p["W2"] ** 2))
        dscores = (probs - onehot) / n
        dhidden = dscores @ xp.matrix_transpose(p["W2"])
        dz = dhidden if self.bug == "relu" else dhidden * alive
        grads = {
            "W1": xp.matrix_transpose(X) @ dz + (0 if self.bug == "reg" else 2 * reg * p["W1"]),
            "b1": xp.sum(dz, axis=0),
            "W2": xp.matrix_transpose(hidden) @ dscores + 2 * reg * p["W2"],
            "b2": xp.sum(dscores, axis=0),
        }
        return loss, grads


def _data(backend, seed=1, n=5, d=4, c=3, dtype=None):
    rng = np.random.default_rng(seed)
    X = to_backend(rng.standard_normal((n, d)), backend, dtype=dtype)
    y = to_backend(rng.integers(0, c, n), backend)
    return X, y


@pytest.mark.parametrize("bug", (None, "reg", "relu"))
def test_two_layer_net_in_place(backend, bug):
    net = TwoLayerNet(backend, bug=bug)
    X, y = _data(backend)
    arrays = dict(net.params)  # the very objects loss reads
    saved = snapshot(net.params)
    _, grads = net.loss(X, y)
    report = gc.check_in_place(lambda X, y: net.loss(X, y)[0], net.params, grads, X, y)
    assert set(report.faults) == {None: set(), "reg": {"W1"}, "relu": {"W1", "b1"}}[bug]
    assert report.verdict == ("pass" if bug is None else "fail")
    assert report.mode == "loop"
    assert any("evaluated in place" in note and "mode='loop'" in note for note in report.notes)
    assert_bitwise_equal(net.params, saved)
    assert all(net.params[k] is arrays[k] for k in arrays)  # written in place, never rebound
    assert_on(report.parameters["W1"].numeric_grad, backend)


def test_a_cost_given_the_parameters_it_never_reads_fails_where_in_place_passes(backend):
    # The wall the issue describes: gc.check perturbs copies loss never sees.
    net = TwoLayerNet(backend)
    X, y = _data(backend)
    _, grads = net.loss(X, y)
    assert gc.check(lambda p, X, y: net.loss(X, y)[0], net.params, grads, X, y).verdict == "fail"
    assert gc.check_in_place(lambda X, y: net.loss(X, y)[0], net.params, grads, X, y).verdict == "pass"


@pytest.mark.parametrize("kind", (RuntimeError, KeyboardInterrupt))
def test_in_place_arrays_are_restored_after_the_loss_raises(backend, kind):
    net = TwoLayerNet(backend)
    X, y = _data(backend)
    saved = snapshot(net.params)
    _, grads = net.loss(X, y)
    calls = []

    def loss(X, y):
        calls.append(1)
        if len(calls) == 7:  # midway: some perturbation is in the arrays right now
            raise kind("stop")
        return net.loss(X, y)[0]

    with pytest.raises(gc.CostError if kind is RuntimeError else KeyboardInterrupt) as info:
        gc.check_in_place(loss, net.params, grads, X, y)
    assert type(info.value) is (gc.CostError if kind is RuntimeError else KeyboardInterrupt)
    assert len(calls) == 7
    assert_bitwise_equal(net.params, saved)


@given(
    sizes=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(2, 4)),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    bug=st.sampled_from((None, "reg")),
)
def test_property_two_layer_net_in_place(sizes, n, seed, bug):
    from gcbackend.backends import resolve

    backend = resolve("numpy", [])
    net = TwoLayerNet(backend, seed=seed, sizes=sizes, bug=bug)
    X, y = _data(backend, seed=seed + 1, n=n, d=sizes[0], c=sizes[2])
    saved = snapshot(net.params)
    _, grads = net.loss(X, y)
    report = gc.check_in_place(lambda X, y: net.loss(X, y)[0], net.params, grads, X, y)
    assert report.faults == (("W1",) if bug else ())
    assert report.verdict in (("fail",) if bug else ("pass",))
    assert_bitwise_equal(net.params, saved)


@pytest.mark.parametrize("bug", (None, "reg"))
def test_in_place_float32_params_and_dw_keys(backend, bug):
    # float32 arrays are evaluated in float32 (the loss reads them): the finite differences
    # carry float32's rounding, so a correct gradient may be inconclusive, never a fault.
    xp = backend.xp
    net = TwoLayerNet(backend, dtype=xp.float32, bug=bug)
    X, y = _data(backend, dtype=xp.float32)
    saved = snapshot(net.params)
    _, grads = net.loss(X, y)
    report = gc.check_in_place(
        lambda X, y: net.loss(X, y)[0], net.params, {"d" + k: v for k, v in grads.items()}, X, y
    )
    assert report.faults == (("W1",) if bug else ())
    assert report.verdict in (("fail",) if bug else ("pass", "inconclusive"))
    assert report.dtype == "float32" and not any("float64" in note for note in report.notes)  # not upcast
    assert_bitwise_equal(net.params, saved)


def test_in_place_torch_parameters_that_require_grad(torch):
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(5, 3, dtype=torch.float64)

    def loss():
        return (model(X) ** 2).mean()

    value = loss()
    value.backward()
    grads = {"weight": model.weight.grad.clone(), "bias": model.bias.grad.clone()}
    params = {"weight": model.weight, "bias": model.bias}
    saved = snapshot({k: v.detach() for k, v in params.items()})
    report = gc.check_in_place(loss, params, grads)
    assert report.verdict == "pass"
    assert_bitwise_equal({k: v.detach() for k, v in params.items()}, saved)
    assert model.weight.requires_grad


def test_check_in_place_errors(backend):
    net = TwoLayerNet(backend)
    X, y = _data(backend)
    _, grads = net.loss(X, y)

    def loss(X, y):
        return net.loss(X, y)[0]

    for option, match in (
        ({"mode": "auto"}, "runs mode='loop' only"),
        ({"workers": 2}, "drop workers= and client="),
        ({"upcast": True}, "upcast=True cannot apply"),
    ):
        with pytest.raises(gc.InputError, match=match):
            gc.check_in_place(loss, net.params, grads, X, y, **option)
    with pytest.raises(gc.CostError, match=r"net.loss\(X, y\)\[0\]"):
        gc.check_in_place(net.loss, net.params, grads, X, y)
    with pytest.raises(gc.InputTypeError, match=r"params\['reg'\] is float"):
        gc.check_in_place(loss, {**net.params, "reg": 0.5}, {**grads, "reg": 0.0}, X, y)
    with pytest.raises(gc.InputTypeError, match="needs a callable loss"):
        gc.check_in_place(None, net.params, grads)


def test_in_place_refuses_jax_arrays(jax):
    params = {"w": jax.numpy.ones(3)}
    with pytest.raises(gc.InputTypeError, match=r"params\['w'\] cannot be written in place"):
        gc.check_in_place(lambda: jax.numpy.sum(params["w"] ** 2), params, {"w": 2 * params["w"]})


def test_frameworks_are_imported_lazily():
    import subprocess
    import sys

    code = (
        "import sys, gcbackend as gc, numpy as np\n"
        "p = {'w': np.ones(3)}\n"
        "gc.check_in_place(lambda: float(np.sum(p['w'] ** 2)), p, {'w': 2 * p['w']})\n"
        "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
