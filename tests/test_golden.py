"""Golden outputs: what the user reads (the demo, the seed-case reports) is pinned as text.

The expected text is in tests/golden/ (see golden_cases.py for the cases and the masking on
backends that round differently). When a change to the output is intended, regenerate with
``.venv/bin/python scripts/regenerate_golden.py`` and review ``git diff tests/golden``.
"""

from __future__ import annotations

import difflib

import pytest
from golden_cases import BITWISE, CASES, GOLDEN, as_numpy, demo, masked

REGENERATE = (
    "if this change to what the user reads is intended, run "
    "`.venv/bin/python scripts/regenerate_golden.py` and review `git diff tests/golden`"
)


def _expected(name: str) -> str:
    path = GOLDEN / f"{name}.txt"
    if not path.exists():
        pytest.fail(f"{path} is missing; {REGENERATE}")
    return path.read_text(encoding="utf-8")


def _compare(actual: str, expected: str, name: str) -> None:
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                f"tests/golden/{name}.txt",
                "now",
            )
        )
        pytest.fail(f"{name} differs from its golden text; {REGENERATE}\n{diff}", pytrace=False)


def test_demo_is_the_golden_text():
    _compare(demo(), _expected("demo"), "demo")


@pytest.mark.parametrize("name", list(CASES))
def test_report_is_the_golden_text(backend, name):
    text = as_numpy(CASES[name](backend.xp, backend.device) + "\n", backend.name, backend.device)
    expected = _expected(name)
    if backend.name in BITWISE:
        _compare(text, expected, name)
    else:
        _compare(masked(text), masked(expected), name)


def test_masking_keeps_words_and_drops_digits():
    line = "b1         (5, 1)  6.000e-01   2.4e-10   fail     (6,)         -0.000140934703  -3.52336758e-05"
    assert masked(line) == "b1 (#, #) # # fail (#,) # #"
    assert masked("  W2[2, 0]: analytic 1.8316033, |error| 0.916") == " W2[#, #]: analytic #, |error| #"
    assert masked("difference = 0.28509315678069896; order=2, 94 cost") == "difference = #; order=#, # cost"
