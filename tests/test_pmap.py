"""pmap against the single-device reference: apply f to each slice, stack the results."""

from __future__ import annotations

import dataclasses
import re

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.utils._pytree as pt
from helpers import assert_trees_close
from hypothesis import given
from strategies import device_layout, mapped_tensor, take, unmapped_tensor
from torch import nn
from torch.func import grad, vmap

import funcdp


def loop_reference(f, args, in_axes, out_axes, n):
    """``stack([f(slice_i(args)) for i in range(n)])`` along each output's out axis."""
    leaves, spec = pt.tree_flatten(args)
    axes = pt._broadcast_to_and_flatten(in_axes, spec)
    assert axes is not None and len(axes) == len(leaves)
    outs = []
    for i in range(n):
        sliced = [take(x, a, i) for x, a in zip(leaves, axes)]
        outs.append(f(*pt.tree_unflatten(sliced, spec)))
    out_leaves = [pt.tree_flatten(o)[0] for o in outs]
    o_spec = pt.tree_flatten(outs[0])[1]
    o_axes = pt._broadcast_to_and_flatten(out_axes, o_spec)
    res = []
    for j, ax in enumerate(o_axes):
        col = [o[j] for o in out_leaves]
        res.append(col[0] if ax is None else torch.stack(col, ax))
    return pt.tree_unflatten(res, o_spec)


@st.composite
def pmap_case(draw):
    n, devs = draw(device_layout())
    nargs = draw(st.integers(1, 3))
    args, in_axes = [], []
    for _ in range(nargs):
        kind = draw(st.sampled_from(["mapped", "unmapped", "dict"]))
        if kind == "mapped":
            x, a = draw(mapped_tensor(n))
            args.append(x)
            in_axes.append(a)
        elif kind == "unmapped":
            args.append(draw(unmapped_tensor()))
            in_axes.append(None)
        else:
            (x, a), (y, b) = draw(mapped_tensor(n)), draw(mapped_tensor(n))
            args.append({"x": x, "y": y})
            in_axes.append({"x": a, "y": b})
    if all(a is None for a in in_axes):
        x, a = draw(mapped_tensor(n))
        args.append(x)
        in_axes.append(a)
    out_axis = draw(st.sampled_from([0, -1]))
    return n, devs, tuple(args), tuple(in_axes), out_axis


def mirror(*args):
    """Shape-preserving ops plus a reduction, so every device's slice matters."""
    leaves = pt.tree_leaves(args)
    s = sum(x.sum().double() for x in leaves)
    return pt.tree_map(lambda x: torch.sin(x) * 2 + s.to(x.dtype), args)


@given(pmap_case())
def test_pmap_matches_loop_reference(case):
    n, devs, args, in_axes, out_axis = case
    out = funcdp.pmap(mirror, in_axes=in_axes, out_axes=out_axis, devices=devs)(*args)
    ref = loop_reference(mirror, args, in_axes, out_axis, n)
    assert_trees_close(out, ref)


@given(pmap_case())
def test_pmap_out_axes_none_for_replicated_values(case):
    n, devs, args, in_axes, out_axis = case

    def f(*a):
        unmapped = [x for x, ax in zip(a, in_axes) if ax is None]
        return mirror(*a), [u * 3 for u in unmapped]

    out = funcdp.pmap(f, in_axes=in_axes, out_axes=(out_axis, None), devices=devs)(*args)
    ref = loop_reference(f, args, in_axes, (pt.tree_map(lambda _: out_axis, args),
                                            [None] * sum(a is None for a in in_axes)), n)
    assert_trees_close(out, ref)


@given(device_layout(), st.integers(1, 3), st.integers(1, 4))
def test_grad_and_vmap_inside_pmap(layout, b, d):
    n, devs = layout
    x = torch.randn(n, b, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64)

    def f(x, w):
        g = grad(lambda w: torch.tanh(x @ w).sum())(w)
        rows = vmap(lambda r: (r * w).sum())(x)
        return g, rows

    out = funcdp.pmap(f, in_axes=(0, None), devices=devs)(x, w)
    ref = loop_reference(f, (x, w), (0, None), (0, 0), n)
    assert_trees_close(out, ref)


def test_keyword_arguments_are_mapped_on_axis_0():
    x = torch.randn(4, 3)
    y = torch.randn(4, 3)
    out = funcdp.pmap(lambda x, *, y: x * y, in_axes=0)(x, y=y)
    assert_trees_close(out, x * y)


