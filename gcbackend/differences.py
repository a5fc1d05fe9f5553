"""Finite differences that carry their own error bars: steps, stencils, noise, kinks.

A central difference with step h has two errors: truncation, ≈ h²·J‴/6, and rounding of
the cost, ≈ δ/h where δ is the rounding error of one evaluation of J. The notebook's fixed
ε = 1e-7 sits where rounding dominates (the per-parameter differences of a correct backprop
come out near 3e-7, over its own 2e-7 threshold). Here:

* the step follows the dtype and the magnitude of θ (``auto_steps``), rounded so that
  θ + h is exact;
* every element is also evaluated at ±2h in the same stacked pass, so the truncation error
  is *measured* (Richardson: D(h) − D(2h) ≈ −3ch²), and so is the rounding error δ of J
  (from the fourth difference), instead of both being guessed;
* one extra evaluation J(θ) gives one-sided slopes: where they differ by a jump that does
  not shrink with h, the element sits at a kink (ReLU, abs, max), and any gradient between
  the one-sided slopes is a valid subgradient there.

Everything stays in the array API: these functions see the namespace ``xp`` and arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat

from . import evaluation as engine
from .backends import take, to_host
from .params import Layout

__all__ = ["REFINE_FACTOR", "REFINE_ROUNDS", "STEP_ROUNDING", "Estimate", "auto_steps", "estimate"]

STEP_ROUNDING = 1000.0
"""The rounding error of J the default step is tuned for, in units of eps·|J|.

