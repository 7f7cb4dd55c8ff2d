"""Argument handling shared by ``pmap`` and ``vmap``: axes specs and their errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from funcdp._src import tree as tree_util


def a_type(x: Any) -> str:
    """``a float`` / ``an int``: the type of ``x`` with its article, for messages."""
    name = type(x).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def is_axis_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool))


def check_axes_spec(spec: Any, call: str, arg: str) -> None:
    """Checks that every leaf of an ``in_axes``/``out_axes`` pytree is an int or None."""
    if is_axis_leaf(spec):
        return
    leaves, treedef = tree_util.tree_flatten(spec)
    if treedef.is_leaf():
        raise TypeError(
            f"{call}: `{arg}` must be an int, None, or a pytree (tuple/list/dict) of ints and "
            f"Nones, got {a_type(spec)}: {spec!r}.")
    paths = tree_util.leaf_paths(treedef)
    for path, leaf in zip(paths, leaves):
        if not is_axis_leaf(leaf):
            raise TypeError(
                f"{call}: `{arg}` leaf {arg}{tree_util.keystr(path)} is "
                f"{a_type(leaf)} ({leaf!r}); each leaf must be an int (an axis) or None "
                f"(not mapped).")


def argpath(keystr: str) -> str:
    """Renders a key path of the ``(args, kwargs)`` tree as ``args[0]['w']``."""
    if keystr.startswith("[0]"):
        return "args" + keystr[3:]
    if keystr.startswith("[1]"):
        return "kwargs" + keystr[3:]
    return keystr


def flat_in_axes(in_axes: Any, args: tuple, kwargs: dict, treedef: Any, call: str) -> list:
    """One axis (int or None) per leaf of ``(args, kwargs)``; keyword args use axis 0."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(in_axes, tuple) and len(in_axes) != len(args):
        raise ValueError(
            f"{call}: `in_axes` has one entry per positional argument, {len(in_axes)} here, "
            f"but the function was called with {plural(len(args), 'positional argument')} "
            f"(keyword arguments are always mapped over axis 0).")
    prefix = (in_axes, {k: 0 for k in kwargs})
    try:
        return tree_util.broadcast_prefix(prefix, treedef, is_axis_leaf)
    except tree_util.PrefixError as e:
        where = argpath(tree_util.keystr(e.path)) or "the arguments"
        raise ValueError(
            f"{call}: `in_axes` {in_axes!r} does not match the structure of the arguments at "
            f"{where}: {e.reason}. `in_axes` must be a prefix of the positional arguments: an "
            f"int/None for a whole argument, or a container of the same type and keys.") from None


def normalize_axis(axis: int, ndim: int, call: str, where: Callable[[], str],
                   extra: int = 0, what: str = "mapped axis") -> int:
    rank = ndim + extra
    if rank == 0:
        raise ValueError(
            f"{call}: {where()} is a scalar (rank 0) and cannot be mapped; give it "
            f"in_axes=None, or add a dimension to map over.")
    if not -rank <= axis < rank:
        raise ValueError(
            f"{call}: {what} {axis} is out of range for {where()} of rank {ndim}; valid "
            f"axes are {-rank}..{rank - 1}.")
    return axis % rank


def describe_sizes(sizes: dict[str, int]) -> str:
    return "\n".join(f"  - {path}: size {size}" for path, size in sizes.items())
