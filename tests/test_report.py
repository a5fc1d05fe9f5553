"""report: what the user reads is true, agrees with itself, and HTML shows what the text shows."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

import gcbackend as gc
from gcbackend.models import mlp
from gcbackend.report import ElementError, ParameterResult, Report


def _seed(backend, grads="correct", **options):
    X, Y, params = mlp.seed_case(xp=backend.xp, device=backend.device)
    backward = mlp.backward if grads == "correct" else mlp.backward_with_planted_bugs
    return gc.check(mlp.cost, params, backward(params, X, Y), X, Y, **options)


def _rows(report: Report) -> dict[str, list[str]]:
    """The table's rows of str(report), split on runs of two or more spaces."""
    lines = str(report).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---------")) + 1
    rows = {}
    for line in lines[start:]:
        cells = re.split(r"\s{2,}", line)
        if cells[0] not in (*report.parameters, "all"):
            break
        rows[cells[0]] = cells
    return rows


def _verdict_cells(report: Report) -> dict[str, str]:
    rows = _rows(report)
    return {name: rows[name][3 if report.expected is None else 4] for name in rows}


def test_notebook_rows_never_contradict_the_overall_sentence(backend):
    # b1 and b3 (correct) are over 2e-7 on their own at ε = 1e-7; the notebook's rule
    # passes the overall difference. No row may then read "fail".
    report = _seed(backend, **gc.NOTEBOOK)
    assert report.verdict == "pass"
    words = _verdict_cells(report)
    assert words["all"] == "pass"
    assert "fail" not in " ".join(words.values())
    for name in report.parameters:
        assert words[name] == "pass", name
    text = str(report)
    assert "Your backward propagation works perfectly fine! difference = " in text
    assert "Over the threshold on their own: b1 (difference 3.3e-07), b3 (difference 2.5e-07)" in text


def test_notebook_failures_name_only_the_planted_bugs(backend):
    # b3 (correct) is over 2e-7 on its own: inconclusive and said so, never at fault.
    report = _seed(backend, "buggy", **gc.NOTEBOOK)
    text = str(report)
    assert "Parameters at fault, worst first: b1 (difference 0.6), W2 (difference 0.33)\n" in text
    assert "Over the threshold but within 10× of it, inconclusive: b3 (difference 2.5e-07)\n" in text
    assert _verdict_cells(report)["b3"] == "inconclusive"
    assert "no error bars at a fixed epsilon and threshold" in text


def test_element_lists_show_only_elements_that_are_off(backend):
    for options in ({}, dict(gc.NOTEBOOK)):
        report = _seed(backend, "buggy", **options)
        text = str(report)
        listed = re.findall(r"^  (\w+)\[([\d, ]*)\]: .*\|error\| (\S+), relative (\S+)$", text, re.M)
        assert listed, text
        for name, index, absolute, relative in listed:
            assert float(absolute) > 0 and float(relative) > 0, text
            (element,) = [
                e for e in report.parameters[name].top if e.index == tuple(int(v) for v in index.split(","))
            ]
            bound = element.tolerance
            if bound is None:  # no error bars: formula (2) of this one element over the threshold
                bound = report.threshold * (abs(element.analytic) + abs(element.numeric))
            assert element.absolute > bound
        # b1[4, 0] and W2[0, 0] agree exactly (both 0): never listed as errors.
        assert "b1[4, 0]" not in text and "W2[0, 0]" not in text
        assert "|error| 0," not in text


def test_a_fault_with_no_single_element_off_says_so():
    element = ElementError((0,), 1.0, 1.0 + 1e-12, 1e-12, 1e-12, tolerance=1e-9)
    result = ParameterResult(
        name="w",
        shape=(3,),
        difference=1e-3,
        worst_index=(0,),
        analytic=1.0,
        numeric=1.0 + 1e-12,
        threshold=1e-9,
        analytic_grad=None,
        numeric_grad=None,
        verdict="fail",
        expected=1e-10,
        top=(element,),
        checked=3,
    )
    report = _report({"w": result}, verdict="fail", expected=1e-10)
    assert str(report).splitlines()[-1] == (
        "  w: no single element is off by more than its error bar; the difference over all 3 values is 0.001"
    )
    assert report.summary() == "fail: w (difference 0.001)"


def test_summary_names_what_the_verdict_rests_on():
    result = ParameterResult(
        name="b3",
        shape=(1, 1),
        difference=2e-3,
        worst_index=(0, 0),
        analytic=1.0,
        numeric=1.001,
        threshold=1e-2,
        analytic_grad=None,
        numeric_grad=None,
        verdict="inconclusive",
        expected=1e-2,
        checked=1,
    )
    assert _report({"b3": result}, verdict="inconclusive").summary() == (
        "inconclusive: b3 (difference 0.002, expected 1.0e-02)"
    )
    passing = _report({"b3": result}, verdict="pass", difference=1.5e-10)
    assert passing.summary() == "pass: difference 1.5e-10"


def _report(parameters, verdict, expected=None, difference=1e-3):
    return Report(
        difference=difference,
        threshold=2e-9,
        epsilon="auto",
        mode="stacked",
        backend="numpy",
        device="cpu",
        dtype="float64",
        evaluations=13,
        parameters=parameters,
        verdict=verdict,
        expected=expected,
        auto_threshold=True,
    )


def _text_of(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", markup))


@pytest.mark.parametrize("grads", ["correct", "buggy"])
@pytest.mark.parametrize(
    "options", [{}, dict(gc.NOTEBOOK), {"mode": "directions"}], ids=["auto", "notebook", "screen"]
)
def test_html_shows_everything_the_text_shows(backend, grads, options):
    report = _seed(backend, grads, **options)
    markup = report._repr_html_()
    assert markup.startswith("<table") and markup.endswith("</table>")
    text = str(report).splitlines()
    caption = re.search(r"<caption[^>]*>(.*?)</caption>", markup).group(1)
    assert html.unescape(caption) == text[0]  # the same header, thresholds formatted alike
    headers = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", markup)]
    assert headers == re.split(r"\s{2,}", text[1])  # the expected column too
    cells = [_text_of(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", markup, re.S)]
    for row in _rows(report).values():
        for cell in row:
            assert cell in cells, cell
    below = html.unescape(re.search(r"<pre[^>]*>(.*?)</pre>", markup, re.S).group(1)).splitlines()
    table_end = 3 + len(report.parameters) + 1
    assert below == text[table_end:]  # the sentence, faults, elements, kinks, notes


def test_nonfinite_counts_are_of_the_checked_values():
    result = ParameterResult(
        name="w",
        shape=(10,),
        difference=0.0,
        worst_index=(1,),
        analytic=1.0,
        numeric=1.0,
        threshold=2e-7,
        analytic_grad=None,
        numeric_grad=None,
        nonfinite=((3,),),
        verdict="fail",
        checked=4,
    )
    text = str(_report({"w": result}, verdict="fail"))
    assert "w: J is not finite at θ ± h, even at smaller steps, for 1 of 4 elements" in text
    assert _verdict_cells(_report({"w": result}, verdict="fail"))["w"] == "fail (NaN/Inf)"


def test_element_error_tolerance_is_the_judges():
    report = _seed(np_backend(), "buggy")
    for result in report.parameters.values():
        for e in result.top:
            assert e.tolerance is not None and e.tolerance >= 0
    notebook = _seed(np_backend(), "buggy", **gc.NOTEBOOK)
    assert all(e.tolerance is None for r in notebook.parameters.values() for e in r.top)


def np_backend():
    from gcbackend.backends import resolve

    return resolve("numpy", [np.zeros(1)])
