"""Sharded values: pmap outputs that stay on their devices.

A ``ShardedValue`` is the logical tensor ``stack(shards, axis)`` whose slices live
on different devices. Nothing is gathered until the value is asked for: ``x[i]`` (with
``axis=0``) returns device ``i``'s shard without copying, and passing ``x`` back into a
pmap over the same devices hands each device its own shard again. Converting to a tensor
(``x.to_tensor()``, ``np.asarray(x)``, ``float(x)``, printing, or any torch function)
gathers once and caches the result.

With more shards than devices (``n = devices * k``), each device holds a *block* of
``k`` consecutive slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device, check_devices, local_devices
from funcdp._src.transform_util import a_type


class ShardedValue:
    """A value whose slices along ``axis`` live on different devices.

    Attributes:
        shards: one tensor per device: the device's slice (or block of ``block``
            consecutive slices, still carrying the mapped axis, when ``block > 1``).
        devices: the device of each shard.
        axis: the position of the mapped axis in the logical value.
        block: slices per device (1 unless the mapped size exceeds the device count).

    Examples:
        >>> import torch, funcdp
        >>> out = funcdp.pmap(lambda v: v * 2)(torch.ones(funcdp.local_device_count(), 3))
        >>> out.shape[1], out[0]
        (3, tensor([2., 2., 2.]))
    """

    __slots__ = ("_shards", "_devices", "_axis", "_block", "_value", "_versions",
                 "_shard_shape", "_key", "__weakref__")

    def __init__(self, shards: Sequence[torch.Tensor], devices: Sequence[Device], axis: int,
                 block: int = 1) -> None:
        self._shards = tuple(shards)
        self._devices = tuple(devices)
        self._axis = axis
        self._block = block
        self._value: torch.Tensor | None = None
        # The version counters of the shards and of ``_value`` when it was gathered.
        self._versions: tuple | None = None
        self._key: Any = None  # the layout's part of a pmap plan key, once made there
        self._shard_shape = self._shards[0].shape

    # -- structure -----------------------------------------------------------
    @property
    def shards(self) -> tuple[torch.Tensor, ...]:
        return self._shards

    @property
    def devices(self) -> tuple[Device, ...]:
        return self._devices

    @property
    def axis(self) -> int:
        return self._axis

    @property
    def block(self) -> int:
        return self._block

    @property
    def shape(self) -> torch.Size:
        s = list(self._shard_shape)
        if self._block == 1:
            s.insert(self._axis, len(self._shards))
        else:
            s[self._axis] *= len(self._shards)
        return torch.Size(s)

    @property
    def dtype(self) -> torch.dtype:
        return self._shards[0].dtype

    @property
    def ndim(self) -> int:
        return len(self._shard_shape) + (1 if self._block == 1 else 0)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        """The torch device of the first shard (where ``to_tensor`` gathers by default)."""
        return self._shards[0].device

    @property
    def requires_grad(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.shape[0]

    # -- per-device access ---------------------------------------------------
    def shard(self, i: int) -> torch.Tensor:
        """Logical slice ``i`` along the mapped axis, without gathering."""
        n = self.shape[self._axis]
        if not -n <= i < n:
            raise IndexError(f"ShardedValue.shard: index {i} out of range for mapped size {n}")
        i %= n
        if self._block == 1:
            return self._shards[i]
        return self._shards[i // self._block].select(self._axis, i % self._block)

    def __getitem__(self, idx: Any) -> Any:
        # (A bool index is not a position: x[True] adds a dimension, as for a tensor.)
        if self._axis == 0 and isinstance(idx, int) and not isinstance(idx, bool):
            return self.shard(idx)
        if (self._axis == 0 and isinstance(idx, slice) and idx.step in (None, 1)
                and not self._gathered()):
            n = len(self)
            start, stop, _ = idx.indices(n)
            if stop <= start:
                return self.to_tensor()[idx]
            parts = [self.shard(i) for i in range(start, stop)]
            return torch.stack(parts) if parts else self.to_tensor()[idx]
        return self.to_tensor()[idx]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __contains__(self, element: Any) -> bool:
        # As for a tensor: whether any element equals ``element`` (iterating would compare
        # whole rows, whose truth value is ambiguous).
        if isinstance(element, ShardedValue):
            element = element.to_tensor()
        return self.to_tensor().__contains__(element)

    # -- conversion ------------------------------------------------------------
    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Gathers the whole value into one ``torch.Tensor`` on ``device``.

        Args:
            device: where to put the result; default: the first shard's device.

        Returns:
            A tensor of shape ``shape``. It is cached, so asking again is free; a write
            to a shard or to the tensor returned by an in-place torch operation makes the
            next call gather again. Writes torch does not count (through ``.data``, a
            NumPy view, or in inference mode) are not seen: to modify the result, write
            to a ``clone()`` of it. A ``ShardedValue`` itself cannot be written in place.
        """
        if not self._gathered():
            if torch.is_inference_mode_enabled() and not any(
                    s.is_inference() for s in self._shards):
                # Gathered as a normal tensor, whose in-place writes (in inference mode
                # too) bump its version counter, so that the cache sees them.
                with torch.inference_mode(False):
                    value = self._gather()
            else:
                value = self._gather()
            self._value = value
            self._versions = _versions((value, *self._shards))
        else:
            value = self._value  # type: ignore[assignment]  # (gathered: not None)
        if device is not None and torch.device(device) != value.device:
            return value.to(device)
        return value

    def _gather(self) -> torch.Tensor:
        target = self._shards[0].device
        parts = [s if s.device == target else s.to(target) for s in self._shards]
        if self._block == 1:
            return torch.stack(parts, self._axis)
        return torch.cat(parts, self._axis)

    def _gathered(self) -> bool:
        """Whether ``_value`` holds the shards' current value (nothing written since)."""
        return (self._value is not None
                and self._versions == _versions((self._value, *self._shards)))

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x.to(...)`` gathers then behaves as ``torch.Tensor.to``."""
        return self.to_tensor().to(*args, **kwargs)

    def numpy(self) -> np.ndarray:
        return self.to_tensor().detach().cpu().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        # Lets torch.as_tensor / torch.tensor / np.from_dlpack take a ShardedValue.
        return self.to_tensor().detach().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self.to_tensor().__dlpack_device__()

    def tolist(self) -> Any:
        return self.to_tensor().tolist()

    def item(self) -> Any:
        return self.to_tensor().item()

    def __float__(self) -> float:
        return float(self.to_tensor())

    def __int__(self) -> int:
        return int(self.to_tensor())

    def __complex__(self) -> complex:
        return complex(self.to_tensor())

    def __bool__(self) -> bool:
        return bool(self.to_tensor())

    def __index__(self) -> int:
        return self.to_tensor().__index__()

    def __repr__(self) -> str:
        body = repr(self.to_tensor())
        return (f"ShardedValue({body}, axis={self._axis}, "
                f"devices={list(self._devices)})")

    def __str__(self) -> str:
        return str(self.to_tensor())

    def __getattr__(self, name: str) -> Any:
        # Anything else a tensor has (x.sum(), x.argmax(1), ...) works on the gathered value.
        if name.startswith("__"):
            raise AttributeError(name)
        if _writes(name) and hasattr(torch.Tensor, name):
            def write(*args: Any, **kwargs: Any) -> Any:
                raise _read_only(f"x.{name}(...)")
            return write
        return getattr(self.to_tensor(), name)

    def __setitem__(self, idx: Any, value: Any) -> None:
        raise _read_only("x[...] = value")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # (The tensor written is the first argument, passed by keyword in some calls:
        # torch.nn.init.uniform_(tensor=...); a list of them for torch._foreach_*_.)
        target = args[0] if args else next(iter(kwargs.values()), None)
        if (_writes(name) or kwargs.get("inplace")) and any(
                isinstance(t, ShardedValue) for t in tree_util.tree_leaves(target)):
            raise _read_only(f"{name}(x, ...{', inplace=True' if kwargs.get('inplace') else ''})")
        if any(isinstance(o, ShardedValue) for o in tree_util.tree_leaves(kwargs.get("out"))):
            raise _read_only(f"{name}(..., out=x)")
        args, kwargs = tree_util.tree_map(
            lambda v: v.to_tensor() if isinstance(v, ShardedValue) else v, (args, kwargs)
        )
        return func(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any):
        # Pickling (torch.save) stores the gathered tensor: devices are not portable, and a
        # plain tensor loads anywhere, with weights_only=True too.
        return self.to_tensor().detach().__reduce_ex__(protocol)

    __hash__ = None  # type: ignore[assignment]


# Tensor methods named as in-place ones that write no data.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "detach_", "rename_"})


def _writes(name: str) -> bool:
    """Whether torch's function or method ``name`` writes its first argument in place."""
    return name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES


