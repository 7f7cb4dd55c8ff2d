"""Several processes (and hosts) on ``torch.distributed``: one pmap axis over all of them.

``initialize()`` joins the process group (from torchrun's environment or explicit
arguments) and learns every process's device count. After it, a pmap follows JAX's
multi-host convention: every process runs the same program and passes arrays whose
mapped size is its *local* device count; the axis spans the devices of all processes
(ordered by process), ``axis_index`` is global, and a collective is a local reduction or
gather over this process's devices, one ``torch.distributed`` collective per dtype
bucket between processes, and a local share of the result.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
import time
from typing import Any

import torch

from funcdp._src import devices as devices_mod
from funcdp._src import onednn
from funcdp._src import tree as tree_util
from funcdp._src.api_util import public_in
from funcdp._src.config import config
from funcdp._src.devices import Device

_public = public_in("funcdp.distributed")


class ProcessInfo:
    """This process's place among all processes of a distributed run."""

    def __init__(self, index: int, count: int, local_counts: list[int], backend: str,
                 group: Any) -> None:
        self.index = index
        self.count = count
        self.local_counts = local_counts
        self.offset = sum(local_counts[:index])
        self.total = sum(local_counts)
        self.backend = backend
        self.group = group
        # Exchanges between the processes (see process_collectives.agree) run one at a
        # time, each with the data collective it guards; ``seq`` counts them.
        self.lock = threading.RLock()
        self.seq = 0
        self.calls = 0  # pmap calls spanning the processes so far
        # Whether another process was seen shutting down (its exchange met one of this
        # process's): this process's shutdown then has no one to wait for.
        self.peer_left = False

    def new_call(self) -> CallState:
        """The state of a new pmap call spanning the processes (numbered in call order:
        every process makes the same calls, so the numbers agree)."""
        self.calls += 1
        return CallState(self.calls)


class CallState:
    """One pmap call's part in the exchanges between processes: its number, whether the
    other processes already know that it failed on this process (it failed in an
    exchange, or this process told them), the exchanges it made, and how many the
    earlier calls of its plan made (None: unknown; -1: not always as many)."""

    __slots__ = ("index", "settled", "exchanges", "expected")

    def __init__(self, index: int) -> None:
        self.index = index
        self.settled = False
        self.exchanges = 0
        self.expected: int | None = None

    def awaited(self) -> bool:
        """Whether the other processes may be waiting for an exchange of this call: not
        where its plan's calls make a known number of exchanges and it has made them all
        (it failed after its last collective, or it has none), so that a failure there
        is raised at once, with nothing to tell."""
        return self.expected is None or self.expected < 0 or self.exchanges < self.expected

    def claim(self) -> bool:
        """True for the first caller only, once: whoever tells the other processes."""
        with _CLAIM_LOCK:
            if self.settled:
                return False
            self.settled = True
            return True


_CLAIM_LOCK = threading.Lock()
_info: ProcessInfo | None = None
# Bumped by initialize and shutdown: pmap's plans (which devices, whether the axis spans
# processes) are cached per generation.
_generation = 0


def info() -> ProcessInfo | None:
    return _info


def _env_int(name: str, arg: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)  # type: ignore[arg-type]  # not None here
    except ValueError:
        raise ValueError(f"funcdp.distributed.initialize: environment variable `{name}` must "
                         f"be an integer, got {v!r}; set it to a number (torchrun does), or "
                         f"pass {arg}=... to initialize.") from None


def _onednn_ratio(platform: str) -> float | None:
    """This process's oneDNN timing (see ``onednn.faster``), where the choice is still to
    be made: processes choose together, so that all compute the same products."""
    if (platform != "cpu" or not onednn.AVAILABLE or onednn.decided()
            or not (isinstance(config.onednn_linear, str) and config.onednn_linear == "auto")):
        return None
    return onednn.measure_safely()


def _check_int(value: Any, arg: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"funcdp.distributed.initialize: `{arg}` must be an int >= {least}, "
                         f"got {value!r}.")


