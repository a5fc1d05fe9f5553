"""check_function, check_module, check_in_place: check what users already have.

Three thin entry points over ``check``. Each builds a cost, its parameters and their
gradients from what the user holds, and hands them to ``check``; none evaluates or judges
anything itself.

* ``check_function(fn, *inputs)``: the backward pass of a PyTorch or JAX function (a custom
  ``torch.autograd.Function``'s ``apply``, a ``jax.custom_vjp``, anything built from tensors),
  through J = Σ over outputs of ⟨out, dout⟩ for seeded cotangents ``dout``: the gradients are
  the framework's own vector-Jacobian product at the inputs as given, so a float32 or float16
  backward is judged to its own precision while J is evaluated in float64.
* ``check_module(module, *inputs)``: a ``torch.nn.Module``'s parameters, evaluated through
  ``torch.func.functional_call`` so the module is never modified.
* ``check_in_place(loss, params, grads, *args)``: a cost that reads its parameters from where
  they live (a CS231n ``net.loss(X, y)`` reading ``net.params``): each perturbation is written
  into those arrays and restored.

PyTorch and JAX are imported only when an entry point needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import array_api_compat
import optree

from .backends import host_random, is_array, resolve, to_backend
from .check import check
from .errors import CostError, InputError, InputTypeError
from .params import flatten_tree
from .report import Report

__all__ = ["JVP_DIRECTIONS", "check_function", "check_in_place", "check_module"]

JVP_DIRECTIONS = 4
"""Seeded unit directions per input along which a forward-mode rule is checked."""


def jvp_name(name: str) -> str:
    """The parameter that carries input ``name``'s forward-mode check: ``jvp(x)``."""
    return f"jvp({name})"


# --------------------------------------------------------------------------- shared pieces


def _floating(value: Any) -> bool:
    """A real floating-point array (of any library): an input whose gradient is checked."""
    if not is_array(value):
        return False
    return array_api_compat.array_namespace(value).isdtype(value.dtype, "real floating")


def _complex(value: Any) -> bool:
    return is_array(value) and array_api_compat.array_namespace(value).isdtype(
        value.dtype, "complex floating"
    )


def _leaves(out: Any) -> list[Any]:
    """The leaves of a function's result (an array, or a tuple/list/dict/NamedTuple of them)."""
    return optree.tree_flatten(out, none_is_leaf=False)[0]


def _picked(out: Any, outputs: tuple[int, ...]) -> list[Any]:
    leaves = _leaves(out)
    return [leaves[i] for i in outputs]


def _inner_product(outs: list[Any], douts: tuple[Any, ...] | list[Any]) -> Any:
    """Σ_k ⟨out_k, dout_k⟩ over each dout's axes; leading (batch) axes of out are kept, so a
    batched evaluation returns one J per batch entry, as a stacked cost must."""
    total = None
    for out, dout in zip(outs, douts):
        xp = array_api_compat.array_namespace(out, dout)
        product = out * dout
        lead = tuple(product.shape[: product.ndim - dout.ndim])
        term = xp.sum(xp.reshape(product, (*lead, -1)), axis=-1)
        total = term if total is None else total + term
    return total


def _cotangents(outs: list[Any], rng: Any) -> list[Any]:
    """One seeded standard normal ``dout`` per output, in its shape, dtype and device."""
    return [
        to_backend(rng.standard_normal(tuple(out.shape)), resolve(None, [out]), dtype=out.dtype)
        for out in outs
    ]


def _directions(value: Any, rng: Any) -> Any:
    """(k, n) seeded unit Gaussian directions for one input, in its dtype and device."""
    size = math.prod(tuple(value.shape))
    count = min(JVP_DIRECTIONS, size)
    rows = rng.standard_normal((count, size))
    rows /= (rows**2).sum(axis=1, keepdims=True) ** 0.5
    return to_backend(rows, resolve(None, [value]), dtype=value.dtype)


def _function_class(fn: Any) -> Any:
    """The ``torch.autograd.Function`` subclass whose ``apply`` fn is, or None."""
    owner = getattr(fn, "__self__", None)
    torch = sys.modules.get("torch")  # a Function exists only where torch is imported already
    if torch is not None and isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return owner
    return None


def _signature_owner(fn: Any) -> tuple[Any, bool]:
    """The callable whose signature names fn's inputs, and whether its first parameter is a
    ctx to drop: a custom Function's ``forward`` for ``Function.apply`` (old style:
    ``forward(ctx, ...)``), a module's ``forward``, else fn itself."""
    cls = _function_class(fn)
    if cls is not None:
        import torch

        return cls.forward, cls.setup_context is torch.autograd.Function.setup_context
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(fn, torch.nn.Module):
        return fn.forward, False
    return fn, False


