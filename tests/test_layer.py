"""check_layer: CS231n-style layers written here, correct and with one planted bug each.

Each layer pairs ``forward(*inputs) -> (out, cache)`` with ``backward(dout, cache)`` as the
course writes them (naive loops where the course has them, tiny sizes). A planted one-line
bug must fail exactly the input whose gradient it corrupts; the correct layer must pass.
The layers do not broadcast over a batch axis, so these checks pass ``mode="loop"`` (see
LOOP below).
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace
from helpers import assert_bitwise_equal, assert_on, host, snapshot
from hypothesis import given
from hypothesis import strategies as st

import gcbackend as gc
from gcbackend.backends import to_backend

# These layers are written for one point, as the course writes them; check()'s stacked
# evaluation would hand them a leading batch axis. Until "auto" (verify, else vmap, else
# loop) is check()'s default, they are checked one row per call.
LOOP: dict = {}  # the default mode="auto" checks CS231n-style layers as written


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- affine (xp)


def affine_forward(x, w, b):
    xp = array_namespace(x, w, b)
    out = xp.reshape(x, (x.shape[0], -1)) @ w + b
    return out, (x, w, b)


def affine_backward(dout, cache):
    x, w, b = cache
    xp = array_namespace(x, w, b, dout)
    flat = xp.reshape(x, (x.shape[0], -1))
    dx = xp.reshape(dout @ xp.matrix_transpose(w), x.shape)
    dw = xp.matrix_transpose(flat) @ dout
    db = xp.sum(dout, axis=0)
    return dx, dw, db


def affine_backward_averaged_dw(dout, cache):
    dx, dw, db = affine_backward(dout, cache)
    x = cache[0]
    return dx, dw / x.shape[0], db  # planted: dw averaged over the batch, the cost is a sum


def _affine_inputs(backend):
    rng = _rng(1)
    arrays = rng.standard_normal((2, 3, 2)), rng.standard_normal((6, 4)), rng.standard_normal(4)
    return tuple(to_backend(a, backend) for a in arrays)


def test_affine_passes_and_names_inputs_from_the_signature(backend):
    x, w, b = _affine_inputs(backend)
    saved = {"x": snapshot(x), "w": snapshot(w), "b": snapshot(b)}
    report = gc.check_layer(affine_forward, affine_backward, x, w, b, **LOOP)
    assert report.verdict == "pass" and report.faults == ()
    assert tuple(report.parameters) == ("x", "w", "b")
    assert report.parameters["x"].shape == (2, 3, 2)
    assert_on(report.parameters["w"].numeric_grad, backend)
    for name, value in (("x", x), ("w", w), ("b", b)):
        assert_bitwise_equal(value, saved[name])  # the user's arrays are never modified


def test_affine_planted_bug_is_localised_to_w(backend):
    x, w, b = _affine_inputs(backend)
    report = gc.check_layer(affine_forward, affine_backward_averaged_dw, x, w, b, **LOOP)
    assert report.verdict == "fail" and report.faults == ("w",)
    assert report.parameters["x"].verdict == "pass" and report.parameters["b"].verdict == "pass"


def test_dout_is_seeded_and_drawn_in_outs_dtype(backend):
    x, w, b = _affine_inputs(backend)
    seen = []

    def backward(dout, cache):
        seen.append((host(dout), dout.dtype))
        assert_on(dout, backend)
        return affine_backward(dout, cache)

    gc.check_layer(affine_forward, backward, x, w, b, seed=3, **LOOP)
    gc.check_layer(affine_forward, backward, x, w, b, seed=3, **LOOP)
    gc.check_layer(affine_forward, backward, x, w, b, seed=4, **LOOP)
    assert seen[0][0].tobytes() == seen[1][0].tobytes() != seen[2][0].tobytes()
    assert seen[0][0].shape == (2, 4) and seen[0][1] == x.dtype
    expected = np.random.default_rng(3).standard_normal((2, 4))
    assert np.array_equal(seen[0][0], expected)


def test_float32_layer_is_judged_to_float32(backend):
    xp = backend.xp
    x, w, b = (xp.astype(a, xp.float32) for a in _affine_inputs(backend))
    report = gc.check_layer(affine_forward, affine_backward, x, w, b, **LOOP)
    assert report.verdict == "pass"
    assert report.parameters["w"].analytic_grad.dtype == xp.float32


# --------------------------------------------------------------------------- conv (NumPy)


def conv_forward_naive(x, w, b, conv_param):
    stride, pad = conv_param["stride"], conv_param["pad"]
    _, _, height, width = x.shape
    filters, _, hh, ww = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = 1 + (height + 2 * pad - hh) // stride, 1 + (width + 2 * pad - ww) // stride
    out = np.zeros((x.shape[0], filters, out_h, out_w), dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * stride : i * stride + hh, j * stride : j * stride + ww]
            out[:, :, i, j] = np.tensordot(window, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out, (x, w, b, conv_param)


def _conv_backward(dout, cache, *, forget_stride_in_dw=False):
    x, w, _, conv_param = cache
    stride, pad = conv_param["stride"], conv_param["pad"]
    _, _, hh, ww = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dpadded, dw = np.zeros_like(padded), np.zeros_like(w)
    for i in range(dout.shape[2]):
        for j in range(dout.shape[3]):
            rows, cols = slice(i * stride, i * stride + hh), slice(j * stride, j * stride + ww)
            window = padded[:, :, rows, cols]
            if forget_stride_in_dw:  # planted: the window of stride 1
                window = padded[:, :, i : i + hh, j : j + ww]
            dw += np.tensordot(dout[:, :, i, j], window, axes=([0], [0]))
            dpadded[:, :, rows, cols] += np.tensordot(dout[:, :, i, j], w, axes=([1], [0]))
    dx = dpadded[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]
    return dx, dw, dout.sum(axis=(0, 2, 3))


def conv_backward_naive(dout, cache):
    return _conv_backward(dout, cache)


def conv_backward_stride_bug(dout, cache):
    return _conv_backward(dout, cache, forget_stride_in_dw=True)


def _conv_inputs():
    rng = _rng(2)
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    return x, w, b, {"stride": 2, "pad": 1}


def test_conv_with_stride_and_padding_passes_and_conv_param_is_a_constant():
    x, w, b, conv_param = _conv_inputs()
    report = gc.check_layer(conv_forward_naive, conv_backward_naive, x, w, b, conv_param, **LOOP)
    assert report.verdict == "pass"
    assert tuple(report.parameters) == ("x", "w", "b")  # conv_param is not a parameter
    assert conv_param == {"stride": 2, "pad": 1}


def test_conv_planted_stride_bug_is_localised_to_w():
    x, w, b, conv_param = _conv_inputs()
    report = gc.check_layer(conv_forward_naive, conv_backward_stride_bug, x, w, b, conv_param, **LOOP)
    assert report.verdict == "fail" and report.faults == ("w",)


# --------------------------------------------------------------------------- max-pool (NumPy)


def max_pool_forward_naive(x, pool_param):
    size, stride = pool_param["pool"], pool_param["stride"]
    out_h = 1 + (x.shape[2] - size) // stride
    out_w = 1 + (x.shape[3] - size) // stride
    out = np.zeros((*x.shape[:2], out_h, out_w), dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, :, i * stride : i * stride + size, j * stride : j * stride + size]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out, (x, pool_param)


def _max_pool_backward(dout, cache, *, overwrite=False):
    x, pool_param = cache
    size, stride = pool_param["pool"], pool_param["stride"]
    dx = np.zeros_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    window = x[n, c, i * stride : i * stride + size, j * stride : j * stride + size]
                    a, k = np.unravel_index(np.argmax(window), window.shape)
                    if overwrite:  # planted: "=" where overlapping windows need "+="
                        dx[n, c, i * stride + a, j * stride + k] = dout[n, c, i, j]
                    else:
                        dx[n, c, i * stride + a, j * stride + k] += dout[n, c, i, j]
    return dx


def max_pool_backward_naive(dout, cache):
    return _max_pool_backward(dout, cache)


def max_pool_backward_overwrites(dout, cache):
    return _max_pool_backward(dout, cache, overwrite=True)


def _pool_inputs():
    x = _rng(3).standard_normal((1, 2, 4, 4))
    return x, {"pool": 2, "stride": 1}  # 2×2 windows at stride 1: every inner cell in 4 windows


def test_max_pool_with_overlapping_windows_passes():
    x, pool_param = _pool_inputs()
    report = gc.check_layer(max_pool_forward_naive, max_pool_backward_naive, x, pool_param, **LOOP)
    assert report.verdict == "pass" and tuple(report.parameters) == ("x",)


def test_max_pool_overwrite_bug_is_caught_where_windows_share_their_max():
    x, pool_param = _pool_inputs()
    report = gc.check_layer(max_pool_forward_naive, max_pool_backward_overwrites, x, pool_param, **LOOP)
    assert report.verdict == "fail" and report.faults == ("x",)


# --------------------------------------------------------------------------- batch norm (xp)


def batchnorm_forward(x, gamma, beta, bn_param):
    xp = array_namespace(x, gamma, beta)
    mode, eps, momentum = bn_param["mode"], bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    if mode != "train":  # pragma: no cover - only training mode is checked here
        raise ValueError(mode)
    mean, var = xp.mean(x, axis=0), xp.var(x, axis=0)
    running_mean = bn_param.get("running_mean", xp.zeros_like(mean))
    xhat = (x - mean) / xp.sqrt(var + eps)
    bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean  # as the course does
    return gamma * xhat + beta, (xhat, gamma, var, eps)


def _batchnorm_backward(dout, cache, *, drop_mean_term=False):
    xhat, gamma, var, eps = cache
    xp = array_namespace(dout, xhat)
    n = dout.shape[0]
    dxhat = dout * gamma
    inner = n * dxhat - xhat * xp.sum(dxhat * xhat, axis=0)
    if not drop_mean_term:  # planted when dropped: the term through the batch mean
        inner = inner - xp.sum(dxhat, axis=0)
    dx = inner / (n * xp.sqrt(var + eps))
    return dx, xp.sum(dout * xhat, axis=0), xp.sum(dout, axis=0)


def batchnorm_backward(dout, cache):
    return _batchnorm_backward(dout, cache)


def batchnorm_backward_without_mean_term(dout, cache):
    return _batchnorm_backward(dout, cache, drop_mean_term=True)


def _bn_inputs(backend):
    rng = _rng(4)
    x = 2.0 + 3.0 * rng.standard_normal((5, 3))
    arrays = (to_backend(a, backend) for a in (x, rng.standard_normal(3), rng.standard_normal(3)))
    return (*arrays, {"mode": "train"})


def test_batchnorm_in_training_mode_passes(backend):
    x, gamma, beta, bn_param = _bn_inputs(backend)
    keys = set(bn_param)
    report = gc.check_layer(batchnorm_forward, batchnorm_backward, x, gamma, beta, bn_param, **LOOP)
    assert report.verdict == "pass" and tuple(report.parameters) == ("x", "gamma", "beta")
    assert_on(report.parameters["gamma"].numeric_grad, backend)
    # The forward stores running_mean in bn_param at every call: into per-call copies, never
    # into the caller's dict (and never a batched or vmapped value that escapes its call).
    assert set(bn_param) == keys and "running_mean" not in keys


def test_batchnorm_planted_bug_is_localised_to_x(backend):
    x, gamma, beta, bn_param = _bn_inputs(backend)
    report = gc.check_layer(
        batchnorm_forward, batchnorm_backward_without_mean_term, x, gamma, beta, bn_param, **LOOP
    )
    assert report.verdict == "fail" and report.faults == ("x",)


# --------------------------------------------------------------------------- LSTM step (NumPy)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b):
    hidden = prev_h.shape[1]
    a = x @ Wx + prev_h @ Wh + b
    i, f, o = (_sigmoid(a[:, k * hidden : (k + 1) * hidden]) for k in range(3))
    g = np.tanh(a[:, 3 * hidden :])
    next_c = f * prev_c + i * g
    next_h = o * np.tanh(next_c)
    return next_h, next_c, (x, prev_h, prev_c, Wx, Wh, i, f, o, g, next_c, next_h)


def _lstm_step_backward(dnext_h, dnext_c, cache, *, next_h_in_dWh=False):
    x, prev_h, prev_c, Wx, Wh, i, f, o, g, next_c, next_h = cache
    tanh_c = np.tanh(next_c)
    dc = dnext_c + dnext_h * o * (1 - tanh_c**2)
    da = np.concatenate(
        [
            dc * g * i * (1 - i),
            dc * prev_c * f * (1 - f),
            dnext_h * tanh_c * o * (1 - o),
            dc * i * (1 - g**2),
        ],
        axis=1,
    )
    dWh = (next_h if next_h_in_dWh else prev_h).T @ da  # planted when next_h: the wrong state
    return da @ Wx.T, da @ Wh.T, dc * f, x.T @ da, dWh, da.sum(axis=0)


# An LSTM step has two outputs and a three-value forward; a layer check takes one out, so
# the step is wrapped: out = [next_h, next_c], and dout splits back into the two.
def lstm_forward(x, prev_h, prev_c, Wx, Wh, b):
    next_h, next_c, cache = lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b)
    return np.concatenate([next_h, next_c], axis=1), cache


def lstm_backward(dout, cache):
    hidden = dout.shape[1] // 2
    return _lstm_step_backward(dout[:, :hidden], dout[:, hidden:], cache)


def lstm_backward_with_bug(dout, cache):
    hidden = dout.shape[1] // 2
    return _lstm_step_backward(dout[:, :hidden], dout[:, hidden:], cache, next_h_in_dWh=True)


def _lstm_inputs():
    rng = _rng(5)
    n, d, h = 2, 3, 2
    return (
        rng.standard_normal((n, d)),
        rng.standard_normal((n, h)),
        rng.standard_normal((n, h)),
        0.5 * rng.standard_normal((d, 4 * h)),
        0.5 * rng.standard_normal((h, 4 * h)),
        0.1 * rng.standard_normal(4 * h),
    )


def test_lstm_step_passes():
    report = gc.check_layer(lstm_forward, lstm_backward, *_lstm_inputs(), **LOOP)
    assert report.verdict == "pass"
    assert tuple(report.parameters) == ("x", "prev_h", "prev_c", "Wx", "Wh", "b")


def test_lstm_step_planted_bug_is_localised_to_Wh():
    report = gc.check_layer(lstm_forward, lstm_backward_with_bug, *_lstm_inputs(), **LOOP)
    assert report.verdict == "fail" and report.faults == ("Wh",)


# --------------------------------------------------------------------------- constants, names, errors


def softmax_loss(x, y):
    shifted = x - x.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return -np.log(probs[np.arange(x.shape[0]), y]).mean(), (probs, y)


def softmax_loss_backward(dout, cache):
    probs, y = cache
    dx = probs.copy()
    dx[np.arange(y.shape[0]), y] -= 1
    return dx * dout / y.shape[0]


def test_integer_labels_are_constants_and_a_scalar_out_works():
    x = _rng(6).standard_normal((3, 4))
    y = np.array([0, 3, 1])
    report = gc.check_layer(softmax_loss, softmax_loss_backward, x, y, **LOOP)
    assert report.verdict == "pass" and tuple(report.parameters) == ("x",)


def test_forward_returning_only_out_and_varargs_names():
    def forward(*arrays):
        return arrays[0] * arrays[1]

    def backward(dout, cache):
        assert cache is None
        return dout * y, dout * x

    x, y = _rng(7).standard_normal(3), _rng(8).standard_normal(3)
    report = gc.check_layer(forward, backward, x, y)  # elementwise: it broadcasts, stacked is fine
    assert report.verdict == "pass" and tuple(report.parameters) == ("x0", "x1")


def test_wrong_number_of_gradients_is_an_input_error():
    x, w, b = _affine_inputs(gc.backends.resolve("numpy", []))
    with pytest.raises(
        gc.InputError,
        match=r"backward returned 2 gradient\(s\), but forward has 3 floating-point input\(s\) \(x, w, b\)",
    ):
        gc.check_layer(affine_forward, lambda dout, cache: affine_backward(dout, cache)[1:], x, w, b)


def test_no_floating_input_and_too_many_inputs_are_refused():
    with pytest.raises(gc.InputError, match=r"none of forward's inputs \(y\) is a floating-point array"):
        gc.check_layer(lambda y: y * 1.0, lambda dout, cache: dout, np.arange(3))
    with pytest.raises(
        gc.InputError, match=r"forward takes 1 positional input\(s\) \(x\) but check_layer got 2"
    ):
        gc.check_layer(lambda x: x, lambda dout, cache: dout, np.ones(2), np.ones(2))


def test_three_value_forward_is_refused_rather_than_misread():
    def forward(x):
        return x, 2 * x, None

    with pytest.raises(gc.InputError, match=r"forward returned a tuple of 3"):
        gc.check_layer(forward, lambda dout, cache: dout, np.ones(2))


# --------------------------------------------------------------------------- workers= and client=


def affine_forward_broadcasting(x, w, b):
    """The affine layer written to broadcast over a leading batch axis of any input."""
    return x @ w + b[..., None, :], (x, w, b)


def test_layer_with_workers_equals_one_thread():
    rng = _rng(9)
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    one = gc.check_layer(affine_forward_broadcasting, affine_backward, x, w, b, mode="stacked")
    two = gc.check_layer(affine_forward_broadcasting, affine_backward, x, w, b, mode="stacked", workers=2)
    assert one.verdict == two.verdict == "pass" and one.difference == two.difference


# check_layer and parameter trees on a Dask client: tests/test_distributed.py (its cluster).


@given(
    n=st.integers(1, 4),
    d=st.integers(1, 4),
    m=st.integers(1, 3),
    wrong=st.sampled_from([None, 0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_property_a_dense_layer_passes_and_a_scaled_gradient_fails_exactly_its_input(n, d, m, wrong, seed):
    """Any shapes: the correct backward passes; one gradient off by 5 % fails that input only."""
    rng = _rng(seed)
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((d, m)), rng.standard_normal(m)

    def backward(dout, cache):
        grads = list(affine_backward(dout, cache))
        if wrong is not None:
            grads[wrong] = grads[wrong] * 1.05
        return tuple(grads)

    report = gc.check_layer(affine_forward_broadcasting, backward, x, w, b, seed=seed, mode="stacked")
    names = ("x", "w", "b")
    if wrong is None:
        assert report.verdict == "pass"
    else:
        assert report.verdict == "fail" and report.faults == (names[wrong],)


# Found by an audit of CS231n-style layers: a loss returned as a Python float, torch inputs
# with NumPy labels, and a running mean updated in place inside the bn_param dict.
def _softmax_loss_as_float(x, y):
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    n = x.shape[0]
    dx = probs.copy()
    dx[np.arange(n), y] -= 1
    return float(-np.log(probs[np.arange(n), y]).mean()), dx / n


def test_a_loss_returned_as_a_python_float_is_checked():
    x, y = _rng(7).standard_normal((4, 5)), np.array([0, 2, 1, 3])
    report = gc.check_layer(_softmax_loss_as_float, lambda dout, dx: dout * dx, x, y)
    assert report.verdict == "pass" and tuple(report.parameters) == ("x",)
    wrong = gc.check_layer(_softmax_loss_as_float, lambda dout, dx: 2 * dout * dx, x, y)
    assert wrong.verdict == "fail" and wrong.faults == ("x",)


def test_torch_inputs_with_numpy_labels_run_on_torch():
    torch = pytest.importorskip("torch")

    def forward(x, y):
        logp = torch.log_softmax(x, 1)
        n = x.shape[0]
        dx = logp.exp()
        dx[torch.arange(n), y] -= 1
        return -logp[torch.arange(n), y].mean().item(), dx / n

    x = torch.tensor(_rng(8).standard_normal((4, 5)))
    report = gc.check_layer(forward, lambda dout, dx: dout * dx, x, np.array([0, 1, 2, 3]))
    assert report.verdict == "pass" and report.backend == "torch"


def test_an_in_place_running_mean_never_reaches_the_callers_bn_param():
    running = np.zeros(3)
    bn_param = {"mode": "train", "running_mean": running}

    def forward(x, gamma, bn_param):
        mean = x.mean(axis=0)
        bn_param["running_mean"] *= 0.9  # in place, into the dict's own array
        bn_param["running_mean"] += 0.1 * mean
        return (x - mean) * gamma, x

    def backward(dout, x):
        mean = x.mean(axis=0)
        return dout * gamma - (dout * gamma).mean(axis=0), (dout * (x - mean)).sum(axis=0)

    x, gamma = _rng(9).standard_normal((4, 3)), _rng(10).standard_normal(3)
    assert gc.check_layer(forward, backward, x, gamma, bn_param).verdict == "pass"
    assert bn_param["running_mean"] is running and not running.any()
