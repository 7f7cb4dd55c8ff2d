"""Composition: pmap, named vmap, grad, vjp, nested pmap and more shards than devices agree."""

from __future__ import annotations

import functools
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_close
from hypothesis import example, given
from torch.func import grad, vjp

import funcdp


def g(v):
    """Collectives over two named axes, 'i' (outer) and 'j' (inner)."""
    return (v * funcdp.psum(v, "j") + funcdp.pmax(v, "i")
            - funcdp.all_gather(v, ("i", "j")).mean(0)
            + funcdp.axis_index(("i", "j")).to(v.dtype)
            + funcdp.ppermute(v, ("i", "j"), _ring(funcdp.axis_size(("i", "j")))))


def _ring(n):
    return [(k, (k + 1) % n) for k in range(n)]


def g_ref(X):
    n1, n2 = X.shape[:2]
    flat = X.reshape(n1 * n2, *X.shape[2:])
    idx = torch.arange(n1 * n2, dtype=X.dtype).reshape(n1, n2, *([1] * (X.ndim - 2)))
    rolled = torch.roll(flat, 1, 0).reshape(X.shape)
    return (X * X.sum(1, keepdim=True) + X.amax(0, keepdim=True) - flat.mean(0) + idx
            + rolled)


def compositions(n1, n2):
    devs = funcdp.local_devices()
    inner_p = funcdp.pmap(g, axis_name="j")
    return {
        "nested pmap": funcdp.pmap(lambda v: inner_p(v), axis_name="i"),
        "pmap(vmap)": funcdp.pmap(funcdp.vmap(g, axis_name="j"), axis_name="i"),
        "vmap(pmap)": funcdp.vmap(funcdp.pmap(g, axis_name="j"), axis_name="i"),
        "vmap(vmap)": funcdp.vmap(funcdp.vmap(g, axis_name="j"), axis_name="i"),
        "pmap(vmap) on one device": funcdp.pmap(funcdp.vmap(g, axis_name="j"), axis_name="i",
                                               devices=devs[:1]),
        "vmap(pmap) over fewer devices": funcdp.vmap(
            funcdp.pmap(g, axis_name="j", devices=devs[:1]), axis_name="i"),
    }


@st.composite
def grid(draw):
    n1 = draw(st.sampled_from([1, 2, 4]))  # 4: the nested pmap gets 2 devices per shard
    n2 = draw(st.sampled_from([1, 2, 4]))
    rest = tuple(draw(st.integers(1, 2)) for _ in range(draw(st.integers(0, 2))))
    x = torch.randint(-6, 7, (n1, n2) + rest, generator=torch.Generator().manual_seed(
        draw(st.integers(0, 1000)))).double() / 2
    return x


# 4 x 4: the nested pmap runs 4 shards on 2 devices (a vmap on each).
_NESTED_BLOCKED = torch.arange(-8, 8, dtype=torch.float64).reshape(4, 4) / 2


@given(grid())
@example(_NESTED_BLOCKED)
def test_all_compositions_agree_with_the_loop_reference(x):
    expected = g_ref(x)
    for name, fn in compositions(*x.shape[:2]).items():
        assert_trees_close(torch.as_tensor(fn(x)), expected), name


@given(grid())
@example(_NESTED_BLOCKED)
def test_gradients_agree_for_every_composition_order(x):
    w = torch.randn(x.shape, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad((g_ref(xr) * w).sum(), xr)[0]
    for name, fn in compositions(*x.shape[:2]).items():
        got = grad(lambda t, fn=fn: (torch.as_tensor(fn(t)) * w).sum())(x)
        assert_trees_close(got, want), name


def test_vjp_and_backward_through_pmap():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)
    f = funcdp.pmap(lambda x, w: torch.sin(x * w) + funcdp.pmean(x, "i"), axis_name="i",
                    in_axes=(0, None))

    def ref(x, w):
        return torch.sin(x * w) + x.mean(0)

    ct = torch.randn(4, 3, dtype=torch.float64)
    out, pull = vjp(f, x, w)
    gx, gw = pull(ct)
    rout, rpull = vjp(ref, x, w)
    rgx, rgw = rpull(ct)
    assert_trees_close(out, rout)
    assert_trees_close((gx, gw), (rgx, rgw))
    # An unmapped input receives the sum of its per-device gradients.
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    (f(xx, ww) * ct).sum().backward()
    assert_trees_close((xx.grad, ww.grad), (rgx, rgw))


def test_pmap_outputs_under_autograd_behave_as_tensors():
    w = torch.randn(3, dtype=torch.float64)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    f = funcdp.pmap(lambda x, w: (x @ w).pow(2).mean(), in_axes=(0, None))
    got = grad(lambda w: f(x, w).sum())(w)
    want = grad(lambda w: (x @ w).pow(2).mean(1).sum())(w)
    assert_trees_close(got, want)
    out = f(x, w.clone().requires_grad_())
    assert isinstance(out, torch.Tensor) and out.requires_grad
    assert out[1].shape == ()


def test_per_example_gradients_with_clipping_dp_sgd_pattern():
    torch.manual_seed(2)
    w = torch.randn(4, dtype=torch.float64)
    x = torch.randn(4, 6, 4, dtype=torch.float64)
    y = torch.randn(4, 6, dtype=torch.float64)
    clip = 0.5

    def loss(w, xi, yi):
        return (torch.tanh(xi @ w) - yi) ** 2

    def clipped_mean(w, x, y):
        per = torch.func.vmap(grad(loss), in_dims=(None, 0, 0))(w, x, y)
        norms = per.norm(dim=1, keepdim=True)
        return (per * torch.clamp(clip / norms, max=1.0)).mean(0)

    step = funcdp.pmap(lambda w, x, y: funcdp.pmean(clipped_mean(w, x, y), "i"),
                       axis_name="i", in_axes=(None, 0, 0), out_axes=None)
    got = step(w, x, y)
    want = clipped_mean(w, x.reshape(24, 4), y.reshape(24))
    assert_trees_close(got, want)


def test_mixed_named_axes_pmap_axis_and_vmap_axis():
    x = torch.arange(24.0).reshape(4, 3, 2)
    f = funcdp.pmap(funcdp.vmap(lambda v: funcdp.psum(v, ("i", "j")), axis_name="j"),
                    axis_name="i")
    assert_trees_close(f(x), x.sum((0, 1)).expand(4, 3, 2))


def test_dropout_differs_across_devices_and_is_reproducible():
    f = funcdp.pmap(lambda x: F.dropout(x, 0.5))
    x = torch.ones(4, 64)
    torch.manual_seed(7)
    a = f(x).to_tensor()
    torch.manual_seed(7)
    b = f(x).to_tensor()
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 4
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    c = f(x).to_tensor()
    assert not torch.equal(a, c)


