"""Modules as pure functions of parameter pytrees, and synchronized BatchNorm.

``funcdp.nn.functional(module)`` returns a ``FunctionalModule``: the module's
parameters and buffers as dicts, and ``apply(params, buffers, *args)`` that returns
``(output, new_buffers)`` without mutating anything it was given. It is safe to call from
many devices at once: each thread runs its own lightweight replica of the module (the
module objects are copied, never the tensors), because ``torch.func.functional_call``
swaps tensors into the module it is given and so cannot be shared between threads.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Hashable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from funcdp._src.api_util import public_in
from funcdp._src.collectives import axis_size, psum

_public = public_in("funcdp.nn")


def _check_axis_name(name: Any, call: str, arg: str) -> None:
    """Refuses at construction what no collective accepts as an axis name (the error
    would otherwise come from the first training-mode forward, inside a pmap): as
    funcdp's collectives, a hashable name other than None, or a non-empty tuple of
    names; and not a bool (``sync_batchnorm=True`` is ``funcdp.DataParallel``'s flag)."""
    names = name if isinstance(name, tuple) else (name,)
    bad = [n for n in names if n is None or isinstance(n, (bool, list, dict, set))
           or not isinstance(n, Hashable)]
    if names and not bad:
        return
    msg = (f"{call}: `{arg}` must be an axis name (a string such as 'batch', as given to "
           f"funcdp.pmap(..., axis_name='batch')) or a non-empty tuple of names, got "
           f"{name!r}")
    if isinstance(name, bool):
        msg += (f". Pass the name of the pmap axis to synchronise over, `{arg}='batch'`"
                + ("; None (the default) synchronises nothing" if arg == "sync_batchnorm"
                   else "") + "; True/False is funcdp.DataParallel's `sync_batchnorm`")
    elif isinstance(name, (list, set)) and name:
        msg += f" (a {type(name).__name__}); for several axes pass a tuple, {tuple(name)!r}"
    elif name == ():
        msg += "; name at least one axis"
    elif isinstance(name, tuple):
        msg += f"; its element {bad[0]!r} is not a name: pass strings"
    elif name is None:
        msg += "; pass the name of the pmap axis to synchronise over, a string"
    else:
        msg += f" (a {type(name).__name__}); pass the name of the pmap axis, a string"
    raise TypeError(msg + ".")


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are averaged over a named axis.

    In training mode the mean and variance are those of the whole batch across every
    participant of ``axis_name`` (two ``psum`` s: of the sums and counts, then of the squared
    deviations from the mean, which is exact where ``E[x²] - E[x]²`` loses digits), so a model
    trained with pmap over ``n`` devices matches the same model on one device with the
    full batch: outputs, gradients and running statistics. Works on CPU and GPU alike.
    Participants may hold different numbers of examples. ``axis_name`` is a name (a
    string) or a tuple of names, as collectives take; anything else (``True``, a list)
    raises a ``TypeError`` here rather than in the first training step.

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
        _check_axis_name(axis_name, "funcdp.nn.SyncBatchNorm", "axis_name")
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

        Raises:
            TypeError: ``module`` is not a ``torch.nn.Module``, or ``axis_name`` is not an
                axis name.
        """
        call = f"funcdp.nn.{cls.__qualname__}.convert"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{call}: `module` must be a torch.nn.Module, got "
                            f"{type(module).__name__} ({module!r:.80}); pass the model whose "
                            f"BatchNorm layers should synchronise, "
                            f"{cls.__qualname__}.convert(model, axis_name).")
        _check_axis_name(axis_name, call, "axis_name")
        return cls._convert(module, axis_name)

    @classmethod
    def _convert(cls, module: nn.Module, axis_name: Any) -> nn.Module:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, axis_name=axis_name)
            new._parameters = module._parameters
            new._buffers = module._buffers
            new.training = module.training
            return new
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = cls._convert(child, axis_name)
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
        n = input.numel() // input.shape[1]
        local = torch.tensor(float(n), dtype=acc, device=input.device)
        total, count = psum((input.sum(dims, dtype=acc), local), self.axis_name)
        if n == 1 and axis_size(self.axis_name) == 1:
            # torch's BatchNorm refuses this too (the variance of one value is 0: the
            # output would be all zeros). Participants never hold fewer than one example
            # (pmap's are all alike, DataParallel's chunks are never empty), so one value
            # here and a single participant is one value over the whole axis.
            raise ValueError(
                f"SyncBatchNorm: Expected more than 1 value per channel when training, got "
                f"input size {input.shape} on the only participant of axis "
                f"{self.axis_name!r}. Use a batch of at least 2 examples, or eval() mode.")
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


def _structure(module: nn.Module) -> tuple[tuple, list]:
    """What a module's replicas are built from, as ``(key, objects)``.

    The key holds every name under which a submodule, parameter or buffer is registered
    and the ids of those objects, so it changes with any change of structure
    (``model[2] = nn.Identity()``, ``append``, a tied or re-created parameter,
    ``.double()``'s new buffers) and not with values or modes. ``objects`` keeps them
    alive while the key is held: no id can be reused by a new object meanwhile.
    One pass in plain Python, quicker than one ``named_parameters()``.
    """
    names: list = []
    objs: list = [module]
    seen = {id(module)}
    stack = [module]
    while stack:  # (a loop, not recursion: a third faster on small models)
        m = stack.pop()
        p, b, c = m._parameters, m._buffers, m._modules
        names.append((*p, None, *b, None, *c))
        objs += p.values()
        objs += b.values()
        for child in c.values():
            if child is not None:
                if id(child) in seen:  # a shared submodule (or a cycle): by reference
                    names.append(id(child))
                    continue
                seen.add(id(child))
                objs.append(child)
                stack.append(child)
    return (tuple(names), tuple(map(id, objs))), objs


class _Built:
    """The replicas' template and the names of a module's tensors, for the module's
    structure when it was built (``key``, see ``_structure``)."""

    def __init__(self, module: nn.Module, axis_name: Any, key: tuple, refs: list) -> None:
        self.module = module
        self.key = key
        self.refs = refs
        template = _replica(module)
        if axis_name is not None:
            template = SyncBatchNorm._convert(template, axis_name)
        self.template = template
        self.param_names = [n for n, _ in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        # Every place a tensor is held, tied weights included: (slot name, canonical name).
        self.param_aliases = _aliases(module.named_parameters(remove_duplicate=False),
                                      module.named_parameters())
        self.buffer_aliases = _aliases(module.named_buffers(remove_duplicate=False),
                                       module.named_buffers())
        # Where the module itself holds each tensor: its values as they are now, without
        # walking the module again.
        self.live_params = [(n, *_slot(module, n, "_parameters")[:2])
                            for n in self.param_names]
        self.live_buffers = [(n, *_slot(module, n, "_buffers")[:2]) for n in self.buffer_names]

    def live(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The module's parameters and buffers now (``named_parameters()``'s tensors)."""
        return ({n: d[k] for n, d, k in self.live_params},
                {n: d[k] for n, d, k in self.live_buffers})


class FunctionalModule:
    """A module as a pure function: ``apply(params, buffers, *args) -> (out, buffers)``.

    The module is used as it is at each call: layers replaced or added after wrapping,
    each layer's mode and attributes (as ``nn.DataParallel`` replicates it on every call).

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
        if sync_batchnorm is not None:
            _check_axis_name(sync_batchnorm, "funcdp.nn.functional", "sync_batchnorm")
        self.module = module
        self.axis_name = sync_batchnorm
        self._init_caches()

    def _init_caches(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._built: _Built | None = None

    # Copies and pickles hold the module and the axis; the replicas are rebuilt (a
    # thread-local cannot be pickled, and the template would be a stale second copy).
    def __getstate__(self) -> dict:
        return {"module": self.module, "axis_name": self.axis_name}

    def __setstate__(self, state: dict) -> None:
        self.module = state["module"]
        self.axis_name = state["axis_name"]
        self._init_caches()

    def _current(self) -> _Built:
        """The template and names for the module's structure now; rebuilt if it changed
        (or ``module`` was reassigned) since the last call."""
        key, refs = _structure(self.module)
        built = self._built
        if built is not None and built.key == key:
            return built
        with self._lock:  # the threads of a pmap find the change together
            built = self._built
            if built is None or built.key != key:
                built = self._built = _Built(self.module, self.axis_name, key, refs)
        return built

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters()}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.module.named_buffers()}

    def _thread_module(self, built: _Built, train: bool | None) -> tuple[nn.Module, list, list]:
        local = self._local
        if getattr(local, "built", None) is not built:
            m = local.module = _replica(built.template)
            local.param_slots = [_slot(m, n, "_parameters") for n, _ in built.param_aliases]
            local.buffer_slots = [_slot(m, n, "_buffers") for n, _ in built.buffer_aliases]
            # Each module with its replica, by name (BatchNorm layers converted in place).
            mine = dict(m.named_modules())
            local.pairs = [(a.__dict__, mine[n].__dict__)
                           for n, a in built.module.named_modules() if n in mine]
            local.built = built
        m = local.module
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
            params: parameters by name (as in ``params``); one left out is the module's
                own.
            buffers: buffers by name; never modified. One left out starts from a copy of
                the module's own.
            *args: the module's forward arguments.
            **kwargs: the module's forward keyword arguments.
            train: training mode (BatchNorm batch statistics, dropout) for every layer;
                default: each layer's own mode in the wrapped module, as it is now.

        Returns:
            ``(output, new_buffers)``: buffers the forward updates (BatchNorm running
            statistics, in place or by assignment) come back in ``new_buffers`` (new
            tensors) instead of being written into ``buffers``.

        Raises:
            ValueError: ``params`` or ``buffers`` has a key the module has no parameter
                (or buffer) for, such as a misspelled name or an ``nn.DataParallel``
                ``module.`` prefix.
        """
        return self._apply(self._current(), params, buffers, args, kwargs, train)

    __call__ = apply

    def _values(self, given: Mapping[str, torch.Tensor], what: str, aliases: list,
                names: list, other_names: list, slots: list) -> list:
        """The tensor for each of ``aliases`` from ``given`` (``params`` or ``buffers``):
        at once when ``given`` holds exactly the module's names, else checked (unknown
        keys are errors) with the module's own for those left out."""
        try:
            values = [given[canonical] for _, canonical in aliases]
        except KeyError:
            values = None
        if values is None or len(given) != len(names):
            values = _given(self, given, what, aliases, other_names,
                            [original for _, _, original in slots])
        return values

    def _apply(self, built: _Built, params: Mapping[str, torch.Tensor],
               buffers: Mapping[str, torch.Tensor], args: tuple, kwargs: dict,
               train: bool | None = None, changed: set | None = None) -> tuple[Any, dict]:
        """``apply`` for the structure ``built`` (its caller checked it is current);
        ``changed``, if given, receives the names of the buffers the forward changed (in
        place or by reassignment)."""
        module, pslots, bslots = self._thread_module(built, train)
        values = self._values(params, "params", built.param_aliases, built.param_names,
                              built.buffer_names, pslots)
        given = self._values(buffers, "buffers", built.buffer_aliases, built.buffer_names,
                             built.param_names, bslots)
        # Copies: the forward's in-place updates never reach the tensors given.
        new_buffers: dict[str, torch.Tensor] = {}
        placed = []
        for (_, canonical), b in zip(built.buffer_aliases, given):
            t = new_buffers.get(canonical)
            if t is None:
                t = new_buffers[canonical] = b.clone()
            placed.append(t)
        # The replica belongs to this thread: set its tensors directly (what
        # functional_call does, minus its generality), and put the originals back after.
        for (d, key, _), v in zip(pslots, values):
            d[key] = v
        for (d, key, _), t in zip(bslots, placed):
            d[key] = t
        versions = [t._version for t in placed] if changed is not None else []
        try:
            out = module(*args, **kwargs)
            for i, ((d, key, _), (_, canonical), t) in enumerate(
                    zip(bslots, built.buffer_aliases, placed)):
                now = d[key]
                if now is not t and isinstance(now, torch.Tensor):
                    new_buffers[canonical] = now  # reassigned (``self.ema = ...``)
                    if changed is not None:
                        changed.add(canonical)
                elif changed is not None and t._version != versions[i]:
                    changed.add(canonical)  # (changed in place)
        finally:
            for d, key, original in pslots:
                d[key] = original
            for d, key, original in bslots:
                d[key] = original
        return out, new_buffers

    # -- state dicts ---------------------------------------------------------------------
    def state_dict(self, params: Mapping[str, Any], buffers: Mapping[str, Any]) -> dict:
        """An ordinary ``state_dict`` of the original module (plain tensors, no prefix).

        Replicated values (from ``funcdp.replicate`` or a pmap) are taken once.
        """
        from funcdp._src.sharded import unreplicate

        built = self._current()
        canonical = dict(built.param_aliases + built.buffer_aliases)
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

        The values are those ``module.load_state_dict`` would copy into the module: each
        takes the dtype and device of the module's own tensor (a float16 state dict gives
        a float32 model float32 parameters), a one-element value fills a 0-dim tensor, and
        a value of another shape is an error. Parameters that need no conversion are the
        state dict's tensors (detached); buffers are copies. Non-persistent buffers (never
        in a ``state_dict``) are the module's own, copied.

        Raises:
            KeyError: listing missing and unexpected keys.
            RuntimeError: a value whose shape differs from the module's tensor, or that is
                not a tensor: every such key listed, in ``nn.Module.load_state_dict``'s
                words.
        """
        built = self._current()
        expected = list(self.module.state_dict())
        sd = strip_prefix(state_dict, expected)
        names = set(expected)
        # Tensors a state_dict does not hold (non-persistent buffers) are the module's.
        missing = [n for n in built.param_names + built.buffer_names
                   if n in names and n not in sd]
        unexpected = [k for k in sd if k not in names]
        if missing or unexpected:
            raise KeyError(f"funcdp.nn: state_dict does not match the module: missing keys "
                           f"{missing}, unexpected keys {unexpected}.")
        own_params, own_buffers = built.live()
        own = {**own_params, **own_buffers}
        canonical = dict(built.param_aliases + built.buffer_aliases)
        loaded: dict[str, torch.Tensor] = {}
        errors: list[str] = []
        # In the state dict's order, as torch reports; a tied weight's other names (which
        # may be left out) are checked too, as torch checks them.
        for name in expected:
            c = canonical.get(name)  # (None: a module's extra state, not a tensor)
            if c is not None and name in sd:
                value = _load_value(name, sd[name], own[c], errors)
                if c == name and value is not None:
                    loaded[name] = value
        if errors:
            from funcdp._src.sharded import ShardedValue

            cls = type(self.module).__name__
            fix = ("Load a state dict of a module built as this one (its parameters' and "
                   "buffers' shapes)")
            if any(isinstance(v, ShardedValue) for v in sd.values()):
                fix += ("; a replicated value (a funcdp.ShardedValue) has a device axis: "
                        "take one copy with funcdp.unreplicate(state_dict)")
            raise RuntimeError(f"funcdp.nn.functional({cls}).load_state_dict: Error(s) in "
                               f"loading state_dict for {cls}:\n\t" + "\n\t".join(errors)
                               + f"\n{fix}.")
        params = {n: loaded[n] if n in loaded else own_params[n].detach()
                  for n in built.param_names}
        buffers = {n: (loaded[n] if n in loaded else own_buffers[n]).detach().clone()
                   for n in built.buffer_names}
        return params, buffers


def _load_value(name: str, value: Any, own: torch.Tensor, errors: list[str]) -> Any:
    """``value`` as ``nn.Module.load_state_dict`` copies it into ``own``: of its dtype and
    device (a meta tensor's value keeps its device: torch would copy nothing), and a
    one-element value for a 0-dim tensor; None after appending torch's message to
    ``errors`` for a value of another shape or that is not a tensor."""
    if not torch.overrides.is_tensor_like(value):
        errors.append(f'While copying the parameter named "{name}", expected torch.Tensor or '
                      f"Tensor-like object from checkpoint but received {type(value)}")
        return None
    if nn.parameter.is_lazy(own):  # (no shape or dtype yet: torch checks nothing either)
        return value.detach()
    if own.dim() == 0 and value.dim() == 1 and value.shape[0] == 1:  # (torch's, for 0.3 files)
        value = value[0]
    if value.shape != own.shape:
        errors.append(f"size mismatch for {name}: copying a param with shape {value.shape} "
                      f"from checkpoint, the shape in current model is {own.shape}.")
        return None
    value = value.detach()
    try:
        return value.to(dtype=own.dtype, device=value.device if own.is_meta else own.device)
    except Exception as e:  # noqa: BLE001 - reported as torch reports it
        errors.append(f'While copying the parameter named "{name}", whose dimensions in the '
                      f"model are {own.size()} and whose dimensions in the checkpoint are "
                      f"{value.size()}, an exception occurred : {e.args}.")
        return None


def _given(fm: FunctionalModule, given: Mapping[str, torch.Tensor], what: str,
           aliases: list[tuple[str, str]], others: list[str], originals: list) -> list:
    """The tensor for each slot of ``aliases`` from ``given``, by canonical or tied name,
    else the module's own (``originals``); unknown keys are an error."""
    known = dict(aliases)
    unexpected = [k for k in given if k not in known]
    if unexpected:
        raise ValueError(_unexpected_message(fm, what, unexpected, list(dict.fromkeys(
            c for _, c in aliases)), others))
    by_canonical = {known[k]: v for k, v in given.items()}
    return [by_canonical.get(c, original) for (_, c), original in zip(aliases, originals)]


def _unexpected_message(fm: FunctionalModule, what: str, unexpected: list[str],
                        names: list[str], others: list[str]) -> str:
    kind = "parameter" if what == "params" else "buffer"
    listed = ", ".join(repr(k) for k in unexpected[:8]) + (
        f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
    msg = (f"funcdp.nn.functional({type(fm.module).__name__}).apply: `{what}` has "
           f"{'a key' if len(unexpected) == 1 else 'keys'} the module has no {kind} for: "
           f"{listed}. Expected names from `.{what}` (")
    shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    msg += f"{len(names)} {kind}s: {shown}); " if names else f"the module has no {kind}s); "
    msg += f"a {kind} left out is the module's own."
    if all(k.startswith("module.") for k in unexpected):
        msg += (" The keys start with 'module.' (an nn.DataParallel or DDP state dict): "
                "strip the prefix, for example with `.load_state_dict(state_dict)`, which "
                "returns `(params, buffers)` without it.")
        return msg
    other_kind = "buffer" if kind == "parameter" else "parameter"
    other_arg = "buffers" if what == "params" else "params"
    for k in unexpected[:8]:
        if k in others:
            msg += f" {k!r} is a {other_kind}: pass it in `{other_arg}`."
            continue
        close = difflib.get_close_matches(k, names, n=1)
        if close:
            msg += f" {k!r}: did you mean {close[0]!r}?"
    return msg


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
        sync_batchnorm: an axis name (a string, or a tuple of names): BatchNorm layers
            then compute batch statistics over that axis (see ``SyncBatchNorm``). The
            module itself is not changed.

    Returns:
        A ``FunctionalModule`` ``m``: ``m.params``, ``m.buffers`` and
        ``m.apply(params, buffers, *args, train=None) -> (out, new_buffers)``.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``, or ``sync_batchnorm`` is not
            an axis name (``True``, say, which is ``funcdp.DataParallel``'s flag).

    Examples:
        >>> import torch, funcdp
        >>> m = funcdp.nn.functional(torch.nn.Linear(3, 2))
        >>> out, _ = m.apply(m.params, m.buffers, torch.ones(4, 3))
        >>> tuple(out.shape)
        (4, 2)
    """
    return FunctionalModule(module, sync_batchnorm)
