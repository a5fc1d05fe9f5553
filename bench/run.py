"""Benchmark a full gradient check: gcbackend against the notebook loop, its peers and the FLOP floor.

What is measured
    The wall time of checking ALL N coordinates of a ReLU MLP (LINEAR→RELU→…→SIGMOID, mean
    BCE, float64, correct backprop from ``mlp.backward``) by central differences, i.e. 2N cost
    evaluations, at three sizes:

    * S: the notebook's seed case 4-5-3-1, m=3 (``mlp.seed_case()``), N = 47;
    * M: 64-32-16-1, m=128 (``mlp.random_case``), N = 2,625;
    * L: 256-128-64-1, m=64 (``mlp.random_case``), N = 41,217.

    Rows: ``gcbackend stacked`` (``gc.check`` at the notebook's ε = 1e-7 and threshold 2e-7:
    2N evaluations, the same work as every peer; the reference of every ratio), ``gcbackend
    loop`` (the same with ``mode="loop"``), ``gcbackend stacked, defaults`` (``gc.check`` with
    its default options; the note gives its evaluation count when it is not 2N), ``gcbackend
    stacked, workers=-1`` (the reference's options, chunks on one thread per CPU), ``notebook
    loop`` (the notebook's ``gradient_check_n`` in plain NumPy), ``PyTorch gradcheck`` (slow
    mode, eps=1e-6, MLP written in torch; its result is a bool), ``JAX jit(vmap)`` (central
    differences by ``jit(vmap(cost))`` over chunks of the stacked perturbed θ matrix, x64),
    ``SciPy approx_derivative 3-point`` and ``numdifftools fixed step`` (both on a flat-θ
    NumPy cost), and ``floor``: 2N forward passes at the float64 GEMM rate measured in the
    same run (2·m·Σ n_l·n_{l-1} FLOPs per forward). Every finite-difference method with a
    free step uses the notebook's ε = 1e-7.

How
    * Each (method, size) runs in a fresh subprocess (``--worker``), so imports, caches and
      allocator state never leak from one row into the next.
    * One warm-up call, then the median of the timed calls (``--repeats``, default 5, 1 with
      ``--quick``). Judged by the first timed call (the warm-up may include JIT compilation),
      calls under 50 ms are repeated up to 100 times, calls over 5 s at most 3 times, over
      60 s once (except the reference); fewer than 3 timed calls are named in the note
      column. Each row records the 1-minute load average and a hash of gcbackend/ (the
      machine is shared; the library may be edited while the bench runs). On
      ``--backend cupy`` the clock stops after ``cupy.cuda.Device().synchronize()``.
    * A peer whose one full run would exceed ~60 s (estimated, where N ≥ 10,000, from a probe
      of 256 coordinates, median of 3) is timed on an evenly spread subset of coordinates
      (~20 s) and extrapolated linearly to N; the note column says so, and its difference is
      over that subset. With ``--quick``: over ~3 s (N ≥ 1,000, one probe call), subset ~1 s.
      gcbackend rows are always timed on all N coordinates.
    * Peak memory: the worker subprocess's peak resident set (VmHWM of /proc/self/status on
      Linux, which unlike ``ru_maxrss`` does not inherit the parent's RSS across fork+exec;
      ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` elsewhere), MiB, including the interpreter
      and imported libraries; ``(+Δ)`` is the growth over the peak once the libraries are
      imported and the case is built, i.e. what the check itself added.
    * Difference: formula (2), ‖grad − gradapprox‖ / (‖grad‖ + ‖gradapprox‖), of the method's
      numbers against ``mlp.backward``; PyTorch gradcheck only answers pass/fail.
    * GEMM rate: median GFLOP/s of a 1024×1024 float64 matmul on the chosen backend, sampled
      before and after the rows.

Usage: ``python bench/run.py [--sizes S,M,L] [--backend numpy|cupy|torch] [--quick]
[--repeats K] [--out PATH]``. Prints a table; writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EPSILON = 1e-7  # the notebook's ε, for every method whose step is free
TORCH_EPS = 1e-6  # torch.autograd.gradcheck's default
CHUNK_BUDGET = 256 * 2**20  # bytes of perturbed θ rows per JAX chunk (gcbackend's default budget)
PROBE_COORDS = 256


@dataclass(frozen=True)
class Extrapolation:
    """When a peer is timed on a subset of coordinates instead of all N."""

    limit_s: float  # a peer whose one full run would take longer is timed on a subset
    target_s: float  # ... of about this many seconds
    min_n: int  # below this N, no probe (no peer comes near limit_s)
    probe_calls: int  # timed probe calls (median)


FULL = Extrapolation(limit_s=60.0, target_s=20.0, min_n=10_000, probe_calls=3)
QUICK = Extrapolation(limit_s=3.0, target_s=1.0, min_n=1_000, probe_calls=1)
FAST_CALL_S, FAST_TOTAL_S, FAST_MAX_REPEATS = 0.05, 0.5, 100
SLOW_CALL_S, SLOW_REPEATS = 5.0, 3
SLOWEST_CALL_S = 60.0  # a first timed call longer than this: the only one
WORKER_TIMEOUT_S = 3600
GEMM_N, GEMM_SAMPLES = 1024, 7
MARK = "BENCH-RESULT "
REFERENCE = "gcbackend stacked"  # the row every ratio divides by


@dataclass(frozen=True)
class Size:
    name: str
    dims: tuple[int, ...]
    m: int

    @property
    def n_params(self) -> int:
        return sum(n_out * n_in + n_out for n_in, n_out in zip(self.dims, self.dims[1:]))

    @property
    def forward_flops(self) -> int:
        return 2 * self.m * sum(n_out * n_in for n_in, n_out in zip(self.dims, self.dims[1:]))

    @property
    def label(self) -> str:
        return f"{self.name}: {'-'.join(map(str, self.dims))}, m={self.m}"


SIZES = {
    "S": Size("S", (4, 5, 3, 1), 3),
    "M": Size("M", (64, 32, 16, 1), 128),
    "L": Size("L", (256, 128, 64, 1), 64),
}


# --------------------------------------------------------------------------- the case


@dataclass
class Case:
    """Host (NumPy) data of one size: X, Y, params, θ and the backprop gradient, flattened."""

    size: Size
    X: np.ndarray
    Y: np.ndarray
    params: dict[str, np.ndarray]
    theta: np.ndarray
    grad: np.ndarray

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: p.shape for name, p in self.params.items()}


def make_case(size: Size, xp: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    from gcbackend.models import mlp

    if size.name == "S":
        return mlp.seed_case(xp=xp)
    return mlp.random_case(size.dims, size.m, seed=0, xp=xp)


def host_case(size: Size) -> Case:
    from gcbackend.models import mlp

    X, Y, params = make_case(size)
    grads = mlp.backward(params, X, Y)
    return Case(size, X, Y, params, flatten(params), flatten(grads))


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The notebook's dictionary_to_vector order: W1, b1, W2, …, each row-major."""
    return np.concatenate([np.reshape(a, (-1,)) for a in arrays.values()])