def test_every_random_function_is_per_device():
    def draws(x):
        return (torch.rand(3), torch.randn(3), torch.randint(0, 100, (3,)),
                torch.empty(3).uniform_(), torch.bernoulli(torch.full((3,), 0.5)),
                F.rrelu(-torch.ones(3), training=True),
                torch.distributions.Gamma(torch.ones(3), 1.0).sample(),
                torch.distributions.Dirichlet(torch.ones(3)).sample(),
                torch.distributions.Beta(torch.ones(3), 2.0).sample(),
                F.dropout2d(torch.ones(1, 4, 2, 2), 0.5), torch.nn.Dropout(0.5)(torch.ones(3)))

    f = funcdp.pmap(draws)
    torch.manual_seed(1)
    first = f(torch.zeros(2))
    torch.manual_seed(1)
    second = f(torch.zeros(2))
    for a, b in zip(first, second):
        assert torch.equal(a.to_tensor(), b.to_tensor())
    for a in first[:9]:
        t = a.to_tensor()
        assert not torch.equal(t[0], t[1])
    # dropout2d drops whole channels
    ch = first[9].to_tensor()
    assert torch.all(ch == ch[..., :1, :1])


def _on_device(fn, x):
    """``fn(x)`` on each of two devices (the device's generator drawing)."""
    out = funcdp.pmap(fn, devices=funcdp.local_devices()[:2])(torch.stack([x, x]))
    return out.to_tensor()


def _varies(out, kept):
    """For each dimension of ``out``, whether its dropout mask varies along it."""
    mask = out == kept
    return [not torch.equal(mask, mask.narrow(k, 0, 1).expand_as(mask))
            for k in range(mask.ndim)]


def _warnings(caught):
    return {(type(w.message), str(w.message), w.filename, w.lineno) for w in caught}


def _alpha_kept(p=0.5):
    a = 1.0 / ((1.7580993408473766**2 * p + 1) * (1 - p)) ** 0.5
    return a + 1.7580993408473766 * a * p


_DROPOUTS = [  # (name, function of x at p, whether alpha dropout, input shapes)
    ("F.dropout", lambda x, p: F.dropout(x, p), False, [(4, 4)]),
    ("torch.dropout", lambda x, p: torch.dropout(x, p, True), False, [(4, 4)]),
    ("F.alpha_dropout", lambda x, p: F.alpha_dropout(x, p, True), True, [(4, 4)]),
    ("torch.alpha_dropout", lambda x, p: torch.alpha_dropout(x, p, train=True), True,
     [(4, 4)]),
    ("F.feature_alpha_dropout", lambda x, p: F.feature_alpha_dropout(x, p, True), True,
     [(4, 4), (4, 4, 5), (4, 4, 3, 3), (4, 4, 2, 2, 2)]),
    ("nn.FeatureAlphaDropout", lambda x, p: torch.nn.FeatureAlphaDropout(p)(x), True,
     [(4, 4, 2, 2, 2)]),
    ("torch.feature_dropout", lambda x, p: torch.feature_dropout(x, p, True), False,
     [(4, 4, 5), (4, 4, 2, 2, 2)]),
    ("torch.dropout_", lambda x, p: torch.dropout_(x.clone(), p, True), False, [(4, 4)]),
    ("torch.feature_alpha_dropout_",
     lambda x, p: torch.feature_alpha_dropout_(x.clone(), p, train=True), True,
     [(4, 4, 2, 2, 2)]),
    ("F.dropout1d", lambda x, p: F.dropout1d(x, p), False, [(4, 6), (4, 4, 6)]),
    ("F.dropout2d", lambda x, p: F.dropout2d(x, p), False,
     [(4, 6), (4, 4, 6), (4, 3, 3), (4, 4, 3, 3), (4, 4, 2, 2, 2)]),
    ("F.dropout2d inplace", lambda x, p: F.dropout2d(x.clone(), p, inplace=True), False,
     [(4, 4, 3, 3)]),
    ("F.dropout3d", lambda x, p: F.dropout3d(x, p), False,
     [(4, 6), (4, 3, 3), (4, 2, 2, 2), (4, 4, 2, 2, 2)]),
    ("nn.Dropout3d", lambda x, p: torch.nn.Dropout3d(p)(x), False, [(4, 2, 2, 2)]),
]


@pytest.mark.parametrize("name, fn, alpha, shapes", _DROPOUTS, ids=[d[0] for d in _DROPOUTS])
def test_dropout_on_a_device_is_torch_dropout(name, fn, alpha, shapes):
    # Inside pmap, feature_alpha_dropout of a 5-D input dropped whole samples,
    # torch.dropout(x, p, train=False) dropped, alpha dropout with p=1 gave -1.76 (torch:
    # zeros), and dropout1d/2d/3d skipped torch's checks of the input's dimensions.
    for shape in shapes:
        x = torch.ones(shape)
        with warnings.catch_warnings(record=True) as torch_warned:
            warnings.simplefilter("always")
            want = fn(x, 0.5)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            got = _on_device(lambda v: fn(v, 0.5), x)
        kept = _alpha_kept() if alpha else 2.0
        assert set(got.unique().tolist()) == set(want.unique().tolist()), (name, shape)
        assert [_varies(g, kept) for g in got] == [_varies(want, kept)] * 2, (name, shape)
        assert not torch.equal(got[0], got[1])  # (each device draws its own)
        # Every warning torch gives, for the line that called the function; no others.
        assert _warnings(warned) == _warnings(torch_warned), (name, shape)
        for p in (0.0, 1.0):
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert_trees_close(_on_device(lambda v: fn(v, p), x), fn(x, p).expand(2, *shape),
                                   exact=True)


@pytest.mark.parametrize("call", [
    lambda x: torch.dropout(x, 0.5, False), lambda x: torch.dropout(x, 0.5, train=False),
    lambda x: torch.dropout(input=x, p=0.5, train=False),
    lambda x: torch.feature_dropout(x, 0.5, train=False),
    lambda x: torch.alpha_dropout(x, 0.5, train=False),
    lambda x: torch.feature_alpha_dropout(x, 0.5, train=False),
    lambda x: torch.dropout_(x.clone(), 0.5, train=False),
    lambda x: F.dropout(x, 0.5, False), lambda x: F.dropout(x, p=0.5, training=False),
    lambda x: F.alpha_dropout(x, 0.5), lambda x: F.feature_alpha_dropout(x, 0.5),
    lambda x: F.dropout2d(x, 0.5, training=False), lambda x: torch.nn.AlphaDropout(0.5).eval()(x),
])
def test_dropout_on_a_device_not_training_is_the_identity(call):
    # torch.dropout's flag is `train`: `training` was read, and the device dropped.
    x = torch.rand(4, 3, 5, 2) + 1
    assert_trees_close(_on_device(call, x), torch.stack([x, x]), exact=True)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: F.dropout1d(x, 0.5), RuntimeError, "dropout1d: Expected 2D or 3D input, but "
                                                  "received a 4D input"),
    (lambda x: F.dropout1d(x, 0.5, training=False), RuntimeError, "received a 4D input"),
    (lambda x: torch.feature_dropout(x[0, 0, 0], 0.5, True), RuntimeError,
     "Feature dropout requires at least 2 dimensions in the input"),
    (lambda x: F.dropout(x, 1.5), ValueError, "dropout probability has to be between 0 and 1"),
    (lambda x: torch.dropout(x, 1.5, True), RuntimeError, "has to be between 0 and 1"),
    (lambda x: torch.dropout(x, 0.5), TypeError, 'missing 1 required positional arguments: '
                                                 '"train"'),
])
def test_dropout_on_a_device_raises_as_torch(call, error, match):
    x = torch.ones(2, 3, 4, 5)
    with pytest.raises(error, match=match):
        call(x)
    with pytest.raises(error, match=match):
        _on_device(call, x)


