"""Feeding batches to pmap: ragged batches (``pad_shard_unpad``) and prefetching."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device, local_devices
from funcdp._src.sharded import ShardedValue, _devices_or_local, to_devices


@public
def pad_shard_unpad(fn: Callable, static_argnums: Sequence[int] = (0,),
                    static_argnames: Sequence[str] = (), static_return: bool = False,
                    with_mask: bool = False, num_devices: int | None = None) -> Callable:
    """Wraps a pmapped ``fn`` so it takes a global batch of any size.

    Each batch argument (every positional argument not in ``static_argnums``, every
    keyword argument not in ``static_argnames``) has the global batch on dimension 0; its
    size ``B`` need not divide by the device count ``n``. The wrapper zero-pads it to a
    multiple of ``n``, reshapes it to ``[n, B' / n, ...]`` (``funcdp.shard``), calls
    ``fn``, and turns every per-device output (``[n, B' / n, ...]``) back into
    ``[B, ...]`` with the padding dropped; other outputs (``out_axes=None`` values) are
    returned as they are. Static arguments are passed unchanged (e.g. replicated parameters,
    mapped by ``fn`` with ``in_axes=None``).

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

        def unprep(x: Any) -> Any:
            # Per-device outputs ([n, B' / n, ...]: sharded values, or stacked tensors when
            # the call records gradients) become [B, ...]; out_axes=None values (plain
            # tensors) come back as they are.
            per_device = isinstance(x, ShardedValue) or (
                isinstance(x, torch.Tensor) and x.requires_grad)
            t = x.to_tensor() if isinstance(x, ShardedValue) else x
            if (not per_device or t.ndim < 2 or t.shape[0] != n
                    or t.shape[1] != padded // n):
                return t
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])[:batch]

        return tree_util.tree_map(unprep, out)

    return wrapped


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
