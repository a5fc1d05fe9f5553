"""Judge a check: formula (2), error bars, kinks, allowances and verdicts → ``Report``.

The last step of check() (prepare → plan → evaluate ⇄ estimate → judge). It works on the host
over one flat vector of probes (all tensors at once, each probe tagged with its tensor, as the
notebook's ``dictionary_to_vector`` lays them out): the backprop's values (``plan.target``),
the finite differences with their error bars (``differences.Estimate``), and how far a
correct backprop may be off by its own rounding.

Every element is judged on its own: a kink or an exact zero never widens another element's
error bar. The backprop's allowance is ``ulps · eps · (|a| + |n| + s)`` in the precision the
gradient is judged to, where s is a scale that cannot vanish where the true gradient is zero
(the model's gradient scale: a bias before batch norm has a true gradient of 0 and a float32
backprop leaves ±1e-9 of rounding there), plus the measured change of the true gradient under
a few ulps of perturbation of every input (a low-precision forward's rounding, which every
gradient inherits; see ``differences``). A NaN is never a pass, and never a fail either: an
element whose finite difference stays undetermined makes its parameter inconclusive.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .backends import float64_of, host_add_at, host_max_at, host_namespace, to_backend
from .backends import host_norm as norm  # ‖x‖₂ of a host array, scale-safe
from .differences import SAFETY, Estimate, judged
from .plan import Plan
from .report import ElementError, ParameterResult, Report

__all__ = ["INCONCLUSIVE", "PRECISION", "SAFETY", "judge", "norm"]

INCONCLUSIVE = 1e-3
"""A parameter whose finite differences' error bars exceed this (relative, formula (2)'s way)
cannot be told apart from a gradient off by 0.1 %: inconclusive rather than pass (see
``noise_bound`` for a cost evaluated in a coarser dtype than float64)."""
PRECISION = 5e-2
"""…and whose resolution, the backprop's own allowance included, exceeds this (or 8 ulps of a
coarser gradient dtype): a pass would say too little (a float32 gradient at a trained model's
minimum, where its own forward's rounding is a few % of it, is such a case)."""
NOTEBOOK_ULPS = 64.0
"""Under the notebook's fixed ε, a parameter whose gradient and finite difference are both below
this many ulps of max|J|, over ε, is rounding noise on both sides: its own difference (≈ 1) says
nothing, and it is not at fault on its own."""


def _label(coverage: Any, name: str, shape: tuple[int, ...], flat: Any) -> tuple[int, ...]:
    return coverage.label(name, int(flat), shape)


def _ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else math.inf)


