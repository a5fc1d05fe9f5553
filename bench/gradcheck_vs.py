"""torch.autograd.gradcheck vs gc.check_function on the same custom autograd.Functions.

Three Functions, each correct and with one planted bug, in float64 and float32:

* ``affine_tanh`` — tanh(x @ w + b), x (8, 5), w (5, 3), b (3,); bug: dw doubled (input 1, ``w``);
* ``sine_pair`` — (a·sin(b), a + b), a, b (3, 4), two outputs; bug: db misses the second
  output's term (input 1, ``b``);
* ``softmax`` — softmax over the last axis, x (4, 6); bug: the backward leaves out the
  −y·Σ(g·y) term (input 0, ``x``).

For each: gradcheck's verdict (True, or the first line of its GradcheckError) and the input it
names, check_function's verdict and the inputs it names, and the median wall-clock time of
each (``--repeats``, default 5; gradcheck's float32 warnings silenced; PyTorch on one
thread, the faster for both on these sizes). A verdict is right when it fails exactly the
planted bugs and, for a bug, names its input. Prints a table and writes
bench/results/gradcheck_vs.json.

Run: ``python bench/gradcheck_vs.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gcbackend as gc  # noqa: E402


def affine_tanh(bug: bool) -> type:
    class AffineTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y = torch.tanh(x @ w + b)
            ctx.save_for_backward(x, w, y)
            return y

        @staticmethod
        def backward(ctx, grad):
            x, w, y = ctx.saved_tensors
            dz = grad * (1 - y * y)
            return dz @ w.T, x.T @ dz * (2 if bug else 1), dz.sum(0)

    return AffineTanh


def sine_pair(bug: bool) -> type:
    class SinePair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * torch.sin(b), a + b

        @staticmethod
        def backward(ctx, g_product, g_sum):
            a, b = ctx.saved_tensors
            return g_product * torch.sin(b) + g_sum, g_product * a * torch.cos(b) + (0 if bug else g_sum)

    return SinePair


def softmax(bug: bool) -> type:
    class Softmax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.softmax(x, dim=-1)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return y * grad if bug else y * (grad - (grad * y).sum(-1, keepdim=True))

    return Softmax


def cases() -> list[tuple[str, object, list[np.ndarray], str]]:
    """(name, Function factory, host inputs, the input its bug corrupts)."""
    rng = np.random.default_rng(0)
    return [
        (
            "affine_tanh",
            affine_tanh,
            [rng.standard_normal((8, 5)), 0.3 * rng.standard_normal((5, 3)), 0.1 * rng.standard_normal(3)],
            "w",
        ),
        ("sine_pair", sine_pair, [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))], "b"),
        ("softmax", softmax, [rng.standard_normal((4, 6))], "x"),
    ]


def gradcheck_says(fn, inputs) -> tuple[str, str]:
    """gradcheck's verdict and the input it names ("input 1"), from its first error line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input #0 ... is not a double precision floating point"
        try:
            return ("pass" if torch.autograd.gradcheck(fn, inputs) else "fail"), ""
        except Exception as error:  # GradcheckError
            line = str(error).splitlines()[0]
            named = re.search(r"with respect to input (\d+)", line)
            return "fail", (f"input {named.group(1)}" if named else line[:60])


def median_ms(repeats: int, call, *args) -> tuple[float, object]:
    """The median milliseconds of ``call(*args)`` over ``repeats`` runs, and its last result."""
    result, times = None, []
    for _ in range(repeats):
        began = time.perf_counter()
        result = call(*args)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(1)  # a small Function: one thread is fastest for both tools
    rows = []
    for name, factory, host, culprit in cases():
        for dtype in ("float64", "float32"):
            for bug in (False, True):
                fn = factory(bug).apply
                inputs = [torch.asarray(a, dtype=getattr(torch, dtype)).requires_grad_() for a in host]
                order = list(gc.check_function(fn, *inputs).parameters)
                names, culprit_index = (
                    ", ".join(f"{i}={n}" for i, n in enumerate(order)),
                    order.index(culprit),
                )
                gradcheck_ms, (g_verdict, g_named) = median_ms(options.repeats, gradcheck_says, fn, inputs)
                check_ms, report = median_ms(options.repeats, gc.check_function, fn, *inputs)
                rows.append(
                    {
                        "function": name,
                        "dtype": dtype,
                        "backward": f"bug in {culprit}" if bug else "correct",
                        "inputs": names,
                        "gradcheck": g_verdict,
                        "gradcheck_names": g_named,
                        "gradcheck_ms": gradcheck_ms,
                        "check_function": report.verdict,
                        "check_function_names": ", ".join(report.faults),
                        "check_function_ms": check_ms,
                        "right": {
                            "gradcheck": (g_verdict == "fail") == bug
                            and (not bug or g_named == f"input {culprit_index}"),
                            "check_function": (report.verdict == "fail") == bug
                            and set(report.faults) == ({culprit} if bug else set()),
                        },
                    }
                )
    header = (
        f"{'function':<12} {'dtype':<8} {'backward':<10} {'gradcheck':<10} {'names':<8} {'ms':>7}   "
        f"{'check_function':<14} {'names':<6} {'ms':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['function']:<12} {r['dtype']:<8} {r['backward']:<10} {r['gradcheck']:<10} "
            f"{r['gradcheck_names'] or '-':<8} {r['gradcheck_ms']:7.1f}   {r['check_function']:<14} "
            f"{r['check_function_names'] or '-':<6} {r['check_function_ms']:7.1f}"
        )
    right = {tool: sum(r["right"][tool] for r in rows) for tool in ("gradcheck", "check_function")}
    print(f"right verdicts (and, for a bug, the right input named): {right} of {len(rows)}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "repeats": options.repeats,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    (results / "gradcheck_vs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {results / 'gradcheck_vs.json'}")


if __name__ == "__main__":
    main()
