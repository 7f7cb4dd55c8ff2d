"""Regression tests for bugs found in review (each named after what went wrong)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from helpers import assert_trees_close
from torch import nn
from torch.func import grad

import funcdp
from funcdp._src.axes import DeviceComp, VmapComp


def test_backward_with_a_non_differentiable_argument_before_a_differentiable_one():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    funcdp.pmap(lambda a, w: (a * w).sum(), in_axes=(0, None))(x, w).sum().backward()
    assert_trees_close(w.grad, x.sum(0))
    w2 = w.detach().clone().requires_grad_()
    funcdp.pmap(lambda a, w: (a * w).sum(), in_axes=(0, None),
                devices=funcdp.local_devices()[:2])(x, w2).sum().backward()
    assert_trees_close(w2.grad, x.sum(0))


def test_grad_of_pmap_runs_the_function_once_per_device():
    calls = []

    def f(x, w):
        calls.append(1)
        return (x * w).sum()

    pf = funcdp.pmap(f, in_axes=(0, None))
    grad(lambda w: pf(torch.ones(4, 3), w).sum())(torch.ones(3))
    assert len(calls) == 4


def test_singleton_groups_and_concurrent_rounds_get_their_own_buffers():
    x = torch.arange(4.0).reshape(4, 1).expand(4, 20000).contiguous()
    out = funcdp.pmap(lambda v: funcdp.psum(v, "i", axis_index_groups=[[0], [1], [2], [3]]),
                      axis_name="i")(x)
    assert out.to_tensor()[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_devices_with_differently_laid_out_inputs_agree_on_the_reduction_path():
    def f(a):
        if int(funcdp.axis_index("i")) == 3:
            a = a.t().contiguous().t()  # same values, another memory layout
        return funcdp.psum(a, "i")

    with funcdp.config.override(collective_timeout=20):
        out = funcdp.pmap(f, axis_name="i")(torch.ones(4, 512, 512))
    assert float(out.shards[0][0, 0]) == 4.0


class Tied(nn.Module):
    """A decoder whose weight is the encoder's (one parameter, two names)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(2, 2, bias=False)
        self.dec = nn.Linear(2, 2, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.enc(x))


def test_tied_weights_are_tied_in_the_pure_function():
    m = Tied()
    f = funcdp.nn.functional(m)
    assert list(f.params) == ["enc.weight"]
    w = {"enc.weight": 2 * torch.eye(2)}
    assert_trees_close(f.apply(w, {}, torch.ones(1, 2))[0],
                       torch.func.functional_call(m, w, (torch.ones(1, 2),)))


def test_vmap_of_grad_of_pmap():
    x = torch.randn(4, 3, dtype=torch.float64)
    pf = funcdp.pmap(lambda a, w: (a * w).sin().sum(), in_axes=(0, None))
    ws = torch.randn(2, 3, dtype=torch.float64)
    got = torch.func.vmap(grad(lambda w: pf(x, w).sum()))(ws)
    want = torch.func.vmap(grad(lambda w: (x * w).sin().sum()))(ws)
    assert_trees_close(got, want)


def test_hessian_through_pmap_with_more_shards_than_devices():
    x = torch.randn(8, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)
    pf = funcdp.pmap(lambda a, w: (a * w).sin().sum(), in_axes=(0, None),
                     devices=funcdp.local_devices()[:4])
    got = torch.func.hessian(lambda w: pf(x, w).sum())(w)
    want = torch.func.hessian(lambda w: (x * w).sin().sum())(w)
    assert_trees_close(got, want)


def test_derivatives_when_the_function_also_returns_integers():
    x = torch.randn(4, 3, dtype=torch.float64)
    pf = funcdp.pmap(lambda a: ((a ** 2).sum(), a.argmax()))
    g = grad(lambda t: pf(t)[0].sum())(x)
    assert_trees_close(g, 2 * x)
    _, tangent = torch.func.jvp(lambda t: pf(t)[0], (x,), (torch.ones_like(x),))
    assert_trees_close(tangent, 2 * x.sum(1))


def test_vmap_of_pmap_with_none_outputs():
    f = funcdp.pmap(lambda a: (a * 2, None))
    out = funcdp.vmap(f)(torch.ones(3, 4))  # torch.func.vmap itself rejects None outputs
    assert out[1] is None
    assert_trees_close(out[0], torch.full((3, 4), 2.0))


def test_deadlock_inside_a_nested_pmap_is_detected_quickly():
    def inner(v):
        i, j = int(funcdp.axis_index("i")), int(funcdp.axis_index("j"))
        return funcdp.psum(v, "j") if i == j else funcdp.psum(v, "i")

    f = funcdp.pmap(lambda v: funcdp.pmap(inner, axis_name="j")(v), axis_name="i")
    start = time.monotonic()
    with funcdp.config.override(collective_timeout=30):
        try:
            f(torch.ones(2, 2))
        except funcdp.CollectiveError as e:
            assert "none can proceed" in str(e)
        else:
            raise AssertionError("expected a CollectiveError")
    assert time.monotonic() - start < 10


def test_nested_pmaps_from_two_threads_at_once():
    f = funcdp.pmap(lambda v: funcdp.pmap(lambda u: funcdp.psum(u, ("i", "j")),
                                          axis_name="j")(v), axis_name="i")
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(float(torch.as_tensor(f(torch.ones(2, 4)))[0, 0]))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    with funcdp.config.override(collective_timeout=30):
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and results == [8.0] * 10