def _check_args(backend: Any, timeout: Any, master_addr: Any, master_port: Any,
                platform: str) -> tuple[str, datetime.timedelta]:
    """The backend (chosen if None) and the timeout as a timedelta; a clear error for
    anything torch would reject obscurely."""
    call = "funcdp.distributed.initialize"
    if backend is None:
        backend = "nccl" if platform == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{call}: `backend` must be 'gloo', 'nccl' or None (NCCL for GPUs, "
                         f"gloo otherwise), got {backend!r}.")
    if backend == "nccl" and platform != "cuda":
        raise ValueError(f"{call}: backend='nccl' needs GPUs, but this process's devices are "
                         f"{platform} devices; pass backend='gloo', or leave `backend` out to "
                         f"choose by platform.")
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"{call}: `timeout` must be a number of seconds or a "
                        f"datetime.timedelta, got {type(timeout).__name__} {timeout!r}; pass "
                        f"e.g. timeout=300.0.")
    if not seconds > 0:
        raise ValueError(f"{call}: `timeout` must be positive, got {timeout!r}.")
    if master_addr is not None and not isinstance(master_addr, str):
        raise TypeError(f"{call}: `master_addr` must be a str (a host name or IP address), "
                        f"got {type(master_addr).__name__} {master_addr!r}.")
    if master_port is not None and (isinstance(master_port, bool)
                                    or not isinstance(master_port, int)
                                    or not 0 < master_port < 65536):
        raise ValueError(f"{call}: `master_port` must be an int port number (1-65535), got "
                         f"{master_port!r}.")
    return backend, datetime.timedelta(seconds=seconds)


@_public
def initialize(backend: str | None = None, timeout: float | datetime.timedelta = 300.0, *,
               rank: int | None = None, world_size: int | None = None,
               master_addr: str | None = None, master_port: int | None = None) -> None:
    """Joins the process group of a multi-process run.

    With torchrun everything comes from the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``); otherwise pass the arguments.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default: NCCL when the local devices are GPUs,
            gloo otherwise.
        timeout: seconds (or a ``timedelta``) before a collective that some process never
            joins fails, instead of waiting forever.
        rank: this process's index (default: ``RANK``).
        world_size: the number of processes (default: ``WORLD_SIZE``).
        master_addr: address of process 0 (default: ``MASTER_ADDR``).
        master_port: port of process 0 (default: ``MASTER_PORT``).

    Raises:
        ValueError: missing, malformed or inconsistent settings, with the argument or
            variable to set.
        TypeError: a `timeout` or `master_addr` of the wrong type.
        RuntimeError: if called twice.

    On failure the environment (``MASTER_ADDR``, ``MASTER_PORT``) is left as it was.

    Examples:
        In each process (``torchrun --standalone --nproc-per-node=2 train.py``):

            funcdp.distributed.initialize()
            funcdp.process_count()   # 2
            funcdp.devices()         # every device of both processes
    """
    global _info, _generation
    import torch.distributed as dist

    if _info is not None:
        raise RuntimeError("funcdp.distributed.initialize: already initialized; call "
                           "funcdp.distributed.shutdown() first to start again.")
    if rank is None:
        rank = _env_int("RANK", "rank")
    if world_size is None:
        world_size = _env_int("WORLD_SIZE", "world_size")
    if rank is None or world_size is None:
        raise ValueError("funcdp.distributed.initialize: `rank` and `world_size` are not set; "
                         "launch with torchrun (which sets RANK and WORLD_SIZE) or pass "
                         "rank=... and world_size=....")
    _check_int(world_size, "world_size", 1)
    _check_int(rank, "rank", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"funcdp.distributed.initialize: rank {rank} is out of range for "
                         f"world_size {world_size}.")
    local = devices_mod.local_devices()
    platform = local[0].platform
    backend, timeout = _check_args(backend, timeout, master_addr, master_port, platform)
    saved = {var: os.environ.get(var) for var in ("MASTER_ADDR", "MASTER_PORT")}
    created = False
    try:
        if master_addr is not None:
            os.environ["MASTER_ADDR"] = master_addr
        if master_port is not None:
            os.environ["MASTER_PORT"] = str(master_port)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"funcdp.distributed.initialize: environment variable "
                                 f"`{var}` is not set; torchrun sets it, or pass "
                                 f"master_addr/master_port.")
        if not dist.is_initialized():
            kwargs: dict = {}
            if backend == "nccl":
                kwargs["device_id"] = local[0].torch_device
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=timeout, **kwargs)
            created = True
        counts: list[Any] = [None] * world_size
        dist.all_gather_object(counts, (len(local), platform, _onednn_ratio(platform)))
        platforms = {p for _, p, _ in counts}
        if len(platforms) > 1:
            raise RuntimeError(f"funcdp.distributed.initialize: processes have different "
                               f"device platforms {sorted(platforms)}; all must use CPUs or "
                               f"all GPUs.")
    except BaseException:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if created and dist.is_initialized():
            dist.destroy_process_group()
        raise
    local_counts = [n for n, _, _ in counts]
    ratios = [r for _, _, r in counts]
    if None not in ratios:  # (one choice for all processes: the same products everywhere)
        onednn.choose(min(ratios) >= onednn.MARGIN)
    _info = ProcessInfo(rank, world_size, local_counts, backend, dist.group.WORLD)
    offset = _info.offset
    all_devices = []
    for p, n in enumerate(local_counts):
        start = sum(local_counts[:p])
        for i in range(n):
            if p == rank:
                d = local[i]
                all_devices.append(Device(start + i, d.platform, p, i, d.torch_device, d.slot))
            else:
                all_devices.append(Device(start + i, platform, p, i,
                                          torch.device(platform) if platform == "cpu"
                                          else torch.device("cuda", 0)))
    new_local = [all_devices[offset + i] for i in range(len(local))]
    devices_mod._set_processes(rank, world_size, all_devices, new_local)
    _generation += 1


