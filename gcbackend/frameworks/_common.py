"""What the framework entry points share: outputs and cotangents, copies, notes, the
upcast hint, and PyTorch's pinned RNG state."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import array_api_compat
import optree

from ..backends import is_array, resolve, to_backend
from ..errors import CostError, InputError
from ..report import Report


def is_floating(value: Any) -> bool:
    """A real floating-point array (of any library): an input whose gradient is checked."""
    if not is_array(value):
        return False
    return array_api_compat.array_namespace(value).isdtype(value.dtype, "real floating")


def is_complex(value: Any) -> bool:
    """A complex array: refused as an input (its gradient convention is not checked here)."""
    return is_array(value) and array_api_compat.array_namespace(value).isdtype(
        value.dtype, "complex floating"
    )


def output_leaves(out: Any) -> list[Any]:
    """The leaves of a function's result (an array, or a tuple/list/dict/NamedTuple of them)."""
    return optree.tree_flatten(out, none_is_leaf=False)[0]


def picked(out: Any, outputs: tuple[int, ...]) -> list[Any]:
    """The leaves of ``out`` at positions ``outputs`` (its floating outputs)."""
    leaves = output_leaves(out)
    return [leaves[i] for i in outputs]


def inner_product(outs: list[Any], douts: tuple[Any, ...] | list[Any]) -> Any:
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


def cotangents(outs: list[Any], rng: Any) -> list[Any]:
    """One seeded standard normal ``dout`` per output, in its shape, dtype and device."""
    return [
        to_backend(rng.standard_normal(tuple(out.shape)), resolve(None, [out]), dtype=out.dtype)
        for out in outs
    ]


def floating_outputs(out: Any, what: str) -> tuple[int, ...]:
    leaves = output_leaves(out)
    outputs = tuple(i for i, leaf in enumerate(leaves) if is_floating(leaf))
    if not outputs:
        kinds = ", ".join(type(leaf).__name__ for leaf in leaves) or "nothing"
        raise CostError(
            f"{what} returned {kinds}, no floating-point array; check_function needs fn to return "
            "an array (or a tuple/list/dict of them) that depends on the inputs"
        )
    return outputs


def fresh_copy(value: Any) -> Any:
    """A fresh copy of an array (detached from any autograd graph), anything else as it is."""
    return to_backend(value, resolve(None, [value])) if is_array(value) else value


def with_notes(report: Report, notes: list[str]) -> Report:
    return dataclasses.replace(report, notes=(*report.notes, *notes)) if notes else report


DTYPE_WORDS = re.compile(r"Double|Float|Half|BFloat16|dtype|scalar type", re.IGNORECASE)


def upcast_failure(error: CostError, low: list[str], what: str, hint: str) -> CostError | None:
    """A clearer error for a cost that failed only because the check evaluated it in float64
    (``upcast=True``): a float32 tensor the upcast could not reach met a float64 one."""
    cause = error.__cause__ or error
    if not low or not DTYPE_WORDS.search(str(cause)):
        return None
    return CostError(
        f"{what} failed when evaluated in float64: {type(cause).__name__}: {str(cause).strip()}. "
        f"The check evaluates {'/'.join(low)} inputs in float64 (upcast=True, the default), so that "
        f"a {'/'.join(low)} backward is judged against exact finite differences. {hint}"
    )


def low_precision(values: list[Any]) -> list[str]:
    low = set()
    for value in values:
        if is_floating(value):
            xp = array_api_compat.array_namespace(value)
            if xp.finfo(value.dtype).bits < 64:
                low.add(str(value.dtype).split(".")[-1])
    return sorted(low)


def refuse_threads(options: dict[str, Any], entry: str) -> None:
    """PyTorch's RNG is process-global: the state pinned around each call (and restored
    after it) would race between threads, so a PyTorch check runs its calls one at a time."""
    if options.get("workers", 1) != 1:
        raise InputError(
            f"workers={options['workers']!r}: {entry} pins PyTorch's global RNG state around every call, "
            "which threads would race on (and PyTorch already runs each call on its own threads); "
            "drop workers="
        )


def import_torch(entry: str) -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a test dependency
        raise InputError(f"{entry} needs PyTorch (pip install 'gcbackend[torch]'): {exc}") from exc
    return torch


def cuda_devices(tensors: list[Any]) -> tuple[int, ...]:
    return tuple(
        sorted({t.device.index or 0 for t in tensors if is_array(t) and getattr(t, "is_cuda", False)})
    )


@contextlib.contextmanager
def pinned_rng(seed: int, cuda: tuple[int, ...]) -> Iterator[None]:
    """PyTorch's global RNG forked and seeded: a random forward (dropout) draws the same
    numbers on every call, and the user's RNG state is what it was afterwards."""
    import torch

    with torch.random.fork_rng(devices=list(cuda)):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def torch_evaluation(seed: int, cuda: tuple[int, ...]) -> Iterator[None]:
    import torch

    with torch.no_grad(), pinned_rng(seed, cuda):
        yield
