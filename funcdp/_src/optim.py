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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public_in

_public = public_in("funcdp.optim")

Schedule = Callable[[torch.Tensor], Any]


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state``, ``update(grads, state, params)``.

    ``step(grads, state, params) -> (new_params, state)`` is ``update`` followed by
    ``apply_updates``, fused into one multi-tensor kernel where the optimizer allows
    (half the memory traffic of the two steps: use it in training loops).
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    fused: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None

    def step(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        if self.fused is not None:
            return self.fused(grads, state, params)
        updates, state = self.update(grads, state, params)
        return apply_updates(params, updates), state


GradientTransformation.__module__ = "funcdp.optim"


def _flat(tree: Any) -> tuple[list[torch.Tensor], Any]:
    return tree_util.tree_flatten(tree)


def _lr_at(lr: float | Schedule, step: torch.Tensor) -> Any:
    return lr(step) if callable(lr) else lr


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
    return list(torch._foreach_mul(xs, s))


def _zeros_like(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) for x in xs]


def _check_lr(lr: Any, name: str) -> None:
    if callable(lr):
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"funcdp.optim.{name}: `lr` must be a non-negative number or a "
                         f"schedule (a function of the step), got {lr!r}.")


@_public
def apply_updates(params: Any, updates: Any) -> Any:
    """Returns ``params + updates`` leafwise (new tensors; nothing is modified).

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
    return tree_util.tree_unflatten(list(torch._foreach_add(p, u)) if p else [], spec)


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
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("funcdp.optim.sgd: nesterov momentum requires momentum > 0 and "
                         "dampening = 0 (as in torch.optim.SGD).")

    def init(params: Any) -> dict:
        p, _ = _flat(params)
        state: dict = {"step": torch.zeros((), dtype=torch.int64)}
        if momentum:
            state["momentum"] = tree_util.tree_unflatten(_zeros_like(p), _flat(params)[1])
        return state

    def direction(grads: Any, state: dict, params: Any):
        g, spec = _flat(grads)
        if maximize:
            g = list(torch._foreach_neg(g))
        if weight_decay:
            p, _ = _flat(params)
            g = list(torch._foreach_add(g, p, alpha=weight_decay))
        step = state["step"] + 1
        new_state: dict = {"step": step}
        if momentum:
            buf, _ = _flat(state["momentum"])
            first = step == 1
            blended = torch._foreach_add(torch._foreach_mul(buf, momentum), g,
                                         alpha=1 - dampening)
            # torch.optim.SGD starts the buffer at the first gradient (no dampening).
            buf = [torch.where(first, gi, bi) for gi, bi in zip(g, blended)]
            new_state["momentum"] = tree_util.tree_unflatten(buf, spec)
            g = list(torch._foreach_add(g, buf, alpha=momentum)) if nesterov else buf
        return g, spec, new_state, _scalar(_lr_at(lr, step))

    def update(grads: Any, state: dict, params: Any = None) -> tuple[Any, dict]:
        g, spec, new_state, lr_t = direction(grads, state, params)
        updates = _scale(g, -lr_t) if isinstance(lr_t, torch.Tensor) else list(
            torch._foreach_mul(g, -lr_t))
        return tree_util.tree_unflatten(updates, spec), new_state

    def fused(grads: Any, state: dict, params: Any) -> tuple[Any, dict]:
        g, spec, new_state, lr_t = direction(grads, state, params)
        p, pspec = _flat(params)
        _same_spec(spec, pspec)
        if isinstance(lr_t, torch.Tensor):
            new = [pi - lr_t * gi for pi, gi in zip(p, g)]
        else:
            new = list(torch._foreach_add(p, g, alpha=-lr_t))
        return tree_util.tree_unflatten(new, pspec), new_state

    return GradientTransformation(init, update, fused)


def _same_spec(spec: Any, pspec: Any) -> None:
    if spec != pspec:
        raise ValueError(f"funcdp.optim: `grads` has structure {spec}, but `params` has "
                         f"{pspec}.")


def _adam(name: str, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    _check_lr(lr, name)
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"funcdp.optim.{name}: `betas` must be in [0, 1), got {betas!r}.")

    def init(params: Any) -> dict:
        p, spec = _flat(params)
        state = {"step": torch.zeros((), dtype=torch.int64),
                 "mu": tree_util.tree_unflatten(_zeros_like(p), spec),
                 "nu": tree_util.tree_unflatten(_zeros_like(p), spec)}
        if amsgrad:
            state["nu_max"] = tree_util.tree_unflatten(_zeros_like(p), spec)
        return state

    def moments(grads: Any, state: dict, params: Any):
        g, spec = _flat(grads)
        if maximize:
            g = list(torch._foreach_neg(g))
        step = state["step"] + 1
        lr_t = _scalar(_lr_at(lr, step))
        if weight_decay and not decoupled:
            g = list(torch._foreach_add(g, _flat(params)[0], alpha=weight_decay))
        mu, _ = _flat(state["mu"])
        nu, _ = _flat(state["nu"])
        mu = list(torch._foreach_lerp(mu, g, 1 - b1))
        nu = list(torch._foreach_add(torch._foreach_mul(nu, b2),
                                     torch._foreach_mul(g, g), alpha=1 - b2))
        t = float(step) if not _traced(step) else step.to(torch.float64)
        bc1 = 1 - b1 ** t
        bc2_sqrt = (1 - b2 ** t) ** 0.5
        new_state = {"step": step, "mu": tree_util.tree_unflatten(mu, spec),
                     "nu": tree_util.tree_unflatten(nu, spec)}
        v = nu
        if amsgrad:
            vmax = list(torch._foreach_maximum(_flat(state["nu_max"])[0], nu))
            new_state["nu_max"] = tree_util.tree_unflatten(vmax, spec)
            v = vmax
        sqrt_v = list(torch._foreach_sqrt(v))
        denom = torch._foreach_add(
            [x / bc2_sqrt for x in sqrt_v] if isinstance(bc2_sqrt, torch.Tensor)
            else list(torch._foreach_div(sqrt_v, bc2_sqrt)), eps)
        return mu, denom, spec, new_state, lr_t, bc1

    def update(grads: Any, state: dict, params: Any = None) -> tuple[Any, dict]:
        mu, denom, spec, new_state, lr_t, bc1 = moments(grads, state, params)
        updates = _scale(list(torch._foreach_div(mu, denom)), -lr_t / bc1)
        if weight_decay and decoupled:
            # AdamW: p <- p - lr * wd * p, folded into the update.
            updates = list(torch._foreach_add(updates,
                                              _scale(_flat(params)[0], -lr_t * weight_decay)))
        return tree_util.tree_unflatten(updates, spec), new_state

    def fused(grads: Any, state: dict, params: Any) -> tuple[Any, dict]:
        mu, denom, spec, new_state, lr_t, bc1 = moments(grads, state, params)
        p, pspec = _flat(params)
        _same_spec(spec, pspec)
        size = -lr_t / bc1
        if isinstance(size, torch.Tensor):
            new = [pi * (1 - lr_t * weight_decay) if decoupled and weight_decay else pi
                   for pi in p]
            new = [ni + size * (m / d) for ni, m, d in zip(new, mu, denom)]
        elif decoupled and weight_decay:
            # As torch.optim.AdamW: decay the parameters, then the Adam step, in place on
            # the new tensors (the inputs are never written).
            new = list(torch._foreach_mul(p, 1 - lr_t * weight_decay))
            torch._foreach_addcdiv_(new, mu, denom, value=size)
        else:
            new = list(torch._foreach_addcdiv(p, mu, denom, value=size))
        return tree_util.tree_unflatten(new, pspec), new_state

    return GradientTransformation(init, update, fused)


def _traced(step: torch.Tensor) -> bool:
    return (torch._C._functorch.is_functorch_wrapped_tensor(step)
            or torch._C._functorch.is_batchedtensor(step))


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
        norm = global_norm(grads)
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return tree_util.tree_unflatten([x * factor.to(x.dtype) for x in g], spec), state

    return GradientTransformation(init, update)


@_public
def global_norm(tree: Any) -> torch.Tensor:
    """The L2 norm of all leaves of ``tree`` together."""
    leaves, _ = _flat(tree)
    if not leaves:
        return torch.zeros(())
    norms = torch._foreach_norm(leaves)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])).to(
        leaves[0].dtype)


@_public
def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transformations in order (e.g. clipping, then an optimizer).

    Examples:
        >>> import funcdp
        >>> opt = funcdp.optim.chain(funcdp.optim.clip_by_global_norm(1.0), funcdp.optim.sgd(0.1))
    """
    def init(params: Any) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        new = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new.append(s)
        return grads, tuple(new)

    def fused(grads: Any, state: tuple, params: Any) -> tuple[Any, tuple]:
        new = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update(grads, s, params)
            new.append(s)
        params, s = transforms[-1].step(grads, state[-1], params)
        new.append(s)
        return params, tuple(new)

    return GradientTransformation(init, update, fused if transforms else None)


