"""Judge a check: formula (2), error bars, kinks and verdicts → ``Report``.

The last of check()'s three steps (prepare → evaluate → judge). It receives the values the
backprop claims (``targets``), the finite differences (with their error bars, where
measured) and how far the backprop's own rounding may move each value (``allowance``), all
on the backend; it does every elementwise comparison there, parameter by parameter, and
brings what the report prints to the host in one transfer.

Every element is judged on its own (see ``_elements``): a kink or an exact zero never
widens another element's error bar, and the per-tensor expected difference is computed
over the smooth elements only. Norms are of vectors scaled by a power of two near their
largest magnitude (exact, so the notebook's numbers stay bit for bit, and free of
overflow and underflow at any scale of J). A NaN in a judgement is never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from .backends import take, to_host
from .inputs import _dtype_name, _indices, _unravel
from .report import ElementError, ParameterResult, Report

__all__ = [
    "ANALYTIC_ULPS",
    "INCONCLUSIVE",
    "SAFETY",
    "Coverage",
    "backprop_rounding",
    "judge",
    "norm",
]

SAFETY = 10.0
"""A difference (or element error) up to this many times the expected one is noise."""
ANALYTIC_ULPS = 32.0
"""Rounding a backprop accumulates in the gradient itself, in ulps of its dtype, relative to
|g_j| + rms(g): a float32 backward pass is judged to float32's precision, not float64's."""
INCONCLUSIVE = 1e-3
"""With threshold='auto', a parameter whose finite differences' error bars exceed this
(relative, formula (2)'s way) cannot be told apart from a gradient off by 0.1 %:
inconclusive rather than pass. The backprop's own rounding is not counted here (it is
what the gradient's dtype allows, not a limit of the measurement)."""

# The per-tensor sums the host receives, in this order (see _tensor).
_STATS = (
    "gap",  # ‖a − n‖ over finite values (n at a kink: the nearest subgradient)
    "analytic_norm",  # ‖a‖
    "numeric_norm",  # ‖n‖
    "smooth_gap",  # ‖a − n‖ over the smooth elements
    "noise",  # ‖error bar‖ over the smooth elements
    "allowance",  # ‖backprop rounding allowance‖ over the smooth elements
    "outliers",  # elements off by more than SAFETY × their own error bar plus the allowance
    "kink_outliers",  # the same, at a kink (the analytic value outside the one-sided slopes)
    "nonfinite",  # finite differences that are NaN or Inf
    "kinks",
    "scale",  # the power of two every norm above is divided by
)


class Coverage(NamedTuple):
    """Which values of each parameter were compared.

    ``kind``: ``"elements"`` (every element), ``"sample"`` (``sampled[name]``: the flat
    indices compared, ascending) or ``"directions"`` (value k: the derivative along the
    k-th seeded unit direction).
    """

    kind: str = "elements"
    sampled: Mapping[str, list[int]] | None = None

    def label(self, name: str, flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The index a compared value is reported under."""
        if self.kind == "directions":
            return (flat,)
        return _unravel(self.sampled[name][flat] if self.kind == "sample" else flat, shape)


def norm(x: Any, xp: Any) -> Any:
    """‖x‖₂ of a whole array, scale-safe: of x divided by a power of two near max|x| (exact),
    so no square overflows or underflows (NumPy's vector_norm squares raw values)."""
    flat = xp.reshape(x, (-1,))
    scale = _power_of_two(xp.max(xp.abs(flat)), xp)
    return scale * xp.linalg.vector_norm(flat / scale)


def backprop_rounding(grad: Any, xp: Any, *, computed_in: Any = None) -> Any:
    """Per element, how far rounding may move a correct backprop: ANALYTIC_ULPS ulps of the
    coarser of the gradient's own dtype and ``computed_in`` (the parameter's dtype: a float64
    gradient computed from a float32 forward pass, e.g. through the course's
    ``np.int64(A > 0)`` mask, carries float32's rounding), relative to |g_j| + rms(g) (rms
    computed scale-safe), in float64 where the namespace has it."""
    wide = _wide(grad, xp)
    magnitude = xp.abs(wide)
    scale = _power_of_two(xp.max(magnitude), xp)
    rms = scale * xp.linalg.vector_norm(magnitude / scale) / math.sqrt(max(math.prod(grad.shape), 1))
    eps = float(xp.finfo(grad.dtype).eps)
    # Only the promotion NumPy does silently (a float32 forward, a float64 gradient through
    # an int64 mask or a float64 constant): a float16 parameter's 32 ulps would be 3 %, and
    # a gradient given in float32 is held to float32's resolution.
    if computed_in is not None and xp.finfo(grad.dtype).bits == 64 and xp.finfo(computed_in).bits == 32:
        eps = float(xp.finfo(computed_in).eps)
    return ANALYTIC_ULPS * eps * (magnitude + rms)


def _wide(x: Any, xp: Any) -> Any:
    """``x`` in float64 where the namespace has it (JAX without x64 does not)."""
    wide = xp.result_type(x.dtype, xp.float64) if _has_float64(xp) else x.dtype
    return x if x.dtype == wide else xp.astype(x, wide)


def _has_float64(xp: Any) -> bool:
    return xp.asarray(1.0, dtype=xp.float64).dtype == xp.float64


def _power_of_two(largest: Any, xp: Any) -> Any:
    """2^⌊log₂ largest⌋ (1 for 0 or a non-finite value): dividing by it is exact."""
    usable = xp.isfinite(largest) & (largest > 0)
    safe = xp.where(usable, largest, xp.ones_like(largest))
    return xp.where(usable, xp.pow(xp.full_like(safe, 2.0), xp.floor(xp.log2(safe))), xp.ones_like(safe))


class _Elements(NamedTuple):
    """One parameter's compared values, flat, judged element by element."""

    analytic: Any
    numeric: Any  # at a kink: the subgradient nearest the analytic value
    stats: Any  # (len(_STATS),) in the order of _STATS
    worst: Any  # flat indices of the top-k errors, worst first (ties by index)
    nonfinite: Any  # mask
    kinks: Any  # mask
    unbracketed: Any  # mask: at a kink, the analytic value outside the one-sided slopes
    tolerance: Any  # per element, the largest |a − n| still judged noise (SAFETY × error bar + allowance)


def _elements(analytic, numeric, estimate_fields, allowance, top_k, xp) -> _Elements:
    """Judge one parameter's values element by element, and sum what its verdict needs.

    An element is *smooth* unless it sits at a kink or is exactly zero on both sides.
    A smooth element is an outlier when |a − n| exceeds SAFETY × its error bar plus the
    backprop's rounding allowance (not SAFETY × that: 320 ulps of float16 is 30 %, and a
    float16 gradient off by 10 % must fail); a kink's when the analytic value lies further than that
    outside the one-sided slopes (widened by their error bar). Exact agreement at zero
    is a pass. Kinks and zeros are left out of the noise and allowance sums: they never
    widen another element's error bar or the parameter's expected difference.
    """
    a = _wide(xp.reshape(analytic, (-1,)), xp)
    n = xp.reshape(numeric, (-1,))
    dtype = xp.result_type(a.dtype, n.dtype)
    a, n = (x if x.dtype == dtype else xp.astype(x, dtype) for x in (a, n))
    finite = xp.isfinite(n)
    zero = xp.zeros_like(a)
    if estimate_fields is None:  # the notebook's way: no error bars
        kink, err, slack = xp.zeros_like(finite), zero, zero
    else:
        error, is_kink, low, high = (xp.reshape(v, (-1,)) for v in estimate_fields)
        err = xp.where(finite, xp.astype(error, dtype), zero)
        kink = is_kink & finite
        low, high = xp.astype(low, dtype), xp.astype(high, dtype)
        n = xp.where(kink, xp.minimum(xp.maximum(a, low - err), high + err), n)
        slack = xp.astype(xp.reshape(allowance, (-1,)), dtype)
    a_kept, n_kept = xp.where(finite, a, zero), xp.where(finite, n, zero)
    gap = a_kept - n_kept
    smooth = finite & ~kink & ~((a_kept == 0) & (n_kept == 0))
    off = xp.abs(gap) > SAFETY * err + slack
    outliers = finite & off if estimate_fields is not None else xp.zeros_like(finite)
    at_kink = outliers & kink
    scale = _power_of_two(xp.max(xp.maximum(xp.abs(a_kept), xp.abs(n_kept))), xp)

    def norm(values: Any, mask: Any = None) -> Any:
        kept = values if mask is None else xp.where(mask, values, zero)
        return xp.linalg.vector_norm(kept / scale)

    def count(mask: Any) -> Any:
        return xp.astype(xp.sum(xp.astype(mask, xp.int64)), dtype)

    stats = xp.stack(
        [
            norm(gap),
            norm(a_kept),
            norm(n_kept),
            norm(gap, smooth),
            norm(err, smooth),
            norm(slack, smooth),
            count(outliers & ~kink),
            count(at_kink),
            count(~finite),
            count(kink),
            scale,
        ]
    )
    worst = xp.argsort(xp.abs(gap), descending=True, stable=True)[: min(top_k, a.shape[0])]
    return _Elements(a, n, stats, worst, ~finite, kink, at_kink, SAFETY * err + slack)


def _ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else math.inf)


def _limits(noise: float, allowance: float, floor: float) -> tuple[float, float]:
    """(expected, threshold): the difference a correct gradient shows (error bars plus the
    backprop's rounding allowance), and the most it may show, SAFETY × the error bars plus
    the allowance (never SAFETY × the allowance: see _elements)."""
    return noise + allowance, max(SAFETY * noise + allowance, floor)


def _auto_verdict(stats: Mapping[str, float], size: float, threshold: float, directions: bool) -> str:
    """A parameter's verdict from its own error bars (threshold='auto').

    A smooth element off by more than its error bar fails the parameter, whatever its
    neighbours. A kink element whose analytic value lies outside its one-sided slopes is no
    proof of a bug: where kinks of both signs meet (overlapping max-pool windows with tied
    maxima, ReLUs entering with both signs, a random direction through both), a correct
    generalized gradient, e.g. PyTorch's max-pool, can lie there. Such a parameter is
    inconclusive (never a pass), unless its smooth elements fail it."""
    if stats["nonfinite"] or stats["outliers"]:
        return "fail"
    smooth_difference = _ratio(stats["smooth_gap"], size)
    noise = _ratio(stats["noise"], size)
    if not all(math.isfinite(v) for v in (*stats.values(), size, threshold, smooth_difference, noise)):
        return "inconclusive"  # never a pass: the numbers cannot tell
    if smooth_difference > threshold:
        return "fail"
    if directions and stats["kinks"]:
        # A direction through kinks brackets uᵀg with every kinked element's range at once:
        # a smooth element's error can hide there. The screen never passes what it cannot see.
        return "inconclusive"
    return "inconclusive" if stats["kink_outliers"] or noise > INCONCLUSIVE else "pass"


def _notebook_verdicts(
    difference: float, differences: Mapping[str, float], nonfinite: Mapping[str, bool], threshold: float
) -> tuple[str, dict[str, str]]:
    """The overall and per-parameter verdicts under a fixed epsilon and threshold (no error bars).

    The overall verdict is the notebook's rule (difference ≤ threshold), made stricter in
    one case only: a parameter whose own difference is beyond SAFETY × threshold (far
    outside the notebook's rounding noise, ~3e-7 per parameter on a correct seed case at
    ε = 1e-7) fails the check even when the other parameters' norms hide it in the overall
    difference. Per-parameter verdicts never contradict the overall one: a passing check
    has no faults; in a failing one those beyond SAFETY × threshold are at fault, those
    over the threshold but within that band inconclusive (or at fault, when nothing else is).
    """
    per = {}
    for name, value in differences.items():
        if nonfinite[name] or not value <= SAFETY * threshold:
            per[name] = "fail"
        else:
            per[name] = "inconclusive" if value > threshold else "pass"
    passed = difference <= threshold and "fail" not in per.values()
    if passed:
        return "pass", {name: "pass" for name in per}
    if "fail" not in per.values():
        over = [name for name, v in per.items() if v == "inconclusive"]
        for name in over or [max(differences, key=differences.get)]:
            per[name] = "fail"
    return "fail", per


def judge(
    parts: Mapping[str, Any],
    targets: Mapping[str, Any],
    numeric: Mapping[str, Any],
    estimate: Any,
    *,
    xp: Any,
    backend: Any,
    epsilon: float | str,
    threshold: float | str,
    mode: str,
    order: int,
    top_k: int,
    notes: tuple[str, ...],
    evaluations: int,
    coverage: Coverage,
    allowance: Mapping[str, Any] | None = None,
    grad_dtypes: Mapping[str, Any] | None = None,
    paths: Mapping[str, Any] | None = None,
) -> Report:
    """Formula (2) overall and per parameter, verdicts, top-k; one transfer to the host.

    ``targets`` are the backprop's values compared (the gradient, a sample of it, or its
    directional derivatives), ``numeric`` the finite differences at the same places,
    ``estimate`` their error bars and kinks (None with a fixed epsilon and threshold: the
    notebook's rule), ``allowance`` the backprop's rounding per value (backprop_rounding),
    ``grad_dtypes`` the dtype each gradient came in (the report's dtype).

    Elements whose finite difference is NaN or Inf (the cost returned NaN/Inf at θ ± ε) are
    left out of every difference, on both sides, and listed in ``nonfinite``: the rest is
    still judged, and the parameter fails. ``paths`` (name → engine.Path) says how each
    parameter's rows were evaluated; it is recorded in the results.
    """
    auto = threshold == "auto"
    names = tuple(parts)
    judged = {
        name: _elements(
            targets[name],
            numeric[name],
            None
            if estimate is None
            else (estimate.error[name], estimate.kink[name], estimate.low[name], estimate.high[name]),
            None if allowance is None else allowance[name],
            top_k,
            xp,
        )
        for name in names
    }
    # Formula (2) over all parameters, on the joined values as the notebook computes it (its
    # numbers bitwise), scale-safe; the kept values are those with a finite difference.
    kept = [
        (
            _to_float(
                xp.where(judged[name].nonfinite, xp.zeros_like(judged[name].analytic), judged[name].analytic),
                xp,
            ),
            _to_float(
                xp.where(judged[name].nonfinite, xp.zeros_like(judged[name].numeric), judged[name].numeric),
                xp,
            ),
        )
        for name in names
    ]
    a_all = kept[0][0] if len(kept) == 1 else xp.concat([a for a, _ in kept])
    n_all = kept[0][1] if len(kept) == 1 else xp.concat([n for _, n in kept])
    overall = xp.stack([norm(a_all - n_all, xp), norm(a_all, xp), norm(n_all, xp)])
    # Everything the report prints crosses to the host in one transfer (one device sync).
    packed = xp.concat(
        [
            overall,
            *(
                _to_float(piece, xp)
                for name in names
                for piece in (
                    judged[name].stats,
                    judged[name].worst,
                    take(judged[name].analytic, judged[name].worst, xp),
                    take(judged[name].numeric, judged[name].worst, xp),
                    take(judged[name].tolerance, judged[name].worst, xp),
                )
            ),
        ]
    )
    values = iter(to_host(packed).tolist())
    overall_gap, overall_analytic, overall_numeric = (next(values) for _ in range(3))
    floor = 4 * float(xp.finfo(judged[names[0]].analytic.dtype).eps)
    results, summary = {}, {}
    for name in names:
        elements = judged[name]
        stats = dict(zip(_STATS, (next(values) for _ in _STATS)))
        k = int(elements.worst.shape[0])
        worst = [int(next(values)) for _ in range(k)]
        top_a = [next(values) for _ in range(k)]
        top_n = [next(values) for _ in range(k)]
        top_tol = [next(values) for _ in range(k)]
        top_tol = top_tol if estimate is not None else [None] * k  # no error bars: no tolerance
        shape = tuple(parts[name].shape)
        top = tuple(
            ElementError(
                coverage.label(name, i, shape),
                ta,
                tn,
                abs(ta - tn),
                _ratio(abs(ta - tn), max(abs(ta), abs(tn))),
                tol,
            )
            for i, ta, tn, tol in zip(worst, top_a, top_n, top_tol)
        )
        checked = int(elements.analytic.shape[0])
        nonfinite = (
            tuple(coverage.label(name, i[0], shape) for i in _indices(elements.nonfinite, (checked,)))
            if stats["nonfinite"]
            else ()
        )
        unbracketed = (
            tuple(coverage.label(name, i[0], shape) for i in _indices(elements.unbracketed, (checked,)))
            if stats["kink_outliers"]
            else ()
        )
        kinks = (
            tuple(
                label
                for i in _indices(elements.kinks, (checked,))
                if (label := coverage.label(name, i[0], shape)) not in unbracketed
            )
            if stats["kinks"]
            else ()
        )
        size = stats["analytic_norm"] + stats["numeric_norm"]
        difference = _ratio(stats["gap"], size)
        expected, limit = _limits(_ratio(stats["noise"], size), _ratio(stats["allowance"], size), floor)
        summary[name] = stats
        results[name] = dict(
            name=name,
            shape=shape,
            difference=difference,
            worst_index=top[0].index,
            analytic=top[0].analytic,
            numeric=top[0].numeric,
            threshold=limit if auto else float(threshold),
            analytic_grad=targets[name],
            numeric_grad=elements.numeric
            if coverage.kind != "elements"
            else xp.reshape(elements.numeric, shape),
            nonfinite=nonfinite,
            verdict=_auto_verdict(stats, size, limit, coverage.kind == "directions")
            if estimate is not None
            else None,
            expected=expected if estimate is not None else None,
            top=top,
            kinks=kinks,
            unbracketed=unbracketed,
            checked=checked,
            path=paths[name].name if paths else "",
            path_reason=paths[name].reason if paths else "",
        )

    # The overall error bars: the per-parameter norms joined (hypot: no overflow on the host).
    def joined(stat: str) -> float:
        return math.hypot(*(s[stat] * s["scale"] for s in summary.values()))

    size = overall_analytic + overall_numeric
    difference = _ratio(overall_gap, size)
    expected, limit = _limits(_ratio(joined("noise"), size), _ratio(joined("allowance"), size), floor)
    if estimate is None:  # the notebook's rule: the overall difference decides
        nonfinite = {name: bool(summary[name]["nonfinite"]) for name in names}
        differences = {name: r["difference"] for name, r in results.items()}
        verdict, per = _notebook_verdicts(difference, differences, nonfinite, float(threshold))
        for name in names:
            results[name]["verdict"] = per[name]
    else:
        verdicts = {r["verdict"] for r in results.values()}
        verdict = "fail" if "fail" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "pass")
    dtypes = grad_dtypes or {name: targets[name].dtype for name in names}
    return Report(
        difference=difference,
        threshold=limit if auto else float(threshold),
        epsilon=epsilon,
        mode=mode,
        backend=backend.name,
        device=str(backend.device),
        dtype="/".join(sorted(map(_dtype_name, set(dtypes.values())))),
        evaluations=evaluations,
        parameters=MappingProxyType({name: ParameterResult(**r) for name, r in results.items()}),
        verdict=verdict,
        expected=expected if estimate is not None else None,
        order=order,
        notes=notes,
        auto_threshold=auto,
    )


def _to_float(x: Any, xp: Any) -> Any:
    wide = xp.float64 if _has_float64(xp) else xp.float32
    x = xp.reshape(x, (-1,))
    return x if x.dtype == wide else xp.astype(x, wide)
