"""funcdp.config.onednn_linear: F.linear on oneDNN inside pmapped functions."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import funcdp
from funcdp._src import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="torch without oneDNN")


@pytest.fixture
def products(monkeypatch):
    """Counts the oneDNN products run."""
    calls = []
    real = onednn._product

    def counted(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(onednn, "_product", counted)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)  # (the tests' products are small)
    return calls


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Tanh(),
                         nn.Linear(8, 3)).to(dtype)


def _step(net, devices):
    def loss(p, x, y):
        return nn.functional.cross_entropy(net.apply(p, {}, x)[0], y)

    return funcdp.pmap(funcdp.value_and_grad(loss, "i"), axis_name="i",
                       in_axes=(None, 0, 0), out_axes=None, devices=devices)


@pytest.mark.parametrize("ndev", [1, 2, 4])
def test_gradients_match_torch(products, ndev):
    model = _model()
    net = funcdp.nn.functional(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    step = _step(net, funcdp.local_devices()[:ndev])
    with funcdp.config.override(onednn_linear=True):
        loss, grads = step(net.params, funcdp.shard(x, ndev), funcdp.shard(y, ndev))
    assert products  # (it ran: forward and backward products)
    ref = nn.functional.cross_entropy(model(x), y)
    want = dict(zip([n for n, _ in model.named_parameters()],
                    torch.autograd.grad(ref, list(model.parameters()))))
    assert_trees_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, want, rtol=1e-4, atol=1e-6)


def test_second_derivatives_and_other_shapes(products):
    # Gradients of gradients (the backward is made of oneDNN products too), inputs of
    # three dimensions and no bias.
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(2, 3, 4)

    def hvp(w, x):
        out = nn.functional.linear(x, w)
        (g,) = torch.autograd.grad(torch.tanh(out).pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad((g * g).sum(), w)[0]

    f = funcdp.pmap(hvp, in_axes=(None, 0), devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear=True):
        got = f(w.detach().requires_grad_(), x)
    assert products
    want = torch.stack([hvp(w, x[i]) for i in range(2)])
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_runs_elsewhere(products):
    # float64, inside torch.func transforms, under autocast, and with the setting off:
    # torch's F.linear, bit for bit.
    devs = funcdp.local_devices()[:2]
    model = _model(torch.float64)
    net = funcdp.nn.functional(model)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    step = _step(net, devs)
    args = (net.params, funcdp.shard(x, 2), funcdp.shard(y, 2))
    with funcdp.config.override(onednn_linear=True):
        on = step(*args)
    assert_trees_close(on, step(*args), exact=True)
    w, xs = torch.randn(3, 4), torch.randn(2, 5, 4)

    def inner_grad(w, x):  # (a torch.func transform on the device)
        return torch.func.grad(lambda w: nn.functional.linear(x, w).sum())(w)

    with funcdp.config.override(onednn_linear=True):
        g = funcdp.pmap(inner_grad, in_axes=(None, 0), out_axes=0, devices=devs)(w, xs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = funcdp.pmap(lambda x: nn.functional.linear(x, w), devices=devs)(xs)
    assert not products
    assert_trees_close(g.to_tensor(), xs.sum(1)[:, None, :].expand(2, 3, 4), rtol=1e-5,
                       atol=1e-5)
    assert low.dtype == torch.bfloat16


def test_grad_of_the_pmap(products):
    # torch.func.grad of the pmapped function: the devices run plain autograd (oneDNN),
    # the transform sees pmap's derivative.
    w, xs = torch.randn(3, 4), torch.randn(2, 5, 4)
    f = funcdp.pmap(lambda w, x: torch.tanh(nn.functional.linear(x, w)).sum(),
                    in_axes=(None, 0), devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear=True):
        g = torch.func.grad(lambda w: f(w, xs).sum())(w)
    assert products
    want = torch.func.grad(lambda w: torch.tanh(nn.functional.linear(xs, w)).sum())(w)
    assert_trees_close(g, want, rtol=1e-4, atol=1e-5)


def test_small_products_stay_on_torch():
    # oneDNN's fixed cost per call exceeds its gain on small products.
    calls = []
    real = onednn._product
    onednn._product = lambda *a: calls.append(1) or real(*a)
    try:
        f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                        devices=funcdp.local_devices()[:2])
        with funcdp.config.override(onednn_linear=True):
            small = f(torch.randn(2, 16, 32), torch.randn(32, 32))
            big = f(torch.randn(2, 128, 1024), torch.randn(16, 1024))
    finally:
        onednn._product = real
    assert small.shape == (2, 16, 32) and big.shape == (2, 128, 16)
    assert len(calls) == 2  # (the big product, on each device)


def test_setting_is_checked(monkeypatch):
    for bad in ("yes", "AUTO", 1, None):
        with pytest.raises(ValueError, match=r"funcdp.config.onednn_linear must be True, "
                                             r"False or 'auto', got "):
            funcdp.config.onednn_linear = bad
    assert funcdp.config.onednn_linear == "auto"  # (the default, unchanged by the above)
    for raw, want in (("auto", "auto"), (" Auto ", "auto"), ("1", True), ("off", False),
                      ("", "auto")):
        monkeypatch.setenv("FUNCDP_ONEDNN_LINEAR", raw)
        assert funcdp._src.config.Config().onednn_linear == want
    monkeypatch.setenv("FUNCDP_ONEDNN_LINEAR", "fast")
    with pytest.raises(ValueError, match=r"`FUNCDP_ONEDNN_LINEAR` must be 1/0, true/false "
                                         r"or auto, got 'fast'"):
        funcdp._src.config.Config()


@pytest.fixture
def measured(monkeypatch, products):
    """'auto' decides afresh, on a measurement the test sets (``measured.ratio``)."""
    class Measured:
        ratio: float | Exception = 1.0
        times = 0

    def measure():
        Measured.times += 1
        if isinstance(Measured.ratio, Exception):
            raise Measured.ratio
        return Measured.ratio

    monkeypatch.setattr(onednn, "_choice", None)
    monkeypatch.setattr(onednn, "_measure", measure)
    return Measured


@pytest.mark.parametrize("ratio,used", [(2.0, True), (onednn.MARGIN, True),
                                        (onednn.MARGIN - 0.01, False), (0.8, False),
                                        (RuntimeError("no oneDNN kernel"), False)])
def test_auto_uses_onednn_where_it_measured_faster(measured, products, ratio, used):
    measured.ratio = ratio
    f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    xs, w = torch.randn(2, 4, 8), torch.randn(3, 8)
    with funcdp.config.override(onednn_linear="auto"):
        for _ in range(3):
            assert_trees_close(f(xs, w), nn.functional.linear(xs, w), rtol=1e-5, atol=1e-6)
    assert measured.times == 1  # (once per process, whichever device came first)
    assert bool(products) == used
    assert len(products) == (6 if used else 0)


def test_auto_measures_only_where_a_product_qualifies(measured):
    # No measurement for programs whose products all stay on torch anyway.
    f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear="auto"):
        f(torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    with funcdp.config.override(onednn_linear=False):
        f(torch.randn(2, 4, 8), torch.randn(3, 8))
    assert measured.times == 0


def test_the_measurement_is_a_ratio_of_times():
    # The real measurement (a few milliseconds): a finite positive ratio, and the thread's
    # intra-op thread count as it was.
    threads = torch.get_num_threads()
    ratio = onednn._measure()
    assert 0.05 < ratio < 20
    assert torch.get_num_threads() == threads


def test_bias_of_any_strides(products):
    # oneDNN reads the bias as dense: a column of a table (stride 4) gave wrong results,
    # an expanded scalar (stride 0) read past its memory.
    x, w = torch.randn(2, 16, 32), torch.randn(8, 32)
    table = torch.randn(8, 4)
    f = funcdp.pmap(lambda x, w, b: nn.functional.linear(x, w, b), in_axes=(0, None, None),
                    devices=funcdp.local_devices()[:2])
    for b in (table[:, 1], torch.tensor(0.5).expand(8)):
        with funcdp.config.override(onednn_linear=True):
            got = f(x, w, b).to_tensor()
        assert_trees_close(got, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert products


def test_setting_is_the_calls_for_its_recomputations(products):
    # A checkpoint recomputes the device's forward pass in pmap's backward pass: with
    # the products of the setting the call was made under (the setting read then failed
    # with CheckpointError when it had changed meanwhile).
    import torch.utils.checkpoint as ckpt

    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(2, 16, 32)
    f = funcdp.pmap(lambda x, w: ckpt.checkpoint(
        lambda t: torch.tanh(nn.functional.linear(t, w)), x, use_reentrant=False).sum(),
        in_axes=(0, None), devices=funcdp.local_devices()[:2])
    want = torch.autograd.grad(torch.tanh(nn.functional.linear(x, w)).sum(), w)[0]
    for forward, backward in ((True, False), (False, True)):
        with funcdp.config.override(onednn_linear=forward):
            out = f(x, w)
        with funcdp.config.override(onednn_linear=backward):
            (g,) = torch.autograd.grad(out.sum(), w)
        assert_trees_close(g, want, rtol=1e-4, atol=1e-4)


def test_other_layouts_and_saved_tensors_as_torch(products):
    # Sparse inputs run torch's F.linear (they failed on oneDNN); like torch, a frozen
    # weight's layer saves no input, so writing the input afterwards is allowed.
    f = funcdp.pmap(lambda x, w, k: nn.functional.linear(x, w) * k, in_axes=(None, None, 0),
                    devices=funcdp.local_devices()[:2])
    x, w = torch.eye(4, 8).to_sparse(), torch.randn(3, 8)
    with funcdp.config.override(onednn_linear=True):
        got = f(x, w, torch.ones(2))
    assert_trees_close(got.to_tensor()[0], x.to_dense() @ w.t(), rtol=1e-5, atol=1e-6)
    assert not products

    def frozen(x, w):
        x = x.detach().requires_grad_()
        h = x * 1
        y = nn.functional.linear(h, w)
        h.mul_(2)  # (w needs no gradient: h was not saved)
        return torch.autograd.grad(y.sum(), x)[0]

    g = funcdp.pmap(frozen, in_axes=(0, None), devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear=True):
        got = g(torch.randn(2, 4, 8), w)
    assert products
    assert_trees_close(got.to_tensor(), w.sum(0).expand(2, 4, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiled_code_inside_pmap(products):
    # Compiled code lowers F.linear itself: the oneDNN op traced into its graph (with a
    # weight that is an input, not a constant) failed in inductor's lowering.
    w, x = torch.randn(64, 32), torch.randn(2, 16, 32)
    body = torch.compile(lambda x, w: torch.tanh(nn.functional.linear(x, w)).sum())
    f = funcdp.pmap(lambda x, w: body(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear=True):
        got = f(x, w).to_tensor()
    want = torch.tanh(nn.functional.linear(x, w)).sum((1, 2))
    assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


def test_dispatch_modes_see_torch_products(products, monkeypatch):
    # A FLOP counter (a dispatch mode, carried to the devices) counts aten products: the
    # devices run torch's F.linear under it, and "auto" measures nothing then (its timing
    # products were counted: 42 times the step's FLOPs).
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(onednn, "_choice", None)
    f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    x, w = torch.randn(2, 64, 128), torch.randn(256, 128)
    with funcdp.config.override(onednn_linear="auto"), FlopCounterMode(display=False) as fc:
        f(x, w)
    assert fc.get_total_flops() == 2 * 2 * 64 * 128 * 256
    assert not products and onednn._choice is None


def test_torch_function_modes_around_the_pmap_see_torch_products(products):
    # A mode of the caller's (a fake-quantization, a counter) never saw the devices'
    # F.linear: oneDNN answered it first.
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        seen = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is nn.functional.linear:
                Count.seen += 1
            return func(*args, **(kwargs or {}))

    f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    x, w = torch.randn(2, 4, 8), torch.randn(5, 8)
    with funcdp.config.override(onednn_linear=True), Count():
        f(x, w)
    assert Count.seen == 2 and not products
    with funcdp.config.override(onednn_linear=True):
        f(x, w)
    assert len(products) == 2  # (without the mode: oneDNN)


def test_forward_ad_tangents_through_the_devices_products(products):
    # Under a caller's forward_ad.dual_level, oneDNN's products dropped the tangents (or
    # raised "You must implement the jvp function").
    import torch.autograd.forward_ad as fwAD

    x, w, t = torch.randn(2, 4, 8), torch.randn(5, 8), torch.randn(2, 4, 8)
    f = funcdp.pmap(lambda x, w: nn.functional.linear(x, w), in_axes=(0, None),
                    devices=funcdp.local_devices()[:2])
    with funcdp.config.override(onednn_linear=True), fwAD.dual_level():
        out = f(fwAD.make_dual(x, t), w)
        out = out if isinstance(out, torch.Tensor) else out.to_tensor()
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None and not products
    torch.testing.assert_close(tangent, t @ w.t())


def test_the_measurement_is_float32_whatever_the_default_dtype():
    # With float64 as the default dtype, the measurement failed (a ratio of 0), and "auto"
    # kept torch's products for the whole process.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert onednn._measure() > 0.05
    finally:
        torch.set_default_dtype(old)