def test_samplers_draw_from_the_device_generator():
    # Each device's draws are those of a generator seeded with device_seed(base, i), base
    # the call's one draw from torch's default generator.
    from funcdp._src import random as random_mod

    x = -torch.ones(4)
    cases = {
        "rrelu": (lambda: F.rrelu(x, training=True),
                  lambda g: torch.rrelu(x, 1 / 8, 1 / 3, True, g)),
        "RReLU": (lambda: torch.nn.RReLU().train()(x),
                  lambda g: torch.rrelu(x, 1 / 8, 1 / 3, True, g)),
        "Gamma": (lambda: torch.distributions.Gamma(torch.ones(4), 1.0).sample(),
                  lambda g: torch._standard_gamma(torch.ones(4), generator=g)),
        "Dirichlet": (lambda: torch.distributions.Dirichlet(torch.ones(4)).sample(),
                      lambda g: torch._sample_dirichlet(torch.ones(4), generator=g)),
        "randn": (lambda: torch.randn(4), lambda g: torch.randn(4, generator=g)),
    }
    for name, (draw, with_generator) in cases.items():
        torch.manual_seed(9)
        got = funcdp.pmap(lambda _: draw(), devices=funcdp.local_devices()[:2])(
            torch.zeros(2)).to_tensor()
        torch.manual_seed(9)
        base = random_mod.draw_base()
        for i in range(2):
            g = random_mod.make_generator(torch.device("cpu"), random_mod.device_seed(base, i))
            assert torch.equal(got[i], with_generator(g)), name


def _device_draws(fn, seed=9):
    """``fn()`` on each of two devices, and the base of the call's seeds (see
    ``random.device_seed``)."""
    from funcdp._src import random as random_mod

    torch.manual_seed(seed)
    got = funcdp.pmap(lambda _: fn(), devices=funcdp.local_devices()[:2])(torch.zeros(2))
    torch.manual_seed(seed)
    return tuple(t.to_tensor() for t in got) if isinstance(got, tuple) else got.to_tensor(), \
        random_mod.draw_base()


def _device_generator(base, i):
    from funcdp._src import random as random_mod

    return random_mod.make_generator(torch.device("cpu"), random_mod.device_seed(base, i))


_NOISE = torch.randn(1000, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, fn", [
    ("gumbel_softmax", lambda: F.gumbel_softmax(torch.arange(12.0).reshape(3, 4), tau=0.5)),
    ("fractional_max_pool2d",
     lambda: F.fractional_max_pool2d(_NOISE[:200].reshape(2, 1, 10, 10), 3, output_size=4)),
    ("FractionalMaxPool3d with indices",
     lambda: torch.nn.FractionalMaxPool3d(2, output_size=6, return_indices=True)(
         _NOISE.reshape(1, 1, 10, 10, 10))[1]),
    ("kaiming_uniform_", lambda: torch.nn.init.kaiming_uniform_(torch.empty(4, 5))),
    ("trunc_normal_", lambda: torch.nn.init.trunc_normal_(torch.empty(4, 5))),
    ("orthogonal_", lambda: torch.nn.init.orthogonal_(torch.empty(4, 5))),
    ("nn.Linear", lambda: torch.nn.Linear(5, 4).weight.detach()),
])
def test_torch_functions_that_draw_inside_draw_on_the_device_generator(name, fn):
    # The mode saw gumbel_softmax, fractional max pooling and nn.init's initialisers as
    # one call each: the draws inside came from torch's default generator, in whatever
    # order the devices' threads ran.
    got, base = _device_draws(fn)
    for i in range(2):
        torch.manual_seed(_device_generator(base, i).initial_seed())
        assert torch.equal(got[i], fn()), (name, i)
    assert not torch.equal(got[0], got[1])


_ATTENTION = [  # (name, query, key, the other keyword arguments)
    ("plain", (2, 3, 4, 6), (2, 3, 5, 6), {}),
    ("causal, scale", (2, 3, 5, 6), (2, 3, 5, 6), {"is_causal": True, "scale": 0.3}),
    ("bool mask", (3, 4, 6), (3, 5, 6),
     {"attn_mask": torch.tensor([[1, 0, 1, 1, 1]], dtype=torch.bool)}),
    ("float mask, broadcast", (1, 3, 4, 6), (2, 1, 5, 6), {"attn_mask": torch.randn(4, 5)}),
    ("grouped query heads", (2, 4, 3, 6), (2, 2, 5, 6), {"enable_gqa": True}),
]


@pytest.mark.parametrize("name, qs, ks, kw", _ATTENTION, ids=[a[0] for a in _ATTENTION])
def test_attention_dropout_on_a_device_draws_on_the_device_generator(name, qs, ks, kw):
    # F.scaled_dot_product_attention (nn.MultiheadAttention, nn.Transformer*) drew its
    # dropout mask from torch's default generator: not reproducible, and derivatives
    # through pmap saw other masks than the forward pass.
    p = 0.4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(qs, generator=gen, dtype=torch.float64)
    k = torch.randn(ks, generator=gen, dtype=torch.float64)
    # With the identity as values, the output is the attention weights after dropout.
    v = torch.eye(ks[-2], dtype=torch.float64).expand(*ks[:-2], -1, -1)
    got, base = _device_draws(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                                                     **kw))
    weights = F.scaled_dot_product_attention(q, k, v, **kw)
    for i in range(2):
        keep = torch.bernoulli(torch.full(weights.shape, 1 - p, dtype=torch.float64),
                               generator=_device_generator(base, i)).bool()
        torch.testing.assert_close(got[i], weights.masked_fill(~keep, 0) / (1 - p))
    assert not torch.equal(got[0], got[1])
    # Without dropout, torch's attention as it is.
    got, _ = _device_draws(lambda: F.scaled_dot_product_attention(q, k, v, **kw))
    assert torch.equal(got[0], weights) and torch.equal(got[1], weights)


