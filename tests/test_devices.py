"""Devices: virtual CPU devices from the environment, read when first needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import funcdp


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=120)


def test_suite_runs_with_eight_virtual_devices():
    devs = funcdp.local_devices()
    assert len(devs) == funcdp.local_device_count() == funcdp.device_count() == 8
    assert [d.id for d in devs] == list(range(8))
    assert all(d.platform == "cpu" and d.process_index == 0 for d in devs)
    assert funcdp.devices() == devs
    assert funcdp.process_index() == 0 and funcdp.process_count() == 1
    assert repr(devs[3]) == "CpuDevice(id=3)"


def test_default_is_one_device_and_env_is_read_lazily():
    code = ("import os, funcdp; os.environ['FUNCDP_NUM_CPU_DEVICES'] = '3'; "
            "print(funcdp.local_device_count())")
    out = _run(code, FUNCDP_PLATFORM="cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    out = _run("import funcdp; print(funcdp.local_device_count())", FUNCDP_PLATFORM="cpu")
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_device_count_is_a_clear_error(value):
    out = _run("import funcdp; funcdp.local_devices()", FUNCDP_PLATFORM="cpu",
               FUNCDP_NUM_CPU_DEVICES=value)
    assert out.returncode != 0
    assert "FUNCDP_NUM_CPU_DEVICES" in out.stderr and "positive integer" in out.stderr


def test_bad_platform_is_a_clear_error():
    out = _run("import funcdp; funcdp.local_devices()", FUNCDP_PLATFORM="tpu")
    assert "must be 'cpu' or 'cuda'" in out.stderr


def test_devices_are_hashable_and_picklable():
    import pickle

    d = funcdp.local_devices()[2]
    assert pickle.loads(pickle.dumps(d)) == d
    assert len({*funcdp.local_devices(), d}) == 8
