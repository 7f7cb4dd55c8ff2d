"""Modules as pure functions, sync BatchNorm, the train-step helper and checkpoints."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import hypothesis.strategies as st
import pytest
import torch
from helpers import assert_trees_close
from hypothesis import given
from torch import nn
from torch.func import grad

import funcdp
from funcdp import optim


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def test_apply_is_pure_and_matches_the_module():
    m = bn_model()
    fm = funcdp.nn.functional(m)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out, new_buffers = fm.apply(fm.params, fm.buffers, x, train=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref = bn_model()
    assert_trees_close(out, ref.train()(x))
    assert_trees_close(new_buffers, dict(ref.named_buffers()))
    out_eval, same = fm.apply(fm.params, fm.buffers, x, train=False)
    assert_trees_close(out_eval, bn_model().eval()(x))
    assert_trees_close(same, fm.buffers)


def test_apply_is_thread_safe_under_pmap():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    fm = funcdp.nn.functional(m)
    params = [{k: v + 0.01 * i for k, v in fm.params.items()} for i in range(8)]
    stacked = {k: torch.stack([p[k] for p in params]) for k in fm.params}
    x = torch.randn(8, 64, 16, dtype=torch.float64)
    for _ in range(3):
        out = funcdp.pmap(lambda p, x: fm.apply(p, {}, x)[0])(stacked, x)
        for i in range(8):
            assert_trees_close(out[i], torch.func.functional_call(m, params[i], (x[i],)))


def test_sync_batchnorm_data_parallel_matches_full_batch_training():
    """Outputs, gradients and running statistics over 4 devices equal one device."""
    torch.manual_seed(2)
    x = torch.randn(4, 6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 6))
    opt = optim.sgd(0.1, momentum=0.9)

    synced = funcdp.nn.functional(bn_model(), sync_batchnorm="batch")
    plain = funcdp.nn.functional(bn_model())

    def loss(fm, p, b, x, y):
        out, nb = fm.apply(p, b, x, train=True)
        return nn.functional.cross_entropy(out, y), (out, nb)

    @funcdp.pmap(axis_name="batch", in_axes=(None, None, None, 0, 0),
                 out_axes=(None, None, None, None, 0))
    def step(p, b, s, x, y):
        (loss_v, (out, nb)), g = funcdp.value_and_grad(
            lambda p: loss(synced, p, b, x, y), "batch", has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), nb, s, loss_v, out

    p, b, s = synced.params, synced.buffers, opt.init(synced.params)
    rp, rb, rs = plain.params, plain.buffers, opt.init(plain.params)
    for _ in range(3):
        p, b, s, loss_v, out = step(p, b, s, x, y)
        g, (rl, (rout, rb)) = torch.func.grad_and_value(
            lambda q: loss(plain, q, rb, x.reshape(24, 2, 5, 5), y.reshape(24)),
            has_aux=True)(rp)
        u, rs = opt.update(g, rs, rp)
        rp = optim.apply_updates(rp, u)
        assert_trees_close(out.to_tensor().reshape(24, 3), rout)
        assert_trees_close(loss_v, rl)
        assert_trees_close(p, rp, rtol=1e-10, atol=1e-12)
        assert_trees_close(b, rb, rtol=1e-10, atol=1e-12)


def test_sync_batchnorm_over_blocks_and_vmap():
    torch.manual_seed(3)
    bn = funcdp.nn.SyncBatchNorm(3, axis_name="i").double()
    ref = nn.BatchNorm1d(3).double()
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    fm = funcdp.nn.functional(bn)
    out = funcdp.pmap(lambda x: fm.apply(fm.params, fm.buffers, x, train=True),
                      axis_name="i", devices=funcdp.local_devices()[:2],
                      out_axes=(0, None))(x)
    assert_trees_close(out[0].to_tensor().reshape(40, 3), ref.train()(x.reshape(40, 3)))
    assert_trees_close(out[1], dict(ref.named_buffers()))


def test_value_and_grad_averages_and_the_trap_does_not():
    torch.manual_seed(4)
    w = torch.randn(3, dtype=torch.float64)
    x = torch.randn(4, 5, 3, dtype=torch.float64)

    def loss(w, x):
        return torch.sin(x @ w).sum() / 5

    good = funcdp.pmap(lambda w, x: funcdp.value_and_grad(loss, "i")(w, x),
                       axis_name="i", in_axes=(None, 0), out_axes=None)(w, x)
    full = torch.func.grad_and_value(lambda w: loss(w, x.reshape(20, 3)) / 4)(w)
    assert_trees_close(good, (full[1], full[0]))
    trap = funcdp.pmap(lambda w, x: grad(lambda w: funcdp.pmean(loss(w, x), "i"))(w),
                       axis_name="i", in_axes=(None, 0))(w, x)
    for i in range(4):
        assert_trees_close(trap[i], grad(loss)(w, x[i]))


def _same(a, b):
    """Equal pytrees, bit for bit, with the same requires_grad on every tensor."""
    assert_trees_close(a, b, exact=True)
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert [getattr(x, "requires_grad", None) for x in fa] == \
        [getattr(x, "requires_grad", None) for x in fb]


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from([0, 1, (0,), (1, 0), (0, 2)]), st.booleans(), st.integers(1, 5))
def test_value_and_grad_equals_torch_func_bit_for_bit(seed, dtype, argnums, has_aux, width):
    # Outside transforms value_and_grad differentiates with torch.autograd; the result
    # must be torch.func.grad_and_value's exactly (values, structure, requires_grad).
    g = torch.Generator().manual_seed(seed)
    w = {"w": torch.randn(width, 3, generator=g, dtype=dtype),
         "b": [torch.randn(width, generator=g, dtype=dtype)]}
    v = torch.randn(width, generator=g, dtype=dtype)
    x = torch.randn(4, 3, generator=g, dtype=dtype)

    def loss(w, v, x):
        h = torch.tanh(x @ w["w"].T + w["b"][0])
        out = (h @ v).pow(2).mean() + x.sum() * 0
        return (out, {"h": h, "x": [x]}) if has_aux else out

    got = funcdp.value_and_grad(loss, argnums=argnums, has_aux=has_aux)(w, v, x)
    gv = torch.func.grad_and_value(loss, argnums=argnums, has_aux=has_aux)(w, v, x)
    _same(got, (gv[1], gv[0]))


def test_value_and_grad_keeps_what_torch_func_connects():
    torch.manual_seed(7)
    w, x = torch.randn(3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    outer = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def captured(w, x):  # a captured tensor that requires grad: gradients depend on it
        return ((x @ (w * outer)) ** 2).mean(), {"aux": x @ outer, "local": x @ w}

    def additive(w, x):  # the loss depends on it, the gradient does not
        return torch.sin(x @ w).sum() + outer.sum()

    def unused(w, x):  # nothing depends on w
        return (x @ outer).sum()

    for fun, aux in ((captured, True), (additive, False), (unused, False)):
        got = funcdp.value_and_grad(fun, has_aux=aux)(w, x)
        want = torch.func.grad_and_value(fun, has_aux=aux)(w, x)
        _same(got, (want[1], want[0]))
        # The outer graph is the same: differentiating the results w.r.t. ``outer``.
        def total(res):
            return sum(t.sum() for t in torch.utils._pytree.tree_leaves(res)
                       if isinstance(t, torch.Tensor) and t.requires_grad)
        g_got, = torch.autograd.grad(total(got), outer, allow_unused=True)
        g_want, = torch.autograd.grad(total((want[1], want[0])), outer, allow_unused=True)
        assert_trees_close(g_got, g_want, exact=True)

    # Arguments that require grad (meta-learning) and enclosing transforms take the
    # torch.func path; so do inputs torch.func rejects, with its own messages.
    wr = w.clone().requires_grad_()
    g = funcdp.value_and_grad(lambda w, x: (x @ w).pow(2).sum())(wr, x)[1]
    assert g.requires_grad
    # g = 2 x^T x w, so d(sum g)/dw = 2 x^T x 1.
    torch.testing.assert_close(torch.autograd.grad(g.sum(), wr)[0], 2 * (x.T @ x).sum(1))
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():  # forward-mode tangents go through, on any argument
        f = lambda w, x: torch.sin(x @ w).sum()  # noqa: E731
        for args in ((w, fwad.make_dual(x, torch.ones_like(x))),
                     (fwad.make_dual(w, torch.ones_like(w)), x)):
            tangents = [fwad.unpack_dual(r).tangent
                        for r in (funcdp.value_and_grad(f)(*args)[1],
                                  torch.func.grad_and_value(f)(*args)[0])]
            assert tangents[0] is not None
            assert_trees_close(tangents[0], tangents[1], exact=True)
    per_ex = torch.func.vmap(funcdp.value_and_grad(lambda w, x: (x @ w).sin()),
                             in_dims=(None, 0))(w, x)
    torch.testing.assert_close(per_ex[1], x * torch.cos(x @ w)[:, None])
    cases = [
        (lambda w, x: x @ w, {}, "Expected f\\(\\*args\\) to return a scalar Tensor"),
        (lambda w, x: (x @ w).sum(), {"has_aux": True}, "should be a tuple"),
        (lambda w, x: (x @ w).sum(), {"argnums": 2}, "argnum=2, but only 2 positional"),
    ]
    for fun, kw, msg in cases:
        with pytest.raises(Exception, match=msg):
            funcdp.value_and_grad(fun, **kw)(w, x)
        with pytest.raises(Exception, match=msg):
            torch.func.grad_and_value(fun, **kw)(w, x)
    with pytest.raises(RuntimeError, match="floating point"):
        funcdp.value_and_grad(lambda n, x: x.sum())(torch.arange(3), x)


@given(st.integers(1, 8), st.lists(st.integers(1, 90_000), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_value_and_grad_average_equals_pmean_bit_for_bit(n, sizes, seed, dtype):
    # Any device count and leaf sizes (the averaging writes into device 0's gradients
    # above 131072 elements in all, split at arbitrary points between the devices).
    g = torch.Generator().manual_seed(seed)
    w = {f"w{i}": torch.randn(k, generator=g, dtype=dtype) for i, k in enumerate(sizes)}
    x = torch.randn(n, 3, generator=g, dtype=dtype)

    def loss(w, x):
        return sum(torch.sin(v * x.sum() + i).sum() for i, v in enumerate(w.values()))

    devices = funcdp.local_devices()[:n]
    got = funcdp.pmap(lambda w, x: funcdp.value_and_grad(loss, "i")(w, x), axis_name="i",
                      in_axes=(None, 0), out_axes=None, devices=devices)(w, x)
    want = funcdp.pmap(
        lambda w, x: funcdp.pmean(torch.func.grad_and_value(loss)(w, x)[::-1], "i"),
        axis_name="i", in_axes=(None, 0), out_axes=None, devices=devices)(w, x)
    assert_trees_close(got, want, exact=True)


def test_value_and_grad_matches_torch_func_at_the_edges():
    # Found in review: each case once differed from torch.func.grad_and_value.
    torch.manual_seed(8)
    w, c = torch.randn(3), torch.randn(3, requires_grad=True)

    def both(fun, *args, **kw):
        return (funcdp.value_and_grad(fun, **kw)(*args),
                (lambda r: (r[1], r[0]))(torch.func.grad_and_value(fun, **kw)(*args)))

    # Under no_grad, results do not connect to captured tensors.
    with torch.no_grad():
        _same(*both(lambda w: (w * c).sum() + (w ** 2).sum(), w))
        assert not torch.is_grad_enabled()
    # The caller's grad mode is left as it was, whatever the loss function does to it.
    for outer in (True, False):
        with torch.set_grad_enabled(outer):
            for inner in (True, False):
                funcdp.value_and_grad(lambda w: (torch.set_grad_enabled(inner),
                                                 (w ** 2).sum())[1])(w)
                assert torch.is_grad_enabled() is outer
    # aux that shares graph nodes with the loss keeps a usable graph to c.
    def shared(w):
        h = w.exp()
        return h.sum(), (h * c).sum()
    got, want = both(shared, w, has_aux=True)
    _same(got, want)
    got[0][1].backward()
    torch.testing.assert_close(c.grad, w.exp())
    c.grad = None
    # aux returning an input gives the caller's own tensor back.
    assert funcdp.value_and_grad(lambda w: ((w ** 2).sum(), w), has_aux=True)(w)[0][1] is w
    # An integer loss runs once (the same random draws as torch.func) with zero gradients.
    f = lambda w: (torch.rand(1000) < w.sigmoid().mean()).sum()  # noqa: E731
    torch.manual_seed(0)
    got = funcdp.value_and_grad(f)(torch.randn(1000))
    after = torch.rand(())
    torch.manual_seed(0)
    want = torch.func.grad_and_value(f)(torch.randn(1000))
    assert torch.equal(got[0], want[1]) and torch.equal(got[1], want[0])
    assert torch.equal(after, torch.rand(()))
    # An inference tensor can be differentiated, as with torch.func.
    with torch.inference_mode():
        wi = torch.randn(3)
    _same(*both(lambda w: (w ** 2).sum(), wi))
    # backward() inside the loss is an error, as inside torch.func.
    with pytest.raises(RuntimeError, match="called backward"):
        funcdp.value_and_grad(lambda w: ((w * c).sum().backward(), (w ** 2).sum())[1])(w)
    # A complex loss is an error, as with torch.func (found in review).
    for fun in (funcdp.value_and_grad, torch.func.grad_and_value):
        with pytest.raises(RuntimeError, match="only for real scalar outputs"):
            fun(lambda w: (w * (1 + 2j)).sum())(w)
    # A captured forward-mode tangent reaches the value too.
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        cd = fwad.make_dual(torch.randn(3), torch.ones(3))
        got, want = both(lambda w: (w * cd).sum(), w)
        for a, b in zip(got, want):
            assert_trees_close(fwad.unpack_dual(a).tangent, fwad.unpack_dual(b).tangent)


def test_value_and_grad_under_transforms_and_with_foreign_memory():
    # Averaging into the gradients must not touch wrapped tensors (vmap, more shards than
    # devices, an enclosing grad) or memory torch did not allocate (found in review).
    import numpy as np

    loss = lambda w, x: ((x * w["a"]) ** 2).mean()  # noqa: E731
    w, x = {"a": torch.tensor(1.0)}, torch.tensor([[1.0], [3.0]])
    got = funcdp.vmap(funcdp.value_and_grad(loss, "b"), in_axes=(None, 0), axis_name="b")(w, x)
    assert_trees_close(got, (torch.tensor([5.0, 5.0]), {"a": torch.tensor([10.0, 10.0])}))
    big = {"a": torch.randn(400, 400, dtype=torch.float64)}
    xs = torch.randn(6, 2, 400, dtype=torch.float64)
    lin = lambda w, x: (x @ w["a"]).pow(2).mean()  # noqa: E731
    got = funcdp.pmap(lambda w, x: funcdp.value_and_grad(lin, "i")(w, x), axis_name="i",
                      in_axes=(None, 0), out_axes=None,
                      devices=funcdp.local_devices()[:3])(big, xs)
    full = torch.func.grad_and_value(lin)(big, xs.reshape(12, 400))
    assert_trees_close(got, (full[1], full[0]))
    def outer(inner):
        return funcdp.pmap(lambda w, x: torch.func.grad(lambda w: inner(w, x).sum())(w),
                           axis_name="i", in_axes=(None, 0),
                           devices=funcdp.local_devices()[:2])(big, xs[:2])

    assert_trees_close(
        outer(lambda w, x: funcdp.value_and_grad(lin, "i")(w, x)[1]["a"]),
        outer(lambda w, x: funcdp.pmean(torch.func.grad(lin)(w, x), "i")["a"]))

    bufs = [np.full((400, 400), float(i + 1)) for i in range(3)]

    class NumpyGrad(torch.autograd.Function):
        @staticmethod
        def forward(w, i):
            return (w * 0).sum()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.i = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return torch.from_numpy(bufs[int(ctx.i)]), None

    got = funcdp.pmap(
        lambda w, i: funcdp.value_and_grad(lambda w, i: NumpyGrad.apply(w["w"], i), "i")(w, i),
        axis_name="i", in_axes=(None, 0), out_axes=None, devices=funcdp.local_devices()[:3])(
            {"w": torch.randn(400, 400, dtype=torch.float64)}, torch.arange(3))
    assert all((b == i + 1).all() for i, b in enumerate(bufs))
    assert torch.equal(got[1]["w"], torch.full((400, 400), 2.0, dtype=torch.float64))


class _GivesBack(torch.autograd.Function):
    """``sum((w * c).sum() for w in ws)`` whose backward returns ``c`` as the gradient of
    every ``w`` in ways that share memory with the caller's ``c`` or between gradients:
    ``c`` itself, a view of it, a tensor sharing its storage, or one new tensor for all."""

    @staticmethod
    def forward(c, mode, *ws):
        return sum((w * c).sum() for w in ws)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.c, ctx.mode, ctx.n = inputs[0], inputs[1], len(inputs) - 2

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        if ctx.mode == "view":
            c = c[:]
        elif ctx.mode == "storage":
            c = c.detach()  # not a view, but the same memory
        elif ctx.mode == "new":
            c = c * 1
        return (None, None, *[c] * ctx.n)


@pytest.mark.parametrize("n", [2, 3])
def test_value_and_grad_reduces_into_its_own_gradients(n, monkeypatch):
    # Large enough for the parallel reduction, which writes the average into device 0's
    # fresh gradients: the result must be pmean's, and must not touch anyone's tensors.
    from funcdp._src import collectives

    reused = []
    real = collectives._reusable
    monkeypatch.setattr(collectives, "_reusable",
                        lambda items: reused.append(real(items)) or reused[-1])
    torch.manual_seed(6)
    w = {"a": torch.randn(500, 300, dtype=torch.float64),
         "b": torch.randn(300, dtype=torch.float64)}
    x = torch.randn(n, 8, 300, dtype=torch.float64)

    def loss(w, x):
        return torch.tanh(x @ w["a"].T).pow(2).mean() + (x @ w["b"]).mean()

    devices = funcdp.local_devices()[:n]
    got = funcdp.pmap(lambda w, x: funcdp.value_and_grad(loss, "i")(w, x), axis_name="i",
                      in_axes=(None, 0), out_axes=None, devices=devices)(w, x)
    ref = funcdp.pmap(lambda w, x: funcdp.pmean(torch.func.grad_and_value(loss)(w, x)[::-1],
                                                 "i"),
                      axis_name="i", in_axes=(None, 0), out_axes=None, devices=devices)(w, x)
    assert_trees_close(got, ref, exact=True)
    assert reused and reused[0] == frozenset({1, 2})  # both gradients, not the loss
    full = torch.func.grad_and_value(loss)(w, x.reshape(-1, 300))
    assert_trees_close(got, (full[1], full[0]))

    # Gradients that are the user's own tensors (here each device's shard of the input),
    # share memory with them, or are one tensor for two parameters, are never written to.
    for mode, nparams in (("same", 1), ("view", 1), ("storage", 1), ("new", 2)):
        c = torch.randn(n, 400, 400, dtype=torch.float64)
        c_before = c.clone()
        ws = (torch.randn(400, 400, dtype=torch.float64),) * nparams

        def loss2(ws, c, mode=mode):
            return _GivesBack.apply(c, mode, *ws)

        reused.clear()
        (_, grads) = funcdp.pmap(lambda ws, c: funcdp.value_and_grad(loss2, "i")(ws, c),
                                 axis_name="i", in_axes=(None, 0), out_axes=None,
                                 devices=devices)(ws, c)
        assert torch.equal(c, c_before), mode
        assert_trees_close(grads, (c_before.mean(0),) * nparams)
        assert reused == [frozenset()], mode


def test_state_dict_round_trip_and_module_prefix():
    m = bn_model()
    fm = funcdp.nn.functional(m)
    sd = fm.state_dict(funcdp.replicate(fm.params), fm.buffers)
    fresh = bn_model()
    fresh.load_state_dict(sd)
    dp_style = {f"module.{k}": v for k, v in m.state_dict().items()}
    p, b = fm.load_state_dict(dp_style)
    assert_trees_close(p, fm.params)
    assert_trees_close(b, fm.buffers)
    with pytest.raises(KeyError, match="missing keys"):
        fm.load_state_dict({"0.weight": torch.zeros(1)})


def test_checkpoint_round_trip_across_device_counts(tmp_path):
    torch.manual_seed(5)
    fm = funcdp.nn.functional(nn.Linear(4, 2).double())
    opt = optim.adam(1e-2)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)

    def make_step(devs):
        @funcdp.pmap(axis_name="d", in_axes=(0, 0, None, None), out_axes=(None, None),
                     devices=devs)
        def step(p, s, x, y):
            def loss(p):
                return ((fm.apply(p, {}, x)[0] - y) ** 2).mean()
            _, g = funcdp.value_and_grad(loss, "d")(p)
            u, s = opt.update(g, s, p)
            return optim.apply_updates(p, u), s
        return step

    devs4 = funcdp.local_devices()[:4]
    p = funcdp.replicate(fm.params, devs4)
    s = funcdp.replicate(opt.init(fm.params), devs4)
    p, s = make_step(devs4)(p, s, x, y)
    path = tmp_path / "state.pt"
    funcdp.save_checkpoint(path, {"params": funcdp.replicate(p, devs4),
                                  "opt": funcdp.replicate(s, devs4), "step": 1})
    ref_p, ref_s = make_step(devs4)(funcdp.replicate(p, devs4), funcdp.replicate(s, devs4),
                                    x, y)
    for n in (2, 1):
        devs = funcdp.local_devices()[:n]
        state = funcdp.load_checkpoint(path, replicate_to=devs)
        assert state["step"] == 1 and state["params"]["weight"].shape[0] == n
        p2, s2 = make_step(devs)(state["params"], state["opt"], x, y)
        assert_trees_close((p2, s2), (ref_p, ref_s), exact=True)
    plain = funcdp.load_checkpoint(path)
    module = nn.Linear(4, 2).double()
    module.load_state_dict(fm.state_dict(plain["params"], {}))
    assert_trees_close(dict(module.named_parameters()), p)


def test_checkpoint_loads_in_a_process_with_another_device_count(tmp_path):
    path = tmp_path / "c.pt"
    funcdp.save_checkpoint(path, {"w": funcdp.replicate(torch.arange(3.0)),
                                  "s": funcdp.pmap(lambda v: v * 2)(torch.arange(8.0))})
    code = (f"import funcdp; s = funcdp.load_checkpoint({str(path)!r}, "
            f"replicate_to=funcdp.local_devices()); print(s['w'].shape, s['s'].tolist())")
    env = {**os.environ, "FUNCDP_NUM_CPU_DEVICES": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.Size([2,", "3])", "[0.0,", "2.0,", "4.0,", "6.0,",
                                  "8.0,", "10.0,", "12.0,", "14.0]"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(TypeError, match="cannot save a leaf of type object"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"a": object()})
    torch.save({"a": 1}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="is not a funcdp checkpoint"):
        funcdp.load_checkpoint(tmp_path / "y.pt")


def test_functional_errors():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        funcdp.nn.functional(lambda x: x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sync_batchnorm_keeps_low_precision_statistics_in_float32(dtype):
    # Statistics accumulate in float32 as torch's batch_norm does: a float16 count of
    # 70000 examples would overflow, bfloat16 sums would lose the mean; the output keeps
    # the input's dtype.
    torch.manual_seed(0)
    x = (torch.randn(70000, 2) * 3 + 5).to(dtype)
    bn = nn.BatchNorm1d(2).to(dtype)
    out = funcdp.DataParallel(bn, device_ids=[0, 1, 2, 3])(x)
    ref = nn.BatchNorm1d(2).to(dtype)(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.05)
    torch.testing.assert_close(bn.running_mean.float(), x.float().mean(0) * 0.1,
                               rtol=1e-2, atol=1e-2)


def test_apply_follows_the_module_as_it_is_now():
    # Layers replaced or added after wrapping, a re-created parameter and .double()'s new
    # buffers are used, from the calling thread and from every device of a pmap; an
    # unchanged structure is not rebuilt.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    fm = funcdp.nn.functional(net)
    x = torch.randn(4, 6, 5)
    fm.apply(fm.params, fm.buffers, x[0])
    built = fm._built
    fm.apply(fm.params, {}, x[0])
    assert fm._built is built

    def pmapped(fm, x):
        return funcdp.pmap(lambda p, x: fm.apply(p, {}, x)[0], in_axes=(None, 0),
                           devices=funcdp.local_devices()[:4])(fm.params, x).to_tensor()

    pmapped(fm, x)
    net[2] = nn.Linear(8, 4)
    net.append(nn.Tanh())
    net[0].weight = nn.Parameter(torch.randn(8, 5))
    assert_trees_close(fm.apply(fm.params, {}, x[0])[0], net(x[0]))
    assert_trees_close(pmapped(fm, x), torch.stack([net(v) for v in x]))
    net.double().eval()
    with torch.no_grad():
        net[1].running_mean.add_(1)
    assert_trees_close(fm.apply(fm.params, {}, x[0].double())[0], net(x[0].double()))
    fm.module = nn.Linear(5, 2)
    assert_trees_close(fm.apply(fm.params, {}, x[0])[0], fm.module(x[0]))


def test_apply_rejects_keys_the_module_does_not_have():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    fm = funcdp.nn.functional(m)
    x = torch.randn(4, 3)
    w = {"0.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"`params` has a key the module has no parameter "
                                         r"for: '0.bais'.*'0.bais': did you mean '0.bias'\?"):
        fm.apply({**w, "0.bais": torch.zeros(2)}, {}, x)
    prefixed = {f"module.{k}": v for k, v in fm.params.items()}
    with pytest.raises(ValueError, match=r"start with 'module.' .*strip the prefix"):
        fm.apply(prefixed, {}, x)
    with pytest.raises(ValueError, match=r"'1.running_mean' is a buffer: pass it in "
                                         r"`buffers`"):
        fm.apply({**w, "1.running_mean": torch.zeros(2)}, {}, x)
    with pytest.raises(ValueError, match=r"`buffers` has a key the module has no buffer "
                                         r"for: 'running_mean'.*did you mean "
                                         r"'1.running_mean'\?"):
        fm.apply(fm.params, {"running_mean": torch.zeros(2)}, x)
    # Left out: the module's own (as torch.func.functional_call's default).
    out, _ = fm.apply(w, {}, x, train=False)
    want = torch.func.functional_call(m.eval(), w, (x,))
    assert_trees_close(out, want)


def test_load_state_dict_takes_non_persistent_buffers_from_the_module():
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4),
                                 persistent=False)

        def forward(self, x):
            return self.lin(x) * self.inv_freq.repeat(2)

    torch.manual_seed(0)
    m = Rotary()
    fm = funcdp.nn.functional(m)
    params, buffers = fm.load_state_dict(m.state_dict())
    assert list(buffers) == ["inv_freq"]
    x = torch.randn(3, 4)
    assert_trees_close(fm.apply(params, buffers, x)[0], m(x))
    with pytest.raises(KeyError, match=r"unexpected keys \['inv_freq'\]"):
        fm.load_state_dict({**m.state_dict(), "inv_freq": m.inv_freq})


def test_functional_modules_copy_and_pickle():
    torch.manual_seed(0)
    fm = funcdp.nn.functional(bn_model())
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    fm.apply(fm.params, {}, x)  # (replicas built: not part of the copy)
    buf = io.BytesIO()
    torch.save(fm, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fm), torch.load(buf, weights_only=False)):
        assert other.module is not fm.module
        assert_trees_close(other.apply(other.params, other.buffers, x),
                           fm.apply(fm.params, fm.buffers, x))


def test_sync_batchnorm_refuses_one_value_per_channel_like_torch():
    # One example over the whole axis: the variance is 0 and the output would be zeros.
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(4)(x)
    bn = nn.BatchNorm1d(4)
    dp = funcdp.DataParallel(bn)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when "
                                         r"training, got input size torch.Size\(\[1, 4\]\)"):
        dp(x)
    assert_trees_close(dict(bn.named_buffers()), dict(nn.BatchNorm1d(4).named_buffers()))
    # Two examples on two devices (one each) are fine; so is eval mode.
    x2 = torch.randn(2, 4)
    ref = nn.BatchNorm1d(4)
    assert_trees_close(dp(x2), ref(x2))
    dp.eval()
    ref.eval()
    assert_trees_close(dp(x), ref(x))


def _two_layers(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width))


def _torch_errors(module, state_dict):
    """The lines ``module.load_state_dict`` reports for ``state_dict``."""
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict(state_dict)
    return str(info.value).split("\n\t")[1:]


def test_load_state_dict_refuses_other_shapes_listing_each_as_torch_does():
    # A Linear(3, 5) state dict loaded into a Linear(3, 4) model silently: apply failed
    # (or, for BatchNorm statistics of shape (1,), broadcast) later.
    fm = funcdp.nn.functional(_two_layers(4))
    for sd in (_two_layers(5).state_dict(),
               {**_two_layers(4).state_dict(), "1.running_mean": torch.tensor([5.0]),
                "1.running_var": torch.tensor([4.0])}):
        want = _torch_errors(_two_layers(4), sd)
        assert want and all(line.startswith("size mismatch for ") for line in want)
        with pytest.raises(RuntimeError) as info:
            fm.load_state_dict(sd)
        head, *lines = str(info.value).split("\n\t")
        assert head == ("funcdp.nn.functional(Sequential).load_state_dict: Error(s) in "
                        "loading state_dict for Sequential:")
        *lines, last = "\n\t".join(lines).split("\n")
        assert "\n".join(lines).split("\n\t") == want
        assert last.startswith("Load a state dict of a module built as this one")
    # Values that are not tensors, in torch's words too.
    sd = {**_two_layers(4).state_dict(), "0.bias": [0.0] * 4}
    with pytest.raises(RuntimeError, match=r'While copying the parameter named "0.bias", '
                                           r"expected torch.Tensor or Tensor-like object from "
                                           r"checkpoint but received <class 'list'>"):
        fm.load_state_dict(sd)
    # A replicated state dict: the message says how to take one copy.
    with pytest.raises(RuntimeError, match=r"(?s)size mismatch for 0.weight: copying a param "
                                           r"with shape torch.Size\(\[2, 4, 3\]\).*take one "
                                           r"copy with funcdp.unreplicate"):
        fm.load_state_dict(funcdp.replicate(_two_layers(4).state_dict(),
                                            funcdp.local_devices()[:2]))


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor(2.0))  # 0-dim
        self.register_buffer("steps", torch.tensor(0))

    def forward(self, x):
        return self.lin(x) * self.scale + self.steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_load_state_dict_casts_values_to_the_modules_dtypes_as_torch_does(dtype):
    # An fp16 state dict gave fp16 parameters: apply then failed on float32 inputs.
    torch.manual_seed(0)
    sd = {k: v.to(dtype) for k, v in _Scaled().state_dict().items()}  # (steps too)
    sd["scale"] = sd["scale"].reshape(1)  # torch takes a one-element value for 0-dim
    fm = funcdp.nn.functional(_Scaled())
    params, buffers = fm.load_state_dict(sd)
    ref = _Scaled()
    ref.load_state_dict(sd)
    assert_trees_close((params, buffers),
                       ({k: v.detach() for k, v in ref.named_parameters()},
                        dict(ref.named_buffers())), exact=True)  # (dtypes, 0-dim scale)
    x = torch.randn(2, 3)
    assert_trees_close(fm.apply(params, buffers, x)[0], ref(x), exact=True)


def test_load_state_dict_shares_or_copies_as_before():
    # Parameters that need no conversion are the state dict's tensors; buffers are copies;
    # a module on the meta device takes the values where they are (torch would copy
    # nothing into it).
    fm = funcdp.nn.functional(_two_layers(4))
    sd = _two_layers(4).state_dict()
    params, buffers = fm.load_state_dict(sd)
    assert params["0.weight"].data_ptr() == sd["0.weight"].data_ptr()
    assert buffers["1.running_mean"].data_ptr() != sd["1.running_mean"].data_ptr()
    meta = funcdp.nn.functional(nn.Linear(3, 4, device="meta"))
    params, _ = meta.load_state_dict(nn.Linear(3, 4).state_dict())
    assert params["weight"].device.type == "cpu"


@pytest.mark.parametrize("name, match", [
    (True, r"got True\. Pass the name of the pmap axis to synchronise over, `{arg}='batch'`.*"
           r"True/False is funcdp.DataParallel's `sync_batchnorm`"),
    (False, r"got False\. Pass the name of the pmap axis"),
    (["b"], r"got \['b'\] \(a list\); for several axes pass a tuple, \('b',\)"),
    ({"b"}, r"got \{'b'\} \(a set\); for several axes pass a tuple"),
    ((), r"got \(\); name at least one axis"),
    (("a", True), r"got \('a', True\); its element True is not a name: pass strings"),
    ({"b": 1}, r"got \{'b': 1\} \(a dict\); pass the name of the pmap axis, a string"),
])
def test_axis_names_are_checked_at_construction(name, match):
    # sync_batchnorm=True (DataParallel's flag) was taken for an axis name: the error came
    # from the first training step, inside the pmap ("unbound axis name True").
    expected = (r"`{arg}` must be an axis name \(a string such as 'batch', as given to "
                r"funcdp.pmap\(..., axis_name='batch'\)\) or a non-empty tuple of names, ")
    for call, arg, make in [
            ("funcdp.nn.functional", "sync_batchnorm",
             lambda: funcdp.nn.functional(bn_model(), sync_batchnorm=name)),
            ("funcdp.nn.SyncBatchNorm", "axis_name",
             lambda: funcdp.nn.SyncBatchNorm(4, axis_name=name)),
            ("funcdp.nn.SyncBatchNorm.convert", "axis_name",
             lambda: funcdp.nn.SyncBatchNorm.convert(bn_model(), name))]:
        with pytest.raises(TypeError, match=(call.replace(".", r"\.") + ": "
                                             + (expected + match).replace("{arg}", arg))):
            make()
    with pytest.raises(TypeError, match=r"`axis_name` must be an axis name .*got None"):
        funcdp.nn.SyncBatchNorm(4, axis_name=None)


def test_axis_names_that_collectives_take_are_accepted():
    for name in ("batch", ("i", "j"), 0):
        assert funcdp.nn.functional(bn_model(), sync_batchnorm=name).axis_name == name
        assert funcdp.nn.SyncBatchNorm(4, axis_name=name).axis_name == name
    assert funcdp.nn.functional(bn_model()).axis_name is None
    # Over a tuple of axes: the statistics of both, as over one axis of their product.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    bn = funcdp.nn.SyncBatchNorm(5, axis_name=("i", "j"))
    out = funcdp.vmap(funcdp.vmap(bn, axis_name="j"), axis_name="i")(x)
    assert_trees_close(out, nn.BatchNorm1d(5)(x.reshape(24, 5)).reshape(2, 3, 4, 5),
                       atol=1e-5)


def test_convert_refuses_what_is_not_a_module():
    # An int raised "'int' object has no attribute '_modules'".
    with pytest.raises(TypeError, match=r"funcdp\.nn\.SyncBatchNorm\.convert: `module` must be "
                                        r"a torch\.nn\.Module, got int \(3\); pass the model "
                                        r"whose BatchNorm layers should synchronise, "
                                        r"SyncBatchNorm\.convert\(model, axis_name\)"):
        funcdp.nn.SyncBatchNorm.convert(3, "b")
