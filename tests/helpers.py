"""Small helpers shared by the tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device

from gcbackend.backends import to_host


def host(x):
    """A NumPy copy of any backend array."""
    return np.array(to_host(x), copy=True)


def snapshot(tree):
    """Bitwise copies of every array in a mapping (or of one array), to compare later."""
    if isinstance(tree, dict):
        return {k: host(v) for k, v in tree.items()}
    return host(tree)


def assert_bitwise_equal(tree, saved):
    if isinstance(tree, dict):
        assert tree.keys() == saved.keys()
        for k in tree:
            assert_bitwise_equal(tree[k], saved[k])
        return
    now = host(tree)
    assert now.dtype == saved.dtype and now.shape == saved.shape
    assert now.tobytes() == saved.tobytes()


def assert_on(x, backend):
    """x is an array of the backend's namespace, on its device."""
    assert array_namespace(x) is backend.xp
    assert device(x) == backend.device