def test_a_pmap_from_a_thread_a_device_function_waits_for_warns_after_the_timeout():
    # It waited for the outer call's turn forever, silently, and so did every later
    # top-level call. It cannot be told from a wait for a long call (which must not fail),
    # so after collective_timeout it warns, saying what to do, and waits on.
    import concurrent.futures
    import warnings

    inner = funcdp.pmap(lambda a: a * 2)

    pool = concurrent.futures.ThreadPoolExecutor(1)

    def step(a):
        job = pool.submit(lambda: inner(torch.ones(2)).to_tensor().sum())
        return job.result(timeout=3) + a  # (the user's own way out of the deadlock)

    with funcdp.config.override(collective_timeout=1), warnings.catch_warnings(
            record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(concurrent.futures.TimeoutError):
            funcdp.pmap(step, devices=funcdp.local_devices()[:2])(torch.ones(2))
        pool.shutdown(wait=True)  # (its call has its turn now, and finishes)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any("waited 1 s for its turn" in m and "step), called from thread 'MainThread'"
               in m and "device function's own thread" in m for m in messages), messages
    assert inner(torch.ones(2)).to_tensor().tolist() == [2.0, 2.0]  # (usable afterwards)


def test_a_call_waiting_for_a_long_call_in_another_thread_waits_on():
    # With the bounded wait, a call waiting more than collective_timeout for another
    # thread's long call failed.
    import warnings

    slow = funcdp.pmap(lambda a: (time.sleep(1.5), a + 1)[1], devices=funcdp.local_devices()[:2])
    quick = funcdp.pmap(lambda a: a * 3, devices=funcdp.local_devices()[:2])
    got = {}
    started = threading.Event()

    def run_slow():
        started.set()
        got["slow"] = slow(torch.ones(2)).to_tensor().tolist()

    with funcdp.config.override(collective_timeout=0.5), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = threading.Thread(target=run_slow)
        t.start()
        started.wait()
        time.sleep(0.2)
        got["quick"] = quick(torch.ones(2)).to_tensor().tolist()
        t.join(30)
    assert got == {"slow": [2.0, 2.0], "quick": [3.0, 3.0]}


def test_grad_mode_does_not_leak_between_calls_on_workers():
    def off(v):
        torch.set_grad_enabled(False)
        return v

    funcdp.pmap(off)(torch.ones(4))
    probe = funcdp.pmap(lambda v: torch.tensor(float(torch.is_grad_enabled())))
    assert probe(torch.ones(4)).to_tensor().tolist() == [1.0] * 4


def test_bool_pmax_with_groups_over_a_pmap_and_a_vmap_axis():
    x = torch.tensor([[True, False], [False, False]])
    f = funcdp.pmap(funcdp.vmap(lambda v: funcdp.pmax(v, ("i", "j"),
                                                      axis_index_groups=[[0, 1], [2, 3]]),
                                axis_name="j"), axis_name="i")
    assert f(x).to_tensor().tolist() == [[True, True], [False, False]]


def test_out_axes_errors_are_not_reported_as_a_device_failure():
    try:
        funcdp.pmap(lambda a: a, out_axes=(0, 0))(torch.ones(2))
    except ValueError as e:
        assert "Caught" not in str(e) and "`out_axes` (0, 0) does not match" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_replicated_parameter_that_requires_grad_gets_a_clear_message():
    w = torch.ones(3, requires_grad=True)
    try:
        funcdp.pmap(lambda w, x: (w * x).sum())(funcdp.replicate(w, funcdp.local_devices()[:2]),
                                                torch.ones(2, 3))
    except RuntimeError as e:
        assert "sharded values carry no gradients" in str(e)
    else:
        raise AssertionError("expected a RuntimeError")


def test_save_checkpoint_keeps_the_axis_of_equal_per_device_values_saved_as_tensors(tmp_path):
    # Bitwise equal shards are stored as replicated (a replicated training state's small
    # leaves are per-device copies); a tensor keeps its device axis.
    zeros = funcdp.pmap(lambda v: v * 0)(torch.ones(4))
    funcdp.save_checkpoint(tmp_path / "z.pt", {"z": zeros, "t": zeros.to_tensor()})
    back = funcdp.load_checkpoint(tmp_path / "z.pt")
    assert back["z"].shape == () and back["t"].shape == (4,)


def test_state_dict_of_a_tied_model_loads_strictly():
    f = funcdp.nn.functional(Tied())
    fresh = Tied()
    fresh.load_state_dict(f.state_dict(f.params, f.buffers))  # strict
    assert torch.equal(fresh.dec.weight, f.params["enc.weight"])


def test_pad_shard_unpad_leaves_replicated_outputs_alone():
    f = funcdp.pmap(lambda x: (x * 2, funcdp.psum(x.sum(), "i") * torch.ones(4, 3)),
                    axis_name="i", out_axes=(0, None))
    per_example, total = funcdp.pad_shard_unpad(f, static_argnums=(), num_devices=4)(
        torch.ones(10, 3))
    assert per_example.shape == (10, 3) and total.shape == (4, 3)
    assert float(total[0, 0]) == 30.0


def test_pmax_ties_across_devices_and_blocks_split_the_gradient_evenly():
    # Three tied maxima: two in device 0's block, one on device 2.
    x = torch.tensor([0.0, 2.0, 2.0, 1.0, 0.5, -1.0, 2.0, 0.0, 1.5], dtype=torch.float64)
    f = funcdp.pmap(lambda v: funcdp.pmax(v, "i"), axis_name="i",
                    devices=funcdp.local_devices()[:3])
    g = grad(lambda t: f(t).sum())(x)
    # Nine outputs, each with cotangent 1, all equal to the maximum: 9 / 3 ties = 3 each.
    assert_trees_close(g, torch.tensor([0, 3, 3, 0, 0, 0, 3, 0, 0], dtype=torch.float64))


def test_nested_pmap_drawing_random_numbers_does_not_deadlock():
    # The inner call's first draw takes the outer device's base under the same lock.
    d = funcdp.local_devices()
    inner = funcdp.pmap(lambda x: nn.functional.dropout(x, 0.5), axis_name="j", devices=d[:2])
    outer = funcdp.pmap(lambda x: inner(x), axis_name="i", devices=d[:2])
    out = outer(torch.ones(2, 2, 64)).to_tensor()
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert not torch.equal(out[0], out[1])


