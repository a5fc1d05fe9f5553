"""backends: names, modules and inference resolve; clear errors; copies, never views."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import assert_on, host

import gcbackend as gc
from gcbackend.backends import BACKEND_NAMES, resolve, to_backend, to_host


def test_import_does_not_import_frameworks():
    code = "import sys, gcbackend; print(sorted(m for m in ('cupy', 'torch', 'jax', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(gc.InputError, match="backend='nupmy' is unknown") as info:
        gc.check(lambda p: p * 2.0, 1.0, 2.0, backend="nupmy")
    for name in BACKEND_NAMES:
        assert name in str(info.value)


def test_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # hide it, installed or not
    with pytest.raises(
        gc.BackendUnavailableError, match=r"CuPy is not installed \(pip install 'gcbackend\[cuda12\]"
    ):
        gc.check(lambda p: p * 2.0, 1.0, 2.0, backend="cupy")


def _fake_cupy(count=None, error=None):
    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        if error:
            raise CUDARuntimeError(error)
        return count

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return fake


def test_cupy_installed_without_a_device(monkeypatch):
    message = "cudaErrorNoDevice: no CUDA-capable device is detected"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(error=message))
    with pytest.raises(
        gc.BackendUnavailableError, match="CuPy is installed but no CUDA device is usable"
    ) as info:
        gc.check(lambda p: p * 2.0, 1.0, 2.0, backend="cupy")
    assert message in str(info.value)
    assert isinstance(info.value, ImportError)


def test_cupy_installed_with_zero_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=0))
    with pytest.raises(gc.BackendUnavailableError, match="no CUDA device is usable"):
        resolve("cupy", [])


def test_torch_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(
        gc.BackendUnavailableError, match=r"PyTorch is not installed \(pip install 'gcbackend\[torch\]'\)"
    ):
        resolve("torch", [])


@pytest.mark.cupy
def test_cupy_seed_parity():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        resolve("cupy", [])
    except gc.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    from gcbackend.models import mlp

    X, Y, params = mlp.seed_case()
    report = gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, backend="cupy")
    assert report.difference == pytest.approx(0.2850931567761623, rel=1e-8)
    assert isinstance(report.parameters["W2"].numeric_grad, cupy.ndarray)


def test_module_and_name_resolve_to_the_same_namespace():
    import numpy

    assert resolve(numpy, []).xp is resolve("numpy", []).xp
    assert resolve("NumPy", []).name == "numpy"
    with pytest.raises(gc.InputTypeError, match="backend must be a name"):
        resolve(3, [])


def test_inferred_from_the_arrays(backend):
    x = backend.xp.asarray([1.0, 2.0], device=backend.device)
    resolved = resolve(None, [x])
    assert resolved.xp is backend.xp and resolved.device == backend.device
    assert resolve(None, []).name == "numpy"


def test_to_backend_copies(backend):
    source = np.arange(6.0).reshape(2, 3)
    moved = to_backend(source, backend)
    assert_on(moved, backend)
    source[0, 0] = 100.0
    assert host(moved)[0, 0] == 0.0
    native = backend.xp.asarray([1.0, 2.0], device=backend.device)
    again = to_backend(native, backend)
    assert again is not native
    assert host(again).tolist() == [1.0, 2.0]


def test_to_host_round_trip(backend):
    x = backend.xp.asarray([[1.5, -2.0]], dtype=backend.xp.float64, device=backend.device)
    out = to_host(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.tolist() == [[1.5, -2.0]]


def test_mixed_libraries_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(gc.InputTypeError, match="mix arrays of several libraries"):
        gc.check(lambda p, x: p * x, np.asarray(1.0), np.asarray(2.0), torch.asarray(2.0))


def test_mixed_libraries_accepted_with_a_named_backend():
    torch = pytest.importorskip("torch")
    from gcbackend.models import linear

    report = gc.check(linear.cost, np.asarray(4.0), torch.asarray(2.0), 2.0, backend="numpy", **gc.NOTEBOOK)
    assert report.difference == 2.919335883291695e-10


def test_two_devices_refused():
    strict = pytest.importorskip("array_api_strict")
    a = strict.asarray(1.0)
    b = strict.asarray(2.0, device=strict.Device("device1"))
    with pytest.raises(gc.InputError, match="several devices"):
        gc.check(lambda p, x: p * x, a, a, b)
    report = gc.check(lambda p, x: p * x, a, b, b, device=strict.Device("device1"))
    assert report.device == str(strict.Device("device1"))


def test_a_check_primes_the_host_allocator_once_and_imports_no_framework():
    # The priming is one NumPy allocation per process: after a check the flag is set, and a
    # check on NumPy still imports neither CuPy nor PyTorch.
    code = (
        "import sys, gcbackend as gc; from gcbackend import backends; "
        "assert not backends._PRIMED; gc.check(lambda t, x: t * x, 4.0, 2.0, 2.0); "
        "print(backends._PRIMED, [m for m in ('cupy', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[True] []"


def test_jax_without_float64_says_so_in_the_report():
    """JAX's float64 is a process-wide switch the other tests turn on: checked in a child."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    script = (
        "import numpy as np, jax.numpy as jnp, gcbackend as gc\n"
        "W = np.array([[0.5, -0.25], [0.125, 1.0]])\n"
        "r = gc.check(lambda W: jnp.sum(W * W), W, 2 * W, backend='jax')\n"
        "print(r.notes[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "JAX runs without float64 here (jax_enable_x64 is off): everything was evaluated in float32, "
        "float64 inputs too; for float64, run jax.config.update('jax_enable_x64', True) before creating arrays"
    )
