"""Modules as pure functions of parameter pytrees, and synchronized BatchNorm.

``funcdp.nn.functional(module)`` returns a ``FunctionalModule``: the module's
parameters and buffers as dicts, and ``apply(params, buffers, *args)`` that returns
``(output, new_buffers)`` without mutating anything it was given. It is safe to call from
many devices at once: each thread runs its own lightweight replica of the module (the
module objects are copied, never the tensors), because ``torch.func.functional_call``
swaps tensors into the module it is given and so cannot be shared between threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from funcdp._src.api_util import public_in
from funcdp._src.collectives import psum

_public = public_in("funcdp.nn")


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are averaged over a named axis.

    In training mode the mean and variance are those of the whole batch across every
    participant of ``axis_name`` (two ``psum`` s: of the sums and counts, then of the squared
    deviations from the mean, which is exact where ``E[x²] - E[x]²`` loses digits), so a model
    trained with pmap over ``n`` devices matches the same model on one device with the
    full batch: outputs, gradients and running statistics. Works on CPU and GPU alike.
    Participants may hold different numbers of examples.

    Examples:
        >>> import torch, funcdp
        >>> bn = funcdp.nn.SyncBatchNorm(3, axis_name="i")
        >>> f = funcdp.vmap(lambda x: bn(x), axis_name="i")
        >>> tuple(f(torch.randn(4, 2, 3)).shape)
        (4, 2, 3)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 axis_name: Any, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.axis_name = axis_name

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (batch, channels, ...), "
                             f"got {input.dim()}D input of shape {tuple(input.shape)}.")

    @classmethod
    def convert(cls, module: nn.Module, axis_name: Any) -> nn.Module:
        """Returns ``module`` with every BatchNorm layer replaced by a SyncBatchNorm.

        The new layers share the old ones' parameter and buffer tensors (and names).
        """
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, axis_name=axis_name)
            new._parameters = module._parameters
            new._buffers = module._buffers
            new.training = module.training
            return new
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = cls.convert(child, axis_name)
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        # Statistics in at least float32, as torch's batch_norm keeps them (a float16
        # count overflows past 65504 examples; bfloat16 sums lose the mean's digits); the
        # output in the input's dtype.
        acc = torch.promote_types(input.dtype, torch.float32)
        # Sums and counts (not means), so participants may hold different numbers of
        # examples (funcdp.DataParallel's uneven chunks).
        local = torch.tensor(float(input.numel() // input.shape[1]), dtype=acc,
                             device=input.device)
        total, count = psum((input.sum(dims, dtype=acc), local), self.axis_name)
        mean = total / count
        centered = input.to(acc) - mean.view(shape)
        var = psum(centered.pow(2).sum(dims), self.axis_name) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running(mean, var, count)
        return out.to(input.dtype)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor,
                        count: torch.Tensor) -> None:
        unbiased = var * (count / torch.clamp(count - 1, min=1))
        # track_running_stats (checked by the caller): the buffers exist.
        assert self.num_batches_tracked is not None and self.running_mean is not None
        assert self.running_var is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                 else self.momentum)
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(unbiased.detach() * m)


def _replica(module: nn.Module) -> nn.Module:
    """A copy of the module *objects* sharing every tensor (like nn.DataParallel's)."""
    memo: dict[int, nn.Module] = {}

    def rec(m: nn.Module) -> nn.Module:
        got = memo.get(id(m))
        if got is not None:
            return got
        r = m._replicate_for_data_parallel()
        r._parameters = dict(m._parameters)
        memo[id(m)] = r
        for name, child in m._modules.items():
            r._modules[name] = rec(child) if child is not None else None
        return r

    return rec(module)


class FunctionalModule:
    """A module as a pure function: ``apply(params, buffers, *args) -> (out, buffers)``.

    Attributes:
        module: the wrapped module (never mutated by ``apply``).
        params: the module's parameters (a dict name -> tensor, detached).
        buffers: the module's buffers (a dict name -> tensor).
        axis_name: the axis BatchNorm layers synchronise over, if any.
    """

    def __init__(self, module: nn.Module, sync_batchnorm: Any = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"funcdp.nn.functional: `module` must be a torch.nn.Module, got "
                            f"{type(module).__name__}.")
        self.module = module
        self.axis_name = sync_batchnorm
        self._template = _replica(module)
        if sync_batchnorm is not None:
            self._template = SyncBatchNorm.convert(self._template, sync_batchnorm)
        self._local = threading.local()
        self._param_names = [n for n, _ in module.named_parameters()]
        self._buffer_names = [n for n, _ in module.named_buffers()]
        # Every place a tensor is held, tied weights included: (slot name, canonical name).
        self._param_aliases = _aliases(module.named_parameters(remove_duplicate=False),
                                       module.named_parameters())
        self._buffer_aliases = _aliases(module.named_buffers(remove_duplicate=False),
                                        module.named_buffers())

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters()}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.module.named_buffers()}

    def _thread_module(self, train: bool | None) -> tuple[nn.Module, list, list]:
        local = self._local
        m = getattr(local, "module", None)
        if m is None:
            m = local.module = _replica(self._template)
            local.param_slots = [_slot(m, n, "_parameters") for n, _ in self._param_aliases]
            local.buffer_slots = [_slot(m, n, "_buffers") for n, _ in self._buffer_aliases]
            # Each module with its replica, by name (the replica has the module's
            # structure as it was when wrapped, BatchNorm layers converted in place).
            mine = dict(m.named_modules())
            local.pairs = [(a.__dict__, mine[n].__dict__)
                           for n, a in self.module.named_modules() if n in mine]
        # The module as it is now, as nn.DataParallel replicates it on every call: every
        # submodule's own mode (a BatchNorm set to eval inside a training model) and
        # attributes set since (tensors and submodules are the replica's own).
        for live, mine in local.pairs:
            own = mine["_parameters"], mine["_buffers"], mine["_modules"]
            mine.update(live)
            mine["_parameters"], mine["_buffers"], mine["_modules"] = own
        if train is not None:
            m.train(train)
        return m, local.param_slots, local.buffer_slots

    def apply(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
              *args: Any, train: bool | None = None, **kwargs: Any) -> tuple[Any, dict]:
        """Runs the module with the given parameters and buffers.

        Args:
            params: parameters by name (as in ``params``).
            buffers: buffers by name; never modified.
            *args: the module's forward arguments.
            **kwargs: the module's forward keyword arguments.
            train: training mode (BatchNorm batch statistics, dropout) for every layer;
                default: each layer's own mode in the wrapped module, as it is now.

        Returns:
            ``(output, new_buffers)``: BatchNorm running statistics come back updated in
            ``new_buffers`` (new tensors) instead of being written into ``buffers``.
        """
        module, pslots, bslots = self._thread_module(train)
        new_buffers = {}
        for (_, canonical), (_, _, original) in zip(self._buffer_aliases, bslots):
            if canonical in new_buffers:
                continue
            b = buffers.get(canonical)
            # Buffers not given start from the module's own, copied: never written to.
            new_buffers[canonical] = (b if b is not None else original).clone()
        try:
            values = [params[canonical] for _, canonical in self._param_aliases]
        except KeyError:
            out = functional_call(module, (dict(params), new_buffers), args, kwargs,
                                  tie_weights=True, strict=False)
            return out, new_buffers
        # The replica belongs to this thread: set its tensors directly (what
        # functional_call does, minus its generality), and put the originals back after.
        for (d, key, _), v in zip(pslots, values):
            d[key] = v
        for (d, key, _), (_, canonical) in zip(bslots, self._buffer_aliases):
            d[key] = new_buffers[canonical]
        try:
            out = module(*args, **kwargs)
        finally:
            for d, key, original in pslots:
                d[key] = original
            for d, key, original in bslots:
                d[key] = original
        return out, new_buffers

    __call__ = apply

    # -- state dicts ---------------------------------------------------------------------
    def state_dict(self, params: Mapping[str, Any], buffers: Mapping[str, Any]) -> dict:
        """An ordinary ``state_dict`` of the original module (plain tensors, no prefix).

        Replicated values (from ``funcdp.replicate`` or a pmap) are taken once.
        """
        from funcdp._src.sharded import unreplicate

        canonical = dict(self._param_aliases + self._buffer_aliases)
        out: dict[str, torch.Tensor] = {}
        for name in self.module.state_dict():
            key = canonical.get(name, name)  # tied weights appear under every name
            src = params if key in params else buffers
            if key in src:
                v = src[key]
                if not isinstance(v, torch.Tensor):
                    v = unreplicate(v)
                out[name] = v.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """Params and buffers from a ``state_dict`` of the module (or of an
        ``nn.DataParallel`` wrapping it: ``module.`` prefixes are accepted).

        Raises:
            KeyError: listing missing and unexpected keys.
        """
        sd = strip_prefix(state_dict, self._param_names + self._buffer_names)
        missing = [n for n in self._param_names + self._buffer_names if n not in sd]
        expected = set(self.module.state_dict())
        unexpected = [k for k in sd if k not in expected]
        if missing or unexpected:
            raise KeyError(f"funcdp.nn: state_dict does not match the module: missing keys "
                           f"{missing}, unexpected keys {unexpected}.")
        params = {n: sd[n].detach() for n in self._param_names}
        buffers = {n: sd[n].detach().clone() for n in self._buffer_names}
        return params, buffers


