"""plot: the differences chart, the error heatmaps, the HTML table and ``demo --plot``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import host

import gcbackend as gc
from gcbackend.cli import main
from gcbackend.models import linear, mlp

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")  # no display: render to memory
plt = pytest.importorskip("matplotlib.pyplot")

from gcbackend.plot import plot_differences, plot_errors, plot_report  # noqa: E402

OPTIONS = {"epsilon": 1e-4, "threshold": 2e-7}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _buggy_report(backend=None):
    kw = {} if backend is None else {"xp": backend.xp, "device": backend.device}
    X, Y, params = mlp.seed_case(**kw)
    return gc.check(mlp.cost, params, mlp.backward_with_planted_bugs(params, X, Y), X, Y, **OPTIONS)


class _With:
    """A report (or parameter result) with extra attributes, as later fields would add."""

    def __init__(self, inner, **extra):
        self._inner = inner
        self.__dict__.update(extra)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_differences_one_bar_per_parameter_on_a_log_axis_against_the_threshold():
    report = _buggy_report()
    ax = report.plot()
    assert isinstance(ax, matplotlib.axes.Axes)
    assert ax.get_yscale() == "log"
    bars = ax.patches
    assert len(bars) == 6
    heights = [bar.get_height() for bar in bars]
    np.testing.assert_allclose(heights, [p.difference for p in report.parameters.values()], rtol=1e-12)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"{p.name}\n{p.shape}" for p in report.parameters.values()]
    thresholds = [line for line in ax.get_lines() if line.get_label().startswith("threshold")]
    assert len(thresholds) == 1
    assert list(thresholds[0].get_ydata()) == [2e-7, 2e-7]
    # Failing bars are red, passing ones not; every bar is inside the axis.
    red = matplotlib.colors.to_rgba("#d62828")
    assert [bar.get_facecolor() == red for bar in bars] == [n in report.faults for n in report.parameters]
    low, high = ax.get_ylim()
    assert low < min(heights) and max(heights) < high and low < 2e-7 < high
    assert "fail" in ax.get_title()


def test_differences_draw_the_noise_floor_and_expected_marks():
    report = _buggy_report()
    parameters = {n: _With(p, expected=1e-10) for n, p in report.parameters.items()}
    ax = plot_differences(_With(report, noise_floor=3e-9, parameters=parameters))
    floors = [line for line in ax.get_lines() if line.get_label().startswith("noise floor")]
    assert len(floors) == 1 and list(floors[0].get_ydata()) == [3e-9, 3e-9]
    marks = [c for c in ax.collections if c.get_label() == "expected if correct"]
    assert len(marks) == 1 and len(marks[0].get_segments()) == 6
    assert all(segment[0][1] == 1e-10 for segment in marks[0].get_segments())
    assert ax.get_ylim()[0] < 1e-10


def test_differences_draw_a_zero_difference_at_the_bottom():
    report = _buggy_report()
    parameters = {n: _With(p, difference=0.0) if n == "b2" else p for n, p in report.parameters.items()}
    _, ax = plt.subplots()
    assert plot_differences(_With(report, parameters=parameters), ax=ax) is ax
    bar = ax.patches[list(parameters).index("b2")]
    smallest = min(p.difference for p in report.parameters.values() if p.name != "b2")
    assert 0 < bar.get_height() < smallest and ax.get_ylim()[0] < bar.get_height()
    assert "0.0e+00" in [t.get_text() for t in ax.texts]


def test_errors_heatmap_is_abs_analytic_minus_numeric(backend):
    report = _buggy_report(backend)
    for name, grid in (("W2", (3, 5)), ("b1", (5, 1)), ("b3", (1, 1))):
        fig, ax = plt.subplots()
        assert report.plot_errors(name, ax=ax) is ax
        (image,) = ax.images
        result = report.parameters[name]
        expected = np.abs(host(result.analytic_grad) - host(result.numeric_grad))
        assert image.get_array().shape == grid
        np.testing.assert_array_equal(np.asarray(image.get_array()), expected.reshape(grid))
        assert name in ax.get_title()
        assert len(fig.axes) == 2  # the heatmap and its colour bar
    # The worst cell of W2 is boxed where the report says it is.
    fig, ax = plt.subplots()
    plot_errors(report, "W2", ax=ax)
    (box,) = [p for p in ax.patches if not p.get_fill()]
    row, column = report.parameters["W2"].worst_index
    assert box.get_xy() == (column - 0.5, row - 0.5)
    with pytest.raises(KeyError, match="W1, b1, W2"):
        report.plot_errors("W4")


@pytest.mark.parametrize(("theta", "grid"), [(4.0, (1, 1)), (np.asarray([1.0, 2.0, 3.0]), (1, 3))])
def test_errors_heatmap_of_0d_and_1d_parameters(theta, grid):
    x = 2.0 if isinstance(theta, float) else np.asarray([4.0, 5.0, 6.0])
    report = gc.check(linear.cost, theta, linear.gradient(theta, x) * 1.5, x, **OPTIONS)
    ax = report.plot_errors("theta")
    (image,) = ax.images
    analytic = host(report.parameters["theta"].analytic_grad)
    numeric = host(report.parameters["theta"].numeric_grad)
    np.testing.assert_array_equal(np.asarray(image.get_array()), np.abs(analytic - numeric).reshape(grid))


def test_plot_report_puts_the_chart_and_heatmaps_in_one_figure():
    report = _buggy_report()
    figure = plot_report(report, errors=["b1", "W2"])
    assert isinstance(figure, matplotlib.figure.Figure)
    chart, *rest = figure.axes
    assert chart.get_yscale() == "log" and len(chart.patches) == 6
    assert sum(len(ax.images) for ax in rest) == 2  # plus two colour bars
    default = plot_report(report)  # the failing parameters
    assert sum(len(ax.images) for ax in default.axes) == len(report.faults[:3])


def test_repr_html_is_a_table_naming_every_parameter():
    report = _buggy_report()
    html = report._repr_html_()
    assert html.startswith("<table") and html.endswith("</table>")
    for name in report.parameters:
        assert f"<code>{name}</code>" in html
    for column in ("parameter", "shape", "difference", "verdict", "worst index", "analytic", "numeric"):
        assert f"<th>{column}</th>" in html
    assert html.count("<tr>") == 1 + len(report.parameters) + 1  # header, parameters, "all"
    assert "fail" in html and "numpy" in html
    assert f"{report.parameters['W2'].difference:.3e}" in html


def test_missing_matplotlib_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    report = _buggy_report()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'gcbackend\[plot\]'"):
        report.plot()
    with pytest.raises(ImportError, match=r"gcbackend\[plot\]"):
        report.plot_errors("W2")
    assert main(["demo", "--plot", str(tmp_path / "check.png")]) == 2
    assert "gcbackend[plot]" in capsys.readouterr().err
    assert not (tmp_path / "check.png").exists()


def test_demo_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "check.png"
    assert main(["demo", "--plot", str(path)]) == 0
    assert f"wrote the pictures of this check to {path}" in capsys.readouterr().out
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_demo_plot_to_an_unwritable_place_is_an_error(tmp_path, capsys):
    assert main(["demo", "--plot", str(tmp_path / "no" / "such" / "dir" / "check.png")]) == 2
    assert "gcbackend: error:" in capsys.readouterr().err


def test_differences_mark_each_parameters_own_threshold():
    report = _buggy_report()
    own = {name: 1e-8 * (i + 1) for i, name in enumerate(report.parameters)}
    parameters = {n: _With(p, threshold=own[n]) for n, p in report.parameters.items()}
    ax = plot_differences(_With(report, parameters=parameters))
    (marks,) = [c for c in ax.collections if c.get_label() == "threshold per parameter"]
    assert [segment[0][1] for segment in marks.get_segments()] == list(own.values())
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("threshold")]
    assert list(line.get_ydata()) == [2e-7, 2e-7] and "all parameters" in line.get_label()
    # Uniform thresholds (an explicit threshold=) draw the one line only.
    ax = plot_differences(report)
    assert not [c for c in ax.collections if c.get_label() == "threshold per parameter"]