def _input_names(fn: Callable[..., Any], count: int, entry: str) -> tuple[str, ...]:
    """fn's positional parameter names for ``count`` inputs; ``args[i]`` (after the name of a
    ``*args`` parameter) for the rest. A ``Function.apply`` is named after its ``forward``."""
    owner, takes_ctx = _signature_owner(fn)
    try:
        signature = inspect.signature(owner)
    except (TypeError, ValueError):
        return tuple(f"args[{i}]" for i in range(count))
    parameters = list(signature.parameters.values())[1 if takes_ctx else 0 :]
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
        elif parameter.kind is parameter.VAR_POSITIONAL:
            names.extend(f"{parameter.name}[{i}]" for i in range(count - len(names)))
            break
    if len(names) < count:
        raise InputError(
            f"fn takes {len(names)} positional input(s) ({', '.join(names) or 'none'}) but {entry} got "
            f"{count}; pass the inputs fn(*inputs) takes"
        )
    return tuple(names[:count])


def _with_notes(report: Report, notes: list[str]) -> Report:
    return dataclasses.replace(report, notes=(*report.notes, *notes)) if notes else report


_DTYPE_WORDS = re.compile(r"Double|Float|Half|BFloat16|dtype|scalar type", re.IGNORECASE)


def _upcast_failure(error: CostError, low: list[str], what: str, hint: str) -> CostError | None:
    """A clearer error for a cost that failed only because the check evaluated it in float64
    (``upcast=True``): a float32 tensor the upcast could not reach met a float64 one."""
    cause = error.__cause__ or error
    if not low or not _DTYPE_WORDS.search(str(cause)):
        return None
    return CostError(
        f"{what} failed when evaluated in float64: {type(cause).__name__}: {str(cause).strip()}. "
        f"The check evaluates {'/'.join(low)} inputs in float64 (upcast=True, the default), so that "
        f"a {'/'.join(low)} backward is judged against exact finite differences. {hint}"
    )


def _low_precision(values: list[Any]) -> list[str]:
    low = set()
    for value in values:
        if _floating(value):
            xp = array_api_compat.array_namespace(value)
            if xp.finfo(value.dtype).bits < 64:
                low.add(str(value.dtype).split(".")[-1])
    return sorted(low)


def _copy(value: Any) -> Any:
    """A fresh copy of an array (detached from any autograd graph), anything else as it is."""
    return to_backend(value, resolve(None, [value])) if is_array(value) else value


# --------------------------------------------------------------------------- PyTorch helpers


def _refuse_threads(options: dict[str, Any], entry: str) -> None:
    """PyTorch's RNG is process-global: the state pinned around each call (and restored
    after it) would race between threads, so a PyTorch check runs its calls one at a time."""
    if options.get("workers", 1) != 1:
        raise InputError(
            f"workers={options['workers']!r}: {entry} pins PyTorch's global RNG state around every call, "
            "which threads would race on (and PyTorch already runs each call on its own threads); "
            "drop workers="
        )


def _import_torch(entry: str) -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a test dependency
        raise InputError(f"{entry} needs PyTorch (pip install 'gcbackend[torch]'): {exc}") from exc
    return torch


def _cuda_devices(tensors: list[Any]) -> tuple[int, ...]:
    return tuple(
        sorted({t.device.index or 0 for t in tensors if is_array(t) and getattr(t, "is_cuda", False)})
    )


@contextlib.contextmanager
def _pinned_rng(seed: int, cuda: tuple[int, ...]) -> Iterator[None]:
    """PyTorch's global RNG forked and seeded: a random forward (dropout) draws the same
    numbers on every call, and the user's RNG state is what it was afterwards."""
    import torch

    with torch.random.fork_rng(devices=list(cuda)):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def _torch_evaluation(seed: int, cuda: tuple[int, ...]) -> Iterator[None]:
    import torch

    with torch.no_grad(), _pinned_rng(seed, cuda):
        yield


