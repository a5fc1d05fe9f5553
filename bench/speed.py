"""Issue 21's speed table: every row a ratio of two things timed side by side in one run.

What is measured (float64 unless said; ``**gc.NOTEBOOK`` = ε 1e-7, threshold 2e-7, 2N evaluations)

    ==  =====================================================================  ======
    1   seed case (N = 47): plain loop / ``check(**gc.NOTEBOOK)``              ≥ 5×
    2   seed case: plain loop / ``check()`` with the defaults                  ≥ 3×
    3   M = 64-32-16-1, m = 128 (N = 2,625): ``check(**gc.NOTEBOOK)`` / floor  ≤ 2×
    4   M: ``check()`` defaults / ``check(**gc.NOTEBOOK)``                     ≤ 1.3×
    5   L = 256-128-64-1, m = 64 (N = 41,217): ``**gc.NOTEBOOK`` / floor       ≤ 1.5×
    6   L: defaults / ``**gc.NOTEBOOK``                                        ≤ 1.3×
    7   M: ``check(mode="loop", **gc.NOTEBOOK)`` / plain loop                  ≤ 1.0×
    8   a cost returning ``float(...)``, 16-8-4-1, m = 64: defaults / loop     ≤ 1.5×
    9   PyTorch ``F.linear`` cost, M: defaults / ``torch.func.vmap`` by hand   ≤ 1.5×
    10  JAX seed case, warm: ``check(**gc.NOTEBOOK)`` / ``jit(vmap)`` by hand  ≤ 2×
    11  JAX seed case, first call in a fresh process: check / by hand          ≤ 3×
    12  seed case, defaults: ``backend="dask"`` / NumPy                        (informational)
    ==  =====================================================================  ======

    * "plain loop": the notebook's ``gradient_check_n`` on the same cost as the check: one
      flat (N, 1) vector, ``np.copy`` and one element moved per row, ``vector_to_dictionary``
      per row, two cost calls per element, then formula (2) over the flattened backprop.
    * Rows 1, 2, 7, 8 call ``notebook_cost`` on both sides: the notebook's
      ``forward_propagation_n`` returning J, written with ``@`` and a sum over the last two
      axes so that it broadcasts over stacked parameters (one call costs what the notebook's
      own costs: same ufuncs, same numbers). Row 8 wraps it in ``float(...)``, which cannot
      broadcast. Rows 3–6 and 12 use ``gc.models.mlp.cost`` (bench/run.py's cases).
    * Floor (rows 3, 5): 2N forward passes, 2·m·Σ n_l·n_(l−1) FLOPs each, at the best float64
      GEMM rate of the run (bench/run.py's 1024×1024 matmul samples, taken between the checks).
    * Row 9: the M model row-major with ``torch.nn.functional.linear`` and
      ``binary_cross_entropy``; by hand = per tensor, ``torch.func.vmap`` of the cost over 256
      perturbed rows a call at ε = 1e-7 (2N evaluations), then formula (2).
    * Rows 10–11: a JAX cost with ``jnp.mean`` (x64 on, float64); by hand = ``ravel_pytree``,
      then one ``jax.jit`` of ``jax.vmap(cost)`` over θ ± ε·I and formula (2). Row 11 runs
      each first call in its own fresh process (imports and the case are built before the
      clock starts); its rounds alternate check, by hand, check, … Row 10 runs in the
      process of the first first check, which is its warm-up.
    * Row 12: the same defaults check, Dask arrays (``mlp.seed_case(xp="dask")``) against
      NumPy arrays: what a small check pays for Dask's scheduler.

How
    * Every group of rows runs in a fresh subprocess (imports, caches and JAX's x64 switch
      never leak into the next group). In it, one warm-up call of each thing (not on L, where
      each call takes seconds), then rounds: each round times every thing once, the order
      reversed every other round (A B, B A, …), so the drift of a shared machine hits both
      sides alike. Each group has a number of rounds and a time budget: no new round starts
      once the budget is spent and 3 rounds are done (2 on L, JAX first calls and Dask), so
      a loaded machine gives fewer rounds, not a longer run; each row records its rounds.
    * Each figure is a ratio per round (A_i / B_i); the row prints the median of those ratios
      and their min–max, with both sides' medians. ``holds`` compares the median with the target.
    * Each group records the 1-minute load average before and after it and a hash of
      gcbackend/ (the library may be edited while the bench runs). Only gcbackend's public
      API is used (``gc.check``, ``gc.NOTEBOOK``, ``gc.models.mlp``).

Usage: ``python bench/speed.py [--quick] [--rows 1,2,...] [--backend numpy|torch|cupy]
[--rounds K] [--blas-threads N] [--json PATH]``. ``--quick``: fewer rounds, no L (rows 5–6),
~1–2 minutes; full: 5–10 minutes on a 2-core machine. ``--backend`` is the backend of rows 3–6
(the check against the FLOP floor); the other rows are defined by their library.
``--rounds K``: exactly K rounds per group, no budget. ``--blas-threads N``: BLAS/OpenMP
threads capped in every row (on a machine other jobs keep busy, BLAS threads that wait on
each other can slow a GEMM-bound check many times over; the JSON records the pools either
way). Prints the table; writes JSON to ``bench/results/speed-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
for _path in (str(BENCH), str(ROOT)):  # this checkout's gcbackend, and bench/run.py
    if _path not in sys.path:
        sys.path.insert(0, _path)

import run as runbench  # noqa: E402  (bench/run.py: the sizes, the GEMM rate, machine and git state)

EPSILON = 1e-7  # the notebook's ε (gc.NOTEBOOK's), for every by-hand method
TORCH_CHUNK = 256  # perturbed rows per torch.func.vmap call, by hand
MARK = "SPEED-RESULT "
WORKER_TIMEOUT_S = 1200
SCALAR_DIMS, SCALAR_M = (16, 8, 4, 1), 64
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


# --------------------------------------------------------------------------- rows and targets


@dataclass(frozen=True)
class Target:
    """``ratio op value``: ``>=`` (A should be that many times B) or ``<=``; None: no target."""

    op: str | None = None
    value: float | None = None

    def holds(self, ratio: float | None) -> bool | None:
        if self.op is None or ratio is None or not math.isfinite(ratio):
            return None
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    @property
    def text(self) -> str:
        return "informational" if self.op is None else f"{self.op} {self.value:g}x"

    def as_json(self) -> dict:
        return {"op": self.op, "value": self.value, "text": self.text}


@dataclass(frozen=True)
class Row:
    number: int
    group: str
    case: str
    a: str  # the numerator
    b: str  # the denominator
    target: Target


NOTEBOOK_CHECK = "check(**gc.NOTEBOOK)"
DEFAULTS_CHECK = "check() defaults"
PLAIN = "plain loop"
ROWS = (
    Row(1, "seed", "seed case (N = 47)", PLAIN, NOTEBOOK_CHECK, Target(">=", 5)),
    Row(2, "seed", "seed case (N = 47)", PLAIN, DEFAULTS_CHECK, Target(">=", 3)),
    Row(3, "M", "M = 64-32-16-1, m = 128 (N = 2,625)", NOTEBOOK_CHECK, "FLOP floor", Target("<=", 2)),
    Row(4, "M", "M = 64-32-16-1, m = 128 (N = 2,625)", DEFAULTS_CHECK, NOTEBOOK_CHECK, Target("<=", 1.3)),
    Row(5, "L", "L = 256-128-64-1, m = 64 (N = 41,217)", NOTEBOOK_CHECK, "FLOP floor", Target("<=", 1.5)),
    Row(6, "L", "L = 256-128-64-1, m = 64 (N = 41,217)", DEFAULTS_CHECK, NOTEBOOK_CHECK, Target("<=", 1.3)),
    Row(7, "loop", "M = 64-32-16-1, m = 128", 'check(mode="loop", **gc.NOTEBOOK)', PLAIN, Target("<=", 1.0)),
    Row(8, "scalar", "float(...) cost, 16-8-4-1, m = 64 (N = 177)", DEFAULTS_CHECK, PLAIN, Target("<=", 1.5)),
    Row(9, "torch", "PyTorch F.linear cost, M", DEFAULTS_CHECK, "torch.func.vmap by hand", Target("<=", 1.5)),
    Row(10, "jax", "JAX seed case, warm", NOTEBOOK_CHECK, "jit(vmap) by hand", Target("<=", 2)),
    Row(
        11,
        "jax",
        "JAX seed case, first call in a fresh process",
        NOTEBOOK_CHECK,
        "jit(vmap) by hand",
        Target("<=", 3),
    ),
    Row(12, "dask", "seed case, defaults", 'check(backend="dask")', "check() on NumPy", Target()),
)
ROWS_BY_NUMBER = {row.number: row for row in ROWS}
GROUP_REQUIRES = {"torch": ("torch",), "jax": ("jax",), "dask": ("dask",)}
ROUNDS = {  # (full, quick): rounds of timed calls per group
    "seed": (51, 15),
    "M": (9, 3),
    "L": (3, 1),
    "loop": (9, 3),
    "scalar": (21, 7),
    "torch": (7, 3),
    "jax": (3, 1),  # first calls, each in a fresh process (row 11)
    "dask": (3, 2),
}
JAX_WARM_ROUNDS = (21, 7)  # row 10, in the process of the first first check
BUDGET_S = {  # (full, quick): no new round starts after this many seconds of timed rounds ...
    "seed": (20, 5),
    "M": (60, 20),
    "L": (240, 60),
    "loop": (40, 15),
    "scalar": (20, 10),
    "torch": (60, 20),
    "jax": (150, 60),
    "dask": (45, 20),
}
MIN_ROUNDS = {"L": 2, "jax": 2, "dask": 2}  # ... once this many are done (3 elsewhere)
QUICK_SKIPS = {"L"}


# --------------------------------------------------------------------------- the arithmetic


def series(times: list[float]) -> dict:
    """Median, min and max of one thing's timed calls (seconds)."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": list(times),
    }


