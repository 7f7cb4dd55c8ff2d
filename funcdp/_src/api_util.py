"""Small helpers shared by the public API."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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


def fun_name(fun: object) -> str:
    """A short name of a user function for error messages."""
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None)
    if name is None:
        return type(fun).__name__
    return name
