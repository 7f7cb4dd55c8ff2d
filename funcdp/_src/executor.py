"""Runs one function per device, each on that device's persistent worker.

Every local device has a persistent worker thread per nesting depth (a pmap inside a
pmap runs on the next depth's workers, so an outer call never waits on a worker it is
itself occupying), and per outer device at depths past the first (two outer devices
whose nested calls use the same device do not queue behind each other). The calling
thread runs the first device's share itself, so a call on one device costs no thread
hand-off at all.

Workers run under the caller's thread-local state: grad mode, inference mode, autocast
(enabled flag *and* dtype, for CPU, and for CUDA in builds with CUDA), the innermost
saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``; or their being
disabled, as torch.func's grad disables them) and torch function and dispatch modes are
carried in. On CPU devices, which share the host's cores, each worker uses
``cores // devices`` intra-op threads while a call runs: oversubscribing the cores makes
everyone slower.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch._functorch import eager_transforms as _eager

from funcdp._src.devices import Device

_tls = threading.local()


def current_depth() -> int:
    """How many device functions enclose the running code in this thread."""
    return getattr(_tls, "depth", 0)


def _blocking_hooks() -> list:
    hooks = getattr(_tls, "hooks", None)
    if hooks is None:
        hooks = _tls.hooks = []
    return hooks


def before_blocking() -> None:
    """Called by code about to wait for other devices: devices that the calling thread
    was going to run one after another are handed to their workers first."""
    hooks = getattr(_tls, "hooks", None)
    if hooks:
        for hook in list(hooks):
            hook()


class Inline:
    """A request to run a call's devices one after another in the calling thread."""

    __slots__ = ("handed_off",)

    def __init__(self) -> None:
        self.handed_off = False


# One call for "is autocast on for any device type" (a newer torch's), else a stand-in.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


# The device types whose autocast a call carries (CUDA's only in builds with CUDA: every
# call reads each type's dtype, at 0.1-0.2 us a read), and their defaults, which a new
# thread (a worker between tasks) has.
_AUTOCAST_KINDS: tuple[str, ...] = ("cpu", "cuda") if torch.backends.cuda.is_built() else ("cpu",)
_DEFAULT_DTYPES = tuple({"cpu": torch.bfloat16, "cuda": torch.float16}[k] for k in _AUTOCAST_KINDS)
_ALL_OFF = (False,) * len(_AUTOCAST_KINDS)
_get_autocast_dtype = torch.get_autocast_dtype

if len(_AUTOCAST_KINDS) == 1:
    def _dtypes_now() -> tuple:
        return (_get_autocast_dtype("cpu"),)

    def _dtypes_changed(dtypes: tuple) -> bool:
        return _get_autocast_dtype("cpu") is not dtypes[0]
else:
    def _dtypes_now() -> tuple:
        return _get_autocast_dtype("cpu"), _get_autocast_dtype("cuda")

    def _dtypes_changed(dtypes: tuple) -> bool:
        return (_get_autocast_dtype("cpu") is not dtypes[0]
                or _get_autocast_dtype("cuda") is not dtypes[1])


def _enabled_now() -> tuple:
    return tuple(torch.is_autocast_enabled(kind) for kind in _AUTOCAST_KINDS)


def autocast_now() -> tuple:
    """The thread's autocast settings: each device type's dtype, and whether each is
    enabled (``()`` when none is, found with one call)."""
    dtypes = _dtypes_now()
    if not _any_autocast():
        return dtypes, ()
    return dtypes, _enabled_now()


def _restore_autocast(before: tuple) -> None:
    """Puts the thread's autocast settings back to ``before`` (``autocast_now()``), after
    a device's function that switched autocast (``torch.set_autocast_enabled``) or its
    dtype (``set_autocast_dtype``) for good."""
    if autocast_now() == before:
        return
    dtypes, enabled = before
    for kind, dtype, on in zip(_AUTOCAST_KINDS, dtypes, enabled or _ALL_OFF):
        torch.set_autocast_dtype(kind, dtype)
        torch.set_autocast_enabled(kind, on)


