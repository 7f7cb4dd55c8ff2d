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
    """Runs ``fn`` without torch function modes and subclass dispatch.

    For funcdp's own tensor code that calls no user code and draws no random numbers
    (collectives, optimizer kernels). Inside ``pmap`` every tensor operation and every
    tensor attribute read (``.shape``, ``.dtype``) of a device's function goes through
    the device's random-routing mode, a Python call each; with several devices those
    calls also contend for the GIL. Disabling the mode around such code made a gradient
    all-reduce a third faster.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def fun_name(fun: object) -> str:
    """A short name of a user function for error messages."""
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None)
    if name is None:
        return type(fun).__name__
    return name
