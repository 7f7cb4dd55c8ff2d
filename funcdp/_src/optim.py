"""Functional optimizers: pure ``init``/``update`` pairs on multi-tensor kernels.

Each optimizer is a ``GradientTransformation``: ``state = opt.init(params)`` and
``updates, state = opt.update(grads, state, params)``; ``apply_updates(params, updates)``
adds the updates. Nothing is modified in place, so the state can be replicated across
devices, passed through ``pmap`` and checkpointed as a pytree (dicts of tensors). The
arithmetic is that of ``torch.optim`` (``SGD``, ``Adam``, ``AdamW``), on ``torch._foreach_*``
kernels, so results agree with ``torch.optim`` step for step.

Learning rates may be numbers or schedules (``step -> lr`` functions, see
``funcdp.optim`` ``constant``/``linear_warmup``/``cosine_decay``/...).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import torch
from torch._C import _functorch

from funcdp._src import shared_update
from funcdp._src import tree as tree_util
from funcdp._src.api_util import public_in
from funcdp._src.transform_util import a_type

_public = public_in("funcdp.optim")


class _Foreach:
    """``torch._foreach_*`` kernels, per tensor under ``torch.func`` transforms.

    The multi-tensor kernels have no vmap batching rules; inside ``vmap`` (an ensemble of
    models trained at once, say) the same arithmetic runs one tensor at a time, with the
    same results.
    """

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fast = getattr(torch, f"_foreach_{name}")
        inplace = name.endswith("_")
        if inplace:
            one = getattr(torch.Tensor, name)
        else:
            one = torch.linalg.vector_norm if name == "norm" else getattr(torch, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            if not args[0]:  # (a tree without leaves: torch's kernels reject empty lists)
                return None if inplace else []
            # Inside any transform some leaf may be wrapped (not necessarily the first).
            if _functorch.maybe_current_level() is None:
                return fast(*args, **kwargs)
            lists = [a for a in args if isinstance(a, (list, tuple))]
            n = len(lists[0])
            cols = [a if isinstance(a, (list, tuple)) else [a] * n for a in args]
            out = [one(*row, **kwargs) for row in zip(*cols)]
            return None if inplace else out

        setattr(self, name, run)
        return run


_foreach = _Foreach()

Schedule = Callable[[torch.Tensor], Any]


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state``, ``update(grads, state, params)``.

    ``step(grads, state, params) -> (new_params, state)`` is ``update`` followed by
    ``apply_updates``, fused into one multi-tensor kernel where the optimizer allows
    (half the memory traffic of the two steps: use it in training loops).

    A gradient leaf that is None (a parameter without a gradient) leaves its parameter
    and its state as they are, as ``torch.optim`` skips a parameter whose ``.grad`` is
    None; its update is None. The state's step counts every update all the same.
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    fused: Callable[..., tuple[Any, Any]] | None = None

    def step(self, grads: Any, state: Any, params: Any, *,
             axis_name: Any = None) -> tuple[Any, Any]:
        """``(new_params, new_state)``: the update, applied.

        Args:
            grads: the gradients, as for ``update``.
            state: the optimizer state, as for ``update``.
            params: the parameters, as for ``update``.
            axis_name: inside ``pmap``, the axis over which ``grads``, ``state`` and
                ``params`` are replicated (the axis ``value_and_grad`` averaged over).
                The devices of the axis then share the work of the update (on virtual
                CPU devices): each updates some of the large leaves and all receive the
                same results, one tensor each in shared memory (so 8 devices hold one
                copy of the new parameters, not 8). Where that cannot be done
                exactly (values that differ between devices, a gradient taken through
                the step, GPUs, several processes) every device computes the whole
                update, as without it.

        Examples:
            >>> import torch, funcdp
            >>> opt = funcdp.optim.sgd(0.5)
            >>> params = {"w": torch.ones(2)}
            >>> step = funcdp.pmap(
            ...     lambda g, s, p: opt.step(funcdp.pmean(g, "i"), s, p, axis_name="i")[0],
            ...     axis_name="i", in_axes=(0, None, None), out_axes=None,
            ...     devices=funcdp.local_devices()[:2])
            >>> step({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, opt.init(params), params)
            {'w': tensor([ 0.0000, -0.5000])}
        """
        if self.fused is not None:
            return self.fused(grads, state, params, axis_name)
        updates, state = self.update(grads, state, params)
        return apply_updates(params, updates), state


GradientTransformation.__module__ = "funcdp.optim"


def _flat(tree: Any) -> tuple[list[torch.Tensor], Any]:
    return tree_util.tree_flatten(tree)


def _scalar(v: Any) -> Any:
    """A schedule's value as a Python float when it is one, for the foreach kernels."""
    # Only on the CPU: reading a GPU scalar would synchronise the device every step.
    if (isinstance(v, torch.Tensor) and v.ndim == 0 and v.device.type == "cpu"
            and not _traced(v)):
        return v.item()
    return v


def _scale(xs: list[torch.Tensor], s: Any) -> list[torch.Tensor]:
    if isinstance(s, torch.Tensor):
        return [x * s for x in xs]
    return list(_foreach.mul(xs, s))


def _zeros_like(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) for x in xs]


def _check_lr(lr: Any, name: str) -> None:
    if callable(lr):
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"funcdp.optim.{name}: `lr` must be a non-negative number or a "
                         f"schedule (a function of the step), got {lr!r}.")


def _lr_value(lr: float | Schedule, step: torch.Tensor, name: str) -> Any:
    """The learning rate of update ``step``: ``lr`` or the schedule's value, a Python
    float where it is one (see ``_scalar``), checked to be non-negative. (A tensor left
    as one, on a GPU or under a transform, is not: reading it would synchronise.)"""
    if not callable(lr):
        return lr
    v = _scalar(lr(step))
    if (type(v) is float and v >= 0) or isinstance(v, torch.Tensor):
        return v
    x = _real(v)  # (a NumPy array of one number is read as that number)
    if x is not None and x >= 0:
        return x
    raise ValueError(
        f"funcdp.optim.{name}: the learning-rate schedule `lr` returned {v!r} for step "
        f"{int(step)}; a learning rate must be a non-negative number. Check the schedule's "
        f"arguments (funcdp.optim's schedules check theirs when made), or keep its values "
        f"non-negative (clamp them at 0).")


