"""Backends: a name or module → an array-API namespace and a device; moving arrays there.

This is the only module that knows concrete array libraries. Frameworks are imported
lazily, only when named or when an input array already belongs to them, so a broken CuPy
install (no driver) can never break ``import gcbackend``. Conversion to host NumPy happens
here and nowhere else.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat

from .errors import BackendUnavailableError, InputError, InputTypeError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "host_add_at",
    "host_max_at",
    "host_min_at",
    "host_namespace",
    "host_norm",
    "host_quiet",
    "is_array",
    "is_meta",
    "resolve",
    "to_backend",
    "to_host",
]

# name → (module to import, pip extra that provides it)
_KNOWN: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "numpy"),
    "cupy": ("cupy", "gcbackend[cuda12]' or 'gcbackend[cuda13]"),
    "torch": ("torch", "gcbackend[torch]"),
    "jax": ("jax.numpy", "gcbackend[jax]"),
    "array_api_strict": ("array_api_strict", "gcbackend[test]"),
    "dask": ("dask.array", "gcbackend[dask]"),
}
BACKEND_NAMES: tuple[str, ...] = tuple(_KNOWN)
_ALIASES = {"np": "numpy", "cp": "cupy", "pytorch": "torch", "array-api-strict": "array_api_strict"}


@dataclass(frozen=True)
class Backend:
    """A resolved backend: the array-API namespace ``xp``, the ``device`` and a short name."""

    name: str
    xp: ModuleType
    device: Any

    def __str__(self) -> str:
        return f"{self.name} ({self.device})"


def is_array(x: object) -> bool:
    """True for an array of any library array-api-compat knows (not for Python numbers)."""
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (bool, int, float, complex))


def is_meta(x: object) -> bool:
    """True for an array with a shape and a dtype but no values: a PyTorch ``meta`` tensor."""
    return array_api_compat.is_torch_array(x) and x.device.type == "meta"


def _import_backend(name: str) -> ModuleType:
    module_name, extra = _KNOWN[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        label = {"cupy": "CuPy", "torch": "PyTorch", "jax": "JAX", "dask": "Dask"}.get(name, name)
        raise BackendUnavailableError(
            f"backend={name!r}: {label} is not installed (pip install '{extra}'): {exc}"
        ) from exc
    if name == "cupy":
        _require_cuda_device(module)
    return _namespace_of_module(module)


_NAMESPACES: dict[ModuleType, ModuleType] = {}


def _namespace_of_module(module: ModuleType) -> ModuleType:
    """The array-API namespace array-api-compat gives a tiny probe array of ``module``: the
    one every numerical module will use (it wraps the libraries that are not themselves
    standard-compliant). Remembered per module: probing costs more than a small check's
    arithmetic (the import itself is looked up every time, so a library hidden from
    ``sys.modules`` is still reported as missing)."""
    if module not in _NAMESPACES:
        _NAMESPACES[module] = array_api_compat.array_namespace(module.asarray(0.0))
    return _NAMESPACES[module]


def _require_cuda_device(cupy: ModuleType) -> None:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing driver library (OSError)
        raise BackendUnavailableError(
            f"backend='cupy': CuPy is installed but no CUDA device is usable: {exc}. "
            "Use backend='numpy' on this machine, or install the NVIDIA driver."
        ) from exc
    if count < 1:
        raise BackendUnavailableError(
            "backend='cupy': CuPy is installed but no CUDA device is usable: "
            "cudaGetDeviceCount() returned 0. Use backend='numpy' on this machine."
        )


def _name_of(xp: ModuleType) -> str:
    for name, test in (
        ("numpy", array_api_compat.is_numpy_namespace),
        ("cupy", array_api_compat.is_cupy_namespace),
        ("torch", array_api_compat.is_torch_namespace),
        ("jax", array_api_compat.is_jax_namespace),
        ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
        ("dask", array_api_compat.is_dask_namespace),
    ):
        if test(xp):
            return name
    return getattr(xp, "__name__", "array-api")


def _namespace_of(arrays: list[Any], what: str) -> ModuleType | None:
    if not arrays:
        return None
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        libraries = sorted({type(a).__module__.split(".")[0] for a in arrays})
        raise InputTypeError(
            f"{what} mix arrays of several libraries ({', '.join(libraries)}); pass arrays of "
            "one library, or name the one to use with backend=... and gcbackend moves them"
        ) from exc


def resolve(backend: object, arrays: list[Any], device: object = None) -> Backend:
    """Resolve ``backend`` (a name, a namespace module or None) and the device to use.

    With ``backend=None`` the namespace is inferred from ``arrays`` (NumPy when there are
    none, e.g. Python numbers only). The device is ``device`` if given, else the device the
    input arrays share when they already live in that namespace, else the namespace's
    default. Raises BackendUnavailableError (not installed, no CUDA device) or InputError
    (unknown name, mixed libraries, arrays on several devices).
    """
    if backend is None:
        xp = _namespace_of(arrays, "params, grads and args") or _import_backend("numpy")
    elif isinstance(backend, str):
        name = _ALIASES.get(backend.lower(), backend.lower())
        if name not in _KNOWN:
            raise InputError(
                f"backend={backend!r} is unknown; valid names: {', '.join(BACKEND_NAMES)}, "
                "or pass a namespace module (e.g. numpy, cupy, torch) or None to infer it"
            )
        xp = _import_backend(name)
    elif isinstance(backend, ModuleType):
        try:
            xp = _namespace_of_module(backend)
        except Exception as exc:
            raise InputError(
                f"backend={backend.__name__!r} is not an array-API namespace array-api-compat "
                f"knows; valid names: {', '.join(BACKEND_NAMES)}"
            ) from exc
    else:
        raise InputTypeError(
            f"backend must be a name ({', '.join(BACKEND_NAMES)}), a namespace module or None, "
            f"not {type(backend).__name__}"
        )

    if device is None:
        devices = []
        for a in _native(arrays, xp):
            d = array_api_compat.device(a)
            if d not in devices:
                devices.append(d)
        if len(devices) > 1:
            raise InputError(
                f"params, grads and args live on several devices ({', '.join(map(str, devices))});"
                " move them to one, or pass device=... and gcbackend copies them there"
            )
        device = devices[0] if devices else array_api_compat.device(xp.asarray(0.0))
    return Backend(_name_of(xp), xp, device)


_SPACES: dict[tuple[type, Any], ModuleType] = {}


def namespace(x: Any) -> ModuleType:
    """``array_api_compat.array_namespace(x)`` for one array, remembered per (type, dtype):
    the namespace follows from those two (the dtype because a NumPy array of JAX's float0
    belongs to JAX), and the lookup costs more than a small array's arithmetic."""
    key = (type(x), x.dtype)
    if key not in _SPACES:
        _SPACES[key] = array_api_compat.array_namespace(x)
    return _SPACES[key]


