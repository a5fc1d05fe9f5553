"""Parameters: a mapping name → array (or one array / number) ↔ one flat vector θ.

The ``Layout`` remembers names, shapes and order, so a flat vector of shape (..., N) maps
back to the user's structure with the same leading (batch) axes, and per-parameter results
map back to the exact element of the exact parameter.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import InputError

__all__ = ["SINGLE", "Layout", "match_grads"]

SINGLE = "theta"
"""The name given to the parameter when ``params`` is one array or number, not a mapping."""


@dataclass(frozen=True)
class Layout:
    """Names, shapes and order of the parameters; ``single`` when params was not a mapping."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    single: bool = False

    @classmethod
    def of(cls, params: Mapping[str, Any] | Any) -> Layout:
        if isinstance(params, Mapping):
            return cls(tuple(params), tuple(tuple(params[k].shape) for k in params))
        return cls((SINGLE,), (tuple(params.shape),), single=True)

    # Cached: a check reads them in every stacked call (the dataclass is frozen, so they
    # cannot go stale; cached_property writes the instance __dict__ directly).
    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return tuple(out)

    @functools.cached_property
    def size(self) -> int:
        """N, the total number of scalar parameters."""
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, Any] | Any, *, xp: ModuleType) -> Any:
        """θ of shape (N,): the parameters raveled in C order and concatenated in order."""
        parts = self.as_dict(params)
        return xp.concat([xp.reshape(parts[name], (-1,)) for name in self.names])

    def unflatten(self, theta: Any, *, xp: ModuleType) -> Mapping[str, Any] | Any:
        """The inverse of ``flatten`` for θ of shape (..., N): leading axes are kept."""
        lead = tuple(theta.shape[:-1])
        if theta.shape[-1] != self.size:
            raise InputError(f"theta has {theta.shape[-1]} entries on its last axis, expected {self.size}")
        parts = {
            name: xp.reshape(theta[..., start : start + size], lead + shape)
            for name, shape, start, size in zip(self.names, self.shapes, self.offsets, self.sizes)
        }
        return self.wrap(parts)

    def as_dict(self, params: Mapping[str, Any] | Any) -> dict[str, Any]:
        return {SINGLE: params} if self.single else dict(params)

    def wrap(self, parts: Mapping[str, Any]) -> Mapping[str, Any] | Any:
        """What the cost receives: the mapping, or the lone array in the single case."""
        return parts[SINGLE] if self.single else dict(parts)


_STEM = re.compile(r"^(.*?)\d*$")


def _stem(name: str) -> str:
    return _STEM.match(name).group(1)


def match_grads(names: tuple[str, ...], grads: Mapping[str, Any]) -> dict[str, Any]:
    """Pick each parameter's gradient from ``grads`` keyed ``"W1"`` or ``"dW1"``.

    Keys that name no parameter and do not look like one (the notebook's ``dZ3``, ``dA2``)
    are ignored. A key shaped like a parameter's gradient that names none (``dW4`` when the
    parameters are W1..W3) is an error: it usually means params and grads disagree.
    """
    picked: dict[str, Any] = {}
    for name in names:
        keys = [k for k in (name, "d" + name) if k in grads]
        if not keys:
            raise InputError(
                f"grads has no gradient for parameter {name!r}: add grads[{name!r}] "
                f"(or grads['d{name}']); grads has keys {sorted(map(str, grads))}"
            )
        if len(keys) == 2:
            raise InputError(
                f"grads has both {name!r} and 'd{name}' for parameter {name!r}; keep one of them"
            )
        picked[name] = grads[keys[0]]
    used = set(names) | {"d" + n for n in names}
    stems = {_stem(n) for n in names}
    for key in grads:
        if not isinstance(key, str) or key in used:
            continue
        candidates = [key, key[1:]] if key.startswith("d") else [key]
        for bare in candidates:
            if _stem(bare) in stems and bare != _stem(bare):
                raise InputError(
                    f"grads[{key!r}] looks like the gradient of a parameter {bare!r} that params "
                    f"does not have (params: {', '.join(names)}); add it to params or drop it "
                    "from grads"
                )
    return picked
