"""save_checkpoint / load_checkpoint: numbers and strings round-trip as builtin values;
replicated training state resumes on another device count."""

from __future__ import annotations

import collections
import enum
import math
import os
import sys
import tempfile
from typing import Any, NamedTuple

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.utils._pytree as pt
from helpers import assert_trees_close
from hypothesis import given

import funcdp
from funcdp import optim


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Phase(enum.Enum):  # (a plain Enum: torch's structure stores its members by name)
    WARMUP = "warmup"


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
    for version, shown in ((3, "3"), (None, "None"), ("1", "'1'")):
        torch.save(dict(payload, version=version), path)
        with pytest.raises(ValueError, match=rf"has checkpoint format version {shown}; this "
                                             rf"funcdp reads versions up to 2\. Load it with "
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


def _same_keys(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one tree down to the types of dict keys (``1``,
    ``1.0`` and ``True``, or ``(0,)`` and ``[0]``, are different keys here) and the bits
    of float keys (``0.0`` and ``-0.0``; NaNs); leaves are compared elsewhere."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return (getattr(a, "default_factory", None) is getattr(b, "default_factory", None)
                and len(a) == len(b)
                and all(_same_key(ka, kb) and _same_keys(a[ka], b[kb])
                        for ka, kb in zip(a, b)))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same_keys, a, b))
    return True


def _same_key(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(map(_same_key, a, b))
    if type(a) is float:
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or a != a and b != b)
    return a == b


# Keys a checkpoint gives back exactly: scalars of the builtin types and tuples of them,
# nested, empty ones among them.
_scalar_keys = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, width=64) | st.text(max_size=4))
_keys = st.recursive(_scalar_keys, lambda inner: st.lists(inner, max_size=3).map(tuple),
                     max_leaves=6)


@st.composite
def _keyed_states(draw, depth=2):
    """A dict, OrderedDict or defaultdict with keys of ``_keys`` and values that are
    tensors, numbers or (to ``depth``) such dicts again, in lists and tuples too."""
    leaf = st.integers(0, 9).map(lambda n: torch.arange(float(n))) | st.integers() | st.none()
    value = leaf if depth == 0 else (leaf | _keyed_states(depth=depth - 1)
                                     | st.lists(_keyed_states(depth=depth - 1), max_size=2))
    items = draw(st.lists(st.tuples(_keys, value), max_size=4, unique_by=lambda kv: kv[0]))
    kind = draw(st.sampled_from(["dict", "OrderedDict", "defaultdict"]))
    if kind == "defaultdict":
        return collections.defaultdict(list, items)
    return (dict if kind == "dict" else collections.OrderedDict)(items)


@given(_keyed_states())
def test_dict_keys_round_trip_with_their_types(state):
    # torch stores a dict's keys in JSON, which turns a tuple key into a list: the file
    # was written, and load_checkpoint raised "unhashable type: 'list'".
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        funcdp.save_checkpoint(path, {"state": state, "step": 3})
        back = funcdp.load_checkpoint(path)
    assert _same_keys(back, {"state": state, "step": 3})
    assert_trees_close(pt.tree_leaves(back), pt.tree_leaves({"state": state, "step": 3}),
                       exact=True)


@pytest.mark.parametrize("keys", [
    [(0, "decay")],
    [(0, "decay"), (1, "no_decay"), "lr", 3],
    [((0, 1), ("a", (None, True))), ()],
    [(1,), (1.0,), (True,), 1],  # equal as values; tuples of distinct keys
    [(-0.0, float("nan")), (0.0, float("inf")), -0.0, float("nan")],
    [None, True, 2.5, "s", Phase.WARMUP],  # no tuple: stored by torch, as before
])
def test_dict_keys_of_each_kind_round_trip(tmp_path, keys):
    plain = [k for k in keys if not isinstance(k, enum.Enum)]  # (see the defaultdict test)
    state = {"by_key": {k: torch.full((2,), float(i)) for i, k in enumerate(keys)},
             "ordered": collections.OrderedDict((k, i) for i, k in enumerate(keys)),
             "default": collections.defaultdict(int, {k: [i] for i, k in enumerate(plain)}),
             "opt": ScaleState(count={k: 1 for k in keys}, inner=[{"in": {k: "v" for k in keys}}])}
    path = tmp_path / "ckpt.pt"
    funcdp.save_checkpoint(path, state)
    back = funcdp.load_checkpoint(path)
    assert _same_keys(back, state)
    assert type(back["opt"]) is ScaleState
    assert back["default"].default_factory is int
    # (Leaf by leaf: trees keyed by NaN are never equal.)
    assert_trees_close(pt.tree_leaves(back), pt.tree_leaves(state), exact=True)
    # Only a file with tuple keys needs this funcdp; others stay readable by older ones.
    tupled = any(type(k) is tuple for k in keys)
    assert torch.load(path, weights_only=True)["version"] == (2 if tupled else 1)