def ratios(a_times: list[float], b_times: list[float]) -> dict:
    """A_i / B_i per round (paired: timed side by side), their median and min–max."""
    if len(a_times) != len(b_times) or not a_times:
        raise ValueError(f"need as many A as B times, got {len(a_times)} and {len(b_times)}")
    per_round = [a / b for a, b in zip(a_times, b_times)]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "per_round": per_round,
        "of_medians": statistics.median(a_times) / statistics.median(b_times),
    }


def row_result(number: int, a_times: list[float], b_times: list[float], **extra: Any) -> dict:
    """One row's record: both sides' timings, the ratio per round, the target and whether it holds."""
    row = ROWS_BY_NUMBER[number]
    ratio = ratios(a_times, b_times)
    return {
        "row": number,
        "case": row.case,
        "status": "ok",
        "a": {"label": row.a, **series(a_times)},
        "b": {"label": row.b, **series(b_times)},
        "ratio": ratio,
        "target": row.target.as_json(),
        "holds": row.target.holds(ratio["median"]),
        "rounds": len(a_times),
        **extra,
    }


def row_status(number: int, status: str, note: str) -> dict:
    row = ROWS_BY_NUMBER[number]
    return {
        "row": number,
        "case": row.case,
        "status": status,
        "a": {"label": row.a},
        "b": {"label": row.b},
        "ratio": None,
        "target": row.target.as_json(),
        "holds": None,
        "note": note,
    }