# A new thread's settings (a worker's between tasks).
_DEFAULT_AUTOCAST = (_DEFAULT_DTYPES, ())

# This thread's innermost saved-tensor hooks, (pack, unpack) or None, and whether hooks
# are enabled (torch.func's grad and vjp disable them, with a message).
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_saved_tensors_hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled  # type: ignore[attr-defined]
# Where torch.utils.checkpoint's hooks come from: those stay in the caller's thread.
_CHECKPOINT_MODULE = "torch.utils.checkpoint"


def _clear_saved_tensors_hooks() -> None:
    """Gives a worker a new thread's saved-tensor hooks again (none, enabled) after a
    task: without those it came with, and any its function pushed, or disabled, for good."""
    if not _saved_tensors_hooks_enabled():
        torch._C._autograd._saved_tensors_hooks_enable()
    while _top_saved_tensors_hooks(True) is not None:
        torch._C._autograd._pop_saved_tensors_default_hooks()


class autocast_as:  # noqa: N801 - a context manager, named like torch.autocast
    """Runs a block under the autocast settings ``state`` (an ``autocast_now()``): a
    recomputation of a forward pass under the autocast it ran with."""

    __slots__ = ("state", "entered")

    def __init__(self, state: tuple) -> None:
        self.state = state
        self.entered: list = []

    def __enter__(self) -> None:
        (now_dtypes, now_on), (dtypes, on) = autocast_now(), self.state
        for i, kind in enumerate(_AUTOCAST_KINDS):
            want = (bool(on and on[i]), dtypes[i])
            if (bool(now_on and now_on[i]), now_dtypes[i]) != want:
                cm = torch.autocast(kind, enabled=want[0], dtype=want[1])
                cm.__enter__()
                self.entered.append(cm)

    def __exit__(self, *exc: Any) -> None:
        while self.entered:
            self.entered.pop().__exit__(None, None, None)


class ThreadState:
    """The caller's thread-local torch state, to be re-created on workers: grad and
    inference mode, autocast (enabled or not, its dtypes), the innermost saved-tensor
    hooks, and the torch function and dispatch modes in effect (a ``torch.device``
    context, a FLOP counter), so that every device runs under what the calling thread's
    own device does. Modes marked ``funcdp_per_device`` (each device's random routing)
    belong to one device and stay behind, and so do torch.utils.checkpoint's hooks: its
    recomputation matches saved tensors to its hooks' calls by their order, which threads
    packing at once would shuffle (so a checkpoint around a pmap call covers the
    activations of the devices that run in the calling thread only)."""

    __slots__ = ("grad", "inference", "autocast", "hooks", "fmodes", "dmodes")

    def __init__(self) -> None:
        # (Every call's path: what can wait is left to ``enter``, on the workers.)
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        dtypes = _dtypes_now()
        self.autocast = (dtypes, _enabled_now()) if _any_autocast() else (dtypes, ())
        # The innermost hooks, (pack, unpack) or None; or the message of hooks disabled
        # (under which torch applies none, and refuses new ones).
        self.hooks = (_top_saved_tensors_hooks(False) if _saved_tensors_hooks_enabled()
                      else torch._C._autograd._saved_tensors_hooks_get_disabled_error_message())
        self.fmodes: tuple = ()
        if torch._C._len_torch_function_stack():
            self.fmodes = tuple(m for m in _function_mode_stack()
                                if not getattr(m, "funcdp_per_device", False))
        self.dmodes: tuple = ()
        if torch._C._len_torch_dispatch_stack():
            self.dmodes = tuple(_dispatch_mode_stack())

    def enter(self, undo: list) -> None:
        """Applies the state in the current thread (a worker's, at a new thread's
        settings), adding what to undo to ``undo`` as it goes. Autocast dtypes and
        saved-tensor hooks are left to ``_run_task``, which gives the worker a new
        thread's after every task (whatever the function did to them)."""
        hooks = self.hooks
        if (self.grad and not self.inference and self.autocast == _DEFAULT_AUTOCAST
                and hooks is None and not self.fmodes and not self.dmodes):
            return
        if self.inference:
            cm: Any = torch.inference_mode(True)
            cm.__enter__()
            undo.append(cm)
        if not self.grad:
            cm = torch.no_grad()
            cm.__enter__()
            undo.append(cm)
        dtypes, enabled = self.autocast
        for kind, dtype, on, default in zip(_AUTOCAST_KINDS, dtypes, enabled or _ALL_OFF,
                                            _DEFAULT_DTYPES):
            if on:
                cm = torch.autocast(kind, dtype=dtype)
                cm.__enter__()
                undo.append(cm)
            elif dtype is not default:
                # (For a ``torch.autocast(kind)`` in the function, which takes this dtype.)
                torch.set_autocast_dtype(kind, dtype)
        if type(hooks) is str:
            torch._C._autograd._saved_tensors_hooks_disable(hooks)
        elif hooks is not None and getattr(hooks[0], "__module__", None) != _CHECKPOINT_MODULE:
            torch._C._autograd._push_saved_tensors_default_hooks(*hooks)
        if self.fmodes or self.dmodes:
            modes = _Modes(self.fmodes, self.dmodes)
            modes.__enter__()
            undo.append(modes)

    @staticmethod
    def exit(undo: list) -> None:
        for cm in reversed(undo):
            cm.__exit__(None, None, None)


def _function_mode_stack() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def _dispatch_mode_stack() -> list:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return _get_current_dispatch_mode_stack()


class _Modes:
    """Pushes torch function and dispatch modes on this thread's stacks (bottom first)."""

    def __init__(self, fmodes: tuple, dmodes: tuple) -> None:
        self.fmodes = fmodes
        self.dmodes = dmodes

    def __enter__(self) -> None:
        from torch.utils._python_dispatch import _push_mode

        for m in self.fmodes:
            torch._C._push_on_torch_function_stack(m)
        for m in self.dmodes:
            _push_mode(m)

    def __exit__(self, *exc: Any) -> None:
        from torch.utils._python_dispatch import _pop_mode

        for _ in self.dmodes:
            _pop_mode()
        for _ in self.fmodes:
            torch._C._pop_torch_function_stack()


class _Task:
    __slots__ = ("fn", "index", "state", "threads", "done")

    def __init__(self, fn, index, state, threads, done) -> None:
        self.fn = fn
        self.index = index
        self.state = state
        self.threads = threads
        self.done = done


class _Worker:
    def __init__(self, device: Device, depth: int) -> None:
        self.device = device
        self.depth = depth
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.thread = threading.Thread(
            target=self._loop, name=f"funcdp-{device!r}-depth{depth}", daemon=True
        )
        self.thread.start()

    def _loop(self) -> None:
        _tls.depth = self.depth + 1
        if self.device.platform == "cuda":
            torch.cuda.set_device(self.device.torch_device)
        while True:
            task = self.queue.get()
            if task is None:
                return
            outcome = _run_task(task, self)
            task.done.put((task.index, outcome))
            # Not holding on to the result (often new parameters) until the next task.
            del task, outcome


class _Outcome:
    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error


