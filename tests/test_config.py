"""funcdp.config: overrides from several threads and devices, assignment, checked values."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import torch

import funcdp
from funcdp._src.config import MAX_TIMEOUT, Config

config = funcdp.config


@pytest.fixture(autouse=True)
def _settings_restored():
    # Each test leaves the settings as it found them (checked, then put back so that a
    # failure here does not spread to other tests).
    names = ("collective_timeout", "check_replicated", "onednn_linear")
    before = {n: getattr(config, n) for n in names}
    yield
    after = {n: getattr(config, n) for n in names}
    for n, v in before.items():
        setattr(config, n, v)
    assert after == before, "a setting was left changed"


def test_overrides_exited_out_of_order_each_take_back_only_their_own():
    # Each exit put back the value its block had found: exiting the outer block first left
    # the inner one's value unseen, and the inner one's exit then set the outer's for good.
    base = config.collective_timeout
    a, b = config.override(collective_timeout=5.0), config.override(collective_timeout=7.0)
    a.__enter__()
    b.__enter__()
    assert config.collective_timeout == 7.0
    a.__exit__(None, None, None)
    assert config.collective_timeout == 7.0  # (b is still active)
    b.__exit__(None, None, None)
    assert config.collective_timeout == base


def test_overrides_are_applied_in_the_order_entered():
    base = config.collective_timeout
    with config.override(collective_timeout=5.0, check_replicated=False):
        with config.override(collective_timeout=7.0):
            assert (config.collective_timeout, config.check_replicated) == (7.0, False)
        assert (config.collective_timeout, config.check_replicated) == (5.0, False)
    assert (config.collective_timeout, config.check_replicated) == (base, True)


def test_equal_overrides_are_told_apart():
    # Exiting the last of two equal blocks must not take back the first one's entry (which
    # would leave the last one's value active after its exit).
    base = config.collective_timeout
    first, middle, last = (config.override(collective_timeout=t) for t in (5.0, 7.0, 5.0))
    for cm in (first, middle, last):
        cm.__enter__()
    last.__exit__(None, None, None)
    assert config.collective_timeout == 7.0
    middle.__exit__(None, None, None)
    assert config.collective_timeout == 5.0
    first.__exit__(None, None, None)
    assert config.collective_timeout == base


def test_overlapping_overrides_in_two_threads():
    # Reproducer: thread A enters, thread B enters, A exits, B exits. A's exit set the
    # value A had found (the base) while B's block ran, and B's exit then set A's 5.0 for
    # good.
    base = config.collective_timeout
    step = [threading.Event() for _ in range(4)]
    seen = {}

    def a():
        with config.override(collective_timeout=5.0):
            step[0].set()
            step[1].wait(10)
        step[2].set()

    def b():
        step[0].wait(10)
        with config.override(collective_timeout=7.0):
            step[1].set()
            step[2].wait(10)
            seen["after A exited"] = config.collective_timeout

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"after A exited": 7.0}
    assert config.collective_timeout == base


def test_overrides_from_many_threads_leave_the_base():
    base = config.collective_timeout
    values = (1.0, 2.0, 3.0, 4.0)

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(50):
            with config.override(collective_timeout=rng.choice(values)):
                assert config.collective_timeout in values
                time.sleep(rng.random() * 1e-4)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert config.collective_timeout == base


def test_override_inside_a_pmapped_function_on_two_devices():
    # Reproducer: each device (a thread) entered the override; device 0's exit put back
    # True while device 1's block ran, and device 1's exit then left False for good.
    seen = []

    def fn(x):
        i = int(funcdp.axis_index("i"))
        cm = config.override(check_replicated=False)
        cm.__enter__()
        x = funcdp.psum(x, "i")  # (both blocks active from here)
        if i == 0:
            cm.__exit__(None, None, None)
        x = funcdp.psum(x, "i")  # (device 0's block exited)
        if i == 1:
            seen.append(config.check_replicated)
            cm.__exit__(None, None, None)
        return x

    pf = funcdp.pmap(fn, axis_name="i", devices=funcdp.local_devices()[:2])
    assert pf(torch.ones(2)).tolist() == [4.0, 4.0]
    assert seen == [False]  # (device 1's block was still active)
    assert config.check_replicated is True


def test_assignment_sets_the_base():
    base = config.collective_timeout
    try:
        config.collective_timeout = 12.0
        assert config.collective_timeout == 12.0
        with config.override(collective_timeout=5.0):
            config.collective_timeout = 13.0
            assert config.collective_timeout == 5.0  # (the override is still seen)
        assert config.collective_timeout == 13.0  # (the assignment, not the value before)
    finally:
        config.collective_timeout = base


def test_an_override_with_a_bad_value_changes_nothing():
    with pytest.raises(ValueError, match=r"^funcdp.config.collective_timeout must be"):
        with config.override(check_replicated=False, collective_timeout=-1):
            pass
    assert config.check_replicated is True
    with pytest.raises(AttributeError, match=r"^funcdp.config has no setting `check_replicatd`; "
                                             r"settings are collective_timeout, "):
        with config.override(check_replicated=False, check_replicatd=False):
            pass
    assert config.check_replicated is True


def test_settings_are_plain_attributes():
    # Every pmap call and collective reads them: no property, no __getattr__ in the way.
    for name in Config._names:
        assert name in vars(config)
        assert name not in vars(Config)
    assert type(config).__getattribute__ is object.__getattribute__
    assert not hasattr(Config, "__getattr__")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 1e10, MAX_TIMEOUT * 1.5, 0,
                                 -1.0, True, "60", None])
def test_error_collective_timeout_out_of_range(bad):
    # inf, NaN and 1e10 were taken, then every collective raised OverflowError ("timestamp
    # out of range for platform time_t").
    with pytest.raises(ValueError, match=r"^funcdp.config.collective_timeout must be a "
                                         r"positive number of seconds, at most 31536000 "
                                         r"\(one year\), got "):
        config.collective_timeout = bad
    with pytest.raises(ValueError, match=r"^funcdp.config.collective_timeout must be"):
        with config.override(collective_timeout=bad):
            pass


@pytest.mark.parametrize("raw", ["inf", "nan", "1e10", "-inf", "0", "-5", "sixty"])
def test_error_collective_timeout_environment_variable(raw, monkeypatch):
    monkeypatch.setenv("FUNCDP_COLLECTIVE_TIMEOUT", raw)
    with pytest.raises(ValueError, match=rf"^environment variable `FUNCDP_COLLECTIVE_TIMEOUT` "
                                         rf"must be a positive number of seconds, at most "
                                         rf"31536000 \(one year\), got '{raw}'; unset it to "
                                         rf"use the default \(60.0\)\.$"):
        Config()


def test_the_longest_collective_timeout_works(monkeypatch):
    monkeypatch.setenv("FUNCDP_COLLECTIVE_TIMEOUT", "31536000")
    assert Config().collective_timeout == MAX_TIMEOUT == 31_536_000.0
    pf = funcdp.pmap(lambda x: funcdp.psum(x, "i"), axis_name="i",
                     devices=funcdp.local_devices()[:2])
    with config.override(collective_timeout=MAX_TIMEOUT):
        assert pf(torch.ones(2)).tolist() == [2.0, 2.0]
