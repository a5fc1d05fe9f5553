"""Finite differences that carry their own error bars, spent only where they decide something.

A central difference with step h has two errors: truncation, ≈ h²·J‴/6, and rounding of the
cost, ≈ δ/h where δ is the rounding error of one evaluation of J. This module climbs a
staircase, probe by probe (``Ladder``), asking the evaluation only for the rows that can still
change a verdict:

1. **±h for every probe** (2N rows): D(h) = (J(θ + h) − J(θ − h)) / 2h. A probe *settles* here
   when the backprop's value agrees with D(h) within a tolerance set by J's rounding (an a
   priori bound, SETTLE_ULPS ulps of the largest |J| seen) and its one-sided slopes agree (no
   kink crossed within ±h: a kink's bias on D(h) is half their difference). A wrong value that
   agrees this closely would need the finite difference to be off by exactly its error: a
   coincidence, not a bug.
2. **±2h for the others**: the stencil of five points gives Richardson's truncation estimate
   |D(h) − D(2h)| / 3, a measured δ (from the fourth differences, pooled over probes), and
   one-sided slopes: where they jump by the same amount at h and 2h, θ sits on a kink (ReLU,
   abs, max), and any value between them is a valid subgradient.
3. **Other steps, where the stencil cannot tell**: LADDER_FACTOR times smaller where J is not finite
   (a domain boundary within 2h: log, sqrt, 1/var) or a kink is crossed within ±2h but not at
   θ (the fourth difference far above rounding); LADDER_FACTOR times larger where rounding dominates and
   the probe cannot be told apart from a value off by IMPROVE. The candidate with the
   smallest error bar among the clean ones stands.
4. **Tied kinks** move together: a max-pool backward that routes dout to every tied maximum
   has every coordinate inside its bracket, but not the direction that raises the tied
   elements together (``Ladder`` checks those directions).
5. **The forward's rounding**, for low-precision gradients whose values are off: every input
   of the cost perturbed by a few ulps of the gradient's precision, and D(h) measured again;
   how far the true gradient moves is what a correct low-precision pipeline may be off by.

Everything here runs on the host over O(N) numbers, the values the evaluation brought back
(one transfer per stage); ``auto_steps`` and ``snap`` run on the backend, where θ lives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

from .backends import host_namespace

__all__ = [
    "IMPROVE",
    "KINK_RATIO",
    "KINK_SIGNIFICANCE",
    "LADDER_FACTOR",
    "LADDER_ROUNDS",
    "SAFETY",
    "SETTLE_ULPS",
    "STEP_ROUNDING",
    "Estimate",
    "Judged",
    "Request",
    "auto_steps",
    "judged",
    "snap",
]

STEP_ROUNDING = 1000.0
"""The rounding error of J the first step is tuned for, in units of eps·|J|.

