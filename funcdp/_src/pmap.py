"""``funcdp.pmap``: run a function on every device, each on its slice of the batch.

The story of one call, helper by helper:

1. ``Pmapped.__call__`` splits off static arguments and flattens the rest.
2. ``Pmapped._plan`` looks up (or builds, once per argument signature) a
   ``_Plan``: each leaf's mapped axis, the mapped size, the devices, and how many
   shards each device runs (``block``; more than one means a named vmap per device).
3. ``_Call`` hands each device its inputs (slices are views; sharded values from an
   earlier call are used where they are; broadcast values are shared), runs the function
   on every device through the executor, with the axis name bound to the mesh, and
   assembles ``ShardedValue`` outputs.
4. Under autograd or a ``torch.func`` transform the call goes through
   ``_PmapFn``, an ``autograd.Function`` whose backward runs each device's backward
   on that device and whose ``vmap`` rule moves the batch inside the devices, so
   ``grad(pmap(f))`` and ``vmap(pmap(f))`` work.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch._C import _functorch
from torch._functorch import pyfunctorch

from funcdp._src import axes as axes_mod
from funcdp._src import distributed as dist_mod
from funcdp._src import random as random_mod
from funcdp._src import tree as tree_util
from funcdp._src.api_util import fun_name, public
from funcdp._src.config import config
from funcdp._src.devices import Device, check_devices, local_devices
from funcdp._src.executor import Inline, autocast_as, autocast_now, executor
from funcdp._src.rendezvous import CollectiveError, Mesh, same_copies
from funcdp._src.sharded import ShardedValue, to_devices
from funcdp._src.transform_util import (
    a_type,
    argpath,
    check_axes_spec,
    describe_sizes,
    flat_in_axes,
    is_axis_leaf,
    normalize_axis,
    plural,
)


class _Turns:
    """Top-level calls from different threads take turns (see ``_on_devices``). A call
    made from a thread that a device function started and waits for (a thread pool
    inside the step) can never have its turn; nothing tells it from a call waiting for a
    long one, so a call that waited ``funcdp.config.collective_timeout`` warns, saying
    so, and waits on."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.holders: list[tuple[str, str]] = []  # the calls holding the turn, innermost last

    def take(self, name: str) -> None:
        if not self.lock.acquire(blocking=False):
            timeout = config.collective_timeout
            if not self.lock.acquire(timeout=timeout):
                held, thread = self.holders[0] if self.holders else ("another call", "?")
                warnings.warn(
                    f"{name} has waited {timeout:g} s for its turn: top-level pmap calls "
                    f"from different threads run one at a time, and {held}, called from "
                    f"thread {thread!r}, has not finished. If this call comes from a thread "
                    f"that a device function of {held} started and waits for (a thread "
                    f"pool inside the step, say), it can never run and both wait forever: "
                    f"make the call in the device function's own thread, where it runs as "
                    f"a nested pmap. Otherwise {held} is just slow, and this call waits "
                    f"on.", RuntimeWarning, stacklevel=5)
                self.lock.acquire()
        self.holders.append((name, threading.current_thread().name))

    def give(self) -> None:
        self.holders.pop()
        self.lock.release()


_TOP_LEVEL = _Turns()

# Leaf kinds of a plan.
_SPLIT = 0  # a tensor mapped over an axis: each device gets a view of its slice
_SHARDED = 1  # a ShardedValue already laid out as this call needs: shards used in place
_BCAST = 2  # not mapped: every device sees the same value
_RESHARD = 3  # a ShardedValue laid out differently: gathered, then split


@public
def pmap(fun: Any = None, axis_name: Any = None, *, in_axes: Any = 0, out_axes: Any = 0,
         static_broadcasted_argnums: int | Sequence[int] = (),
         devices: Sequence[Device] | None = None, axis_size: int | None = None,
         donate_argnums: int | Sequence[int] = ()) -> Any:
    """Maps ``fun`` over devices: device ``i`` runs ``fun`` on slice ``i`` of the inputs.

    Inside ``fun`` the mapped axis is removed (as in ``vmap``) and ``axis_name`` names the
    device axis for collectives (``funcdp.pmean(grads, axis_name)``). Outputs stay on their
    devices as ``ShardedValue`` s until asked for.

    Args:
        fun: the function to map. Usable as ``@pmap`` and ``@pmap(axis_name="i")``.
        axis_name: name of the mapped axis, for collectives inside ``fun``.
        in_axes: int, None, or a pytree prefix of the positional arguments giving the
            mapped axis of each (None: not mapped, every device sees the whole value).
            Keyword arguments are mapped over axis 0.
        out_axes: int, None, or a pytree prefix of the output: where the mapped axis goes
            in each output (None: the value is the same on every device; return one copy,
            checked unless ``funcdp.config.check_replicated`` is False).
        static_broadcasted_argnums: positional arguments passed as Python values
            (hashable; each distinct value gets its own cached plan).
        devices: the devices to use (default: the first ``n`` local devices, ``n`` the
            mapped size).
        axis_size: the global mapped size, checked against the arguments.
        donate_argnums: arguments the caller will not use again (accepted for
            compatibility; funcdp never mutates inputs either way).

    Returns:
        The mapped function. With a mapped size ``n`` larger than the number of devices
        ``D`` and divisible by it, each device runs a named vmap over ``n / D`` shards and
        collectives reduce over both levels: results equal a pmap over ``n`` devices.

    Examples:
        >>> import torch, funcdp
        >>> n = funcdp.local_device_count()
        >>> f = funcdp.pmap(lambda x: x - funcdp.pmean(x, "i"), axis_name="i")
        >>> out = f(torch.arange(float(n)))
        >>> torch.allclose(out.to_tensor(), torch.arange(float(n)) - (n - 1) / 2)
        True
    """
    if fun is None:
        return functools.partial(
            pmap, axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
            static_broadcasted_argnums=static_broadcasted_argnums, devices=devices,
            axis_size=axis_size, donate_argnums=donate_argnums)
    return Pmapped(fun, axis_name, in_axes, out_axes, static_broadcasted_argnums, devices,
                   axis_size, donate_argnums)


def _int_tuple(v: Any, call: str, arg: str) -> tuple[int, ...]:
    vals = (v,) if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        out = tuple(vals)
    except TypeError:
        out = None
    if out is None or any(isinstance(i, bool) or not isinstance(i, int) for i in out):
        raise TypeError(f"{call}: `{arg}` must be an int or a sequence of ints, got {v!r}.")
    return out


