"""Elementwise updates of replicated values, computed once by the devices together.

An optimizer step inside ``pmap`` is the same computation on every device: the gradients
were averaged over the axis, the parameters and the optimizer state are replicated. On
devices that share memory (virtual CPU devices) computing it everywhere wastes time and
memory: with 8 devices, 8 copies of the new parameters are made, 7 of them thrown away by
``out_axes=None``. ``elementwise`` instead deals the large leaves out to the devices of
the axis: each device runs the kernel on its leaves and every device receives all the
results, so the update costs about ``1/n`` of the work per device (as evenly as the leaf
sizes allow) and one copy of memory in all.

It takes this path only when it is exact: every device passed the very same tensors
(same storage, checked in the rendezvous), on the CPU, outside autograd and
``torch.func`` transforms. Otherwise (values that differ per device, a gradient taken
through the update, several processes) each device computes the whole update itself, as
it would without ``axis_name``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._C import _functorch

from funcdp._src import axes as axes_mod
from funcdp._src.api_util import internal
from funcdp._src.axes import DeviceComp
from funcdp._src.collectives import _sum_into_many, can_hold_result, position

# Leaves with at least this many elements are shared; smaller ones (biases, step
# counters) are computed by every device, which is cheaper than a rendezvous.
_SHARED_MIN_NUMEL = 1 << 14

# Sharing takes two rendezvous; measured on 2 cores it pays from two devices on (the
# MLP step's update 1.0 -> 0.85 ms with 2 devices, -0.5 ms with 4, -4 ms (9 %) with 8).
# Even one large leaf is worth it: the device computing it runs no slower than every
# device computing it at once, and one copy of the result is made instead of n.
_SHARED_MIN_DEVICES = 2

Lists = Sequence[list[torch.Tensor]]

# Which results are shared, for the error when one is written to in place.
_SHARED_WHAT = (f"The new parameters and optimizer state of a shared update (tensors of "
                f"{_SHARED_MIN_NUMEL} elements or more)")


class Mean:
    """Asks ``elementwise`` to average its first input list over the axis first: each
    device passes its own gradients, and the kernel runs on their ``pmean``, computed in
    the round that shares the update (one round instead of two). ``value``, each device's
    loss, is averaged in the same round, into ``result``. ``reduce(value, grads)`` is that
    ``pmean`` in a round of its own, for where the round cannot be shared."""

    def __init__(self, value: torch.Tensor, reduce: Callable[[Any, Any], tuple[Any, Any]],
                 label: str, owned: frozenset[int] = frozenset()) -> None:
        self.value = value
        self.reduce = reduce
        self.label = label  # the public call, for messages
        # ids of this device's gradients that only the step refers to: the first device's
        # may hold the average (see collectives._Owned).
        self.owned = owned
        self.result: Any = None

    def now(self, grads: Any) -> Any:
        """The average of ``grads`` (and of the value, into ``result``), in its own round."""
        self.result, grads = self.reduce(self.value, grads)
        return grads


@internal
def elementwise(kernel: Callable[..., Sequence[list[torch.Tensor]]], inputs: Lists,
                like: Sequence[int], axis_name: Any, call: str,
                mean: Mean | None = None, scalars: tuple = ()) -> list[list[torch.Tensor]]:
    """``kernel(*inputs)``, split between the devices of ``axis_name`` where possible.

    Args:
        kernel: maps aligned lists of tensors (leaf ``j`` of every list belongs together)
            to a tuple of lists; it must be elementwise, so that it can run on any slice
            of the leaves' elements. With ``mean``, it is called with ``scratch=True``:
            its first list is then the round's own average, which it may overwrite (with
            its results, say) once it has read it.
        inputs: the input lists, replicated over ``axis_name``.
        like: for each output list, the input list whose leaves it is shaped like.
        axis_name: the axis the inputs are replicated over, or None (compute locally).
        call: the public call, for messages.
        mean: the first input list is each device's own, to be averaged over
            ``axis_name`` before the kernel runs (see ``Mean``).
        scalars: the other values the kernel uses (numbers, tensors; the optimizer's
            step and learning rate): the devices share the work only where these are
            equal on every device too.
    """
    local = lambda lists: [list(o) for o in kernel(*lists)]  # noqa: E731
    if axis_name is None:
        return local(inputs)
    if mean is not None:
        call = f"{mean.label} ({call})"
    comps, _ = axes_mod.resolve(axis_name, call)  # an unbound name is an error
    frame = axes_mod.current_pmap_frame()
    if mean is not None:
        done = _average_and_update(kernel, inputs, like, comps, frame, mean,
                                   f"{call}(axis_name={axis_name!r})", scalars)
        if done is not None:
            return done
        inputs = [list(mean.now(list(inputs[0]))), *inputs[1:]]
    if frame is None or frame.mesh.proc is not None:
        return local(inputs)
    shape_leaves = inputs[like[0]]
    big = [j for j, t in enumerate(shape_leaves) if t.numel() >= _SHARED_MIN_NUMEL]
    if (not big or not all(type(c) is DeviceComp for c in comps)
            or not _plain(inputs, big)):
        return local(inputs)
    is_big = set(big)
    small = [j for j in range(len(shape_leaves)) if j not in is_big]
    outs: list[list[Any]] = [[None] * len(shape_leaves) for _ in like]
    if small:
        for k, o in enumerate(local([[lst[j] for j in small] for lst in inputs])):
            for j, t in zip(small, o):
                outs[k][j] = t
    payload = [[lst[j] for j in big] for lst in inputs]
    shared = _exchange(kernel, payload, like, comps, frame, f"{call}(axis_name={axis_name!r})",
                       scalars)
    done = shared if shared is not None else local(payload)
    for k, o in enumerate(done):
        for j, t in zip(big, o):
            outs[k][j] = t
    return outs


def _plain(inputs: Lists, big: Sequence[int]) -> bool:
    """CPU tensors outside autograd and ``torch.func`` (the same answer on every device),
    and outside inference mode (whose tensors have no version counter with which to catch
    writes to a shared result)."""
    if torch.is_inference_mode_enabled():
        return False
    for lst in inputs:
        for j in big:
            t = lst[j]
            if (t.device.type != "cpu" or t.requires_grad
                    or _functorch.is_functorch_wrapped_tensor(t)):
                return False
    return True


def _exchange(kernel, payload: list[list[torch.Tensor]], like: Sequence[int], comps: tuple,
              frame: Any, call: str, scalars: tuple) -> list[list[torch.Tensor]] | None:
    mesh = frame.mesh
    coord = frame.coord
    rank, size = position(comps, coord)
    if size < _SHARED_MIN_DEVICES:
        return None
    desc = (call, _shapes(payload))
    mine = _deal([t.numel() for t in payload[like[0]]], size)

    def compute(items: list) -> list[list[Any]] | None:
        if not (_same_everywhere([lists for lists, _ in items])
                and _same_scalars([sc for _, sc in items])):
            return None  # not the same values everywhere: no sharing
        return [[None] * len(items[0][0][k]) for k in like]

    def chunked(items: list, result: Any, r: int, n: int) -> None:
        if result is None or not mine[r]:
            return
        outs = kernel(*[[lst[j] for j in mine[r]] for lst in items[r][0]])
        for k, new in enumerate(outs):
            for j, t in zip(mine[r], new):
                result[k][j] = t

    def finish(result: Any) -> None:
        if result is not None:
            for lst in result:
                for t in lst:
                    mesh.watch(t, call, _SHARED_WHAT)

    result = mesh.exchange(coord, tuple(c.axis for c in comps), None, rank, size, call, desc,
                           (payload, scalars), compute, chunked, finish)
    if result is None:
        return None
    return [[t.detach() for t in lst] for lst in result]


def _average_and_update(kernel, inputs: Lists, like: Sequence[int], comps: tuple, frame: Any,
                        mean: Mean, call: str,
                        scalars: tuple) -> list[list[torch.Tensor]] | None:
    """``kernel(pmean(inputs[0]), *inputs[1:])`` and ``pmean(mean.value)`` (into
    ``mean.result``) in one round: each device averages the gradients of the large leaves
    dealt to it and updates them at once, while they are in cache. The value and the small
    leaves are computed once, by a device dealt the fewest large elements (the last to
    arrive if it is one of them) while the others work on their large leaves (every
    device computing them would take turns on the GIL at every kernel call), and every
    device receives its own copy of them, as from ``pmean`` and the two-round step.
    The same operations as the ``pmean`` and the update in two rounds, so the same results
    bit for bit. None, having run nothing, where the devices cannot do it this way (see
    ``_plain``; the value and the gradients must be floating point)."""
    value = mean.value
    if (frame is None or frame.mesh.proc is not None
            or not all(type(c) is DeviceComp for c in comps)
            or not isinstance(value, torch.Tensor)):
        return None
    rank, size = position(comps, frame.coord)
    nleaves = len(inputs[0])
    if (size < _SHARED_MIN_DEVICES or not _plain(inputs, range(nleaves))
            or not _plain([[value]], [0])
            or not all(t.is_floating_point() for t in (value, *inputs[0]))):
        return None
    sizes = [t.numel() for t in inputs[like[0]]]
    big = [j for j in range(nleaves) if sizes[j] >= _SHARED_MIN_NUMEL]
    small = [j for j in range(nleaves) if sizes[j] < _SHARED_MIN_NUMEL]
    mine = [[big[i] for i in dealt] for dealt in _deal([sizes[j] for j in big], size)]
    # Which devices may also compute the value and the small leaves: those dealt the
    # fewest large elements (of them, the last to arrive, which need not be woken first).
    loads = [sum(sizes[j] for j in dealt) for dealt in mine]
    least = min(loads)
    mesh = frame.mesh

    def compute(items: list) -> _Round:
        # (The gradients, the first list, are each device's own; the other inputs should
        # be the same tensors everywhere.)
        def same(where: list[int]) -> bool:
            return _same_everywhere([[[lst[j] for j in where] for lst in lists[1:]]
                                     for _, lists, _, _ in items])

        if not _same_scalars([sc for _, _, _, sc in items]):
            # (The step or the learning rate differs: each device updates everything.)
            return _Round(None, False, rank)
        # (Run by the last to arrive: ``rank`` is its own.)
        return _Round([[None] * nleaves for _ in like] if big and same(big) else None,
                      bool(small) and same(small),
                      rank if loads[rank] == least else loads.index(least))

    def chunked(items: list, result: _Round, r: int, n: int) -> None:
        grads = [lists[0] for _, lists, _, _ in items]
        if r == result.extra:
            result.values = [c[0][0] for c in _copies(
                [_mean_of([[v] for v, _, _, _ in items])], n, mesh)]
            if result.small_shared:
                result.small = _copies(_averaged_kernel(kernel, grads, inputs, small), n, mesh)
        if result.shared is not None and mine[r]:
            # (Into the first device's own gradients where only the step refers to them,
            # as pmean does: no new buffer, and they may still be in cache.)
            into = [g if id(g) in items[0][2] and can_hold_result(g) else None
                    for g in (grads[0][j] for j in mine[r])]
            outs = _averaged_kernel(kernel, grads, inputs, mine[r], into)
            for k, new in enumerate(outs):
                for j, t in zip(mine[r], new):
                    result.shared[k][j] = t
        # Where the other inputs differ between devices, each updates those leaves itself.
        local = ([] if result.small_shared else small) + (
            [] if result.shared is not None else big)
        if local:
            result.local[r] = local, _averaged_kernel(kernel, grads, inputs, local)

    def finish(result: _Round) -> None:
        if result.shared is not None:
            for lst in result.shared:
                for j in big:
                    mesh.watch(lst[j], call, _SHARED_WHAT)

    desc = (call, "mean", _shapes([[value], *inputs]))
    result = mesh.exchange(frame.coord, tuple(c.axis for c in comps), None, rank, size, call,
                           desc, (value, inputs, mean.owned, scalars), compute, chunked,
                           finish)
    mean.result = result.values[rank]
    outs: list[list[Any]] = [[None] * nleaves for _ in like]
    if result.shared is not None:
        for k, lst in enumerate(result.shared):
            for j in big:
                outs[k][j] = lst[j].detach()
    parts = [result.local.get(rank)]
    if result.small is not None:
        parts.append((small, result.small[rank]))
    for part in parts:
        if part is not None:
            for k, new in enumerate(part[1]):
                for j, t in zip(part[0], new):
                    outs[k][j] = t
    return outs


class _Round:
    """What ``_average_and_update``'s round computes: the large leaves' results (one
    tensor each, for all devices; None where the devices' inputs differ), each device's
    copy of the value and of the small leaves' results (if ``small_shared``: the inputs
    are the same everywhere; computed by device ``extra``), and the leaves each device
    computed for itself."""

    def __init__(self, shared: list | None, small_shared: bool, extra: int) -> None:
        self.shared = shared
        self.small_shared = small_shared
        self.extra = extra
        self.values: list[torch.Tensor] = []
        self.small: list | None = None
        self.local: dict[int, tuple] = {}


def _copies(lists: list[list[torch.Tensor]], n: int,
            mesh: Any) -> list[list[list[torch.Tensor]]]:
    """``lists``, and ``n - 1`` copies of it (the same values in new tensors), noted on
    ``mesh`` (pmap then knows they are equal without comparing them)."""
    out = [lists]
    for _ in range(n - 1):
        copy = [list(torch._foreach_clone(lst)) for lst in lists]
        for src, c in zip(lists, copy):
            mesh.note_copies(src, c)
        out.append(copy)
    return out


def _averaged_kernel(kernel, grads: list[list[torch.Tensor]], inputs: Lists,
                     where: Sequence[int], into: list | None = None) -> list[list[torch.Tensor]]:
    """``kernel`` on leaves ``where``: the average of every device's gradients (written
    into the tensors of ``into`` that are not None), and this device's other inputs."""
    avg = _mean_of([[g[j] for j in where] for g in grads], into)
    # (The average is this round's own: the kernel may write its results into it.)
    return [list(o) for o in kernel(avg, *[[lst[j] for j in where] for lst in inputs[1:]],
                                    scratch=True)]