def test_tuple_keyed_replicated_values_resume_on_other_devices(tmp_path):
    lr = funcdp.replicate(torch.tensor(0.1), funcdp.local_devices()[:4])
    path = tmp_path / "ckpt.pt"
    funcdp.save_checkpoint(path, {"lr_by_group": {(0, "decay"): lr}, "epoch": 3})
    back = funcdp.load_checkpoint(path, replicate_to=funcdp.local_devices()[:2])
    assert list(back["lr_by_group"]) == [(0, "decay")] and back["epoch"] == 3
    assert_trees_close(back["lr_by_group"][(0, "decay")].to_tensor(), torch.full((2,), 0.1))


def _local_enum():
    class Local(enum.Enum):
        A = 1

    return Local.A


@pytest.mark.parametrize("key, match", [
    (torch.float32, r"torch.float32 of type dtype: a checkpoint stores dict keys that are "
                    r"strs, ints, floats, bools, None, tuples of these, or members of a plain "
                    r"Enum .*Convert the key \(to a str, say\)"),
    (frozenset({1}), r"frozenset\(\{1\}\) of type frozenset: a checkpoint stores dict keys"),
    ((0, b"x"), r"\(0, b'x'\) of type tuple: a checkpoint stores dict keys"),
    (Level.HIGH, r"<Level.HIGH: 3> of type Level: a member of Level, an Enum that is also an "
                 r"int, would load as the plain int it equals\. Use the member's .value"),
    (Color.RED, r"<Color.RED: 'red'> of type Color: .*an Enum that is also a str, would load "
                r"as the plain str"),
    ((1, Phase.WARMUP), r"\(1, <Phase.WARMUP: 'warmup'>\) of type tuple: a tuple key holding "
                        r"an Enum member \(<Phase.WARMUP: 'warmup'>\) cannot be stored\. Use "
                        r"its .name"),
    (_local_enum(), r"<Local.A: 1> of type Local: .*Local is defined inside a function, so "
                    r"loading could not find it\. Define it at module level"),
])
def test_dict_keys_that_would_not_load_as_saved_are_refused_naming_their_path(tmp_path, key,
                                                                               match):
    # A dtype key made an error without its path; an IntEnum key loaded as an int; a
    # local Enum's file could not be loaded.
    path = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"funcdp.save_checkpoint: the dict at "
                                        r"state\['a'\]\[0\]\[\(1, 'b'\)\] has the key " + match):
        funcdp.save_checkpoint(path, {"a": [{(1, "b"): {key: torch.ones(1)}}]})
    assert not path.exists()


def test_an_enum_key_beside_tuple_keys_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"the dict at state\['a'\] has the key "
                                        r"<Phase.WARMUP: 'warmup'>, an Enum member, beside "
                                        r"tuple keys.*Use the member's .name, or keep the "
                                        r"Enum keys and the tuple keys in separate dicts"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"a": {Phase.WARMUP: 1, (0, 1): 2}})


def test_an_enum_key_in_a_defaultdict_is_refused(tmp_path):
    # torch's structure of a defaultdict stores the member, but loads it as a dict: the
    # file could not be loaded ("unhashable type: 'dict'").
    with pytest.raises(TypeError, match=r"the defaultdict at state\['a'\] has the key "
                                        r"<Phase.WARMUP: 'warmup'>, an Enum member, which "
                                        r"torch's structure of a defaultdict cannot give "
                                        r"back\. Use a dict"):
        funcdp.save_checkpoint(tmp_path / "x.pt",
                               {"a": collections.defaultdict(int, {Phase.WARMUP: 1})})


def test_the_tuple_keys_key_is_reserved(tmp_path):
    with pytest.raises(ValueError, match=r"the dict at state\['a'\] has the key "
                                         r"'__funcdp_keys__', which checkpoints reserve "
                                         r"\(for tuple keys\); rename that key"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"a": {"__funcdp_keys__": [], "values": {}}})


def test_errors_inside_namedtuples_and_tuple_keyed_dicts_name_the_path_as_saved(tmp_path):
    # Inside a namedtuple the path started again at `state`.
    class Local(NamedTuple):
        x: Any

    for state, path in [
            ({"a": ScaleState(count=[Local(1)], inner=None)}, r"state\['a'\]\.count\[0\]"),
            ({(0, "a"): ScaleState(count={(1, 2): [Local(1)]}, inner=None)},
             r"state\[\(0, 'a'\)\]\.count\[\(1, 2\)\]\[0\]")]:
        with pytest.raises(TypeError, match=rf"the namedtuple .*Local at {path} is defined "
                                            rf"inside a function"):
            funcdp.save_checkpoint(tmp_path / "x.pt", state)
    with pytest.raises(ValueError, match=r"the dict at state\['a'\]\.inner\[\(1,\)\] has the "
                                         r"key '__funcdp_namedtuple__'"):
        funcdp.save_checkpoint(tmp_path / "x.pt", {"a": ScaleState(
            count=1, inner={(1,): {"__funcdp_namedtuple__": "m:C", "fields": {}}})})