def _read_only(what: str) -> TypeError:
    return TypeError(
        f"ShardedValue: {what} would write to a gathered copy, not to the shards on the "
        f"devices, and be lost. A ShardedValue cannot be written in place (like a JAX "
        f"array): compute a new value (x = x * 2, or inside the pmap), or write to a tensor "
        f"of your own: t = x.to_tensor().clone().")


def _binary(name: str):
    def op(self, other):
        other = other.to_tensor() if isinstance(other, ShardedValue) else other
        return getattr(self.to_tensor(), name)(other)

    op.__name__ = name
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__",
              "__rmod__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__and__",
              "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__",
              "__rlshift__", "__rshift__", "__rrshift__", "__eq__", "__ne__", "__lt__", "__le__",
              "__gt__", "__ge__"):
    setattr(ShardedValue, _name, _binary(_name))
for _name in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ShardedValue, _name, (lambda n: lambda self: getattr(self.to_tensor(), n)())(_name))
ShardedValue.__module__ = "funcdp"


def _devices_or_local(devices: Sequence[Device] | None, call: str) -> list[Device]:
    return local_devices() if devices is None else check_devices(devices, call)


def to_devices(parts: Sequence[torch.Tensor], devices: Sequence[Device]) -> list:
    """``parts[i]`` on ``devices[i]``; values already there (all of them, on virtual CPU
    devices) are used as they are, others copied without blocking."""
    if devices[0].platform == "cpu" and parts[0].device.type == "cpu":
        return list(parts)
    return [p if p.device == d.torch_device else p.to(d.torch_device, non_blocking=True)
            for p, d in zip(parts, devices)]


