"""The result of a check: small frozen records and how they print."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["VERDICTS", "ElementError", "ParameterResult", "Report"]

PASS_SENTENCE = "Your backward propagation works perfectly fine!"
FAIL_SENTENCE = "There is a mistake in the backward propagation!"
INCONCLUSIVE_SENTENCE = "The gradient check is inconclusive!"
VERDICTS = ("pass", "fail", "inconclusive")


class ElementError(NamedTuple):
    """One checked value: where it is, both sides, and how far apart.

    ``index`` indexes the parameter's shape (for ``mode="directions"``: ``(k,)``, the k-th
    random direction). ``relative`` is |analytic − numeric| / max(|analytic|, |numeric|);
    ``tolerance`` the error this element may show and still be noise.
    A named tuple, not a frozen dataclass: a report holds top_k of them per parameter,
    and a frozen dataclass's __init__ cost ~3 µs each, a tenth of a seed-case check.
    """

    index: tuple[int, ...]
    analytic: float
    numeric: float
    absolute: float
    relative: float
    tolerance: float | None = None
    """The largest ``absolute`` that is still noise (the error bar the judge held this
    element to); None without error bars (a fixed epsilon and threshold)."""


@dataclass(frozen=True)
class ParameterResult:
    """One parameter's comparison.

    ``difference`` is formula (2) over this parameter's checked values. ``verdict`` is
    ``"pass"``, ``"fail"`` or ``"inconclusive"``; ``expected`` the difference a correct
    gradient would show at this step and precision (estimated from the same stacked pass;
    ``None`` with a fixed epsilon and threshold, the notebook's way), and ``threshold`` the
    difference this parameter was held to. ``top`` lists the worst checked values, worst
    first; ``worst_index``, ``analytic`` and ``numeric`` repeat the worst of them.
    ``analytic_grad`` and ``numeric_grad`` are the arrays compared, on the backend and
    device the check ran on (flat, for sampled and directional checks). ``kinks`` lists the
    elements at a kink, judged as subgradients; ``nonfinite`` the elements whose finite
    difference is NaN or Inf (left out of ``difference``; the parameter fails).
    ``path`` says how its perturbed rows were evaluated (``"broadcast"``, ``"vmap"`` or
    ``"loop"``) and ``path_reason`` why the faster paths were not taken ("" when none was
    refused).
    """

    name: str
    shape: tuple[int, ...]
    difference: float
    worst_index: tuple[int, ...]
    analytic: float
    numeric: float
    threshold: float
    analytic_grad: Any = field(repr=False, compare=False)
    numeric_grad: Any = field(repr=False, compare=False)
    nonfinite: tuple[tuple[int, ...], ...] = ()
    verdict: str = "pass"
    expected: float | None = None
    top: tuple[ElementError, ...] = ()
    kinks: tuple[tuple[int, ...], ...] = ()
    unbracketed: tuple[tuple[int, ...], ...] = ()
    """Elements at a kink whose analytic value lies outside the one-sided slopes: no proof of
    a bug where kinks of both signs meet, so the parameter is inconclusive (never a pass)."""
    checked: int = 0
    path: str = ""
    path_reason: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def size(self) -> int:
        size = 1
        for extent in self.shape:
            size *= extent
        return size


@dataclass(frozen=True)
class Report:
    """The result of ``gcbackend.check``.

    ``difference`` is formula (2), ‖grad − gradapprox‖₂ / (‖grad‖₂ + ‖gradapprox‖₂), over all
    checked values. ``verdict`` is ``"pass"``, ``"fail"`` or ``"inconclusive"``: with a fixed
    epsilon and threshold (the notebook's way) it is ``difference <= threshold`` and no
    parameter's own difference beyond 10 × threshold (see README-verdicts); otherwise a
    parameter failing fails the check, and one whose noise floor is too high to tell makes it
    inconclusive. ``expected`` is the difference a correct gradient would show (``None`` in
    the notebook's way). ``parameters`` maps each name to its ``ParameterResult``, in the
    user's order. ``notes`` says what was done beyond the obvious (upcasting, sampling).
    ``str(report)`` is a table and the verdict in words.
    """

    difference: float
    threshold: float
    epsilon: float | str
    mode: str
    backend: str
    device: str
    dtype: str
    evaluations: int
    parameters: Mapping[str, ParameterResult]
    verdict: str = "pass"
    expected: float | None = None
    order: int = 2
    notes: tuple[str, ...] = ()
    auto_threshold: bool = False

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def faults(self) -> tuple[str, ...]:
        """Parameters whose own verdict is fail, worst first."""
        failing = [p for p in self.parameters.values() if p.verdict == "fail"]
        return tuple(p.name for p in sorted(failing, key=lambda p: -p.difference))

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parameters.values())

    def __str__(self) -> str:
        view = _view(self)
        widths = [max(len(r[i]) for r in [view.columns, *view.rows]) for i in range(len(view.columns))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        return "\n".join(
            [
                view.header,
                line(view.columns),
                line(tuple("-" * w for w in widths)),
                *(line(r) for r in view.rows),
                *view.lines,
            ]
        )

    def summary(self) -> str:
        """One line: the verdict and the parameters it rests on, e.g.
        ``"fail: b1 (difference 0.6), W2 (difference 0.33)"`` (what ``assert_gradients``
        puts first, so pytest's one-line summary names them)."""
        if self.verdict == "pass":
            return f"pass: difference {self.difference:.2g}"
        if self.verdict == "fail":
            return "fail: " + ", ".join(self._named(_culprits(self)))
        vague = [p.name for p in self.parameters.values() if p.verdict == "inconclusive"]
        if not vague:
            return f"{self.verdict}: difference {self.difference:.2g}"
        return f"{self.verdict}: " + ", ".join(
            f"{n} (difference {self.parameters[n].difference:.2g}, expected "
            f"{_expected(self.parameters[n].expected) or 'not measured'})"
            for n in vague
        )

    def _evaluation(self) -> str:
        """One line saying how the rows were evaluated, when some parameter did not take the
        broadcast path (or was refused a faster one); "" otherwise."""
        results = list(self.parameters.values())
        if all(p.path in ("", "broadcast") and not p.path_reason for p in results) or self.mode == "loop":
            return ""
        groups: dict[tuple[str, str], list[str]] = {}
        for p in results:
            groups.setdefault((p.path, p.path_reason), []).append(p.name)
        parts = [
            f"{', '.join(names)} {path}" + (f" ({reason})" if reason else "")
            for (path, reason), names in groups.items()
        ]
        return "evaluation: " + "; ".join(parts)

    def plot(self, ax: Any = None) -> Any:
        """Per-parameter differences on a log axis against the threshold (and the noise
        floor where estimated); see ``gcbackend.plot.plot_differences``. Needs matplotlib
        (``pip install 'gcbackend[plot]'``). Returns the Axes."""
        from .plot import plot_differences

        return plot_differences(self, ax=ax)

    def plot_errors(self, name: str, ax: Any = None) -> Any:
        """Heatmap of |analytic − numeric| over parameter ``name``; see
        ``gcbackend.plot.plot_errors``. Needs matplotlib. Returns the Axes."""
        from .plot import plot_errors

        return plot_errors(self, name, ax=ax)

    def _repr_html_(self) -> str:
        """``str(report)`` as HTML, for Jupyter: the same header (as caption), the same table
        and the same lines below it, from the same rows; verdicts coloured."""
        from html import escape

        view = _view(self)
        colours = {"pass": "#2a9d8f", "fail": "#d62828", "inconclusive": "#e76f51"}
        verdict_column = view.columns.index("verdict")

        def row(cells: tuple[str, ...], kind: str, last: bool) -> str:
            out = []
            for i, cell in enumerate(cells):
                text = escape(cell)
                if i == 0:
                    text = f"<b>{text}</b>" if last else f"<code>{text}</code>"
                if i == verdict_column:
                    out.append(
                        f'<td style="color:{colours.get(kind, "inherit")};font-weight:bold">{text}</td>'
                    )
                else:
                    out.append(f"<td>{text}</td>")
            return "<tr>" + "".join(out) + "</tr>"

        body = "".join(
            row(cells, kind, i == len(view.rows) - 1)
            for i, (cells, kind) in enumerate(zip(view.rows, view.kinds))
        )
        head = "".join(f"<th>{escape(h)}</th>" for h in view.columns)
        foot = ""
        if view.lines:
            text = escape("\n".join(view.lines))
            foot = (
                f'<tfoot><tr class="gcbackend-lines"><td colspan="{len(view.columns)}">'
                f'<pre style="text-align:left;margin:0">{text}</pre></td></tr></tfoot>'
            )
        return (
            f'<table class="gcbackend-report"><caption style="text-align:left">{escape(view.header)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table>"
        )

    def _named(self, names) -> list[str]:
        return [f"{n} (difference {self.parameters[n].difference:.2g})" for n in names]


SAFETY_FACTOR = 10.0
"""How far beyond a fixed threshold a parameter's own difference must be to be at fault
(judge.SAFETY; repeated here because the report knows nothing of the judge)."""
NOTEBOOK_CAVEAT = (
    "(no error bars at a fixed epsilon and threshold: a difference near the threshold may be "
    "rounding noise of the finite differences; epsilon='auto' tells noise from bugs)"
)
COLUMNS = ("parameter", "shape", "difference", "expected", "verdict", "worst index", "analytic", "numeric")


class _View(NamedTuple):
    """What a report prints, once: ``str(report)`` and ``_repr_html_`` both render it."""

    header: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    kinds: tuple[str, ...]
    """Per row, the verdict it stands for ("pass", "fail", "inconclusive"), for colour."""
    lines: tuple[str, ...]
    """Everything below the table: the verdict in words, the faults, kinks, notes."""


def _expected(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _barred(report: Report) -> bool:
    """Whether the check measured error bars: else (the notebook's way) a parameter's own
    verdict is only its difference against the threshold, and the overall verdict is the
    notebook's rule on the overall difference."""
    return report.expected is not None


def _word(report: Report, p: ParameterResult) -> str:
    """The verdict column of a parameter. The judge keeps per-parameter verdicts consistent
    with the overall one (under the notebook's rule too: a passing check has no faults)."""
    return p.verdict + (" (NaN/Inf)" if p.nonfinite else "")


def _culprits(report: Report) -> tuple[str, ...]:
    """The parameters a failing verdict rests on, worst first: those failing on their own,
    else the one with the largest difference."""
    return report.faults or tuple(
        sorted(report.parameters, key=lambda n: -report.parameters[n].difference)[:1]
    )


def _is_off(report: Report, p: ParameterResult, e: ElementError) -> bool:
    """Whether an element is actually off: its error is above its own tolerance (the error
    bar the judge held it to) or, without error bars, formula (2) for this one element,
    |a − n| / (|a| + |n|), is over the threshold. Exact agreement is never off."""
    if not e.absolute > 0:  # zero, or NaN (listed with the NaN/Inf elements instead)
        return False
    if e.tolerance is not None:
        return e.absolute > e.tolerance
    return e.absolute > report.threshold * (abs(e.analytic) + abs(e.numeric))


def _where(report: Report, name: str, e: ElementError) -> str:
    """``W2[2, 0]``, or ``b1 direction 6`` for the fast screen (index (k,) is the k-th direction)."""
    return f"{name} direction {e.index[0]}" if report.mode == "directions" else f"{name}{list(e.index)}"


def _element_lines(report: Report, name: str) -> list[str]:
    p = report.parameters[name]
    off = [e for e in p.top if _is_off(report, p, e)]
    if not off:
        bar = "its error bar" if _barred(report) else "the threshold"
        return [
            f"  {name}: no single element is off by more than {bar}; the difference over all "
            f"{p.checked or p.size} values is {p.difference:.2g}"
        ]
    lines = [
        f"  {_where(report, name, e)}: analytic {e.analytic:.9g}, numeric {e.numeric:.9g}, "
        f"|error| {e.absolute:.3g}, relative {e.relative:.3g}"
        for e in off
    ]
    if len(off) == len(p.top) and p.checked > len(p.top):
        lines.append(f"  ({name}: the worst {len(off)} of {p.checked} values; top_k= lists more)")
    return lines


def _view(report: Report) -> _View:
    rows = [
        (
            p.name,
            str(p.shape),
            f"{p.difference:.3e}",
            _expected(p.expected),
            _word(report, p),
            str(p.worst_index),
            f"{p.analytic:.9g}",
            f"{p.numeric:.9g}",
        )
        for p in report.parameters.values()
    ]
    rows.append(
        (
            "all",
            f"N={report.size}",
            f"{report.difference:.3e}",
            _expected(report.expected),
            report.verdict,
            "",
            "",
            "",
        )
    )
    kinds = [p.verdict for p in report.parameters.values()] + [report.verdict]
    epsilon = report.epsilon if isinstance(report.epsilon, str) else f"{report.epsilon:g}"
    threshold = f"auto ({report.threshold:.1e})" if report.auto_threshold else f"{report.threshold:g}"
    header = (
        f"gradient check: backend {report.backend} on {report.device}, {report.dtype}, "
        f"epsilon={epsilon}, threshold={threshold}, order={report.order}, mode={report.mode}, "
        f"{report.evaluations} cost evaluations"
    )
    lines = []
    if report.verdict == "pass":
        lines.append(f"{PASS_SENTENCE} difference = {report.difference!r}")
        # Without error bars the notebook's rule judges the overall difference; a parameter
        # over the threshold on its own is then rounding noise at this epsilon, and said so.
        over = [
            p.name
            for p in report.parameters.values()
            if not _barred(report) and p.difference > report.threshold
        ]
        if over:
            lines.append(
                f"Over the threshold on their own: {', '.join(report._named(over))}; "
                "the notebook's rule judges the overall difference"
            )
            lines.append(NOTEBOOK_CAVEAT)
    elif report.verdict == "fail":
        lines.append(f"{FAIL_SENTENCE} difference = {report.difference!r}")
        culprits = _culprits(report)
        lines.append("Parameters at fault, worst first: " + ", ".join(report._named(culprits)))
        unsure = [p.name for p in report.parameters.values() if p.verdict == "inconclusive"]
        if unsure and not _barred(report):
            lines.append(
                f"Over the threshold but within {SAFETY_FACTOR:g}× of it, inconclusive: "
                f"{', '.join(report._named(unsure))}"
            )
            lines.append(NOTEBOOK_CAVEAT)
        for name in culprits:
            lines.extend(_element_lines(report, name))
    else:
        vague = [p for p in report.parameters.values() if p.verdict == "inconclusive"]
        screened = [p.name for p in vague if report.mode == "directions" and p.kinks and not p.unbracketed]
        noisy = [p.name for p in vague if not p.unbracketed and p.name not in screened]
        kinked = [p.name for p in vague if p.unbracketed]
        reasons = []
        if noisy:
            reasons.append(
                f"the finite differences are too noisy at this precision to tell for {', '.join(noisy)} "
                "(a correct gradient would show the 'expected' column): try float64 or a larger epsilon"
            )
        if kinked:
            reasons.append(
                f"{', '.join(kinked)} {'has elements' if len(kinked) == 1 else 'have elements'} on "
                "kinks that a correct gradient can also leave (listed below)"
            )
        if screened:
            reasons.append(
                f"the fast screen's directions through {', '.join(screened)} cross kinks, where an "
                "error in one element can hide: run the full check (mode='auto') on "
                + ("it" if len(screened) == 1 else "them")
            )
        if not reasons:
            reasons.append("some numbers of the judgement are not finite")
        lines.append(
            f"{INCONCLUSIVE_SENTENCE} difference = {report.difference!r}; " + "; ".join(reasons) + "."
        )
    for p in report.parameters.values():
        if p.unbracketed:
            lines.append(
                f"{p.name}: {len(p.unbracketed)} element(s) on a kink where the analytic value lies "
                f"outside the one-sided slopes: {_listed(p.unbracketed)}. Where kinks of both signs "
                "meet (overlapping max-pool windows with tied maxima, ReLUs entering with both signs) "
                "a correct gradient can do that, so they cannot be judged here: move the inputs off "
                "the kinks (e.g. add a little noise) and check again"
            )
        if p.kinks:
            lines.append(
                f"{p.name}: {len(p.kinks)} element(s) at a kink, judged as subgradients "
                f"(the one-sided slopes bracket the gradient): {_listed(p.kinks)}"
            )
        if p.nonfinite:
            lines.append(
                f"{p.name}: the cost returned NaN or Inf at θ ± ε for {len(p.nonfinite)} of "
                f"{p.checked or p.size} elements, left out of the differences: {_listed(p.nonfinite, 8)}"
            )
    evaluation = report._evaluation()
    if evaluation:
        lines.append(evaluation)
    lines.extend(f"note: {note}" for note in report.notes)
    return _View(header, COLUMNS, tuple(rows), tuple(kinds), tuple(lines))


def _listed(indices: tuple[tuple[int, ...], ...], most: int = 8) -> str:
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")