class Pmapped:
    """A function mapped over devices by ``funcdp.pmap``."""

    def __init__(self, fun, axis_name, in_axes, out_axes, static_argnums, devices, axis_size,
                 donate_argnums) -> None:
        name = f"pmap({fun_name(fun)})"
        if not callable(fun):
            hint = (" To give only the axis name, write @pmap(axis_name=...)."
                    if isinstance(fun, str) else "")
            raise TypeError(f"pmap: `fun` must be callable, got {type(fun).__name__}: "
                            f"{fun!r}.{hint}")
        if axis_name is not None:
            axes_mod._validate_name(axis_name, name)
            if isinstance(axis_name, tuple):
                raise TypeError(f"{name}: `axis_name` must be a single name, got the tuple "
                                f"{axis_name!r}.")
        check_axes_spec(in_axes, name, "in_axes")
        check_axes_spec(out_axes, name, "out_axes")
        self._statics = _int_tuple(static_argnums, name,
                                   "static_broadcasted_argnums")
        self._donate = _int_tuple(donate_argnums, name, "donate_argnums")
        if devices is not None:
            devices = check_devices(devices, name, none_means="all")
        if axis_size is not None and (isinstance(axis_size, bool) or
                                      not isinstance(axis_size, int) or axis_size < 1):
            raise ValueError(f"{name}: `axis_size` must be a positive int, got {axis_size!r}.")
        self.__wrapped__ = fun
        self._fun = fun
        self._name = name
        self._axis_name = axis_name
        self._in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
        self._out_axes = out_axes
        self._devices = devices
        self._axis_size = axis_size
        self._cache: dict = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fun, updated=())

    def __repr__(self) -> str:
        return f"<funcdp.pmap of {self._fun!r}>"

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        # As a method: the instance is passed to every device as is (not mapped).
        if instance is None:
            return self
        return functools.partial(self._call, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_chunks(_NO_SELF, None, args, kwargs)

    def _call(self, bound: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call_chunks(bound, None, args, kwargs)

    def _call_chunks(self, bound: Any, chunks: tuple[int, ...] | None, args: tuple,
                     kwargs: dict) -> Any:
        """The call; with ``chunks``, device ``i`` gets a slice of ``chunks[i]`` elements
        along each mapped axis, the axis kept (``nn.DataParallel``'s scatter), and outputs
        with an integer ``out_axes`` are concatenated (its gather)."""
        proc = dist_mod._info
        if proc is None:
            return self._call_plan(bound, chunks, args, kwargs)
        calls = proc.calls
        try:
            return self._call_plan(bound, chunks, args, kwargs)
        except BaseException as e:
            # A call that would have spanned the processes but failed before its devices
            # ran (so took no call number): the other processes may wait for it.
            if proc.calls == calls and _spans_processes(proc, self, chunks):
                from funcdp._src.process_collectives import tell_failure_before_devices

                tell_failure_before_devices(proc, e)
            raise

    def _call_plan(self, bound: Any, chunks: tuple[int, ...] | None, args: tuple,
                   kwargs: dict) -> Any:
        statics, dyn_args = self._split_statics(args)
        sig: Any = None
        if not kwargs:
            sig = []
            for a in dyn_args:
                t = type(a)
                if t is torch.Tensor:
                    sig.append((0, a.shape))  # _signature's, for a tensor
                elif t is ShardedValue:
                    sig.append(a._key or _signature(a))
                else:
                    sig = None
                    break
        if sig is None:
            leaves, treedef = tree_util.tree_flatten((dyn_args, kwargs))
            sig = map(_signature, leaves)
        else:  # tensors and sharded values (leaves) only: the flattening known in advance
            leaves = list(dyn_args)
            treedef = _flat_args_treedef(len(leaves))
        # (The generation: initialize and shutdown change which devices a plan uses.)
        key = (treedef, statics, tuple(sig), _context(), dist_mod._generation, chunks)
        try:
            plan = self._cache.get(key)
        except TypeError:
            self._unhashable_static(args)
            raise
        if plan is None:
            plan = self._build_plan(key, leaves, treedef, dyn_args, kwargs, len(args))
        fun = self._fun if bound is _NO_SELF else functools.partial(self._fun, bound)
        call = _Call(plan, fun, statics, leaves)
        if _needs_autograd(leaves):
            return call.run_differentiable()
        return call.run()

    # -- static arguments ------------------------------------------------------------
    def _split_statics(self, args: tuple) -> tuple[tuple, tuple]:
        if not self._statics:
            return (), args
        n = len(args)
        idx = []
        for i in self._statics:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(
                    f"{self._name}: `static_broadcasted_argnums` names argument {i} but the "
                    f"function was called with {plural(n, 'positional argument')}; pass it "
                    f"positionally.")
            idx.append(j)
        statics = tuple((j, args[j]) for j in sorted(set(idx)))
        dyn = tuple(a for j, a in enumerate(args) if j not in idx)
        return statics, dyn

    def _unhashable_static(self, args: tuple) -> None:
        for j, v in self._split_statics(args)[0]:
            try:
                hash(v)
            except TypeError:
                raise ValueError(
                    f"{self._name}: static argument {j} (in `static_broadcasted_argnums`) must "
                    f"be hashable, got {type(v).__name__}: {v!r}; "
                    + ("pass a tuple instead of a list, or " if isinstance(v, list) else "")
                    + "make it a regular (broadcast) argument with in_axes=None."
                ) from None

    # -- plans -----------------------------------------------------------------------
    def _build_plan(self, key, leaves, treedef, dyn_args, kwargs, nargs) -> _Plan:
        in_axes = self._in_axes
        if isinstance(in_axes, tuple) and self._statics:
            if len(in_axes) != nargs:
                raise ValueError(
                    f"{self._name}: `in_axes` has one entry per positional argument, "
                    f"{len(in_axes)} here, but the function was called with "
                    f"{plural(nargs, 'positional argument')} (keyword arguments are always "
                    f"mapped over axis 0).")
            static_idx = {j for j, _ in key[1]}
            in_axes = tuple(a for j, a in enumerate(in_axes) if j not in static_idx)
        axes = flat_in_axes(in_axes, dyn_args, kwargs, treedef, self._name)
        plan = _Plan(self, treedef, leaves, axes, key[-1], top_level=key[3] is None)
        with self._lock:
            return _bounded_insert(self._cache, key, plan)


class _NoSelf:
    pass


_NO_SELF = _NoSelf()


_FLAT_ARGS: dict[int, Any] = {}
_NO_KWARGS: dict = {}  # (only ever unpacked)


def _flat_args_treedef(n: int) -> Any:
    """The structure of ``(args, {})`` for ``n`` positional leaves (what flattening
    ``n`` tensors passed positionally gives)."""
    spec = _FLAT_ARGS.get(n)
    if spec is None:
        spec = _FLAT_ARGS[n] = tree_util.tree_flatten((tuple(range(n)), {}))[1]
    return spec


# The structure of an output that is a single tensor.
_LEAF = tree_util.tree_flatten(0)[1]


class _Layout:
    """A sharded value's layout in plan keys (see ``_signature``)."""

    __slots__ = ("layout",)

    def __init__(self, layout: tuple) -> None:
        self.layout = layout

    def __repr__(self) -> str:
        return f"_Layout{self.layout!r}"


# Every sharded layout seen lately, to its one _Layout (the oldest are dropped past
# _MAX_CACHED: a value that holds a dropped one still works, its plan is made anew).
_LAYOUTS: dict[tuple, _Layout] = {}
# The most plans kept per pmapped function, and layouts kept in all: a function called
# with ever new shapes (sequences of every length, say) would otherwise hold a plan for
# each for good. Past it the oldest is dropped, to be made again if needed.
_MAX_CACHED = 4096


def _bounded_insert(cache: dict, key: Any, value: Any) -> Any:
    """``cache.setdefault(key, value)``, first dropping the oldest entry if ``cache`` is
    full."""
    if len(cache) >= _MAX_CACHED and key not in cache:
        try:
            del cache[next(iter(cache))]
        except (KeyError, StopIteration, RuntimeError):  # (another thread got there)
            pass
    return cache.setdefault(key, value)


def _signature(leaf: Any) -> Any:
    t = type(leaf)
    if t is torch.Tensor or isinstance(leaf, torch.Tensor):
        return (0, leaf.shape)
    if t is ShardedValue:
        key = leaf._key
        if key is None:
            # One object per layout, hashed and compared by identity: cheaper in a plan
            # key than the tuple (a shape and devices hashed in Python) on every call.
            layout = (leaf.devices, leaf.axis, leaf.block, leaf.shape)
            key = _LAYOUTS.get(layout) or _bounded_insert(_LAYOUTS, layout, _Layout(layout))
            leaf._key = key
        return key
    if t is np.ndarray:
        return (2, leaf.shape)
    return (3, t)


def _context() -> Any:
    """What besides the arguments decides the devices: the enclosing pmap, if any."""
    if not axes_mod.frames():
        return None
    frame = axes_mod.current_pmap_frame()
    return None if frame is None else (frame.mesh.sizes, frame.coord)


def _needs_autograd(leaves: list) -> bool:
    if _functorch.maybe_current_level() is not None:
        return True
    if not torch.is_grad_enabled():
        return False
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            return True
    return False


class _Plan:
    """Everything about a call that depends only on the arguments' signature."""

    def __init__(self, owner: Pmapped, treedef, leaves: list, axes: list,
                 chunks: tuple[int, ...] | None = None, top_level: bool = True) -> None:
        name = owner._name
        self.owner = owner
        self.name = name
        self.treedef = treedef
        paths = tree_util.leaf_paths(treedef)

        def where(i: int) -> str:
            return f"argument {argpath(tree_util.keystr(paths[i]))}"

        norm_axes: list[int | None] = []
        sizes: dict[int, int] = {}
        a: int | None
        for i, (leaf, ax) in enumerate(zip(leaves, axes)):
            # None holds nothing to map (an empty subtree in JAX): every device gets it,
            # so f(x, mask=None) works.
            if ax is None or leaf is None:
                norm_axes.append(None)
                continue
            if isinstance(leaf, np.ndarray):
                leaf = _from_numpy(leaf)
            is_kw = tree_util.keystr(paths[i]).startswith("[1]")
            fix = ("keyword arguments are always mapped over axis 0: pass it positionally "
                   "with in_axes=None, or bind it with functools.partial" if is_kw else
                   "give it in_axes=None to pass it to every device, or list it in "
                   "static_broadcasted_argnums")
            if not isinstance(leaf, (torch.Tensor, ShardedValue)):
                raise TypeError(
                    f"{name}: {where(i)} is {a_type(leaf)} mapped over axis {ax}; only "
                    f"tensors can be mapped: {fix}.")
            if is_kw and leaf.ndim == 0:
                raise ValueError(
                    f"{name}: {where(i)} is a scalar (rank 0) and cannot be mapped: {fix}.")
            a = normalize_axis(ax, leaf.ndim, name, functools.partial(where, i))
            norm_axes.append(a)
            sizes[i] = leaf.shape[a]
        if not sizes:
            why = ("every in_axes entry is None" if any(x is not None for x in leaves) else
                   "it was called with no arguments to map" + (
                       " besides its static ones" if owner._statics else ""))
            raise ValueError(
                f"{name}: no argument is mapped ({why}); pmap needs at least one argument "
                f"with a mapped axis to know how many devices to use.")
        distinct = sorted(set(sizes.values()))
        if len(distinct) > 1:
            raise ValueError(
                f"{name}: the mapped arguments disagree on the mapped size:\n"
                + describe_sizes({argpath(tree_util.keystr(paths[i])): s
                                  for i, s in sizes.items()})
                + "\nEvery mapped axis must have the same size (the number of shards).")
        n = distinct[0]
        if owner._axis_size is not None and owner._axis_size != n and not (
                dist_mod.info() is not None
                and cast(dist_mod.ProcessInfo, dist_mod.info()).count > 1):
            raise ValueError(
                f"{name}: `axis_size`={owner._axis_size} but the mapped arguments have size "
                f"{n}; in a single process they must agree.")
        self.size = n
        self.chunks = chunks
        proc = dist_mod.info()
        self.spans_processes = _spans_processes(proc, owner, chunks)
        if self.spans_processes:
            assert proc is not None  # spans_processes implies it
            local = len(local_devices())
            if n % local:
                raise ValueError(
                    f"{name}: in a run of {proc.count} processes, the mapped size ({n}) must "
                    f"be this process's device count ({local}) or a multiple of it: each "
                    f"process passes its own part of the global batch.")
            if owner._axis_size is not None and owner._axis_size != n // local * proc.total:
                raise ValueError(
                    f"{name}: `axis_size`={owner._axis_size} but the global mapped size is "
                    f"{n // local * proc.total} ({proc.count} processes).")
        if chunks is None:
            self.devices, self.block = _choose_devices(owner, n)
        else:
            assert sum(chunks) == n
            self.devices, self.block = list(owner._devices or _available_devices())[
                : len(chunks)], 1
        self.offsets = None if chunks is None else [sum(chunks[:i]) for i in range(len(chunks))]
        # Device shards keep the mapped axis: blocks of a vmap, or DataParallel chunks.
        self.keeps_axis = self.block > 1 or chunks is not None
        self.ndev = len(self.devices)
        self.axes = norm_axes
        kinds = []
        for leaf, a in zip(leaves, norm_axes):
            if a is None:
                kinds.append(_BCAST)
            elif chunks is not None:
                kinds.append(_SPLIT if type(leaf) is not ShardedValue else _RESHARD)
            elif type(leaf) is ShardedValue:
                same = (leaf.devices == tuple(self.devices) and leaf.axis == a
                        and leaf.block == self.block)
                kinds.append(_SHARDED if same else _RESHARD)
            else:
                kinds.append(_SPLIT)
        self.kinds = kinds
        # Arguments that _Call._device_inputs splits the simple way (see there).
        self.plain_split = (chunks is None and self.block == 1
                            and self.devices[0].platform == "cpu"
                            and all(k in (_SPLIT, _SHARDED) for k in kinds))
        self.out_plans: dict = {}  # output structure -> (axes, ranked axes): _out_plan
        self.leaf_ranked: list | None = None  # ranked_axes_for(_LEAF), once known
        self.full_checks = 3
        # Exchanges between processes a call makes (see distributed.CallState.expected).
        self.process_exchanges: int | None = None
        # Calls of a nested plan always run nested (the enclosing call is in its key).
        self.top_level = top_level
        self.policy = (_ExecutionPolicy() if self.ndev > 1 and chunks is None and top_level
                       and self.devices[0].platform == "cpu" and not self.spans_processes
                       else None)
        self.threads = executor().threads_per_device(self.devices)
        self.label = f"{name} over {self.ndev} device{'s' if self.ndev > 1 else ''}"
        # The devices by coordinate, of a top-level call in one process (read-only).
        self.coords = {(i,): d for i, d in enumerate(self.devices)}
        self.coord_list = list(self.coords)
        # The names a top-level call in one process binds (copied per device).
        self.names = ({} if owner._axis_name is None else
                      {owner._axis_name: (axes_mod.DeviceComp(0, self.ndev),)})
        # Arguments that are plain positional leaves need no unflattening per device.
        self.flat_args = treedef == _flat_args_treedef(len(leaves))

    def out_axes_for(self, out_treedef) -> list:
        return self._out_plan(out_treedef)[0]

    def ranked_axes_for(self, out_treedef) -> list[tuple[int, int]]:
        """The output positions and integer ``out_axes`` that some rank of output could
        make out of range (0 and -1 fit every rank): for ``_Call._body``'s check."""
        return self._out_plan(out_treedef)[1]

    def _out_plan(self, out_treedef) -> tuple[list, list[tuple[int, int]]]:
        """``(axes, ranked axes)`` for outputs of structure ``out_treedef`` (worked out
        once per structure; one entry, so devices storing it at once find both)."""
        plan = self.out_plans.get(out_treedef)
        if plan is None:
            try:
                axes = tree_util.broadcast_prefix(self.owner._out_axes, out_treedef,
                                                  is_axis_leaf)
            except tree_util.PrefixError as e:
                raise _call_error(ValueError(
                    f"{self.name}: `out_axes` {self.owner._out_axes!r} does not match the "
                    f"structure of the output at out{tree_util.keystr(e.path)}: {e.reason}. "
                    f"`out_axes` must be a prefix of the output.")) from None
            ranked = [(i, a) for i, a in enumerate(axes) if a is not None and a not in (0, -1)]
            plan = self.out_plans[out_treedef] = (axes, ranked)
            if out_treedef is _LEAF:
                self.leaf_ranked = ranked
        return plan


class _ExecutionPolicy:
    """Where a plan's calls run their devices, chosen from how long its calls take.

    Waking a worker thread, and the devices' Python taking turns on the GIL, costs more
    than a small call's work: a call of a few microseconds per device took ~175 us over
    two virtual CPU devices with workers, against ~50 us over one. A plan whose recent
    calls were all small runs its devices in the calling thread instead; if a device
    waits for the others (a collective), the devices not started yet are handed to their
    workers at that moment, so results never depend on the choice. A call that had to
    hand off, or that took over ``LONG_S``, returns the plan to workers (for good after
    a second hand-off: its collectives make running here pointless). On workers, the
    calling thread still runs device 0 itself.
    """

    SMALL_S = 250e-6
    LONG_S = 1e-3
    STREAK = 3
    MAX_HANDOFFS = 2

    __slots__ = ("on", "streak", "handoffs")

    def __init__(self) -> None:
        self.on = False
        self.streak = 0
        self.handoffs = 0

    def request(self) -> Inline | None:
        return Inline() if self.on else None

    def record(self, seconds: float, inline: Inline | None) -> None:
        if inline is None:
            self.streak = self.streak + 1 if seconds < self.SMALL_S else 0
            if self.streak >= self.STREAK and self.handoffs < self.MAX_HANDOFFS:
                self.on = True
        elif inline.handed_off or seconds > self.LONG_S:
            self.on = False
            self.streak = 0
            self.handoffs += inline.handed_off


def _choose_devices(owner: Pmapped, n: int) -> tuple[list[Device], int]:
    name = owner._name
    if n == 0:
        raise ValueError(
            f"{name}: the mapped axis has size 0: every argument mapped by `in_axes` (or "
            f"`axis_size`) must have at least one element along it, one per device. Skip "
            f"the call for an empty batch.")
    if owner._devices is not None:
        devs = owner._devices
        d = len(devs)
        if n == d:
            return list(devs), 1
        if n > d and n % d == 0:
            return list(devs), n // d
        fix = (f"pass devices=devices[:{n}] to use fewer devices" if n < d else
               f"pad the batch to a multiple of {d} (funcdp.pad_shard_unpad does this)")
        raise ValueError(
            f"{name}: mapped size {n} does not fit the {d} devices passed in `devices`: it "
            f"must equal {d} or be a multiple of it (each device then runs a vmap over the "
            f"extra shards); {fix}.")
    avail = _available_devices()
    d = len(avail)
    if n <= d:
        return avail[:n], 1
    if n % d == 0:
        return avail, n // d
    raise ValueError(
        f"{name}: mapped size {n} is larger than the {d} available devices and not a multiple "
        f"of {d}. Use a mapped size of at most {d}, or a multiple of {d} (each device then "
        f"runs a vmap over the extra shards); funcdp.pad_shard_unpad pads a batch for you.")


def _available_devices() -> list[Device]:
    """Local devices; inside a pmap, the calling device's block of them (nested pmap)."""
    devs = local_devices()
    frame = axes_mod.current_pmap_frame()
    if frame is None:
        return devs
    outer = list(frame.mesh.sizes)
    coord = list(frame.coord)
    proc = frame.mesh.proc
    if proc is not None:  # within this process only
        outer[0] = proc.local_counts[proc.index]
        coord[0] -= proc.offset
    parts = 1
    for s in outer:
        parts *= s
    per = max(1, len(devs) // parts)
    flat = 0
    for c, s in zip(coord, outer):
        flat = flat * s + c
    start = (flat * per) % len(devs)
    return devs[start:start + per]


def _inherited_names() -> dict:
    """Device-axis names of the enclosing pmaps, valid in a nested call's mesh."""
    names: dict = {}
    for frame in axes_mod.frames():
        if frame.kind == "pmap":
            for k, comps in frame.names.items():
                if all(type(c) is axes_mod.DeviceComp for c in comps):
                    names[k] = comps
    return names


class _Call:
    """One invocation of a pmapped function."""

    def __init__(self, plan: _Plan, fun: Any, statics: tuple, leaves: list) -> None:
        self.plan = plan
        self.fun = fun
        self.statics = statics
        self.leaves = leaves
        self.per_device: list | None = None
        self.track: list[bool] = []
        self.seeds: Any = None
        self.inline: Inline | None = None

    # Set by a differentiable call (class defaults: nothing on every call's path): each
    # device's random routing, for the backward pass; the enclosing device's routing,
    # found before the autograd.Function; the levels of the vmaps the call ran under; and
    # the checkpoint calls it was made in.
    modes: list
    caller_mode: Any = random_mod.ACTIVE
    fwd_vmaps: frozenset[int] = frozenset()
    fwd_autocast: tuple = ()
    around: tuple = ()
    # The copies the devices' collectives made (see rendezvous.same_copies), from the end
    # of the devices' run to the end of the output checks.
    copies: dict | None = None

    # -- inputs ------------------------------------------------------------------------
    def _device_inputs(self, leaves: list) -> list[list]:
        """Per-device argument leaves (views, shards in place, or shared values)."""
        plan = self.plan
        if plan.plain_split:
            # Every leaf split along its axis into one shard per CPU device, or sharded
            # in place already: the general loop below, for these kinds only.
            cols = []
            for leaf, a in zip(leaves, plan.axes):
                t = type(leaf)
                if t is torch.Tensor and leaf.is_cpu:
                    cols.append(leaf.unbind(a))
                elif t is ShardedValue:  # (of this plan: _SHARDED)
                    cols.append(leaf.shards)
                else:
                    break
            else:
                return [list(row) for row in zip(*cols)]
        ndev, k = plan.ndev, plan.block
        cols = []
        for leaf, kind, a in zip(leaves, plan.kinds, plan.axes):
            if kind == _SHARDED:
                cols.append(leaf.shards)
                continue
            if kind == _BCAST:
                if isinstance(leaf, ShardedValue):
                    leaf = leaf.to_tensor()
                cols.append(_broadcast(leaf, plan.devices))
                continue
            if kind == _RESHARD:
                leaf = leaf.to_tensor()
            elif isinstance(leaf, np.ndarray):
                leaf = _from_numpy(leaf)
            if plan.chunks is not None:
                parts = leaf.split(plan.chunks, a)
            elif k == 1:
                parts = leaf.unbind(a)
            else:
                parts = leaf.unflatten(a, (ndev, k)).unbind(a)
            cols.append(to_devices(parts, plan.devices))
        return [[col[i] for col in cols] for i in range(ndev)]

    # -- running -------------------------------------------------------------------------
    def _mesh(self) -> tuple[Mesh, tuple, dict]:
        plan = self.plan
        parent = axes_mod.current_pmap_frame()
        name = plan.owner._axis_name
        if parent is None:
            proc = dist_mod.info()
            offset = proc.offset if proc is not None else 0
            size = proc.total if proc is not None else plan.ndev
            devices = {(offset + i,): d for i, d in enumerate(plan.devices)}
            return Mesh(plan.label, (name,), (size,), devices, proc, offset), (), {}
        # A nested pmap: one shared mesh per nested call across the outer devices.
        if any(len(c) > 1 for c in parent.names.values()):
            raise NotImplementedError(
                f"{plan.name}: a pmap nested inside a pmap that runs more shards than devices "
                f"(a vmap per device) is not supported; give the outer pmap at most as many "
                f"shards as devices.")
        seq = parent.nested
        parent.nested += 1
        pmesh = parent.mesh

        def make() -> Mesh:
            # The process layout along axis 0 too (a collective over it then goes across
            # processes; the offset is that of the new, innermost axis: none).
            return Mesh(plan.label, pmesh.names + (name,), pmesh.sizes + (plan.ndev,), {},
                        pmesh.proc)

        mesh = pmesh.child(seq, make)
        if mesh.sizes[-1] != plan.ndev:
            raise ValueError(f"{plan.name}: nested pmap runs over {plan.ndev} devices here "
                             f"but over {mesh.sizes[-1]} on another outer device; every outer "
                             f"device must make the same nested calls.")
        with mesh.cond:
            for i, d in enumerate(plan.devices):
                mesh.devices[parent.coord + (i,)] = d
        return mesh, parent.coord, _inherited_names()

    def _on_devices(self, work, top: bool | None = None) -> list:
        """Runs ``work(i, frame)`` on every device with the axis name bound; ``top``:
        whether no pmap encloses the caller, if known."""
        plan = self.plan
        if top is None:
            # (Not plan.top_level: a backward pass may run where its forward did not.)
            top = axes_mod.current_pmap_frame() is None
        if top and not plan.spans_processes:
            mesh = Mesh(plan.label, (plan.owner._axis_name,), (plan.ndev,), plan.coords)
            coords = plan.coord_list
            names = plan.names
            prefix = ()
        else:
            mesh, prefix, names = self._mesh()
            if mesh.call is not None and not prefix:  # (a top-level call's)
                mesh.call.expected = plan.process_exchanges
            coords = [prefix + (mesh.offset + i,) for i in range(plan.ndev)]
            name = plan.owner._axis_name
            axis_pos = len(mesh.sizes) - 1
            if name is not None:
                names = dict(names)
                names[name] = (axes_mod.DeviceComp(axis_pos, mesh.sizes[axis_pos]),)

        # A dict per device where a device runs several shards: it rebinds its name.
        per_block = plan.block > 1

        def per_device(i: int) -> Any:
            coord = coords[i]
            frame = axes_mod.PmapFrame(dict(names) if per_block else names, mesh, coord,
                                       plan.devices[i].torch_device)
            frames = axes_mod.frames()  # (``with axes_mod.bind(frame)``, written out)
            frames.append(frame)
            try:
                out = work(i, frame)
            except BaseException as e:
                mesh.leave(coord, e)
                raise
            finally:
                frames.pop()
            mesh.leave(coord)
            return out

        # Top-level calls from different threads take turns: a nested pmap queues its
        # inner devices' work from every outer device separately, and two calls
        # interleaved on the same workers could each wait for the other.
        if top:
            _TOP_LEVEL.take(plan.name)
        try:
            if _functorch.maybe_current_level() is not None:
                # Called from a backward (or jvp) at some torch.func level: the calling
                # thread runs device 0's share and must see no transforms, like the workers.
                with pyfunctorch.temporarily_clear_interpreter_stack():
                    outcomes = executor().run(plan.devices, per_device, self.inline, prefix)
            else:
                outcomes = executor().run(plan.devices, per_device, self.inline, prefix)
        finally:
            if top:
                _TOP_LEVEL.give()
        for o in outcomes:
            if o.error is not None:
                _raise_device_error(plan, [(i, o.error) for i, o in enumerate(outcomes)
                                           if o.error is not None])
        if mesh.call is not None and not prefix:  # (how many exchanges its calls make)
            made = mesh.call.exchanges
            known = plan.process_exchanges
            plan.process_exchanges = made if known is None or known == made else -1
        if mesh.watched:
            mesh.check_watched()
        # (For the output checks of this call only: see _run.)
        self.copies = mesh.copies
        return [o.value for o in outcomes]

    def _execute(self, inputs: list[list], record: bool, top: bool | None = None) -> list:
        plan = self.plan
        name = plan.owner._axis_name
        blocked = plan.block > 1
        # Every device draws random numbers from its own generator, seeded from one base
        # per call (drawn only if some device needs it; reused by recomputations).
        seeds = self.seeds = self.seeds or random_mod.call_seeds(self.caller_mode)
        if record:
            self.modes = [None] * plan.ndev

        def work(i: int, frame: Any) -> Any:
            rnd = random_mod.DeviceRandomness(seeds, i, plan.devices[i].torch_device)
            if record:
                self.modes[i] = rnd
                # Recording (for a backward pass later) needs grad mode on whatever the
                # caller's.
                with torch.enable_grad():
                    if blocked:
                        return self._blocked(inputs[i], True, frame, name, rnd)
                    return self._body(inputs[i], True, rnd)
            if blocked:
                return self._blocked(inputs[i], False, frame, name, rnd)
            return self._body(inputs[i], False, rnd)

        return self._on_devices(work, top)

    def _blocked(self, flat: list, record: bool, frame, name, rnd: Any) -> Any:
        """Runs ``block`` shards on one device as a named vmap (more shards than devices)."""
        plan = self.plan
        dims = tuple(a if kind != _BCAST else None for kind, a in zip(plan.kinds, plan.axes))
        dev_comp = frame.names[name][0] if name is not None else None
        k = plan.block

        if record:
            flat = [_track(x) if t else x for x, t in zip(flat, self.track)]
        holder: dict = {}

        def tensors_only(*leaves: Any):
            with axes_mod.vmap_level(k, frame.device) as vcomp:
                if name is not None:
                    frame.names[name] = (dev_comp, vcomp)
                out, treedef = self._body(list(leaves), False, rnd, raw=True)
            holder["treedef"] = treedef
            holder["present"] = [x is not None for x in out]
            return tuple(x for x in out if x is not None)

        outs = torch.func.vmap(tensors_only, in_dims=dims, out_dims=0,
                               randomness="different")(*flat)
        if name is not None:
            frame.names[name] = (dev_comp,)
        treedef = holder["treedef"]
        axes = plan.out_axes_for(treedef)
        it = iter(outs)
        outs = [next(it) if p else None for p in holder["present"]]
        final: list[torch.Tensor | None] = []
        for j, (t, ax) in enumerate(zip(outs, axes)):
            if t is None:
                final.append(None)
            elif ax is None:
                final.append(_check_block_replicated(plan, t, j, treedef,
                                                     frame.coord[-1] * k))
            else:
                try:
                    o = normalize_axis(ax, t.ndim - 1, plan.name,
                                       lambda: _output_leaf(treedef, j), extra=1,
                                       what="out_axes entry")
                except ValueError as e:  # (about the call: see _call_error)
                    raise _call_error(e) from None
                final.append(t.movedim(0, o))
        return (flat if record else None), final, treedef

    def _body(self, flat: list, record: bool, rnd: Any, raw: bool = False) -> Any:
        """The function on one device's arguments; ``rnd`` routes its random draws."""
        plan = self.plan
        if record and not raw:
            flat = [_track(x) if t else x for x, t in zip(flat, self.track)]
        args: Sequence[Any]
        if plan.flat_args:
            args, kwargs = flat, _NO_KWARGS
        else:
            args, kwargs = tree_util.tree_unflatten(flat, plan.treedef)
        if self.statics:
            args = _merge_statics(args, self.statics)
        # ``with rnd:`` without its two Python calls (every device of every call).
        torch._C._push_on_torch_function_stack(rnd)
        try:
            out = self.fun(*args, **kwargs)
        finally:
            torch._C._pop_torch_function_stack()
        if type(out) is torch.Tensor:
            leaves, treedef = [out], _LEAF
            ranked = plan.leaf_ranked
        else:
            leaves, treedef = tree_util.tree_flatten(out)
            leaves = [x if type(x) is torch.Tensor else _to_output(x, plan, i, treedef)
                      for i, x in enumerate(leaves)]
            ranked = None
        if raw:
            return leaves, treedef
        if ranked is None:
            ranked = plan.ranked_axes_for(treedef)
        for i, ax in ranked:
            x = leaves[i]
            # The check's fast path inline (the full one only to word the error).
            if x is not None and not -x.ndim - 1 <= ax <= x.ndim:
                try:
                    normalize_axis(ax, x.ndim, plan.name, lambda: _output_leaf(treedef, i), extra=1,
                                   what="out_axes entry")
                except ValueError as e:
                    raise _call_error(e) from None
        return (flat if record else None), leaves, treedef

    # -- the plain path ------------------------------------------------------------------
    def run(self) -> Any:
        plan = self.plan
        policy = plan.policy
        # The thread budget (Executor.thread_budget) without its context manager.
        threads = plan.threads
        old = torch.get_num_threads()
        if threads and old != threads:
            torch.set_num_threads(threads)
        try:
            if policy is None:
                return self._run()
            self.inline = policy.request()
            start = time.perf_counter()
            out = self._run()
            policy.record(time.perf_counter() - start, self.inline)
            return out
        finally:
            if threads and old != threads:
                torch.set_num_threads(old)

    def _run(self) -> Any:
        plan = self.plan
        # (The plan's key holds whether a pmap encloses this call: _context.)
        results = self._execute(self._device_inputs(self.leaves), False, plan.top_level)
        treedef = _same_structure(plan, results)
        axes = plan.out_axes_for(treedef)
        outs: list[Any] = []
        if plan.full_checks > 0:
            plan.full_checks -= 1
        for j, ax in enumerate(axes):
            shards = [r[1][j] for r in results]
            if shards[0] is None:
                _all_none(plan, shards, j, treedef)
                outs.append(None)
                continue
            for s in shards:
                if s is None:
                    _all_none(plan, shards, j, treedef)
                if s.requires_grad:
                    self._grad_output_error(_output_leaf(treedef, j))
            if ax is None:
                outs.append(_replicated(plan, shards, j, treedef, self.copies))
            else:
                if plan.chunks is None:  # (chunks of an uneven split may differ in length)
                    _same_shapes(plan, shards, j, treedef)
                nd = shards[0].ndim - plan.keeps_axis
                o = ax if 0 <= ax <= nd else normalize_axis(
                    ax, nd, plan.name, lambda: _output_leaf(treedef, j), extra=1,
                    what="out_axes entry")
                if plan.chunks is not None:
                    outs.append(_concat(shards, o))
                else:
                    outs.append(ShardedValue(shards, plan.devices, o, plan.block))
        self.copies = None
        if treedef is _LEAF:
            return outs[0]
        return tree_util.tree_unflatten(outs, treedef)

    def _grad_output_error(self, leaf: str) -> None:
        """Raises for an output ``leaf`` (its name) requiring grad on the plain
        (non-differentiable) path."""
        name = self.plan.name
        if any(isinstance(x, ShardedValue) and x.shards[0].requires_grad
               for x in self.leaves):
            raise RuntimeError(
                f"{name}: an argument is a sharded value whose tensors require grad "
                f"(funcdp.replicate of a parameter, say); sharded values carry no gradients "
                f"through pmap. Pass the tensor itself with in_axes=None instead: on CPU "
                f"devices it is shared, not copied.")
        raise RuntimeError(
            f"{name}: {leaf} requires grad but no argument of the call does: the "
            f"function closes over tensors that require grad (an nn.Module's parameters, "
            f"say). Pass them as arguments (funcdp.nn.functional(module) gives a pure "
            f"function of its parameters) so gradients flow through pmap.")

    # -- the differentiable path -----------------------------------------------------------
    def run_differentiable(self) -> Any:
        tensor_pos = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]
        self.tensor_pos = tensor_pos
        # The inputs a gradient may be asked for: those requiring grad, and any value a
        # torch.func transform wraps. Others (BatchNorm buffers, data) are not tracked.
        track = [False] * len(self.leaves)
        grad_levels: frozenset[int] | None = None
        for i in tensor_pos:
            x = self.leaves[i]
            if x.requires_grad:
                track[i] = True
            elif _functorch.is_functorch_wrapped_tensor(x):
                if grad_levels is None:
                    grad_levels = frozenset(
                        t.level() for t in pyfunctorch.retrieve_all_functorch_interpreters()
                        if t.key() == pyfunctorch.TransformType.Grad)
                track[i] = _tracked_by_a_transform(x, grad_levels)
        self.track = track
        # (Here: inside the autograd.Function the caller's torch-function modes, among them
        # the enclosing device's random routing that a nested call seeds from, are off.)
        self.caller_mode = random_mod.active_mode()
        self.fwd_autocast = autocast_now()
        self.fwd_vmaps = frozenset(
            i.level() for i in pyfunctorch.retrieve_all_functorch_interpreters()
            if isinstance(i, pyfunctorch.VmapInterpreter)
        ) if _functorch.maybe_current_level() is not None else frozenset()
        if _saved_tensors_hooks() is not None:  # (a checkpoint's, say)
            self.around = random_mod.enclosing_checkpoints(sys._getframe())
        flat = _PmapFn.apply(self, *[self.leaves[i] for i in tensor_pos])
        outs = list(self.out_template)
        for j, t in zip(self.out_tensor_pos, flat):
            outs[j] = t
        return tree_util.tree_unflatten(outs, self.out_treedef)

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple:
        plan = self.plan
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_pos, tensors):
            leaves[i] = t
        results = self._execute(self._device_inputs(leaves), record=True)
        self.copies = None  # (the call is kept for the backward pass: not these)
        treedef = _same_structure(plan, results)
        axes = plan.out_axes_for(treedef)
        self.per_device = [(r[0], r[1]) for r in results]
        self.out_treedef = treedef
        self.out_axes = axes
        outs: list[Any] = []
        tensor_pos = []
        norm: list[int | None] = []
        for j, ax in enumerate(axes):
            shards = [r[1][j] for r in results]
            norm.append(None)
            if any(s is None for s in shards):
                _all_none(plan, shards, j, treedef)
                outs.append(None)
                continue
            tensor_pos.append(j)
            det = [s.detach() for s in shards]
            if ax is None:
                outs.append(_replicated(plan, det, j, treedef))
            else:
                if not plan.keeps_axis:
                    _same_shapes(plan, det, j, treedef)
                o = normalize_axis(ax, det[0].ndim - plan.keeps_axis, plan.name,
                                   lambda: _output_leaf(treedef, j), extra=1,
                                   what="out_axes entry")
                norm[j] = o
                outs.append(_concat(det, o) if plan.keeps_axis else torch.stack(det, o))
        self.out_norm = norm
        self.out_template = outs
        self.out_tensor_pos = tensor_pos
        return tuple(outs[j] for j in tensor_pos)

    def backward(self, cts: Sequence[torch.Tensor], needs: Sequence[bool],
                 inputs: Sequence[torch.Tensor]) -> list:
        if _saved_graphs_suffice(cts):
            try:
                grads = self._backward_saved(cts, needs)
            except RuntimeError as e:
                if not any(_functorch.is_legacy_batchedtensor(c) for c in cts):
                    raise
                raise NotImplementedError(
                    f"{self.plan.name}: torch.autograd.grad(..., is_grads_batched=True) "
                    f"batches the cotangents with torch's legacy vmap, which funcdp's "
                    f"collectives cannot run under (the devices raised: {e}). Batch the "
                    f"gradient with torch.func instead: torch.func.vmap(lambda ct: "
                    f"torch.func.vjp(f, x)[1](ct))(cotangents).") from e
            if grads is not None:
                return grads
            # (None: a collective over the shards in a custom backward; see grad_device.)
        self._no_chunks("a higher-order or batched gradient")
        return self._backward_recompute(cts, needs, inputs)

    def _no_chunks(self, what: str) -> None:
        if self.plan.chunks is not None:
            raise NotImplementedError(
                f"{self.plan.name}: {what} through funcdp.DataParallel is not supported; "
                f"use funcdp.pmap for it.")

    def _backward_recompute(self, cts, needs, inputs) -> list:
        """The VJP as a pmap of ``torch.func.vjp``: differentiable and batchable.

        Used when the gradient must itself be differentiated (``create_graph=True``,
        ``torch.func.vjp`` under another transform, grad of grad) or batched (vmap of
        grad); costs one more forward pass than the saved-graph path.
        """
        plan = self.plan
        nleaves = len(self.leaves)
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_pos, inputs):
            leaves[pos] = t
        want = [p for i, p in enumerate(self.tensor_pos) if needs[i]]
        if not want:
            return [None] * len(self.tensor_pos)
        n = plan.size
        ct_leaves, ct_axes = [], []
        for j, ct in zip(self.out_tensor_pos, cts):
            o = self.out_norm[j]
            if o is None:  # the value returned was device 0's
                ct = torch.stack([ct] + [torch.zeros_like(ct)] * (n - 1))
                o = 0
            ct_leaves.append(ct)
            ct_axes.append(o)
        # Integer outputs (counts, argmax) have no cotangent: leave them out of the VJP.
        diff_mask = [bool(ct.is_floating_point() or ct.is_complex()) for ct in cts]
        diff_pos = [j for j, d in zip(self.out_tensor_pos, diff_mask) if d]

        def vjp_flat(*flat: Any) -> tuple:
            prim, cotangents = list(flat[:nleaves]), flat[nleaves:]
            of_wanted = self._as_function_of(prim, want, diff_pos)
            # Without has_aux, torch.func.vjp returns 2 values (3 only with has_aux=True).
            # The forward pass again under the autocast it ran with; the pullback under
            # the backward pass's.
            with autocast_as(self.fwd_autocast):
                _, pull = cast("tuple[Any, Callable[..., Any]]",
                               torch.func.vjp(of_wanted, *[prim[p] for p in want]))
            return pull(tuple(c for c, d in zip(cotangents, diff_mask) if d))

        grad_axes = tuple(plan.axes[p] if plan.kinds[p] != _BCAST else 0 for p in want)
        back = pmap(vjp_flat, plan.owner._axis_name, in_axes=tuple(plan.axes) + tuple(ct_axes),
                    out_axes=grad_axes, devices=plan.devices)
        # The same dropout masks as the forward pass.
        with random_mod.reuse(self.seeds, pullback=self.fwd_vmaps):
            res = back(*leaves, *ct_leaves)
        by_leaf = {}
        for p, r in zip(want, res):
            r = r.to_tensor() if isinstance(r, ShardedValue) else r
            by_leaf[p] = r.sum(0) if plan.kinds[p] == _BCAST else r
        return [by_leaf.get(p) if needs[i] else None for i, p in enumerate(self.tensor_pos)]

    def _as_function_of(self, prim: list, positions: list[int], outputs: list[int]):
        """The pmapped function as a function of the argument leaves at ``positions``
        (the others fixed to ``prim``), returning its output leaves at ``outputs``."""
        plan, treedef, statics, fun = self.plan, self.plan.treedef, self.statics, self.fun

        def of(*values: Any) -> tuple:
            full = list(prim)
            for p, v in zip(positions, values):
                full[p] = v
            args, kwargs = tree_util.tree_unflatten(full, treedef)
            if statics:
                args = _merge_statics(args, statics)
            outs, out_def = tree_util.tree_flatten(fun(*args, **kwargs))
            return tuple(_to_output(outs[j], plan, j, out_def) for j in outputs)

        return of

    def jvp(self, inputs: Sequence[torch.Tensor], tangents: Sequence[Any]) -> tuple:
        """Forward-mode derivative: a pmap of ``torch.func.jvp`` (one more forward pass)."""
        self._no_chunks("forward-mode differentiation")
        plan = self.plan
        nleaves = len(self.leaves)
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_pos, inputs):
            leaves[pos] = t
        # torch.func hands the rule a tangent for every input, zeros for those that have
        # none (a captured tensor, a BatchNorm's running statistics): those are left out,
        # or the recomputation would give them tangents, which some ops refuse.
        level = _functorch.maybe_current_level()  # (the jvp's own)
        live = [(p, t) for p, t in zip(self.tensor_pos, tangents) if t is not None and (
            level is None or _wrapped_at(self.leaves[p], level))]
        if level is not None:
            # The others as they were below the jvp (it wraps every input of the rule), so
            # that the recomputation does not track them either.
            dead = set(self.tensor_pos) - {p for p, _ in live}
            for p in dead:
                x = leaves[p]
                if (_functorch.is_functorch_wrapped_tensor(x)
                        and _functorch.maybe_get_level(x) == level):
                    leaves[p] = _functorch.get_unwrapped(x)
        live_pos = [p for p, _ in live]
        out_pos = self.out_tensor_pos
        out_float = {j: bool(self.out_template[j].is_floating_point()
                             or self.out_template[j].is_complex()) for j in out_pos}

        def jvp_flat(*flat: Any) -> tuple:
            prim, tans = list(flat[:nleaves]), flat[nleaves:]
            of_live = self._as_function_of(prim, live_pos,
                                           [j for j in out_pos if out_float[j]])

            # Primals and tangents may be expanded views (stride 0), which forward AD
            # cannot hold.
            tans = tuple(t.clone(memory_format=torch.contiguous_format) for t in tans)
            prims = tuple(prim[p].clone(memory_format=torch.contiguous_format)
                          for p in live_pos)
            # Without has_aux, torch.func.jvp returns 2 values (3 only with has_aux=True).
            _, out_t = cast("tuple[Any, Any]", torch.func.jvp(of_live, prims, tans))
            return out_t

        tan_axes = tuple(plan.axes[p] for p in live_pos)
        out_axes = tuple(self.out_norm[j] for j in out_pos if out_float[j])
        fwd = pmap(jvp_flat, plan.owner._axis_name, in_axes=tuple(plan.axes) + tan_axes,
                   out_axes=out_axes, devices=plan.devices)
        with random_mod.reuse(self.seeds):
            res = iter(fwd(*leaves, *[t for _, t in live]))
        return tuple((lambda r: r.to_tensor() if isinstance(r, ShardedValue) else r)(next(res))
                     if out_float[j] else None for j in out_pos)

    def _backward_saved(self, cts: Sequence[torch.Tensor],
                        needs: Sequence[bool]) -> list | None:
        cts = [_functorch.get_unwrapped(c) if _functorch.is_functorch_wrapped_tensor(c) else c
               for c in cts]
        if _functorch.maybe_current_level() is None:
            return self._backward_saved_plain(cts, needs)
        # Under a single torch.func.grad: work on plain tensors (ops run while the level is
        # active would wrap their results), and hand plain gradients back.
        with pyfunctorch.temporarily_clear_interpreter_stack():
            return self._backward_saved_plain(cts, needs)

    def _backward_saved_plain(self, cts: Sequence[torch.Tensor],
                              needs: Sequence[bool]) -> list | None:
        plan = self.plan
        assert self.per_device is not None
        ndev, k = plan.ndev, plan.block
        ct_by_out = dict(zip(self.out_tensor_pos, cts))
        want = [i for i, p in enumerate(self.tensor_pos) if needs[i]]

        def device_cts(i: int) -> list:
            out = []
            for j in self.out_tensor_pos:
                ct = ct_by_out[j]
                o = self.out_norm[j]
                if o is None:
                    out.append(ct if i == 0 else torch.zeros_like(ct))
                    continue
                if plan.chunks is not None:
                    assert plan.offsets is not None  # set whenever chunks is
                    out.append(ct.narrow(o, plan.offsets[i], plan.chunks[i]))
                else:
                    out.append(ct.select(o, i) if k == 1 else ct.narrow(o, i * k, k))
            return out

        per_ct = [device_cts(i) for i in range(ndev)]
        saved = self.per_device
        wanted_leaves = [self.tensor_pos[i] for i in want]

        name = plan.owner._axis_name
        # With several shards per device, the shards' part of the graph runs as a vmap
        # that torch makes for it (funcdp's collectives carry their axes in their saved
        # state): a collective that a custom backward or a hook calls by name could only
        # reach the devices, and would reduce over them alone. It raises instead, and the
        # backward recomputes (_backward_recompute runs it inside funcdp's named vmap).
        unreachable = axes_mod.Unreachable(
            f"axis {name!r} runs {k} shards per device, and this backward pass runs them "
            f"as a vmap funcdp cannot name") if k > 1 and name is not None else None

        def grad_device(i: int, frame: Any) -> Any:
            ins, outs = saved[i]
            pairs = [(outs[j], c) for j, c in zip(self.out_tensor_pos, per_ct[i])
                     if outs[j] is not None and outs[j].requires_grad]
            targets = [ins[p] for p in wanted_leaves]
            if not pairs or not targets:
                return [None] * len(targets)
            if unreachable is not None:
                frame.names[name] = unreachable  # (the frame is this device's own)
            # The device's random routing of the forward pass, continued: draws made in
            # the backward pass (a custom backward, a hook, a checkpoint's recomputation)
            # come from the device's generator, where the forward pass left it.
            with random_mod.Continuation(self.modes[i], self.around), torch.enable_grad():
                # The graph lives as long as the caller's graph does (which may run
                # backward more than once); it is freed with it.
                try:
                    return list(torch.autograd.grad([p[0] for p in pairs], targets,
                                                    [p[1] for p in pairs], allow_unused=True,
                                                    retain_graph=True))
                except axes_mod.ShardsUnreachable:
                    return None
                except RuntimeError as e:
                    if "use_reentrant=True" not in str(e):
                        raise
                    raise RuntimeError(
                        f"{e} (The backward pass of a pmap computes each device's gradient "
                        f"with torch.autograd.grad, which a reentrant checkpoint refuses: "
                        f"inside a pmap, call torch.utils.checkpoint.checkpoint with "
                        f"use_reentrant=False.)") from e

        # Each device's backward runs on its own worker, with the axis bound again so
        # that the collectives' transposes meet the other devices.
        results = self._on_devices(grad_device)
        if any(r is None for r in results):
            return None
        grads: list[Any] = [None] * len(self.tensor_pos)
        for k_, (w, leaf_i) in enumerate(zip(want, wanted_leaves)):
            per = [r[k_] for r in results]
            kind = plan.kinds[leaf_i]
            a = plan.axes[leaf_i]
            x = self.leaves[leaf_i]
            if kind == _BCAST:
                acc = None
                for g in per:
                    if g is not None:
                        g = g if g.device == x.device else g.to(x.device)
                        acc = g if acc is None else acc + g
                grads[w] = acc
            else:
                assert a is not None  # only broadcast leaves have no axis
                parts = []
                for i, g in enumerate(per):
                    if g is None:
                        ref = saved[i][0][leaf_i]
                        g = torch.zeros_like(ref)
                    parts.append(g if g.device == x.device else g.to(x.device))
                grads[w] = torch.cat(parts, a) if plan.keeps_axis else torch.stack(parts, a)
        return grads

    def vmap_rule(self, info, in_dims, tensors) -> Any:
        """``vmap(pmap(f))`` runs as ``pmap(vmap(f))``: the batch moves inside the devices.

        The outer vmap's axis name (if it has one) is bound inside every device, so
        collectives over it work there too.
        """
        from funcdp._src.vmap import vmap as named_vmap

        self._no_chunks("vmap")
        plan = self.plan
        level = axes_mod.current_level() + 1
        name = axes_mod.vmap_name_at(level)
        leaves = list(self.leaves)
        bdims: list[int | None] = [None] * len(leaves)
        for pos, t, d in zip(self.tensor_pos, tensors, in_dims):
            leaves[pos] = t
            bdims[pos] = d
        pmap_axes: list[int | None] = []
        inner_dims: list[int | None] = []
        for a, d in zip(plan.axes, bdims):
            if a is None or d is None:
                pmap_axes.append(a)
                inner_dims.append(d)
                continue
            phys = a if a < d else a + 1  # the pmap axis, counting the batch dimension
            pmap_axes.append(phys)
            inner_dims.append(d if d < phys else d - 1)
        treedef, statics, fun = plan.treedef, self.statics, self.fun

        def flat_fun(*flat: Any) -> Any:
            args, kwargs = tree_util.tree_unflatten(list(flat), treedef)
            if statics:
                args = _merge_statics(args, statics)
            return fun(*args, **kwargs)

        # Messages name the user's function, not this wrapper.
        flat_fun.__qualname__ = flat_fun.__name__ = fun_name(fun)

        def shift(o: Any) -> Any:
            return o + 1 if isinstance(o, int) and o >= 0 else o

        out_axes = tree_util.tree_map(shift, plan.owner._out_axes)
        # A forward pass recomputed for a batched pullback (jacrev's vmap over cotangents)
        # replays the forward pass's seeds: one draw for the whole batch, whatever the
        # vmap's randomness (jacrev's is "error"; jacfwd's keeps its own, as in torch).
        vmaps = random_mod.pullback_vmaps()
        randomness = "same" if vmaps is not None and level not in vmaps else info.randomness
        inner = named_vmap(flat_fun, in_axes=tuple(inner_dims), out_axes=0, axis_name=name,
                           axis_size=info.batch_size, randomness=randomness)
        outer = pmap(inner, plan.owner._axis_name, in_axes=tuple(pmap_axes),
                     out_axes=out_axes, devices=plan.devices)
        # (Inside the autograd.Function the enclosing device's routing is off: the new call
        # seeds from it, as the call it replaces would have.)
        mode = self.caller_mode
        with mode if isinstance(mode, random_mod.DeviceRandomness) else contextlib.nullcontext():
            result = outer(*leaves)
        out_leaves, out_treedef = tree_util.tree_flatten(result)
        out_leaves = [x.to_tensor() if isinstance(x, ShardedValue) else x for x in out_leaves]
        self.out_treedef = out_treedef
        self.out_template = out_leaves
        self.out_tensor_pos = [j for j, x in enumerate(out_leaves) if x is not None]
        # Where each output's mapped axis is, as forward() would have recorded it (the
        # recompute path of a later backward reads it); the batch dimension is not counted.
        axes = plan.out_axes_for(out_treedef)
        self.out_norm = [None if ax is None or x is None else
                         normalize_axis(ax, x.ndim - 2, plan.name,
                                        lambda: _output_leaf(out_treedef, j), extra=1)
                         for j, (ax, x) in enumerate(zip(axes, out_leaves))]
        outs = tuple(out_leaves[j] for j in self.out_tensor_pos)
        return outs, (0,) * len(outs)


