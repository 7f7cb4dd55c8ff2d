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
import os
import time
from typing import Any

import torch

from funcdp._src import devices as devices_mod
from funcdp._src import tree as tree_util
from funcdp._src.api_util import public_in
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


_info: ProcessInfo | None = None


def info() -> ProcessInfo | None:
    return _info


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


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
        ValueError: missing or inconsistent settings, with the variable to set.
        RuntimeError: if called twice.

    Examples:
        In each process (``torchrun --standalone --nproc-per-node=2 train.py``):

            funcdp.distributed.initialize()
            funcdp.process_count()   # 2
            funcdp.devices()         # every device of both processes
    """
    global _info
    import torch.distributed as dist

    if _info is not None:
        raise RuntimeError("funcdp.distributed.initialize: already initialized; call "
                           "funcdp.distributed.shutdown() first to start again.")
    rank = rank if rank is not None else _env_int("RANK")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
    if rank is None or world_size is None:
        raise ValueError("funcdp.distributed.initialize: `rank` and `world_size` are not set; "
                         "launch with torchrun (which sets RANK and WORLD_SIZE) or pass "
                         "rank=... and world_size=....")
    if not 0 <= rank < world_size:
        raise ValueError(f"funcdp.distributed.initialize: rank {rank} is out of range for "
                         f"world_size {world_size}.")
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ValueError(f"funcdp.distributed.initialize: environment variable `{var}` is "
                             f"not set; torchrun sets it, or pass master_addr/master_port.")
    local = devices_mod.local_devices()
    platform = local[0].platform
    if backend is None:
        backend = "nccl" if platform == "cuda" else "gloo"
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        kwargs: dict = {}
        if backend == "nccl":
            kwargs["device_id"] = local[0].torch_device
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                **kwargs)
    counts: list[Any] = [None] * world_size
    dist.all_gather_object(counts, (len(local), platform))
    platforms = {p for _, p in counts}
    if len(platforms) > 1:
        raise RuntimeError(f"funcdp.distributed.initialize: processes have different device "
                           f"platforms {sorted(platforms)}; all must use CPUs or all GPUs.")
    local_counts = [n for n, _ in counts]
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


@_public
def shutdown() -> None:
    """Leaves the process group (the run's end).

    Every process should call it: the processes wait for each other first, since one
    that tears its connections down while others still use them can crash on exit.
    """
    global _info
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
            _leave_together(dist)
        except RuntimeError:  # a peer is already gone: nothing left to wait for
            pass
        dist.destroy_process_group()
    _info = None
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
    import torch.distributed as dist

    _require("barrier")
    dist.barrier()


@_public
def broadcast(tree: Any, src: int = 0) -> Any:
    """Every process receives process ``src``'s ``tree`` (e.g. initial parameters).

    Returns new tensors (the input is not modified); one collective per dtype.

    Examples:
        ``params = funcdp.distributed.broadcast(params)`` right after initialisation, so
        that every process starts from process 0's random initialisation.
    """
    import torch.distributed as dist

    info = _require("broadcast")
    if not 0 <= src < info.count:
        raise ValueError(f"funcdp.distributed.broadcast: `src` {src} is out of range for "
                         f"{info.count} processes.")
    from funcdp._src.sharded import ShardedValue

    leaves, spec = tree_util.tree_flatten(tree)
    # Sharded values (replicated parameters, say) are broadcast as their gathered value.
    leaves = [x.to_tensor() if isinstance(x, ShardedValue) else x for x in leaves]
    dev = _device_for_comm(info)
    out = list(leaves)
    for idx, flat in _buckets(leaves, dev):
        dist.broadcast(flat, src)
        _unbucket(flat, idx, leaves, out)
    return tree_util.tree_unflatten(out, spec)


@_public
def process_allgather(tree: Any) -> Any:
    """Gathers a value from every process: each leaf gets a new leading process axis.

    Sharded values are gathered locally first. Shapes must agree across processes.
    """
    import torch.distributed as dist

    from funcdp._src.sharded import ShardedValue

    info = _require("process_allgather")
    leaves, spec = tree_util.tree_flatten(tree)
    dev = _device_for_comm(info)
    out: list[torch.Tensor | None] = []
    for leaf in leaves:
        if leaf is None:  # (as broadcast passes it)
            out.append(None)
            continue
        t = leaf.to_tensor() if isinstance(leaf, ShardedValue) else torch.as_tensor(leaf)
        t = t.detach().to(dev).contiguous()
        parts = [torch.empty_like(t) for _ in range(info.count)]
        dist.all_gather(parts, t)
        out.append(torch.stack([p.to(leaf.device if isinstance(leaf, torch.Tensor)
                                     else "cpu") for p in parts]))
    return tree_util.tree_unflatten(out, spec)


@_public
def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """``funcdp.save_checkpoint`` on process 0 only, then a barrier.

    Every process must call it (it synchronises); only process 0 writes the file.
    """
    from funcdp._src.checkpoint import save_checkpoint as save

    info = _require("save_checkpoint")
    if info.index == 0:
        save(path, state)
    barrier()


def _buckets(leaves: list, dev: torch.device):
    """Flat buffers, one per dtype: ``[(leaf indices, flat tensor)]``."""
    by_dtype: dict = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            by_dtype.setdefault(leaf.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([leaves[i].detach().reshape(-1).to(dev) for i in idx])
        yield idx, flat


def _unbucket(flat: torch.Tensor, idx: list[int], leaves: list, out: list) -> None:
    offset = 0
    for i in idx:
        n = leaves[i].numel()
        out[i] = flat[offset:offset + n].view(leaves[i].shape).to(leaves[i].device)
        offset += n
