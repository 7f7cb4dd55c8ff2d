"""One benchmark configuration, run in its own process by ``benchmarks/run.py``.

    python benchmarks/worker.py CONFIG WORKLOAD [--quick]

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (  # noqa: E402
    WORKLOADS,
    emit,
    make_data,
    make_model,
    mlp_apply,
    settings,
    time_interleaved,
    time_steps,
)
from torch import nn  # noqa: E402


def scaled(s: dict, workload: str) -> dict:
    s = dict(s)
    if workload == "tiny":
        s["per_window"] *= 50
        s["warmup"] *= 20
    elif workload == "deep":
        s["per_window"] *= 4
        s["warmup"] *= 4
    return s


# ------------------------------------------------------------------ single process torch
def _module_step(model: nn.Module, opt: torch.optim.Optimizer, data: list):
    def step(i: int) -> float:
        x, y = data[i % 8]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        step.last = loss.item()
        return step.last

    return step


def torch_module_step(workload: str):
    model = make_model(workload)
    opt = torch.optim.SGD(model.parameters(), lr=WORKLOADS[workload]["lr"])
    return _module_step(model, opt, [make_data(workload, i) for i in range(8)])


def torch_func_step(workload: str):
    model = make_model(workload)
    params = {k: v.detach() for k, v in model.named_parameters()}
    lr = WORKLOADS[workload]["lr"]
    data = [make_data(workload, i) for i in range(8)]

    def loss_fn(p, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grad_and_value = torch.func.grad_and_value(loss_fn)
    state = {"p": params}

    def step(i: int) -> float:
        x, y = data[i % 8]
        g, loss = grad_and_value(state["p"], x, y)
        keys = list(g)
        new = torch._foreach_add([state["p"][k] for k in keys], [g[k] for k in keys],
                                 alpha=-lr)
        state["p"] = dict(zip(keys, new))
        return loss.item()

    return step


class _ThreadsStep:
    """The ceiling of thread-based data parallelism: the step written by hand for ``n``
    threads (the calling thread is device 0), with nothing of funcdp's.

    Each thread computes its shard's gradient with ``torch.autograd`` on one intra-op
    thread; after a barrier each averages and applies SGD to its ``1/n`` of every
    parameter's elements (into new tensors), and a second barrier hands back the new
    parameters. No checks, no pytrees, no random routing, no error handling: what
    funcdp's framework costs is the difference between this and funcdp's own step.
    """

    def __init__(self, workload: str, n: int) -> None:
        import threading

        self.n = n
        self.lr = WORKLOADS[workload]["lr"]
        self.per = WORKLOADS[workload]["batch"] // n
        self.params = [p.detach() for p in make_model(workload).parameters()]
        self.data = [make_data(workload, i) for i in range(8)]
        self.barrier = threading.Barrier(n)
        self.grads: list = [None] * n
        self.losses: list = [None] * n
        self.go = [threading.Semaphore(0) for _ in range(n)]
        self.done = threading.Semaphore(0)
        self.i = 0
        self.new: list = []
        # (A thread's first torch call takes the thread count last set by any thread: the
        # calling thread takes its own before the workers set theirs to 1.)
        torch.get_num_threads()
        for d in range(1, n):
            threading.Thread(target=self._worker, args=(d,), daemon=True).start()

    def _worker(self, d: int) -> None:
        torch.set_num_threads(1)
        while True:
            self.go[d].acquire()
            self._device(d)
            self.done.release()

    def _device(self, d: int) -> None:
        x, y = self.data[self.i % 8]
        x, y = x[d * self.per:(d + 1) * self.per], y[d * self.per:(d + 1) * self.per]
        ps = [p.detach().requires_grad_() for p in self.params]
        h = x
        for j in range(0, len(ps), 2):
            h = nn.functional.linear(h, ps[j], ps[j + 1])
            if j + 2 < len(ps):
                h = torch.relu(h)
        loss = nn.functional.cross_entropy(h, y)
        self.grads[d] = torch.autograd.grad(loss, ps)
        self.losses[d] = loss.detach()
        self.barrier.wait()
        for j, p in enumerate(self.params):
            numel = p.numel()
            part = slice(numel * d // self.n, numel * (d + 1) // self.n)
            acc = self.grads[0][j].view(-1)[part]
            for k in range(1, self.n):
                acc.add_(self.grads[k][j].view(-1)[part])
            acc.div_(self.n)
            torch.add(p.view(-1)[part], acc, alpha=-self.lr, out=self.new[j].view(-1)[part])
        self.barrier.wait()

    def __call__(self, i: int) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.i = i
            self.new = [torch.empty_like(p) for p in self.params]
            for d in range(1, self.n):
                self.go[d].release()
            self._device(0)
            for _ in range(1, self.n):
                self.done.acquire()
        finally:
            torch.set_num_threads(threads)
        self.params = self.new
        return float(sum(self.losses) / self.n)


def funcdp_step(workload: str, n: int | None = None, compiled: bool = False,
                two_rounds: bool = False, onednn: bool | None = None):
    """The quickstart's step (``value_and_update``); with ``two_rounds``, written out as
    ``value_and_grad`` and ``opt.step`` (the average and the update in rounds of their own);
    with ``onednn`` True or False, under that ``funcdp.config.onednn_linear`` (else the
    default, ``"auto"``)."""
    import funcdp
    from funcdp import optim

    devices = funcdp.local_devices()[:n] if n else funcdp.local_devices()
    n = len(devices)
    net = funcdp.nn.functional(make_model(workload))
    opt = optim.sgd(WORKLOADS[workload]["lr"])
    data = [tuple(funcdp.shard(t, n) for t in make_data(workload, i)) for i in range(8)]

    def loss_fn(p, x, y):
        if compiled:  # (net.apply is not code torch.compile can trace: it compiled nothing)
            return nn.functional.cross_entropy(mlp_apply(p, x), y)
        return nn.functional.cross_entropy(net.apply(p, {}, x)[0], y)

    # With `compiled`, torch.compile compiles the model's gradient; the collective and the
    # optimizer stay eager (compiling them too only adds graph breaks).
    value_and_grad = funcdp.value_and_grad(loss_fn, "batch", compile=compiled)
    value_and_update = funcdp.value_and_update(loss_fn, opt, "batch", compile=compiled)

    @funcdp.pmap(axis_name="batch", in_axes=(None, None, 0, 0), out_axes=None,
                 devices=devices)
    def train_step(params, opt_state, x, y):
        if not two_rounds:
            loss, params, opt_state = value_and_update(params, opt_state, x, y)
            return params, opt_state, loss
        loss, grads = value_and_grad(params, x, y)
        params, opt_state = opt.step(grads, opt_state, params, axis_name="batch")
        return params, opt_state, loss

    state = {"p": net.params, "s": opt.init(net.params)}
    if compiled:
        # Compile now (the step is pure: the state does not move), so that a missing
        # compiler shows here and the compilation stays out of the timed windows.
        train_step(state["p"], state["s"], *data[0])

    # (A context entered on every step: one that sets the option, or none.)
    def setting() -> contextlib.AbstractContextManager:
        if onednn is not None:
            return funcdp.config.override(onednn_linear=onednn)
        return contextlib.nullcontext()

    def step(i: int) -> float:
        x, y = data[i % 8]
        with setting():
            state["p"], state["s"], loss = train_step(state["p"], state["s"], x, y)
        return float(loss)

    return step


def torch_module(workload: str, quick: bool) -> dict:
    return time_steps(torch_module_step(workload), **scaled(settings(quick), workload))


def torch_func(workload: str, quick: bool) -> dict:
    return time_steps(torch_func_step(workload), **scaled(settings(quick), workload))


def funcdp_pmap(workload: str, quick: bool) -> dict:
    import funcdp

    out = time_steps(funcdp_step(workload), **scaled(settings(quick), workload))
    out["devices"] = funcdp.local_device_count()
    return out


def single_process(workload: str, quick: bool) -> dict:
    """torch, torch.func and funcdp over 1, 2 and 4 virtual devices, in one process with
    their timed windows interleaved (so that the machine's drifts hit them alike)."""
    steps = {"torch_module": torch_module_step(workload),
             "torch_func": torch_func_step(workload)}
    for n in (1, 2, 4):
        steps[f"funcdp_x{n}"] = funcdp_step(workload, n)
    for n in (1, 2):  # (with torch's products instead of those "auto" chose)
        steps[f"funcdp_x{n}_torch"] = funcdp_step(workload, n, onednn=False)
    steps["funcdp_x2_two_rounds"] = funcdp_step(workload, 2, two_rounds=True)
    steps["threads_x2"] = _ThreadsStep(workload, 2)
    skipped = None
    if workload == "mlp" and not quick:
        try:  # needs a C++ compiler; compiles during the warm-up (~20 s)
            steps["funcdp_x2_compiled"] = funcdp_step(workload, 2, compiled=True)
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            skipped = f"torch.compile unavailable: {type(e).__name__}: {e}"[:300]
    out = {"parts": time_interleaved(steps, **scaled(settings(quick), workload)),
           "ms_per_step": 0.0}
    if skipped:
        out["skipped"] = skipped
    return out


def funcdp_overhead(workload: str, quick: bool, sharded: bool = False) -> dict:
    """Per-call cost of pmap on a trivial function (dispatch, no real work); with
    ``sharded``, the argument is already on the devices (as jax_overhead's is)."""
    import funcdp

    n = funcdp.local_device_count()
    f = funcdp.pmap(lambda v: v + 1)
    x = torch.zeros(n, 4)
    if sharded:
        x = funcdp.pmap(lambda v: v)(x)
    s = settings(quick)

    def step(i: int) -> float:
        f(x)  # synchronous: the outputs exist when it returns
        return 1.0

    return time_steps(step, warmup=200, windows=s["windows"],
                      per_window=200 if quick else 2000)


# ------------------------------------------------------------------ DDP with gloo
def _ddp_proc(rank: int, world: int, port: int, workload: str, quick: bool, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model(workload))
    opt = torch.optim.SGD(model.parameters(), lr=WORKLOADS[workload]["lr"])
    per = WORKLOADS[workload]["batch"] // world
    data = [tuple(t[rank * per:(rank + 1) * per] for t in make_data(workload, i))
            for i in range(8)]
    local_step = _module_step(model, opt, data)

    def step(i: int) -> float:
        local_step(i)
        # The global loss, for the agreement check only (DDP itself does not need it).
        lv = torch.tensor(local_step.last)
        dist.all_reduce(lv)
        return lv.item() / world

    out = time_steps(step, **scaled(settings(quick), workload))
    dist.destroy_process_group()
    if rank == 0:
        q.put(out)


def ddp_gloo(workload: str, quick: bool) -> dict:
    import torch.multiprocessing as mp

    world = int(os.environ.get("BENCH_WORLD", 2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_proc, args=(r, world, port, workload, quick, q))
             for r in range(world)]
    for p in procs:
        p.start()
    out = q.get(timeout=600)
    for p in procs:
        p.join(60)
    out["processes"] = world
    return out


# ------------------------------------------------------------------ JAX
def _jax_setup(workload: str):
    import jax
    import jax.numpy as jnp

    model = make_model(workload)
    params = [(jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy()))
              for m in model if isinstance(m, nn.Linear)]

    def loss_fn(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return jax, jnp, params, loss_fn


def jax_pmap(workload: str, quick: bool) -> dict:
    jax, jnp, params, loss_fn = _jax_setup(workload)
    n = jax.local_device_count()
    lr = WORKLOADS[workload]["lr"]

    def train_step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grads = jax.lax.pmean(grads, "batch")
        loss = jax.lax.pmean(loss, "batch")
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    pstep = jax.pmap(train_step, axis_name="batch")
    place = jax.pmap(lambda v: v)  # pmap outputs stay sharded over the devices
    rep = place(jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), params))
    data = []
    for i in range(8):
        x, y = make_data(workload, i)
        data.append((place(jnp.asarray(x.numpy().reshape(n, -1, x.shape[1]))),
                     place(jnp.asarray(y.numpy().reshape(n, -1)))))
    state = {"p": rep}

    def step(i: int) -> float:
        x, y = data[i % 8]
        state["p"], loss = pstep(state["p"], x, y)
        return float(loss[0])

    out = time_steps(step, **scaled(settings(quick), workload))
    out["devices"] = n
    return out


