"""check(): compare a backward pass's gradients with central finite differences, and judge them."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from . import evaluation, inputs, judge, ladder, plan
from .backends import to_backend
from .evaluator import Evaluator
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
        ``"auto"`` (default): a step per element from the dtype and |θ|, and an error bar per
        element measured from the same evaluations: J at ±h for every element, ±2h and
        further steps only where ±h does not settle it, J(θ) twice and 32 rows measuring J's
        rounding (≈ 2N + 40 on a smooth cost; 4N + 34 where θ fits one call). Numbers: the notebook's way,
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
        Bytes the rows being evaluated may hold at once (default 256 MiB): each row of a
        stacked call counts ``evaluation.ROW_FOOTPRINT`` (4) row-sized arrays (its perturbed
        copy, its displacement and their product, a drawn screen direction), and threads
        share it. Beyond it a check holds a few copies of the parameters' size (its own θ,
        gradients and data, never the user's) and the cost's own temporaries for one call
        (README: what memory_budget bounds). Below one perturbed copy of a parameter: an
        InputError.
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
        must not mutate shared state; BLAS is held to one thread per call meanwhile. The
        threads share ``memory_budget`` (each holds its own chunk), and no more of them run
        than chunks of the largest parameter's rows fit it side by side (the report says so).
        The report equals the one-thread report. Not with ``client=``.

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
    planned = plan.plan(
        prepared,
        epsilon=prepared.epsilon,
        threshold=prepared.threshold,
        order=order,
        mode=mode,
        directions=directions,
        sample=sample,
        seed=seed,
    )
    evaluate = Evaluator(cost, prepared, planned, mode=mode, client=client, workers=workers, seed=seed)
    notes = list(prepared.notes) + evaluate.notes
    bar = _progress_bar(progress)
    evaluate.progress = bar.update
    try:
        # The notebook's plan needs no J(θ): its 2N evaluations are the notebook's own.
        centre = math.nan if planned.notebook else evaluate.centre()
        staircase = ladder.Ladder(planned, centre, seed=seed)
        while (request := staircase.next()) is not None:
            bar.total = (bar.total or 0) + evaluate.rows(request)  # the staircase decides as it goes
            costs, steps = evaluate(request)
            staircase.take(request, costs, steps)
            staircase.set_discrepancy(evaluate.discrepancies())
        # A random cost (a fresh dropout mask per call) shows in J(θ) evaluated again.
        again = centre if planned.notebook else evaluate.centre()
    finally:
        bar.close()
    estimate = staircase.result()
    notes.extend(_notes(planned, estimate, evaluate, seed=seed, directions=directions, sample=sample))
    return judge.judge(
        planned,
        estimate,
        backend=prepared.backend,
        analytic=_compared(prepared, planned),
        grad_dtypes={name: inputs._dtype_name(g.dtype) for name, g in prepared.analytic.items()},
        epsilon=prepared.epsilon,
        threshold=prepared.threshold,
        mode=mode,
        top_k=int(top_k),
        notes=tuple(notes),
        evaluations=staircase.evaluations + (0 if planned.notebook else 2),
        paths={name: evaluation.path_of(evaluate.paths, name) for name in prepared.parts},
        random=None if _same(centre, again, planned.eval_eps) else (centre, again),
    )


def _same(first: float, second: float, eps: float) -> bool:
    """J(θ) twice, equal up to a few ulps (a GPU's sums may be reordered between calls)."""
    return (
        first == second or math.isnan(first) or abs(first - second) <= 8 * eps * max(abs(first), abs(second))
    )


def _compared(prepared: inputs.Prepared, planned: plan.Plan) -> dict[str, Any]:
    """What each parameter's analytic side is: the gradient, a sample of it (flat), or uᵀg."""
    if planned.coverage.kind == "elements":
        return dict(prepared.analytic)
    return {
        name: to_backend(planned.target[planned.where(k)], prepared.backend)
        for k, name in enumerate(planned.names)
    }


def _notes(planned, estimate, evaluate, *, seed, directions, sample) -> list[str]:
    notes = []
    if planned.coverage.kind == "directions":
        notes.append(
            f"fast screen: {directions} seeded unit Gaussian directions u per tensor (seed={seed}); each "
            "value is the directional derivative uᵀ∇J, and 'direction k' is the k-th of them"
        )
    elif planned.coverage.kind == "sample":
        notes.append(f"sampled check: {sample} element(s) per tensor (seed={seed})")
    if evaluate.narrow:
        notes.append(
            f"the cost returns {'/'.join(evaluate.narrow)} for {evaluate.wide} parameters: its rounding "
            "limits the finite differences; return J in the parameters' dtype (or pass a larger epsilon, "
            "e.g. epsilon=1e-3)"
        )
    moved = estimate.moved
    if moved.get("smaller"):
        notes.append(
            f"{moved['smaller']} value(s) evaluated again at smaller steps (a kink crossed within ±2h or "
            "confirmed at θ, J not finite, or two steps that disagreed)"
        )
    if moved.get("larger"):
        notes.append(f"{moved['larger']} value(s) evaluated again at larger steps (J's rounding dominated)")
    if moved.get("confirm"):
        notes.append(
            f"{moved['confirm']} value(s) found off evaluated again at another step: a fail rests on "
            "two steps that agree"
        )
    return notes


def _progress_bar(progress: bool | None) -> Any:
    """A tqdm bar that appears only after 2 s (so quick checks print nothing), on a terminal; its
    total grows with every stage the staircase asks for."""
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped environment just gets no bar
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=0, delay=2.0, unit="row", desc="gradient check", file=sys.stderr, leave=False)


class _NoBar:
    total = 0

    def update(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass
