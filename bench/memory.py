"""Peak memory of one check against ``memory_budget``: how much a check allocates beyond
the parameters themselves, at 10⁶ and 10⁷ parameters (issue 20, item 4).

What is measured
    The notebook's 1-D linear model J(θ) = Σ θ_i·x_i (``gcbackend.models.linear``: a cost
    as cheap as a cost can be, so the check's own arrays dominate), θ and x float64 vectors
    of N elements, the correct gradient x. For each configuration, in a fresh Python process:

    1. a warm-up check of the same options on N = 1,000 (imports, the host allocator
       primed), then θ, x and the gradient of N elements are built;
    2. the peak RSS is reset (``echo 5 > /proc/self/clear_refs``) and the RSS read: the
       baseline, with the parameters, the gradient and the data arg in it;
    3. one ``gc.check``; the peak RSS after it (VmHWM of /proc/self/status) minus the
       baseline is the check's growth.

    Configurations: N = 10⁶ and 10⁷; the fast screen (``mode="directions"``, k = 8 and 32
    directions) and a sampled check (``sample=64``); ``workers=1`` and ``2``;
    ``memory_budget`` 16 MiB and 256 MiB. The parameters' own size is N·8 bytes. A check
    refused before it runs (a budget below one perturbed copy of θ) is listed with its error.

    Where /proc/self/clear_refs cannot be written (not Linux), the peak is ru_maxrss, which
    cannot be reset: the growth is then an upper bound that includes building θ.

Usage: ``python bench/memory.py [--sizes 1000000,10000000] [--quick] [--out PATH]``
(``--quick``: 10⁶ only). Prints a table; writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MARK = "MEMORY-BENCH-ROW "
MIB = 2**20
CHECKS = {
    "screen k=8": {"mode": "directions", "directions": 8},
    "screen k=32": {"mode": "directions", "directions": 32},
    "sample=64": {"sample": 64},
}
BUDGETS_MIB = (16, 256)
WORKERS = (1, 2)


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux ≥ 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib() -> float:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(n: int, check: str, workers: int, budget_mib: int) -> dict:
    """One configuration, in this (fresh) process."""
    import gc as garbage

    import numpy as np

    sys.path.insert(0, str(ROOT))
    import gcbackend as gc
    from gcbackend.models import linear

    options = {**CHECKS[check], "workers": workers, "memory_budget": budget_mib * MIB}

    def case(size: int):
        rng = np.random.default_rng(0)
        theta, x = rng.standard_normal(size), rng.standard_normal(size)
        return theta, x, linear.gradient(theta, x)

    theta, x, grad = case(1000)
    gc.check(linear.cost, theta, grad, x, **options)  # imports, caches, the primed allocator
    theta, x, grad = case(n)
    del case
    garbage.collect()
    reset = _reset_peak()
    baseline = _rss_mib()
    start = time.perf_counter()
    try:
        report = gc.check(linear.cost, theta, grad, x, **options)
    except gc.GradCheckError as exc:
        outcome, error = "refused", f"{type(exc).__name__}: {exc}"
    else:
        outcome, error = report.verdict, None
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    return {
        "n": n,
        "check": check,
        "workers": workers,
        "budget_mib": budget_mib,
        "params_mib": n * 8 / MIB,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "growth_mib": peak - baseline,
        "peak_reset": reset,
        "seconds": seconds,
        "outcome": outcome,
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="parameter counts, e.g. 1000000")
    parser.add_argument("--quick", action="store_true", help="10⁶ parameters only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # a subprocess: JSON
    options = parser.parse_args(argv)
    if options.row is not None:
        print(MARK + json.dumps(run_row(**json.loads(options.row))))
        return 0

    sizes = [1_000_000] if options.quick else [int(s) for s in options.sizes.split(",")]
    rows = []
    for n, check, workers, budget in itertools.product(sizes, CHECKS, WORKERS, BUDGETS_MIB):
        spec = {"n": n, "check": check, "workers": workers, "budget_mib": budget}
        command = [sys.executable, __file__, "--row", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((line for line in done.stdout.splitlines() if line.startswith(MARK)), None)
        if line is None:  # the process died (out of memory?): say so, keep going
            rows.append(
                {**spec, "params_mib": n * 8 / MIB, "outcome": "crashed", "error": done.stderr[-500:]}
            )
        else:
            rows.append(json.loads(line[len(MARK) :]))
        row = rows[-1]
        growth = f"{row['growth_mib']:.0f} MiB" if "growth_mib" in row else row["outcome"]
        print(f"  N={n:.0e} {check} workers={workers} budget={budget} MiB: {growth}", file=sys.stderr)

    header = (
        f"{'N':>6} {'check':<12} {'workers':>7} {'budget':>8} {'θ size':>8} {'growth':>9} "
        f"{'growth/budget':>13} {'seconds':>8}  outcome"
    )
    print("peak RSS growth of one check (fresh process; growth = peak − RSS with θ, x, grad built)")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "growth_mib" not in row:
            print(
                f"{row['n']:>6.0e} {row['check']:<12} {row['workers']:>7} {row['budget_mib']:>4} MiB {'':>28}  {row['outcome']}"
            )
            continue
        outcome = row["outcome"] if row["error"] is None else row["error"].split(";")[0][:70]
        print(
            f"{row['n']:>6.0e} {row['check']:<12} {row['workers']:>7} {row['budget_mib']:>4} MiB "
            f"{row['params_mib']:>4.0f} MiB {row['growth_mib']:>5.0f} MiB {row['growth_mib'] / row['budget_mib']:>12.2f}× "
            f"{row['seconds']:>8.1f}  {outcome}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    reset = all(row.get("peak_reset", True) for row in rows)
    print(f"machine: {machine}; peak reset before each check: {reset}; load {os.getloadavg()[0]:.2f}")
    out = options.out or RESULTS / f"memory-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