def _forward_rules(outs: list[Any]) -> list[str]:
    """Custom ``autograd.Function`` classes in the graph of ``outs`` that define ``jvp``."""
    import torch

    base = torch.autograd.Function.jvp
    found: list[str] = []
    seen: set[int] = set()
    stack = [out.grad_fn for out in outs if getattr(out, "grad_fn", None) is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls.jvp is not base and cls.__name__ not in found:
            found.append(cls.__name__)
        stack.extend(child for child, _ in node.next_functions)
    return found


# --------------------------------------------------------------------------- check_function


@dataclass(frozen=True)
class Backward:
    """What a framework's own autodiff gave at the inputs: cotangents, gradients, and the
    forward-mode values ⟨dout, J·v_k⟩ along seeded directions v_k (name → (directions, values))."""

    outputs: tuple[int, ...]
    douts: list[Any]
    grads: dict[str, Any]
    forward: dict[str, tuple[Any, Any]]
    notes: list[str]


@dataclass(frozen=True)
class FunctionCost:
    """J(params, *douts, *directions, *constants) = Σ_k ⟨fn(inputs)_k, dout_k⟩.

    ``slots`` says, per fn input, its parameter name or None (the next constant);
    ``outputs`` which leaves of fn's result carry a dout; ``turns`` the (name, shape) of each
    input whose forward-mode rule is checked: that input is x + reshape(t @ V), t the
    parameter ``jvp(name)`` (zero at θ) and V its directions. ``rng``: PyTorch's
    (seed, CUDA devices) to pin on every call; None for JAX. A module-level class, hashable,
    so JAX compiles its vmapped form once per fn.
    """

    fn: Callable[..., Any]
    slots: tuple[str | None, ...]
    outputs: tuple[int, ...]
    turns: tuple[tuple[str, tuple[int, ...]], ...] = ()
    rng: tuple[int, tuple[int, ...]] | None = None

    def __call__(self, params: dict[str, Any], *args: Any) -> Any:
        count, turned = len(self.outputs), len(self.turns)
        douts, directions, constants = args[:count], args[count : count + turned], args[count + turned :]
        values = dict(params)
        for (name, shape), rows in zip(self.turns, directions):
            t = params[jvp_name(name)]
            xp = array_api_compat.array_namespace(t, rows)
            values[name] = values[name] + xp.reshape(t @ rows, (*t.shape[:-1], *shape))
        remaining = iter(constants)
        inputs = [values[slot] if slot is not None else next(remaining) for slot in self.slots]
        context = _torch_evaluation(*self.rng) if self.rng is not None else contextlib.nullcontext()
        with context:
            out = self.fn(*inputs)
        return _inner_product(_picked(out, self.outputs), douts)


def check_function(
    fn: Callable[..., Any],
    *inputs: Any,
    seed: int = 0,
    jvp: bool | None = None,
    **options: Any,
) -> Report:
    """Check the backward pass of a PyTorch or JAX function against finite differences.

    J = Σ over fn's floating outputs of ⟨out, dout⟩, for a seeded standard normal cotangent
    ``dout`` per output; the gradients checked are the framework's own vector-Jacobian
    product at the inputs as given (``torch.autograd.grad``, ``jax.vjp``), which runs
    ``MyFunction.backward`` or a ``jax.custom_vjp``'s bwd. ``check`` then evaluates J at
    perturbed inputs: with the defaults (``upcast=True``) in float64, so a float32 or float16
    backward is judged to its own precision against exact finite differences.

    Parameters
    ----------
    fn
        ``fn(*inputs)`` → an array, or a tuple/list/dict of arrays (outputs that are not
        floating, such as argmax indices, carry no dout). Anything built from tensors:
        ``MyFunction.apply``, a ``jax.custom_vjp`` or ``jax.custom_jvp``, a composition.
        A function that runs only in float32 (a Triton or CUDA kernel) needs ``upcast=False``.
    *inputs
        torch tensors or JAX arrays (one library), named after fn's parameters (``x``,
        ``weight``; ``args[0]``… for ``*args``; a ``Function.apply`` after its ``forward``).
        Floating arrays are the parameters checked, except in PyTorch where some input has
        ``requires_grad=True``: then exactly those are (as gradcheck does), and other floating
        tensors are constants. Integers, booleans, None, index tensors are constants.
        Never modified: fn receives copies.
    seed
        Seeds the cotangents (drawn on the host, the same on every backend), the directions
        of the forward-mode check, the RNG state a random PyTorch forward runs under (see
        below), and whatever ``check`` seeds.
    jvp
        The forward-mode rule (a ``jax.custom_jvp``, a ``torch.autograd.Function`` with
        ``jvp``): ``None`` (default) checks it where fn defines one (found in the autograd
        graph or the jaxpr), ``True`` always (the framework's forward mode, an error where it
        has none), ``False`` never. Each checked input x gets a parameter ``jvp(x)``, t of
        shape (k,) (k = min(4, x.size) seeded unit directions v_i): J is evaluated at
        x + Σ t_i·v_i, so ∂J/∂t_i = ⟨dout, J_fn·v_i⟩, whose analytic value is the forward-mode
        tangent along v_i projected on dout. A wrong rule fails ``jvp(x)`` at direction i.
    **options
        As ``check``: ``backend``, ``device``, ``epsilon``, ``mode``, ``upcast``, ….

    A PyTorch fn is evaluated (every call, and the gradient) under one RNG state,
    ``torch.manual_seed(seed)`` in a forked RNG, so a random forward is one deterministic
    function; the report notes when fn is random, and your RNG state is unchanged.

    Returns
    -------
    Report
        As ``check``'s; parameters are the checked inputs by name, then ``jvp(name)``.

    Raises
    ------
    InputError, InputTypeError
        Inputs of no or two frameworks, no floating input, complex inputs, too many inputs.
    CostError
        fn raised (at the inputs, or when evaluated in float64: the message says how to
        keep it in its own precision).
    """
    if not callable(fn):
        raise InputTypeError(f"check_function(fn, *inputs) needs a callable fn, not {type(fn).__name__}")
    framework = _framework(inputs)
    names = _input_names(fn, len(inputs), "check_function")
    for name, value in zip(names, inputs):
        if _complex(value):
            raise InputTypeError(
                f"input {name!r} is complex ({value.dtype}); check_function checks real floating "
                "inputs: pass the real and imaginary parts as two real inputs"
            )
    checked = _checked_inputs(framework, names, inputs)
    if not checked:
        raise InputError(
            f"none of fn's inputs ({', '.join(names)}) is a floating-point tensor, so there is no "
            "gradient to check; pass the inputs to differentiate as float tensors"
        )
    slots = tuple(name if name in checked else None for name in names)
    rng = host_random(seed)
    if framework == "torch":
        _refuse_threads(options, "check_function")
        backward = _torch_backward(fn, inputs, slots, rng, seed, jvp)
        pinned = (seed, _cuda_devices(list(inputs)))
    else:
        backward = _jax_backward(fn, inputs, slots, rng, jvp)
        pinned = None
    turns = tuple((name, tuple(inputs[names.index(name)].shape)) for name in backward.forward)
    cost = FunctionCost(fn, slots, backward.outputs, turns, pinned)
    params = {name: value for name, value in zip(names, inputs) if name in checked}
    grads = dict(backward.grads)
    directions = []
    for name, (rows, values) in backward.forward.items():
        xp = array_api_compat.array_namespace(values)
        params[jvp_name(name)] = xp.zeros(
            tuple(values.shape), dtype=values.dtype, device=array_api_compat.device(values)
        )
        grads[jvp_name(name)] = values
        directions.append(rows)
    constants = tuple(value for name, value in zip(names, inputs) if name not in checked)
    if options.get("backend") is None:
        options["backend"] = array_api_compat.array_namespace(*params.values())
    notes = list(backward.notes)
    if backward.forward:
        counts = ", ".join(f"{rows.shape[0]} for {name}" for name, (rows, _) in backward.forward.items())
        notes.append(
            f"{', '.join(map(jvp_name, backward.forward))}: fn's forward-mode rule along seeded unit "
            f"directions v ({counts}): the tangent J·v projected on dout, against the central "
            "difference of J(x + t·v); jvp(x)[i] is direction i"
        )
    try:
        report = check(cost, params, grads, *backward.douts, *directions, *constants, seed=seed, **options)
    except CostError as error:
        better = (
            _upcast_failure(
                error,
                _low_precision(list(params.values())),
                "fn(*inputs)",
                "If fn runs only in its own precision (a Triton or CUDA kernel, a float32-only op), "
                "pass upcast=False; if it creates float32 tensors itself (torch.ones(n), "
                "torch.tensor(0.5)), create them in the input's dtype (dtype=x.dtype).",
            )
            if options.get("upcast", True)
            else None
        )
        if better is None:
            raise
        raise better from error.__cause__
    return _with_notes(report, notes)


def _framework(inputs: tuple[Any, ...]) -> str:
    torch_inputs = [i for i, x in enumerate(inputs) if array_api_compat.is_torch_array(x)]
    jax_inputs = [i for i, x in enumerate(inputs) if array_api_compat.is_jax_array(x)]
    if torch_inputs and jax_inputs:
        raise InputTypeError(
            "check_function got torch tensors and JAX arrays together; pass the inputs of one "
            "framework (the one fn is written in)"
        )
    if torch_inputs:
        return "torch"
    if jax_inputs:
        return "jax"
    kinds = sorted({type(x).__module__.split(".")[0] for x in inputs if is_array(x)}) or ["no arrays"]
    raise InputTypeError(
        f"check_function checks a PyTorch or JAX function's own backward, but its inputs are "
        f"{', '.join(kinds)}; pass torch tensors (torch.as_tensor(x)) or JAX arrays (jnp.asarray(x)). "
        "For a NumPy forward/backward pair use gc.check_layer(forward, backward, *inputs)"
    )


def _checked_inputs(framework: str, names: tuple[str, ...], inputs: tuple[Any, ...]) -> tuple[str, ...]:
    floating = [(name, value) for name, value in zip(names, inputs) if _floating(value)]
    if framework == "torch" and any(value.requires_grad for _, value in floating):
        return tuple(name for name, value in floating if value.requires_grad)
    return tuple(name for name, _ in floating)


def _floating_outputs(out: Any, what: str) -> tuple[int, ...]:
    leaves = _leaves(out)
    outputs = tuple(i for i, leaf in enumerate(leaves) if _floating(leaf))
    if not outputs:
        kinds = ", ".join(type(leaf).__name__ for leaf in leaves) or "nothing"
        raise CostError(
            f"{what} returned {kinds}, no floating-point array; check_function needs fn to return "
            "an array (or a tuple/list/dict of them) that depends on the inputs"
        )
    return outputs


def _torch_backward(fn, inputs, slots, rng, seed, jvp) -> Backward:
    import torch

    cuda = _cuda_devices(list(inputs))
    own = [
        _copy(value).requires_grad_(True) if slot is not None else _copy(value)
        for slot, value in zip(slots, inputs)
    ]
    leaves = {slot: own[i] for i, slot in enumerate(slots) if slot is not None}
    try:
        with _pinned_rng(seed, cuda):
            out = fn(*own)
    except Exception as exc:
        raise CostError(f"fn(*inputs) raised {type(exc).__name__}: {exc}") from exc
    outputs = _floating_outputs(out, "fn(*inputs)")
    outs = _picked(out, outputs)
    douts = _cotangents(outs, rng)
    notes: list[str] = []
    differentiable = [(o, d) for o, d in zip(outs, douts) if o.requires_grad]
    if differentiable:
        try:
            found = torch.autograd.grad(
                [o for o, _ in differentiable],
                list(leaves.values()),
                grad_outputs=[d for _, d in differentiable],
                allow_unused=True,
            )
        except Exception as exc:
            raise CostError(f"fn's backward raised {type(exc).__name__}: {exc}") from exc
    else:
        found = (None,) * len(leaves)
        notes.append(
            "no output of fn requires grad: autograd does not connect it to the inputs (a .detach(), "
            ".numpy() or torch.no_grad() inside fn?); its gradients were taken as zero"
        )
    grads, missing = {}, []
    for (name, leaf), grad in zip(leaves.items(), found):
        if grad is None:
            missing.append(name)
            grad = torch.zeros_like(leaf)
        grads[name] = grad.detach()
    if missing and differentiable:
        notes.append(
            f"autograd gave no gradient for {', '.join(missing)} (None): checked as zero; if "
            f"{'it is a constant' if len(missing) == 1 else 'they are constants'}, set requires_grad=True "
            "on the inputs to check and leave the others without it"
        )
    if _random(fn, own, outputs, douts, seed, cuda):
        notes.append(
            f"fn's forward is random (its outputs differ between two RNG seeds: dropout?): every "
            f"evaluation and the gradient ran under one RNG state, torch.manual_seed({seed}) in a forked "
            "RNG, so J is one deterministic function; your RNG state is unchanged"
        )
    rules = _forward_rules(outs)
    forward: dict[str, tuple[Any, Any]] = {}
    if jvp or (jvp is None and rules):
        try:
            forward = {
                name: _torch_tangents(fn, own, slots, name, outputs, douts, rng, seed, cuda)
                for name in leaves
            }
        except Exception as exc:
            if jvp:
                raise InputError(
                    f"jvp=True: fn's forward-mode derivative failed: {type(exc).__name__}: {exc}"
                ) from exc
            notes.append(
                f"{', '.join(rules)} define(s) jvp, but forward-mode AD through fn failed "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}): forward mode not checked"
            )
    return Backward(outputs, douts, grads, forward, notes)


