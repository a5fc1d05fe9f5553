"""A pass: the costs J(θ + D_r) of every row of a stencil, tensor by tensor, by the path
proved right for each (``stencil_costs``), locally or through a runner."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import array_api_compat
from array_api_compat import device

from ..errors import CostError
from ..params import Layout
from .calls import Scribbled, copied, intact, looped
from .chunks import (
    DEFAULT_MEMORY_BUDGET,
    MAX_CHUNK_ROWS,
    TUNE_MIN_ROWS,
    WHOLE_ROWS,
    budget_rows,
    chunk_bounds,
    chunk_rows,
    timed_on_host,
    tuned_sizes,
    vmap_rows,
)
from .paths import BROADCAST, Mismatch, Path, Pending, batched, choose_path, path_of, settle
from .rows import Chunk, RowGroup, Stencil, jitted, row_group, split

if TYPE_CHECKING:
    from .runners import Runner

__all__ = ["SETTLE_EVERY", "central_differences", "evaluate_chunk", "evaluate_rows", "stencil_costs"]

SETTLE_EVERY = 256
"""Chunks whose checked rows are compared in one transfer (``paths.settle``), at most."""


def _itemsize(group: RowGroup, xp: ModuleType) -> int:
    return xp.finfo(group.flat.dtype).bits // 8


def evaluate_rows(
    stencil: Stencil,
    group: RowGroup,
    path: Path,
    *,
    xp: ModuleType,
    start: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
) -> Any:
    """Costs J(flat + D_r) for rows r in [start, n_rows) of ``group`` by ``path``, shape (n_rows - start,).

    Batched paths: ⌈rows / B⌉ calls, B from ``memory_budget`` (measured, for many rows on a
    host library: see ``tuned_sizes``), one row of each checked by a single call (compared
    at the end: ``Mismatch``). Loop: one call per row, told to ``progress`` by blocks.
    Raises CostError if the cost raises or returns the wrong shape.
    """
    n_rows, size = group.n_rows, group.flat.shape[0]
    costs = []
    if path.name == "loop":
        step = max(1, group.most if group.tensor is None else MAX_CHUNK_ROWS)
        for first in range(start, n_rows, step):
            stop = min(first + step, n_rows)
            costs.append(looped(stencil, group, first, stop, xp=xp, fresh=path.fresh))
            if progress is not None:
                progress(stop - first)
        return _joined(costs, xp)
    itemsize = _itemsize(group, xp)
    static = chunk_rows(n_rows, size, itemsize, memory_budget, group.name, group.most)  # validates the budget
    seconds: deque[float] = deque(maxlen=1)  # the last call's seconds per row: all the tuner reads
    if path.name == "vmap":
        sizes = itertools.repeat(vmap_rows(size, itemsize, memory_budget))
    elif n_rows - start >= TUNE_MIN_ROWS and timed_on_host(xp, group.flat):
        sizes = tuned_sizes(
            min((n_rows - start) // 4, budget_rows(memory_budget, size * itemsize)), seconds, static
        )
    else:
        sizes = itertools.repeat(static)
    checks: list[Pending] = []
    while start < n_rows:
        stop = min(start + next(sizes), n_rows)
        began, queued = time.perf_counter(), len(checks)
        costs.append(batched(stencil, group, path, start, stop, xp=xp, pending=checks))
        # The batched call's own time: the chunk's check is the same single call at any size.
        checking = checks[-1].seconds if len(checks) > queued else 0.0
        seconds.append((time.perf_counter() - began - checking) / (stop - start))
        if len(checks) >= SETTLE_EVERY:  # (a few hundred bytes each: not one per chunk of 10⁶ rows)
            settle(group, path, checks, xp=xp)
            checks.clear()
        if progress is not None:
            progress(stop - start)
        start = stop
    settle(group, path, checks, xp=xp)
    return _joined(costs, xp)


def _rest_bounds(
    group: RowGroup, path: Path, start: int, memory_budget: int, xp: ModuleType
) -> list[tuple[int, int]]:
    """The (start, stop) of the calls over rows [start, n_rows) once the path is known."""
    size, itemsize = group.flat.shape[0], _itemsize(group, xp)
    if path.name == "vmap":
        step = vmap_rows(size, itemsize, memory_budget)
        return [(first, min(first + step, group.n_rows)) for first in range(start, group.n_rows, step)]
    budget = _loop_budget(group, memory_budget, xp) if path.name == "loop" else memory_budget
    rest = chunk_bounds(group.n_rows - start, size, itemsize, budget, group.name, group.most)
    return [(start + a, start + b) for a, b in rest]


def _loop_budget(group: RowGroup, memory_budget: int, xp: ModuleType) -> int:
    """The loop perturbs one row in place: it needs no budget, so none below one copy refuses it
    (mode='loop' is not refused by ``prepare`` either); its chunks are only how rows are handed out."""
    return max(memory_budget, group.flat.shape[0] * _itemsize(group, xp))


def _joined(costs: list[Any], xp: ModuleType) -> Any:
    return costs[0] if len(costs) == 1 else xp.concat(costs)


def evaluate_chunk(
    stencil: Stencil, chunk: Chunk, *, xp: ModuleType, groups: dict[str | None, RowGroup] | None = None
) -> Any:
    """The costs of one chunk of a stencil's rows, shape (stop - start,): what a worker runs.

    It rebuilds the rows from (tensor, start, stop) with the same code and the same
    operations as the local pass, by the path chosen on the driver (``stencil.paths``), so
    on the same library the costs are bitwise the local ones. ``groups`` (tensor →
    RowGroup), when given, keeps the row groups from one chunk to the next, and with them
    their row buffers. Raises CostError like ``evaluate_rows``.
    """
    tensor, start, stop = chunk
    if groups is None:
        group = row_group(stencil, tensor, xp=xp)
    else:
        if tensor not in groups:
            groups[tensor] = row_group(stencil, tensor, xp=xp)
        group = groups[tensor]
    path = path_of(stencil.paths, tensor)
    if path.name == "loop":
        return looped(stencil, group, start, stop, xp=xp, fresh=path.fresh)
    return batched(stencil, group, path, start, stop, xp=xp)


def _group_costs(
    stencil: Stencil,
    tensors: tuple[str | None, ...],
    *,
    xp: ModuleType,
    mode: str,
    memory_budget: int,
    progress: Callable[[int], Any] | None,
    runner: Runner | None,
    paths: dict[str | None, Path],
) -> dict[str | None, Any]:
    """tensor → the costs of all its rows, (n_rows,). Locally one tensor after the other; a
    runner gets the chunks of ALL the tensors in one list, so a cluster runs them together.

    A tensor without a path in ``paths`` gets one (``choose_path``) on its first chunk,
    here, before any runner sees its chunks; the runner's stencil carries the paths."""
    groups = {tensor: row_group(stencil, tensor, xp=xp) for tensor in tensors}
    bounds = {
        tensor: chunk_bounds(
            group.n_rows,
            group.flat.shape[0],
            _itemsize(group, xp),
            _loop_budget(group, memory_budget, xp) if mode == "loop" else memory_budget,
            group.name,
            group.most,
        )
        for tensor, group in groups.items()
    }
    first: dict[str | None, Any] = {}
    for tensor, group in groups.items():
        if mode == "unverified":
            paths.setdefault(tensor, BROADCAST)
        elif tensor not in paths:
            stop = bounds[tensor][0][1]
            requested = "stacked" if tensor is None else mode
            if array_api_compat.is_jax_namespace(xp) and mode in ("auto", "vmap"):
                # jit(vmap) from the first chunk on, at its own chunk size: one compilation.
                requested = mode
                stop = _rest_bounds(group, Path("vmap"), 0, memory_budget, xp)[0][1]
            paths[tensor], first[tensor] = choose_path(stencil, group, stop, xp=xp, requested=requested)
            if progress is not None:
                progress(stop)
    stencil = replace(stencil, paths={tensor: paths[tensor] for tensor in tensors})
    for tensor, head in first.items():
        bounds[tensor] = _rest_bounds(groups[tensor], paths[tensor], head.shape[0], memory_budget, xp)
    if runner is None:
        out = {}
        for tensor, group in groups.items():
            head = first.get(tensor)
            start = 0 if head is None else head.shape[0]
            options = dict(xp=xp, memory_budget=memory_budget, progress=progress)
            try:
                rest = (
                    evaluate_rows(stencil, group, paths[tensor], start=start, **options)
                    if start < group.n_rows
                    else None
                )
            except Mismatch as mismatch:
                if mode != "auto" or tensor is None:  # (the whole-θ group is redone per tensor)
                    raise
                # Wrong in one chunk, so trusted in none: every row of the tensor again, by the loop.
                paths[tensor] = _looped_after(paths[tensor], mismatch)
                head, rest = None, evaluate_rows(stencil, group, paths[tensor], **options)
            out[tensor] = _joined([p for p in (head, rest) if p is not None], xp)
        return out
    chunks = [(tensor, start, stop) for tensor in groups for start, stop in bounds[tensor]]
    results = runner(stencil, chunks, progress) if chunks else []
    out = {}
    for tensor in groups:
        pieces = [first[tensor]] if tensor in first else []
        pieces += [costs for (owner, _, _), costs in zip(chunks, results) if owner == tensor]
        out[tensor] = _joined(pieces, xp)
    return out