def _check_nonnegative(name: str, **values: Any) -> None:
    """Each of ``values`` a non-negative number, as ``torch.optim`` requires."""
    for arg, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"funcdp.optim.{name}: `{arg}` must be a non-negative number, got "
                             f"{v!r}.")


@_public
def apply_updates(params: Any, updates: Any) -> Any:
    """Returns ``params + updates`` leafwise (new tensors; nothing is modified).

    A None update (that of a parameter whose gradient was None) leaves its parameter as
    it is.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.optim.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
        {'w': tensor([0.5000, 0.5000])}
    """
    p, spec = _flat(params)
    u, uspec = _flat(updates)
    if spec != uspec:
        raise ValueError(f"funcdp.optim.apply_updates: `updates` has structure {uspec}, but "
                         f"`params` has {spec}.")
    try:
        return tree_util.tree_unflatten(list(_foreach.add(p, u)) if p else [], spec)
    except TypeError:  # (a leaf that is not a tensor: a None update, say)
        keep = _tensor_leaves(u, spec, "apply_updates", "updates")
        for i in keep:
            if not isinstance(p[i], torch.Tensor):
                path = _leaf_path(spec, i)
                raise TypeError(
                    f"funcdp.optim.apply_updates: params{path} is {_a(p[i])}, not a tensor, "
                    f"but its update updates{path} is a tensor.") from None
        new = _foreach.add([p[i] for i in keep], [u[i] for i in keep])
        return tree_util.tree_unflatten(_put(p, keep, new), spec)


def _tensor_leaves(leaves: list, spec: Any, call: str, what: str) -> list[int]:
    """The positions of the tensors among ``leaves`` (of the tree ``what``, of structure
    ``spec``), the others being None; raises for another leaf."""
    keep = []
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            keep.append(i)
        elif x is not None:
            raise TypeError(
                f"funcdp.optim.{call}: {what}{_leaf_path(spec, i)} is {a_type(x)}, not a "
                f"tensor. The leaves of `{what}` are tensors, or None for a parameter "
                f"without a gradient; convert it with torch.as_tensor.") from None
    return keep


