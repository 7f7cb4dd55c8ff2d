"""Pytree helpers: one place that knows which pytree library funcdp uses.

funcdp uses ``torch.utils._pytree``, the library ``torch.func`` itself uses, so any
container ``torch.func`` understands (tuples, lists, dicts, namedtuples, registered
dataclasses) works in funcdp too. Unlike JAX, ``None`` is a *leaf* here.

Besides thin re-exports this module provides the two things the transforms need on
top: matching a *prefix* tree (``in_axes``/``out_axes``) against a full tree with
readable error paths, and formatting key paths for error messages.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch.utils._pytree as _pt

try:  # torch's C++ pytree (optree): the same trees and leaf order, ~7x faster to flatten
    import torch.utils._cxx_pytree as _fast
except ImportError:  # pragma: no cover - optree not installed
    _fast = _pt  # type: ignore[misc]  # the same API as torch.utils._cxx_pytree

PyTree = Any
TreeSpec = Any

# The per-call hot path (flattening arguments and outputs) uses the fast library; the
# plan-building helpers below work on torch's Python TreeSpec (see ``python_spec``).
_flatten: Callable[..., tuple[list[Any], Any]]
if _fast is not _pt:
    import optree

    # torch.utils._cxx_pytree's function with one Python call less: pmap flattens trees
    # several times per call and device.
    _flatten = functools.partial(optree.tree_flatten, none_is_leaf=True, namespace="torch")
else:  # pragma: no cover - optree not installed
    _flatten = _pt.tree_flatten

# The number of node types the Python library knew when the fast one was last brought in
# line with it (see ``_sync``).
_synced = [-1]
_sync_lock = threading.Lock()
_known_fast: set = set()


def _sync() -> None:
    """Registers with the fast library the node types only the Python one knows.

    ``torch.utils._pytree.register_dataclass`` (and other private registrations) reach
    the Python library only: without this, such a dataclass would be a leaf to funcdp but
    a node to ``torch.func``. Checked on every flatten by the count of types (one ``len``);
    the count is stored last, once every type is registered, so that another thread
    flattening meanwhile waits here rather than take a new type for a leaf.
    """
    with _sync_lock:
        nodes = _pt.SUPPORTED_NODES
        n = len(nodes)
        if n == _synced[0]:
            return
        if _fast is not _pt:
            for cls, node in list(nodes.items()):
                if isinstance(cls, type) and cls not in _known_fast:
                    try:
                        _fast._private_register_pytree_node(cls, node.flatten_fn,
                                                            node.unflatten_fn)
                    except ValueError:  # (known there already: built in, or registered
                        pass            # through torch's public function)
                    _known_fast.add(cls)
        _synced[0] = n


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """Leaves (``None`` among them) and structure of ``tree``."""
    if len(_pt.SUPPORTED_NODES) != _synced[0]:
        _sync()
    return _flatten(tree)


def tree_unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    """The tree of ``spec`` (from either pytree library) holding ``leaves``."""
    return spec.unflatten(leaves)


def tree_leaves(tree: Any) -> list[Any]:
    if len(_pt.SUPPORTED_NODES) != _synced[0]:
        _sync()
    return _fast.tree_leaves(tree)


def tree_map(fn: Callable[..., Any], tree: Any, *rests: Any, **kwargs: Any) -> Any:
    if len(_pt.SUPPORTED_NODES) != _synced[0]:
        _sync()
    return _fast.tree_map(fn, tree, *rests, **kwargs)


def tree_structure(tree: Any) -> Any:
    if len(_pt.SUPPORTED_NODES) != _synced[0]:
        _sync()
    return _fast.tree_structure(tree)


tree_flatten_with_path = _pt.tree_flatten_with_path


def python_spec(spec: Any) -> _pt.TreeSpec:
    """The Python ``TreeSpec`` of a spec from either pytree library."""
    if isinstance(spec, _pt.TreeSpec):
        return spec
    return _pt.tree_structure(_fast.tree_unflatten([0] * spec.num_leaves, spec))


def keystr(path: Sequence[Any]) -> str:
    """Formats a key path as Python indexing: ``[0]['w']``, ``.weight``."""
    out = []
    for key in path:
        if isinstance(key, _pt.SequenceKey):
            out.append(f"[{key.idx}]")
        elif isinstance(key, _pt.MappingKey):
            out.append(f"[{key.key!r}]")
        elif isinstance(key, _pt.GetAttrKey):
            out.append(f".{key.name}")
        else:
            out.append(f"[{key!r}]")
    return "".join(out)


class PrefixError(ValueError):
    """A prefix tree does not match the tree it is a prefix of.

    ``path`` is the key path where they disagree, ``reason`` says how.
    """

    def __init__(self, path: tuple, reason: str):
        super().__init__(f"at {keystr(path) or 'the root'}: {reason}")
        self.path = path
        self.reason = reason


def _describe_node(spec: TreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    typ = spec.type
    name = getattr(typ, "__name__", str(typ))
    fields = _field_names(spec)
    if fields is not None:  # (a registered dataclass: its fields, None ones apart)
        return (f"a {name} with fields {fields[0]!r}"
                + (f" (and {fields[1]!r} None)" if fields[1] else ""))
    if isinstance(spec.context, (list, tuple)) and spec.context and typ is not tuple:
        return f"a {name} with keys {list(spec.context)!r}"
    return f"a {name} of {spec.num_children} children"


def broadcast_prefix(
    prefix: PyTree,
    full_spec: TreeSpec,
    is_prefix_leaf: Callable[[Any], bool],
) -> list[Any]:
    """Expands a prefix tree to one value per leaf of ``full_spec``.

    A leaf of ``prefix`` (as decided by ``is_prefix_leaf``) stands for the whole
    subtree at its position. Raises ``PrefixError`` naming the first path where
    the prefix's structure disagrees with the full tree.
    """
    out: list[Any] = []
    full_spec = python_spec(full_spec)

    def walk(pre: Any, spec: TreeSpec, path: tuple) -> None:
        if is_prefix_leaf(pre):
            out.extend([pre] * spec.num_leaves)
            return
        pre_children, pre_spec = _pt.tree_flatten(pre, is_leaf=lambda x: x is not pre)
        if spec.is_leaf():
            raise PrefixError(
                path,
                f"the prefix has {_describe_node(pre_spec)} where the value is a leaf",
            )
        if (pre_spec.type is dict and spec.type is dict and pre_spec.context != spec.context
                and set(pre_spec.context) == set(spec.context)):
            # Plain dicts match by key, whatever their insertion order (as in JAX).
            pre_children = [pre[k] for k in spec.context]
            pre_spec = spec
        elif (pre_spec.type is spec.type and pre_spec.context != spec.context
              and _same_fields(pre_spec, spec)):
            # A registered dataclass leaves out its None fields: a prefix with None for
            # a field (an axis of None) matches a value with a tensor there.
            by_name = dict(zip(pre_spec.context[0], pre_children))
            pre_children = [by_name.get(name) for name in spec.context[0]]
            pre_spec = spec
        if pre_spec.type is not spec.type or pre_spec.context != spec.context or len(
            pre_children
        ) != spec.num_children:
            raise PrefixError(
                path,
                f"the prefix has {_describe_node(pre_spec)} where the value has "
                f"{_describe_node(spec)}",
            )
        keys = _child_keys(spec)
        for child, child_spec, key in zip(pre_children, spec.children(), keys):
            walk(child, child_spec, path + (key,))

    walk(prefix, full_spec, ())
    return out


def _same_fields(a: TreeSpec, b: TreeSpec) -> bool:
    """Whether ``a`` and ``b`` are nodes of a registered dataclass with the same fields
    (some left out as None in one, flattened in the other)."""
    fa, fb = _field_names(a), _field_names(b)
    return fa is not None and fb is not None and set(fa[0] + fa[1]) == set(fb[0] + fb[1])


def _field_names(spec: TreeSpec) -> list[list[str]] | None:
    """``[flattened, left out as None]`` field names of a node of a class registered with
    ``torch.utils._pytree.register_dataclass`` (its context), else None."""
    ctx = spec.context
    if (type(ctx) is list and len(ctx) == 2 and all(type(names) is list for names in ctx)
            and all(type(n) is str for names in ctx for n in names)):
        return ctx
    return None


def _child_keys(spec: TreeSpec) -> list[Any]:
    node = _pt.tree_unflatten([0] * spec.num_leaves, spec)
    try:
        pairs, _ = _pt.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    except ValueError:  # a node type registered without key paths: its children's numbers
        return [_pt.SequenceKey(i) for i in range(spec.num_children)]
    return [path[0] for path, _ in pairs]


def leaf_paths(spec: TreeSpec) -> list[tuple]:
    """Key paths of every leaf of ``spec``, in flattening order."""
    spec = python_spec(spec)
    dummy = _pt.tree_unflatten([0] * spec.num_leaves, spec)
    try:
        return [path for path, _ in _pt.tree_flatten_with_path(dummy)[0]]
    except ValueError:  # a node type registered without key paths (see _child_keys)
        out: list[tuple] = []

        def walk(node: TreeSpec, path: tuple) -> None:
            if node.is_leaf():
                out.append(path)
                return
            for child, key in zip(node.children(), _child_keys(node)):
                walk(child, path + (key,))

        walk(spec, ())
        return out