def test_nested_meshes_with_frequent_thread_switches():
    # Devices of a nested mesh join it as they arrive; leaving it must not race with a
    # participant that scans the states under the lock.
    import sys

    d = funcdp.local_devices()
    inner = funcdp.pmap(lambda v: funcdp.psum(v, "j") * 2, axis_name="j", devices=d[2:4])
    outer = funcdp.pmap(lambda x: inner(x), axis_name="i", devices=d[:2])
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        x = torch.ones(2, 2, 3)
        for _ in range(200):
            assert torch.equal(outer(x).to_tensor(), torch.full((2, 2, 3), 4.0))
    finally:
        sys.setswitchinterval(old)


def test_an_error_in_a_shared_optimizer_step_fails_at_once():
    # One device's share of a shared update raises: the others must not wait for it
    # until the collective timeout.
    from funcdp import optim

    opt = optim.sgd(0.1)
    params = {"a": torch.randn(2**15), "b": torch.zeros(2**14, dtype=torch.int64)}
    grads = {"a": torch.randn(2**15), "b": torch.ones(2**14, dtype=torch.int64)}
    f = funcdp.pmap(lambda _, g, p: opt.step(g, opt.init(p), p, axis_name="i"),
                    axis_name="i", in_axes=(0, None, None), out_axes=None,
                    devices=funcdp.local_devices()[:3])
    start = time.monotonic()
    with funcdp.config.override(collective_timeout=20):
        try:
            f(torch.zeros(3), grads, params)
        except Exception:  # noqa: BLE001 - whatever the kernel raises
            pass
        else:
            raise AssertionError("expected the int64 update to fail")
    assert time.monotonic() - start < 5


def test_optimizer_under_vmap_with_an_unbatched_first_leaf():
    from funcdp import optim

    for opt in (optim.sgd(0.1, momentum=0.9), optim.adam(0.01)):
        p_a, g_a = torch.randn(3), torch.randn(3)
        pb, gb = torch.randn(4, 5), torch.randn(4, 5)

        def step(pb, gb, opt=opt):
            params = {"a": p_a, "b": pb}
            return opt.step({"a": g_a, "b": gb}, opt.init(params), params)[0]["b"]

        out = torch.func.vmap(step)(pb, gb)
        for m in range(4):
            torch.testing.assert_close(out[m], step(pb[m], gb[m]), rtol=1e-6, atol=1e-7)


def test_shared_step_with_conjugate_views_is_not_shared():
    # Odd devices pass the conjugate view of the same storage: same data pointer and
    # strides, different values.
    from funcdp import optim

    opt = optim.sgd(0.1)
    n = 4
    p = torch.randn(2**15, dtype=torch.complex128)
    g = torch.randn(2**15, dtype=torch.complex128)
    views = [p if i % 2 == 0 else p.conj() for i in range(n)]

    def step(i, g, ps):
        pi = {"w": ps[int(i)]}
        return opt.step({"w": g}, opt.init(pi), pi, axis_name="i")[0]["w"]

    fn = funcdp.pmap(step, axis_name="i", in_axes=(0, None, None),
                     devices=funcdp.local_devices()[:n])
    out = fn(torch.arange(n), g, views).to_tensor()
    for i in range(n):
        assert torch.equal(out[i], views[i] - 0.1 * g)


