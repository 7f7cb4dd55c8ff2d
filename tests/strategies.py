"""hypothesis strategies shared by the tests."""

from __future__ import annotations

import hypothesis.strategies as st
import torch

import funcdp

FLOAT_DTYPES = (torch.float32, torch.float64)


@st.composite
def device_layout(draw, max_devices: int = 8, allow_blocks: bool = True):
    """(mapped size n, devices): n <= devices, or a multiple of the device count."""
    all_devs = funcdp.local_devices()[:max_devices]
    d = draw(st.integers(1, len(all_devs)))
    if allow_blocks and draw(st.booleans()):
        k = draw(st.integers(2, 3))
        return d * k, all_devs[:d]
    return d, all_devs[:d]


@st.composite
def mapped_tensor(draw, n: int, dtype=None, min_rank: int = 1, max_rank: int = 3):
    """A tensor with a dimension of size n at a random axis, and that axis (maybe negative)."""
    rank = draw(st.integers(min_rank, max_rank))
    axis = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[axis] = n
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if draw(st.booleans()):
        axis -= rank
    return x, axis


@st.composite
def unmapped_tensor(draw, dtype=None):
    rank = draw(st.integers(0, 2))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def take(x: torch.Tensor, axis: int | None, i: int) -> torch.Tensor:
    return x if axis is None else x.select(axis, i)