def judge(
    plan: Plan,
    estimate: Estimate,
    *,
    backend: Any,
    analytic: Mapping[str, Any],
    grad_dtypes: Mapping[str, str],
    epsilon: float | str,
    threshold: float | str,
    mode: str,
    top_k: int,
    notes: tuple[str, ...],
    evaluations: int,
    paths: Mapping[str, Any],
    random: tuple[float, float] | None = None,
) -> Report:
    """Formula (2) overall and per parameter, verdicts, resolution, top-k → Report.

    ``analytic`` (name → the gradient on the backend) and the finite differences (moved back to
    the backend) are what the report's ``analytic_grad``/``numeric_grad`` hold. ``random``: J(θ)
    at the start and the end of the check, when they differ (the cost is random: nothing can be
    judged).
    """
    xp = host_namespace()
    a, e = plan.target, estimate.error
    finite = ~estimate.undetermined
    auto = not plan.notebook
    verdict_of = judged(plan, estimate)
    a_kept = xp.where(finite, a, 0.0)
    n_kept = xp.where(finite, verdict_of.numeric, 0.0)
    e = xp.where(finite, e, 0.0) if auto else xp.zeros_like(a)
    allowance, tolerance, off = verdict_of.allowance, verdict_of.tolerance, verdict_of.off
    # Worst first by how far beyond its own tolerance (|error| / tolerance); without error bars,
    # by |error|. Values without a finite difference are listed apart, never as the worst.
    if auto:
        badness = xp.where(finite, xp.abs(a_kept - n_kept) / xp.maximum(tolerance, 1e-300), -xp.inf)
    else:
        badness = xp.where(finite, xp.abs(a_kept - n_kept), -xp.inf)
    informative = finite & (xp.abs(n_kept) > SAFETY * e)
    scale = norm(n_kept[informative]) / max(float(xp.sum(informative)), 1.0) ** 0.5 if auto else 0.0
    n = estimate.numeric
    gap = a_kept - n_kept
    smooth = finite & ~estimate.kink & ~((a_kept == 0) & (n_kept == 0))
    largest = max(abs(estimate.rounding), 0.0)
    # Every tensor's statistics at once: segment reductions over the flat probe vector, then
    # one small loop over tensors for what each reports (its worst elements, its labels).
    sums, norms = _segment_stats(
        plan,
        norms={
            "gap": gap,
            "analytic": a_kept,
            "numeric": n_kept,
            "noise": xp.where(smooth, e, 0.0),
            "allowance": xp.where(smooth, allowance, 0.0),
            "nonzero": xp.astype(a_kept != 0, xp.float64),
        },
        counts={
            "outliers": off & smooth,
            "kink_outliers": off & estimate.kink,
            "undetermined": estimate.undetermined,
            "kinks": estimate.kink,
            "smooth": smooth,
            "moving": ~estimate.still,
        },
    )
    # Worst first within each tensor: sorted by badness, then (stably) by tensor, so tensor k's
    # probes keep their contiguous block, ordered worst first.
    by_badness = xp.argsort(badness, descending=True, stable=True)
    ranked = xp.take(by_badness, xp.argsort(xp.take(plan.segment, by_badness), stable=True))
    results: dict[str, dict] = {}
    summary = {}
    for k, name in enumerate(plan.names):
        where = plan.where(k)
        shape = plan.shapes[k]
        sa, sn = a_kept[where], n_kept[where]
        stats = {key: float(values[k]) for key, values in norms.items()}
        stats.update({key: int(values[k]) for key, values in sums.items()})
        stats["count"] = plan.counts[k]
        if not auto:
            stats["noise"] = stats["allowance"] = 0.0
        size = stats["analytic"] + stats["numeric"]
        floor_scale = max(size, scale * max(stats["smooth"], 1) ** 0.5) if auto else size
        stats["scale"] = floor_scale
        summary[name] = stats
        order = ranked[where][: min(top_k, stats["count"])] - where.start
        label = functools.partial(_label, plan.coverage, name, shape)
        top = tuple(
            ElementError(
                label(i),
                float(sa[i]),
                float(sn[i]) if bool(finite[where][i]) else math.nan,
                abs(float(sa[i] - sn[i])),
                _ratio(abs(float(sa[i] - sn[i])), max(abs(float(sa[i])), abs(float(sn[i])))),
                float(tolerance[where][i]) if auto else None,
            )
            for i in (int(j) for j in order)
        )
        undetermined = _labels(label, estimate.undetermined[where], stats["undetermined"])
        unbracketed = _labels(label, off[where] & estimate.kink[where], stats["kink_outliers"])
        kinks = _labels(label, estimate.kink[where] & ~off[where], stats["kinks"] - stats["kink_outliers"])
        ties = [t for t in estimate.ties if t.tensor == k]
        tie_vague, ties_off = False, []
        for t in ties:
            bar = SAFETY * t.error + plan.ulps[where][0] * plan.grad_eps[where][0] * t.magnitude
            if t.kink:
                nearest = min(max(t.target, t.low - t.error), t.high + t.error)
                tie_vague |= abs(t.target - nearest) > bar
            elif abs(t.target - t.numeric) > bar:
                ties_off.append(
                    (abs(t.target - t.numeric) / max(bar, 1e-300), float(t.target), float(t.numeric))
                )
        tie_failed = bool(ties_off)
        independent = not stats["moving"] and stats["nonzero"] > 0 and not stats["undetermined"]
        difference = _ratio(stats["gap"], size)
        noise_rel = _ratio(stats["noise"], floor_scale)
        allow_rel = _ratio(stats["allowance"], floor_scale)
        expected = noise_rel + allow_rel if auto else None
        limit = max(SAFETY * noise_rel + allow_rel, 4 * plan.eval_eps) if auto else float(threshold)
        resolution = (SAFETY + 1) * noise_rel + allow_rel if auto else None
        verdict, reason = None, ""
        if auto:
            verdict, reason = _auto_verdict(
                stats, noise_rel, (resolution or 0.0), plan, where, tie_failed, tie_vague, random is not None
            )
        results[name] = dict(
            name=name,
            shape=shape,
            difference=difference,
            worst_index=top[0].index if top else (),
            analytic=top[0].analytic if top else math.nan,
            numeric=top[0].numeric if top else math.nan,
            threshold=limit,
            analytic_grad=analytic[name],
            numeric_grad=_numeric_on_backend(n[where], shape, plan, backend),
            nonfinite=undetermined,
            verdict=verdict,
            expected=expected,
            top=top,
            kinks=kinks,
            unbracketed=unbracketed,
            checked=stats["count"],
            path=paths[name].name if paths.get(name) is not None else "",
            path_reason=paths[name].reason if paths.get(name) is not None else "",
            resolution=resolution,
            reason=reason,
            independent=independent,
            ties=len(ties),
            ties_off=tuple((a, n) for _, a, n in sorted(ties_off, key=lambda off: -off[0])),
        )
    a_all, n_all = a_kept, n_kept
    overall_gap, overall_a, overall_n = norm(a_all - n_all), norm(a_all), norm(n_all)
    size = overall_a + overall_n
    difference = _ratio(overall_gap, size)
    if auto:
        joined = lambda stat: math.hypot(*(s[stat] for s in summary.values()))  # noqa: E731
        expected = _ratio(joined("noise") + joined("allowance"), size)
        limit = max(
            SAFETY * _ratio(joined("noise"), size) + _ratio(joined("allowance"), size), 4 * plan.eval_eps
        )
        verdicts = {r["verdict"] for r in results.values()}
        verdict = "fail" if "fail" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "pass")
    else:
        expected, limit = None, float(threshold)
        quiet = {
            name: _quiet(summary[name], plan, epsilon, largest, summary[name]["count"]) for name in plan.names
        }
        verdict, per = _notebook_verdicts(
            difference,
            {name: r["difference"] for name, r in results.items()},
            {name: bool(summary[name]["undetermined"]) for name in plan.names},
            float(threshold),
            quiet,
        )
        for name in plan.names:
            results[name]["verdict"] = per[name]
            results[name]["reason"] = "nonfinite" if summary[name]["undetermined"] else ""
    if random is not None:
        verdict = "inconclusive"
    return Report(
        difference=difference,
        threshold=limit,
        epsilon=epsilon,
        mode=mode,
        backend=backend.name,
        device=str(backend.device),
        dtype="/".join(sorted(set(grad_dtypes.values()))),
        evaluations=evaluations,
        parameters=MappingProxyType({name: ParameterResult(**r) for name, r in results.items()}),
        verdict=verdict,
        expected=expected,
        order=plan.order,
        notes=notes,
        auto_threshold=threshold == "auto",
        coverage=plan.coverage.kind,
        checked=plan.size,
        random=random,
    )