def test_python_values_are_broadcast_with_in_axes_none():
    out = funcdp.pmap(lambda x, s, flag: x * s if flag else x, in_axes=(0, None, None))(
        torch.ones(3, 2), 2.5, True)
    assert_trees_close(out, torch.full((3, 2), 2.5))


def test_numpy_inputs_are_accepted():
    out = funcdp.pmap(lambda x: x + 1)(np.arange(4.0))
    assert_trees_close(out, torch.arange(4.0, dtype=torch.float64) + 1)


def test_fewer_shards_than_devices_uses_the_first_devices():
    out = funcdp.pmap(lambda x: x * 2)(torch.arange(3.0))
    assert out.devices == tuple(funcdp.local_devices()[:3])
    assert_trees_close(out, torch.arange(3.0) * 2)


def test_more_shards_than_devices_equals_pmap_over_that_many_devices():
    x = torch.randn(8, 5, dtype=torch.float64)

    def f(v):
        return v - funcdp.pmean(v, "i"), funcdp.axis_index("i"), funcdp.all_gather(v, "i")

    full = funcdp.pmap(f, axis_name="i")(x)
    for d in (1, 2, 4):
        part = funcdp.pmap(f, axis_name="i", devices=funcdp.local_devices()[:d])(x)
        assert_trees_close(part, full)
        assert part[0].block == 8 // d


def test_static_broadcasted_argnums_select_cache_entries():
    calls = []

    def f(x, k, mode):
        calls.append(k)
        return x * k if mode == "mul" else x + k

    pf = funcdp.pmap(f, static_broadcasted_argnums=(1, 2))
    x = torch.arange(4.0)
    assert_trees_close(pf(x, 3, "mul"), x * 3)
    assert_trees_close(pf(x, 3, "add"), x + 3)
    assert_trees_close(pf(x, 3, "mul"), x * 3)
    assert len(pf._cache) == 2


def test_plan_cache_is_hit_for_repeated_calls(monkeypatch):
    from funcdp._src import pmap as pmap_mod

    built = []
    orig = pmap_mod._Plan.__init__

    def counting(self, *a, **k):
        built.append(1)
        orig(self, *a, **k)

    monkeypatch.setattr(pmap_mod._Plan, "__init__", counting)
    pf = funcdp.pmap(lambda x, y: x + y)
    for _ in range(5):
        pf(torch.ones(4, 3), torch.ones(4, 3))
    assert len(built) == 1
    pf(torch.ones(4, 2), torch.ones(4, 2))
    assert len(built) == 2
    # Plain tensors skip the pytree flattening; a tensor subclass is flattened: the same
    # arguments' structure and signature, so the same plan.
    pf(torch.ones(4, 2), nn.Parameter(torch.ones(4, 2), requires_grad=False))
    assert len(built) == 2


def test_sharded_arguments_of_one_layout_share_a_plan():
    # A sharded value's layout (devices, axis, block, shape) is one object in plan keys:
    # values of the same layout find the same plan, through the fast path and through the
    # pytree one (keyword arguments), and another layout gets a plan of its own.
    devs = funcdp.local_devices()[:2]
    place = funcdp.pmap(lambda v: v, devices=devs)
    f = funcdp.pmap(lambda v: v * 2, devices=devs)
    a, b = place(torch.zeros(2, 3)), place(torch.arange(6.0).reshape(2, 3))
    f(a)
    assert_trees_close(f(b).to_tensor(), torch.arange(6.0).reshape(2, 3) * 2)
    assert len(f._cache) == 1
    g = funcdp.pmap(lambda v=None: v * 2, devices=devs)
    g(v=a)
    g(v=b)
    assert len(g._cache) == 1
    x = torch.arange(4.0).reshape(2, 2)
    c = funcdp.pmap(lambda v: v, out_axes=1, devices=devs)(x)  # axis 1: x transposed
    assert_trees_close(f(c).to_tensor(), x.t() * 2)
    assert len(f._cache) == 2
    d = place(torch.zeros(2, 4))  # another shape
    f(d)
    assert len(f._cache) == 3


@given(device_layout(), st.integers(1, 3), st.sampled_from([0, 1, -1, -2, None]),
       st.sampled_from(["tensor", "sharded", "subclass", "keyword"]))