def test_workers_stop_at_interpreter_exit():
    # Daemon workers cut off during finalization can abort the process from inside
    # torch's C++ code; at exit they are stopped first.
    import subprocess
    import sys

    code = (
        "import os, threading, atexit\n"
        "os.environ['FUNCDP_NUM_CPU_DEVICES'] = '4'\n"
        "import torch, funcdp\n"
        "from funcdp._src.executor import executor\n"
        "f = funcdp.pmap(lambda x: funcdp.psum(x * 2, 'i'), axis_name='i')\n"
        "f(torch.ones(4, 3))\n"
        "ex = executor()\n"
        "ex._stop_workers()\n"
        "alive = [w.thread.is_alive() for w in ex._workers.values()]\n"
        "print('alive', sum(alive), 'of', len(alive))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCDP_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "alive 0 of 3" in out.stdout, out.stdout


def test_optimizer_step_on_sharded_values_outside_pmap():
    # funcdp's own code sets aside only pmap's random routing, not __torch_function__
    # (which turns sharded values into tensors).
    opt = funcdp.optim.sgd(0.1)
    p = funcdp.replicate({"w": torch.ones(3)}, funcdp.local_devices()[:2])
    new, _ = opt.step(p, opt.init(p), p)
    assert torch.equal(new["w"], torch.full((2, 3), 0.9))


def test_optimizer_step_keeps_tensor_subclasses():
    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    opt = funcdp.optim.sgd(0.1)
    q = {"w": torch.ones(3).as_subclass(Tagged)}
    assert type(opt.step(q, opt.init(q), q)[0]["w"]) is Tagged


def test_collectives_respect_a_default_device_mode():
    with torch.device("meta"):
        out = funcdp.vmap(lambda v: v + funcdp.all_gather(1.0, "i"), axis_name="i")(
            torch.zeros(3))
    assert out.device.type == "meta"


def test_shared_optimizer_step_under_inference_mode():
    # Inference tensors carry no version counter: no sharing (which watches for writes).
    opt = funcdp.optim.sgd(0.5)
    n = 1 << 15
    w = {"w": torch.zeros(n)}
    f = funcdp.pmap(lambda x, g, s, p: opt.step(g, s, p, axis_name="i")[0]["w"],
                    axis_name="i", in_axes=(0, None, None, None),
                    devices=funcdp.local_devices()[:2])
    with torch.inference_mode():
        out = f(torch.zeros(2), {"w": torch.ones(n)}, opt.init(w), w)
    assert torch.equal(out.to_tensor(), torch.full((2, n), -0.5))


def _forward_ad_state():
    from torch._functorch import eager_transforms
    from torch.autograd import forward_ad

    return eager_transforms.JVP_NESTING, forward_ad._current_level


def test_jvp_jacfwd_and_hessian_inside_pmap_on_concurrent_devices():
    # torch.func.jvp keeps its nesting and forward-AD level in process globals: devices
    # running jvps at once wiped each other's tangents (silently wrong results).
    devs = funcdp.local_devices()[:4]

    def f(x):
        cube = lambda t: (t ** 3).sum()  # noqa: E731
        _, tan = torch.func.jvp(cube, (x,), (torch.ones_like(x),))
        jac = torch.func.jacfwd(lambda t: t ** 2)(x[:3])
        hess = torch.func.hessian(cube)(x[:3])
        return tan, jac, hess

    pf = funcdp.pmap(f, devices=devs)
    for size in (3, 50, 20000, 7, 100000):
        x = torch.randn(4, size, dtype=torch.float64)
        tan, jac, hess = (v.to_tensor() for v in pf(x))
        assert_trees_close(tan, (3 * x ** 2).sum(1))
        for i in range(4):
            assert_trees_close(jac[i], torch.diag(2 * x[i, :3]))
            assert_trees_close(hess[i], torch.diag(6 * x[i, :3]))
        assert _forward_ad_state() == (0, -1)


def test_forward_ad_state_is_restored_after_a_failing_call():
    def f(x):
        _, tan = torch.func.jvp(lambda t: t.sin(), (x,), (torch.ones_like(x),))
        if funcdp.axis_index("i") == 1:
            raise ValueError("device 1 fails")
        return tan

    with pytest.raises(ValueError, match="device 1 fails"):
        funcdp.pmap(f, axis_name="i", devices=funcdp.local_devices()[:2])(torch.zeros(2, 3))
    assert _forward_ad_state() == (0, -1)
    _, tan = torch.func.jvp(lambda t: t * 2, (torch.ones(2),), (torch.ones(2),))
    assert torch.equal(tan, torch.full((2,), 2.0))


def test_jvp_inside_pmap_within_a_callers_dual_level():
    from torch.autograd import forward_ad

    devs = funcdp.local_devices()[:4]
    pf = funcdp.pmap(lambda x: torch.func.jvp(lambda t: (t ** 3).sum(), (x,),
                                              (torch.ones_like(x),))[1], devices=devs)
    with forward_ad.dual_level():
        for size in (5, 20000, 100000):
            x = torch.randn(4, size, dtype=torch.float64)
            assert_trees_close(pf(x).to_tensor(), (3 * x ** 2).sum(1))
        assert _forward_ad_state() == (0, 0)
    assert _forward_ad_state() == (0, -1)


def test_nested_pmap_running_more_shards_than_its_devices():
    # Each of the 4 outer devices gets 2 devices for the inner pmap over 4 shards, which
    # then runs a vmap of 2 per device: its name resolves to (mesh axis 1 of size 2, vmap
    # level 1 of size 2). Compared as plain tuples those two were "the same axis twice".
    def g(v):
        return v * funcdp.psum(v, "j") + funcdp.axis_index("j") + funcdp.axis_index("i")

    inner = funcdp.pmap(g, axis_name="j")
    x = torch.arange(16.0).reshape(4, 4)
    out = funcdp.pmap(lambda v: inner(v), axis_name="i")(x)
    want = torch.stack([r * r.sum() + torch.arange(4) + i for i, r in enumerate(x)])
    assert torch.equal(torch.as_tensor(out), want)
    assert DeviceComp(1, 2) != VmapComp(1, 2) and len({DeviceComp(1, 2), VmapComp(1, 2)}) == 2


def test_nested_pmaps_given_the_same_inner_devices_do_not_deadlock():
    # Both outer devices run their inner pmap on devices 0 and 1: the two inner calls'
    # device-1 shares used to queue on one worker, the first waiting in the collective
    # for the second, which waited behind it (until the collective timeout).
    devs = funcdp.local_devices()
    inner = funcdp.pmap(lambda u: funcdp.psum(u, ("i", "j")) + funcdp.axis_index(("i", "j")),
                        axis_name="j", devices=devs[:2])
    outer = funcdp.pmap(lambda v: inner(v), axis_name="i", devices=devs[2:4])
    x = torch.arange(4.0).reshape(2, 2)
    with funcdp.config.override(collective_timeout=10):
        for _ in range(3):
            out = torch.as_tensor(outer(x))
    assert torch.equal(out, x.sum() + torch.arange(4.0).reshape(2, 2))


def test_save_checkpoint_keeps_the_device_axis_of_empty_shards(tmp_path):
    # Empty shards share an address without sharing a value: not taken as replicated.
    path = tmp_path / "c.pt"
    funcdp.save_checkpoint(path, {"v": funcdp.pmap(lambda a: a)(torch.zeros(4, 0))})
    assert funcdp.load_checkpoint(path)["v"].shape == (4, 0)


def test_global_norm_in_the_promoted_dtype_of_the_leaves():
    torch.manual_seed(0)
    grads = {"a": torch.randn(10).bfloat16(), "b": torch.randn(1000, dtype=torch.float64)}
    norm = funcdp.optim.global_norm(grads)
    want = torch.linalg.vector_norm(torch.cat([g.double() for g in grads.values()]))
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, want, rtol=1e-3, atol=0)
    # Clipping scales every leaf by the factor from that norm (clip_grad_norm_'s rule).
    factor = (1.0 / (norm + 1e-6)).clamp(max=1.0)
    clipped, _ = funcdp.optim.clip_by_global_norm(1.0).update(grads, {})
    for got, g in zip(clipped.values(), grads.values()):
        torch.testing.assert_close(got, g * factor.to(g.dtype))


