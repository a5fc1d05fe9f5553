"""A model of a million parameters: bounded memory, the fast screen and the sampled check in
seconds, and what a full check would cost.

What is measured
    The ReLU MLP 1000-1000-1 (m = 64, float64, ``mlp.random_case``; N = 1,002,001, 99.8 % of
    it in W1), correct backprop from ``mlp.backward``, on NumPy:

    * ``fast screen``: ``gc.check(..., mode="directions", directions=8)``, 4·8·4 + 1 = 129
      evaluations whatever N is;
    * ``sampled check``: ``gc.check(..., sample=64)``, 64 seeded coordinates per tensor;
    * both again with one element of W1 off by a relative 1e-2 (is the bug seen?);
    * ``full check``: the stacked evaluation timed on 64 coordinates of every tensor (±ε at the
      notebook's ε = 1e-7, the default chunking), and extrapolated per tensor to all of its
      coordinates: Σ_t 2·n_t·(seconds per row of t). Two hours is not worth running to
      confirm; the note says it is an extrapolation;
    * peak memory: VmHWM of /proc/self/status (ru_maxrss elsewhere) after each row, against
      the memory budget (256 MiB of perturbed copies by default).

Usage: ``python bench/million.py [--dims 1000,1000,1] [--m 64] [--out PATH]``. Prints a
table; writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gcbackend as gc  # noqa: E402
from gcbackend import evaluation  # noqa: E402
from gcbackend.models import mlp  # noqa: E402
from gcbackend.params import Layout  # noqa: E402

SUBSET = 64


def peak_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call):
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="1000,1000,1")
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    dims = [int(d) for d in options.dims.split(",")]

    X, Y, params = mlp.random_case(dims, options.m, seed=0)
    grads = mlp.backward(params, X, Y)
    n = sum(p.size for p in params.values())
    wrong = dict(grads)
    wrong["W1"] = grads["W1"].copy()
    flat = np.abs(wrong["W1"]).reshape(-1)
    bad = int(np.argmax(flat))  # the largest element: a bug where it matters most
    wrong["W1"].reshape(-1)[bad] *= 1.01
    bad_index = tuple(int(i) for i in np.unravel_index(bad, wrong["W1"].shape))
    base = peak_mib()
    rows = []

    def record(label, seconds, report, note=""):
        rows.append(
            {
                "method": label,
                "seconds": seconds,
                "verdict": None if report is None else report.verdict,
                "evaluations": None if report is None else report.evaluations,
                "faults": None if report is None else list(report.faults),
                "worst_W1": None if report is None else list(report.parameters["W1"].worst_index),
                "peak_mib": peak_mib(),
                "note": note,
            }
        )
        print(
            f"{label:<34} {seconds:>10.2f} s  {rows[-1]['verdict'] or '':<12} "
            f"{rows[-1]['evaluations'] or '':>9}  peak {rows[-1]['peak_mib']:>7.0f} MiB  {note}",
            flush=True,
        )

    print(f"model {'-'.join(map(str, dims))}, m={options.m}: N = {n:,}; bug at W1{bad_index}")
    for label, g in (("correct", grads), ("W1 element off by 1e-2", wrong)):
        seconds, report = timed(
            lambda g=g: gc.check(mlp.cost, params, g, X, Y, mode="directions", directions=8, progress=False)
        )
        record(f"fast screen, {label}", seconds, report)
        seconds, report = timed(
            lambda g=g: gc.check(mlp.cost, params, g, X, Y, sample=SUBSET, progress=False)
        )
        record(f"sampled check (64/tensor), {label}", seconds, report)

    # The full check, per tensor: SUBSET coordinates of each at ±ε, the default chunking.
    import array_api_compat.numpy as xp

    layout = Layout(tuple(params), tuple(p.shape for p in params.values()))
    steps = {name: np.full(p.shape, 1e-7) for name, p in params.items()}
    total, per_row = 0.0, {}
    for name, p in params.items():
        k = min(SUBSET, p.size)
        chosen = {other: np.arange(0) for other in params}
        chosen[name] = np.linspace(0, p.size - 1, k).astype(np.int64)
        seconds, _ = timed(
            lambda chosen=chosen: evaluation.stencil_costs(
                mlp.cost,
                params,
                (X, Y),
                layout=layout,
                steps=steps,
                multipliers=(1.0, -1.0),
                xp=xp,
                elements=chosen,
            )
        )
        per_row[name] = seconds / (2 * k)
        total += 2 * p.size * per_row[name]
    record(
        "full check (2N rows, extrapolated)",
        total,
        None,
        "per row: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in per_row.items()),
    )
    print(f"peak memory {peak_mib():.0f} MiB (after building the case: {base:.0f} MiB); budget 256 MiB")

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": {"dims": dims, "m": options.m, "parameters": n, "bug_at": list(bad_index)},
        "peak_mib_after_case": base,
        "rows": rows,
        "seconds_per_row": per_row,
    }
    out = options.out or ROOT / "bench" / "results" / f"million-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
