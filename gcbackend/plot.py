"""Pictures of a report: per-parameter differences on a log axis, and where the errors are.

matplotlib is an optional extra (``pip install 'gcbackend[plot]'``), imported only when a
function here is called, so ``import gcbackend`` never needs it. ``ax=None`` draws on a new
pyplot figure (what Jupyter shows); pass an ``Axes`` to draw into your own figure.
``plot_report`` builds a complete figure without pyplot, for scripts and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .backends import to_host

__all__ = ["plot_differences", "plot_errors", "plot_report", "require_matplotlib"]

# The verdict → bar colour; "fail" in the red every reader associates with it.
_COLOURS = {"pass": "#2a9d8f", "fail": "#d62828", "inconclusive": "#f4a261"}
_INSTALL = "pip install 'gcbackend[plot]'"


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or ``ImportError`` saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"gcbackend's plots need matplotlib, which is not installed: {_INSTALL}") from exc
    return matplotlib


def _new_axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    require_matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, layout="constrained")[1]


def _verdict(result: Any) -> str:
    # ``verdict`` where the report has one; otherwise pass/fail from ``passed``.
    verdict = getattr(result, "verdict", None)
    return verdict if verdict in _COLOURS else ("pass" if result.passed else "fail")


def plot_differences(report: Any, ax: Any = None) -> Any:
    """Bar chart of each parameter's difference on a log axis, against the threshold.

    One bar per parameter, in the report's order, coloured by verdict and labelled with its
    value; a dashed line at ``report.threshold``; a dotted noise-floor line where the report
    estimates one (``noise_floor`` or ``expected``) and a short dotted mark over each bar
    whose parameter has its own ``expected`` difference (what a correct gradient would
    show). A difference of exactly 0 is drawn at the bottom of the axis. Returns the Axes.
    Raises ``ImportError`` (with the pip command) when matplotlib is missing.
    """
    require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    results = list(report.parameters.values())
    ax = _new_axes(ax, (max(4.0, 1.1 * len(results) + 2.0), 4.0))
    differences = [float(p.difference) for p in results]
    finite = [d for d in differences if d > 0 and math.isfinite(d)]
    # A log axis cannot show 0: such bars start and end at a floor below everything else.
    floor = min([*finite, float(report.threshold)]) / 10.0
    heights = [d if d > 0 and math.isfinite(d) else floor for d in differences]
    verdicts = [_verdict(p) for p in results]
    positions = list(range(len(results)))
    ax.bar(positions, heights, width=0.7, color=[_COLOURS[v] for v in verdicts], zorder=2)
    ax.set_yscale("log")
    ax.set_xticks(positions, labels=[f"{p.name}\n{tuple(p.shape)}" for p in results])
    for x, height, difference in zip(positions, heights, differences):
        ax.annotate(
            f"{difference:.1e}",
            (x, height),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
            zorder=4,  # over the dotted "expected" marks
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )

    handles = [Patch(color=_COLOURS[v], label=v) for v in _COLOURS if v in verdicts]
    threshold = float(report.threshold)
    own = [float(getattr(p, "threshold", threshold)) for p in results]
    per_parameter = any(not math.isclose(t, threshold, rel_tol=1e-9) for t in own)
    # With per-parameter thresholds (from each tensor's measured noise) each bar is judged
    # against its own mark; the full-width line is then the threshold of the "all" row.
    label = f"threshold {threshold:.1e}" + (" (all parameters)" if per_parameter else "")
    style = {"color": "black", "linestyle": "--", "linewidth": 1.0 if per_parameter else 1.2}
    ax.axhline(threshold, label=label, **({**style, "color": "0.45"} if per_parameter else style))
    handles.append(Line2D([], [], label=label, **({**style, "color": "0.45"} if per_parameter else style)))
    if per_parameter:
        ax.hlines(
            own,
            [x - 0.45 for x in positions],
            [x + 0.45 for x in positions],
            colors="black",
            linestyles="--",
            linewidth=1.6,
            zorder=3,
            label="threshold per parameter",
        )
        handles.append(
            Line2D([], [], color="black", linestyle="--", linewidth=1.6, label="threshold per parameter")
        )
    expected = [(x, getattr(p, "expected", None)) for x, p in zip(positions, results)]
    expected = [(x, float(e)) for x, e in expected if e is not None and e > 0]
    # A report-wide noise floor is drawn as a line, unless each bar has its own mark.
    noise_floor = getattr(report, "noise_floor", None)
    if noise_floor is None and not expected:
        noise_floor = getattr(report, "expected", None)
    if noise_floor is not None:
        noise_floor = float(noise_floor)
        label = f"noise floor {noise_floor:.1e}"
        ax.axhline(noise_floor, color="0.35", linestyle=":", linewidth=1.2, label=label)
        handles.append(Line2D([], [], color="0.35", linestyle=":", label=label))
    if expected:
        xs, values = zip(*expected)
        ax.hlines(
            values,
            [x - 0.4 for x in xs],
            [x + 0.4 for x in xs],
            colors="0.15",
            linestyles=":",
            linewidth=2,
            zorder=3,
            label="expected if correct",
        )
        handles.append(Line2D([], [], color="0.15", linestyle=":", linewidth=2, label="expected if correct"))
    own = own if per_parameter else []

    ax.set_ylabel("difference  ‖g − ĝ‖ / (‖g‖ + ‖ĝ‖)")
    ax.set_xlim(-0.6, len(results) - 0.4)
    # From a whole decade below the smallest bar or line (so every bar shows) to where the
    # tallest bar, with its value label, fills three quarters of the height: the legend
    # goes in the free quarter at the top.
    shown = [*heights, threshold, *own, *(v for _, v in expected)]
    if noise_floor is not None and noise_floor > 0:
        shown.append(noise_floor)
    low = math.floor(math.log10(min(shown)) - 0.3)
    high = low + (math.log10(max(shown)) + 0.4 - low) / 0.75
    ax.set_ylim(10.0**low, 10.0**high)
    ax.grid(axis="y", which="major", color="0.9", zorder=0)
    ax.legend(handles=handles, loc="upper left", fontsize="small", ncols=min(len(handles), 3))
    overall = _verdict(report)
    ax.set_title(
        f"gradient check: {overall} — difference {float(report.difference):.2e} "
        f"({report.dtype}, epsilon={_number(report.epsilon)})"
    )
    return ax


def plot_errors(report: Any, name: str, ax: Any = None) -> Any:
    """Heatmap of |analytic − numeric| over parameter ``name``, with the worst cell boxed.

    The image array is exactly |analytic_grad − numeric_grad| (float64, on the host); a 0-d
    parameter is drawn as (1, 1), a 1-d one as a row, more than two axes as (first, rest).
    Cells are labelled with their values when there are few. NaN (finite differences the
    cost made NaN/Inf) shows grey. Returns the Axes. Raises ``KeyError`` naming the
    parameters for an unknown ``name``, ``ImportError`` when matplotlib is missing.
    """
    require_matplotlib()
    import numpy as np  # host-side drawing data; the arrays come through to_host
    from matplotlib.patches import Rectangle

    if name not in report.parameters:
        raise KeyError(f"no parameter {name!r} in this report; it has {', '.join(report.parameters)}")
    result = report.parameters[name]
    analytic = np.asarray(to_host(result.analytic_grad), dtype=np.float64)
    numeric = np.asarray(to_host(result.numeric_grad), dtype=np.float64)
    errors = _grid(np.abs(analytic - numeric))
    ax = _new_axes(ax, (max(3.5, 0.6 * errors.shape[1] + 2.5), max(2.5, 0.5 * errors.shape[0] + 1.5)))

    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["Reds"].with_extremes(bad="0.7")
    finite = errors[np.isfinite(errors)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(errors, cmap=colours, vmin=0.0, vmax=top, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="|analytic − numeric|", shrink=0.9)
    rows, columns = errors.shape
    if rows * columns <= 64:
        for (row, column), value in np.ndenumerate(errors):
            ax.text(
                column,
                row,
                f"{value:.1e}",
                ha="center",
                va="center",
                fontsize="x-small",
                color="white" if np.isfinite(value) and value > 0.6 * top else "black",
            )
    if finite.size:
        row, column = np.unravel_index(int(np.nanargmax(errors)), errors.shape)
        ax.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(columns))
    ax.set_yticks(range(rows))
    if columns > 16:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rows > 16:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    screen = getattr(report, "mode", None) == "directions"
    ax.set_xlabel("direction k (uₖᵀ∇J)" if screen else "column")
    ax.set_ylabel("" if screen else "row")
    what = f"{columns} random directions" if screen else str(tuple(result.shape))
    ax.set_title(
        f"{name}: {what}\n{_verdict(result)}, difference {float(result.difference):.2e}"
        if screen
        else f"{name} {what}\n{_verdict(result)}, difference {float(result.difference):.2e}",
        fontsize="medium",
    )
    return ax


def plot_report(report: Any, errors: Sequence[str] | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` (no pyplot): the differences, then error heatmaps.

    ``errors`` names the parameters to draw heatmaps for; by default the failing ones
    (``report.faults``, at most three), or the worst parameter when none fails. Save it
    with ``figure.savefig("check.png")``.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    if errors is None:
        errors = list(getattr(report, "faults", ()))[:3] or [
            max(report.parameters.values(), key=lambda p: p.difference).name
        ]
    figure = Figure(figsize=(6.0 + 4.0 * len(errors), 4.6), layout="constrained")
    widths = [max(1.5, 0.9 * len(report.parameters))] + [
        _width(report.parameters[name].analytic_grad) for name in errors
    ]
    axes = figure.subplots(1, 1 + len(errors), width_ratios=widths, squeeze=False)[0]
    plot_differences(report, ax=axes[0])
    for name, ax in zip(errors, axes[1:]):
        plot_errors(report, name, ax=ax)
    return figure


def _grid(values: Any) -> Any:
    """``values`` as a 2-d array: () → (1, 1), (n,) → (1, n), (a, b, …) → (a, b·…)."""
    if values.ndim == 0:
        return values.reshape(1, 1)
    if values.ndim == 1:
        return values.reshape(1, -1)
    return values.reshape(values.shape[0], -1)


def _width(grad: Any) -> float:
    shape = tuple(grad.shape)
    columns = 1 if len(shape) == 0 else (shape[0] if len(shape) == 1 else math.prod(shape[1:]))
    return min(3.0, max(1.0, 0.35 * columns + 0.8))


def _number(value: Any) -> str:
    return value if isinstance(value, str) else f"{float(value):g}"
