"""Collectives over named axes: psum, all_gather, ppermute and the rest.

Every collective resolves its axis names to components (device-mesh axes and vmap
levels, see ``funcdp._src.axes``) and runs as one ``_CollectiveFn``, a
``torch.autograd.Function`` over all leaves of the pytree at once:

- ``forward`` runs at the bottom of the functorch stack: it meets the other devices in
  one rendezvous for all device components (one round for the whole pytree);
- ``vmap`` handles the vmap level it is called for: a component of the collective is
  reduced/stacked along the batch dimension (leaves that do not vary along it by the
  rule for unbatched values; where no leaf varies, ``_apply`` broadcasts one first, so
  that the rule runs); any other level just moves its batch dimension out of the way
  (``lead``);
- ``backward`` is the transposed collective, itself a ``_CollectiveFn``, so gradients of
  any order and gradients under vmap work.

The primitive ops are ``psum``/``pmax``/``pmin`` (optionally within groups), ``gather``
(one new dimension per component), ``scatter`` (psum, then each participant keeps its own
index of one dimension per component), ``ppermute``, ``all_to_all``, ``bcast`` and
``reduce_to``. The public functions are thin wrappers; ops that cannot be split by
component (``ppermute`` over a pmap axis *and* a vmap axis, say) are built from
``gather`` and indexing, which are differentiable as they stand.
"""

from __future__ import annotations

import collections
import functools
import numbers
import operator
import sys
import threading
from typing import Any, NamedTuple

import numpy as np
import torch
from torch._C import _functorch

from funcdp._src import axes as axes_mod
from funcdp._src import tree as tree_util
from funcdp._src.api_util import internal, public
from funcdp._src.axes import DeviceComp, VmapComp
from funcdp._src.executor import caller_forward_level
from funcdp._src.rendezvous import Mesh
from funcdp._src.transform_util import a_type

# Reductions at least this large (elements, all leaves together) are computed by all
# participants in parallel, each its own chunk; smaller ones by the last to arrive.
_PARALLEL_MIN_NUMEL = 1 << 17


class Spec(NamedTuple):
    op: str
    comps: tuple
    done: frozenset  # positions in ``comps`` already handled by higher levels
    params: tuple
    lead: tuple  # per leaf: leading dimensions that are not part of the logical value
    groups: tuple | None
    label: str