def test_single_tensor_outputs_for_every_input_form(layout, d, out_axes, form):
    n, devs = layout
    x = torch.randn(n, 2, d, dtype=torch.float64)

    def f(v):
        return torch.cos(v) * 3 if out_axes is not None else funcdp.pmean(v, "i")

    pf = funcdp.pmap(f, axis_name="i", out_axes=out_axes, devices=devs)
    if form == "keyword":
        out = pf(v=x)
    else:
        arg = {"tensor": x, "sharded": funcdp.pmap(lambda v: v, devices=devs)(x),
               "subclass": nn.Parameter(x, requires_grad=False)}[form]
        out = pf(arg)
    ref = x.mean(0) if out_axes is None else torch.stack([f(r) for r in x], out_axes)
    assert_trees_close(torch.as_tensor(out), ref)


def test_decorator_forms_and_wrapped():
    @funcdp.pmap
    def double(x):
        """Doubles."""
        return 2 * x

    @funcdp.pmap(axis_name="i")
    def total(x):
        return funcdp.psum(x, "i")

    assert double.__wrapped__.__doc__ == "Doubles."
    assert double.__name__ == "double"
    assert_trees_close(double(torch.ones(2)), torch.full((2,), 2.0))
    assert_trees_close(total(torch.ones(4)), torch.full((4,), 4.0))


def test_pmap_on_a_method_passes_the_instance_unmapped():
    class Scaler:
        def __init__(self, s):
            self.s = s

        @funcdp.pmap
        def scale(self, x):
            return x * self.s

    assert_trees_close(Scaler(3.0).scale(torch.ones(4)), torch.full((4,), 3.0))


def test_sharded_outputs_fed_back_move_no_data():
    x = torch.randn(4, 1000)
    first = funcdp.pmap(lambda v: v * 2)(x)
    seen = {}

    def record(v):
        seen[int(funcdp.axis_index("i"))] = v.data_ptr()
        return v + 1

    second = funcdp.pmap(record, axis_name="i")(first)
    assert seen == {i: first.shards[i].data_ptr() for i in range(4)}
    assert_trees_close(second, x * 2 + 1)


def test_replicated_inputs_share_storage_on_cpu():
    w = torch.randn(100)
    rep = funcdp.replicate(w)
    assert all(s.data_ptr() == w.data_ptr() for s in rep.shards)
    ptrs = {}

    def f(w, x):
        ptrs[int(funcdp.axis_index("i"))] = w.data_ptr()
        return (w * x).sum()

    funcdp.pmap(f, axis_name="i")(rep, torch.randn(funcdp.local_device_count(), 100))
    assert set(ptrs.values()) == {w.data_ptr()}


def test_thread_state_is_carried_into_workers():
    def probe(x):
        return torch.tensor([torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                             torch.is_autocast_enabled("cpu")])

    pf = funcdp.pmap(probe)
    x = torch.zeros(4)
    assert pf(x).to_tensor().tolist() == [[True, False, False]] * 4
    with torch.no_grad():
        assert pf(x).to_tensor().tolist() == [[False, False, False]] * 4
    with torch.inference_mode():
        assert pf(x).to_tensor().tolist() == [[False, True, False]] * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = funcdp.pmap(lambda a, b: a @ b)(torch.randn(4, 2, 3), torch.randn(4, 3, 2))
        assert out.dtype == torch.bfloat16
        assert pf(x).to_tensor().tolist() == [[True, False, True]] * 4


def test_data_parallel_gradient_equals_full_batch_gradient_float64():
    torch.manual_seed(1)
    w = torch.randn(6, dtype=torch.float64)
    x = torch.randn(4, 16, 6, dtype=torch.float64)
    y = torch.randn(4, 16, dtype=torch.float64)

    def loss(w, x, y):
        return ((torch.tanh(x @ w) - y) ** 2).mean()

    per_device = funcdp.pmap(grad(loss), in_axes=(None, 0, 0))(w, x, y)
    averaged = per_device.to_tensor().mean(0)
    full = grad(loss)(w, x.reshape(64, 6), y.reshape(64))
    torch.testing.assert_close(averaged, full, rtol=1e-12, atol=1e-14)


def test_exception_on_one_device_names_it_and_pool_recovers():
    def f(x):
        if int(funcdp.axis_index("i")) == 2:
            raise ValueError("bad shard")
        return x + 1

    pf = funcdp.pmap(f, axis_name="i")
    with pytest.raises(ValueError, match=r"device 2 \(CpuDevice\(id=2\)\).*bad shard") as info:
        pf(torch.zeros(4))
    assert isinstance(info.value.__cause__, ValueError)
    assert_trees_close(funcdp.pmap(lambda x: x + 1)(torch.zeros(4)), torch.ones(4))