def test_attention_dropout_through_pmap_derivatives_see_the_forward_masks():
    q, k, v = torch.randn(3, 2, 4, 5, 6, dtype=torch.float64).unbind(0)

    def f(v):
        out = funcdp.pmap(lambda v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
                          in_axes=0, devices=funcdp.local_devices()[:2])(v)
        return out if isinstance(out, torch.Tensor) else out.to_tensor()

    vs = torch.stack([v, v])
    torch.manual_seed(4)
    out, tangent = torch.func.jvp(f, (vs,), (vs,))  # (f is linear in v)
    assert torch.equal(out, tangent) and not torch.equal(out[0], out[1])
    torch.manual_seed(4)
    value, pull = vjp(f, vs)
    (g,) = pull(torch.ones_like(value))
    torch.testing.assert_close((g * vs).sum(), value.sum())
    torch.manual_seed(4)
    layer = torch.nn.TransformerEncoderLayer(6, 2, 8, dropout=0.5, dtype=torch.float64)
    twice = []
    for _ in range(2):
        torch.manual_seed(4)
        twice.append(funcdp.pmap(layer.requires_grad_(False), devices=funcdp.local_devices()[:2])(
            vs[:, 0]).to_tensor())
    assert torch.equal(*twice) and not torch.equal(*twice[0])


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_dropout_on_devices_is_reproducible(need_weights):
    # need_weights=True drops the attention weights with F.dropout inside
    # F.multi_head_attention_forward, which the mode saw as one call.
    mha = torch.nn.MultiheadAttention(6, 2, dropout=0.5, dtype=torch.float64,
                                      batch_first=True).requires_grad_(False)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)

    def run():
        return funcdp.pmap(lambda a: mha(a, a, a, need_weights=need_weights)[0],
                           devices=funcdp.local_devices()[:2])(x).to_tensor()

    from funcdp._src import random as random_mod

    torch.manual_seed(1)
    first = run()
    after = torch.get_rng_state()
    torch.manual_seed(1)
    random_mod.draw_base()  # (the call's one draw from the default generator: no other)
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(1)
    assert torch.equal(first, run())
    assert not torch.equal(first[0], mha(x[0], x[0], x[0], need_weights=need_weights)[0])
    mha.eval()
    torch.testing.assert_close(run()[1], mha(x[1], x[1], x[1], need_weights=need_weights)[0])


def _rnn_by_layers(cls, rnn, x, p, gen, packed):
    """``rnn(x)`` as single-layer copies of its layers, with dropout between them drawn on
    ``gen`` (the reference for a device's recurrent network with dropout)."""
    dirs = 2 if rnn.bidirectional else 1
    kw = {"bidirectional": rnn.bidirectional, "batch_first": rnn.batch_first,
          "dtype": torch.float64}
    if cls is torch.nn.LSTM:
        kw["proj_size"] = rnn.proj_size
    if cls is torch.nn.RNN:
        kw["nonlinearity"] = rnn.nonlinearity
    hs = []
    for layer in range(rnn.num_layers):
        one = cls(x.data.shape[-1] if packed else x.shape[-1], rnn.hidden_size, 1, **kw)
        for name, _ in one.named_parameters():
            getattr(one, name).data.copy_(getattr(rnn, name.replace("_l0", f"_l{layer}")))
        x, h = one(x)
        hs.append(h)
        if layer < rnn.num_layers - 1:
            data = x.data if packed else x
            keep = torch.bernoulli(torch.full(data.shape, 1 - p, dtype=torch.float64),
                                   generator=gen)
            data = data * (keep / (1 - p))
            x = x._replace(data=data) if packed else data
    if cls is torch.nn.LSTM:
        return x, tuple(torch.cat(s) for s in zip(*hs))
    del dirs
    return x, torch.cat(hs)


@pytest.mark.parametrize("cls, kw", [
    (torch.nn.LSTM, {"num_layers": 3}),
    (torch.nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True,
                     "proj_size": 3}),
    (torch.nn.GRU, {"num_layers": 3, "bidirectional": True}),
    (torch.nn.RNN, {"num_layers": 2, "nonlinearity": "relu", "batch_first": True}),
])
@pytest.mark.parametrize("packed", [False, True])
def test_recurrent_dropout_on_a_device_draws_on_the_device_generator(cls, kw, packed):
    # nn.LSTM/GRU/RNN's dropout between layers came from torch's default generator.
    p = 0.5
    torch.manual_seed(0)
    rnn = cls(4, 5, dropout=p, dtype=torch.float64, **kw).requires_grad_(False)
    x = torch.randn(6, 3, 4, dtype=torch.float64)  # (time, batch, features)
    if rnn.batch_first:
        x = x.transpose(0, 1)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [3, 6, 2], batch_first=rnn.batch_first,
                                                    enforce_sorted=False)

    def run():
        out, h = rnn(x)
        return (out.data if packed else out), *(h if isinstance(h, tuple) else (h,))

    got, base = _device_draws(run)
    for i in range(2):
        out, h = _rnn_by_layers(cls, rnn, x, p, _device_generator(base, i), packed)
        want = ((out.data if packed else out), *(h if isinstance(h, tuple) else (h,)))
        for a, b in zip(got, want):
            torch.testing.assert_close(a[i], b)
    assert not torch.equal(got[0][0], got[0][1])
    rnn.eval()  # (no dropout: torch's kernel as it is)
    got, _ = _device_draws(run)
    for a, b in zip(got, run()):
        torch.testing.assert_close(a, torch.stack([b, b]))


