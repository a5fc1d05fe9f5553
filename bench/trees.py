"""Benchmark what parameter trees cost: the rebuild per cost call, and a whole check.

What is measured (NumPy, float64, this process; medians of ``--repeats`` timings, each the
mean of a loop)

* ``rebuild per call``: what the evaluation does before every cost call — the parameters with
  one tensor replaced, as the cost receives them (``Layout.wrap``) — for the seed case's
  flat dict W1..b3 (a plain ``dict(parts)``, as before trees) and for the same six arrays
  as the tree below (``optree.tree_unflatten`` of the treedef built once per check);
* ``prepare``: reading params and grads (``flatten_tree`` + ``match_tree``) for the flat
  seed dict and for the same six arrays as a tree ``{"layers": [(W1, b1), (W2, b2), (W3, b3)]}``;
* ``seed check``: ``gc.check`` of the seed case (auto settings), the flat dict against the
  same parameters as that tree (its cost unpacks the tree and calls the same model).

The two seed checks must agree on every difference (the same numbers, other names); the
script asserts it. The 1-minute load average is recorded: the machine may be shared.

Usage: ``python bench/trees.py [--repeats K] [--out PATH]``. Prints a table; writes JSON
to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import timeit
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _median_us(fn, number: int, repeats: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def _tree_of(flat):
    return {"layers": [(flat[f"W{k}"], flat[f"b{k}"]) for k in (1, 2, 3)]}


def _tree_cost(params, X, Y):
    from gcbackend.models import mlp

    flat = {}
    for k, (W, b) in enumerate(params["layers"], start=1):
        flat[f"W{k}"], flat[f"b{k}"] = W, b
    return mlp.cost(flat, X, Y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()

    import gcbackend as gc
    from gcbackend.models import mlp
    from gcbackend.params import Layout, flatten_tree, match_tree

    X, Y, flat = mlp.seed_case()
    grads = mlp.backward(flat, X, Y)
    tree, tree_grads = _tree_of(flat), _tree_of(grads)
    flat_layout, tree_layout = Layout.of(flat), Layout.of(tree)
    flat_parts = dict(flat)
    tree_parts = dict(zip(tree_layout.names, flatten_tree(tree).leaves))
    batch = flat["W2"][None]
    second = tree_layout.names[2]  # layers[1][0], the tree's W2
    r = options.repeats
    rows = [
        (
            "rebuild per call, flat dict (plain dict, as before trees)",
            _median_us(lambda: flat_layout.wrap({**flat_parts, "W2": batch}), 20000, r),
        ),
        (
            "rebuild per call, tree (optree treedef)",
            _median_us(lambda: tree_layout.wrap({**tree_parts, second: batch}), 20000, r),
        ),
        ("prepare, flat dict", _median_us(lambda: (flatten_tree(flat), match_tree(flat, grads)), 5000, r)),
        ("prepare, tree", _median_us(lambda: (flatten_tree(tree), match_tree(tree, tree_grads)), 5000, r)),
    ]
    flat_report = gc.check(mlp.cost, flat, grads, X, Y)
    tree_report = gc.check(_tree_cost, tree, tree_grads, X, Y)
    same = [p.difference for p in flat_report.parameters.values()] == [
        p.difference for p in tree_report.parameters.values()
    ]
    assert same and flat_report.difference == tree_report.difference, "tree and flat checks disagree"
    rows += [
        ("seed check, flat dict", _median_us(lambda: gc.check(mlp.cost, flat, grads, X, Y), 50, r)),
        ("seed check, tree", _median_us(lambda: gc.check(_tree_cost, tree, tree_grads, X, Y), 50, r)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'what':<{width}}  median µs")
    for name, value in rows:
        print(f"{name:<{width}}  {value:9.2f}")
    print(f"tree names: {', '.join(tree_report.parameters)}")
    result = {
        "bench": "trees",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "load_1min": os.getloadavg()[0],
        "repeats": r,
        "rows": [{"what": name, "median_us": value} for name, value in rows],
        "same_differences": same,
    }
    out = options.out or RESULTS / f"trees-{result['date'][:19].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