def _labels(label: Any, mask: Any, count: int) -> tuple[tuple[int, ...], ...]:
    """The reported indices of a tensor's probes where ``mask`` holds (``count`` of them)."""
    if not count:
        return ()
    xp = host_namespace()
    return tuple(label(int(i)) for i in xp.nonzero(mask)[0])


def _segment_stats(plan: Plan, *, norms: Mapping[str, Any], counts: Mapping[str, Any]) -> tuple[dict, dict]:
    """Per tensor: how many probes each boolean of ``counts`` holds at, and the scale-safe
    ‖·‖₂ (see ``norm``) of each vector of ``norms``; name → (T,) host arrays."""
    xp = host_namespace()
    tensors = len(plan.names)
    flags = xp.stack([xp.astype(v, xp.float64) for v in counts.values()], axis=1)
    totals = xp.zeros((tensors, flags.shape[1]))
    host_add_at(totals, plan.segment, flags)
    values = xp.stack(list(norms.values()), axis=1)
    largest = xp.zeros((tensors, values.shape[1]))
    host_max_at(largest, plan.segment, xp.abs(values))
    usable = xp.isfinite(largest) & (largest > 0)
    scale = xp.where(usable, 2.0 ** xp.floor(xp.log2(xp.where(usable, largest, 1.0))), 1.0)
    squares = xp.zeros((tensors, values.shape[1]))
    host_add_at(squares, plan.segment, (values / xp.take(scale, plan.segment, axis=0)) ** 2)
    result = xp.where(usable, scale * xp.sqrt(squares), largest)
    return (
        {key: totals[:, j] for j, key in enumerate(counts)},
        {key: result[:, j] for j, key in enumerate(norms)},
    )


