"""params: flatten/unflatten with leading axes; gradient keys matched and checked."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_on, host

import gcbackend as gc
from gcbackend.params import Layout, match_grads


def _params(backend):
    xp = backend.xp
    return {
        "W1": xp.reshape(xp.arange(6.0, device=backend.device), (2, 3)),
        "b1": xp.asarray([[10.0], [11.0]], device=backend.device),
        "s": xp.asarray(7.0, device=backend.device),
    }


def test_flatten_order_and_size(backend):
    params = _params(backend)
    layout = Layout.of(params)
    assert layout.names == ("W1", "b1", "s") and layout.shapes == ((2, 3), (2, 1), ())
    assert layout.sizes == (6, 2, 1) and layout.offsets == (0, 6, 8) and layout.size == 9
    theta = layout.flatten(params, xp=backend.xp)
    assert_on(theta, backend)
    assert host(theta).tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 7]


def test_unflatten_keeps_leading_axes(backend):
    xp = backend.xp
    params = _params(backend)
    layout = Layout.of(params)
    theta = layout.flatten(params, xp=xp)
    stacked = xp.stack([theta, theta * 2, theta * 3])
    grid = xp.reshape(xp.concat([stacked, stacked]), (2, 3, 9))
    out = layout.unflatten(grid, xp=xp)
    assert tuple(out["W1"].shape) == (2, 3, 2, 3) and tuple(out["s"].shape) == (2, 3)
    assert host(out["b1"])[1, 2].tolist() == [[30.0], [33.0]]
    back = layout.unflatten(theta, xp=xp)
    for name in params:
        assert host(back[name]).tobytes() == host(params[name]).tobytes()
    with pytest.raises(gc.InputError, match="expected 9"):
        layout.unflatten(xp.zeros((4,), device=backend.device), xp=xp)


def test_single_array_layout(backend):
    xp = backend.xp
    theta = xp.asarray([1.0, 2.0], device=backend.device)
    layout = Layout.of(theta)
    assert layout.single and layout.names == ("theta",)
    assert host(layout.unflatten(xp.stack([theta, theta]), xp=xp)).shape == (2, 2)


def test_grad_keys():
    names = ("W1", "b1", "W2")
    g = {"dW1": 1, "b1": 2, "dW2": 3, "dZ3": 0, "dA2": 0, "cache": 0}
    assert match_grads(names, g) == {"W1": 1, "b1": 2, "W2": 3}


def test_missing_gradient_is_named():
    with pytest.raises(gc.InputError, match=r"grads has no gradient for parameter 'b1'.*grads\['db1'\]"):
        match_grads(("W1", "b1"), {"dW1": 1})


def test_both_spellings_refused():
    with pytest.raises(gc.InputError, match="both 'W1' and 'dW1'"):
        match_grads(("W1",), {"W1": 1, "dW1": 1})


def test_parameter_like_extra_key_refused():
    with pytest.raises(gc.InputError, match=r"grads\['dW4'\] looks like the gradient of a parameter 'W4'"):
        match_grads(("W1", "b1", "W2", "b2"), {"dW1": 1, "db1": 1, "dW2": 1, "db2": 1, "dW4": 1})


def test_shape_mismatch_names_both_shapes():
    params = {"W": np.ones((2, 3))}
    with pytest.raises(
        gc.InputError, match=r"grads\['W'\] has shape \(3, 2\) but params\['W'\] has shape \(2, 3\)"
    ):
        gc.check(lambda p: p["W"].sum(), params, {"dW": np.ones((3, 2))})
