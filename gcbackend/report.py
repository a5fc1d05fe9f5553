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
    resolution: float | None = None
    """What a pass guarantees: formula (2) between the given gradient and the true one is at most
    this (the error bars × (SAFETY + 1) plus the backprop's rounding allowance, relative), over
    the smooth elements; None without error bars (a fixed epsilon and threshold)."""
    reason: str = ""
    """Why the verdict is inconclusive: "noise" (the finite differences are too noisy),
    "precision" (the gradient's own precision, its forward's rounding included, is too coarse
    to tell 1 %), "nonfinite" (J is not finite near θ), "kinks" (elements on kinks a correct
    gradient can also leave), "screen" (the fast screen crossed kinks), "random" (J(θ) changed
    between calls); "" otherwise."""
    independent: bool = False
    """J was bit for bit unchanged under every perturbation of this parameter, yet its gradient
    is not zero: the cost does not read it (a cost that reads its parameters from elsewhere)."""
    ties: int = 0
    """Directions moving several of its kink elements together, checked (tied maxima)."""
    ties_off: tuple[tuple[float, float], ...] = ()
    """(analytic, numeric) of each of those directions where J is smooth and the gradient's
    directional derivative is off by more than its error bar, worst first: a fail no single
    element shows (a max-pool backward that routes to every tied maximum)."""

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
    coverage: str = "elements"
    """``"elements"`` (every element), ``"sample"`` or ``"directions"`` (the fast screen)."""
    checked: int = 0
    """How many values were compared (N for a full check)."""
    random: tuple[float, float] | None = None
    """J(θ) at the start and at the end of the check, where they differed: the cost is random."""

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def faults(self) -> tuple[str, ...]:
        """Parameters whose own verdict is fail, worst first (differences equal to 3 digits, as
        printed, in the parameters' order: the last bits of a difference are rounding)."""
        failing = [p for p in self.parameters.values() if p.verdict == "fail"]
        return tuple(p.name for p in sorted(failing, key=lambda p: -float(f"{p.difference:.3g}")))

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
        """One short line saying how the rows were evaluated, when some parameter did not take
        the broadcast path or took it only when retried; "" otherwise. The reasons, in full,
        are in each ``ParameterResult.path_reason``."""
        results = list(self.parameters.values())
        if self.mode == "loop" or all(p.path in ("", "broadcast") and not p.path_reason for p in results):
            return ""
        groups: dict[str, list[str]] = {}
        for p in results:
            label = (p.path or "broadcast") + (" (retried)" if "retried" in p.path_reason else "")
            groups.setdefault(label, []).append(p.name)
        parts = [f"{', '.join(names)} {label}" for label, names in groups.items()]
        return "evaluation: " + "; ".join(parts) + " (why: report.parameters[name].path_reason)"

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
COLUMNS = ("parameter", "shape", "difference", "resolution", "verdict", "worst index", "analytic", "numeric")


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
    if not off and p.ties_off:
        analytic, numeric = p.ties_off[0]
        return [
            f"  {name}: no single element is off by more than its error bar, but moving its tied kink "
            f"elements together ({len(p.ties_off)} of {p.ties} such directions) J changes otherwise than "
            f"the gradient says (worst: analytic {analytic:.9g}, numeric {numeric:.9g}): does the "
            "backward route to every tied maximum? (a subgradient routes to one)"
        ]
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


def _coverage(report: Report) -> str:
    """What was compared, where it is not every element: "80 of 5560 elements (sampled)"."""
    if report.coverage == "sample":
        return f"sampled, {report.checked} of {report.size} elements"
    if report.coverage == "directions":
        per = report.checked // max(len(report.parameters), 1)
        counted = (
            f"{report.checked} of {report.size}"
            if report.checked < report.size
            else f"{report.checked} values for {report.size} elements"
        )
        return f"fast screen, {counted}: directional derivatives along {per} seeded directions per tensor"
    return ""