def _run_task(task: _Task, worker: _Worker | None) -> _Outcome:
    if worker is not None and task.threads and worker.threads != task.threads:
        torch.set_num_threads(task.threads)
        worker.threads = task.threads
    undo: list = []
    try:
        task.state.enter(undo)
        return _Outcome(task.fn(task.index))
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
        return _Outcome(error=e)
    finally:
        ThreadState.exit(undo)
        # The hooks and dtypes the task came with, and whatever a function switched for
        # good (torch.set_grad_enabled, set_autocast_enabled, set_num_threads, hooks
        # pushed and never popped): the next task starts from a new thread's settings and
        # the worker's thread count again.
        if not torch.is_grad_enabled():
            torch.set_grad_enabled(True)
        _restore_autocast(_DEFAULT_AUTOCAST)
        if _top_saved_tensors_hooks(True) is not None or not _saved_tensors_hooks_enabled():
            _clear_saved_tensors_hooks()
        if worker is not None and worker.threads and torch.get_num_threads() != worker.threads:
            torch.set_num_threads(worker.threads)


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keeps freed tensor memory in the process instead of unmapping it (glibc only).

    By default glibc returns large freed blocks to the OS, and with several threads
    allocating and freeing multi-megabyte tensors (activations, gradients, updates) on
    every step it keeps doing so: every new tensor then costs a page fault per 4 KiB,
    which measured here slowed a data-parallel MLP step by 10-20 %. Raising the mmap and
    trim thresholds makes those blocks reusable, as a single-threaded loop already gets
    from glibc's adaptive threshold; fewer arenas keep the threads from each holding
    their own. Set ``FUNCDP_MALLOC_TUNING=0`` to leave malloc alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if os.environ.get("FUNCDP_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no",
                                                                       "off"):
        return
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "mallopt"):
            return
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum
        libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
        # glibc gives every thread that allocates its own arena (up to 8 per core), each
        # keeping its freed blocks: with a worker per virtual device that is a copy of the
        # freed activations and gradients per device. One arena per two cores kept the
        # resident memory of 8 devices within 1.2x that of one, at no measured cost in
        # speed (threads that run at once are bounded by the cores anyway).
        libc.mallopt(m_arena_max, max(1, (os.cpu_count() or 2) // 2))
    except OSError:  # not glibc
        return


class Executor:
    """The pool of per-device workers of this process."""

    def __init__(self) -> None:
        self._workers: dict[tuple[Device, int, tuple], _Worker] = {}
        self._lock = threading.Lock()
        # Tasks of one call are queued on all its workers atomically, so two calls made
        # at once from different threads are ordered the same way on every worker.
        self._submit_lock = threading.Lock()
        self._cores = max(1, torch.get_num_threads())
        atexit.register(self._stop_workers)

    def _stop_workers(self, timeout_s: float = 1.0) -> None:
        """At interpreter exit: lets idle workers return instead of being cut off.

        A daemon thread still alive while the interpreter finalizes is stopped when it
        next wants the GIL, by unwinding its stack; inside torch's C++ code that unwinding
        aborts the process ("terminate called without an active exception").
        """
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.queue.put(None)
        deadline = time.monotonic() + timeout_s
        for w in workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))

    def _worker(self, device: Device, depth: int, lane: tuple = ()) -> _Worker:
        key = (device, depth, lane)
        w = self._workers.get(key)
        if w is None:
            with self._lock:
                w = self._workers.get(key)
                if w is None:
                    w = self._workers[key] = _Worker(device, depth)
        return w

    def threads_per_device(self, devices: Sequence[Device]) -> int:
        if devices[0].platform != "cpu":
            return 0
        return max(1, self._cores // len(devices))

    def run(self, devices: Sequence[Device], fn: Callable[[int], Any],
            inline: Inline | None = None, lane: tuple = ()) -> list[_Outcome]:
        """Calls ``fn(i)`` for every device ``i``; device 0 in the calling thread.

        ``lane`` selects the workers among those of the same device and depth: nested
        calls made by different outer devices pass different lanes, so that two of them
        given the same inner device (``devices=`` in a nested pmap) do not queue behind
        each other on one worker (a deadlock when their collectives need each other).

        With ``inline``, the calling thread runs the devices one after another (small
        calls cost less than waking the workers) until one of them would block waiting
        for the others (in a collective, say): the devices not started yet are then handed
        to their workers, and ``inline.handed_off`` is set.

        Returns one outcome (value or exception) per device, in device order.
        """
        if len(devices) > 1:
            if not _MALLOC_TUNED and devices[0].platform == "cpu":
                _tune_malloc()
            if _JVP_STATE and _eager.JVP_NESTING == 0:
                level = _enter_shared_forward_level()
                try:
                    return self._run(devices, fn, inline, lane)
                finally:
                    _exit_shared_forward_level(level)
        return self._run(devices, fn, inline, lane)

    def _run(self, devices: Sequence[Device], fn: Callable[[int], Any],
             inline: Inline | None, lane: tuple) -> list[_Outcome]:
        n = len(devices)
        if n > 1 and inline is not None:
            return self._run_sequential(devices, fn, inline)
        state = ThreadState()
        depth = current_depth()
        done: queue.SimpleQueue = queue.SimpleQueue()
        threads = self.threads_per_device(devices)
        outcomes: list[_Outcome] = [None] * n  # type: ignore[list-item]
        if n > 1:
            self._submit(devices, fn, range(1, n), state, threads, depth, done, lane)
        outcomes[0] = self._run_inline(devices, 0, fn, threads, depth, state)
        return _collect(done, outcomes, n - 1)

    def _submit(self, devices: Sequence[Device], fn: Callable[[int], Any], which: range,
                state: ThreadState, threads: int, depth: int, done: queue.SimpleQueue,
                lane: tuple = ()) -> None:
        workers = [self._worker(devices[i], depth, lane) for i in which]
        with self._submit_lock:
            for i, w in zip(which, workers):
                w.queue.put(_Task(fn, i, state, threads, done))

    def _run_sequential(self, devices: Sequence[Device], fn: Callable[[int], Any],
                        inline: Inline) -> list[_Outcome]:
        # (The caller holds the thread budget already; it is restored if a device changes
        # it. Sequential runs are for CPU devices only, of top-level calls: lane ().)
        n = len(devices)
        outcomes: list[_Outcome] = [None] * n  # type: ignore[list-item]
        # The caller's state, for the workers of a hand-off (a device may have changed it
        # by the time one happens).
        state = ThreadState()
        depth = current_depth()
        grad, autocast = state.grad, state.autocast
        dtypes = autocast[0]
        started = [0]  # devices started so far (here or on workers)
        done: list = []  # the workers' queue, made by a hand-off

        def hand_off() -> None:
            if started[0] < n:
                done.append(queue.SimpleQueue())
                threads = self.threads_per_device(devices)
                self._submit(devices, fn, range(started[0], n), state, threads, depth,
                             done[0])
                inline.handed_off = True
                started[0] = n

        hooks = _blocking_hooks()
        hooks.append(hand_off)
        budget = torch.get_num_threads()  # the caller's thread budget, held for the call
        _tls.depth = depth + 1
        i = 0
        try:
            # Device i runs here unless it was handed off while an earlier one waited
            # (_run_inline_fn, written out: this loop is every small call's path).
            while i < n and started[0] <= i:
                started[0] = i + 1
                try:
                    outcomes[i] = _Outcome(fn(i))
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    outcomes[i] = _Outcome(error=e)
                # A device's function that switched grad mode, autocast or the thread
                # budget for good changes them neither for the next device nor for the
                # caller (checked here, not in a call to _restore).
                if (torch.is_grad_enabled() is not grad or autocast[1] or _any_autocast()
                        or torch.get_num_threads() != budget):
                    _restore(grad, autocast, budget)
                i += 1
        finally:
            _tls.depth = depth
            hooks.remove(hand_off)
            # Nor for the caller one that set an autocast dtype only, autocast off. (Not
            # checked between devices: each read costs 0.1-0.2 us, on every small call's
            # path; the next device's function finds the dtype as it left it, as in a
            # loop over the shards.)
            if _dtypes_changed(dtypes):
                _restore_autocast(autocast)
        if i < n:
            return _collect(done[0], outcomes, n - i)
        return outcomes

    def _run_inline(self, devices: Sequence[Device], i: int, fn: Callable[[int], Any],
                    threads: int, depth: int, state: ThreadState) -> _Outcome:
        """Device ``i``'s share, in the calling thread (whose state is ``state``)."""
        device = devices[i]
        if threads and torch.get_num_threads() != threads:
            with self.thread_budget(threads):
                return self._run_inline(devices, i, fn, 0, depth, state)
        if device.platform == "cuda":
            with torch.cuda.device(device.torch_device):
                return _run_inline_fn(fn, i, depth, state)
        return _run_inline_fn(fn, i, depth, state)

    def thread_budget(self, threads: int) -> _Budget:
        """Limits the calling thread's intra-op threads while devices share the cores.

        pmap holds this for the whole call, result checks included: a parallel region
        in the calling thread wakes a team of OpenMP threads that keep spinning on a core
        for a while after it ends, stealing it from the other devices' workers.
        """
        return _Budget(threads)


class _Budget:
    """The context manager of ``thread_budget`` (a class: this is on every call's path)."""

    __slots__ = ("threads", "old")

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.old = 0

    def __enter__(self) -> None:
        if self.threads:
            self.old = torch.get_num_threads()
            if self.old != self.threads:
                torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        if self.threads and self.old != self.threads:
            torch.set_num_threads(self.old)


_JVP_STATE = hasattr(_eager, "JVP_NESTING") and hasattr(_fwad, "_current_level")


def _enter_shared_forward_level() -> int | None:
    """Provides one forward-AD level, shared by the jvps of the devices of a call.

    ``torch.func.jvp`` keeps its nesting depth and the current forward-AD level in
    process-global variables: jvps running on several device threads at once each enter
    and exit "the" level in any order, and the first to exit wipes the others' tangents
    (silently wrong results). While a multi-device call runs (outside any jvp), funcdp
    counts as an enclosing jvp, so that every device's jvp nests inside the current level,
    as under ``jvp(pmap(f))``, which torch supports; it opens that level itself (and
    closes it after all devices finished) unless the caller has one open already.
    Returns the level it opened, if any.
    """
    global _own_level
    level = None
    if _fwad._current_level == -1:
        level = _own_level = torch._C._enter_dual_level()
        _fwad._current_level = level
    _eager.JVP_NESTING += 1
    return level


def _exit_shared_forward_level(level: int | None) -> None:
    global _own_level
    _eager.JVP_NESTING -= 1
    if level is not None:
        _own_level = -1
        torch._C._exit_dual_level(level=level)
        _fwad._current_level = level - 1


# The forward-AD level that funcdp opened for the call in progress, or -1. Tangents at
# that level come only from the devices' own ``torch.func.jvp``s; a level the caller
# opened (``forward_ad.dual_level`` around a pmap) may carry tangents on any tensor.
_own_level = -1


def caller_forward_level() -> int:
    """The forward-AD level open around the current pmap call, if the caller opened it
    (so that tensors may carry tangents at it), else -1."""
    level: int = _fwad._current_level
    return -1 if level == _own_level else level


def _collect(done: queue.SimpleQueue, outcomes: list, count: int) -> list[_Outcome]:
    """Fills ``outcomes`` with the ``count`` results the workers put in ``done``."""
    if count:
        before_blocking()
    for _ in range(count):
        i, outcome = done.get()
        outcomes[i] = outcome
    return outcomes


def _run_inline_fn(fn: Callable[[int], Any], i: int, depth: int,
                   state: ThreadState) -> _Outcome:
    threads = torch.get_num_threads()
    _tls.depth = depth + 1
    try:
        return _Outcome(fn(i))
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
        return _Outcome(error=e)
    finally:
        _tls.depth = depth
        # Device 0's share runs in the caller's thread: a function that switched grad
        # mode, autocast or the thread count for good must not change them for the caller.
        _restore(state.grad, state.autocast, threads)


def _restore(grad: bool, autocast: tuple, threads: int) -> None:
    """Puts back the calling thread's grad mode, autocast (``autocast_now()``: enabled
    flags and dtypes) and thread count."""
    if torch.is_grad_enabled() != grad:
        torch.set_grad_enabled(grad)
    if autocast[1] or _any_autocast() or _dtypes_changed(autocast[0]):
        _restore_autocast(autocast)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_executor: Executor | None = None
_executor_lock = threading.Lock()


def executor() -> Executor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = Executor()
    return _executor