def _random(fn, own, outputs, douts, seed, cuda) -> bool:
    """Whether fn's outputs differ between two RNG seeds (a random forward)."""
    import torch

    inputs = [value.detach() if is_array(value) else value for value in own]
    values = []
    for pinned in (seed, seed + 1):
        with torch.no_grad(), _pinned_rng(pinned, cuda):
            values.append(_picked(fn(*inputs), outputs))
    return any(not torch.equal(a, b) for a, b in zip(*values))


def _torch_tangents(fn, own, slots, name, outputs, douts, rng, seed, cuda) -> tuple[Any, Any]:
    """⟨dout, J·v_k⟩ by PyTorch's forward-mode AD, along seeded directions v_k of input ``name``."""
    import torch
    import torch.autograd.forward_ad as fwad

    where = slots.index(name)
    value = own[where].detach()
    rows = _directions(value, rng)
    wide = torch.float64 if value.device.type != "mps" else value.dtype
    projections = []
    for row in rows:
        inputs = [v.detach() if is_array(v) else v for v in own]
        with fwad.dual_level(), _pinned_rng(seed, cuda), warnings.catch_warnings():
            # PyTorch's forward-mode decompositions call its deprecated torch.jit.script
            # (2.13): a warning about PyTorch's internals, nothing the user can act on.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            inputs[where] = fwad.make_dual(value, torch.reshape(row, value.shape))
            outs = _picked(fn(*inputs), outputs)
            total = torch.zeros((), dtype=wide, device=value.device)
            for out, dout in zip(outs, douts):
                tangent = fwad.unpack_dual(out).tangent
                if tangent is not None:
                    total = total + torch.sum(tangent.to(wide) * dout.to(wide))
        projections.append(total)
    return rows, torch.stack(projections).to(value.dtype)


