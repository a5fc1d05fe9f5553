"""The demo prints the notebook's story with gcbackend's numbers."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from gcbackend.cli import main


def test_demo_prints_the_notebooks_numbers(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "difference = 2.919335883291695e-10" in out
    assert "difference = 7.814075313343006e-11" in out
    bugged = float(
        re.search(r"There is a mistake in the backward propagation! difference = (\S+)", out).group(1)
    )
    assert bugged == pytest.approx(0.2850931567761623, rel=1e-8)
    fixed = float(re.search(r"(?s)after fixing.*?works perfectly fine! difference = (\S+)", out).group(1))
    assert fixed == pytest.approx(1.1890913024229996e-07, rel=1e-5)
    assert re.search(
        r"Parameters at fault, worst first: b1 \(difference 0\.6\), W2 \(difference 0\.33\)", out
    )
    # gcbackend's defaults: only the planted bugs fail, the fast screen finds both too.
    defaults = out[out.index("# gcbackend's defaults") :]
    assert (
        defaults.count("Parameters at fault, worst first: b1 (difference 0.6), W2 (difference 0.33)\n") == 2
    )
    assert "b3 (difference" not in defaults


def test_demo_on_another_backend(capsys):
    pytest.importorskip("array_api_strict")
    assert main(["demo", "--backend", "array_api_strict", "--mode", "loop"]) == 0
    out = capsys.readouterr().out
    assert "backend array_api_strict" in out and "mode=loop" in out


def test_demo_reports_an_unavailable_backend(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["demo", "--backend", "cupy"]) == 2
    printed = capsys.readouterr()
    assert "CuPy is not installed" in printed.err
    assert printed.out == ""  # no section header before the error


def test_demo_with_jax_missing_prints_only_the_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setitem(sys.modules, "jax.numpy", None)
    assert main(["demo", "--backend", "jax"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("gcbackend: error: ")
    assert printed.err.count("\n") == 1


def test_demo_with_an_unknown_backend_prints_only_the_error(capsys):
    assert main(["demo", "--backend", "tensorflow"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("gcbackend: error: backend='tensorflow' is unknown; valid names: numpy, ")


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == "gcbackend 0.1.0\n"
    out = subprocess.run(
        [sys.executable, "-m", "gcbackend", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == "gcbackend 0.1.0\n"


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "gcbackend", "demo"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "Your backward propagation works perfectly fine!" in out
    assert "There is a mistake in the backward propagation!" in out


def test_demo_on_jax_turns_on_float64(monkeypatch):
    jax = pytest.importorskip("jax")
    import gcbackend.cli as cli

    seen = []
    monkeypatch.setattr(cli, "demo", lambda backend, mode, plot: seen.append(jax.config.jax_enable_x64) or 0)
    before = jax.config.jax_enable_x64
    try:
        assert cli.main(["demo", "--backend", "jax"]) == 0
    finally:
        jax.config.update("jax_enable_x64", before)
    assert seen == [True]  # the notebook's checks are float64; JAX is float32 unless told