def test_device_exceptions_keep_their_type_and_attributes():
    import errno

    class Coded(Exception):
        def __init__(self, code, detail):
            super().__init__(code, detail)

    def raise_on_1(exc):
        def f(a):
            if int(funcdp.axis_index("i")) == 1:
                raise exc()
            return a
        return funcdp.pmap(f, "i")

    with pytest.raises(Coded) as info:
        raise_on_1(lambda: Coded(7, "detail"))(torch.ones(4))
    assert info.value.args == (7, "detail")
    with pytest.raises(FileNotFoundError) as info2:
        raise_on_1(lambda: FileNotFoundError(errno.ENOENT, "missing", "/x"))(torch.ones(4))
    assert info2.value.errno == errno.ENOENT and info2.value.filename == "/x"
    if hasattr(info2.value, "__notes__"):
        assert "on device 1 (CpuDevice(id=1))" in info2.value.__notes__[-1]
    # A KeyError's argument is the key, and a class with a __str__ of its own formats its
    # arguments: both were rewritten into "Caught ..." messages (KeyError("Caught ... 'w'")).

    class Code(Exception):
        def __str__(self):
            return f"error code {self.args[0]}"

    with pytest.raises(KeyError) as info3:
        raise_on_1(lambda: {}["w"])(torch.ones(4))
    assert info3.value.args == ("w",)
    with pytest.raises(Code) as info4:
        raise_on_1(lambda: Code(42))(torch.ones(4))
    assert str(info4.value) == "error code 42"


def test_out_axes_none_accepts_a_nan_that_is_the_same_everywhere():
    # Replicas are compared bit for bit: a diverged loss (NaN on every device) is returned,
    # not reported as differing across devices.
    x = torch.ones(4)
    x[2] = float("nan")
    f = funcdp.pmap(lambda a: funcdp.pmean(a, "i"), "i", out_axes=None)
    assert torch.isnan(f(x))
    assert torch.isnan(funcdp.pmap(lambda a: funcdp.pmean(a, "i"), "i", out_axes=None)(
        torch.cat([x, x])))  # more shards than devices: the per-device block check
    with pytest.raises(ValueError, match="differs across devices"):
        funcdp.pmap(lambda a: a, "i", out_axes=None)(torch.arange(4.0))


def test_dict_prefixes_match_by_key_not_insertion_order():
    f = funcdp.pmap(lambda d: d["a"] * d["b"], in_axes=({"a": 0, "b": None},))
    out = f({"b": torch.tensor(2.0), "a": torch.arange(4.0)})
    assert torch.equal(out.to_tensor(), torch.arange(4.0) * 2)
    g = funcdp.pmap(lambda v: {"z": v * 2, "y": funcdp.psum(v, "i")}, "i",
                    out_axes={"y": None, "z": 0})
    res = g(torch.arange(4.0))
    assert torch.equal(res["z"].to_tensor(), torch.arange(4.0) * 2)
    assert float(res["y"]) == 6.0


def test_the_callers_torch_modes_reach_every_device():
    # Function and dispatch modes around a call (a torch.device context, a FLOP counter)
    # apply to every device, whether a plan runs its devices on the calling thread or
    # on the workers.
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountMul(TorchFunctionMode):
        n = 0

        def __torch_function__(self, fn, types, args=(), kwargs=None):
            CountMul.n += fn is torch.Tensor.mul
            return fn(*args, **(kwargs or {}))

    f = funcdp.pmap(lambda a: a * 2)
    for call in range(8):  # the plan runs inline after its first calls
        CountMul.n = 0
        with CountMul():
            f(torch.ones(4))
        assert CountMul.n == 4, call
    x = torch.ones(4)
    with torch.device("meta"):
        out = funcdp.pmap(lambda a: torch.zeros(2))(x)
    assert all(s.device.type == "meta" for s in out.shards)
    w = torch.randn(4, 8, 8)
    with FlopCounterMode(display=False) as counter:
        funcdp.pmap(lambda m: m @ m)(w)
    assert counter.get_total_flops() == 4 * 2 * 8 ** 3


def test_out_axes_none_takes_signed_zeros_as_equal():
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    assert float(funcdp.pmap(lambda v: v.sum() * 0, out_axes=None)(x)) == 0.0


def test_a_reduction_buffer_whose_storage_the_user_holds_is_not_reused():
    # torch keeps one Python object per storage: a user who keeps only the storage of a
    # large psum result (not the tensor) still refers to its memory, which the buffer
    # pool must not hand out again.
    n = 1 << 17
    f = funcdp.pmap(lambda v: funcdp.psum(v, "i"), axis_name="i", out_axes=None,
                    devices=funcdp.local_devices()[:2])
    out = f(torch.ones(2, n))
    storage, was = out.untyped_storage(), out.clone()
    del out
    for _ in range(3):
        f(torch.full((2, n), 5.0))
    seen = torch.empty(0).set_(storage, 0, was.shape)
    assert torch.equal(seen, was)


