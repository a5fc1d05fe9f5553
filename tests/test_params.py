"""params: flatten/unflatten with leading axes; gradient keys matched and checked; trees."""

from __future__ import annotations

import pickle
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pytest
from array_api_compat import array_namespace
from helpers import assert_on, host

import gcbackend as gc
from gcbackend.backends import to_backend
from gcbackend.params import Layout, flatten_tree, match_grads, match_tree


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


# --------------------------------------------------------------------------- parameter trees


class Dense(NamedTuple):
    W: Any
    b: Any


def _tree(backend, dtype=None):
    """A two-layer net's params as a tree of every kind: dict, list, NamedTuple, tuple, None."""
    rng = np.random.default_rng(11)

    def on(shape):
        value = to_backend(rng.standard_normal(shape), backend)
        return value if dtype is None else backend.xp.astype(value, dtype)

    return {
        "encoder": {"W": on((3, 4)), "b": on((4,))},
        "layers": [Dense(on((4, 2)), on((2,))), (on((2,)), None)],
    }


def _tree_cost(params, X):
    """Σ tanh(tanh(X W + b) W' + b') · v, broadcasting over a leading batch axis of any leaf."""
    xp = array_namespace(X)
    dense, (v, nothing) = params["layers"]
    assert isinstance(params["layers"], list) and isinstance(dense, Dense) and nothing is None
    hidden = xp.tanh(X @ params["encoder"]["W"] + params["encoder"]["b"][..., None, :])
    out = xp.tanh(hidden @ dense.W + dense.b[..., None, :])
    return xp.sum(xp.sum(out * v[..., None, :], axis=-1), axis=-1)


def _tree_grads(params, X, *, bug=False):
    xp = array_namespace(X)
    W1, b1 = params["encoder"]["W"], params["encoder"]["b"]
    dense, (v, _) = params["layers"]
    hidden = xp.tanh(X @ W1 + b1)
    out = xp.tanh(hidden @ dense.W + dense.b)
    dz2 = v * (1 - out**2)
    dW2 = xp.matrix_transpose(hidden) @ dz2
    dz1 = (dz2 @ xp.matrix_transpose(dense.W)) * (1 - hidden**2)
    dW1 = xp.matrix_transpose(X) @ dz1
    if bug:  # planted in a nested leaf: layers[0].b, the dense layer's bias gradient, off by 1 %
        dz2 = dz2 * 1.01
    return {
        "dencoder": {"dW": dW1, "db": xp.sum(dz1, axis=0)},  # "d" + key accepted at every level
        "layers": [Dense(dW2, xp.sum(dz2, axis=0)), [xp.sum(out, axis=0), None]],
    }


def test_tree_names_follow_the_documented_notation():
    tree = flatten_tree(
        {"encoder": {"W": 1.0, "my key": 2.0, 3: 4.0}, "layers": [Dense(5.0, 6.0), (7.0, None)], "W1": 8.0}
    )
    assert tree.names == (
        "encoder.W",
        "encoder['my key']",
        "encoder[3]",
        "layers[0].W",
        "layers[0].b",
        "layers[1][0]",
        "W1",
    )
    assert flatten_tree([(np.ones(1), 2.0), np.ones(2)]).names == ("[0][0]", "[0][1]", "[1]")
    assert flatten_tree([(1.0, 2.0), np.ones(2)]).names == ("[0]", "[1]")  # numbers only: one leaf
    assert flatten_tree(Dense(np.ones(1), np.ones(1))).names == ("W", "b")
    assert flatten_tree({"W1": np.ones(1), "b 1": np.ones(1)}).names == ("W1", "b 1")  # flat: as written
    single = flatten_tree(np.ones(3))
    assert single.single and single.names == ("theta",)


def test_two_leaves_with_one_name_are_refused():
    with pytest.raises(gc.InputError, match=r"params has two parameters named 'a\.b'"):
        flatten_tree({"a.b": 1.0, "a": {"b": 2.0}})