def test_exception_while_others_wait_in_a_collective_is_reported_not_hung():
    def f(x):
        if int(funcdp.axis_index("i")) == 1:
            raise KeyError("boom")
        return funcdp.psum(x, "i")

    with funcdp.config.override(collective_timeout=30):
        with pytest.raises(KeyError, match="device 1"):
            funcdp.pmap(f, axis_name="i")(torch.zeros(4))
    assert_trees_close(funcdp.pmap(lambda x: funcdp.psum(x, "i"), axis_name="i")(
        torch.ones(4)), torch.full((4,), 4.0))


# --------------------------------------------------------------------------- errors
def test_error_inconsistent_mapped_sizes_lists_every_argument():
    with pytest.raises(ValueError) as info:
        funcdp.pmap(lambda a, b: a)({"u": torch.ones(3), "v": torch.ones(4)}, torch.ones(3))
    msg = str(info.value)
    assert "disagree on the mapped size" in msg
    assert "args[0]['u']: size 3" in msg
    assert "args[0]['v']: size 4" in msg
    assert "args[1]: size 3" in msg


def test_error_mapped_axis_out_of_range():
    with pytest.raises(ValueError, match=r"mapped axis 2 is out of range for argument "
                                         r"args\[0\] of rank 2"):
        funcdp.pmap(lambda a: a, in_axes=2)(torch.ones(2, 2))


def test_error_mapping_a_scalar():
    with pytest.raises(ValueError, match=r"args\[0\] is a scalar"):
        funcdp.pmap(lambda a: a)(torch.tensor(1.0))


def test_error_mapped_size_larger_than_devices_and_not_a_multiple():
    with pytest.raises(ValueError, match=r"mapped size 9 is larger than the 8 available "
                                         r"devices and not a multiple of 8"):
        funcdp.pmap(lambda a: a)(torch.ones(9))
    with pytest.raises(ValueError, match=r"mapped size 3 does not fit the 2 devices"):
        funcdp.pmap(lambda a: a, devices=funcdp.local_devices()[:2])(torch.ones(3))


def test_error_in_axes_structure_mismatch():
    with pytest.raises(ValueError, match=r"`in_axes` .* does not match the structure of the "
                                         r"arguments at args\[0\]: the prefix has a dict"):
        funcdp.pmap(lambda a: a, in_axes=({"x": 0, "z": 0},))({"x": torch.ones(2),
                                                               "y": torch.ones(2)})
    with pytest.raises(ValueError, match=r"`in_axes` has one entry per positional argument, "
                                         r"2 here, but the function was called with 1 "
                                         r"positional argument "):
        funcdp.pmap(lambda a: a, in_axes=(0, 0))(torch.ones(2))


@pytest.mark.parametrize("bad", [0.0, "a", (0, 1.5), {"x": "0"}, True])
def test_error_non_int_in_axes_leaf(bad):
    with pytest.raises(TypeError, match=r"`in_axes`.*must be an int"):
        funcdp.pmap(lambda a: a, in_axes=bad)


def test_error_out_axes_leaf_and_structure():
    with pytest.raises(TypeError, match=r"`out_axes`"):
        funcdp.pmap(lambda a: a, out_axes=[0, "x"])
    with pytest.raises(ValueError, match=r"`out_axes` \(0, 0\) does not match the structure of "
                                         r"the output"):
        funcdp.pmap(lambda a: a, out_axes=(0, 0))(torch.ones(2))


def test_error_out_axes_out_of_range_for_an_output_on_every_call():
    # The axis checks are worked out once per output structure; a later call whose output
    # has another rank (the same structure) is checked again, as are calls run in the
    # calling thread (after a plan's first small calls).
    devs = funcdp.local_devices()[:2]
    f = funcdp.pmap(lambda v: v if v.ndim > 1 else v + 1, out_axes=2, devices=devs)
    assert f(torch.zeros(2, 3, 4)).shape == (3, 4, 2)
    for _ in range(5):
        with pytest.raises(ValueError, match=r"out_axes entry 2 is out of range for the output "
                                             r"of rank 1; valid axes are -2\.\.1"):
            f(torch.zeros(2, 3))
    g = funcdp.pmap(lambda v: (v, v.sum()), out_axes=(1, -2), devices=devs)
    for _ in range(5):
        with pytest.raises(ValueError, match=r"out_axes entry -2 is out of range for output\[1\] "
                                             r"of rank 0"):
            g(torch.zeros(2, 3))
    h = funcdp.pmap(lambda v: (v, v.sum()), out_axes=(-2, -1), devices=devs)
    for _ in range(5):
        a, b = h(torch.arange(6.0).reshape(2, 3))
        assert a.shape == (2, 3) and b.shape == (2,)
    assert_trees_close(b.to_tensor(), torch.tensor([3.0, 12.0]))


