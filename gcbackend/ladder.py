"""The staircase of one check: which rows to evaluate next, and what the values say.

``Ladder`` holds, per probe (see ``gcbackend.plan``), the step it is at and the values seen so
far, and climbs the staircase of ``gcbackend.differences`` only where a verdict still depends on
it. check() drives it: ``next()`` says which rows to evaluate (a ``differences.Request``),
``take()`` what they gave, ``result()`` the estimate. Host arrays throughout.

Steps, in order (each only for the probes that need it):

1. ±h for every probe; a probe whose ±h values agree with the backprop settles there.
2. ±2h for the others (first, J's rounding δ measured along random directions).
3. Another step where the five points cannot tell: smaller where J is not finite, a kink is
   crossed within ±2h, or a kink must be confirmed at θ (a kink at θ persists at every step; one
   a little way off vanishes at a smaller one); larger where rounding dominates.
4. A second step for every value found off (a fail rests on two steps that agree), the worst
   first, until one confirms it per parameter.
5. Tied kinks moved together, once.
6. The forward's rounding, for low-precision gradients still off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import choice
from .backends import host_max_at, host_min_at, host_namespace, host_quiet, host_random
from .differences import (
    IMPROVE,
    KINK_SIGNIFICANCE,
    LADDER_FACTOR,
    LADDER_ROUNDS,
    ROUNDING_DIRECTIONS,
    ROUNDING_LARGEST,
    SAFETY,
    SENSITIVITY_ULPS,
    SETTLE_SAFETY,
    SETTLE_ULPS,
    SMOOTH,
    Estimate,
    Request,
    Tie,
    _candidates,
    _rounding,
    _Stencil,
    judged,
)

__all__ = ["CONFIRM_BATCH", "Ladder"]

CONFIRM_BATCH = 32
"""Values found off, per parameter and round, evaluated at a second step after the worst one
alone (see ``Ladder._confirm``)."""
WHOLE_ROWS = 256
"""A θ whose five-point stencil fits one call of the evaluation's whole-θ path (every tensor
batched at once) gets it in its first stage: per-call overhead dominates there."""

NEW, NEED, DONE, MOVE = 0, 1, 3, 4


class Ladder:
    """See the module docstring. ``plan`` gives the probes, their first steps, the backprop's
    values and the precision each is judged to; ``centre`` is J(θ) (NaN under the notebook's
    plan, which needs none)."""

    def __init__(self, plan: Any, centre: float, *, seed: int = 0) -> None:
        xp = host_namespace()
        self.plan, self.centre, self.seed = plan, float(centre), seed
        n = plan.size
        nan = xp.full((n,), xp.nan)
        self.h = xp.asarray(plan.step, copy=True)
        self.values = {m: xp.asarray(nan, copy=True) for m in (1.0, -1.0, 2.0, -2.0)}
        self.phase = xp.full((n,), NEW, dtype=xp.int64)
        self.rounds = xp.zeros((n,), dtype=xp.int64)
        self.why = xp.zeros((n,), dtype=xp.int64)  # bit flags: 1 smaller step, 2 larger, 4 confirming a fail
        self.trend = xp.zeros((n,), dtype=xp.int64)  # -1 down, +1 up, 2: climbing stopped
        self.settled = xp.zeros((n,), dtype=xp.bool)
        self.first = xp.asarray(nan, copy=True)
        self.first_noise = xp.asarray(nan, copy=True)
        self.first_largest = xp.asarray(nan, copy=True)
        self.first_clean = xp.zeros((n,), dtype=xp.bool)
        self.first_still = xp.zeros((n,), dtype=xp.bool)
        self.kink_jump = xp.asarray(nan, copy=True)
        self.confirming = xp.zeros((n,), dtype=xp.bool)
        self.arbitrated = xp.zeros((n,), dtype=xp.bool)
        self.confirm_step = xp.full((n,), xp.nan)
        self.measured = xp.zeros((n,), dtype=xp.bool)
        self.sensitivity = xp.zeros((n,), dtype=xp.float64)
        self.batch = xp.zeros((n,), dtype=xp.float64)
        self.stencils: list[_Stencil] = []
        self.rounding_rows: list[_Stencil] | None = None
        self.ties: list[Tie] | None = None
        self.tie_requests: list[tuple[int, tuple[int, ...], float, float]] = []
        self.pending: Request | None = None
        self.reference: Any = None
        self.delta_floor = plan.eval_eps * abs(self.centre) if self.centre == self.centre else 0.0
        self.evaluations = 0
        self._memo: dict[str, Any] = {}  # result() and δ until the state changes (take, a move)

    # -- what to evaluate next ----------------------------------------------------------------
    def next(self) -> Request | None:
        xp = host_namespace()
        plan = self.plan
        if self.pending is not None:
            return self.pending
        fresh = xp.nonzero(self.phase == NEW)[0]
        full = plan.order == 4 or (not plan.notebook and 4 * plan.size <= WHOLE_ROWS)
        need = xp.nonzero(self.phase == NEED)[0]
        if not plan.notebook and self.rounding_rows is None:
            request = self._rounding_request()
            if request is not None:
                return request
        if fresh.shape[0]:
            return Request(fresh, self.h[fresh], (1.0, -1.0, 2.0, -2.0) if full else (1.0, -1.0))
        if need.shape[0]:
            return Request(need, self.h[need], (2.0, -2.0))
        for climbing in (False, True):  # smaller and larger steps in separate stencils (see _rounding)
            moved = xp.nonzero((self.phase == MOVE) & ((self.trend > 0) == climbing))[0]
            if moved.shape[0]:
                return Request(moved, self.h[moved], (1.0, -1.0, 2.0, -2.0))
        if plan.notebook:
            return None
        if self._confirm() or self._arbitrate():
            return self.next()
        if self.ties is None:
            self.ties = []
            request = self._tie_request()
            if request is not None:
                return request
        return self._sensitivity_request()

    def set_discrepancy(self, per_tensor: Mapping[int, float]) -> None:
        """An accepted batched path moves each J by up to its discrepancy d (per tensor): every
        derivative of that tensor's probes then carries d/h more error."""
        xp = host_namespace()
        values = xp.asarray([float(per_tensor.get(k, 0.0)) for k in range(len(self.plan.names))])
        batch = xp.take(values, self.plan.segment)
        if not bool(xp.all(batch == self.batch)):
            self.batch = batch
            self._changed()

    # -- what the rows gave -------------------------------------------------------------------
    def take(self, request: Request, costs: Any, steps: Any) -> None:
        """``costs``: (len(multipliers), rows) host float64; ``steps``: the steps the rows used."""
        self.evaluations += int(costs.shape[0] * costs.shape[1])
        self.pending = None
        self._changed()
        if request.directions is not None:
            (self._take_rounding if self.rounding_rows == [] else self._take_ties)(costs)
            return
        if request.base:
            self._take_sensitivity(request, costs, steps)
            return
        probes = request.probes
        self.h[probes] = steps
        for row, m in enumerate(request.multipliers):
            self.values[m][probes] = costs[row, :]
        if request.multipliers == (1.0, -1.0):
            self._after_first(probes)
        else:
            self._decide(probes)

    def _after_first(self, probes: Any) -> None:
        """Settle the probes whose ±h values agree with the backprop: within SETTLE_SAFETY × an a
        priori rounding bound of D(h) (SETTLE_ULPS ulps of the largest |J| of the three), plus a
        truncation allowance of 10·eps^(2/3) relative, plus the backprop's own rounding, with
        one-sided slopes that agree (no kink crossed within ±h)."""
        xp = host_namespace()
        plan = self.plan
        plus, minus = self.values[1.0][probes], self.values[-1.0][probes]
        h, a = self.h[probes], plan.target[probes]
        if plan.notebook:
            # The notebook's quotient, in its order: its numbers bit for bit.
            self.first[probes] = (plus - minus) / (2 * h)
            self.settled[probes] = True
            self.phase[probes] = DONE
            return
        rise, fall = plus - self.centre, self.centre - minus
        one = (rise + fall) / (2 * h)
        right, left = rise / h, fall / h
        largest = xp.maximum(xp.maximum(xp.abs(plus), xp.abs(minus)), abs(self.centre))
        # J's rounding: as measured along random directions (first of all), else SETTLE_ULPS ulps.
        measured = (
            self._delta() if self.rounding_rows else SETTLE_ULPS * plan.eval_eps * float(xp.max(largest))
        )
        delta = xp.maximum(measured, plan.eval_eps * largest)
        bound = delta / h
        allowance = plan.ulps[probes] * plan.grad_eps[probes] * (plan.magnitude[probes] + xp.abs(one))
        relative = 10.0 * plan.eval_eps ** (2.0 / 3.0) * (xp.abs(a) + xp.abs(one))
        still = (rise == 0) & (fall == 0)
        agree = xp.abs(a - one) <= SETTLE_SAFETY * bound + relative + allowance
        smooth = xp.abs(right - left) <= SMOOTH * (xp.abs(right) + xp.abs(left)) + 2 * SETTLE_SAFETY * bound
        settle = xp.isfinite(one) & ((still & (a == 0)) | (agree & smooth))
        self.first[probes] = one
        self.first_clean[probes] = xp.isfinite(one) & smooth
        # Its error bar: δ/h of rounding (δ as settled, or larger if measured so later), and the
        # truncation slack; SAFETY × it covers the settling rule.
        self.first_noise[probes] = relative / SAFETY
        self.first_largest[probes] = delta
        self.first_still[probes] = still
        self.settled[probes[settle]] = True
        self.phase[probes[settle]] = DONE
        self.phase[probes[~settle]] = NEED

    def _stencil(self, probes: Any, larger: bool) -> _Stencil:
        xp = host_namespace()
        c = self.centre
        plus, minus = self.values[1.0][probes], self.values[-1.0][probes]
        plus2, minus2 = self.values[2.0][probes], self.values[-2.0][probes]
        largest = xp.maximum(
            xp.maximum(xp.maximum(xp.abs(plus), xp.abs(minus)), xp.maximum(xp.abs(plus2), xp.abs(minus2))),
            abs(c),
        )
        valid = xp.ones(probes.shape, dtype=xp.bool)
        return _Stencil(
            probes, self.h[probes], plus - c, c - minus, plus2 - c, c - minus2, largest, valid, larger
        )

    def _changed(self) -> None:
        self._memo.clear()

    def _delta(self) -> float:
        if "delta" not in self._memo:
            self._memo["delta"] = self._measure_delta()
        return self._memo["delta"]

    def _measure_delta(self) -> float:
        if self.plan.notebook:  # no J(θ) nor stencils: J's own rounding at the values seen, a floor
            xp = host_namespace()
            seen = xp.concat([self.values[1.0], self.values[-1.0]])
            seen = seen[xp.isfinite(seen)]
            return self.plan.eval_eps * float(xp.max(xp.abs(seen))) if seen.shape[0] else 0.0
        return _rounding(self.stencils + (self.rounding_rows or []), self.delta_floor)

    def _candidate(self, stencil: _Stencil) -> Any:
        xp = host_namespace()
        floor = self.plan.eval_eps * xp.where(xp.isfinite(stencil.largest), stencil.largest, 0.0)
        return _candidates(
            stencil, xp.maximum(floor, self._delta()), self.plan.order, self.batch[stencil.probes]
        )

    def _decide(self, probes: Any) -> None:
        """After a five-point stencil: done, or another step (see the module docstring).

        A larger step is taken only where rounding dominated; its candidate stands only if it
        agrees with the one before (within 3× the larger error bar): where it does not, the larger
        step left the range where Richardson's estimate holds (sin over a step of 5), and the climb
        stops there."""
        xp = host_namespace()
        plan = self.plan
        up = self.trend[probes] == 1  # a climb for noise (a confirmation's climb, 3, is not rejected)
        previous = self.result() if bool(xp.any(up)) else None
        climbed = self.trend[probes] % 2 == 1
        stencil = self._stencil(probes, larger=bool(xp.all(climbed)) and bool(xp.any(climbed)))
        self.stencils.append(stencil)
        self._changed()
        c = self._candidate(stencil)
        if previous is not None:
            before, bar = previous.numeric[probes], previous.error[probes]
            apart = xp.abs(c.numeric - before) > 3.0 * xp.maximum(c.error, bar)
            rejected = up & (apart | ~c.finite | c.crossed) & xp.isfinite(before)
            stencil.valid[rejected] = False
            self.trend[probes[rejected]] = 2
        self.phase[probes] = DONE
        if plan.fixed:  # a step the user chose is the step used
            return
        a = plan.target[probes]
        allowance = plan.ulps[probes] * plan.grad_eps[probes] * (plan.magnitude[probes] + xp.abs(c.numeric))
        off = xp.abs(a - c.numeric) > SAFETY * c.error + allowance
        # A kink at θ persists at a smaller step; one a little way off vanishes there.
        jump = (stencil.rise - stencil.fall) / stencil.h
        # A kink is followed down while its jump would still stand out of J's rounding at the next
        # step: a corner a little way off (d ≪ h looks like one at θ) vanishes below d.
        delta = max(self._delta(), 0.0)
        resolvable = xp.abs(jump) > KINK_SIGNIFICANCE * delta * LADDER_FACTOR / stencil.h
        confirmed = c.kink & ~resolvable
        self.kink_jump[probes] = xp.where(c.kink, jump, xp.nan)
        target = max(IMPROVE, 1e4 * plan.eval_eps) * (xp.abs(a) + xp.abs(c.numeric))
        vague = ~off & (c.error > target) & ~c.kink & ~c.still
        # J small at θ and large at the step (J ~ h²: a tiny θ of Σθ²): a smaller step helps.
        grows = stencil.largest > 1e3 * max(abs(self.centre), 1e-300)
        down = ~c.finite | c.crossed | (c.kink & ~confirmed) | (vague & ((c.truncation > c.roundoff) | grows))
        climb = vague & ~down
        left = self.rounds[probes] < LADDER_ROUNDS
        trend = self.trend[probes]
        self._move(probes[down & left & (trend <= 0)], 1.0 / LADDER_FACTOR, -1, 1)
        self._move(probes[climb & left & ((trend == 0) | (trend == 1))], LADDER_FACTOR, 1, 2)

    def _move(self, chosen: Any, factor: float, sign: int, why: int) -> None:
        xp = host_namespace()
        if chosen.shape[0] == 0:
            return
        self._changed()
        self.why[chosen] = self.why[chosen] | why
        self.h[chosen] = self.h[chosen] * factor
        self.trend[chosen] = sign
        self.rounds[chosen] += 1
        self.phase[chosen] = MOVE
        for m in self.values:
            self.values[m][chosen] = xp.nan

    # -- a second step for values found off ----------------------------------------------------
    def _confirm(self) -> bool:
        """Move values found off, the worst first, to a step LADDER_FACTOR times smaller than the one they
        stand on; a parameter with a value still off there is failing already and needs no more.
        Returns whether any moved."""
        xp = host_namespace()
        plan = self.plan
        if plan.fixed:
            return False
        est = self.result()
        verdict = judged(plan, est)
        # Off on the evidence of one step only (or of two that disagree): evaluated at another.
        alone = (est.candidates == 1) | est.inconsistent
        single = verdict.off & ~est.kink & alone & ~self.confirming
        sure = verdict.off & ~est.kink & ~alone
        badness = _excess(plan, verdict)
        moved = False
        for k in range(len(plan.names)):
            where = plan.where(k)
            if bool(xp.any(sure[where])):
                continue
            local = xp.nonzero(
                single[where] & ~self.confirming[where] & (self.rounds[where] < LADDER_ROUNDS)
            )[0]
            if local.shape[0] == 0:
                continue
            local = local + where.start
            # The worst first, alone: where it holds, the parameter fails and nothing else is
            # needed; where it does not (the first step was fooled), the next CONFIRM_BATCH.
            tried = bool(xp.any(self.confirming[where]))
            chosen = local[xp.argsort(-badness[local], stable=True)[: CONFIRM_BATCH if tried else 1]]
            self.confirming[chosen] = True
            self.settled[chosen] = False
            self.trend[chosen] = 0
            # Closer in than any step tried where truncation (or a kink nearby) could bias it;
            # further out than any where J's rounding dominates (closer in would only be noisier).
            smallest, largest = self._tried(chosen)
            noisy = est.rounding_dominated[chosen]
            self.h[chosen] = xp.where(noisy, largest, smallest)
            self._move(chosen[~noisy], 1.0 / LADDER_FACTOR, -1, 4)
            self._move(chosen[noisy], LADDER_FACTOR, 3, 4)
            moved = True
        return moved

    def _arbitrate(self) -> bool:
        """Probes whose two best steps disagree beyond their error bars get one more, LADDER_FACTOR times
        smaller than their smallest (see ``result``). Returns whether any moved."""
        xp = host_namespace()
        if self.plan.fixed:
            return False
        est = self.result()
        chosen = xp.nonzero(est.inconsistent & ~self.arbitrated & (self.rounds < LADDER_ROUNDS))[0]
        if chosen.shape[0] == 0:
            return False
        self.arbitrated[chosen] = True
        self.h[chosen] = self._smallest_step(chosen)
        self.trend[chosen] = 0
        self._move(chosen, 1.0 / LADDER_FACTOR, -1, 1)
        return True

    def _smallest_step(self, probes: Any) -> Any:
        return self._tried(probes)[0]

    def _tried(self, probes: Any) -> tuple[Any, Any]:
        """The smallest and the largest step each probe was evaluated at."""
        xp = host_namespace()
        smallest = xp.asarray(self.plan.step, copy=True)
        largest = xp.asarray(self.plan.step, copy=True)
        for s in self.stencils:
            host_min_at(smallest, s.probes, s.h)
            host_max_at(largest, s.probes, s.h)
        return smallest[probes], largest[probes]

    # -- δ along random directions -------------------------------------------------------------
    def _rounding_request(self) -> Request | None:
        """Five-point stencils along ROUNDING_DIRECTIONS seeded random unit directions of one
        tensor (the largest with at most ROUNDING_LARGEST elements), at a hundredth of its mean
        first step."""
        xp = host_namespace()
        plan = self.plan
        self.rounding_rows = []
        sizes = [int(_size(shape)) for shape in plan.shapes]
        fits = [k for k in range(len(plan.names)) if sizes[k] <= ROUNDING_LARGEST]
        if not fits:
            return None
        k = max(fits, key=lambda i: sizes[i])
        rng = host_random(self.seed + 65537)
        u = rng.standard_normal((ROUNDING_DIRECTIONS, sizes[k]))
        u = u / xp.linalg.vector_norm(u, axis=1, keepdims=True)
        # J's rounding does not depend on the step; a kink crossed does (its fourth difference
        # grows with h, and so does the chance to cross one): a hundred times smaller.
        step = float(xp.mean(plan.step[plan.where(k)])) / 100.0
        return Request(_none(), xp.zeros((0,)), (1.0, -1.0, 2.0, -2.0), directions={plan.names[k]: u * step})

    def _take_rounding(self, costs: Any) -> None:
        self.rounding_rows = [self._direction_stencil(costs)]
        self._changed()

    def _direction_stencil(self, costs: Any) -> _Stencil:
        """Five-point stencils along displacements u (steps included: h = 1), from (4, k) costs."""
        xp = host_namespace()
        count, c = int(costs.shape[1]), self.centre
        return _Stencil(
            xp.full((count,), -1),
            xp.ones((count,)),
            costs[0, :] - c,
            c - costs[1, :],
            costs[2, :] - c,
            c - costs[3, :],
            xp.max(xp.abs(costs), axis=0),
            xp.ones((count,), dtype=xp.bool),
        )

    # -- tied kinks ----------------------------------------------------------------------------
    def _tie_request(self) -> Request | None:
        """Directions that move a tensor's kink elements together, per kind of kink (convex —
        relu, abs, max with a positive coefficient — or concave): all of them, and two seeded
        random subsets. Where kinks of one kind tie (a max-pool window with tied maxima), J along
        such a direction is smooth and its derivative is what any valid subgradient gives along it
        (the window's max moves with the tied elements); a backward that routes dout to every tied
        maximum gives more."""
        xp = host_namespace()
        plan = self.plan
        if plan.coverage.kind == "directions":
            return None
        est = self.result()
        rng = host_random(self.seed + 7919)
        directions, requests = {}, []
        for k, name in enumerate(plan.names):
            where = plan.where(k)
            groups = []
            for kind in (True, False):
                members = xp.nonzero(est.kink[where] & (est.convex[where] == kind))[0] + where.start
                if members.shape[0] < 2:
                    continue
                groups.append(members)
                for _ in range(2):
                    pick = members[rng.random(members.shape[0]) < 0.5]
                    if 2 <= pick.shape[0] < members.shape[0]:
                        groups.append(pick)
            if not groups:
                continue
            rows = xp.zeros((len(groups), int(_size(plan.shapes[k]))))
            for g, group in enumerate(groups):
                rows[g, plan.index[group]] = est.step[group]
                target = float(xp.sum(plan.target[group] * est.step[group]))
                size = float(xp.sum(plan.magnitude[group] * est.step[group]))
                requests.append((k, tuple(int(i) for i in plan.index[group]), target, size))
            directions[name] = rows
        if not directions:
            return None
        self.tie_requests = requests
        return Request(_none(), xp.zeros((0,)), (1.0, -1.0, 2.0, -2.0), directions=directions)

    def _take_ties(self, costs: Any) -> None:
        xp = host_namespace()
        stencil = self._direction_stencil(costs)
        c = self._candidate(stencil)
        self.ties = [
            Tie(
                k,
                members,
                target,
                size,
                float(c.numeric[i]),
                float(c.error[i]),
                bool(c.kink[i]),
                float(c.low[i]),
                float(c.high[i]),
            )
            for i, (k, members, target, size) in enumerate(self.tie_requests)
            if bool(c.finite[i])
        ]
        self._changed()
        del xp

    # -- the forward's rounding, for low-precision gradients ------------------------------------
    def _sensitivity_request(self) -> Request | None:
        """Values of a low-precision gradient still off: D(h) again with every input perturbed by
        SENSITIVITY_ULPS ulps of the gradient's precision (two seeded samples of random signs)."""
        xp = host_namespace()
        plan = self.plan
        low = plan.grad_eps > 1e3 * plan.eval_eps
        if not bool(xp.any(low)):
            return None
        est = self.result()
        verdict = judged(plan, est)
        excess = _excess(plan, verdict)
        candidates = low & verdict.off & ~est.kink & ~est.undetermined & ~self.measured
        chosen = []
        for k in range(len(plan.names)):
            where = plan.where(k)
            if bool(xp.any(self.measured[where] & verdict.off[where])):
                continue  # a re-measured value of this tensor is still off: it fails anyway
            local = xp.nonzero(candidates[where])[0] + where.start
            if local.shape[0]:
                chosen.append(local[xp.argsort(-excess[local], stable=True)[:CONFIRM_BATCH]])
        if not chosen:
            return None
        probes = xp.concat(chosen)
        self.measured[probes] = True
        self.reference = est.central
        size = float(xp.max(plan.grad_eps[probes] * plan.ulps[probes])) * SENSITIVITY_ULPS / 32.0
        self.pending = Request(probes, est.step[probes], (1.0, -1.0), base=1, perturbation=size)
        return self.pending

    def _take_sensitivity(self, request: Request, costs: Any, steps: Any) -> None:
        xp = host_namespace()
        probes = request.probes
        moved = (costs[0, :] - costs[1, :]) / (2 * steps)
        change = moved - self.reference[probes]
        change = xp.where(xp.isfinite(change), change, 0.0)
        self.sensitivity[probes] = _rms(self.sensitivity[probes], change, request.base)
        self._changed()
        if request.base == 1:
            self.pending = request._replace(base=2)

    # -- the estimate ----------------------------------------------------------------------------
    def result(self) -> Estimate:
        """The estimate as the values stand (see ``choice.choose``), computed once per state."""
        if "result" not in self._memo:
            self._memo["result"] = choice.choose(self)
        return self._memo["result"]


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size


def _none() -> Any:
    xp = host_namespace()
    return xp.zeros((0,), dtype=xp.int64)


def _excess(plan: Any, verdict: Any) -> Any:
    """How far each value is off, in tolerances: the order in which values are evaluated again.
    NaN where the numeric value is NaN (sorted last)."""
    xp = host_namespace()
    with host_quiet():
        return (xp.abs(plan.target - verdict.numeric) - verdict.tolerance) / xp.maximum(
            verdict.tolerance, 1e-300
        )


def _rms(previous: Any, change: Any, count: int) -> Any:
    """The root mean square of ``count`` changes, from that of the first count − 1 and the last:
    squares where they are finite, a scaled hypot where they overflow (a J of 1e155 moves by as
    much, and an infinite sensitivity left a correct gradient inconclusive)."""
    xp = host_namespace()
    with host_quiet():
        squares = xp.sqrt((previous**2 * (count - 1) + change * change) / count)
    scaled = xp.hypot(previous * math.sqrt(count - 1), change) / math.sqrt(count)
    return xp.where(xp.isfinite(squares), squares, scaled)
