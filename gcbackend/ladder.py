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

from collections.abc import Mapping
from typing import Any

from .backends import host_add_at, host_max_at, host_min_at, host_namespace, host_random
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
        badness = (xp.abs(plan.target - verdict.numeric) - verdict.tolerance) / xp.maximum(
            verdict.tolerance, 1e-300
        )
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
        excess = (xp.abs(plan.target - verdict.numeric) - verdict.tolerance) / xp.maximum(
            verdict.tolerance, 1e-300
        )
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
        previous = self.sensitivity[probes] ** 2 * (request.base - 1)
        self.sensitivity[probes] = xp.sqrt((previous + change * change) / request.base)
        self._changed()
        if request.base == 1:
            self.pending = request._replace(base=2)

    # -- the estimate ----------------------------------------------------------------------------
    def result(self) -> Estimate:
        """The estimate as the values stand (see ``_result``), computed once per state."""
        if "result" not in self._memo:
            self._memo["result"] = self._result()
        return self._memo["result"]

    def _result(self) -> Estimate:
        """Per probe, from every candidate it has (its first step where it settled, and each
        five-point stencil that may stand):

        * a kink, where one shows at a step smaller than every smooth candidate's, or no smooth
          candidate exists (its one-sided slopes bracket the gradient);
        * else the smooth, clean candidates (finite, no kink crossed within ±2h): one stands as it
          is; of several, the two at adjacent steps that agree best, the one with the smaller error
          bar, its bar widened to their distance. Two steps that disagree beyond their bars say
          one of them is wrong: truncation or a kink nearby at the larger (the smaller ones then
          agree), or J's rounding at the smaller (the larger ones then agree);
        * else the last finite candidate (a kink crossed, its error bar covering it);
        * else undetermined.
        """
        xp = host_namespace()
        plan = self.plan
        n = plan.size
        table = self._table()
        probe, step, numeric, error = table["probe"], table["step"], table["numeric"], table["error"]
        kind = table["kind"]
        inf = xp.full((n,), xp.inf)
        # Smooth, clean candidates, by probe then step: adjacent pairs of one probe.
        smooth = kind == 0
        sp, sh, sn, se = probe[smooth], step[smooth], numeric[smooth], error[smooth]
        scentral = table["central"][smooth]
        order = xp.argsort(sh, stable=True)
        order = order[xp.argsort(sp[order], stable=True)]
        sp, sh, sn, se, scentral = sp[order], sh[order], sn[order], se[order], scentral[order]
        snoisy = table["noisy"][smooth][order]
        # One candidate per step (a step evaluated twice gives the same D(h) twice: no evidence).
        once = xp.ones(sp.shape, dtype=xp.bool)
        once[1:] = (sp[1:] != sp[:-1]) | (xp.abs(sh[1:] - sh[:-1]) > 1e-9 * sh[1:])
        sp, sh, sn, se, scentral, snoisy = (
            sp[once],
            sh[once],
            sn[once],
            se[once],
            scentral[once],
            snoisy[once],
        )
        count = xp.zeros((n,), dtype=xp.int64)
        host_add_at(count, sp, 1)
        best_n, best_e, best_h, best_c = (xp.full((n,), xp.nan) for _ in range(4))
        best_noisy = xp.zeros((n,), dtype=xp.bool)
        best_e = xp.asarray(inf, copy=True)
        # Single candidates, and the first of each probe's list as a start.
        first = xp.ones(sp.shape, dtype=xp.bool)
        first[1:] = sp[1:] != sp[:-1]
        best_n[sp[first]], best_e[sp[first]] = sn[first], se[first]
        best_h[sp[first]], best_c[sp[first]] = sh[first], scentral[first]
        best_noisy[sp[first]] = snoisy[first]
        inconsistent = xp.zeros((n,), dtype=xp.bool)
        if sp.shape[0] > 1:
            same = sp[1:] == sp[:-1]
            gap = xp.abs(sn[1:] - sn[:-1])
            left, right = xp.arange(sp.shape[0] - 1), xp.arange(1, sp.shape[0])
            pair = xp.nonzero(same)[0]
            # the best pair per probe: smallest gap (sort pairs by probe, then gap)
            by = pair[xp.argsort(gap[pair], stable=True)]
            by = by[xp.argsort(sp[by], stable=True)]
            head = xp.ones(by.shape, dtype=xp.bool)
            head[1:] = sp[by][1:] != sp[by][:-1]
            chosen = by[head]
            i, j = left[chosen], right[chosen]
            take_j = se[j] < se[i]
            pick = xp.where(take_j, j, i)
            owner = sp[pick]
            best_n[owner], best_h[owner], best_c[owner] = sn[pick], sh[pick], scentral[pick]
            best_noisy[owner] = snoisy[pick]
            apart = gap[chosen] > 3.0 * xp.maximum(se[i], se[j])  # beyond what either bar explains
            best_e[owner] = xp.where(apart, xp.maximum(se[pick], gap[chosen]), se[pick])
            inconsistent[owner] = apart
        has_smooth = count > 0
        smallest_smooth = xp.asarray(inf, copy=True)
        host_min_at(smallest_smooth, sp, sh)
        # Kinks: the one with the smallest error bar; whether θ sits on one is decided by the
        # smallest step that saw it (a kink at θ persists there; one a little way off does not).
        kinked = kind == 1
        kp, ke = probe[kinked], error[kinked]
        korder = xp.argsort(-ke, stable=True)  # largest error first: the smallest one written last
        kp = kp[korder]
        k_n, k_e, k_low, k_high, k_step = (xp.full((n,), xp.nan) for _ in range(5))
        k_convex = xp.zeros((n,), dtype=xp.bool)
        for field, out in (
            ("numeric", k_n),
            ("error", k_e),
            ("low", k_low),
            ("high", k_high),
            ("step", k_step),
        ):
            out[kp] = table[field][kinked][korder]
        k_convex[kp] = table["convex"][kinked][korder]
        smallest_kink = xp.asarray(inf, copy=True)
        host_min_at(smallest_kink, probe[kinked], step[kinked])
        kink = xp.isfinite(k_n) & (~has_smooth | (smallest_kink < smallest_smooth))
        # Anything finite, the last of each probe.
        other = kind == 2
        f_n, f_e, f_h = xp.full((n,), xp.nan), xp.asarray(inf, copy=True), xp.asarray(plan.step, copy=True)
        f_n[probe[other]], f_e[probe[other]], f_h[probe[other]] = numeric[other], error[other], step[other]
        value = xp.where(kink, k_n, xp.where(has_smooth, best_n, f_n))
        bar = xp.where(kink, k_e, xp.where(has_smooth, best_e, f_e))
        used = xp.where(kink, k_step, xp.where(has_smooth, best_h, f_h))
        central = xp.where(has_smooth & ~kink, best_c, value)
        finite = xp.isfinite(value) & xp.isfinite(bar)
        if plan.notebook:
            bar = xp.zeros((n,))
            finite = xp.isfinite(value)
        # J bit for bit unchanged at every point each probe was evaluated at (its first ±h where
        # it had one, every stencil).
        still = self.first_still | ~xp.isfinite(self.first)
        for s in self.stencils:
            still[s.probes] = (
                still[s.probes] & (s.rise == 0) & (s.fall == 0) & (s.rise2 == 0) & (s.fall2 == 0)
            )
        return Estimate(
            xp.where(finite, value, xp.nan),
            xp.where(finite, bar, xp.inf),
            kink & finite,
            xp.where(kink, k_low, value),
            xp.where(kink, k_high, value),
            ~finite,
            still,
            xp.asarray(self.sensitivity, copy=True),
            self._delta(),
            list(self.ties or []),
            int(xp.sum(self.settled)),
            int(xp.sum(~self.settled)),
            {
                reason: int(xp.sum((self.why & bit) > 0))
                for reason, bit in (("smaller", 1), ("larger", 2), ("confirm", 4))
            },
            k_convex & kink,
            used,
            central,
            count,
            inconsistent & ~kink,
            best_noisy & has_smooth & ~kink,
        )

    def _table(self) -> dict[str, Any]:
        """Every candidate of every probe, flat: kind 0 smooth and clean, 1 a kink at θ, 2 finite
        but neither (a kink crossed within ±2h)."""
        xp = host_namespace()
        plan = self.plan
        # Every probe's first step (±h): a candidate where it settled, or where its one-sided
        # slopes agreed (no kink crossed within ±h); the others' D(h) may carry a kink's bias.
        staged = xp.zeros((plan.size,), dtype=xp.bool)  # a five-point stencil at the first step
        for s in self.stencils:
            staged[s.probes[s.h == plan.step[s.probes]]] = True
        settled = xp.nonzero(self.settled | (self.first_clean & ~staged & ~plan.notebook))[0]
        if plan.notebook:
            noise = xp.zeros(settled.shape)
        else:
            delta = xp.maximum(self._delta(), self.first_largest[settled])
            noise = delta / plan.step[settled] + self.first_noise[settled]
        columns: dict[str, list[Any]] = {
            "probe": [settled],
            "step": [plan.step[settled]],
            "numeric": [self.first[settled]],
            "error": [noise],
            "kind": [xp.where(xp.isfinite(self.first[settled]), 0, 3)],
            "low": [self.first[settled]],
            "high": [self.first[settled]],
            "convex": [xp.zeros(settled.shape, dtype=xp.bool)],
            "central": [self.first[settled]],
            "noisy": [noise > 2 * self.first_noise[settled]],
        }
        for s in self.stencils:
            c = self._candidate(s)
            kind = xp.where(~c.finite | ~s.valid, 3, xp.where(c.kink, 1, xp.where(c.crossed, 2, 0)))
            for field, value in (
                ("probe", s.probes),
                ("step", s.h),
                ("numeric", c.numeric),
                ("error", c.error),
                ("kind", kind),
                ("low", c.low),
                ("high", c.high),
                ("convex", c.convex),
                ("central", c.one),
                ("noisy", c.roundoff > c.truncation),
            ):
                columns[field].append(value)
        return {field: xp.concat(values) for field, values in columns.items()}


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size


def _none() -> Any:
    xp = host_namespace()
    return xp.zeros((0,), dtype=xp.int64)
