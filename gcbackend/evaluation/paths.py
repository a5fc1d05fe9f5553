"""Which path evaluates a row group — broadcast, vmap or loop — and the proof that it is right.

A batched path is used only after it is *verified* on this cost (``choose_path``): a small
probe (2 rows) first, then the first full chunk, each compared with the same rows evaluated
one at a time within ``AGREEMENT_ULPS``; every later chunk has one seeded row compared the
same way (``batched``). The largest discrepancy accepted is recorded
(``Path.discrepancy``) so the error bars can include it. ``mode="stacked"`` verifies too and
raises CostError where the cost does not broadcast; ``mode="unverified"`` (internal: tests,
benchmarks) is the stacked path without verification.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat

from ..backends import to_host
from ..errors import CostError
from .calls import as_costs, call, contract, first_line, looped, single_cost
from .chunks import timed_on_host
from .limits import intra_op, one_blas_thread
from .rows import RowGroup, Stencil
from .vmap import can_vmap, jax_rows, padded_size, vmapped

__all__ = [
    "AGREEMENT_ULPS",
    "BROADCAST",
    "MODES",
    "Mismatch",
    "Path",
    "Pending",
    "agree",
    "batch_call",
    "batched",
    "checked_row",
    "choose_path",
    "path_of",
    "settle",
]

MODES = ("auto", "stacked", "vmap", "loop")
"""How check() may evaluate the rows: ``auto`` (the fastest path verified for this cost),
``stacked`` (broadcast only, verified, CostError otherwise), ``vmap`` (PyTorch/JAX only),
``loop`` (one call per row). The evaluation also takes ``unverified``: broadcast, trusted."""
AGREEMENT_ULPS = 64.0
"""Batched and single evaluations of a row must agree within AGREEMENT_ULPS·eps·(|J_b| + |J_s|).