The textbook step eps^(1/3) assumes J is computed to about one ulp; real costs are worse (the
seed case's BCE: 8 to 44 ulps, from log(1 − A) near saturation), and the staircase measures
truncation where it matters, so the step leans larger: h = (1000·eps)^(1/3)·max(1, |θ|) ≈ 6e-5
in float64. The staircase moves it where a probe needs another (see the module docstring)."""
COARSE_STEP_ROUNDING = 1.0
"""The same where J is evaluated in float32 (JAX without x64, upcast=False): h = eps^(1/3) ≈ 5e-3.
The float64 rule's 0.05 crossed a ReLU corner in most rows of a small ReLU net; refined, float32's
rounding over the smaller step left it inconclusive."""
LOW_STEP_ULPS = 4.0
"""The first step is at least this many ulps of the parameter's own dtype at θ: a float16 or
bfloat16 parameter evaluated in float64 may be cast back by the cost, which rounds a smaller
step away (the finite difference is then 0)."""
SAFETY = 10.0
"""An element may be off by this many times its error bar (plus the backprop's rounding
allowance) and still be noise."""
SETTLE_ULPS = 64.0
"""The a priori rounding of one evaluation of J used to settle probes at ±h, in ulps of the
largest |J| among their three values (the seed case's BCE rounds to 8–44 ulps)."""
SETTLE_SAFETY = 4.0
"""A probe settles at ±h when the backprop's value is within this many times the rounding
bound of D(h) (plus the backprop's own rounding)."""
SMOOTH = 1e-3
"""…and its one-sided slopes differ by at most this fraction of their size (plus rounding):
a kink crossed within ±h biases D(h) by half their difference."""
KINK_RATIO = 0.25
"""A kink's one-sided slopes differ by a jump that stays put when h doubles; a smooth
function's differ by h·J″, which doubles."""
KINK_SIGNIFICANCE = 10.0
"""A jump counts as a kink only when this many times above the slopes' rounding noise."""
GRID_SAMPLES = 3
"""See ``_grid``: how many nonzero differences reveal J's grid."""
OUTLIER_SLOPE = 1e-4
"""See ``_robust``: a fourth difference above this fraction of its slopes' change over the step
may be a kink crossed within ±2h; below it, it is rounding."""
LADDER_FACTOR = 4.0
"""How much smaller (or larger) each further step is: rounding over the step grows by as much,
so where J is evaluated in float32 a factor of 10 left a refined ReLU element too noisy to
judge (4 judged 8 of 10 float32 ReLU nets of the frontier battery, 10 judged 7)."""
LADDER_ROUNDS = 4
"""Further steps per probe, at most."""
IMPROVE = 1e-6
"""A probe whose error bar is above this fraction of |analytic| + |numeric| (or 1e4·eps of
the evaluation, if larger) tries another step, once its verdict is not already clear."""
ROUNDING_DIRECTIONS = 8
"""Random directions along which δ is measured once per check (32 evaluations)."""
ROUNDING_LARGEST = 2**16
"""…of one tensor, the largest with at most this many elements (its directions are dense)."""
SENSITIVITY_ULPS = 32.0
"""The forward's rounding is emulated by perturbing every input by this many ulps of the
gradient's precision (random signs)."""
SENSITIVITY_SAFETY = 0.25
"""A low-precision gradient may be off by this fraction of the measured change of the true
gradient under that 32-ulp perturbation (two samples, root mean square): 8 ulps' worth. On
trained float32 PyTorch models (MSE, tanh; 4 seeds, 2,000 Adam steps) the float32 backprop's
error was at most 0.094 of it (median 0.005): a margin of 2.7× at the worst element."""
SENSITIVITY_FLOOR = 30.0
"""…and every value of a low-precision gradient this many times the root mean square of the
changes measured: where the forward's rounding is at quantities the inputs barely move (a
softmax saturated at 1 after long training, whose p − 1 loses float32's digits), one value's
own change can be 300× below its error, the model's typical change not (≤ 11× measured, on
trained float32 cross-entropy nets)."""
SENSITIVITY_BATCH = 32
"""Off probes of one tensor re-measured per round, the worst first."""


def auto_steps(
    parts: Mapping[str, Any], *, xp: ModuleType, exact_in: Mapping[str, Any] | None = None, order: int = 2
) -> dict:
    """Per-element first steps h = (STEP_ROUNDING·eps)^(1/3)·max(1, |θ|), θ + h exact (power 1/5
    for ``order=4``'s own optimum; check() uses order 2's step for both: order 4's error bar is
    measured from D(h) − D(2h), which at the larger step made it 100–1000× less sensitive).

    At least LOW_STEP_ULPS ulps of the parameter's own dtype (``exact_in``) at θ. Rounding h
    to (θ + h) − θ makes θ + h exactly representable, so the step the cost sees is the step
    the quotient divides by; ``snap`` makes it exact in the parameter's own dtype too.
    """
    steps = {}
    for name, theta in parts.items():
        eps = float(xp.finfo(theta.dtype).eps)
        rounding = STEP_ROUNDING if eps < 1e-10 else COARSE_STEP_ROUNDING
        base = (rounding * eps) ** (1.0 / 3.0 if order == 2 else 1.0 / 5.0)
        h = base * xp.maximum(xp.abs(theta), xp.ones_like(theta))
        own = None if exact_in is None else exact_in.get(name)
        if own is not None and own != theta.dtype:
            narrow = xp.astype(theta, own)
            ulp = xp.astype(xp.abs(xp.nextafter(narrow, xp.full_like(narrow, xp.inf)) - narrow), theta.dtype)
            h = xp.maximum(h, LOW_STEP_ULPS * ulp)
        steps[name] = snap(theta, h, own, xp)
    return steps


def snap(theta: Any, h: Any, dtype: Any, xp: ModuleType) -> Any:
    """The step nearest h with θ + h exactly representable in θ's dtype and in ``dtype``.

    A float32 parameter is evaluated in float64 (upcast), but a cost may cast it back
    (``W.astype(np.float32)``, ``.float()``): it then sees θ + h rounded to float32, a step
    off by up to half an ulp of float32, the same at h and 2h, so no error bar sees it.
    Snapped in float32, the step it sees is h.
    """
    wide = (theta + h) - theta
    if dtype is None or dtype == theta.dtype:
        return wide
    narrow = xp.astype(theta, dtype)
    snapped = xp.astype(narrow + xp.astype(h, dtype), theta.dtype) - theta
    # Where the narrow dtype cannot hold a step near h, the step the check chose stands.
    return xp.where((snapped >= 0.5 * wide) & (snapped <= 2.0 * wide), snapped, wide)


class Request(NamedTuple):
    """Rows the ladder asks for: θ + m·h_p along each probe p, for every multiplier m.

    ``base`` 0 is θ and the args as given; b ≥ 1 every input perturbed by ``perturbation``
    (relative, seeded random signs ``b``). ``directions`` (name → (k, n) host displacements,
    steps included) replaces the probes' own coordinates or directions: tied kinks moved together.
    """

    probes: Any
    steps: Any
    multipliers: tuple[float, ...]
    base: int = 0
    perturbation: float = 0.0
    directions: Mapping[str, Any] | None = None


class Tie(NamedTuple):
    """One direction moving several kink elements of a tensor together."""

    tensor: int
    members: tuple[int, ...]  # flat element indices
    target: float  # the backprop's value along it, Σ a_j·h_j
    magnitude: float  # Σ |a_j|·h_j: what its rounding scales with
    numeric: float
    error: float
    kink: bool
    low: float
    high: float


@dataclass
class Estimate:
    """Per probe (host arrays): ``numeric`` the derivative; ``error`` a bound on its distance
    from the true derivative (0 under the notebook's plan: no error bars); ``kink`` where the
    one-sided slopes jump at θ, ``low``/``high`` their range; ``undetermined`` where no step
    gave a finite stencil; ``still`` where J was bit for bit unchanged at every point;
    ``sensitivity`` how far the forward's rounding may move the gradient (0 where not
    measured); ``rounding`` δ; ``counts`` how many probes settled at each stage."""

    numeric: Any
    error: Any
    kink: Any
    low: Any
    high: Any
    undetermined: Any
    still: Any
    sensitivity: Any
    rounding: float
    ties: list[Tie] = field(default_factory=list)
    settled: int = 0
    """Probes settled at their first step (±h only)."""
    completed: int = 0
    """Probes that needed their five-point stencil."""
    moved: Mapping[str, int] = field(default_factory=dict)
    """Probes evaluated at further steps, by why: "smaller" (J not finite, a kink crossed within
    ±2h or to be confirmed at θ, truncation, two steps that disagree), "larger" (rounding
    dominated), "confirm" (found off: a fail rests on two steps)."""
    convex: Any = None  # at a kink: the right slope above the left one
    step: Any = None  # the step of each probe's standing candidate
    central: Any = None  # D(h) at that step
    candidates: Any = None  # how many smooth, clean candidates (steps) each probe has
    inconsistent: Any = None  # its two best smooth candidates disagree beyond their error bars
    rounding_dominated: Any = None  # J's rounding, not truncation, sets its standing error bar


class _Stencil(NamedTuple):
    """Five-point stencils of some probes: J at ±h, ±2h relative to J(θ)."""

    probes: Any
    h: Any
    rise: Any  # J(θ + h) − J(θ)
    fall: Any  # J(θ) − J(θ − h)
    rise2: Any
    fall2: Any
    largest: Any  # max |J| over the five points
    valid: Any = None  # per probe: the candidate may stand (a larger step that disagrees may not)
    larger: bool = False  # a step larger than the first: its fourth differences measure J″″ too, not δ


class _Candidate(NamedTuple):
    numeric: Any
    error: Any
    kink: Any
    low: Any
    high: Any
    crossed: Any  # a kink within ±2h, not at θ
    finite: Any
    still: Any
    one: Any  # D(h), the central difference
    truncation: Any
    roundoff: Any
    convex: Any  # the right slope above the left one (a convex kink: relu, abs, max)


def _candidates(s: _Stencil, delta: Any, order: int, batch: Any) -> _Candidate:
    """Each stencil's derivative and error bar, with δ (per probe) and an accepted batched
    discrepancy (per probe: J moved by up to it, so the derivative by it over h)."""
    xp = host_namespace()
    h = s.h
    finite = xp.isfinite(s.rise) & xp.isfinite(s.fall) & xp.isfinite(s.rise2) & xp.isfinite(s.fall2)
    rise, fall = xp.where(finite, s.rise, 0.0), xp.where(finite, s.fall, 0.0)
    rise2, fall2 = xp.where(finite, s.rise2, 0.0), xp.where(finite, s.fall2, 0.0)
    one = (rise + fall) / (2 * h)
    two = (rise2 + fall2) / (4 * h)
    numeric = one if order == 2 else (4.0 * one - two) / 3.0
    noise = delta + batch
    truncation = xp.abs(one - two) / 3.0
    roundoff = (1.0 if order == 2 else 1.5) * noise / h
    central = truncation + roundoff
    kink = _kinks(s, delta) & finite
    right, left = rise / h, fall / h
    low, high = xp.minimum(left, right), xp.maximum(left, right)
    # At a kink the one-sided slopes are compared: each is off by its own truncation,
    # h·J″/2 ≈ its change from h to 2h, and by 2δ/h of rounding.
    one_sided = xp.maximum(xp.abs(right - rise2 / (2 * h)), xp.abs(left - fall2 / (2 * h))) + 2.0 * noise / h
    error = xp.where(kink, one_sided, central)
    fourth = (rise2 - fall2) - 4.0 * (rise - fall)
    # A fourth difference far above rounding (a smooth J's is h⁴J⁗, nothing) where the slopes
    # do not jump at θ: a kink crossed within ±2h. Until a smaller step settles it, its
    # error bar covers |fourth|/h: a kink at distance d < h puts D(h) off by c(h − d)/2h (c the
    # slope's change), while the fourth difference is c|3d − 2h|.
    gross = KINK_SIGNIFICANCE * 70.0**0.5 * delta
    spill = xp.abs(fourth) / h
    crossed = (
        ~kink
        & finite
        & (
            (xp.abs(fourth) > gross)
            | ((spill > 3.0 * xp.abs(one - two)) & (xp.abs(fourth) > 10.0 * 70.0**0.5 * delta))
        )
    )
    error = xp.where(crossed, xp.maximum(error, spill), error)
    still = (s.rise == 0) & (s.fall == 0) & (s.rise2 == 0) & (s.fall2 == 0)
    return _Candidate(
        numeric, error, kink, low, high, crossed, finite, still, one, truncation, roundoff, right > left
    )


def _kinks(s: _Stencil, delta: Any) -> Any:
    """Probes whose one-sided slopes differ by a jump that does not shrink with h (a smooth
    function's differ by h·J″, which doubles with h)."""
    xp = host_namespace()
    jump = (s.rise - s.fall) / s.h
    jump_at_2h = (s.rise2 - s.fall2) / (2 * s.h)
    significant = xp.abs(jump) > KINK_SIGNIFICANCE * delta / s.h
    return significant & (xp.abs(jump_at_2h - jump) < KINK_RATIO * xp.abs(jump))


def _rounding(stencils: list[_Stencil], floor: float) -> float:
    """δ, the rounding error of one evaluation of J near θ, measured from every five-point
    stencil so far (none at a step larger than the first: J⁗ shows there).

    The fourth difference F = J₂ − 4J₁ + 6J₀ − 4J₋₁ + J₋₂ is h⁴J⁗ (negligible) plus rounding of
    standard deviation √70·δ. Left out: stencils J does not depend on (bit for bit unchanged:
    their F is 0 and would dilute δ), kinks at θ (their jump repeats at h and 2h: F = −2·jump·h,
    whatever δ), and gross outliers (a kink crossed within ±2h leaves 1e8·δ, not 10·δ) flagged
    against a first guess from the median; δ is then the root mean square of the rest (rounding
    is heavy-tailed: the median alone underestimates it up to 6×), with few samples the largest.

    Where J is rounded to a grid much coarser than its own precision (a small difference of large
    numbers, (C + f(θ)) − C), F can be 0 along every step while D(h) is off by up to the grid over
    h: ``_grid`` finds the grid from the nonzero differences, and δ is at least half of it.
    """
    xp = host_namespace()
    stencils = [s for s in stencils if not s.larger]
    if not stencils:
        return floor
    fourth, odd, keep, slopes = [], [], [], []
    for s in stencils:
        fourth.append(xp.abs((s.rise2 - s.fall2) - 4.0 * (s.rise - s.fall)))
        odd.append(xp.abs(2.0 * (s.rise + s.fall) - (s.rise2 + s.fall2)))  # −(2/3)h³J‴ + rounding
        live = ~((s.rise == 0) & (s.fall == 0) & (s.rise2 == 0) & (s.fall2 == 0)) & xp.isfinite(
            s.rise + s.fall + s.rise2 + s.fall2
        )
        # A kink's jump is a fair fraction of its slopes; a jump of rounding only is not.
        alike = _kinks(s, xp.zeros_like(s.h)) & (
            xp.abs(s.rise - s.fall) > 1e-6 * (xp.abs(s.rise) + xp.abs(s.fall))
        )
        keep.append(live & ~alike)
        slopes.append(xp.abs(s.rise) + xp.abs(s.fall))
    kept = xp.concat(keep)
    samples, slope = xp.concat(fourth)[kept], xp.concat(slopes)[kept]
    largest = max(
        (float(xp.max(xp.where(xp.isfinite(s.largest), s.largest, 0.0))) for s in stencils), default=0.0
    )
    measured = _robust(samples, slope, floor * 70.0**0.5) / 70.0**0.5
    # The grid shows in the odd differences too (where h³J‴ is below it): more samples.
    grid = _grid(xp.concat([samples, xp.concat(odd)[kept]]), largest)
    return max(measured, grid, floor)


def _grid(samples: Any, largest: float) -> float:
    """Half the grid J is rounded to, where its fourth and odd differences reveal one (else 0).

    A cost that computes a small difference of large numbers, (C + f(θ)) − C, returns values on
    C's grid q ≫ eps·|J|: every difference of its values is 0 or a small multiple of q (at most
    8 q for the fourth difference of five values each off by up to q/2). A kink crossed gives
    values that are not small multiples of one quantum. Detected where at least GRID_SAMPLES
    nonzero samples are all k·q, |k| ≤ 8, with q ≥ 16 ulps of the largest |J| (a coarser grid than
    J's own rounding); the rounding of each value is then up to q/2, whatever the samples' spread.
    """
    xp = host_namespace()
    nonzero = samples[(samples > 0) & xp.isfinite(samples)]
    if nonzero.shape[0] < GRID_SAMPLES:
        return 0.0
    quantum = float(xp.min(nonzero))
    if quantum < 16.0 * 2.0**-52 * largest:
        return 0.0
    multiples = nonzero / quantum
    whole = xp.abs(multiples - xp.round(multiples)) <= 1e-6 * multiples
    if bool(xp.all(whole & (multiples <= 8.5))):
        return quantum / 2.0
    return 0.0


def _robust(samples: Any, slopes: Any, floor: float) -> float:
    """The root mean square of non-negative samples of rounding noise, without gross outliers,
    never below the median's estimate nor ``floor``; with fewer than 16 samples, the largest of
    the kept ones too.

    A gross outlier (a kink crossed within ±2h) is above KINK_SIGNIFICANCE × a first guess from
    the median AND a fair fraction (OUTLIER_SLOPE) of the J-change its slopes make over the step
    (``slopes``: |J₁ − J₀| + |J₀ − J₋₁|): a kink's change of slope is comparable to the slopes.
    Rounding on a coarse grid leaves many samples exactly 0 and a few one grid step apart: far
    above a median of 0, but a tiny fraction of the slopes, so they count."""
    xp = host_namespace()
    count = int(samples.shape[0])
    if count == 0:
        return floor
    ordered = xp.sort(samples)
    middle = count // 2
    median = float(ordered[middle]) if count % 2 else float(ordered[middle - 1] + ordered[middle]) / 2
    guess = max(median / 0.6745, floor)
    kept = samples[(samples <= KINK_SIGNIFICANCE * guess) | (samples <= OUTLIER_SLOPE * slopes)]
    estimate = max(_rms(kept), guess, floor)
    if count < 16 and kept.shape[0]:
        estimate = max(estimate, float(xp.max(kept)))
    return estimate


def _rms(x: Any) -> float:
    """Root mean square of a host array, scale-safe (divided by a power of two near its largest
    magnitude first: no square overflows or underflows at any scale of J)."""
    xp = host_namespace()
    if x.shape[0] == 0:
        return 0.0
    largest = float(xp.max(xp.abs(x)))
    if largest == 0 or not math.isfinite(largest):
        return largest
    scale = 2.0 ** math.floor(math.log2(largest))
    return scale * float(xp.sqrt(xp.mean((x / scale) ** 2)))


class Judged(NamedTuple):
    """Per probe: the value compared (at a kink, the subgradient nearest the analytic value), the
    backprop's rounding allowance, the tolerance (SAFETY × error bar + allowance) and whether the
    analytic value is off by more."""

    numeric: Any
    allowance: Any
    tolerance: Any
    off: Any


def judged(plan: Any, estimate: Estimate) -> Judged:
    """How far each analytic value may be from the finite difference and still be right.

    The allowance is ``ulps · eps · (|a| + |n| + s)`` in the precision the gradient is judged to,
    where s is the model's gradient scale (root mean square of the clearly nonzero finite
    differences) for values whose true gradient cannot be told from 0 — a bias before batch norm
    has a true gradient of 0 and a float32 backprop leaves ±1e-9 of rounding there, which must not
    be judged against a scale that is itself 0 — plus SENSITIVITY_SAFETY × the measured change of
    the true gradient under a few ulps of perturbation of every input (a low-precision forward's
    rounding, which every gradient inherits), and SENSITIVITY_FLOOR × the typical such change for
    every value of a low-precision gradient."""
    xp = host_namespace()
    a = plan.target
    finite = ~estimate.undetermined
    e = xp.where(finite, estimate.error, 0.0)
    n = xp.where(finite, estimate.numeric, 0.0)
    n = xp.where(estimate.kink, xp.minimum(xp.maximum(a, estimate.low - e), estimate.high + e), n)
    informative = finite & (xp.abs(n) > SAFETY * e)
    count = max(int(xp.sum(informative)), 1)
    scale = _rms(n[informative]) if count else 0.0
    zeroish = xp.abs(n) <= SAFETY * e
    measured = estimate.sensitivity[estimate.sensitivity > 0]
    low = plan.grad_eps > 1e3 * plan.eval_eps
    floor = SENSITIVITY_FLOOR * _rms(measured) if measured.shape[0] else 0.0
    allowance = (
        plan.ulps * plan.grad_eps * (plan.magnitude + xp.abs(n) + xp.where(zeroish, scale, 0.0))
        + SENSITIVITY_SAFETY * estimate.sensitivity
        + xp.where(low, floor, 0.0)
    )
    if plan.notebook:
        allowance = xp.zeros_like(a)
    tolerance = SAFETY * e + allowance
    off = finite & (xp.abs(a - n) > tolerance) & (not plan.notebook)
    return Judged(n, allowance, tolerance, off)
