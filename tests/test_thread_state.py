"""What the executor carries from the caller's thread into every device: saved-tensor hooks
and the autocast dtype, on the workers and in the calling thread (small calls), each
checked against plain torch looping over the shards."""

from __future__ import annotations

import pytest
import torch

import funcdp
from funcdp._src import pmap as pmap_mod

_hooks_top = torch._C._autograd._top_saved_tensors_default_hooks
_hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled


@pytest.fixture(params=["workers", "inline"])
def path(request, monkeypatch):
    """Where a plan's calls run their devices after its first calls: always on the
    workers (no call counts as small), or one after another in the calling thread."""
    small = 1e9 if request.param == "inline" else 0.0
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "SMALL_S", small)
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "LONG_S", 1e9)
    return request.param


@pytest.fixture
def autocast_dtype():
    """Puts the test thread's autocast dtypes back afterwards."""
    before = torch.get_autocast_dtype("cpu")
    yield
    torch.set_autocast_dtype("cpu", before)


def warm(f, *args, path):
    """Calls ``f`` until its plan runs where ``path`` says."""
    for _ in range(4):
        f(*args)
    (plan,) = f._cache.values()
    assert plan.policy.on == (path == "inline")


def bf16_storage():
    """Hooks that store activations in bfloat16: gradients show whether they applied."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.to(torch.bfloat16),
                                                    lambda t: t.float())


def per_device_grad(x, w):
    w = w.detach().requires_grad_()
    return torch.autograd.grad((x * w).sin().sum(), w)[0]


def hooks_probe(x):
    """1 where this device's thread has hooks, 2 where they are disabled, else 0."""
    state = 2 if not _hooks_enabled() else int(_hooks_top(False) is not None)
    return x[:1] * 0 + state


@pytest.mark.parametrize("n", [2, 4])
def test_saved_tensor_hooks_around_a_call_apply_on_every_device(n, path):
    x, w = torch.randn(n, 100), torch.randn(100)
    f = funcdp.pmap(per_device_grad, in_axes=(0, None), devices=funcdp.local_devices()[:n])
    warm(f, x, w, path=path)
    with bf16_storage():
        want = torch.stack([per_device_grad(x[i], w) for i in range(n)])
        got = f(x, w).to_tensor()
    assert torch.equal(got, want)
    without = torch.stack([per_device_grad(x[i], w) for i in range(n)])
    assert not torch.equal(got[1:], without[1:])  # (the hooks change every device's)
    # Gone once the call returns: on the workers and in the calling thread.
    probe = funcdp.pmap(hooks_probe, devices=funcdp.local_devices()[:n])
    assert probe(x).to_tensor().flatten().tolist() == [0] * n
    assert _hooks_top(False) is None


@pytest.mark.parametrize("n", [2, 4])
def test_saved_tensor_hooks_apply_to_the_graphs_pmaps_backward_pass_uses(n):
    # The devices record their graphs for pmap's own backward pass under the hooks.
    # (Calls that record run on the workers, small or not.)
    x, w = torch.randn(n, 100), torch.randn(100)
    f = funcdp.pmap(lambda x, w: (x * w).sin().sum(), in_axes=(0, None),
                    devices=funcdp.local_devices()[:n])
    wg = w.clone().requires_grad_()
    with bf16_storage():
        out = f(x, wg)
    out.sum().backward()
    with bf16_storage():
        want = sum(per_device_grad(x[i], w) for i in range(n))
    torch.testing.assert_close(wg.grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4])
def test_saved_tensor_hooks_reach_devices_handed_to_the_workers(n, monkeypatch):
    # A small call runs its devices in the calling thread until one waits in a
    # collective: the devices not started yet then run on the workers.
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "SMALL_S", 1e9)
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "LONG_S", 1e9)
    f = funcdp.pmap(lambda x, w: funcdp.psum(per_device_grad(x, w)[None], "i"), axis_name="i",
                    in_axes=(0, None), devices=funcdp.local_devices()[:n])
    x, w = torch.randn(n, 100), torch.randn(100)
    f(x, w)
    (plan,) = f._cache.values()
    while not plan.policy.on:
        f(x, w)
    with bf16_storage():
        want = sum(per_device_grad(x[i], w) for i in range(n))
        got = f(x, w).to_tensor()
    assert plan.policy.handoffs == 1
    torch.testing.assert_close(got, want.expand(n, 1, 100), rtol=1e-6, atol=1e-6)


def test_saved_tensor_hooks_reach_the_devices_of_a_nested_pmap():
    inner = funcdp.pmap(per_device_grad, in_axes=(0, None),
                        devices=funcdp.local_devices()[2:4])
    outer = funcdp.pmap(lambda x, w: inner(x, w).to_tensor(), in_axes=(0, None),
                        devices=funcdp.local_devices()[:2])
    x, w = torch.randn(2, 2, 100), torch.randn(100)
    with bf16_storage():
        want = torch.stack([torch.stack([per_device_grad(x[i, j], w) for j in range(2)])
                            for i in range(2)])
        got = outer(x, w).to_tensor()
    assert torch.equal(got, want)


