"""The train-step helper: loss and gradients averaged over a named axis."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
import torch.utils._pytree as _pt
from torch._C import _functorch

from funcdp._src import axes as axes_mod
from funcdp._src import executor as executor_mod
from funcdp._src import tree as tree_util
from funcdp._src.api_util import internal, public
from funcdp._src.collectives import (
    _PARALLEL_MIN_NUMEL,
    HAS_STORAGE_USES,
    _free_uses,
    _reduction,
    _unpack_dual,
)
from funcdp._src.collectives import storage_uses as _storage_uses
from funcdp._src.optim import is_transformation, not_a_transformation, step_of, step_of_mean
from funcdp._src.shared_update import _SHARED_MIN_NUMEL, Mean
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
            collective must. The first call compiles. ``fun`` must be code torch.compile
            can trace: a ``funcdp.nn.functional`` module's ``apply`` is not (nothing is
            compiled then, and every call is slower than eager).

    Two things make it faster than ``pmean`` of a ``torch.func.grad_and_value`` you call
    yourself. Where nothing encloses it that ``torch.func`` would have to see (a transform,
    an argument that requires grad), it differentiates with ``torch.autograd``: the same
    kernels, so the same result bit for bit, without ``torch.func``'s layer around every
    operation. And the average is computed into the gradients themselves where nothing
    else refers to them (as a rule: they come fresh from the backward pass).

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
    _check_fun_and_argnums(fun, argnums, "funcdp.value_and_grad")
    gv = torch.func.grad_and_value(fun, argnums=argnums, has_aux=has_aux)
    # (Compiled, the torch.func function is the fast one.)
    fast = (functools.partial(_by_autograd, fun, argnums, has_aux) if compile is False
            else None)
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
        # (One expression: no reference to the pair outlives it, see _sole.)
        grads, value = (fast and fast(args, kwargs)) or gv(*args, **kwargs)
        aux = None
        if has_aux:
            value, aux = value
        if axis_name is not None:
            value, grads = _pmean_owned(value, grads, axis_name)
        return ((value, aux) if has_aux else value), grads

    return wrapped


def _check_fun_and_argnums(fun: Any, argnums: Any, call: str) -> None:
    if not callable(fun):
        raise TypeError(f"{call}: `fun` must be callable (the loss function), got "
                        f"{a_type(fun)}: {fun!r}.")
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    if not nums or any(isinstance(a, bool) or not isinstance(a, int) for a in nums):
        raise TypeError(f"{call}: `argnums` must be an int or a non-empty tuple of ints (the "
                        f"positions of the arguments to differentiate), got "
                        f"{a_type(argnums)}: {argnums!r}.")


@public
def value_and_update(fun: Callable, optimizer: Any, axis_name: Any = None, *,
                     has_aux: bool = False, compile: bool | dict[str, Any] = False) -> Callable:
    """A whole training step: the loss, its gradients averaged over ``axis_name``, and the
    optimizer's update, applied. Faster than writing it out, and the same, bit for bit.

    ``value_and_update(fun, optimizer, axis_name)(params, opt_state, *args, **kwargs)``
    returns ``(value, new_params, new_opt_state)``, where::

        value, grads = value_and_grad(fun, axis_name, has_aux=has_aux)(params, *args, **kwargs)
        new_params, new_opt_state = optimizer.step(grads, opt_state, params,
                                                   axis_name=axis_name)

    Written out, that is two collective rounds: the average of the gradients, then the
    update shared by the devices. Here the devices meet once, inside pmap over virtual CPU
    devices, with ``funcdp.optim``'s ``sgd``, ``adam`` and ``adamw`` (or a ``chain`` of
    one of them alone): each device averages the gradients of the large parameters dealt
    to it and updates them at once; the loss and the small parameters are averaged and
    updated once, by the device dealt the fewest large ones, meanwhile; the new large
    parameters are written into the buffer that held their averaged gradients (still in
    cache). On the 2-device
    benchmark: 4-6 % faster than written out on the MLP step, 2-13 % on the tiny one,
    and on the deep one (102 small tensors) from 3 % slower to 7 % faster, varying from
    run to run. Elsewhere (a
    ``chain`` with a clip before the optimizer, a custom optimizer, GPUs, several
    processes, a gradient taken through the step, a named ``vmap`` axis) it runs the two
    rounds, as written above.

    Args:
        fun: the loss function; its first argument, the parameters, is differentiated.
        optimizer: a ``funcdp.optim`` optimizer (a ``GradientTransformation``), or an
            object of your own with ``init(params)`` and ``update(grads, state, params)``
            (its updates are added with ``funcdp.optim.apply_updates``).
        axis_name: the named axis to average over (inside ``pmap`` or ``vmap``), or None:
            then the step is ``optimizer.step`` of this device's own gradients.
        has_aux: ``fun`` returns ``(loss, aux)``; ``aux`` is returned as is (not averaged).
        compile: compile the gradient computation with ``torch.compile``, as for
            ``value_and_grad``.

    Returns:
        A function ``(params, opt_state, *args, **kwargs) -> (value, params, opt_state)``
        (``value`` is ``(loss, aux)`` with ``has_aux``).

    Examples:
        >>> import torch, funcdp
        >>> opt = funcdp.optim.sgd(0.5)
        >>> loss = lambda w, x: ((x * w) ** 2).mean()
        >>> step = funcdp.pmap(funcdp.value_and_update(loss, opt, "i"), axis_name="i",
        ...                    in_axes=(None, None, 0), out_axes=None,
        ...                    devices=funcdp.local_devices()[:2])
        >>> value, w, state = step(torch.tensor(1.0), opt.init(torch.tensor(1.0)),
        ...                        torch.tensor([[1.0], [3.0]]))
        >>> value, w
        (tensor(5.), tensor(-4.))
    """
    if not callable(fun):
        raise TypeError(f"value_and_update: `fun` must be the loss function (a callable), got "
                        f"{a_type(fun)}.")
    if not is_transformation(optimizer):
        raise TypeError(
            f"value_and_update: `optimizer` must be a funcdp.optim optimizer (a "
            f"GradientTransformation such as funcdp.optim.sgd(0.1), or an object of your own "
            f"with init(params) and update(grads, state, params)), got "
            f"{not_a_transformation(optimizer)}. A torch.optim optimizer updates parameters "
            f"in place; funcdp's return new ones.")
    grad_fn = value_and_grad(fun, None, has_aux=has_aux, compile=compile)
    reduce = functools.partial(_pmean_owned, axis_name=axis_name)
    name = f"value_and_update({getattr(fun, '__name__', type(fun).__name__)})"

    def step(params: Any, opt_state: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        value, grads = grad_fn(params, *args, **kwargs)
        if axis_name is None:
            params, opt_state = step_of(optimizer, grads, opt_state, params)
            return value, params, opt_state
        # (Only a large leaf may hold the average: see shared_update.)
        mean = Mean(value[0] if has_aux else value, reduce, name,
                    _owned(grads, axis_name, name, _SHARED_MIN_NUMEL))
        # (grads: no other reference, so that a round of their own may average in place.)
        params, opt_state = step_of_mean(optimizer, grads, opt_state, params, axis_name, mean)
        return ((mean.result, value[1]) if has_aux else mean.result), params, opt_state

    # (Not functools.wraps: the step's arguments are not the loss function's.)
    step.__name__ = step.__qualname__ = name
    return step


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# torch's autograd engine, as ``torch.autograd.grad`` calls it: ``(outputs, grad_outputs,
# retain_graph, create_graph, inputs, allow_unused, accumulate_grad)``. Called where the
# device's random routing is in effect, the backward pass runs under it too.
_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None) or (
    lambda outs, gos, retain, create, inputs, unused, _acc: torch.autograd.grad(
        outs, inputs, gos, retain_graph=retain, create_graph=create, allow_unused=unused))
# The autograd node of a leaf tensor (its ``variable``); only these nodes have one.
_ACCUMULATE_GRAD: Any = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


def _by_autograd(fun: Callable, argnums: Any, has_aux: bool, args: tuple,
                 kwargs: dict) -> tuple[Any, Any] | None:
    """``torch.func.grad_and_value(fun, argnums, has_aux)(*args, **kwargs)``, computed
    with ``torch.autograd`` where that gives the same result: outside ``torch.func``
    transforms and inference mode, with no argument that requires grad, and plain
    floating-point tensors (not inference tensors, without forward-mode tangents) to
    differentiate. Returns None, having run nothing, elsewhere.

    The same kernels run either way, so the values are the same bit for bit; ``torch.func``
    adds a layer around every operation and its derivative, and its own Python around
    the call, which with several devices contending for the GIL cost about 0.5 ms of the
    2-device MLP benchmark step (3 %). What ``torch.func`` would leave connected to the
    caller's autograd graph (results that depend on captured tensors that require grad,
    when grad mode is on) is found by walking the graph, and stays connected (gradients
    are then made with ``create_graph``); everything else is detached, as ``torch.func``
    unwraps it. Errors are ``torch.func``'s, raised at the same points.
    """
    prepared = _prepare(argnums, args, kwargs)
    if prepared is None:
        return None
    new_args, graph, xs, diff = prepared
    # Under grad mode, as ``torch.enable_grad()`` (written out: entering and leaving it
    # are two tensor calls, each a Python call under the device's routing mode, while
    # grad mode is almost always on already).
    grad_was = torch.is_grad_enabled()
    if not grad_was:
        torch.set_grad_enabled(True)
    try:
        # The loss function runs under the modes in effect (inside pmap, the device's
        # random routing); the bookkeeping around it, a few tensor calls per
        # differentiated leaf, runs without that mode (see ``internal``). The backward
        # pass runs under it again: random draws there (a custom backward, a gradient
        # hook, a checkpointed forward pass recomputed) are the device's too.
        loss, aux, keep, ones = _before_backward(fun(*new_args, **kwargs), graph, xs,
                                                 has_aux)
        # ``torch.autograd.grad(loss, xs, allow_unused=True, create_graph=keep)`` without
        # its Python (which would run under the mode, a Python call per tensor call).
        found = (_run_backward((loss,), (ones,), keep, keep, tuple(xs), True, False)
                 if ones is not None else (None,) * len(xs))
    finally:
        if torch.is_grad_enabled() != grad_was:
            torch.set_grad_enabled(grad_was)
    return _after_backward(found, loss, aux, keep, graph, xs, diff, argnums, has_aux)


@internal
def _prepare(argnums: Any, args: tuple, kwargs: dict) -> tuple | None:
    """``_by_autograd``'s checks, and the aliases of the differentiated leaves that
    require grad: ``(new_args, graph, xs, diff)``, or None where torch.func is needed."""
    if _functorch.maybe_current_level() is not None or torch.is_inference_mode_enabled():
        return None
    nums = (argnums,) if type(argnums) is int else argnums
    if (type(nums) is not tuple or not nums or len(set(nums)) != len(nums)
            or any(type(i) is not int or not 0 <= i < len(args) for i in nums)):
        return None  # torch.func words the error
    for t in tree_util.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return None
    diff = [tree_util.tree_flatten(args[i]) for i in nums]
    # (A forward-mode tangent on another argument carries through by itself. Only a level
    # the caller opened can hold one here: at the level pmap opens for its devices' jvps,
    # tangents live only inside those jvps, where torch.func is needed anyway.)
    level = executor_mod.caller_forward_level()
    for leaves, _ in diff:
        for t in leaves:
            if (type(t) not in _PLAIN or not t.is_floating_point() or t.is_inference()
                    or (level >= 0 and _unpack_dual(t, level)[1] is not None)):
                return None
    new_args = list(args)
    graph = _Graph(torch.is_grad_enabled())
    xs: list[torch.Tensor] = []
    for i, (leaves, spec) in zip(nums, diff):
        mine = [graph.own(t) for t in leaves]
        xs += mine
        new_args[i] = tree_util.tree_unflatten(mine, spec)
    return new_args, graph, xs, diff


@internal
def _before_backward(out: Any, graph: _Graph, xs: list[torch.Tensor],
                     has_aux: bool) -> tuple[torch.Tensor, Any, bool, torch.Tensor | None]:
    """``(loss, aux, keep, ones)`` of the loss function's output ``out``: ``keep`` says
    whether the gradients must stay connected to the caller's graph (``create_graph``);
    ``ones`` is the loss's cotangent, None where the loss does not require grad."""
    loss, aux = _split_output(out, has_aux)
    if any(x.grad is not None for x in xs):
        raise RuntimeError(
            "value_and_grad: the loss function called backward() on a result that "
            "depends on the differentiated arguments; as inside torch.func transforms, "
            "that is not supported. Return the loss instead: value_and_grad computes "
            "the gradients.")
    aux_leaves = _pt.tree_leaves(aux) if has_aux else []
    keep = graph.recording and (graph.reaches_outer(loss)
                                or any(graph.reaches_outer(a) for a in aux_leaves))
    if loss.is_complex():  # (torch.autograd.grad's error, which the engine does not make)
        raise RuntimeError(
            f"grad can be implicitly created only for real scalar outputs but got "
            f"{loss.dtype}")
    ones = torch.ones_like(loss, memory_format=torch.preserve_format) if loss.requires_grad \
        else None
    return loss, aux, keep, ones


