"""``funcdp.value_and_update``: the loss, the averaged gradients and the optimizer's update
in one collective round, equal bit for bit to ``value_and_grad`` then ``opt.step``."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_shared_update import OPTIMIZERS as SHARED_OPTIMIZERS

import funcdp
from funcdp import optim
from funcdp._src import shared_update

BIG = shared_update._SHARED_MIN_NUMEL

OPTIMIZERS = {
    **SHARED_OPTIMIZERS,
    "chain_one": lambda: optim.chain(optim.sgd(0.05, momentum=0.9)),
    # Without a fused step (a user's own optimizer): the two rounds, written out.
    "custom": lambda: optim.GradientTransformation(optim.sgd(0.1).init, optim.sgd(0.1).update),
}
OPTIMIZERS["chain_clip"] = OPTIMIZERS.pop("chain")


def tree(sizes, seed, dtype=torch.float64, lead=()):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*lead, *s, generator=g, dtype=dtype)
            for i, s in enumerate(sizes)}


def loss_fn(p, x):
    # A different gradient on every device (x is the device's shard), and a loss that
    # depends on all of it.
    return sum(((w - v) ** 2).mean() * (i + 1) for i, (w, v) in
               enumerate(zip(p.values(), x.values())))


def aux_loss_fn(p, x):
    loss = loss_fn(p, x)
    return loss, {"twice": 2 * loss.detach()}


def two_rounds(fun, opt, has_aux=False):
    """The step written out: value_and_grad's average, then the shared update."""
    grad_fn = funcdp.value_and_grad(fun, "i", has_aux=has_aux)

    def step(params, state, x):
        value, grads = grad_fn(params, x)
        params, state = opt.step(grads, state, params, axis_name="i")
        return value, params, state

    return step


def run(step, opt, sizes, n, steps=3, dtype=torch.float64, in_axes=(None, None, 0),
        out_axes=None, ndev=None):
    """``steps`` training steps of pmap(step) over ``n`` shards (on ``ndev`` devices, by
    default ``n``); the values, the parameters and the state."""
    f = funcdp.pmap(step, axis_name="i", in_axes=in_axes, out_axes=out_axes,
                    devices=funcdp.local_devices()[:ndev or n])
    params = tree(sizes, 0, dtype)
    state = opt.init(params)  # (of one device's parameters: broadcast to each)
    if in_axes[0] == 0:
        params = {k: torch.stack([v + i for i in range(n)]) for k, v in params.items()}
    values = []
    for t in range(steps):
        value, params, state = f(params, state, tree(sizes, 100 + t, dtype, lead=(n,)))
        values.append(value)
    return values, params, state


def assert_equal_trees(a, b):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, funcdp.ShardedValue):
            x, y = x.to_tensor(), y.to_tensor()
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(_bits(x), _bits(y)), (x - y).abs().max()


def _bits(t):
    """The tensor's bits (NaNs compare equal to themselves; -0.0 differs from 0.0)."""
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[
            t.element_size()])
    return t


def reference(opt, sizes, n, steps=3):
    """Plain torch: every shard's gradient, averaged in device order, then the update."""
    params = tree(sizes, 0)
    state = opt.init(params)
    values = []
    for t in range(steps):
        x = tree(sizes, 100 + t, lead=(n,))
        per = [torch.func.grad_and_value(loss_fn)(params, {k: v[d] for k, v in x.items()})
               for d in range(n)]
        grads = {k: sum(g[k] for g, _ in per) / n for k in params}
        values.append(sum(v for _, v in per) / n)
        params, state = opt.step(grads, state, params)
    return values, params, state


