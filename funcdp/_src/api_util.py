"""Small helpers shared by the public API."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def public(fn: F, module: str = "funcdp") -> F:
    """Marks ``fn`` as part of the public API: reprs and docs show ``funcdp.name``."""
    fn.__module__ = module
    return fn


def public_in(module: str) -> Callable[[F], F]:
    """Like ``public`` for a public subpackage (``funcdp.optim`` ...)."""

    def deco(fn: F) -> F:
        return public(fn, module)

    return deco


def internal(fn: F) -> F:
    """Runs ``fn`` with pmap's random-routing mode set aside, if it is the innermost mode
    (a mode marked ``funcdp_per_device``).

    For funcdp's own tensor code that calls no user code and draws no random numbers
    (collectives, shared optimizer updates). Inside ``pmap`` every tensor operation and
    every tensor attribute read (``.shape``, ``.dtype``) of a device's function goes
    through the device's routing mode (a ``TorchFunctionMode``), a Python call each; with
    several devices those calls also contend for the GIL. Setting the mode aside around
    such code made a gradient all-reduce a third faster. Other modes (a default device,
    say) and tensor subclasses are left alone.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = _stack_len()
        if n and getattr(_stack_at(n - 1), "funcdp_per_device", False):
            mode = _stack_pop()
            try:
                return fn(*args, **kwargs)
            finally:
                _stack_push(mode)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_stack_len = torch._C._len_torch_function_stack
_stack_at = torch._C._get_function_stack_at
_stack_pop = torch._C._pop_torch_function_stack
_stack_push = torch._C._push_on_torch_function_stack


def fun_name(fun: object) -> str:
    """A short name of a user function for error messages."""
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None)
    if name is None:
        return type(fun).__name__
    return name
