"""save_checkpoint / load_checkpoint: numbers and strings round-trip as builtin values."""

from __future__ import annotations

import enum

import numpy as np
import pytest
import torch
from helpers import assert_trees_close

import funcdp


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


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
