"""``funcdp.DataParallel``: a drop-in for ``torch.nn.DataParallel`` on the functional core.

The module is run as a pure function on every device (``funcdp.nn.functional``), over a
chunked pmap: inputs are scattered along ``dim`` like ``nn.DataParallel`` does (tensors
split into ``torch.chunk``-sized pieces, everything else passed to every replica),
outputs are gathered on ``output_device``, and because the parameters enter the call as
differentiable inputs, ``loss.backward()`` leaves the summed gradients on the original
module's parameters, so any ``torch.optim`` optimizer works unchanged.

What it does differently from ``nn.DataParallel``:

- runs on virtual CPU devices too (so it can be tested without GPUs);
- BatchNorm statistics are synchronised across devices by default (the model trains as
  on one device with the full batch); with ``sync_batchnorm=False`` each replica
  normalises with its own statistics and the BatchNorm layers' running statistics are
  averaged over the replicas (not taken from device 0). Other buffers a forward
  updates (an EMA, a counter, in training or in eval mode) keep device 0's update, as
  ``nn.DataParallel``'s do;
- parameters are never re-replicated while unchanged (on CPU devices never copied);
- autocast's dtype is honoured in every replica;
- ``state_dict()`` has the plain module's keys and ``load_state_dict`` accepts both those
  and ``nn.DataParallel``'s ``module.``-prefixed keys.

Like ``nn.DataParallel`` it runs the module as it is at each call: layers replaced or
added through ``model.module`` (or a new ``model.module``) are used from the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.collectives import axis_index, pmean
from funcdp._src.devices import Device, local_devices
from funcdp._src.nn import functional, strip_prefix
from funcdp._src.pmap import _NO_SELF, Pmapped

_AXIS = "funcdp.DataParallel"


@public
class DataParallel(nn.Module):
    """Data parallelism for an ``nn.Module``, with ``nn.DataParallel``'s interface.

    Args:
        module: the module to replicate.
        device_ids: indices into ``funcdp.local_devices()`` (default: all).
        output_device: where outputs are gathered: a device index, a ``torch.device``
            or ``"cpu"`` (default: the first of ``device_ids``).
        dim: the dimension inputs are scattered along and outputs gathered along.
        sync_batchnorm: synchronise BatchNorm statistics across devices (default True).

    Examples:
        >>> import torch, funcdp
        >>> model = funcdp.DataParallel(torch.nn.Linear(3, 2))
        >>> out = model(torch.randn(8, 3))
        >>> out.sum().backward()
        >>> model.module.weight.grad.shape
        torch.Size([2, 3])
    """

    def __init__(self, module: nn.Module, device_ids: Sequence[int | Device] | None = None,
                 output_device: Any = None, dim: int = 0, *,
                 sync_batchnorm: bool = True) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"funcdp.DataParallel: `module` must be a torch.nn.Module, got "
                            f"{type(module).__name__}.")
        devs = local_devices()
        if device_ids is None:
            chosen = devs
        else:
            chosen = []
            for d in device_ids:
                if isinstance(d, Device):
                    chosen.append(d)
                elif isinstance(d, torch.device) and d.type == "cuda" and d.index is not None:
                    chosen.append(_by_index(devs, d.index))
                elif isinstance(d, int) and not isinstance(d, bool):
                    chosen.append(_by_index(devs, d))
                else:
                    raise TypeError(f"funcdp.DataParallel: `device_ids` entries must be device "
                                    f"indices (ints) or funcdp devices, got {d!r}.")
            if not chosen:
                raise ValueError("funcdp.DataParallel: `device_ids` is empty.")
            given = list(device_ids)
            twice = [given[j] for j, d in enumerate(chosen) if d in chosen[:j]]
            if twice:
                raise ValueError(
                    f"funcdp.DataParallel: `device_ids` must name each device once (one "
                    f"replica per device), got {given!r}, which repeats "
                    f"{', '.join(map(repr, twice))}. Remove the repeats.")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"funcdp.DataParallel: `dim` must be an int, got {dim!r}.")
        self.module = module
        self.device_ids = [d.local_index for d in chosen]
        self._devices = chosen
        self.dim = dim
        self.output_device = _output_device(output_device, devs, chosen)
        if not isinstance(sync_batchnorm, bool):
            raise TypeError(f"funcdp.DataParallel: `sync_batchnorm` must be True or False, "
                            f"got {sync_batchnorm!r}.")
        self.sync_batchnorm = sync_batchnorm
        self._net = functional(module, sync_batchnorm=_AXIS if sync_batchnorm else None)
        self.register_state_dict_post_hook(DataParallel._plain_keys)
        self.register_load_state_dict_pre_hook(DataParallel._wrapped_keys)
        self.register_load_state_dict_post_hook(DataParallel._plain_missing)
        # One pmapped replica function per input structure (which leaves are tensors).
        self._replicas: dict = {}
        self._bn_names: tuple | None = None  # (structure, _bn_stats's names for it)

    def _run_replica(self, params: dict, buffers: dict, args: tuple, kwargs: dict,
                     holder: _Holder) -> Any:
        # Each layer in its own mode, as the wrapped module has it (nn.DataParallel's
        # replicas copy every submodule's flag).
        changed: set = set()
        out, new_buffers = self._net._apply(holder.built, params, buffers, args, kwargs,
                                            changed=changed)
        if not self.sync_batchnorm and new_buffers:
            # Per-replica statistics; BatchNorm's running averages are averaged over
            # the replicas.
            new_buffers = {k: pmean(v, _AXIS) if k in holder.bn_stats else v
                           for k, v in new_buffers.items()}
        if int(axis_index(_AXIS)) == 0:
            # Device 0's buffers are what remains, as with nn.DataParallel (whose device-0
            # replica shares the module's buffers): synchronised BatchNorm statistics are
            # the same everywhere, other updates (an EMA, a counter) may differ.
            holder.buffers = new_buffers
            holder.changed = changed
        # Tensors are gathered along `dim` (scalars become one entry per replica, as in
        # nn.DataParallel); anything else is returned as device 0 has it.
        leaves, treedef = tree_util.tree_flatten(out)
        mask = [isinstance(x, torch.Tensor) for x in leaves]
        tensors = []
        for i, (x, m) in enumerate(zip(leaves, mask)):
            if m:
                if not -max(x.ndim, 1) <= self.dim < max(x.ndim, 1):
                    raise ValueError(self._gather_dim_message(x, treedef, i))
                tensors.append(x.unsqueeze(0) if x.ndim == 0 else x)
        if holder.value is None:  # the output's structure and non-tensor values, once
            holder.value = (treedef, mask, [None if m else x for x, m in zip(leaves, mask)])
        return tensors

    def _gather_dim_message(self, x: torch.Tensor, treedef: Any, i: int) -> str:
        name = "output" + tree_util.keystr(tree_util.leaf_paths(treedef)[i])
        if x.ndim == 0:
            return (f"funcdp.DataParallel: {name} is a 0-d tensor (a scalar): the replicas' "
                    f"scalars are gathered into a vector along dim 0 only, not along "
                    f"`dim`={self.dim}. Return it with {self.dim + 1} or more dimensions, "
                    f"or reduce it outside the DataParallel.")
        return (f"funcdp.DataParallel: cannot gather {name} along `dim`={self.dim}: it has "
                f"shape {tuple(x.shape)} (valid dims {-x.ndim}..{x.ndim - 1}). Outputs are "
                f"gathered along the dimension inputs are scattered along; return tensors "
                f"that have it.")

    def _replica_for(self, treedef: Any, mask: tuple[bool, ...]) -> Pmapped:
        key = (treedef, mask)
        rep = self._replicas.get(key)
        if rep is None:
            axes = tree_util.tree_unflatten([self.dim if m else None for m in mask], treedef)
            rep = self._replicas[key] = Pmapped(
                self._run_replica, _AXIS, (None, None) + tuple(axes) + (None,),
                self.dim, (), self._devices, None, ())
        return rep

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        chunks, treedef, mask = self._scatter_plan(inputs, kwargs)
        module = self.module
        net = self._net
        if net.module is not module:  # ``model.module = ...`` since the last call
            net = self._net = functional(module, sync_batchnorm=net.axis_name)
        holder = _Holder()
        # The module's structure now (rebuilt if layers were replaced or added).
        holder.built = built = net._current()
        if not self.sync_batchnorm:
            holder.bn_stats = self._bn_stats(built)
        params, buffers = built.live()
        replica = self._replica_for(treedef, mask)
        tensors = replica._call_chunks(
            _NO_SELF, chunks, (params, buffers, inputs, kwargs, holder), {})
        treedef, mask, others = holder.value
        it = iter(tensors)
        out = tree_util.tree_unflatten([next(it) if m else o for o, m in zip(others, mask)],
                                       treedef)
        new_buffers = holder.buffers
        # Device 0's updates are kept, as the bare module keeps its own: every buffer
        # where a layer trains (the wrapper's own flag is not enough: ``model.eval()``,
        # then ``model.module.train()``), else those the forward changed (a counter).
        if new_buffers:
            names = (new_buffers if self.training or any(m.training for m in module.modules())
                     else holder.changed)
            with torch.no_grad():
                for name in names:
                    buffers[name].copy_(new_buffers[name])
        return self._gather(out)

    def _bn_stats(self, built: Any) -> frozenset:
        """The names of BatchNorm layers' running statistics in the structure ``built``."""
        cached = self._bn_names
        if cached is not None and cached[0] is built:
            return cached[1]
        names = frozenset(
            f"{prefix}.{stat}" if prefix else stat
            for prefix, m in self.module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for stat in ("running_mean", "running_var")
            if getattr(m, stat, None) is not None)
        self._bn_names = (built, names)
        return names

    # -- scatter / gather ------------------------------------------------------------
    def _scatter_plan(self, inputs: tuple, kwargs: dict) -> tuple[tuple, Any, tuple]:
        """Chunk sizes along ``dim`` (``torch.chunk``'s) and the arguments to map.

        Tensors are split; everything else (numbers, strings, None) goes to every replica
        unchanged, as with ``nn.DataParallel``.
        """
        leaves, treedef = tree_util.tree_flatten((inputs, kwargs))
        sizes = {}
        dim = self.dim
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if not -leaf.ndim <= dim < leaf.ndim:
                    raise ValueError(self._scatter_dim_message(leaf, treedef, i))
                sizes[i] = leaf.shape[dim]
        if not sizes:
            raise ValueError("funcdp.DataParallel: no tensor input to scatter; the forward "
                             "needs at least one tensor argument with a batch dimension.")
        distinct = set(sizes.values())
        if len(distinct) > 1:
            paths = tree_util.leaf_paths(treedef)
            listing = ", ".join(f"{_arg_name(paths[i])}: {s}" for i, s in sizes.items())
            raise ValueError(f"funcdp.DataParallel: input tensors have different sizes along "
                             f"dim {self.dim} ({listing}); they are scattered together, so "
                             f"they must agree.")
        batch = distinct.pop()
        if batch == 0:
            raise ValueError("funcdp.DataParallel: the batch is empty.")
        n = min(len(self._devices), batch)
        chunks = tuple(c.shape[0] for c in torch.empty(batch, 0).chunk(n))
        mask = tuple(isinstance(leaf, torch.Tensor) for leaf in leaves)
        return chunks, treedef, mask

    def _scatter_dim_message(self, leaf: torch.Tensor, treedef: Any, i: int) -> str:
        name = _arg_name(tree_util.leaf_paths(treedef)[i])
        if leaf.ndim == 0:
            return (f"funcdp.DataParallel: cannot scatter {name}, a 0-d tensor (a scalar), "
                    f"along `dim`={self.dim}: tensors are split into one chunk per device. "
                    f"Pass it as a Python number (every replica gets it whole), or with a "
                    f"batch dimension.")
        return (f"funcdp.DataParallel: `dim`={self.dim} is out of range for {name} of shape "
                f"{tuple(leaf.shape)} (valid dims {-leaf.ndim}..{leaf.ndim - 1}); every "
                f"tensor input is scattered along `dim`. Pass a `dim` they all have.")

    def _gather(self, out: Any) -> Any:
        def move(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.device != self.output_device:
                return t.to(self.output_device)
            return t

        return tree_util.tree_map(move, out)

    # -- state dicts -----------------------------------------------------------------
    # As hooks rather than overrides of state_dict/load_state_dict, so that they also
    # apply where a DataParallel is a submodule (a parent saves and loads its children
    # through these hooks, never through the children's own methods).
    @staticmethod
    def _plain_keys(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
        """``state_dict`` gives the wrapped module's keys without ``module.``: loadable
        into the bare module."""
        _move_prefix(state_dict, prefix + "module.", prefix)

    @staticmethod
    def _wrapped_keys(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        """Loading takes the plain module's keys or ``nn.DataParallel``'s ``module.`` keys
        (keys the module does not have are left as they are, and reported so)."""
        assert isinstance(module, DataParallel)
        module.__dict__["_load_prefix"] = prefix  # for _plain_missing
        names = list(module.module.state_dict())
        rel = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
        if list(strip_prefix(dict.fromkeys(rel), names)) != rel:
            return  # nn.DataParallel's keys: what the wrapped module's loading expects
        _move_prefix(state_dict, prefix, prefix + "module.", only=set(names))

    @staticmethod
    def _plain_missing(module: nn.Module, incompatible: Any) -> None:
        """Missing keys named as ``state_dict`` names them (without ``module.``)."""
        prefix = module.__dict__.get("_load_prefix", "")
        inner = prefix + "module."
        incompatible.missing_keys[:] = [prefix + k[len(inner):] if k.startswith(inner) else k
                                        for k in incompatible.missing_keys]

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, taking and naming keys as ``state_dict`` gives
        them (without ``module.``; ``nn.DataParallel``'s prefixed keys are taken too)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            msg = str(e)
            if "for module." not in msg:
                raise
            raise RuntimeError(msg.replace(" for module.", " for ")) from None

    # Copies and pickles (copy.deepcopy, torch.save(model)) leave out the per-structure
    # pmapped replicas, rebuilt on the next call.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_replicas"] = {}
        return state

    def extra_repr(self) -> str:
        return (f"device_ids={self.device_ids}, output_device={self.output_device}, "
                f"dim={self.dim}, sync_batchnorm={self.sync_batchnorm}")


def _move_prefix(state_dict: dict, old: str, new: str, only: set | None = None) -> None:
    """Renames the keys under ``old`` (those in ``only``, if given, relative to it) to
    the same under ``new``. The version metadata of the modules there is copied, not
    moved (each module's ``_load_from_state_dict`` reads its own, and a parent loading a
    nested DataParallel passes no metadata to its hooks: a state dict keeps both)."""
    for k in [k for k in state_dict if k.startswith(old)]:
        if only is None or k[len(old):] in only:
            state_dict[new + k[len(old):]] = state_dict.pop(k)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        # The module at ``old`` itself is keyed without the trailing dot.
        for k in [k for k in meta if k == old[:-1] or k.startswith(old)]:
            meta[new[:-1] if k == old[:-1] else new + k[len(old):]] = meta[k]


class _Holder:
    """A pytree leaf (passed to every replica unchanged) that carries the module's
    structure in and the output's structure and device 0's buffers back."""

    __slots__ = ("value", "built", "buffers", "changed", "bn_stats")

    def __init__(self) -> None:
        self.value: Any = None
        self.built: Any = None
        self.buffers: dict | None = None
        self.changed: set = set()  # the names of the buffers device 0's forward changed
        self.bn_stats: frozenset = frozenset()


def _arg_name(path: tuple) -> str:
    """A forward argument named as the call wrote it: ``inputs[0]``, ``kwargs['t']``
    (``path`` into ``(inputs, kwargs)``)."""
    return ("inputs" if path[0].idx == 0 else "kwargs") + tree_util.keystr(path[1:])


def _output_device(given: Any, devs: list[Device], chosen: list[Device]) -> torch.device:
    """Where outputs are gathered: ``output_device`` as an index of the local devices
    (``device_ids``' way: an int, or a CUDA device's index), a funcdp device, or a
    ``torch.device`` (or its name) that exists here; by default device_ids[0]'s."""
    if given is None:
        return chosen[0].torch_device
    if isinstance(given, Device):
        return given.torch_device
    if isinstance(given, int) and not isinstance(given, bool):
        return _by_index(devs, given).torch_device
    try:
        dev = torch.device(given)
    except (RuntimeError, TypeError):
        raise TypeError(f"funcdp.DataParallel: `output_device` must be a device index, a "
                        f"funcdp device or a torch.device, got {given!r}.") from None
    if dev.type == "cuda" and dev.index is not None:
        return _by_index(devs, dev.index).torch_device
    if dev.type != "cpu" and not any(d.torch_device.type == dev.type for d in devs):
        raise ValueError(f"funcdp.DataParallel: `output_device` {given!r} is not a device of "
                         f"this process (its devices are {devs[0].torch_device.type} "
                         f"devices); pass a device index, or leave it out for "
                         f"device_ids[0]'s.")
    return dev


def _by_index(devs: list[Device], i: int) -> Device:
    if not 0 <= i < len(devs):
        raise ValueError(f"funcdp.DataParallel: device index {i} is out of range; there are "
                         f"{len(devs)} local devices (funcdp.local_devices()).")
    return devs[i]