@internal
def _after_backward(found: Any, loss: torch.Tensor, aux: Any, keep: bool, graph: _Graph,
                    xs: list[torch.Tensor], diff: list, argnums: Any,
                    has_aux: bool) -> tuple[Any, Any]:
    """The gradients ``found`` and the value, as ``_by_autograd`` returns them."""
    grads = [torch.zeros_like(x) if g is None else graph.unwrap(g) if keep else g
             for g, x in zip(found, xs)]
    value = graph.unwrap(loss)
    if has_aux:
        value = (value, _pt.tree_map(graph.unwrap, aux))
    per_arg = []
    start = 0
    for leaves, spec in diff:
        per_arg.append(tree_util.tree_unflatten(grads[start:start + len(leaves)], spec))
        start += len(leaves)
    return (per_arg[0] if type(argnums) is int else tuple(per_arg)), value


def _split_output(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
    """``(loss, aux)`` of the loss function's output, checked as ``torch.func`` does."""
    aux = None
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise RuntimeError(
                "grad_and_value(f)(*args): output of function f should be a tuple: "
                "(output, aux) if has_aux is True")
        out, aux = out
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(
            f"grad_and_value(f)(*args): Expected f(*args) to return a Tensor, got {type(out)}")
    if out.dim() != 0:
        raise RuntimeError(
            f"grad_and_value(f)(*args): Expected f(*args) to return a scalar Tensor, got "
            f"tensor with {out.dim()} dims. Maybe you wanted to use the vjp or jacrev APIs "
            f"instead?")
    for a in _pt.tree_leaves(aux) if has_aux else ():
        if not isinstance(a, torch.Tensor):
            raise RuntimeError(f"Expected tensors, got unsupported type {type(a)}")
    return out, aux


class _Graph:
    """The autograd graph of one ``_by_autograd`` call: its own inputs (detached aliases
    of the caller's tensors, which require grad), and which tensors reach leaves other
    than those (captured tensors that require grad)."""

    def __init__(self, recording: bool) -> None:
        self.recording = recording  # the caller's grad mode
        self.originals: dict[int, torch.Tensor] = {}
        self.inner: set[Any] = set()  # nodes known to reach no other leaf

    def own(self, t: torch.Tensor) -> torch.Tensor:
        x = t.detach().requires_grad_()
        self.originals[id(x)] = t
        return x

    def reaches_outer(self, t: Any) -> bool:
        fn: Any = t.grad_fn if isinstance(t, torch.Tensor) else None
        if fn is None:
            return (isinstance(t, torch.Tensor) and t.requires_grad
                    and id(t) not in self.originals)
        originals, inner = self.originals, self.inner
        seen: set[Any] = set()
        stack: list[Any] = [fn]
        while stack:  # (a node or two per layer of the model: kept lean)
            fn = stack.pop()
            if fn in seen or fn in inner:
                continue
            seen.add(fn)
            if type(fn) is _ACCUMULATE_GRAD:  # a leaf
                var = fn.variable
                if var is not None and id(var) not in originals:
                    return True
                continue
            stack += [f for f, _ in fn.next_functions if f is not None]
        inner |= seen
        return False

    def unwrap(self, x: Any) -> Any:
        """``x`` as ``torch.func`` returns it: the caller's own tensor for an input;
        detached (keeping a forward-mode tangent) unless the caller records and it
        depends on captured tensors that require grad."""
        if not isinstance(x, torch.Tensor):
            return x
        original = self.originals.get(id(x))
        if original is not None:
            return original
        if not x.requires_grad or (self.recording and self.reaches_outer(x)):
            return x
        level = executor_mod.caller_forward_level()  # (as in _prepare)
        tangent = _unpack_dual(x, level)[1] if level >= 0 else None
        x = x.detach()
        return x if tangent is None else _fwad.make_dual(x, tangent)


@internal
def _pmean_owned(value: Any, grads: Any, axis_name: Any) -> tuple[Any, Any]:
    """``pmean((value, grads), axis_name)``, free to write the result into the gradients
    that only this call refers to (fresh from the backward pass), instead of a new buffer."""
    return _reduction("pmean", (value, grads), axis_name, None, "pmean",
                      _owned(grads, axis_name))


@internal
def _owned(grads: Any, axis_name: Any, call: str = "pmean",
           min_numel: int = 0) -> frozenset[int]:
    """ids of the leaves of ``grads`` (of ``min_numel`` elements or more) that nothing but
    ``grads`` refers to (see ``_sole``). Only for a reduction large enough to be computed
    in parallel; smaller ones skip the check, which costs a few microseconds per leaf."""
    leaves = tree_util.tree_leaves(grads)
    # (Over one participant the average is the identity: nothing is written.)
    big = (axes_mod.size_of(axes_mod.resolve(axis_name, call)[0]) > 1
           and sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))
           >= _PARALLEL_MIN_NUMEL)
    if not big:
        return frozenset()
    if min_numel:
        # (One list of the leaves, as _sole counts references.)
        leaves = [t for t in leaves if not isinstance(t, torch.Tensor) or t.numel() >= min_numel]
    return _sole(leaves)


