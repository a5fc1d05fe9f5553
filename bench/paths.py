"""Benchmark the evaluation paths (issue 12): any cost works; broadcasting makes it fast.

Rows (medians of wall-clock seconds; each ratio from the same run):

* ``torch F.linear, M`` — the M model (64-32-16-1, m=128) written row-major with
  ``torch.nn.functional.linear`` (it does not broadcast over a batch of weights): defaults
  (``mode="auto"`` → vmap) against ``mode="loop"``. Target ≥ 20×.
* ``JAX jnp.mean, S/M`` — a JAX cost that averages over every axis (does not broadcast), x64:
  defaults (→ ``jax.jit(jax.vmap)``) against ``mode="loop"``. Target ≥ 20×.
* ``NumPy loop vs notebook, S/M`` — ``mode="loop"`` with the notebook's settings and its own
  ``forward_propagation_n`` as the cost, against the notebook's ``gradient_check_n``
  (bench/run.py). Target ≤ 1.0×.
* ``verification overhead, M/L`` — ``gc.check(mlp.cost, ...)`` with the defaults (broadcast,
  verified) against the same check with the evaluation's ``mode="unverified"`` (the stacked path
  as it was before verification); L with ``**gc.NOTEBOOK`` (2N rows: the fixed cost of
  verifying weighs more there, and the run stays short). Target ≤ 1.05×.

Run: ``python bench/paths.py [--quick]``; prints a table and writes bench/results/paths.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402  (bench/run.py: the sizes and the notebook's loop)

import gcbackend as gc  # noqa: E402
from gcbackend import inputs  # noqa: E402
from gcbackend.models import mlp  # noqa: E402


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def unverified(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with check() accepting the evaluation's mode='unverified' (bench only)."""

    def wrapped():
        saved = inputs.MODES
        inputs.MODES = (*saved, "unverified")
        try:
            return call()
        finally:
            inputs.MODES = saved

    return wrapped


def torch_rows(repeats: int, loop_repeats: int) -> list[dict]:
    import torch

    F = torch.nn.functional
    X, Y, params = run.make_case(run.SIZES["M"])
    grads = mlp.backward(params, X, Y)
    Xr = torch.asarray(np.ascontiguousarray(X.T))  # row-major: one example per row
    Yr = torch.asarray(np.reshape(Y, (-1, 1)))
    tparams = {k: torch.asarray(v if k.startswith("W") else np.reshape(v, (-1,))) for k, v in params.items()}
    tgrads = {k: torch.asarray(v if k.startswith("W") else np.reshape(v, (-1,))) for k, v in grads.items()}

    def cost(p, X, Y):
        A = X
        for layer in (1, 2):
            A = torch.relu(F.linear(A, p[f"W{layer}"], p[f"b{layer}"]))
        return F.binary_cross_entropy(torch.sigmoid(F.linear(A, p["W3"], p["b3"])), Y)

    auto = gc.check(cost, tparams, tgrads, Xr, Yr)  # warm-up, and the paths it takes
    loop = gc.check(cost, tparams, tgrads, Xr, Yr, mode="loop")
    fast = median_seconds(lambda: gc.check(cost, tparams, tgrads, Xr, Yr), repeats)
    slow = median_seconds(lambda: gc.check(cost, tparams, tgrads, Xr, Yr, mode="loop"), loop_repeats)
    return [
        {
            "row": "torch F.linear, M: defaults vs mode='loop'",
            "fast_s": fast,
            "slow_s": slow,
            "ratio": slow / fast,
            "target": ">= 20x",
            "paths": sorted({r.path for r in auto.parameters.values()}),
            "verdicts": [auto.verdict, loop.verdict],
        }
    ]


def jax_rows(repeats: int, loop_repeats: int, sizes: tuple[str, ...]) -> list[dict]:
    import jax

    jax.config.update("jax_enable_x64", True)
    return [_jax_row(jax, size, repeats, loop_repeats) for size in sizes]