def test_devices_working_out_the_output_axes_at_once(monkeypatch):
    # Found in review: on a plan's first call every device works out the output axes of
    # the structure it returned; a device that found the axes but not yet their checks
    # (another device between storing one and the other) failed with a KeyError. (Axes
    # and checks are now one entry; the store is slowed to let the devices meet there.)
    from funcdp._src import pmap as pmap_mod

    class SlowDict(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            time.sleep(0.05)  # the other device's thread runs meanwhile

    init = pmap_mod._Plan.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.out_plans = SlowDict()

    monkeypatch.setattr(pmap_mod._Plan, "__init__", slow_init)
    devs = funcdp.local_devices()[:2]
    out = funcdp.pmap(lambda x: x * 2, devices=devs)(torch.arange(2.0))
    assert_trees_close(out.to_tensor(), torch.tensor([0.0, 2.0]))
    a, b = funcdp.pmap(lambda x: (x, x + 1), out_axes=(0, -1), devices=devs)(torch.ones(2, 3))
    assert a.shape == (2, 3) and b.shape == (3, 2)


def test_reduction_buffers_kept_are_bounded(monkeypatch):
    # Found in review: the pool kept up to 4 buffers of every size ever reduced (a psum
    # over sequences of 40 lengths held 51 MB for good); it keeps the newest sizes only.
    from funcdp._src import collectives

    pool = collectives._BufferPool()
    monkeypatch.setattr(collectives, "_pool", pool)
    monkeypatch.setattr(pool, "_KEYS", 3)
    f = funcdp.pmap(lambda v: funcdp.psum(v, "i"), axis_name="i", out_axes=None,
                    devices=funcdp.local_devices()[:2])
    base = collectives._POOL_MIN_NUMEL
    for k in range(1, 7):
        x = torch.arange(2.0 * base * k).reshape(2, base * k)
        assert_trees_close(f(x), x.sum(0))
    if pool._enabled:
        assert [numel for numel, _ in pool._free] == [base * k for k in (4, 5, 6)]
    assert_trees_close(f(torch.ones(2, base * 4)), torch.full((base * 4,), 2.0))
    assert_trees_close(f(torch.ones(2, base * 7)), torch.full((base * 7,), 2.0))
    if pool._enabled:  # (the most recently used sizes, not the first kept)
        assert [numel for numel, _ in pool._free] == [base * k for k in (6, 4, 7)]


def test_reduction_buffers_are_reused():
    # A buffer nobody refers to any more is handed out again (a constant in the pool's
    # check had gone stale: it never reused one), and one still referred to is not.
    from funcdp._src import collectives

    pool = collectives._BufferPool()
    if not pool._enabled:
        pytest.skip("this torch cannot count a storage's users")
    n = collectives._POOL_MIN_NUMEL
    first = pool.get(n, torch.float32)
    kept = first.data_ptr()  # (the pool holds the buffer: no other allocation gets it)
    view = first[1:]
    del first
    second = pool.get(n, torch.float32)
    assert second.data_ptr() != kept  # (a view of the first is alive)
    del view, second
    assert pool.get(n, torch.float32).data_ptr() == kept


@pytest.mark.parametrize("call", ["tree_flatten", "tree_leaves", "tree_map", "tree_structure"])
def test_each_pytree_entry_point_knows_registered_dataclasses(call):
    # register_dataclass reaches torch's Python pytree library only; each of funcdp's
    # fast entry points brings its own registry in line first (or took it for a leaf).
    import dataclasses

    import torch.utils._pytree as pt

    from funcdp._src import tree as tree_util

    cls = dataclasses.make_dataclass(f"Fresh_{call}", [("a", object), ("b", object)])
    pt.register_dataclass(cls)
    value = cls(torch.ones(1), torch.zeros(1))
    fn = getattr(tree_util, call)
    result = fn(lambda t: t + 1, value) if call == "tree_map" else fn(value)
    if call == "tree_flatten":
        assert len(result[0]) == 2
    elif call == "tree_leaves":
        assert len(result) == 2
    elif call == "tree_map":
        assert_trees_close((result.a, result.b), (torch.full((1,), 2.0), torch.ones(1)))
    else:
        assert result.num_leaves == 2


@pytest.mark.parametrize("op", ["psum", "pmean", "pmax"])
def test_reduction_over_a_vmap_axis_of_size_one(op):
    # Over one participant the reduction is the identity, but over a vmap axis its result
    # must come out unbatched (it came back still varying along the axis: out_axes=None
    # failed, and SyncBatchNorm's running statistics could not be updated).
    x = torch.randn(1, 4)
    out = funcdp.vmap(lambda v: getattr(funcdp, op)(v, "i"), axis_name="i", out_axes=None)(x)
    assert_trees_close(out, x[0])
    bn = funcdp.nn.SyncBatchNorm(4, axis_name="i")
    y = torch.randn(1, 3, 4)
    ref = torch.nn.BatchNorm1d(4)
    assert_trees_close(funcdp.vmap(bn, axis_name="i")(y)[0], ref(y[0]), atol=1e-6)
    assert_trees_close((bn.running_mean, bn.running_var), (ref.running_mean, ref.running_var),
                       atol=1e-6)


def test_vmap_takes_none_in_a_mapped_argument():
    # None is an empty subtree, as in pmap and JAX (vmap rejected it as a NoneType mapped
    # over axis 0).
    def f(x, mask):
        x = x if mask is None else x * mask
        return x - funcdp.pmean(x, "i")

    x = torch.randn(4, 3)
    want = x - x.mean(0)
    assert_trees_close(funcdp.vmap(f, axis_name="i")(x, None), want)
    assert_trees_close(funcdp.pmap(f, axis_name="i")(x, None).to_tensor(), want)


def test_vmap_error_for_a_mapped_number_suggests_a_fix_that_applies():
    # Keyword arguments cannot take in_axes=None: the fix names what can be done.
    f = funcdp.vmap(lambda x, b=1.0: x * b)
    with pytest.raises(TypeError, match=r"argument args\[1\] is a float mapped over axis 0; "
                                        r"only tensors can be mapped \(use in_axes=None"):
        f(torch.ones(2), 2.0)
    with pytest.raises(TypeError, match=r"argument kwargs\['b'\] is a float mapped over axis "
                                        r"0; only tensors can be mapped \(pass it positionally "
                                        r"with in_axes=None for it, or let the function capture"):
        f(torch.ones(2), b=2.0)


def test_vmap_out_axes_errors_name_the_output_leaf_by_path():
    with pytest.raises(ValueError, match=r"out_axes=None for output\['a'\]\[1\], but it varies"):
        funcdp.vmap(lambda x: {"a": [torch.zeros(()), x]}, out_axes=None)(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"out_axes=None for the output, but it varies"):
        funcdp.vmap(lambda x: x, out_axes=None)(torch.ones(2))
    with pytest.raises(ValueError, match=r"out_axes entry 3 is out of range for "
                                         r"output\['b'\] of rank 1"):
        funcdp.vmap(lambda x: {"b": x}, out_axes=3)(torch.ones(2, 3))


def test_a_recomputed_forward_pass_runs_under_the_autocast_it_ran_with():
    # create_graph=True recomputes the devices' forward passes in the backward pass: under
    # the forward pass's autocast (it ran in float32, a different function), and not under
    # an autocast active only around the backward pass.
    torch.manual_seed(0)
    w0, x = torch.randn(8, 8), torch.randn(2, 4, 8)

    def f(w, x):
        return (x @ w).float().pow(2).sum()

    pf = funcdp.pmap(f, in_axes=(None, 0), devices=funcdp.local_devices()[:2])

    def grad_of(fun, forward_autocast, backward_autocast):
        w = w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            out = fun(w)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_autocast):
            return torch.autograd.grad(out, w, create_graph=True)[0].detach()

    for forward_autocast, backward_autocast in ((True, False), (False, True)):
        want = grad_of(lambda w: sum(f(w, x[i]) for i in range(2)), forward_autocast,
                       backward_autocast)
        got = grad_of(lambda w: pf(w, x).sum(), forward_autocast, backward_autocast)
        assert_trees_close(got, want, rtol=1e-2, atol=1e-2)
    # (The two cases differ: bfloat16 products against float32 ones.)
    assert not torch.allclose(grad_of(lambda w: pf(w, x).sum(), True, False),
                              grad_of(lambda w: pf(w, x).sum(), False, True), atol=1e-2)


