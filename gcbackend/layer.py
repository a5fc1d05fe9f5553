"""check_layer(): check one layer's backward pass as layer-by-layer code is written.

Code written layer by layer (CS231n and its many derivatives) has, per layer,

    out, cache = affine_forward(x, w, b)
    dx, dw, db = affine_backward(dout, cache)

and checks it with a vector-Jacobian product: for a random ``dout`` the gradients of
J = Σ out·dout with respect to every input are exactly what ``backward(dout, cache)``
returns. ``check_layer`` draws that ``dout`` (seeded), builds J and hands everything to
``check``, so a layer gets the same evaluation paths, verdicts and report as a whole model.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .backends import host_random, is_array, resolve, to_backend
from .check import check
from .errors import CostError, InputError, InputTypeError
from .report import Report

__all__ = ["check_layer"]


def _input_names(forward: Callable[..., Any], count: int) -> tuple[str, ...]:
    """The names of forward's first ``count`` positional parameters; ``x0``, ``x1``… where it
    has none to give (``*args``, a builtin without a signature)."""
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return tuple(f"x{i}" for i in range(count))
    names: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
        elif parameter.kind is parameter.VAR_POSITIONAL:
            names.extend(f"x{i}" for i in range(len(names), count))
            break
    if len(names) < count:
        raise InputError(
            f"forward takes {len(names)} positional input(s) ({', '.join(names)}) but check_layer "
            f"got {count}; pass the inputs forward(*inputs) takes"
        )
    names = names[:count]
    if len(set(names)) != count:  # pragma: no cover - Python forbids repeated parameter names
        names = [f"x{i}" for i in range(count)]
    return tuple(names)


def _is_checked(value: Any) -> bool:
    """A floating-point array: an input whose gradient backward returns."""
    if not is_array(value):
        return False
    xp = array_api_compat.array_namespace(value)
    return xp.isdtype(value.dtype, "real floating")


def _is_float_out(out: Any) -> bool:
    """A floating-point array, or a NumPy scalar (a loss's ``out``): what J can be built on."""
    if not array_api_compat.is_array_api_obj(out) or isinstance(out, (bool, int, complex)):
        return False
    return array_api_compat.array_namespace(out).isdtype(out.dtype, "real floating")


def _loss_as_array(out: Any, dout: Any) -> Any:
    """A loss returned as a Python float (``float(loss)``, ``loss.item()``) as a 0-d array
    like ``dout``; anything else as it is."""
    if isinstance(out, float):
        xp = array_api_compat.array_namespace(dout)
        return xp.asarray(out, dtype=dout.dtype, device=array_api_compat.device(dout))
    return out


def _out(result: Any) -> Any:
    """``out`` of forward's result: ``out`` itself, or the first of ``(out, cache)``."""
    return result[0] if isinstance(result, tuple) else result


@dataclass(frozen=True)
class LayerCost:
    """J(params, dout, *constants) = Σ forward(inputs)·dout over out's axes.

    ``params`` maps the checked inputs' names to arrays; ``slots`` says, per forward input,
    its name (a checked input) or None (the next constant). A module-level class, so the
    cost pickles for ``client=`` whenever ``forward`` does.

    Where a checked input arrives with a leading batch axis and forward broadcasts over it,
    out has that axis too: J sums only the trailing ``dout.ndim`` axes, so it returns one
    cost per batch entry, as a stacked cost must.
    """

    forward: Callable[..., Any]
    slots: tuple[str | None, ...]

    def __call__(self, params: dict[str, Any], dout: Any, *constants: Any) -> Any:
        # Containers among the constants (a bn_param dict whose running_mean the forward
        # updates, as CS231n's batch norm does, in place or not) are copied per call: one evaluation's state
        # never reaches the next, and a batched or vmapped value never escapes into them.
        remaining = iter(copy.deepcopy(c) if isinstance(c, (dict, list)) else c for c in constants)
        inputs = [params[slot] if slot is not None else next(remaining) for slot in self.slots]
        out = _loss_as_array(_out(self.forward(*inputs)), dout)
        if not array_api_compat.is_array_api_obj(out):
            raise CostError(
                f"forward returned {type(out).__name__} as out; it must return an array "
                "(or a tuple (out, cache) whose first entry is one)"
            )
        xp = array_api_compat.array_namespace(dout)
        product = out * dout
        lead = tuple(product.shape[: product.ndim - dout.ndim])
        return xp.sum(xp.reshape(product, (*lead, -1)), axis=-1)


def check_layer(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    *inputs: Any,
    seed: int = 0,
    **options: Any,
) -> Report:
    """Check one layer's ``backward`` against finite differences of its ``forward``.

    Parameters
    ----------
    forward
        ``forward(*inputs)`` → ``out`` (an array) or ``(out, cache)``. It is called once
        with (copies of) the inputs, then by ``check`` with the floating-point inputs
        perturbed — with a leading batch axis where the evaluation stacks rows, so a forward
        written for one point needs a mode that verifies or avoids that (``mode="loop"``
        always does; see ``check``'s ``mode``).
    backward
        ``backward(dout, cache)`` → the gradients of the floating-point array inputs, in the
        order of the inputs: a tuple or list, or a single array when there is one. With
        forward returning only ``out``, ``cache`` is None.
    *inputs
        The layer's inputs, named after forward's parameters (``x``, ``w``, ``b``; ``x0``,
        ``x1``… for ``*args``). Floating-point arrays are checked; anything else (a
        ``conv_param`` dict, integer labels ``y``, a Python number) is a constant, passed
        to forward unchanged (arrays among them are copied to the backend).
    seed
        Seeds ``dout`` (standard normal, out's shape and dtype, drawn on the host and moved
        to out's library and device) and whatever ``check`` seeds.
    **options
        As ``check``: ``backend``, ``device``, ``epsilon``, ``threshold``, ``mode``, …

    Returns
    -------
    Report
        As ``check``'s; ``report.parameters`` and ``report.faults`` use the input names.

    Raises
    ------
    InputError, InputTypeError
        No floating-point input; backward returned the wrong number of gradients.
    CostError
        forward or backward raised, or forward's out is not an array.
    """
    if not callable(forward) or not callable(backward):
        raise InputTypeError(
            "check_layer(forward, backward, *inputs) needs two callables: forward(*inputs) → out "
            "or (out, cache), and backward(dout, cache) → the input gradients"
        )
    names = _input_names(forward, len(inputs))
    checked = tuple(name for name, value in zip(names, inputs) if _is_checked(value))
    if not checked:
        raise InputError(
            f"none of forward's inputs ({', '.join(names) or 'none'}) is a floating-point array, "
            "so there is no gradient to check; pass the layer's inputs as float arrays"
        )
    # The user's arrays are never modified: forward and backward see copies.
    own = tuple(_copy(value) for value in inputs)
    try:
        result = forward(*own)
    except Exception as exc:
        raise CostError(f"forward(*inputs) raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, tuple) and len(result) != 2:
        raise InputError(
            f"forward returned a tuple of {len(result)}; check_layer needs out or (out, cache): "
            "wrap a forward with several outputs so that it returns one out (e.g. the outputs "
            "concatenated) and its backward splits dout back"
        )
    out = _out(result)
    if isinstance(out, float):  # a loss returned as float(loss) or loss.item()
        first = next(value for name, value in zip(names, inputs) if name in checked)
        out = to_backend(out, resolve(None, [first]), dtype=first.dtype)
    if not _is_float_out(out):
        raise CostError(
            f"forward returned {out.dtype if is_array(out) else type(out).__name__} as out; "
            "check_layer needs a floating-point array (or a tuple (out, cache) starting with one)"
        )
    cache = result[1] if isinstance(result, tuple) else None
    library = resolve(None, [out])
    dout = to_backend(host_random(seed).standard_normal(tuple(out.shape)), library, dtype=out.dtype)
    try:
        returned = backward(_copy(dout), cache)
    except Exception as exc:
        raise CostError(f"backward(dout, cache) raised {type(exc).__name__}: {exc}") from exc
    grads = (returned,) if is_array(returned) else returned
    if not isinstance(grads, (tuple, list)) or len(grads) != len(checked):
        got = f"{len(grads)} gradient(s)" if isinstance(grads, (tuple, list)) else type(returned).__name__
        raise InputError(
            f"backward returned {got}, but forward has {len(checked)} floating-point input(s) "
            f"({', '.join(checked)}); return their gradients in that order (one array when there "
            "is one), and pass inputs that are not differentiated as non-float values"
        )
    params = {name: value for name, value in zip(names, inputs) if name in checked}
    constants = tuple(value for name, value in zip(names, inputs) if name not in checked)
    slots = tuple(name if name in checked else None for name in names)
    cost = LayerCost(forward, slots)
    if options.get("backend") is None:
        # The library of the checked inputs, not of the constants: NumPy labels next to torch
        # inputs are moved to torch (as check() moves every array arg), not refused as a mix.
        try:
            options["backend"] = array_api_compat.array_namespace(*params.values())
        except TypeError:
            pass  # checked inputs of several libraries: check() says so
    return check(cost, params, dict(zip(checked, grads)), dout, *constants, seed=seed, **options)


def _copy(value: Any) -> Any:
    """A fresh copy of an array (any library), a shallow copy of a dict or list constant
    (a bn_param the forward writes its running mean into, arrays inside it too), anything else
    as it is."""
    if isinstance(value, (dict, list)):
        return copy.deepcopy(value)
    if not is_array(value):
        return value
    return to_backend(value, resolve(None, [value]))