def _jax_row(jax, size: str, repeats: int, loop_repeats: int) -> dict:
    jnp = jax.numpy
    X, Y, params = run.make_case(run.SIZES[size])
    grads = mlp.backward(params, X, Y)
    jX, jY = jnp.asarray(X), jnp.asarray(np.reshape(Y, (1, -1)))
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jgrads = {k: jnp.asarray(v) for k, v in grads.items()}

    def cost(p, X, Y):
        A = X
        for layer in (1, 2):
            A = jax.nn.relu(p[f"W{layer}"] @ A + p[f"b{layer}"])
        out = jax.nn.sigmoid(p["W3"] @ A + p["b3"])
        return -jnp.mean(Y * jnp.log(out) + (1 - Y) * jnp.log(1 - out))

    began = time.perf_counter()
    auto = gc.check(cost, jparams, jgrads, jX, jY)  # the first check compiles: reported apart
    cold = time.perf_counter() - began
    loop = gc.check(cost, jparams, jgrads, jX, jY, mode="loop")
    fast = median_seconds(lambda: gc.check(cost, jparams, jgrads, jX, jY), repeats)
    slow = median_seconds(lambda: gc.check(cost, jparams, jgrads, jX, jY, mode="loop"), loop_repeats)
    return {
        "row": f"JAX jnp.mean, {size}: defaults vs mode='loop'",
        "fast_s": fast,
        "slow_s": slow,
        "ratio": slow / fast,
        "target": ">= 20x",
        "paths": sorted({r.path for r in auto.parameters.values()}),
        "verdicts": [auto.verdict, loop.verdict],
        "first_check_s": cold,
    }


def loop_rows(repeats: dict[str, int]) -> list[dict]:
    return [_loop_row(size, repeats[size]) for size in ("S", "M")]


def _loop_row(size: str, repeats: int) -> dict:
    case = run.host_case(run.SIZES[size])
    X, Y, params = run.make_case(run.SIZES[size])
    grads = mlp.backward(params, X, Y)

    def notebook_cost(p, X, Y):
        return run.forward_propagation_n(X, Y, p)[0]

    report = gc.check(notebook_cost, params, grads, X, Y, mode="loop", **gc.NOTEBOOK)
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved, so drifts of a shared machine hit both alike
        theirs.append(median_seconds(lambda: run.gradient_check_n(case, run.EPSILON, None), 1))
        ours.append(
            median_seconds(
                lambda: gc.check(notebook_cost, params, grads, X, Y, mode="loop", **gc.NOTEBOOK), 1
            )
        )
    return {
        "row": f"NumPy mode='loop' vs notebook gradient_check_n, {size}",
        "fast_s": statistics.median(theirs),
        "slow_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "target": "<= 1.0x",
        "verdicts": [report.verdict],
    }


def overhead_rows(repeats: dict[str, int]) -> list[dict]:
    return [_overhead_row(size, repeats[size], notebook=size == "L") for size in ("M", "L")]


def _overhead_row(size: str, repeats: int, notebook: bool) -> dict:
    X, Y, params = run.make_case(run.SIZES[size])
    grads = mlp.backward(params, X, Y)
    options = dict(gc.NOTEBOOK) if notebook else {}
    report = gc.check(mlp.cost, params, grads, X, Y, **options)
    verified, trusted = [], []
    for _ in range(repeats):  # interleaved, so drifts of a shared machine hit both alike
        verified.append(median_seconds(lambda: gc.check(mlp.cost, params, grads, X, Y, **options), 1))
        trusted.append(
            median_seconds(
                unverified(lambda: gc.check(mlp.cost, params, grads, X, Y, mode="unverified", **options)), 1
            )
        )
    fast, slow = statistics.median(trusted), statistics.median(verified)
    return {
        "row": f"verification overhead, {size}{' (NOTEBOOK)' if notebook else ''}: defaults vs unverified",
        "fast_s": fast,
        "slow_s": slow,
        "ratio": slow / fast,
        "target": "<= 1.05x",
        "paths": sorted({r.path for r in report.parameters.values()}),
        "verdicts": [report.verdict],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    options = parser.parse_args()
    q = options.quick
    rows = []
    rows += loop_rows({"S": 5 if q else 41, "M": 1 if q else 5})
    rows += overhead_rows({"M": 3 if q else 15, "L": 1 if q else 3})
    rows += torch_rows(1 if q else 5, 1)
    rows += jax_rows(1 if q else 3, 1, ("S", "M"))
    width = max(len(r["row"]) for r in rows)
    print(
        f"{'row (ratio = numerator / denominator)'.ljust(width)}  {'numerator s':>11}  {'denom. s':>9}  {'ratio':>7}  target     paths"
    )
    for r in rows:
        print(
            f"{r['row'].ljust(width)}  {r['slow_s']:11.4f}  {r['fast_s']:9.4f}  {r['ratio']:6.2f}x  "
            f"{r['target']:<9}  {','.join(r.get('paths', []))}"
        )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "quick": q}
    (results / "paths.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {results / 'paths.json'}")


if __name__ == "__main__":
    main()
