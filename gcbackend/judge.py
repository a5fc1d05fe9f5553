"""Judge a check: formula (2), error bars, kinks and verdicts → ``Report``.

The last of check()'s three steps (prepare → evaluate → judge). It receives the analytic
gradients and the finite differences (with their error bars, where measured) on the
backend, does every elementwise comparison there, and brings what the report prints to
the host in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import array_api_compat

from .backends import to_host
from .inputs import _dtype_name, _indices, _unravel
from .report import ElementError, ParameterResult, Report

__all__ = ["ANALYTIC_ULPS", "INCONCLUSIVE", "SAFETY", "judge"]


def _cast(x: Any, dtype: Any, xp) -> Any:
    """``x`` in ``dtype``: itself when it already is (``astype`` copies by default)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


SAFETY = 10.0
"""A difference (or element error) up to this many times the expected one is noise."""
ANALYTIC_ULPS = 32.0
"""Rounding a backprop accumulates in the gradient itself, in ulps of its dtype, relative to
|g_j| + rms(g): a float32 backward pass is judged to float32's precision, not float64's."""
INCONCLUSIVE = 1e-3
"""With threshold='auto', a parameter whose expected difference exceeds this cannot be
told apart from a gradient that is off by 0.1 %: inconclusive rather than pass."""


def _verdict(difference, expected, threshold, outliers, nonfinite, auto, floor):
    if nonfinite:
        return "fail"
    if auto:
        if difference > max(SAFETY * expected, floor) or outliers:
            return "fail"
        return "inconclusive" if expected > INCONCLUSIVE else "pass"
    if difference <= threshold:
        return "pass"
    return "inconclusive" if expected is not None and difference <= SAFETY * expected else "fail"