def test_tree_layout_rebuilds_the_same_types_with_leading_axes(backend):
    xp = backend.xp
    params = _tree(backend)
    layout = Layout.of(params)
    assert layout.names == ("encoder.W", "encoder.b", "layers[0].W", "layers[0].b", "layers[1][0]")
    assert layout.size == 12 + 4 + 8 + 2 + 2
    theta = layout.flatten(params, xp=xp)
    assert_on(theta, backend)
    back = layout.unflatten(xp.stack([theta, 2 * theta]), xp=xp)
    assert isinstance(back, dict) and isinstance(back["layers"], list)
    assert isinstance(back["layers"][0], Dense) and type(back["layers"][1]) is tuple
    assert back["layers"][1][1] is None
    assert tuple(back["layers"][0].W.shape) == (2, 4, 2)
    assert host(back["layers"][0].W)[1].tolist() == (2 * host(params["layers"][0].W)).tolist()
    assert list(back) == ["encoder", "layers"] and list(back["encoder"]) == ["W", "b"]
    restored = pickle.loads(pickle.dumps(layout))  # client=: the layout travels to the workers
    assert restored == layout and restored.names == layout.names


def test_tree_check_passes_and_a_nested_bug_is_named_by_its_path(backend):
    X = to_backend(np.random.default_rng(12).standard_normal((5, 3)), backend)
    params = _tree(backend)
    saved = {name: host(leaf) for name, leaf in zip(*_named(params))}
    report = gc.check(_tree_cost, params, _tree_grads(params, X), X)
    assert report.verdict == "pass"
    assert tuple(report.parameters) == (
        "encoder.W",
        "encoder.b",
        "layers[0].W",
        "layers[0].b",
        "layers[1][0]",
    )
    assert_on(report.parameters["layers[0].W"].numeric_grad, backend)
    bad = gc.check(_tree_cost, params, _tree_grads(params, X, bug=True), X)
    assert bad.verdict == "fail" and bad.faults == ("layers[0].b",)
    assert "layers[0].b" in str(bad)
    for name, leaf in zip(*_named(params)):  # never modified
        assert host(leaf).tobytes() == saved[name].tobytes()


def test_tree_check_in_every_evaluation_gives_the_same_faults():
    backend = gc.backends.resolve("numpy", [])
    X = np.random.default_rng(12).standard_normal((5, 3))
    params = _tree(backend)
    grads = _tree_grads(params, X, bug=True)
    stacked = gc.check(_tree_cost, params, grads, X)
    looped = gc.check(_tree_cost, params, grads, X, mode="loop")
    threads = gc.check(_tree_cost, params, grads, X, workers=2)
    per_tensor = gc.check(_tree_cost, params, grads, X, memory_budget=256)  # one tensor per call
    sampled = gc.check(_tree_cost, params, grads, X, sample=2)
    screened = gc.check(_tree_cost, params, grads, X, mode="directions")
    assert stacked.faults == looped.faults == threads.faults == per_tensor.faults == ("layers[0].b",)
    assert sampled.faults == screened.faults == ("layers[0].b",)
    assert threads.difference == stacked.difference


def test_float32_tree_keeps_its_leaves_float32_in_the_report(backend):
    xp = backend.xp
    X = to_backend(np.random.default_rng(12).standard_normal((5, 3)), backend)
    params = _tree(backend, dtype=xp.float32)
    grads = _tree_grads({"encoder": params["encoder"], "layers": params["layers"]}, xp.astype(X, xp.float32))
    report = gc.check(_tree_cost, params, grads, X)
    assert report.verdict == "pass"
    assert report.parameters["encoder.W"].analytic_grad.dtype == xp.float32


def _named(params):
    tree = flatten_tree(params)
    return tree.names, tree.leaves


