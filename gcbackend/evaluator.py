"""The evaluation as the staircase sees it: a ``differences.Request`` of rows in, host costs out.

check() builds one ``Evaluator`` per check. It turns each request (probes, steps, multipliers,
a base) into the evaluation's rows (per tensor: elements and steps, or directions) on the
backend, calls ``gcbackend.evaluation.stencil_costs``, and brings the costs back to the host in
one transfer per tensor; it keeps the path each tensor took, the perturbed bases and which
narrower dtypes the cost returned.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from . import differences, evaluation, inputs
from .backends import host_namespace, host_random, is_array, namespace, to_backend, to_host

__all__ = ["Evaluator"]


class Evaluator:
    """The evaluation as the ladder sees it: a request of rows in, host costs out.

    It turns a ``differences.Request`` (probes, steps, multipliers) into the evaluation's rows
    (per tensor: elements and steps, or directions), on the backend, and brings the costs back
    to the host in one transfer per request; it remembers the path each tensor takes."""

    def __init__(self, cost, prepared, planned, *, mode, client, workers, seed) -> None:
        self.cost, self.prepared, self.planned = cost, prepared, planned
        self.xp = prepared.backend.xp
        self.paths: dict = {}
        self.notes: list[str] = []
        self.narrow: list[str] = []
        self.wide = inputs._dtype_name(next(iter(prepared.parts.values())).dtype)
        self.seed = seed
        self.progress = None
        self.bases: dict[int, tuple[dict, tuple]] = {}
        self.runner = None
        if client is not None:
            from . import distributed  # only here: a check without a client never imports dask

            self.runner = distributed.runner(client, prepared.backend, cost, prepared.args)
        if client is None and (asked := evaluation.worker_count(int(workers))) > 1:
            # Each thread holds its own chunk, and the chunks are the one-thread check's (so is
            # the report, bit for bit, on every backend): as many threads as such chunks of the
            # largest tensor's rows fit memory_budget side by side.
            budget = prepared.budget
            chunk = max(
                evaluation.ROW_FOOTPRINT
                * _chunk_bytes(math.prod(p.shape), self.xp.finfo(p.dtype).bits // 8, budget, self.xp, mode)
                for p in prepared.parts.values()
            )
            threads = min(asked, max(1, budget // chunk))
            if threads > 1:
                self.runner = evaluation.ThreadRunner(threads, self.xp)
                self.notes.append(f"chunks of rows evaluated on {threads} threads (BLAS on 1 thread each)")
            if threads < asked:
                self.notes.append(
                    f"workers={workers}: {threads} thread(s), as memory_budget={budget} holds "
                    f"{'no more' if threads > 1 else 'one'} of the largest parameter's chunks at once"
                )
        self.options = dict(
            layout=prepared.layout,
            xp=self.xp,
            mode="auto" if mode == "directions" else mode,
            memory_budget=prepared.budget,
            runner=self.runner,
            paths=self.paths,
        )

    def centre(self) -> float:
        args = self.prepared.args
        value = evaluation.evaluate_center(
            self.cost,
            self.prepared.parts,
            args,
            layout=self.prepared.layout,
            xp=self.xp,
            explain=lambda: inputs.nonfinite_args(args, self.xp),
        )
        self._note_dtype(value)
        return float(to_host(value))

    def rows(self, request: differences.Request) -> int:
        """How many perturbed rows a request evaluates."""
        if request.directions is not None:
            return len(request.multipliers) * sum(int(d.shape[0]) for d in request.directions.values())
        return len(request.multipliers) * int(request.probes.shape[0])

    def discrepancies(self) -> dict[int, float]:
        return {
            k: evaluation.path_of(self.paths, name).discrepancy for k, name in enumerate(self.planned.names)
        }

    def __call__(self, request: differences.Request) -> tuple[Any, Any]:
        hx = host_namespace()
        xp, backend, planned = self.xp, self.prepared.backend, self.planned
        parts, args = self._base(request)
        if request.directions is not None:
            directions = {
                name: to_backend(rows, backend, dtype=parts[name].dtype)
                for name, rows in request.directions.items()
            }
            grid = evaluation.stencil_costs(
                self.cost,
                parts,
                args,
                steps=_unit_steps(parts, xp),
                multipliers=request.multipliers,
                directions={name: directions.get(name, _none(parts[name], xp)) for name in parts},
                progress=self.progress,
                **self.options,
            )
            costs = hx.concat(
                [self._host(grid[name]) for name in planned.names if name in request.directions], axis=1
            )
            return costs, hx.ones((costs.shape[1],))
        probes = request.probes
        segments = planned.segment[probes]
        order = hx.argsort(segments, stable=True)
        probes, steps_wanted = probes[order], request.steps[order]
        segments = segments[order]
        # Every element in its natural order: the evaluation's one-call path for a small θ.
        whole = (
            probes.shape[0] == planned.size
            and planned.coverage.kind == "elements"
            and bool(hx.all(probes == hx.arange(planned.size)))
        )
        elements, steps, directions = {}, {}, None
        if planned.coverage.kind == "directions":
            directions = {}
        for k, name in enumerate(planned.names):
            mine = segments == k
            at = planned.index[probes[mine]]
            wanted = steps_wanted[mine]
            shape = planned.shapes[k]
            if directions is not None:
                units = planned.directions[name]
                if units.held or array_api_compat.is_jax_namespace(xp):
                    # Small (or a compiled JAX program's single argument): one array, as it is.
                    rows = units.displacements(at, wanted).drawn()
                    directions[name] = to_backend(rows, backend, dtype=parts[name].dtype)
                else:  # drawn chunk by chunk, within the memory budget
                    directions[name] = units.displacements(at, wanted)
                steps[name] = _none(parts[name], xp)
                continue
            full = hx.zeros((_prod(shape),))
            full[at] = wanted
            theta = self.prepared.parts[name]
            wanted_steps = to_backend(hx.reshape(full, shape), backend, dtype=theta.dtype)
            # The notebook's ε is used as it is (its quotient divides by 2ε); every other step is
            # made exact, so the step the cost sees is the step the quotient divides by. At a
            # perturbed base (the forward's rounding, measured) the step stays the one at θ: θ̃ is
            # off the parameter's own grid, and D(h) there is compared with D(h) at θ.
            steps[name] = (
                wanted_steps
                if planned.notebook or request.base
                else differences.snap(theta, wanted_steps, self.prepared.dtypes[name], xp)
            )
            elements[name] = to_backend(hx.asarray(at, dtype=hx.int64), backend)
        grid = evaluation.stencil_costs(
            self.cost,
            parts,
            args,
            steps=steps,
            multipliers=request.multipliers,
            elements=None if (whole or directions is not None) else elements,
            directions=directions,
            progress=self.progress,
            **self.options,
        )
        pieces, used = [], []
        for k, name in enumerate(planned.names):
            mine = segments == k
            if not bool(hx.any(mine)) and not whole:
                continue
            values = self._host(grid[name])
            values = hx.reshape(values, (len(request.multipliers), -1))
            pieces.append(values)
            if directions is not None:
                used.append(steps_wanted[mine])
            else:
                at = planned.index[probes[mine]]
                flat = hx.reshape(self._host_steps(steps[name]), (-1,))
                used.append(flat[at])
        costs = hx.concat(pieces, axis=1)
        inverse = hx.argsort(order, stable=True)
        return costs[:, inverse], hx.concat(used)[inverse]

    def _base(self, request):
        """θ and the args, or (request.base ≥ 1) every floating input perturbed by
        ``request.perturbation`` relative, with seeded random signs."""
        parts, args = self.prepared.parts, self.prepared.args
        if not request.base:
            return parts, args
        key = (request.base, request.perturbation)
        if key not in self.bases:
            xp, backend = self.xp, self.prepared.backend
            rng = host_random(self.seed + 104729 * request.base)

            def moved(value):
                signs = rng.choice([-1.0, 1.0], size=tuple(value.shape))
                factor = to_backend(1.0 + request.perturbation * signs, backend, dtype=value.dtype)
                return value * factor

            new_parts = {name: moved(p) for name, p in parts.items()}
            new_args = tuple(moved(x) if _is_float_array(x, xp) else x for x in args)
            self.bases[key] = (new_parts, new_args)
        return self.bases[key]

    def _host(self, values):
        hx = host_namespace()
        out = hx.asarray(to_host(values))
        if out.dtype != hx.float64:
            self._note_dtype(values)
            out = hx.astype(out, hx.float64)
        return out

    def _host_steps(self, steps):
        hx = host_namespace()
        return hx.astype(hx.asarray(to_host(steps)), hx.float64)

    def _note_dtype(self, value):
        xp = self.xp
        dtype = value.dtype
        if xp.finfo(dtype).bits < xp.finfo(next(iter(self.prepared.parts.values())).dtype).bits:
            name = inputs._dtype_name(dtype)
            if name not in self.narrow:
                self.narrow.append(name)


def _is_float_array(x, xp) -> bool:
    return is_array(x) and namespace(x) is xp and xp.isdtype(x.dtype, "real floating")


def _prod(shape) -> int:
    return math.prod(shape)


def _none(part, xp):
    return xp.zeros((0, math.prod(part.shape)), dtype=part.dtype)


def _unit_steps(parts, xp):
    return {name: xp.ones(tuple(p.shape), dtype=p.dtype) for name, p in parts.items()}


def _chunk_bytes(size: int, itemsize: int, budget: int, xp: Any, mode: str) -> int:
    """Bytes of perturbed copies in the largest chunk of a size-``size`` tensor's rows (stacked,
    or vmapped on PyTorch and JAX), before ROW_FOOTPRINT. The loop holds one row at a time (and
    needs no budget: mode='loop' is not refused below one copy)."""
    row = size * itemsize
    if mode == "loop" or budget < row:
        return row
    rows = evaluation.chunk_rows(2**62, size, itemsize, budget, "")
    if array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp):
        rows = max(rows, evaluation.chunks.vmap_rows(size, itemsize, budget))
    return rows * row