def test_random_functions_take_a_generator_passed_by_position():
    # torch.poisson(x, g) raised "got multiple values for argument 'generator'".
    cases = [lambda g: torch.poisson(torch.full((3,), 3.0), g),
             lambda g: torch.binomial(torch.full((3,), 10.0), torch.full((3,), 0.5), g),
             lambda g: torch.rrelu(-torch.ones(3), 0.1, 0.3, True, g),
             lambda g: torch._standard_gamma(torch.ones(3), g)]
    for draw in cases:
        got, _ = _device_draws(lambda: draw(torch.Generator().manual_seed(5)))
        want = draw(torch.Generator().manual_seed(5))
        assert torch.equal(got[0], want) and torch.equal(got[1], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_in_low_precision_keeps_with_probability_one_minus_p(dtype):
    # The keep probability was 1 - p rounded to the input's dtype: 0.8984 for p = 0.1 in
    # bfloat16, a bias of 0.17 % (11 sigma over 4M draws).
    x = torch.ones(2, 1 << 21, dtype=dtype)
    torch.manual_seed(0)
    kept = (funcdp.pmap(lambda a: F.dropout(a, 0.1), devices=funcdp.local_devices()[:2])(
        x).to_tensor() != 0).double().mean().item()
    assert abs(kept - 0.9) < 5 * (0.9 * 0.1 / x.numel()) ** 0.5
    for drop in (F.dropout, F.alpha_dropout, F.feature_alpha_dropout):  # (as torch raises)
        with pytest.raises(RuntimeError, match="result type Float can't be cast to the "
                                               "desired output type Long"):
            _on_device(lambda a: drop(a, 0.5, True), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="not implemented for 'ComplexFloat'"):
        _on_device(lambda a: F.dropout(a, 0.5), torch.ones(4, 3, dtype=torch.complex64))


def test_collectives_and_optimizer_steps_keep_random_draws_per_device():
    # funcdp's own tensor code runs without torch function modes; the device's random
    # routing must be back in place after each collective, gradient and optimizer step.
    opt = funcdp.optim.sgd(0.5)

    def drop():
        return F.dropout(torch.ones(16), 0.5)

    def f(x, p):
        a = drop()
        m = funcdp.pmean(x, "i")
        b = drop()
        g = torch.func.grad(lambda v: funcdp.psum(v * v, "i").sum())(x)
        c = drop()
        new, _ = opt.step({"w": p}, opt.init({"w": p}), {"w": p}, axis_name="i")
        return a, b, c, drop(), m, g, new["w"]

    def draws_only(x, p):
        return drop(), drop(), drop(), drop()

    kw = {"axis_name": "i", "in_axes": (0, None), "devices": funcdp.local_devices()[:2]}
    x = torch.randn(2, 5)
    p = torch.randn(1 << 15)  # large enough for the shared update
    torch.manual_seed(3)
    *masks, m, g, new = (v.to_tensor() for v in funcdp.pmap(f, **kw)(x, p))
    torch.manual_seed(3)
    want = [v.to_tensor() for v in funcdp.pmap(draws_only, **kw)(x, p)]
    for got, w in zip(masks, want):
        assert torch.equal(got, w)
        assert not torch.equal(w[0], w[1])
    assert torch.allclose(m, x.mean(0).expand(2, 5))
    assert torch.allclose(g, 4 * x)
    assert torch.equal(new, (0.5 * p).expand(2, -1))


class _NoisyBackward(torch.autograd.Function):
    """The identity, whose backward adds standard normal noise to the gradient."""

    @staticmethod
    def forward(x):
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g + torch.randn(g.shape, dtype=g.dtype)


def _noisy_loss(w, x):
    return (_NoisyBackward.apply(w) * x).sum()


def _hooked_loss(w, x):
    v = w * 1.0
    v.register_hook(lambda g: g + torch.randn(g.shape, dtype=g.dtype))
    return (v * x).sum()


def _by_autograd_grad(w, x):
    w = w.detach().requires_grad_()
    return torch.autograd.grad(_noisy_loss(w, x), w)[0]


def _by_backward(w, x):
    w = w.detach().requires_grad_()
    _noisy_loss(w, x).backward()
    return w.grad


_BACKWARDS = {
    "value_and_grad": lambda w, x: funcdp.value_and_grad(_noisy_loss)(w, x)[1],
    "value_and_grad, hook": lambda w, x: funcdp.value_and_grad(_hooked_loss)(w, x)[1],
    "torch.func.grad": lambda w, x: torch.func.grad(_noisy_loss)(w, x),
    "torch.func.vjp": lambda w, x: torch.func.vjp(lambda v: _noisy_loss(v, x), w)[1](
        torch.ones((), dtype=w.dtype))[0],
    "torch.autograd.grad": _by_autograd_grad,
    "Tensor.backward": _by_backward,
}


@pytest.mark.parametrize("how", sorted(_BACKWARDS))
def test_random_draws_in_a_backward_pass_come_from_the_device_generator(how):
    # The gradient of sum(w * x) with x = 1 is 1 + the noise the backward pass draws:
    # the device's first draw, as a forward pass drawing the same would get it.
    kw = {"in_axes": (None, 0), "devices": funcdp.local_devices()[:2]}
    w = torch.zeros(5, dtype=torch.float64)
    x = torch.ones(2, 5, dtype=torch.float64)
    torch.manual_seed(11)
    got = funcdp.pmap(_BACKWARDS[how], **kw)(w, x).to_tensor()
    torch.manual_seed(11)
    want = funcdp.pmap(lambda w, x: 1 + torch.randn(5, dtype=w.dtype), **kw)(w, x)
    assert torch.equal(got, want.to_tensor())


def test_random_draws_in_the_backward_pass_of_a_pmap_come_from_the_device_generators():
    kw = {"in_axes": (None, 0), "devices": funcdp.local_devices()[:2]}
    f = funcdp.pmap(lambda w, x: _NoisyBackward.apply(w) * x, **kw)
    x = torch.ones(2, 5, dtype=torch.float64)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    f(w, x).sum().backward()
    torch.manual_seed(4)
    noise = funcdp.pmap(lambda w, x: torch.randn(5, dtype=w.dtype), **kw)(w.detach(), x)
    assert_trees_close(w.grad, (1 + noise.to_tensor()).sum(0))


def _dropout_block(v, w):
    return F.dropout(torch.tanh(v * w), 0.5) * v


def _checkpointed_step(**checkpoint_kw):
    from torch.utils.checkpoint import checkpoint

    def loss(w, x):
        if not checkpoint_kw:
            return _dropout_block(x, w).sum()
        return checkpoint(_dropout_block, x, w, **checkpoint_kw).sum()

    return funcdp.pmap(funcdp.value_and_grad(loss, "d"), axis_name="d", in_axes=(None, 0),
                       devices=funcdp.local_devices()[:2])


@given(st.integers(0, 2**20), st.sampled_from([None, 0.0]))
def test_checkpoint_random_contexts_recompute_the_forward_pass_draws(seed, first):
    # ``first``: the device draws before the checkpointed block (its generator exists).
    from torch.utils.checkpoint import checkpoint

    def loss(w, x, ck):
        if first is not None:
            x = x + F.dropout(torch.ones_like(x), 0.5)
        if not ck:
            return _dropout_block(x, w).sum()
        return checkpoint(_dropout_block, x, w, use_reentrant=False,
                          context_fn=funcdp.checkpoint_random_contexts).sum()

    kw = {"axis_name": "d", "in_axes": (None, 0, None), "devices": funcdp.local_devices()[:2],
          "static_broadcasted_argnums": (2,)}
    x = torch.randn(2, 300, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)
    results = []
    for ck in (False, True):
        torch.manual_seed(seed)
        value, g = funcdp.pmap(funcdp.value_and_grad(loss, "d"), **kw)(w, x, ck)
        results.append((value.to_tensor(), g.to_tensor()))
    assert torch.equal(results[0][0], results[1][0])
    assert_trees_close(results[0][1], results[1][1])
    # The backward pass of the pmap itself (outside the device function) too.
    outer = funcdp.pmap(lambda w, x, ck: loss(w, x, ck), in_axes=(None, 0, None),
                        devices=funcdp.local_devices()[:2], static_broadcasted_argnums=(2,))
    grads = []
    for ck in (False, True):
        wr = w.clone().requires_grad_()
        torch.manual_seed(seed)
        outer(wr, x, ck).sum().backward()
        grads.append(wr.grad)
    assert_trees_close(grads[0], grads[1])


def test_checkpoint_without_the_random_contexts_is_an_error_inside_pmap():
    x = torch.randn(2, 50, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="context_fn=funcdp.checkpoint_random_contexts"):
        _checkpointed_step(use_reentrant=False)(w, x)
    # Fresh draws asked for: no error (and other masks than the forward pass's).
    _checkpointed_step(use_reentrant=False, preserve_rng_state=False)(w, x)
    # The reentrant checkpoint, by .backward() on the device.
    from torch.utils.checkpoint import checkpoint

    def by_backward(w, x):
        w = w.detach().requires_grad_()
        checkpoint(_dropout_block, x, w, use_reentrant=True).sum().backward()
        return w.grad

    with pytest.raises(RuntimeError, match="context_fn=funcdp.checkpoint_random_contexts"):
        funcdp.pmap(by_backward, in_axes=(None, 0))(w, x)
    # Outside pmap, torch's own RNG preservation does the work; the contexts do nothing.
    from torch.utils.checkpoint import checkpoint as ck

    wr = w.clone().requires_grad_()
    torch.manual_seed(2)
    ck(_dropout_block, x, wr, use_reentrant=False,
       context_fn=funcdp.checkpoint_random_contexts).sum().backward()
    wp = w.clone().requires_grad_()
    torch.manual_seed(2)
    _dropout_block(x, wp).sum().backward()
    assert_trees_close(wr.grad, wp.grad)


def test_checkpoint_around_a_pmap_recomputes_its_draws():
    # torch's checkpoint restores the default generator, from which a top-level pmap
    # takes its seed: the recomputed call draws the same masks, with no error.
    from torch.utils.checkpoint import checkpoint

    pf = funcdp.pmap(_dropout_block, in_axes=(0, None), devices=funcdp.local_devices()[:2])
    x = torch.randn(2, 50, dtype=torch.float64)
    grads = []
    for ck in (False, True):
        w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(3)
        seg = lambda x, w: pf(x, w)  # noqa: E731  (w requires grad: a tensor)
        y = checkpoint(seg, x, w, use_reentrant=False) if ck else seg(x, w)
        y.sum().backward()
        grads.append(w.grad)
    assert_trees_close(grads[0], grads[1])


def test_checkpoint_random_contexts_over_two_backward_passes():
    from torch.utils.checkpoint import checkpoint

    def loss(w, x, ck):
        if not ck:
            return _dropout_block(x, w).sum()
        return checkpoint(_dropout_block, x, w, use_reentrant=False,
                          context_fn=funcdp.checkpoint_random_contexts).sum()

    def twice(w, x, ck):  # two backward passes on the device, over one graph
        w = w.detach().requires_grad_()
        y = loss(w, x, ck)
        (a,) = torch.autograd.grad(y, w, retain_graph=True)
        (b,) = torch.autograd.grad(y, w)
        return torch.stack([a, b])

    kw = {"in_axes": (None, 0, None), "devices": funcdp.local_devices()[:2],
          "static_broadcasted_argnums": (2,)}
    x = torch.randn(2, 50, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)
    got = []
    for ck in (False, True):
        torch.manual_seed(1)
        got.append(funcdp.pmap(twice, **kw)(w, x, ck).to_tensor())
    assert_trees_close(got[0], got[1])
    # And over the pmap's own backward pass, twice.
    outer = funcdp.pmap(loss, **kw)
    grads = []
    for ck in (False, True):
        wr = w.clone().requires_grad_()
        torch.manual_seed(1)
        y = outer(wr, x, ck).sum()
        y.backward(retain_graph=True)
        y.backward()
        grads.append(wr.grad)
    assert_trees_close(grads[0], grads[1])


def test_reentrant_checkpoint_whose_backward_draws_is_not_an_error():
    # Only its recomputation is: the draw here is in the backward pass it runs.
    from torch.utils.checkpoint import checkpoint

    def f(w, x):
        w = w.detach().requires_grad_()
        seg = lambda w, x: torch.tanh(_NoisyBackward.apply(w) * x)  # noqa: E731
        checkpoint(seg, w, x, use_reentrant=True).sum().backward()
        return w.grad

    kw = {"in_axes": (None, 0), "devices": funcdp.local_devices()[:2]}
    w = torch.zeros(3, dtype=torch.float64)
    x = torch.ones(2, 3, dtype=torch.float64)
    torch.manual_seed(6)
    got = funcdp.pmap(f, **kw)(w, x).to_tensor()
    torch.manual_seed(6)
    noise = funcdp.pmap(lambda w, x: torch.randn(3, dtype=w.dtype), **kw)(w, x).to_tensor()
    assert_trees_close(got, 1 + noise)  # tanh'(0) = 1


@pytest.mark.parametrize("block", ["eval dropout", "p=0", "eval rrelu"])
def test_checkpointed_random_functions_that_draw_nothing_are_not_an_error(block):
    from torch.utils.checkpoint import checkpoint

    blocks = {
        "eval dropout": lambda v, w: torch.sin(F.dropout(torch.tanh(v * w), 0.5,
                                                         training=False)) * w,
        "p=0": lambda v, w: torch.sin(F.dropout(torch.tanh(v * w), 0.0)) * w,
        "eval rrelu": lambda v, w: torch.sin(F.rrelu(torch.tanh(v * w))) * w,
    }
    blk = blocks[block]

    def loss(w, x, ck):
        return (checkpoint(blk, x, w, use_reentrant=False) if ck else blk(x, w)).sum()

    kw = {"axis_name": "d", "in_axes": (None, 0, None), "devices": funcdp.local_devices()[:2],
          "static_broadcasted_argnums": (2,)}
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)
    got = [funcdp.pmap(funcdp.value_and_grad(loss, "d"), **kw)(w, x, ck)[1] for ck in (0, 1)]
    assert_trees_close(got[0], got[1])


