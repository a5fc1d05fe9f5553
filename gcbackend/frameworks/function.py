"""check_function: a PyTorch or JAX function's own backward (and forward-mode rule)."""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ..backends import host_random, is_array, resolve, to_backend
from ..check import check
from ..errors import CostError, InputError, InputTypeError
from ..report import Report
from ._common import (
    cotangents,
    cuda_devices,
    floating_outputs,
    fresh_copy,
    inner_product,
    is_complex,
    is_floating,
    low_precision,
    picked,
    pinned_rng,
    refuse_threads,
    torch_evaluation,
    upcast_failure,
    with_notes,
)

__all__ = ["JVP_DIRECTIONS", "check_function", "jvp_name"]


JVP_DIRECTIONS = 4
"""Seeded unit directions per input along which a forward-mode rule is checked."""


def jvp_name(name: str) -> str:
    """The parameter that carries input ``name``'s forward-mode check: ``jvp(x)``."""
    return f"jvp({name})"


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
        context = torch_evaluation(*self.rng) if self.rng is not None else contextlib.nullcontext()
        with context:
            out = self.fn(*inputs)
        return inner_product(picked(out, self.outputs), douts)


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
        if is_complex(value):
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
        refuse_threads(options, "check_function")
        backward = _torch_backward(fn, inputs, slots, rng, seed, jvp)
        pinned = (seed, cuda_devices(list(inputs)))
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
            upcast_failure(
                error,
                low_precision(list(params.values())),
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
    return with_notes(report, notes)


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
    floating = [(name, value) for name, value in zip(names, inputs) if is_floating(value)]
    if framework == "torch" and any(value.requires_grad for _, value in floating):
        return tuple(name for name, value in floating if value.requires_grad)
    return tuple(name for name, _ in floating)


def _torch_backward(fn, inputs, slots, rng, seed, jvp) -> Backward:
    import torch

    cuda = cuda_devices(list(inputs))
    own = [
        fresh_copy(value).requires_grad_(True) if slot is not None else fresh_copy(value)
        for slot, value in zip(slots, inputs)
    ]
    leaves = {slot: own[i] for i, slot in enumerate(slots) if slot is not None}
    try:
        with pinned_rng(seed, cuda):
            out = fn(*own)
    except Exception as exc:
        raise CostError(f"fn(*inputs) raised {type(exc).__name__}: {exc}") from exc
    outputs = floating_outputs(out, "fn(*inputs)")
    outs = picked(out, outputs)
    douts = cotangents(outs, rng)
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
        with torch.no_grad(), pinned_rng(pinned, cuda):
            values.append(picked(fn(*inputs), outputs))
    return any(not torch.equal(a, b) for a, b in zip(*values))


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
        with fwad.dual_level(), pinned_rng(seed, cuda), warnings.catch_warnings():
            # PyTorch's forward-mode decompositions call its deprecated torch.jit.script
            # (2.13): a warning about PyTorch's internals, nothing the user can act on.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            inputs[where] = fwad.make_dual(value, torch.reshape(row, value.shape))
            outs = picked(fn(*inputs), outputs)
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
    outputs = floating_outputs(out, "fn(*inputs)")
    douts = cotangents(picked(out, outputs), rng)

    def differentiated(*values: Any) -> list[Any]:
        full = list(inputs)
        for i, value in zip(positions, values):
            full[i] = value
        return picked(fn(*full), outputs)

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