def test_plans_and_layouts_kept_are_bounded(monkeypatch):
    # A function called with ever new shapes keeps the newest plans only (and the global
    # table of sharded layouts its newest entries); a dropped plan is made again.
    from funcdp._src import pmap as pmap_mod

    monkeypatch.setattr(pmap_mod, "_MAX_CACHED", 3)
    monkeypatch.setattr(pmap_mod, "_LAYOUTS", {})
    f = funcdp.pmap(lambda v: v * 2, devices=funcdp.local_devices()[:2])
    outs = [f(torch.ones(2, n)) for n in range(1, 6)]
    assert len(f._cache) == 3
    assert [out.shape for out in outs] == [(2, n) for n in range(1, 6)]
    for n, out in enumerate(outs, start=1):  # (sharded inputs of every layout, old ones too)
        assert_trees_close(f(out).to_tensor(), torch.full((2, n), 4.0))
    assert len(f._cache) == 3 and len(pmap_mod._LAYOUTS) == 3


def test_error_no_mapped_argument():
    with pytest.raises(ValueError, match=r"no argument is mapped \(every in_axes entry is"):
        funcdp.pmap(lambda a: a, in_axes=None)(torch.ones(2))
    # (Not "every in_axes entry is None" where there is no argument at all.)
    with pytest.raises(ValueError, match=r"no argument is mapped \(it was called with no "
                                         r"arguments to map\)"):
        funcdp.pmap(lambda: 1)()
    with pytest.raises(ValueError, match=r"with no arguments to map besides its static ones"):
        funcdp.pmap(lambda k: k, static_broadcasted_argnums=0)(3)


def test_error_mapping_a_non_tensor():
    with pytest.raises(TypeError, match=r"argument args\[1\] is a str mapped over axis 0"):
        funcdp.pmap(lambda a, b: a)(torch.ones(2), "x")


def test_error_static_argument_not_hashable_or_missing():
    pf = funcdp.pmap(lambda x, k: x, static_broadcasted_argnums=1)
    with pytest.raises(ValueError, match=r"static argument 1 .* must be hashable, got list"):
        pf(torch.ones(2), [1, 2])
    with pytest.raises(ValueError, match=r"got ndarray: .*; make it a regular"):  # (no "list")
        pf(torch.ones(2), np.ones(2))
    with pytest.raises(ValueError, match=r"names argument 1 but the function was called with 1"):
        pf(torch.ones(2))
    with pytest.raises(TypeError, match="static_broadcasted_argnums"):
        funcdp.pmap(lambda x: x, static_broadcasted_argnums="1")


def test_error_empty_or_invalid_devices():
    with pytest.raises(ValueError, match="`devices` is empty"):
        funcdp.pmap(lambda a: a, devices=[])
    with pytest.raises(TypeError, match="`devices` must hold funcdp devices"):
        funcdp.pmap(lambda a: a, devices=[torch.device("cpu")])
    d = funcdp.local_devices()[0]
    with pytest.raises(ValueError, match="more than once"):
        funcdp.pmap(lambda a: a, devices=[d, d])
    # One device, or a count ('Device' object is not iterable, 'int' object is not ...).
    with pytest.raises(TypeError, match=r"got a Device: .*pass it in a list: devices=\[device\]"):
        funcdp.pmap(lambda a: a, devices=d)
    with pytest.raises(TypeError, match=r"devices=funcdp.local_devices\(\)\[:2\]\.$"):
        funcdp.pmap(lambda a: a, devices=2)


def test_error_axis_size_mismatch():
    with pytest.raises(ValueError, match=r"`axis_size`=3 but the mapped arguments have size 4"):
        funcdp.pmap(lambda a: a, axis_size=3)(torch.ones(4))


