"""The command line: ``gcbackend demo [--backend NAME] [--plot FILE.png]``, ``gcbackend --version``
(also ``python -m gcbackend``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import NOTEBOOK, __version__, check
from .backends import BACKEND_NAMES, resolve
from .errors import GradCheckError
from .evaluation import MODES
from .models import linear, mlp


def demo(backend: str, mode: str, plot: str | None = None) -> int:
    """The notebook, end to end, with its settings; then the same checks with gcbackend's."""
    print(
        f"# The course notebook's checks, with its settings (epsilon=1e-7, threshold=2e-7), backend={backend}\n"
    )
    for x, theta in ((2, 4), (3, 4)):
        print(f"## 1-D: J(θ) = θ·x, x = {x}, θ = {theta}, dθ = {x}")
        report = check(
            linear.cost, theta, linear.gradient(theta, x), x, backend=backend, mode=mode, **NOTEBOOK
        )
        print(report, end="\n\n")
    X, Y, params = mlp.seed_case()
    buggy = mlp.backward_with_planted_bugs(params, X, Y)
    fixed = mlp.backward(params, X, Y)
    print("## N-D: the fraud-detection net LINEAR→RELU→LINEAR→RELU→LINEAR→SIGMOID")
    print("## backward propagation with the notebook's planted bugs (dW2 × 2, db1 × 4)")
    print(check(mlp.cost, params, buggy, X, Y, backend=backend, mode=mode, **NOTEBOOK), end="\n\n")
    print("## the same check after fixing the backward propagation")
    print(check(mlp.cost, params, fixed, X, Y, backend=backend, mode=mode, **NOTEBOOK), end="\n\n")
    print("# gcbackend's defaults: a step per element and a threshold from the measured noise")
    print("# (epsilon='auto', threshold='auto'): bugs named, correct parameters never over\n")
    print("## planted bugs")
    bugged = check(mlp.cost, params, buggy, X, Y, backend=backend, mode=mode)
    print(bugged, end="\n\n")
    if plot is not None:
        from .plot import plot_report

        plot_report(bugged).savefig(plot, dpi=120)
        print(f"wrote the pictures of this check to {plot}", end="\n\n")
    print("## fixed")
    print(check(mlp.cost, params, fixed, X, Y, backend=backend, mode=mode), end="\n\n")
    print("## the fast screen: 8 random directions per tensor, 4·8·6 + 1 evaluations whatever N is")
    print(check(mlp.cost, params, buggy, X, Y, backend=backend, mode="directions"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gcbackend", description="Gradient checking on any array backend.")
    parser.add_argument("--version", action="version", version=f"gcbackend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="run the course notebook's checks and print the reports")
    run.add_argument("--backend", default="numpy", help=f"one of {', '.join(BACKEND_NAMES)} (default numpy)")
    run.add_argument(
        "--mode",
        default="auto",
        # Not vmap: the demo's model adds its biases in place, which torch.func.vmap refuses.
        choices=tuple(m for m in MODES if m not in ("directions", "vmap")),
        help="how the ±ε rows are evaluated (default auto: broadcast, vmap or loop, verified)",
    )
    run.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also save pictures of the check with the planted bugs (needs 'gcbackend[plot]')",
    )
    options = parser.parse_args(argv)
    if options.plot is not None:
        from .plot import require_matplotlib

        try:  # before any check runs: a missing extra should not cost the whole demo
            require_matplotlib()
        except ImportError as exc:
            print(f"gcbackend: error: {exc}", file=sys.stderr)
            return 2
    try:
        resolve(options.backend, [])  # before any section is printed: an unusable backend is only an error
        if options.backend == "jax":  # the notebook is float64; JAX is float32 unless told
            import jax

            jax.config.update("jax_enable_x64", True)
        return demo(options.backend, options.mode, options.plot)
    except (GradCheckError, OSError) as exc:  # OSError: the picture could not be written
        print(f"gcbackend: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
