"""The command line: ``gcbackend demo [--backend NAME]`` (also ``python -m gcbackend``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import check
from .backends import BACKEND_NAMES
from .errors import GradCheckError
from .models import linear, mlp


def demo(backend: str, mode: str) -> int:
    """The notebook, end to end: the 1-D check, then the N-D check with bugs and fixed."""
    print(f"# 1-D gradient check, J(θ) = θ·x, backend={backend}\n")
    for x, theta in ((2, 4), (3, 4)):
        report = check(linear.cost, theta, linear.gradient(theta, x), x, backend=backend, mode=mode)
        print(f"x = {x}, θ = {theta}: dθ = {x}")
        print(report, end="\n\n")
    X, Y, params = mlp.seed_case()
    print("# N-D gradient check: the fraud-detection net LINEAR→RELU→LINEAR→RELU→LINEAR→SIGMOID")
    print("# backward propagation with the notebook's planted bugs (dW2 × 2, db1 × 4)\n")
    buggy = mlp.backward_with_planted_bugs(params, X, Y)
    print(check(mlp.cost, params, buggy, X, Y, backend=backend, mode=mode), end="\n\n")
    print("# the same check after fixing the backward propagation\n")
    print(check(mlp.cost, params, mlp.backward(params, X, Y), X, Y, backend=backend, mode=mode))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gcbackend", description="Gradient checking on any array backend.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="run the course notebook's checks and print the reports")
    run.add_argument("--backend", default="numpy", help=f"one of {', '.join(BACKEND_NAMES)} (default numpy)")
    run.add_argument("--mode", default="stacked", choices=("stacked", "loop"))
    options = parser.parse_args(argv)
    try:
        return demo(options.backend, options.mode)
    except GradCheckError as exc:
        print(f"gcbackend: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