def test_random_functions_that_draw_nothing_leave_the_default_generator_alone():
    for f in (lambda x: F.rrelu(x), lambda x: F.dropout(x, 0.5, training=False),
              lambda x: torch.nn.RReLU().eval()(x)):
        torch.manual_seed(0)
        funcdp.pmap(f, devices=funcdp.local_devices()[:2])(torch.randn(2, 4))
        after = torch.rand(())
        torch.manual_seed(0)
        torch.randn(2, 4)
        assert torch.equal(torch.rand(()), after)


def _nested_dropout_pmap():
    return funcdp.pmap(lambda x, w: F.dropout(torch.tanh(x * w), 0.5) * x, in_axes=(0, None),
                       devices=funcdp.local_devices()[2:4])


def test_checkpoint_around_a_nested_pmap():
    # The nested call seeds from the outer device's generator: the recomputation must
    # replay it (with the contexts), or raise (without).
    from torch.utils.checkpoint import checkpoint

    inner = _nested_dropout_pmap()

    def seg(x, w):
        return inner(x.reshape(2, -1), w)

    def call(f, *args):  # one function checkpointed inside the device and around the pmap
        return f(*args)

    def loss(w, x, ck):
        kw = {"context_fn": funcdp.checkpoint_random_contexts} if ck == "contexts" else {}
        out = checkpoint(call, seg, x, w, use_reentrant=False, **kw) if ck else seg(x, w)
        return out.sum()

    kw = {"in_axes": (None, 0, None), "devices": funcdp.local_devices()[:2],
          "static_broadcasted_argnums": (2,)}
    x = torch.randn(2, 40, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)

    def on_devices(ck):
        torch.manual_seed(0)
        return funcdp.pmap(funcdp.value_and_grad(loss), **kw)(w, x, ck)[1].to_tensor()

    def from_outside(ck):
        wr = w.clone().requires_grad_()
        torch.manual_seed(0)
        funcdp.pmap(loss, **kw)(wr, x, ck).sum().backward()
        return wr.grad

    def from_outside_in_a_checkpoint(ck):
        # A checkpoint around the outer pmap too: it may recompute the outer call (seeded
        # from torch's default generator, which it restores), not the inner one.
        wr = w.clone().requires_grad_()
        torch.manual_seed(0)
        outer = funcdp.pmap(loss, **kw)
        checkpoint(call, lambda w_: outer(w_, x, ck).sum(), wr, use_reentrant=False).backward()
        return wr.grad

    for run in (on_devices, from_outside, from_outside_in_a_checkpoint):
        assert_trees_close(run("contexts"), run(None))
        with pytest.raises(RuntimeError, match="checkpoint_random_contexts"):
            run("plain")


