"""Parameters: a tree of arrays (or one array / number) ↔ one flat vector θ.

``params`` may be one array or number, a mapping name → array, or any nesting of dicts,
lists, tuples and NamedTuples of arrays (``{"encoder": {"W": …}}``, ``[(W1, b1), (W2, b2)]``).
Each leaf is one parameter, named by its path:

* a key of the top-level mapping is the name as written (``"W1"`` stays ``"W1"``);
* a nested string key that is an identifier, or a NamedTuple field, adds ``.key``
  (``encoder.W``, ``layers[0].W``); any other key adds ``[repr(key)]`` (``blocks['conv 1']``);
* a list or tuple position adds ``[i]`` (``layers[0][1]``; a top-level list gives ``[0]``).

``None`` in params is no parameter: it stays ``None`` where the cost receives it; grads
holds ``None`` there too (or, in a mapping, leaves the key out). Mappings other than dicts (``MappingProxyType``, a frozen dict)
are read as dicts, and the cost receives a dict there; every other container keeps its type.

The ``Layout`` remembers names, shapes, order and the tree's structure (an ``optree``
treedef, built once per check), so a flat vector of shape (..., N) maps back to the user's
structure with the same leading (batch) axes, and per-parameter results map back to the
exact element of the exact parameter.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import optree

from .errors import InputError, InputTypeError

__all__ = ["SINGLE", "Layout", "Tree", "flatten_tree", "match_grads", "match_tree"]

SINGLE = "theta"
"""The name given to the parameter when ``params`` is one array or number, not a tree."""

# optree sorts dict keys when it flattens; in this namespace it keeps insertion order, so
# parameters are numbered in the order the user wrote them (W1, b1, W2, … as in the notebook).
_NAMESPACE = "gcbackend"
_ORDER_LOCK = threading.Lock()
_DICTS = (dict, OrderedDict, defaultdict)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_namedtuple(node: object) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _numbers_only(node: object) -> bool:
    """A plain list/tuple of Python numbers (or of such lists): an array written as a list.

    It stays one leaf, so the check refuses it with "pass an array" rather than treat every
    number as a parameter of its own (``[[1.0, 2.0]]`` is almost surely meant as a matrix).
    """
    return (
        type(node) in (list, tuple) and len(node) > 0 and all(_is_number(x) or _numbers_only(x) for x in node)
    )


def _is_node(node: object) -> bool:
    return isinstance(node, (Mapping, list, tuple)) and not _numbers_only(node)


def _children(node: Any) -> list[tuple[Any, str, Any]]:
    """(key, kind, child) of a node in order; kind is "key", "field" or "index"."""
    if isinstance(node, Mapping):
        return [(key, "key", child) for key, child in node.items()]
    if _is_namedtuple(node):
        return [(field, "field", child) for field, child in zip(node._fields, node)]
    return [(i, "index", child) for i, child in enumerate(node)]


def _join(label: str, key: Any, kind: str) -> str:
    """The name of ``key`` under the node named ``label`` ("" at the top)."""
    if kind == "index":
        return f"{label}[{key}]"
    if isinstance(key, str) and (not label or (key.isidentifier() or kind == "field")):
        return f"{label}.{key}" if label else key
    return f"{label}[{key!r}]"


def _accessor(where: str, key: Any, kind: str) -> str:
    """Python spelling of a child, for messages: ``['encoder']['W']``, ``[0].W``."""
    return f"{where}.{key}" if kind == "field" else f"{where}[{key!r}]"


def _plain(node: Any) -> Any:
    """``node`` with every container optree does not know replaced by one it does (a Mapping
    by a dict, a list/tuple subclass by a list/tuple); ``node`` itself when there is none."""
    if not _is_node(node):
        return node
    items = _children(node)
    kids = [_plain(child) for _, _, child in items]
    same = all(new is child for new, (_, _, child) in zip(kids, items))
    if isinstance(node, Mapping):
        if type(node) in _DICTS and same:
            return node
        rebuilt = dict(zip((key for key, _, _ in items), kids))
        if type(node) is defaultdict:
            return defaultdict(node.default_factory, rebuilt)
        return OrderedDict(rebuilt) if type(node) is OrderedDict else rebuilt
    if _is_namedtuple(node):
        return node if same else type(node)(*kids)
    if type(node) in (list, tuple) and same:
        return node
    return tuple(kids) if isinstance(node, tuple) else list(kids)


@dataclass(frozen=True)
class Tree:
    """A params tree taken apart: leaf names and values in order, and its optree treedef
    (None for a flat dict name → array, which a plain dict rebuilds)."""

    names: tuple[str, ...]
    leaves: tuple[Any, ...]
    treedef: Any
    single: bool


def _flat(params: Any) -> bool:
    """A non-empty plain dict of string keys whose values are all leaves."""
    return (
        type(params) is dict
        and len(params) > 0
        and all(
            isinstance(key, str) and value is not None and not _is_node(value)
            for key, value in params.items()
        )
    )


def _flatten_tree(params: Any) -> Tree:
    if _flat(params):  # the common flat dict name → array: its keys are its names, and
        # the evaluation's plain dict(parts) rebuilds it (no treedef: nothing added per cost call)
        return Tree(tuple(params), tuple(params.values()), None, single=False)
    names: list[str] = []
    leaves: list[Any] = []
    found = {"odd": False, "numbers": False}  # containers optree does not know; number lists

    def walk(node: Any, label: str) -> None:
        if node is None:
            return
        if not _is_node(node):
            found["numbers"] |= isinstance(node, (list, tuple))
            names.append(label)
            leaves.append(node)
            return
        container = type(node)
        found["odd"] |= not (container in _DICTS or container in (list, tuple) or _is_namedtuple(node))
        for key, kind, child in _children(node):
            walk(child, _join(label, key, kind))

    if params is not None and not _is_node(params):  # one array or number
        return Tree((SINGLE,), (params,), optree.tree_structure(params, is_leaf=_numbers_only), single=True)
    walk(params, "")
    plain = _plain(params) if found["odd"] else params  # same leaves, same order
    treedef = optree.tree_structure(
        plain, is_leaf=_numbers_only if found["numbers"] else None, namespace=_NAMESPACE
    )
    # Names and leaves come from one walk, so they always belong together; the treedef must
    # put the leaves in that same order (dict insertion order), or the cost would receive
    # them in the wrong places. Checked, not assumed: optree's dict-order mode is a setting.
    ordered = treedef.flatten_up_to(plain)
    if len(ordered) != len(leaves) or any(a is not b for a, b in zip(ordered, leaves)):
        raise AssertionError(
            "optree flattened params in another order than insertion order"
        )  # pragma: no cover
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise InputError(
            f"params has two parameters named {twice[0]!r} (a key containing '.' or '[' that "
            "repeats a nested path); rename one of them"
        )
    return Tree(tuple(names), tuple(leaves), treedef, single=False)


def flatten_tree(params: Any) -> Tree:
    """Names and leaves of ``params`` in order (see the module docstring for the names), and
    its treedef. Raises InputError when two leaves would get the same name
    (``{"a.b": x, "a": {"b": y}}``)."""
    if _flat(params):
        return _flatten_tree(params)
    # Only the flattening needs the mode; the treedef then rebuilds in this order anywhere.
    # The mode is process-wide, not per thread: the lock keeps one check's exit from the
    # context from switching it off under another thread's flattening.
    with _ORDER_LOCK, optree.dict_insertion_ordered(True, namespace=_NAMESPACE):
        return _flatten_tree(params)


@dataclass(frozen=True)
class Layout:
    """Names, shapes and order of the parameters, and the structure they came in.

    ``single`` when params was one array or number. ``treedef`` (optree) rebuilds the
    user's structure; None means a flat dict name → array, rebuilt as a plain dict.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    single: bool = False
    treedef: Any = None

    @classmethod
    def of(cls, params: Any) -> Layout:
        tree = flatten_tree(params)
        shapes = tuple(tuple(leaf.shape) for leaf in tree.leaves)
        return cls(tree.names, shapes, single=tree.single, treedef=tree.treedef)

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

    def flatten(self, params: Any, *, xp: ModuleType) -> Any:
        """θ of shape (N,): the parameters raveled in C order and concatenated in order."""
        parts = self.as_dict(params)
        return xp.concat([xp.reshape(parts[name], (-1,)) for name in self.names])

    def unflatten(self, theta: Any, *, xp: ModuleType) -> Any:
        """The inverse of ``flatten`` for θ of shape (..., N): leading axes are kept."""
        lead = tuple(theta.shape[:-1])
        if theta.shape[-1] != self.size:
            raise InputError(f"theta has {theta.shape[-1]} entries on its last axis, expected {self.size}")
        parts = {
            name: xp.reshape(theta[..., start : start + size], lead + shape)
            for name, shape, start, size in zip(self.names, self.shapes, self.offsets, self.sizes)
        }
        return self.wrap(parts)

    def as_dict(self, params: Any) -> dict[str, Any]:
        """name → leaf of a tree of this layout's structure (the inverse of ``wrap``)."""
        if self.treedef is None:
            return {SINGLE: params} if self.single else dict(params)
        try:
            leaves = self.treedef.flatten_up_to(params)
        except (TypeError, ValueError):  # a Mapping optree does not know, say
            leaves = self.treedef.flatten_up_to(_plain(params))
        return dict(zip(self.names, leaves))

    def wrap(self, parts: Mapping[str, Any]) -> Any:
        """What the cost receives: the user's structure with ``parts`` as its leaves."""
        if self.treedef is None:
            return parts[SINGLE] if self.single else dict(parts)
        return optree.tree_unflatten(self.treedef, [parts[name] for name in self.names])