@_public
def shutdown() -> None:
    """Leaves the process group (the run's end).

    Every process should call it: the processes wait for each other first, since one
    that tears its connections down while others still use them can crash on exit.
    """
    global _info, _generation
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if _info is not None:
                from funcdp._src.process_collectives import agree

                if not _info.peer_left:  # (else that process shut down, not waiting)
                    agree(_info, ("shutdown",), None)  # (a barrier, in turn with pmap's)
            else:
                dist.barrier()
            _leave_together(dist)
        except RuntimeError:  # a peer is already gone: nothing left to wait for
            pass
        dist.destroy_process_group()
    _info = None
    _generation += 1
    devices_mod._reset()


def _leave_together(dist: Any, timeout_s: float = 30.0) -> None:
    """Waits, through the rendezvous store, until every process has returned from the
    final barrier (a process that tears its gloo connections down while a peer is still
    finishing the barrier on them can abort that peer); process 0, which hosts the
    store, also waits until the others have seen that, before it takes the store down."""
    store = dist.distributed_c10d._get_default_store()
    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout_s

    def wait_for(key: str, count: int) -> None:
        while store.add(key, 0) < count and time.monotonic() < deadline:
            time.sleep(0.001)

    # The counters may outlive this process group (a store kept by the launcher): each
    # shutdown is one more generation of `world` arrivals.
    arrived = store.add("funcdp/shutdown/returned", 1)
    generation = -(-arrived // world)
    wait_for("funcdp/shutdown/returned", generation * world)
    if rank == 0:
        wait_for("funcdp/shutdown/seen", generation * (world - 1))
    else:
        store.add("funcdp/shutdown/seen", 1)


def _require(call: str) -> ProcessInfo:
    if _info is None:
        raise RuntimeError(f"funcdp.distributed.{call}: not initialized; call "
                           f"funcdp.distributed.initialize() first.")
    return _info


def _device_for_comm(info: ProcessInfo) -> torch.device:
    return devices_mod.local_devices()[0].torch_device if info.backend == "nccl" else (
        torch.device("cpu"))


@_public
def barrier() -> None:
    """Waits until every process reaches this point."""
    info = _require("barrier")
    _agree_on_call(info, ("barrier",))


def _agree_on_call(info: ProcessInfo, desc: tuple) -> list | None:
    """Exchanges ``desc`` (the call, first) with the other processes: None if every
    process passed the same, else every process's (the same list everywhere). Raises if
    the processes are in different calls."""
    from funcdp._src.process_collectives import agree, describe
    from funcdp._src.rendezvous import CollectiveError

    descs = agree(info, desc, None)
    if descs is not None and any(not isinstance(d, tuple) or d[0] != desc[0]
                                 for d, _ in descs):
        lines = [f"funcdp.distributed.{desc[0]}: the processes reached different calls:"]
        lines += [f"  - process {p}: {describe(d, call)}" for p, (d, call) in enumerate(descs)]
        lines.append("Every process must make the same funcdp.distributed calls and pmap "
                     "calls, in the same order.")
        raise CollectiveError("\n".join(lines))
    return descs


def _tensor_meta(leaves: list) -> tuple:
    """What must agree about each leaf across processes: shape and dtype of tensors."""
    return tuple((tuple(x.shape), str(x.dtype).replace("torch.", ""))
                 if isinstance(x, torch.Tensor) else None for x in leaves)


def _fmt_meta(m: Any) -> str:
    if m is None:
        return "not a tensor"
    return f"shape {m[0]}, {m[1]}"


def _leaf_mismatch(call: str, spec: Any, descs: list, meta_at: int, fix: str,
                   ok: Any = None) -> str | None:
    """The message for the first leaf whose metadata differ across processes (or for
    the tree structures), None if all agree; ``ok(metas)`` accepts a leaf anyway."""
    structures = [d[meta_at - 1] for d, _ in descs]
    if len(set(structures)) > 1:
        lines = [f"{call}: the processes passed trees of different structures:"]
        lines += [f"  - process {p}: {st}" for p, st in enumerate(structures)]
        return "\n".join(lines + [fix])
    metas = [d[meta_at] for d, _ in descs]
    paths = tree_util.leaf_paths(spec)
    bad = [i for i in range(len(metas[0]))
           if len({m[i] for m in metas}) > 1 and not (ok is not None and ok([m[i] for m in metas]))]
    if not bad:
        return None
    i = bad[0]
    where = f"tree{tree_util.keystr(paths[i])}" if paths[i] else "the value"
    lines = [f"{call}: the processes passed different shapes or dtypes for {where}:"]
    lines += [f"  - process {p}: {_fmt_meta(m[i])}" for p, m in enumerate(metas)]
    if len(bad) > 1:
        lines.append(f"  ({len(bad) - 1} more leaves differ too)")
    return "\n".join(lines + [fix])


@_public
def broadcast(tree: Any, src: int = 0) -> Any:
    """Every process receives process ``src``'s ``tree`` (e.g. initial parameters).

    Returns new tensors (the input is not modified); one collective per dtype. Every
    process passes a tree of the same structure, with tensors of the same shapes and
    dtypes (its values are replaced by those of process ``src``).

    Raises:
        ValueError: ``src`` is not a process index.
        CollectiveError: on every process, if the processes passed trees of different
            structures, shapes or dtypes (naming the leaf and each process's shape and
            dtype), different ``src``, or are in different calls.

    Examples:
        ``params = funcdp.distributed.broadcast(params)`` right after initialisation, so
        that every process starts from process 0's random initialisation.
    """
    import torch.distributed as dist

    from funcdp._src.rendezvous import CollectiveError

    info = _require("broadcast")
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < info.count:
        raise ValueError(f"funcdp.distributed.broadcast: `src` {src!r} is out of range for "
                         f"{info.count} processes; pass a process index in "
                         f"0..{info.count - 1}.")
    from funcdp._src.sharded import ShardedValue

    leaves, spec = tree_util.tree_flatten(tree)
    # Sharded values (replicated parameters, say) are broadcast as their gathered value.
    leaves = [x.to_tensor() if isinstance(x, ShardedValue) else x for x in leaves]
    descs = _agree_on_call(info, ("broadcast", src, str(spec), _tensor_meta(leaves)))
    if descs is not None:
        call = "funcdp.distributed.broadcast"
        srcs = [d[1] for d, _ in descs]
        if len(set(srcs)) > 1:
            raise CollectiveError(f"{call}: the processes passed different `src`: "
                                  + ", ".join(f"process {p}: src={s}"
                                              for p, s in enumerate(srcs))
                                  + "; pass the same `src` on every process.")
        msg = _leaf_mismatch(call, spec, descs, 3,
                             f"Every process must pass a tree of the same structure, shapes "
                             f"and dtypes (process {src}'s values replace the others'): "
                             f"build it with the same code on every process, e.g. the same "
                             f"model, before broadcasting.")
        raise CollectiveError(msg or f"{call}: the processes disagree.")
    dev = _device_for_comm(info)
    out = list(leaves)
    with info.lock:
        for idx, flat in _buckets(leaves, dev):
            if flat.numel():
                dist.broadcast(flat, src, group=info.group)
            _unbucket(flat, idx, leaves, out)
    return tree_util.tree_unflatten(out, spec)


@_public
def process_allgather(tree: Any, tiled: bool = False) -> Any:
    """Gathers a value from every process.

    Each leaf gets a new leading process axis (``tiled=False``), or the processes'
    values are concatenated along their leading axis (``tiled=True``), where the leading
    sizes may differ: with different device counts per process, ``tiled=True`` turns
    each process's pmap output (``[local devices, ...]``) into ``[all devices, ...]``.
    Sharded values are gathered locally first; numbers are gathered as tensors; ``None``
    leaves stay ``None``.

    Args:
        tree: a pytree of tensors (or sharded values, numbers, NumPy arrays).
        tiled: concatenate along axis 0 instead of stacking on a new axis.

    Returns:
        The gathered tree, each tensor on the device of this process's leaf.

    Raises:
        CollectiveError: on every process, if the processes passed trees of different
            structures or dtypes, or leaves of different shapes (``tiled=False``; with
            ``tiled=True`` only the leading sizes may differ), naming the leaf and each
            process's shape.
    """
    import torch.distributed as dist

    from funcdp._src.rendezvous import CollectiveError
    from funcdp._src.sharded import ShardedValue

    call = "funcdp.distributed.process_allgather"
    info = _require("process_allgather")
    leaves, spec = tree_util.tree_flatten(tree)
    ts: list[torch.Tensor | None] = [
        None if leaf is None
        else leaf.to_tensor() if isinstance(leaf, ShardedValue) else torch.as_tensor(leaf)
        for leaf in leaves]
    descs = _agree_on_call(info, ("process_allgather", bool(tiled), str(spec),
                                  _tensor_meta(ts)))
    if descs is None:
        metas = [_tensor_meta(ts)] * info.count
    else:
        if len({d[1] for d, _ in descs}) > 1:
            raise CollectiveError(f"{call}: the processes passed different `tiled`: "
                                  + ", ".join(f"process {p}: tiled={d[1]}"
                                              for p, (d, _) in enumerate(descs))
                                  + "; pass the same on every process.")

        def trailing_agree(ms: list) -> bool:  # with tiled=True, leading sizes may differ
            return (tiled and all(m is not None and len(m[0]) >= 1 for m in ms)
                    and len({(m[0][1:], m[1]) for m in ms}) == 1)

        fix = ("Every process must pass the same structure, with leaves of the same shapes "
               "and dtypes" + (", but for their leading size." if tiled else
                               "; with tiled=True, leading sizes may differ (values are "
                               "then concatenated along axis 0, not stacked)."))
        msg = _leaf_mismatch(call, spec, descs, 3, fix, trailing_agree)
        if msg is not None:
            raise CollectiveError(msg)
        metas = [d[3] for d, _ in descs]
    if tiled:
        for i, m in enumerate(metas[0]):
            if m is not None and not m[0]:
                where = tree_util.keystr(tree_util.leaf_paths(spec)[i])
                raise ValueError(f"{call}: with tiled=True every leaf needs a leading axis "
                                 f"to concatenate along, but tree{where} is a scalar; pass "
                                 f"tiled=False to stack scalars.")
    dev = _device_for_comm(info)
    gathered: list[list[Any]] = [[None] * len(ts) for _ in range(info.count)]
    with info.lock:
        for dtype, idx in _by_dtype(ts).items():
            sizes = [sum(math.prod(m[i][0]) for i in idx) for m in metas]
            width = max(sizes)
            if width == 0:
                parts = [torch.empty(0, dtype=dtype, device=dev)] * info.count
            else:
                mine = torch.zeros(width, dtype=dtype, device=dev)
                torch.cat([ts[i].detach().reshape(-1).to(dev)  # type: ignore[union-attr]
                           for i in idx], out=mine[:sizes[info.index]])
                parts = [torch.empty_like(mine) for _ in range(info.count)]
                dist.all_gather(parts, mine, group=info.group)
            for p, part in enumerate(parts):
                off = 0
                for i in idx:
                    shape = metas[p][i][0]
                    k = math.prod(shape)
                    gathered[p][i] = part[off:off + k].view(shape)
                    off += k
    out: list[Any] = []
    for i, (leaf, t) in enumerate(zip(leaves, ts)):
        if t is None:
            out.append(None)
            continue
        target = leaf.device if isinstance(leaf, torch.Tensor) else "cpu"
        parts_i = [gathered[p][i].to(target) for p in range(info.count)]
        out.append(torch.cat(parts_i) if tiled else torch.stack(parts_i))
    return tree_util.tree_unflatten(out, spec)


@_public
def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """``funcdp.save_checkpoint`` on process 0 only; every process returns once it is
    written.

    Every process must call it (it synchronises); only process 0 writes the file.

    Raises:
        CollectiveError: on the other processes, if process 0 could not write the file
            (process 0 raises its own error).
    """
    from funcdp._src.checkpoint import save_checkpoint as save
    from funcdp._src.rendezvous import CollectiveError

    info = _require("save_checkpoint")
    error: Exception | None = None
    if info.index == 0:
        try:
            save(path, state)
        except Exception as e:  # noqa: BLE001 - passed on to the other processes
            error = e
    status = None if error is None else (
        f"writing {os.fspath(path)!r} raised {type(error).__name__}: {error}")
    descs = _agree_on_call(info, ("save_checkpoint", status))
    if error is not None:
        raise error
    if descs is not None and descs[0][0][1] is not None:
        raise CollectiveError(
            f"funcdp.distributed.save_checkpoint: process 0 failed to save the checkpoint "
            f"({descs[0][0][1]}); no checkpoint was written. Fix the cause on process 0 "
            f"(a missing directory, permissions, disk space) and save again.")


def _buckets(leaves: list, dev: torch.device):
    """Flat buffers, one per dtype: ``[(leaf indices, flat tensor)]``."""
    for idx in _by_dtype(leaves).values():
        flat = torch.cat([leaves[i].detach().reshape(-1).to(dev) for i in idx])
        yield idx, flat


def _by_dtype(leaves: list) -> dict:
    """The indices of the tensor leaves, by dtype (in order of first appearance)."""
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            groups.setdefault(leaf.dtype, []).append(i)
    return groups


def _unbucket(flat: torch.Tensor, idx: list[int], leaves: list, out: list) -> None:
    offset = 0
    for i in idx:
        n = leaves[i].numel()
        out[i] = flat[offset:offset + n].view(leaves[i].shape).to(leaves[i].device)
        offset += n
