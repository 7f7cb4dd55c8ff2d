"""Named axes: which names are bound where, and what each name is made of.

An axis name bound by ``pmap`` or ``vmap`` resolves to a tuple of *components*, in
row-major order:

- ``DeviceComp``: an axis of the device mesh of the running pmap call (the devices
  exchange data through a rendezvous);
- ``VmapComp``: a ``torch.func.vmap`` level (the values carry a batch dimension).

A pmap whose mapped size is ``k`` times its device count binds its name to
``(DeviceComp, VmapComp)``: index ``d * k + v``. A tuple of names concatenates their
components. Bindings are per thread: each device's worker has its own.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, NamedTuple, cast

import torch
from torch._C import _functorch


class _Frames(threading.local):
    def __init__(self) -> None:
        self.frames: list = []  # per thread: the bindings in effect, innermost last


_tls = _Frames()


class DeviceComp(NamedTuple):
    axis: int  # position in the mesh's axes
    size: int


class VmapComp(NamedTuple):
    level: int  # functorch level of the vmap
    size: int


# Components of different kinds never compare equal (as plain tuples, a mesh axis and a
# vmap level with the same numbers would).
def _same_kind_eq(self: tuple, other: object) -> bool:
    return type(other) is type(self) and tuple.__eq__(self, other)


def _same_kind_ne(self: tuple, other: object) -> bool:
    return not _same_kind_eq(self, other)


def _kind_hash(self: tuple) -> int:
    return hash((type(self), tuple(self)))


for _cls in (DeviceComp, VmapComp):
    _cls.__eq__ = _same_kind_eq  # type: ignore[method-assign,assignment]
    _cls.__ne__ = _same_kind_ne  # type: ignore[method-assign,assignment]
    _cls.__hash__ = _kind_hash  # type: ignore[method-assign,assignment]


class PmapFrame:
    """Bindings made by one pmap on one device."""

    __slots__ = ("names", "mesh", "coord", "kind", "device", "nested")

    def __init__(self, names: dict, mesh: Any, coord: tuple[int, ...],
                 device: torch.device) -> None:
        self.names = names
        self.mesh = mesh
        self.coord = coord
        self.kind = "pmap"
        self.device = device
        self.nested = 0  # how many nested pmap calls this participant has made


class VmapFrame:
    __slots__ = ("names", "kind")

    def __init__(self, name: Hashable, comp: VmapComp) -> None:
        self.names = {name: (comp,)}
        self.kind = "vmap"


def frames() -> list:
    return _tls.frames


class bind:
    """Context manager pushing a frame of bindings for the current thread."""

    __slots__ = ("frame",)

    def __init__(self, frame: PmapFrame | VmapFrame) -> None:
        self.frame = frame

    def __enter__(self) -> None:
        _tls.frames.append(self.frame)

    def __exit__(self, *exc: Any) -> None:
        _tls.frames.pop()


def current_pmap_frame() -> PmapFrame | None:
    for frame in reversed(_tls.frames):
        if frame.kind == "pmap":
            return frame
    return None


def vmap_name_at(level: int) -> Any:
    """The axis name bound to the vmap at ``level`` in this thread, or None."""
    for frame in reversed(frames()):
        if frame.kind == "vmap":
            for name, comps in frame.names.items():
                if comps[0].level == level:
                    return name
    return None


def current_level() -> int:
    lvl = _functorch.maybe_current_level()
    return 0 if lvl is None else lvl


def _bound_description() -> str:
    seen: dict = {}
    for frame in reversed(frames()):
        for name, comps in frame.names.items():
            if name not in seen and type(comps) is tuple:
                size = 1
                for c in comps:
                    size *= c.size
                seen[name] = f"{name!r} ({frame.kind}, size {size})"
    if not seen:
        return "no axis names are bound here (not inside funcdp.pmap or funcdp.vmap)"
    return "bound axis names here: " + ", ".join(seen.values())


def _validate_name(name: Any, call: str) -> None:
    if name is None or isinstance(name, (list, dict, set)) or not isinstance(name, Hashable):
        raise TypeError(
            f"{call}: `axis_name` must be a hashable name (such as a string) or a tuple of "
            f"names, got {name!r}."
        )


class ShardsUnreachable(RuntimeError):
    """Raised by a collective over an axis whose shards run as a vmap on each device,
    where that vmap is not running: in the backward pass that funcdp replays from the
    devices' saved graphs, where torch runs the shards' part of a custom
    ``autograd.Function``'s backward (or of a hook) as a vmap of its own. The pmap's
    backward then recomputes instead (see ``pmap._Call.backward``)."""


class Unreachable(tuple):
    """Bound in place of an axis's components where collectives cannot reach them all
    (see ``ShardsUnreachable``); resolving the name raises."""

    message: str

    def __new__(cls, message: str) -> Unreachable:
        self = super().__new__(cls)
        self.message = message
        return self


def resolve(axis_name: Any, call: str) -> tuple[tuple, tuple]:
    """Resolves a name or tuple of names to ``(components, names)``.

    Raises:
        NameError: for an unbound name, listing the bound ones.
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names:
        raise ValueError(f"{call}: `axis_name` is an empty tuple; name at least one axis.")
    comps: list = []
    stack = frames()
    for name in names:
        _validate_name(name, call)
        for frame in reversed(stack):
            found = frame.names.get(name)
            if found is not None:
                break
        else:
            raise NameError(
                f"{call}: unbound axis name {name!r}; {_bound_description()}. Collectives "
                f"must run inside funcdp.pmap(..., axis_name={name!r}) or "
                f"funcdp.vmap(..., axis_name={name!r})."
            )
        if type(found) is not tuple:
            raise ShardsUnreachable(f"{call}: {found.message}")
        for c in found:
            if c in comps:
                raise ValueError(f"{call}: axis {name!r} appears twice in `axis_name` "
                                 f"{axis_name!r}.")
            comps.append(c)
    return tuple(comps), names


def size_of(comps: tuple) -> int:
    n = 1
    for c in comps:
        n *= c.size
    return n


def _indices() -> dict:
    d = getattr(_tls, "vindex", None)
    if d is None:
        d = _tls.vindex = {}
    return d


class vmap_level:
    """Entered first thing inside a vmap body: records the level's batched ``arange``.

    The index must be made while the level is the innermost one; a batched tensor
    created later, under a grad transform nested inside, would not be a valid value there.
    """

    __slots__ = ("level", "size", "device")

    def __init__(self, size: int, device: torch.device | None) -> None:
        level = _functorch.maybe_current_level()
        assert level is not None  # made inside a vmap body
        self.level: int = level
        self.size = size
        self.device = device

    def comp(self) -> VmapComp:
        return VmapComp(self.level, self.size)

    def __enter__(self) -> VmapComp:
        idx = torch.arange(self.size, device=self.device)
        _indices()[self.level] = _functorch._add_batch_dim(idx, 0, self.level)
        return self.comp()

    def __exit__(self, *exc: Any) -> None:
        _indices().pop(self.level, None)


def comp_index(comp: DeviceComp | VmapComp, frame: PmapFrame | None,
               device: torch.device) -> torch.Tensor | int:
    """This participant's index along one component (a batched arange for vmap)."""
    if type(comp) is DeviceComp:
        assert frame is not None
        return frame.coord[comp.axis]
    return _indices()[cast(VmapComp, comp).level]