_STEM = re.compile(r"^(.*?)\d*$")


def _stem(name: str) -> str:
    return _STEM.match(name).group(1)


def match_grads(
    names: tuple[Any, ...], grads: Mapping[Any, Any], *, at: str = "", label: str = ""
) -> dict[Any, Any]:
    """Pick each parameter's gradient from ``grads`` keyed ``"W1"`` or ``"dW1"``.

    Keys that name no parameter and do not look like one (the notebook's ``dZ3``, ``dA2``)
    are ignored. A key shaped like a parameter's gradient that names none (``dW4`` when the
    parameters are W1..W3) is an error: it usually means params and grads disagree.

    ``names`` are the keys of one mapping in a tree; ``at`` is where that mapping sits
    (``"['encoder']"``, "" at the top) and ``label`` its name, for the messages.
    """
    picked: dict[Any, Any] = {}
    where = f"grads{at}"
    for name in names:
        spelled = name if isinstance(name, str) else None
        keys = [k for k in ((name, "d" + name) if spelled is not None else (name,)) if k in grads]
        full = _join(label, name, "key")
        if not keys:
            also = f" (or {where}[{'d' + name!r}])" if spelled is not None else ""
            raise InputError(
                f"grads has no gradient for parameter {full!r}: add {where}[{name!r}]{also}; "
                f"{where if at else 'grads'} has keys {sorted(map(str, grads))}"
            )
        if len(keys) == 2:
            raise InputError(
                f"{where if at else 'grads'} has both {name!r} and 'd{name}' for parameter {full!r}; "
                "keep one of them"
            )
        picked[name] = grads[keys[0]]
    strings = tuple(n for n in names if isinstance(n, str))
    used = set(strings) | {"d" + n for n in strings}
    stems = {_stem(n) for n in strings}
    for key in grads:
        if not isinstance(key, str) or key in used:
            continue
        candidates = [key, key[1:]] if key.startswith("d") else [key]
        for bare in candidates:
            if _stem(bare) in stems and bare != _stem(bare):
                raise InputError(
                    f"{where}[{key!r}] looks like the gradient of a parameter {bare!r} that "
                    f"params{at} does not have (params{at}: {', '.join(map(str, names))}); add it "
                    "to params or drop it from grads"
                )
    return picked


