"""One process of a multi-process test (started by tests/test_distributed.py).

    python tests/distributed_worker.py SCENARIO OUT_DIR

RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and FUNCDP_NUM_CPU_DEVICES come from the
environment, as torchrun would set them. Results go to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
from torch import nn

import funcdp
from funcdp import optim
from funcdp._src import onednn

AX = "i"


def global_input(total: int) -> torch.Tensor:
    return torch.arange(total * 4 * 3, dtype=torch.float64).reshape(total, 4, 3) / 7 - 3


def collectives_fn(v):
    n = funcdp.axis_size(AX)
    ring = [(j, (j + 1) % n) for j in range(n)]
    groups = [list(range(0, n, 2)), list(range(1, n, 2))] if n > 1 else [[0]]
    return {
        "psum": funcdp.psum(v, AX),
        "pmean": funcdp.pmean(v, AX),
        "pmax": funcdp.pmax(v, AX),
        "pmin": funcdp.pmin(v, AX),
        "gather": funcdp.all_gather(v, AX),
        "gather_tiled": funcdp.all_gather(v, AX, axis=1, tiled=True),
        "scatter": funcdp.psum_scatter(v.reshape(-1)[:n], AX) if v.numel() >= n else v.sum(),
        "scatter_tiled": funcdp.psum_scatter(v.reshape(-1)[: n * 2], AX, tiled=True),
        "ppermute": funcdp.ppermute(v, AX, ring),
        "pshuffle": funcdp.pshuffle(v, AX, list(reversed(range(n)))),
        "all_to_all": funcdp.all_to_all(v.reshape(-1)[:n].repeat(2, 1).T, AX, 0, 0),
        "pbroadcast": funcdp.pbroadcast(v, AX, n - 1),
        "index": funcdp.axis_index(AX),
        "size": torch.tensor(n),
        "grouped": funcdp.psum(v, AX, axis_index_groups=groups),
        "scalar": torch.tensor(funcdp.psum(1, AX)),
    }


def loss_fn(net, params, x, y):
    return ((net.apply(params, {}, x)[0] - y) ** 2).mean()


def make_net():
    torch.manual_seed(0)
    return funcdp.nn.functional(nn.Sequential(nn.Linear(3, 8), nn.Tanh(),
                                              nn.Linear(8, 2)).double())


def train(net, local_x, local_y, steps=3, one_call=False):
    """Adam steps; with ``one_call``, written with ``funcdp.value_and_update``."""
    opt = optim.adam(1e-2)
    value_and_update = funcdp.value_and_update(lambda p, x, y: loss_fn(net, p, x, y), opt, AX)

    @funcdp.pmap(axis_name=AX, in_axes=(None, None, 0, 0), out_axes=None)
    def step(p, s, x, y):
        if one_call:
            loss, p, s = value_and_update(p, s, x, y)
            return p, s, loss
        loss, g = funcdp.value_and_grad(lambda p: loss_fn(net, p, x, y), AX)(p)
        p, s = opt.step(g, s, p)
        return p, s, loss

    p, s = net.params, opt.init(net.params)
    losses = []
    for _ in range(steps):
        p, s, loss = step(p, s, local_x, local_y)
        losses.append(loss)
    return p, torch.stack(losses)


def train_data(total):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(total, 5, 3, generator=g, dtype=torch.float64),
            torch.randn(total, 5, 2, generator=g, dtype=torch.float64))


def outcome(fn):
    """``("ok", value)``, or the exception's type name and message."""
    try:
        return "ok", fn()
    except BaseException as e:  # noqa: BLE001 - recorded for the test (interrupts too)
        return type(e).__name__, str(e)


def fails_on(device: int, after: bool = False):
    """A psum whose device ``device`` raises before (or ``after``) reaching it."""
    def f(v):
        if not after and funcdp.axis_index(AX) == device:
            raise ValueError(f"device {device} fails")
        s = funcdp.psum(v, AX)
        if after and funcdp.axis_index(AX) == device:
            raise ValueError(f"device {device} fails after the psum")
        return s

    return funcdp.pmap(f, axis_name=AX)


