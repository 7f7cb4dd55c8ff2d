"""Checkpoints: one file for a training state, loadable on any number or kind of devices."""

from __future__ import annotations

import collections
import enum
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pt

from funcdp._src import tree as tree_util
from funcdp._src.api_util import public
from funcdp._src.devices import Device
from funcdp._src.sharded import ShardedValue, replicate

_FORMAT = "funcdp.checkpoint"
# The newest format version this funcdp reads. A file is written as version 2 only when it
# holds a dict with tuple keys (stored as ``_encode_keys`` says), so that an older funcdp
# refuses it by its version; any other file is version 1, as before.
_VERSION = 2
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


# A dict with a tuple among its keys is stored as a dict of this key and "values": its keys
# as a list (a tuple is a pytree node: it comes back a tuple) and the dict itself, of its
# own type, keyed 0, 1, ... torch stores a dict's keys in JSON instead, which turns a tuple
# into a list that no dict can be keyed by. The file records how many there are.
_KEYS = "__funcdp_keys__"
# Keys torch's JSON gives back exactly (as the same type and value).
_PLAIN_KEYS = (str, int, float, bool, type(None))
_DICTS = (dict, collections.OrderedDict, collections.defaultdict)
_ALLOWED_KEYS = ("a checkpoint stores dict keys that are strs, ints, floats, bools, None, "
                 "tuples of these, or members of a plain Enum defined at module level")


def _key_problem(key: Any, in_tuple: bool = False) -> str | None:
    """Why a checkpoint could not give ``key`` back exactly (as a key of the same type
    and value), and the fix; None when it can."""
    if type(key) in _PLAIN_KEYS:
        return None
    if type(key) is tuple:
        return next((p for k in key if (p := _key_problem(k, True)) is not None), None)
    if isinstance(key, enum.Enum):
        cls = type(key).__qualname__
        base = next((t for t in (int, float, str) if isinstance(key, t)), None)
        if base is not None:
            kind = "an int" if base is int else f"a {base.__name__}"
            return (f"a member of {cls}, an Enum that is also {kind}, would load as the "
                    f"plain {base.__name__} it equals. Use the member's .value, or a plain "
                    f"Enum")
        if in_tuple:  # (a tuple key is stored as data, where a leaf cannot be an Enum)
            return f"a tuple key holding an Enum member ({key!r}) cannot be stored. Use its .name"
        # torch's JSON names the member by module, class and name; loading finds it again.
        if "<locals>" in cls:
            return (f"{cls} is defined inside a function, so loading could not find it. Define "
                    f"it at module level")
        if type(key).__members__.get(key.name) is not key:
            return (f"{key!r} is not a named member of {cls}, so loading could not find it. "
                    f"Use its .value")
        return None
    return (f"{_ALLOWED_KEYS}. Convert the key (to a str, say) or store the pairs as a list "
            f"of (key, value) tuples")


def _like(d: dict, items: Iterable[tuple[Any, Any]]) -> dict:
    """A dict of ``d``'s type (a ``defaultdict`` with its ``default_factory``) holding
    ``items``."""
    if type(d) is collections.defaultdict:
        return collections.defaultdict(d.default_factory, items)
    return type(d)(items)


def _walk(state: Any, node: Callable[[Any], bool],
          prefix: str) -> tuple[list, Any, Callable[[int], str]]:
    """``state``'s leaves (``node``s are leaves too, not walked into), its structure, and
    the path of leaf ``i`` (after ``prefix``), worked out only when first asked for."""
    leaves, spec = pt.tree_flatten(state, is_leaf=node)
    paths: list = []

    def where_of(i: int) -> str:
        if not paths:
            paths.extend(tree_util.leaf_paths(spec))
        return prefix + tree_util.keystr(paths[i])

    return leaves, spec, where_of


def _encode_keys(state: Any, prefix: str = "") -> tuple[Any, int]:
    """``state`` with every dict that has a tuple key replaced by ``{_KEYS: [its keys],
    "values": the dict keyed 0, 1, ...}``, and their number. A key that no checkpoint
    could give back exactly is refused, naming the dict's path (``prefix`` is the path of
    ``state``); so is a dict of the state's own with the key ``_KEYS``."""
    def node(x: Any) -> bool:  # (stops at the dicts to look at; others are walked into)
        return type(x) in _DICTS and any(type(k) not in _PLAIN_KEYS or k == _KEYS for k in x)

    leaves, spec, where_of = _walk(state, node, prefix)
    count = 0
    out = []
    for i, x in enumerate(leaves):
        if node(x):
            where = where_of(i)
            tupled = False
            for k in x:
                if type(k) is str and k == _KEYS:
                    raise ValueError(f"funcdp.save_checkpoint: the dict at state{where} has the "
                                     f"key {_KEYS!r}, which checkpoints reserve (for tuple "
                                     f"keys); rename that key.")
                problem = _key_problem(k)
                if problem is not None:
                    raise TypeError(f"funcdp.save_checkpoint: the dict at state{where} has the "
                                    f"key {k!r} of type {type(k).__name__}: {problem}.")
                if isinstance(k, enum.Enum) and type(x) is collections.defaultdict:
                    # (torch loads a defaultdict's context without its Enum decoder.)
                    raise TypeError(
                        f"funcdp.save_checkpoint: the defaultdict at state{where} has the key "
                        f"{k!r}, an Enum member, which torch's structure of a defaultdict "
                        f"cannot give back. Use a dict (or an OrderedDict), or the member's "
                        f".name.")
                tupled = tupled or type(k) is tuple
            if tupled:
                enums = [k for k in x if isinstance(k, enum.Enum)]
                if enums:
                    raise TypeError(
                        f"funcdp.save_checkpoint: the dict at state{where} has the key "
                        f"{enums[0]!r}, an Enum member, beside tuple keys: a checkpoint stores "
                        f"such a dict's keys as data, where an Enum member cannot be. Use the "
                        f"member's .name, or keep the Enum keys and the tuple keys in separate "
                        f"dicts.")
            values = []
            for k, v in x.items():
                v, inner = _encode_keys(v, f"{where}[{k!r}]")
                values.append(v)
                count += inner
            if tupled:
                x = {_KEYS: list(x), "values": _like(x, enumerate(values))}
                count += 1
            else:
                x = _like(x, zip(x, values))
        out.append(x)
    return (pt.tree_unflatten(out, spec) if count else state), count


