"""The examples run end to end and pass their own checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, devices: str = "4") -> str:
    env = {**os.environ, "FUNCDP_NUM_CPU_DEVICES": devices}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_train_digits(tmp_path):
    plot = tmp_path / "loss.png"
    out = run("train_digits.py", "--quiet", "--plot", str(plot))
    assert "(OK)" in out
    acc = float(out.split("final test accuracy ")[1].split("%")[0])
    assert acc >= 95.0
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("devices", ["2", "8"])
def test_train_digits_other_device_counts(devices):
    out = run("train_digits.py", "--quiet", "--no-plot", "--epochs", "3", "--min-accuracy", "0",
              devices=devices)
    assert f"on {devices} devices" in out and "(OK)" in out


def test_dp_sgd():
    out = run("dp_sgd.py", "--steps", "20")
    assert "max difference" in out


def test_sync_batchnorm():
    out = run("sync_batchnorm.py", "--steps", "10")
    assert "running-statistics difference" in out


@pytest.mark.distributed
def test_train_digits_distributed_with_torchrun():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
    env["FUNCDP_NUM_CPU_DEVICES"] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(EXAMPLES / "train_digits_distributed.py"), "--epochs", "3"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 processes x 2 devices vs one device" in out.stdout and "(OK)" in out.stdout


def test_readme_example_runs():
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    env = {**os.environ, "FUNCDP_NUM_CPU_DEVICES": "4"}
    out = subprocess.run([sys.executable, "-c", code + "\nprint(float(loss))"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0 < float(out.stdout.split()[-1]) < 10
