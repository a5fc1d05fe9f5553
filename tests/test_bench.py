"""bench/speed.py, issue 21's speed table: its arithmetic, its plain loop and its JSON (never its timings)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

import gcbackend as gc
from gcbackend.models import mlp

ROOT = Path(__file__).resolve().parents[1]


def _load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


speed = _load_speed()


def test_a_ratio_is_the_median_of_the_paired_ratios_with_their_min_and_max():
    result = speed.ratios([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])  # per round: 2, 4, 3
    assert result["per_round"] == [2.0, 4.0, 3.0]
    assert (result["median"], result["min"], result["max"]) == (3.0, 2.0, 4.0)
    assert result["of_medians"] == 4.0  # median 4 over median 1: not the figure the row prints
    with pytest.raises(ValueError, match="as many A as B"):
        speed.ratios([1.0, 2.0], [1.0])


def test_a_row_holds_when_its_median_meets_the_target_in_the_targets_direction():
    at_least = speed.row_result(1, [5.0, 6.0, 4.0], [1.0, 1.0, 1.0])  # plain loop / check: >= 5x
    assert at_least["ratio"]["median"] == 5.0 and at_least["holds"] is True
    below = speed.row_result(1, [4.0, 6.0, 4.0], [1.0, 1.0, 1.0])
    assert below["ratio"]["median"] == 4.0 and below["holds"] is False
    at_most = speed.row_result(4, [1.4, 1.2, 1.3], [1.0, 1.0, 1.0])  # defaults / notebook: <= 1.3x
    assert at_most["holds"] is True and at_most["target"] == {"op": "<=", "value": 1.3, "text": "<= 1.3x"}
    assert speed.row_result(4, [1.5], [1.0])["holds"] is False
    informational = speed.row_result(12, [3.0], [1.0])
    assert informational["holds"] is None and informational["target"]["text"] == "informational"
    assert speed.Target(">=", 3).holds(float("nan")) is None


def test_rounds_alternate_their_order_and_stop_at_the_budget_once_the_minimum_is_done():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in ("a", "b")}
    times, results = speed.interleave(calls, rounds=4)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, …
    assert [len(times["a"]), len(times["b"])] == [4, 4] and results == {"a": "a", "b": "b"}
    order.clear()
    times, _ = speed.interleave(calls, rounds=50, warmup=False, budget_s=0.0, min_rounds=2)
    assert order == ["a", "b", "b", "a"] and len(times["b"]) == 2


def test_the_plan_gives_each_group_its_rows_rounds_and_budget_unless_rounds_are_fixed():
    specs = {s["group"]: s for s in speed.plan([1, 2, 5, 10, 11], quick=False, rounds=None, backend="numpy")}
    assert list(specs) == ["seed", "L", "jax"] and specs["seed"]["rows"] == [1, 2]
    assert specs["L"]["min_rounds"] == 2 and specs["L"]["budget_s"] == speed.BUDGET_S["L"][0]
    assert specs["jax"]["warm_rounds"] == speed.JAX_WARM_ROUNDS[0]
    fixed = speed.plan([1, 10], quick=True, rounds=4, backend="torch", blas_threads=1)
    assert [(s["rounds"], s.get("budget_s"), s["blas_threads"], s["backend"]) for s in fixed] == [
        (4, None, 1, "torch"),
        (4, None, 1, "torch"),
    ]
    assert fixed[1]["warm_rounds"] == 4


def test_the_floor_is_2n_forward_passes_at_the_gemm_rate():
    size = speed.runbench.Size("tiny", (4, 3, 1), 5)
    n = 4 * 3 + 3 + 3 * 1 + 1
    forward = 2 * 5 * (4 * 3 + 3 * 1)
    assert size.n_params == n
    assert speed.floor_seconds(size, 2.0) == pytest.approx(2 * n * forward / 2e9, rel=1e-15)


def test_the_plain_loop_gives_the_notebooks_difference_on_the_planted_bugs():
    X, Y, params = mlp.seed_case()
    buggy = mlp.backward_with_planted_bugs(params, X, Y)
    report = gc.check(speed.notebook_cost, params, buggy, X, Y, **gc.NOTEBOOK)
    assert speed.plain_loop(speed.notebook_cost, params, buggy, X, Y) == pytest.approx(
        report.difference, rel=1e-6
    )
    # and gradients named dW1, db1, … (the notebook's backward_propagation_n) are found too
    renamed = {f"d{name}": value for name, value in buggy.items()}
    assert speed.plain_loop(speed.notebook_cost, params, renamed, X, Y) == pytest.approx(
        report.difference, rel=1e-6
    )
    assert isinstance(speed.scalar_cost(params, X, Y), float)


def test_the_notebook_cost_is_mlp_cost_and_broadcasts_over_stacked_parameters():
    X, Y, params = mlp.random_case((4, 3, 2, 1), 6, seed=1)
    single = speed.notebook_cost(params, X, Y)
    assert np.shape(single) == () and single == pytest.approx(float(mlp.cost(params, X, Y)), rel=1e-13)
    other = dict(params, W2=params["W2"] + 0.5)
    stacked = speed.notebook_cost(dict(params, W2=np.stack([params["W2"], other["W2"]])), X, Y)
    assert stacked.shape == (2,) and stacked.dtype == np.float64
    np.testing.assert_allclose(stacked, [single, speed.notebook_cost(other, X, Y)], rtol=1e-13)


def test_a_group_runs_interleaved_rounds_and_records_each_rows_fields():
    rows = speed.run_group({"group": "scalar", "rows": [8], "rounds": 3, "dims": [4, 3, 1], "m": 5})
    (row,) = rows
    assert row["row"] == 8 and row["status"] == "ok" and row["group"] == "scalar" and row["rounds"] == 3
    assert (row["a"]["label"], row["b"]["label"]) == ("check() defaults", "plain loop")
    a, b = row["a"]["times_s"], row["b"]["times_s"]
    assert len(a) == len(b) == 3
    assert row["a"]["median_s"] == statistics.median(a) and row["b"]["min_s"] == min(b)
    assert row["ratio"]["per_round"] == [x / y for x, y in zip(a, b)]
    assert row["ratio"]["median"] == statistics.median(row["ratio"]["per_round"])
    assert row["holds"] == (row["ratio"]["median"] <= 1.5)
    assert row["check"]["verdict"] == "pass" and row["check"]["evaluations"] > 2 * 21
    assert row["plain_loop_difference"] < 1e-6
    assert len(row["load_1min"]) == 2 and len(row["library_sha256"]) == 64


def test_the_script_writes_every_selected_row_to_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--rows", "1,2", "--rounds", "2", "--blas-threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == [1, 2]
    assert result["rounds"] == 2 and result["quick"] is False and result["backend"] == "numpy"
    pools = [
        p for p in result["rows"][0]["thread_pools"] if p["api"] in ("openblas", "mkl", "blis", "openmp")
    ]
    assert (
        pools and {p["threads"] for p in pools} == {1} and result["blas_threads"] == 1
    )  # reached the worker
    assert "load average" in result["uptime"]["before"] and len(result["git"]["commit"]) == 40
    for row in result["rows"]:
        assert row["status"] == "ok" and len(row["a"]["times_s"]) == 2
        assert row["a"]["label"] == "plain loop" and row["check"]["verdict"] == "pass"
        assert row["ratio"]["median"] == pytest.approx(
            statistics.median(x / y for x, y in zip(row["a"]["times_s"], row["b"]["times_s"])), rel=1e-12
        )
    printed = capsys.readouterr().out
    assert "plain loop / check(**gc.NOTEBOOK)" in printed and ">= 5x" in printed and str(out) in printed


def test_a_missing_library_makes_its_row_say_not_installed(monkeypatch, capsys):
    real = speed.importlib.util.find_spec
    monkeypatch.setattr(speed.importlib.util, "find_spec", lambda name: None if name == "jax" else real(name))
    args = speed.parse_args(["--rows", "10,11"])
    result = speed.run_all(args)
    assert [(r["row"], r["status"], r["holds"]) for r in result["rows"]] == [
        (10, "not installed", None),
        (11, "not installed", None),
    ]
    assert result["rows"][0]["note"] == "not installed: jax"
    assert "not installed" in speed.table(result["rows"]).splitlines()[-1]


def test_quick_skips_l_and_bad_rows_are_refused(capsys):
    assert speed.parse_args(["--quick"]).rows == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]
    assert speed.parse_args([]).rows == list(range(1, 13))
    assert speed.parse_args(["--rows", "6,5"]).rows == [5, 6]
    with pytest.raises(SystemExit):
        speed.parse_args(["--rows", "13"])
    assert "unknown rows [13]" in capsys.readouterr().err