def _leaf_tensor(leaf: Any, call: str, spec: Any, j: int) -> torch.Tensor:
    """Leaf ``j`` of a tree of spec ``spec`` as a tensor; an error naming it if it is none."""
    if isinstance(leaf, torch.Tensor):
        return leaf
    if isinstance(leaf, ShardedValue):
        return leaf.to_tensor()
    try:
        return torch.as_tensor(leaf)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{call}: {_where(spec, j)} is {a_type(leaf)} ({leaf!r:.60}); every leaf must be "
            f"a tensor, an array or a number (None leaves are passed through). Leave other "
            f"values out of the tree.") from None


def _where(spec: Any, j: int) -> str:
    """``tree['w'][0]``: the path of leaf ``j`` of a tree of spec ``spec``."""
    return "tree" + tree_util.keystr(tree_util.leaf_paths(spec)[j])


def _map_tensors(fn: Any, tree: Any, call: str) -> Any:
    """``tree`` with ``fn(tensor, j, spec)`` for each leaf ``j`` (as a tensor); None leaves
    are passed through, as pmap passes them."""
    leaves, spec = tree_util.tree_flatten(tree)
    return tree_util.tree_unflatten(
        [None if x is None else fn(_leaf_tensor(x, call, spec, j), j, spec)
         for j, x in enumerate(leaves)], spec)


@public
def replicate(tree: Any, devices: Sequence[Device] | None = None) -> Any:
    """Puts one copy of every leaf of ``tree`` on each device.

    The result's leaves are ``ShardedValue`` s of shape ``[len(devices), ...]``,
    ready to pass to a pmap with ``in_axes=0`` (the JAX/Flax way to hold replicated
    parameters). On virtual CPU devices the replicas share one storage: nothing is copied.

    Args:
        tree: a pytree of tensors (or numbers / arrays); ``None`` leaves are passed
            through, as pmap passes them.
        devices: target devices (a list of distinct ``funcdp.Device``); default: all
            local devices.

    Returns:
        A pytree of the same structure with replicated leaves.

    Raises:
        TypeError: ``devices`` is not a list of funcdp devices, or a leaf is not a
            tensor, an array, a number or None (the message names its path).
        ValueError: ``devices`` is empty or lists a device twice.

    Examples:
        >>> import torch, funcdp
        >>> params = funcdp.replicate({"w": torch.ones(3)})
        >>> tuple(params["w"].shape) == (funcdp.local_device_count(), 3)
        True
    """
    devs = _devices_or_local(devices, "funcdp.replicate")
    return _map_tensors(
        lambda t, j, spec: ShardedValue(to_devices([t] * len(devs), devs), devs, 0),
        tree, "funcdp.replicate")