def _auto_verdict(
    stats, noise_rel, resolution, plan, where, tie_failed, tie_vague, random
) -> tuple[str, str]:
    """A parameter's verdict from its own error bars (threshold='auto'), and why it is
    inconclusive ("" otherwise).

    A smooth element off by more than its error bar (plus the backprop's allowance) fails the
    parameter, whatever its neighbours; so does a direction moving tied kinks together where J
    is smooth. A kink element whose analytic value lies outside its one-sided slopes is no
    proof of a bug: where kinks of both signs meet (overlapping max-pool windows with tied
    maxima, ReLUs entering with both signs) a correct generalized gradient can lie there, so
    such a parameter is inconclusive (never a pass), unless its smooth elements fail it."""
    if random:
        return "inconclusive", "random"
    if stats["outliers"] or tie_failed:
        return "fail", ""
    if stats["undetermined"]:
        return "inconclusive", "nonfinite"
    if stats["kink_outliers"] or tie_vague:
        return "inconclusive", "kinks"
    if plan.coverage.kind == "directions" and stats["kinks"]:
        # A direction through kinks brackets uᵀg with every kinked element's range at once: a
        # smooth element's error can hide there. The screen never passes what it cannot see.
        return "inconclusive", "screen"
    xp = host_namespace()
    if not math.isfinite(noise_rel) or noise_rel > noise_bound(plan.eval_eps):
        return "inconclusive", "noise"
    coarse = float(xp.max(plan.grad_eps[where])) if plan.counts else 0.0
    if not math.isfinite(resolution) or resolution > max(PRECISION, 8 * coarse):
        # The finite differences' share, or the backprop's own precision's.
        return "inconclusive", "noise" if (SAFETY + 1) * noise_rel > resolution / 2 else "precision"
    return "pass", ""


def noise_bound(eval_eps: float) -> float:
    """INCONCLUSIVE where J is evaluated in float64. In a coarser dtype (JAX without x64,
    upcast=False) the finite differences cannot resolve 0.1 %: there the resolution's own bound
    (PRECISION) decides."""
    return INCONCLUSIVE if eval_eps < 1e-10 else math.inf


def _quiet(stats: Mapping[str, float], plan: Plan, epsilon: Any, delta: float, count: int) -> bool:
    """Under the notebook's ε: both sides of a parameter below rounding noise (see NOTEBOOK_ULPS)."""
    if epsilon == "auto":
        return False
    noise = NOTEBOOK_ULPS * max(delta, 0.0) / float(epsilon) * max(count, 1) ** 0.5
    return stats["analytic"] <= noise and stats["numeric"] <= noise


def _notebook_verdicts(
    difference: float,
    differences: Mapping[str, float],
    nonfinite: Mapping[str, bool],
    threshold: float,
    quiet: Mapping[str, bool] | None = None,
) -> tuple[str, dict[str, str]]:
    """The overall and per-parameter verdicts under a fixed epsilon and threshold (no error bars).

    The overall verdict is the notebook's rule (difference ≤ threshold), made stricter in one
    case only: a parameter whose own difference is beyond SAFETY × threshold fails the check
    even when the other parameters' norms hide it in the overall difference — unless both its
    gradient and its finite difference are rounding noise (``quiet``: a bias the cost does not
    depend on scores ≈ 1 on its own, and means nothing). A finite difference that is NaN or Inf
    makes the check inconclusive (never a pass, and never a fail of a correct gradient).
    Per-parameter verdicts never contradict the overall one: a passing check has no faults; in a
    failing one those beyond SAFETY × threshold are at fault, those over the threshold but within
    that band inconclusive (or at fault, when nothing else is).
    """
    quiet = quiet or {}
    per = {}
    for name, value in differences.items():
        if nonfinite[name]:
            per[name] = "inconclusive"
        elif not value <= SAFETY * threshold and not quiet.get(name, False):
            per[name] = "fail"
        else:
            per[name] = "inconclusive" if value > threshold and not quiet.get(name, False) else "pass"
    if "fail" not in per.values() and any(nonfinite.values()):
        return "inconclusive", per
    passed = difference <= threshold and "fail" not in per.values()
    if passed:
        return "pass", {name: "pass" for name in per}
    if "fail" not in per.values():
        over = [name for name, v in per.items() if v == "inconclusive" and not nonfinite[name]]
        for name in over or [
            max(differences, key=lambda k: -math.inf if math.isnan(differences[k]) else differences[k])
        ]:
            per[name] = "fail"
    return "fail", per


def _numeric_on_backend(values: Any, shape: tuple[int, ...], plan: Plan, backend: Any) -> Any:
    """A parameter's finite differences on the backend and device the check ran on (flat for
    sampled and directional checks), in float64 where the backend has it."""
    xp = backend.xp
    wide = float64_of(xp)
    dtype = wide if wide is not None else xp.float32
    hx = host_namespace()
    data = values if plan.coverage.kind != "elements" else hx.reshape(values, shape)
    return to_backend(data, backend, dtype=dtype)
