"""The devices funcdp maps over: CUDA GPUs, or virtual CPU devices for testing.

Without CUDA (or with ``FUNCDP_PLATFORM=cpu``) funcdp offers ``N`` *virtual CPU
devices*, ``N`` from ``FUNCDP_NUM_CPU_DEVICES`` (default 1), read the first time devices
are needed. They share the host's cores and memory but behave like separate devices:
each has its own worker, and collectives really exchange data between them. With CUDA,
each GPU is one device, or ``FUNCDP_DEVICES_PER_GPU`` logical devices (each with its own
stream) so that multi-device code runs on a single GPU.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from funcdp._src.api_util import public
from funcdp._src.transform_util import a_type


class Device:
    """One funcdp device.

    Attributes:
        id: global index of the device (over all processes).
        platform: ``"cpu"`` or ``"cuda"``.
        process_index: the process that owns the device.
        local_index: index among the owning process's devices.
        torch_device: the ``torch.device`` tensors of this device live on.
        slot: for logical CUDA devices, which of the GPU's logical devices this is.
    """

    __slots__ = ("id", "platform", "process_index", "local_index", "torch_device", "slot",
                 "_key", "_hash")

    def __init__(
        self,
        id: int,
        platform: str,
        process_index: int,
        local_index: int,
        torch_device: torch.device,
        slot: int = 0,
    ) -> None:
        self.id = id
        self.platform = platform
        self.process_index = process_index
        self.local_index = local_index
        self.torch_device = torch_device
        self.slot = slot
        # Devices key plan caches (a sharded argument's devices): hash them once.
        self._key = (id, platform, process_index, str(torch_device), slot)
        self._hash = hash(self._key)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Device) and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        if self.platform == "cpu":
            return f"CpuDevice(id={self.id})"
        extra = f", slot={self.slot}" if self.slot else ""
        return f"CudaDevice(id={self.id}, {self.torch_device}{extra})"

    def __reduce__(self):
        return (Device, (self.id, self.platform, self.process_index, self.local_index,
                         self.torch_device, self.slot))


def check_devices(devices: Any, call: str, arg: str = "devices",
                  none_means: str | None = "every local device") -> list[Device]:
    """A ``devices`` argument as a list, checked: distinct funcdp devices, at least one.

    ``call`` names the call in messages (``funcdp.replicate``, ``pmap(f)``), ``arg`` the
    argument, ``none_means`` what passing None instead does (None: not allowed).
    Functions taking a list of devices use this, so that they accept and reject the same
    values with the same messages.
    """
    or_none = f", or None for {none_means}" if none_means else ""
    given = None
    if not isinstance(devices, (Device, str, bytes, torch.device)):
        try:
            given = list(devices)
        except TypeError:
            pass
    if given is None:
        if isinstance(devices, Device):
            fix = f"; to use that one device, pass it in a list: {arg}=[device]"
        elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
            fix = f"; for the first {devices}, pass {arg}=funcdp.local_devices()[:{devices}]"
        else:
            fix = ""
        raise TypeError(
            f"{call}: `{arg}` must be a list of funcdp.Device (e.g. "
            f"funcdp.local_devices()[:2]){or_none}; got "
            f"{a_type(devices)}: {devices!r}{fix}.")
    if not given:
        raise ValueError(f"{call}: `{arg}` is empty; pass at least one device, e.g. "
                         f"{arg}=funcdp.local_devices()[:2]{or_none}.")
    for d in given:
        if not isinstance(d, Device):
            raise TypeError(f"{call}: `{arg}` must hold funcdp devices (from "
                            f"funcdp.local_devices()), got {type(d).__name__}: {d!r}.")
    if len(set(given)) != len(given):
        twice = dict.fromkeys(d for j, d in enumerate(given) if d in given[:j])
        raise ValueError(f"{call}: `{arg}` lists a device more than once: {given!r} "
                         f"(repeats {', '.join(map(repr, twice))}); name each device once.")
    return given


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local: list[Device] | None = None
        self.all: list[Device] | None = None
        self.process_index = 0
        self.process_count = 1


_state = _State()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ValueError(
            f"environment variable `{name}` must be a positive integer, got {raw!r}; "
            f"for example `{name}=4`."
        )
    return value


def _discover(process_index: int = 0) -> list[Device]:
    platform = os.environ.get("FUNCDP_PLATFORM", "").strip().lower()
    if platform not in ("", "cpu", "cuda"):
        raise ValueError(
            f"environment variable `FUNCDP_PLATFORM` must be 'cpu' or 'cuda', got {platform!r}."
        )
    use_cuda = platform == "cuda" or (platform == "" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "FUNCDP_PLATFORM=cuda but torch.cuda.is_available() is False; unset "
            "FUNCDP_PLATFORM to use virtual CPU devices."
        )
    if not use_cuda:
        n = _env_int("FUNCDP_NUM_CPU_DEVICES", 1)
        cpu = torch.device("cpu")
        return [Device(i, "cpu", process_index, i, cpu) for i in range(n)]
    per_gpu = _env_int("FUNCDP_DEVICES_PER_GPU", 1)
    gpus = _visible_gpus()
    out: list[Device] = []
    for gpu in gpus:
        for slot in range(per_gpu):
            i = len(out)
            out.append(Device(i, "cuda", process_index, i, torch.device("cuda", gpu), slot))
    return out


def _visible_gpus() -> list[int]:
    # Under torchrun with one process per GPU, LOCAL_RANK picks the GPU (the usual
    # layout); FUNCDP_LOCAL_GPUS=all keeps every GPU in every process.
    count = torch.cuda.device_count()
    if os.environ.get("FUNCDP_LOCAL_GPUS", "").strip().lower() == "all":
        return list(range(count))
    local_rank = os.environ.get("LOCAL_RANK")
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_rank is not None and local_world is not None and int(local_world) > 1:
        return [int(local_rank) % count]
    return list(range(count))


def _ensure() -> None:
    if _state.local is None:
        with _state.lock:
            if _state.local is None:
                local = _discover()
                _state.all = list(local)
                _state.local = local


@public
def local_devices() -> list[Device]:
    """The devices of this process.

    Examples:
        >>> import funcdp
        >>> funcdp.local_devices()[0].platform in ("cpu", "cuda")
        True
    """
    _ensure()
    assert _state.local is not None
    return list(_state.local)


@public
def devices() -> list[Device]:
    """Every device of every process (in one process: the same as ``local_devices()``).

    Examples:
        >>> import funcdp
        >>> len(funcdp.devices()) == funcdp.device_count()
        True
    """
    _ensure()
    assert _state.all is not None
    return list(_state.all)


@public
def device_count() -> int:
    """The number of devices over all processes."""
    _ensure()
    assert _state.all is not None
    return len(_state.all)


@public
def local_device_count() -> int:
    """The number of devices of this process (``FUNCDP_NUM_CPU_DEVICES`` without CUDA)."""
    _ensure()
    assert _state.local is not None
    return len(_state.local)


@public
def process_index() -> int:
    """This process's index (0 unless ``funcdp.distributed.initialize`` was called)."""
    return _state.process_index


@public
def process_count() -> int:
    """The number of processes (1 unless ``funcdp.distributed.initialize`` was called)."""
    return _state.process_count


def _set_processes(process_index: int, process_count: int, all_devices: list[Device],
                   local: list[Device]) -> None:
    with _state.lock:
        _state.process_index = process_index
        _state.process_count = process_count
        _state.all = list(all_devices)
        _state.local = list(local)


def _reset() -> None:
    """Forgets the device list so the environment is read again (for tests)."""
    with _state.lock:
        _state.local = None
        _state.all = None
        _state.process_index = 0
        _state.process_count = 1