def _keyed(x: Any) -> bool:
    """Whether ``x`` is a dict with tuple keys as ``_encode_keys`` stores it."""
    return type(x) is dict and x.keys() == {_KEYS, "values"}


def _decode_keys(state: Any) -> Any:
    """The inverse of ``_encode_keys``."""
    leaves, spec = pt.tree_flatten(state, is_leaf=_keyed)
    out = []
    for x in leaves:
        if _keyed(x):
            d = x["values"]
            x = _like(d, zip(x[_KEYS], map(_decode_keys, d.values()), strict=True))
        out.append(x)
    return pt.tree_unflatten(out, spec)


# A namedtuple is stored as a dict of this key and "fields", naming its class (a key no
# state may use otherwise); the file records how many there are.
_NAMEDTUPLE = "__funcdp_namedtuple__"


def _encode_namedtuples(state: Any, prefix: str = "") -> tuple[Any, int]:
    """``state`` with every namedtuple (an optax-style optimizer state, say) replaced by
    ``{_NAMEDTUPLE: "module:QualName", "fields": {name: value}}``, and their number: torch
    serializes a namedtuple's structure only for classes registered under a name,
    globally. A dict of the state's own with that key is refused. ``prefix`` is the path
    of ``state`` in errors; the dicts ``_encode_keys`` replaced are walked by their keys,
    so that paths name them as saved."""
    def node(x: Any) -> bool:
        return (pt.is_namedtuple_instance(x) or _keyed(x)
                or (isinstance(x, dict) and _NAMEDTUPLE in x))

    leaves, spec, where_of = _walk(state, node, prefix)
    count = 0
    out = []
    for i, x in enumerate(leaves):
        where = where_of(i) if node(x) else ""
        if _keyed(x):
            d, values = x["values"], []
            for k, v in zip(x[_KEYS], d.values()):
                v, inner = _encode_namedtuples(v, f"{where}[{k!r}]")
                values.append(v)
                count += inner
            x = {_KEYS: x[_KEYS], "values": _like(d, enumerate(values))}
        elif isinstance(x, dict) and _NAMEDTUPLE in x:
            raise ValueError(f"funcdp.save_checkpoint: the dict at state{where} has the key "
                             f"{_NAMEDTUPLE!r}, which checkpoints reserve (for namedtuples); "
                             f"rename that key.")
        elif pt.is_namedtuple_instance(x):
            cls = type(x)
            if "<locals>" in cls.__qualname__ or cls.__module__ is None:
                raise TypeError(
                    f"funcdp.save_checkpoint: the namedtuple {cls.__qualname__} at "
                    f"state{where} is defined inside a function, so loading could not find "
                    f"it; define it at module level (or save it as a dict).")
            fields = {}
            for f in cls._fields:
                fields[f], inner = _encode_namedtuples(getattr(x, f), f"{where}.{f}")
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
    ``numpy.float64``, say, loads back as a ``float``). Dict keys come back as they were
    saved: strs, ints, floats, bools, None, tuples of these (``{(0, "decay"): lr}``) and
    members of plain Enums defined at module level; other keys are refused. The file
    holds plain tensors on the CPU and a serialized pytree structure, so it loads with
    ``weights_only=True``, on a machine with any number or kind of devices.

    Raises:
        TypeError: a leaf or a dict key that a checkpoint cannot give back as it is
            (the message names its path and how to convert it), or a namedtuple defined
            inside a function.
        ValueError: a dict of the state has a key checkpoints reserve
            (``'__funcdp_namedtuple__'``, ``'__funcdp_keys__'``).

    Examples:
        >>> import os, tempfile, torch, funcdp
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> funcdp.save_checkpoint(path, {"w": funcdp.replicate(torch.ones(2)), "step": 3})
        >>> funcdp.load_checkpoint(path)
        {'w': tensor([1., 1.]), 'step': 3}
    """
    state, tuple_keyed = _encode_keys(state)
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
    payload = {"format": _FORMAT, "version": 2 if tuple_keyed else 1, "structure": structure,
               "kinds": kinds, "leaves": out, "namedtuples": namedtuples}
    if tuple_keyed:
        payload["tuple_keys"] = tuple_keyed
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
    if payload.get("namedtuples"):
        state = _decode_namedtuples(state)
    return _decode_keys(state) if payload.get("tuple_keys") else state
