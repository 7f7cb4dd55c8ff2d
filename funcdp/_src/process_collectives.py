"""Collectives over a pmap axis that spans several processes.

The devices of this process meet in a local round as usual; whoever completes it reduces
(or stacks) the local values and runs one ``torch.distributed`` collective per dtype
bucket with the other processes; every local device then takes its share. Before each
inter-process collective the processes compare a fingerprint of what they are about to
do (operation, axis, shapes, dtypes), so that processes that reached different
collectives fail with an error that says so, instead of exchanging mismatched data.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from funcdp._src.distributed import ProcessInfo
from funcdp._src.rendezvous import CollectiveError


class PerRank:
    """A round result that differs per participant (indexed by global rank)."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items


def process_collective(spec: Any, dev_pos: list[int], leaves: list[torch.Tensor], frame: Any,
                       info: ProcessInfo) -> list[torch.Tensor]:
    from funcdp._src import collectives as C

    comps = [spec.comps[p] for p in dev_pos]
    if len(comps) != 1 or comps[0].axis != 0:
        raise NotImplementedError(
            f"{spec.label}: in a multi-process run, collectives over the process-spanning pmap "
            f"axis together with other device axes (nested pmap) are not supported yet.")
    mesh, coord = frame.mesh, frame.coord
    n = comps[0].size
    local = info.local_counts[info.index]
    grank = coord[0]
    members = [(info.offset + j,) + coord[1:] for j in range(local)]
    desc = (spec.label, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))

    def compute(items: list) -> Any:
        res = _global_compute(spec, dev_pos, items, info, n)
        # Large shared results are watched for in-place writes, as within one process.
        return res if isinstance(res, PerRank) else C._watched(mesh, spec, res)

    result = mesh.exchange(coord, (0,), (None, members), grank - info.offset, local,
                           spec.label, desc, leaves, compute)
    if isinstance(result, PerRank):
        return [t.detach() for t in result.items[grank]]
    return C._take(spec, dev_pos, result, grank, coord, comps)


def _global_compute(spec: Any, dev_pos: list[int], items: list, info: ProcessInfo,
                    n: int) -> Any:
    from funcdp._src import collectives as C

    op = spec.op
    try:
        _check_same_program(spec, items[0], info)
        if op in ("psum", "pmax", "pmin", "scatter", "reduce_to") and spec.groups is None:
            red = "psum" if op in ("scatter", "reduce_to") else op
            outs = C._reduction_outputs(items[0])
            for li in range(len(outs)):
                C._fold_into(red, outs[li], [it[li] for it in items])
            _all_reduce(outs, red, info)
            scale = C._scale_of(spec)
            if scale is not None:
                for o in outs:
                    C._scaled(o, scale, inplace=True)
            return outs
        everyone = _all_gather_items(items, info, spec.label)
        if spec.groups is not None:
            red = op
            per = []
            for r in range(n):
                group = next(g for g in spec.groups if r in g)
                outs = C._reduction_outputs(everyone[0])
                for li in range(len(outs)):
                    C._fold_into(red, outs[li], [everyone[m][li] for m in group])
                per.append(outs)
            return PerRank(per)
        return C._compute(spec, dev_pos, everyone, n)
    except CollectiveError:
        raise
    except RuntimeError as e:
        raise CollectiveError(
            f"{spec.label}: the collective between processes failed ({e}). Another process "
            f"may have raised, exited, or stopped at a different point of the program; it "
            f"fails after funcdp.distributed.initialize's `timeout`.") from e


def _reduce_op(op: str) -> Any:
    import torch.distributed as dist

    return {"psum": dist.ReduceOp.SUM, "pmax": dist.ReduceOp.MAX,
            "pmin": dist.ReduceOp.MIN}[op]


def _all_reduce(outs: list[torch.Tensor], op: str, info: ProcessInfo) -> None:
    """One all-reduce per flat dtype buffer the outputs are views of."""
    import torch.distributed as dist

    done: set[int] = set()
    for o in outs:
        base = o._base if o._base is not None else o
        if id(base) in done:
            continue
        done.add(id(base))
        dist.all_reduce(base, _reduce_op(op), group=info.group)


def _all_gather_items(items: list, info: ProcessInfo, label: str) -> list:
    """Every participant's leaves, in global order: ``[rank][leaf]``."""
    import torch.distributed as dist

    counts = set(info.local_counts)
    if len(counts) > 1:
        raise CollectiveError(f"{label}: gathers between processes need the same number of "
                              f"devices in every process (got {info.local_counts}).")
    local = len(items)
    nleaves = len(items[0])
    by_dtype: dict = {}
    for li in range(nleaves):
        by_dtype.setdefault(items[0][li].dtype, []).append(li)
    gathered: list[list[Any]] = [[None] * nleaves for _ in range(local * info.count)]
    for _dtype, lis in by_dtype.items():
        flat = torch.cat([items[r][li].reshape(-1) for r in range(local) for li in lis])
        parts = [torch.empty_like(flat) for _ in range(info.count)]
        dist.all_gather(parts, flat.contiguous(), group=info.group)
        for p, part in enumerate(parts):
            off = 0
            for r in range(local):
                for li in lis:
                    shape = items[0][li].shape
                    k = items[0][li].numel()
                    gathered[p * local + r][li] = part[off:off + k].view(shape)
                    off += k
    return gathered


def _check_same_program(spec: Any, leaves: list, info: ProcessInfo) -> None:
    import torch.distributed as dist

    # The axis size counts each device's shards (a vmap per device when a process maps
    # more shards than it has devices): processes that disagree on it compute different
    # things.
    size = 1
    for c in spec.comps:
        size *= c.size
    text = f"{spec.label} over {size} shards with values " + ", ".join(
        f"{tuple(x.shape)}:{x.dtype}" for x in leaves)
    mine = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
    if info.backend == "nccl":
        mine = mine.cuda()
    prints = [torch.empty_like(mine) for _ in range(info.count)]
    dist.all_gather(prints, mine, group=info.group)
    if len({int(p) for p in prints}) == 1:
        return
    texts: list[Any] = [None] * info.count
    dist.all_gather_object(texts, text, group=info.group)
    lines = ["processes reached different collectives (or passed different shapes, or "
             "mapped different numbers of shards per device):"]
    lines += [f"  - process {p}: {t}" for p, t in enumerate(texts)]
    lines.append("Every process must run the same program with the same shapes.")
    raise CollectiveError("\n".join(lines))