Legitimate re-association (a batched GEMM blocks its sums differently) moves J by a few
ulps of the terms summed: README's bound 4·eps·(max|J| + S), S the sum of |terms|, which a
black-box cost does not reveal. 64 ulps of |J| admits S up to ~16·|J|; a cost that does not
broadcast (a sum over all B copies, an outer product) is off by O(|J|), 10^13 times more.
A legitimate cost refused here only runs slower (the loop); one accepted is off by at most
the discrepancy measured, which the error bars then include (``Path.discrepancy``)."""


@dataclass(frozen=True)
class Path:
    """How a row group is evaluated, and why.

    ``name`` is ``"broadcast"``, ``"vmap"`` or ``"loop"``; ``reason`` says why the faster
    paths were not taken, or what happened while verifying the one taken (a batched call
    retried); "" when nothing was refused; ``discrepancy`` is the largest
    |J_batched − J_single| seen while verifying (0 when bitwise equal, or not batched);
    ``fresh`` means every call gets fresh copies of every input (the cost writes into them);
    ``verified`` that batched calls are checked against single calls (one row of every
    chunk: a cost may be right in some chunks only, or broadcast by coincidence at one
    batch size, e.g. a batch as long as the examples).
    """

    name: str
    reason: str = ""
    discrepancy: float = 0.0
    fresh: bool = False
    verified: bool = False


BROADCAST = Path("broadcast")


def path_of(paths: Mapping[str | None, Path] | None, tensor: str | None) -> Path:
    """The path of ``tensor``'s rows: its own, else the whole-θ group's, else broadcast."""
    if not paths:
        return BROADCAST
    return paths.get(tensor) or paths.get(None) or BROADCAST


def agree(batched_value: float, single_value: float, eps: float) -> bool:
    """Whether a batched and a single evaluation agree within AGREEMENT_ULPS (NaN agrees with NaN)."""
    if batched_value == single_value or (math.isnan(batched_value) and math.isnan(single_value)):
        return True
    return abs(batched_value - single_value) <= AGREEMENT_ULPS * eps * (
        abs(batched_value) + abs(single_value)
    )


def _differ(group: RowGroup, name: str, row: int, batched_value: float, single_value: float, size: int):
    """(the reason, one line, and the CostError) for a batched value that is not the single one."""
    where = group.describe(row)
    reason = (
        f"batched values differ from single calls at {where}: {batched_value:.10g} (batch of "
        f"{size}) vs {single_value:.10g}"
    )
    error = CostError(
        f"parameter {group.name!r} of shape {group.shape}: the cost's {name} values differ from "
        f"single calls at {where}: {batched_value:.10g} evaluated in a batch of {size} rows, "
        f"{single_value:.10g} alone, so the batched values cannot be trusted. "
        + (contract(group.name, group.shape) if name == "broadcast" else "Use mode='auto' or mode='loop'.")
    )
    return reason, error


class Mismatch(Exception):
    """A verified batched path disagreed with a single call at a later chunk: under
    mode='auto' the tensor's rows are all evaluated again by the loop (a cost that is wrong
    in some chunks cannot be trusted in the others), else ``error`` is raised."""

    def __init__(self, tensor: str | None, reason: str, error: CostError) -> None:
        super().__init__(tensor, reason, error)
        self.tensor, self.reason, self.error = tensor, reason, error


class _Refused(Exception):
    """A batched path does not hold for this cost: ``reason`` (one line) and ``error``."""

    def __init__(self, reason: str, error: CostError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


def checked_row(tensor: str | None, start: int, stop: int) -> int:
    """The row of chunk [start, stop) that is compared with a single call: drawn from a
    generator seeded by the chunk itself (a string seed is hashed with SHA-512, not
    Python's salted hash), so it is the same row locally, on threads and on Dask workers."""
    return random.Random(f"{tensor}:{start}:{stop}").randrange(start, stop)


class Pending(NamedTuple):
    """A chunk's costs and the single call of its ``row``, compared later (``settle``)."""

    row: int
    start: int
    costs: Any
    single: Any
    """(1,) array: J at ``row`` by one unbatched call."""
    seconds: float = 0.0
    """How long the single call took (not the chunk's: the tuner times the batched call)."""


def batched(
    stencil: Stencil,
    group: RowGroup,
    path: Path,
    start: int,
    stop: int,
    *,
    xp: ModuleType,
    pending: list[Pending] | None = None,
) -> Any:
    """One batched call (broadcast or vmap): the costs of rows [start, stop), shape (stop - start,).

    On a verified path every chunk is checked: one row of it (``checked_row``) is evaluated
    by a single call too. A cost that reduces over the batch axis is wrong only in the
    chunks that hold some rows (``W / max(W)`` over the batch: those moving the largest
    element), so the first chunk proves nothing about the others. The comparison is made
    here (``Mismatch`` if they disagree), or, with ``pending``, queued there for ``settle``
    at the end of the pass: no device sync between chunks."""
    costs = batch_call(stencil, group, path.name, start, stop, xp=xp)
    if path.verified:
        row = checked_row(group.tensor, start, stop)
        began = time.perf_counter()
        # One unbatched call is too small for several BLAS threads: waking them (or waiting
        # for a busy core) made it cost half a chunk of 40 rows on bench/run.py's L model.
        with one_blas_thread() if timed_on_host(xp, group.flat) else contextlib.nullcontext():
            single = _single(stencil, group, path.name, row, xp=xp)
        check = Pending(row, start, costs, single, time.perf_counter() - began)
        if pending is None:
            settle(group, path, [check], xp=xp)
        else:
            pending.append(check)
    return costs


def settle(group: RowGroup, path: Path, checks: list[Pending], *, xp: ModuleType) -> None:
    """Raise ``Mismatch`` for the first of ``checks`` whose batched and single values disagree."""
    # Compared on the host: no operation of ours runs on the library (on JAX each would be
    # compiled and dispatched on its own), only transfers.
    for check in checks:
        batched_value = float(to_host(check.costs)[check.row - check.start])
        single_value = float(to_host(check.single)[0])
        if not agree(batched_value, single_value, float(xp.finfo(check.single.dtype).eps)):
            size = check.costs.shape[0]
            reason, error = _differ(group, path.name, check.row, batched_value, single_value, size)
            raise Mismatch(group.tensor, reason, error)


def batch_call(stencil, group, name, start, stop, *, xp, points=None):
    """The costs of rows [start, stop) by one batched call, or of ``points`` (some of those
    rows, named so in errors); on JAX the compiled program builds the rows itself."""
    if name == "vmap":
        try:
            if array_api_compat.is_jax_namespace(xp):
                count, out = stop - start, _program(stencil, group, stop - start, xp)(start, stop)
            else:
                points = group.rows(start, stop) if points is None else points
                memo = {} if group.memo is None else group.memo
                if "vmap" not in memo:
                    memo["vmap"] = vmapped(stencil, group, xp)
                with intra_op(group.weight, points.shape[0]):
                    count, out = points.shape[0], memo["vmap"](points)
        except Exception as exc:
            raise CostError(
                f"the cost raised {type(exc).__name__} under vmap: {exc} (at rows {start}..{stop - 1} "
                f"perturbing parameter {group.name!r}). Pass mode='auto' or mode='loop'."
            ) from exc
        return as_costs(out, (count,), xp=xp, name=group.name, start=start, stop=stop, stacked=False)
    points = group.rows(start, stop) if points is None else points
    count = points.shape[0]
    params = group.batched(points)
    with intra_op(group.weight, count):  # PyTorch on one thread for a call that reads little
        out = call(
            stencil.cost,
            params,
            stencil.args,
            name=group.name,
            start=start,
            stop=stop,
            stacked=True,
            shape=group.shape,
        )
    return as_costs(
        out, (count,), xp=xp, name=group.name, start=start, stop=stop, stacked=True, shape=group.shape
    )


def _program(stencil: Stencil, group: RowGroup, rows: int, xp: ModuleType) -> Any:
    """JAX: the compiled call over ``rows`` rows of ``group``: one batch size for all the
    group's chunks (the largest asked for, padded), one for single rows."""
    memo = {} if group.memo is None else group.memo
    if rows == 1:
        size = 1
    else:
        size = memo.get("size", 0)
        if rows > size:
            size = memo["size"] = padded_size(rows)
    if ("jax", size) not in memo:
        memo[("jax", size)] = jax_rows(stencil, group, xp, size)
    return memo[("jax", size)]


def _single(stencil: Stencil, group: RowGroup, name: str, row: int, *, xp: ModuleType) -> Any:
    """J at one row by one unbatched call, (1,): compiled on JAX's vmap path, else eager."""
    if name == "vmap" and array_api_compat.is_jax_namespace(xp):
        try:
            return _program(stencil, group, 1, xp)(row, row + 1)
        except Exception as exc:
            raise CostError(
                f"the cost raised {type(exc).__name__} under jax.jit: {exc} (at row {row} perturbing "
                f"parameter {group.name!r}). Pass mode='auto' or mode='loop'."
            ) from exc
    return xp.reshape(single_cost(stencil, group, row, xp=xp), (1,))


def choose_path(
    stencil: Stencil, group: RowGroup, stop: int, *, xp: ModuleType, requested: str
) -> tuple[Path, Any]:
    """The path for ``group``'s rows, decided on its first chunk, rows [0, stop), and their costs.

    ``requested``: ``"auto"`` tries broadcast, then vmap (PyTorch; on JAX vmap first), then loops;
    ``"stacked"`` / ``"vmap"`` try only that path and raise CostError when it fails
    verification; ``"loop"`` loops. A batched path is verified: a probe of 2 rows (the
    first and last of the chunk) so a cost that builds B×B intermediates or fails does so
    small and fast, those rows evaluated singly, then the full chunk, whose first and last
    rows must agree with the singles too (within AGREEMENT_ULPS). A batched call that
    raises is retried once (``Path.reason`` says so) before the path is refused. A CostError
    raised by a single evaluation is the cost's own error and is raised whatever the mode.
    """
    if requested == "loop":
        return Path("loop", "mode='loop'"), looped(stencil, group, 0, stop, xp=xp, fresh=False)
    candidates = {"auto": ("broadcast", "vmap"), "stacked": ("broadcast",), "vmap": ("vmap",)}[requested]
    if array_api_compat.is_jax_namespace(xp) and requested == "auto":
        # JAX runs the cost compiled only under jit(vmap): broadcast runs it op by op, so it
        # comes second (for a cost that cannot be traced, e.g. one that calls NumPy).
        candidates = ("vmap", "broadcast")
    elif group.tensor is None or not can_vmap(xp):
        candidates = tuple(c for c in candidates if c != "vmap")
    if requested == "vmap" and not candidates:
        raise CostError(
            f"mode='vmap' needs PyTorch or JAX (torch.func.vmap, jax.vmap); the check runs on "
            f"{xp.__name__}. Use mode='auto' (the default) or mode='loop'"
        )
    picks = sorted({0, stop - 1})
    singles: list[Any] = []
    reasons = []
    for name in candidates:
        notes: list[str] = []
        try:
            costs, discrepancy = _verified(stencil, group, name, picks, stop, singles, notes, xp=xp)
        except _Refused as refused:
            if requested != "auto":
                raise refused.error from refused.error.__cause__
            reasons.append(f"{name}: {refused.reason}")
            continue
        reasons += [f"{name}: {note}" for note in notes]
        return Path(name, "; ".join(reasons), discrepancy, verified=True), costs
    return Path("loop", "; ".join(reasons)), looped(stencil, group, 0, stop, xp=xp, fresh=False)


def _verified(stencil, group, name, picks, stop, singles, notes, *, xp):
    """The costs of rows [0, stop) by batched path ``name``, verified against single calls;
    what happened on the way (a call retried) is appended to ``notes``."""

    compiled: list[Any] = []

    def single_costs() -> list[Any]:
        if name == "vmap" and array_api_compat.is_jax_namespace(xp):
            # JAX: single rows compiled too (the cost may not trace: then vmap is refused).
            if not compiled:
                try:
                    compiled.extend(_single(stencil, group, name, r, xp=xp) for r in picks)
                except CostError as error:
                    cause = error.__cause__
                    raise _Refused(first_line(f"{type(cause).__name__}: {cause}"), error) from None
            return compiled
        if not singles:  # evaluated once, shared by the candidates
            singles.extend(looped(stencil, group, r, r + 1, xp=xp, fresh=False) for r in picks)
        return singles

    def attempt(start, last, points=None):
        # A batched call that fails is tried once more (after the single calls, which raise
        # the cost's own error if it fails on one point too): one transient error (a file
        # busy, a flaky device) must not cost the loop for the whole check.
        failed = None
        for _ in range(2):
            try:
                costs = batch_call(stencil, group, name, start, last, xp=xp, points=points)
            except CostError as error:
                single_costs()
                cause = error.__cause__
                what = first_line(f"{type(cause).__name__}: {cause}" if cause is not None else str(error))
                if failed is not None:
                    raise _Refused(f"{what} (and again when retried)", error) from None
                failed = what
                continue
            if failed is not None:
                notes.append(f"a batched call raised {failed}; retried, it ran and agreed with single calls")
            return costs

    # vmap maps the cost over rows one by one (no B×B intermediates to fear): no probe.
    # Compared on the host (transfers only: no operation of ours dispatched on the library).
    found: list[float] = []  # batched values of the rows ``picks``, in calls of ``sizes`` rows
    sizes: list[int] = []
    if name == "broadcast":
        probe_points = xp.concat([xp.asarray(group.rows(r, r + 1), copy=True) for r in picks])
        probe = attempt(0, len(picks), probe_points)
        found += to_host(probe).tolist()
        sizes += [len(picks)] * len(picks)
    if stop > len(picks) or not found:
        full = attempt(0, stop)
        on_host = to_host(full)
        found += [float(on_host[r]) for r in picks]
        sizes += [stop] * len(picks)
        costs = full
    else:
        costs = probe
    reference = [float(to_host(s).reshape(-1)[0]) for s in single_costs()]
    batched_values, single_values = found, reference * (len(found) // len(reference))
    eps = float(xp.finfo(single_costs()[0].dtype).eps)
    worst = 0.0
    for i, (b, s) in enumerate(zip(batched_values, single_values)):
        if b == s or (math.isnan(b) and math.isnan(s)):
            continue
        if not agree(b, s, eps):
            raise _Refused(*_differ(group, name, picks[i % len(picks)], b, s, sizes[i]))
        worst = max(worst, abs(b - s))
    return costs, worst