The textbook step eps^(1/3) assumes J is computed to about one ulp; real costs are worse
(the seed case's BCE: 8 to 44 ulps, from log(1 − A) near saturation), and truncation is
measured anyway, so the step leans larger: h = (1000·eps)^(1/3) ≈ 6e-5 in float64."""
KINK_RATIO = 0.25
"""A kink's one-sided slopes differ by a jump that stays put when h doubles; a smooth
function's differ by h·J″, which doubles."""
KINK_SIGNIFICANCE = 100.0
"""A jump counts as a kink only when this many times above the slopes' rounding noise."""
REFINE_FACTOR = 100.0
"""An element whose fourth difference is far above rounding (KINK_SIGNIFICANCE × its
standard deviation) without a jump at θ has a kink *near* θ, crossed within ±2h (a ReLU
unit changing sign): it is evaluated again with a step this much smaller. How much smaller the step of each refinement round is; a kink at a uniformly random
distance within ±2h is still crossed after one round with probability 1/REFINE_FACTOR."""
REFINE_ROUNDS = 2
"""Refinement rounds with epsilon='auto' (a step the user chose is never changed)."""


def auto_steps(
    parts: Mapping[str, Any], *, order: int, xp: ModuleType, exact_in: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Per-element steps h = (1000·eps)^(1/3)·max(1, |θ|) (power 1/5 for order 4), θ + h exact.

    The power balances truncation (∝ h^order) against rounding (∝ δ/h); see STEP_ROUNDING.
    check() judges order=4 at order 2's step: its error bar is measured from D(h) − D(2h),
    which at the larger order-4 step made it 100–1000× less sensitive than order 2.
    Rounding h to (θ + h) − θ makes θ + h exactly representable, so the step the cost sees
    is the step the quotient divides by; ``exact_in`` (see ``snap``) makes it exact in a
    parameter's own, narrower dtype too.
    """
    steps = {}
    for name, theta in parts.items():
        eps = STEP_ROUNDING * float(xp.finfo(theta.dtype).eps)
        base = eps ** (1.0 / 3.0 if order == 2 else 1.0 / 5.0)
        h = base * xp.maximum(xp.abs(theta), xp.ones_like(theta))
        steps[name] = snap(theta, h, None if exact_in is None else exact_in.get(name), xp)
    return steps


def snap(theta: Any, h: Any, dtype: Any, xp: ModuleType) -> Any:
    """The step nearest h with θ + h exactly representable in θ's dtype and in ``dtype``.

    A float32 parameter is evaluated in float64 (upcast), but a cost may cast it back
    (``W.astype(np.float32)``, ``.float()``): it then sees θ + h rounded to float32, a step
    off by up to half an ulp of float32 — 5e-4 of h, the same at h and 2h, so no error bar
    sees it, and a correct float32 backprop failed. Snapped in float32, the step it sees is h.
    """
    wide = (theta + h) - theta
    if dtype is None or dtype == theta.dtype:
        return wide
    narrow = xp.astype(theta, dtype)
    snapped = xp.astype(narrow + xp.astype(h, dtype), theta.dtype) - theta
    # Where the narrow dtype cannot hold a step near h (float16's ulp at |θ| ~ 1 is 1e-3,
    # above the float64 step), the step the check chose stands.
    return xp.where((snapped >= 0.5 * wide) & (snapped <= 2.0 * wide), snapped, wide)


@dataclass(frozen=True)
class Estimate:
    """Per element of each parameter (flat (s,) for sampled or directional checks):

    ``numeric`` the derivative; ``error`` a bound on |numeric − true derivative| from the
    measured truncation and rounding; ``kink`` where the one-sided slopes jump; ``low`` /
    ``high`` the one-sided slopes' range; ``rounding`` δ, the measured rounding error of one
    evaluation of J (a Python float).
    """

    numeric: dict[str, Any]
    error: dict[str, Any]
    kink: dict[str, Any]
    low: dict[str, Any]
    high: dict[str, Any]
    rounding: float
    refined: int = 0
    """How many elements were evaluated again with smaller steps (4 evaluations each)."""


def estimate(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    steps: Mapping[str, Any],
    order: int,
    xp: ModuleType,
    mode: str = "unverified",
    memory_budget: int = engine.DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    elements: Mapping[str, Any] | None = None,
    directions: Mapping[str, Any] | None = None,
    runner: engine.Runner | None = None,
    refine: int = REFINE_ROUNDS,
    center: Any = None,
    rounding: Any = None,
    paths: dict | None = None,
    exact_in: Mapping[str, Any] | None = None,
) -> Estimate:
    """Derivatives with error bars from the stencil ±h, ±2h (and J(θ) once) in one pass.

    ``steps`` maps names to h (the tensor's shape). With ``elements`` (flat indices per
    name) only those elements are evaluated; with ``directions`` (name → (k, n) unit rows)
    the derivatives are along those rows, with one step per tensor, the largest of
    ``steps[name]``. A kink along a direction is flagged like an element's: for a correct
    subgradient g, uᵀg lies between the one-sided directional derivatives.
    ``runner`` evaluates the stacked calls elsewhere (``engine.stencil_costs``); J(θ) stays here.

    Up to ``refine`` rounds re-evaluate, with steps REFINE_FACTOR times smaller, the elements
    with a kink crossed within ±2h (see REFINE_FACTOR), and keep whichever estimate has
    the smaller error bar. A refinement round is passed J(θ) as ``center`` and δ as
    ``rounding``: both are the first round's, measured over every element.

    ``exact_in`` (name → the parameter's own dtype) keeps refined steps exact there (``snap``).
    ``paths`` (engine.stencil_costs) records how each tensor was evaluated; a batched path
    accepted with a discrepancy d between batched and single values (``Path.discrepancy``)
    moves each J by up to d, so each derivative's error bar includes d/h.
    """
    hops = None
    if directions is not None:
        # One step per tensor along unit directions: the values are true directional
        # derivatives uᵀ∇J, and a refinement round only shrinks the step.
        hops = {name: xp.max(xp.reshape(steps[name], (-1,))) for name in directions}
    paths = {} if paths is None else paths
    grid = engine.stencil_costs(
        cost,
        parts,
        args,
        layout=layout,
        steps=steps,
        multipliers=(1.0, -1.0, 2.0, -2.0),
        xp=xp,
        mode=mode,
        memory_budget=memory_budget,
        progress=progress,
        elements=elements,
        directions=None if directions is None else {name: u * hops[name] for name, u in directions.items()},
        runner=runner,
        paths=paths,
    )
    if center is None:
        center = engine.evaluate_center(cost, parts, args, layout=layout, xp=xp)
    numeric, error, kink, low, high, fourth, stencils = {}, {}, {}, {}, {}, {}, {}
    for name, costs in grid.items():
        if directions is not None:
            h = xp.astype(hops[name], costs.dtype)
        elif elements is not None:
            h = xp.astype(take(xp.reshape(steps[name], (-1,)), elements[name], xp), costs.dtype)
        else:
            h = xp.astype(steps[name], costs.dtype)
        plus, minus, plus2, minus2 = costs[0, ...], costs[1, ...], costs[2, ...], costs[3, ...]
        # Differences from J(θ) first: no sum of costs can overflow where J itself is finite.
        rise, fall = plus - center, center - minus
        rise2, fall2 = plus2 - center, center - minus2
        one = (rise + fall) / (2 * h)
        two = (rise2 + fall2) / (4 * h)
        numeric[name] = one if order == 2 else (4.0 * one - two) / 3.0
        fourth[name] = (rise2 - fall2) - 4.0 * (rise - fall)
        # An element J does not depend on (a dead ReLU unit, a dropped-out one) leaves J
        # bit for bit unchanged: it says nothing about J's rounding, and is left out of δ.
        still = (rise == 0) & (fall == 0) & (rise2 == 0) & (fall2 == 0)
        stencils[name] = _Stencil(one, two, h, rise, fall, rise2, fall2, still)
    delta = _rounding(center, fourth, stencils, xp) if rounding is None else rounding
    for name, (one, two, h, rise, fall, rise2, fall2, _) in stencils.items():
        # |D(h) − D(2h)| / 3 is D(h)'s truncation (Richardson); δ/h bounds its rounding.
        # An accepted batched path moves each J by up to its discrepancy d: d/h more error.
        batch = engine.path_of(paths, name).discrepancy
        central = xp.abs(one - two) / 3.0 + (1.0 if order == 2 else 1.5) * (delta + batch) / h
        is_kink = xp.reshape(_kinks(stencils[name], delta, xp), tuple(rise.shape))
        kink[name] = is_kink
        right, left = rise / h, fall / h
        low[name], high[name] = xp.minimum(left, right), xp.maximum(left, right)
        # At a kink the one-sided slopes are what is compared: each is off by its own
        # truncation, h·J″/2 ≈ its change from h to 2h, and by 2δ/h of rounding.
        one_sided = (
            xp.maximum(xp.abs(right - rise2 / (2 * h)), xp.abs(left - fall2 / (2 * h)))
            + 2.0 * (delta + batch) / h
        )
        error[name] = xp.where(kink[name], one_sided, central)
    # A fourth difference far above rounding (a smooth J's is h⁴J⁗, nothing) where the
    # slopes do not jump at θ itself: a kink crossed within ±2h. Ask again, closer in.
    gross = KINK_SIGNIFICANCE * 70.0**0.5 * delta
    suspects = {name: xp.reshape((xp.abs(fourth[name]) > gross) & ~kink[name], (-1,)) for name in stencils}
    # Until then, its error bar also covers |fourth difference|/h. A kink at distance d < h
    # from θ puts the central difference off by c(h − d)/2h (c the slope's change), which
    # Richardson sees only for d near h, while the fourth difference is c|3d − 2h| there:
    # with SAFETY it covers every d. A smooth J's is h³J⁗, below Richardson's h²J‴ anyway.
    # So a step that crosses a ReLU corner (a large epsilon the user chose) is not a bug.
    # Flagged by the fourth difference against δ, or (where kinks are crossed almost
    # everywhere and δ itself is inflated) against Richardson's own difference.
    for name, stencil in stencils.items():
        spill = xp.abs(fourth[name]) / stencil.h
        crossed = xp.reshape(suspects[name], tuple(spill.shape)) | (
            (spill > 3.0 * xp.abs(stencil.one - stencil.two))
            & (xp.abs(fourth[name]) > 10.0 * 70.0**0.5 * delta)
            & ~kink[name]  # a kink at θ is judged by its one-sided slopes, not widened
        )
        error[name] = xp.where(crossed, xp.maximum(error[name], spill), error[name])
    first = Estimate(numeric, error, kink, low, high, float(to_host(delta)))
    if refine <= 0:
        return first
    counts = to_host(xp.stack([xp.sum(xp.astype(m, xp.int64)) for m in suspects.values()])).tolist()
    if not any(counts):
        return first
    # Only the flagged elements are evaluated again (a host-side index list: the mask is
    # already on the host's mind, and a lazy backend such as Dask cannot size a nonzero).
    flags = {name: to_host(m).reshape(-1).tolist() for name, m in suspects.items()}
    where = {
        name: xp.asarray(
            [i for i, f in enumerate(flag) if f], dtype=xp.int64, device=array_api_compat.device(m)
        )
        for (name, flag), m in zip(flags.items(), suspects.values())
    }
    narrower = dict(
        steps={
            name: snap(p, steps[name] / REFINE_FACTOR, None if exact_in is None else exact_in.get(name), xp)
            for name, p in parts.items()
        }
    )
    if directions is None:
        narrower["elements"] = {
            name: at if elements is None else take(elements[name], at, xp) for name, at in where.items()
        }
    else:
        narrower["directions"] = {name: take(directions[name], at, xp, axis=0) for name, at in where.items()}
    closer = estimate(
        cost,
        parts,
        args,
        layout=layout,
        order=order,
        xp=xp,
        mode=mode,
        memory_budget=memory_budget,
        progress=progress,
        runner=runner,
        refine=refine - 1,
        center=center,
        rounding=delta,
        paths=paths,
        exact_in=exact_in,
        **narrower,
    )
    merged = {field: {} for field in ("numeric", "error", "kink", "low", "high")}
    for (name, mask), count in zip(suspects.items(), counts):
        shape = tuple(first.numeric[name].shape)
        if not count:
            for field, out in merged.items():
                out[name] = getattr(first, field)[name]
            continue
        # Element j's refined values sit at its rank among the suspects: a gather, no scatter.
        slot = xp.clip(xp.cumulative_sum(xp.astype(mask, xp.int64)) - 1, min=0)
        better = mask & (xp.take(closer.error[name], slot) < xp.reshape(first.error[name], (-1,)))
        for field, out in merged.items():
            old, new = (
                xp.reshape(getattr(first, field)[name], (-1,)),
                xp.take(getattr(closer, field)[name], slot),
            )
            out[name] = xp.reshape(xp.where(better, new, old), shape)
    return Estimate(**merged, rounding=first.rounding, refined=sum(counts) + closer.refined)


class _Stencil(NamedTuple):
    """One tensor's stencil: D(h), D(2h), h, and J at ±h, ±2h relative to J(θ)."""

    one: Any
    two: Any
    h: Any
    rise: Any  # J(θ + h) − J(θ)
    fall: Any  # J(θ) − J(θ − h)
    rise2: Any  # J(θ + 2h) − J(θ)
    fall2: Any  # J(θ) − J(θ − 2h)
    still: Any  # J bit for bit unchanged at all four points: J does not depend on it


def _rounding(center: Any, fourth: dict[str, Any], stencils: dict[str, _Stencil], xp: ModuleType) -> Any:
    """δ, the rounding error of one evaluation of J, measured (a 0-d array).

    The fourth difference 6J₀ − 4(J₊ + J₋) + (J₊₂ + J₋₂) is h⁴J⁗ (negligible) plus rounding
    of standard deviation √70·δ. Elements near a kink have a jump there instead, so: a
    robust first guess from the median over the elements whose one-sided slopes do not
    jump alike at h and 2h (a kink's do, whatever δ: with half of a tensor's elements on
    ReLU kinks the median was a kink's jump and δ, so every error bar, grew a million-fold),
    kinks flagged with it, then the RMS over the other elements (rounding is heavy-tailed:
    the median alone underestimates it up to 6× on the seed case), leaving out gross
    outliers too: a kink crossed between θ and θ ± 2h makes the fourth difference ~1e8·δ
    (the M model of bench/run.py: 66 of 2,625 elements), and one of them would inflate δ a
    million-fold. Elements J does not depend on (J bit for bit unchanged) are left out:
    their fourth difference is exactly 0 and would dilute δ (a dropout mask that drops a
    unit on every example made a correct W1 fail). Sums are of scaled values (no overflow
    or underflow at any scale of J).
    """
    flat4 = {name: xp.reshape(v, (-1,)) for name, v in fourth.items()}
    eps = float(xp.finfo(center.dtype).eps)
    floor = eps * xp.abs(center)
    live = {name: ~xp.reshape(stencil.still, (-1,)) for name, stencil in stencils.items()}
    alike = {name: _kinks(stencil, xp.zeros_like(floor), xp) for name, stencil in stencils.items()}
    informative = xp.concat([live[name] & ~alike[name] for name in stencils])
    pooled_all = xp.abs(xp.concat(list(flat4.values())))
    # The median of the informative elements: the others sort to the end, as +Inf.
    pooled = xp.sort(xp.where(informative, pooled_all, xp.full_like(pooled_all, xp.inf)))
    count = int(to_host(xp.sum(xp.astype(informative, xp.int64))))
    if count == 0:
        guess = floor
    else:
        middle = count // 2
        median = pooled[middle] if count % 2 else (pooled[middle - 1] + pooled[middle]) / 2
        guess = xp.maximum(median / (0.6745 * 70.0**0.5), floor)
    # A kink crossed within ±2h (not at θ, so not flagged) leaves a jump of 1e8δ, not 10δ.
    gross = KINK_SIGNIFICANCE * 70.0**0.5 * guess
    smooth = xp.concat(
        [
            live[name] & ~_kinks(stencils[name], guess, xp) & (xp.abs(flat4[name]) <= gross)
            for name in stencils
        ]
    )
    kept = xp.where(smooth, pooled_all, xp.zeros_like(pooled_all))
    scale = xp.max(kept)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    counted = xp.maximum(xp.sum(xp.astype(smooth, kept.dtype)), xp.ones_like(scale))
    rms = scale * xp.linalg.vector_norm(kept / scale) / xp.sqrt(counted * 70.0)
    return xp.maximum(rms, guess)


def _kinks(stencil: _Stencil, delta: Any, xp: ModuleType) -> Any:
    """Flat mask of elements whose one-sided slopes differ by a jump that does not shrink
    with h (a smooth function's differ by h·J″, which doubles with h)."""
    h = stencil.h
    jump = xp.reshape((stencil.rise - stencil.fall) / h, (-1,))
    jump_at_2h = xp.reshape((stencil.rise2 - stencil.fall2) / (2 * h), (-1,))
    significant = xp.abs(jump) > KINK_SIGNIFICANCE * xp.reshape(delta / h, (-1,))
    return significant & (xp.abs(jump_at_2h - jump) < KINK_RATIO * xp.abs(jump))
