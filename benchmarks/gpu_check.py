"""The GPU check: GPU tests, equivalence checks and a short GPU benchmark, in one command.

    python benchmarks/gpu_check.py

On a machine with a CUDA GPU it (1) runs the GPU-marked tests (one device per GPU, and 4
logical devices per GPU), (2) runs the MLP training step with the batch scaled to the
GPU for: plain single-GPU torch, funcdp pmap over 1 device, funcdp over 4 logical
devices of one GPU, ``torch.func.vmap`` over 4 shards, and ``nn.DataParallel`` with
``device_ids=[0]``, checking that all compute the same losses, and prints one table.
Without a GPU it says so and exits 0. Meant to finish within 5 minutes.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP = r"""
import os, sys, time, json, torch
from torch import nn
import funcdp
from funcdp import optim
mode, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                      nn.Linear(1024, 10)).cuda()
g = torch.Generator().manual_seed(1)
x = torch.randn(batch, 784, generator=g).cuda()
y = torch.randint(0, 10, (batch,), generator=g).cuda()
lr = 0.01
if mode in ("torch", "dataparallel"):
    m = nn.DataParallel(model, device_ids=[0]) if mode == "dataparallel" else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    def step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss
else:
    net = funcdp.nn.functional(model)
    sgd = optim.sgd(lr)
    def loss_fn(p, xb, yb):
        return nn.functional.cross_entropy(net.apply(p, {}, xb)[0], yb)
    state = {"p": net.params, "s": sgd.init(net.params)}
    if mode == "vmap":
        def shard_grads(p, xs, ys):
            gv = torch.func.grad_and_value(loss_fn)
            return torch.func.vmap(gv, in_dims=(None, 0, 0))(p, xs, ys)
        xs, ys = x.reshape(4, -1, 784), y.reshape(4, -1)
        def step():
            gr, loss = shard_grads(state["p"], xs, ys)
            gr = {k: v.mean(0) for k, v in gr.items()}
            state["p"], state["s"] = sgd.step(gr, state["s"], state["p"])
            return loss.mean()
    else:
        n = funcdp.local_device_count()
        @funcdp.pmap(axis_name="b", in_axes=(None, None, 0, 0), out_axes=None)
        def train_step(p, s, xb, yb):
            loss, gr = funcdp.value_and_grad(loss_fn, "b")(p, xb, yb)
            p, s = sgd.step(gr, s, p)
            return p, s, loss
        xs, ys = x.reshape(n, -1, 784), y.reshape(n, -1)
        def step():
            state["p"], state["s"], loss = train_step(state["p"], state["s"], xs, ys)
            return loss
losses = [float(step()) for _ in range(3)]
for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(steps):
    step()
torch.cuda.synchronize()
ms = (time.perf_counter() - t) / steps * 1e3
print("RESULT " + json.dumps({"ms": ms, "losses": losses,
                              "peak_mb": torch.cuda.max_memory_allocated() / 2**20}))
"""


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check.")
        return 0
    name = torch.cuda.get_device_name(0)
    print(f"gpu_check on {name}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}", flush=True)
    ok = True
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                            "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT)
    ok &= tests.returncode == 0
    batch = int(os.environ.get("GPU_CHECK_BATCH", 8192))
    steps = int(os.environ.get("GPU_CHECK_STEPS", 30))
    configs = [("plain torch, 1 GPU", "torch", {}),
               ("funcdp pmap, 1 device", "funcdp", {"FUNCDP_PLATFORM": "cuda"}),
               ("funcdp pmap, 4 logical devices", "funcdp",
                {"FUNCDP_PLATFORM": "cuda", "FUNCDP_DEVICES_PER_GPU": "4"}),
               ("torch.func.vmap, 4 shards", "vmap", {"FUNCDP_PLATFORM": "cuda"}),
               ("nn.DataParallel(device_ids=[0])", "dataparallel", {})]
    rows = []
    for label, mode, env in configs:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
        full.update(env)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STEP, mode, str(batch), str(steps)],
                             env=full, capture_output=True, text=True, timeout=600)
        res = None
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
        if res is None:
            print(f"{label}: FAILED\n{out.stderr[-2000:]}")
            ok = False
            continue
        res["label"] = label
        res["wall_s"] = time.perf_counter() - start
        rows.append(res)
    if rows:
        base = rows[0]
        print(f"\n| configuration (batch {batch}) | ms / step | vs plain torch | peak MB | "
              f"losses agree |\n|---|---:|---:|---:|:---:|")
        for r in rows:
            agree = all(abs(a - b) <= 1e-3 * max(1, abs(b))
                        for a, b in zip(r["losses"], base["losses"]))
            ok &= agree
            print(f"| {r['label']} | {r['ms']:.2f} | {base['ms'] / r['ms']:.2f}x | "
                  f"{r['peak_mb']:.0f} | {'yes' if agree else 'NO'} |")
    print("\ngpu_check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
