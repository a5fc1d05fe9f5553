"""The estimate a ``Ladder`` stands on: every candidate of every probe, and the one chosen.

``choose`` is ``Ladder.result()``'s work: from each probe's candidates (its first step where it
settled, each five-point stencil that may stand) the value, error bar, kink bracket and step
judged. It reads the ladder's state and changes nothing. Host arrays throughout.
"""

from __future__ import annotations

from typing import Any

from .backends import host_add_at, host_min_at, host_namespace
from .differences import Estimate

__all__ = ["choose", "table"]


def choose(ladder: Any) -> Estimate:
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
    plan = ladder.plan
    n = plan.size
    rows = table(ladder)
    probe, step, numeric, error = rows["probe"], rows["step"], rows["numeric"], rows["error"]
    kind = rows["kind"]
    inf = xp.full((n,), xp.inf)
    # Smooth, clean candidates, by probe then step: adjacent pairs of one probe.
    smooth = kind == 0
    sp, sh, sn, se = probe[smooth], step[smooth], numeric[smooth], error[smooth]
    scentral = rows["central"][smooth]
    order = xp.argsort(sh, stable=True)
    order = order[xp.argsort(sp[order], stable=True)]
    sp, sh, sn, se, scentral = sp[order], sh[order], sn[order], se[order], scentral[order]
    snoisy = rows["noisy"][smooth][order]
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
        out[kp] = rows[field][kinked][korder]
    k_convex[kp] = rows["convex"][kinked][korder]
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
    still = ladder.first_still | ~xp.isfinite(ladder.first)
    for s in ladder.stencils:
        still[s.probes] = still[s.probes] & (s.rise == 0) & (s.fall == 0) & (s.rise2 == 0) & (s.fall2 == 0)
    return Estimate(
        xp.where(finite, value, xp.nan),
        xp.where(finite, bar, xp.inf),
        kink & finite,
        xp.where(kink, k_low, value),
        xp.where(kink, k_high, value),
        ~finite,
        still,
        xp.asarray(ladder.sensitivity, copy=True),
        ladder._delta(),
        list(ladder.ties or []),
        int(xp.sum(ladder.settled)),
        int(xp.sum(~ladder.settled)),
        {
            reason: int(xp.sum((ladder.why & bit) > 0))
            for reason, bit in (("smaller", 1), ("larger", 2), ("confirm", 4))
        },
        k_convex & kink,
        used,
        central,
        count,
        inconsistent & ~kink,
        best_noisy & has_smooth & ~kink,
    )


def table(ladder: Any) -> dict[str, Any]:
    """Every candidate of every probe, flat: kind 0 smooth and clean, 1 a kink at θ, 2 finite
    but neither (a kink crossed within ±2h)."""
    xp = host_namespace()
    plan = ladder.plan
    # Every probe's first step (±h): a candidate where it settled, or where its one-sided
    # slopes agreed (no kink crossed within ±h); the others' D(h) may carry a kink's bias.
    staged = xp.zeros((plan.size,), dtype=xp.bool)  # a five-point stencil at the first step
    for s in ladder.stencils:
        staged[s.probes[s.h == plan.step[s.probes]]] = True
    settled = xp.nonzero(ladder.settled | (ladder.first_clean & ~staged & ~plan.notebook))[0]
    if plan.notebook:
        noise = xp.zeros(settled.shape)
    else:
        delta = xp.maximum(ladder._delta(), ladder.first_largest[settled])
        noise = delta / plan.step[settled] + ladder.first_noise[settled]
    columns: dict[str, list[Any]] = {
        "probe": [settled],
        "step": [plan.step[settled]],
        "numeric": [ladder.first[settled]],
        "error": [noise],
        "kind": [xp.where(xp.isfinite(ladder.first[settled]), 0, 3)],
        "low": [ladder.first[settled]],
        "high": [ladder.first[settled]],
        "convex": [xp.zeros(settled.shape, dtype=xp.bool)],
        "central": [ladder.first[settled]],
        "noisy": [noise > 2 * ladder.first_noise[settled]],
    }
    for s in ladder.stencils:
        c = ladder._candidate(s)
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