@pytest.mark.parametrize("n", [2, 4])
def test_settings_a_device_function_changes_for_good_do_not_outlive_its_call(n):
    # Autocast and the intra-op thread count, switched with torch.set_* inside a device's
    # function, stayed so on the workers (later calls ran devices 1.. under autocast) and
    # in the caller's thread.
    x = torch.ones(n, 2)
    devs = funcdp.local_devices()[:n]

    def state(a):
        return a[:1] * 0 + torch.tensor([float(torch.is_autocast_enabled("cpu")),
                                         float(torch.get_num_threads()),
                                         float(torch.get_autocast_dtype("cpu").itemsize)])

    def caller_state():
        return (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                torch.get_num_threads(), torch.is_grad_enabled())

    probe = funcdp.pmap(state, devices=devs)
    before = probe(x).to_tensor()
    caller = caller_state()

    def sloppy(a):
        torch.set_autocast_enabled("cpu", True)
        torch.set_autocast_dtype("cpu", torch.float16)
        torch.set_num_threads(3)
        torch.set_grad_enabled(False)
        return a

    funcdp.pmap(sloppy, devices=devs)(x)
    assert caller_state() == caller
    assert torch.equal(probe(x).to_tensor(), before)
    assert not before[:, 0].any()  # (no autocast on any device)


def test_an_interrupt_on_any_device_is_raised_before_other_errors():
    # Device 0's ordinary error was raised and device 1's KeyboardInterrupt only listed.
    def f(x):
        if int(funcdp.axis_index("i")) == 0:
            raise ValueError("device 0 fails")
        raise KeyboardInterrupt

    g = funcdp.pmap(f, axis_name="i", devices=funcdp.local_devices()[:2])
    with pytest.raises(KeyboardInterrupt):
        g(torch.ones(2))
    again = funcdp.pmap(lambda x: x + 1, devices=funcdp.local_devices()[:2])(torch.ones(2))
    assert again.to_tensor().tolist() == [2.0, 2.0]  # (the pool still works)


def test_forward_mode_through_pmap_leaves_inputs_without_tangents_alone():
    # jvp/jacfwd/hessian of a pmap whose eval-mode batch_norm reads running statistics
    # raised "not differentiable with respect to argument 'running_mean'": the
    # recomputation gave every input a tangent (torch.func passes zeros for inputs that
    # have none).
    import torch.nn.functional as F
    from torch.func import hessian, jacfwd, jvp

    gen = torch.Generator().manual_seed(0)
    rm = torch.randn(3, generator=gen, dtype=torch.float64)
    rv = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    x = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64)

    def f(w, rm, rv, x):
        return (F.batch_norm(x, rm, rv, weight=w, training=False) ** 3).sum()

    pf = funcdp.pmap(f, in_axes=(None, None, None, 0))

    def ref(w):
        return torch.stack([f(w, rm, rv, x[i]) for i in range(4)])

    def through_pmap(w):
        out = pf(w, rm, rv, x)
        return out if isinstance(out, torch.Tensor) else out.to_tensor()

    t = torch.randn(3, generator=gen, dtype=torch.float64)
    assert_trees_close(jvp(through_pmap, (w,), (t,)), jvp(ref, (w,), (t,)))
    assert_trees_close(jacfwd(through_pmap)(w), jacfwd(ref)(w))
    assert_trees_close(hessian(lambda w: through_pmap(w).sum())(w),
                       hessian(lambda w: ref(w).sum())(w))


