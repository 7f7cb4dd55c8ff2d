"""Every collective against a plain torch reference on the stacked values, with gradients.

For a collective ``c`` the reference ``ref(X)`` maps the stacked per-device values
``X = [x_0, ..., x_{n-1}]`` to the stacked per-device results. Each test checks, for
random shapes, dtypes and device layouts (including more shards than devices):

- ``pmap(c)(X) == ref(X)`` and ``vmap(c, axis_name=...)(X) == ref(X)``;
- ``pmap(grad(...))``: each device's gradient of ``(c(x_i) * w_i).sum()`` equals the
  gradient of ``sum_i (ref(X)_i * W_i).sum()`` with respect to ``x_i`` (the pmap
  convention: every device's output is a separate output);
- ``grad(pmap(...))`` gives the same;
- forward mode: ``pmap(c)`` on a dual tensor (``forward_ad.dual_level`` around the call)
  carries the tangent ``jvp(ref)`` gives.
"""

from __future__ import annotations

import time

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from helpers import assert_trees_close
from hypothesis import given
from strategies import device_layout
from torch.autograd import forward_ad
from torch.func import grad

import funcdp
from funcdp._src import collectives

AX = "i"


def _rand(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(-5, 6, shape, generator=gen, dtype=dtype)
    # Small integers in float: sums are exact, so ties and orders are reproducible.
    return torch.randint(-8, 9, shape, generator=gen).to(dtype) / 4


@st.composite
def case(draw, rank_min=0, dtypes=(torch.float32, torch.float64)):
    n, devs = draw(device_layout())
    rank = draw(st.integers(rank_min, 3))
    shape = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**30)))
    x = _rand((n,) + shape, dtype, gen)
    return n, devs, x, gen


# ----------------------------------------------------------------- the harness
def check(c, ref, x, devs, *, grads=True):
    """Forward under pmap and named vmap; gradients in both orders (float inputs)."""
    n = x.shape[0]
    expected = ref(x)
    out = funcdp.pmap(c, axis_name=AX, devices=devs)(x)
    assert_trees_close(out, expected)
    vout = funcdp.vmap(c, axis_name=AX)(x)
    assert_trees_close(vout, expected)
    if not grads or not x.is_floating_point():
        return
    xd = x.double()
    w = torch.randn(expected.shape, dtype=torch.float64)
    xr = xd.clone().requires_grad_()
    r = (ref(xr) * w).sum()
    want = torch.autograd.grad(r, xr)[0] if r.requires_grad else torch.zeros_like(xd)

    def local(v, wi):
        return grad(lambda v: (c(v) * wi).sum())(v)

    got = funcdp.pmap(local, axis_name=AX, devices=devs)(xd, w)
    assert_trees_close(got, want)
    got_v = funcdp.vmap(local, axis_name=AX)(xd, w)
    assert_trees_close(got_v, want)
    pf = funcdp.pmap(c, axis_name=AX, devices=devs)
    got_outer = grad(lambda xx: (pf(xx) * w).sum())(xd)
    assert_trees_close(got_outer, want)
    tangent = torch.randn(xd.shape, dtype=torch.float64)
    _, want_t = torch.func.jvp(ref, (xd,), (tangent,))
    with forward_ad.dual_level():
        got_t = forward_ad.unpack_dual(pf(forward_ad.make_dual(xd, tangent))).tangent
    assert got_t is not None, "the collective dropped the forward-mode tangent"
    assert_trees_close(got_t, want_t)
    del n


# ----------------------------------------------------------------- reductions
@given(case(dtypes=(torch.float32, torch.float64, torch.int64)))
def test_psum(cs):
    n, devs, x, _ = cs
    check(lambda v: funcdp.psum(v, AX), lambda X: X.sum(0).expand_as(X), x, devs)


@given(case(dtypes=(torch.float32, torch.float64, torch.int64, torch.bool)))
def test_pmean(cs):
    n, devs, x, _ = cs

    def ref(X):
        m = X.to(torch.get_default_dtype()) if not X.is_floating_point() else X
        return m.mean(0).expand_as(m)

    check(lambda v: funcdp.pmean(v, AX), ref, x, devs)


@given(case(dtypes=(torch.float32, torch.float64, torch.int64)))
def test_pmax_with_ties(cs):
    n, devs, x, _ = cs
    check(lambda v: funcdp.pmax(v, AX), lambda X: X.amax(0).expand_as(X), x, devs)


@given(case(dtypes=(torch.float32, torch.float64, torch.int64)))
def test_pmin_with_ties(cs):
    n, devs, x, _ = cs
    check(lambda v: funcdp.pmin(v, AX), lambda X: X.amin(0).expand_as(X), x, devs)


