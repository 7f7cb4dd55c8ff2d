"""The GPU check: GPU tests, equivalence checks and a short GPU benchmark, in one command.

    python benchmarks/gpu_check.py                # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu          # a dry run of the benchmark on the CPU

On a machine with a CUDA GPU it (1) runs the GPU-marked tests (one device per GPU, and 4
logical devices per GPU), (2) runs the MLP training step with the batch scaled to the
GPU in every configuration of ``CONFIGS`` (plain torch, ``nn.DataParallel``, DDP over
NCCL, ``funcdp.DataParallel``, funcdp ``pmap`` over 1 device, over 4 logical devices of
one GPU and over 4 shards of one device, and ``torch.func.vmap`` over 4 shards), checks
that all compute the same losses, and prints one table (written to ``--out`` as
markdown, JSON and a PNG chart when given). Without a GPU it says so and exits 0. Meant to finish
within 5 minutes.

``--cpu`` runs the same configurations on the CPU with a small batch (virtual CPU
devices stand for the logical GPU devices, gloo for NCCL) and checks only that they
agree: CI runs it, so that the script works on the day a GPU is there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One configuration's training step, run in a process of its own:
#   python -c STEP <mode> <device: cuda|cpu> <global batch> <timed steps>
STEP = r"""
import os, socket, statistics, sys, time, json, torch
from torch import nn
import funcdp
from funcdp import optim
mode, dev, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                      nn.Linear(1024, 10)).to(dev)
g = torch.Generator().manual_seed(1)
x = torch.randn(batch, 784, generator=g).to(dev)
y = torch.randint(0, 10, (batch,), generator=g).to(dev)
lr = 0.01
if mode in ("torch", "dataparallel", "ddp", "funcdp_dataparallel"):
    if mode == "dataparallel":
        m = nn.DataParallel(model, device_ids=[0] if cuda else None)
    elif mode == "funcdp_dataparallel":
        m = funcdp.DataParallel(model)
    elif mode == "ddp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             init_method=f"tcp://127.0.0.1:{port}",
                                             rank=0, world_size=1)
        m = nn.parallel.DistributedDataParallel(model, device_ids=[0] if cuda else None)
    else:
        m = model
    opt = torch.optim.SGD(m.parameters(), lr=lr)
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
        # "funcdp": one shard per device; "funcdp_shards": 4 shards, more than devices.
        n = 4 if mode == "funcdp_shards" else funcdp.local_device_count()
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
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
windows = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    windows.append((time.perf_counter() - t) / steps * 1e3)
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
print("RESULT " + json.dumps({"ms": statistics.median(windows), "losses": losses,
                              "peak_mb": peak, "devices": funcdp.local_device_count()}))
"""

# (label, mode, the environment on a GPU machine, the environment of the CPU dry run)
CONFIGS = [
    ("plain torch", "torch", {}, {}),
    ("nn.DataParallel(device_ids=[0])", "dataparallel", {}, {}),
    ("DDP, 1 process (NCCL; gloo on the CPU)", "ddp", {}, {}),
    ("funcdp.DataParallel, 1 device", "funcdp_dataparallel", {"FUNCDP_PLATFORM": "cuda"},
     {"FUNCDP_NUM_CPU_DEVICES": "1"}),
    ("funcdp pmap, 1 device", "funcdp", {"FUNCDP_PLATFORM": "cuda"},
     {"FUNCDP_NUM_CPU_DEVICES": "1"}),
    ("funcdp pmap, 4 logical devices", "funcdp",
     {"FUNCDP_PLATFORM": "cuda", "FUNCDP_DEVICES_PER_GPU": "4"},
     {"FUNCDP_NUM_CPU_DEVICES": "4"}),
    ("funcdp pmap, 4 shards on 1 device", "funcdp_shards", {"FUNCDP_PLATFORM": "cuda"},
     {"FUNCDP_NUM_CPU_DEVICES": "1"}),
    ("torch.func.vmap, 4 shards", "vmap", {}, {}),
]


def run_config(mode: str, env: dict, device: str, batch: int, steps: int) -> tuple[dict | None,
                                                                                   str]:
    """Runs one configuration in a fresh process: (its result, or None; its stderr)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", STEP, mode, device, str(batch), str(steps)],
                         env=full, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), out.stderr
    return None, out.stdout[-1000:] + out.stderr[-3000:]


def table(rows: list[dict], batch: int, device: str) -> tuple[str, bool]:
    """The markdown table of ``rows`` (the first is the baseline), and whether every
    configuration computed the baseline's losses."""
    base = rows[0]
    ok = True
    lines = [f"| configuration ({device}, batch {batch}) | steps / s | ms / step | "
             f"vs plain torch | peak MB | losses agree |", "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        agree = all(abs(a - b) <= 1e-3 * max(1, abs(b))
                    for a, b in zip(r["losses"], base["losses"]))
        ok &= agree
        lines.append(f"| {r['label']} | {1e3 / r['ms']:.1f} | {r['ms']:.2f} | "
                     f"{base['ms'] / r['ms']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {'yes' if agree else 'NO'} |")
    return "\n".join(lines), ok


def chart(rows: list[dict], batch: int, device: str, path: Path) -> None:
    """A bar chart of the configurations' steps per second (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("gpu_check: matplotlib is not installed; no chart.")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["label"] for r in rows]
    ax.barh(names, [1e3 / r["ms"] for r in rows],
            color=["tab:blue" if n.startswith("funcdp") else "tab:gray" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("steps / s (higher is better)")
    ax.set_title(f"MLP training step, batch {batch}, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="dry run on the CPU: small batch, agreement only")
    parser.add_argument("--out", type=Path, default=None,
                        help="a folder to write gpu_results.md, .json and .png to")
    args = parser.parse_args(argv)
    ok = True
    if args.cpu:
        device, batch, steps = "cpu", 64, 1
        print("gpu_check --cpu: the GPU benchmark's configurations on the CPU "
              "(agreement only; timings mean nothing here)", flush=True)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; nothing to check.")
            return 0
        device = "cuda"
        print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}", flush=True)
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT)
        ok &= tests.returncode == 0
        batch = int(os.environ.get("GPU_CHECK_BATCH", 8192))
        steps = int(os.environ.get("GPU_CHECK_STEPS", 10))
    rows = []
    for label, mode, gpu_env, cpu_env in CONFIGS:
        start = time.perf_counter()
        res, err = run_config(mode, cpu_env if args.cpu else gpu_env, device, batch, steps)
        if res is None:
            print(f"{label}: FAILED\n{err}", flush=True)
            ok = False
            continue
        res.update(label=label, wall_s=time.perf_counter() - start)
        rows.append(res)
        print(f"  {label}: {res['ms']:.2f} ms/step ({res['wall_s']:.0f} s)", flush=True)
    if rows:
        text, agree = table(rows, batch, device)
        ok &= agree and rows[0]["label"] == CONFIGS[0][0]
        print("\n" + text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_results.md").write_text(text + "\n")
            machine = (torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
            chart(rows, batch, device, args.out / "gpu_results.png")
            (args.out / "gpu_results.json").write_text(json.dumps(
                {"machine": machine, "torch": torch.__version__, "batch": batch,
                 "median_of": 5, "date": datetime.date.today().isoformat(), "rows": rows},
                indent=1))
    print("\ngpu_check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
