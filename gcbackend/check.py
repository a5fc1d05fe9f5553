"""check(): compare a backward pass's gradients with central finite differences, and judge them."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import array_api_compat

from . import differences, inputs, judge
from . import evaluation as engine
from .backends import host_random, take, to_backend
from .report import Report

MODES = inputs.MODES
NOTEBOOK: Mapping[str, float] = MappingProxyType({"epsilon": 1e-7, "threshold": 2e-7})
"""The course notebook's settings: ``gc.check(..., **gc.NOTEBOOK)`` reproduces its numbers
(J(θ ± 1e-7), 2N evaluations, pass when the overall difference is at most 2e-7)."""

__all__ = ["check"]


def check(
    cost: Callable[..., Any],
    params: Mapping[str, Any] | Any,
    grads: Mapping[str, Any] | Any,
    *args: Any,
    backend: Any = None,
    device: Any = None,
    epsilon: float | str = "auto",
    threshold: float | str = "auto",
    order: int = 2,
    mode: str = "auto",
    directions: int = 8,
    sample: int | None = None,
    seed: int = 0,
    top_k: int = 5,
    upcast: bool = True,
    memory_budget: int | None = None,
    progress: bool | None = None,
    client: Any = None,
    workers: int = 1,
) -> Report:
    """Check ``grads`` against central finite differences of ``cost(params, *args)``.

    Parameters
    ----------
    cost
        ``cost(params, *args)`` → the scalar cost J, written as you like. It is fastest when it
        also accepts parameters with a leading batch axis (some tensors of shape (B, *shape))
        and returns shape (B,) (broadcasting: ``@``, reductions over trailing axes); the
        check verifies that before relying on it (see ``mode``).
    params
        A mapping name → array, one array or Python number (reported as ``"theta"``), or a
        tree: nested dicts, lists, tuples and NamedTuples of arrays, each leaf named by its
        path (``encoder.W``, ``layers[0][1]``, ``layers[0].W``; see ``gcbackend.params``).
        The cost receives the same structure. Real floating dtypes (Python numbers become
        float64). Never modified.
    grads
        The same structure; at every mapping keys ``"W1"`` or ``"dW1"``. Keys that name no
        parameter and do not look like one (``dZ3``, ``dA2``) are ignored. A structure that
        differs from params' is an InputError naming the first differing path. Never modified.
    *args
        Passed to the cost unchanged after arrays among them are copied to the backend.
    backend, device
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``, ``"array_api_strict"``, ``"dask"``,
        a namespace module, or None to infer it from the arrays. Inputs are copied there.
    epsilon, threshold
        ``"auto"`` (default): a step per element from the dtype and |θ|, and a threshold of
        10× the difference a correct gradient shows, measured in the same stacked pass
        (J at ±h and ±2h, and J(θ) once: 4N + 1 evaluations). Numbers: the notebook's way,
        ``**gc.NOTEBOOK`` (epsilon=1e-7, threshold=2e-7), 2N evaluations, no error bars.
    order
        2 (default) or 4: the 4-point stencil (±h, ±2h) of the same evaluations, at order
        2's step with an error bar no wider than order 2's (as sensitive, more accurate).
    mode
        ``"auto"`` (default): per tensor, the fastest path proved right for this cost —
        ``broadcast`` (one call per chunk of rows, the tensor with a leading batch axis),
        ``vmap`` (PyTorch ``torch.func.vmap``, JAX ``jax.vmap`` under ``jit``) or ``loop``;
        a batched path is used only after its values agree with single calls, and the report
        says which path each tensor took and why (``ParameterResult.path``). ``"stacked"``:
        broadcast only, verified the same way, CostError where the cost does not broadcast.
        ``"vmap"``: vmap only (PyTorch, JAX). ``"loop"``: one call per row, the notebook's
        algorithm. ``"directions"``: the fast screen, ``directions`` seeded unit Gaussian
        directions u per tensor (rows evaluated as in ``"auto"``), 4·k·(number of tensors) + 1
        evaluations whatever N is; its values are directional derivatives uᵀ∇J against uᵀg,
        reported as ``direction k``.
    sample, seed
        ``sample=k`` checks k seeded coordinates per tensor (every tensor covered); ``seed``
        seeds sampling and directions (never the user's RNG).
    top_k
        How many of the worst elements each parameter's result lists.
    upcast
        Evaluate float32/float16 parameters (and floating args) in float64 where the backend
        has it, so a float32 backprop is judged to its own precision (the report notes it).
    memory_budget
        Bytes of perturbed parameter copies per stacked call (default 256 MiB).
    progress
        A tqdm bar on stderr for checks that run longer than 2 s. None (default): only when
        stderr is a terminal; False: never; True: always.
    client
        A ``dask.distributed.Client``: the stacked chunks become tasks on its cluster (see
        ``gcbackend.distributed``). The cost and args are sent to each worker once, so they
        must be picklable (a module-level function, or a ``functools.partial`` of one);
        workers need gcbackend installed. The report is the one a local check gives.
        Needs ``pip install 'gcbackend[dask]'``. Paths are chosen here, on the first chunk
        of each tensor, and the workers evaluate the other chunks the same way.
    workers
        Threads that evaluate chunks (batched or looped rows) side by side in this process (1, the default:
        none; -1: one per CPU). For NumPy on a multi-core CPU, whose elementwise operations
        use one core each: the cost is then called from several threads at once, so it
        must not mutate shared state; BLAS is held to one thread per call meanwhile. Each
        thread holds its own chunk, so up to ``workers × memory_budget`` bytes of perturbed
        copies are live. The report equals the one-thread report. Not with ``client=``.

    Returns
    -------
    Report
        ``difference`` (formula (2) over all checked values), ``verdict`` ("pass", "fail",
        "inconclusive"), ``passed``, ``expected``, per-parameter results with top-k elements.
        Each gradient is judged element by element to the precision of its own dtype (see
        ``gcbackend.judge``): kinks against their one-sided slopes, exact zeros as agreement.

    Raises
    ------
    InputError, InputTypeError
        Bad params, grads or options (the message names the parameter and the fix).
    CostError
        The cost raised, returned no scalar, or (``mode="stacked"``/``"vmap"``) its batched
        values differ from single calls; the message names the parameter and the fix.
    BackendUnavailableError
        The backend is not installed or has no usable device.
    """
    prepared = inputs.prepare(
        cost,
        params,
        grads,
        args,
        backend=backend,
        device=device,
        epsilon=epsilon,
        threshold=threshold,
        order=order,
        mode=mode,
        directions=directions,
        sample=sample,
        top_k=top_k,
        upcast=upcast,
        memory_budget=memory_budget,
        client=client,
        workers=workers,
    )
    chosen, parts, moved_args, layout = prepared.backend, prepared.parts, prepared.args, prepared.layout
    epsilon, threshold, budget, notes = prepared.epsilon, prepared.threshold, prepared.budget, prepared.notes
    analytic, xp = prepared.analytic, chosen.xp
    runner = None
    if client is not None:
        from . import distributed  # only here: a check without a client never imports dask

        runner = distributed.runner(client, chosen, cost, moved_args)
    elif (threads := engine.worker_count(int(workers))) > 1:
        runner = engine.ThreadRunner(threads, xp)
        notes.append(f"chunks of rows evaluated on {threads} threads (BLAS on 1 thread each)")
    paths: dict = {}  # tensor → engine.Path, decided once per tensor for the whole check
    notebook = (
        epsilon != "auto" and threshold != "auto" and order == 2 and mode != "directions" and sample is None
    )
    bar = _progress_bar(progress, _rows(parts, notebook, order, mode, directions, sample))
    evaluation = dict(
        layout=layout,
        xp=xp,
        mode="auto" if mode == "directions" else mode,
        memory_budget=budget,
        progress=bar.update,
        runner=runner,
        paths=paths,
    )
    try:
        if notebook:
            # The notebook's way: J(θ ± ε), 2N evaluations, no error bars, its numbers exactly.
            numeric = engine.central_differences(cost, parts, moved_args, epsilon=epsilon, **evaluation)
            estimate, targets, allowance = None, analytic, None
            coverage, evaluations = judge.Coverage("elements"), 2 * layout.size
        else:
            plan = _plan(
                parts,
                analytic,
                chosen,
                dtypes=prepared.dtypes,
                epsilon=epsilon,
                mode=mode,
                directions=directions,
                sample=sample,
                seed=seed,
                notes=notes,
            )
            # A step the user chose is the step used; an automatic one moves closer where a
            # kink is crossed. order=4 takes order 2's step: its error bar (Richardson's
            # |D(h) − D(2h)|/3 measures order 2's truncation, not order 4's) is then no wider
            # than order 2's, and a larger step made order 4 100–1000× less sensitive.
            estimate = differences.estimate(
                cost,
                parts,
                moved_args,
                steps=_steps(parts, epsilon, chosen, prepared.dtypes),
                exact_in=prepared.dtypes,
                order=order,
                refine=differences.REFINE_ROUNDS if epsilon == "auto" else 0,
                elements=plan.elements,
                directions=plan.directions,
                **evaluation,
            )
            numeric, targets, allowance, coverage = (
                estimate.numeric,
                plan.targets,
                plan.allowance,
                plan.coverage,
            )
            evaluations = 4 * plan.rows + 1
            if estimate.refined:
                evaluations += 4 * estimate.refined
                notes.append(
                    f"{estimate.refined} element(s) evaluated again with steps "
                    f"{differences.REFINE_FACTOR:g}× smaller: their truncation error dominated "
                    "(a kink crossed within ±2h, e.g. a ReLU unit changing sign)"
                )
    finally:
        bar.close()
    # A cost that returns Python floats (fine in mode='loop') yields costs on the namespace's
    # default device, not necessarily the one the check runs on.
    numeric = {
        name: value if array_api_compat.device(value) == chosen.device else to_backend(value, chosen)
        for name, value in numeric.items()
    }
    narrow = sorted(
        {
            inputs._dtype_name(value.dtype)
            for name, value in numeric.items()
            if xp.finfo(value.dtype).bits < xp.finfo(parts[name].dtype).bits
        }
    )
    if narrow:  # the cost's own rounding, not the step, limits the finite differences
        notes.append(
            f"the cost returns {'/'.join(narrow)} for {inputs._dtype_name(next(iter(parts.values())).dtype)} "
            "parameters: its rounding limits the finite differences; return J in the parameters' "
            "dtype (or pass a larger epsilon, e.g. epsilon=1e-3)"
        )
    return judge.judge(
        parts,
        targets,
        numeric,
        estimate,
        xp=xp,
        backend=chosen,
        epsilon=epsilon,
        threshold=threshold,
        mode=mode,
        order=order,
        top_k=int(top_k),
        notes=tuple(notes),
        evaluations=evaluations,
        coverage=coverage,
        allowance=allowance,
        grad_dtypes={name: g.dtype for name, g in analytic.items()},
        paths={name: engine.path_of(paths, name) for name in parts},
    )


def _rows(parts, notebook, order, mode, directions, sample) -> int:
    """How many perturbed rows the check will evaluate (the progress bar's total)."""
    if mode == "directions":
        return 4 * directions * len(parts)
    sizes = [math.prod(p.shape) for p in parts.values()]
    if sample is not None:
        sizes = [min(int(sample), n) for n in sizes]
    return (2 if notebook else 4) * sum(sizes)


def _progress_bar(progress: bool | None, total: int) -> Any:
    """A tqdm bar that appears only after 2 s (so quick checks print nothing), on a terminal."""
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped environment just gets no bar
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, delay=2.0, unit="row", desc="gradient check", file=sys.stderr, leave=False)


class _NoBar:
    def update(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


def _steps(parts, epsilon, chosen, dtypes):
    """Per-element steps, exact in each parameter's own dtype (``differences.snap``):
    automatic (order 2's, see check) or the user's epsilon everywhere."""
    xp = chosen.xp
    if epsilon == "auto":
        return differences.auto_steps(parts, order=2, xp=xp, exact_in=dtypes)
    return {
        name: differences.snap(
            p, xp.full(tuple(p.shape), epsilon, dtype=p.dtype, device=chosen.device), dtypes[name], xp
        )
        for name, p in parts.items()
    }


class _Plan(NamedTuple):
    """What the estimate evaluates and what its values are compared with."""

    coverage: judge.Coverage
    targets: dict[str, Any]  # the backprop's values at the compared places
    allowance: dict[str, Any]  # how far the backprop's own rounding may move each of them
    rows: int  # perturbed rows per ±h (the estimate evaluates 4 per row, and J(θ) once)
    elements: dict[str, Any] | None = None  # sampled flat indices per name
    directions: dict[str, Any] | None = None  # name → (k, n) seeded unit directions


def _plan(parts, analytic, chosen, *, dtypes, epsilon, mode, directions, sample, seed, notes) -> _Plan:
    """Every element, a seeded sample per tensor, or seeded unit directions per tensor.
    ``dtypes``: each parameter's own dtype, the coarsest its backprop may be computed in."""
    xp = chosen.xp
    rounding = {
        name: judge.backprop_rounding(g, xp, computed_in=dtypes[name]) for name, g in analytic.items()
    }
    rng = host_random(seed)
    if mode == "directions":
        units, targets, allowance = {}, {}, {}
        for name, part in parts.items():
            size = math.prod(part.shape)
            u = to_backend(rng.standard_normal((directions, size)), chosen, dtype=part.dtype)
            # Unit directions: θ moves by h, as in a coordinate step, whatever the size. A
            # raw Gaussian moves it by h·√n, and a million-element W1 then crosses dozens
            # of ReLU kinks per direction (a false alarm on a correct 1000-1000-1 net).
            units[name] = u / xp.linalg.vector_norm(u, axis=1, keepdims=True)
            grad = xp.reshape(xp.astype(analytic[name], part.dtype), (-1,))
            targets[name] = xp.reshape(units[name] @ grad, (-1,))
            # |uᵀe| ≤ ‖u‖·‖e‖ = ‖e‖ for the backprop's rounding e.
            bound = judge.norm(rounding[name], xp)
            allowance[name] = xp.full((directions,), 1.0, dtype=bound.dtype, device=chosen.device) * bound
        notes.append(
            f"fast screen: {directions} seeded unit Gaussian directions u per tensor (seed={seed}); each "
            "value is the directional derivative uᵀ∇J, and 'direction k' is the k-th of them"
        )
        return _Plan(
            judge.Coverage("directions"), targets, allowance, directions * len(parts), directions=units
        )
    if sample is not None:
        elements, targets, allowance, sampled = {}, {}, {}, {}
        for name, part in parts.items():
            size = math.prod(part.shape)
            sampled[name] = sorted(rng.choice(size, size=min(int(sample), size), replace=False).tolist())
            elements[name] = xp.asarray(sampled[name], dtype=xp.int64, device=chosen.device)
            targets[name] = take(xp.reshape(analytic[name], (-1,)), elements[name], xp)
            allowance[name] = take(xp.reshape(rounding[name], (-1,)), elements[name], xp)
        notes.append(f"sampled check: {sample} element(s) per tensor (seed={seed})")
        rows = sum(len(v) for v in sampled.values())
        return _Plan(judge.Coverage("sample", sampled), targets, allowance, rows, elements=elements)
    rows = sum(math.prod(p.shape) for p in parts.values())
    return _Plan(judge.Coverage("elements"), dict(analytic), rounding, rows)
