"""Collectives over a pmap axis that spans several processes.

The devices of this process meet in a local round as usual; whoever completes it reduces
(or stacks) the local values and runs one ``torch.distributed`` collective per dtype
bucket with the other processes; every local device then takes its share. Before each
inter-process collective the processes compare a fingerprint of what they are about to
do (operation, axis, shapes, dtypes), so that processes that reached different
collectives fail with an error that says so, instead of exchanging mismatched data.

These exchanges (``agree``) also keep the processes in step when a call fails on one of
them: a process whose pmap call fails on a device, before the collective its peers wait
in, takes part in their exchange with a "failed" notice instead (``tell_failure``), so
the peers raise at once rather than time out, or pair the collective with one of a later
call. A notice from a call a process has already finished is skipped. The
``funcdp.distributed`` helpers exchange a description of their call the same way.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from typing import Any

import torch

from funcdp._src.distributed import CallState, ProcessInfo
from funcdp._src.rendezvous import CollectiveError

_OK, _FAILED = 0, 1


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
    call = mesh.call

    def compute(items: list) -> Any:
        res = _global_compute(spec, dev_pos, items, info, n, call, coord[1:])
        # Large shared results are watched for in-place writes, as within one process.
        return res if isinstance(res, PerRank) else C._watched(mesh, spec, res)

    result = mesh.exchange(coord, (0,), (None, members), grank - info.offset, local,
                           spec.label, desc, leaves, compute)
    if isinstance(result, PerRank):
        return [t.detach() for t in result.items[grank]]
    return C._take(spec, dev_pos, result, grank, coord, comps)


def _global_compute(spec: Any, dev_pos: list[int], items: list, info: ProcessInfo,
                    n: int, call: CallState, inner: tuple) -> Any:
    # One exchange and its data collectives at a time (nested pmaps may run several),
    # not cut in two by a Ctrl-C: the other processes would exchange the data alone.
    with info.lock, interrupts_deferred():
        try:
            return _global_compute_locked(spec, dev_pos, items, info, n, call, inner)
        except BaseException:
            # The other processes know (the exchange failed on all of them) or are gone:
            # the call's failure needs no notice.
            call.settled = True
            raise


class interrupts_deferred:  # noqa: N801 - a context manager
    """Holds back a Ctrl-C (SIGINT, with Python's default handler, in the main thread)
    until the block ends, then raises it: an exchange between processes and the data
    collectives it guards run whole or not at all."""

    __slots__ = ("old", "hit")

    def __enter__(self) -> None:
        self.old = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.hit = False
            self.old = signal.signal(signal.SIGINT, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            if self.hit and exc[0] is None:
                raise KeyboardInterrupt


def _global_compute_locked(spec: Any, dev_pos: list[int], items: list, info: ProcessInfo,
                           n: int, call: CallState, inner: tuple) -> Any:
    from funcdp._src import collectives as C

    op = spec.op
    try:
        _check_same_program(spec, items[0], info, call, inner)
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


def _check_same_program(spec: Any, leaves: list, info: ProcessInfo, call: CallState,
                        inner: tuple) -> None:
    # The axis size counts each device's shards (a vmap per device when a process maps
    # more shards than it has devices): processes that disagree on it compute different
    # things.
    size = 1
    for c in spec.comps:
        size *= c.size
    text = f"{spec.label} over {size} shards with values " + ", ".join(
        f"{tuple(x.shape)}:{x.dtype}" for x in leaves)
    if inner:  # (in a nested pmap: one exchange per inner coordinate)
        text += f" at inner coordinate {inner}"
    call.exchanges += 1
    descs = agree(info, text, call.index, spec.label)
    if descs is None:
        return
    lines = ["processes reached different collectives (or passed different shapes, or "
             "mapped different numbers of shards per device):"]
    lines += [f"  - process {p}: {describe(d, c)}" for p, (d, c) in enumerate(descs)]
    lines.append("Every process must run the same program with the same shapes.")
    raise CollectiveError("\n".join(lines))


def describe(desc: Any, call: int) -> str:
    """A process's part in an exchange, for messages."""
    where = f" (in its pmap call {call})" if call > 0 else ""
    if isinstance(desc, str):
        return desc + where
    return f"funcdp.distributed.{desc[0]}(...)" + where


def _hash(desc: Any) -> int:
    text = desc if isinstance(desc, str) else repr(desc)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _exchange(info: ProcessInfo, flag: int, call: int | None, desc: Any) -> tuple[list, Any]:
    """One exchange: every process's ``[seq, call, hash, flag]`` row, and every
    process's ``desc`` if they differ (else None); every process decides alike."""
    import torch.distributed as dist

    with info.lock:
        seq = info.seq
        info.seq += 1
        mine = torch.tensor([seq, -1 if call is None else call,
                             _hash(desc) if flag == _OK else 0, flag], dtype=torch.int64)
        if info.backend == "nccl":
            mine = mine.cuda()
        rows_t = [torch.empty_like(mine) for _ in range(info.count)]
        dist.all_gather(rows_t, mine, group=info.group)
        rows = [r.tolist() for r in rows_t]
        # (The call numbers too: processes that made different numbers of pmap calls
        # would pair the same collective of different calls.)
        if all(r[3] == _OK for r in rows) and len({(r[0], r[1], r[2]) for r in rows}) == 1:
            return rows, None
        descs: list[Any] = [None] * info.count
        dist.all_gather_object(descs, desc, group=info.group)
        if any(d == ("shutdown",) for d in descs):
            info.peer_left = True  # (its group is gone: this process's shutdown won't wait)
        return rows, descs


def agree(info: ProcessInfo, desc: Any, call: int | None,
          label: str = "") -> list[tuple[Any, int]] | None:
    """Compares ``desc`` (a string, or a tuple whose ``repr`` identifies it) across the
    processes, in the order of their exchanges; ``call``: the pmap call's number (None
    outside pmap).

    Returns:
        None if every process passed the same; else ``(desc, call number)`` of every
        process (the same list on every process).

    Raises:
        CollectiveError: a process's call failed before it reached this exchange (its
            notice is for this call).
    """
    while True:
        rows, descs = _exchange(info, _OK, call, desc)
        if descs is None:
            return None
        failed = [p for p, r in enumerate(rows) if r[3] == _FAILED]
        if not failed:
            return [(d, r[1]) for d, r in zip(descs, rows)]
        # A notice for a call this process has already finished (or from outside pmap)
        # took the failed process's turn: this process's exchange comes next.
        live = [p for p in failed if call is not None and call <= rows[p][1]]
        if live:
            lines = [f"{label}: the collective between processes cannot complete: a pmap "
                     f"call failed on another process before it reached it:"]
            lines += [f"  - process {p}: {descs[p]}" for p in live]
            lines.append("That process's error is the cause; fix it first. Every process's "
                         "call fails, so the processes stay in step: a program that catches "
                         "the error on every process can go on.")
            raise CollectiveError("\n".join(lines))


def tell_failure(mesh: Any, coord: tuple, error: BaseException) -> None:
    """Called once when a pmap call spanning the processes fails on a device of this
    process outside an exchange: takes part in the next exchange with a notice, so that
    processes waiting there for this call's collective fail at once (see ``agree``). It
    waits for that exchange (at most initialize's `timeout`)."""
    _notify(mesh.proc, mesh.call.index, f"device {coord[0]}", error)


def tell_failure_before_devices(info: ProcessInfo, error: BaseException) -> None:
    """``tell_failure`` for a call spanning the processes that failed before its devices
    ran (its arguments, say): it takes its call number, as its devices would have, so that
    the processes' later calls keep the same numbers."""
    _notify(info, info.new_call().index, "the call", error)


def _notify(info: ProcessInfo, call: int, where: str, error: BaseException) -> None:
    first = str(error).splitlines()[0] if str(error) else ""
    try:
        _exchange(info, _FAILED, call, f"{where} raised {type(error).__name__}: {first}")
    except Exception:  # noqa: BLE001 - the peers are gone: no one to tell
        pass
