"""Where devices meet: the mesh of a pmap call and its collective rounds.

Every pmap call creates a ``Mesh``: its axes (one per nested pmap level) and one
*participant* per device (a coordinate in the mesh). A collective over some mesh axes
is a *round* among the participants that agree on every other axis. Each participant
posts its payload; the last to arrive computes the result once (so every participant
receives bitwise the same value) and releases the others. Large reductions are computed
in parallel: each participant reduces its own chunk into the shared output.

Nothing hangs. The mesh knows what every participant is doing (running, waiting in a
collective, finished, raised). A round that can never complete because a member
finished or raised, or a mesh where every live participant waits (they reached
different collectives), fails at once with a ``CollectiveError`` naming what each
device reached; a round that waits longer than ``funcdp.config.collective_timeout``
fails the same way.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from funcdp._src import executor as executor_mod
from funcdp._src.config import config


class CollectiveError(RuntimeError):
    """Devices of a pmap call did not meet in a collective (or gave it mismatched inputs).

    ``secondary`` is True for the error of a device that gave up only because another
    device failed first; pmap reports the first failure instead.
    """

    secondary = False


CollectiveError.__module__ = "funcdp"

_RUNNING = "running"
_FINISHED = "finished"


class _Round:
    __slots__ = ("size", "members", "items", "descs", "arrived", "ready", "error", "result",
                 "phase", "chunks_done", "label", "waiters")

    def __init__(self, size: int, members: list[tuple], label: str) -> None:
        self.size = size
        self.members = members
        self.items: list[Any] = [None] * size
        self.descs: list[Any] = [None] * size
        self.arrived = 0
        self.ready = False
        self.error: BaseException | None = None
        self.result: Any = None
        self.phase = 0
        self.chunks_done = 0
        self.label = label
        self.waiters: list[tuple] = []


_COND_LOCK = threading.Lock()


class Mesh:
    """The participants of one pmap call (or of a nested pmap level) and their rounds."""

    def __init__(self, label: str, names: tuple, sizes: tuple[int, ...],
                 devices: dict[tuple, Any], proc: Any = None, offset: int = 0) -> None:
        self.label = label
        self.names = names
        self.sizes = sizes
        self.devices = devices  # coord -> Device, for messages
        self._cond: threading.Condition | None = None  # made by the first that needs it
        self.states: dict[tuple, Any] = dict.fromkeys(devices, _RUNNING)
        # Every participant of this process, registered or not yet (a nested mesh learns
        # its devices as the outer devices join).
        self.total = max(len(devices), sizes[0] if len(sizes) == 1 else _product(sizes))
        self.rounds: dict[tuple, _Round] = {}
        self.failure: CollectiveError | None = None
        self.children: dict[Any, Mesh] = {}
        # Multi-process runs: this process's place; coordinates along axis 0 are global.
        self.proc = proc
        self.offset = offset
        # A top-level call spanning processes: its number and state in their exchanges
        # (shared with its nested meshes; see process_collectives).
        self.call: Any = (proc.new_call() if proc is not None and len(sizes) == 1
                          and proc.count > 1 else None)
        self.watched: list[tuple[Any, int, str, str | None]] = []
        # Copies of one value made for the participants (small collective results, the
        # small results of a shared update): id(copy) -> (weak reference to the copy, weak
        # reference to the source, the versions of both when the copy was made). See
        # ``same_copies``.
        self.copies: dict[int, tuple] = {}

    @property
    def cond(self) -> threading.Condition:
        """The lock of the mesh's state, and where participants wait (made on first use:
        most calls of small functions never need it)."""
        c = self._cond
        if c is None:
            with _COND_LOCK:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition(threading.Lock())
        return c

    def watch(self, tensor: Any, label: str, what: str | None = None) -> None:
        """Remembers a result shared by all participants, to check it was not written to;
        ``what`` says which results are shared (by default, large collective results)."""
        self.watched.append((tensor, tensor._version, label, what))

    def note_copies(self, sources: Any, copies: Any) -> None:
        """Remembers that each tensor of ``copies`` was just copied from the same position
        of ``sources`` (see ``same_copies``). Only weak references: an entry goes when its
        copy does, and keeps no tensor alive (a call may run many collectives). Inference
        tensors, which have no version counter, are left out."""
        table = self.copies
        for src, c in zip(sources, copies):
            if c.is_inference() or src.is_inference():
                continue
            key = id(c)
            table[key] = (weakref.ref(c, functools.partial(_drop, table, key)),
                          weakref.ref(src), c._version, src._version)

    def check_watched(self) -> None:
        """Raises if a device modified a shared collective result in place."""
        for tensor, version, label, what in self.watched:
            if tensor._version != version:
                what = what or f"Collective results of more than {_copy_max()} elements"
                raise CollectiveError(
                    f"{self.label}: the result of {label} was modified in place on a device "
                    f"(an in-place op such as `+=`, `add_` or `copy_`). {what} are one buffer "
                    f"that every device reads, as values are in JAX: write `y = y + ...` "
                    f"instead of `y += ...`, or `y.clone()` first.")
        self.watched.clear()

    # -- participants ----------------------------------------------------------------
    def leave(self, coord: tuple, error: BaseException | None = None) -> None:
        """Marks a participant as finished (or raised) and fails rounds that need it."""
        state = _FINISHED if error is None else ("raised", error)
        if self.children:  # (its nested calls' participants will never join them now)
            with self.cond:
                children = list(self.children.values())
            for m in children:
                m.outer_left(coord, state)
        if error is not None and self.call is not None:
            self._raise_across_processes(coord, state, error)
            return
        # Without the lock while no round is open and the participant is known (replacing
        # a value never resizes the dict another thread may be iterating): a round opened
        # later checks the states, under the lock, before it waits, and sees this one.
        if coord in self.states and not self.rounds and self.failure is None:
            self.states[coord] = state
            if not self.rounds:
                return
        self._set_state(coord, state)

    def _set_state(self, coord: tuple, state: Any) -> None:
        with self.cond:
            self.states[coord] = state
            if self.rounds:
                self._check_stuck()

    def _raise_across_processes(self, coord: tuple, state: Any, error: BaseException) -> None:
        """``leave`` for a participant that raised in a call spanning processes: the
        first to raise outside an exchange between processes then tells the other
        processes (``tell_failure``)."""
        tell = len(self.sizes) == 1 and self.call.awaited() and self.call.claim()
        self._set_state(coord, state)
        if tell:
            from funcdp._src.process_collectives import tell_failure

            tell_failure(self, coord, error)

    def _describe(self, coord: tuple) -> str:
        state = self.states.get(coord, _RUNNING)
        dev = self.devices.get(coord)
        where = f"device {_fmt_coord(coord)}" + (f" ({dev!r})" if dev is not None else "")
        if state == _RUNNING:
            what = "is still running the function (not in a collective)"
        elif dev is None and _done(state):  # (see outer_left)
            what = (f"never made this nested pmap call: its outer device "
                    f"{'finished the function' if state == _FINISHED else 'raised'}")
        elif state == _FINISHED:
            what = "finished the function"
        elif state[0] == "raised":
            err = state[1]
            if isinstance(err, CollectiveError):
                what = "failed in a collective (see the error above)"
            else:
                first = str(err).splitlines()[0] if str(err) else ""
                what = f"raised {type(err).__name__}: {first}"
        else:
            what = f"is waiting in {state[1]}"
        return f"  - {where} {what}"

    def _report(self, headline: str, hint: str) -> CollectiveError:
        lines = [f"{self.label}: {headline}"]
        # (With the participants of outer devices that left before joining: see outer_left.)
        lines += [self._describe(c) for c in sorted(set(self.devices) | set(self.states))]
        lines.append(hint)
        return CollectiveError("\n".join(lines))

    def _check_stuck(self) -> None:
        """Fails rounds that cannot complete. Caller holds the lock."""
        failed = False
        for key, rnd in list(self.rounds.items()):
            if rnd.ready or rnd.error is not None:
                continue
            gone = [m for m in rnd.members
                    if self.states.get(m, _RUNNING) == _FINISHED
                    or (isinstance(self.states.get(m), tuple)
                        and self.states[m][0] == "raised")]
            if gone:
                raised = any(isinstance(self.states.get(m), tuple)
                             and self.states[m][0] == "raised" for m in gone)
                if raised:
                    err = self._report(
                        f"{rnd.label} was abandoned because a device raised an exception.",
                        "The device's own exception is the cause; fix it first.")
                    err.secondary = True
                else:
                    err = self._report(
                        f"devices wait in {rnd.label} for a device that already finished "
                        f"the function.",
                        "Every device must call the same collectives in the same order; "
                        "look for Python control flow that depends on the device's data "
                        "or on axis_index.")
                rnd.error = err
                del self.rounds[key]
                rnd.waiters.clear()
                failed = True
        if self.rounds and not failed:
            waiting = sum(1 for s in self.states.values()
                          if isinstance(s, tuple) and s[0] == "waiting")
            running = self.total - waiting - sum(
                1 for s in self.states.values()
                if s == _FINISHED or (isinstance(s, tuple) and s[0] == "raised"))
            if running == 0 and waiting:
                err = self._report(
                    "the devices reached different collectives and none can proceed.",
                    "Every device must call the same collectives, over the same axes and "
                    "groups, in the same order.")
                self.failure = err
                for rnd in self.rounds.values():
                    rnd.error = err
                self.rounds.clear()
                failed = True
        if failed:
            self.cond.notify_all()

    # -- rounds ----------------------------------------------------------------------
    def exchange(
        self,
        coord: tuple,
        axes: tuple[int, ...],
        group: tuple[int, Sequence[tuple]] | None,
        rank: int,
        size: int,
        label: str,
        desc: Any,
        payload: Any,
        compute: Callable[[list[Any]], Any],
        chunked: Callable[[list[Any], Any, int, int], None] | None = None,
        finish: Callable[[Any], None] | None = None,
    ) -> Any:
        """One participant's part in a collective round.

        Args:
            coord: the participant's coordinate.
            axes: mesh axes the collective spans.
            group: ``(group_id, member coords)`` for ``axis_index_groups``, else None.
            rank: this participant's index within the round.
            size: number of participants in the round.
            label: the collective as the user wrote it, for messages.
            desc: what must agree across participants (shapes, dtypes, parameters).
            payload: this participant's contribution.
            compute: ``compute(payloads) -> result``, run once by the last arrival; or,
                with ``chunked``, ``compute(payloads)`` allocates the result and
                ``chunked(payloads, result, rank, size)`` fills one participant's chunk.
            finish: with ``chunked``, ``finish(result)`` runs once all chunks are written,
                before anyone is released.

        Returns:
            The shared result.
        """
        other = tuple(c for a, c in enumerate(coord) if a not in axes)
        key = (axes, len(coord), other, tuple(group[1]) if group else None)
        with self.cond:
            if self.failure is not None:
                raise self.failure
            rnd = self.rounds.get(key)
            if rnd is None:
                members = list(group[1]) if group else _members(coord, axes, self.sizes)
                rnd = self.rounds[key] = _Round(size, members, label)
            rnd.items[rank] = payload
            rnd.descs[rank] = desc
            rnd.arrived += 1
            last = rnd.arrived == size
            if last:
                del self.rounds[key]
            else:
                self._wait(coord, rnd, label, lambda: rnd.phase >= 1)
        if last:
            self._complete(rnd, compute, chunked is not None)
            if rnd.error is not None:
                raise rnd.error
        if chunked is None:
            return rnd.result
        # Every participant reduces its own chunk, then waits for the others' chunks.
        try:
            chunked(rnd.items, rnd.result, rank, size)
        except BaseException as e:
            # The round has left self.rounds: fail it here, or the others would wait for
            # this chunk until the timeout.
            with self.cond:
                if rnd.error is None:
                    rnd.error = e
                self._release(rnd)
            raise
        with self.cond:
            rnd.chunks_done += 1
            if rnd.chunks_done == size:
                if finish is not None:
                    finish(rnd.result)
                rnd.phase = 2
                self._release(rnd)
            else:
                self._wait(coord, rnd, label, lambda: rnd.phase >= 2)
        return rnd.result

    def _complete(self, rnd: _Round, compute: Callable, chunked: bool) -> None:
        first = rnd.descs[0]
        if any(d != first for d in rnd.descs):
            lines = [f"{self.label}: the devices reached different collectives (or passed "
                     f"values of different shapes or dtypes):"]
            for r, d in enumerate(rnd.descs):
                coord = rnd.members[r] if r < len(rnd.members) else None
                dev = self.devices.get(coord)  # type: ignore[arg-type]  # None: no device
                who = (f"device {_fmt_coord(coord)}" + (f" ({dev!r})" if dev is not None else "")
                       if coord is not None else f"participant {r}")
                lines.append(f"  - {who}: {_fmt_desc(d)}")
            lines.append("Every device must pass values of the same shape and dtype, with the "
                         "same parameters, to each collective.")
            rnd.error = CollectiveError("\n".join(lines))
        else:
            try:
                rnd.result = compute(rnd.items)
            except BaseException as e:  # noqa: BLE001 - delivered to every participant
                rnd.error = e
        with self.cond:
            rnd.phase = 1
            if rnd.error is None and not chunked:
                rnd.phase = 2
            self._release(rnd)

    def _wait(self, coord: tuple, rnd: _Round, label: str, done: Callable[[], bool]) -> None:
        """Waits (lock held) until ``done()``; raises the round's error or a timeout."""
        # Devices this thread was to run one after another must start elsewhere now.
        executor_mod.before_blocking()
        self.states[coord] = ("waiting", label)
        rnd.waiters.append(coord)
        self._check_stuck()
        deadline = time.monotonic() + config.collective_timeout
        try:
            while not done() and rnd.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    err = self._report(
                        f"timed out after {config.collective_timeout:g} s waiting in "
                        f"{label}.",
                        "A device is slow or stuck outside collectives; raise "
                        "funcdp.config.collective_timeout if it is just slow.")
                    rnd.error = err
                    for k, r in list(self.rounds.items()):
                        if r is rnd:
                            del self.rounds[k]
                    self.cond.notify_all()
                    break
                self.cond.wait(remaining)
        finally:
            self.states[coord] = _RUNNING
        if rnd.error is not None:
            raise rnd.error

    def _release(self, rnd: _Round) -> None:
        """Marks a round's waiters as running again (lock held) and wakes them.

        Done by whoever completes the round, so that a participant that has been released
        but not yet scheduled never counts as blocked in deadlock detection.
        """
        for c in rnd.waiters:
            self.states[c] = _RUNNING
        rnd.waiters.clear()
        self.cond.notify_all()

    # -- nesting ---------------------------------------------------------------------
    def child(self, key: Any, make: Callable[[], Mesh]) -> Mesh:
        with self.cond:
            m = self.children.get(key)
            if m is None:
                m = self.children[key] = make()
                m.call = self.call
                left = [(c, s) for c, s in self.states.items() if _done(s)]
            else:
                left = []
        for c, s in left:  # (outer participants that finished before this call was made)
            m.outer_left(c, s)
        return m

    def outer_left(self, prefix: tuple, state: Any) -> None:
        """The outer participant ``prefix`` of this nested mesh finished (or raised) its
        function: its inner participants that have not joined never will, and rounds that
        need them fail now instead of waiting out the timeout."""
        inner = itertools.product(*(range(n) for n in self.sizes[len(prefix):]))
        with self.cond:
            for rest in inner:
                c = prefix + rest
                if not _done(self.states.get(c, _RUNNING)):
                    self.states[c] = state
            if self.rounds:
                self._check_stuck()
        for m in list(self.children.values()):
            m.outer_left(prefix, state)