def test_error_out_axes_none_on_a_differing_value():
    with pytest.raises(ValueError, match=r"out_axes=None for the output, but its value "
                                         r"differs across devices \(device 0 \(CpuDevice\(id=0\)\) "
                                         r"vs device 1 \(CpuDevice\(id=1\)\)"):
        funcdp.pmap(lambda a: a, out_axes=None)(torch.arange(4.0))
    with funcdp.config.override(check_replicated=False):
        assert_trees_close(funcdp.pmap(lambda a: a, out_axes=None)(torch.arange(4.0)),
                           torch.tensor(0.0))
    # Only the dtype differs (it said "shape () vs ()").
    f = funcdp.pmap(lambda a: a.double() if int(funcdp.axis_index("i")) else a.sum(),
                    axis_name="i", out_axes=None, devices=funcdp.local_devices()[:2])
    with pytest.raises(ValueError, match=r"dtype torch.float32 vs torch.float64\)"):
        f(torch.zeros(2))


def test_error_out_axes_none_within_a_block():
    with pytest.raises(ValueError, match=r"differs across devices \(shard 0 vs shard 1"):
        funcdp.pmap(lambda a: a, out_axes=None, devices=funcdp.local_devices()[:2])(
            torch.arange(4.0))
    # Reported as an error of the call (not "caught on device 2"), with the call's shard
    # numbers: device 2 of 4 holds shards 4 and 5.
    x = torch.tensor([0.0, 0, 0, 0, 1, 2, 0, 0])
    with pytest.raises(ValueError, match=r"^pmap\([\w.<>]+\): out_axes=None for the output, "
                                         r"but its value differs across devices \(shard 4 "
                                         r"vs shard 5"):
        funcdp.pmap(lambda a: a, out_axes=None, devices=funcdp.local_devices()[:4])(x)


def test_error_devices_return_different_structures():
    def f(x):
        return (x,) if int(funcdp.axis_index("i")) == 0 else [x]

    with pytest.raises(ValueError, match="differently structured outputs"):
        funcdp.pmap(f, axis_name="i")(torch.ones(2))


def test_error_output_requires_grad_from_a_closure():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="closes over tensors that require grad"):
        funcdp.pmap(lambda x: x * w)(torch.ones(2, 3))


def test_error_fun_not_callable():
    with pytest.raises(TypeError, match=re.escape("@pmap(axis_name=...)")):
        funcdp.pmap("i")


def test_none_arguments_numpy_with_negative_strides_and_scalar_keywords():
    f = funcdp.pmap(lambda x, mask=None: x * 2 if mask is None else x * mask)
    assert torch.equal(f(torch.ones(4), mask=None).to_tensor(), torch.full((4,), 2.0))
    g = funcdp.pmap(lambda x, m: x if m is None else m)
    assert torch.equal(g(torch.ones(4), None).to_tensor(), torch.ones(4))
    rev = np.arange(4.0)[::-1]  # negative strides: copied (torch has none)
    assert funcdp.pmap(lambda x: x + 1)(rev).to_tensor().tolist() == [4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"kwargs\['mask'\] is a scalar \(rank 0\) and cannot "
                                         r"be mapped: keyword arguments are always mapped"):
        f(torch.ones(4), mask=torch.tensor(1.0))


@pytest.mark.parametrize("write", [None, "add_", "copy_", "view"])
def test_replicated_copies_of_a_collective_result_are_not_compared(devices, monkeypatch,
                                                                  write):
    # Small collective results are copied for each device; after a plan's first calls,
    # out_axes=None recognises those copies (unchanged since) without comparing them. A
    # copy written in place on one device is compared, and caught, on every call.
    from funcdp._src import pmap as pmap_mod

    compared = []
    same_bits = pmap_mod._same_bits
    monkeypatch.setattr(pmap_mod, "_same_bits",
                        lambda a, b: compared.append(1) or same_bits(a, b))

    def f(x):
        y = funcdp.pmean(x, "i")
        if write is not None and int(funcdp.axis_index("i")) == 1:
            if write == "add_":
                y.add_(1)
            elif write == "copy_":
                y.copy_(torch.zeros_like(y))
            else:
                y[0] += 1  # through a view: the same version counter
        return y, y * 2  # (y * 2: computed per device, always compared)

    f = funcdp.pmap(f, axis_name="i", out_axes=None, devices=devices[:2])
    x = torch.arange(6.0).reshape(2, 3)
    for call in range(5):
        compared.clear()
        if write is None:
            y, y2 = f(x)
            assert torch.equal(y, x.mean(0)) and torch.equal(y2, 2 * x.mean(0))
            # Full comparisons on the first calls (two), then only the per-device value.
            assert len(compared) == (2 if call < 2 else 1), (call, len(compared))
        else:
            with pytest.raises(ValueError, match=r"out_axes=None for output\[0\], but its value "
                                                 "differs across devices"):
                f(x)