def test_nested_pmap_under_torch_func_grad_seeds_from_the_device():
    # The nested call ran inside an autograd.Function, where the device's routing is off:
    # it seeded from torch's default generator, in thread order (not reproducibly).
    inner = _nested_dropout_pmap()

    def loss(w, x):
        return inner(x.reshape(2, -1), w).sum()

    x = torch.rand(2, 40, dtype=torch.float64)
    w = torch.tensor(2.0, dtype=torch.float64)
    f = funcdp.pmap(torch.func.grad_and_value(loss), in_axes=(None, 0),
                    devices=funcdp.local_devices()[:2])
    g = funcdp.pmap(funcdp.value_and_grad(loss), in_axes=(None, 0),
                    devices=funcdp.local_devices()[:2])
    torch.manual_seed(0)
    want = g(w, x)[0].to_tensor()  # value_and_grad's values: seeded from the devices
    for _ in range(3):
        torch.manual_seed(0)
        assert torch.equal(f(w, x)[1].to_tensor(), want)


def test_other_torch_function_modes_still_see_autograd_calls_on_devices():
    from torch.overrides import TorchFunctionMode

    seen = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.autograd.grad:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        funcdp.pmap(_BACKWARDS["torch.autograd.grad"], in_axes=(None, 0),
                    devices=funcdp.local_devices()[:2])(torch.zeros(3), torch.ones(2, 3))
    assert len(seen) == 2


def test_randomness_in_named_vmap():
    with pytest.raises(RuntimeError, match="randomness"):
        funcdp.vmap(lambda x: F.dropout(x, 0.5))(torch.ones(3, 4))
    out = funcdp.vmap(lambda x: torch.rand(()), randomness="different")(torch.ones(5))
    assert len(set(out.tolist())) == 5
    out = funcdp.vmap(lambda x: torch.rand(()), randomness="same")(torch.ones(5))
    assert len(set(out.tolist())) == 1
    with pytest.raises(ValueError, match="`randomness` must be one of"):
        funcdp.vmap(lambda x: x, randomness="sometimes")


def test_named_vmap_errors():
    with pytest.raises(ValueError, match=r"different sizes along their mapped axes:\n"
                                         r"  - args\[0\]: size 2\n  - args\[1\]: size 3"):
        funcdp.vmap(lambda a, b: a)(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="no argument is mapped"):
        funcdp.vmap(lambda a: a, in_axes=None)(torch.ones(2))
    out = funcdp.vmap(lambda a: a + funcdp.axis_index("k"), in_axes=None, axis_size=3,
                      axis_name="k")(torch.zeros(()))
    assert out.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(TypeError, match="single name"):
        funcdp.vmap(lambda a: a, axis_name=("a", "b"))


def test_higher_order_gradients_through_pmap():
    torch.manual_seed(4)
    x = torch.randn(4, 3, dtype=torch.float64)
    f = funcdp.pmap(lambda x: torch.sin(x) * funcdp.psum(x, "i"), axis_name="i")

    def ref(x):
        return torch.sin(x) * x.sum(0)

    # grad of grad
    got = grad(lambda t: grad(lambda u: f(u).sum())(t).pow(2).sum())(x)
    want = grad(lambda t: grad(lambda u: ref(u).sum())(t).pow(2).sum())(x)
    assert_trees_close(got, want)
    # create_graph=True in plain autograd
    xr = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(xr).sum(), xr, create_graph=True)
    (g2,) = torch.autograd.grad(g1.pow(2).sum(), xr)
    assert_trees_close(g2, want)
    # vmap over grad of pmap (a batch of cotangents)
    cts = torch.randn(5, 4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda c: vjp(f, x)[1](c)[0])(cts)
    want = torch.func.vmap(lambda c: vjp(ref, x)[1](c)[0])(cts)
    assert_trees_close(got, want)


def test_jacobians_through_pmap():
    x = torch.randn(2, 3, dtype=torch.float64)
    f = funcdp.pmap(lambda v: v * funcdp.pmean(v, "i"), axis_name="i")
    ref = lambda v: v * v.mean(0)  # noqa: E731
    assert_trees_close(torch.func.jacrev(f)(x), torch.func.jacrev(ref)(x))
    assert_trees_close(torch.func.hessian(lambda v: f(v).sum())(x),
                       torch.func.hessian(lambda v: ref(v).sum())(x))


