"""Feeding batches to pmap: ragged batches (``pad_shard_unpad``) and prefetching."""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch._C import _functorch

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device, local_devices
from funcdp._src.pmap import Pmapped, _available_devices, _choose_devices
from funcdp._src.sharded import ShardedValue, _devices_or_local, to_devices
from funcdp._src.transform_util import a_type, describe_sizes, is_axis_leaf

_CALL = "funcdp.pad_shard_unpad"


@public
def pad_shard_unpad(fn: Callable, static_argnums: int | Sequence[int] = (0,),
                    static_argnames: str | Sequence[str] = (), static_return: bool = False,
                    with_mask: bool = False, num_devices: int | None = None) -> Callable:
    """Wraps a pmapped ``fn`` so it takes a global batch of any size.

    Each batch argument (every positional argument not in ``static_argnums``, every
    keyword argument not in ``static_argnames``) has the global batch on dimension 0; its
    size ``B`` need not divide by the device count ``n``. The wrapper zero-pads it to a
    multiple of ``n``, reshapes it to ``[n, B' / n, ...]`` (``funcdp.shard``), calls
    ``fn``, and turns every per-device output back into ``[B, ...]`` with the padding
    dropped, as Flax's ``pad_shard_unpad`` does; other outputs (``out_axes=None``
    values) are returned as they are. ``None`` leaves of batch arguments are passed
    through, as pmap passes them to every device.

    Every per-device output is taken to hold one value per example: it must be
    ``[n, B' / n, ...]`` (or have its device axis elsewhere, as ``fn``'s ``out_axes`` put
    it), whatever the batch size. Any other per-device output (one value per device, such
    as a loss or a sum over the device's examples) is an error rather than reshaped:
    return it with ``out_axes=None`` (after a ``psum``, say), or pass
    ``static_return=True``. (A shape cannot tell such a value from a per-example one when
    it happens to be ``[n, B' / n, ...]``; it is then unpadded like one.)

    Which outputs are per device is read from ``fn``'s ``out_axes`` when ``fn`` is a
    pmapped function (so this works under ``torch.func`` transforms too); for another
    function, sharded values are, and so are tensors with a leading dimension ``n`` that
    record gradients or are under a ``torch.func`` transform (a pmap's stacked outputs).
    Static arguments are passed unchanged (e.g. replicated parameters, mapped by ``fn``
    with ``in_axes=None``).

    Args:
        fn: a pmapped function whose batch arguments are mapped over axis 0.
        static_argnums: positions (an int or ints; negative ones count from the end of the
            call's positional arguments) of the arguments not to pad or shard.
        static_argnames: keyword arguments (a name or names) not to pad or shard.
        static_return: return ``fn``'s outputs as they are (no unsharding).
        with_mask: pass ``mask=`` to ``fn``: a bool tensor ``[n, B' / n]``, True for real
            examples, so that reductions inside ``fn`` can ignore the padding.
        num_devices: ``n``, a positive int; default: the number of local devices.

    Returns:
        The wrapped function.

    Raises:
        TypeError: ``static_argnums``, ``static_argnames`` or ``num_devices`` is not of
            the types above; or, when called, a leaf of a batch argument is not an array
            (a Python number, say).
        ValueError: ``num_devices`` is not positive; or, when called, no argument is a
            batch, a batch leaf is 0-d, the batch arguments have different sizes, ``fn``
            is a pmap whose devices cannot run ``n`` shards (``num_devices`` does not fit
            them), or a per-device output is not ``[n, B' / n, ...]``.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.pmap(lambda w, x: x * w, in_axes=(None, 0))
        >>> out = funcdp.pad_shard_unpad(f)(torch.tensor(2.0), torch.ones(10, 3))
        >>> tuple(out.shape), float(out.sum())
        ((10, 3), 60.0)
    """
    if not callable(fn):
        raise TypeError(f"{_CALL}: `fn` must be callable (a pmapped function, say), got "
                        f"{a_type(fn)}: {fn!r}.")
    statics = _static_argnums(static_argnums)
    static_names = _static_argnames(static_argnames)
    if num_devices is not None and (isinstance(num_devices, bool)
                                    or not isinstance(num_devices, int)):
        raise TypeError(f"{_CALL}: `num_devices` must be a positive int or None (every local "
                        f"device), got {a_type(num_devices)}: {num_devices!r}.")
    if num_devices is not None and num_devices < 1:
        raise ValueError(f"{_CALL}: `num_devices` must be a positive int (the number of "
                         f"devices to shard the batch over), got {num_devices}; leave it "
                         f"None to use every local device.")

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        n = num_devices if num_devices is not None else len(local_devices())
        if isinstance(fn, Pmapped):
            _check_fits(fn, n, num_devices)
        static = {i + len(args) if i < 0 else i for i in statics}
        batch_args: list[tuple[int | str, Any]] = [
            (i, a) for i, a in enumerate(args) if i not in static]
        batch_args += [(k, a) for k, a in kwargs.items() if k not in static_names]
        batch = _batch_size(batch_args, static, static_names)
        padded = -(-batch // n) * n

        def prep(x: Any) -> Any:
            if x is None:
                return None
            t = x.to_tensor() if isinstance(x, ShardedValue) else torch.as_tensor(x)
            if padded != batch:
                pad = torch.zeros((padded - batch,) + tuple(t.shape[1:]), dtype=t.dtype,
                                  device=t.device)
                t = torch.cat([t, pad])
            return t.reshape(n, padded // n, *t.shape[1:])

        new_args = [a if i in static else tree_util.tree_map(prep, a)
                    for i, a in enumerate(args)]
        new_kwargs = {k: a if k in static_names else tree_util.tree_map(prep, a)
                      for k, a in kwargs.items()}
        if with_mask:
            new_kwargs["mask"] = (torch.arange(padded) < batch).reshape(n, padded // n)
        out = fn(*new_args, **new_kwargs)
        if static_return:
            return out
        leaves, treedef = tree_util.tree_flatten(out)
        axes = _output_axes(fn, leaves, treedef, n)
        return tree_util.tree_unflatten(
            [_unpad(x, a, i, treedef, n, batch) for i, (x, a) in enumerate(zip(leaves, axes))],
            treedef)

    return wrapped


def _check_fits(fn: Pmapped, n: int, num_devices: int | None) -> None:
    """An error naming ``num_devices`` when ``fn`` cannot run ``n`` shards (pmap's own
    error would tell the user to pad the batch, which they are doing)."""
    try:
        _choose_devices(fn, n)  # (pmap's own rule of which sizes its devices run)
        return
    except ValueError:
        pass
    explicit = fn._devices
    d = len(explicit) if explicit is not None else len(_available_devices())
    over = (f"the {d} devices in its `devices`" if explicit is not None
            else f"the {d} available devices")
    fits = f"{d} or a multiple of {d}" if explicit is not None else (
        f"at most {d} or a multiple of {d}")
    given = (f"`num_devices` is {n}" if num_devices is not None
             else f"`num_devices` is None, so the batch is sharded {n} ways (one per local "
                  f"device)")
    raise ValueError(
        f"{_CALL}: {given}, but fn is a pmap over {over}, which runs a batch sharded n ways "
        f"only when n is {fits}. Pass num_devices={d}"
        + (", or leave it None." if explicit is None else "."))


def _static_argnums(static_argnums: Any) -> frozenset[int]:
    """``static_argnums`` as a set of ints (an int alone is accepted, as in JAX)."""
    return _static_set(static_argnums, "static_argnums", int, "an int", "ints",
                       "positions of the arguments", "static_argnums=(0,)")


def _static_argnames(static_argnames: Any) -> frozenset[str]:
    """``static_argnames`` as a set of names (a str alone is accepted, as in JAX)."""
    return _static_set(static_argnames, "static_argnames", str, "a str", "strs",
                       "names of the keyword arguments", "static_argnames=('params',)")


def _static_set(value: Any, name: str, kind: type, one: str, many: str, what: str,
                example: str) -> frozenset:
    """``value`` (one ``kind`` or a sequence of them) as a set, checked."""
    items = (value,) if isinstance(value, kind) else value
    try:
        items = tuple(items)
    except TypeError:
        items = (value,)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, kind):
            raise TypeError(
                f"{_CALL}: `{name}` must be {one} or a sequence of {many} ({what} passed "
                f"unchanged), got {value!r} holding {a_type(i)}: {i!r}; for example "
                f"{example}.")
    return frozenset(items)


def _batch_size(batch_args: list[tuple[int | str, Any]], static: set[int],
                static_names: frozenset[str]) -> int:
    """The size of dimension 0 shared by every leaf of the batch arguments (``(position
    or name, argument)`` pairs)."""
    sizes: list[tuple[int | str, Any, int, int]] = []  # (key, treedef, leaf index, size)
    for key, a in batch_args:
        leaves, treedef = tree_util.tree_flatten(a)
        for j, leaf in enumerate(leaves):
            if leaf is None:  # nothing to pad: passed through, as pmap passes None
                continue
            shape = getattr(leaf, "shape", None)
            if shape is not None and len(shape) > 0:
                sizes.append((key, treedef, j, int(shape[0])))
                continue
            what = (f"a 0-d {type(leaf).__name__}" if shape is not None
                    else f"{a_type(leaf)} ({leaf!r})")
            raise (ValueError if shape is not None else TypeError)(
                f"{_CALL}: batch argument {_where(key, treedef, j)} is {what}; each leaf of "
                f"a batch argument must be a tensor or array whose dimension 0 is the batch. "
                f"To pass it unchanged, make it static: " + (
                    f"static_argnums={tuple(sorted(static | {key}))}." if isinstance(key, int)
                    else f"static_argnames={tuple(sorted(static_names | {key}))}."))
    if not sizes:
        raise ValueError(
            f"{_CALL}: no batch argument: every argument is static "
            f"(static_argnums={tuple(sorted(static))}, static_argnames="
            f"{tuple(sorted(static_names))}) or holds only None; pass the batch as an "
            "argument that is not static.")
    distinct = sorted({s for *_, s in sizes})
    if len(distinct) > 1:
        raise ValueError(
            f"{_CALL}: the batch arguments have different leading sizes {distinct}; they "
            f"must share one batch size:\n"
            + describe_sizes({_where(k, t, j): s for k, t, j, s in sizes})
            + "\nList the arguments that are not batches in `static_argnums` / "
            "`static_argnames` to pass them unchanged.")
    return distinct[0]


def _where(key: int | str, treedef: Any, j: int) -> str:
    """``args[1]['x']``: the path of leaf ``j`` of the argument at ``key``."""
    arg = f"args[{key}]" if isinstance(key, int) else f"kwargs[{key!r}]"
    return arg + tree_util.keystr(tree_util.leaf_paths(treedef)[j])


def _unpad(x: Any, axis: int | None, i: int, treedef: Any, n: int, batch: int) -> Any:
    """A per-device output (device axis at ``axis``) as ``[batch, ...]``."""
    t = x.to_tensor() if isinstance(x, ShardedValue) else x
    if axis is None or not isinstance(t, torch.Tensor):
        return t
    got = tuple(t.shape)
    if axis:
        t = t.movedim(axis, 0)
    per_device = -(-batch // n)
    if t.ndim < 2 or t.shape[0] != n or t.shape[1] != per_device:
        where = "output" + tree_util.keystr(tree_util.leaf_paths(treedef)[i])
        raise ValueError(
            f"{_CALL}: {where} is per device (device axis {axis}) with shape {got}, but "
            f"a per-device output must hold one value per example: [n, B' / n, ...] = "
            f"[{n}, {per_device}, ...] here ({batch} examples padded to {n * per_device} "
            f"on {n} devices), to be turned back into [{batch}, ...]. A value per device "
            f"(a loss, a sum over the device's examples) cannot be unpadded: return it "
            f"with out_axes=None (reduced with funcdp.psum or pmean, say), or pass "
            f"static_return=True to get every output as fn returns it.")
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])[:batch]


def _output_axes(fn: Callable, leaves: list, treedef: Any, n: int) -> list:
    """Where each output leaf of ``fn`` has its device axis (None: not per device)."""
    if isinstance(fn, Pmapped):
        axes = tree_util.broadcast_prefix(fn._out_axes, treedef, is_axis_leaf)
        # (Normalized against the stacked output's rank: the device axis included.)
        return [a if a is None or a >= 0 or not isinstance(x, (torch.Tensor, ShardedValue))
                else a + len(x.shape) for x, a in zip(leaves, axes)]
    # Some other function: its sharded values are per device, and so are tensors that a
    # pmap returned stacked (recording gradients, or under a torch.func transform).
    return [x.axis if isinstance(x, ShardedValue) else 0 if (
        isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n and (
            x.requires_grad or _functorch.is_functorch_wrapped_tensor(x))) else None
        for x in leaves]


@public
def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       devices: Sequence[Device] | None = None) -> Iterator[Any]:
    """Puts batches on their devices ahead of use (on GPUs, ``size`` batches ahead).

    Every item is a pytree of tensors whose leading dimension is the device count (as
    ``funcdp.shard`` makes them); each leaf comes back as a ``ShardedValue``
    with shard ``i`` on device ``i``, which pmap uses in place. ``None`` leaves are passed
    through, as pmap passes them to every device. On GPUs the copies are
    issued ``size`` batches early from pinned memory without blocking, so they overlap
    with the computation on the previous batches. On virtual CPU devices the shards are
    views of the batch's tensors (nothing is copied, so there is nothing to overlap):
    no batch is read ahead, each is yielded as soon as it is read, so a loader that
    refills one buffer in place feeds the right data.

    ``size`` and ``devices`` are checked when it is called; the batches as they come.
    When the iterator raises (or a batch cannot be placed), the batches read before it
    are yielded first, then the error is raised, as iterating without prefetching would.

    Args:
        iterator: an iterable of batches.
        size: how many batches to read ahead on GPUs (a positive int).
        devices: the devices (a list of distinct ``funcdp.Device``); default: all local
            devices.

    Examples:
        >>> import torch, funcdp
        >>> n = funcdp.local_device_count()
        >>> batches = (funcdp.shard(torch.ones(2 * n, 3)) for _ in range(3))
        >>> [type(b).__name__ for b in funcdp.prefetch_to_device(batches)]
        ['ShardedValue', 'ShardedValue', 'ShardedValue']
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{_PREFETCH}: `size` must be a positive int, got {size!r}.")
    devs = _devices_or_local(devices, _PREFETCH)
    try:
        it = iter(iterator)
    except TypeError:
        raise TypeError(f"{_PREFETCH}: `iterator` must be an iterable of batches (a "
                        f"generator, a list, a DataLoader), got {a_type(iterator)}.") from None
    return _prefetch(it, size, devs)


_PREFETCH = "funcdp.prefetch_to_device"


def _prefetch(it: Iterator[Any], size: int, devs: list[Device]) -> Iterator[Any]:
    # Reading ahead pays only where placing a batch copies it (to a GPU). On virtual CPU
    # devices the shards are views of the loader's tensors: reading ahead would only
    # expose them to a loader that refills its buffers.
    ahead = size if devs[0].platform == "cuda" else 0
    return _read_ahead(it, ahead, lambda item, k: _place_batch(item, k, devs))


def _read_ahead(it: Iterator[Any], ahead: int, place: Callable[[Any, int], Any]
                ) -> Iterator[Any]:
    """``place(item, k)`` for each item ``k`` of ``it``, read ``ahead`` items early. An
    error reading or placing an item is raised after the items before it are yielded."""
    queue: collections.deque = collections.deque()
    error: Exception | None = None
    for k in itertools.count():
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception as e:  # (not BaseException: a KeyboardInterrupt goes through)
            error = e
            break
        try:
            queue.append(place(item, k))
        except Exception as e:
            error = e
            break
        while len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
    if error is not None:
        raise error


def _place_batch(item: Any, k: int, devs: list[Device]) -> Any:
    """Batch number ``k``, each leaf a ``ShardedValue`` over ``devs`` (None left as is)."""
    leaves, treedef = tree_util.tree_flatten(item)
    return tree_util.tree_unflatten(
        [None if x is None else _place(x, k, treedef, j, devs) for j, x in enumerate(leaves)],
        treedef)


def _place(x: Any, k: int, treedef: Any, j: int, devs: list[Device]) -> ShardedValue:
    def where() -> str:
        path = tree_util.keystr(tree_util.leaf_paths(treedef)[j])
        return f"batch {k} (counting from 0)" + (f", leaf {path}," if path else "")

    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{_PREFETCH}: {where()} is {a_type(x)}; the leaves of a batch must "
                        f"be tensors (or arrays, numbers) or None.") from None
    if t.ndim == 0 or t.shape[0] != len(devs):
        raise ValueError(
            f"{_PREFETCH}: {where()} has shape {tuple(t.shape)}, but each leaf needs a "
            f"leading dimension of {len(devs)} (one slice per device). Shard the batch with "
            f"funcdp.shard(batch) ([B, ...] becomes [{len(devs)}, B / {len(devs)}, ...]), "
            f"and leave values that are not per device out of the batches.")
    if devs[0].platform == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return ShardedValue(to_devices(t.unbind(0), devs), devs, 0)