def _native(arrays: list[Any], xp: ModuleType) -> list[Any]:
    """The arrays that already belong to ``xp``."""
    return [a for a in arrays if namespace(a) is xp]


def to_host(x: Any) -> Any:
    """A NumPy copy-free view (or copy, off-host) of any supported array, for conversion."""
    import numpy as np  # host conversion lives here and only here

    if isinstance(x, np.ndarray) or isinstance(x, (np.generic, bool, int, float, complex)):
        return np.asarray(x)
    if array_api_compat.is_torch_array(x):
        import torch  # the array's own library: imported already

        x = x.detach().cpu()
        # NumPy has no bfloat16; float32 holds every bfloat16 exactly.
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_dask_array(x):
        return np.asarray(x.compute())
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        # array-api-strict refuses __array__ off its CPU device; DLPack works on all of them.
        return np.from_dlpack(x)
    return np.asarray(x)


def host_namespace() -> ModuleType:
    """The array-API namespace of host NumPy arrays (``to_host``'s results): the estimate and the
    judge compute on the host, over O(N) numbers the evaluation brought back in one transfer per
    stage, whatever library evaluated the cost."""
    import numpy as np

    return _namespace_of_module(np)


def host_add_at(out: Any, index: Any, value: Any) -> None:
    """``out[index] += value`` on host arrays, repeated indices counted (the standard has no
    scatter-add; the estimate groups its candidates by probe with it)."""
    import numpy as np

    np.add.at(out, index, value)


def host_min_at(out: Any, index: Any, value: Any) -> None:
    """``out[index] = minimum(out[index], value)`` on host arrays, repeated indices included."""
    import numpy as np

    np.minimum.at(out, index, value)


