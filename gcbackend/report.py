"""The result of a check: small frozen records and how they print."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParameterResult", "Report"]

PASS_SENTENCE = "Your backward propagation works perfectly fine!"
FAIL_SENTENCE = "There is a mistake in the backward propagation!"


@dataclass(frozen=True)
class ParameterResult:
    """One parameter's comparison.

    ``difference`` is formula (2) over this parameter alone. ``worst_index`` indexes the
    parameter's shape at the element with the largest |analytic − numeric|, and ``analytic``
    / ``numeric`` are the two values there (Python floats). ``analytic_grad`` and
    ``numeric_grad`` are the full arrays, on the backend and device the check ran on.
    ``nonfinite`` lists the indices where the finite difference is NaN or Inf (the cost
    returned NaN/Inf at θ ± ε): they are left out of ``difference`` and ``worst_index``,
    and a parameter with any of them does not pass.
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

    @property
    def passed(self) -> bool:
        return self.difference <= self.threshold and not self.nonfinite

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
    parameters; ``passed`` is ``difference <= threshold`` and no finite difference was NaN or
    Inf. ``parameters`` maps each name to its ``ParameterResult``, in the user's order.
    ``str(report)`` is a table and a verdict.
    """

    difference: float
    threshold: float
    epsilon: float
    mode: str
    backend: str
    device: str
    dtype: str
    evaluations: int
    parameters: Mapping[str, ParameterResult]

    @property
    def passed(self) -> bool:
        return self.difference <= self.threshold and not any(p.nonfinite for p in self.parameters.values())

    @property
    def faults(self) -> tuple[str, ...]:
        """Parameters whose own difference exceeds the threshold, worst first."""
        failing = [p for p in self.parameters.values() if not p.passed]
        return tuple(p.name for p in sorted(failing, key=lambda p: -p.difference))

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parameters.values())

    def __str__(self) -> str:
        header = ("parameter", "shape", "difference", "", "worst index", "analytic", "numeric")
        rows = [
            (
                p.name,
                str(p.shape),
                f"{p.difference:.3e}",
                "ok" if p.passed else ("NaN/Inf" if p.nonfinite else "OVER"),
                str(p.worst_index),
                f"{p.analytic:.9g}",
                f"{p.numeric:.9g}",
            )
            for p in self.parameters.values()
        ]
        overall = "ok" if self.passed else ("OVER" if self.difference > self.threshold else "NaN/Inf")
        rows.append(("all", f"N={self.size}", f"{self.difference:.3e}", overall, "", "", ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        lines = [
            f"gradient check: backend {self.backend} on {self.device}, {self.dtype}, "
            f"epsilon={self.epsilon:g}, threshold={self.threshold:g}, mode={self.mode}, "
            f"{self.evaluations} cost evaluations",
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows),
        ]
        if self.passed:
            lines.append(f"{PASS_SENTENCE} difference = {self.difference!r}")
            if self.faults:
                lines.append(
                    "Per parameter over the threshold (at this epsilon, likely rounding noise "
                    "of the finite differences): " + ", ".join(self._named(self.faults))
                )
        else:
            lines.append(f"{FAIL_SENTENCE} difference = {self.difference!r}")
            culprits = self.faults or tuple(
                sorted(self.parameters, key=lambda n: -self.parameters[n].difference)[:1]
            )
            lines.append("Parameters at fault, worst first: " + ", ".join(self._named(culprits)))
        for p in self.parameters.values():
            if p.nonfinite:
                shown = ", ".join(map(str, p.nonfinite[:8]))
                more = f" and {len(p.nonfinite) - 8} more" if len(p.nonfinite) > 8 else ""
                lines.append(
                    f"{p.name}: the cost returned NaN or Inf at θ ± ε for {len(p.nonfinite)} of "
                    f"{p.size} elements, left out of the differences: {shown}{more}"
                )
        return "\n".join(lines)

    def _named(self, names) -> list[str]:
        return [f"{n} (difference {self.parameters[n].difference:.2g})" for n in names]