def test_lists_of_arrays_are_params_but_lists_of_numbers_still_need_an_array():
    theta = [np.array([1.0, 2.0]), np.array(3.0)]
    report = gc.check(
        lambda p: p[0][..., 0] * p[1] + p[0][..., 1] ** 2, theta, [np.array([3.0, 4.0]), np.array(1.0)]
    )
    assert report.verdict == "pass" and tuple(report.parameters) == ("[0]", "[1]")
    with pytest.raises(gc.InputTypeError, match=r"params\['W'\] is a Python list; pass an array"):
        gc.check(lambda p: p["W"], {"W": [[1.0, 2.0]]}, {"W": np.ones((1, 2))})


def test_other_mappings_are_read_as_dicts():
    params = MappingProxyType({"W": np.ones(2), "inner": MappingProxyType({"b": np.ones(1)})})
    seen = []

    def cost(p):
        seen.append((type(p), type(p["inner"])))
        return p["W"][..., 0] * p["inner"]["b"][..., 0]

    report = gc.check(cost, params, {"dW": np.array([1.0, 0.0]), "inner": {"db": np.array([1.0])}})
    assert report.verdict == "pass" and tuple(report.parameters) == ("W", "inner.b")
    assert seen[0] == (dict, dict)


@pytest.mark.parametrize(
    ("grads", "error", "message"),
    [
        (
            {"encoder": {"W": 0, "b": 0}, "layers": [Dense(0, 0)]},
            gc.InputError,
            r"params\['layers'\] has 2 entries but grads\['layers'\] has 1",
        ),
        (
            {"encoder": {"W": 0, "b": 0}, "layers": [Dense(0, 0), (0, 0)]},
            gc.InputError,
            r"params\['layers'\]\[1\]\[1\] is None \(no parameter\) but grads\['layers'\]\[1\]\[1\] is a int",
        ),
        (
            {"encoder": {"W": 0}, "layers": [Dense(0, 0), (0, None)]},
            gc.InputError,
            r"grads has no gradient for parameter 'encoder\.b': add grads\['encoder'\]\['b'\] "
            r"\(or grads\['encoder'\]\['db'\]\)",
        ),
        (
            {"encoder": {"W": 0, "b": 0}, "layers": [{"W": 0, "b": 0}, (0, None)]},
            gc.InputTypeError,
            r"params\['layers'\]\[0\] is a Dense of 2 but grads\['layers'\]\[0\] is a mapping",
        ),
        (
            {"encoder": {"W": 0, "b": 0}, "layers": [Dense({"x": 0}, 0), (0, None)]},
            gc.InputTypeError,
            r"params\['layers'\]\[0\]\.W is one array but grads\['layers'\]\[0\]\.W is a mapping",
        ),
        (
            {"encoder": 0, "layers": []},
            gc.InputTypeError,
            r"params\['encoder'\] is a mapping but grads\['encoder'\] is a int",
        ),
        (
            {"encoder": {"W": 0, "b": 0, "dW2": 0}, "layers": [Dense(0, 0), (0, None)]},
            gc.InputError,
            r"grads\['encoder'\]\['dW2'\] looks like the gradient of a parameter 'W2'",
        ),
    ],
)
def test_a_structure_mismatch_names_the_first_differing_path(grads, error, message):
    params = {
        "encoder": {"W": np.ones((2, 2)), "b": np.ones(2)},
        "layers": [Dense(np.ones(2), np.ones(2)), (np.ones(2), None)],
    }
    with pytest.raises(error, match=message):
        gc.check(lambda p: 0.0, params, grads)


def test_match_tree_reads_grads_along_params():
    params = {"a": [np.ones(1), Dense(np.ones(1), np.ones(1))]}
    picked = match_tree(params, {"da": (1, [2, 3])})  # a tuple for a list, a list for a NamedTuple
    assert picked == {"a[0]": 1, "a[1].W": 2, "a[1].b": 3}


def test_a_none_parameter_may_be_left_out_of_grads_but_not_given_a_value():
    params = {"W": np.ones(2), "bias": None}
    report = gc.check(
        lambda p: p["W"][..., 0] + 0.0 * (p["bias"] is None), params, {"dW": np.array([1.0, 0.0])}
    )
    assert report.verdict == "pass" and tuple(report.parameters) == ("W",)
    with pytest.raises(
        gc.InputError, match=r"params\['bias'\] is None \(no parameter\) but grads\['bias'\] is"
    ):
        gc.check(lambda p: p["W"][..., 0], params, {"dW": np.array([1.0, 0.0]), "bias": np.ones(1)})


