"""Plan a check: which values of each gradient are compared, from which first step, and to
which precision each gradient is judged.

The second step of check() (prepare → plan → evaluate ⇄ estimate → judge). A plan is a flat
list of *probes* over all tensors, as the notebook's ``dictionary_to_vector`` lays them out:
probe p moves parameter ``names[segment[p]]`` along one coordinate (element ``index[p]``) or
along one seeded unit direction (``index[p]``-th of the fast screen), and compares the
finite difference there with ``target[p]``, the backprop's value (the gradient's element, or
uᵀg). Everything here is a host array of O(N) numbers: the steps are made exact on the
backend (``differences.snap``) and brought back once.

The notebook's settings are one plan among others (``notebook=True``: one step ε, the ±ε
rows only, the notebook's quotient and rule), not a branch of check().
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from . import differences
from .backends import float64_of, host_namespace, host_norm, host_random, to_host
from .evaluation.directions import HELD_BYTES, Directions
from .inputs import Prepared

__all__ = ["ANALYTIC_ULPS", "LOW_PRECISION_ULPS", "Coverage", "Plan", "plan"]

ANALYTIC_ULPS = 32.0
"""Rounding a float32/float64 backprop may carry in its gradient, in ulps of the precision it
is judged to, relative to |g_j| + |numeric_j| (plus a scale that cannot vanish where the true
gradient is 0, and the forward's measured rounding: see judge)."""
LOW_PRECISION_ULPS = 4.0
"""The same for float16/bfloat16 gradients: storing a gradient in them rounds it by half an ulp
(0.4 % in bfloat16); 32 of their ulps (25 % in bfloat16) let a gradient off by × 1.5 pass."""


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
        return unravel(self.sampled[name][flat] if self.kind == "sample" else flat, shape)


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for extent in reversed(shape):
        index.append(flat % extent)
        flat //= extent
    return tuple(reversed(index))


class Plan(NamedTuple):
    """What the estimate evaluates and what its values are compared with (host arrays)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    coverage: Coverage
    notebook: bool
    """A fixed epsilon and threshold: the ±ε rows only, no error bars, the notebook's rule."""
    fixed: bool
    """The user chose epsilon: every step is that epsilon (a step the user chose is the step used)."""
    order: int
    segment: Any  # (P,) int: the tensor of each probe
    index: Any  # (P,) int: flat element (coordinates, sample) or direction number (screen)
    target: Any  # (P,) float64: the backprop's value compared
    magnitude: Any  # (P,) float64: the size its rounding scales with (|g_j|; ‖g‖ for uᵀg)
    grad_eps: Any  # (P,) float64: eps of the precision the gradient is judged to
    ulps: (
        Any  # (P,) float64: how many of those ulps its rounding may be (ANALYTIC_ULPS or LOW_PRECISION_ULPS)
    )
    step: Any  # (P,) float64: the first step, exact in the dtypes the cost may see
    directions: dict[str, Directions] | None  # name → the screen's seeded unit directions
    eval_eps: float  # eps of the dtype the cost is evaluated in
    counts: tuple[int, ...]  # probes per tensor

    @property
    def size(self) -> int:
        return int(self.target.shape[0])

    def where(self, tensor: int) -> slice:
        """The probes of tensor ``tensor`` (they are contiguous, in tensor order)."""
        start = sum(self.counts[:tensor])
        return slice(start, start + self.counts[tensor])


def plan(
    prepared: Prepared,
    *,
    epsilon: Any,
    threshold: Any,
    order: int,
    mode: str,
    directions: int,
    sample: Any,
    seed: int,
) -> Plan:
    """Every element, a seeded sample per tensor, or seeded unit directions per tensor.

    Steps: the user's epsilon, or ``differences.auto_steps`` (exact in each parameter's own
    dtype). Gradients are judged to the coarser of their own dtype and their parameter's (a
    float64 gradient computed from a float32 forward pass carries float32's rounding).
    """
    hx = host_namespace()
    parts, xp = prepared.parts, prepared.backend.xp
    names = tuple(parts)
    shapes = tuple(tuple(p.shape) for p in parts.values())
    eval_dtype = next(iter(parts.values())).dtype
    eval_eps = float(xp.finfo(eval_dtype).eps)
    notebook = (
        epsilon != "auto" and threshold != "auto" and order == 2 and mode != "directions" and sample is None
    )
    if epsilon == "auto":
        steps = differences.auto_steps(parts, xp=xp, exact_in=prepared.dtypes)
    elif notebook:  # the notebook's θ ± ε and its quotient over 2ε, as they are
        steps = {
            name: xp.full(tuple(p.shape), epsilon, dtype=p.dtype, device=prepared.backend.device)
            for name, p in parts.items()
        }
    else:
        steps = {
            name: differences.snap(
                p,
                xp.full(tuple(p.shape), epsilon, dtype=p.dtype, device=prepared.backend.device),
                prepared.dtypes[name],
                xp,
            )
            for name, p in parts.items()
        }
    steps = {name: _host64(value, xp) for name, value in steps.items()}
    grads = {name: _host64(value, xp) for name, value in prepared.analytic.items()}
    precision = {name: _judged_eps(prepared, name, xp) for name in names}
    rng = host_random(seed)
    segment, index, target, step, eps, ulps, units, sampled = [], [], [], [], [], [], None, None
    magnitude: list[Any] = []
    if mode == "directions":
        units = {}
        for k, (name, part) in enumerate(parts.items()):
            size = math.prod(part.shape)
            # Unit directions: θ moves by h, as in a coordinate step, whatever the size. A
            # raw Gaussian moves it by h·√n, and a million-element W1 then crosses dozens
            # of ReLU kinks per direction (a false alarm on a correct 1000-1000-1 net).
            # Each is drawn from (seed, tensor, number): none is held unless all are small.
            units[name] = Directions(seed, k, directions, size)
            if 2 * directions * size * 8 <= min(HELD_BYTES, prepared.budget // 4):
                units[name].hold()
            target.append(units[name].products(grads[name]))
            # |uᵀe| ≤ ‖u‖·‖e‖ = ‖e‖ for the backprop's rounding e: uᵀg's rounding scales with ‖g‖,
            # not with |uᵀg| (which cancels).
            magnitude.append(hx.full((directions,), host_norm(hx.reshape(grads[name], (-1,)))))
            step.append(hx.full((directions,), float(hx.max(steps[name]))))
            index.append(hx.arange(directions))
    else:
        if sample is not None:
            sampled = {}
        for name in names:
            size = int(grads[name].shape[0])
            if sample is not None:
                chosen = sorted(rng.choice(size, size=min(int(sample), size), replace=False).tolist())
                sampled[name] = chosen
                at = hx.asarray(chosen, dtype=hx.int64)
            else:
                at = hx.arange(size)
            index.append(at)
            target.append(hx.take(grads[name], at))
            magnitude.append(hx.abs(target[-1]))
            step.append(hx.take(steps[name], at))
    counts = tuple(int(t.shape[0]) for t in target)
    for k, name in enumerate(names):
        segment.append(hx.full((counts[k],), k, dtype=hx.int64))
        eps.append(hx.full((counts[k],), precision[name][0]))
        ulps.append(hx.full((counts[k],), precision[name][1]))
    coverage = Coverage(
        "directions" if mode == "directions" else ("sample" if sample is not None else "elements"), sampled
    )
    return Plan(
        names,
        shapes,
        coverage,
        notebook,
        epsilon != "auto",
        order,
        hx.concat(segment),
        hx.concat(index),
        hx.concat(target),
        hx.concat(magnitude),
        hx.concat(eps),
        hx.concat(ulps),
        hx.concat(step),
        units,
        eval_eps,
        counts,
    )


def _host64(value: Any, xp: Any) -> Any:
    """A flat float64 host copy of a backend array (cast on the backend first: bfloat16 has no
    NumPy dtype, and JAX without x64 has no float64 there)."""
    wide = float64_of(xp)
    if wide is not None and value.dtype != wide:
        value = xp.astype(value, wide)
    elif xp.finfo(value.dtype).bits < 32:
        value = xp.astype(value, xp.float32)
    hx = host_namespace()
    return hx.astype(hx.reshape(hx.asarray(to_host(value)), (-1,)), hx.float64)


def _judged_eps(prepared: Prepared, name: str, xp: Any) -> tuple[float, float]:
    """(eps, ulps): the precision gradient ``name`` is judged to.

    The gradient's own dtype; a float64 gradient of a float32 parameter gets float32's (NumPy
    promotes silently: a float32 forward pass through the course's ``np.int64(A > 0)`` mask
    returns a float64 gradient with float32's rounding)."""
    grad = prepared.analytic[name].dtype
    own = prepared.dtypes[name]
    bits = xp.finfo(grad).bits
    eps = float(xp.finfo(grad).eps)
    if bits == 64 and xp.finfo(own).bits == 32:
        eps = float(xp.finfo(own).eps)
    return eps, LOW_PRECISION_ULPS if xp.finfo(grad).bits < 32 else ANALYTIC_ULPS