def test_tangents_through_a_reduction_of_float_and_integer_leaves():
    # The integer leaf has no tangent; the float leaf's must go through (found in review).
    def g(a, n):
        s = funcdp.psum((a, n), AX)
        return s[0] * s[1]

    pf = funcdp.pmap(g, AX, devices=funcdp.local_devices()[:2])
    a, t, n = torch.randn(2, 3), torch.randn(2, 3), torch.arange(2)
    want = (t.sum(0) * n.sum()).expand(2, 3)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(pf(forward_ad.make_dual(a, t), n)).tangent
    assert_trees_close(got, want)
    assert_trees_close(torch.func.jvp(lambda a: pf(a, n), (a,), (t,))[1], want)


def test_psum_of_bool_counts():
    x = torch.tensor([True, False, True, True])
    out = funcdp.pmap(lambda v: funcdp.psum(v, AX), axis_name=AX)(x)
    assert out.dtype == torch.int64
    assert out.to_tensor().tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("tiled", [False, True])
def test_psum_scatter_of_bool_counts(tiled):
    # psum_scatter kept bool (an "or" where psum counts).
    x = torch.tensor([[True, True, False, True]] * 4)
    for f in (funcdp.pmap(lambda v: funcdp.psum_scatter(v, AX, tiled=tiled), axis_name=AX,
                          devices=funcdp.local_devices()[:4]),
              funcdp.vmap(lambda v: funcdp.psum_scatter(v, AX, tiled=tiled), axis_name=AX)):
        out = f(x)
        out = out.to_tensor() if isinstance(out, funcdp.ShardedValue) else out
        assert out.dtype == torch.int64
        assert out.reshape(-1).tolist() == [4, 4, 0, 4]


@given(case(), st.data())
def test_reductions_within_axis_index_groups(cs, data):
    n, devs, x, _ = cs
    perm = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=3)))
    groups = [list(perm[a:b]) for a, b in zip([0] + cuts, cuts + [n]) if a < b]
    group_of = {m: g for g in groups for m in g}

    def ref_with(red):
        def ref(X):
            return torch.stack([red(X[group_of[i]]) for i in range(n)])
        return ref

    check(lambda v: funcdp.psum(v, AX, axis_index_groups=groups),
          ref_with(lambda t: t.sum(0)), x, devs)
    check(lambda v: funcdp.pmax(v, AX, axis_index_groups=groups),
          ref_with(lambda t: t.amax(0)), x, devs)
    check(lambda v: funcdp.pmean(v, AX, axis_index_groups=groups),
          ref_with(lambda t: t.mean(0)), x, devs)


@given(st.sampled_from([(2, 2), (2, 4), (4, 2), (1, 4), (3, 2)]), st.data())
def test_reductions_within_groups_over_two_axes(sizes, data):
    # A tuple of axes with axis_index_groups over the row-major index: nested pmaps (all
    # device axes: one round) and a pmap of a named vmap (mixed components).
    n1, n2 = sizes
    n = n1 * n2
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**30)))
    x = _rand((n1, n2, 2), torch.float64, gen)
    perm = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3)))
    groups = [list(perm[a:b]) for a, b in zip([0] + cuts, cuts + [n]) if a < b]
    group_of = {m: g for g in groups for m in g}
    w = _rand((n1, n2, 2), torch.float64, gen)
    for name, red in (("psum", lambda t: t.sum(0)), ("pmax", lambda t: t.amax(0)),
                      ("pmin", lambda t: t.amin(0)), ("pmean", lambda t: t.mean(0))):
        def c(v, name=name):
            return getattr(funcdp, name)(v, ("i", "j"), axis_index_groups=groups)

        def ref(X, red=red):
            flat = X.reshape(n, 2)
            return torch.stack([red(flat[group_of[i]]) for i in range(n)]).reshape(X.shape)

        for how, fn in (("pmap(pmap)", funcdp.pmap(funcdp.pmap(c, "j"), "i")),
                        ("pmap(vmap)", funcdp.pmap(funcdp.vmap(c, axis_name="j"), "i"))):
            assert_trees_close(torch.as_tensor(fn(x)), ref(x)), (name, how)
            got = grad(lambda t: (torch.as_tensor(fn(t)) * w).sum())(x)
            want = grad(lambda t: (ref(t) * w).sum())(x)
            assert_trees_close(got, want), (name, how)


@given(st.integers(2, 8), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**30))
def test_pmean_is_psum_divided_by_n_to_the_bit(n, dtype, seed):
    # Values of very different magnitudes: a mean computed as a + (b - a) / 2, or as a
    # product with a rounded 1 / n, differs from psum / n in the last bit.
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 4, (n, 1), generator=gen)
    x = (torch.randn(n, 2000, generator=gen, dtype=torch.float64) * scale).to(dtype)
    mean, total = funcdp.pmap(lambda v: (funcdp.pmean(v, AX), funcdp.psum(v, AX)),
                              axis_name=AX, devices=funcdp.local_devices()[:n])(x)
    assert torch.equal(mean.to_tensor()[n - 1], total.to_tensor()[0] / n)