def test_disabled_saved_tensor_hooks_are_disabled_on_every_device(path):
    n = 4
    probe = funcdp.pmap(hooks_probe, devices=funcdp.local_devices()[:n])
    x = torch.zeros(n, 1)
    warm(probe, x, path=path)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        assert probe(x).to_tensor().flatten().tolist() == [2] * n
    assert probe(x).to_tensor().flatten().tolist() == [0] * n


@pytest.mark.parametrize("change", ["push", "pop"])
def test_hooks_a_device_function_leaves_changed_are_reset_on_its_worker(change, monkeypatch):
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "SMALL_S", 0.0)  # (devices 1.. on workers)
    n = 2

    def sloppy(x):
        if funcdp.axis_index("i") == 1:  # (never the calling thread's device 0)
            if change == "push":  # entered and never left
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t).__enter__()
            else:  # the caller's hooks, left as if they were the function's own
                torch._C._autograd._pop_saved_tensors_default_hooks()
        return x

    f = funcdp.pmap(sloppy, axis_name="i", devices=funcdp.local_devices()[:n])
    probe = funcdp.pmap(hooks_probe, devices=funcdp.local_devices()[:n])
    x = torch.zeros(n, 1)
    for _ in range(2):
        with bf16_storage():
            f(x)
        assert probe(x).to_tensor().flatten().tolist() == [0] * n


def test_hooks_are_removed_after_an_error_on_the_devices(path):
    n = 4

    def fails(x):
        if funcdp.axis_index("i") == 2:
            raise ValueError("device 2 fails")
        return x

    f = funcdp.pmap(fails, axis_name="i", devices=funcdp.local_devices()[:n])
    probe = funcdp.pmap(hooks_probe, devices=funcdp.local_devices()[:n])
    x = torch.zeros(n, 1)
    warm(probe, x, path=path)
    with bf16_storage(), pytest.raises(ValueError, match="device 2 fails"):
        f(x)
    assert probe(x).to_tensor().flatten().tolist() == [0] * n


def test_a_checkpoints_hooks_around_a_call_stay_in_the_calling_thread():
    # torch.utils.checkpoint matches the tensors its recomputation saves to its pack
    # hook's calls by their order: devices packing at once on several threads would
    # shuffle them. Its hooks are not carried; the gradient is the one without it.
    from torch.utils.checkpoint import checkpoint

    n = 4
    f = funcdp.pmap(lambda x, w: (x * w).sin().sum(), in_axes=(0, None),
                    devices=funcdp.local_devices()[:n])
    x, w = torch.randn(n, 100), torch.randn(100)
    for _ in range(2):  # (recomputed twice: two backward passes)
        wg = w.clone().requires_grad_()
        y = checkpoint(lambda w: f(x, w).sum(), wg, use_reentrant=False)
        y.backward()
        want = sum(per_device_grad(x[i], w) for i in range(n))
        torch.testing.assert_close(wg.grad, want, rtol=1e-6, atol=1e-6)


def _matmul_dtype(x):
    """The dtype a ``torch.autocast("cpu")`` without a dtype computes in here: 0 for
    float16, 1 for bfloat16."""
    with torch.autocast("cpu"):
        y = torch.mm(x[None], x[None].t())
    return x[:1] * 0 + (0 if y.dtype == torch.float16 else 1)


@pytest.mark.parametrize("n", [2, 4])
def test_an_autocast_dtype_set_with_autocast_off_is_carried(n, path, autocast_dtype):
    f = funcdp.pmap(_matmul_dtype, devices=funcdp.local_devices()[:n])
    x = torch.randn(n, 3)
    warm(f, x, path=path)
    torch.set_autocast_dtype("cpu", torch.float16)
    assert _matmul_dtype(x[0]).item() == 0  # (plain torch)
    assert f(x).to_tensor().flatten().tolist() == [0] * n
    # And not kept by the workers for later calls.
    torch.set_autocast_dtype("cpu", torch.bfloat16)
    assert f(x).to_tensor().flatten().tolist() == [1] * n


@pytest.mark.parametrize("n", [2, 4])
def test_an_autocast_dtype_a_device_function_sets_does_not_outlive_the_call(n, path,
                                                                          autocast_dtype):
    def sets_dtype(x):
        torch.set_autocast_dtype("cpu", torch.float16)
        return x * 2

    f = funcdp.pmap(sets_dtype, devices=funcdp.local_devices()[:n])
    probe = funcdp.pmap(_matmul_dtype, devices=funcdp.local_devices()[:n])
    x = torch.randn(n, 3)
    warm(f, x, path=path)
    warm(probe, x, path=path)
    torch.set_autocast_dtype("cpu", torch.bfloat16)
    f(x)
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert probe(x).to_tensor().flatten().tolist() == [1] * n
