"""CUDA tests (marked ``gpu``; skipped without a GPU).

The suite runs with virtual CPU devices, so every GPU check runs in a subprocess with
``FUNCDP_PLATFORM=cuda`` (and, for the logical-device tests, ``FUNCDP_DEVICES_PER_GPU``).
The same check also runs on virtual CPU devices (unmarked), so that the script itself is
tested where no GPU is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import sys, torch, funcdp
    from torch.func import grad
    dev = sys.argv[1]  # "cuda", or "cpu" to check this script on virtual CPU devices
    devs = funcdp.local_devices()
    n = len(devs)
    assert devs[0].platform == dev, devs
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, 8, 5, dtype=dtype)
        w = torch.randn(5, dtype=dtype)
        def f(x, w):
            g = grad(lambda w: torch.tanh(x @ w).sum())(w)
            return funcdp.pmean(g, "i"), funcdp.all_gather(x.sum(0), "i"), funcdp.axis_index("i")
        out = funcdp.pmap(f, axis_name="i", in_axes=(0, None), out_axes=(None, 0, 0))(
            x.to(dev), w.to(dev))
        ref_g = torch.stack([grad(lambda w: torch.tanh(x[i] @ w).sum())(w)
                             for i in range(n)]).mean(0)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[0].cpu(), ref_g, **tol)
        torch.testing.assert_close(out[1].to_tensor().cpu()[0], x.sum(1), **tol)
        assert out[2].to_tensor().cpu().tolist() == list(range(n))
        # grad(pmap) and backward through collectives on the GPU
        xr = x.to(dev).requires_grad_()
        funcdp.pmap(lambda v: funcdp.psum(v, "i").pow(2).sum(), axis_name="i")(xr).sum().backward()
        torch.testing.assert_close(xr.grad.cpu(), (2 * n * x.sum(0)).expand_as(x), **tol)
    with torch.autocast(dev, dtype=torch.bfloat16):
        a, b = torch.randn(n, 4, 4).to(dev), torch.randn(n, 4, 4).to(dev)
        out = funcdp.pmap(lambda a, b: a @ b)(a, b)
    assert out.dtype == torch.bfloat16
    print("OK", n)
""")


def run(env: dict, device: str = "cuda") -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", CHECK, device], env=full,
                          capture_output=True, text=True, timeout=600)


def test_the_gpu_check_passes_on_virtual_cpu_devices():
    out = run({"FUNCDP_NUM_CPU_DEVICES": "4"}, device="cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "OK 4"


@pytest.mark.gpu
def test_pmap_and_collectives_on_one_gpu():
    out = run({"FUNCDP_PLATFORM": "cuda"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("OK")


@pytest.mark.gpu
def test_several_logical_devices_per_gpu():
    out = run({"FUNCDP_PLATFORM": "cuda", "FUNCDP_DEVICES_PER_GPU": "4"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "OK 4"
