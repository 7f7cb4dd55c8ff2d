"""Small calls run their devices one after another on the calling thread."""

from __future__ import annotations

import threading

import pytest
import torch

import funcdp
from funcdp._src import pmap as pmap_mod


@pytest.fixture
def eager_inline(monkeypatch):
    """Every call counts as small, so a plan goes inline after its first calls."""
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "SMALL_S", 1e9)
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "LONG_S", 1e9)


def policy(f):
    (plan,) = f._cache.values()
    return plan.policy


def test_small_plans_run_on_the_calling_thread(eager_inline, devices):
    threads = []

    def fn(x):
        threads.append(threading.get_ident())
        return x * 2 + funcdp.axis_index("i")

    f = funcdp.pmap(fn, axis_name="i", devices=devices[:4])
    x = torch.arange(8.0).reshape(4, 2)
    want = x * 2 + torch.arange(4.0)[:, None]
    for _ in range(6):
        threads.clear()
        assert torch.equal(f(x).to_tensor(), want)
    assert policy(f).on
    assert set(threads) == {threading.get_ident()}


def test_a_collective_hands_the_other_devices_to_workers(eager_inline, devices):
    f = funcdp.pmap(lambda x: funcdp.psum(x, "i") + x, axis_name="i", devices=devices[:4])
    x = torch.arange(4.0)
    for _ in range(8):
        assert torch.equal(f(x).to_tensor(), x.sum() + x)
    p = policy(f)
    assert not p.on and p.handoffs == p.MAX_HANDOFFS


def test_collective_after_some_devices_ran_inline(eager_inline, devices):
    # Device 0 finishes its collective-free branch... no: every device must make the same
    # collectives; here the collective comes late, after per-device work.
    def fn(x):
        y = (x * 3).sin()
        return funcdp.pmean(y, "i") - y

    f = funcdp.pmap(fn, axis_name="i", devices=devices[:3])
    x = torch.randn(3, 5, dtype=torch.float64)
    y = (x * 3).sin()
    for _ in range(6):
        torch.testing.assert_close(f(x).to_tensor(), y.mean(0) - y, rtol=1e-12, atol=1e-12)


def test_random_numbers_do_not_depend_on_the_thread(eager_inline, devices):
    f = funcdp.pmap(lambda x: torch.nn.functional.dropout(x, 0.5), devices=devices[:4])
    x = torch.ones(4, 64)
    torch.manual_seed(3)
    first = f(x).to_tensor()  # on workers: the plan is new
    outs = []
    for _ in range(4):
        outs.append(f(x).to_tensor())
    assert policy(f).on
    torch.manual_seed(3)
    assert torch.equal(f(x).to_tensor(), first)  # now inline: the same masks
    assert not torch.equal(first[0], first[1])


def test_an_error_on_one_device_inline(eager_inline, devices):
    def fn(x):
        if funcdp.axis_index("i") == 2:
            raise ValueError("bad shard")
        return x

    f = funcdp.pmap(fn, axis_name="i", devices=devices[:4])
    ok = funcdp.pmap(lambda x: x + 1, axis_name="i", devices=devices[:4])
    for _ in range(4):
        with pytest.raises(ValueError, match="bad shard") as info:
            f(torch.zeros(4))
        assert "device 2" in str(info.value) or "device 2" in "".join(
            getattr(info.value, "__notes__", []))
        assert torch.equal(ok(torch.zeros(4)).to_tensor(), torch.ones(4))


def test_nested_pmap_inside_an_inline_call(eager_inline, devices):
    inner = funcdp.pmap(lambda v: funcdp.psum(v, ("o", "i")), axis_name="i")
    f = funcdp.pmap(inner, axis_name="o", devices=devices[:2])
    x = torch.arange(4.0).reshape(2, 2)
    for _ in range(6):
        assert torch.equal(f(x).to_tensor(), torch.full((2, 2), 6.0))


def test_long_calls_stay_on_workers(devices):
    f = funcdp.pmap(lambda x: x @ x @ x @ x, devices=devices[:2])
    x = torch.randn(2, 400, 400)
    for _ in range(5):
        f(x)
    assert not policy(f).on


def test_long_calls_run_device_0_on_the_calling_thread(monkeypatch, devices):
    monkeypatch.setattr(pmap_mod._ExecutionPolicy, "LONG_S", 0.0)  # every call counts as long
    seen = {}

    def fn(x):
        seen[int(funcdp.axis_index("i"))] = (threading.get_ident(), torch.is_grad_enabled())
        if float(x.sum()) < 0:
            raise ValueError("negative shard")
        return funcdp.psum(x, "i")

    f = funcdp.pmap(fn, axis_name="i", devices=devices[:3])
    x = torch.ones(3, 2)
    for _ in range(4):
        f(x)
    with torch.no_grad():
        out = f(x)
    assert torch.equal(out.to_tensor(), torch.full((3, 2), 3.0))
    assert seen[0][0] == threading.get_ident()
    assert seen[1][0] != threading.get_ident() and seen[2][0] != threading.get_ident()
    assert not any(grad for _, grad in seen.values())  # the caller's grad mode carried
    with pytest.raises(ValueError, match="negative shard") as info:
        f(-x)
    assert "device 0" in str(info.value)


def test_devices_run_inline_keep_the_thread_budget(eager_inline, devices):
    # Each device of a call runs with the call's intra-op thread budget, even when an
    # earlier device run on the same thread changed torch's thread count.
    seen = []
    before = torch.get_num_threads()

    def fn(x):
        seen.append(torch.get_num_threads())
        torch.set_num_threads(before + 1)
        return x

    f = funcdp.pmap(fn, devices=devices[:4])
    for _ in range(6):
        seen.clear()
        f(torch.ones(4, 2))
    assert policy(f).on
    budget = max(1, before // 4)
    assert seen == [budget] * 4
    assert torch.get_num_threads() == before