class _PmapFn(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(call: _Call, *tensors: torch.Tensor):  # type: ignore[override]
        return call.forward(tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[0]
        # Kept for the recompute path only; not save_for_backward, so that the saved-graph
        # path does not check version counters it does not need.
        ctx.inputs = inputs[1:]

    @staticmethod
    def backward(ctx, *cts):
        return (None, *ctx.call.backward(cts, ctx.needs_input_grad[1:], ctx.inputs))

    @staticmethod
    def jvp(ctx, _call_tangent, *tangents):
        return ctx.call.jvp(ctx.inputs, tangents)

    @staticmethod
    def vmap(info, in_dims, call: _Call, *tensors):
        return call.vmap_rule(info, in_dims[1:], tensors)


def _saved_graphs_suffice(cts: Sequence[torch.Tensor]) -> bool:
    """Whether the per-device graphs recorded in forward can give the gradient.

    They give plain, first-order gradients: right for ``.backward()`` and for a single
    ``torch.func.grad``; not when the gradient must be differentiable (grad mode on in
    plain autograd means ``create_graph=True``) or when other transforms are active.
    """
    if _functorch.maybe_current_level() is None:
        return not torch.is_grad_enabled() and not any(
            _functorch.is_functorch_wrapped_tensor(c) for c in cts)
    # A single torch.func.grad: its own level is the only one (the cotangents are wrapped
    # at that level only, and are unwrapped before use).
    stack = pyfunctorch.retrieve_all_functorch_interpreters()
    return len(stack) == 1 and stack[0].key() == pyfunctorch.TransformType.Grad


def _spans_processes(proc: Any, owner: Pmapped, chunks: tuple | None) -> bool:
    """JAX's multi-host convention: a top-level pmap over all local devices spans every
    process of a multi-process run (its mapped size is the local device count, times
    the block size)."""
    return (proc is not None and proc.count > 1 and owner._devices is None
            and chunks is None and axes_mod.current_pmap_frame() is None)


def _tracked_by_a_transform(x: torch.Tensor, grad_levels: frozenset[int]) -> bool:
    """Whether a transform may ask for a derivative with respect to ``x``, a tensor some
    ``torch.func`` transform wraps: unless every level wrapping it is a ``grad`` level at
    which it does not require grad (a constant made inside the transform, such as a
    buffer's ``clone()``: tracked, a BatchNorm's running statistics would be rejected by
    batch_norm as requiring grad). vmap and jvp levels keep it tracked."""
    t = x
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.maybe_get_level(t) not in grad_levels:
            return True
        t = _functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _wrapped_at(x: torch.Tensor, level: int) -> bool:
    """Whether the transform at ``level`` (or one above it) wraps ``x``: for the jvp
    whose rule runs at ``level``, whether ``x`` has a tangent. (Transforms below wrap
    the inputs of every transform above them.)"""
    return (_functorch.is_functorch_wrapped_tensor(x)
            and _functorch.maybe_get_level(x) >= level)


def _track(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return x.detach().requires_grad_()
    return x


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A numpy argument as a tensor (sharing its memory unless it has negative strides,
    which torch does not support: then copied)."""
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return torch.as_tensor(a)


def _merge_statics(args: Sequence[Any], statics: tuple) -> tuple:
    out = list(args)
    for j, v in statics:
        out.insert(j, v)
    return tuple(out)


def _broadcast(x: Any, devices: list[Device]) -> list:
    if not isinstance(x, torch.Tensor):
        return [x] * len(devices)
    return to_devices([x] * len(devices), devices)


def _concat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    target = parts[0].device
    return torch.cat([p if p.device == target else p.to(target) for p in parts], dim)


def _to_output(x: Any, plan: _Plan, i: int, treedef: Any) -> Any:
    if isinstance(x, torch.Tensor) or x is None:
        return x
    if isinstance(x, ShardedValue):  # the output of a nested pmap
        return x.to_tensor()
    if isinstance(x, (bool, int, float, complex, np.ndarray, np.generic)):
        return torch.as_tensor(x)
    raise _call_error(TypeError(f"{plan.name}: {_output_leaf(treedef, i)} is {a_type(x)}; "
                                f"pmapped functions must return pytrees of tensors (or "
                                f"numbers)."))


def _same_structure(plan: _Plan, results: list) -> Any:
    treedef = results[0][2]
    for i, r in enumerate(results):
        if r[2] is not treedef and r[2] != treedef:
            raise ValueError(
                f"{plan.name}: devices returned differently structured outputs: device 0 "
                f"returned {treedef} but device {i} returned {r[2]}. Every device must return "
                f"the same pytree structure.")
    return treedef


def _output_leaf(treedef: Any, j: int) -> str:
    """Output leaf ``j`` of a call whose output has structure ``treedef``, for messages:
    "the output", or its path as indexing (``output['loss']``, ``output[1][0]``)."""
    if treedef is _LEAF or treedef == _LEAF:
        return "the output"
    try:
        return "output" + tree_util.keystr(tree_util.leaf_paths(treedef)[j])
    except Exception:  # noqa: BLE001 - a structure without key paths: its leaf number
        return f"output leaf {j}"


def _same_shapes(plan: _Plan, shards: list, j: int, treedef: Any) -> None:
    """Raises unless the devices' values of mapped output leaf ``j`` can be stacked: the
    same shape and dtype everywhere."""
    first = shards[0]
    shape, dtype = first.shape, first.dtype
    for i, s in enumerate(shards[1:], start=1):
        if s.shape != shape or s.dtype != dtype:
            raise ValueError(
                f"{plan.name}: {_output_leaf(treedef, j)} is stacked along its out_axes "
                f"entry, but its values differ in shape or dtype across devices: "
                f"{tuple(shape)} {dtype} on "
                f"device 0, {tuple(s.shape)} {s.dtype} on device {i}. Every device must "
                f"return values of the same shape and dtype for a mapped output: pad them to "
                f"one shape and cast them to one dtype.")


def _all_none(plan: _Plan, shards: list, j: int, treedef: Any) -> None:
    """Raises unless output leaf ``j`` is None on every device (None is a leaf of the
    output's structure, so structures that differ only there compare equal)."""
    kinds = ["None" if s is None else "a tensor" for s in shards]
    if any(k != kinds[0] for k in kinds):
        i = next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise ValueError(
            f"{plan.name}: devices returned differently structured outputs: "
            f"{_output_leaf(treedef, j)} is {kinds[0]} on device 0 but {kinds[i]} on "
            f"device {i}. Every device must return the same pytree structure, with None in "
            f"the same places.")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


_SAMPLE = 1024


def _sample(t: torch.Tensor) -> torch.Tensor:
    """About ``_SAMPLE`` evenly spaced elements of a contiguous tensor (a view)."""
    if t.numel() <= 4 * _SAMPLE:
        return t
    return t.view(-1)[:: t.numel() // _SAMPLE]


def _replicated(plan: _Plan, shards: list, j: int, treedef: Any,
                copies: dict | None = None) -> torch.Tensor:
    """Device 0's value of an ``out_axes=None`` output, after checking it is the same
    everywhere: results of one collective are recognised by their shared storage; other
    values are compared in full on a plan's first calls, then on a sample of about a
    thousand elements (catching the usual mistake, a value that differs everywhere,
    without a full pass over every replicated parameter on every step), or not at all
    where they are copies of one value that the call's collectives made for each device
    (``copies``), unchanged since."""
    first = shards[0]
    if config.check_replicated:
        full = plan.full_checks > 0
        for i, s in enumerate(shards[1:], start=1):
            if s is first or _same_storage(first, s):
                continue
            if not full and copies and same_copies(copies, first, s):
                continue
            if s.shape != first.shape or s.dtype != first.dtype:
                what = (f"shape {tuple(first.shape)} vs {tuple(s.shape)}"
                        if s.shape != first.shape else f"dtype {first.dtype} vs {s.dtype}")
                raise ValueError(_not_replicated_msg(
                    plan, _output_leaf(treedef, j), 0, i, what))
            other = s if s.device == first.device else s.to(first.device)
            # (Samples of the same elements need both laid out contiguously.)
            a, b = ((first, other) if full or not (first.is_contiguous()
                                                   and other.is_contiguous())
                    else (_sample(first), _sample(other)))
            if not _same_bits(a, b):
                raise ValueError(_not_replicated_msg(plan, _output_leaf(treedef, j), 0, i,
                                                     _diff(a, b)))
    return first


def _check_block_replicated(plan: _Plan, t: torch.Tensor, j: int, treedef: Any,
                            base: int) -> torch.Tensor:
    """The value of an ``out_axes=None`` output over one device's ``block`` shards
    (numbered from ``base`` in the call), checked to be the same for each."""
    first = t[0]
    if config.check_replicated and t.shape[0] > 1 and t.stride(0) != 0:
        for v in range(1, t.shape[0]):
            if not _same_bits(first, t[v]):
                # About the call's output, not this device: reported as it is.
                raise _call_error(ValueError(_not_replicated_msg(
                    plan, _output_leaf(treedef, j), base, base + v, _diff(first, t[v]),
                    unit="shard")))
    return first


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (``-0.0`` and ``0.0`` included), or equal bits (a NaN everywhere)."""
    if torch.equal(a, b):
        return True
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        bits = _BITS.get(a.element_size())
        if bits is not None:
            return torch.equal(a.view(bits), b.view(bits))
    return False


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.is_floating_point() or a.is_complex():
        d = (a - b).abs().max().item()
        return f"max abs difference {d:g}"
    return "values differ"


def _not_replicated_msg(plan: _Plan, what: str, a: int, b: int, detail: str,
                        unit: str = "device") -> str:
    if unit == "device":  # which devices (their ids are global in a multi-process run)
        which = f"device {a} ({plan.devices[a]!r}) vs device {b} ({plan.devices[b]!r})"
    else:
        which = f"{unit} {a} vs {unit} {b}"
    return (f"{plan.name}: out_axes=None for {what}, but its value differs across devices "
            f"({which}: {detail}). Make it the same everywhere (for example "
            f"funcdp.pmean(x, axis_name) or psum) or give it an integer out_axes to get one "
            f"value per device. funcdp.config.check_replicated=False skips this check.")


def _call_error(e: BaseException) -> BaseException:
    """Marks an error about the call itself (its out_axes, its outputs), raised on a device
    but not specific to it: reported as it is, not as "caught on device i"."""
    e.funcdp_call_error = True  # type: ignore[attr-defined]
    return e


def _raise_device_error(plan: _Plan, errors: list) -> None:
    for _, e in errors:  # (an interrupt or exit request first, wherever it was raised)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise e
    primary = None
    for i, e in errors:
        if not isinstance(e, CollectiveError):
            primary = (i, e)
            break
    if primary is not None and getattr(primary[1], "funcdp_call_error", False):
        raise primary[1].with_traceback(None)
    if primary is None:
        firsts = [e for _, e in errors if not e.secondary] or [errors[0][1]]
        raise firsts[0]
    i, e = primary
    dev = plan.devices[i]
    others = [j for j, _ in errors if j != i and not isinstance(_, CollectiveError)]
    also = f" (devices {others} raised too)" if others else ""
    where = f"on device {i} ({dev!r}) in {plan.name}{also}"
    hint = ""
    if plan.block > 1 and type(e) is RuntimeError and (
            "vmap" in str(e) or "Batching rule not implemented" in str(e)):
        # torch's vmap refusing something (.item(), control flow on a value, a hook):
        # the user wrote no vmap; say where it comes from.
        n = plan.ndev * plan.block
        hint = (f"Note: {plan.name} runs {n} shards on {plural(plan.ndev, 'device')}: "
                f"each device runs its {plan.block} shards as a torch.func.vmap, which "
                f"refuses some things that run with one shard per device (.item() and "
                f"Python control flow on tensor values, tensor hooks, "
                f".backward() inside the function). Give the pmap as many devices as shards "
                f"(FUNCDP_NUM_CPU_DEVICES={n} for virtual devices), or avoid them "
                f"(torch.where instead of an if on a value, say).\n")
    if (len(e.args) <= 1 and not e.__dict__ and not isinstance(e, OSError)
            and all(isinstance(a, str) for a in e.args)
            and type(e).__str__ is BaseException.__str__):
        # A plain exception (one message, no attributes, shown as it is: not a KeyError,
        # whose argument is the key, nor a class with a __str__ of its own): the same type
        # again, its message naming the device, the device's own traceback as the cause.
        msg = (f"Caught {type(e).__name__} {where}: {e}\n{hint}"
               f"(the device's own traceback is shown above, as the cause)")
        try:
            new = type(e)(msg)
        except Exception:  # noqa: BLE001 - exception types with unusual constructors
            new = None
        if new is not None and type(new) is type(e) and new.args == (msg,):
            raise new from e
    # Anything else (several arguments, attributes such as OSError's errno and filename,
    # an unusual constructor) is re-raised itself, so that `except` clauses and
    # attributes work as if the function had run here; the device goes in a note.
    if hasattr(e, "add_note"):
        e.add_note(f"{hint}(raised {where})")
    elif e.__cause__ is None:  # (Python 3.10: the device named in a cause instead)
        e.__cause__ = RuntimeError(f"{hint}(raised {where})")
    raise e


# The innermost saved-tensor hooks in effect (a checkpoint's), or None.
_saved_tensors_hooks = functools.partial(
    torch._C._autograd._top_saved_tensors_default_hooks, False)  # type: ignore[attr-defined]

# A draw's search for a checkpoint recomputing it stops where the device's function starts.
random_mod.stop_checkpoint_search_at(_Call._body.__code__)
