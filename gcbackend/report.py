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
    random direction). ``relative`` is |analytic − numeric| / max(|analytic|, |numeric|).
    A named tuple, not a frozen dataclass: a report holds top_k of them per parameter,
    and a frozen dataclass's __init__ cost ~3 µs each, a tenth of a seed-case check.
    """

    index: tuple[int, ...]
    analytic: float
    numeric: float
    absolute: float
    relative: float


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
    epsilon and threshold (the notebook's way) it is ``difference <= threshold``; otherwise a
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
        header = (
            "parameter",
            "shape",
            "difference",
            "expected",
            "verdict",
            "worst index",
            "analytic",
            "numeric",
        )

        def expected(value: float | None) -> str:
            return "" if value is None else f"{value:.1e}"

        rows = [
            (
                p.name,
                str(p.shape),
                f"{p.difference:.3e}",
                expected(p.expected),
                p.verdict + (" (NaN/Inf)" if p.nonfinite else ""),
                str(p.worst_index),
                f"{p.analytic:.9g}",
                f"{p.numeric:.9g}",
            )
            for p in self.parameters.values()
        ]
        rows.append(
            (
                "all",
                f"N={self.size}",
                f"{self.difference:.3e}",
                expected(self.expected),
                self.verdict,
                "",
                "",
                "",
            )
        )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        epsilon = self.epsilon if isinstance(self.epsilon, str) else f"{self.epsilon:g}"
        threshold = f"auto ({self.threshold:.1e})" if self.auto_threshold else f"{self.threshold:g}"
        lines = [
            f"gradient check: backend {self.backend} on {self.device}, {self.dtype}, "
            f"epsilon={epsilon}, threshold={threshold}, order={self.order}, mode={self.mode}, "
            f"{self.evaluations} cost evaluations",
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows),
        ]
        if self.verdict == "pass":
            lines.append(f"{PASS_SENTENCE} difference = {self.difference!r}")
            over = [p.name for p in self.parameters.values() if p.verdict != "pass"]
            if over:
                lines.append(
                    "Per parameter over the threshold (at this epsilon, likely rounding noise of the "
                    "finite differences; epsilon='auto' tells noise from bugs): "
                    + ", ".join(self._named(over))
                )
        elif self.verdict == "fail":
            lines.append(f"{FAIL_SENTENCE} difference = {self.difference!r}")
            culprits = self.faults or tuple(
                sorted(self.parameters, key=lambda n: -self.parameters[n].difference)[:1]
            )
            lines.append("Parameters at fault, worst first: " + ", ".join(self._named(culprits)))
            for name in culprits:
                for e in self.parameters[name].top:
                    lines.append(
                        f"  {name}{list(e.index)}: analytic {e.analytic:.9g}, numeric {e.numeric:.9g}, "
                        f"|error| {e.absolute:.3g}, relative {e.relative:.3g}"
                    )
        else:
            vague = [p.name for p in self.parameters.values() if p.verdict == "inconclusive"]
            lines.append(
                f"{INCONCLUSIVE_SENTENCE} difference = {self.difference!r}; the finite differences "
                f"are too noisy at this precision to tell for {', '.join(vague)} (a correct gradient "
                "would show the 'expected' column). Try float64, order=4, or a larger epsilon."
            )
        for p in self.parameters.values():
            if p.kinks:
                lines.append(
                    f"{p.name}: {len(p.kinks)} element(s) at a kink, judged as subgradients "
                    f"(the one-sided slopes bracket the gradient): {_listed(p.kinks)}"
                )
            if p.nonfinite:
                lines.append(
                    f"{p.name}: the cost returned NaN or Inf at θ ± ε for {len(p.nonfinite)} of "
                    f"{p.size} elements, left out of the differences: {_listed(p.nonfinite, 8)}"
                )
        evaluation = self._evaluation()
        if evaluation:
            lines.append(evaluation)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

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
        """The table of ``str(report)`` as HTML, for Jupyter."""
        from html import escape

        def verdict(result: Any) -> str:
            named = getattr(result, "verdict", None)
            return str(named) if named is not None else ("pass" if result.passed else "fail")

        def number(value: Any, spec: str) -> str:
            return escape(value) if isinstance(value, str) else format(float(value), spec)

        colours = {"pass": "#2a9d8f", "fail": "#d62828", "inconclusive": "#e76f51"}
        header = ("parameter", "shape", "difference", "verdict", "worst index", "analytic", "numeric")
        rows = []
        for p in self.parameters.values():
            word = verdict(p)
            cells = (
                f"<td><code>{escape(p.name)}</code></td>",
                f"<td>{escape(str(tuple(p.shape)))}</td>",
                f"<td>{number(p.difference, '.3e')}</td>",
                f'<td style="color:{colours.get(word, "inherit")};font-weight:bold">{escape(word)}</td>',
                f"<td>{escape(str(tuple(p.worst_index)))}</td>",
                f"<td>{number(p.analytic, '.9g')}</td>",
                f"<td>{number(p.numeric, '.9g')}</td>",
            )
            rows.append("<tr>" + "".join(cells) + "</tr>")
        word = verdict(self)
        rows.append(
            f"<tr><td><b>all</b></td><td>N={self.size}</td><td><b>{number(self.difference, '.3e')}</b></td>"
            f'<td style="color:{colours.get(word, "inherit")};font-weight:bold">{escape(word)}</td>'
            "<td></td><td></td><td></td></tr>"
        )
        caption = (
            f"gradient check: backend {escape(str(self.backend))} on {escape(str(self.device))}, "
            f"{escape(str(self.dtype))}, epsilon={number(self.epsilon, 'g')}, "
            f"threshold={number(self.threshold, 'g')}, mode={escape(str(self.mode))}, "
            f"{self.evaluations} cost evaluations"
        )
        head = "".join(f"<th>{h}</th>" for h in header)
        return (
            f'<table class="gcbackend-report"><caption style="text-align:left">{caption}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )

    def _named(self, names) -> list[str]:
        return [f"{n} (difference {self.parameters[n].difference:.2g})" for n in names]


def _listed(indices: tuple[tuple[int, ...], ...], most: int = 8) -> str:
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")