def funcdp_overhead_sharded(workload: str, quick: bool) -> dict:
    return funcdp_overhead(workload, quick, sharded=True)


def jax_overhead(workload: str, quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    n = jax.local_device_count()
    f = jax.pmap(lambda v: v + 1)
    x = jax.pmap(lambda v: v)(jnp.zeros((n, 4)))
    s = settings(quick)

    def step(i: int) -> float:
        f(x).block_until_ready()
        return 1.0

    return time_steps(step, warmup=200, windows=s["windows"],
                      per_window=200 if quick else 2000)


def funcdp_allreduce(workload: str, quick: bool) -> dict:
    """psum of a 10M-element gradient-like pytree over the virtual devices."""
    import funcdp

    n = funcdp.local_device_count()
    shapes = [(2048, 2048), (2048,), (2048, 2048), (2048,), (1024, 1662), (1024,)]
    total = sum(torch.Size(s).numel() for s in shapes)
    tree = [torch.randn(n, *s) for s in shapes]
    f = funcdp.pmap(lambda t: funcdp.psum(t, "d"), axis_name="d", out_axes=None)
    s = settings(quick)
    res = time_steps(lambda i: f(tree)[0].shape[0], warmup=3, windows=s["windows"],
                     per_window=2 if quick else 10)
    # The floor: read n inputs and write one output at this machine's copy bandwidth.
    src = torch.randn(total)
    dst = torch.empty(total)
    for _ in range(3):
        dst.copy_(src)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    copy_s = (time.perf_counter() - start) / reps
    bandwidth = 2 * 4 * total / copy_s  # bytes read + written per second
    floor_ms = (n + 1) * 4 * total / bandwidth * 1e3
    res.update({"elements": total, "devices": n, "floor_ms": floor_ms,
                "bandwidth_gb_s": bandwidth / 1e9})
    return res


CONFIGS = {
    "single_process": single_process,
    "torch_module": torch_module,
    "torch_func": torch_func,
    "funcdp_pmap": funcdp_pmap,
    "funcdp_overhead": funcdp_overhead,
    "funcdp_overhead_sharded": funcdp_overhead_sharded,
    "funcdp_allreduce": funcdp_allreduce,
    "ddp_gloo": ddp_gloo,
    "jax_pmap": jax_pmap,
    "jax_overhead": jax_overhead,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    out = CONFIGS[a.config](a.workload, a.quick)
    out.update({"config": a.config, "workload": a.workload})
    emit(out)


if __name__ == "__main__":
    main()