def test_python_numbers_and_unmapped_values():
    n = 4

    def f(v):
        return (funcdp.psum(1, AX), funcdp.psum(True, AX), funcdp.pmean(3, AX),
                funcdp.pmax(2.5, AX), funcdp.axis_size(AX))

    out = funcdp.pmap(f, axis_name=AX, out_axes=None)(torch.zeros(n))
    assert out == (n, n, 3.0, 2.5, n)
    # A value that does not vary along a vmap axis is multiplied by the axis size.
    w = torch.tensor([1.0, 2.0])
    got = funcdp.vmap(lambda v, w: funcdp.psum(w, "j"), in_axes=(0, None), axis_name="j")(
        torch.zeros(3), w)
    assert_trees_close(got, (3 * w).expand(3, 2))


def test_reduction_results_are_bitwise_identical_and_shared():
    torch.manual_seed(3)
    x = torch.randn(8, 5000)
    out = funcdp.pmap(lambda v: funcdp.psum(v * 1.1, AX), axis_name=AX)(x)
    first = out.shards[0]
    for s in out.shards[1:]:
        assert torch.equal(s, first)
        assert s.data_ptr() == first.data_ptr()
    # Small results are copied per device (cheap), so in-place updates stay local.
    small = funcdp.pmap(lambda v: funcdp.psum(v, AX).add_(funcdp.axis_index(AX)),
                        axis_name=AX)(torch.ones(8, 3))
    assert small.to_tensor()[:, 0].tolist() == [8.0 + i for i in range(8)]
    # Large reductions are computed in parallel chunks: still one identical result.
    big = torch.randn(4, 300_000)
    out = funcdp.pmap(lambda v: funcdp.psum(v, AX), axis_name=AX)(big)
    torch.testing.assert_close(out.shards[2], big.sum(0), rtol=1e-5, atol=1e-5)
    assert len({s.data_ptr() for s in out.shards}) == 1


def test_writing_in_place_to_a_shared_result_is_an_error():
    def f(v):
        y = funcdp.psum(v, AX)
        y += 1
        return y

    with pytest.raises(funcdp.CollectiveError, match=r"the result of psum\(axis_name='i'\) "
                                                      r"was modified in place on a device"):
        funcdp.pmap(f, axis_name=AX)(torch.ones(4, 10000))


def test_pytree_reduction_is_one_round():
    from funcdp._src import rendezvous

    rounds = []
    orig = rendezvous.Mesh.exchange

    def counting(self, *a, **k):
        rounds.append(1)
        return orig(self, *a, **k)

    tree = {"a": torch.ones(4, 3), "b": [torch.ones(4, 2, 2), torch.ones(4)],
            "c": torch.ones(4, dtype=torch.float64)}
    rendezvous.Mesh.exchange = counting
    try:
        out = funcdp.pmap(lambda t: funcdp.pmean(t, AX), axis_name=AX)(tree)
    finally:
        rendezvous.Mesh.exchange = orig
    assert len(rounds) == 4  # one round per device, for the whole tree
    assert_trees_close(out, tree)


# ----------------------------------------------------------------- gathers
@given(case(dtypes=(torch.float32, torch.float64, torch.int64, torch.bool)), st.data())
def test_all_gather(cs, data):
    n, devs, x, _ = cs
    r = x.ndim - 1
    axis = data.draw(st.integers(-(r + 1), r))
    a = axis % (r + 1)
    check(lambda v: funcdp.all_gather(v, AX, axis=axis),
          lambda X: torch.stack(list(X), a).unsqueeze(0).expand(n, *torch.stack(list(X), a).shape),
          x, devs)


@given(case(rank_min=1), st.data())
def test_all_gather_tiled(cs, data):
    n, devs, x, _ = cs
    r = x.ndim - 1
    axis = data.draw(st.integers(-r, r - 1))
    a = axis % r

    def ref(X):
        cat = torch.cat(list(X), a)
        return cat.unsqueeze(0).expand(n, *cat.shape)

    check(lambda v: funcdp.all_gather(v, AX, axis=axis, tiled=True), ref, x, devs)