def _done(state: Any) -> bool:
    """Whether a participant's state is final (finished, or raised)."""
    return state == _FINISHED or (isinstance(state, tuple) and state[0] == "raised")


def _copy_max() -> int:
    from funcdp._src.collectives import _COPY_MAX_NUMEL

    return _COPY_MAX_NUMEL


def _product(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _members(coord: tuple, axes: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple]:
    ranges = [range(sizes[a]) for a in axes]
    out = []
    for combo in itertools.product(*ranges):
        c = list(coord)
        for a, v in zip(axes, combo):
            c[a] = v
        out.append(tuple(c))
    return out


def _fmt_coord(coord: tuple) -> str:
    return str(coord[0]) if len(coord) == 1 else str(coord)


def _fmt_desc(desc: Any) -> str:
    if isinstance(desc, tuple) and len(desc) in (2, 3):
        # ((call, kind, shapes): a shared update's round, whose kind is for matching only.)
        params, shapes = desc[0], desc[-1]
        values = ", ".join(f"{tuple(shape)} {dtype.replace('torch.', '')}"
                           for shape, dtype in shapes)
        return f"{params} with values [{values}]"
    return repr(desc)


def _drop(table: dict, key: int, _ref: Any) -> None:
    table.pop(key, None)


def same_copies(copies: dict[int, tuple], a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are known to hold the same values: copies of one source
    noted by ``Mesh.note_copies`` (or the source and a copy of it), each unchanged since
    (their version counters: an in-place write bumps them). A write that bypasses the
    version counter (through ``.data``, DLPack or a NumPy view, the tensor's storage,
    another tensor set to the same storage, ``torch.utils.swap_tensors``) is not seen:
    like a sampled comparison, this is for calls after a plan's first ones (see pmap's
    ``_replicated``)."""
    eb = copies.get(id(b))
    if eb is None or eb[0]() is not b or b._version != eb[2]:
        return False
    # (The source's weak reference is the same object for every copy of it while it
    # lives, and never that of another tensor: it identifies the source.)
    src = eb[1]
    if src() is a:
        return a._version == eb[3]
    ea = copies.get(id(a))
    return (ea is not None and ea[0]() is a and a._version == ea[2] and ea[1] is src
            and ea[3] == eb[3])