def stencil_costs(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    steps: Mapping[str, Any],
    multipliers: tuple[float, ...],
    xp: ModuleType,
    mode: str = "unverified",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    elements: Mapping[str, Any] | None = None,
    directions: Mapping[str, Any] | None = None,
    runner: Runner | None = None,
    paths: dict[str | None, Path] | None = None,
) -> dict[str, Any]:
    """J(θ + m_k·h_j·e_j) for every multiplier m_k and element j: name → (K, *shape).

    With ``elements`` (name → flat int indices) only those elements get rows and the result
    is name → (K, s). With ``directions`` (name → (k, n) displacements, steps included) the
    rows are m·u instead of coordinate steps and the result is name → (K, k).

    ``steps`` maps each name to h, an array of the tensor's shape. A row differs from θ in
    exactly one element, by exactly m_k·h_j (θ_i + ±0 is θ_i bitwise); with m = ±1 the
    perturbed parameters equal the notebook's ``theta_plus``/``theta_minus`` bit for bit.
    A small θ (all rows fit one stacked call) is done in ONE call with every tensor
    batched, where per-call overhead dominates; otherwise each tensor's rows are evaluated
    with only that tensor batched, so the others are shared by broadcasting and the layers
    before it run once.

    ``mode`` is one of MODES or ``"unverified"`` (broadcast without verification, the
    default here: check() always says what it wants). ``paths`` (tensor → Path, None for
    the whole-θ group) is filled with the path each group takes and read for the groups
    already decided, so a check decides once per tensor; pass the same dict to every call.

    The cost never sees ``parts`` or ``args`` themselves: it gets copies, compared with
    them afterwards (one device sync); a cost that wrote into them has the whole pass
    redone with fresh copies for every call (``Path.fresh``), so no result is computed from
    corrupted inputs.

    ``runner`` evaluates the chunks elsewhere: it receives the Stencil (with the paths) and
    every (tensor, start, stop) chunk at once, and returns their costs in order (see
    ``Runner``); the chunks are the local ones, so are the results.

    On PyTorch's CPU a call that reads little (the loop's, a small cost's chunks) runs with
    one intra-op thread (``limits.intra_op``; restored by the last check holding it).
    """
    paths = {} if paths is None else paths
    n_stencil = len(multipliers)
    dtypes = {p.dtype for p in parts.values()}
    n_total = layout.size
    itemsize = xp.finfo(next(iter(dtypes))).bits // 8
    whole = (
        elements is None
        and directions is None
        and mode in ("auto", "stacked", "unverified")
        and len(dtypes) == 1
        and n_stencil * n_total <= WHOLE_ROWS
        and n_stencil * n_total * n_total * itemsize <= memory_budget
        and not any(p.fresh for p in paths.values())
        # A check whose tensors went per tensor to a slower path stays so; tensors that broadcast
        # (a few direction rows of one tensor, say) do not keep θ from one call.
        and all(path.name == "broadcast" for tensor, path in paths.items() if tensor is not None)
    )
    mutable = not array_api_compat.is_jax_namespace(xp)
    work_parts = {name: xp.asarray(p, copy=True) for name, p in parts.items()} if mutable else dict(parts)
    work_args = tuple(copied(a, xp) for a in args) if mutable else args
    stencil = Stencil(cost, work_parts, work_args, layout, steps, multipliers, elements, directions)
    evaluation = dict(xp=xp, mode=mode, memory_budget=memory_budget, progress=progress, runner=runner)
    # A tensor with no elements or directions (a refinement that left it alone) gets no call.
    chosen = elements if elements is not None else directions
    tensors = tuple(name for name in parts if chosen is None or chosen[name].shape[0] > 0)
    try:
        costs = None
        if whole and paths.get(None, BROADCAST).name in ("broadcast", "vmap"):
            try:
                costs = _group_costs(stencil, (None,), **evaluation, paths=paths)[None]
            except (CostError, Mismatch):
                paths.pop(None, None)  # the per-tensor pass below redoes it and names the parameter at fault
        if costs is None:
            per_tensor = _per_tensor(stencil, tensors, evaluation, paths)
        clean = not mutable or intact(stencil, parts, args, xp)
    except Scribbled:
        clean = False
    except CostError:
        # A verification that failed because the cost had written into its inputs meanwhile
        # is no verdict on batching: redo it with fresh copies below. Any other error stands.
        if not mutable or intact(stencil, parts, args, xp):
            raise
        clean = False
    if not clean:
        # The cost wrote into what it received: every call again, with fresh copies of everything.
        reason = "the cost writes into the arrays it receives: every call got fresh copies"
        paths.clear()
        paths.update({name: Path("loop", reason, fresh=True) for name in parts})
        pristine = Stencil(cost, dict(parts), args, layout, steps, multipliers, elements, directions)
        evaluation["runner"] = None
        costs, per_tensor = None, _group_costs(pristine, tensors, **evaluation, paths=paths)
    if costs is not None:
        return split(layout, costs, n_stencil, xp)
    full = elements is None and directions is None
    return {
        name: xp.reshape(per_tensor[name], (n_stencil, *tuple(base.shape)) if full else (n_stencil, -1))
        if name in per_tensor
        else xp.zeros((n_stencil, 0), dtype=base.dtype, device=device(base))
        for name, base in parts.items()
    }