def test_small_collective_results_under_inference_mode_and_in_loops(devices):
    # Found in review: noting the per-device copies read the version counter of inference
    # tensors (which have none), and kept every copy of a call alive until its end.
    import weakref

    f = funcdp.pmap(lambda x: funcdp.pmean(x, "i"), axis_name="i", out_axes=None,
                    devices=devices[:2])
    x = torch.arange(6.0).reshape(2, 3)
    with torch.inference_mode():
        for _ in range(4):
            assert torch.equal(f(x), x.mean(0))
            assert torch.equal(f(x.repeat(1, 2000)), x.repeat(1, 2000).mean(0))

    def loop(x):
        refs = []
        for _ in range(20):
            x = funcdp.pmean(x * 0.5, "i")
            refs.append(weakref.ref(x))
        return x, torch.tensor(sum(r() is not None for r in refs))

    y, alive = funcdp.pmap(loop, axis_name="i", out_axes=(None, 0), devices=devices[:2])(x)
    assert alive.tolist() == [1, 1]


def test_errors_name_an_output_leaf_by_its_path():
    # An output leaf is named as indexing into the output, not by its position among the
    # flattened leaves.
    devs = funcdp.local_devices()[:2]
    x = torch.arange(4.0).reshape(2, 2)

    def f(a):
        return {"loss": funcdp.pmean(a.sum(), "i"), "parts": [a, a * 2]}

    with pytest.raises(ValueError, match=r"out_axes=None for output\['parts'\]\[0\], but its "
                                         r"value differs across devices"):
        funcdp.pmap(f, axis_name="i", out_axes=None, devices=devs)(x)
    with pytest.raises(ValueError, match=r"out_axes entry 3 is out of range for "
                                         r"output\['parts'\]\[1\] of rank 1"):
        funcdp.pmap(f, axis_name="i", out_axes={"loss": None, "parts": [0, 3]},
                    devices=devs)(x)
    with pytest.raises(TypeError, match=r"output\['parts'\]\[1\] is a str; pmapped functions "
                                        r"must return pytrees of tensors"):
        funcdp.pmap(lambda a: {"loss": a.sum(), "parts": [a, "b"]}, devices=devs)(x)
    with pytest.raises(TypeError, match=r"\): the output is a str; pmapped"):
        funcdp.pmap(lambda a: "b", devices=devs)(x)
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"\): output\['parts'\]\[1\] requires grad but no "
                                           r"argument of the call does"):
        funcdp.pmap(lambda a: {"loss": a.sum(), "parts": [a, a * w]}, devices=devs)(x)


