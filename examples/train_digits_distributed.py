"""The digits training of train_digits.py across processes, launched with torchrun.

    FUNCDP_NUM_CPU_DEVICES=2 torchrun --standalone --nproc-per-node=2 \\
        examples/train_digits_distributed.py

Every process runs this same program (JAX's multi-host convention): it joins the process
group, takes its part of each global batch, and calls the same pmapped step with its
local devices; the pmap axis spans the 4 devices of both processes, so ``pmean`` averages
over all of them. At the end process 0 checks the result against training on a single
device with the full batches, the same check train_digits.py makes for one process.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FUNCDP_NUM_CPU_DEVICES", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch import nn  # noqa: E402
from train_digits import batches, load_data, make_model, train_single_device  # noqa: E402

import funcdp  # noqa: E402
from funcdp import optim  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)

    funcdp.distributed.initialize()
    rank, nproc = funcdp.process_index(), funcdp.process_count()
    local = funcdp.local_device_count()
    total = funcdp.device_count()
    if args.batch_size % total:
        sys.exit(f"--batch-size must be divisible by the {total} devices")
    per_process = args.batch_size // nproc
    data = load_data()
    xtr, ytr, xte, yte = data
    net = funcdp.nn.functional(make_model())
    opt = optim.sgd(args.lr, momentum=0.9)
    # Every process starts from process 0's parameters (here they agree anyway, since
    # make_model seeds its initialisation; with random initialisation this matters).
    params = funcdp.distributed.broadcast(net.params, src=0)
    opt_state = opt.init(params)

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(net.apply(params, {}, x)[0], y)

    @funcdp.pmap(axis_name="batch", in_axes=(None, None, 0, 0), out_axes=None)
    def train_step(params, opt_state, x, y):
        loss, grads = funcdp.value_and_grad(loss_fn, "batch")(params, x, y)
        params, opt_state = opt.step(grads, opt_state, params, axis_name="batch")
        return params, opt_state, loss

    for epoch in range(args.epochs):
        for x, y in batches(xtr, ytr, args.batch_size, epoch):
            mine = slice(rank * per_process, (rank + 1) * per_process)
            params, opt_state, loss = train_step(params, opt_state,
                                                 funcdp.shard(x[mine], local),
                                                 funcdp.shard(y[mine], local))
        if rank == 0:
            logits, _ = net.apply(params, {}, xte)
            acc = (logits.argmax(-1) == yte).float().mean().item()
            print(f"epoch {epoch + 1:2d}: loss {float(loss):.4f}  test accuracy "
                  f"{100 * acc:.1f}%", flush=True)
    ok = True
    if rank == 0:
        ref_args = argparse.Namespace(epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr)
        ref, _ = train_single_device(ref_args, make_model(), data)
        worst = max(((params[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
                    for k in params)
        ok = worst < 1e-4
        print(f"{nproc} processes x {local} devices vs one device, full batch: max relative "
              f"parameter difference {worst:.2e} ({'OK' if ok else 'FAILED'})", flush=True)
    funcdp.distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