def _jax_backward(fn, inputs, slots, rng, jvp) -> Backward:
    import jax

    positions = [i for i, slot in enumerate(slots) if slot is not None]
    names = [slots[i] for i in positions]
    try:
        out = fn(*inputs)
    except Exception as exc:
        raise CostError(f"fn(*inputs) raised {type(exc).__name__}: {exc}") from exc
    outputs = _floating_outputs(out, "fn(*inputs)")
    douts = _cotangents(_picked(out, outputs), rng)

    def differentiated(*values: Any) -> list[Any]:
        full = list(inputs)
        for i, value in zip(positions, values):
            full[i] = value
        return _picked(fn(*full), outputs)

    primals = [inputs[i] for i in positions]
    try:
        _, pullback = jax.vjp(differentiated, *primals)
        found = pullback(douts)
    except Exception as exc:
        raise CostError(f"fn's backward (jax.vjp) raised {type(exc).__name__}: {exc}") from exc
    grads = dict(zip(names, found))
    notes: list[str] = []
    rules = _custom_jvps(jax.make_jaxpr(differentiated)(*primals).jaxpr) if jvp is None else []
    forward: dict[str, tuple[Any, Any]] = {}
    if jvp or rules:
        try:
            forward = {
                name: _jax_tangents(differentiated, primals, k, douts, rng) for k, name in enumerate(names)
            }
        except Exception as exc:
            if jvp:
                raise InputError(
                    f"jvp=True: fn's forward-mode derivative (jax.jvp) failed: {type(exc).__name__}: {exc}"
                ) from exc
            notes.append(
                f"fn defines a custom_jvp ({', '.join(rules)}), but jax.jvp through fn failed "
                f"({type(exc).__name__}): forward mode not checked"
            )
    return Backward(outputs, douts, grads, forward, notes)


