"""Checkpoints: one file for a training state, loadable on any number or kind of devices."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pt

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device
from funcdp._src.sharded import ShardedValue, replicate

_FORMAT = "funcdp.checkpoint"
_VERSION = 1
_NOT_A_VALUE = object()


def _plain_value(leaf: Any) -> Any:
    """``leaf`` as the builtin value ``torch.load(weights_only=True)`` reads back: a bool,
    int, float or str subclass (``numpy.float64``, an ``IntEnum``) or a NumPy scalar becomes
    the exact builtin type; anything else is ``_NOT_A_VALUE``.
    """
    if isinstance(leaf, np.generic):
        leaf = leaf.item()
    if leaf is None or type(leaf) in (bool, int, float, str):
        return leaf
    # (The base types' own conversions: a subclass's __str__ or __int__ may say more.)
    if isinstance(leaf, int):
        return int.__int__(leaf)
    if isinstance(leaf, float):
        return float.__float__(leaf)
    if isinstance(leaf, str):
        return str.__str__(leaf)
    return _NOT_A_VALUE


def _replica(v: ShardedValue) -> torch.Tensor | None:
    """The one value of ``v`` if every slice of it along its (leading) mapped axis is that
    value, else None. The slices are one value when they are the same tensor or memory
    (``replicate``; a collective's result on CPU devices) or bitwise equal copies (a
    pmap's small replicated outputs are per-device copies; copies on separate GPUs).
    Empty slices hold nothing to compare: they count only when they are one tensor. A
    value of several shards per device is not replicated: replicating it again would
    give one copy per device, not per shard, and the pmap it came from needs as many
    shards as before.
    """
    if v.axis != 0 or v.block != 1:
        return None
    rows = v.shards
    first = rows[0]
    for r in rows[1:]:
        if r is first:
            continue
        if r.shape != first.shape or r.dtype != first.dtype or not r.numel():
            return None
        if (r.data_ptr() == first.data_ptr() and r.device == first.device
                and r.stride() == first.stride()):
            continue
        if not _same_bits(first, r.to(first.device)):
            return None
    return first


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape and dtype) hold the same bits: NaNs with the
    same payload are equal, ``0.0`` and ``-0.0`` are not (a replicated value's copies are
    bitwise identical, as collectives make them)."""
    try:
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                           b.contiguous().reshape(-1).view(torch.uint8))
    except (RuntimeError, TypeError):  # (a layout without a byte view: sparse, quantized)
        return torch.equal(a, b)


# A namedtuple is stored as a dict of this key and "fields", naming its class (a key no
# state may use otherwise); the file records how many there are.
_NAMEDTUPLE = "__funcdp_namedtuple__"


