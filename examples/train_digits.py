"""Data-parallel training of an MLP on scikit-learn's handwritten digits with funcdp.pmap.

    python examples/train_digits.py            # 4 virtual CPU devices (GPUs when present)
    FUNCDP_NUM_CPU_DEVICES=8 python examples/train_digits.py

Each step runs on every device with its shard of the batch; gradients are averaged with
an explicit all-reduce (``funcdp.value_and_grad(loss, "batch")`` = ``pmean(grad(loss))``).
At the end the script trains the same model on one device with the full batches and
checks that both runs end with the same parameters, then writes a plot of the losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("FUNCDP_NUM_CPU_DEVICES", "4")  # read by funcdp when first needed

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import funcdp  # noqa: E402
from funcdp import optim  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--plot", default="train_digits.png", help="where to write the loss plot")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the single-device rerun")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--min-accuracy", type=float, default=0.95,
                   help="fail if the final test accuracy is lower")
    return p.parse_args(argv)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def load_data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def batches(x, y, batch_size, epoch):
    """Shuffled full batches (the last partial batch is dropped), reproducible per epoch."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for i in range(len(x) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx], y[idx]


def train_data_parallel(args, model, data):
    xtr, ytr, xte, yte = data
    devices = funcdp.local_devices()[: args.devices] if args.devices else funcdp.local_devices()
    n = len(devices)
    if args.batch_size % n:
        sys.exit(f"--batch-size {args.batch_size} must be divisible by the {n} devices")
    net = funcdp.nn.functional(model)
    opt = optim.sgd(args.lr, momentum=0.9)

    def loss_fn(params, x, y):
        logits, _ = net.apply(params, {}, x)
        return nn.functional.cross_entropy(logits, y)

    @funcdp.pmap(axis_name="batch", in_axes=(None, None, 0, 0), out_axes=None, devices=devices)
    def train_step(params, opt_state, x, y):
        loss, grads = funcdp.value_and_grad(loss_fn, "batch")(params, x, y)
        params, opt_state = opt.step(grads, opt_state, params, axis_name="batch")
        return params, opt_state, loss

    @funcdp.pmap(axis_name="batch", in_axes=(None, 0, 0), out_axes=None, devices=devices)
    def correct(params, x, y):
        logits, _ = net.apply(params, {}, x)
        return funcdp.psum((logits.argmax(-1) == y).sum(), "batch")

    params, opt_state = net.params, opt.init(net.params)
    losses, accuracies = [], []
    steps = args.epochs * (len(xtr) // args.batch_size)
    bar = tqdm(total=steps, disable=args.quiet, desc=f"pmap over {n} devices", unit="step")
    for epoch in range(args.epochs):
        epoch_loss = 0.0
        nb = 0
        for x, y in batches(xtr, ytr, args.batch_size, epoch):
            params, opt_state, loss = train_step(params, opt_state, funcdp.shard(x, n),
                                                 funcdp.shard(y, n))
            losses.append(float(loss))
            epoch_loss += losses[-1]
            nb += 1
            bar.update()
        m = len(xte) // n * n
        acc = int(correct(params, funcdp.shard(xte[:m], n), funcdp.shard(yte[:m], n))) / m
        accuracies.append(acc)
        bar.write(f"epoch {epoch + 1:2d}: loss {epoch_loss / nb:.4f}  test accuracy "
                  f"{100 * acc:.1f}%")
    bar.close()
    return params, losses, accuracies, n


def train_single_device(args, model, data):
    """The same training on one device with the full batches: the reference."""
    xtr, ytr, _, _ = data
    net = funcdp.nn.functional(model)
    opt = optim.sgd(args.lr, momentum=0.9)

    def loss_fn(params, x, y):
        logits, _ = net.apply(params, {}, x)
        return nn.functional.cross_entropy(logits, y)

    params, opt_state = net.params, opt.init(net.params)
    losses = []
    for epoch in range(args.epochs):
        for x, y in batches(xtr, ytr, args.batch_size, epoch):
            grads, loss = torch.func.grad_and_value(loss_fn)(params, x, y)
            params, opt_state = opt.step(grads, opt_state, params)
            losses.append(float(loss))
    return params, losses


def plot(path, losses, ref_losses, n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, label=f"funcdp.pmap over {n} devices", linewidth=2)
    if ref_losses:
        ax.plot(ref_losses, "--", label="one device, full batch", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Digits MLP: data-parallel vs single-device training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = load_data()
    start = time.perf_counter()
    params, losses, accuracies, n = train_data_parallel(args, make_model(), data)
    took = time.perf_counter() - start
    print(f"trained {len(losses)} steps on {n} devices in {took:.1f} s; final test accuracy "
          f"{100 * accuracies[-1]:.1f}%")
    ok = True
    ref_losses = None
    if not args.no_check:
        ref_params, ref_losses = train_single_device(args, make_model(), data)
        worst = max(((params[k] - ref_params[k]).abs().max() /
                     ref_params[k].abs().max()).item() for k in params)
        same = worst < 1e-4
        print(f"equivalence with single-device full-batch training: max relative parameter "
              f"difference {worst:.2e} ({'OK' if same else 'FAILED'})")
        ok &= same
    if accuracies[-1] < args.min_accuracy:
        print(f"test accuracy {100 * accuracies[-1]:.1f}% is below "
              f"{100 * args.min_accuracy:.0f}%")
        ok = False
    if not args.no_plot:
        plot(args.plot, losses, ref_losses, n)
        print(f"wrote {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
