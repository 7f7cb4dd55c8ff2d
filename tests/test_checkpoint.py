"""save_checkpoint / load_checkpoint: numbers and strings round-trip as builtin values;
replicated training state resumes on another device count."""

from __future__ import annotations

import enum
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from helpers import assert_trees_close

import funcdp
from funcdp import optim


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class ScaleState(NamedTuple):  # (an optax-style optimizer state)
    count: Any
    inner: Any


class MomentState(NamedTuple):
    mu: Any


@pytest.mark.parametrize("value, want", [
    (np.mean([0.91, 0.93]), 0.92),  # numpy.float64: a float subclass
    (np.float32(0.5), 0.5),
    (np.int64(7), 7),
    (np.bool_(True), True),
    (np.str_("adam"), "adam"),
    (Level.HIGH, 3),
    (Color.RED, "red"),  # str() of this mixin would be 'Color.RED'
    (True, True), (3, 3), (2.5, 2.5), ("s", "s"), (None, None),
])
def test_numbers_and_strings_round_trip_as_their_builtin_type(tmp_path, value, want):
    # numpy.float64 was written as such and torch.load(weights_only=True) refused the file.
    path = tmp_path / "ckpt.pt"
    funcdp.save_checkpoint(path, {"w": torch.ones(2), "v": value, "list": [value]})
    state = funcdp.load_checkpoint(path)
    assert_trees_close(state, {"w": torch.ones(2), "v": want, "list": [want]})
    assert type(state["v"]) is type(want) and type(state["list"][0]) is type(want)


def test_unsupported_leaves_name_their_path(tmp_path):
    with pytest.raises(TypeError, match=r"cannot save a leaf of type complex128 at "
                                        r"state\['opt'\]\[1\]; a checkpoint holds tensors, "
                                        r".*torch\.as_tensor\(x\)"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"opt": [1, np.complex128(1j)]})
    with pytest.raises(TypeError, match=r"cannot save a leaf of type ndarray at state;"):
        funcdp.save_checkpoint(tmp_path / "y.pt", np.ones(2))


def test_replicated_training_state_resumes_on_another_device_count(tmp_path):
    # The Flax-style loop: replicated params and state, in_axes=0 and out_axes=0. Leaves
    # below the shared-result size (b, the step, b's momentum) come back as per-device
    # copies: they kept their device axis, and the state did not resume on 4 devices.
    def loss_fn(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).mean()

    opt = optim.sgd(1e-3, momentum=0.9)

    def step_on(devs):
        return funcdp.pmap(funcdp.value_and_update(loss_fn, opt, "i"), axis_name="i",
                           devices=devs)

    torch.manual_seed(0)
    p0 = {"w": torch.randn(128, 128), "b": torch.zeros(128)}
    two, four = funcdp.local_devices()[:2], funcdp.local_devices()[:4]
    _, p, s = step_on(two)(funcdp.replicate(p0, two), funcdp.replicate(opt.init(p0), two),
                           torch.randn(2, 4, 128))
    path = tmp_path / "state.pt"
    funcdp.save_checkpoint(path, {"params": p, "opt": s, "loss": torch.arange(2.0)})
    plain = funcdp.load_checkpoint(path)
    assert_trees_close(plain, {"params": funcdp.unreplicate(p), "opt": funcdp.unreplicate(s),
                               "loss": torch.arange(2.0)}, exact=True)
    state = funcdp.load_checkpoint(path, replicate_to=four)
    x = torch.randn(4, 4, 128)
    got = step_on(four)(state["params"], state["opt"], x)
    want = step_on(four)(funcdp.replicate(plain["params"], four),
                         funcdp.replicate(plain["opt"], four), x)
    assert_trees_close(got, want, exact=True)


def test_sharded_values_are_replicated_when_their_shards_are_bitwise_equal(tmp_path):
    devs = funcdp.local_devices()[:2]
    nan = funcdp.pmap(lambda v: v * 0 + float("nan"), devices=devs)(torch.ones(2, 3))
    zeros = funcdp.pmap(lambda v: v * 0, devices=devs)(torch.ones(2, 3))
    signed = funcdp.pmap(lambda v: v * 0, devices=devs)(torch.tensor([[1.0], [-1.0]]))
    path = tmp_path / "c.pt"
    # More shards than devices (each device holds a block of two): kept with its axis, so
    # that the pmap it came from gets as many shards again (a replicated value would be
    # replicated onto the devices, one copy each).
    blocks = funcdp.pmap(lambda v: funcdp.psum(v, "i"), axis_name="i", devices=devs)(
        torch.ones(4, 3))
    funcdp.save_checkpoint(path, {"nan": nan, "zeros": zeros, "signed": signed,
                                  "kept": zeros.to_tensor(), "blocks": blocks})
    back = funcdp.load_checkpoint(path)
    assert_trees_close(back["blocks"], torch.full((4, 3), 4.0), exact=True)
    again = funcdp.load_checkpoint(path, replicate_to=devs)["blocks"]
    assert again.shape == (4, 3)
    assert back["nan"].shape == (3,) and back["nan"].isnan().all()
    assert back["zeros"].shape == (3,)
    assert back["signed"].shape == (2, 1)  # 0.0 and -0.0: not the same bits
    assert back["kept"].shape == (2, 3)  # a tensor is stored as it is


