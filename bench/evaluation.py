"""Benchmark the evaluation layer's own figures (gcbackend/evaluation): what verifying every
chunk costs, the loop against the notebook's loop, PyTorch's intra-op threads, JAX compiled.

Rows (each ratio from one run; timed rows interleaved, medians of wall-clock seconds):

* ``verification, <size> (**gc.NOTEBOOK)`` — the cost calls of one check, counted by a
  wrapper: batched calls, single calls (2 per tensor to choose its path, then one seeded
  row per later chunk) and the seconds spent in each; the ratio is the single calls' share
  of the time in the cost. L is bench/run.py's L model (256-128-64-1, m=64, N=41,217).
* ``NumPy mode='loop' vs notebook gradient_check_n, M`` — the notebook's own cost and loop
  (bench/run.py), ``**gc.NOTEBOOK``. Target ≤ 1.0×.
* ``float(...) cost, 16-8-4-1: defaults vs notebook loop`` — a cost that cannot broadcast.
  (4N + 1 evaluations against the notebook's 2N: the evaluation's share is the per-call ratio,
  printed as the note.)
* ``torch <size>: default intra-op threads vs one`` — ``gc.check(**gc.NOTEBOOK)`` of the MLP in
  torch with the evaluation's one-thread hold disabled, against the default (held).
* ``JAX S, warm: evaluation vs jit(vmap) by hand`` — ``evaluation.central_differences`` (the
  2N rows of ``**gc.NOTEBOOK``; the judge is not the evaluation's) against central
  differences by a hand-written ``jit(vmap(cost))`` over the stacked ±ε rows, x64.

Run: ``python bench/evaluation.py [--quick] [--sizes M,L]``; prints a table and writes
bench/results/evaluation.json.
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
from gcbackend import evaluation  # noqa: E402
from gcbackend.evaluation import limits  # noqa: E402
from gcbackend.models import mlp  # noqa: E402
from gcbackend.params import Layout  # noqa: E402


def seconds(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def interleaved(
    first: Callable[[], object], second: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Medians of ``rounds`` alternate timings of two calls (drifts of a shared machine hit both)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(seconds(first))
        b.append(seconds(second))
    return statistics.median(a), statistics.median(b)


def verification_row(size: str) -> dict:
    X, Y, params = run.make_case(run.SIZES[size])
    grads = mlp.backward(params, X, Y)
    counts = {"batched": 0, "single": 0, "rows": 0, "batched_s": 0.0, "single_s": 0.0}

    def cost(p, X, Y):
        batch = [v.shape[0] for v in p.values() if v.ndim == 3]
        began = time.perf_counter()
        J = mlp.cost(p, X, Y)
        spent = time.perf_counter() - began
        kind = "batched" if batch else "single"
        counts[kind] += 1
        counts[f"{kind}_s"] += spent
        counts["rows"] += batch[0] if batch else 1
        return J

    total = seconds(lambda: gc.check(cost, params, grads, X, Y, **gc.NOTEBOOK))
    in_cost = counts["batched_s"] + counts["single_s"]
    return {
        "row": f"verification, {size} (**gc.NOTEBOOK): single calls' share of the cost's time",
        "fast_s": in_cost,
        "slow_s": counts["single_s"],
        "ratio": counts["single_s"] / in_cost,
        "target": "small",
        "note": (
            f"{counts['batched']} batched calls ({counts['rows'] - counts['single']} rows), "
            f"{counts['single']} single calls; check {total:.2f} s"
        ),
        **counts,
    }


def loop_row(rounds: int) -> dict:
    case = run.host_case(run.SIZES["M"])
    X, Y, params = run.make_case(run.SIZES["M"])
    grads = mlp.backward(params, X, Y)

    def notebook_cost(p, X, Y):
        return run.forward_propagation_n(X, Y, p)[0]

    theirs, ours = interleaved(
        lambda: run.gradient_check_n(case, run.EPSILON, None),
        lambda: gc.check(notebook_cost, params, grads, X, Y, mode="loop", **gc.NOTEBOOK),
        rounds,
    )
    return {
        "row": "NumPy mode='loop' vs notebook gradient_check_n, M (**gc.NOTEBOOK)",
        "fast_s": theirs,
        "slow_s": ours,
        "ratio": ours / theirs,
        "target": "<= 1.0x",
    }


def float_row(rounds: int) -> dict:
    size = run.Size("F", (16, 8, 4, 1), 32)
    X, Y, params = mlp.random_case(size.dims, size.m, seed=0)
    grads = mlp.backward(params, X, Y)
    case = run.Case(size, X, Y, params, run.flatten(params), run.flatten(grads))

    def cost(p, X, Y):
        return float(run.forward_propagation_n(X, Y, p)[0])

    report = gc.check(cost, params, grads, X, Y)
    theirs, ours = interleaved(
        lambda: run.gradient_check_n(case, run.EPSILON, None),
        lambda: gc.check(cost, params, grads, X, Y),
        rounds,
    )
    per_call = (ours / report.evaluations) / (theirs / (2 * case.theta.size))
    return {
        "row": "float(...) cost, 16-8-4-1: defaults vs notebook gradient_check_n",
        "fast_s": theirs,
        "slow_s": ours,
        "ratio": ours / theirs,
        "target": "<= 1.5x",
        "note": f"{report.evaluations} evaluations vs {2 * case.theta.size}; per evaluation {per_call:.2f}x",
    }


def torch_row(size: str, rounds: int) -> dict:
    import torch

    X, Y, params = run.make_case(run.SIZES[size], xp=torch)
    grads = mlp.backward(params, X, Y)
    saved = limits.ONE_THREAD_BYTES

    def threaded():
        limits.ONE_THREAD_BYTES = 0  # the hold disabled: torch's default intra-op threads
        try:
            gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK)
        finally:
            limits.ONE_THREAD_BYTES = saved

    held = lambda: gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK)  # noqa: E731
    held()
    default, one = interleaved(threaded, held, rounds)
    return {
        "row": f"torch {size}: default intra-op threads ({torch.get_num_threads()}) vs one",
        "fast_s": one,
        "slow_s": default,
        "ratio": default / one,
        "target": ">= 1x",
    }


def jax_row(rounds: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    X, Y, params = run.make_case(run.SIZES["S"])
    jX, jY = jnp.asarray(X), jnp.asarray(np.reshape(Y, (1, -1)))
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    layout = Layout.of(jparams)
    xp = gc.backends.resolve("jax", []).xp

    def cost(p, X, Y):
        A = X
        for layer in (1, 2):
            A = jax.nn.relu(p[f"W{layer}"] @ A + p[f"b{layer}"])
        out = jax.nn.sigmoid(p["W3"] @ A + p["b3"])
        return -jnp.mean(Y * jnp.log(out) + (1 - Y) * jnp.log(1 - out))

    flat = jnp.concatenate([v.reshape(-1) for v in jparams.values()])
    mapped = jax.jit(jax.vmap(lambda t: cost(layout.unflatten(t, xp=xp), jX, jY)))

    def by_hand():
        eye = jnp.eye(flat.shape[0], dtype=flat.dtype) * run.EPSILON
        return ((mapped(flat + eye) - mapped(flat - eye)) / (2 * run.EPSILON)).block_until_ready()

    def ours():
        out = evaluation.central_differences(
            cost, jparams, (jX, jY), layout=layout, epsilon=run.EPSILON, xp=xp, mode="auto", paths={}
        )
        return [v.block_until_ready() for v in out.values()]

    ours(), by_hand()
    theirs_s, ours_s = interleaved(by_hand, ours, rounds)
    return {
        "row": "JAX S, warm: evaluation (2N rows, verified) vs jit(vmap) by hand",
        "fast_s": theirs_s,
        "slow_s": ours_s,
        "ratio": ours_s / theirs_s,
        "target": "<= 2x",
    }


def table(rows: list[dict]) -> str:
    lines = [f"{'row':<84} {'fast':>10} {'slow':>10} {'ratio':>8}  target"]
    for r in rows:
        lines.append(
            f"{r['row']:<84} {r['fast_s']:>10.4f} {r['slow_s']:>10.4f} {r['ratio']:>8.3f}  {r['target']}"
        )
        if r.get("note"):
            lines.append(f"    {r['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, M instead of L")
    parser.add_argument("--sizes", default=None, help="sizes for the verification rows, e.g. M,L")
    options = parser.parse_args()
    rounds = 3 if options.quick else 7
    sizes = (options.sizes or ("M" if options.quick else "M,L")).split(",")
    rows = [verification_row(size) for size in sizes]
    rows += [loop_row(rounds), float_row(rounds)]
    for name, make in (
        ("torch", lambda: [torch_row(s, rounds) for s in ("S", "M")]),
        ("jax", lambda: [jax_row(rounds)]),
    ):
        try:
            rows += make()
        except ImportError as exc:
            rows.append(
                {
                    "row": f"{name}: not installed ({exc})",
                    "fast_s": 0.0,
                    "slow_s": 0.0,
                    "ratio": 0.0,
                    "target": "",
                }
            )
    print(table(rows))
    out = ROOT / "bench" / "results" / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "machine": platform.platform(),
                "python": platform.python_version(),
                "quick": options.quick,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