def _per_tensor(stencil: Stencil, tensors, evaluation: dict, paths: dict) -> dict:
    """``_group_costs`` per tensor; a tensor whose verified batched path disagrees with a
    single call in a later chunk is looped instead (mode='auto'), or its CostError raised.
    (Locally ``_group_costs`` loops it itself; a runner's chunks are all evaluated again.)"""
    while True:
        try:
            return _group_costs(stencil, tensors, **evaluation, paths=paths)
        except Mismatch as mismatch:
            if evaluation["mode"] != "auto" or path_of(paths, mismatch.tensor).name == "loop":
                raise mismatch.error from None
            paths[mismatch.tensor] = _looped_after(path_of(paths, mismatch.tensor), mismatch)


def _looped_after(path: Path, mismatch: Mismatch) -> Path:
    """The loop, for a tensor whose batched ``path`` disagreed with a single call."""
    return Path("loop", f"{path.name}: {mismatch.reason}")


def central_differences(
    cost: Callable[..., Any],
    parts: Mapping[str, Any],
    args: tuple[Any, ...],
    *,
    layout: Layout,
    epsilon: float,
    xp: ModuleType,
    mode: str = "unverified",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], Any] | None = None,
    runner: Runner | None = None,
    paths: dict[str | None, Path] | None = None,
) -> dict[str, Any]:
    """The central-difference gradient (J(θ + εe_i) − J(θ − εe_i)) / (2ε) of every element.

    The stencil ±1 with one step ε for all elements; the quotient is formed in the
    notebook's order, so its numbers reproduce. Returns name → array of the tensor's shape.
    """
    jax = array_api_compat.is_jax_namespace(xp)
    shapes = tuple((name, tuple(p.shape), p.dtype, device(p)) for name, p in parts.items())
    steps = jitted(_stepper, shapes, xp)(epsilon) if jax else _stepper(shapes, xp)(epsilon)
    costs = stencil_costs(
        cost,
        parts,
        args,
        layout=layout,
        steps=steps,
        multipliers=(1.0, -1.0),
        xp=xp,
        mode=mode,
        memory_budget=memory_budget,
        progress=progress,
        runner=runner,
        paths=paths,
    )
    return jitted(_quotient, xp)(costs, epsilon) if jax else _quotient(xp)(costs, epsilon)


def _stepper(shapes: tuple, xp: ModuleType) -> Callable[[float], dict[str, Any]]:
    """epsilon → name → ε everywhere, for tensors of ``shapes`` (name, shape, dtype, device)."""
    return lambda epsilon: {
        name: xp.full(shape, epsilon, dtype=dtype, device=where) for name, shape, dtype, where in shapes
    }


def _quotient(xp: ModuleType) -> Callable[[dict[str, Any], float], dict[str, Any]]:
    """(costs, ε) → the notebook's (J⁺ − J⁻) / (2ε) per tensor (one compiled call on JAX)."""
    return lambda costs, epsilon: {name: (c[0, ...] - c[1, ...]) / (2 * epsilon) for name, c in costs.items()}