def test_a_checkpoint_of_a_newer_format_version_is_an_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    funcdp.save_checkpoint(path, {"w": torch.ones(2)})
    payload = torch.load(path, weights_only=True)
    for version, shown in ((2, "2"), (None, "None"), ("1", "'1'")):
        torch.save(dict(payload, version=version), path)
        with pytest.raises(ValueError, match=rf"has checkpoint format version {shown}; this "
                                             rf"funcdp reads versions up to 1\. Load it with "
                                             rf"the newer funcdp"):
            funcdp.load_checkpoint(path)
    torch.save(payload, path)
    assert_trees_close(funcdp.load_checkpoint(path), {"w": torch.ones(2)})


def test_namedtuple_states_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = {"opt": (ScaleState(count=3, inner=[MomentState(funcdp.replicate(torch.ones(2))),
                                                 None]),
                     MomentState(mu={"w": torch.arange(3.0)})),
             "step": 1}
    funcdp.save_checkpoint(path, state)
    back = funcdp.load_checkpoint(path, replicate_to=funcdp.local_devices()[:3])
    assert type(back["opt"][0]) is ScaleState and type(back["opt"][1]) is MomentState
    assert type(back["opt"][0].inner[0]) is MomentState
    assert back["opt"][0].count == 3 and back["opt"][0].inner[1] is None
    assert isinstance(back["opt"][0].inner[0].mu, funcdp.ShardedValue)
    assert_trees_close(back["opt"][0].inner[0].mu.to_tensor(), torch.ones(3, 2))
    assert_trees_close(back["opt"][1].mu, {"w": torch.arange(3.0)})


def test_namedtuples_that_cannot_be_found_again_are_errors(tmp_path, monkeypatch):
    class Local(NamedTuple):
        x: Any

    with pytest.raises(TypeError, match=r"namedtuple .*Local at state\['s'\]\[0\] is "
                                        r"defined inside a function.*define it at module "
                                        r"level"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"s": [Local(1)]})
    path = tmp_path / "ckpt.pt"
    funcdp.save_checkpoint(path, MomentState(torch.ones(1)))

    class Renamed(NamedTuple):
        momentum: Any

    monkeypatch.setattr(sys.modules[__name__], "MomentState", Renamed)
    with pytest.raises(ValueError, match=r"namedtuple MomentState with fields \['mu'\], but "
                                         r".*MomentState is now \('momentum',\)"):
        funcdp.load_checkpoint(path)
    monkeypatch.delattr(sys.modules[__name__], "MomentState")
    with pytest.raises(ValueError, match=r"namedtuple MomentState of module .*, which is not "
                                         r"imported \(or has no MomentState\); import that "
                                         r"module before loading"):
        funcdp.load_checkpoint(path)
    # Loading imports no module a file names (an import runs the module's code).
    monkeypatch.delitem(sys.modules, __name__)
    with pytest.raises(ValueError, match=r"which is not imported"):
        funcdp.load_checkpoint(path)


def test_the_namedtuple_key_is_reserved_and_other_dicts_load_as_they_are(tmp_path):
    with pytest.raises(ValueError, match=r"the dict at state\['a'\]\[0\] has the key "
                                         r"'__funcdp_namedtuple__', which checkpoints reserve"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"a": [{"__funcdp_namedtuple__": "this:s",
                                                          "fields": {}}]})
    # A file that records no namedtuples decodes none, whatever its dicts hold.
    path = tmp_path / "y.pt"
    marker_like = {"__funcdp_namedtuple__": "this:s", "fields": {}}
    funcdp.save_checkpoint(path, {"a": "placeholder"})
    payload = torch.load(path, weights_only=True)
    assert payload["namedtuples"] == 0
    payload["structure"] = torch.utils._pytree.treespec_dumps(
        torch.utils._pytree.tree_flatten({"a": marker_like})[1])
    payload["kinds"], payload["leaves"] = ["value"], ["this:s"]
    torch.save(payload, path)
    assert funcdp.load_checkpoint(path) == {"a": marker_like}