SIZES = [(BIG + 7,), (3, BIG // 2 + 5), (11,), (2, 3)]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_equals_the_two_rounds_bit_for_bit(name, n):
    got = run(funcdp.value_and_update(loss_fn, OPTIMIZERS[name](), "i"), OPTIMIZERS[name](),
              SIZES, n)
    want = run(two_rounds(loss_fn, OPTIMIZERS[name]()), OPTIMIZERS[name](), SIZES, n)
    assert_equal_trees(got, want)
    # ... and the average of the shards' gradients, computed with plain torch.
    ref = reference(OPTIMIZERS[name](), SIZES, n)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@given(n=st.integers(1, 8), sizes=st.lists(st.integers(1, 3 * BIG), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64]), has_aux=st.booleans(),
       name=st.sampled_from(["sgd_momentum", "adamw_amsgrad", "chain_one"]))
def test_any_split_any_dtype(n, sizes, dtype, has_aux, name):
    sizes = [(s,) for s in sizes]
    fun = aux_loss_fn if has_aux else loss_fn
    kw = dict(steps=2, dtype=dtype, out_axes=(0, None, None))  # (aux differs per device)
    got = run(funcdp.value_and_update(fun, OPTIMIZERS[name](), "i", has_aux=has_aux),
              OPTIMIZERS[name](), sizes, n, **kw)
    want = run(two_rounds(fun, OPTIMIZERS[name](), has_aux), OPTIMIZERS[name](), sizes, n,
               **kw)
    assert_equal_trees(got, want)


def test_has_aux_returns_aux_as_is(devices):
    step = funcdp.value_and_update(aux_loss_fn, optim.sgd(0.1), "i", has_aux=True)
    (values, _, _) = run(step, optim.sgd(0.1), SIZES, 2, steps=1, out_axes=0)
    (loss, aux), = values
    # The loss is averaged; aux is each device's own.
    assert torch.equal(loss[0], loss[1])
    assert not torch.equal(aux["twice"][0], aux["twice"][1])


def test_parameters_that_differ_per_device(devices):
    # Not replicated (mapped parameters): every device updates its own, with the
    # averaged gradients, as the two rounds do.
    opt = optim.adam(0.01)
    kw = dict(in_axes=(0, None, 0), out_axes=0)
    got = run(funcdp.value_and_update(loss_fn, opt, "i"), opt, SIZES, 3, steps=1, **kw)
    want = run(two_rounds(loss_fn, opt), opt, SIZES, 3, steps=1, **kw)
    assert_equal_trees(got, want)
    assert not torch.equal(got[1]["p0"][0], got[1]["p0"][1])


def test_small_parameters_that_differ_per_device(devices):
    # The large leaf is replicated (shared update), the small ones differ per device.
    opt = optim.sgd(0.1, momentum=0.9)
    n = 2

    def make(step):
        def f(big, small, state, x):
            value, params, state = step({"p0": big, **small}, state, x)
            return value, params, state
        return funcdp.pmap(f, axis_name="i", in_axes=(None, 0, None, 0), out_axes=0,
                           devices=devices[:n])

    params = tree(SIZES, 0)
    small = {k: torch.stack([params[k] + i for i in range(n)]) for k in ("p1", "p2", "p3")}
    state = opt.init(params)
    x = tree(SIZES, 5, lead=(n,))
    got = make(funcdp.value_and_update(loss_fn, opt, "i"))(params["p0"], small, state, x)
    want = make(two_rounds(loss_fn, opt))(params["p0"], small, state, x)
    assert_equal_trees(got, want)


def test_results_large_shared_small_per_device(devices):
    opt = optim.adam(0.01)
    (values, params, state) = run(funcdp.value_and_update(loss_fn, opt, "i"), opt, SIZES, 4,
                                  steps=1, out_axes=0)
    assert len({params["p0"][i].data_ptr() for i in range(4)}) == 1  # one buffer
    assert len({state["mu"]["p1"][i].data_ptr() for i in range(4)}) == 1
    assert len({params["p2"][i].data_ptr() for i in range(4)}) == 4  # small: per device
    assert len({values[0][i].data_ptr() for i in range(4)}) == 4


def test_writing_in_place_to_a_small_result_is_allowed(devices):
    opt = optim.sgd(0.1)
    step = funcdp.value_and_update(loss_fn, opt, "i")

    def f(params, state, x):
        loss, params, state = step(params, state, x)
        params["p2"].add_(funcdp.axis_index("i"))
        loss += 1
        return loss, params["p2"]

    loss, p2 = funcdp.pmap(f, axis_name="i", in_axes=(None, None, 0), devices=devices[:2])(
        tree(SIZES, 0), opt.init(tree(SIZES, 0)), tree(SIZES, 1, lead=(2,)))
    assert torch.equal(p2[1] - p2[0], torch.ones(11, dtype=torch.float64))
    assert torch.equal(loss[0], loss[1])


def test_writing_in_place_to_a_large_result_fails(devices):
    opt = optim.sgd(0.1)
    step = funcdp.value_and_update(loss_fn, opt, "i")

    def f(params, state, x):
        _, params, _ = step(params, state, x)
        params["p0"].mul_(2)
        return params["p0"]

    with pytest.raises(funcdp.CollectiveError,
                       match="modified in place.*The new parameters and optimizer state of a "
                             "shared update \\(tensors of 16384 elements or more\\)"):
        funcdp.pmap(f, axis_name="i", in_axes=(None, None, 0), devices=devices[:2])(
            tree(SIZES, 0), opt.init(tree(SIZES, 0)), tree(SIZES, 1, lead=(2,)))


def test_more_shards_than_devices(devices):
    opt = optim.sgd(0.1, momentum=0.9)
    got = run(funcdp.value_and_update(loss_fn, opt, "i"), opt, SIZES, 4, ndev=2)
    assert_equal_trees(got, run(two_rounds(loss_fn, opt), opt, SIZES, 4, ndev=2))


def test_named_vmap_axis():
    opt = optim.adam(0.01)
    params, state = tree(SIZES, 0), opt.init(tree(SIZES, 0))
    x = tree(SIZES, 1, lead=(3,))

    def go(step):
        return funcdp.vmap(step, in_axes=(None, None, 0), out_axes=None, axis_name="i")(
            params, state, x)

    got, want = go(funcdp.value_and_update(loss_fn, opt, "i")), go(two_rounds(loss_fn, opt))
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_gradient_through_the_step(devices):
    # Meta-learning: a gradient taken through the update (the two rounds, on each device).
    opt = optim.sgd(0.1, momentum=0.9)

    def outer(step):
        def f(params, state, x):
            _, new, _ = step(params, state, x)
            return sum((w ** 2).sum() for w in new.values())
        return funcdp.pmap(torch.func.grad(f), axis_name="i", in_axes=(None, None, 0),
                           out_axes=None, devices=devices[:2])

    params, state, x = tree(SIZES, 0), opt.init(tree(SIZES, 0)), tree(SIZES, 1, lead=(2,))
    got = outer(funcdp.value_and_update(loss_fn, opt, "i"))(params, state, x)
    assert_equal_trees(got, outer(two_rounds(loss_fn, opt))(params, state, x))


def test_without_axis_name_is_this_devices_step():
    opt = optim.adamw(0.01)
    params, state, x = tree(SIZES, 0), opt.init(tree(SIZES, 0)), tree(SIZES, 1)
    value, new, new_state = funcdp.value_and_update(loss_fn, opt)(params, state, x)
    want_value, grads = torch.func.grad_and_value(loss_fn)(params, x)[::-1]
    assert torch.equal(value, want_value)
    assert_equal_trees((new, new_state), opt.step(grads, state, params))


def test_compile_flag_is_passed_on():
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        funcdp.value_and_update(loss_fn, optim.sgd(0.1), compile="yes")


def test_bad_optimizer():
    with pytest.raises(TypeError, match=r"`optimizer` must be a funcdp.optim optimizer.*"
                                        r"got a SGD. A torch.optim optimizer"):
        funcdp.value_and_update(loss_fn, torch.optim.SGD([torch.zeros(1)], lr=0.1))
    with pytest.raises(TypeError, match="`optimizer` must be"):
        funcdp.value_and_update(loss_fn, optim.sgd)  # the factory, not an optimizer


def test_bad_loss_function():
    with pytest.raises(TypeError, match="`fun` must be the loss function"):
        funcdp.value_and_update(optim.sgd(0.1), optim.sgd(0.1))


def test_unbound_axis_name():
    step = funcdp.value_and_update(loss_fn, optim.sgd(0.1), "i")
    with pytest.raises(NameError, match="unbound axis name 'i'"):
        step(tree(SIZES, 0), optim.sgd(0.1).init(tree(SIZES, 0)), tree(SIZES, 1))


@pytest.mark.parametrize("make", [lambda opt: funcdp.value_and_update(loss_fn, opt, "i"),
                                  lambda opt: two_rounds(loss_fn, opt)])
def test_state_made_for_other_parameters(devices, make):
    opt = optim.sgd(0.1, momentum=0.9)
    f = funcdp.pmap(make(opt), axis_name="i", in_axes=(None, None, 0), devices=devices[:2])
    with pytest.raises(ValueError, match="the optimizer state was made for parameters of "
                                         "structure"):
        f(tree(SIZES, 0), opt.init(tree(SIZES[:1], 0)), tree(SIZES, 1, lead=(2,)))


@pytest.mark.parametrize("name, rounds", [("sgd_momentum", 1), ("adam", 1), ("chain_one", 1),
                                          ("chain_clip", 2), ("custom", 1)])
def test_rounds(devices, monkeypatch, name, rounds):
    # One collective round where the optimizer can average the gradients itself (a clip
    # needs the average first; a custom optimizer's update is not shared: one round).
    from funcdp._src import rendezvous

    calls = []
    exchange = rendezvous.Mesh.exchange

    def counting(self, coord, *args, **kwargs):
        calls.append(coord)
        return exchange(self, coord, *args, **kwargs)

    monkeypatch.setattr(rendezvous.Mesh, "exchange", counting)
    run(funcdp.value_and_update(loss_fn, OPTIMIZERS[name](), "i"), OPTIMIZERS[name](),
        SIZES, 2, steps=1)
    assert len(calls) == 2 * rounds


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("opt", [optim.sgd(0.1, momentum=0.9, nesterov=True), optim.adam(0.01)])
def test_non_contiguous_gradients(devices, n, dtype, opt):
    # A transposed use makes the gradients transposed views; pmean's results are
    # contiguous, and in half precision the optimizer's kernels round differently on the
    # two layouts: the average must be laid out as pmean's is.
    def loss(p, x):
        return (p["w"].t() * x).sum() + (p["b"].t() * x[:5, :3]).sum()

    params = {"w": torch.randn(400, 300).to(dtype), "b": torch.randn(3, 5).to(dtype)}
    x = torch.randn(n, 300, 400).to(dtype)
    f = [funcdp.pmap(step, axis_name="i", in_axes=(None, None, 0), out_axes=None,
                     devices=devices[:n])
         for step in (funcdp.value_and_update(loss, opt, "i"), two_rounds(loss, opt))]
    got, want = [g(params, opt.init(params), x) for g in f]
    assert_equal_trees(got, want)


def test_messages_name_the_call(devices):
    opt = optim.sgd(0.1)
    step = funcdp.value_and_update(loss_fn, opt, "zz")
    assert step.__name__ == "value_and_update(loss_fn)"
    f = funcdp.pmap(step, axis_name="i", in_axes=(None, None, 0), devices=devices[:2])
    with pytest.raises(NameError, match=r"value_and_update\(loss_fn\).*: unbound axis name 'zz'"):
        f(tree(SIZES, 0), opt.init(tree(SIZES, 0)), tree(SIZES, 1, lead=(2,)))


LARGE = [(5 * BIG,), (4 * BIG + 3,), (7,)]  # enough for the in-place average (pmean's rule)


@pytest.mark.parametrize("n", [2, 3])
def test_average_into_the_first_devices_gradients(devices, monkeypatch, n):
    # Gradients only the step refers to: the first device's hold the average (no new
    # buffer), with the same results.
    into = []
    mean_of = shared_update._mean_of

    def recording(lists, dst=None):
        into.append(dst is not None and any(t is not None for t in dst))
        return mean_of(lists, dst)

    monkeypatch.setattr(shared_update, "_mean_of", recording)
    opt = optim.sgd(0.1, momentum=0.9)
    got = run(funcdp.value_and_update(loss_fn, opt, "i"), opt, LARGE, n, steps=2)
    assert any(into)
    monkeypatch.setattr(shared_update, "_mean_of", mean_of)
    assert_equal_trees(got, run(two_rounds(loss_fn, opt), opt, LARGE, n, steps=2))


class _GivenGradient(torch.autograd.Function):
    """``x * 1`` whose gradient is a tensor of the caller's (not fresh)."""

    @staticmethod
    def forward(x, g):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.g = inputs[1]

    @staticmethod
    def backward(ctx, ct):
        return ctx.g, None


def test_a_gradient_of_the_callers_is_not_written_to(devices):
    # A custom backward that returns the caller's own tensor as the gradient: it must
    # not hold the average.
    given = {k: [torch.full(s, 0.5 + d, dtype=torch.float64) for d in range(2)]
             for k, s in zip(("p0", "p1"), LARGE)}
    keep = {k: [t.clone() for t in v] for k, v in given.items()}

    def loss(p, x):
        d = int(funcdp.axis_index("i"))
        return sum(_GivenGradient.apply(p[k], given[k][d]).sum() for k in given) + loss_fn(
            {"p2": p["p2"]}, {"p2": x["p2"]})

    opt = optim.sgd(0.1)
    got = run(funcdp.value_and_update(loss, opt, "i"), opt, LARGE, 2, steps=1)
    for k in given:
        assert all(torch.equal(a, b) for a, b in zip(given[k], keep[k]))
    assert_equal_trees(got, run(two_rounds(loss, opt), opt, LARGE, 2, steps=1))


@pytest.mark.parametrize("written_out", [False, True])
@pytest.mark.parametrize("hold", ["untyped", "typed"])
def test_a_gradients_storage_the_user_holds_is_not_written_to(devices, written_out, hold):
    # torch keeps one Python object per storage: holding it (t.untyped_storage(),
    # t.storage()) refers to the gradient's memory without a reference to the tensor.
    stash = {}

    def loss(p, x):
        d = int(funcdp.axis_index("i"))
        p["p0"].register_hook(lambda g: stash.__setitem__(d, (
            g.untyped_storage() if hold == "untyped" else g.storage(), g.clone())))
        return loss_fn(p, x)

    opt = optim.sgd(0.1)
    step = two_rounds(loss, opt) if written_out else funcdp.value_and_update(loss, opt, "i")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (TypedStorage is deprecated)
        run(step, opt, LARGE, 2, steps=1)
        for d, (storage, was) in stash.items():
            seen = torch.empty(0, dtype=was.dtype).set_(
                storage if hold == "untyped" else storage._untyped_storage, 0, was.shape)
            assert torch.equal(seen, was), d


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "sgd_schedule", "adam",
                                  "adamw_amsgrad", "chain_one"])