def _aliases(all_named: Any, unique_named: Any) -> list[tuple[str, str]]:
    """``(name, canonical name)`` for every name a tensor is registered under."""
    canonical = {id(t): n for n, t in unique_named}
    return [(n, canonical[id(t)]) for n, t in all_named]


def _slot(module: nn.Module, name: str, kind: str) -> tuple[dict, str, Any]:
    """The dict entry holding parameter/buffer ``name`` in ``module``, and its tensor."""
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    d = getattr(owner, kind)
    return d, attr, d[attr]


def strip_prefix(state_dict: Mapping[str, Any], names: list[str]) -> dict:
    """Removes the ``module.`` prefix of ``nn.DataParallel``/DDP checkpoints if present."""
    names_set = set(names)
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys) and not any(
            k in names_set for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


@_public
def functional(module: nn.Module, *, sync_batchnorm: Any = None) -> FunctionalModule:
    """Turns ``module`` into a pure function of its parameters and buffers.

    Args:
        module: any ``torch.nn.Module``.
        sync_batchnorm: an axis name: BatchNorm layers then compute batch statistics over
            that axis (see ``SyncBatchNorm``). The module itself is not changed.

    Returns:
        A ``FunctionalModule`` ``m``: ``m.params``, ``m.buffers`` and
        ``m.apply(params, buffers, *args, train=None) -> (out, new_buffers)``.

    Examples:
        >>> import torch, funcdp
        >>> m = funcdp.nn.functional(torch.nn.Linear(3, 2))
        >>> out, _ = m.apply(m.params, m.buffers, torch.ones(4, 3))
        >>> tuple(out.shape)
        (4, 2)
    """
    return FunctionalModule(module, sync_batchnorm)