def _view(report: Report) -> _View:
    rows = [
        (
            p.name,
            str(p.shape),
            f"{p.difference:.3e}",
            _expected(p.resolution),
            _word(report, p),
            str(p.worst_index),
            f"{p.analytic:.9g}",
            f"{p.numeric:.9g}",
        )
        for p in report.parameters.values()
    ]
    coverage = _coverage(report)
    rows.append(
        (
            "all",
            (
                f"{report.checked} of N={report.size}"
                if report.coverage == "sample"
                else f"{report.checked} u, N={report.size}"
            )
            if coverage
            else f"N={report.size}",
            f"{report.difference:.3e}",
            _expected(_overall_resolution(report)),
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
        f"{report.evaluations} cost evaluations" + (f", {coverage}" if coverage else "")
    )
    lines = []
    if report.verdict == "pass":
        if coverage:
            lines.append(
                f"The values checked agree with the finite differences ({coverage}); the rest was not "
                f"checked. difference = {report.difference!r}"
            )
        else:
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
        lines.append(
            f"{FAIL_SENTENCE} difference = {report.difference!r}" + (f" ({coverage})" if coverage else "")
        )
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
        lines.append(
            f"{INCONCLUSIVE_SENTENCE} difference = {report.difference!r}"
            + (f" ({coverage})" if coverage else "")
            + "; "
            + "; ".join(_reasons(report))
            + "."
        )
    for p in report.parameters.values():
        if p.independent:
            lines.append(
                f"J does not depend on {p.name}: J was bit for bit unchanged under every perturbation of it, "
                "yet its gradient is not zero. Does the cost read the parameters it is given? (A cost that "
                "reads them from elsewhere, e.g. net.params, is checked by gc.check_in_place.)"
            )
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
                + (f"; tied kinks also moved together along {p.ties} direction(s)" if p.ties else "")
            )
        if p.nonfinite:
            where = "θ ± h, even at smaller steps," if report.epsilon == "auto" else "θ ± ε"
            lines.append(
                f"{p.name}: J is not finite at {where} for {len(p.nonfinite)} of {p.checked or p.size} "
                f"elements; left out of the differences: {_listed(p.nonfinite, 8)}"
            )
    evaluation = report._evaluation()
    if evaluation:
        lines.append(evaluation)
    lines.extend(f"note: {note}" for note in report.notes)
    return _View(header, COLUMNS, tuple(rows), tuple(kinds), tuple(lines))


def _overall_resolution(report: Report) -> float | None:
    values = [p.resolution for p in report.parameters.values() if p.resolution is not None]
    return max(values) if values else None


def _reasons(report: Report) -> list[str]:
    """Why an inconclusive check could not decide, one clause per cause, with what to do."""
    vague = [p for p in report.parameters.values() if p.verdict == "inconclusive"]
    by = lambda reason: [p.name for p in vague if p.reason == reason]  # noqa: E731
    reasons = []
    if report.random is not None:
        first, second = report.random
        reasons.append(
            f"J(θ) changed between two calls with the same parameters ({first!r}, then {second!r}): "
            "a random dropout mask? a module in train mode? Make the cost deterministic (masks drawn "
            "once, a fixed seed, eval mode) and check again"
        )
    if names := by("noise"):
        low = any(word in report.dtype for word in ("float16", "bfloat16")) or "float32" in report.dtype
        reasons.append(
            f"the finite differences are too noisy to tell for {', '.join(names)}: J's own rounding, "
            "divided by the step, is above 0.1 % of these gradients"
            + (
                " (evaluated without float64: pass upcast=True, or enable jax_enable_x64)"
                if not _evaluated_in_float64(report)
                else " (J is a small difference of large numbers, or these gradients are tiny against J)"
            )
            if not low or _evaluated_in_float64(report)
            else f"the finite differences are too noisy to tell for {', '.join(names)}"
        )
    if names := by("precision"):
        reasons.append(
            f"the gradient of {', '.join(names)} is only as precise as its dtype and its forward pass's "
            "rounding allow (measured), too coarse to tell it from one off by 5 % (the 'resolution' column): "
            "compute the gradient in float64 to check it more finely"
        )
    if names := by("nonfinite"):
        reasons.append(
            f"J is not finite near θ for some elements of {', '.join(names)} even at smaller steps "
            "(a domain boundary within the step: log, sqrt, 1/x of a parameter near 0; listed below)"
        )
    if names := by("kinks"):
        reasons.append(
            f"{', '.join(names)} {'has elements' if len(names) == 1 else 'have elements'} on "
            "kinks that a correct gradient can also leave (listed below)"
        )
    if names := by("screen"):
        reasons.append(
            f"the fast screen's directions through {', '.join(names)} cross kinks, where an "
            "error in one element can hide: run the full check (mode='auto') on "
            + ("it" if len(names) == 1 else "them")
        )
    if not reasons:
        reasons.append("some numbers of the judgement are not finite")
    return reasons


def _evaluated_in_float64(report: Report) -> bool:
    return not any("without float64" in note or "upcast=False" in note for note in report.notes) or any(
        "evaluated in float64" in note for note in report.notes
    )


def _listed(indices: tuple[tuple[int, ...], ...], most: int = 8) -> str:
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")
