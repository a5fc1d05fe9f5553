"""check_module: a torch.nn.Module's parameters, through functional_call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import host_random, is_array
from ..check import check
from ..errors import CostError, InputError, InputTypeError
from ..report import Report
from ._common import (
    cotangents,
    cuda_devices,
    floating_outputs,
    fresh_copy,
    import_torch,
    inner_product,
    is_floating,
    low_precision,
    picked,
    pinned_rng,
    refuse_threads,
    torch_evaluation,
    upcast_failure,
    with_notes,
)

__all__ = ["check_module"]


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
        with torch_evaluation(*self.rng):
            out = functional_call(self.module, tensors, tuple(inputs))
            if self.loss is not None:
                return self.loss(out)
        return inner_product(picked(out, self.outputs), douts)


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
    torch = import_torch("check_module")
    if not isinstance(module, torch.nn.Module):
        raise InputTypeError(
            f"check_module(module, *inputs) needs a torch.nn.Module, not {type(module).__name__}; "
            "for a function use gc.check_function(fn, *inputs)"
        )
    refuse_threads(options, "check_module")
    named = dict(module.named_parameters())
    checked = {name: p for name, p in named.items() if p.requires_grad}
    if not checked:
        raise InputError(
            f"no parameter of {type(module).__name__} requires grad ({len(named)} parameter(s) in all), "
            "so there is no gradient to check; call module.requires_grad_(True) on the part to check"
        )
    state = {name: p for name, p in named.items() if not p.requires_grad}
    state.update(dict(module.named_buffers()))
    cuda = cuda_devices([*named.values(), *state.values(), *inputs])
    own = {name: fresh_copy(p).requires_grad_(True) for name, p in checked.items()}
    fixed = {name: fresh_copy(t) for name, t in state.items()}
    args = [fresh_copy(x) for x in inputs]
    rng = host_random(seed)
    outputs: tuple[int, ...] = ()
    douts: list[Any] = []

    def objective(out: Any) -> Any:
        if loss is not None:
            return loss(out)
        return inner_product(picked(out, outputs), douts)

    try:
        with pinned_rng(seed, cuda):
            out = torch.func.functional_call(module, {**own, **fixed}, tuple(args))
        if loss is None:
            outputs = floating_outputs(out, "module(*inputs)")
            douts = cotangents(picked(out, outputs), rng)
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
            with pinned_rng(pinned, cuda):
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
            upcast_failure(
                error,
                low_precision(list(checked.values())),
                "module(*inputs)" + (" or loss(out)" if loss is not None else ""),
                _stray_tensors_hint(module),
            )
            if options.get("upcast", True)
            else None
        )
        if better is None:
            raise
        raise better from error.__cause__
    return with_notes(report, notes)


def _stray_tensors_hint(module: Any) -> str:
    """Advice naming the float32/float16 tensors the module holds as plain attributes
    (neither parameters nor buffers): those are not upcast, and meet float64 parameters."""
    stray = []
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key.startswith("_") or not is_floating(value) or low_precision([value]) == []:
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