@_public
def sgd(lr: float | Schedule, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False) -> GradientTransformation:
    """Stochastic gradient descent with the semantics of ``torch.optim.SGD``.

    Examples:
        >>> import torch, funcdp
        >>> opt = funcdp.optim.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.ones(2)}, state, params)
        >>> updates
        {'w': tensor([-0.1000, -0.1000])}
    """
    _check_lr(lr, "sgd")
    _check_nonnegative("sgd", momentum=momentum, dampening=dampening,
                       weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("funcdp.optim.sgd: nesterov momentum requires momentum > 0 and "
                         "dampening = 0 (as in torch.optim.SGD).")

    keys = ("momentum",) if momentum else ()

    def init(params: Any) -> dict:
        p, spec = _check_params(params, "sgd")
        state: dict = {"step": torch.zeros((), dtype=torch.int64)}
        if momentum:
            state["momentum"] = tree_util.tree_unflatten(_zeros_like(p), spec)
        return state

    def direction(step: torch.Tensor, g: list, p: list, *buf: list):
        """The descent direction and the new momentum buffers (elementwise per leaf)."""
        if maximize:
            g = list(_foreach.neg(g))
        if weight_decay:
            g = list(_foreach.add(g, p, alpha=weight_decay))
        if not momentum:
            return g, ()
        (old,) = buf
        first = step == 1
        blended = _foreach.add(_foreach.mul(old, momentum), g, alpha=1 - dampening)
        # torch.optim.SGD starts the buffer at the first gradient (no dampening).
        new_buf = [torch.where(first, gi, bi) for gi, bi in zip(g, blended)]
        g = list(_foreach.add(g, new_buf, alpha=momentum)) if nesterov else new_buf
        return g, (new_buf,)

    def update(grads: Any, state: dict, params: Any = None) -> tuple[Any, dict]:
        x = _inputs(grads, state, params, keys, weight_decay, "sgd", False)
        step = state["step"] + 1
        lr_t = _lr_value(lr, step, "sgd")
        d, bufs = direction(step, x.g, x.p, *x.states)
        updates = _scale(d, -lr_t) if isinstance(lr_t, torch.Tensor) else list(
            _foreach.mul(d, -lr_t))
        return x.updates(updates), x.state(step, keys, bufs)

    @_takes_mean
    def fused(grads: Any, state: dict, params: Any, axis_name: Any = None,
              mean: shared_update.Mean | None = None):
        x = _inputs(grads, state, params, keys, weight_decay, "sgd", True)
        step = state["step"] + 1
        lr_t = _lr_value(lr, step, "sgd")

        def kernel(g: list, p: list, *buf: list, scratch: bool = False):
            d, new_bufs = direction(step, g, p, *buf)
            if isinstance(lr_t, torch.Tensor):
                return ([pi - lr_t * di for pi, di in zip(p, d)], *new_bufs)
            into = _into(g, p, d) if scratch else None
            return (_foreach_into("add", into, p, d, alpha=-lr_t), *new_bufs)

        new, *bufs = _shared_step(kernel, x.g, x.p, x.states, axis_name,
                                  "funcdp.optim.sgd step", mean, (step, lr_t))
        return x.params(new), x.state(step, keys, bufs)

    return GradientTransformation(init, update, fused)


def _shared_step(kernel: Callable, g: list, p: list, state: list, axis_name: Any,
                 call: str, mean: shared_update.Mean | None = None,
                 scalars: tuple = ()) -> list:
    """``kernel(g, p, *state) -> (new_p, *new_state)``, shared over ``axis_name`` where
    the devices can share it (see ``shared_update``); with ``mean``, on the average of
    the devices' ``g``. ``scalars``: the values other than those lists that the kernel
    uses (the step, the learning rate): it is shared only where they are equal too."""
    return shared_update.elementwise(kernel, [g, p, *state], list(range(1, 2 + len(state))),
                                     axis_name, call, mean, scalars)


def _into(scratch: list[torch.Tensor], p: list[torch.Tensor],
          *operands: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Where a kernel called with ``scratch=True`` may write each new parameter: into the
    leaf of ``scratch`` (the average of the gradients, a buffer of the shared update's
    own that nothing needs once the kernel has read it) where the parameter is large
    (``_INTO_MIN_NUMEL``), ``scratch`` has its shape, dtype and contiguous layout (the
    layout the new tensor would have) and the kernel's other ``operands`` its shape and
    dtype (no broadcasting or promotion); elsewhere None (a new tensor). Writing there
    instead of into new memory saves fetching that memory into the cache: 3-4 % of the
    MLP step with 2 devices, measured on 2 cores. The kernels are the same, so are the
    results, bit for bit."""
    return [s if (t.numel() >= _INTO_MIN_NUMEL and s.shape == t.shape
                  and s.dtype == t.dtype and t.is_contiguous() and s.is_contiguous()
                  and all(o.shape == t.shape and o.dtype == t.dtype for o in others))
            else None
            for s, t, *others in zip(scratch, p, *operands)]


# Smaller leaves are updated into new tensors by one multi-tensor kernel call: a kernel
# call per leaf, needed to write into a given tensor, costs more than the new memory
# (measured on a model of 102 small tensors).
_INTO_MIN_NUMEL = 1 << 14


def _foreach_into(name: str, into: list[torch.Tensor | None] | None, *args: Any,
                  **kwargs: Any) -> list[torch.Tensor]:
    """``_foreach.<name>(*args, **kwargs)`` (``args``: aligned lists of tensors, or
    scalars), the result of each leaf whose ``into`` is not None written there, one kernel
    call each (``torch.<name>(..., out=)``); the others made by one multi-tensor call."""
    many = getattr(_foreach, name)
    if into is None or all(o is None for o in into):
        return list(many(*args, **kwargs))
    out: list[Any] = list(into)
    rest = [j for j, o in enumerate(into) if o is None]
    if rest:
        part = [[a[j] for j in rest] if isinstance(a, (list, tuple)) else a for a in args]
        for j, t in zip(rest, many(*part, **kwargs)):
            out[j] = t
    one = getattr(torch, name)
    for j, o in enumerate(into):
        if o is not None:
            one(*[a[j] if isinstance(a, (list, tuple)) else a for a in args], **kwargs, out=o)
    return out


def _takes_mean(fused: Callable) -> Callable:
    """Marks a ``fused`` step that accepts ``mean=shared_update.Mean(...)``: the gradients
    are each device's own, averaged over ``axis_name`` in the update's round
    (``funcdp.value_and_update``). A user's own ``fused`` need not know of it."""
    fused.takes_mean = True  # type: ignore[attr-defined]
    return fused


def step_of_mean(opt: Any, grads: Any, state: Any, params: Any,
                 axis_name: Any, mean: shared_update.Mean) -> tuple[Any, Any]:
    """``opt.step`` of the average of the devices' ``grads`` over ``axis_name`` (see
    ``shared_update.Mean``): in the update's round where ``opt``'s fused step can average
    them itself, else in a round of its own first."""
    fused = getattr(opt, "fused", None)
    if fused is None or not getattr(fused, "takes_mean", False):
        return step_of(opt, mean.now(grads), state, params, axis_name)
    return fused(grads, state, params, axis_name, mean=mean)


def is_transformation(t: Any) -> bool:
    """Whether ``t`` is a ``GradientTransformation`` or quacks like one (callable ``init``
    and ``update``, as an optax-style object of the user's own)."""
    return isinstance(t, GradientTransformation) or (
        not isinstance(t, type)  # (a class: its methods would take grads for self)
        and callable(getattr(t, "init", None)) and callable(getattr(t, "update", None)))


def not_a_transformation(t: Any) -> str:
    """What ``t``, which ``is_transformation`` rejected, is, for messages."""
    if isinstance(t, type) and callable(getattr(t, "update", None)):
        return f"the class {t.__name__} (pass an instance: {t.__name__}(...))"
    return a_type(t)


def step_of(opt: Any, grads: Any, state: Any, params: Any,
            axis_name: Any = None) -> tuple[Any, Any]:
    """``opt.step(...)`` of a ``GradientTransformation``; for a transformation of the
    user's own, its update, applied (its ``step``, if any, need not take ``axis_name``)."""
    if isinstance(opt, GradientTransformation):
        return opt.step(grads, state, params, axis_name=axis_name)
    updates, state = opt.update(grads, state, params)
    return apply_updates(params, updates), state


class _Inputs(NamedTuple):
    """An optimizer's per-parameter inputs, flat and checked (see ``_inputs``): ``g``,
    ``p`` and ``states`` hold the leaves whose gradient is a tensor, at the positions
    ``keep`` of the whole trees (all of them where None); ``all_p`` and ``all_states``
    are the whole trees' leaves, from which the others are returned unchanged."""

    g: list
    p: list
    states: list[list]
    spec: Any
    pspec: Any
    keep: list[int] | None
    all_p: list | None
    all_states: list[list]

    def updates(self, updates: list) -> Any:
        """The update tree: None where the gradient is None."""
        if self.keep is None:
            return tree_util.tree_unflatten(updates, self.spec)
        return tree_util.tree_unflatten(_put([None] * self.spec.num_leaves, self.keep, updates),
                                        self.spec)

    def params(self, new: list) -> Any:
        """The new parameter tree: the parameter itself where the gradient is None."""
        assert self.all_p is not None
        return tree_util.tree_unflatten(_put(self.all_p, self.keep, new), self.pspec)

    def state(self, step: torch.Tensor, keys: Sequence[str], new: Sequence[list]) -> dict:
        """The new state: the old leaves where the gradient is None."""
        out: dict = {"step": step}
        for k, old, leaves in zip(keys, self.all_states, new):
            out[k] = tree_util.tree_unflatten(_put(old, self.keep, leaves), self.spec)
        return out


def _inputs(grads: Any, state: Any, params: Any, keys: tuple[str, ...], weight_decay: float,
            name: str, stepping: bool) -> _Inputs:
    """The flat gradients, parameters and state trees ``state[k]`` (``k`` in ``keys``),
    checked against each other (``_checked``), for ``update`` or, ``stepping``, ``step``."""
    _check_state(state, ("step", *keys), name)
    g, spec = _flat(grads)
    p, pspec = _params_of(params, spec, weight_decay, name, stepping)
    states = [_state_leaves(state, k, spec, name) for k in keys]
    keep = _checked(g, spec, name, p, states, keys)
    if keep is None:
        return _Inputs(g, g if p is None else p, states, spec, pspec, None, p, states)
    only = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return _Inputs(only(g), only(g if p is None else p), [only(s) for s in states], spec,
                   pspec, keep, p, states)


def _params_of(params: Any, spec: Any, weight_decay: float, name: str,
               stepping: bool) -> tuple[list | None, Any]:
    """The flat parameters, checked to have the gradients' structure ``spec`` (their
    leaves: see ``_checked``); ``update`` may omit them when nothing needs them, ``step``
    (``stepping``) may not. None where omitted."""
    if params is not None:
        p, pspec = _flat(params)
        _same_spec(spec, pspec, name)
        return p, pspec
    if stepping:
        raise ValueError(f"funcdp.optim.{name}: `params` is None, but step(grads, state, "
                         f"params) updates them; pass the parameters, a tree of the "
                         f"gradients' structure.")
    if weight_decay:
        raise ValueError(f"funcdp.optim.{name}: `params` is needed for weight_decay; pass "
                         f"update(grads, state, params).")
    return None, spec


def _state_leaves(state: Mapping, key: str, spec: Any, name: str) -> list[torch.Tensor]:
    """The leaves of the per-parameter state ``state[key]``, checked to have the
    gradients' structure ``spec`` (their leaves: see ``_checked``)."""
    leaves, state_spec = _flat(state[key])
    if state_spec != spec:
        if _same_but_key_order(state_spec, spec):
            fix = (" They hold the same dict keys in another order, and the leaves are "
                   "paired in order: make the state with opt.init(params) from parameters "
                   "whose dicts have the gradients' key order.")
        else:
            fix = (" Make the state with opt.init(params) for the parameters being "
                   "trained.")
        raise ValueError(
            f"funcdp.optim.{name}: the optimizer state was made for parameters of structure "
            f"{state_spec}, but the gradients have structure {spec}.{fix}")
    return leaves


def _checked(g: list, spec: Any, name: str, p: list | None, states: Sequence[list],
             keys: Sequence[str]) -> list[int] | None:
    """Checks each leaf of the parameters ``p`` (if given) and of the state's ``states``
    (``state[k]`` for ``k`` in ``keys``) against its gradient in ``g`` (of structure
    ``spec``): the same shape and dtype. Returns None where every gradient is a tensor,
    else the positions of those that are: the others are None (a parameter without a
    gradient, as ``torch.autograd.grad(..., allow_unused=True)`` gives), whose parameter
    and state are left as they are, as ``torch.optim`` leaves a parameter whose ``.grad``
    is None."""
    # The hot path, as lean as it gets in Python (each leaf's shape and dtype read once
    # per tree); anything unusual (a None or a number, with no shape) goes to
    # ``_sort_out``.
    trees = states if p is None else (p, *states)
    try:
        if len(trees) == 1:
            for t, x in zip(trees[0], g):
                if t.shape != x.shape or t.dtype is not x.dtype:
                    return _sort_out(g, spec, name, p, states, keys)
            return None
        if trees:  # (the gradients' shapes and dtypes read once, compared in C)
            shapes, dtypes = list(map(_shape, g)), list(map(_dtype, g))
            for leaves in trees:
                if list(map(_shape, leaves)) != shapes or list(map(_dtype, leaves)) != dtypes:
                    return _sort_out(g, spec, name, p, states, keys)
            return None
        if all(map(isinstance, g, repeat(torch.Tensor))):
            return None
    except AttributeError:
        pass
    return _sort_out(g, spec, name, p, states, keys)


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


def _sort_out(g: list, spec: Any, name: str, p: list | None, states: Sequence[list],
              keys: Sequence[str]) -> list[int]:
    """``_checked``'s answer where its quick check failed: the positions of the gradients
    that are tensors, or the error about the first leaf that is wrong."""
    trees = ([] if p is None else [("params", p)]) + [
        (f"state[{k!r}]", leaves) for k, leaves in zip(keys, states)]
    keep = []
    for i, x in enumerate(g):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            path = _leaf_path(spec, i)
            raise TypeError(
                f"funcdp.optim.{name}: grads{path} is {a_type(x)}, not a tensor. Gradients "
                f"are tensors of their parameters' shapes and dtypes (or None, for a "
                f"parameter without a gradient, which is then left as it is); convert it, "
                f"e.g. torch.as_tensor(value, dtype=params{path}.dtype).")
        for what, leaves in trees:
            _same_leaf(leaves[i], x, spec, i, name, what)
        keep.append(i)
    return keep


def _same_leaf(t: Any, x: torch.Tensor, spec: Any, i: int, name: str, what: str) -> None:
    """Raises unless the leaf ``t`` of the tree ``what`` (the parameters, a state tree) has
    the shape and dtype of its gradient ``x``, leaf ``i`` of structure ``spec``."""
    shape = getattr(t, "shape", None)
    if shape is not None and shape != x.shape:
        path = _leaf_path(spec, i)
        raise ValueError(
            f"funcdp.optim.{name}: {what}{path} has shape {tuple(shape)}, but its gradient "
            f"grads{path} has shape {tuple(x.shape)}. The gradients, the parameters and the "
            f"optimizer state (opt.init(params)) must be of the same parameters.")
    dtype = getattr(t, "dtype", None)
    if shape is None or not isinstance(dtype, torch.dtype):
        path = _leaf_path(spec, i)
        raise TypeError(
            f"funcdp.optim.{name}: {what}{path} is {_a(t)}, not a tensor, but its "
            f"gradient grads{path} is a tensor of shape {tuple(x.shape)}. The parameters "
            f"and the optimizer state (opt.init(params)) are trees of tensors.")
    if dtype is not x.dtype:
        path = _leaf_path(spec, i)
        if what == "params":
            # (torch refuses such a gradient: assigning it to `.grad` is an error; a
            # kernel would instead promote the parameter to the gradient's dtype.)
            raise ValueError(
                f"funcdp.optim.{name}: grads{path} has dtype {x.dtype}, but its parameter "
                f"params{path} has dtype {dtype}; a gradient has its parameter's dtype (as "
                f"torch requires of a .grad). Cast the gradients to the parameters' dtypes: "
                f"grads = torch.utils._pytree.tree_map(lambda g, p: g.to(p.dtype), grads, "
                f"params).")
        raise ValueError(
            f"funcdp.optim.{name}: {what}{path} has dtype {dtype}, but its gradient "
            f"grads{path} has dtype {x.dtype}. The optimizer state has the dtypes of the "
            f"parameters it was made for: make it with opt.init(params) for the parameters "
            f"as they are (or cast it with them).")


def _a(x: Any) -> str:
    """``x``'s type with its article, ``None`` as itself, for messages."""
    return "None" if x is None else a_type(x)


def _leaf_path(spec: Any, i: int) -> str:
    """The key path of leaf ``i`` of the structure ``spec``, as indexing: ``['w']``."""
    return tree_util.keystr(tree_util.leaf_paths(spec)[i])


def _put(xs: list, keep: list[int] | None, part: Sequence) -> list:
    """``xs`` with its leaves at the positions ``keep`` replaced by those of ``part``
    (all of them where ``keep`` is None)."""
    if keep is None:
        return list(part)
    out = list(xs)
    for i, v in zip(keep, part):
        out[i] = v
    return out


def _check_params(params: Any, name: str) -> tuple[list, Any]:
    """The leaves and structure of ``params`` for ``init``, each checked to be a tensor
    (a ``funcdp.ShardedValue`` passes too: torch's functions take it)."""
    p, spec = _flat(params)
    for i, x in enumerate(p):
        if not isinstance(x, torch.Tensor) and not hasattr(type(x), "__torch_function__"):
            path = _leaf_path(spec, i)
            raise TypeError(
                f"funcdp.optim.{name}: init(params): params{path} is {_a(x)}, not a "
                f"tensor. The parameters are a tree of tensors (a parameter without a "
                f"gradient at some step has a tensor value: pass None as its gradient "
                f"then); convert it with torch.as_tensor, or leave it out of `params`.")
    return p, spec


def _check_state(state: Any, keys: tuple[str, ...], name: str) -> None:
    """Raises unless ``state`` is a mapping with ``keys`` (as the optimizer's ``init``
    makes) and a scalar step."""
    if not (isinstance(state, Mapping) and all(k in state for k in keys)):
        got = (f"a {type(state).__name__} with keys {sorted(map(str, state))}"
               if isinstance(state, Mapping) else a_type(state))
        raise ValueError(
            f"funcdp.optim.{name}: `state` must be the state this optimizer's init(params) "
            f"makes, a dict with keys {list(keys)}; got {got}. Was it made by another "
            f"optimizer (or a chain)? Make it with init(params) of the optimizer that steps "
            f"with it.")
    step = state["step"]
    if len(getattr(step, "shape", ())) != 0:
        raise ValueError(
            f"funcdp.optim.{name}: state['step'] has shape {tuple(step.shape)}; a state "
            f"has one step, of shape (). A state with a leading device axis (from "
            f"funcdp.replicate, or stacked by a pmap with out_axes=0) is used inside the "
            f"pmap that maps over it (in_axes=0), or made one with funcdp.unreplicate(state).")


def _same_spec(spec: Any, pspec: Any, name: str) -> None:
    """Raises unless the gradients' structure ``spec`` is the parameters' ``pspec``."""
    if spec == pspec:
        return
    if _same_but_key_order(spec, pspec):
        fix = ("They hold the same dict keys in another order, and the leaves are paired in "
               "order, so each gradient would update another parameter: build them in one "
               "key order (e.g. grads = {k: grads[k] for k in params} for a flat dict).")
    else:
        fix = ("Pass the gradients of the parameters being updated, in the parameters' "
               "structure.")
    raise ValueError(f"funcdp.optim.{name}: `grads` has structure {spec}, but `params` has "
                     f"{pspec}. {fix}")


def _same_but_key_order(a: Any, b: Any) -> bool:
    """Whether the structures ``a`` and ``b`` differ only in the order of dict keys."""
    return _sorted_keys(tree_util.python_spec(a)) == _sorted_keys(tree_util.python_spec(b))


def _sorted_keys(spec: Any) -> Any:
    """``spec`` as nested tuples, the children of each dict in the order of their keys."""
    if spec.is_leaf():
        return None
    children = [_sorted_keys(c) for c in spec.children()]
    if spec.type is dict:
        return dict, sorted(zip(map(repr, spec.context), children), key=lambda kc: kc[0])
    return spec.type, spec.context, children


def _adam(name: str, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    _check_lr(lr, name)
    _check_nonnegative(name, eps=eps, weight_decay=weight_decay)
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise ValueError(f"funcdp.optim.{name}: `betas` must be a pair of numbers in [0, 1), "
                         f"such as (0.9, 0.999), got {betas!r}.")
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"funcdp.optim.{name}: `betas` must be in [0, 1), got {betas!r}.")

    keys = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")

    def init(params: Any) -> dict:
        p, spec = _check_params(params, name)
        state: dict = {"step": torch.zeros((), dtype=torch.int64)}
        for k in keys:
            state[k] = tree_util.tree_unflatten(_zeros_like(p), spec)
        return state

    def scalars(state: dict):
        step = state["step"] + 1
        lr_t = _lr_value(lr, step, name)
        t = float(step) if not _traced(step) else step.to(torch.float64)
        bc1 = 1 - b1 ** t
        bc2_sqrt = (1 - b2 ** t) ** 0.5
        return step, lr_t, bc1, bc2_sqrt

    def moments_of(g: list, p: list, mu: list, nu: list, *nu_max: list, bc2_sqrt: Any):
        """The new moments and the denominator (elementwise per leaf)."""
        if maximize:
            g = list(_foreach.neg(g))
        if weight_decay and not decoupled:
            g = list(_foreach.add(g, p, alpha=weight_decay))
        mu = list(_foreach.lerp(mu, g, 1 - b1))
        # As torch.optim: ``nu * b2 + (1 - b2) * g * g`` by addcmul (g * g not rounded).
        nu = list(_foreach.addcmul(_foreach.mul(nu, b2), g, g, value=1 - b2))
        new = [mu, nu]
        v = nu
        if amsgrad:
            v = list(_foreach.maximum(nu_max[0], nu))
            new.append(v)
        sqrt_v = list(_foreach.sqrt(v))
        denom = _foreach.add(
            [x / bc2_sqrt for x in sqrt_v] if isinstance(bc2_sqrt, torch.Tensor)
            else list(_foreach.div(sqrt_v, bc2_sqrt)), eps)
        return new, denom

    def update(grads: Any, state: dict, params: Any = None) -> tuple[Any, dict]:
        x = _inputs(grads, state, params, keys, weight_decay, name, False)
        step, lr_t, bc1, bc2_sqrt = scalars(state)
        new, denom = moments_of(x.g, x.p, *x.states, bc2_sqrt=bc2_sqrt)
        updates = _scale(list(_foreach.div(new[0], denom)), -lr_t / bc1)
        if weight_decay and decoupled:
            # AdamW: p <- p - lr * wd * p, folded into the update.
            updates = list(_foreach.add(updates, _scale(x.p, -lr_t * weight_decay)))
        return x.updates(updates), x.state(step, keys, new)

    @_takes_mean
    def fused(grads: Any, state: dict, params: Any, axis_name: Any = None,
              mean: shared_update.Mean | None = None):
        x = _inputs(grads, state, params, keys, weight_decay, name, True)
        step, lr_t, bc1, bc2_sqrt = scalars(state)
        size = -lr_t / bc1

        def kernel(g: list, p: list, *moments: list, scratch: bool = False):
            new, denom = moments_of(g, p, *moments, bc2_sqrt=bc2_sqrt)
            mu = new[0]
            into = _into(g, p, mu, denom) if scratch else None
            if isinstance(size, torch.Tensor):
                out = [pi * (1 - lr_t * weight_decay) if decoupled and weight_decay else pi
                       for pi in p]
                out = [ni + size * (m / d) for ni, m, d in zip(out, mu, denom)]
            elif decoupled and weight_decay:
                # As torch.optim.AdamW: decay the parameters, then the Adam step, in place
                # on the new tensors (the inputs are never written).
                out = _foreach_into("mul", into, p, 1 - lr_t * weight_decay)
                _foreach.addcdiv_(out, mu, denom, value=size)
            else:
                out = _foreach_into("addcdiv", into, p, mu, denom, value=size)
            return (out, *new)

        out, *new = _shared_step(kernel, x.g, x.p, x.states, axis_name,
                                 f"funcdp.optim.{name} step", mean, (step, lr_t, bc1, bc2_sqrt))
        return x.params(out), x.state(step, keys, new)

    return GradientTransformation(init, update, fused)


def _traced(step: torch.Tensor) -> bool:
    return _functorch.is_functorch_wrapped_tensor(step) or _functorch.is_batchedtensor(step)


@_public
def adam(lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
         eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
         maximize: bool = False) -> GradientTransformation:
    """Adam with the semantics of ``torch.optim.Adam`` (L2 ``weight_decay``).

    Examples:
        >>> import torch, funcdp
        >>> opt = funcdp.optim.adam(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = opt.update({"w": torch.tensor([1.0, -2.0])}, opt.init(params), params)
        >>> updates["w"]
        tensor([-0.1000,  0.1000])
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=False)


@_public
def adamw(lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """AdamW (decoupled weight decay) with the semantics of ``torch.optim.AdamW``."""
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True)


@_public
def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales the gradients so that their global L2 norm is at most ``max_norm``.

    The factor is ``min(1, max_norm / (norm + 1e-6))``, as in
    ``torch.nn.utils.clip_grad_norm_``. Chain it before an optimizer.

    Examples:
        >>> import torch, funcdp
        >>> clip = funcdp.optim.clip_by_global_norm(1.0)
        >>> clip.update({"g": torch.tensor([3.0, 4.0])}, clip.init(None))[0]["g"]
        tensor([0.6000, 0.8000])
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"funcdp.optim.clip_by_global_norm: `max_norm` must be positive, got "
                         f"{max_norm!r}.")

    def init(params: Any) -> dict:
        return {}

    def update(grads: Any, state: dict, params: Any = None) -> tuple[Any, dict]:
        g, spec = _flat(grads)
        if not g:
            return grads, state
        norm = _global_norm(g, spec, "clip_by_global_norm", "grads")
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return tree_util.tree_unflatten(
            [None if x is None else x * factor.to(x.dtype) for x in g], spec), state

    return GradientTransformation(init, update)


@_public
def global_norm(tree: Any) -> torch.Tensor:
    """The L2 norm of all leaves of ``tree`` together; None leaves (the gradients of
    parameters without one) are left out.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.optim.global_norm({"w": torch.tensor([3.0, 4.0]), "b": None})
        tensor(5.)
    """
    leaves, spec = _flat(tree)
    return _global_norm(leaves, spec, "global_norm", "tree")


def _global_norm(leaves: list, spec: Any, call: str, what: str) -> torch.Tensor:
    try:
        norms = _foreach.norm(leaves)
    except TypeError:  # (a leaf that is not a tensor: None, say)
        leaves = [leaves[i] for i in _tensor_leaves(leaves, spec, call, what)]
        norms = _foreach.norm(leaves)
    if not leaves:
        return torch.zeros(())
    # In the leaves' promoted dtype, as torch.nn.utils.clip_grad_norm_ gives it (not the
    # first leaf's: a bfloat16 leaf first would round the norm of float64 ones).
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in leaves])
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])).to(
        dtype)


@_public
def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transformations in order (e.g. clipping, then an optimizer).

    Examples:
        >>> import funcdp
        >>> opt = funcdp.optim.chain(funcdp.optim.clip_by_global_norm(1.0), funcdp.optim.sgd(0.1))
    """
    for i, t in enumerate(transforms):
        if not is_transformation(t):
            raise TypeError(
                f"funcdp.optim.chain: argument {i} must be a GradientTransformation (a "
                f"funcdp.optim optimizer or transformation, such as funcdp.optim.sgd(0.1), or "
                f"an object of your own with init(params) and update(grads, state, params)), "
                f"got {not_a_transformation(t)}.")

    def init(params: Any) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def check(state: Any) -> None:
        # (A list is accepted too: a state that went through a serializer may come back so.)
        sequence = isinstance(state, Sequence) and not isinstance(state, str)
        if not (sequence and len(state) == len(transforms)):
            got = f"a {type(state).__name__} of {len(state)}" if sequence else a_type(state)
            raise ValueError(
                f"funcdp.optim.chain: `state` must be the chain's state, a tuple of "
                f"{len(transforms)} (one per transformation, as its init(params) makes); got "
                f"{got}.")

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        check(state)
        new = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new.append(s)
        return grads, tuple(new)

    @_takes_mean
    def fused(grads: Any, state: tuple, params: Any, axis_name: Any = None,
              mean: shared_update.Mean | None = None):
        check(state)
        if mean is not None and len(transforms) > 1:
            # The transforms before the last need the averaged gradients (a clip needs
            # their global norm): averaged in a round of their own.
            grads, mean = mean.now(grads), None
        new = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update(grads, s, params)
            new.append(s)
        if mean is None:
            params, s = step_of(transforms[-1], grads, state[-1], params, axis_name)
        else:
            params, s = step_of_mean(transforms[-1], grads, state[-1], params, axis_name, mean)
        new.append(s)
        return params, tuple(new)

    return GradientTransformation(init, update, fused if transforms else None)


# -- schedules --------------------------------------------------------------------------
def _real(v: Any) -> Any:
    """``v`` as a number the schedules compute with, or None where it is not a real number.

    A Python number is returned as it is; a NumPy number, or a NumPy array of one integer
    or float element, as that Python number (NumPy arrays do not mix with tensors); a
    tensor of one integer or float element as a 0-d tensor (kept a tensor: on its device,
    with its autograd history; 0-d, not to broadcast the updates to its shape). Booleans are
    not numbers here."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if v.size == 1 and v.dtype.kind in "iuf" else None
    if isinstance(v, numbers.Real):
        return v
    if (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool
            and not v.dtype.is_complex):
        return v.reshape(())
    return None


def _fails(x: Any, ok: Callable[[float], bool]) -> bool:
    """Whether ``x`` (an answer of ``_real``) is not a number, or one that ``ok`` refuses.
    A tensor under a torch.func transform (a learning rate being vmapped over) cannot be
    read and is not checked."""
    if x is None:
        return True
    if isinstance(x, torch.Tensor) and _traced(x):
        return False
    return not ok(float(x))


def _check_rates(schedule: str, **values: Any) -> list[Any]:
    """Each of ``values`` (a learning rate the schedule takes) a non-negative number, as
    the schedule is to use it (see ``_real``)."""
    out = []
    for arg, v in values.items():
        x = _real(v)
        if _fails(x, lambda f: f >= 0):
            raise ValueError(
                f"funcdp.optim.{schedule}: `{arg}` must be a non-negative number (a learning "
                f"rate, such as 0.1), got {v!r}.")
        out.append(x)
    return out


# What each number of steps the schedules take is, for messages.
_STEPS_ARE = {"warmup_steps": "the updates of the warmup, 0 for none",
              "decay_steps": "the updates over which it decays, such as 1000",
              "steps_per_decay": "the updates per factor of `rate`, such as 1",
              "boundaries": "the update at which the value changes"}


def _check_steps(schedule: str, minimum: int, **values: Any) -> list[Any]:
    """Each of ``values`` (a number of steps) a number of at least ``minimum`` (0 or 1), as
    a Python number (a tensor's is read once, here; one under a transform stays a tensor)."""
    out = []
    for arg, v in values.items():
        x = _real(v)
        if _fails(x, lambda f: minimum <= f < math.inf):
            least = "positive" if minimum else "non-negative"
            raise ValueError(
                f"funcdp.optim.{schedule}: `{arg}` must be a {least} number of steps "
                f"({_STEPS_ARE[arg.split('[')[0]]}), got {v!r}.")
        out.append(x.item() if isinstance(x, torch.Tensor) and not _traced(x) else x)
    return out


def _check_factor(schedule: str, arg: str, v: Any, ok: Callable[[float], bool],
                  expected: str) -> Any:
    """``v`` a number that ``ok`` accepts, as the schedule is to use it (see ``_real``)."""
    x = _real(v)
    if _fails(x, ok):
        raise ValueError(f"funcdp.optim.{schedule}: `{arg}` must be {expected}, got {v!r}.")
    return x


@_public
def constant(value: float) -> Schedule:
    """A constant learning rate.

    Raises:
        ValueError: ``value`` is not a non-negative number.
    """
    (value,) = _check_rates("constant", value=value)
    return lambda step: value


@_public
def linear_warmup(peak: float, warmup_steps: int, start: float = 0.0) -> Schedule:
    """Linear from ``start`` to ``peak`` over ``warmup_steps`` steps, then ``peak``.

    ``warmup_steps=0`` is no warmup: ``peak`` from the first update on.

    Raises:
        ValueError: ``peak`` or ``start`` is not a non-negative number, or
            ``warmup_steps`` is negative.

    Examples:
        >>> import torch, funcdp
        >>> s = funcdp.optim.linear_warmup(1.0, 4)
        >>> [float(s(torch.tensor(t))) for t in (1, 2, 4, 10)]
        [0.25, 0.5, 1.0, 1.0]
    """
    peak, start = _check_rates("linear_warmup", peak=peak, start=start)
    (warmup_steps,) = _check_steps("linear_warmup", 0, warmup_steps=warmup_steps)
    # (Updates count from 1: with no warmup, the first is at the peak. A tensor here is
    # one under a torch.func transform, which `max` would read.)
    span = (warmup_steps.clamp(min=1) if isinstance(warmup_steps, torch.Tensor)
            else max(warmup_steps, 1))

    def schedule(step: Any) -> Any:
        frac = torch.clamp(torch.as_tensor(step, dtype=torch.float64) / span, max=1.0)
        return start + (peak - start) * frac

    return schedule


@_public
def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init`` to ``alpha * init`` over ``decay_steps`` steps.

    Raises:
        ValueError: ``init`` is not a non-negative number, ``decay_steps`` is not
            positive, or ``alpha`` is not in [0, 1].
    """
    (init,) = _check_rates("cosine_decay", init=init)
    (decay_steps,) = _check_steps("cosine_decay", 1, decay_steps=decay_steps)
    alpha = _check_factor("cosine_decay", "alpha", alpha, lambda a: 0 <= a <= 1,
                          "a number in [0, 1] (the final learning rate as a fraction of "
                          "`init`)")

    def schedule(step: Any) -> Any:
        frac = torch.clamp(torch.as_tensor(step, dtype=torch.float64) / decay_steps, max=1.0)
        cos = 0.5 * (1 + torch.cos(math.pi * frac))
        return init * ((1 - alpha) * cos + alpha)

    return schedule


@_public
def exponential_decay(init: float, rate: float, steps_per_decay: int = 1) -> Schedule:
    """``init * rate ** (step / steps_per_decay)``.

    Raises:
        ValueError: ``init`` is not a non-negative number, or ``rate`` or
            ``steps_per_decay`` is not positive.
    """
    (init,) = _check_rates("exponential_decay", init=init)
    (steps_per_decay,) = _check_steps("exponential_decay", 1, steps_per_decay=steps_per_decay)
    rate = _check_factor("exponential_decay", "rate", rate, lambda r: 0 < r < math.inf,
                         "a positive number (the factor per `steps_per_decay` steps, such as "
                         "0.5)")

    def schedule(step: Any) -> Any:
        return init * rate ** (torch.as_tensor(step, dtype=torch.float64) / steps_per_decay)

    return schedule


@_public
def warmup_cosine_decay(peak: float, warmup_steps: int, decay_steps: int,
                        end: float = 0.0) -> Schedule:
    """Linear warmup to ``peak``, then cosine decay to ``end`` at ``decay_steps``.

    ``decay_steps`` counts from the first step, the warmup included (as optax's
    ``warmup_cosine_decay_schedule``): the decay takes ``decay_steps - warmup_steps``
    steps.

    Raises:
        ValueError: ``peak`` or ``end`` is not a non-negative number, ``warmup_steps`` is
            negative, or ``decay_steps`` is not greater than ``warmup_steps``.
    """
    peak, end = _check_rates("warmup_cosine_decay", peak=peak, end=end)
    (warmup_steps,) = _check_steps("warmup_cosine_decay", 0, warmup_steps=warmup_steps)
    (decay_steps,) = _check_steps("warmup_cosine_decay", 1, decay_steps=decay_steps)
    # (Numbers of steps under a torch.func transform are tensors that cannot be compared.)
    if not (isinstance(warmup_steps, torch.Tensor) or isinstance(decay_steps, torch.Tensor)
            or decay_steps > warmup_steps):
        raise ValueError(
            f"funcdp.optim.warmup_cosine_decay: `decay_steps` (the step at which the decay "
            f"ends, counted from the first, the warmup included) must be greater than "
            f"`warmup_steps`, got decay_steps={decay_steps!r} and "
            f"warmup_steps={warmup_steps!r}. For n steps of decay after the warmup, pass "
            f"decay_steps=warmup_steps + n.")

    def schedule(step: Any) -> Any:
        s = torch.as_tensor(step, dtype=torch.float64)
        warm = peak * torch.clamp(s / max(warmup_steps, 1), max=1.0)
        frac = torch.clamp((s - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cos = end + (peak - end) * 0.5 * (1 + torch.cos(math.pi * frac))
        return torch.where(s < warmup_steps, warm, cos)

    return schedule


@_public
def piecewise_constant(boundaries: Sequence[int] | np.ndarray | torch.Tensor,
                       values: Sequence[float] | np.ndarray | torch.Tensor) -> Schedule:
    """``values[i]`` for steps in ``[boundaries[i-1], boundaries[i])``.

    ``boundaries`` and ``values`` are sequences of numbers (lists, tuples, 1-D NumPy arrays
    or tensors), read once, when the schedule is made.

    Raises:
        ValueError: ``boundaries`` or ``values`` is not a sequence of numbers,
            ``boundaries`` is not increasing, ``values`` is not one longer, or a value is
            not a non-negative number.

    Examples:
        >>> import torch, funcdp
        >>> s = funcdp.optim.piecewise_constant([3, 5], [1.0, 0.1, 0.01])
        >>> [float(s(torch.tensor(t))) for t in (1, 3, 4, 5, 9)]
        [1.0, 0.1, 0.1, 0.01, 0.01]
    """
    name = "funcdp.optim.piecewise_constant"
    for arg, seq in (("boundaries", boundaries), ("values", values)):
        if isinstance(seq, (np.ndarray, torch.Tensor)):
            if seq.ndim != 1:
                raise ValueError(f"{name}: `{arg}` must be a list of numbers (or a 1-D array "
                                 f"or tensor), got {a_type(seq)} of shape {tuple(seq.shape)}.")
        elif isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{name}: `{arg}` must be a list of numbers (or a 1-D array or "
                             f"tensor), got {a_type(seq)}.")
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"{name}: `values` must have one entry more than `boundaries` (a "
                         f"value before the first boundary, then one from each), got "
                         f"{len(values)} values for {len(boundaries)} boundaries.")
    bounds = _check_steps("piecewise_constant", 0, **{f"boundaries[{i}]": b
                                                      for i, b in enumerate(boundaries)})
    rates = [r.item() if isinstance(r, torch.Tensor) else r for r in _check_rates(
        "piecewise_constant", **{f"values[{i}]": v for i, v in enumerate(values)})]
    if any(not a < b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name}: `boundaries` must be strictly increasing (the steps at "
                         f"which the value changes, in order), got {bounds!r}; list them in "
                         f"increasing order, with `values` in the same order.")
    bounds_t = torch.tensor(bounds)
    rates_t = torch.tensor(rates, dtype=torch.float64)

    def schedule(step: Any) -> Any:
        s = torch.as_tensor(step)
        idx = torch.bucketize(s, bounds_t.to(s.device), right=True)
        return rates_t.to(s.device)[idx]

    return schedule