@pytest.mark.parametrize("ndev", [2, 4])
def test_error_out_axes_out_of_range_with_more_shards_than_devices(ndev):
    # Each device runs several shards (a vmap over its block): the error is about the
    # call's out_axes, reported as it is (it was "caught on device 0", naming "an output").
    f = funcdp.pmap(lambda a: {"a": a, "b": a.sum()}, out_axes={"a": 0, "b": 2},
                    devices=funcdp.local_devices()[:ndev // 2])
    with pytest.raises(ValueError, match=r"^pmap\([\w.<>]+\): out_axes entry 2 is out of range "
                                         r"for output\['b'\] of rank 0; valid axes are "
                                         r"-1\.\.0\.$"):
        f(torch.ones(ndev, 3))


@pytest.mark.parametrize("none_on", [0, 1])
@pytest.mark.parametrize("grad", [False, True])
def test_error_output_none_on_some_devices_only(none_on, grad):
    # None is a leaf of the output's structure: the structures compare equal, so the
    # leaves themselves must be checked (the result was a silently dropped tensor, or an
    # AttributeError).
    devs = funcdp.local_devices()[:2]
    f = funcdp.pmap(lambda a: (a, None if int(funcdp.axis_index("i")) == none_on else a),
                    axis_name="i", devices=devs)
    x = torch.arange(6.).reshape(2, 3).requires_grad_(grad)
    with pytest.raises(ValueError, match=r"differently structured outputs: output\[1\] is "
                                         r"(None|a tensor) on device 0 but (a tensor|None) on "
                                         r"device 1"):
        f(x)


@pytest.mark.parametrize("grad", [False, True])
def test_error_mapped_output_of_different_shapes_or_dtypes(grad):
    devs = funcdp.local_devices()[:2]
    x = torch.arange(2.).requires_grad_(grad)
    with pytest.raises(ValueError, match=r"the output is stacked along its out_axes entry, "
                                         r"but its values differ in shape or dtype across "
                                         r"devices: \(1,\) torch.float32 on device 0, \(2,\) "
                                         r"torch.float32 on device 1"):
        funcdp.pmap(lambda a: torch.ones(2 if a.item() else 1) * a, devices=devs)(x)
    with pytest.raises(ValueError, match=r"\(\) torch.float32 on device 0, \(\) "
                                         r"torch.float64 on device 1"):
        funcdp.pmap(lambda a: a.double() if a.item() else a, devices=devs)(x)


def test_replicated_output_of_other_layouts_on_every_call():
    # Equal values in different memory layouts are equal (the sampled check, after a
    # plan's first calls, compared a sample of one with the whole of the other).
    w = torch.arange(10000.).reshape(100, 100)
    g = funcdp.pmap(lambda a: w.clone() if int(funcdp.axis_index("i")) == 0
                    else w.t().contiguous().t(), axis_name="i", out_axes=None,
                    devices=funcdp.local_devices()[:2])
    for _ in range(5):
        assert torch.equal(g(torch.zeros(2)), w)
    h = funcdp.pmap(lambda a: w.clone() if int(funcdp.axis_index("i")) == 0
                    else w.t().contiguous().t() + 1, axis_name="i", out_axes=None,
                    devices=funcdp.local_devices()[:2])
    for _ in range(5):
        with pytest.raises(ValueError, match="differs across devices"):
            h(torch.zeros(2))


def test_error_mapped_size_zero():
    with pytest.raises(ValueError, match=r"the mapped axis has size 0: every argument mapped "
                                         r"by `in_axes`"):
        funcdp.pmap(lambda a: a)(torch.ones(0, 3))


@dataclasses.dataclass
class _Pair:
    a: torch.Tensor
    b: torch.Tensor


def test_registered_dataclass_in_and_out():
    # torch.utils._pytree.register_dataclass reaches torch's Python pytree library only;
    # funcdp's fast flattening took such an output for a non-tensor leaf (an error).
    pt.register_dataclass(_Pair)
    devs = funcdp.local_devices()[:2]
    x = torch.arange(6.0).reshape(2, 3)
    out = funcdp.pmap(lambda v: _Pair(v, funcdp.psum(v, "i")), axis_name="i",
                      out_axes=_Pair(0, None), devices=devs)(x)
    assert isinstance(out, _Pair)
    assert_trees_close((out.a.to_tensor(), out.b), (x, x.sum(0)))
    back = funcdp.pmap(lambda p: p.a * 2, in_axes=(_Pair(0, None),), devices=devs)(out)
    assert_trees_close(back.to_tensor(), 2 * x)
    g = torch.func.grad(lambda v: funcdp.pmap(lambda w: _Pair(w, w ** 2), devices=devs)(v)
                        .b.sum())(x)
    assert_trees_close(g, 2 * x)
    with pytest.raises(ValueError, match=r"the prefix has a tuple of 2 children where the "
                                         r"value has a _Pair with fields \['a', 'b'\]\."):
        funcdp.pmap(lambda v: _Pair(v, v), out_axes=(0, 0), devices=devs)(x)


class _Keyless:  # registered without key paths (torch's flatten_with_keys_fn)
    def __init__(self, a, b):
        self.a, self.b = a, b


pt.register_pytree_node(_Keyless, lambda o: ([o.a, o.b], None), lambda xs, _: _Keyless(*xs))


def test_prefix_of_a_node_without_key_paths():
    # Matching in_axes/out_axes against such a node needed key paths (torch's "Did not
    # find a flatten_with_keys_fn"); its children are named by number instead.
    devs = funcdp.local_devices()[:2]
    x = torch.arange(6.0).reshape(2, 3)
    out = funcdp.pmap(lambda v: _Keyless(v, funcdp.psum(v, "i")), axis_name="i",
                      out_axes=_Keyless(0, None), devices=devs)(x)
    assert_trees_close((out.a.to_tensor(), out.b), (x, x.sum(0)))
    back = funcdp.pmap(lambda p: p.a + p.b, in_axes=(_Keyless(0, None),), devices=devs)(out)
    assert_trees_close(back.to_tensor(), x + x.sum(0))
    with pytest.raises(ValueError, match=r"out_axes entry 2 is out of range for output\[1\]"):
        funcdp.pmap(lambda v: _Keyless(v, v.sum()), out_axes=_Keyless(0, 2), devices=devs)(x)