def recover(out_dir: str, psum_all, result: dict) -> None:
    """Failures on one process (pmap, broadcast, process_allgather, save_checkpoint):
    clear errors on every process, which then go on. Run with devices [1, 3]."""
    rank, k = funcdp.process_index(), funcdp.local_device_count()
    # A pmap called before initialize spans the processes after it.
    result["stale_plan"] = torch.as_tensor(psum_all(torch.ones(k)))
    # Process 1's device 3 raises while its devices 1 and 2 wait for the psum; then
    # process 0's only device raises; then a device raises after the psum.
    result["raise_local_round"] = outcome(lambda: fails_on(3)(torch.ones(k)))
    result["raise_only_device"] = outcome(lambda: fails_on(0)(torch.ones(k)))
    result["raise_after"] = outcome(lambda: torch.as_tensor(fails_on(3, True)(torch.ones(k))))
    result["after"] = torch.as_tensor(psum_all(torch.full((k,), 100.0)))
    # Process 1's call fails before its devices run (a wrong mapped size): process 0's
    # psum fails, and the next calls pair as they should (they were one call apart).
    result["raise_before_devices"] = outcome(lambda: psum_all(torch.ones(k + rank)))
    result["after_before_devices"] = torch.as_tensor(psum_all(torch.full((k,), 10.0)))
    # A device raising after the last collective, in a plan whose calls are known to
    # make one: raised at once, with no one to tell (the other process is busy meanwhile).
    failing = [False]

    def psum_then_fail(v):
        s = funcdp.psum(v, AX)
        if failing[0] and funcdp.axis_index(AX) == 3:
            raise ValueError("device 3 fails after the psum")
        return s

    later = funcdp.pmap(psum_then_fail, axis_name=AX)
    later(torch.ones(k))
    failing[0] = True
    start = time.monotonic()
    result["raise_after_known"] = outcome(lambda: torch.as_tensor(later(torch.ones(k))))
    result["raise_after_known_s"] = time.monotonic() - start
    if rank == 0:
        time.sleep(2)
    # A Ctrl-C in process 0 (one device: its main thread makes the exchange) while it
    # waits in a psum for process 1: raised once the psum is complete; process 1 gets its
    # sum, and the next call pairs as it should.
    psum_all(torch.ones(k))  # (both processes here)
    if rank == 0:
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    else:
        time.sleep(1.5)
    result["interrupted"] = outcome(lambda: torch.as_tensor(psum_all(torch.ones(k))))
    result["after_interrupt"] = torch.as_tensor(psum_all(torch.full((k,), 1000.0)))
    bcast = funcdp.distributed.broadcast
    result["bcast_shape"] = outcome(lambda: bcast(
        {"w": torch.zeros(2, 3) if rank == 0 else torch.zeros(3, 2)}))
    result["bcast_dtype"] = outcome(lambda: bcast(
        torch.zeros(4) if rank == 0 else torch.zeros(4, dtype=torch.float64)))
    out = funcdp.pmap(lambda v: v * 1, axis_name=AX)(torch.full((k, 2), rank + 1.0))
    gather = funcdp.distributed.process_allgather
    result["gather_stack"] = outcome(lambda: gather(out))
    result["gather_tiled"] = gather({"x": out, "n": None}, tiled=True)
    result["ckpt"] = outcome(lambda: funcdp.distributed.save_checkpoint(
        os.path.join(out_dir, "missing", "ckpt.pt"), {"p": torch.ones(2)}))
    result["bcast_after"] = bcast(torch.full((2,), float(rank)), src=1)
    funcdp.distributed.shutdown()
    # After shutdown, the same pmap runs on this process's devices only again.
    after = psum_all(torch.ones(k))
    result["after_shutdown"] = (torch.as_tensor(after), [d.id for d in after.devices])