def _kind(node: Any) -> str:
    if node is None:
        return "None"
    if isinstance(node, Mapping):
        return "a mapping"
    if isinstance(node, (list, tuple)) and _is_node(node):
        return f"a {type(node).__name__} of {len(node)}"
    return f"a {type(node).__name__}"


def match_tree(params: Any, grads: Any) -> dict[str, Any]:
    """name → gradient: ``grads`` read along ``params``' structure (``flatten_tree``'s names).

    At every mapping the gradient of key ``"W"`` may be keyed ``"W"`` or ``"dW"`` (extra keys
    as ``match_grads``); a list/tuple/NamedTuple in params needs a list or tuple of the same
    length in grads (either kind); ``None`` needs ``None`` (or, in a mapping, no key). A leaf's gradient is returned as
    it is (the caller checks it is an array or number). Raises InputError (InputTypeError
    where a container is of the wrong kind) naming the first path where the two differ.
    """
    if _flat(params) and isinstance(grads, Mapping):  # the common flat dict: one level
        picked = match_grads(tuple(params), grads)
        for name, grad in picked.items():
            if isinstance(grad, Mapping):
                raise InputTypeError(
                    f"params[{name!r}] is one array but grads[{name!r}] is a mapping; params and "
                    "grads must have the same structure"
                )
        return picked
    if not _is_node(params):
        if isinstance(grads, Mapping):
            raise InputTypeError(
                "params is a single array/number but grads is a mapping; pass one array/number"
            )
        return {SINGLE: grads}
    picked: dict[str, Any] = {}

    def walk(node: Any, grad: Any, label: str, at: str) -> None:
        if node is None:
            if grad is not None:
                raise InputError(
                    f"params{at} is None (no parameter) but grads{at} is {_kind(grad)}; pass None there too"
                )
            return
        if not _is_node(node):
            if _is_node(grad) and isinstance(grad, Mapping):
                raise InputTypeError(
                    f"params{at} is one array but grads{at} is a mapping; params and grads must "
                    "have the same structure"
                )
            picked[label] = grad
            return
        if isinstance(node, Mapping):
            if not isinstance(grad, Mapping):
                if not at:
                    raise InputTypeError(
                        f"params is a mapping but grads is a {type(grad).__name__}; pass grads as a "
                        "mapping with the same names (or 'd' + name)"
                    )
                raise InputTypeError(
                    f"params{at} is a mapping but grads{at} is {_kind(grad)}; pass grads with the "
                    "same structure as params (the same keys, or 'd' + key)"
                )
            # A None in params is no parameter: grads may leave its key out.
            absent = tuple(
                key
                for key, child in node.items()
                if child is None and key not in grad and not (isinstance(key, str) and "d" + key in grad)
            )
            chosen = match_grads(tuple(k for k in node if k not in absent), grad, at=at, label=label)
            for key, child in node.items():
                if key not in absent:
                    walk(child, chosen[key], _join(label, key, "key"), _accessor(at, key, "key"))
            return
        if not isinstance(grad, (list, tuple)):
            raise InputTypeError(
                f"params{at} is {_kind(node)} but grads{at} is {_kind(grad)}; pass grads with "
                "the same structure as params (a list or tuple there)"
            )
        if len(grad) != len(node):
            raise InputError(
                f"params{at} has {len(node)} entries but grads{at} has {len(grad)}; params and "
                "grads must have the same structure"
            )
        for (key, kind, child), grad_child in zip(_children(node), grad):
            walk(child, grad_child, _join(label, key, kind), _accessor(at, key, kind))

    walk(params, grads, "", "")
    return picked
