"""torch.compile'd functions inside pmap (with a backend that needs no C++ compiler)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import funcdp


def test_compiled_gradient_inside_pmap_equals_eager(devices):
    torch.manual_seed(0)
    net = funcdp.nn.functional(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))

    def loss(p, x, y):
        return nn.functional.cross_entropy(net.apply(p, {}, x)[0], y)

    def step_with(grad_fn):
        def step(p, x, y):
            g, value = grad_fn(p, x, y)
            return funcdp.pmean((value, g), "batch")
        return funcdp.pmap(step, axis_name="batch", in_axes=(None, 0, 0), out_axes=None,
                           devices=devices[:2])

    eager = step_with(torch.func.grad_and_value(loss))
    compiled = step_with(torch.compile(torch.func.grad_and_value(loss), backend="aot_eager"))
    _agree_twice(eager, compiled, net.params, torch.randn(2, 5, 6))


def _agree_twice(eager, compiled, params, x):
    """Two calls of each (the first compiles) give the same loss and gradients."""
    y = torch.randint(0, 3, x.shape[:2])
    for _ in range(2):
        assert_trees_close(compiled(params, x, y), eager(params, x, y), rtol=1e-5, atol=1e-6)


def test_value_and_grad_compile_equals_eager(devices):
    torch.manual_seed(1)
    net = funcdp.nn.functional(nn.Sequential(nn.Linear(300, 500), nn.Tanh(), nn.Linear(500, 3)))

    def loss(p, x, y):
        return nn.functional.cross_entropy(net.apply(p, {}, x)[0], y)

    def step(**kw):
        return funcdp.pmap(lambda p, x, y: funcdp.value_and_grad(loss, "batch", **kw)(p, x, y),
                           axis_name="batch", in_axes=(None, 0, 0), out_axes=None,
                           devices=devices[:2])

    _agree_twice(step(), step(compile={"backend": "aot_eager"}), net.params,
                 torch.randn(2, 5, 300))
    with pytest.raises(TypeError, match="compile must be True, False or a dict.*got "
                       "'max-autotune' \\(a str\\).*compile={'mode': 'max-autotune'}"):
        funcdp.value_and_grad(loss, "batch", compile="max-autotune")


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
