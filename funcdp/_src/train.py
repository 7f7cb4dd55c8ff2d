"""The train-step helper: loss and gradients averaged over a named axis."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import internal, public
from funcdp._src.collectives import _reduction
from funcdp._src.transform_util import a_type


@public
def value_and_grad(fun: Callable, axis_name: Any = None, *, argnums: int | tuple[int, ...] = 0,
                   has_aux: bool = False, compile: bool | dict[str, Any] = False) -> Callable:
    """Like ``torch.func.grad_and_value``, returning ``(value, grads)`` averaged over devices.

    With ``axis_name``, the loss and the gradients are averaged over that axis (one
    collective for both): ``pmean(grad(loss))``, the data-parallel gradient. This is the
    right thing, and the easy thing: the tempting ``grad(lambda w: pmean(loss(w), axis))``
    gives each device its *local* gradient (the transpose of ``pmean`` over a replicated
    value divides by the device count and sums back nothing), which silently trains on
    one shard's gradient.

    Args:
        fun: the loss function; its ``argnums`` arguments are differentiated.
        axis_name: the named axis to average over (inside ``pmap`` or ``vmap``), or None.
        argnums: which positional arguments to differentiate.
        has_aux: ``fun`` returns ``(loss, aux)``; ``aux`` is returned as is (not averaged).
        compile: compile the gradient computation with ``torch.compile`` (True, or a dict
            of ``torch.compile`` keyword arguments); the average stays eager, as a
            collective must. The first call compiles.

    The average is computed into the gradients themselves where nothing else refers to
    them (as a rule: they come fresh from the backward pass), which on CPU devices is
    faster than a separate ``pmean`` of gradients you hold.

    Returns:
        A function returning ``(loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``).

    Examples:
        >>> import torch, funcdp
        >>> loss = lambda w, x: ((x * w) ** 2).mean()
        >>> step = funcdp.vmap(funcdp.value_and_grad(loss, "b"), in_axes=(None, 0), axis_name="b")
        >>> value, g = step(torch.tensor(1.0), torch.tensor([[1.0], [3.0]]))
        >>> value, g
        (tensor([5., 5.]), tensor([10., 10.]))
    """
    gv = torch.func.grad_and_value(fun, argnums=argnums, has_aux=has_aux)
    if compile is True:
        gv = torch.compile(gv)
    elif isinstance(compile, dict):
        gv = torch.compile(gv, **compile)
    elif compile is not False:
        raise TypeError(
            f"value_and_grad: compile must be True, False or a dict of torch.compile "
            f"keyword arguments; got {compile!r} ({a_type(compile)}). For a compile mode "
            f"or backend write compile={{'mode': 'max-autotune'}} or "
            f"compile={{'backend': 'aot_eager'}}.")

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        grads, value = gv(*args, **kwargs)
        aux = None
        if has_aux:
            value, aux = value
        if axis_name is not None:
            value, grads = _pmean_owned(value, grads, axis_name)
        return ((value, aux) if has_aux else value), grads

    return wrapped


@internal
def _pmean_owned(value: Any, grads: Any, axis_name: Any) -> tuple[Any, Any]:
    """``pmean((value, grads), axis_name)``, free to write the result into the gradients
    that only this call refers to (fresh from ``torch.func``), instead of a new buffer."""
    return _reduction("pmean", (value, grads), axis_name, None, "pmean",
                      _sole(tree_util.tree_leaves(grads)))


def _sole(leaves: list) -> frozenset[int]:
    """ids of the tensors in ``leaves`` that nothing else refers to: neither the tensor
    (beyond ``leaves`` and one container, the gradients' pytree) nor its memory (beyond
    the unreachable base of a view, as a transposed matmul gradient is).

    A gradient from ``torch.func`` is almost always a fresh tensor, but not always: a
    custom ``autograd.Function`` may return a tensor of the user's (or a view of one) as
    a gradient, and one tensor may be the gradient of two parameters. Those have more
    references than probe tensors held the same way, and are left alone.
    """
    ref, uses, view_uses, base_ref = _probe()
    sole = []
    for t, n in zip(leaves, _refcounts(leaves)):
        if n != ref or type(t) is not torch.Tensor:
            continue
        u = _storage_uses(t)
        if u == uses if not t._is_view() else (
                u == view_uses and sys.getrefcount(t._base) == base_ref):
            sole.append(id(t))
    return frozenset(sole)


@functools.cache
def _probe() -> tuple[int, int, int, int]:
    """The reference counts of tensors that nothing else refers to, held as ``_sole``
    sees them (they depend on the interpreter, not on the tensors)."""
    box = (torch.empty(1),)
    view = torch.empty(1, 1).t()
    return (_refcounts(list(box))[0], _storage_uses(box[0]), _storage_uses(view),
            sys.getrefcount(view._base))


def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _refcounts(xs: list) -> list[int]:
    return [sys.getrefcount(x) for x in xs]