def interleave(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: bool = True,
    budget_s: float | None = None,
    min_rounds: int = 1,
) -> tuple[dict[str, list[float]], dict]:
    """One warm-up call of each, then rounds timing each once (order reversed every other round).

    At most ``rounds`` rounds; with ``budget_s``, no new round starts once the timed rounds
    have taken that long and ``min_rounds`` are done (a loaded machine gets fewer rounds, not
    a longer run). Returns the times per name and the last result of each call.
    """
    names = list(calls)
    results = {name: calls[name]() for name in names} if warmup else {}  # imports, caches, compilation
    times: dict[str, list[float]] = {name: [] for name in names}
    began = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - began > budget_s:
            break
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            results[name] = calls[name]()
            times[name].append(time.perf_counter() - start)
    return times, results


def round_options(spec: dict) -> dict:
    """interleave()'s rounds, budget and minimum from a group's spec."""
    return {
        "rounds": spec["rounds"],
        "budget_s": spec.get("budget_s"),
        "min_rounds": spec.get("min_rounds", 1),
    }


def describe(report: Any) -> dict:
    """What a gc.check report says, through its public attributes only."""
    return {
        "verdict": getattr(report, "verdict", None),
        "difference": _float_or_none(getattr(report, "difference", None)),
        "evaluations": getattr(report, "evaluations", None),
    }


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- the notebook


def notebook_cost(parameters: Mapping[str, Any], X: Any, Y: Any) -> Any:
    """The notebook's forward_propagation_n, returning J; broadcasts over stacked parameters.

    LINEAR → RELU → … → LINEAR → SIGMOID, mean binary cross-entropy, in the notebook's
    ufuncs (``np.maximum(0, Z)``, ``1 / (1 + np.exp(-Z))``); ``@`` and the sum over the last
    two axes are what let a parameter with a leading batch axis give a cost per row.
    """
    m = X.shape[1]
    A = X
    layers = len(parameters) // 2
    for layer in range(1, layers + 1):
        Z = parameters[f"W{layer}"] @ A + parameters[f"b{layer}"]
        A = np.maximum(0, Z) if layer < layers else 1 / (1 + np.exp(-Z))
    log_probs = np.multiply(-np.log(A), Y) + np.multiply(-np.log(1 - A), 1 - Y)
    return 1.0 / m * np.sum(log_probs, axis=(-2, -1))


def scalar_cost(parameters: Mapping[str, Any], X: Any, Y: Any) -> float:
    """The same J as a Python float: a cost that cannot broadcast."""
    return float(notebook_cost(parameters, X, Y))