def test_new_parameters_go_into_the_average(devices, monkeypatch, name):
    # The average of the gradients is the round's own buffer: the optimizer writes the new
    # large parameters into it instead of into new memory, with the same results (and
    # layouts) as the two rounds. A transposed parameter gets a new tensor, laid out as
    # the two rounds lay it out, and so do small ones.
    averages = set()
    kept = []  # (alive, so that no later tensor is given an average's address)
    mean_of = shared_update._mean_of

    def recording(lists, dst=None):
        out = mean_of(lists, dst)
        averages.update(t.data_ptr() for t in out)
        kept.extend(out)
        return out

    sizes = [(5 * BIG,), (3, 2 * BIG), (7,)]

    def steps(step, opt):
        f = funcdp.pmap(step, axis_name="i", in_axes=(None, None, 0), out_axes=None,
                        devices=funcdp.local_devices()[:2])
        params = tree(sizes, 0)
        params["p1"] = params["p1"].t().contiguous().t()  # (3, 2 * BIG), transposed
        state = opt.init(params)
        for t in range(2):
            value, params, state = f(params, state, tree(sizes, 100 + t, lead=(2,)))
        return value, params, state

    opt = OPTIMIZERS[name]()
    expected = steps(two_rounds(loss_fn, opt), opt)
    monkeypatch.setattr(shared_update, "_mean_of", recording)
    got = steps(funcdp.value_and_update(loss_fn, opt, "i"), opt)
    assert_equal_trees(got, expected)
    assert got[1]["p0"].data_ptr() in averages
    assert got[1]["p1"].data_ptr() not in averages
    # Small leaves: new tensors, all made by one multi-tensor call.
    assert got[1]["p2"].data_ptr() not in averages
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(got), leaves(expected)):
        assert a.stride() == b.stride()


