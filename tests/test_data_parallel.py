"""funcdp.DataParallel: nn.DataParallel's interface on the functional core."""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import funcdp


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0),
                         nn.Linear(16, 3)).double()


@pytest.mark.parametrize("batch", [16, 10, 3])
def test_training_matches_the_bare_module_on_one_device(batch):
    """Losses, parameters and running statistics, with torch.optim.SGD, several steps."""
    model, ref = bn_net(), bn_net()
    dp = funcdp.DataParallel(model, device_ids=[0, 1, 2, 3])
    opt = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (batch,), generator=g)
        loss = nn.functional.cross_entropy(dp(x), y)
        rloss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        ropt.zero_grad()
        loss.backward()
        rloss.backward()
        opt.step()
        ropt.step()
        assert_trees_close(loss, rloss)
        assert_trees_close(dict(model.named_parameters()), dict(ref.named_parameters()),
                           rtol=1e-10, atol=1e-12)
        assert_trees_close(dict(model.named_buffers()), dict(ref.named_buffers()),
                           rtol=1e-10, atol=1e-12)
    dp.eval()
    ref.eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    assert_trees_close(dp(x), ref(x))


class Pair(collections.namedtuple("Pair", "a b")):
    pass


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, inputs, scale, *, extra=None, flag=True):
        x, d = inputs
        out = self.lin(x) * scale + d["v"] + extra.a
        return {"out": [out, Pair(out.sum(-1), extra.b)], "flag": flag, "none": None}


def test_nested_inputs_and_outputs_round_trip():
    torch.manual_seed(0)
    m = Nested()
    dp = funcdp.DataParallel(m)
    x = torch.randn(6, 3)
    d = {"v": torch.randn(6, 3)}
    extra = Pair(torch.randn(6, 3), torch.randn(6))
    got = dp((x, d), 2.0, extra=extra, flag=False)
    want = m((x, d), 2.0, extra=extra, flag=False)
    assert got["flag"] is False and got["none"] is None
    assert isinstance(got["out"][1], Pair)
    assert_trees_close(got["out"], want["out"])


class Probe(nn.Module):
    """``x * w``, calling ``record(self)`` on every replica's forward."""

    def __init__(self, n, record):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.record = record

    def forward(self, x):
        self.record(self)
        return x * self.w


def test_fewer_examples_than_devices_and_output_device():
    torch.manual_seed(0)
    seen = []
    probe = Probe(2, lambda m: seen.append(int(funcdp.axis_size("funcdp.DataParallel"))))
    dp = funcdp.DataParallel(probe, output_device="cpu")
    out = dp(torch.ones(3, 2))
    assert seen == [3, 3, 3] and out.shape == (3, 2)
    assert dp.output_device == torch.device("cpu")
    assert dp.device_ids == list(range(8)) and dp.dim == 0


def test_scatter_along_another_dim():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    dp = funcdp.DataParallel(lin, dim=1)
    x = torch.randn(3, 8, 4)
    assert_trees_close(dp(x), lin(x), rtol=1e-6, atol=1e-6)