class _Center(torch.autograd.Function):
    """x minus its mean over axis "i", with a backward that calls a collective."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x - funcdp.pmean(x.mean(), "i")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        n = funcdp.axis_size("i")
        return g - funcdp.psum(g.mean(), "i") / n


@pytest.mark.parametrize("shards", [2, 4])
def test_collectives_in_a_custom_backward_with_more_shards_than_devices(shards):
    # With 2 shards per device, the backward's collective reached the devices only
    # (axis_size said 2, not 4): silently wrong gradients.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shards, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(shards, 3, generator=gen, dtype=torch.float64)
    f = funcdp.pmap(lambda v: _Center.apply(v) ** 2, axis_name="i",
                    devices=funcdp.local_devices()[:2])

    def loss(v):
        out = f(v)
        return ((out if isinstance(out, torch.Tensor) else out.to_tensor()) * w).sum()

    want = torch.func.grad(lambda v: (((v - v.mean()) ** 2) * w).sum())(x)
    xr = x.clone().requires_grad_()
    loss(xr).backward()
    assert_trees_close(xr.grad, want)
    assert_trees_close(torch.func.grad(loss)(x), want)


def test_is_grads_batched_through_a_collective_says_what_to_use():
    # It failed on the devices with "Batching rule not implemented for aten::add.out".
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cts = torch.randn(5, 2, 3, dtype=torch.float64)
    kw = {"axis_name": "i", "devices": funcdp.local_devices()[:2]}
    plain = funcdp.pmap(torch.sin, **kw)(x)  # (without a collective it works)
    (g,) = torch.autograd.grad(plain, x, cts, is_grads_batched=True)
    assert_trees_close(g, cts * torch.cos(x.detach()))
    out = funcdp.pmap(lambda v: torch.sin(v) + funcdp.pmean(v, "i"), **kw)(x)
    with pytest.raises(NotImplementedError, match=r"(?s)is_grads_batched=True.*torch.func.vmap"):
        torch.autograd.grad(out, x, cts, is_grads_batched=True)


def test_empty_batches_under_transforms_of_pmap():
    # vmap/jacrev/jacfwd of a pmap over an empty batch raised "`axis_size` must be a
    # positive int, got 0" from the pmap's own vmap rule.
    from torch.func import jacfwd, jacrev, vmap

    z = torch.zeros(2, 0, 3, dtype=torch.float64)
    pf = funcdp.pmap(lambda a: funcdp.psum(a, "i") * a, axis_name="i",
                     devices=funcdp.local_devices()[:2])

    def ref(z):
        return z.sum(0) * z

    assert jacrev(pf)(z).shape == jacrev(ref)(z).shape == (2, 0, 3, 2, 0, 3)
    assert jacfwd(pf)(z).shape == jacfwd(ref)(z).shape
    assert vmap(pf)(torch.zeros(0, 2, 5)).shape == (0, 2, 5)
    assert funcdp.vmap(lambda: torch.ones(2), axis_size=0)().shape == (0, 2)
    with pytest.raises(ValueError, match="`axis_size` must be a non-negative int, got -1"):
        funcdp.vmap(lambda: torch.ones(2), axis_size=-1)


def test_vmap_refusals_with_more_shards_than_devices_say_where_the_vmap_is():
    # torch's "vmap: It looks like you're calling .item()" said nothing of a vmap the
    # user never wrote (2 shards per device run as one).
    f = funcdp.pmap(lambda v: v * float(v.sum().item()), devices=funcdp.local_devices()[:2])
    assert f(torch.ones(2, 3)).to_tensor().tolist() == [[3.0] * 3] * 2  # (a shard per device)
    with pytest.raises(RuntimeError, match=r"(?s)calling \.item\(\).*runs 4 shards on 2 "
                                           r"devices.*FUNCDP_NUM_CPU_DEVICES=4"):
        f(torch.ones(4, 3))


def test_a_reentrant_checkpoint_in_a_pmap_says_why_grad_is_involved():
    # torch's message blamed .grad() or `inputs`, which the user's .backward() never used.
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    f = funcdp.pmap(lambda a: checkpoint(torch.sin, a, use_reentrant=True),
                    devices=funcdp.local_devices()[:2])
    with pytest.raises(RuntimeError, match=r"(?s)use_reentrant=True.*torch\.autograd\.grad, "
                                           r"which a reentrant checkpoint refuses"):
        f(x).sum().backward()


def test_a_nested_call_waiting_for_an_outer_device_that_finished_fails_at_once():
    # The inner devices waited out the collective timeout, and the message did not name
    # the outer device that had finished.
    def only_first(a):
        if int(funcdp.axis_index("i")) == 0:
            inner = funcdp.pmap(lambda b: funcdp.psum(b, "i"), axis_name="j")
            return inner(a).to_tensor().sum()
        return a.sum()

    n = funcdp.local_device_count()  # (each outer device's inner pmap gets one of them)
    f = funcdp.pmap(only_first, axis_name="i")
    start = time.monotonic()
    with funcdp.config.override(collective_timeout=30), pytest.raises(
            funcdp.CollectiveError, match=r"(?s)device \(\d, 0\) never made this nested pmap "
                                          r"call: its outer device finished the function"):
        f(torch.ones(n, 1))
    assert time.monotonic() - start < 10
    # Nested calls that only the inner axis joins are unaffected.
    g = funcdp.pmap(lambda a: funcdp.pmap(lambda b: funcdp.psum(b, "j"), axis_name="j")(a)
                    if int(funcdp.axis_index("i")) == 0 else a + 1, axis_name="i")
    assert g(torch.ones(n, 1)).to_tensor().tolist() == [[1.0]] + [[2.0]] * (n - 1)


def test_value_and_grad_and_pad_shard_unpad_check_their_function_when_made():
    # value_and_grad(3) and pad_shard_unpad(3) failed only when called ("'int' object is
    # not callable"); value_and_grad(argnums="0") raised torch.func's RuntimeError.
    with pytest.raises(TypeError, match=r"funcdp.value_and_grad: `fun` must be callable"):
        funcdp.value_and_grad(3)
    with pytest.raises(TypeError, match=r"`argnums` must be an int or a non-empty tuple of "
                                        r"ints .*got a str: '0'"):
        funcdp.value_and_grad(lambda w: w.sum(), argnums="0")
    with pytest.raises(TypeError, match=r"pad_shard_unpad: `fn` must be callable"):
        funcdp.pad_shard_unpad(3)


def test_a_pmap_nested_in_more_shards_than_devices_is_refused_without_the_vmap_note():
    # funcdp's own refusal mentions "a vmap per device"; the note about torch's vmap
    # refusals (.item(), hooks) was appended to it, pointing at unrelated causes.
    inner = funcdp.pmap(lambda b: b * 2)
    f = funcdp.pmap(lambda a: inner(a[None])[0], axis_name="i",
                    devices=funcdp.local_devices()[:2])
    with pytest.raises(NotImplementedError, match="give the outer pmap at most") as info:
        f(torch.ones(4, 3))
    assert "Note:" not in str(info.value)


def test_ops_without_a_batching_rule_get_the_vmap_note_with_more_shards_than_devices():
    # "Batching rule not implemented for aten::lstm.input" does not say "vmap".
    lstm = nn.LSTM(3, 4).requires_grad_(False)
    f = funcdp.pmap(lambda a: lstm(a)[0], devices=funcdp.local_devices()[:2])
    with pytest.raises(RuntimeError, match=r"(?s)Batching rule not implemented.*runs 4 "
                                           r"shards on 2 devices"):
        f(torch.ones(4, 5, 2, 3))