def spread(n: int, k: int) -> np.ndarray:
    """k coordinates evenly spread over 0..n-1 (so every tensor is represented)."""
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def difference(grad: np.ndarray, approx: np.ndarray) -> float:
    """Formula (2)."""
    approx = np.reshape(np.asarray(approx, dtype=np.float64), (-1,))
    numerator = np.linalg.norm(grad - approx)
    return float(numerator / (np.linalg.norm(grad) + np.linalg.norm(approx)))


def on_subset(f: Callable, theta: np.ndarray, coords: np.ndarray | None) -> tuple[Callable, np.ndarray]:
    """f restricted to the coordinates ``coords`` of θ (the others held at θ)."""
    if coords is None:
        return f, theta

    def g(z: np.ndarray) -> float:
        full = theta.copy()
        full[coords] = z
        return f(full)

    return g, theta[coords]


# --------------------------------------------------------------------------- the notebook, in NumPy


def vector_to_dictionary(theta: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """gc_utils.vector_to_dictionary, generalised from the seed case's fixed shapes."""
    parameters, start = {}, 0
    for name, shape in shapes.items():
        stop = start + math.prod(shape)
        parameters[name] = theta[start:stop].reshape(shape)
        start = stop
    return parameters


def forward_propagation_n(X: np.ndarray, Y: np.ndarray, parameters: dict[str, np.ndarray]) -> tuple:
    """The notebook's forward_propagation_n (LINEAR→RELU→…→LINEAR→SIGMOID, mean BCE)."""
    m = X.shape[1]
    A = X
    layers = len(parameters) // 2
    for layer in range(1, layers + 1):
        Z = np.dot(parameters[f"W{layer}"], A) + parameters[f"b{layer}"]
        A = np.maximum(0, Z) if layer < layers else 1 / (1 + np.exp(-Z))
    log_probs = np.multiply(-np.log(A), Y) + np.multiply(-np.log(1 - A), 1 - Y)
    cost = 1.0 / m * np.sum(log_probs)
    return cost, None


def gradient_check_n(case: Case, epsilon: float, coords: np.ndarray | None) -> np.ndarray:
    """The notebook's gradient_check_n loop: copy θ, perturb one element, unflatten, forward."""
    parameters_values = np.reshape(case.theta, (-1, 1))
    num_parameters = parameters_values.shape[0]
    J_plus = np.zeros((num_parameters, 1))
    J_minus = np.zeros((num_parameters, 1))
    gradapprox = np.zeros((num_parameters, 1))
    for i in range(num_parameters) if coords is None else coords:
        theta_plus = np.copy(parameters_values)
        theta_plus[i][0] += epsilon
        J_plus[i], _ = forward_propagation_n(case.X, case.Y, vector_to_dictionary(theta_plus, case.shapes))
        theta_minus = np.copy(parameters_values)
        theta_minus[i][0] -= epsilon
        J_minus[i], _ = forward_propagation_n(case.X, case.Y, vector_to_dictionary(theta_minus, case.shapes))
        gradapprox[i] = (J_plus[i] - J_minus[i]) / (2 * epsilon)
    return gradapprox[:, 0] if coords is None else gradapprox[coords, 0]


def flat_cost(case: Case) -> Callable[[np.ndarray], float]:
    return lambda theta: forward_propagation_n(case.X, case.Y, vector_to_dictionary(theta, case.shapes))[0]


# --------------------------------------------------------------------------- methods
# setup(case, backend, coords) -> (call, summarise, sync, device)


def _numbers(case: Case, coords: np.ndarray | None) -> Callable[[Any], dict]:
    grad = case.grad if coords is None else case.grad[coords]
    return lambda approx: {"difference": difference(grad, approx)}


def _no_sync() -> None:
    return None


def _backend_sync(backend: str) -> Callable[[], None]:
    if backend == "cupy":
        import cupy

        return lambda: cupy.cuda.Device().synchronize()
    return _no_sync


NOTEBOOK_OPTIONS = {"epsilon": EPSILON, "threshold": 2e-7}
"""The notebook's ε and threshold: a check of 2N evaluations, the same work as every peer."""


def setup_gcbackend(options: dict[str, Any]) -> Callable:
    def setup(case: Case, backend: str, coords: np.ndarray | None):
        import gcbackend as gc
        from gcbackend.models import mlp

        X, Y, params = make_case(case.size, None if backend == "numpy" else backend)
        grads = mlp.backward(params, X, Y)

        def call():
            return gc.check(mlp.cost, params, grads, X, Y, backend=backend, **options)

        def summarise(report):
            evaluations = getattr(report, "evaluations", None)
            return {
                "difference": report.difference,
                "passed": bool(report.passed),
                "evaluations": evaluations,
            }

        return call, summarise, _backend_sync(backend), f"{backend} {getattr(X, 'device', 'cpu')}"

    return setup


def setup_notebook(case: Case, backend: str, coords: np.ndarray | None):
    return lambda: gradient_check_n(case, EPSILON, coords), _numbers(case, coords), _no_sync, "numpy cpu"


def _torch_cost(torch: Any, X: Any, Y: Any) -> Callable:
    def cost(params: dict[str, Any]) -> Any:
        A, layers = X, len(params) // 2
        for layer in range(1, layers + 1):
            Z = params[f"W{layer}"] @ A + params[f"b{layer}"]
            A = torch.relu(Z) if layer < layers else torch.sigmoid(Z)
        log_probs = -torch.log(A) * Y + -torch.log(1 - A) * (1 - Y)
        return log_probs.sum() / X.shape[1]

    return cost


def setup_gradcheck(case: Case, backend: str, coords: np.ndarray | None):
    import torch

    device = "cuda" if backend == "cupy" and torch.cuda.is_available() else "cpu"
    cost = _torch_cost(torch, torch.as_tensor(case.X, device=device), torch.as_tensor(case.Y, device=device))
    if coords is None:
        names = list(case.params)
        inputs = tuple(torch.tensor(p, device=device, requires_grad=True) for p in case.params.values())

        def f(*tensors):
            return cost(dict(zip(names, tensors)))

    else:
        base = torch.as_tensor(case.theta, device=device)
        index = torch.as_tensor(coords, device=device)
        inputs = (base[index].clone().requires_grad_(True),)

        def f(z):
            full = base.index_copy(0, index, z)
            return cost({k: full[s].reshape(shape) for k, (s, shape) in _slices(case.shapes).items()})

    def call():
        return torch.autograd.gradcheck(
            f, inputs, eps=TORCH_EPS, atol=1e-5, rtol=1e-3, raise_exception=False, fast_mode=False
        )

    sync = torch.cuda.synchronize if device == "cuda" else _no_sync
    return call, lambda ok: {"difference": None, "passed": bool(ok)}, sync, f"torch {device}"


def _slices(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[slice, tuple[int, ...]]]:
    out, start = {}, 0
    for name, shape in shapes.items():
        stop = start + math.prod(shape)
        out[name] = (slice(start, stop), shape)
        start = stop
    return out


def setup_jax(case: Case, backend: str, coords: np.ndarray | None):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    X, Y, theta = jnp.asarray(case.X), jnp.asarray(case.Y), jnp.asarray(case.theta)
    n, slices = theta.shape[0], _slices(case.shapes)

    def cost(t):
        A, layers = X, len(slices) // 2
        for layer in range(1, layers + 1):
            (ws, wshape), (bs, bshape) = slices[f"W{layer}"], slices[f"b{layer}"]
            Z = t[ws].reshape(wshape) @ A + t[bs].reshape(bshape)
            A = jnp.maximum(Z, 0) if layer < layers else 1 / (1 + jnp.exp(-Z))
        return jnp.sum(-jnp.log(A) * Y + -jnp.log(1 - A) * (1 - Y)) / X.shape[1]

    @jax.jit
    def differences(t, index):
        step = jax.nn.one_hot(index, n, dtype=t.dtype) * EPSILON  # rows of ε·e_i: θ ± step is exact
        return (jax.vmap(cost)(t + step) - jax.vmap(cost)(t - step)) / (2 * EPSILON)

    wanted = np.arange(n) if coords is None else coords
    chunks = _chunk_indices(wanted, max(1, CHUNK_BUDGET // (2 * n * 8)))
    device_chunks = [jnp.asarray(c) for c in chunks]

    def call():
        outs = [differences(theta, c) for c in device_chunks]
        return np.concatenate([np.asarray(o) for o in outs])[: len(wanted)]

    device = jax.devices()[0]
    return call, _numbers(case, coords), _no_sync, f"jax {device.platform}, chunk {len(chunks[0])}"


def _chunk_indices(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """Equal chunks (the last padded by repetition) so jit compiles one shape only."""
    size = min(size, len(indices))
    pad = -len(indices) % size
    padded = np.concatenate([indices, np.full(pad, indices[-1])])
    return list(padded.reshape(-1, size))


def setup_scipy(case: Case, backend: str, coords: np.ndarray | None):
    from scipy.optimize._numdiff import approx_derivative

    f, x0 = on_subset(flat_cost(case), case.theta, coords)

    def call():
        return approx_derivative(f, x0, method="3-point", abs_step=EPSILON)

    return call, _numbers(case, coords), _no_sync, "numpy cpu"


def setup_numdifftools(case: Case, backend: str, coords: np.ndarray | None):
    import numdifftools as nd

    f, x0 = on_subset(flat_cost(case), case.theta, coords)
    gradient = nd.Gradient(f, step=EPSILON, method="central")  # a fixed step: 2N+1 evaluations
    return lambda: gradient(x0), _numbers(case, coords), _no_sync, "numpy cpu"


@dataclass(frozen=True)
class Method:
    name: str
    setup: Callable
    requires: tuple[str, ...] = ()
    subset: bool = True  # can be timed on a subset of coordinates and extrapolated
    on_backend: bool = False  # runs on --backend (so imports it)

    def modules(self, backend: str) -> tuple[str, ...]:
        return (*self.requires, backend) if self.on_backend and backend != "numpy" else self.requires


METHODS = [
    Method("gcbackend stacked", setup_gcbackend(NOTEBOOK_OPTIONS), subset=False, on_backend=True),
    Method(
        "gcbackend loop", setup_gcbackend({**NOTEBOOK_OPTIONS, "mode": "loop"}), subset=False, on_backend=True
    ),
    Method("gcbackend stacked, defaults", setup_gcbackend({}), subset=False, on_backend=True),
    Method(
        "gcbackend stacked, workers=-1",
        setup_gcbackend({**NOTEBOOK_OPTIONS, "workers": -1}),
        subset=False,
        on_backend=True,
    ),
    Method("notebook loop", setup_notebook),
    Method("PyTorch gradcheck", setup_gradcheck, ("torch",)),
    Method("JAX jit(vmap)", setup_jax, ("jax", "jaxlib")),
    Method("SciPy approx_derivative 3-point", setup_scipy, ("scipy",)),
    Method("numdifftools fixed step", setup_numdifftools, ("numdifftools",)),
]
METHODS_BY_NAME = {m.name: m for m in METHODS}


# --------------------------------------------------------------------------- the worker


def maxrss_mib() -> float:
    """This process's peak resident set, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image only
    (ru_maxrss would carry the parent's RSS over fork+exec). Elsewhere: ru_maxrss.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def timed(call: Callable, sync: Callable) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    sync()
    return time.perf_counter() - start, result


def plan_coordinates(
    method: Method, case: Case, backend: str, rule: Extrapolation
) -> tuple[np.ndarray | None, str]:
    """All coordinates, or a spread subset when one full run would pass ``rule.limit_s``."""
    n = case.theta.shape[0]
    if not method.subset or n < rule.min_n:
        return None, ""
    probe = spread(n, PROBE_COORDS)
    call, _, sync, _ = method.setup(case, backend, probe)
    timed(call, sync)  # warm-up (JIT compilation)
    estimate = statistics.median(timed(call, sync)[0] for _ in range(rule.probe_calls)) * n / len(probe)
    if estimate <= rule.limit_s:
        return None, ""
    k = max(PROBE_COORDS, int(n * rule.target_s / estimate))
    coords = spread(n, k)
    return coords, f"timed on {len(coords)} of {n} coords, extrapolated x{n / len(coords):.1f}"


def repeats_for(first_s: float, repeats: int, reference: bool) -> int:
    """How many timed calls in all, judged by the first one."""
    if first_s < FAST_CALL_S:
        return max(repeats, min(FAST_MAX_REPEATS, int(FAST_TOTAL_S / max(first_s, 1e-6))))
    if first_s > SLOWEST_CALL_S and not reference:
        return 1
    return repeats if first_s < SLOW_CALL_S else min(repeats, SLOW_REPEATS)


def run_worker(spec: dict) -> dict:
    method, size = METHODS_BY_NAME[spec["method"]], SIZES[spec["size"]]
    backend, row = spec["backend"], {"method": method.name, "size": size.name, "N": size.n_params}
    try:
        for module in method.modules(backend):
            importlib.import_module(module)
        case = host_case(size)
        baseline = maxrss_mib()  # before the probe, which does the same work on fewer coordinates
        coords, note = plan_coordinates(method, case, backend, QUICK if spec.get("quick") else FULL)
        call, summarise, sync, device = method.setup(case, backend, coords)
    except ImportError as exc:
        return {**row, "status": "not installed", "note": f"not installed ({exc})"}
    warm_s, _ = timed(call, sync)
    first_s, result = timed(call, sync)  # sets the count: the warm-up may include JIT compilation
    times = [first_s]
    for _ in range(repeats_for(first_s, spec["repeats"], method.name == REFERENCE) - 1):
        elapsed, result = timed(call, sync)
        times.append(elapsed)
    scale = 1.0 if coords is None else size.n_params / len(coords)
    if len(times) < 3:
        note = "; ".join(filter(None, [note, f"{len(times)} timed call{'s' * (len(times) > 1)}"]))
    summary = summarise(result)
    if method.name != REFERENCE and summary.get("evaluations") not in (None, 2 * size.n_params):
        note = "; ".join(filter(None, [f"{summary['evaluations']:,} cost evaluations", note]))
    return {
        **row,
        "status": "ok",
        "device": device,
        "median_s": statistics.median(times) * scale,
        "measured_median_s": statistics.median(times),
        "times_s": times,
        "timed_calls": len(times),
        "warmup_s": warm_s,
        "coordinates": size.n_params if coords is None else len(coords),
        "peak_rss_mib": maxrss_mib(),
        "rss_growth_mib": maxrss_mib() - baseline,
        **summary,
        "note": note,
        "load_1min": _load(),
        "library_sha256": library_hash(),
    }


# --------------------------------------------------------------------------- the driver


def spawn(method: Method, size: Size, backend: str, repeats: int, quick: bool) -> dict:
    row = {"method": method.name, "size": size.name, "N": size.n_params}
    missing = [r for r in method.requires if importlib.util.find_spec(r) is None]
    if missing:
        return {**row, "status": "not installed", "note": f"not installed: {', '.join(missing)}"}
    spec = {"method": method.name, "size": size.name, "backend": backend, "repeats": repeats, "quick": quick}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timed out", "note": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": "failed", "note": f"failed (rc {done.returncode}): {tail[:200]}"}


def gemm_samples(backend: str) -> list[float]:
    """GFLOP/s of GEMM_SAMPLES float64 GEMM_N×GEMM_N matmuls, after one warm-up."""
    if backend == "torch":
        import torch

        a = torch.randn(GEMM_N, GEMM_N, dtype=torch.float64)
    elif backend == "cupy":
        import cupy

        a = cupy.random.standard_normal((GEMM_N, GEMM_N))
    else:
        a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N))
    sync = _backend_sync(backend)
    timed(lambda: a @ a, sync)
    return [2 * GEMM_N**3 / timed(lambda: a @ a, sync)[0] / 1e9 for _ in range(GEMM_SAMPLES)]


def floor_row(size: Size, gflops: float) -> dict:
    flops = 2 * size.n_params * size.forward_flops
    return {
        "method": "floor",
        "size": size.name,
        "N": size.n_params,
        "status": "ok",
        "median_s": flops / (gflops * 1e9),
        "note": f"2N forwards x {size.forward_flops:,} FLOP at {gflops:.1f} GFLOP/s",
    }


def add_ratios(rows: list[dict]) -> None:
    by_size: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("median_s") is not None:
            by_size.setdefault(row["size"], {})[row["method"]] = row["median_s"]
    for row in rows:
        times, t = by_size.get(row["size"], {}), row.get("median_s")
        stacked, floor = times.get(REFERENCE), times.get("floor")
        row["ratio_to_stacked"] = t / stacked if t and stacked else None
        row["ratio_to_floor"] = t / floor if t and floor else None


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}x"


def fmt_difference(row: dict) -> str:
    if row.get("difference") is not None:
        return f"{row['difference']:.3e}"
    return "-" if row.get("passed") is None else f"passed={row['passed']}"


def fmt_memory(row: dict) -> str:
    if row.get("peak_rss_mib") is None:
        return "-"
    return f"{row['peak_rss_mib']:.0f} (+{row['rss_growth_mib']:.0f})"


COLUMNS = ["method", "size", "N", "median", "/stacked", "/floor", "difference", "peak RSS MiB", "note"]


def table(rows: list[dict]) -> str:
    cells = [
        [
            r["method"],
            r["size"],
            f"{r['N']:,}",
            fmt_time(r.get("median_s")),
            fmt_ratio(r.get("ratio_to_stacked")),
            fmt_ratio(r.get("ratio_to_floor")),
            fmt_difference(r),
            fmt_memory(r),
            r.get("note", ""),
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def library_hash() -> str:
    """sha256 over gcbackend/**/*.py as the worker found them (the library may change mid-run)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gcbackend").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def git_state() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    evaluation = hashlib.sha256()
    for path in sorted((ROOT / "gcbackend" / "evaluation").glob("*.py")):
        evaluation.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_dirty": bool(git("status", "--porcelain", "gcbackend")),
        "evaluation_sha256": evaluation.hexdigest(),
    }


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    return {"cpu": cpu, "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("numpy", "torch", "jax", "jaxlib", "scipy", "numdifftools", "cupy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated subset of S,M,L (default all)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "torch"])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="S and M only, 1 timed call per row after the warm-up; peers over ~3 s extrapolated",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = (args.sizes or ("S,M" if args.quick else "S,M,L")).upper().split(",")
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {','.join(SIZES)}")
    args.sizes = [SIZES[n] for n in names]
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def default_out(backend: str, quick: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    return RESULTS / f"{stamp}-{backend}{'-quick' if quick else ''}.json"


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_all(args: argparse.Namespace) -> dict:
    load_before = _load()
    before = gemm_samples(args.backend)
    rows = []
    for size in args.sizes:
        for method in METHODS:
            row = spawn(method, size, args.backend, args.repeats, args.quick)
            print(f"[{size.name}] {method.name}: {fmt_time(row.get('median_s'))} {row.get('note', '')}",
                  file=sys.stderr, flush=True)  # fmt: skip
            rows.append(row)
    after = gemm_samples(args.backend)
    gflops = statistics.median(before + after)
    rows += [floor_row(size, gflops) for size in args.sizes]
    libraries = {r["library_sha256"] for r in rows if r.get("library_sha256")}
    rows.sort(key=lambda r: list(SIZES).index(r["size"]))
    add_ratios(rows)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "backend": args.backend,
        "quick": args.quick,
        "repeats": args.repeats,
        "epsilon": EPSILON,
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "library_changed_during_run": len(libraries) > 1,
        "gemm": {"n": GEMM_N, "gflops": gflops, "samples_gflops": before + after},
        "load_average_1min": [load_before, _load()],
        "peak_memory": "peak RSS (VmHWM) of a fresh worker subprocess per row, MiB; rss_growth: over the peak after imports and case set-up",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))  # the gcbackend of this checkout
    args = parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    result = run_all(args)
    print(f"float64 GEMM {GEMM_N}x{GEMM_N} ({args.backend}): {result['gemm']['gflops']:.1f} GFLOP/s (median)")
    print(table(result["rows"]))
    if result["library_changed_during_run"]:
        print("WARNING: gcbackend/ changed while the rows ran (see library_sha256 per row in the JSON)")
    if result["git"]["library_dirty"]:
        print("note: gcbackend/ has uncommitted changes (git status); the rows measured the working tree")
    out = (args.out or default_out(args.backend, args.quick)).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
