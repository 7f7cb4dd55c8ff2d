"""A small CNN with BatchNorm on the digits data, BatchNorm synchronised across devices.

    python examples/sync_batchnorm.py

``funcdp.nn.functional(model, sync_batchnorm="batch")`` makes every BatchNorm layer use the
statistics of the whole global batch (a ``pmean`` over the device axis), so training on
``n`` devices equals training on one with the full batch: the script checks the
parameters and the running statistics against a single-device run.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FUNCDP_NUM_CPU_DEVICES", "4")

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import funcdp  # noqa: E402
from funcdp import optim  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    n = funcdp.local_device_count()
    opt = optim.sgd(0.1, momentum=0.9)
    synced = funcdp.nn.functional(make_model(), sync_batchnorm="batch")
    single = funcdp.nn.functional(make_model())

    def loss(net, params, buffers, xb, yb):
        logits, new_buffers = net.apply(params, buffers, xb, train=True)
        return nn.functional.cross_entropy(logits, yb), new_buffers

    @funcdp.pmap(axis_name="batch", in_axes=(None, None, None, 0, 0), out_axes=None)
    def step(params, buffers, state, xb, yb):
        (value, buffers), grads = funcdp.value_and_grad(
            lambda p: loss(synced, p, buffers, xb, yb), "batch", has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), buffers, state, value

    params, buffers, state = synced.params, synced.buffers, opt.init(synced.params)
    rparams, rbuffers, rstate = single.params, single.buffers, opt.init(single.params)
    for t in range(args.steps):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(t))[
            : args.batch_size]
        params, buffers, state, value = step(params, buffers, state, funcdp.shard(x[idx], n),
                                             funcdp.shard(y[idx], n))
        grads, (rvalue, rbuffers) = torch.func.grad_and_value(
            lambda q: loss(single, q, rbuffers, x[idx], y[idx]), has_aux=True)(rparams)
        updates, rstate = opt.update(grads, rstate, rparams)
        rparams = optim.apply_updates(rparams, updates)
        if t % 10 == 0:
            print(f"step {t:3d}: loss {float(value):.4f} (one device: {float(rvalue):.4f})")
    pdiff = max((params[k] - rparams[k]).abs().max().item() for k in params)
    bdiff = max((buffers[k].double() - rbuffers[k].double()).abs().max().item()
                for k in buffers)
    print(f"after {args.steps} steps on {n} devices: max parameter difference {pdiff:.2e}, "
          f"max running-statistics difference {bdiff:.2e}")
    logits, _ = synced.apply(params, buffers, x, train=False)
    acc = (logits.argmax(1) == y).float().mean().item()
    print(f"accuracy (eval mode, running statistics): {100 * acc:.1f}%")
    return 0 if pdiff < 1e-4 and bdiff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
