"""The vmap path: the library maps a cost written for one point over a batch of rows.

PyTorch's ``torch.func.vmap`` traces the cost's Python at every call; JAX's
``jax.jit(jax.vmap(...))`` is compiled once per (cost, tensor, layout, non-array args) and
kept for the next check of the same cost (``_compiled``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import array_api_compat

from ..params import Layout
from .calls import is_backend_array
from .rows import RowGroup, Stencil

__all__ = ["JIT_CACHE", "can_vmap", "vmapped"]

JIT_CACHE = 32
"""JAX: how many compiled jit(vmap(cost)) the process keeps (least recently used go first)."""


def can_vmap(xp: ModuleType) -> bool:
    """Whether the library maps a function over a batch axis itself: PyTorch and JAX."""
    return array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp)


class _Fixed:
    """The non-array args of a cost, as part of a cache key: compared by identity (an object
    the cost reads need not be hashable or comparable), and kept alive by the key itself,
    so an id in the key can never be reused by another object."""

    def __init__(self, values: tuple[tuple[int, Any], ...]) -> None:
        self.values = values

    def __hash__(self) -> int:
        return hash(tuple((i, id(value)) for i, value in self.values))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Fixed)
            and len(self.values) == len(other.values)
            and all(i == j and a is b for (i, a), (j, b) in zip(self.values, other.values))
        )


def _compile(
    cost: Callable[..., Any],
    tensor: str,
    layout: Layout,
    arrays: tuple[int, ...],
    fixed: _Fixed,
    n_args: int,
    shape: tuple[int, ...],
    xp: ModuleType,
):
    """jit(vmap(cost)) over the rows of ``tensor``; the parameters and the array args
    (positions ``arrays``) are arguments, not constants, so one compilation serves any θ."""
    import jax

    constants = dict(fixed.values)

    def one(row, parts, given):
        values = dict(zip(arrays, given))
        full = [values[i] if i in values else constants[i] for i in range(n_args)]
        return cost(layout.wrap({**parts, tensor: xp.reshape(row, shape)}), *full)

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


_compiled = functools.lru_cache(maxsize=JIT_CACHE)(_compile)


def vmapped(stencil: Stencil, group: RowGroup, xp: ModuleType) -> Callable[[Any], Any]:
    """The cost of one point, mapped over the rows of a (B, n) stack by the library."""
    cost, args, single = stencil.cost, stencil.args, group.single
    if array_api_compat.is_torch_namespace(xp):
        from torch.func import vmap

        return vmap(lambda row: cost(single(row), *args))
    arrays = tuple(i for i, a in enumerate(args) if is_backend_array(a, xp))
    fixed = _Fixed(tuple((i, a) for i, a in enumerate(args) if i not in arrays))
    key = (cost, group.tensor, stencil.layout, arrays, fixed, len(args), group.shape, xp)
    try:
        mapped = _compiled(*key)
    except TypeError:  # an unhashable callable object (or layout): compiled for this check only
        mapped = _compile(*key)
    parts = dict(stencil.parts)
    given = tuple(args[i] for i in arrays)
    return lambda points: mapped(points, parts, given)