def _sole(leaves: list) -> frozenset[int]:
    """ids of the tensors in ``leaves`` that nothing else refers to: neither the tensor
    (beyond ``leaves`` and one container, the gradients' pytree) nor its memory (beyond
    the unreachable base of a view, as a transposed matmul gradient is).

    A gradient from the backward pass is almost always a fresh tensor, but not always: a
    custom ``autograd.Function`` may return a tensor of the user's (or a view of one, or
    a NumPy array's memory) as a gradient, and one tensor may be the gradient of two
    parameters. Those have more references than probe tensors held the same way (or
    memory torch did not allocate), and are left alone.
    """
    if _functorch.maybe_current_level() is not None or not HAS_STORAGE_USES:
        return frozenset()  # wrapped tensors (and the reduction is not the direct one)
    ref, uses, view_uses, base_ref = _probe()
    sole = []
    for t, n in zip(leaves, _refcounts(leaves)):
        # (Memory torch did not allocate, such as a NumPy array's, is never anyone's
        # alone: its storage is not resizable.)
        if n != ref or type(t) is not torch.Tensor or not t.is_cpu:
            continue
        if not t.untyped_storage().resizable():
            continue
        u = _storage_uses(t)  # (with a storage object the user holds, from t.storage())
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
    return (_refcounts(list(box))[0], _free_uses(), _storage_uses(view),
            sys.getrefcount(view._base))


def _refcounts(xs: list) -> list[int]:
    return [sys.getrefcount(x) for x in xs]