def test_derivatives_through_pmap_see_the_forward_pass_dropout_masks():
    f = funcdp.pmap(lambda a, w: F.dropout(a * w, 0.5), in_axes=(0, None))
    x = torch.ones(4, 1000, dtype=torch.float64)
    w = torch.tensor(3.0, dtype=torch.float64)
    torch.manual_seed(0)
    g, value = torch.func.grad_and_value(lambda w: f(x, w).sum())(w)
    assert_trees_close(g, value / w)  # the same mask in the forward and backward passes
    torch.manual_seed(0)
    out, tangent = torch.func.jvp(lambda w: f(x, w), (w,), (torch.ones(()).double(),))
    assert_trees_close(tangent, out / w)
    wr = w.clone().requires_grad_()
    torch.manual_seed(0)
    y = f(x, wr).sum()
    (gw,) = torch.autograd.grad(y, wr, create_graph=True)
    assert_trees_close(gw.detach(), y.detach() / w)


def test_vmap_of_a_nested_pmap_seeds_from_the_device():
    # vmap(pmap) runs as a new pmap call inside the autograd.Function's vmap rule, where
    # the enclosing device's routing is off: it seeded from torch's default generator, in
    # thread order (found in review).
    inner = _nested_dropout_pmap()
    dev = torch.func.vmap(lambda r: inner(r.reshape(2, -1), 1.0), randomness="same")
    f = funcdp.pmap(dev, devices=funcdp.local_devices()[:2])
    x = torch.rand(2, 3, 40, dtype=torch.float64) + 1
    runs = []
    for _ in range(6):
        torch.manual_seed(0)
        runs.append(f(x).to_tensor())
    assert all(torch.equal(r, runs[0]) for r in runs)
    assert not torch.equal(runs[0][0], runs[0][1])  # the devices draw differently


def test_batched_derivatives_through_pmap_see_the_forward_pass_dropout_masks():
    # A batched pullback recomputes the call inside the autograd.Function's vmap rule:
    # the recomputation must take the forward pass's seeds (found in review).
    f = funcdp.pmap(lambda x: F.dropout(x, 0.5), devices=funcdp.local_devices()[:2])
    x = torch.rand(2, 6, dtype=torch.float64) + 1
    torch.manual_seed(0)
    y, pull = torch.func.vjp(lambda v: f(v), x)
    eye = torch.eye(12, dtype=torch.float64).reshape(12, 2, 6)
    jac = torch.vmap(pull, randomness="same")(eye)[0].reshape(12, 12)
    assert torch.equal(jac.diagonal(), (y / x).flatten())


def test_jacobians_through_pmap_see_the_forward_pass_dropout_masks():
    # jacrev recomputes the forward pass under its vmap over cotangents, whose randomness
    # is "error": the recomputation replays the seeds, one draw for the batch (it raised).
    pm = funcdp.pmap(lambda x, w: F.dropout(x * w, 0.5), in_axes=(0, None),
                     devices=funcdp.local_devices()[:2])
    x = torch.rand(2, 6, dtype=torch.float64) + 1
    w = torch.tensor(3.0, dtype=torch.float64)
    torch.manual_seed(0)
    y = pm(x, w).to_tensor()
    for jac in (torch.func.jacrev, functools.partial(torch.func.jacfwd, randomness="same")):
        torch.manual_seed(0)
        assert_trees_close(jac(lambda w: pm(x, w))(w), y / w)
    # The user's own vmap, and jacfwd's default: as asked, as in torch.
    for asked in (lambda: torch.func.vmap(lambda w: pm(x, w))(w.expand(3)),
                  lambda: torch.func.jacfwd(lambda w: pm(x, w))(w)):
        with pytest.raises(RuntimeError, match="randomness"):
            asked()


def test_randomness_is_reproducible_whatever_the_first_calls_did():
    f = funcdp.pmap(lambda a, train: F.dropout(a, 0.5, training=train), in_axes=(0, None))
    x = torch.ones(4, 64)
    for _ in range(3):
        f(x, False)  # no randomness: leaves torch's default generator alone
    torch.manual_seed(5)
    a = f(x, True).to_tensor()
    torch.manual_seed(5)
    b = f(x, True).to_tensor()
    assert torch.equal(a, b)
    state = torch.random.get_rng_state()
    f(x, False)
    assert torch.equal(state, torch.random.get_rng_state())


def test_dropout_with_more_shards_than_devices_and_under_vmap():
    f = funcdp.pmap(lambda a: F.dropout(a, 0.5), devices=funcdp.local_devices()[:2])
    torch.manual_seed(3)
    a = f(torch.ones(8, 32)).to_tensor()
    torch.manual_seed(3)
    b = f(torch.ones(8, 32)).to_tensor()
    assert torch.equal(a, b) and len({tuple(r.tolist()) for r in a}) == 8
    g = torch.func.vmap(funcdp.pmap(lambda a: F.dropout(a, 0.5)), randomness="different")
    out = g(torch.ones(3, 4, 16))
    assert len({tuple(r.tolist()) for r in out.reshape(12, 16)}) == 12
    # A device's first draw inside a named vmap on the device (each of the cases above
    # also draws first inside a vmap: the call's seed is drawn outside every transform).
    h = funcdp.pmap(funcdp.vmap(lambda r: F.dropout(r, 0.5), randomness="different"),
                    devices=funcdp.local_devices()[:2])
    out = h(torch.ones(2, 3, 16)).to_tensor()
    assert len({tuple(r.tolist()) for r in out.reshape(6, 16)}) == 6


def test_grad_with_a_constant_made_inside_the_transform():
    # A tensor made inside torch.func.grad that does not depend on the differentiated
    # argument (a buffer's clone()) was tracked as requiring grad on the devices: eval
    # BatchNorm rejected its running statistics. Also its second derivative, with a value
    # that depends on the outer argument only.
    import torch.nn.functional as F

    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    x = torch.randn(8, 4, dtype=torch.float64)

    def loss(w, rm, rv, x):
        return (F.batch_norm(x, rm, rv, weight=w, training=False) ** 2).sum()

    pm = funcdp.pmap(loss, in_axes=(None, None, None, 0), devices=funcdp.local_devices()[:4])
    got = torch.func.grad(lambda w: pm(w, rm.clone(), rv, x.reshape(4, 2, 4)).sum())(w)
    want = torch.func.grad(lambda w: loss(w, rm.clone(), rv, x))(w)
    assert_trees_close(got, want)

    def f(u, c, z, x):
        return (torch.sin(x * u) * c).sum() * z.sum()

    pf = funcdp.pmap(f, in_axes=(None, None, None, 0), devices=funcdp.local_devices()[:4])

    def second(w, run, xs):  # (c depends on the outer argument only; z on neither)
        c = w * 2
        return torch.func.grad(lambda u: run(u, c, rv.clone(), xs).sum())(w).sum()

    got = torch.func.grad(lambda w: second(w, pf, x.reshape(4, 2, 4)))(w)
    want = torch.func.grad(lambda w: second(w, f, x))(w)
    assert_trees_close(got, want)
