"""The outputs pinned by tests/test_golden.py, and how they are made.

Each case is a function of (xp, device) returning the text the user reads; the expected
text lives in ``tests/golden/<case>.txt``, made on NumPy by

    .venv/bin/python scripts/regenerate_golden.py

Regenerate only when a change to what the user reads is intended, and review the change as
``git diff tests/golden`` before committing it.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gcbackend as gc
from gcbackend.models import linear, mlp

GOLDEN = Path(__file__).parent / "golden"

BITWISE = ("numpy", "array_api_strict")
"""Backends whose numbers are NumPy's bit for bit: their text must match exactly (after the
header's backend and device are replaced by NumPy's). Elsewhere (PyTorch, CuPy) a GEMM may
sum in another order and noise-level numbers move in their first digits, so every number is
masked and runs of spaces (the column widths) collapsed: the words, parameters, verdicts and
lines must still match. test_check pins those backends' numbers to rounding."""


def _one_dimensional(x: int) -> Callable[[Any, Any], str]:
    def case(xp: Any, device: Any) -> str:
        theta = xp.asarray(4.0, dtype=xp.float64, device=device)
        grad = xp.asarray(float(x), dtype=xp.float64, device=device)
        return str(gc.check(linear.cost, theta, grad, float(x), **gc.NOTEBOOK))

    return case


def _seed(grads: str, **options: Any) -> Callable[[Any, Any], str]:
    def case(xp: Any, device: Any) -> str:
        X, Y, params = mlp.seed_case(xp=xp, device=device)
        backward = mlp.backward if grads == "correct" else mlp.backward_with_planted_bugs
        return str(gc.check(mlp.cost, params, backward(params, X, Y), X, Y, **options))

    return case


CASES: dict[str, Callable[[Any, Any], str]] = {
    "one_dimensional_x2_notebook": _one_dimensional(2),
    "one_dimensional_x3_notebook": _one_dimensional(3),
    "seed_buggy_notebook": _seed("buggy", **gc.NOTEBOOK),
    "seed_correct_notebook": _seed("correct", **gc.NOTEBOOK),
    "seed_buggy_defaults": _seed("buggy"),
    "seed_correct_defaults": _seed("correct"),
    "seed_buggy_directions": _seed("buggy", mode="directions"),
}


def demo() -> str:
    """What ``gcbackend demo`` prints (NumPy)."""
    from gcbackend.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo"]) == 0
    return out.getvalue()


def as_numpy(text: str, backend: str, device: Any) -> str:
    """``text`` with the header's backend and device replaced by NumPy's."""
    return text.replace(f"backend {backend} on {device}", "backend numpy on cpu")


_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")  # not the 1 of W1


def masked(text: str) -> str:
    """Every number replaced by ``#`` (names such as ``W1`` kept) and runs of spaces
    collapsed to one."""
    return re.sub(r" {2,}", " ", _NUMBER.sub("#", text))
