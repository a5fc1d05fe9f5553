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
from typing import Any

from . import engine
from .backends import to_host
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


def auto_steps(parts: Mapping[str, Any], *, order: int, xp: ModuleType) -> dict[str, Any]:
    """Per-element steps h = (1000·eps)^(1/3)·max(1, |θ|) (power 1/5 for order 4), θ + h exact.

    The power balances truncation (∝ h^order) against rounding (∝ δ/h); see STEP_ROUNDING.
    Rounding h to (θ + h) − θ makes θ + h exactly representable, so the step the cost sees
    is the step the quotient divides by.
    """
    steps = {}
    for name, theta in parts.items():
        eps = STEP_ROUNDING * float(xp.finfo(theta.dtype).eps)
        base = eps ** (1.0 / 3.0 if order == 2 else 1.0 / 5.0)
        h = base * xp.maximum(xp.abs(theta), xp.ones_like(theta))
        steps[name] = (theta + h) - theta
    return steps


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
) -> Estimate:
    """Derivatives with error bars from the stencil ±h, ±2h (and J(θ) once) in one pass.

    ``steps`` maps names to h (the tensor's shape). With ``elements`` (flat indices per
    name) only those elements are evaluated; with ``directions`` (name → (k, n) rows, the
    step included) the derivatives are along those rows, and kinks are not judged.
    ``runner`` evaluates the stacked calls elsewhere (``engine.stencil_costs``); J(θ) stays here.

    Up to ``refine`` rounds re-evaluate, with steps REFINE_FACTOR times smaller, the elements
    with a kink crossed within ±2h (see REFINE_FACTOR), and keep whichever estimate has
    the smaller error bar. A refinement round is passed J(θ) as ``center`` and δ as
    ``rounding``: both are the first round's, measured over every element.

    ``paths`` (engine.stencil_costs) records how each tensor was evaluated; a batched path
    accepted with a discrepancy d between batched and single values (``Path.discrepancy``)
    moves each J by up to d, so each derivative's error bar includes d/h.
    """
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
        directions=directions,
        runner=runner,
        paths=paths,
    )
    if center is None:
        center = engine.evaluate_center(cost, layout.wrap(dict(parts)), args, xp=xp)
    numeric, error, kink, low, high, fourth, pieces = {}, {}, {}, {}, {}, {}, {}
    for name, costs in grid.items():
        if directions is not None:
            h = xp.ones((costs.shape[1],), dtype=costs.dtype, device=costs.device)
        elif elements is not None:
            h = xp.astype(xp.take(xp.reshape(steps[name], (-1,)), elements[name]), costs.dtype)
        else:
            h = xp.astype(steps[name], costs.dtype)
        plus, minus, plus2, minus2 = costs[0, ...], costs[1, ...], costs[2, ...], costs[3, ...]
        one = (plus - minus) / (2 * h)
        two = (plus2 - minus2) / (4 * h)
        numeric[name] = one if order == 2 else (4.0 * one - two) / 3.0
        fourth[name] = 6.0 * center - 4.0 * (plus + minus) + (plus2 + minus2)
        pieces[name] = (one, two, h, plus - center, center - minus, (plus2 - center) - (center - minus2))
    delta = _rounding(center, fourth, pieces, xp) if rounding is None else rounding
    for name, (one, two, h, rise, fall, _) in pieces.items():
        # |D(h) − D(2h)| / 3 is D(h)'s truncation (Richardson); δ/h bounds its rounding.
        batch = engine.path_of(paths, name).discrepancy  # 0 unless batched values only nearly agree
        error[name] = xp.abs(one - two) / 3.0 + (1.0 if order == 2 else 1.5) * (delta + batch) / h
        is_kink = xp.reshape(_kinks(pieces[name], delta, xp), tuple(rise.shape))
        kink[name] = is_kink if directions is None else xp.zeros_like(is_kink)
        right, left = rise / h, fall / h
        low[name], high[name] = xp.minimum(left, right), xp.maximum(left, right)
    first = Estimate(numeric, error, kink, low, high, float(to_host(delta)))
    if refine <= 0:
        return first
    # A fourth difference far above rounding (a smooth J's is h⁴J⁗, nothing) where the
    # slopes do not jump at θ itself: a kink crossed within ±2h. Ask again, closer in.
    gross = KINK_SIGNIFICANCE * 70.0**0.5 * delta
    suspects = {name: xp.reshape((xp.abs(fourth[name]) > gross) & ~kink[name], (-1,)) for name in pieces}
    counts = to_host(xp.stack([xp.sum(xp.astype(m, xp.int64)) for m in suspects.values()])).tolist()
    if not any(counts):
        return first
    where = {name: xp.nonzero(m)[0] for name, m in suspects.items()}
    if directions is None:
        narrower = dict(
            steps={name: (p + steps[name] / REFINE_FACTOR) - p for name, p in parts.items()},
            elements={
                name: at if elements is None else xp.take(elements[name], at) for name, at in where.items()
            },
        )
    else:  # along u/F the derivative is 1/F of the one along u: scaled back below
        narrower = dict(
            steps=steps,
            directions={
                name: xp.take(directions[name], at, axis=0) / REFINE_FACTOR for name, at in where.items()
            },
        )
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
        **narrower,
    )
    if directions is not None:
        closer = Estimate(
            **{
                field: {name: v * REFINE_FACTOR for name, v in getattr(closer, field).items()}
                for field in ("numeric", "error", "low", "high")
            },
            kink=closer.kink,
            rounding=closer.rounding,
            refined=closer.refined,
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


def _rounding(center: Any, fourth: dict[str, Any], pieces: dict[str, tuple[Any, ...]], xp: ModuleType) -> Any:
    """δ, the rounding error of one evaluation of J, measured (a 0-d array).

    The fourth difference 6J₀ − 4(J₊ + J₋) + (J₊₂ + J₋₂) is h⁴J⁗ (negligible) plus rounding
    of standard deviation √70·δ. Elements near a kink have a jump there instead, so: a
    robust first guess from the median (0.6745σ for normal noise), kinks flagged with it,
    then the RMS over the other elements (rounding is heavy-tailed: the median alone
    underestimates it up to 6× on the seed case), leaving out gross outliers too: a kink
    crossed between θ and θ ± 2h makes the fourth difference ~1e8·δ (the M model of
    bench/run.py: 66 of 2,625 elements), and one of them would inflate δ a million-fold.
    """
    flat4 = {name: xp.reshape(v, (-1,)) for name, v in fourth.items()}
    pooled = xp.sort(xp.abs(xp.concat(list(flat4.values()))))
    middle = pooled.shape[0] // 2
    median = pooled[middle] if pooled.shape[0] % 2 else (pooled[middle - 1] + pooled[middle]) / 2
    eps = float(xp.finfo(pooled.dtype).eps)
    floor = eps * xp.abs(center)
    guess = xp.maximum(median / (0.6745 * 70.0**0.5), floor)
    # A kink crossed within ±2h (not at θ, so not flagged) leaves a jump of 1e8δ, not 10δ.
    gross = KINK_SIGNIFICANCE * 70.0**0.5 * guess
    smooth = {name: ~_kinks(pieces[name], guess, xp) & (xp.abs(flat4[name]) <= gross) for name in pieces}
    squares = xp.concat(
        [xp.where(smooth[name], flat4[name] * flat4[name], xp.zeros_like(flat4[name])) for name in pieces]
    )
    counted = xp.concat([xp.astype(smooth[name], squares.dtype) for name in pieces])
    return xp.maximum(
        xp.sqrt(xp.sum(squares) / xp.maximum(xp.sum(counted), xp.ones_like(floor)) / 70.0), guess
    )


def _kinks(piece: tuple[Any, ...], delta: Any, xp: ModuleType) -> Any:
    """Flat mask of elements whose one-sided slopes differ by a jump that does not shrink
    with h (a smooth function's differ by h·J″, which doubles with h)."""
    _, _, h, rise, fall, jump2 = piece
    jump = xp.reshape((rise - fall) / h, (-1,))
    jump_at_2h = xp.reshape(jump2 / (2 * h), (-1,))
    significant = xp.abs(jump) > KINK_SIGNIFICANCE * xp.reshape(delta / h, (-1,))
    return significant & (xp.abs(jump_at_2h - jump) < KINK_RATIO * xp.abs(jump))