@given(st.data())
def test_psum_scatter(data):
    n, devs = data.draw(device_layout())
    rank = data.draw(st.integers(1, 3))
    d = data.draw(st.integers(0, rank - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    shape[d] = n
    x = _rand((n, *shape), data.draw(st.sampled_from([torch.float32, torch.float64])),
              torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    check(lambda v: funcdp.psum_scatter(v, AX, scatter_dimension=d),
          lambda X: X.sum(0).movedim(d, 0), x, devs)


@given(st.data())
def test_psum_scatter_tiled(data):
    n, devs = data.draw(device_layout())
    rank = data.draw(st.integers(1, 3))
    d = data.draw(st.integers(0, rank - 1))
    m = data.draw(st.integers(1, 2))
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    shape[d] = n * m
    x = _rand((n, *shape), torch.float64, torch.Generator().manual_seed(0))
    check(lambda v: funcdp.psum_scatter(v, AX, scatter_dimension=d, tiled=True),
          lambda X: torch.stack(X.sum(0).chunk(n, d)), x, devs)


# ----------------------------------------------------------------- permutations
@given(case(dtypes=(torch.float32, torch.float64, torch.int64, torch.bool)), st.data())
def test_ppermute(cs, data):
    n, devs, x, _ = cs
    srcs = data.draw(st.permutations(range(n)))
    dsts = data.draw(st.permutations(range(n)))
    k = data.draw(st.integers(0, n))
    perm = list(zip(srcs[:k], dsts[:k]))

    def ref(X):
        out = torch.zeros_like(X)
        for s, d in perm:
            out[d] = X[s]
        return out

    check(lambda v: funcdp.ppermute(v, AX, perm), ref, x, devs)


@given(case())
def test_ppermute_ring_equals_roll(cs):
    n, devs, x, _ = cs
    ring = [(i, (i + 1) % n) for i in range(n)]
    check(lambda v: funcdp.ppermute(v, AX, ring), lambda X: torch.roll(X, 1, 0), x, devs)


@given(case(), st.data())
def test_pshuffle(cs, data):
    n, devs, x, _ = cs
    perm = data.draw(st.permutations(range(n)))
    check(lambda v: funcdp.pshuffle(v, AX, perm), lambda X: X[list(perm)], x, devs)


@given(st.data())
def test_all_to_all(data):
    n, devs = data.draw(device_layout())
    rank = data.draw(st.integers(1, 3))
    s = data.draw(st.integers(0, rank - 1))
    c = data.draw(st.integers(0, rank - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    shape[s] = n
    x = _rand((n, *shape), data.draw(st.sampled_from([torch.float64, torch.int64])),
              torch.Generator().manual_seed(data.draw(st.integers(0, 99))))

    def ref(X):
        # out_i[..., j (at c), ...] = x_j[i] (x_j's split axis s removed)
        return torch.stack([torch.stack([X[j].select(s, i) for j in range(n)], c)
                            for i in range(n)])

    check(lambda v: funcdp.all_to_all(v, AX, s, c), ref, x, devs)


@given(st.data())
def test_all_to_all_tiled(data):
    n, devs = data.draw(device_layout())
    rank = data.draw(st.integers(1, 3))
    s = data.draw(st.integers(0, rank - 1))
    c = data.draw(st.integers(0, rank - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    shape[s] = n * data.draw(st.integers(1, 2))
    x = _rand((n, *shape), torch.float64, torch.Generator().manual_seed(1))

    def ref(X):
        return torch.stack([torch.cat([X[j].chunk(n, s)[i] for j in range(n)], c)
                            for i in range(n)])

    check(lambda v: funcdp.all_to_all(v, AX, s, c, tiled=True), ref, x, devs)


@given(case(dtypes=(torch.float32, torch.float64, torch.int64, torch.bool)), st.data())
def test_pbroadcast(cs, data):
    n, devs, x, _ = cs
    src = data.draw(st.integers(0, n - 1))
    check(lambda v: funcdp.pbroadcast(v, AX, src), lambda X: X[src].expand_as(X), x, devs)


@given(device_layout())
def test_axis_index_and_size(layout):
    n, devs = layout
    out = funcdp.pmap(lambda v: (funcdp.axis_index(AX), funcdp.axis_size(AX)),
                      axis_name=AX, devices=devs, out_axes=(0, None))(torch.zeros(n))
    assert out[0].dtype == torch.int64
    assert out[0].to_tensor().tolist() == list(range(n))
    assert out[1] == n


def test_second_order_gradient_through_psum():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def f(v):
        return grad(grad(lambda u: funcdp.psum(u, AX) ** 3 / 3))(v)

    # Each device's output is a separate output (psum transposes to psum): with
    # S = psum(u), the first grad is psum(S^2) = n S^2 and the second n * n * 2S.
    n, s = 4, 10.0
    out = funcdp.pmap(f, axis_name=AX)(x).to_tensor()
    assert_trees_close(out, torch.full((4,), n * n * 2 * s, dtype=torch.float64))
    # The same through an explicit reference: the Hessian of sum_i f_i(stack(x)).
    ref = torch.func.hessian(lambda X: (X.sum() ** 3 / 3) * n)(x).sum(1)
    assert_trees_close(out, ref)


def test_backward_through_collective_with_plain_autograd():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = funcdp.pmap(lambda v: funcdp.all_gather(v, AX).pow(2).sum(), axis_name=AX)(x)
    out.sum().backward()
    # Every device's output uses every x_j, so d/dx_j = n * 2 x_j.
    assert_trees_close(x.grad, 4 * 2 * x.detach())


@pytest.mark.parametrize("name, fn", [
    ("psum", lambda v: funcdp.psum(v, AX)),
    ("pmax", lambda v: funcdp.pmax(v, AX)),
    ("all_gather", lambda v: funcdp.all_gather(v, AX, axis=1)),
    ("psum_scatter", lambda v: funcdp.psum_scatter(v, AX, scatter_dimension=1, tiled=True)),
    ("ppermute", lambda v: funcdp.ppermute(v, AX, [(0, 2), (2, 1), (1, 0)])),
    ("all_to_all", lambda v: funcdp.all_to_all(v, AX, 1, 0, tiled=True)),
    ("pbroadcast", lambda v: funcdp.pbroadcast(v, AX, 1)),
])
def test_gradcheck_float64(name, fn):
    torch.manual_seed(5)
    x = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    pf = funcdp.pmap(fn, axis_name=AX)
    assert torch.autograd.gradcheck(lambda t: pf(t), (x,))


# Every collective, on a value that does not vary along the axis (an unmapped argument,
# a captured tensor, a cotangent that is the same for every member).
_UNMAPPED = {
    "psum": lambda v: funcdp.psum(v, AX),
    "pmax": lambda v: funcdp.pmax(v, AX),
    "pmin": lambda v: funcdp.pmin(v, AX),
    "psum groups": lambda v: funcdp.psum(v, AX, axis_index_groups=[[0, 2], [1]]),
    "pmean groups": lambda v: funcdp.pmean(v, AX, axis_index_groups=[[0, 2], [1]]),
    "pmax groups": lambda v: funcdp.pmax(v, AX, axis_index_groups=[[0, 2], [1]]),
    "all_gather": lambda v: funcdp.all_gather(v, AX, axis=1),
    "all_gather tiled": lambda v: funcdp.all_gather(v, AX, tiled=True),
    "psum_scatter": lambda v: funcdp.psum_scatter(v, AX),
    "psum_scatter tiled": lambda v: funcdp.psum_scatter(v, AX, scatter_dimension=1,
                                                        tiled=True),
    "ppermute": lambda v: funcdp.ppermute(v, AX, [(0, 1), (1, 2)]),
    "pshuffle": lambda v: funcdp.pshuffle(v, AX, [2, 0, 1]),
    "all_to_all": lambda v: funcdp.all_to_all(v, AX, 0, 1),
    "all_to_all tiled": lambda v: funcdp.all_to_all(v, AX, 1, 0, tiled=True),
    "pbroadcast": lambda v: funcdp.pbroadcast(v, AX, 1),
}


@pytest.mark.parametrize("name", sorted(_UNMAPPED))
def test_unmapped_values_are_as_if_broadcast_along_the_axis(name):
    # The collective of an unmapped value, and its gradient, equal those of the value
    # broadcast along the axis (as JAX's vmap gives): the result may vary along the axis
    # (a scatter, a permutation), and the gradient sums over the members' uses.
    c = _UNMAPPED[name]
    w = torch.randn(3, 6, dtype=torch.float64)
    xs = torch.randn(3, dtype=torch.float64)

    def unmapped(w):
        return funcdp.vmap(lambda x: torch.tanh(c(w)) * x, axis_name=AX)(xs)

    def broadcast(w):
        return funcdp.vmap(lambda x, w: torch.tanh(c(w)) * x, axis_name=AX)(
            xs, w.expand(3, 3, 6))

    assert_trees_close(unmapped(w), broadcast(w), exact=True)
    assert_trees_close(grad(lambda w: unmapped(w).sum())(w),
                       grad(lambda w: broadcast(w).sum())(w), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(unmapped, (w.requires_grad_(),))
    # Inside a second named vmap, over which the value does vary.
    ws = torch.randn(2, 3, 6, dtype=torch.float64)
    outer = funcdp.vmap(lambda w: unmapped(w), axis_name="o")(ws)
    assert_trees_close(outer, torch.stack([broadcast(w) for w in ws]), exact=True)


def test_per_member_gradients_of_a_nonlinear_function_of_a_gathered_value():
    # Every member's gathered value is the same, and so is its cotangent: its transpose
    # (a psum_scatter) is that of a value broadcast along the axis. Member i's gradient
    # is sum_j d(l_j)/d(x_i) = 3 n x_i^2, under vmap and pmap (with more shards than
    # devices too), as in JAX.
    x = torch.randn(4, 2, dtype=torch.float64)
    per_member = grad(lambda v: (funcdp.all_gather(v, AX) ** 3).sum())
    want = 3 * 4 * x**2
    assert_trees_close(funcdp.vmap(per_member, axis_name=AX)(x), want)
    for ndev in (4, 2):
        got = funcdp.pmap(per_member, axis_name=AX, devices=funcdp.local_devices()[:ndev])(x)
        assert_trees_close(got.to_tensor(), want)
    # Second order, through a broadcast value's transpose.
    hess_diag = grad(lambda v: grad(lambda v: (funcdp.pbroadcast(v, AX, 0) ** 3).sum())(v)
                     .sum())
    got = funcdp.vmap(hess_diag, axis_name=AX)(x)
    assert_trees_close(got[0], 4 * 6 * x[0])  # member 0's value feeds every member's
    assert_trees_close(got[1:], torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(_UNMAPPED))
def test_none_leaves_pass_through(name):
    c = _UNMAPPED[name]
    x = torch.randn(3, 3, 6)
    for transform in (funcdp.pmap, funcdp.vmap):
        got = transform(lambda v: c({"a": v, "none": None, "b": [None, 2 * v]}),
                        axis_name=AX)(x)
        assert got["none"] is None and got["b"][0] is None
        want = transform(c, axis_name=AX)(x)
        assert_trees_close(got["a"], want)
        assert_trees_close(got["b"][1], transform(c, axis_name=AX)(2 * x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("n", [3, 8])
def test_sums_over_a_vmap_axis_have_the_bits_of_sums_over_devices(dtype, n):
    # A named vmap gives the same results as pmap over as many devices, to the bit: the
    # members are added in the same order, in the value's dtype.
    gen = torch.Generator().manual_seed(n)
    scale = 10.0 ** torch.randint(-3, 4, (n, 1), generator=gen)
    x = (torch.randn(n, 500, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w = x[n // 2]  # (an unmapped value, beside a mapped one: summed in order too)
    for c in (lambda v: funcdp.psum(v, AX), lambda v: funcdp.pmean(v, AX),
              lambda v: funcdp.psum((v, w), AX)[1], lambda v: funcdp.psum(w, AX),
              lambda v: funcdp.psum_scatter(v.reshape(n, -1) if 500 % n == 0 else
                                            v[:n * (500 // n)].reshape(n, -1), AX)):
        by_vmap = funcdp.vmap(c, axis_name=AX)(x)
        by_pmap = funcdp.pmap(c, axis_name=AX, devices=funcdp.local_devices()[:n])(x)
        assert torch.equal(by_vmap, by_pmap.to_tensor())


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float8_e4m3fn,
                                   torch.uint16, torch.bool])
def test_unmapped_values_keep_their_bits_and_dtypes(dtype):
    # Broadcasting an unmapped value along the axis (see above) keeps -0.0 (adding +0.0
    # made it +0.0) and works for dtypes without an addition kernel (float8, uint16).
    w = torch.tensor([-0.0, 1.0, 2.0]).to(dtype)
    m = torch.zeros(3)
    ops = [lambda w: funcdp.all_gather(w, AX), lambda w: funcdp.pbroadcast(w, AX, 1),
           lambda w: funcdp.ppermute(w, AX, [(0, 1), (1, 2), (2, 0)])]
    if dtype in (torch.float32, torch.complex64):
        ops.append(lambda w: funcdp.psum(w, AX))
    for op in ops:
        by_vmap = funcdp.vmap(lambda m, w: op(w), in_axes=(0, None), axis_name=AX)(m, w)
        by_pmap = funcdp.pmap(lambda m, w: op(w), in_axes=(0, None), axis_name=AX,
                              devices=funcdp.local_devices()[:3])(m, w).to_tensor()
        assert by_vmap.dtype == dtype
        assert torch.equal(by_vmap.view(torch.uint8), by_pmap.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_integer_psum_over_a_vmap_axis_keeps_its_dtype(dtype):
    x = torch.full((4, 2), 100, dtype=dtype)
    by_vmap = funcdp.vmap(lambda v: funcdp.psum(v, AX), axis_name=AX)(x)
    by_pmap = funcdp.pmap(lambda v: funcdp.psum(v, AX), axis_name=AX)(x).to_tensor()
    assert by_vmap.dtype == by_pmap.dtype == dtype
    assert torch.equal(by_vmap, by_pmap)  # (wrapping around as the devices' sum does)


# ----------------------------------------------------------------- errors
def test_error_unbound_axis_name_outside_and_inside():
    with pytest.raises(NameError, match=r"psum: unbound axis name 'i'; no axis names are bound"):
        funcdp.psum(torch.ones(2), "i")
    with pytest.raises(NameError, match=r"unbound axis name 'j'; bound axis names here: 'i' "
                                        r"\(pmap, size 4\)"):
        funcdp.pmap(lambda v: funcdp.psum(v, "j"), axis_name="i")(torch.ones(4))


@pytest.mark.parametrize("perm, msg", [
    ([(0, 1), (0, 2)], "uses source 0 more than once"),
    ([(0, 1), (2, 1)], "uses destination 1 more than once"),
    ([(0, 4)], "destination 4, out of range for axis size 4"),
    ([(0,)], "list of \\(source, destination\\) pairs"),
    ([(0.5, 1)], "pairs of ints, got \\[\\(0.5, 1\\)\\]"),  # (not truncated to 0)
    ([(True, 1)], "pairs of ints"),
    ([(torch.tensor(True), 1)], "pairs of ints"),
])
def test_error_bad_ppermute_perm(perm, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        funcdp.pmap(lambda v: funcdp.ppermute(v, AX, perm), axis_name=AX)(torch.ones(4))


def test_error_bad_pshuffle_perm():
    with pytest.raises(ValueError, match=r"is not a permutation of range\(4\)"):
        funcdp.pmap(lambda v: funcdp.pshuffle(v, AX, [0, 0, 1, 2]), axis_name=AX)(torch.ones(4))
    with pytest.raises(TypeError, match=r"`perm` must be a list of ints, got \[1.0, 0, 2, 3\]"):
        funcdp.pmap(lambda v: funcdp.pshuffle(v, AX, [1.0, 0, 2, 3]), axis_name=AX)(
            torch.ones(4))
    # Integers of other types are indices too.
    got = funcdp.vmap(lambda v: funcdp.pshuffle(v, AX, [np.int64(1), torch.tensor(0)]),
                      axis_name=AX)(torch.tensor([5.0, 7.0]))
    assert got.tolist() == [7.0, 5.0]


def test_error_shapes_not_divisible():
    with pytest.raises(ValueError, match=r"has size 3 but must equal the size 4 of axis 'i'"):
        funcdp.pmap(lambda v: funcdp.psum_scatter(v, AX), axis_name=AX)(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"size 6, not divisible by the axis size 4"):
        funcdp.pmap(lambda v: funcdp.psum_scatter(v, AX, tiled=True), axis_name=AX)(
            torch.ones(4, 6))
    with pytest.raises(ValueError,
                       match=r"`split_axis` 0 of the value \(shape \(3,\)\) has size 3"):
        funcdp.pmap(lambda v: funcdp.all_to_all(v, AX, 0, 0), axis_name=AX)(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"not divisible by the axis size 4"):
        funcdp.pmap(lambda v: funcdp.all_to_all(v, AX, 0, 0, tiled=True), axis_name=AX)(
            torch.ones(4, 6))


@pytest.mark.parametrize("groups, msg", [
    ([[0, 1], [1, 2, 3]], "index 1 appears more than once"),
    ([[0, 1], [2]], r"indices \[3\] are in no group"),
    ([[0, 1, 2, 3, 4]], "index 4, out of range for axis size 4"),
    ([[0, 1], []], "empty group"),
])
def test_error_axis_index_groups_not_a_partition(groups, msg):
    with pytest.raises(TypeError, match=r"list of lists of ints, got \[\[0.0, 1\], \[2, 3\]\]"):
        funcdp.pmap(lambda v: funcdp.psum(v, AX, axis_index_groups=[[0.0, 1], [2, 3]]),
                    axis_name=AX)(torch.ones(4))
    with pytest.raises(ValueError, match=msg):
        funcdp.pmap(lambda v: funcdp.psum(v, AX, axis_index_groups=groups), axis_name=AX)(
            torch.ones(4))


def test_error_devices_reach_different_collectives():
    def f(v):
        if int(funcdp.axis_index(AX)) == 1:
            return funcdp.all_gather(v, AX).sum()
        return funcdp.psum(v, AX)

    with pytest.raises(funcdp.CollectiveError) as info:
        funcdp.pmap(f, axis_name=AX)(torch.ones(4))
    msg = str(info.value)
    assert "the devices reached different collectives" in msg
    assert "device 0 (CpuDevice(id=0)): psum(axis_name='i') with values [() float32]" in msg
    assert "device 1 (CpuDevice(id=1)): all_gather(axis_name='i', axis=0" in msg


def test_error_device_finishes_while_others_wait_is_fast():
    def f(v):
        if int(funcdp.axis_index(AX)) == 3:
            return v
        return funcdp.psum(v, AX)

    start = time.monotonic()
    with funcdp.config.override(collective_timeout=60):
        with pytest.raises(funcdp.CollectiveError) as info:
            funcdp.pmap(f, axis_name=AX)(torch.ones(4))
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "already finished" in msg
    assert "device 3 (CpuDevice(id=3)) finished the function" in msg
    # Which of the others have reached the psum when the error fires depends on timing.
    assert "is waiting in psum(axis_name='i')" in msg


def test_error_deadlock_between_different_groups_is_detected():
    def f(v):
        i = int(funcdp.axis_index(AX))
        # Device 0 waits for 1, 1 for 2, 2 for 3 and 3 for 0: nobody can complete.
        groups = [[0, 1], [2, 3]] if i % 2 == 0 else [[0, 3], [1, 2]]
        return funcdp.psum(v, AX, axis_index_groups=groups)

    start = time.monotonic()
    with funcdp.config.override(collective_timeout=60):
        with pytest.raises(funcdp.CollectiveError, match="none can proceed"):
            funcdp.pmap(f, axis_name=AX)(torch.ones(4))
    assert time.monotonic() - start < 10


def test_error_timeout_when_a_device_is_stuck_outside_collectives():
    def f(v):
        if int(funcdp.axis_index(AX)) == 0:
            time.sleep(1.5)
        return funcdp.psum(v, AX)

    with funcdp.config.override(collective_timeout=0.3):
        with pytest.raises(funcdp.CollectiveError, match="timed out after 0.3 s"):
            funcdp.pmap(f, axis_name=AX)(torch.ones(2))
    out = funcdp.pmap(lambda v: funcdp.psum(v, AX), axis_name=AX)(torch.ones(2))
    assert out.to_tensor().tolist() == [2.0, 2.0]


def test_error_mismatched_shapes_across_devices():
    def f(v):
        i = int(funcdp.axis_index(AX))
        return funcdp.psum(v[: 1 + (i == 1)], AX)

    with pytest.raises(funcdp.CollectiveError, match=r"device 1 \(CpuDevice\(id=1\)\): "
                                                      r"psum\(axis_name='i'\) with values "
                                                      r"\[\(2,\) float32\]"):
        funcdp.pmap(f, axis_name=AX)(torch.ones(2, 2))


@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    transposed=st.lists(st.booleans(), min_size=6, max_size=6),
    n=st.integers(2, 4),
    op=st.sampled_from(["psum", "pmean", "pmax", "pmin"]),
    seed=st.integers(0, 2**16),
)
def test_large_reductions_split_between_devices(sizes, transposed, n, op, seed):
    # Pytrees above a size threshold are reduced in parallel, each device computing a
    # contiguous range of the flattened leaves (whole leaves at once, slices at the edges).
    # Lower the threshold so that small trees take that path; leaves of 0 to 40 rows.
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for k, rows in enumerate(sizes):
        x = _rand((n, rows, 3), torch.float64, gen)
        leaves.append(x.transpose(1, 2) if transposed[k] else x)  # non-contiguous shards
    fn = getattr(funcdp, op)
    ref = {"psum": lambda x: x.sum(0), "pmean": lambda x: x.mean(0),
           "pmax": lambda x: x.amax(0), "pmin": lambda x: x.amin(0)}[op]
    old = collectives._PARALLEL_MIN_NUMEL
    collectives._PARALLEL_MIN_NUMEL = 1
    try:
        out = funcdp.pmap(lambda *xs: fn(list(xs), AX), axis_name=AX,
                          devices=funcdp.local_devices()[:n])(*leaves)
    finally:
        collectives._PARALLEL_MIN_NUMEL = old
    for got, x in zip(out, leaves):
        want = ref(x)
        for i in range(n):
            assert torch.equal(got.to_tensor()[i], want)


@given(
    sizes=st.lists(st.integers(0, 6000), min_size=1, max_size=8),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float64, torch.int64]),
                    min_size=8, max_size=8),
    n=st.integers(2, 4),
    op=st.sampled_from(["psum", "pmean"]),
    seed=st.integers(0, 2**16),
)
def test_split_reductions_match_a_sequential_sum_bit_for_bit(sizes, dtypes, n, op, seed):
    # Each device sums its range of the leaves; its small whole leaves together, one
    # multi-tensor kernel per step. The result must be the sum in device order, then the
    # division of pmean (a multiplication by 1/n where that is exact), to the bit: with
    # real-valued floats (not small integers), any other order or rounding shows.
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for k, numel in enumerate(sizes):
        dt = dtypes[k] if op == "psum" else (torch.float64 if k % 2 else torch.float32)
        leaves.append(torch.randn(n, numel, generator=gen).to(dt) if dt.is_floating_point
                      else torch.randint(-100, 100, (n, numel), generator=gen))
    old = collectives._PARALLEL_MIN_NUMEL
    collectives._PARALLEL_MIN_NUMEL = 1
    try:
        out = funcdp.pmap(lambda *xs: getattr(funcdp, op)(list(xs), AX), axis_name=AX,
                          devices=funcdp.local_devices()[:n])(*leaves)
    finally:
        collectives._PARALLEL_MIN_NUMEL = old
    for got, x in zip(out, leaves):
        want = x[0] + x[1]
        for i in range(2, n):
            want = want + x[i]
        if op == "pmean":
            want = want * (1.0 / n) if n & (n - 1) == 0 else want / n
        for i in range(n):
            assert got.to_tensor()[i].dtype == want.dtype
            assert torch.equal(got.to_tensor()[i], want)
