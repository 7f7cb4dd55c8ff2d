"""pad_shard_unpad: which outputs are unpadded, and its errors; prefetch_to_device's
leaves and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_trees_close

import funcdp

N = 4  # devices every test shards over (num_devices=N)


def per_example_and_per_device(**pmap_kw):
    """A pmap returning a per-example value [b, 2] and a per-device value [2]."""

    @funcdp.pmap(axis_name="b", in_axes=(None, 0), **pmap_kw)
    def step(w, x):
        logits = x @ w
        return logits, logits.sum(0)

    return step


@pytest.mark.parametrize("batch", [5, 6, 8, 9, 13])
def test_per_device_outputs_follow_one_rule_for_every_batch_size(batch):
    # Reference: a loop over examples. Every per-device output is unpadded; one that is
    # not [n, B' / n, ...] is an error whatever the batch size, never reshaped: the
    # per-device sum [4, 2] was flattened to [B] (data lost) for B = 5..8 and returned as
    # it was for B = 9 (old heuristic: unpad when dim 1 happened to equal B' / n).
    w, x = torch.randn(3, 2), torch.randn(batch, 3)
    per_example = funcdp.pad_shard_unpad(funcdp.pmap(lambda w, x: x @ w, in_axes=(None, 0)),
                                         num_devices=N)
    assert_trees_close(per_example(w, x), torch.stack([xi @ w for xi in x]))
    both = funcdp.pad_shard_unpad(per_example_and_per_device(), num_devices=N)
    if -(-batch // N) == 2:
        # [4, 2] is [n, B' / n] here: no shape can tell it from a per-example value.
        assert both(w, x)[1].shape == (batch,)
    else:
        with pytest.raises(ValueError, match=r"output\[1\] is per device \(device axis 0\) "
                                             r"with shape \(4, 2\).*static_return=True"):
            both(w, x)
    # The ways out the message names: out_axes=None for the per-device value ...
    psummed = funcdp.pad_shard_unpad(funcdp.pmap(
        lambda w, x: (x @ w, funcdp.psum((x @ w).sum(0), "b")), axis_name="b",
        in_axes=(None, 0), out_axes=(0, None)), num_devices=N)
    logits, total = psummed(w, x)
    assert_trees_close(logits, x @ w)
    assert_trees_close(total, (x @ w).sum(0), rtol=1e-5, atol=1e-5)
    # ... or static_return=True: fn's outputs as they are.
    raw = funcdp.pad_shard_unpad(per_example_and_per_device(), static_return=True,
                                 num_devices=N)(w, x)
    padded = torch.cat([x, torch.zeros(-(-batch // N) * N - batch, 3)]).reshape(N, -1, 3)
    assert_trees_close(raw[1], torch.stack([(p @ w).sum(0) for p in padded]),
                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_axis", [1, -1])
def test_a_per_device_scalar_is_an_error_at_any_out_axis(out_axis):
    # A loss per device, [n] (and [b, n] with the device axis last, shape (2, 4) here).
    f = funcdp.pmap(lambda x: (x.sum(), x.sum(-1)), out_axes=(0, out_axis))
    with pytest.raises(ValueError, match=r"output\[0\] is per device \(device axis 0\) with "
                                         r"shape \(4,\).*\[4, 2, \.\.\.\] here \(7 examples "
                                         r"padded to 8 on 4 devices\)"):
        funcdp.pad_shard_unpad(f, static_argnums=(), num_devices=N)(torch.ones(7, 3))
    g = funcdp.pmap(lambda x: x * 2, out_axes=out_axis)
    x = torch.randn(7, 3)
    assert_trees_close(funcdp.pad_shard_unpad(g, static_argnums=(), num_devices=N)(x), x * 2)


def test_outputs_of_another_function_follow_the_same_rule():
    pmapped = per_example_and_per_device()

    def f(w, x):  # not a Pmapped: per device are the sharded values
        return pmapped(w, x)

    w, x = torch.randn(3, 2), torch.randn(9, 3)
    with pytest.raises(ValueError, match=r"output\[1\] is per device"):
        funcdp.pad_shard_unpad(f, num_devices=N)(w, x)
    # A reduced scalar recording gradients has no device axis: returned as it is.
    loss = funcdp.pad_shard_unpad(lambda w, x: pmapped(w, x)[0].sum(), num_devices=N)(
        w.requires_grad_(), x)
    assert_trees_close(loss, (x @ w).sum(), rtol=1e-5, atol=1e-5)


def test_static_argnums_take_an_int_and_negative_positions():
    @funcdp.pmap(in_axes=(None, 0, None))
    def scale(w, x, s):
        return x * w * s

    w, x = torch.tensor(2.0), torch.randn(10, 3)
    want = x * 2.0 * 0.5
    assert_trees_close(funcdp.pad_shard_unpad(scale, static_argnums=(0, -1), num_devices=N)(
        w, x, torch.tensor(0.5)), want)
    assert_trees_close(funcdp.pad_shard_unpad(scale, static_argnums=(0, 2), num_devices=N)(
        w, x, 0.5), want)

    assert_trees_close(funcdp.pad_shard_unpad(
        lambda s, x: scale(w, x, s), static_argnums=0, num_devices=N)(0.5, x), want)
    assert_trees_close(funcdp.pad_shard_unpad(
        lambda x, s: scale(w, x, s), static_argnums=(), static_argnames="s",
        num_devices=N)(x, s=0.5), want)


def test_none_leaves_in_a_batch_pass_through():
    @funcdp.pmap(in_axes=(None, 0))
    def f(w, batch):
        out = batch["x"] * w
        return out if batch["mask"] is None else out * batch["mask"]

    w, x = torch.tensor(3.0), torch.randn(10, 3)
    out = funcdp.pad_shard_unpad(f, num_devices=N)(w, {"x": x, "mask": None})
    assert_trees_close(out, x * 3.0)
    out = funcdp.pad_shard_unpad(f, num_devices=N)(w, {"x": np.ones((10, 3), np.float32),
                                                       "mask": None})
    assert_trees_close(out, torch.full((10, 3), 3.0))
    with pytest.raises(ValueError, match=r"no batch argument: every argument is static "
                                         r"\(static_argnums=\(0,\), static_argnames=\(\)\) "
                                         r"or holds only None"):
        funcdp.pad_shard_unpad(f, num_devices=N)(w, {"x": None, "mask": None})


def test_a_non_array_batch_leaf_names_the_argument_and_the_fix():
    f = funcdp.pmap(lambda w, x, s: x * w * s, in_axes=(None, 0, None))
    w, x = torch.tensor(2.0), torch.ones(10, 3)
    with pytest.raises(TypeError, match=r"batch argument args\[2\] is a float \(0\.5\); each "
                                        r"leaf of a batch argument must be a tensor or array "
                                        r".*static_argnums=\(0, 2\)\."):
        funcdp.pad_shard_unpad(f, num_devices=N)(w, x, 0.5)
    with pytest.raises(TypeError, match=r"batch argument kwargs\['s'\] is a float .*"
                                        r"static_argnames=\('s',\)\."):
        funcdp.pad_shard_unpad(f, num_devices=N)(w, x, s=0.5)


def test_a_0d_batch_leaf_names_its_path():
    f = funcdp.pmap(lambda w, b: b["x"] * w, in_axes=(None, 0))
    with pytest.raises(ValueError, match=r"batch argument args\[1\]\['t'\] is a 0-d Tensor; "
                                         r".*static_argnums=\(0, 1\)\."):
        funcdp.pad_shard_unpad(f, num_devices=N)(torch.tensor(2.0),
                                                 {"x": torch.ones(5, 3), "t": torch.tensor(1)})


def test_different_batch_sizes_list_every_leaf():
    f = funcdp.pmap(lambda b: b["x"], in_axes=0)
    with pytest.raises(ValueError, match=r"different leading sizes \[9, 10\]; they must share "
                                         r"one batch size:\n  - args\[0\]\['x'\]: size 10\n"
                                         r"  - args\[0\]\['y'\]: size 9\n"):
        funcdp.pad_shard_unpad(f, static_argnums=(), num_devices=N)(
            {"x": torch.ones(10), "y": torch.ones(9)})


@pytest.mark.parametrize("kw, error, match", [
    ({"num_devices": 0}, ValueError, r"`num_devices` must be a positive int \(the number of "
                                     r"devices to shard the batch over\), got 0; leave it None"),
    ({"num_devices": 2.0}, TypeError, r"`num_devices` must be a positive int or None .*got a "
                                      r"float: 2\.0"),
    ({"num_devices": True}, TypeError, r"`num_devices` must be a positive int or None"),
    ({"static_argnums": "0"}, TypeError, r"`static_argnums` must be an int or a sequence of "
                                         r"ints .*got '0' holding a str"),
    ({"static_argnums": (0, None)}, TypeError, r"`static_argnums` .*holding a NoneType"),
    ({"static_argnames": ("a", 1)}, TypeError, r"`static_argnames` must be a str or a "
                                               r"sequence of strs .*holding an int: 1"),
])
def test_bad_options_fail_when_wrapping(kw, error, match):
    with pytest.raises(error, match=match):
        funcdp.pad_shard_unpad(funcdp.pmap(lambda x: x), **kw)


def test_prefetch_passes_none_leaves_through():
    # Was torch's "Could not infer dtype of NoneType".
    devs = funcdp.local_devices()[:2]
    (batch,) = funcdp.prefetch_to_device([{"x": torch.zeros(2, 3), "w": None}], devices=devs)
    assert batch["w"] is None and isinstance(batch["x"], funcdp.ShardedValue)


def test_prefetch_errors_name_the_batch_and_leaf():
    devs = funcdp.local_devices()[:2]
    batches = [{"x": torch.zeros(2, 3), "y": torch.zeros(2)}, {"x": torch.zeros(2, 3), "y": 3}]
    with pytest.raises(ValueError, match=r"batch 1 \(counting from 0\), leaf \['y'\], has "
                                         r"shape \(\), but each leaf needs a leading "
                                         r"dimension of 2 .*funcdp\.shard\(batch\)"):
        list(funcdp.prefetch_to_device(batches, devices=devs))
    with pytest.raises(TypeError, match=r"batch 0 \(counting from 0\), leaf \['x'\], is a "
                                        r"str; the leaves of a batch must be tensors"):
        list(funcdp.prefetch_to_device([{"x": "abc"}], devices=devs))


@pytest.mark.parametrize("args, kw, error, match", [
    ([], {"size": 0}, ValueError, "`size` must be a positive int, got 0"),
    ([], {"devices": []}, ValueError, "`devices` is empty"),
    (3, {}, TypeError, "`iterator` must be an iterable of batches .* got an int"),
])
def test_prefetch_checks_its_arguments_when_called(args, kw, error, match):
    # Checked at the first next() before (it was a generator function).
    with pytest.raises(error, match=match):
        funcdp.prefetch_to_device(args, **kw)


def test_prefetch_on_cpu_devices_reads_no_batch_ahead():
    # On virtual CPU devices the shards are views of the loader's tensors: reading `size`
    # batches ahead fed a loader that refills one buffer in place the wrong data
    # ([2, 3, 4, 4, 4] instead of [0, 1, 2, 3, 4]).
    devs = funcdp.local_devices()[:4]
    buf = torch.empty(4, 2)
    read = []

    def loader():
        for i in range(5):
            buf.fill_(float(i))
            read.append(i)
            yield {"x": buf}

    got = []
    for batch in funcdp.prefetch_to_device(loader(), size=2, devices=devs):
        assert read[-1] == len(got)  # (the batch just read, none after it)
        got.append(float(funcdp.pmap(lambda x: x.sum())(batch["x"]).to_tensor()[0]))
    assert got == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_prefetch_yields_the_batches_read_before_an_error():
    # The batches read before the loader failed were dropped; a bad leaf in batch 2
    # dropped batches 0 and 1 as well.
    devs = funcdp.local_devices()[:2]

    def loader():
        yield torch.zeros(2, 1)
        yield torch.ones(2, 1)
        raise OSError("loader broke")

    got = []
    with pytest.raises(OSError, match="loader broke"):
        for b in funcdp.prefetch_to_device(loader(), size=2, devices=devs):
            got.append(float(b[0][0]))
    assert got == [0.0, 1.0]
    got = []
    batches = [torch.zeros(2, 1), torch.ones(2, 1), torch.ones(3, 1)]
    with pytest.raises(ValueError, match=r"batch 2 \(counting from 0\) has shape \(3, 1\)"):
        for b in funcdp.prefetch_to_device(batches, size=2, devices=devs):
            got.append(float(b[0][0]))
    assert got == [0.0, 1.0]


def test_reading_ahead_yields_queued_items_before_an_error():
    # The read-ahead that prefetching to GPUs uses: items read before an error in reading
    # or placing one come first, then the error; a KeyboardInterrupt goes through at once.
    from funcdp._src.data_utils import _read_ahead

    def items(stop):
        yield from range(3)
        raise stop

    def place(x, k):
        if x == "bad":
            raise ValueError(f"cannot place item {k}")
        return x * 10

    out = []
    with pytest.raises(OSError, match="broke"):
        for y in _read_ahead(items(OSError("broke")), 2, place):
            out.append(y)
    assert out == [0, 10, 20]
    out = []
    with pytest.raises(ValueError, match="cannot place item 2"):
        for y in _read_ahead(iter([1, 2, "bad", 3]), 2, place):
            out.append(y)
    assert out == [10, 20]
    out = []
    with pytest.raises(KeyboardInterrupt):
        for y in _read_ahead(items(KeyboardInterrupt()), 2, place):
            out.append(y)
    assert out == [0]  # (items 1 and 2 were still queued: not yielded)
    assert list(_read_ahead(iter(range(5)), 2, place)) == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("devices, error, match", [
    (lambda d: d[0], TypeError, r"`devices` must be a list of funcdp\.Device .*got a Device"),
    (lambda d: 2, TypeError, r"`devices` must be a list of funcdp\.Device .*got an int: 2"),
    (lambda d: [d[0], d[0]], ValueError, r"`devices` lists a device more than once"),
])
def test_prefetch_checks_its_devices(devices, error, match):
    # Was "'Device' object is not iterable"; repeated devices were accepted.
    with pytest.raises(error, match=r"^funcdp\.prefetch_to_device: " + match):
        funcdp.prefetch_to_device([], devices=devices(funcdp.local_devices()))


def test_num_devices_that_fn_cannot_run_is_named():
    # pmap's error told the user to use pad_shard_unpad, which they were doing.
    f = funcdp.pmap(lambda w, x: x * w, in_axes=(None, 0))
    w, x = torch.tensor(2.0), torch.ones(10, 3)
    with pytest.raises(ValueError, match=r"^funcdp\.pad_shard_unpad: `num_devices` is 12, "
                                         r"but fn is a pmap over the 8 available devices, "
                                         r"which runs a batch sharded n ways only when n is "
                                         r"at most 8 or a multiple of 8\. Pass num_devices=8, "
                                         r"or leave it None\.$"):
        funcdp.pad_shard_unpad(f, num_devices=12)(w, x)
    for n in (3, 8, 16):  # (fewer devices, all of them, or a multiple: fine)
        assert_trees_close(funcdp.pad_shard_unpad(f, num_devices=n)(w, x), x * 2)
    g = funcdp.pmap(lambda w, x: x * w, in_axes=(None, 0), devices=funcdp.local_devices()[:3])
    with pytest.raises(ValueError, match=r"`num_devices` is None, so the batch is sharded 8 "
                                         r"ways \(one per local device\), but fn is a pmap "
                                         r"over the 3 devices in its `devices`, .*only when n "
                                         r"is 3 or a multiple of 3\. Pass num_devices=3\.$"):
        funcdp.pad_shard_unpad(g)(w, x)
    with pytest.raises(ValueError, match=r"`num_devices` is 2, but fn is a pmap over the 3 "
                                         r"devices in its `devices`"):
        funcdp.pad_shard_unpad(g, num_devices=2)(w, x)
    assert_trees_close(funcdp.pad_shard_unpad(g, num_devices=6)(w, x), x * 2)
