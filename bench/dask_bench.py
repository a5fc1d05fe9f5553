"""Benchmark check(..., client=): the L model on 1 and 2 local Dask worker processes.

What is measured
    The wall time of a full check of the L model (256-128-64-1, m=64, N = 41,217, float64,
    correct backprop) at the notebook's settings (``**gc.NOTEBOOK``: 2N = 82,434 cost
    evaluations), by

    * ``gcbackend stacked``: ``gc.check`` in one process, the single-process stacked evaluation,
      NumPy's BLAS with its default threads (every core);
    * ``gcbackend stacked, 1 BLAS thread``: the same with OPENBLAS/OMP/MKL_NUM_THREADS=1,
      which is what each Dask worker gets (Dask pins a worker's BLAS to one thread);
    * ``dask, k worker process(es)``: the same call with ``client=`` a ``LocalCluster`` of k
      worker processes, one thread each.

    Each row runs in a fresh subprocess. Cluster start-up is not timed (it is reported); each
    timed call includes scattering the inputs, every task, and gathering the costs. A
    warm-up check of the seed case (imports, on the workers too), then the median of
    ``--repeats`` calls. Every row's report is compared with the first row's, bit for bit
    (a digest of the printed report and every numeric gradient). The 1-minute load average
    is recorded: the machine may be shared.

Usage: ``python bench/dask_bench.py [--workers 1,2] [--repeats K] [--quick] [--out PATH]``.
Prints a table; writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DIMS, M = (256, 128, 64, 1), 64
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MARK = "DASK-BENCH-ROW "


def run_row(workers: int, repeats: int) -> dict:
    """One row, in this process: ``workers`` = 0 for the local check, else a LocalCluster."""
    import numpy as np

    import gcbackend as gc
    from gcbackend.models import mlp

    def timed(options):
        X, Y, params = mlp.seed_case()
        gc.check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, **gc.NOTEBOOK, **options)
        X, Y, params = mlp.random_case(DIMS, M, seed=0)
        grads = mlp.backward(params, X, Y)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            report = gc.check(mlp.cost, params, grads, X, Y, **gc.NOTEBOOK, **options)
            times.append(time.perf_counter() - start)
        return times, report

    started = None
    if workers == 0:
        times, report = timed({})
    else:
        from distributed import Client, LocalCluster

        start = time.perf_counter()
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        with cluster, Client(cluster) as client:
            started = time.perf_counter() - start
            times, report = timed({"client": client})
    digest = hashlib.sha256(str(report).encode())
    for result in report.parameters.values():
        digest.update(np.asarray(result.numeric_grad).tobytes())
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "difference": report.difference,
        "evaluations": report.evaluations,
        "digest": digest.hexdigest(),
        "cluster_start_s": started,
        "load_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker process counts, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one timed call per row")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # a subprocess
    options = parser.parse_args(argv)
    repeats = 1 if options.quick else options.repeats
    if options.row is not None:
        print(MARK + json.dumps(run_row(options.row, repeats)))
        return 0

    plan = [("gcbackend stacked", 0, {}), ("gcbackend stacked, 1 BLAS thread", 0, ONE_THREAD)]
    for workers in (int(w) for w in options.workers.split(",")):
        plan.append((f"dask, {workers} worker process{'es' if workers > 1 else ''}", workers, {}))
    rows = []
    for method, workers, env in plan:
        command = [sys.executable, __file__, "--row", str(workers), "--repeats", str(repeats)]
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        line = next(line for line in done.stdout.splitlines() if line.startswith(MARK))
        rows.append({"method": method, **json.loads(line[len(MARK) :])})
        print(f"  {method}: median {rows[-1]['median_s']:.2f} s", file=sys.stderr)

    n = sum(n_out * n_in + n_out for n_in, n_out in itertools.pairwise(DIMS))
    reference = rows[0]
    print(
        f"L: {'-'.join(map(str, DIMS))}, m={M}, N={n:,}, gc.NOTEBOOK settings, "
        f"{reference['evaluations']:,} evaluations"
    )
    header = (
        f"{'method':<34} {'median':>9} {'speedup':>8} {'bitwise = first row':>19} {'start':>7} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        row["bitwise_equal_to_first_row"] = row["digest"] == reference["digest"]
        start = "" if row["cluster_start_s"] is None else f"{row['cluster_start_s']:.1f} s"
        print(
            f"{row['method']:<34} {row['median_s']:>7.2f} s {reference['median_s'] / row['median_s']:>7.2f}× "
            f"{row['bitwise_equal_to_first_row']!s:>19} {start:>7} {row['load_1min']:>5.2f}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}; timed calls per row: {repeats}; difference {reference['difference']:.3e}")
    out = options.out or RESULTS / f"dask-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model = {"dims": DIMS, "m": M, "n": n}
    out.write_text(json.dumps({"model": model, "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
