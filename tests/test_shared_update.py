"""Optimizer steps shared between devices (``step(..., axis_name=...)``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import funcdp
from funcdp import optim
from funcdp._src import shared_update

BIG = shared_update._SHARED_MIN_NUMEL

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "sgd_schedule": lambda: optim.sgd(optim.linear_warmup(0.1, 3), momentum=0.5,
                                      dampening=0.1, maximize=True),
    "adam": lambda: optim.adam(0.01, weight_decay=0.1),
    "adamw_amsgrad": lambda: optim.adamw(0.01, amsgrad=True),
    "adam_schedule": lambda: optim.adam(optim.cosine_decay(0.01, 5)),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.01)),
}


def tree(sizes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(sizes)}


def replicated(fn, devices, out_axes=None, size=None):
    """pmap of ``fn`` over replicated arguments (a dummy mapped argument sets the size)."""
    n = size or len(devices)
    f = funcdp.pmap(lambda _, args: fn(*args), axis_name="i", in_axes=(0, None),
                    out_axes=out_axes, devices=devices)
    return lambda *args: f(torch.zeros(n), args)


def reference(opt, sizes, steps):
    params = tree(sizes, 0)
    state = opt.init(params)
    for t in range(steps):
        params, state = opt.step(tree(sizes, 100 + t), state, params)
    return params, state


def shared(opt, sizes, steps, devices):
    f = replicated(lambda g, s, p: opt.step(g, s, p, axis_name="i"), devices)
    params = tree(sizes, 0)
    state = opt.init(params)
    for t in range(steps):
        params, state = f(tree(sizes, 100 + t), state, params)
    return params, state


def assert_equal_trees(a, b):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_shared_step_equals_one_device(name, devices):
    # Big leaves (shared), a small one (computed per device), uneven chunk boundaries.
    sizes = [(BIG + 7,), (3, BIG // 2 + 5), (11,)]
    want = reference(OPTIMIZERS[name](), sizes, 4)
    got = shared(OPTIMIZERS[name](), sizes, 4, devices[:3])
    assert_equal_trees(got, want)


@given(n=st.integers(1, 8), sizes=st.lists(st.integers(1, 3 * BIG), min_size=1, max_size=4))
def test_shared_step_any_split(n, sizes):
    devices = funcdp.local_devices()
    sizes = [(s,) for s in sizes]
    opt = optim.sgd(0.1, momentum=0.9)
    assert_equal_trees(shared(opt, sizes, 2, devices[:n]), reference(opt, sizes, 2))


def test_shared_step_outputs_one_buffer(devices):
    opt = optim.adam(0.01)
    params = tree([(BIG,), (5,)], 0)
    f = replicated(lambda g, s, p: opt.step(g, s, p, axis_name="i"), devices[:4], 0)
    new, state = f(tree([(BIG,), (5,)], 1), opt.init(params), params)
    ptrs = {new["p0"][i].data_ptr() for i in range(4)}
    assert len(ptrs) == 1  # one result in shared memory
    assert len({state["mu"]["p0"][i].data_ptr() for i in range(4)}) == 1
    assert len({new["p1"][i].data_ptr() for i in range(4)}) == 4  # small: per device


@pytest.mark.parametrize("nleaves", [1, 2])
def test_two_devices_share_the_update(devices, nleaves):
    opt = optim.sgd(0.1)
    sizes = [(BIG,)] * nleaves
    params = tree(sizes, 0)
    f = replicated(lambda g, s, p: opt.step(g, s, p, axis_name="i"), devices[:2], 0)
    new, _ = f(tree(sizes, 1), opt.init(params), params)
    want, _ = opt.step(tree(sizes, 1), opt.init(params), params)
    for k in want:
        assert new[k][0].data_ptr() == new[k][1].data_ptr()
        assert torch.equal(new[k][0], want[k])


def test_values_that_differ_per_device_are_updated_per_device(devices):
    # Gradients not averaged (a user error, or a deliberate per-device step): no sharing,
    # each device applies its own gradient.
    opt = optim.sgd(0.1, momentum=0.9)
    n = 4
    params = tree([(BIG,)], 0)
    grads = torch.randn(n, BIG, dtype=torch.float64)
    f = funcdp.pmap(lambda g, s, p: opt.step({"p0": g}, s, p, axis_name="i")[0]["p0"],
                    axis_name="i", in_axes=(0, None, None), devices=devices[:n])
    out = f(grads, opt.init(params), params)
    for i in range(n):
        want = opt.step({"p0": grads[i]}, opt.init(params), params)[0]["p0"]
        assert torch.equal(out[i], want)


def test_gradient_through_a_shared_step(devices):
    # Meta-learning: differentiating through the update computes it per device.
    opt = optim.sgd(0.1, momentum=0.9)
    params = tree([(BIG,)], 0)
    grads = tree([(BIG,)], 1)

    def inner(p):
        new, _ = opt.step(grads, opt.init(p), p, axis_name="i")
        return (new["p0"] ** 2).sum()

    def plain(p):
        new, _ = opt.step(grads, opt.init(p), p)
        return (new["p0"] ** 2).sum()

    f = replicated(torch.func.grad(inner), devices[:2])
    assert torch.equal(f(params)["p0"], torch.func.grad(plain)(params)["p0"])


def test_more_shards_than_devices_still_correct(devices):
    opt = optim.adam(0.01)
    sizes = [(BIG + 1,)]
    f = replicated(lambda g, s, p: opt.step(g, s, p, axis_name="i"), devices[:2], size=4)
    params = tree(sizes, 0)
    new, _ = f(tree(sizes, 100), opt.init(params), params)
    assert torch.equal(new["p0"], opt.step(tree(sizes, 100), opt.init(params), params)[0]["p0"])


def test_writing_to_a_shared_result_fails(devices):
    opt = optim.sgd(0.1)
    params = tree([(BIG,)], 0)

    def f(g, s, p):
        new, s = opt.step(g, s, p, axis_name="i")
        new["p0"].add_(1.0)
        return new

    with pytest.raises(funcdp.CollectiveError, match="modified in place"):
        replicated(f, devices[:3])(tree([(BIG,)], 1), opt.init(params), params)


def test_axis_name_of_a_vmap_is_a_plain_step():
    opt = optim.sgd(0.01, momentum=0.9)
    params = tree([(BIG,)], 0)
    step = funcdp.vmap(lambda g: opt.step(g, opt.init(params), params, axis_name="v")[0],
                       axis_name="v")
    grads = torch.randn(2, BIG, dtype=torch.float64)
    out = step({"p0": grads})["p0"]
    for i in range(2):
        assert torch.allclose(out[i], opt.step({"p0": grads[i]}, opt.init(params),
                                               params)[0]["p0"], rtol=1e-12, atol=0)


def test_unbound_axis_name():
    opt = optim.sgd(0.1)
    with pytest.raises(NameError, match="unbound axis name 'i'"):
        opt.step({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}), {"w": torch.ones(2)},
                 axis_name="i")


def test_weight_decay_needs_params():
    opt = optim.sgd(0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="`params` is needed for weight_decay"):
        opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))