def _custom_jvps(jaxpr: Any) -> list[str]:
    """Names of the ``jax.custom_jvp`` functions called in a jaxpr (nested ones too)."""
    found: list[str] = []

    def visit(node: Any) -> None:
        for eqn in node.eqns:
            if eqn.primitive.name == "custom_jvp_call":
                name = str(
                    eqn.params.get("name", getattr(eqn.params.get("call_jaxpr"), "name", "custom_jvp"))
                )
                if name not in found:
                    found.append(name)
            for value in eqn.params.values():
                for inner in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jaxpr)
    return found


def _jax_tangents(differentiated, primals, index, douts, rng) -> tuple[Any, Any]:
    """⟨dout, J·v_k⟩ by ``jax.jvp``, along seeded directions v_k of input ``index``."""
    import jax
    import jax.numpy as jnp

    value = primals[index]
    rows = _directions(value, rng)
    wide = jnp.float64 if jax.config.jax_enable_x64 else value.dtype
    projections = []
    for row in rows:
        tangents = [jnp.zeros_like(p) for p in primals]
        tangents[index] = jnp.reshape(row, value.shape)
        _, outs = jax.jvp(differentiated, tuple(primals), tuple(tangents))
        projections.append(sum(jnp.sum(t.astype(wide) * d.astype(wide)) for t, d in zip(outs, douts)))
    return rows, jnp.stack(projections).astype(value.dtype)


