"""check_in_place: a cost that reads its parameters from where they live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ..backends import is_array
from ..check import check
from ..errors import CostError, InputError, InputTypeError
from ..params import flatten_tree
from ..report import Report
from ._common import fresh_copy, with_notes

__all__ = ["check_in_place"]


@dataclass(frozen=True, eq=False)
class InPlaceCost:
    """J(params, *args) = loss(*args) after writing ``params`` into ``targets``, the very
    arrays loss reads (a flat list in ``flatten_tree`` order)."""

    loss: Callable[..., Any]
    targets: tuple[Any, ...]

    def __call__(self, params: Any, *args: Any) -> Any:
        for target, value in zip(self.targets, flatten_tree(params).leaves):
            _write(target, value)
        value = self.loss(*args)
        if isinstance(value, tuple):
            raise CostError(
                f"loss(*args) returned a tuple of {len(value)} (CS231n's net.loss(X, y) returns "
                "(loss, grads)); pass a loss that returns J alone, e.g. lambda X, y: net.loss(X, y)[0]"
            )
        # A PyTorch loss of parameters that require grad returns J in an autograd graph.
        return value.detach() if array_api_compat.is_torch_array(value) else value


def _write(target: Any, value: Any) -> None:
    """``target[...] = value`` in place (PyTorch: without recording it in autograd)."""
    if array_api_compat.is_torch_array(target):
        import torch

        with torch.no_grad():
            target.copy_(value)
        return
    target[...] = value


def check_in_place(
    loss: Callable[..., Any],
    params: Any,
    grads: Any,
    *args: Any,
    **options: Any,
) -> Report:
    """Check ``grads`` for a cost that reads its parameters from where they live.

    A model object whose ``net.loss(X, y)`` reads ``net.params`` never sees parameters
    handed to a cost. Here each perturbation is written into the arrays of ``params``
    themselves, ``loss(*args)`` is called, and at the end — also after an exception or a
    KeyboardInterrupt in ``loss`` — every array is restored bit for bit. One row per call
    (``mode='loop'``; the report notes it).

    Parameters
    ----------
    loss
        ``loss(*args)`` → the scalar J, reading the arrays of ``params`` (no parameter
        argument), e.g. ``lambda X, y: net.loss(X, y)[0]``.
    params
        The very arrays ``loss`` reads: a mapping name → array (``net.params``), a tree of
        them, or one array. Writable arrays (NumPy, CuPy, PyTorch; not JAX, whose arrays
        are immutable). Evaluated in their own dtype (``upcast`` does not apply).
    grads
        The same structure; keys ``"W1"`` or ``"dW1"``, as ``check`` accepts.
    *args
        Passed to ``loss`` (arrays among them copied by ``check``).
    **options
        As ``check``'s, except ``mode`` (only ``"loop"``), ``workers``, ``client`` and
        ``upcast=True`` (a loss reading shared arrays cannot be called from several threads
        or processes at once, nor in float64).

    Returns
    -------
    Report
        As ``check``'s.

    Raises
    ------
    InputError, InputTypeError
        An option that cannot apply; a leaf of params that is not a writable array.
    CostError
        loss raised or returned no scalar (params restored all the same).
    """
    if not callable(loss):
        raise InputTypeError(
            f"check_in_place(loss, params, grads, *args) needs a callable loss, not {loss!r}"
        )
    if options.get("mode", "loop") != "loop":
        raise InputError(
            f"mode={options['mode']!r}: check_in_place writes each perturbation into your arrays and calls "
            "loss once per row, so it runs mode='loop' only; for a faster check, write a cost that takes "
            "the parameters (cost(params, *args)) and use gc.check"
        )
    if options.get("workers", 1) != 1 or options.get("client") is not None:
        raise InputError(
            "check_in_place writes into the arrays loss reads, so loss cannot run on several threads "
            "or Dask workers at once: drop workers= and client="
        )
    if options.get("upcast", False):
        raise InputError(
            "upcast=True cannot apply to check_in_place: the perturbations are written into your "
            "arrays, which keep their dtype; cast them to float64 first to evaluate in float64"
        )
    options.update(mode="loop", upcast=False)
    tree = flatten_tree(params)
    saved = []
    for name, leaf in zip(tree.names, tree.leaves):
        if not is_array(leaf):
            raise InputTypeError(
                f"params[{name!r}] is {type(leaf).__name__}; check_in_place writes each perturbation "
                "into the arrays loss reads, so every parameter must be an array"
            )
        copy = fresh_copy(leaf)
        try:
            _write(leaf, copy)  # the same values: only whether it can be written is tested
        except Exception as exc:
            raise InputTypeError(
                f"params[{name!r}] cannot be written in place ({type(exc).__name__}: {exc}); "
                "check_in_place needs writable arrays (NumPy, CuPy, PyTorch; JAX arrays are immutable: "
                "give gc.check a cost that takes the parameters)"
            ) from exc
        saved.append(copy)
    cost = InPlaceCost(loss, tuple(tree.leaves))
    try:
        report = check(cost, params, grads, *args, **options)
    finally:
        for leaf, copy in zip(tree.leaves, saved):
            _write(leaf, copy)
    return with_notes(
        report,
        [
            "evaluated in place: each perturbation was written into your arrays before loss(*args) "
            "read them, one row per call (mode='loop'); they were restored bit for bit after"
        ],
    )
