"""ShardedValue, replicate/unreplicate, shard/unshard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_trees_close

import funcdp


def make(n=4, axis=0):
    x = torch.arange(float(n * 3)).reshape(n, 3)
    return funcdp.pmap(lambda v: v * 1, out_axes=axis)(x), x


def test_structure_and_cheap_shard_access():
    out, x = make()
    assert isinstance(out, funcdp.ShardedValue)
    assert out.shape == (4, 3) and out.ndim == 2 and out.dtype == torch.float32
    assert len(out) == 4 and out.axis == 0 and out.block == 1
    assert out.devices == tuple(funcdp.local_devices()[:4])
    assert out[2] is out.shards[2]
    assert_trees_close(out[1:3], x[1:3])
    assert_trees_close(list(out), list(x))


@pytest.mark.parametrize("block", [1, 2])
def test_gathered_value_follows_writes(block):
    # The gathered value is cached; writing into a shard, or into the gathered tensor (a
    # copy, as every gather is), must not leave the cache stale.
    devs = funcdp.local_devices()[:4 // block]
    out = funcdp.pmap(lambda v: v * 1, devices=devs)(torch.arange(12.0).reshape(4, 3))
    first = out.to_tensor()
    assert out.to_tensor() is first  # nothing written: the cached tensor
    out.shards[1].add_(100)
    want = torch.arange(12.0).reshape(4, 3)
    want[block:2 * block] += 100
    assert_trees_close(out.to_tensor(), want)
    out.to_tensor().zero_()
    assert_trees_close(out.to_tensor(), want)
    assert_trees_close(out[1:3], want[1:3])
    with torch.inference_mode():  # (shards without a version counter: cached all the same)
        inf = funcdp.pmap(lambda v: v * 1, devices=devs)(torch.arange(4.0))
        other = funcdp.pmap(lambda v: v * 1, devices=devs)(torch.arange(4.0))
        assert inf.to_tensor() is inf.to_tensor()
    assert inf.to_tensor() is inf.to_tensor()
    other.to_tensor().zero_()  # (gathered outside inference mode: a write torch counts)
    assert_trees_close(other.to_tensor(), torch.arange(4.0))
    normal = funcdp.pmap(lambda v: v * 1, devices=devs)(torch.arange(4.0))
    with torch.inference_mode():  # (normal shards gathered in inference mode, written there)
        normal.to_tensor().div_(2)
    assert_trees_close(normal.to_tensor(), torch.arange(4.0))


@pytest.mark.parametrize("write", [
    lambda x: x.mul_(0), lambda x: x.clamp_(0, 1), lambda x: torch.relu_(x),
    lambda x: torch.nn.functional.relu(x, inplace=True),
    lambda x: torch.add(torch.ones(4, 3), 1, out=x), lambda x: x.__setitem__(0, 1.0),
    lambda x: torch.nn.init.uniform_(x), lambda x: torch.relu_(input=x),
    lambda x: torch._foreach_mul_([x], 2.0),
])
def test_writing_in_place_is_an_error(write):
    # An in-place write would land in the gathered copy and be lost (it was silently).
    out, x = make()
    with pytest.raises(TypeError, match=r"cannot be written in place.*to_tensor\(\)\.clone"):
        write(out)
    assert_trees_close(out.to_tensor(), x)
    t = torch.zeros(4, 3)
    t.add_(out)  # (writing a tensor of one's own, with the value as an operand, is fine)
    assert_trees_close(t, x)
    assert_trees_close(out.mul(2) + torch.relu(out), 3 * x)
    # (Methods named as in-place ones that write no data work on the gathered value.)
    assert hasattr(out, "add_") and out.requires_grad_().requires_grad


def test_bool_index_is_not_a_position():
    # x[True] adds a dimension, as for a tensor (it was shard 1).
    out, x = make()
    for idx in (True, False):
        assert_trees_close(out[idx], x[idx])
    assert out[True].shape == (1, 4, 3) and out[False].shape == (0, 4, 3)


def test_conversions():
    out, x = make()
    assert np.array_equal(np.asarray(out), x.numpy())
    assert_trees_close(out.to_tensor(), x)
    assert out.to_tensor() is out.to_tensor()  # gathered once
    assert out.tolist() == x.tolist()
    assert_trees_close(out.to("cpu", torch.float64), x.double())
    scalar = funcdp.pmap(lambda v: v.sum(), out_axes=0)(torch.ones(1, 2))
    assert float(scalar) == 2.0 and int(scalar) == 2
    assert "ShardedValue(tensor(" in repr(out) and "CpuDevice(id=0)" in repr(out)


def test_behaves_like_a_tensor_in_torch_code():
    out, x = make()
    assert_trees_close(out + 1, x + 1)
    assert_trees_close(2 * out, 2 * x)
    assert_trees_close(torch.mean(out), x.mean())
    assert_trees_close(out.sum(1), x.sum(1))
    assert_trees_close(-out, -x)
    assert bool((out == x).all())


def test_other_out_axis_and_blocks():
    out, x = make(axis=1)
    assert out.shape == (3, 4) and out.axis == 1
    assert_trees_close(out, x.T)
    assert_trees_close(out.shard(2), x[2])
    blk = funcdp.pmap(lambda v: v * 1, devices=funcdp.local_devices()[:2])(x)
    assert blk.block == 2 and blk.shape == (4, 3)
    assert_trees_close(blk[3], x[3])
    assert_trees_close(blk, x)


def test_pickles_as_the_gathered_tensor():
    import io

    out, x = make()
    buf = io.BytesIO()
    torch.save({"v": out}, buf)
    buf.seek(0)
    assert_trees_close(torch.load(buf)["v"], x)


def test_replicate_and_unreplicate():
    tree = {"w": torch.randn(3, 2), "b": [torch.zeros(2)], "n": 3}
    rep = funcdp.replicate(tree)
    assert rep["w"].shape == (8, 3, 2)
    assert all(s.data_ptr() == tree["w"].data_ptr() for s in rep["w"].shards)
    back = funcdp.unreplicate(rep)
    assert back["w"] is tree["w"]
    assert_trees_close(back["n"], torch.tensor(3))
    rep2 = funcdp.replicate(tree, devices=funcdp.local_devices()[:2])
    assert rep2["b"][0].shape == (2, 2)
    assert_trees_close(funcdp.unreplicate(torch.ones(4, 2)), torch.ones(2))


def test_shard_and_unshard():
    x = {"a": torch.arange(16.0).reshape(8, 2), "b": torch.arange(8)}
    s = funcdp.shard(x)
    assert s["a"].shape == (8, 1, 2) and s["b"].shape == (8, 1)
    s4 = funcdp.shard(x, num_devices=4)
    assert s4["a"].shape == (4, 2, 2)
    assert_trees_close(funcdp.unshard(s4), x)
    out = funcdp.pmap(lambda v: v + 1)(funcdp.shard(torch.arange(8.0), num_devices=4))
    assert_trees_close(funcdp.unshard(out), torch.arange(8.0) + 1)


def test_shard_errors():
    with pytest.raises(ValueError, match=r"tree\['a'\] has leading \(batch\) dimension 10, "
                                         r"which is not divisible by the 4 devices"):
        funcdp.shard({"a": torch.ones(10)}, num_devices=4)
    with pytest.raises(ValueError, match="is a scalar"):
        funcdp.shard(torch.tensor(1.0))
    with pytest.raises(ValueError, match="`num_devices` must be a positive int"):
        funcdp.shard(torch.ones(4), num_devices=0)
    with pytest.raises(ValueError, match=r"expected \[devices, batch, \.\.\.\]"):
        funcdp.unshard(torch.ones(4))
    with pytest.raises(ValueError, match="`devices` is empty"):
        funcdp.replicate(torch.ones(2), devices=[])


@pytest.mark.parametrize("batch", [1, 5, 8, 13])
def test_pad_shard_unpad_takes_any_batch_size(batch):
    w = torch.randn(3)
    x = torch.randn(batch, 3)

    @funcdp.pmap(axis_name="i", in_axes=(None, 0), out_axes=(0, None))
    def step(w, x, mask=None):
        per_example = (x * w).sum(-1)
        # A mean over the real examples only: the padding is masked out.
        total = funcdp.psum((per_example * mask).sum(), "i")
        count = funcdp.psum(mask.sum(), "i")
        return per_example, total / count

    per_example, mean = funcdp.pad_shard_unpad(step, with_mask=True, num_devices=4)(w, x)
    assert_trees_close(per_example, (x * w).sum(-1))
    assert_trees_close(mean, (x * w).sum(-1).mean())


def test_pad_shard_unpad_errors_and_static_return():
    f = funcdp.pmap(lambda a, b: a + b)
    with pytest.raises(ValueError, match=r"different leading sizes \[2, 3\]"):
        funcdp.pad_shard_unpad(f, static_argnums=())(torch.ones(2), torch.ones(3))
    out = funcdp.pad_shard_unpad(f, static_argnums=(), static_return=True, num_devices=4)(
        torch.ones(6), torch.ones(6))
    assert out.shape == (4, 2)


def test_prefetch_to_device_yields_sharded_values_in_order():
    batches = [funcdp.shard(torch.full((8, 2), float(i))) for i in range(5)]
    out = list(funcdp.prefetch_to_device(iter(batches), size=2))
    assert [float(b[0][0, 0]) for b in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(isinstance(b, funcdp.ShardedValue) and b.devices == tuple(funcdp.devices())
               for b in out)
    assert out[1].shards[3].data_ptr() == batches[1][3].data_ptr()  # CPU: no copy
    with pytest.raises(ValueError, match="needs a leading dimension of 8"):
        list(funcdp.prefetch_to_device([torch.ones(3, 2)]))
    with pytest.raises(ValueError, match="`size` must be a positive int"):
        list(funcdp.prefetch_to_device([], size=0))


@pytest.mark.parametrize("out_axis", [0, 1, -1])
def test_pad_shard_unpad_under_transforms_and_any_out_axis(out_axis):
    # Which outputs are per device comes from the pmap's out_axes, so outputs under
    # vmap, jvp and grad (plain stacked tensors) are unsharded as well.
    f = funcdp.pad_shard_unpad(funcdp.pmap(
        lambda w, x: (x * w, funcdp.psum((x * w).sum(), "i")), axis_name="i",
        in_axes=(None, 0), out_axes=(out_axis, None)), num_devices=4)
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.tensor(2.0, dtype=torch.float64)
    per_example, total = f(w, x)
    assert_trees_close(per_example, x * w)
    assert_trees_close(total, (x * w).sum())
    xs = torch.randn(2, 5, 3, dtype=torch.float64)
    batched = torch.func.vmap(lambda xx: f(w, xx)[0])(xs)
    assert_trees_close(batched, xs * w)
    _, tangent = torch.func.jvp(lambda ww: f(ww, x), (w,), (torch.ones_like(w),))
    assert_trees_close(tangent, (x, x.sum()))
    g = torch.func.grad(lambda ww: f(ww, x)[0].square().sum())(w)
    assert_trees_close(g, (2 * w * x * x).sum())


def test_pad_shard_unpad_without_a_batch_argument_says_so():
    f = funcdp.pad_shard_unpad(funcdp.pmap(lambda w: w, in_axes=0))
    with pytest.raises(ValueError, match=r"no batch argument: every argument is static "
                                         r"\(static_argnums=\(0,\)"):
        f(torch.ones(4))


def test_shift_operators_and_in_work_as_on_the_gathered_tensor():
    # `<<`, `>>` and their reflected forms were missing (TypeError), and `3 in x` iterated
    # over rows, whose truth value is ambiguous.
    out = funcdp.pmap(lambda v: v * 1)(torch.arange(8).reshape(4, 2))
    t = out.to_tensor()
    assert_trees_close(out << 1, t << 1)
    assert_trees_close(out >> 1, t >> 1)
    assert_trees_close(1 << out, 1 << t)
    assert_trees_close(64 >> out, 64 >> t)
    assert_trees_close(out << out, t << t)
    assert 3 in out and 8 not in out and 3.0 in out
    assert torch.tensor([7]) in out and torch.tensor(9) not in out
    assert out[1] in out and funcdp.replicate(torch.tensor(5))[0] in out
    with pytest.raises(RuntimeError, match="only supports Tensor or scalar"):
        "a" in out  # noqa: B015  (as for a tensor)
    one = funcdp.pmap(lambda v: v * 1)(torch.tensor([1 + 2j]))
    assert complex(one) == 1 + 2j


def test_indexing_a_tensor_with_a_sharded_value_needs_to_tensor():
    # torch treats a short sequence of tensors used as an index as a tuple of indices
    # (x[sv] would be x[sv[0], sv[1]]), and a ShardedValue is a sequence of its shards:
    # docs/concepts.md says to index with x[sv.to_tensor()]. This pins that workaround.
    x = torch.arange(12.0).reshape(4, 3)
    idx = funcdp.pmap(lambda v: v * 1, devices=funcdp.local_devices()[:2])(
        torch.tensor([2, 0]))
    assert_trees_close(x[idx.to_tensor()], x[torch.tensor([2, 0])])
    mask = funcdp.pmap(lambda v: v > 5, devices=funcdp.local_devices()[:4])(
        torch.arange(4.0) * 3)
    y = torch.arange(4.0) * 10
    assert_trees_close(y[mask.to_tensor()], torch.tensor([20.0, 30.0]))
    t = torch.zeros(4, 3)
    t[idx.to_tensor()] = 1.0
    assert t.sum(1).tolist() == [3.0, 0.0, 3.0, 0.0]
    # (Within a tuple index the value is recognised and gathered.)
    assert_trees_close(x[idx, :], x[torch.tensor([2, 0])])


def test_none_leaves_pass_through_replicate_shard_and_unshard():
    # pmap passes None leaves through; these helpers raised "Could not infer dtype of
    # NoneType".
    devs = funcdp.local_devices()[:4]
    rep = funcdp.replicate({"w": torch.ones(3), "bias": None}, devices=devs)
    assert rep["bias"] is None and rep["w"].shape == (4, 3)
    assert funcdp.replicate(None) is None
    sharded = funcdp.shard({"x": torch.arange(8.0), "mask": None}, num_devices=4)
    assert sharded["mask"] is None and sharded["x"].shape == (4, 2)
    back = funcdp.unshard(sharded)
    assert back["mask"] is None
    assert_trees_close(back["x"], torch.arange(8.0))
    assert funcdp.unreplicate(rep)["bias"] is None
    out = funcdp.pmap(lambda p: p["w"] * 2)(rep)  # (the result goes into pmap as it is)
    assert_trees_close(out, torch.full((4, 3), 2.0))


@pytest.mark.parametrize("call", [
    lambda t: funcdp.replicate(t), lambda t: funcdp.shard(t, num_devices=2),
    lambda t: funcdp.unshard(t),
])
def test_a_leaf_that_is_no_array_names_the_call_and_its_path(call):
    # Was torch's "new(): invalid data type 'str'".
    tree = {"x": torch.ones(2, 2), "meta": [torch.ones(2, 2), "fc1"]}
    with pytest.raises(TypeError, match=r"funcdp\.(replicate|shard|unshard): "
                                        r"tree\['meta'\]\[1\] is a str \('fc1'\); every leaf "
                                        r"must be a tensor, an array or a number"):
        call(tree)


def test_unreplicate_takes_one_copy_at_any_device_axis():
    # With the device axis elsewhere (out_axes=1), unreplicate gathered and took slice 0
    # of axis 0: element 0 of every device's copy.
    w = torch.tensor([10.0, 20.0, 30.0])
    for out_axes in (1, -1):
        out = funcdp.pmap(lambda r: r * 1, out_axes=out_axes)(funcdp.replicate(w))
        assert out.shape == (3, 8)
        assert_trees_close(funcdp.unreplicate(out), w)
    blk = funcdp.pmap(lambda r: r * 1, out_axes=1, devices=funcdp.local_devices()[:2])(
        torch.stack([w] * 4))
    assert blk.block == 2
    assert_trees_close(funcdp.unreplicate({"w": blk}), {"w": w})


def test_unreplicate_of_a_0d_tensor_names_its_path():
    # Was torch's IndexError "invalid index of a 0-dim tensor".
    with pytest.raises(ValueError, match=r"funcdp\.unreplicate: tree\['step'\] is a 0-d "
                                         r"tensor, which has no device axis"):
        funcdp.unreplicate({"w": torch.ones(8, 2), "step": torch.tensor(3)})


@pytest.mark.parametrize("devices, error, match", [
    (lambda d: d[0], TypeError, r"`devices` must be a list of funcdp\.Device \(e\.g\. "
                                r"funcdp\.local_devices\(\)\[:2\]\), or None for every local "
                                r"device; got a Device: CpuDevice\(id=0\); to use that one "
                                r"device, pass it in a list: devices=\[device\]\."),
    (lambda d: 2, TypeError, r"`devices` must be a list of funcdp\.Device .*got an int: 2; "
                             r"for the first 2, pass devices=funcdp\.local_devices\(\)\[:2\]"),
    (lambda d: "cpu", TypeError, r"`devices` must be a list of funcdp\.Device .*got a str: "
                                 r"'cpu'\.$"),
    (lambda d: [d[1], d[0], d[1]], ValueError,
     r"`devices` lists a device more than once: \[CpuDevice\(id=1\), CpuDevice\(id=0\), "
     r"CpuDevice\(id=1\)\] \(repeats CpuDevice\(id=1\)\); name each device once\."),
    (lambda d: [torch.device("cpu")], TypeError, r"`devices` must hold funcdp devices"),
    (lambda d: [], ValueError, r"`devices` is empty"),
])
def test_replicate_checks_its_devices(devices, error, match):
    # A single Device, an int or a str raised "... is not iterable" (or named the str's
    # first character); repeated devices were accepted, although pmap rejects them.
    with pytest.raises(error, match=r"^funcdp\.replicate: " + match):
        funcdp.replicate(torch.ones(2), devices=devices(funcdp.local_devices()))
    assert funcdp.replicate(torch.ones(2), devices=iter(funcdp.local_devices()[:3])).shape == (
        3, 2)