def dictionary_to_vector(parameters: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """gc_utils.dictionary_to_vector: one (N, 1) column, the tensors in order, row-major."""
    shapes = {name: tuple(np.shape(p)) for name, p in parameters.items()}
    theta = np.concatenate([np.reshape(p, (-1, 1)) for p in parameters.values()], axis=0)
    return theta, shapes


def vector_to_dictionary(theta: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """gc_utils.vector_to_dictionary, for any shapes (the notebook's are fixed to the seed case)."""
    parameters, start = {}, 0
    for name, shape in shapes.items():
        stop = start + math.prod(shape)
        parameters[name] = theta[start:stop].reshape(shape)
        start = stop
    return parameters


def gradients_to_vector(gradients: Mapping[str, Any], names: Any) -> np.ndarray:
    """gc_utils.gradients_to_vector: dW1, db1, … (or W1, b1, …) in the parameters' order."""
    return np.concatenate(
        [
            np.reshape(gradients[name] if name in gradients else gradients[f"d{name}"], (-1, 1))
            for name in names
        ]
    )


def plain_loop(
    cost: Callable[..., Any],
    parameters: Mapping[str, Any],
    gradients: Mapping[str, Any],
    X: Any,
    Y: Any,
    epsilon: float = EPSILON,
) -> float:
    """The notebook's gradient_check_n on ``cost(parameters, X, Y)`` → J: formula (2)."""
    parameters_values, shapes = dictionary_to_vector(parameters)
    grad = gradients_to_vector(gradients, shapes)
    num_parameters = parameters_values.shape[0]
    J_plus = np.zeros((num_parameters, 1))
    J_minus = np.zeros((num_parameters, 1))
    gradapprox = np.zeros((num_parameters, 1))
    for i in range(num_parameters):
        theta_plus = np.copy(parameters_values)
        theta_plus[i][0] += epsilon
        J_plus[i] = cost(vector_to_dictionary(theta_plus, shapes), X, Y)
        theta_minus = np.copy(parameters_values)
        theta_minus[i][0] -= epsilon
        J_minus[i] = cost(vector_to_dictionary(theta_minus, shapes), X, Y)
        gradapprox[i] = (J_plus[i] - J_minus[i]) / (2 * epsilon)
    numerator = np.linalg.norm(grad - gradapprox)
    denominator = np.linalg.norm(grad) + np.linalg.norm(gradapprox)
    return float(numerator / denominator)


# --------------------------------------------------------------------------- groups of rows
# group(spec) -> list of row records; spec: {"group", "rows", "rounds", "backend", optional "dims", "m"}


def _size(spec: dict, default: str) -> runbench.Size:
    """bench/run.py's size, or a custom one (``dims``/``m`` in the spec: the tests' tiny cases)."""
    if "dims" in spec:
        return runbench.Size("custom", tuple(spec["dims"]), int(spec["m"]))
    return runbench.SIZES[default]


def _seed_case() -> tuple[Any, Any, dict, dict]:
    from gcbackend.models import mlp

    X, Y, params = mlp.seed_case()
    return X, Y, params, mlp.backward(params, X, Y)


def group_seed(spec: dict) -> list[dict]:
    """Rows 1–2: the plain loop against check(**gc.NOTEBOOK) and check() on the seed case."""
    import gcbackend as gc

    X, Y, params, grads = _seed_case()
    calls = {
        "plain": lambda: plain_loop(notebook_cost, params, grads, X, Y),
        "notebook": lambda: gc.check(notebook_cost, params, grads, X, Y, **gc.NOTEBOOK),
    }
    if 2 in spec["rows"]:
        calls["defaults"] = lambda: gc.check(notebook_cost, params, grads, X, Y)
    times, results = interleave(calls, **round_options(spec))
    extra = {"plain_loop_difference": results["plain"]}
    rows = []
    if 1 in spec["rows"]:
        rows.append(
            row_result(1, times["plain"], times["notebook"], check=describe(results["notebook"]), **extra)
        )
    if 2 in spec["rows"]:
        rows.append(
            row_result(2, times["plain"], times["defaults"], check=describe(results["defaults"]), **extra)
        )
    return rows


def floor_seconds(size: runbench.Size, gflops: float) -> float:
    """2N forward passes of ``size`` at ``gflops`` GFLOP/s."""
    return 2 * size.n_params * size.forward_flops / (gflops * 1e9)


def group_floor(spec: dict) -> list[dict]:
    """Rows 3–4 (M) or 5–6 (L): check(**gc.NOTEBOOK) against the FLOP floor, defaults against it."""
    import gcbackend as gc
    from gcbackend.models import mlp

    name = spec["group"]
    notebook_row, defaults_row = (3, 4) if name == "M" else (5, 6)
    size, backend = _size(spec, name), spec.get("backend", "numpy")
    X, Y, params = runbench.make_case(size, None if backend == "numpy" else backend)
    grads = mlp.backward(params, X, Y)
    sync = runbench._backend_sync(backend)
    samples: list[float] = []

    def checked(**options: Any) -> Callable[[], Any]:
        def call() -> Any:
            report = gc.check(mlp.cost, params, grads, X, Y, backend=backend, **options)
            sync()
            return report

        return call

    calls = {
        "notebook": checked(**gc.NOTEBOOK),
        "gemm": lambda: samples.extend(runbench.gemm_samples(backend)),
    }
    if defaults_row in spec["rows"]:
        calls["defaults"] = checked()
    # L: no warm-up call (each check takes seconds; the median of the rounds discounts a slow first).
    times, results = interleave(calls, warmup=spec.get("warmup", name != "L"), **round_options(spec))
    best = max(samples)
    floor = floor_seconds(size, best)
    gemm = {
        "n": runbench.GEMM_N,
        "best_gflops": best,
        "median_gflops": statistics.median(samples),
        "samples_gflops": samples,
        "floor_flops": 2 * size.n_params * size.forward_flops,
    }
    case = {"dims": list(size.dims), "m": size.m, "N": size.n_params, "backend": backend}
    rows = []
    if notebook_row in spec["rows"]:
        floor_times = [floor] * len(times["notebook"])
        rows.append(
            row_result(
                notebook_row,
                times["notebook"],
                floor_times,
                check=describe(results["notebook"]),
                gemm=gemm,
                model=case,
            )
        )
    if defaults_row in spec["rows"]:
        rows.append(
            row_result(
                defaults_row,
                times["defaults"],
                times["notebook"],
                check=describe(results["defaults"]),
                reference=describe(results["notebook"]),
                model=case,
            )
        )
    return rows


def group_loop(spec: dict) -> list[dict]:
    """Row 7: check(mode="loop", **gc.NOTEBOOK) against the plain loop, the same cost on M."""
    import gcbackend as gc
    from gcbackend.models import mlp

    size = _size(spec, "M")
    X, Y, params = runbench.make_case(size)
    grads = mlp.backward(params, X, Y)
    calls = {
        "loop": lambda: gc.check(notebook_cost, params, grads, X, Y, mode="loop", **gc.NOTEBOOK),
        "plain": lambda: plain_loop(notebook_cost, params, grads, X, Y),
    }
    times, results = interleave(calls, **round_options(spec))
    return [
        row_result(
            7,
            times["loop"],
            times["plain"],
            check=describe(results["loop"]),
            plain_loop_difference=results["plain"],
        )
    ]


def group_scalar(spec: dict) -> list[dict]:
    """Row 8: a cost returning float(...): check() defaults against the plain loop."""
    import gcbackend as gc
    from gcbackend.models import mlp

    dims, m = tuple(spec.get("dims", SCALAR_DIMS)), int(spec.get("m", SCALAR_M))
    X, Y, params = mlp.random_case(dims, m, seed=0)
    grads = mlp.backward(params, X, Y)
    calls = {
        "defaults": lambda: gc.check(scalar_cost, params, grads, X, Y),
        "plain": lambda: plain_loop(scalar_cost, params, grads, X, Y),
    }
    times, results = interleave(calls, **round_options(spec))
    return [
        row_result(
            8,
            times["defaults"],
            times["plain"],
            check=describe(results["defaults"]),
            plain_loop_difference=results["plain"],
        )
    ]


def torch_case(size: runbench.Size) -> tuple[Callable, dict, dict, Any, Any]:
    """The model row-major with F.linear (one example per row of X), as bench/paths.py writes it."""
    import torch
    from torch.nn import functional as F

    from gcbackend.models import mlp

    X, Y, params = runbench.make_case(size)
    grads = mlp.backward(params, X, Y)
    Xr = torch.asarray(np.ascontiguousarray(X.T))
    Yr = torch.asarray(np.reshape(Y, (-1, 1)))

    def row_major(arrays: Mapping[str, np.ndarray]) -> dict:
        return {k: torch.asarray(v if k.startswith("W") else np.reshape(v, (-1,))) for k, v in arrays.items()}

    layers = len(params) // 2

    def cost(p: Mapping[str, Any], X: Any, Y: Any) -> Any:
        A = X
        for layer in range(1, layers):
            A = torch.relu(F.linear(A, p[f"W{layer}"], p[f"b{layer}"]))
        return F.binary_cross_entropy(torch.sigmoid(F.linear(A, p[f"W{layers}"], p[f"b{layers}"])), Y)

    return cost, row_major(params), row_major(grads), Xr, Yr


def torch_by_hand(
    cost: Callable, params: Mapping[str, Any], grads: Mapping[str, Any], X: Any, Y: Any
) -> float:
    """An expert's central differences: per tensor, torch.func.vmap over 256 perturbed rows a call."""
    import torch

    numeric, analytic = [], []
    for name, p in params.items():
        flat, n = p.reshape(-1), p.numel()

        def J(w: Any, name: str = name) -> Any:
            return cost({**params, name: w}, X, Y)

        batched = torch.func.vmap(J)
        out = torch.empty(n, dtype=p.dtype)
        for start in range(0, n, TORCH_CHUNK):
            stop = min(start + TORCH_CHUNK, n)
            step = torch.zeros(stop - start, n, dtype=p.dtype)
            step[torch.arange(stop - start), torch.arange(start, stop)] = EPSILON
            plus = (flat + step).reshape(-1, *p.shape)
            minus = (flat - step).reshape(-1, *p.shape)
            out[start:stop] = (batched(plus) - batched(minus)) / (2 * EPSILON)
        numeric.append(out)
        analytic.append(grads[name].reshape(-1))
    a, g = torch.cat(numeric), torch.cat(analytic)
    norm = torch.linalg.vector_norm
    return float(norm(g - a) / (norm(g) + norm(a)))


def group_torch(spec: dict) -> list[dict]:
    """Row 9: the F.linear cost, check() defaults against torch.func.vmap by hand."""
    import torch

    import gcbackend as gc

    cost, params, grads, X, Y = torch_case(_size(spec, "M"))
    calls = {
        "defaults": lambda: gc.check(cost, params, grads, X, Y),
        "hand": lambda: torch_by_hand(cost, params, grads, X, Y),
    }
    times, results = interleave(calls, **round_options(spec))
    return [
        row_result(
            9,
            times["defaults"],
            times["hand"],
            check=describe(results["defaults"]),
            by_hand_difference=results["hand"],
            torch_threads=torch.get_num_threads(),
        )
    ]


def jax_case() -> tuple[Callable, dict, dict, Any, Any]:
    """The seed case in JAX (x64 on, float64), with a cost as JAX users write it (jnp.mean)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    X, Y, params, grads = _seed_case()
    layers = len(params) // 2

    def cost(p: Mapping[str, Any], X: Any, Y: Any) -> Any:
        A = X
        for layer in range(1, layers):
            A = jax.nn.relu(p[f"W{layer}"] @ A + p[f"b{layer}"])
        out = jax.nn.sigmoid(p[f"W{layers}"] @ A + p[f"b{layers}"])
        return -jnp.mean(Y * jnp.log(out) + (1 - Y) * jnp.log(1 - out))

    def placed(arrays: Mapping[str, np.ndarray]) -> dict:
        return {k: jnp.asarray(v) for k, v in arrays.items()}

    return cost, placed(params), placed(grads), jnp.asarray(X), jnp.asarray(np.reshape(Y, (1, -1)))


def jax_by_hand(
    cost: Callable, params: Mapping[str, Any], grads: Mapping[str, Any], X: Any, Y: Any
) -> Callable:
    """An expert's central differences: ravel_pytree, one jit of vmap(cost) over θ ± ε·I, formula (2)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    theta, unravel = ravel_pytree(dict(params))
    grad, _ = ravel_pytree(dict(grads))  # the same keys: the same order
    n = theta.shape[0]

    @jax.jit
    def difference(theta: Any, grad: Any) -> Any:
        steps = EPSILON * jnp.eye(n, dtype=theta.dtype)
        J = jax.vmap(lambda t: cost(unravel(t), X, Y))
        approx = (J(theta + steps) - J(theta - steps)) / (2 * EPSILON)
        return jnp.linalg.norm(grad - approx) / (jnp.linalg.norm(grad) + jnp.linalg.norm(approx))

    return lambda: float(difference(theta, grad))


def jax_first_call(which: str, warm_rounds: int = 0) -> dict:
    """In this (fresh) process: build the JAX case, then time the first check or by-hand call.

    With ``warm_rounds`` (after a first check): row 10 in the same process, the first check
    having been its warm-up: the by-hand function's first call, then interleaved rounds.
    """
    started = time.perf_counter()
    import gcbackend as gc

    cost, params, grads, X, Y = jax_case()
    calls = {
        "gc": lambda: gc.check(cost, params, grads, X, Y, **gc.NOTEBOOK),
        "hand": jax_by_hand(cost, params, grads, X, Y),
    }
    setup_s = time.perf_counter() - started
    start = time.perf_counter()
    result = calls[which]()
    seconds = time.perf_counter() - start
    out = {"which": which, "seconds": seconds, "setup_s": setup_s}
    out.update(describe(result) if which == "gc" else {"difference": result})
    if warm_rounds:
        times, results = interleave(calls, warm_rounds)
        out["warm"] = {
            "times": times,
            "check": describe(results["gc"]),
            "by_hand_difference": results["hand"],
        }
    return out


def group_jax(spec: dict) -> list[dict]:
    """Rows 10–11: JAX, the check against jit(vmap) by hand, warm and first calls.

    Row 11: each first call in its own fresh process, the rounds alternating check and by
    hand (within the group's budget). Row 10 runs in the process of the first first check
    (which is its warm-up), so the ~20 s a first check can take is paid once, not twice.
    """
    rows, warm_rounds = spec["rows"], spec.get("warm_rounds", spec["rounds"])
    firsts: dict[str, list[dict]] = {"gc": [], "hand": []}
    warm = None
    began = time.perf_counter()
    for r in range(spec["rounds"] if 11 in rows else 0):
        over = spec.get("budget_s") is not None and time.perf_counter() - began > spec["budget_s"]
        if over and r >= spec.get("min_rounds", 1):
            break
        for which in ("gc", "hand") if r % 2 == 0 else ("hand", "gc"):
            carry_on = 10 in rows and warm is None and which == "gc"
            answer = spawn({"group": "jax-first-call", "which": which, "warm_rounds": warm_rounds * carry_on})
            firsts[which].append(answer)
            warm = answer.get("warm", warm)
    if 10 in rows and warm is None:
        warm = spawn({"group": "jax-first-call", "which": "gc", "warm_rounds": warm_rounds})["warm"]
    out = []
    if 10 in rows:
        times = warm["times"]
        out.append(
            row_result(
                10,
                times["gc"],
                times["hand"],
                check=warm["check"],
                by_hand_difference=warm["by_hand_difference"],
            )
        )
    if 11 in rows:
        out.append(
            row_result(
                11,
                [f["seconds"] for f in firsts["gc"]],
                [f["seconds"] for f in firsts["hand"]],
                check={k: firsts["gc"][-1].get(k) for k in ("verdict", "difference", "evaluations")},
                by_hand_difference=firsts["hand"][-1]["difference"],
                setup_s={k: [f["setup_s"] for f in v] for k, v in firsts.items()},
            )
        )
    return out


def group_dask(spec: dict) -> list[dict]:
    """Row 12: the seed case's defaults check on Dask arrays against the same on NumPy."""
    import gcbackend as gc
    from gcbackend.models import mlp

    X, Y, params, grads = _seed_case()
    dX, dY, dparams = mlp.seed_case(xp="dask")
    dgrads = mlp.backward(dparams, dX, dY)
    calls = {
        "dask": lambda: gc.check(mlp.cost, dparams, dgrads, dX, dY),
        "numpy": lambda: gc.check(mlp.cost, params, grads, X, Y),
    }
    times, results = interleave(calls, **round_options(spec))
    return [row_result(12, times["dask"], times["numpy"], check=describe(results["dask"]))]


GROUPS: dict[str, Callable[[dict], list[dict]]] = {
    "seed": group_seed,
    "M": group_floor,
    "L": group_floor,
    "loop": group_loop,
    "scalar": group_scalar,
    "torch": group_torch,
    "jax": group_jax,
    "dask": group_dask,
}


def run_group(spec: dict) -> list[dict]:
    """One group's rows, in this process, with the load average and library hash around it."""
    load_before = _load()
    rows = GROUPS[spec["group"]](spec)
    load = [load_before, _load()]
    context = {
        "group": spec["group"],
        "max_rounds": spec["rounds"],
        "budget_s": spec.get("budget_s"),
        "load_1min": load,
        "thread_pools": thread_pools(),
    }
    return [{**row, **context, "library_sha256": runbench.library_hash()} for row in rows]


def thread_pools() -> list[dict]:
    """The BLAS/OpenMP pools loaded in this process and their threads (on a loaded machine they matter)."""
    from threadpoolctl import threadpool_info

    return [{"api": p.get("internal_api"), "threads": p.get("num_threads")} for p in threadpool_info()]


# --------------------------------------------------------------------------- the driver


def spawn(spec: dict) -> Any:
    """Run ``spec`` in a fresh ``python bench/speed.py --worker`` process; its JSON answer.

    ``spec["blas_threads"]`` (when set) caps the worker's BLAS/OpenMP threads by environment.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("blas_threads"):
        env.update(dict.fromkeys(THREAD_VARIABLES, str(spec["blas_threads"])))
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"worker failed (rc {done.returncode}): {tail[:300]}")


def worker(spec: dict) -> Any:
    if spec["group"] == "jax-first-call":
        return jax_first_call(spec["which"], spec.get("warm_rounds", 0))
    try:
        return run_group(spec)
    except ImportError as exc:
        return [row_status(n, "not installed", f"not installed ({exc})") for n in spec["rows"]]


def missing_modules(group: str, backend: str) -> list[str]:
    needed = list(GROUP_REQUIRES.get(group, ()))
    if group in ("M", "L") and backend != "numpy":
        needed.append(backend)
    return [name for name in needed if importlib.util.find_spec(name) is None]


def plan(
    numbers: list[int], quick: bool, rounds: int | None, backend: str, blas_threads: int | None = None
) -> list[dict]:
    """The groups to run, in order, each with its selected rows and rounds."""
    specs: dict[str, dict] = {}
    for number in numbers:
        group = ROWS_BY_NUMBER[number].group
        spec = specs.setdefault(
            group, {"group": group, "rows": [], "backend": backend, "blas_threads": blas_threads}
        )
        spec["rows"].append(number)
        mode = 1 if quick else 0
        spec["rounds"] = rounds or ROUNDS[group][mode]
        if rounds is None:  # --rounds K: exactly K rounds; else a budget per group
            spec["budget_s"] = BUDGET_S[group][mode]
            spec["min_rounds"] = min(MIN_ROUNDS.get(group, 3), spec["rounds"])
        if group == "jax":
            spec["warm_rounds"] = rounds or JAX_WARM_ROUNDS[mode]
    return list(specs.values())


def run_all(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    uptime_before = _uptime()
    rows: list[dict] = []
    for spec in plan(args.rows, args.quick, args.rounds, args.backend, args.blas_threads):
        group, start = spec["group"], time.perf_counter()
        missing = missing_modules(group, args.backend)
        if missing:
            found = [
                row_status(n, "not installed", f"not installed: {', '.join(missing)}") for n in spec["rows"]
            ]
        else:
            try:
                found = spawn(spec)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                found = [row_status(n, "failed", str(exc)) for n in spec["rows"]]
        for row in found:
            print(f"  row {row['row']:>2} ({group}): {short(row)}", file=sys.stderr, flush=True)
        print(f"  [{group}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
        rows += found
    rows.sort(key=lambda r: r["row"])
    libraries = {r["library_sha256"] for r in rows if r.get("library_sha256")}
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/speed.py", *args.argv]),
        "quick": args.quick,
        "rounds": args.rounds,
        "backend": args.backend,
        "blas_threads": args.blas_threads,
        "epsilon": EPSILON,
        "machine": {**runbench.machine(), "cpus": os.cpu_count()},
        "versions": versions(),
        "git": runbench.git_state(),
        "library_changed_during_run": len(libraries) > 1,
        "uptime": {"before": uptime_before, "after": _uptime()},
        "elapsed_s": time.perf_counter() - began,
        "rows": rows,
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = runbench.versions()
    for name in ("dask", "array-api-compat"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average (1 min): {_load()}"


# --------------------------------------------------------------------------- the table


def fmt_time(seconds: float | None) -> str:
    return "-" if seconds is None else runbench.fmt_time(seconds)


def fmt_ratio(ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio['median']:.3g}x ({ratio['min']:.3g}-{ratio['max']:.3g})"


def fmt_holds(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return {True: "yes", False: "NO", None: "-"}[row["holds"]]


def short(row: dict) -> str:
    if row["status"] != "ok":
        return row.get("note", row["status"])
    return f"{fmt_ratio(row['ratio'])}, target {row['target']['text']}: {fmt_holds(row)}"


COLUMNS = ["#", "case", "A / B", "A median", "B median", "A/B median (min-max)", "target", "holds"]


def table(rows: list[dict]) -> str:
    cells = [
        [
            str(r["row"]),
            r["case"],
            f"{r['a']['label']} / {r['b']['label']}",
            fmt_time(r["a"].get("median_s")),
            fmt_time(r["b"].get("median_s")),
            fmt_ratio(r["ratio"]),
            r["target"]["text"],
            fmt_holds(r),
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    """What a reader needs beside the ratios: failures, verdicts that are not a pass, the GEMM rate."""
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"row {r['row']}: {r.get('note', r['status'])}")
            continue
        if "gemm" in r:
            g = r["gemm"]
            rates = (
                f"{g['best_gflops']:.1f} GFLOP/s (median {g['median_gflops']:.1f}, {r['model']['backend']})"
            )
            floor = f"floor {fmt_time(r['b']['median_s'])} = {g['floor_flops']:,} FLOP"
            out.append(f"row {r['row']}: {floor} at the best GEMM rate {rates}")
        verdict = (r.get("check") or {}).get("verdict")
        if verdict not in (None, "pass"):
            out.append(f"row {r['row']}: the check's verdict on the correct backprop was {verdict!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no L (rows 5-6): ~1-2 minutes")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    parser.add_argument(
        "--backend", default="numpy", choices=["numpy", "torch", "cupy"], help="the backend of rows 3-6"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per group (default: per group)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="JSON path (default bench/results/speed-*.json)"
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="cap BLAS/OpenMP threads in every row (OPENBLAS/OMP/MKL/BLIS_NUM_THREADS; default: unset)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.rows is None:
        skipped = set(QUICK_SKIPS) if args.quick else set()
        args.rows = [row.number for row in ROWS if row.group not in skipped]
    else:
        try:
            args.rows = sorted({int(n) for n in args.rows.split(",") if n.strip()})
        except ValueError:
            parser.error(f"--rows takes comma-separated row numbers 1-{len(ROWS)}, got {args.rows!r}")
        unknown = [n for n in args.rows if n not in ROWS_BY_NUMBER]
        if unknown or not args.rows:
            parser.error(f"unknown rows {unknown}; choose from 1-{len(ROWS)}")
    for option in ("rounds", "blas_threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    result = run_all(args)
    print(f"gcbackend speed (issue 21), {result['date']}, commit {result['git']['commit'][:12]}")
    print(f"machine: {result['machine']['cpu']}; {result['uptime']['before']}")
    print(table(result["rows"]))
    for line in notes(result["rows"]):
        print(line)
    print(f"after: {result['uptime']['after']}; {result['elapsed_s']:.0f} s in all")
    if result["library_changed_during_run"]:
        print("WARNING: gcbackend/ changed while the rows ran (see library_sha256 per row in the JSON)")
    if result["git"]["library_dirty"]:
        print("note: gcbackend/ has uncommitted changes (git status); the rows measured the working tree")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.json or RESULTS / f"speed-{stamp}{'-quick' if args.quick else ''}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
