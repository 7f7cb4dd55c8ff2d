"""Pytree-aware comparisons with per-dtype tolerances."""

from __future__ import annotations

import torch
import torch.utils._pytree as pt

import funcdp

TOLS = {
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-13),
}


def as_tensor(x):
    if isinstance(x, funcdp.ShardedValue):
        return x.to_tensor()
    return x


def assert_trees_close(actual, expected, rtol=None, atol=None, exact=False):
    """Structure, then shape, then dtype, then values."""
    a_leaves, a_spec = pt.tree_flatten(actual)
    e_leaves, e_spec = pt.tree_flatten(expected)
    assert a_spec == e_spec, f"structure differs:\n{a_spec}\nvs\n{e_spec}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        a = as_tensor(a)
        e = as_tensor(e)
        if not isinstance(e, torch.Tensor):
            assert a == e, f"leaf {i}: {a!r} != {e!r}"
            continue
        assert isinstance(a, torch.Tensor), f"leaf {i}: got {type(a)}"
        assert a.shape == e.shape, f"leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"leaf {i}: dtype {a.dtype} != {e.dtype}"
        if exact or not (e.is_floating_point() or e.is_complex()):
            assert torch.equal(a.detach().cpu(), e.detach().cpu()), f"leaf {i}: {a} != {e}"
        else:
            r, t = TOLS.get(e.dtype, (1e-6, 1e-7))
            torch.testing.assert_close(a.detach().cpu(), e.detach().cpu(),
                                       rtol=rtol if rtol is not None else r,
                                       atol=atol if atol is not None else t,
                                       msg=lambda m, i=i: f"leaf {i}: {m}")
