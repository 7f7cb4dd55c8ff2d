"""Shared pieces of the benchmarks: the model, the data, timing and memory."""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

# The two workloads of the performance issue.
WORKLOADS = {
    "mlp": {"sizes": [784, 1024, 1024, 10], "batch": 256, "lr": 0.01},
    "tiny": {"sizes": [32, 32, 10], "batch": 16, "lr": 0.01},
    # Many small layers (102 parameter tensors): a step whose cost is Python, not kernels.
    "deep": {"sizes": [64] * 51 + [10], "batch": 32, "lr": 0.01},
}


def make_model(workload: str) -> nn.Module:
    torch.manual_seed(0)
    sizes = WORKLOADS[workload]["sizes"]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def mlp_apply(params: dict, x: torch.Tensor) -> torch.Tensor:
    """``make_model(...)(x)`` as a pure function of its parameters (``"0.weight"``,
    ``"0.bias"``, ``"2.weight"``...): code torch.compile can trace."""
    n = len(params) // 2
    for k in range(n):
        x = nn.functional.linear(x, params[f"{2 * k}.weight"], params[f"{2 * k}.bias"])
        if k < n - 1:
            x = torch.relu(x)
    return x


def make_data(workload: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic data from a fixed seed (the same batch sequence for every peer)."""
    w = WORKLOADS[workload]
    g = torch.Generator().manual_seed(1000 + step % 8)
    x = torch.randn(w["batch"], w["sizes"][0], generator=g)
    y = torch.randint(0, w["sizes"][-1], (w["batch"],), generator=g)
    return x, y


def time_steps(step: Callable[[int], float], warmup: int, windows: int,
               per_window: int) -> dict:
    """Runs ``step(i)`` (returning the loss); median of ``windows`` timed windows."""
    losses = []
    i = 0
    for _ in range(warmup):
        losses.append(step(i))
        i += 1
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            step(i)
            i += 1
        times.append((time.perf_counter() - start) / per_window)
    med = statistics.median(times)
    return {"ms_per_step": med * 1e3, "steps_per_s": 1.0 / med,
            "spread": (max(times) - min(times)) / med, "first_losses": losses[:3]}


# The pause before each interleaved window (see time_interleaved).
SETTLE_S = float(os.environ.get("BENCH_SETTLE_S", 0.05))


def time_interleaved(steps: dict[str, Callable[[int], float]], warmup: int, windows: int,
                     per_window: int) -> dict[str, dict]:
    """Like :func:`time_steps` for several steps in one process, their timed windows
    interleaved, so that slow drifts of the machine hit them all alike; the median window
    of each is reported.

    A window runs slower depending on what ran just before it: torch's intra-op threads
    (OpenMP) keep spinning for a while after a parallel region, and took about 5 % from
    the window of a configuration with one thread per device that followed a two-thread
    one (measured on 2 cores). So every window starts after a pause (``SETTLE_S``), and
    the order of the configurations is shuffled from one round of windows to the next
    (seeded), instead of the same configurations always following the same others."""
    losses: dict[str, list] = {k: [] for k in steps}
    counters = dict.fromkeys(steps, 0)
    for name, step in steps.items():
        for _ in range(warmup):
            losses[name].append(step(counters[name]))
            counters[name] += 1
    times: dict[str, list] = {k: [] for k in steps}
    names = list(steps)
    order = random.Random(0)
    for _ in range(windows):
        order.shuffle(names)
        for name in names:
            step = steps[name]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            for _ in range(per_window):
                step(counters[name])
                counters[name] += 1
            times[name].append((time.perf_counter() - start) / per_window)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"ms_per_step": med * 1e3, "steps_per_s": 1.0 / med,
                     "spread": (max(ts) - min(ts)) / med, "first_losses": losses[name][:3]}
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Workers print one JSON line that the runner parses."""
    result["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def settings(quick: bool) -> dict:
    if quick:
        return {"warmup": 3, "windows": 2, "per_window": 2}
    return {"warmup": int(os.environ.get("BENCH_WARMUP", 5)),
            "windows": int(os.environ.get("BENCH_WINDOWS", 8)),
            "per_window": int(os.environ.get("BENCH_PER_WINDOW", 10))}
