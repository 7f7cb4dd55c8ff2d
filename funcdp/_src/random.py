"""Per-device randomness: every device draws from its own generator.

torch's random functions use one process-wide generator; devices running at once in
several threads would interleave their draws in whatever order the threads happen to
run. Inside a pmap, funcdp instead gives device ``i`` its own ``torch.Generator`` for the
call, and routes torch's random functions (``torch.rand``/``randn``/``bernoulli``...,
``Tensor.uniform_``/``normal_``..., and dropout in all its forms) to it.

The seeding rule: a call that uses randomness draws one integer ``s`` from torch's
default generator in the calling thread (so it follows ``torch.manual_seed``), and
device ``i`` seeds its generator with ``mix(s, i)``. Draws therefore differ across
devices, are identical across two runs with the same seed, and do not depend on thread
scheduling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def device_seed(base: int, index: int) -> int:
    """The seed of device ``index`` for a call whose base draw is ``base``."""
    x = (base + (index + 1) * _GOLDEN) & ((1 << 64) - 1)
    # splitmix64 finaliser: nearby (base, index) pairs give unrelated seeds.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK


def draw_base() -> int:
    return int(torch.randint(0, 2**62, ()).item())


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


_WITH_GENERATOR = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal,
    torch.multinomial, torch.poisson, torch.binomial, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_,
    torch.Tensor.bernoulli, torch.Tensor.random_, torch.Tensor.exponential_,
    torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
    torch.Tensor.multinomial,
}

_SELU_ALPHA = 1.7580993408473766


def _noise_shape(x: torch.Tensor, feature: int) -> tuple:
    """Shape of the dropout mask: elementwise, or one draw per channel."""
    if not feature:
        return tuple(x.shape)
    batched = x.ndim == feature + 2
    lead = 2 if batched else 1
    return tuple(x.shape[:lead]) + (1,) * (x.ndim - lead)


def _dropout(gen: torch.Generator, x: torch.Tensor, p: float, training: bool, inplace: bool,
             feature: int = 0, alpha: bool = False) -> torch.Tensor:
    if p < 0 or p > 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0:
        return x
    if p == 1:
        out = x * 0 if not alpha else x * 0 + (-_SELU_ALPHA * 1.0507009873554805)
        return x.copy_(out) if inplace else out
    noise = torch.empty(_noise_shape(x, feature), dtype=x.dtype, device=x.device)
    noise = noise.bernoulli_(1 - p, generator=gen)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
        b = (noise - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        out = x * (noise * a) + b
    else:
        out = x * (noise / (1 - p))
    return x.copy_(out) if inplace else out


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _dropout_handler(feature: int, alpha: bool, functional: bool):
    def handle(gen, args, kwargs):
        x = args[0] if args else kwargs["input"]
        p = _arg(args, kwargs, 1, "p", 0.5)
        training = _arg(args, kwargs, 2, "training", True if functional else True)
        inplace = _arg(args, kwargs, 3, "inplace", False)
        if not functional:
            # torch.dropout(input, p, train) has no inplace flag.
            inplace = False
        return _dropout(gen, x, p, training, inplace, feature, alpha)

    return handle


_DROPOUT = {
    F.dropout: _dropout_handler(0, False, True),
    F.alpha_dropout: _dropout_handler(0, True, True),
    F.dropout1d: _dropout_handler(1, False, True),
    F.dropout2d: _dropout_handler(2, False, True),
    F.dropout3d: _dropout_handler(3, False, True),
    F.feature_alpha_dropout: _dropout_handler(2, True, True),
    torch.dropout: _dropout_handler(0, False, False),
    torch.alpha_dropout: _dropout_handler(0, True, False),
    torch.feature_dropout: _dropout_handler(2, False, False),
    torch.feature_alpha_dropout: _dropout_handler(2, True, False),
}


class DeviceRandomness(TorchFunctionMode):
    """Routes torch's random functions to ``generator`` (active in one device's thread)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WITH_GENERATOR:
            if kwargs.get("generator") is None:
                kwargs = dict(kwargs, generator=self.generator)
                self.used = True
            return func(*args, **kwargs)
        handler = _DROPOUT.get(func)
        if handler is not None:
            self.used = True
            return handler(self.generator, args, kwargs)
        return func(*args, **kwargs)