# -- schedules --------------------------------------------------------------------------
@_public
def constant(value: float) -> Schedule:
    """A constant learning rate."""
    return lambda step: value


@_public
def linear_warmup(peak: float, warmup_steps: int, start: float = 0.0) -> Schedule:
    """Linear from ``start`` to ``peak`` over ``warmup_steps`` steps, then ``peak``.

    Examples:
        >>> import torch, funcdp
        >>> s = funcdp.optim.linear_warmup(1.0, 4)
        >>> [float(s(torch.tensor(t))) for t in (1, 2, 4, 10)]
        [0.25, 0.5, 1.0, 1.0]
    """
    def schedule(step: Any) -> Any:
        frac = torch.clamp(torch.as_tensor(step, dtype=torch.float64) / warmup_steps, max=1.0)
        return start + (peak - start) * frac

    return schedule


@_public
def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init`` to ``alpha * init`` over ``decay_steps`` steps."""
    def schedule(step: Any) -> Any:
        frac = torch.clamp(torch.as_tensor(step, dtype=torch.float64) / decay_steps, max=1.0)
        cos = 0.5 * (1 + torch.cos(math.pi * frac))
        return init * ((1 - alpha) * cos + alpha)

    return schedule


@_public
def exponential_decay(init: float, rate: float, steps_per_decay: int = 1) -> Schedule:
    """``init * rate ** (step / steps_per_decay)``."""
    def schedule(step: Any) -> Any:
        return init * rate ** (torch.as_tensor(step, dtype=torch.float64) / steps_per_decay)

    return schedule


@_public
def warmup_cosine_decay(peak: float, warmup_steps: int, decay_steps: int,
                        end: float = 0.0) -> Schedule:
    """Linear warmup to ``peak``, then cosine decay to ``end`` at ``decay_steps``."""
    def schedule(step: Any) -> Any:
        s = torch.as_tensor(step, dtype=torch.float64)
        warm = peak * torch.clamp(s / max(warmup_steps, 1), max=1.0)
        frac = torch.clamp((s - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
        cos = end + (peak - end) * 0.5 * (1 + torch.cos(math.pi * frac))
        return torch.where(s < warmup_steps, warm, cos)

    return schedule


@_public
def piecewise_constant(boundaries: list[int], values: list[float]) -> Schedule:
    """``values[i]`` for steps in ``[boundaries[i-1], boundaries[i])``."""
    if len(values) != len(boundaries) + 1:
        raise ValueError("funcdp.optim.piecewise_constant: need len(values) == "
                         "len(boundaries) + 1.")

    def schedule(step: Any) -> Any:
        s = torch.as_tensor(step)
        idx = torch.bucketize(s, torch.tensor(boundaries, device=s.device), right=True)
        return torch.tensor(values, dtype=torch.float64, device=s.device)[idx]

    return schedule
