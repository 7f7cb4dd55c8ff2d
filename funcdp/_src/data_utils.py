"""Feeding batches to pmap: ragged batches (``pad_shard_unpad``) and prefetching."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch._C import _functorch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device, local_devices
from funcdp._src.pmap import Pmapped
from funcdp._src.sharded import ShardedValue, _devices_or_local, to_devices
from funcdp._src.transform_util import is_axis_leaf


@public
def pad_shard_unpad(fn: Callable, static_argnums: Sequence[int] = (0,),
                    static_argnames: Sequence[str] = (), static_return: bool = False,
                    with_mask: bool = False, num_devices: int | None = None) -> Callable:
    """Wraps a pmapped ``fn`` so it takes a global batch of any size.

    Each batch argument (every positional argument not in ``static_argnums``, every
    keyword argument not in ``static_argnames``) has the global batch on dimension 0; its
    size ``B`` need not divide by the device count ``n``. The wrapper zero-pads it to a
    multiple of ``n``, reshapes it to ``[n, B' / n, ...]`` (``funcdp.shard``), calls
    ``fn``, and turns every per-device output (``[n, B' / n, ...]``, or its device axis
    elsewhere as ``fn``'s ``out_axes`` put it) back into ``[B, ...]`` with the padding
    dropped; other outputs (``out_axes=None`` values) are returned as they are. Which
    outputs are per device is read from ``fn``'s ``out_axes`` when ``fn`` is a pmapped
    function (so this works under ``torch.func`` transforms too); for another function,
    sharded values and stacked tensors recording gradients are. Static arguments are
    passed unchanged (e.g. replicated parameters, mapped by ``fn`` with ``in_axes=None``).

    Args:
        fn: a pmapped function whose batch arguments are mapped over axis 0.
        static_argnums: positions of the arguments not to pad or shard.
        static_argnames: keyword arguments not to pad or shard.
        static_return: return ``fn``'s outputs as they are (no unsharding).
        with_mask: pass ``mask=`` to ``fn``: a bool tensor ``[n, B' / n]``, True for real
            examples, so that reductions inside ``fn`` can ignore the padding.
        num_devices: ``n``; default: the number of local devices.

    Returns:
        The wrapped function.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.pmap(lambda w, x: x * w, in_axes=(None, 0))
        >>> out = funcdp.pad_shard_unpad(f)(torch.tensor(2.0), torch.ones(10, 3))
        >>> tuple(out.shape), float(out.sum())
        ((10, 3), 60.0)
    """
    statics = set(static_argnums)
    static_names = set(static_argnames)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        n = num_devices if num_devices is not None else len(local_devices())
        batch_leaves = [leaf for i, a in enumerate(args) if i not in statics
                        for leaf in tree_util.tree_leaves(a)]
        batch_leaves += [leaf for k, a in kwargs.items() if k not in static_names
                         for leaf in tree_util.tree_leaves(a)]
        if not batch_leaves:
            raise ValueError(
                "funcdp.pad_shard_unpad: no batch argument: every argument is static "
                f"(static_argnums={tuple(sorted(statics))}, static_argnames="
                f"{tuple(sorted(static_names))}); pass the batch as an argument that is not "
                "static.")
        sizes = {int(torch.as_tensor(x).shape[0]) for x in batch_leaves}
        if len(sizes) != 1:
            raise ValueError(f"funcdp.pad_shard_unpad: the batch arguments have different "
                             f"leading sizes {sorted(sizes)}; they must share one batch size.")
        batch = sizes.pop()
        padded = -(-batch // n) * n

        def prep(x: Any) -> torch.Tensor:
            t = torch.as_tensor(x)
            if padded != batch:
                pad = torch.zeros((padded - batch,) + tuple(t.shape[1:]), dtype=t.dtype,
                                  device=t.device)
                t = torch.cat([t, pad])
            return t.reshape(n, padded // n, *t.shape[1:])

        new_args = [a if i in statics else tree_util.tree_map(prep, a)
                    for i, a in enumerate(args)]
        new_kwargs = {k: a if k in static_names else tree_util.tree_map(prep, a)
                      for k, a in kwargs.items()}
        if with_mask:
            new_kwargs["mask"] = (torch.arange(padded) < batch).reshape(n, padded // n)
        out = fn(*new_args, **new_kwargs)
        if static_return:
            return out

        def unprep(x: Any, axis: Any) -> Any:
            # Per-device outputs (the device axis at ``axis``, each device's batch first)
            # become [B, ...]; out_axes=None values come back as they are.
            t = x.to_tensor() if isinstance(x, ShardedValue) else x
            if axis is None or not isinstance(t, torch.Tensor):
                return t
            if axis:
                t = t.movedim(axis, 0)
            if t.ndim < 2 or t.shape[0] != n or t.shape[1] != padded // n:
                return t
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])[:batch]

        leaves, treedef = tree_util.tree_flatten(out)
        return tree_util.tree_unflatten(
            [unprep(x, a) for x, a in zip(leaves, _output_axes(fn, leaves, treedef))], treedef)

    return wrapped


def _output_axes(fn: Callable, leaves: list, treedef: Any) -> list:
    """Where each output leaf of ``fn`` has its device axis (None: not per device)."""
    if isinstance(fn, Pmapped):
        axes = tree_util.broadcast_prefix(fn._out_axes, treedef, is_axis_leaf)
        # (Normalized against the stacked output's rank: the device axis included.)
        return [a if a is None or a >= 0 or not isinstance(x, (torch.Tensor, ShardedValue))
                else a + len(x.shape) for x, a in zip(leaves, axes)]
    # Some other function: its sharded values are per device, and so are tensors that a
    # pmap returned stacked (recording gradients, or under a torch.func transform).
    return [0 if isinstance(x, ShardedValue) or (isinstance(x, torch.Tensor) and (
        x.requires_grad or _functorch.is_functorch_wrapped_tensor(x))) else None
        for x in leaves]


@public
def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       devices: Sequence[Device] | None = None) -> Iterator[Any]:
    """Puts the next ``size`` batches on their devices ahead of use.

    Every item is a pytree of tensors whose leading dimension is the device count (as
    ``funcdp.shard`` makes them); each leaf comes back as a ``ShardedValue``
    with shard ``i`` on device ``i``, which pmap uses in place. On GPUs the copies are
    issued ``size`` batches early from pinned memory without blocking, so they overlap
    with the computation on the previous batches; on virtual CPU devices the shards are
    views (nothing is copied).

    Examples:
        >>> import torch, funcdp
        >>> n = funcdp.local_device_count()
        >>> batches = (funcdp.shard(torch.ones(2 * n, 3)) for _ in range(3))
        >>> [type(b).__name__ for b in funcdp.prefetch_to_device(batches)]
        ['ShardedValue', 'ShardedValue', 'ShardedValue']
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"funcdp.prefetch_to_device: `size` must be a positive int, got "
                         f"{size!r}.")
    devs = _devices_or_local(devices, "funcdp.prefetch_to_device")

    def place(x: Any) -> ShardedValue:
        t = torch.as_tensor(x)
        if t.ndim == 0 or t.shape[0] != len(devs):
            raise ValueError(f"funcdp.prefetch_to_device: each leaf needs a leading dimension "
                             f"of {len(devs)} (one slice per device; see funcdp.shard), got "
                             f"shape {tuple(t.shape)}.")
        if devs[0].platform == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        return ShardedValue(to_devices(t.unbind(0), devs), devs, 0)

    queue: collections.deque = collections.deque()
    it = iter(iterator)
    for item in it:
        queue.append(tree_util.tree_map(place, item))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
