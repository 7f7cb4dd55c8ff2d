"""torch.compile'd functions inside pmap (with a backend that needs no C++ compiler)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import funcdp


def _mlp_loss(p, x, y):
    """A loss torch.compile can trace (funcdp.nn.functional's apply is not: with it,
    nothing was compiled, and these tests compared eager code with itself)."""
    h = torch.relu(nn.functional.linear(x, p["0.weight"], p["0.bias"]))
    return nn.functional.cross_entropy(nn.functional.linear(h, p["2.weight"], p["2.bias"]), y)


def _params(sizes=(6, 8, 3)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    return {k: v.detach() for k, v in net.named_parameters()}


@pytest.fixture
def graphs():
    """A backend that counts the graphs it is given (and runs them as they are)."""
    made = []

    def counting(gm, inputs):
        made.append(gm)
        return gm.forward

    return made, counting


def test_compiled_gradient_inside_pmap_equals_eager(devices, graphs):
    made, counting = graphs

    def step_with(grad_fn):
        def step(p, x, y):
            g, value = grad_fn(p, x, y)
            return funcdp.pmean((value, g), "batch")
        return funcdp.pmap(step, axis_name="batch", in_axes=(None, 0, 0), out_axes=None,
                           devices=devices[:2])

    eager = step_with(torch.func.grad_and_value(_mlp_loss))
    compiled = step_with(torch.compile(torch.func.grad_and_value(_mlp_loss), backend=counting))
    _agree_twice(eager, compiled, _params(), torch.randn(2, 5, 6))
    assert made  # (something was compiled)


def _agree_twice(eager, compiled, params, x):
    """Two calls of each (the first compiles) give the same loss and gradients."""
    y = torch.randint(0, 3, x.shape[:2])
    for _ in range(2):
        assert_trees_close(compiled(params, x, y), eager(params, x, y), rtol=1e-5, atol=1e-6)


def test_value_and_grad_compile_equals_eager(devices, graphs):
    made, counting = graphs

    def step(**kw):
        return funcdp.pmap(lambda p, x, y: funcdp.value_and_grad(_mlp_loss, "batch", **kw)(
            p, x, y), axis_name="batch", in_axes=(None, 0, 0), out_axes=None,
            devices=devices[:2])

    _agree_twice(step(), step(compile={"backend": counting}), _params((300, 500, 3)),
                 torch.randn(2, 5, 300))
    assert made
    with pytest.raises(TypeError, match="compile must be True, False or a dict.*got "
                       "'max-autotune' \\(a str\\).*compile={'mode': 'max-autotune'}"):
        funcdp.value_and_grad(_mlp_loss, "batch", compile="max-autotune")


def test_random_draws_in_compiled_code_use_the_device_generators(devices):
    # Each draw is a graph break that runs eagerly on the device's own generator, so
    # compiled code draws exactly what eager code does.
    def f(x):
        return (nn.functional.dropout(x, 0.5) + x.sin() + torch.randn(x.shape)
                + torch.empty_like(x).uniform_() + torch.bernoulli(x * 0.5))

    compiled = funcdp.pmap(torch.compile(f, backend="aot_eager"), devices=devices[:2])
    eager = funcdp.pmap(f, devices=devices[:2])
    x = torch.ones(2, 64)
    torch.manual_seed(5)
    a = compiled(x).to_tensor()
    torch.manual_seed(5)
    b = eager(x).to_tensor()
    torch.manual_seed(5)
    c = compiled(x).to_tensor()
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
