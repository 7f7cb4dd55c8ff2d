"""Process-wide settings, each with an environment variable for its default."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"environment variable `{name}` must be a number of seconds, got {raw!r}; "
            f"unset it to use the default ({default})."
        ) from None
    if value <= 0:
        raise ValueError(f"environment variable `{name}` must be positive, got {raw!r}.")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(
        f"environment variable `{name}` must be a boolean (1/0, true/false), got {raw!r}."
    )


def _env_bool_or_auto(name: str, default: bool | str) -> bool | str:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        return _env_bool(name, False)  # (set: the default is not used)
    except ValueError:
        raise ValueError(
            f"environment variable `{name}` must be 1/0, true/false or auto, got {raw!r}."
        ) from None


class Config:
    """funcdp's settings.

    Attributes:
        collective_timeout: seconds a device waits in a collective for the other
            devices before the call fails with an error naming what each device reached
            (default 60, environment variable ``FUNCDP_COLLECTIVE_TIMEOUT``). Devices
            that can never meet (one finished, or all wait in different collectives) are
            reported at once, without waiting for the timeout.
        check_replicated: whether ``out_axes=None`` verifies that the value is the same on
            every device (default True, ``FUNCDP_CHECK_REPLICATED``). Values that are the
            result of a reduction are recognised without comparing data.
        onednn_linear: whether ``F.linear`` (every ``nn.Linear``) in a pmapped function
            runs on oneDNN, forward and backward, for float32 tensors on CPU devices:
            True, False, or ``"auto"`` (the default; ``FUNCDP_ONEDNN_LINEAR``), which
            times both on one product the first time a pmapped function makes a large
            enough one and keeps oneDNN for the process if it is at least 1.2 times
            faster than torch's BLAS (in a multi-process run, chosen at
            ``funcdp.distributed.initialize`` by all processes together: oneDNN if every
            one of them measured it so). On CPUs where that BLAS is slow (MKL on AMD EPYC:
            115 against oneDNN's 250 GFLOPS per core) the MLP benchmark step over two
            devices is 1.6 times as fast; results agree with torch's to float32
            rounding, not bit for bit: set False for torch's own products. Elsewhere
            (other dtypes, GPUs, inside ``torch.func`` transforms, autocast, dispatch
            modes) torch's ``F.linear`` runs.

    Examples:
        >>> import funcdp
        >>> with funcdp.config.override(collective_timeout=5.0):
        ...     funcdp.config.collective_timeout
        5.0
    """

    _names = ("collective_timeout", "check_replicated", "onednn_linear")

    def __init__(self) -> None:
        self.collective_timeout = _env_float("FUNCDP_COLLECTIVE_TIMEOUT", 60.0)
        self.check_replicated = _env_bool("FUNCDP_CHECK_REPLICATED", True)
        self.onednn_linear = _env_bool_or_auto("FUNCDP_ONEDNN_LINEAR", "auto")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._names:
            raise AttributeError(
                f"funcdp.config has no setting `{name}`; settings are {', '.join(self._names)}."
            )
        if name == "collective_timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"funcdp.config.collective_timeout must be a positive number of seconds, "
                    f"got {value!r}."
                )
            value = float(value)
        if name == "check_replicated" and not isinstance(value, bool):
            raise ValueError(f"funcdp.config.{name} must be True or False, got {value!r}.")
        if name == "onednn_linear" and not (
                isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
            raise ValueError(
                f"funcdp.config.onednn_linear must be True, False or 'auto', got {value!r}."
            )
        object.__setattr__(self, name, value)

    @contextlib.contextmanager
    def override(self, **settings: Any) -> Iterator[Config]:
        """Temporarily changes settings: ``with funcdp.config.override(...):``."""
        old = {name: getattr(self, name) for name in settings if name in self._names}
        try:
            for name, value in settings.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in old.items():
                object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names)
        return f"funcdp.config({body})"


config = Config()
