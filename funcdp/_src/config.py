"""Process-wide settings, each with an environment variable for its default."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

# The longest collective_timeout: one year. Longer waits than threading.TIMEOUT_MAX (about
# 9.2e9 s on Linux, 49 days on Windows), or inf, make every collective fail with an
# OverflowError.
MAX_TIMEOUT = min(31_536_000.0, threading.TIMEOUT_MAX)
_AT_MOST = f"at most {MAX_TIMEOUT:.0f} " + (
    "(one year)" if MAX_TIMEOUT == 31_536_000.0 else "(the longest wait of this platform)")


def _timeout_ok(seconds: float) -> bool:
    """Whether ``seconds`` is a collective_timeout (NaN is not)."""
    return 0 < seconds <= MAX_TIMEOUT


def _env_timeout(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not _timeout_ok(value):
        raise ValueError(
            f"environment variable `{name}` must be a positive number of seconds, "
            f"{_AT_MOST}, got {raw!r}; unset it to use the default ({default})."
        )
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


def _checked(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` holds it; an error naming the setting where ``name`` is
    none or ``value`` is not one it takes."""
    if name not in Config._names:
        raise AttributeError(
            f"funcdp.config has no setting `{name}`; settings are {', '.join(Config._names)}.")
    if name == "collective_timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _timeout_ok(
                value):
            raise ValueError(
                f"funcdp.config.collective_timeout must be a positive number of seconds, "
                f"{_AT_MOST}, got {value!r}.")
        return float(value)
    if name == "check_replicated" and not isinstance(value, bool):
        raise ValueError(f"funcdp.config.{name} must be True or False, got {value!r}.")
    if name == "onednn_linear" and not (
            isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(
            f"funcdp.config.onednn_linear must be True, False or 'auto', got {value!r}.")
    return value


class Config:
    """funcdp's settings.

    The settings are process-wide: every thread sees them, the devices of a pmap (threads)
    included. Each has a base value, which the environment variable gives at import and
    an assignment (``funcdp.config.collective_timeout = 120.0``) changes, and the value
    seen, which is the base with the ``override`` blocks active at the time applied in the
    order they were entered (the latest entered wins). Blocks may exit in any order (from
    several threads, or several devices at once): each takes back only its own change.
    An assignment made while an override of that setting is active changes the base,
    seen once the last such override has exited.

    Attributes:
        collective_timeout: seconds a device waits in a collective for the other
            devices before the call fails with an error naming what each device reached
            (default 60, environment variable ``FUNCDP_COLLECTIVE_TIMEOUT``; at most
            31536000, one year). Devices that can never meet (one finished, or all wait
            in different collectives) are reported at once, without waiting for the
            timeout.
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
        >>> funcdp.config.collective_timeout = float("inf")
        Traceback (most recent call last):
        ...
        ValueError: funcdp.config.collective_timeout must be ... (one year), got inf.
    """

    _names = ("collective_timeout", "check_replicated", "onednn_linear")
    # (Annotations only: the values are instance attributes, set by ``_show``.)
    collective_timeout: float
    check_replicated: bool
    onednn_linear: bool | str
    _lock: threading.Lock
    _base: dict[str, Any]
    _active: list[dict[str, Any]]

    def __init__(self) -> None:
        # The value seen of each setting is a plain attribute (read on every pmap call and
        # collective), recomputed from these whenever one of them changes.
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_base", {
            "collective_timeout": _env_timeout("FUNCDP_COLLECTIVE_TIMEOUT", 60.0),
            "check_replicated": _env_bool("FUNCDP_CHECK_REPLICATED", True),
            "onednn_linear": _env_bool_or_auto("FUNCDP_ONEDNN_LINEAR", "auto"),
        })
        # The active overrides, in the order they were entered (each a dict of its own).
        object.__setattr__(self, "_active", [])
        self._show(self._names)

    def _show(self, names: Any) -> None:
        """Sets the value seen of each of ``names`` (lock held, or while constructing)."""
        for name in names:
            value = self._base[name]
            for settings in self._active:
                value = settings.get(name, value)
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        value = _checked(name, value)
        with self._lock:
            self._base[name] = value
            self._show((name,))

    @contextlib.contextmanager
    def override(self, **settings: Any) -> Iterator[Config]:
        """Changes settings for the ``with`` block: ``with funcdp.config.override(...):``.

        The change is process-wide (every thread sees it, as for an assignment); its exit
        takes back only this block's change, whatever other blocks entered or exited
        meanwhile, in this thread or others.

        Raises:
            AttributeError: a name is not a setting.
            ValueError: a value is not one the setting takes (nothing is changed).
        """
        mine = {name: _checked(name, value) for name, value in settings.items()}
        with self._lock:
            self._active.append(mine)
            self._show(mine)
        try:
            yield self
        finally:
            with self._lock:
                # (By identity: another block may hold an equal dict.)
                del self._active[next(i for i, s in enumerate(self._active) if s is mine)]
                self._show(mine)

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names)
        return f"funcdp.config({body})"


config = Config()
