"""pmap across processes on torch.distributed (gloo), started from pytest on localhost.

Each test starts 2 or 3 processes (with 1 or 2 virtual CPU devices each) running
tests/distributed_worker.py and compares what they computed with the same program run
in this process over as many devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import collectives_fn, global_input, make_net, train, train_data
from helpers import assert_trees_close

import funcdp

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, nproc: int, per_proc: int | list[int], out: Path,
           timeout: float = 60, test_timeout: str = "60") -> list[subprocess.CompletedProcess]:
    """Runs the worker's ``scenario`` in ``nproc`` processes with ``per_proc`` devices
    each (or ``per_proc[rank]``)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port),
                   FUNCDP_NUM_CPU_DEVICES=str(per_proc[rank] if isinstance(per_proc, list)
                                              else per_proc),
                   FUNCDP_PLATFORM="cpu", TEST_TIMEOUT=test_timeout,
                   PYTHONFAULTHANDLER="1",  # an abort prints every thread's stack
                   PYTHONPATH=str(WORKER.parent) + os.pathsep + env.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            stdout, stderr = p.communicate(timeout=left)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def results(out: Path, nproc: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.mark.parametrize("nproc, per_proc", [(2, 1), (2, 2), (3, 1)])
def test_every_collective_matches_a_single_process_run(tmp_path, nproc, per_proc):
    runs = launch("collectives", nproc, per_proc, tmp_path)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    total = nproc * per_proc
    x = global_input(total)
    devs = funcdp.local_devices()[:total]
    ref = funcdp.pmap(collectives_fn, axis_name="i", devices=devs)(x)
    w = torch.arange(total, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    f = funcdp.pmap(lambda v, wi: (funcdp.psum(v, "i") ** 2).sum() * wi, axis_name="i",
                    devices=devs)
    f(xr, w).sum().backward()
    got = results(tmp_path, nproc)
    # One oneDNN choice for all processes, made at initialize (the same products).
    assert all(res["onednn"][0] for res in got)
    assert len({res["onednn"] for res in got}) == 1
    for res in got:
        assert res["devices"] == list(range(total))
        lo, hi = res["offset"], res["offset"] + per_proc
        for key, value in ref.items():
            want = torch.as_tensor(value)[lo:hi]
            assert_trees_close(res["out"][key], want, rtol=1e-12, atol=1e-12), key
        assert_trees_close(res["grad"], xr.grad[lo:hi], rtol=1e-12, atol=1e-12)


def test_training_matches_a_single_process_run_and_helpers(tmp_path):
    runs = launch("train", 2, 2, tmp_path)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    x, y = train_data(4)
    ref_p, ref_losses = train(make_net(), x, y)
    got = results(tmp_path, 2)
    for res in got:
        assert_trees_close(res["params"], ref_p, rtol=1e-10, atol=1e-12)
        assert_trees_close(res["losses"], ref_losses, rtol=1e-10, atol=1e-12)
        assert_trees_close(res["one_call"], (ref_p, ref_losses), rtol=1e-10, atol=1e-12)
        assert res["broadcast"].tolist() == [1.0, 1.0]
        assert res["allgather"].tolist() == [[0], [1]]
    saved = funcdp.load_checkpoint(tmp_path / "ckpt.pt")
    assert_trees_close(saved["p"], ref_p, rtol=1e-10, atol=1e-12)


def test_a_process_that_raises_makes_the_others_fail_in_bounded_time(tmp_path):
    start = time.monotonic()
    runs = launch("fail", 2, 1, tmp_path, timeout=90, test_timeout="20")
    assert time.monotonic() - start < 80
    assert all(r.returncode != 0 for r in runs)
    assert "process 1 failed on purpose" in runs[1].stderr
    # Process 1 tells process 0, which fails at once (not after the timeout).
    assert "a pmap call failed on another process before it reached it:" in runs[0].stderr
    assert "process 1: device 1 raised ValueError: process 1 failed on purpose" in (
        runs[0].stderr)
    assert time.monotonic() - start < 15


def test_failures_on_one_process_give_clear_errors_everywhere_and_the_run_goes_on(tmp_path):
    # Processes with 1 and 3 devices: see distributed_worker.recover.
    runs = launch("recover", 2, [1, 3], tmp_path, test_timeout="20")
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    got = results(tmp_path, 2)
    for rank, res in enumerate(got):
        # A pmap called before initialize: its plan is not kept (4 devices sum 4).
        assert res["stale_plan"].tolist() == [4.0] * (1, 3)[rank]
        # A device's error before a psum: the other process raises at once, naming it,
        # and pairs no collective with one of the next call.
        for case, failing, dev in (("raise_local_round", 1, 3), ("raise_only_device", 0, 0)):
            kind, msg = res[case]
            if rank == failing:
                assert kind == "ValueError" and f"device {dev} fails" in msg, msg
            else:
                assert kind == "CollectiveError", msg
                assert (f"process {failing}: device {dev} raised ValueError: device {dev} "
                        f"fails") in msg
        kind, value = res["raise_after"]  # (after the psum: the other process is done)
        assert (kind == "ValueError") if rank == 1 else value.tolist() == [4.0], value
        assert res["after"].tolist() == [400.0] * (1, 3)[rank]
        kind, msg = res["raise_before_devices"]
        if rank == 1:
            assert kind == "ValueError" and "mapped size (4)" in msg, msg
        else:
            assert kind == "CollectiveError" and "process 1: the call raised ValueError" in msg
        assert res["after_before_devices"].tolist() == [40.0] * (1, 3)[rank]
        kind, value = res["raise_after_known"]
        assert (kind == "ValueError") if rank == 1 else value.tolist() == [4.0], value
        assert res["raise_after_known_s"] < 1.0  # (not waiting for the busy process 0)
        kind, value = res["interrupted"]
        assert (kind == "KeyboardInterrupt") if rank == 0 else value.tolist() == [4.0] * 3, value
        assert res["after_interrupt"].tolist() == [4000.0] * (1, 3)[rank]
        # broadcast and process_allgather compare shapes and dtypes first.
        kind, msg = res["bcast_shape"]
        assert kind == "CollectiveError", msg
        assert "different shapes or dtypes for tree['w']:\n  - process 0: shape (2, 3), " \
            "float32\n  - process 1: shape (3, 2), float32" in msg
        kind, msg = res["bcast_dtype"]
        assert kind == "CollectiveError" and "process 1: shape (4,), float64" in msg, msg
        kind, msg = res["gather_stack"]
        assert kind == "CollectiveError", msg
        assert "process 0: shape (1, 2), float32\n  - process 1: shape (3, 2)" in msg
        assert "with tiled=True, leading sizes may differ" in msg
        assert res["gather_tiled"]["n"] is None
        assert res["gather_tiled"]["x"].tolist() == [[1.0, 1.0]] + [[2.0, 2.0]] * 3
        # Process 0's failed write reaches process 1.
        kind, msg = res["ckpt"]
        if rank == 0:
            assert kind == "RuntimeError" and "does not exist" in msg, msg
        else:
            assert kind == "CollectiveError", msg
            assert "process 0 failed to save the checkpoint" in msg and "missing" in msg
        assert res["bcast_after"].tolist() == [1.0, 1.0]
        # After shutdown, the pmap's plan is this process's devices again.
        value, ids = res["after_shutdown"]
        assert value.tolist() == [float((1, 3)[rank])] * (1, 3)[rank]
        assert ids == list(range((1, 3)[rank]))


def test_processes_that_reach_different_collectives_are_reported(tmp_path):
    runs = launch("mismatch", 2, 1, tmp_path)
    assert all(r.returncode != 0 for r in runs)
    for r in runs:
        assert "processes reached different collectives" in r.stderr, r.stderr[-2000:]
        assert "process 0: psum(axis_name='i') over 2 shards with values (2,)" in r.stderr
        assert "process 1: psum(axis_name='i') over 2 shards with values (1,)" in r.stderr


def test_shared_results_watched_and_nested_collectives_refused_across_processes(tmp_path):
    runs = launch("edges", 2, 2, tmp_path, test_timeout="30")
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    for res in results(tmp_path, 2):
        assert "was modified in place on a device" in res["inplace"]
        # 4 devices holding 1, 2, 3, 4: the sum over the process-spanning axis, everywhere.
        assert res["nested_i"].flatten().tolist() == [10.0, 10.0]
        assert res["nested"].startswith("NotImplementedError"), res["nested"]
        assert "nested pmap" in res["nested"] and res["nested_s"] < 10
        assert "process 0: pmean(axis_name='i') over 8 shards" in res["shards"], res["shards"]
        assert "process 1: pmean(axis_name='i') over 4 shards" in res["shards"]
        assert res["gathered"]["none"] is None
        assert res["gathered"]["rank"].tolist() == [0, 1]


def test_initialize_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="`rank` and `world_size` are not set"):
        funcdp.distributed.initialize()
    with pytest.raises(ValueError, match="rank 3 is out of range for world_size 2"):
        funcdp.distributed.initialize(rank=3, world_size=2)
    with pytest.raises(RuntimeError, match="not initialized"):
        funcdp.distributed.barrier()
    monkeypatch.setenv("RANK", "abc")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="variable `RANK` must be an integer, got 'abc'"):
        funcdp.distributed.initialize()
    monkeypatch.delenv("RANK")
    local = dict(rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500)
    with pytest.raises(ValueError, match="`backend` must be 'gloo', 'nccl' or None.*'foo'"):
        funcdp.distributed.initialize("foo", **local)
    if funcdp.local_devices()[0].platform == "cpu":
        with pytest.raises(ValueError, match="backend='nccl' needs GPUs"):
            funcdp.distributed.initialize("nccl", **local)
    with pytest.raises(TypeError, match="`timeout` must be a number of seconds .* got str"):
        funcdp.distributed.initialize(timeout="10", **local)
    # A failed initialize leaves the environment as it was.
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="`MASTER_PORT` is not set"):
        funcdp.distributed.initialize(rank=0, world_size=1, master_addr="127.0.0.1")
    assert os.environ["MASTER_ADDR"] == "10.0.0.1" and "MASTER_PORT" not in os.environ