# --------------------------------------------------------------------------- check_module


@dataclass(frozen=True)
class ModuleCost:
    """J(params, *douts, *state, *inputs) = loss(module(*inputs)), through ``functional_call``.

    ``state`` names the frozen parameters and buffers passed as args (so ``check`` upcasts
    them with the inputs); each call gets its own copies, so a forward that updates running
    statistics in place writes into neither the module nor the check's arrays. Without a
    loss, J = Σ_k ⟨out_k, dout_k⟩ over ``outputs``. Every call runs under no_grad and one
    pinned RNG state (seed, CUDA devices).
    """

    module: Any
    state: tuple[str, ...]
    outputs: tuple[int, ...]
    loss: Callable[[Any], Any] | None
    rng: tuple[int, tuple[int, ...]]

    def __call__(self, params: dict[str, Any], *args: Any) -> Any:
        from torch.func import functional_call

        count = 0 if self.loss is not None else len(self.outputs)
        douts = args[:count]
        state = args[count : count + len(self.state)]
        inputs = args[count + len(self.state) :]
        tensors = {**params, **{name: value.clone() for name, value in zip(self.state, state)}}
        with _torch_evaluation(*self.rng):
            out = functional_call(self.module, tensors, tuple(inputs))
            if self.loss is not None:
                return self.loss(out)
        return _inner_product(_picked(out, self.outputs), douts)


