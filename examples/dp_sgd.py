"""DP-SGD on the digits data: per-example gradients, clipping and noise, data-parallel.

    python examples/dp_sgd.py

Inside pmap each device computes per-example gradients with ``torch.func.vmap(grad(...))``,
clips each to ``--clip``, sums them, and the devices add up their sums with ``psum``;
Gaussian noise is added before the average, from a generator seeded the same way on every
device, so that all devices add the same noise and stay in sync. The script checks one
step against the same computation on a single device.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FUNCDP_NUM_CPU_DEVICES", "4")

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

import funcdp  # noqa: E402
from funcdp import optim  # noqa: E402


def per_example_clipped_sum(loss_fn, params, x, y, clip):
    per = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    scale = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return {k: (g * scale.view(-1, *[1] * (g.ndim - 1))).sum(0) for k, g in per.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.5, help="noise multiplier")
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args(argv)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = funcdp.nn.functional(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)))
    n = funcdp.local_device_count()
    opt = optim.sgd(args.lr)

    def loss_fn(params, xi, yi):
        logits, _ = net.apply(params, {}, xi.unsqueeze(0))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    def noisy_mean(params, xb, yb, noise_seed):
        total = funcdp.psum(per_example_clipped_sum(loss_fn, params, xb, yb, args.clip), "d")
        gen = torch.Generator().manual_seed(int(noise_seed))
        noise = {k: torch.randn(v.shape, generator=gen) * args.noise * args.clip
                 for k, v in total.items()}
        count = funcdp.psum(xb.shape[0], "d")
        return {k: (total[k] + noise[k]) / count for k in total}

    @funcdp.pmap(axis_name="d", in_axes=(None, None, 0, 0, None), out_axes=None)
    def step(params, state, xb, yb, seed):
        g = noisy_mean(params, xb, yb, seed)
        updates, state = opt.update(g, state, params)
        return optim.apply_updates(params, updates), state

    params, state = net.params, opt.init(net.params)
    # Check one step against a single-device computation.
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    got, _ = step(params, state, funcdp.shard(xb, n), funcdp.shard(yb, n), 123)
    one = per_example_clipped_sum(loss_fn, params, xb, yb, args.clip)
    gen = torch.Generator().manual_seed(123)
    ref_g = {k: (v + torch.randn(v.shape, generator=gen) * args.noise * args.clip) / len(xb)
             for k, v in one.items()}
    ref = optim.apply_updates(params, opt.update(ref_g, state, params)[0])
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(f"one DP-SGD step on {n} devices vs one device: max difference {diff:.2e}")
    for t in range(args.steps):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(t))[
            : args.batch_size]
        params, state = step(params, state, funcdp.shard(x[idx], n), funcdp.shard(y[idx], n),
                             1000 + t)
    logits, _ = net.apply(params, {}, x)
    acc = (logits.argmax(1) == y).float().mean().item()
    print(f"after {args.steps} DP-SGD steps: training accuracy {100 * acc:.1f}%")
    return 0 if diff < 1e-5 and acc > 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