def _encode_namedtuples(state: Any) -> tuple[Any, int]:
    """``state`` with every namedtuple (an optax-style optimizer state, say) replaced by
    ``{_NAMEDTUPLE: "module:QualName", "fields": {name: value}}``, and their number: torch
    serializes a namedtuple's structure only for classes registered under a name,
    globally. A dict of the state's own with that key is refused."""
    def node(x: Any) -> bool:
        return pt.is_namedtuple_instance(x) or (isinstance(x, dict) and _NAMEDTUPLE in x)

    leaves, spec = pt.tree_flatten(state, is_leaf=node)
    count = 0
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, dict) and _NAMEDTUPLE in x:
            path = tree_util.keystr(tree_util.leaf_paths(spec)[i])
            raise ValueError(f"funcdp.save_checkpoint: the dict at state{path} has the key "
                             f"{_NAMEDTUPLE!r}, which checkpoints reserve (for namedtuples); "
                             f"rename that key.")
        if pt.is_namedtuple_instance(x):
            cls = type(x)
            if "<locals>" in cls.__qualname__ or cls.__module__ is None:
                path = tree_util.keystr(tree_util.leaf_paths(spec)[i])
                raise TypeError(
                    f"funcdp.save_checkpoint: the namedtuple {cls.__qualname__} at "
                    f"state{path} is defined inside a function, so loading could not find "
                    f"it; define it at module level (or save it as a dict).")
            fields = {}
            for f in cls._fields:
                fields[f], inner = _encode_namedtuples(getattr(x, f))
                count += inner
            x = {_NAMEDTUPLE: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
            count += 1
        out.append(x)
    return (pt.tree_unflatten(out, spec) if count else state), count


def _decode_namedtuples(state: Any) -> Any:
    """The inverse of ``_encode_namedtuples``; each namedtuple's class is looked up in its
    module, which must be imported (loading imports nothing)."""
    def marked(x: Any) -> bool:
        return type(x) is dict and x.keys() == {_NAMEDTUPLE, "fields"}

    leaves, spec = pt.tree_flatten(state, is_leaf=marked)
    out = []
    for x in leaves:
        if marked(x):
            cls = _namedtuple_class(x[_NAMEDTUPLE], tuple(x["fields"]))
            x = cls(**{f: _decode_namedtuples(v) for f, v in x["fields"].items()})
        out.append(x)
    return pt.tree_unflatten(out, spec)


def _namedtuple_class(name: str, fields: tuple) -> type:
    module, _, qualname = name.partition(":")
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if cls is None:
        raise ValueError(f"funcdp.load_checkpoint: the checkpoint holds a namedtuple "
                         f"{qualname} of module {module!r}, which is not imported (or has no "
                         f"{qualname}); import that module before loading (loading imports "
                         f"nothing a file names).")
    if not pt.is_namedtuple_class(cls) or tuple(cls._fields) != fields:
        raise ValueError(f"funcdp.load_checkpoint: the checkpoint holds a namedtuple "
                         f"{qualname} with fields {list(fields)}, but {module}.{qualname} "
                         f"is now {getattr(cls, '_fields', cls)!r}; load it with the "
                         f"class it was saved with.")
    return cls


@public
def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Saves a training state (any pytree of tensors, sharded values and numbers) to ``path``.

    A sharded value mapped on its leading axis whose shards are all one value, bit for
    bit, is *replicated*: stored once, without its device axis, and replicated again onto
    any number of devices when loading. That is what ``funcdp.replicate`` makes, and what
    a pmap with ``in_axes=0``/``out_axes=0`` returns for a replicated training state (its
    large leaves are one shared buffer, its small ones equal per-device copies). Other
    sharded values are gathered (their mapped axis is kept); plain tensors (such as
    ``out_axes=None`` results) are stored as they are, so save a per-device value whose
    shards may happen to be equal (a loss that is zero everywhere) as ``v.to_tensor()`` to
    keep its device axis. Namedtuples (an optax-style optimizer state) are stored with
    their class's name and rebuilt when loading, which finds the class in its module: the
    loading program must have imported it (nothing is imported for a file). Numbers and
    strings are stored as the builtin ``bool``, ``int``, ``float`` or ``str`` (a
    ``numpy.float64``, say, loads back as a ``float``). The file holds plain tensors on
    the CPU and a serialized pytree structure, so it loads with ``weights_only=True``, on
    a machine with any number or kind of devices.

    Examples:
        >>> import os, tempfile, torch, funcdp
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> funcdp.save_checkpoint(path, {"w": funcdp.replicate(torch.ones(2)), "step": 3})
        >>> funcdp.load_checkpoint(path)
        {'w': tensor([1., 1.]), 'step': 3}
    """
    state, namedtuples = _encode_namedtuples(state)
    leaves, spec = pt.tree_flatten(state)
    out: list[Any]  # tensors, and the plain values of "value" leaves
    kinds, out = [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, ShardedValue):
            if (one := _replica(leaf)) is not None:
                kinds.append("replicated")
                out.append(one.detach().cpu())
            else:
                kinds.append("sharded")
                out.append(leaf.to_tensor().detach().cpu())
        elif isinstance(leaf, torch.Tensor):
            kinds.append("tensor")
            out.append(leaf.detach().cpu())
        elif (value := _plain_value(leaf)) is not _NOT_A_VALUE:
            kinds.append("value")
            out.append(value)
        else:
            path = tree_util.keystr(tree_util.leaf_paths(spec)[i])
            raise TypeError(
                f"funcdp.save_checkpoint: cannot save a leaf of type {type(leaf).__name__} "
                f"at state{path}; a checkpoint holds tensors, sharded values, numbers "
                f"(bool, int, float, or NumPy scalars of these), strs and None. Convert it to "
                f"one of these (torch.as_tensor(x) for an array) or leave it out of the state.")
    try:
        structure = pt.treespec_dumps(spec)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        raise TypeError(f"funcdp.save_checkpoint: the state's structure cannot be serialized "
                        f"({e}); use dicts, lists, tuples and namedtuples.") from None
    payload = {"format": _FORMAT, "version": _VERSION, "structure": structure,
               "kinds": kinds, "leaves": out, "namedtuples": namedtuples}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


@public
def load_checkpoint(path: str | os.PathLike, *, replicate_to: Sequence[Device] | None = None,
                    map_location: Any = "cpu") -> Any:
    """Loads a state saved by ``save_checkpoint``.

    Args:
        path: the file.
        replicate_to: devices to replicate the values that were replicated when saved
            onto (e.g. ``funcdp.local_devices()``; any number of devices); by default
            they come back as plain tensors without a device axis, whatever device count
            saved them. Other sharded values come back as plain tensors with their
            mapped axis either way.
        map_location: where tensors are loaded (as in ``torch.load``).

    Returns:
        The state, with the structure it was saved with.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"funcdp.load_checkpoint: {os.fspath(path)!r} is not a funcdp "
                         f"checkpoint (written by funcdp.save_checkpoint).")
    version = payload.get("version")
    if not isinstance(version, int) or version > _VERSION:
        raise ValueError(f"funcdp.load_checkpoint: {os.fspath(path)!r} has checkpoint format "
                         f"version {version!r}; this funcdp reads versions up to {_VERSION}. "
                         f"Load it with the newer funcdp that wrote it.")
    spec = pt.treespec_loads(payload["structure"])
    leaves = []
    for kind, leaf in zip(payload["kinds"], payload["leaves"]):
        if kind == "replicated" and replicate_to is not None:
            leaf = replicate(leaf, replicate_to)
        leaves.append(leaf)
    state = pt.tree_unflatten(leaves, spec)
    return _decode_namedtuples(state) if payload.get("namedtuples") else state