def _mean_of(lists: list[list[torch.Tensor]], into: list | None = None) -> list[torch.Tensor]:
    """The elementwise mean of the devices' lists, as ``pmean`` computes it: into
    contiguous tensors (as ``pmean``'s results are: the optimizer's kernels may round
    differently on other layouts), new ones or those of ``into``, the sum in device
    order, then the division."""
    out = [t if t is not None else torch.empty_like(s, memory_format=torch.contiguous_format)
           for t, s in zip(into or [None] * len(lists[0]), lists[0])]
    _sum_into_many(out, lists, 1.0 / len(lists))
    return out


def _shapes(lists: Sequence[Sequence[torch.Tensor]]) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype)) for lst in lists for t in lst)


def _deal(sizes: list[int], n: int) -> list[list[int]]:
    """Whole leaves dealt out to ``n`` participants (largest first, to the least loaded),
    so each runs the kernel on complete tensors: no slices, no copies, and the results
    are those of the unshared step bit for bit. Positions in ``sizes``, per participant."""
    load = [0] * n
    mine: list[list[int]] = [[] for _ in range(n)]
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        r = min(range(n), key=load.__getitem__)
        mine[r].append(j)
        load[r] += sizes[j]
    return mine


def _same_scalars(items: list[tuple]) -> bool:
    """Whether every participant passed equal scalars (numbers or tensors)."""
    first = items[0]
    for other in items[1:]:
        for a, b in zip(first, other):
            if a is b:
                continue
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                        and a.shape == b.shape and a.dtype == b.dtype
                        and a.device == b.device and torch.equal(a, b)):
                    return False
            elif type(a) is not type(b) or a != b:
                return False
    return True


def _same_everywhere(items: list) -> bool:
    """Whether every participant passed the very same tensors (lists of lists)."""
    first = items[0]
    for other in items[1:]:
        for la, lb in zip(first, other):
            for a, b in zip(la, lb):
                if a is not b and (a.data_ptr() != b.data_ptr()
                                   or a.stride() != b.stride()
                                   or a.is_conj() != b.is_conj()
                                   or a.is_neg() != b.is_neg()):
                    return False
    return True
