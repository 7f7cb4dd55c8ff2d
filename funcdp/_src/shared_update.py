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

# Leaves with at least this many elements are shared; smaller ones (biases, step
# counters) are computed by every device, which is cheaper than a rendezvous.
_SHARED_MIN_NUMEL = 1 << 14

# Sharing takes two rendezvous; measured on 2 cores it pays from two devices on (the
# MLP step's update 1.0 -> 0.85 ms with 2 devices, -0.5 ms with 4, -4 ms (9 %) with 8).
# Even one large leaf is worth it: the device computing it runs no slower than every
# device computing it at once, and one copy of the result is made instead of n.
_SHARED_MIN_DEVICES = 2

Lists = Sequence[list[torch.Tensor]]


@internal
def elementwise(kernel: Callable[..., Sequence[list[torch.Tensor]]], inputs: Lists,
                like: Sequence[int], axis_name: Any, call: str) -> list[list[torch.Tensor]]:
    """``kernel(*inputs)``, split between the devices of ``axis_name`` where possible.

    Args:
        kernel: maps aligned lists of tensors (leaf ``j`` of every list belongs together)
            to a tuple of lists; it must be elementwise, so that it can run on any slice
            of the leaves' elements.
        inputs: the input lists, replicated over ``axis_name``.
        like: for each output list, the input list whose leaves it is shaped like.
        axis_name: the axis the inputs are replicated over, or None (compute locally).
        call: the public call, for messages.
    """
    local = lambda lists: [list(o) for o in kernel(*lists)]  # noqa: E731
    if axis_name is None:
        return local(inputs)
    comps, _ = axes_mod.resolve(axis_name, call)  # an unbound name is an error
    frame = axes_mod.current_pmap_frame()
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
    shared = _exchange(kernel, payload, like, comps, frame, f"{call}(axis_name={axis_name!r})")
    done = shared if shared is not None else local(payload)
    for k, o in enumerate(done):
        for j, t in zip(big, o):
            outs[k][j] = t
    return outs


def _plain(inputs: Lists, big: list[int]) -> bool:
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
              frame: Any, call: str) -> list[list[torch.Tensor]] | None:
    mesh = frame.mesh
    coord = frame.coord
    mesh_axes = tuple(c.axis for c in comps)
    rank, size = 0, 1
    for c in comps:
        rank = rank * c.size + coord[c.axis]
        size *= c.size
    if size < _SHARED_MIN_DEVICES:
        return None
    desc = (call, tuple((tuple(t.shape), str(t.dtype)) for lst in payload for t in lst))

    # Whole leaves are dealt out to the participants (largest first, to the least loaded),
    # so each runs the kernel on complete tensors: no slices, no copies, and the results
    # are those of the unshared step bit for bit.
    order = sorted(range(len(payload[like[0]])), key=lambda j: -payload[like[0]][j].numel())
    load = [0] * size
    mine: list[list[int]] = [[] for _ in range(size)]
    for j in order:
        r = min(range(size), key=load.__getitem__)
        mine[r].append(j)
        load[r] += payload[like[0]][j].numel()

    def compute(items: list) -> list[list[Any]] | None:
        first = items[0]
        for other in items[1:]:
            for la, lb in zip(first, other):
                for a, b in zip(la, lb):
                    if a is not b and (a.data_ptr() != b.data_ptr()
                                       or a.stride() != b.stride()
                                       or a.is_conj() != b.is_conj()
                                       or a.is_neg() != b.is_neg()):
                        return None  # not the same values everywhere: no sharing
        return [[None] * len(first[k]) for k in like]

    def chunked(items: list, result: Any, r: int, n: int) -> None:
        if result is None or not mine[r]:
            return
        outs = kernel(*[[lst[j] for j in mine[r]] for lst in items[r]])
        for k, new in enumerate(outs):
            for j, t in zip(mine[r], new):
                result[k][j] = t

    def finish(result: Any) -> None:
        if result is not None:
            for lst in result:
                for t in lst:
                    mesh.watch(t, call)

    result = mesh.exchange(coord, mesh_axes, None, rank, size, call, desc, payload,
                           compute, chunked, finish)
    if result is None:
        return None
    return [[t.detach() for t in lst] for lst in result]