def judge(
    parts,
    analytic,
    numeric,
    estimate,
    *,
    xp,
    backend,
    epsilon,
    threshold,
    mode,
    order,
    top_k,
    notes,
    evaluations,
    positions,
    paths=None,
) -> Report:
    """Formula (2) overall and per parameter, error bars, top-k; one transfer to the host.

    Elements whose finite difference is NaN or Inf (the cost returned NaN/Inf at θ ± ε) are
    left out of every difference, on both sides, and listed in ``nonfinite``: the rest is
    still judged, and the parameter fails. Elements at a kink are compared with the nearest
    subgradient between their one-sided slopes. ``paths`` (name → engine.Path) says how
    each parameter's rows were evaluated; it is recorded in the results.
    """
    auto = threshold == "auto"
    names = tuple(parts)
    sizes = [math.prod(tuple(numeric[name].shape)) for name in names]
    dtype = xp.result_type(*(numeric[name].dtype for name in names))

    def joined(values: Mapping[str, Any], kind: Any = dtype) -> Any:
        flat = [_cast(xp.reshape(values[name], (-1,)), kind, xp) for name in names]
        return flat[0] if len(flat) == 1 else xp.concat(flat)

    # Elementwise work and the top-k sort run once over every parameter's values,
    # concatenated; only the sums go parameter by parameter, on slices.
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(names))]
    n, a = joined(numeric), joined(analytic)
    finite = xp.isfinite(n)
    zero = xp.zeros_like(a)
    if estimate is not None:
        err, kink = joined(estimate.error), joined(estimate.kink, xp.bool) & finite
        low, high = joined(estimate.low), joined(estimate.high)
        n = xp.where(kink, xp.minimum(xp.maximum(a, low - err), high + err), n)
        # Rounding the backprop itself may carry: ANALYTIC_ULPS of each parameter's own
        # dtype, relative to |g_j| + rms(g) of that parameter.
        slack = xp.concat(
            [
                ANALYTIC_ULPS
                * float(xp.finfo(analytic[name].dtype).eps)
                * (xp.abs(a[start:stop]) + xp.sqrt(xp.mean(a[start:stop] * a[start:stop])))
                for name, (start, stop) in zip(names, bounds)
            ]
        )
        tol = xp.where(finite, err + slack, zero)
    else:
        kink = xp.zeros_like(finite)
        tol = zero
    a_kept, n_kept = xp.where(finite, a, zero), xp.where(finite, n, zero)
    gap = a_kept - n_kept
    error = xp.abs(gap)
    # Per element: what each parameter sums (squares for its norms, then its counts).
    columns = xp.stack(
        [
            gap * gap,
            a_kept * a_kept,
            n_kept * n_kept,
            tol * tol,
            xp.astype((error > SAFETY * tol) & (tol > 0), dtype),
            xp.astype(~finite, dtype),
            xp.astype(kink, dtype),
        ],
        axis=1,
    )
    # The top-k of every parameter from two sorts over all elements, not one per parameter
    # (per-call overhead is what a small check costs): largest error first, then grouped
    # by parameter; both sorts stable, so ties keep index order, as a per-parameter sort.
    counts = {name: (min(top_k, stop - start), stop - start) for name, (start, stop) in zip(names, bounds)}
    if len(names) == 1:
        order = xp.argsort(error, descending=True, stable=True)
    else:
        where = array_api_compat.device(error)
        stops = xp.asarray([stop for _, stop in bounds], device=where)
        owner = xp.searchsorted(stops, xp.arange(bounds[-1][1], device=where), side="right")
        order = xp.argsort(error, descending=True, stable=True)
        order = xp.take(order, xp.argsort(xp.take(owner, order), stable=True))
    picks = [start + j for (start, _), (k, _) in zip(bounds, counts.values()) for j in range(k)]
    worst = xp.take(order, xp.asarray(picks, device=array_api_compat.device(order)))
    top = xp.take(xp.stack([a, n], axis=1), worst, axis=0)
    sums = xp.stack([xp.sum(columns[start:stop, :], axis=0) for start, stop in bounds])
    overall = xp.astype(
        xp.stack(
            [
                xp.linalg.vector_norm(a_kept - n_kept),
                xp.linalg.vector_norm(a_kept) + xp.linalg.vector_norm(n_kept),
                xp.linalg.vector_norm(tol),
            ]
        ),
        xp.float64,
    )
    # Everything the report prints crosses to the host in one transfer (one device sync).
    packed = xp.concat([overall, *(_cast(xp.reshape(v, (-1,)), xp.float64, xp) for v in (sums, worst, top))])
    values = to_host(packed).tolist()
    sums_at, worst_at_all, top_at = 3, 3 + 7 * len(names), 3 + 7 * len(names) + len(picks)
    masks = {name: (~finite[start:stop], kink[start:stop]) for name, (start, stop) in zip(names, bounds)}
    compared = {name: n[start:stop] for name, (start, stop) in zip(names, bounds)}

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else math.inf)

    floor = 4 * float(xp.finfo(dtype).eps)
    results, picked = {}, 0
    for i, (name, (start, _)) in enumerate(zip(names, bounds)):
        k, checked = counts[name]
        gap2, a2, n2, tol2, outliers, n_bad, n_kinks = values[sums_at + 7 * i : sums_at + 7 * i + 7]
        num, den, tol_norm = math.sqrt(gap2), math.sqrt(a2) + math.sqrt(n2), math.sqrt(tol2)
        worst_at = [int(v) - start for v in values[worst_at_all + picked : worst_at_all + picked + k]]
        top_a = values[top_at + 2 * picked : top_at + 2 * (picked + k) : 2]
        top_n = values[top_at + 2 * picked + 1 : top_at + 2 * (picked + k) : 2]
        picked += k
        shape = tuple(parts[name].shape)

        def where(flat: int, shape=shape, name=name) -> tuple[int, ...]:
            if positions == "directions":
                return (flat,)
            return _unravel(positions[name][flat] if positions else flat, shape)

        top = tuple(
            ElementError(where(i), ta, tn, abs(ta - tn), ratio(abs(ta - tn), max(abs(ta), abs(tn))))
            for i, ta, tn in zip(worst_at, top_a, top_n)
        )
        bad, kinks = masks[name]
        nonfinite = tuple(where(i[0]) for i in _indices(bad, (checked,))) if n_bad else ()
        kink_list = tuple(where(i[0]) for i in _indices(kinks, (checked,))) if n_kinks else ()
        difference = ratio(num, den)
        expected = ratio(tol_norm, den) if estimate is not None else None
        results[name] = ParameterResult(
            name=name,
            shape=shape,
            difference=difference,
            worst_index=top[0].index,
            analytic=top[0].analytic,
            numeric=top[0].numeric,
            threshold=max(SAFETY * expected, floor) if auto else threshold,
            analytic_grad=analytic[name],
            numeric_grad=compared[name] if positions else xp.reshape(compared[name], shape),
            nonfinite=nonfinite,
            verdict=_verdict(difference, expected, threshold, int(outliers), bool(n_bad), auto, floor),
            expected=expected,
            top=top,
            kinks=kink_list,
            checked=checked,
            path=paths[name].name if paths else "",
            path_reason=paths[name].reason if paths else "",
        )
    difference = ratio(values[0], values[1])
    expected = ratio(values[2], values[1]) if estimate is not None else None
    verdicts = {r.verdict for r in results.values()}
    if estimate is None:  # the notebook's rule: the overall difference decides
        nonfinite = any(r.nonfinite for r in results.values())
        verdict = "pass" if difference <= threshold and not nonfinite else "fail"
    else:
        verdict = "fail" if "fail" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "pass")
    dtypes = sorted(map(_dtype_name, {p.dtype for p in analytic.values()}))
    return Report(
        difference=difference,
        threshold=max(SAFETY * expected, floor) if auto else float(threshold),
        epsilon=epsilon,
        mode=mode,
        backend=backend.name,
        device=str(backend.device),
        dtype="/".join(dtypes),
        evaluations=evaluations,
        parameters=MappingProxyType(results),
        verdict=verdict,
        expected=expected,
        order=order,
        notes=notes,
        auto_threshold=auto,
    )
