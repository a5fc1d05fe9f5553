"""Test helpers: gradient checks as pytest assertions.

```python
from gcbackend.testing import assert_gradients

def test_my_layer_backprop():
    assert_gradients(my_cost, params, my_backward(params, X, Y), X, Y)
```

A failing check fails the test with a first line that names the parameters at fault and
their differences (what pytest's one-line summary shows), then the whole report: which
parameters are wrong, where, and by how much.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .check import check
from .report import Report

__all__ = ["assert_gradients"]


def assert_gradients(
    cost: Callable[..., Any],
    params: Mapping[str, Any] | Any,
    grads: Mapping[str, Any] | Any,
    *args: Any,
    **kw: Any,
) -> Report:
    """``gcbackend.check(cost, params, grads, *args, **kw)``, raising if it does not pass.

    Returns the report when ``report.passed``; otherwise raises ``AssertionError`` whose
    message is ``"gradient check " + report.summary()`` (e.g. ``gradient check fail: b1
    (difference 0.6), W2 (difference 0.33)``), a blank line, and ``str(report)``. Bad input raises ``gcbackend``'s own errors
    (``InputError``, ``CostError``, …), not ``AssertionError``: a broken test is not a wrong
    gradient.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    report = check(cost, params, grads, *args, **kw)
    if not report.passed:
        raise AssertionError(f"gradient check {report.summary()}\n\n{report}")
    return report