def main() -> int:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    if scenario == "recover":  # a pmap called before initialize (a warm-up, say)
        psum_all = funcdp.pmap(lambda v: funcdp.psum(v, AX), axis_name=AX)
        psum_all(torch.ones(funcdp.local_device_count()))
    funcdp.distributed.initialize(timeout=float(os.environ.get("TEST_TIMEOUT", "60")))
    rank = funcdp.process_index()
    k = funcdp.local_device_count()
    total = funcdp.device_count()
    offset = funcdp.local_devices()[0].id
    result: dict = {"devices": [d.id for d in funcdp.devices()], "offset": offset,
                    # onednn_linear="auto": chosen by the processes together at initialize.
                    "onednn": (onednn.decided(), onednn._choice)}
    if scenario == "collectives":
        x = global_input(total)[offset:offset + k]
        out = funcdp.pmap(collectives_fn, axis_name=AX)(x)
        result["out"] = {key: torch.as_tensor(v) for key, v in out.items()}
        # gradients across processes: d/dx of sum(psum(x)^2 * w)
        w = torch.arange(total, dtype=torch.float64)[offset:offset + k]
        xr = x.clone().requires_grad_()
        f = funcdp.pmap(lambda v, wi: (funcdp.psum(v, AX) ** 2).sum() * wi, axis_name=AX)
        f(xr, w).sum().backward()
        result["grad"] = xr.grad
    elif scenario == "train":
        net = make_net()
        x, y = train_data(total)
        p, losses = train(net, x[offset:offset + k], y[offset:offset + k])
        result["params"] = p
        result["losses"] = losses
        result["one_call"] = train(net, x[offset:offset + k], y[offset:offset + k],
                                   one_call=True)
        # helpers
        mine = {"w": torch.full((2,), float(rank))}
        result["broadcast"] = funcdp.distributed.broadcast(mine, src=1)["w"]
        result["allgather"] = funcdp.distributed.process_allgather(torch.tensor([rank]))
        funcdp.distributed.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {"p": p})
        funcdp.distributed.barrier()
    elif scenario == "fail":
        def f(v):
            if funcdp.process_index() == 1:
                raise ValueError("process 1 failed on purpose")
            return funcdp.psum(v, AX)

        funcdp.pmap(f, axis_name=AX)(torch.ones(k))
    elif scenario == "mismatch":
        def g(v):
            if funcdp.process_index() == 1:
                return funcdp.psum(v[:1], AX)
            return funcdp.psum(v, AX)

        funcdp.pmap(g, axis_name=AX)(torch.ones(k, 2))
    elif scenario == "edges":
        # An in-place write to a large shared result is reported, as in one process.
        def write(v):
            y = funcdp.psum(v.expand(5000).clone(), AX)
            y.add_(funcdp.axis_index(AX).to(y.dtype))
            return y[:1]

        try:
            funcdp.pmap(write, axis_name=AX)(torch.ones(k))
            result["inplace"] = "no error"
        except funcdp.CollectiveError as e:
            result["inplace"] = str(e)
        # In a nested pmap: a collective over the process-spanning axis alone goes across
        # processes; one over both axes is refused at once (not left to time out).
        def nested(v, axes):
            return funcdp.pmap(lambda u: funcdp.psum(u, axes), axis_name="j")(v[None] + 1)

        x = torch.arange(float(offset), float(offset + k))
        result["nested_i"] = torch.as_tensor(
            funcdp.pmap(lambda v: nested(v, AX), axis_name=AX)(x))
        start = time.monotonic()
        try:
            funcdp.pmap(lambda v: nested(v, (AX, "j")), axis_name=AX)(x)
            result["nested"] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the test
            result["nested"] = f"{type(e).__name__}: {e}"
        result["nested_s"] = time.monotonic() - start
        result["gathered"] = funcdp.distributed.process_allgather(
            {"none": None, "rank": torch.tensor(rank)})
        # Processes mapping different numbers of shards per device disagree on the axis.
        try:
            m = 2 * k if rank == 0 else k
            funcdp.pmap(lambda v: funcdp.pmean(v, AX), axis_name=AX)(torch.ones(m))
            result["shards"] = "no error"
        except funcdp.CollectiveError as e:
            result["shards"] = str(e)
    elif scenario == "recover":
        recover(out_dir, psum_all, result)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        return 0
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    funcdp.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
