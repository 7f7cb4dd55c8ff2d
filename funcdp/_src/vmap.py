"""``funcdp.vmap``: ``torch.func.vmap`` with a named axis.

Inside ``funcdp.vmap(f, axis_name="i")`` every collective works over ``"i"``: a
``psum(x, "i")`` sums over the batch, ``axis_index("i")`` is the example's index, and
the results equal those of ``funcdp.pmap(f, axis_name="i")`` on as many devices.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch._C import _functorch

from funcdp._src import axes as axes_mod
from funcdp._src import tree as tree_util
from funcdp._src.api_util import fun_name, public
from funcdp._src.transform_util import (
    a_type,
    argpath,
    check_axes_spec,
    describe_sizes,
    flat_in_axes,
    is_axis_leaf,
    normalize_axis,
)

_RANDOMNESS = ("error", "different", "same")


@public
def vmap(fun: Any = None, in_axes: Any = 0, out_axes: Any = 0, axis_name: Any = None,
         axis_size: int | None = None, randomness: str = "error") -> Any:
    """Vectorizes ``fun`` over a batch axis, like ``torch.func.vmap``, with a named axis.

    Args:
        fun: the function to vectorize.
        in_axes: int, None, or a pytree prefix of the positional arguments (as for
            ``funcdp.pmap``); keyword arguments are mapped over axis 0, as in JAX.
        out_axes: int, None, or a pytree prefix of the output.
        axis_name: a name for the batch axis, usable in collectives inside ``fun``.
        axis_size: the batch size when no argument is mapped (or to check it).
        randomness: ``'error'``, ``'different'`` or ``'same'``, as in ``torch.func.vmap``.

    Returns:
        The vectorized function.

    Examples:
        >>> import torch, funcdp
        >>> center = funcdp.vmap(lambda v: v - funcdp.pmean(v, "b"), axis_name="b")
        >>> center(torch.tensor([1.0, 2.0, 6.0]))
        tensor([-2., -1.,  3.])
    """
    if fun is None:
        return functools.partial(vmap, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name,
                                 axis_size=axis_size, randomness=randomness)
    name = f"vmap({fun_name(fun)})"
    if not callable(fun):
        raise TypeError(f"vmap: `fun` must be callable, got {type(fun).__name__}: {fun!r}.")
    check_axes_spec(in_axes, name, "in_axes")
    check_axes_spec(out_axes, name, "out_axes")
    if randomness not in _RANDOMNESS:
        raise ValueError(f"{name}: `randomness` must be one of {_RANDOMNESS}, got "
                         f"{randomness!r}.")
    if axis_name is not None:
        axes_mod._validate_name(axis_name, name)
        if isinstance(axis_name, tuple):
            raise TypeError(f"{name}: `axis_name` must be a single name, got the tuple "
                            f"{axis_name!r}.")
    if axis_size is not None and (isinstance(axis_size, bool) or not isinstance(axis_size, int)
                                  or axis_size < 0):
        # (0 as torch.func.vmap allows: an empty batch, as a mapped argument can give.)
        raise ValueError(f"{name}: `axis_size` must be a non-negative int, got "
                         f"{axis_size!r}.")

    @functools.wraps(fun)
    def batched(*args: Any, **kwargs: Any) -> Any:
        tree = (args, kwargs)
        leaves, treedef = tree_util.tree_flatten(tree)
        axes = flat_in_axes(in_axes, args, kwargs, treedef, name)
        sizes = {}
        dims: list[int | None] = []
        device = None
        for path_i, (leaf, ax) in enumerate(zip(leaves, axes)):
            if ax is None or leaf is None:  # (None: an empty subtree, as in pmap and JAX)
                dims.append(None)
                continue
            if not isinstance(leaf, torch.Tensor):
                where = argpath(tree_util.keystr(tree_util.leaf_paths(treedef)[path_i]))
                fix = ("pass it positionally with in_axes=None for it, or let the function "
                       "capture it" if where.startswith("kwargs") else "use in_axes=None for it")
                raise TypeError(
                    f"{name}: argument {where} is {a_type(leaf)} mapped "
                    f"over axis {ax}; only tensors can be mapped ({fix}).")
            a = normalize_axis(ax, leaf.ndim, name, lambda: argpath(
                tree_util.keystr(tree_util.leaf_paths(treedef)[path_i])))
            dims.append(a)
            sizes[path_i] = leaf.shape[a]
            device = device or leaf.device
        distinct = set(sizes.values())
        if len(distinct) > 1:
            paths = tree_util.leaf_paths(treedef)
            raise ValueError(f"{name}: mapped arguments have different sizes along their "
                             f"mapped axes:\n" + describe_sizes(
                                 {argpath(tree_util.keystr(paths[i])): s
                                  for i, s in sizes.items()}))
        size = distinct.pop() if distinct else None
        if axis_size is not None:
            if size is not None and size != axis_size:
                raise ValueError(f"{name}: `axis_size`={axis_size} but the mapped arguments have "
                                 f"size {size}.")
            size = axis_size
        if size is None:
            raise ValueError(f"{name}: no argument is mapped (every in_axes entry is None); map "
                             f"at least one argument or pass `axis_size`.")
        dummy = not sizes
        if dummy:
            leaves = leaves + [torch.empty(size, 0)]
            dims = dims + [0]

        holder: dict = {}

        def flat_fun(*flat: Any) -> Any:
            if dummy:
                flat = flat[:-1]
            a, k = tree_util.tree_unflatten(list(flat), treedef)
            if axis_name is None:
                out = fun(*a, **k)
            else:
                with axes_mod.vmap_level(size, device) as comp, \
                        axes_mod.bind(axes_mod.VmapFrame(axis_name, comp)):
                    out = fun(*a, **k)
            # torch.func.vmap returns tensors only: None leaves are put back below, and
            # each output's out_axes is applied after (all come out batched at 0 first).
            out_leaves, out_def = tree_util.tree_flatten(out)
            holder["def"] = out_def
            holder["present"] = present = [x is not None for x in out_leaves]
            level = _functorch.maybe_current_level()
            holder["unbatched"] = [
                not (_functorch.is_batchedtensor(x) and _functorch.maybe_get_level(x) == level)
                if isinstance(x, torch.Tensor) else True for x in out_leaves]
            return tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
                         for x, p in zip(out_leaves, present) if p)

        outs = torch.func.vmap(flat_fun, in_dims=tuple(dims), out_dims=0,
                               randomness=randomness)(*leaves)
        return _place_out_axes(name, out_axes, outs, holder)

    batched.__wrapped__ = fun  # type: ignore[attr-defined]
    return batched



def _place_out_axes(name: str, out_axes: Any, outs: tuple, holder: dict) -> Any:
    out_def = holder["def"]
    try:
        axes = tree_util.broadcast_prefix(out_axes, out_def, is_axis_leaf)
    except tree_util.PrefixError as e:
        raise ValueError(f"{name}: `out_axes` {out_axes!r} does not match the structure of "
                         f"the output at out{tree_util.keystr(e.path)}: {e.reason}.") from None
    it = iter(outs)
    leaves: list[Any] = []
    for j, (ax, present, unbatched) in enumerate(zip(axes, holder["present"],
                                                     holder["unbatched"])):
        if not present:
            leaves.append(None)
            continue
        t = next(it)

        def where(j: int = j) -> str:
            path = tree_util.keystr(tree_util.leaf_paths(out_def)[j])
            return f"output{path}" if path else "the output"

        if ax is None:
            if not unbatched:
                raise ValueError(
                    f"{name}: out_axes=None for {where()}, but it varies along the mapped "
                    f"axis; give it an integer out_axes, or make it the same for every "
                    f"element (e.g. with funcdp.pmean).")
            leaves.append(t[0])
        else:
            leaves.append(t.movedim(0, normalize_axis(ax, t.ndim - 1, name, where, extra=1,
                                                       what="out_axes entry")))
    return tree_util.tree_unflatten(leaves, out_def)