def test_without_sync_batchnorm_running_stats_are_averaged_over_replicas():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).double()
    dp = funcdp.DataParallel(bn, device_ids=[0, 1], sync_batchnorm=False)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = dp(x)
    halves = [x[:4], x[4:]]
    want = torch.cat([(h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
                      for h in halves])
    assert_trees_close(out, want.detach(), rtol=1e-9, atol=1e-12)
    mean = sum(0.1 * h.mean(0) for h in halves) / 2
    var = sum(0.9 + 0.1 * h.var(0, unbiased=True) for h in halves) / 2
    assert_trees_close(bn.running_mean, mean)
    assert_trees_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 1


def test_parameters_are_not_copied_on_cpu_devices():
    ptrs = []
    p = Probe(1000, lambda m: ptrs.append(m.w.data_ptr()))
    funcdp.DataParallel(p, device_ids=[0, 1])(torch.ones(2, 1000))
    assert ptrs and set(ptrs) == {p.w.data_ptr()}


def test_autocast_dtype_is_respected_in_every_replica():
    lin = nn.Linear(4, 4)
    dp = funcdp.DataParallel(lin, device_ids=[0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dp(torch.randn(6, 4))
    assert out.dtype == torch.bfloat16


def test_state_dicts_move_between_nn_data_parallel_and_funcdp():
    torch.manual_seed(0)
    src = bn_net()
    torch_dp = nn.DataParallel(src)  # on a machine without GPUs it just wraps
    saved = torch_dp.state_dict()
    assert all(k.startswith("module.") for k in saved)
    target = funcdp.DataParallel(bn_net())
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    target.load_state_dict(saved)
    assert_trees_close(target.state_dict(), src.state_dict())
    bare = bn_net()
    bare.load_state_dict(target.state_dict())  # plain keys: loads into the bare module
    back = nn.DataParallel(bn_net())
    back.module.load_state_dict(target.state_dict())
    assert_trees_close(back.state_dict(), saved)


def test_errors():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        funcdp.DataParallel(lambda x: x)
    with pytest.raises(ValueError, match="device index 9 is out of range"):
        funcdp.DataParallel(nn.Linear(1, 1), device_ids=[9])
    dp = funcdp.DataParallel(nn.Bilinear(2, 2, 1))
    with pytest.raises(ValueError, match="different sizes along dim 0"):
        dp(torch.ones(4, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="no tensor input to scatter"):
        funcdp.DataParallel(nn.Identity())(3)


@pytest.mark.gpu
def test_matches_nn_data_parallel_on_gpu():
    torch.manual_seed(0)
    model = bn_net().float().cuda()
    ref = nn.DataParallel(bn_net().float().cuda(), device_ids=[0])
    dp = funcdp.DataParallel(model)
    x = torch.randn(16, 5, device="cuda")
    ref.eval()
    dp.eval()
    assert_trees_close(dp(x), ref(x), rtol=1e-5, atol=1e-5)
    dp(x).sum().backward()
    ref(x).sum().backward()
    for a, b in zip(model.parameters(), ref.module.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_replicas_follow_the_module_as_it_is_now():
    # As nn.DataParallel replicates on every call: a BatchNorm set to eval inside a
    # training model stays in eval (its running statistics untouched), and attributes
    # set after wrapping are used.
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    dp = funcdp.DataParallel(m, device_ids=[0, 1])
    dp(x)
    m[1].eval()
    before = m[1].running_mean.clone()
    assert_trees_close(dp(x), m(x))
    assert torch.equal(m[1].running_mean, before)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()
            self.scale = 1.0

        def forward(self, v):
            return self.lin(v) * self.scale

    s = Scaled()
    ds = funcdp.DataParallel(s, device_ids=[0, 1])
    ds(x)
    s.scale = 5.0
    assert_trees_close(ds(x), s(x))


def test_state_dict_round_trip_as_a_submodule():
    # A parent saves and loads its children itself: the plain keys must work there too.
    torch.manual_seed(0)
    parent = nn.Module()
    parent.dp = funcdp.DataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    sd = parent.state_dict()
    assert list(sd) == ["dp.0.weight", "dp.0.bias", "dp.1.weight", "dp.1.bias",
                        "dp.1.running_mean", "dp.1.running_var", "dp.1.num_batches_tracked"]
    other = nn.Module()
    other.dp = funcdp.DataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # nn.DataParallel's layout (dp.module.*) loads as well.
    ref = nn.Module()
    ref.dp = nn.DataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    other.load_state_dict(ref.state_dict())
    assert torch.equal(other.dp.module[0].weight, ref.dp.module[0].weight)


def test_load_state_dict_reports_keys_as_state_dict_names_them():
    dp = funcdp.DataParallel(nn.Linear(2, 2))
    sd = dict(dp.state_dict())
    sd["bogus"] = torch.ones(1)
    del sd["bias"]
    result = dp.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["bogus"]
    parent = nn.Module()
    parent.dp = funcdp.DataParallel(nn.Linear(2, 2))
    psd = {f"dp.{k}": v for k, v in sd.items()}
    result = parent.load_state_dict(psd, strict=False)
    assert result.missing_keys == ["dp.bias"] and result.unexpected_keys == ["dp.bogus"]


def test_replicas_follow_layers_by_name_when_modules_are_added_later():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    dp = funcdp.DataParallel(net, device_ids=[0, 1])
    dp(torch.randn(8, 3, dtype=torch.float64))
    net[0].probe = nn.Identity()  # a module added after wrapping
    net.eval()
    net[0].probe.train()
    x = torch.randn(8, 3, dtype=torch.float64) * 5 + 3
    assert_trees_close(dp(x), net(x))


def test_state_dict_versions_reach_the_wrapped_layers():
    # Each layer's _load_from_state_dict reads its version from the metadata: a
    # BatchNorm state without num_batches_tracked is then reported as the bare module
    # reports it (an old-format state would have it added silently).
    def bn():
        return nn.Sequential(nn.BatchNorm1d(3))

    sd = bn().state_dict()
    del sd["0.num_batches_tracked"]
    want = bn().load_state_dict(sd, strict=False).missing_keys
    assert want == ["0.num_batches_tracked"]
    dp = funcdp.DataParallel(bn())
    assert dp.load_state_dict(sd, strict=False).missing_keys == want
    own = dp.state_dict()
    del own["0.num_batches_tracked"]
    assert dp.load_state_dict(own, strict=False).missing_keys == want
    parent = nn.Module()
    parent.dp = funcdp.DataParallel(bn())
    psd = parent.state_dict()
    del psd["dp.0.num_batches_tracked"]
    assert parent.load_state_dict(psd, strict=False).missing_keys == ["dp.0.num_batches_tracked"]


def test_layers_replaced_or_added_after_wrapping_are_used():
    # As nn.DataParallel replicates the module as it is on every call: a new head, an
    # appended layer, a re-created parameter and a new ``model.module`` are all used, and
    # gradients reach the parameters the module holds now.
    torch.manual_seed(0)
    x = torch.randn(10, 5, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    dp = funcdp.DataParallel(net, device_ids=[0, 1, 2, 3])
    dp(x)
    dp.module[2] = nn.Linear(8, 4).double()  # the same names, new tensors and shapes
    assert_trees_close(dp(x), net(x))
    dp.module[1] = nn.Tanh()  # no parameter changes
    assert_trees_close(dp(x), net(x))
    dp.module.append(nn.Sigmoid())
    assert_trees_close(dp(x), net(x))
    net[0].weight = nn.Parameter(torch.randn(8, 5, dtype=torch.float64))
    for m in (net, nn.Linear(5, 2).double()):
        dp.module = m
        dp.zero_grad()
        dp(x).pow(2).sum().backward()
        got = [p.grad for p in m.parameters()]
        dp.zero_grad()
        m(x).pow(2).sum().backward()
        assert_trees_close(dp(x), m(x))
        assert_trees_close(got, [p.grad for p in m.parameters()])


def test_structure_unchanged_means_nothing_rebuilt():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    dp = funcdp.DataParallel(net, device_ids=[0, 1])
    x = torch.randn(4, 3)
    dp(x)
    built, replicas = dp._net._built, dict(dp._replicas)
    dp(x)
    net.eval()  # modes and values are not structure
    with torch.no_grad():
        net[0].weight.add_(1)
    dp(x)
    assert dp._net._built is built and dp._replicas == replicas


def test_copies_and_pickles_work_and_are_independent():
    torch.manual_seed(0)
    dp = funcdp.DataParallel(bn_net(), device_ids=[0, 1, 2])
    x = torch.randn(6, 5, dtype=torch.float64)
    dp(x)
    buf = io.BytesIO()
    torch.save(dp, buf)
    buf.seek(0)
    for other in (copy.deepcopy(dp), torch.load(buf, weights_only=False)):
        assert isinstance(other, funcdp.DataParallel) and other.module is not dp.module
        assert other.device_ids == dp.device_ids
        before = {k: v.clone() for k, v in dp.state_dict().items()}
        ref = copy.deepcopy(dp.module)
        assert_trees_close(other(x), ref(x))  # training mode: running statistics move
        assert_trees_close(dict(other.state_dict()), dict(ref.state_dict()))
        assert_trees_close(dict(dp.state_dict()), before, exact=True)


class EMA(nn.Module):
    """Keeps an exponential moving average of its inputs' mean in a buffer, updated in
    forward in place (a VQ-VAE codebook, a feature normaliser) or by assignment."""

    def __init__(self, assign=False):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("ema", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.assign = assign

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                if self.assign:
                    self.ema = self.ema * 0.9 + 0.1 * x.mean(0)
                else:
                    self.ema.mul_(0.9).add_(0.1 * x.mean(0))
                self.seen += x.shape[0]
        return self.lin(x - self.ema)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("sync", [True, False])
def test_buffers_a_forward_updates_keep_device_0s_update(assign, sync):
    # nn.DataParallel's device-0 replica shares the module's buffers: its update is what
    # remains, with or without synchronised BatchNorm (only BatchNorm's running
    # statistics are averaged over the replicas without it: every floating-point buffer
    # was).
    torch.manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64)  # chunks of 3, 3, 2, 2
    m = EMA(assign)
    ref = copy.deepcopy(m)
    dp = funcdp.DataParallel(m, device_ids=[0, 1, 2, 3], sync_batchnorm=sync)
    out = dp(x)
    chunks = x.chunk(4)
    replicas = [copy.deepcopy(ref) for _ in chunks]
    assert_trees_close(out, torch.cat([r(c) for r, c in zip(replicas, chunks)]))
    assert int(m.seen) == 3  # device 0's chunk
    assert_trees_close(m.ema, replicas[0].ema)
    dp.eval()
    assert_trees_close(dp(x), m(x))


class Counter(nn.Module):
    """Counts the examples it sees, in training and in eval mode (an observer, a cache)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        self.seen += x.shape[0]
        return self.lin(x) * self.scale


def test_buffers_a_forward_changes_in_eval_mode_keep_device_0s_update():
    # They were dropped in eval mode; buffers the forward leaves alone are not written.
    m = Counter()
    dp = funcdp.DataParallel(m, device_ids=[0, 1, 2, 3]).eval()
    scale = m.scale
    version = scale._version
    dp(torch.randn(10, 3))
    assert int(m.seen) == 3  # device 0's chunk, as nn.DataParallel keeps
    assert m.scale is scale and scale._version == version


def test_running_statistics_kept_when_only_the_wrapped_module_trains():
    # model.eval() for validation, then back to training through the module itself: the
    # layers train, so their running statistics move, as in the bare module.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    ref = copy.deepcopy(net)
    dp = funcdp.DataParallel(net, device_ids=[0, 1])
    dp.eval()
    net.train()
    x = torch.randn(8, 3, dtype=torch.float64)
    assert_trees_close(dp(x), ref(x))
    assert_trees_close(dict(net.named_buffers()), dict(ref.named_buffers()))
    assert int(net[1].num_batches_tracked) == 1
    net.eval()
    ref.eval()
    assert_trees_close(dp(x), ref(x))
    assert_trees_close(dict(net.named_buffers()), dict(ref.named_buffers()))


class Loss(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, t=None):
        return self.lin(x).pow(2).mean()


class SumsToo(nn.Module):
    def forward(self, x):
        return x, x.sum((1, 2))


@pytest.mark.parametrize("case", ["dim", "scalar-kwarg", "scalar-output", "short-output",
                                  "device-ids"])
def test_argument_errors_name_the_argument(case):
    x = torch.randn(8, 4)
    if case == "dim":
        with pytest.raises(ValueError, match=r"`dim`=5 is out of range for inputs\[0\] of "
                                             r"shape \(8, 4\) \(valid dims -2..1\)"):
            funcdp.DataParallel(nn.Linear(4, 1), dim=5)(x)
    elif case == "scalar-kwarg":
        with pytest.raises(ValueError, match=r"cannot scatter kwargs\['t'\], a 0-d tensor"):
            funcdp.DataParallel(Loss())(x, t=torch.tensor(0.5))
    elif case == "scalar-output":
        with pytest.raises(ValueError, match=r"output is a 0-d tensor \(a scalar\): the "
                                             r"replicas' scalars are gathered into a vector "
                                             r"along dim 0 only, not along `dim`=1"):
            funcdp.DataParallel(Loss(), dim=1)(torch.randn(3, 8, 4))
    elif case == "short-output":
        with pytest.raises(ValueError, match=r"cannot gather output\[1\] along `dim`=1: it "
                                             r"has shape \(2,\)"):
            funcdp.DataParallel(SumsToo(), dim=1)(torch.randn(2, 4, 4))
    else:
        with pytest.raises(ValueError, match=r"`device_ids` must name each device once .*"
                                             r"got \[0, 1, 0\], which repeats 0"):
            funcdp.DataParallel(nn.Linear(4, 1), device_ids=[0, 1, 0])


def test_output_device_and_sync_batchnorm_are_checked():
    m = nn.Linear(3, 2)
    devs = funcdp.local_devices()
    # As device_ids: an index of the local devices, a CUDA device's index, a funcdp device.
    for given in (1, torch.device("cuda", 1), devs[1]):
        assert funcdp.DataParallel(m, output_device=given).output_device == devs[1].torch_device
    assert funcdp.DataParallel(m, output_device="cpu").output_device == torch.device("cpu")
    with pytest.raises(TypeError, match=r"`output_device` must be a device index, a funcdp "
                                        r"device or a torch.device, got 'banana'"):
        funcdp.DataParallel(m, output_device="banana")
    with pytest.raises(ValueError, match=r"`output_device` device\(type='mps'\) is not a "
                                         r"device of this process"):
        funcdp.DataParallel(m, output_device=torch.device("mps"))
    with pytest.raises(ValueError, match=r"device index 99 is out of range"):
        funcdp.DataParallel(m, output_device=99)
    # A string was truthy: sync_batchnorm="no" synchronised.
    with pytest.raises(TypeError, match=r"`sync_batchnorm` must be True or False, got 'no'"):
        funcdp.DataParallel(m, sync_batchnorm="no")


def test_load_state_dict_errors_name_keys_as_state_dict_does():
    dp = funcdp.DataParallel(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with "
                                           r"shape torch.Size\(\[5, 3\]\)"):
        dp.load_state_dict({"weight": torch.zeros(5, 3), "bias": torch.zeros(2)})