@public
def unreplicate(tree: Any) -> Any:
    """Takes one copy back from a replicated pytree (no gather): the first slice.

    A ``ShardedValue`` gives its shard 0 (slice 0 along its own device axis, wherever
    ``out_axes`` put it); a tensor gives its slice 0 along dimension 0; other leaves
    (``None``, numbers) come back as they are.

    Raises:
        ValueError: a leaf is a 0-d tensor, which has no device axis (the message names
            its path).

    Examples:
        >>> import torch, funcdp
        >>> funcdp.unreplicate(funcdp.replicate(torch.tensor([1.0, 2.0])))
        tensor([1., 2.])
    """
    leaves, spec = tree_util.tree_flatten(tree)
    return tree_util.tree_unflatten([_first(x, spec, j) for j, x in enumerate(leaves)], spec)


def _first(leaf: Any, spec: Any, j: int) -> Any:
    """One copy of the replicated leaf ``j``."""
    if isinstance(leaf, ShardedValue):
        return leaf.shard(0)  # (one device's copy, wherever its device axis is)
    if isinstance(leaf, torch.Tensor):
        if leaf.ndim == 0:
            raise ValueError(
                f"funcdp.unreplicate: {_where(spec, j)} is a 0-d tensor, which has no device "
                f"axis to take one copy from; a replicated leaf is [n, ...] (as "
                f"funcdp.replicate or a pmap makes it). Leave values that are not replicated "
                f"out of the tree.")
        return leaf[0]
    return leaf


@public
def shard(tree: Any, num_devices: int | None = None) -> Any:
    """Reshapes each leaf of a global batch ``[B, ...]`` to ``[n, B // n, ...]``.

    ``n`` is the number of local devices unless ``num_devices`` says otherwise. The
    result is a view (no copy) ready for ``pmap``. ``None`` leaves are passed through,
    as pmap passes them.

    Raises:
        ValueError: if ``B`` is not divisible by ``n`` (the message names the leaf).
        TypeError: a leaf is not a tensor, an array, a number or None.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.shard(torch.zeros(8, 3), num_devices=4).shape
        torch.Size([4, 2, 3])
    """
    n = num_devices if num_devices is not None else len(local_devices())
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"funcdp.shard: `num_devices` must be a positive int, got {n!r}.")

    def split(t: torch.Tensor, j: int, spec: Any) -> torch.Tensor:
        if t.ndim == 0:
            raise ValueError(f"funcdp.shard: {_where(spec, j)} is a scalar; every leaf needs a "
                             f"leading batch dimension to split over {n} devices.")
        if t.shape[0] % n:
            raise ValueError(
                f"funcdp.shard: {_where(spec, j)} has leading (batch) dimension {t.shape[0]}, "
                f"which is not divisible by the {n} devices; pad the batch to a multiple of "
                f"{n} (funcdp.pad_shard_unpad does this for you) or drop the last "
                f"{t.shape[0] % n} examples."
            )
        return t.reshape(n, t.shape[0] // n, *t.shape[1:])

    return _map_tensors(split, tree, "funcdp.shard")


@public
def unshard(tree: Any) -> Any:
    """Inverse of ``shard``: ``[n, b, ...]`` to ``[n * b, ...]`` (gathers sharded leaves).

    ``None`` leaves are passed through.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.unshard(torch.zeros(4, 2, 3)).shape
        torch.Size([8, 3])
    """

    def merge(t: torch.Tensor, j: int, spec: Any) -> torch.Tensor:
        if t.ndim < 2:
            raise ValueError(f"funcdp.unshard: {_where(spec, j)} has shape {tuple(t.shape)}; "
                             f"expected [devices, batch, ...].")
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    return _map_tensors(merge, tree, "funcdp.unshard")


def _versions(tensors: tuple) -> tuple:
    """The tensors' version counters (bumped by every in-place write); None for a tensor
    without one (made in inference mode, and written only in inference mode: torch cannot
    say whether it was written, and its gathered value stays cached)."""
    return tuple(None if t.is_inference() else t._version for t in tensors)