def check_module(
    module: Any,
    *inputs: Any,
    loss: Callable[[Any], Any] | None = None,
    seed: int = 0,
    **options: Any,
) -> Report:
    """Check a ``torch.nn.Module``'s parameter gradients (autograd's) against finite differences.

    Parameters
    ----------
    module
        A ``torch.nn.Module``. Its parameters that require grad are checked, named as in
        ``named_parameters()`` (``0.weight``, ``encoder.bias``); frozen parameters and buffers
        are constants. The module is never modified: every evaluation goes through
        ``torch.func.functional_call`` with the check's own copies of parameters and buffers,
        which come back bit for bit unchanged (running statistics too), in the same mode.
    *inputs
        ``module(*inputs)``'s inputs (copied; floating ones evaluated in float64 with the
        parameters under ``upcast=True``, the default, and so are frozen parameters and
        buffers: a float32 buffer never meets float64 parameters).
    loss
        ``loss(out)`` → the scalar J. Default: J = Σ ⟨out, dout⟩ over the floating outputs,
        for seeded standard normal ``dout``.
    seed
        Seeds ``dout`` and the RNG state the module runs under: every evaluation and the
        gradient run under ``torch.manual_seed(seed)`` in a forked RNG, so a random forward
        (dropout in train mode) is one deterministic function (the report notes it), and
        your RNG state is unchanged. Also what ``check`` seeds.
    **options
        As ``check``: ``epsilon``, ``mode``, ``upcast``, ``sample``, ….

    Returns
    -------
    Report
        As ``check``'s, per parameter by its ``named_parameters()`` name.

    Raises
    ------
    InputError, InputTypeError
        Not a module; no parameter requires grad; loss returned no scalar tensor.
    CostError
        The forward or the loss raised (when it failed only in float64, the message names
        the float32 tensors the module holds outside its parameters and buffers, and
        ``upcast=False``).
    """
    torch = _import_torch("check_module")
    if not isinstance(module, torch.nn.Module):
        raise InputTypeError(
            f"check_module(module, *inputs) needs a torch.nn.Module, not {type(module).__name__}; "
            "for a function use gc.check_function(fn, *inputs)"
        )
    _refuse_threads(options, "check_module")
    named = dict(module.named_parameters())
    checked = {name: p for name, p in named.items() if p.requires_grad}
    if not checked:
        raise InputError(
            f"no parameter of {type(module).__name__} requires grad ({len(named)} parameter(s) in all), "
            "so there is no gradient to check; call module.requires_grad_(True) on the part to check"
        )
    state = {name: p for name, p in named.items() if not p.requires_grad}
    state.update(dict(module.named_buffers()))
    cuda = _cuda_devices([*named.values(), *state.values(), *inputs])
    own = {name: _copy(p).requires_grad_(True) for name, p in checked.items()}
    fixed = {name: _copy(t) for name, t in state.items()}
    args = [_copy(x) for x in inputs]
    rng = host_random(seed)
    outputs: tuple[int, ...] = ()
    douts: list[Any] = []

    def objective(out: Any) -> Any:
        if loss is not None:
            return loss(out)
        return _inner_product(_picked(out, outputs), douts)

    try:
        with _pinned_rng(seed, cuda):
            out = torch.func.functional_call(module, {**own, **fixed}, tuple(args))
        if loss is None:
            outputs = _floating_outputs(out, "module(*inputs)")
            douts = _cotangents(_picked(out, outputs), rng)
        value = objective(out)
    except (CostError, InputError):
        raise
    except Exception as exc:
        raise CostError(f"module(*inputs) or loss raised {type(exc).__name__}: {exc}") from exc
    if not (is_array(value) and tuple(value.shape) in ((), (1,))):
        raise InputError(
            f"loss(out) returned {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if is_array(value) else "")
            + "; it must return the scalar cost J as a tensor (e.g. F.mse_loss(out, y)), not .item()"
        )
    notes: list[str] = []
    if value.requires_grad:
        found = torch.autograd.grad(value, list(own.values()), allow_unused=True)
    else:
        found = (None,) * len(own)
    grads, missing = {}, []
    for (name, leaf), grad in zip(own.items(), found):
        if grad is None:
            missing.append(name)
            grad = torch.zeros_like(leaf)
        grads[name] = grad.detach()
    if missing:
        notes.append(
            f"autograd gave no gradient for {', '.join(missing)} (J does not depend on "
            f"{'it' if len(missing) == 1 else 'them'} through autograd): checked as zero"
        )
    cost = ModuleCost(module, tuple(fixed), outputs, loss, (seed, cuda))
    with torch.no_grad():
        others = []
        for pinned in (seed, seed + 1):
            with _pinned_rng(pinned, cuda):
                others.append(objective(torch.func.functional_call(module, {**own, **fixed}, tuple(args))))
    if not torch.equal(others[0], others[1]):
        notes.append(
            f"the module's forward is random (J differs between two RNG seeds: dropout in train mode?): "
            f"every evaluation and the gradient ran under one RNG state, torch.manual_seed({seed}) in a "
            "forked RNG, so J is one deterministic function; your RNG state is unchanged"
        )
    options.setdefault("backend", "torch")
    try:
        report = check(cost, dict(checked), grads, *douts, *state.values(), *inputs, seed=seed, **options)
    except CostError as error:
        better = (
            _upcast_failure(
                error,
                _low_precision(list(checked.values())),
                "module(*inputs)" + (" or loss(out)" if loss is not None else ""),
                _stray_tensors_hint(module),
            )
            if options.get("upcast", True)
            else None
        )
        if better is None:
            raise
        raise better from error.__cause__
    return _with_notes(report, notes)


def _stray_tensors_hint(module: Any) -> str:
    """Advice naming the float32/float16 tensors the module holds as plain attributes
    (neither parameters nor buffers): those are not upcast, and meet float64 parameters."""
    stray = []
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key.startswith("_") or not _floating(value) or _low_precision([value]) == []:
                continue
            stray.append((f"{prefix}.{key}" if prefix else key, str(value.dtype).split(".")[-1]))
    if stray:
        listed = ", ".join(f"{name} ({dtype})" for name, dtype in stray)
        owner = stray[0][0].rpartition(".")
        return (
            f"The module holds floating tensors that are neither parameters nor buffers, so they stay "
            f"in their dtype: {listed}. Register them as buffers "
            f"(self.register_buffer({owner[2]!r}, tensor) in {owner[0] or 'the module'}'s __init__), "
            "so they are evaluated in float64 too, or pass upcast=False to evaluate in the module's "
            "own precision."
        )
    return (
        "Its parameters, buffers and inputs were evaluated in float64; a float32 tensor created in "
        "forward (torch.ones(n), torch.tensor(0.5)) or held by the loss (a target y) was not: create "
        "it in the input's dtype (dtype=x.dtype), or pass upcast=False to evaluate in the module's "
        "own precision."
    )


# --------------------------------------------------------------------------- check_in_place


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
        copy = _copy(leaf)
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
    return _with_notes(
        report,
        [
            "evaluated in place: each perturbation was written into your arrays before loss(*args) "
            "read them, one row per call (mode='loop'); they were restored bit for bit after"
        ],
    )