def test_plots_and_html_use_the_path_names():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gcbackend.plot import plot_report

    X = np.random.default_rng(12).standard_normal((5, 3))
    params = _tree(gc.backends.resolve("numpy", []))
    report = gc.check(_tree_cost, params, _tree_grads(params, X, bug=True), X)
    try:
        ax = report.plot()
        assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == list(report.parameters)
        assert report.plot_errors("layers[0].b").get_title().startswith("layers[0].b (2,)")
        figure = plot_report(report)  # the failing parameter's heatmap by its path
        assert any(a.get_title().startswith("layers[0].b") for a in figure.axes)
    finally:
        plt.close("all")
    assert "layers[0].b" in report._repr_html_()


def _trees():
    """Trees of dicts, lists, tuples and NamedTuples (and None) over small float arrays."""
    from hypothesis import strategies as st

    leaves = st.builds(
        lambda shape, seed: np.random.default_rng(seed).standard_normal(shape),
        st.sampled_from([(), (1,), (2,), (2, 1)]),
        st.integers(0, 2**16),
    )
    keys = st.sampled_from(["W", "b", "W1", "dense", "my key", "x_0"])

    def extend(children):
        return st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.builds(Dense, children, children),
        )

    return st.recursive(st.one_of(leaves, st.none()), extend, max_leaves=8)


def test_any_tree_round_trips_through_its_layout_with_a_batch_axis():
    """Property: names are unique, one per array leaf in order; unflatten(flatten(tree))
    rebuilds the same containers, None where there was None, every leaf bitwise, and with
    a leading batch axis every leaf gets that axis."""
    from hypothesis import given

    @given(tree=_trees())
    def round_trip(tree):
        parsed = flatten_tree(tree)  # these keys hold no '.' or '[': names never collide
        if not parsed.names:
            return  # nothing but None: check() says "params is empty"
        layout = Layout.of(tree)
        assert len(set(layout.names)) == len(layout.names) == len(parsed.leaves)
        theta = layout.flatten(tree, xp=np)
        rebuilt = layout.unflatten(theta, xp=np)
        batched = layout.unflatten(np.stack([theta, 2 * theta]), xp=np)

        def same(a, b, c):
            if a is None:
                assert b is None and c is None
            elif isinstance(a, np.ndarray):
                assert b.tobytes() == a.tobytes() and b.shape == a.shape
                assert c.shape == (2, *a.shape) and np.array_equal(c[1], 2 * a)
            else:
                assert type(b) is type(a) and type(c) is type(a) and len(b) == len(a)
                if isinstance(a, dict):
                    assert list(b) == list(a) == list(c)
                    for key in a:
                        same(a[key], b[key], c[key])
                else:
                    for x, y, z in zip(a, b, c):
                        same(x, y, z)

        same(tree, rebuilt, batched)
        assert match_tree(tree, tree) == dict(zip(parsed.names, parsed.leaves))

    round_trip()


def test_trees_flattened_on_many_threads_keep_insertion_order():
    """optree's dict-order mode is process-wide; checks on several threads must not switch
    it off under each other (the names would then sit on the wrong leaves)."""
    from concurrent.futures import ThreadPoolExecutor

    tree = {"z": {"y": np.ones(1), "b": np.ones(2)}, "a": [np.ones(3), {"w": np.ones(4), "c": np.ones(5)}]}
    expected = ("z.y", "z.b", "a[0]", "a[1].w", "a[1].c")

    def flatten(_):
        parsed = flatten_tree(tree)
        return parsed.names, tuple(leaf.size for leaf in parsed.leaves)

    with ThreadPoolExecutor(4) as pool:
        results = set(pool.map(flatten, range(400)))
    assert results == {(expected, (1, 2, 3, 4, 5))}