def test_replicated_results_known_equal_are_not_compared(devices, monkeypatch):
    # The loss and the small results are copies the round made for each device: after
    # the plan's first calls pmap's out_axes=None check knows them equal without
    # comparing them; the step counter, computed by every device, is still compared.
    from funcdp._src import pmap as pmap_mod

    compared = []
    same_bits = pmap_mod._same_bits
    monkeypatch.setattr(pmap_mod, "_same_bits",
                        lambda a, b: compared.append(tuple(a.shape)) or same_bits(a, b))
    opt = optim.sgd(0.1, momentum=0.9)
    f = funcdp.pmap(funcdp.value_and_update(loss_fn, opt, "i"), axis_name="i",
                    in_axes=(None, None, 0), out_axes=None, devices=funcdp.local_devices()[:2])
    params = tree(LARGE, 0)
    state = opt.init(params)
    for t in range(4):
        compared.clear()
        value, params, state = f(params, state, tree(LARGE, 100 + t, lead=(2,)))
    assert compared == [()]  # the step counter


@pytest.mark.parametrize("make", [
    lambda lr: optim.sgd(lr, momentum=0.9),
    lambda lr: optim.adam(lr),
])
@pytest.mark.parametrize("per_device", ["lr", "step"])
def test_a_step_or_learning_rate_that_differs_per_device(devices, make, per_device):
    # Replicated parameters and moments, but a learning rate (from a schedule of the
    # device's index) or a step counter that differs per device: each device's update is
    # its own, as without axis_name (a shared update would give every device one
    # device's update).
    n = 3
    if per_device == "lr":
        opt = make(lambda step: 0.01 * (funcdp.axis_index("i") + 1).to(torch.float64))
        state_axes = None
    else:
        opt = make(lambda step: 0.01 * step.to(torch.float64))
        state_axes = {k: 0 if k == "step" else None for k in make(0.1).init({}).keys()}

    def written(p, s, x):
        _, g = funcdp.value_and_grad(loss_fn, "i")(p, x)
        return opt.step(g, s, p, axis_name="i")

    def alone(p, s, x):
        _, g = funcdp.value_and_grad(loss_fn, "i")(p, x)
        return opt.step(g, s, p)

    def fused(p, s, x):
        return funcdp.value_and_update(loss_fn, opt, "i")(p, s, x)[1:]

    params = tree(SIZES, 0)
    state = opt.init(params)
    if per_device == "step":
        state["step"] = torch.arange(n) * 10
    x = tree(SIZES, 100, lead=(n,))
    out = [funcdp.pmap(f, axis_name="i", in_axes=(None, state_axes, 0), out_axes=0,
                       devices=funcdp.local_devices()[:n])(params, state, x)
           for f in (alone, written, fused)]
    assert_equal_trees(out[1], out[0])
    assert_equal_trees(out[2], out[0])
    assert not torch.equal(out[0][0]["p0"][0], out[0][0]["p0"][1])


def test_error_devices_reaching_other_collectives_is_worded(devices):
    opt = optim.sgd(0.1)
    step = funcdp.value_and_update(lambda p, x: (p["w"].sum() * x).mean(), opt, "i")

    def f(p, s, x):
        if int(funcdp.axis_index("i")) == 0:
            return funcdp.pmean(x.mean(), "i"), p, s
        return step(p, s, x)

    p = {"w": torch.zeros(3)}
    with pytest.raises(funcdp.CollectiveError) as e:
        funcdp.pmap(f, axis_name="i", in_axes=(None, None, 0), out_axes=0,
                    devices=funcdp.local_devices()[:2])(p, opt.init(p), torch.ones(2))
    assert re.search(r"device 1 .*: value_and_update\(<lambda>\) \(funcdp.optim.sgd step\)"
                     r"\(axis_name='i'\) with values \[\(\) float32, \(3,\) float32, \(3,\) "
                     r"float32\]", str(e.value)), str(e.value)
