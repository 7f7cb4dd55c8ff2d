"""funcdp.DataParallel: nn.DataParallel's interface on the functional core."""

from __future__ import annotations

import collections

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
