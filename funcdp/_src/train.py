"""The train-step helper: loss and gradients averaged over a named axis."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from funcdp._src.api_util import public
from funcdp._src.collectives import pmean


@public
def value_and_grad(fun: Callable, axis_name: Any = None, *, argnums: int | tuple[int, ...] = 0,
                   has_aux: bool = False) -> Callable:
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

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        grads, value = gv(*args, **kwargs)
        aux = None
        if has_aux:
            value, aux = value
        if axis_name is not None:
            value, grads = pmean((value, grads), axis_name)
        return ((value, aux) if has_aux else value), grads

    return wrapped
