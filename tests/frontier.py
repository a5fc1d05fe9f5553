"""Shared by the frontier battery, tests/test_frontier_*.py (issue 18's twelve classes).

The battery holds the default path to the promise through the public API only: a correct
gradient never fails, a wrong one never passes, and where a test says so, a verdict is
decisive. Each test also asserts its own truth (exact arithmetic, mpmath, float64 autograd),
so it cannot pass against a wrong reference.

``GCBACKEND_HYPOTHESIS_PROFILE=deep`` searches harder; the seed counts below follow it.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

DEEP = os.environ.get("GCBACKEND_HYPOTHESIS_PROFILE", "fast") == "deep"
VERDICTS = ("pass", "fail", "inconclusive")


def count(fast: int, deep: int) -> int:
    """How many seeds a counted (not Hypothesis-drawn) property runs under the profile."""
    return deep if DEEP else fast


def never_fail(report, context: str = "") -> None:
    assert report.verdict in ("pass", "inconclusive"), f"{context}\n{report}"


def never_pass(report, context: str = "") -> None:
    assert report.verdict in ("fail", "inconclusive"), f"{context}\n{report}"


def passes(report, context: str = "") -> None:
    assert report.verdict == "pass", f"{context}\n{report}"


def fails(report, context: str = "") -> None:
    assert report.verdict == "fail", f"{context}\n{report}"


def on(backend, values, dtype: str = "float64"):
    """A copy of host ``values`` on the backend, in ``dtype``."""
    return backend.xp.asarray(np.asarray(values, dtype=dtype), device=backend.device)


def has_dtype(backend, name: str) -> bool:
    return getattr(backend.xp, name, None) is not None


def formula2(given, true) -> float:
    """Formula (2), ‖given − true‖ / (‖given‖ + ‖true‖), on host float64 copies, scale-safe."""
    a = np.asarray(given, dtype=np.float64).reshape(-1)
    b = np.asarray(true, dtype=np.float64).reshape(-1)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    if scale == 0:
        return 0.0
    a, b = a / scale, b / scale
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)))


NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+))?")


def printed(value: float, text: str) -> bool:
    """Whether ``text`` holds a number that is ``value`` rounded to the digits it shows
    (``1.2e-05``, ``1.2e-5``, ``0.000012`` all print 1.23e-5)."""
    for mantissa, exponent in NUMBER.findall(text):
        digits = len(mantissa.replace(".", "").lstrip("0")) or 1
        shown = float(mantissa + (f"e{exponent}" if exponent else ""))
        if shown > 0 and float(f"{value:.{digits - 1}e}") == shown:
            return True
    return False


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'gcbackend[test]')")


def mpmath_or_skip(digits: int):
    """A private mpmath context at ``digits`` decimal digits (mpmath's global one is left alone)."""
    mpmath = pytest.importorskip("mpmath", reason="mpmath is not installed (the truth of this test needs it)")
    context = mpmath.MPContext()
    context.dps = digits
    return context


def table_end(report) -> int:
    """Index in str(report).splitlines() of the verdict sentence: after the header, the column
    names, the rule, one row per parameter and the 'all' row."""
    return 3 + len(report.parameters) + 1


def coverage(text: str) -> list[tuple[int, int]]:
    """Every "<checked> of <N>" in text."""
    return [(int(a), int(b)) for a, b in re.findall(r"\b(\d+) of (\d+)\b", text)]
