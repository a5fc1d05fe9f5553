"""One fixture, ``backend``, runs every numerical test on every available backend/device.

Select with ``GCBACKEND_TEST_BACKENDS`` (comma-separated ids, like SciPy's
``SCIPY_ARRAY_API`` and einops' ``EINOPS_TEST_BACKENDS``); the default is every id below.
array-api-strict refuses anything outside the standard, and its ``device1`` catches arrays
left on the wrong device: code that passes there and on NumPy runs on CuPy.

Hypothesis profiles: ``fast`` (the default, and CI) runs a few derandomised examples per
property so the suite stays within a couple of minutes on 2 cores; ``deep`` searches for
real: ``GCBACKEND_HYPOTHESIS_PROFILE=deep scripts/test.sh -k properties``.
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import settings

from gcbackend.backends import Backend, resolve
from gcbackend.errors import BackendUnavailableError

pytest_plugins = ["pytester"]  # test_testing runs a failing test in a child pytest

settings.register_profile("fast", max_examples=8, deadline=None, derandomize=True)
settings.register_profile("deep", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("GCBACKEND_HYPOTHESIS_PROFILE", "fast"))

ALL_IDS = ("numpy", "array_api_strict", "array_api_strict:device1", "torch", "cupy")


def _selected() -> tuple[str, ...]:
    raw = os.environ.get("GCBACKEND_TEST_BACKENDS", "")
    ids = tuple(s.strip() for s in raw.split(",") if s.strip()) or ALL_IDS
    unknown = set(ids) - set(ALL_IDS)
    if unknown:
        raise pytest.UsageError(
            f"GCBACKEND_TEST_BACKENDS names unknown ids {sorted(unknown)}; valid: {ALL_IDS}"
        )
    return ids


def make_backend(backend_id: str) -> Backend:
    """The Backend for a test id, or pytest.skip with the reason it is unavailable."""
    name, _, device_name = backend_id.partition(":")
    try:
        backend = resolve(name, [])
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend_id}: {exc}")
    if device_name:
        strict = importlib.import_module("array_api_strict")
        backend = Backend(backend.name, backend.xp, strict.Device(device_name))
    return backend


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        ids = _selected()
        marks = {"cupy": [pytest.mark.cupy]}
        metafunc.parametrize(
            "backend_id", [pytest.param(i, id=i, marks=marks.get(i, [])) for i in ids], scope="session"
        )


@pytest.fixture(scope="session")
def backend(backend_id: str) -> Backend:
    return make_backend(backend_id)


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    # "cupy: CuPy is not installed …" and "array_api_strict:device1: …" group by the reason.
    head, _, rest = reason.partition(": ")
    return rest if rest and head in ALL_IDS else reason


def pytest_terminal_summary(terminalreporter) -> None:
    """One line for all skips, grouped by reason (pytest's -rs prints one line per test)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts: dict[str, int] = {}
    for report in skipped:
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    grouped = "; ".join(f"{n} × {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    terminalreporter.write_line(f"skipped {len(skipped)}: {grouped}")