# ----------------------------------------------------------------------------------
# The autograd.Function
# ----------------------------------------------------------------------------------
class _CollectiveFn(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(spec: Spec, *leaves: torch.Tensor):  # type: ignore[override]
        return tuple(_bottom(spec, list(leaves)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec = inputs[0]
        ctx.spec = spec
        if spec.op in ("pmax", "pmin"):
            ctx.save_for_backward(*inputs[1:], *output)
            ctx.save_for_forward(*inputs[1:], *output)

    @staticmethod
    def backward(ctx, *cts):
        spec: Spec = ctx.spec
        return (None, *_transpose(spec, list(cts), ctx))

    @staticmethod
    def jvp(ctx, _spec_tangent, *tangents):
        # Every primitive is linear in its input, except pmax/pmin, whose tangent is the
        # tangent of the winning participants (averaged over ties).
        spec: Spec = ctx.spec
        saved = ctx.saved_tensors if spec.op in ("pmax", "pmin") else ()
        n = len(tangents)
        ts = [t if t is not None else torch.zeros_like(x)
              for t, x in zip(tangents, saved[:n] or [None] * n)] if saved else list(tangents)
        if spec.op in ("pmax", "pmin"):
            xs, outs = saved[:n], saved[n:]
            masks = [(x == o).to(t.dtype) for x, o, t in zip(xs, outs, ts)]
            ps = spec._replace(op="psum")
            num = _apply(ps, [t * m for t, m in zip(ts, masks)])
            cnt = _apply(ps, masks)
            return tuple(a / c for a, c in zip(num, cnt))
        keep = [k for k, t in enumerate(ts) if t is not None]
        if len(keep) == n:
            return tuple(_apply(spec, ts))
        # Leaves without a tangent (integers, beside floating-point leaves that have one):
        # the collective of the others' tangents alone.
        out: list[torch.Tensor | None] = [None] * n
        if keep:
            sub = spec._replace(lead=tuple(spec.lead[k] for k in keep))
            for k, t in zip(keep, _apply(sub, [ts[k] for k in keep])):
                out[k] = t
        return tuple(out)

    @staticmethod
    def vmap(info, in_dims, spec: Spec, *leaves):
        return _vmap_rule(info, in_dims[1:], spec, list(leaves))


def _apply(spec: Spec, leaves: list[torch.Tensor],
           owned: frozenset[int] = frozenset()) -> list[torch.Tensor]:
    """Runs a primitive, through the autograd.Function only when it has to.

    ``owned``: positions of leaves that no one else refers to, which a reduction may
    overwrite with its result (see ``_Owned``); only outside autograd and transforms.
    """
    if _functorch.maybe_current_level() is None and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    ) and not _has_tangent(leaves):
        return _bottom(spec, leaves, owned)
    return list(_CollectiveFn.apply(spec, *_varying_along_vmap_comps(spec, leaves)))


def _varying_along_vmap_comps(spec: Spec, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """``leaves``, with one of them broadcast along each vmap component over which none
    varies, so that the component's vmap rule runs (functorch skips a level at which no
    input is batched, and the collective would then run below it, where its result, which
    may vary along the component, cannot be batched at that level, nor its derivative
    told from that of a collective over varying values). The broadcast copies the smallest
    leaf once per member; its derivative sums over the component, as an unmapped value's
    must.
    """
    for pos, c in enumerate(spec.comps):
        if type(c) is VmapComp and pos not in spec.done and not any(
                _batched_at(t, c.level) for t in leaves):
            j = min(range(len(leaves)), key=lambda i: leaves[i].numel())
            index = axes_mod.comp_index(c, None, leaves[j].device)
            assert isinstance(index, torch.Tensor)  # (a vmap component's: batched)
            leaves = [*leaves[:j], _broadcast_along(leaves[j], index), *leaves[j + 1:]]
    return leaves


# Dtypes with an addition kernel; others (float8, uint16...) are broadcast as integers of
# their width.
_ADDABLE = frozenset([torch.float16, torch.bfloat16, torch.float32, torch.float64,
                      torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                      torch.int64])
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _broadcast_along(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` batched like ``index`` (a vmap level's batched ``arange``), bit for bit: an
    addition of a batched zero (functorch has no batched view of an unbatched tensor),
    of ``-0.0`` for floating-point values (``-0.0 + 0.0`` would be ``+0.0``; complex
    values as pairs of reals, as complex addition loses the sign of a zero too)."""
    if x.is_complex():
        return torch.view_as_complex(_broadcast_along(torch.view_as_real(x), index))
    if x.dtype not in _ADDABLE:
        ints = x.view(_INT_OF_WIDTH[x.element_size()])
        return _broadcast_along(ints, index).view(x.dtype)
    zero = (index * 0).to(x.dtype)
    return x + (zero.neg() if x.is_floating_point() else zero)


def _times(x: torch.Tensor, k: int) -> torch.Tensor:
    """The sum of ``k`` members that all hold ``x``, with the bits of the in-order sum
    (``_sum_in_order``) of ``k`` copies; ``x * k`` beyond ``_IN_ORDER_MAX`` members."""
    if k > _IN_ORDER_MAX or k < 2 or not (x.is_floating_point() or x.is_complex()):
        return x * k
    return _sum_in_order(x.unsqueeze(0).expand(k, *x.shape))


def _batched_at(t: torch.Tensor, level: int) -> bool:
    """Whether ``t`` varies along the vmap at ``level`` (is batched there)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            at = _functorch.maybe_get_level(t)
            if at <= level:
                return at == level
        t = _functorch.get_unwrapped(t)
    return False


# ``(primal, tangent)`` of a tensor at a forward-AD level: what
# ``torch.autograd.forward_ad.unpack_dual`` returns, without its Python (a third of the
# time; called once per leaf while pmap's shared level is open).
_unpack_dual = torch._C._VariableFunctions._unpack_dual


def _has_tangent(leaves: list[torch.Tensor]) -> bool:
    """Whether a leaf carries a forward-mode tangent (``forward_ad.make_dual`` under a
    ``dual_level`` the caller opened); the collective must then run as an
    ``autograd.Function``, whose ``jvp`` carries the tangents."""
    level = caller_forward_level()
    return level >= 0 and any(_unpack_dual(t, level)[1] is not None for t in leaves)


# ----------------------------------------------------------------------------------
# Rules for one vmap component: x is [k, lead..., logical...] (batched) or None-batched
# ----------------------------------------------------------------------------------
def _zeros_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    shape = (mask.shape[0],) + (1,) * (x.ndim - 1)
    return torch.where(mask.view(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _group_tables(groups: tuple, k: int):
    member_of = [0] * k
    for g, members in enumerate(groups):
        for m in members:
            member_of[m] = g
    return member_of


# Up to this many members, a sum over a vmap axis adds them one by one, as a reduction
# over as many devices does; beyond, one kernel (whose order of additions is its own).
_IN_ORDER_MAX = 16


def _sum_in_order(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(0)`` in ``t``'s dtype, adding member 0, 1, 2... in turn (for up to
    ``_IN_ORDER_MAX`` members): the bits a psum over that many devices gives. (torch's
    sum adds in another order for eight members or more, and accumulates half-precision
    values in float32.)"""
    if t.shape[0] > _IN_ORDER_MAX or t.shape[0] < 2:
        return t.sum(0, dtype=t.dtype)
    out = t[0] + t[1]
    for i in range(2, t.shape[0]):
        out = out + t[i]
    return out


def _comp_rule(spec: Spec, pos: int, x: torch.Tensor, batched: bool, lead: int):
    """Applies ``spec.op`` over component ``pos`` (a vmap comp) to one leaf.

    ``x`` is ``[k, lead, logical]`` when ``batched`` else ``[lead, logical]``.
    Returns ``(tensor, batched_out)``; a batched output has the batch dim first.
    """
    op = spec.op
    k = spec.comps[pos].size
    dev = x.device
    if op in ("psum", "pmax", "pmin"):
        red = {"psum": _sum_in_order, "pmax": lambda t: t.amax(0),
               "pmin": lambda t: t.amin(0)}[op]
        if spec.groups is not None:
            member_of = _group_tables(spec.groups, k)
            if batched:
                per_group = [red(x.index_select(0, torch.tensor(g, device=dev)))
                             for g in spec.groups]
            else:
                per_group = [_times(x, len(g)) if op == "psum" else x for g in spec.groups]
            return torch.stack([per_group[member_of[j]] for j in range(k)]), True
        out = red(x) if batched else (_times(x, k) if op == "psum" else x)
        scale = _scale_of(spec)
        if scale is not None and len(spec.done) + 1 == len(spec.comps):
            out = _scaled(out, scale)  # the last component of a pmean
        return out, False
    if op == "gather":
        axis, present = spec.params
        q = lead + axis + sum(1 for p in present if p < pos)
        if batched:
            return x.movedim(0, q), False
        return x.unsqueeze(q).expand(*x.shape[:q], k, *x.shape[q:]).contiguous(), False
    if op == "scatter":
        dim, present = spec.params
        q = lead + dim + sum(1 for p in present if p < pos)
        total = _sum_in_order(x) if batched else _times(x, k)
        return total.movedim(q, 0), True
    if op == "ppermute":
        (pairs,) = spec.params
        src = [-1] * k
        for s, d in pairs:
            src[d] = s
        idx = torch.tensor([max(s, 0) for s in src], device=dev)
        mask = torch.tensor([s >= 0 for s in src], device=dev)
        xs = x if batched else x.unsqueeze(0).expand(k, *x.shape)
        return _zeros_where(mask, xs.index_select(0, idx)), True
    if op == "all_to_all":
        split, concat = spec.params
        xs = x if batched else x.unsqueeze(0).expand(k, *x.shape)
        y = xs.movedim(1 + lead + split, 0)  # [j, i, lead, logical without split]
        return y.movedim(1, 1 + lead + concat), True
    if op == "bcast":
        (source,) = spec.params
        return (x[source] if batched else x), False
    if op == "reduce_to":
        (source,) = spec.params
        total = _sum_in_order(x) if batched else _times(x, k)
        mask = torch.arange(k, device=dev) == source
        return _zeros_where(mask, total.unsqueeze(0).expand(k, *total.shape)), True
    raise AssertionError(op)


def _after_comp(spec: Spec, pos: int, lead: list[int]) -> Spec:
    params = spec.params
    if spec.op == "gather":
        params = (params[0], params[1] | {pos})
    elif spec.op == "scatter":
        params = (params[0], params[1] - {pos})
    return spec._replace(done=spec.done | {pos}, params=params, lead=tuple(lead))


def _vmap_rule(info, in_dims, spec: Spec, leaves: list):
    level = axes_mod.current_level() + 1
    pos = None
    for i, c in enumerate(spec.comps):
        if type(c) is VmapComp and c.level == level and i not in spec.done:
            pos = i
    lead = list(spec.lead)
    if pos is None:
        # A level the collective is not over: keep its batch dimension in front.
        out_dims: list[int | None]
        moved, out_dims = [], []
        for i, (x, d) in enumerate(zip(leaves, in_dims)):
            if d is None:
                moved.append(x)
                out_dims.append(None)
            else:
                moved.append(x.movedim(d, 0))
                lead[i] += 1
                out_dims.append(0)
        return tuple(_apply(spec._replace(lead=tuple(lead)), moved)), tuple(out_dims)
    new, out_dims = [], []
    for i, (x, d) in enumerate(zip(leaves, in_dims)):
        xs = x if d is None else x.movedim(d, 0)
        y, b = _comp_rule(spec, pos, xs, d is not None, spec.lead[i])
        new.append(y)
        out_dims.append(0 if b else None)
        if b:
            lead[i] += 1
    rest = _after_comp(spec, pos, lead)
    if len(rest.done) < len(spec.comps):
        new = _apply(rest, new)
    return tuple(new), tuple(out_dims)


# ----------------------------------------------------------------------------------
# The bottom level: leftover (unbatched) vmap comps, then the devices
# ----------------------------------------------------------------------------------
def _bottom(spec: Spec, leaves: list[torch.Tensor],
            owned: frozenset[int] = frozenset()) -> list[torch.Tensor]:
    # (Every vmap component was handled by its level's rule: ``_apply`` makes some leaf
    # vary along each.)
    dev_pos = [p for p, c in enumerate(spec.comps) if p not in spec.done]
    assert all(type(spec.comps[p]) is DeviceComp for p in dev_pos), spec
    if not dev_pos:
        return [x.detach() if x.requires_grad else x for x in leaves]
    return _device_collective(spec, dev_pos, leaves, owned)


def position(comps: Any, coord: tuple) -> tuple[int, int]:
    """``(rank, size)`` of the device at ``coord`` among the devices of the axis
    components ``comps`` (row-major)."""
    rank, size = 0, 1
    for c in comps:
        rank = rank * c.size + coord[c.axis]
        size *= c.size
    return rank, size


def _device_collective(spec: Spec, dev_pos: list[int], leaves: list[torch.Tensor],
                       owned: frozenset[int] = frozenset()):
    frame = axes_mod.current_pmap_frame()
    assert frame is not None, "device collective outside pmap"
    mesh: Mesh = frame.mesh
    coord = frame.coord
    comps = [spec.comps[p] for p in dev_pos]
    mesh_axes = tuple(c.axis for c in comps)
    if mesh.proc is not None and 0 in mesh_axes:
        from funcdp._src.process_collectives import process_collective

        return process_collective(spec, dev_pos, leaves, frame, mesh.proc)
    sizes = [c.size for c in comps]
    rank, size = position(comps, coord)
    group = None
    if spec.groups is not None:
        for gid, members in enumerate(spec.groups):
            if rank in members:
                coords = [_coord_of(coord, mesh_axes, sizes, m) for m in members]
                group = (gid, coords)
                rank = members.index(rank)
                size = len(members)
                break
    desc = (spec.label, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))
    op = spec.op
    if size == 1:
        if op in ("psum", "pmax", "pmin"):
            # One participant: the reduction is the value itself (no copy of a gradient).
            scale = _scale_of(spec)
            return [x.detach() if scale is None or scale == 1.0 else _scaled(x, scale)
                    for x in leaves]
        result = _compute(spec, dev_pos, [leaves], 1)
        return _take(spec, dev_pos, result, 0, coord, comps)
    chunked = None
    numel = sum(x.numel() for x in leaves)
    # Decided from shapes and dtypes only, which every participant shares (checked): all
    # must take the same path. Non-contiguous inputs are copied chunk by chunk.
    if (op in ("psum", "pmax", "pmin") and numel >= _PARALLEL_MIN_NUMEL
            and leaves[0].device.type == "cpu"):
        if owned:
            leaves = _Owned(leaves, owned)

        def compute(items):
            return _reduction_outputs(items[0], _reusable(items))
        chunked = _chunked_reduce(op, _scale_of(spec))
    else:
        def compute(items):
            return _watched(mesh, spec, _compute(spec, dev_pos, items, size))
    result = mesh.exchange(coord, mesh_axes, group, rank, size, spec.label, desc, leaves,
                           compute, chunked, lambda res: _watched(mesh, spec, res))
    out = _take(spec, dev_pos, result, rank, coord, comps, mesh)
    dev = leaves[0].device if leaves else None
    if dev is not None and dev.type == "cuda":
        out = [t if t.device == dev else t.to(dev) for t in out]
    return out


def _coord_of(coord: tuple, mesh_axes: tuple, sizes: list[int], index: int) -> tuple:
    c = list(coord)
    for a, s in zip(reversed(mesh_axes), reversed(sizes)):
        c[a] = index % s
        index //= s
    return tuple(c)


HAS_STORAGE_USES = hasattr(torch._C, "_storage_Use_Count")


def storage_uses(t: torch.Tensor) -> int:
    """How many holders ``t``'s storage has: its tensors (and other holders in C++), the
    storage object this call takes, and every reference to that object held elsewhere
    (needs ``HAS_STORAGE_USES``).

    torch keeps one Python object per storage while anything refers to it: a storage
    object the caller holds (``t.untyped_storage()``, ``t.storage()``) is the one this
    call receives, and counts once in torch's count however many hold it; the
    references to it count the rest."""
    storage = t.untyped_storage()
    return (torch._C._storage_Use_Count(storage._cdata)
            + sys.getrefcount(storage) - _fresh_storage_refs())


@functools.cache
def _fresh_storage_refs() -> int:
    """The references ``storage_uses`` sees to a storage object that nothing else holds."""
    storage = torch.empty(1).untyped_storage()
    return sys.getrefcount(storage)


@functools.cache
def _free_uses() -> int:
    """``storage_uses`` of a tensor that nothing but a list refers to, as the pool holds
    its buffers (it depends on the torch version: 3 on torch 2.13, where the pool's
    former constant 2 made it never reuse a buffer)."""
    held = [torch.empty(1)]
    return storage_uses(held[0])


class _BufferPool:
    """Reuses the CPU output buffers of reductions once nothing refers to them any more.

    A fresh multi-megabyte buffer per collective costs page faults on every call (the
    allocator returns large blocks to the OS and maps them again), which on a gradient
    all-reduce can cost more than the reduction itself. A pooled buffer is handed out
    again only when its storage has no other user (no live result, view or autograd
    reference), so reuse is never visible. The pool keeps the buffers of the sizes used
    most recently (``_KEYS`` sizes, ``_PER_KEY`` buffers each): sizes that come and go
    (a reduction over sequences of varying length, say) do not pile up.
    """

    _PER_KEY = 4
    _KEYS = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: collections.OrderedDict[tuple, list[torch.Tensor]] = (
            collections.OrderedDict())
        self._enabled = HAS_STORAGE_USES

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not self._enabled or numel < _POOL_MIN_NUMEL:
            return torch.empty(numel, dtype=dtype)
        key = (numel, dtype)
        with self._lock:
            bufs = self._free.get(key)
            if bufs is None:
                bufs = self._free[key] = []
                if len(self._free) > self._KEYS:
                    # (Buffers still in use stay alive with their users.)
                    self._free.popitem(last=False)
            else:
                self._free.move_to_end(key)
            for buf in bufs:
                # The pool's tensor and the temporary storage object: nobody else.
                if storage_uses(buf) <= _free_uses():
                    # A new view, made under the lock, marks the buffer as taken at once.
                    return buf.view(numel)
            buf = torch.empty(numel, dtype=dtype)
            if len(bufs) < self._PER_KEY:
                bufs.append(buf)
                return buf.view(numel)
            return buf


_pool = _BufferPool()
_POOL_MIN_NUMEL = 1 << 14


def _reduction_outputs(leaves: list[torch.Tensor],
                       reuse: frozenset[int] = frozenset()) -> list[torch.Tensor]:
    """Contiguous outputs shaped like ``leaves``: the leaves at positions ``reuse``
    themselves, the others views of one flat buffer per dtype."""
    if leaves[0].device.type != "cpu":
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in leaves]
    by_dtype: dict[torch.dtype, int] = {}
    for i, x in enumerate(leaves):
        if i not in reuse:
            by_dtype[x.dtype] = by_dtype.get(x.dtype, 0) + x.numel()
    flat = {dt: _pool.get(n, dt) for dt, n in by_dtype.items()}
    offset = dict.fromkeys(by_dtype, 0)
    outs = []
    for i, x in enumerate(leaves):
        if i in reuse:
            outs.append(x)
            continue
        o = offset[x.dtype]
        outs.append(flat[x.dtype][o:o + x.numel()].view(x.shape))
        offset[x.dtype] = o + x.numel()
    return outs


class _Owned(list):
    """A participant's leaves of a reduction, with the positions of those it owns: no one
    else refers to them (``value_and_grad``'s fresh gradients), so the reduction may write
    its result into them.

    The first participant's owned leaves become the result: each participant sums its
    chunk straight into them. That saves a fresh output buffer, and above all the writes
    to it: the gradients were just written by the backward pass and are still in cache,
    where a pooled buffer is not (0.65 ms of the 2-device MLP step on 2 cores).
    """

    owned: frozenset[int]

    def __init__(self, leaves: list[torch.Tensor], owned: frozenset[int]) -> None:
        super().__init__(leaves)
        self.owned = owned


def _reusable(items: list[list[torch.Tensor]]) -> frozenset[int]:
    """Positions of the first participant's owned leaves that can hold the result: plain,
    dense, writable CPU tensors that are not another participant's input."""
    first = items[0]
    if not isinstance(first, _Owned):
        return frozenset()
    others = {id(t) for it in items[1:] for t in it}
    return frozenset(i for i in first.owned
                     if can_hold_result(first[i]) and id(first[i]) not in others)


def can_hold_result(t: torch.Tensor) -> bool:
    """Whether an owned leaf can hold a reduction's result: a plain, dense, writable CPU
    tensor (results are contiguous; the optimizers' kernels may round differently on
    other layouts)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()
            and not (t.requires_grad or t.is_inference() or t.is_conj() or t.is_neg()
                     or _functorch.is_functorch_wrapped_tensor(t)))


def _scale_of(spec: Spec) -> float | None:
    """``1 / n`` for the sum of a ``pmean`` over ``n`` (divided inside the collective)."""
    return spec.params[0] if spec.op == "psum" and spec.params else None


def _divisor(scale: float) -> tuple[int, bool]:
    """``n`` for ``scale == 1 / n``, and whether multiplying by ``scale`` divides by ``n``
    exactly (``n`` a power of two): ``t / n`` is then computed as the faster ``t * scale``
    (``pmean`` is ``psum / n`` to the bit)."""
    n = round(1.0 / scale)
    return n, n & (n - 1) == 0


def _scaled(t: torch.Tensor, scale: float, inplace: bool = False) -> torch.Tensor:
    """``t / n`` for ``scale == 1 / n``, exactly (see ``_divisor``)."""
    n, by_mul = _divisor(scale)
    if by_mul:
        return t.mul_(scale) if inplace else t * scale
    return t.div_(n) if inplace else t / n


def _chunked_reduce(op: str, scale: float | None):
    def run(items, outs, rank, size):
        total = sum(o.numel() for o in outs)
        lo = total * rank // size
        hi = total * (rank + 1) // size
        start = 0
        small: list[int] = []
        for li, o in enumerate(outs):
            n = o.numel()
            a, b = max(lo, start), min(hi, start + n)
            if a == start and b == start + n:
                # A whole leaf: one kernel on the tensors as they are (each slicing op
                # costs as much as a small reduction, and more while devices share the GIL).
                if op == "psum" and n <= _BATCH_MAX_NUMEL:
                    small.append(li)
                else:
                    _fold_into(op, o, [it[li] for it in items], scale)
            elif a < b:
                dst = o.view(-1)[a - start:b - start]
                srcs = [it[li].reshape(-1)[a - start:b - start] for it in items]
                _fold_into(op, dst, srcs, scale)
            start += n
        if small:
            _sum_into_many([outs[li] for li in small], [[it[li] for li in small] for it in items],
                           scale)

    return run


# Whole leaves up to this size are summed together, one multi-tensor kernel per step for
# all of them: for small leaves (a model's biases, or every tensor of a model of many
# small layers) the cost of a kernel call is more than its work.
_BATCH_MAX_NUMEL = 1 << 14


def _sum_into_many(dsts: list[torch.Tensor], srcs: list[list[torch.Tensor]],
                   scale: float | None) -> None:
    """``_fold_into("psum", dsts[j], [s[j] for s in srcs], scale)`` for every ``j``: the
    same additions in the same order, and the same scaling, so the same bits."""
    copies = [(d, s) for d, s in zip(dsts, srcs[0]) if d is not s]
    if copies:
        torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])
    for other in srcs[1:]:
        torch._foreach_add_(dsts, other)
    if scale is not None:
        n, by_mul = _divisor(scale)
        if by_mul:
            torch._foreach_mul_(dsts, scale)
        else:
            torch._foreach_div_(dsts, n)


def _fold_into(op: str, dst: torch.Tensor, srcs: list[torch.Tensor],
               scale: float | None = None) -> None:
    """``dst = reduce(srcs)`` in one fixed order, so every participant's result agrees."""
    if srcs[0].device.type != "cpu":  # several GPUs: bring the values to dst's device
        srcs = [x if x.device == dst.device else x.to(dst.device) for x in srcs]
    if len(srcs) == 1:
        dst.copy_(srcs[0])
    elif op == "psum":
        torch.add(srcs[0], srcs[1], out=dst)
        for s in srcs[2:]:
            dst.add_(s)
    elif op == "pmax":
        torch.maximum(srcs[0], srcs[1], out=dst)
        for s in srcs[2:]:
            torch.maximum(dst, s, out=dst)
    else:
        torch.minimum(srcs[0], srcs[1], out=dst)
        for s in srcs[2:]:
            torch.minimum(dst, s, out=dst)
    if scale is not None:
        _scaled(dst, scale, inplace=True)


def _compute(spec: Spec, dev_pos: list[int], items: list[list[torch.Tensor]], size: int):
    """The result of a device round, computed once (per leaf, or per rank for permutes)."""
    op = spec.op
    nleaves = len(items[0])
    if op in ("psum", "pmax", "pmin", "scatter", "reduce_to"):
        red = "psum" if op in ("scatter", "reduce_to") else op
        outs = _reduction_outputs(items[0])
        scale = _scale_of(spec)
        for li in range(nleaves):
            _fold_into(red, outs[li], [it[li] for it in items], scale)
        return outs
    if items[0][0].device.type != "cpu":  # several GPUs: compute on the first one's
        dev = items[0][0].device
        items = [[x if x.device == dev else x.to(dev) for x in it] for it in items]
    if op == "gather":
        axis, present = spec.params
        out = []
        for li in range(nleaves):
            lead = spec.lead[li]
            q = lead + axis + sum(1 for p in present if p < dev_pos[0])
            stacked = torch.stack([it[li] for it in items], q)
            if len(dev_pos) > 1:
                sizes = [spec.comps[p].size for p in dev_pos]
                stacked = stacked.unflatten(q, sizes)
                stacked = stacked.movedim(list(range(q, q + len(dev_pos))),
                                          [lead + axis + p for p in dev_pos])
            out.append(stacked)
        return out
    if op == "ppermute":
        (pairs,) = spec.params
        per_rank: list[Any] = [None] * size
        for s, d in pairs:
            per_rank[d] = [t.clone() for t in items[s]]
        for r in range(size):
            if per_rank[r] is None:
                per_rank[r] = [torch.zeros_like(t) for t in items[r]]
        return per_rank
    if op == "all_to_all":
        split, concat = spec.params
        per_rank = []
        for r in range(size):
            outs = []
            for li in range(nleaves):
                lead = spec.lead[li]
                outs.append(torch.stack([it[li].select(lead + split, r) for it in items],
                                        lead + concat))
            per_rank.append(outs)
        return per_rank
    if op == "bcast":
        (source,) = spec.params
        return [t.clone() for t in items[source]]
    raise AssertionError(op)


# Collective results every participant receives whole (the same value for all).
_SHARED_OPS = ("psum", "pmax", "pmin", "gather", "bcast")
# Up to this size each device gets its own copy of such a result; larger results are one
# buffer that all devices read (on CPU and on logical devices of one GPU), and writing to
# it in place is an error, detected when the call ends.
_COPY_MAX_NUMEL = 1 << 12


def _watched(mesh: Mesh, spec: Spec, result: Any) -> Any:
    if spec.op in _SHARED_OPS:
        for t in result:
            if t.numel() > _COPY_MAX_NUMEL and not t.is_inference():
                mesh.watch(t, spec.label)
    return result


def _take(spec: Spec, dev_pos: list[int], result, rank: int, coord: tuple, comps: list,
          mesh: Mesh | None = None):
    """This participant's part of a round's result (distinct tensor objects per device;
    the copies noted on ``mesh``, if given)."""
    op = spec.op
    if op in _SHARED_OPS:
        # Inference tensors carry no version counter, so writes to a shared one could not
        # be detected: under inference mode every device gets its own copy.
        copied = [t.numel() <= _COPY_MAX_NUMEL or t.is_inference() for t in result]
        if not any(copied):
            return [t.detach() for t in result]
        # (One call for all the copies: a model may have hundreds of small leaves.)
        sources = [t for t, c in zip(result, copied) if c]
        made = torch._foreach_clone(sources)
        if mesh is not None:
            mesh.note_copies(sources, made)
        copies = iter(made)
        return [next(copies) if c else t.detach() for t, c in zip(result, copied)]
    if op in ("ppermute", "all_to_all"):
        return [t.detach() for t in result[rank]]
    if op == "scatter":
        dim, present = spec.params
        out = []
        for li, t in enumerate(result):
            lead = spec.lead[li]
            present_now = set(present)
            for p, c in zip(dev_pos, comps):
                q = lead + dim + sum(1 for pp in present_now if pp < p)
                t = t.select(q, coord[c.axis])
                present_now.discard(p)
            out.append(t)
        return out
    if op == "reduce_to":
        (source,) = spec.params
        if rank == source:
            return [t.detach() for t in result]
        return [torch.zeros_like(t) for t in result]
    return [t.detach() for t in result]


# ----------------------------------------------------------------------------------
# Transposes
# ----------------------------------------------------------------------------------
@internal  # (runs in the backward pass, where the device's random routing is in effect)
def _transpose(spec: Spec, cts: list, ctx) -> list:
    op = spec.op
    if op == "psum":
        return _apply(spec, cts)
    if op in ("pmax", "pmin"):
        saved = ctx.saved_tensors
        n = len(saved) // 2
        xs, outs = saved[:n], saved[n:]
        masks = [(x == o).to(c.dtype) for x, o, c in zip(xs, outs, cts)]
        ps = spec._replace(op="psum")
        tot = _apply(ps, cts)
        cnt = _apply(ps, masks)
        return [t * m / c for t, m, c in zip(tot, masks, cnt)]
    if op == "gather":
        axis, present = spec.params
        todo = frozenset(range(len(spec.comps))) - spec.done
        return _apply(spec._replace(op="scatter", params=(axis, present | todo)), cts)
    if op == "scatter":
        dim, present = spec.params
        todo = frozenset(range(len(spec.comps))) - spec.done
        return _apply(spec._replace(op="gather", params=(dim, present - todo)), cts)
    if op == "ppermute":
        (pairs,) = spec.params
        inv = tuple((d, s) for s, d in pairs)
        return _apply(spec._replace(params=(inv,)), cts)
    if op == "all_to_all":
        split, concat = spec.params
        return _apply(spec._replace(params=(concat, split)), cts)
    if op == "bcast":
        return _apply(spec._replace(op="reduce_to"), cts)
    if op == "reduce_to":
        return _apply(spec._replace(op="bcast"), cts)
    raise AssertionError(op)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def _label(call: str, axis_name: Any, extra: str = "") -> str:
    return f"{call}(axis_name={axis_name!r}{extra})"


def _flatten_values(x: Any, call: str):
    leaves, treedef = tree_util.tree_flatten(x)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) or leaf is None:
            continue
        if isinstance(leaf, np.ndarray):
            leaves[i] = torch.as_tensor(leaf)
        elif isinstance(leaf, (numbers.Number, np.generic)):
            continue
        else:
            path = tree_util.keystr(tree_util.leaf_paths(treedef)[i])
            raise TypeError(
                f"{call}: leaf x{path} is {a_type(leaf)}; collectives take pytrees "
                f"of tensors, numbers and None."
            )
    return leaves, treedef


def _int(v: Any) -> int:
    """``v`` as an index: an int (a NumPy or 0-d tensor integer too), never a float or bool
    (which ``int()`` would take: ``0.5`` silently as ``0``)."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise TypeError(v)
    return operator.index(v)


def _check_groups(groups: Any, n: int, call: str) -> tuple | None:
    if groups is None:
        return None
    try:
        gs = tuple(tuple(_int(i) for i in g) for g in groups)
    except TypeError:
        gs = None
    if gs is None:
        raise TypeError(f"{call}: `axis_index_groups` must be a list of lists of ints, got "
                        f"{groups!r}.")
    seen: dict[int, int] = {}
    for g in gs:
        if not g:
            raise ValueError(f"{call}: `axis_index_groups` {groups!r} contains an empty group; "
                             f"every group needs at least one axis index.")
        for i in g:
            if not 0 <= i < n:
                raise ValueError(
                    f"{call}: `axis_index_groups` {groups!r} contains index {i}, out of range "
                    f"for axis size {n}; indices must be in range({n}).")
            if i in seen:
                raise ValueError(
                    f"{call}: `axis_index_groups` {groups!r} is not a partition of range({n}): "
                    f"index {i} appears more than once.")
            seen[i] = 1
    missing = [i for i in range(n) if i not in seen]
    if missing:
        raise ValueError(
            f"{call}: `axis_index_groups` {groups!r} is not a partition of range({n}): "
            f"indices {missing} are in no group; every index must be in exactly one group.")
    return gs


def _is_simple(comps: tuple) -> bool:
    """Comps a non-decomposable primitive handles: all devices, or one vmap level."""
    return all(type(c) is DeviceComp for c in comps) or len(comps) == 1


def _spec(op: str, comps: tuple, params: tuple, nleaves: int, groups, label: str) -> Spec:
    return Spec(op, comps, frozenset(), params, (0,) * nleaves, groups, label)


def _run(op: str, comps: tuple, params: tuple, tensors: list, groups, label: str,
         owned: frozenset[int] = frozenset()):
    if not tensors:
        return []
    return _apply(_spec(op, comps, params, len(tensors), groups, label), tensors, owned)


def _reduction(op: str, x: Any, axis_name: Any, axis_index_groups: Any, call: str,
               owned: frozenset[int] = frozenset()) -> Any:
    """``owned``: ids of tensor leaves of ``x`` that only the caller refers to, which the
    reduction may overwrite with its result (see ``_Owned``)."""
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    groups = _check_groups(axis_index_groups, n, call)
    leaves, treedef = _flatten_values(x, call)
    label = _label(call, axis_name, "" if groups is None else f", axis_index_groups={groups}")
    out: list[Any] = list(leaves)
    idx = []
    tensors = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            t = leaf
        elif leaf is None:
            continue  # (passed through, like an empty subtree)
        elif groups is None:
            # A Python number does not vary across devices.
            if op == "psum":
                out[i] = (int(leaf) if isinstance(leaf, bool) else leaf) * n
            elif op == "pmean":
                out[i] = float(leaf) if not isinstance(leaf, complex) else leaf
            continue
        else:
            t = torch.as_tensor(leaf)
        if t.dtype == torch.bool and op in ("psum", "pmean"):
            t = t.to(torch.int64)
        idx.append(i)
        tensors.append(t)
    if n == 1 and groups is None and all(type(c) is DeviceComp for c in comps):
        # Over one participant every reduction is the identity (and so is its transpose):
        # skip the collective machinery, which costs tens of microseconds per call. (Not
        # over a vmap axis of size 1: its result must come out unbatched, the same for
        # every member of the axis, as for any size.)
        for i, t in zip(idx, tensors):
            if op == "pmean" and not (t.is_floating_point() or t.is_complex()):
                t = t.to(torch.get_default_dtype())
            out[i] = t
        return tree_util.tree_unflatten(out, treedef)
    prim = "psum" if op == "pmean" else op
    # A floating-point pmean without groups divides inside the collective, so that every
    # device receives the one shared result (no per-device division, no extra buffers).
    fused = op == "pmean" and groups is None and all(
        t.is_floating_point() or t.is_complex() for t in tensors)
    params = (1.0 / n,) if fused else ()
    if groups is not None and not _is_simple(comps):
        res = [_grouped_fallback(prim, t, comps, groups, label) for t in tensors]
    elif prim in ("pmax", "pmin") and len(comps) > 1:
        res = _extremum_over_components(prim, tensors, comps, groups, label)
    else:
        mine = frozenset(j for j, t in enumerate(tensors) if id(t) in owned) if owned else owned
        res = _run(prim, comps, params, tensors, groups, label, mine)
    for j, i in enumerate(idx):
        r = res[j]
        if op == "pmean" and not fused:
            if not (r.is_floating_point() or r.is_complex()):
                r = r.to(torch.get_default_dtype())
            if groups is None:
                r = r / n
            else:
                sizes = torch.tensor([0.0] * n, dtype=r.dtype, device=r.device)
                for g in groups:
                    for m in g:
                        sizes[m] = len(g)
                r = r / _pick(sizes, axis_index_tensor(comps, r.device))
        out[i] = r
    return tree_util.tree_unflatten(out, treedef)


def _pick(t: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t.select(dim, idx)`` for a (possibly batched) int64 scalar tensor ``idx``."""
    return t.index_select(dim, idx.reshape(1)).squeeze(dim)


def _gather_flat(t: torch.Tensor, comps: tuple, label: str) -> torch.Tensor:
    """``all_gather`` to ``[n, ...]`` over all components (row-major)."""
    g = _run("gather", comps, (0, frozenset()), [t], None, label)[0]
    return g.flatten(0, len(comps) - 1) if len(comps) > 1 else g


def _extremum_over_components(op: str, tensors: list, comps: tuple, groups: Any,
                              label: str) -> list:
    """pmax/pmin over several components (a pmap axis and a vmap axis, say).

    Reducing component by component would split a tie's gradient level by level (half
    to each device, then halves within a device); instead the value comes from the
    reductions and the derivative from one sum over the whole axis: every participant
    holding the extremum gets ``cotangent / (number of ties)``, as ``torch.amax`` does.
    With ``groups`` (only here for components that are all device axes), within each group.
    """
    values = [t.detach() for t in _run(op, comps, (), tensors, groups, label)]
    out = []
    for t, m in zip(tensors, values):
        if not (t.is_floating_point() or t.is_complex()):
            out.append(m)
            continue
        mask = t == m
        count = _run("psum", comps, (), [mask.to(t.dtype)], groups, label)[0]
        delta = torch.where(mask, t - t.detach(), torch.zeros((), dtype=t.dtype,
                                                               device=t.device))
        # Equal to m in value (delta is exactly 0); d/dx_j = [x_j is extremal] / count.
        out.append(m + _run("psum", comps, (), [delta], groups, label)[0] / count)
    return out


def _grouped_fallback(op: str, x: torch.Tensor, comps: tuple, groups: tuple, label: str):
    n = axes_mod.size_of(comps)
    g = _gather_flat(x, comps, label)
    i = axis_index_tensor(comps, x.device)
    member = torch.zeros(n, n, dtype=torch.bool, device=x.device)
    for grp in groups:
        for a in grp:
            for b in grp:
                member[a, b] = True
    row = _pick(member, i).view((n,) + (1,) * x.ndim)
    if op == "psum":
        return torch.where(row, g, torch.zeros((), dtype=g.dtype, device=g.device)).sum(0)
    # Non-members get the identity of the reduction, so they never win (nor tie).
    if g.dtype == torch.bool:
        fill: Any = op != "pmax"
    elif g.is_floating_point():
        fill = -float("inf") if op == "pmax" else float("inf")
    else:
        info = torch.iinfo(g.dtype)
        fill = info.min if op == "pmax" else info.max
    masked = torch.where(row, g, torch.full((), fill, dtype=g.dtype, device=g.device))
    return masked.amax(0) if op == "pmax" else masked.amin(0)


@public
@internal
def psum(x: Any, axis_name: Any, *, axis_index_groups: Any = None) -> Any:
    """Sums ``x`` over the devices (or vmap entries) of ``axis_name``.

    Every participant receives the same, bitwise identical, sum. Python numbers and
    values that do not vary along the axis are multiplied by the axis size, so
    ``psum(1, "i")`` is the size of ``"i"``. Booleans are summed as integers.

    Args:
        x: a pytree of tensors and numbers.
        axis_name: an axis name bound by ``pmap``/``vmap``, or a tuple of names (reduce
            over all of them).
        axis_index_groups: optional partition of the axis indices, a list of lists; each
            participant then sums only over its own group.

    Returns:
        A pytree like ``x`` holding the sums.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.vmap(lambda v: funcdp.psum(v, "i"), axis_name="i")
        >>> f(torch.tensor([1.0, 2.0, 3.0]))
        tensor([6., 6., 6.])
    """
    return _reduction("psum", x, axis_name, axis_index_groups, "psum")


@public
@internal
def pmean(x: Any, axis_name: Any, *, axis_index_groups: Any = None) -> Any:
    """Averages ``x`` over ``axis_name`` (integers give floats): ``psum(x) / size``.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: funcdp.pmean(v, "i"), axis_name="i")(torch.arange(4))
        tensor([1.5000, 1.5000, 1.5000, 1.5000])
    """
    return _reduction("pmean", x, axis_name, axis_index_groups, "pmean")


@public
@internal
def pmax(x: Any, axis_name: Any, *, axis_index_groups: Any = None) -> Any:
    """Elementwise maximum over ``axis_name``.

    Differentiable (beyond JAX): the cotangent flows to the participants holding the
    maximum, split evenly between ties, like ``torch.amax``'s gradient.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: funcdp.pmax(v, "i"), axis_name="i")(torch.tensor([1, 5, 2]))
        tensor([5, 5, 5])
    """
    return _reduction("pmax", x, axis_name, axis_index_groups, "pmax")


@public
@internal
def pmin(x: Any, axis_name: Any, *, axis_index_groups: Any = None) -> Any:
    """Elementwise minimum over ``axis_name`` (differentiable like ``pmax``).

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: funcdp.pmin(v, "i"), axis_name="i")(torch.tensor([4, 1, 2]))
        tensor([1, 1, 1])
    """
    return _reduction("pmin", x, axis_name, axis_index_groups, "pmin")


def _tensor_leaves(x: Any, call: str):
    """The leaves of ``x`` as tensors, but for None leaves, which a collective passes
    through, and a function that puts the results back in ``x``'s structure."""
    leaves, treedef = _flatten_values(x, call)
    nones = [i for i, leaf in enumerate(leaves) if leaf is None]

    def rebuild(out: list) -> Any:
        for i in nones:
            out.insert(i, None)
        return tree_util.tree_unflatten(out, treedef)

    return [leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(leaf)
            for leaf in leaves if leaf is not None], rebuild


def _norm_dim(d: Any, ndim: int, call: str, arg: str, extra: int = 0) -> int:
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"{call}: `{arg}` must be an int, got {d!r}.")
    rank = ndim + extra
    if not -rank <= d < rank:
        raise ValueError(f"{call}: `{arg}`={d} is out of range for a value of rank {ndim}"
                         f"{' (plus the new axis)' if extra else ''}; valid: "
                         f"{-rank}..{rank - 1}.")
    return d % rank


@public
@internal
def all_gather(x: Any, axis_name: Any, *, axis: int = 0, tiled: bool = False) -> Any:
    """Gathers ``x`` from every participant of ``axis_name``.

    Untiled, the values are stacked along a new dimension ``axis`` (size = the axis
    size); with ``tiled=True`` they are concatenated along the existing ``axis``.
    The transpose (gradient) is ``psum_scatter``.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: funcdp.all_gather(v, "i"), axis_name="i")(torch.arange(3))
        tensor([[0, 1, 2],
                [0, 1, 2],
                [0, 1, 2]])
    """
    call = "all_gather"
    comps, _ = axes_mod.resolve(axis_name, call)
    leaves, rebuild = _tensor_leaves(x, call)
    label = _label(call, axis_name, f", axis={axis}, tiled={tiled}")
    out = []
    for t in leaves:
        if tiled:
            if t.ndim == 0:
                raise ValueError(f"{call}: tiled=True needs values of rank >= 1; got a scalar.")
            a = _norm_dim(axis, t.ndim, call, "axis")
        else:
            a = _norm_dim(axis, t.ndim, call, "axis", extra=1)
        g = _run("gather", comps, (a, frozenset()), [t], None, label)[0]
        m = len(comps)
        if tiled:
            g = g.flatten(a, a + m)
        elif m > 1:
            g = g.flatten(a, a + m - 1)
        out.append(g)
    return rebuild(list(out))


@public
@internal
def psum_scatter(x: Any, axis_name: Any, *, scatter_dimension: int = 0,
                 tiled: bool = False) -> Any:
    """Sums over ``axis_name`` and gives participant ``i`` only slice ``i`` of the sum.

    Untiled, ``x.shape[scatter_dimension]`` must equal the axis size and that dimension
    is removed; tiled, it must be divisible by the axis size and participant ``i`` gets
    the ``i``-th block. The transpose of ``all_gather``.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.vmap(lambda v: funcdp.psum_scatter(v, "i"), axis_name="i")
        >>> f(torch.ones(2, 2))
        tensor([2., 2.])
    """
    call = "psum_scatter"
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    sizes = [c.size for c in comps]
    leaves, rebuild = _tensor_leaves(x, call)
    label = _label(call, axis_name, f", scatter_dimension={scatter_dimension}, tiled={tiled}")
    out = []
    for t in leaves:
        if t.ndim == 0:
            raise ValueError(f"{call}: the value is a scalar; it needs a dimension of size "
                             f"{n} to scatter over `{axis_name}`.")
        if t.dtype == torch.bool:  # (a sum, as psum's: bool counts, as int64)
            t = t.to(torch.int64)
        d = _norm_dim(scatter_dimension, t.ndim, call, "scatter_dimension")
        length = t.shape[d]
        if tiled:
            if length % n:
                raise ValueError(
                    f"{call}: with tiled=True, dimension {d} of the value (shape "
                    f"{tuple(t.shape)}) has size {length}, not divisible by the axis size "
                    f"{n}; pad it to a multiple of {n}.")
            t = t.unflatten(d, sizes + [length // n])
        else:
            if length != n:
                raise ValueError(
                    f"{call}: dimension {d} of the value (shape {tuple(t.shape)}) has size "
                    f"{length} but must equal the size {n} of axis {axis_name!r}; use "
                    f"tiled=True to scatter blocks of a dimension divisible by {n}.")
            if len(sizes) > 1:
                t = t.unflatten(d, sizes)
        all_pos = frozenset(range(len(comps)))
        out.append(_run("scatter", comps, (d, all_pos), [t], None, label)[0])
    return rebuild(list(out))


def _check_perm(perm: Any, n: int, call: str) -> tuple:
    try:
        pairs = tuple((_int(s), _int(d)) for s, d in perm)
    except (TypeError, ValueError):
        raise TypeError(f"{call}: `perm` must be a list of (source, destination) pairs of "
                        f"ints, got {perm!r}.") from None
    srcs = [s for s, _ in pairs]
    dsts = [d for _, d in pairs]
    for s, d in pairs:
        for v, what in ((s, "source"), (d, "destination")):
            if not 0 <= v < n:
                raise ValueError(f"{call}: `perm` {list(perm)!r} has {what} {v}, out of range "
                                 f"for axis size {n}; indices must be in range({n}).")
    for vals, what in ((srcs, "source"), (dsts, "destination")):
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise ValueError(f"{call}: `perm` {list(perm)!r} uses {what} {dup[0]} more than "
                             f"once; each source and each destination may appear at most once.")
    return pairs


@public
@internal
def ppermute(x: Any, axis_name: Any, perm: Any) -> Any:
    """Sends ``x`` from participant ``src`` to ``dst`` for every ``(src, dst)`` in ``perm``.

    A participant that no pair sends to receives zeros. The transpose is the inverse
    permutation.

    Examples:
        >>> import torch, funcdp
        >>> ring = [(i, (i + 1) % 3) for i in range(3)]
        >>> f = funcdp.vmap(lambda v: funcdp.ppermute(v, "i", ring), axis_name="i")
        >>> f(torch.tensor([1, 2, 3]))
        tensor([3, 1, 2])
    """
    call = "ppermute"
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    pairs = _check_perm(perm, n, call)
    leaves, rebuild = _tensor_leaves(x, call)
    label = _label(call, axis_name, f", perm={list(pairs)}")
    if _is_simple(comps):
        out = _run("ppermute", comps, (pairs,), leaves, None, label)
    else:
        src = [-1] * n
        for s, d in pairs:
            src[d] = s
        out = []
        for t in leaves:
            g = _gather_flat(t, comps, label)
            i = axis_index_tensor(comps, t.device)
            table = torch.tensor([max(s, 0) for s in src], device=t.device)
            valid = torch.tensor([s >= 0 for s in src], device=t.device)
            picked = _pick(g, _pick(table, i))
            out.append(torch.where(_pick(valid, i), picked,
                                   torch.zeros((), dtype=t.dtype, device=t.device)))
    return rebuild(list(out))


@public
@internal
def pshuffle(x: Any, axis_name: Any, perm: Any) -> Any:
    """Participant ``i`` receives ``x`` from participant ``perm[i]``.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.vmap(lambda v: funcdp.pshuffle(v, "i", [2, 0, 1]), axis_name="i")
        >>> f(torch.tensor([1, 2, 3]))
        tensor([3, 1, 2])
    """
    call = "pshuffle"
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    try:
        p = [_int(v) for v in perm]
    except TypeError:
        raise TypeError(f"{call}: `perm` must be a list of ints, got {perm!r}.") from None
    if sorted(p) != list(range(n)):
        raise ValueError(f"{call}: `perm` {list(perm)!r} is not a permutation of range({n}) "
                         f"(axis size {n}); it must list every index exactly once.")
    return ppermute(x, axis_name, [(src, dst) for dst, src in enumerate(p)])


@public
@internal
def all_to_all(x: Any, axis_name: Any, split_axis: int, concat_axis: int, *,
               tiled: bool = False) -> Any:
    """Chunk ``j`` of ``split_axis`` goes to participant ``j``.

    Untiled: ``x.shape[split_axis]`` must equal the axis size; that dimension is removed
    and the chunks received are stacked along a new dimension ``concat_axis``, so that
    ``out_i[..., j, ...] == x_j[i]``. Tiled: ``split_axis`` must divide by the axis size
    and the received chunks are concatenated along ``concat_axis``.

    Examples:
        >>> import torch, funcdp
        >>> x = torch.arange(4).reshape(2, 2)
        >>> funcdp.vmap(lambda v: funcdp.all_to_all(v, "i", 0, 0), axis_name="i")(x)
        tensor([[0, 2],
                [1, 3]])
    """
    call = "all_to_all"
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    leaves, rebuild = _tensor_leaves(x, call)
    label = _label(call, axis_name, f", split_axis={split_axis}, concat_axis={concat_axis}, "
                                    f"tiled={tiled}")
    out = []
    for t in leaves:
        if t.ndim == 0:
            raise ValueError(f"{call}: the value is a scalar; it needs a dimension to split.")
        s = _norm_dim(split_axis, t.ndim, call, "split_axis")
        length = t.shape[s]
        if tiled:
            c = _norm_dim(concat_axis, t.ndim, call, "concat_axis")
            if length % n:
                raise ValueError(
                    f"{call}: with tiled=True, `split_axis` {s} of the value (shape "
                    f"{tuple(t.shape)}) has size {length}, not divisible by the axis size {n}.")
            t = t.unflatten(s, (n, length // n))
            y = _all_to_all_untiled(t, comps, s, c, label)
            out.append(y.flatten(c, c + 1))
        else:
            c = _norm_dim(concat_axis, t.ndim, call, "concat_axis")
            if length != n:
                raise ValueError(
                    f"{call}: `split_axis` {s} of the value (shape {tuple(t.shape)}) has size "
                    f"{length} but must equal the size {n} of axis {axis_name!r}; use "
                    f"tiled=True to split a dimension divisible by {n}.")
            out.append(_all_to_all_untiled(t, comps, s, c, label))
    return rebuild(list(out))


def _all_to_all_untiled(t, comps, s, c, label):
    if _is_simple(comps):
        return _run("all_to_all", comps, (s, c), [t], None, label)[0]
    g = _gather_flat(t, comps, label)  # [j, ...]
    i = axis_index_tensor(comps, t.device)
    picked = _pick(g, i, 1 + s)
    return picked.movedim(0, c)


@public
@internal
def pbroadcast(x: Any, axis_name: Any, source: int) -> Any:
    """Every participant receives participant ``source``'s ``x``.

    Beyond JAX (which has it on GPU only). The transpose sums the cotangents onto
    ``source``.

    Examples:
        >>> import torch, funcdp
        >>> f = funcdp.vmap(lambda v: funcdp.pbroadcast(v, "i", 2), axis_name="i")
        >>> f(torch.tensor([1, 2, 3]))
        tensor([3, 3, 3])
    """
    call = "pbroadcast"
    comps, _ = axes_mod.resolve(axis_name, call)
    n = axes_mod.size_of(comps)
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < n:
        raise ValueError(f"{call}: `source` must be an int in range({n}) (axis size {n}), "
                         f"got {source!r}.")
    leaves, rebuild = _tensor_leaves(x, call)
    label = _label(call, axis_name, f", source={source}")
    if _is_simple(comps):
        out = _run("bcast", comps, (source,), leaves, None, label)
    else:
        out = [_gather_flat(t, comps, label)[source] for t in leaves]
    return rebuild(list(out))


def axis_index_tensor(comps: tuple, device: torch.device) -> torch.Tensor:
    frame = axes_mod.current_pmap_frame()
    idx: Any = 0
    for c in comps:
        part = axes_mod.comp_index(c, frame, device)
        idx = idx * c.size + part
    if isinstance(idx, int):
        return torch.tensor(idx, dtype=torch.int64, device=device)
    return idx


@public
@internal
def axis_index(axis_name: Any) -> torch.Tensor:
    """This participant's index along ``axis_name`` (an int64 scalar tensor).

    For a tuple of names, the row-major linear index.

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: funcdp.axis_index("i"), axis_name="i")(torch.zeros(3))
        tensor([0, 1, 2])
    """
    comps, _ = axes_mod.resolve(axis_name, "axis_index")
    frame = axes_mod.current_pmap_frame()
    device = frame.device if frame is not None else torch.device("cpu")
    return axis_index_tensor(comps, device)


@public
@internal
def axis_size(axis_name: Any) -> int:
    """The size of ``axis_name`` (a Python int; for a tuple, the product).

    Examples:
        >>> import torch, funcdp
        >>> funcdp.vmap(lambda v: v + funcdp.axis_size("i"), axis_name="i")(torch.zeros(3))
        tensor([3., 3., 3.])
    """
    comps, _ = axes_mod.resolve(axis_name, "axis_size")
    return axes_mod.size_of(comps)