def host_max_at(out: Any, index: Any, value: Any) -> None:
    """``out[index] = maximum(out[index], value)`` on host arrays, repeated indices included."""
    import numpy as np

    np.maximum.at(out, index, value)


def take(x: Any, indices: Any, xp: ModuleType, *, axis: int | None = None) -> Any:
    """``xp.take(x, indices)``, the index computed first where it is a Dask array.

    Dask (2026.8) gives ``take(x, i)`` with a one-element Dask index holding 0 the shape of
    ``x`` instead of (1,); the values compute right, but a reshape of the result fails.
    With a NumPy index the shape is known."""
    if array_api_compat.is_dask_array(indices):
        indices = to_host(indices)
    return xp.take(x, indices) if axis is None else xp.take(x, indices, axis=axis)


def to_backend(x: Any, backend: Backend, *, dtype: Any = None) -> Any:
    """A fresh copy of ``x`` as an array of ``backend`` on its device (never a view of ``x``)."""
    xp = backend.xp
    if is_array(x) and namespace(x) is xp:
        if array_api_compat.is_torch_array(x):
            x = x.detach()
        out = xp.asarray(x, copy=True)
        if array_api_compat.device(out) != backend.device:
            out = array_api_compat.to_device(out, backend.device)
    else:
        host = to_host(x).copy()
        out = xp.asarray(host, device=backend.device)
    if dtype is not None and out.dtype != dtype:
        out = xp.astype(out, dtype)
    return out


def float64_of(xp: ModuleType) -> Any:
    """``xp.float64`` where the namespace has it, else None (JAX without x64), asked of the
    standard's inspection API: creating a float64 array to find out makes JAX warn."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        return info().dtypes(kind="real floating").get("float64")
    wide = getattr(xp, "float64", None)
    return wide if wide is not None and xp.asarray(0.0, dtype=wide).dtype == wide else None


def host_norm(x: Any) -> float:
    """‖x‖₂ of a host array, scale-safe: of x divided by a power of two near max|x| (exact), so
    no square overflows or underflows."""
    xp = host_namespace()
    if x.shape[0] == 0:
        return 0.0
    largest = float(xp.max(xp.abs(x)))
    if not math.isfinite(largest):
        return largest
    if largest == 0:
        return 0.0
    scale = 2.0 ** math.floor(math.log2(largest))
    return scale * float(xp.linalg.vector_norm(x / scale))


def host_quiet() -> Any:
    """A context in which host (NumPy) arithmetic on inf and NaN does not warn: the judge's
    and the staircase's arrays are host arrays, and their non-finite values are handled."""
    import numpy as np

    return np.errstate(all="ignore")


def host_random(seed: int) -> Any:
    """A NumPy ``Generator`` seeded with ``seed``: sampling and random directions are drawn on
    the host (the same numbers on every backend, and never the user's global RNG), then
    moved with ``to_backend``."""
    import numpy as np

    return np.random.default_rng(seed)


_PRIMED: list[bool] = []


def prime_host_allocator() -> None:
    """Once per process: allocate and free ~32 MiB through NumPy, so that glibc's malloc keeps
    the stacked pass's temporaries in the process instead of returning them to the OS.

    glibc serves a block above its mmap threshold (128 KiB at start) with a fresh mapping
    and unmaps it on free; freeing such a block raises the threshold to its size (at most
    32 MiB) and the heap's trim threshold to twice that. Until a program has freed a large
    block, a stacked call whose temporaries pass a few hundred KiB page-faults all of them
    in again at every call. On the 2-core VM of bench/run.py, four interleaved rounds of
    the M model's check (fixed 64 rows per call) took a median of 409 ms with 95,000 page
    faults per check unprimed and 154 ms with 430 primed; with the measured batch sizes
    181 ms against 155 ms. Any NumPy program that has once freed a large array is in this
    state already; the price is up to 64 MiB of freed memory kept in the heap. Elsewhere
    (macOS, musl, Windows) it is one harmless allocation; its pages are never touched.
    """
    if _PRIMED:
        return
    _PRIMED.append(True)
    import numpy as np  # host memory: the allocator NumPy and PyTorch's CPU tensors share

    block = np.empty(4 * 2**20 - 8192)  # just under glibc's 32 MiB cap on the threshold
    del block
