"""Per-device randomness: every device draws from its own generator.

torch's random functions use one process-wide generator; devices running at once in
several threads would interleave their draws in whatever order the threads happen to
run. Inside a pmap, funcdp instead gives device ``i`` its own ``torch.Generator`` for the
call, and routes torch's random functions (``torch.rand``/``randn``/``bernoulli``...,
``Tensor.uniform_``/``normal_``..., and dropout in all its forms) to it.

The seeding rule: a call in which some device draws random numbers takes one integer
``s`` from torch's default generator (so it follows ``torch.manual_seed``; a call that
draws nothing leaves the default generator alone), and device ``i`` seeds its generator
with ``mix(s, i)`` (``device_seed``). Draws therefore differ across devices, are
identical across two runs with the same seed, and do not depend on thread scheduling.
Recomputing a call for a derivative reuses its ``s``, so dropout masks match.

Routed: ``torch.rand``/``randn``/``randint``/``randperm``/``bernoulli``/``normal``/
``multinomial``/``poisson``/``binomial`` and their ``*_like`` forms, the in-place
``Tensor`` samplers (``uniform_``, ``normal_``, ``bernoulli_``, ...), ``nn.init``,
every dropout (``F.dropout``, ``dropout1d/2d/3d``, ``alpha_dropout``,
``feature_alpha_dropout``, ``torch.dropout``/``alpha_dropout``/``feature_dropout``/
``feature_alpha_dropout`` and their in-place ``_`` forms, ``nn.Dropout``...), the dropout
inside attention (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) and
between the layers of ``nn.LSTM``/``GRU``/``RNN``, ``F.gumbel_softmax``, fractional max
pooling, ``F.rrelu`` and the gamma and Dirichlet samplers under ``torch.distributions``
(``Gamma``, ``Beta``, ``Dirichlet``, ``Chi2``...). Dropout keeps torch's semantics
exactly: the mask's shape (feature dropouts draw one value per ``(dim 0, dim 1)`` pair;
``dropout1d``/``3d`` of an unbatched input one per channel), ``p == 1`` giving zeros, the
identity when not training, and torch's errors and warnings for inputs of unexpected
dimensions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._functorch import pyfunctorch
from torch.overrides import TorchFunctionMode
from torch.utils import checkpoint as _torch_checkpoint

from funcdp._src import executor as executor_mod
from funcdp._src import onednn
from funcdp._src.api_util import public
from funcdp._src.config import config

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def device_seed(base: int, index: int) -> int:
    """The seed of device ``index`` for a call whose base draw is ``base``."""
    x = (base + (index + 1) * _GOLDEN) & ((1 << 64) - 1)
    # splitmix64 finaliser: nearby (base, index) pairs give unrelated seeds.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK


def draw_base(generator: torch.Generator | None = None) -> int:
    gen = generator if generator is not None else torch.default_generator
    return int(torch.randint(0, 2**62, (), generator=gen).item())


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class _Forced(threading.local):
    def __init__(self) -> None:
        self.forced: CallSeeds | None = None  # the seeds the next call must reuse, if any
        # ... for a pullback: the vmap levels of its forward pass (see pullback_vmaps)
        self.pullback: frozenset[int] | None = None


_tls = _Forced()


# For ``CallSeeds``' ``outer``: the enclosing device's mode is the active one.
ACTIVE: Any = object()


class CallSeeds:
    """The base seed of one pmap call, drawn when a device first needs randomness.

    A top-level call draws it from torch's default generator; a pmap called inside a
    device draws it from that device's own generator (deterministic per device).
    """

    __slots__ = ("base", "outer", "unreplayed", "onednn_linear")

    def __init__(self, base: int | None = None, outer: Any = ACTIVE) -> None:
        self.base = base
        # ``config.onednn_linear`` when the call was made: a recomputation of its forward
        # pass in its backward pass (a checkpoint) makes the same products, whatever the
        # setting is then (or in another thread meanwhile).
        # (Not under a forward-AD level the caller opened: oneDNN's products carry no
        # tangents.)
        self.onednn_linear = (config.onednn_linear
                              if executor_mod.caller_forward_level() < 0 else False)
        # (``outer``: the caller's mode, where the caller looked for it before its modes
        # were set aside: inside an autograd.Function, say.)
        if outer is ACTIVE:
            outer = active_mode()
        self.outer = outer if outer is not None and outer.nests else None
        # A pmap nested in a device, called again by a checkpoint recomputing the device's
        # forward pass without checkpoint_random_contexts: its seed, drawn from the
        # device's generator (from torch's default one in pmap's own backward pass), would
        # differ from the forward pass's. Checked here, in the device's thread (the draw
        # may happen in another); an error only if the call draws.
        self.unreplayed = False
        if (outer is not None and outer.recomputing == 0
                and torch._C._current_graph_task_id() != -1):
            found = _recomputation(sys._getframe(1))
            # (A call not found, torch's checkpoint being other than expected, is not
            # taken for one around the pmap: an error rather than wrong gradients.)
            self.unreplayed = (found is not None and found[0]
                               and not (found[1] is not None
                                        and any(found[1] is c for c in outer.around)))

    def get(self) -> int:
        if self.base is None:
            if self.unreplayed:
                raise _checkpoint_error()
            with _draw_lock:  # the first device to draw does it for all (rarely contended)
                if self.base is None:
                    outer = self.outer.generator if self.outer is not None else None
                    # The first draw may come from inside a vmap (a device running more
                    # shards than one): take the integer outside every transform.
                    with pyfunctorch.temporarily_clear_interpreter_stack():
                        self.base = draw_base(outer)
        return self.base


# Reentrant: a nested call's first draw takes the outer call's base first.
_draw_lock = threading.RLock()


def active_mode() -> DeviceRandomness | None:
    """The innermost device's random routing in effect here, if any."""
    if not torch._C._len_torch_function_stack():
        return None
    from torch.overrides import _get_current_function_mode_stack

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, DeviceRandomness):
            return mode
    return None



def call_seeds(outer: Any = ACTIVE) -> CallSeeds:
    """The seeds of a new call: those of the call being recomputed, if any (see reuse).
    ``outer``: the enclosing device's mode, if the caller found it (see CallSeeds)."""
    forced = _tls.forced
    if forced is None:
        return CallSeeds(None, outer)
    _tls.forced = None  # for the one call being recomputed, not for pmaps nested in it
    return forced


def pullback_vmaps() -> frozenset[int] | None:
    """Where the next pmap call recomputes a call's forward pass for its pullback (see
    reuse), the levels of the vmaps that call's forward pass ran under: a vmap at another
    level is new (a vmap over cotangents, jacrev's), and the forward pass is the same for
    each of its batch elements. None elsewhere."""
    return _tls.pullback if _tls.forced is not None else None


class reuse:
    """Makes the pmap call made inside draw exactly what ``seeds``' call drew.

    Used to recompute a forward pass (for a VJP or JVP) with the same dropout masks.
    """

    def __init__(self, seeds: CallSeeds | None,
                 pullback: frozenset[int] | None = None) -> None:
        self.seeds = seeds
        self.pullback = pullback

    def __enter__(self) -> None:
        self.old = _tls.forced, _tls.pullback
        _tls.forced, _tls.pullback = self.seeds, self.pullback

    def __exit__(self, *exc: Any) -> None:
        _tls.forced, _tls.pullback = self.old


def _init_takes_generator(f: Callable) -> bool:
    try:
        return "generator" in inspect.signature(f).parameters
    except (TypeError, ValueError):
        return False


_WITH_GENERATOR = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal,
    torch.multinomial, torch.poisson, torch.binomial, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_,
    torch.Tensor.bernoulli, torch.Tensor.random_, torch.Tensor.exponential_,
    torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
    torch.Tensor.multinomial,
    # F.rrelu's kernels (see _rrelu), and the samplers of torch.distributions' Gamma,
    # Dirichlet and the distributions built on them (Beta, Chi2, StudentT, ...).
    torch.rrelu, torch.rrelu_, torch._standard_gamma, torch._sample_dirichlet,
    # nn.init's initialisers that the mode sees as one call (they pass their generator on
    # to the sampler they call, which the mode then does not see); the others it sees
    # through.
    *(f for name in dir(torch.nn.init) if not name.startswith("_")
      for f in [getattr(torch.nn.init, name)]
      if callable(f) and _init_takes_generator(f)),
}

_SELU_ALPHA = 1.7580993408473766


def _feature_noise_shape(x: torch.Tensor) -> tuple:
    """Shape of a feature dropout's mask, as torch's: one draw per (dim 0, dim 1) pair."""
    if x.ndim < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return tuple(x.shape[:2]) + (1,) * (x.ndim - 2)


_HALF = (torch.bfloat16, torch.float16)
_SCALAR_NAMES = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                 torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _dropout(gen: Callable[[], torch.Generator], x: torch.Tensor, p: float, training: bool,
             inplace: bool, feature: bool = False, alpha: bool = False,
             unbatched: bool = False) -> torch.Tensor:
    """torch's ``_dropout_impl`` on the device's generator. ``unbatched``: the feature
    mask is that of ``x.unsqueeze(0)`` (``dropout1d``/``3d`` of an input without batch
    dimension)."""
    if not training or p == 0 or x.numel() == 0:
        return x
    if p == 1:  # (alpha dropout too: torch multiplies by zero)
        return x.mul_(0) if inplace else x * 0
    if not feature:
        shape = tuple(x.shape)
    elif unbatched:
        shape = _feature_noise_shape(x.unsqueeze(0))[1:]
    else:
        shape = _feature_noise_shape(x)
    # Out of place, so that under vmap(randomness="different") every entry draws its own.
    # The keep probability of a half-precision input in float32: torch's is exact (a
    # double), and 1 - p in bfloat16 is off by up to 0.4 % (0.9 is 0.8984), which biases
    # the output. (Other dtypes keep their own, so that torch's errors for integer and
    # complex inputs come as they did.)
    if not (x.is_floating_point() or x.is_complex()):
        # (torch's message: its mask is a float that cannot be written back.)
        name = _SCALAR_NAMES.get(x.dtype, str(x.dtype))
        raise RuntimeError(f"result type Float can't be cast to the desired output type {name}")
    probs = torch.full(shape, 1 - p, device=x.device,
                       dtype=torch.float32 if x.dtype in _HALF else x.dtype)
    noise = torch.bernoulli(probs, generator=gen()).to(x.dtype)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
        b = (noise - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        out = x * (noise * a) + b
    else:
        out = x * noise.div_(1 - p)
    return x.copy_(out) if inplace else out


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _dropout_args(args: tuple, kwargs: dict, name: str | None,
                  training: bool) -> tuple[torch.Tensor, float, bool, bool]:
    """``(input, p, training, inplace)`` of a call of ``F.*dropout*`` (``name`` None;
    ``training``: its default) or of ``torch.<name>`` (``p`` and ``train`` required;
    whether it is in place is the function's)."""
    functional = name is None
    x = args[0] if args else kwargs["input"]
    if functional:
        p = _arg(args, kwargs, 1, "p", 0.5)
        training = _arg(args, kwargs, 2, "training", training)
        inplace = _arg(args, kwargs, 3, "inplace", False)
    else:
        missing = [k for i, k in ((1, "p"), (2, "train")) if len(args) <= i and k not in kwargs]
        if missing:
            raise TypeError(f"{name}() missing {len(missing)} required positional arguments: "
                            + ", ".join(f'"{k}"' for k in missing))
        p, training, inplace = _arg(args, kwargs, 1, "p", None), _arg(
            args, kwargs, 2, "train", None), False
    if p < 0 or p > 1:
        # (F.* raises a ValueError before torch's kernels would, which raise this.)
        error = ValueError if functional else RuntimeError
        raise error(f"dropout probability has to be between 0 and 1, but got {p}")
    return x, p, training, inplace


def _dropout_handler(feature: bool, alpha: bool, name: str | None = None,
                     training: bool = True, inplace: bool = False):
    """Handles ``F.dropout``/``alpha_dropout``/``feature_alpha_dropout`` (``training``:
    their default) and ``torch.<name>`` (``inplace``: the ``_`` form)."""
    def handle(gen, args, kwargs):
        x, p, train, in_place = _dropout_args(args, kwargs, name, training)
        return _dropout(gen, x, p, train, in_place or inplace, feature, alpha)

    return handle


def _dropout_nd(n: int, fn: Callable):
    """Handles ``F.dropout1d``/``2d``/``3d`` (``fn``, for ``n`` spatial dimensions) as
    torch does: channel-wise, with torch's checks of the input's dimensions (an error for
    ``dropout1d``, warnings for the others). Like torch, ``dropout2d`` never takes an
    input for unbatched: a 3-D input is ``(N, C, L)``, a 2-D one ``(N, C)``."""
    def handle(gen, args, kwargs):
        x, p, train, inplace = _dropout_args(args, kwargs, None, True)
        d = x.dim()
        if n == 1 and d not in (2, 3):
            raise RuntimeError(
                f"dropout1d: Expected 2D or 3D input, but received a {d}D input. Note that "
                f"dropout1d exists to provide channel-wise dropout on inputs with 1 spatial "
                f"dimension, a channel dimension, and an optional batch dimension (i.e. 2D "
                f"or 3D inputs).")
        if n > 1 and d not in (n + 1, n + 2):
            _warn_as(fn, f"dropout{n}d: Received a {d}-D input to dropout{n}d, which is "
                         f"deprecated and will result in an error in a future release. To "
                         f"retain the behavior and silence this warning, please use dropout "
                         f"instead. Note that dropout{n}d exists to provide channel-wise "
                         f"dropout on inputs with {n} spatial dimensions, a channel dimension, "
                         f"and an optional batch dimension (i.e. {n + 1}D or {n + 2}D inputs).")
        if n == 2 and d == 3:
            _warn_as(fn, "dropout2d: Received a 3D input to dropout2d and assuming that "
                         "channel-wise 1D dropout behavior is desired - input is interpreted "
                         "as shape (N, C, L), where C is the channel dim. This behavior will "
                         "change in a future release to interpret the input as one without a "
                         "batch dimension, i.e. shape (C, H, W). To maintain the 1D "
                         "channel-wise dropout behavior, please switch to using dropout1d "
                         "instead.")
        unbatched = n != 2 and d != n + 2
        return _dropout(gen, x, p, train, inplace, True, False, unbatched)

    return handle


def _warn_as(fn: Callable, message: str) -> None:
    """``warnings.warn(message)`` attributed, as ``fn`` attributes it (``stacklevel=2``),
    to the line that called ``fn``: past the frames of the mode that handles the call."""
    frame: Any = sys._getframe(1)
    level = 2  # (stacklevel 1 is this function)
    while frame is not None and frame.f_code is not fn.__code__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1 if frame is not None else 2)


def _rrelu(gen, args, kwargs):
    """``F.rrelu`` on the device's generator. (The mode sees ``F.rrelu``, not the kernel it
    calls; ``F.rrelu_`` is the kernel ``torch.rrelu_`` itself, routed as it is.)"""
    x = args[0] if args else kwargs["input"]
    lower = _arg(args, kwargs, 1, "lower", 1.0 / 8)
    upper = _arg(args, kwargs, 2, "upper", 1.0 / 3)
    training = _arg(args, kwargs, 3, "training", False)
    kernel = torch.rrelu_ if _arg(args, kwargs, 4, "inplace", False) else torch.rrelu
    return kernel(x, lower, upper, training, gen() if training else None)


_DROPOUT = {
    F.rrelu: _rrelu,
    F.dropout: _dropout_handler(False, False),
    F.alpha_dropout: _dropout_handler(False, True, training=False),
    F.dropout1d: _dropout_nd(1, F.dropout1d),
    F.dropout2d: _dropout_nd(2, F.dropout2d),
    F.dropout3d: _dropout_nd(3, F.dropout3d),
    F.feature_alpha_dropout: _dropout_handler(True, True, training=False),
    **{getattr(torch, name + suffix): _dropout_handler(feature, alpha, name + suffix,
                                                     inplace=suffix == "_")
       for name, feature, alpha in (("dropout", False, False), ("alpha_dropout", False, True),
                                    ("feature_dropout", True, False),
                                    ("feature_alpha_dropout", True, True))
       for suffix in ("", "_")},
}


class DeviceRandomness(TorchFunctionMode):
    """Routes torch's random functions to device ``index``'s generator for one call.

    Active in the device's thread while it runs; the generator is made on the first
    random draw, so functions that draw nothing never touch torch's default generator.
    funcdp's own code that draws nothing sets it aside (``api_util.internal``).
    """

    # One device's mode: set aside by funcdp's own code (api_util.internal), not carried
    # to other devices' threads (executor.ThreadState).
    funcdp_per_device = True
    # The checkpoint calls the pmap was called in (see Continuation).
    around: tuple = ()

    def __init__(self, seeds: CallSeeds, index: int, device: torch.device) -> None:
        # (TorchFunctionMode.__init__ does nothing; this is on every device's call path.)
        self.seeds = seeds
        self.index = index
        self.device = device
        self._generator: torch.Generator | None = None
        self.recomputing = 0  # checkpoint_random_contexts' recomputations in progress

    @property
    def nests(self) -> bool:
        """Whether a pmap called under this mode is nested in the device (it seeds from the
        device's generator); see ``Continuation``."""
        return True

    @property
    def generator(self) -> torch.Generator:
        """The device's generator, for a draw (see ``_check_draw``)."""
        if self.recomputing == 0 and torch._C._current_graph_task_id() != -1:
            _check_draw()
        if self._generator is None:
            self._generator = make_generator(self.device,
                                             device_seed(self.seeds.get(), self.index))
        return self._generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        special = _SPECIAL.get(func)
        if special is None:  # (every tensor call of a device's function: kept lean)
            return func(*args, **kwargs) if kwargs else func(*args)
        return special(self, func, types, args, kwargs or {})


@torch.compiler.disable
def _route(mode: DeviceRandomness, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
    """A random draw on the device's generator. Under torch.compile this is a graph
    break: the draw runs eagerly, so compiled code draws what eager code would.

    (``torch.compiler.disable`` imports torch's compiler, a second of ``import funcdp``.
    Applying it later, once the compiler is loaded, misses a first ``torch.compile``
    called inside a device's function, whose mode was made before: found in review.)"""
    if func in _WITH_GENERATOR:
        # (An explicit generator, by keyword or by position as torch.poisson(x, g) and
        # torch.rrelu(x, l, u, True, g) allow, is the caller's.)
        if kwargs.get("generator") is None and not any(
                type(a) is torch.Generator for a in args):
            kwargs = dict(kwargs, generator=mode.generator)
        return func(*args, **kwargs)
    return _DROPOUT[func](lambda: mode.generator, args, kwargs)


# (A recent addition to torch; without it, backward passes run without the mode.)
_redispatch = getattr(torch.overrides, "redispatch_function", None)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _with_mode_inside(mode: DeviceRandomness, func: Any, types: Any, args: tuple,
                      kwargs: dict) -> Any:
    """Runs ``func`` with the device's mode in effect for the calls it makes.

    For autograd's entry points (``torch.autograd.grad``/``backward``,
    ``Tensor.backward``), so that the backward pass runs under the mode too: draws made
    there (a custom ``backward``, a gradient hook, a checkpointed forward pass
    recomputed) come from the device's generator. torch's autograd engine runs a
    backward pass with the torch-function modes in effect where it was started.

    And for torch's Python functions that draw inside (``F.gumbel_softmax``, fractional
    max pooling, multi-head attention's dropout): the mode sees such a function as one
    call, and its draws would come from torch's default generator.

    A mode's ``__torch_function__`` runs with that mode set aside, so calling ``func``
    from here would run it without the mode. The mode is put back for the call, which
    skips torch-function handling once (it would come back here). That skip would hide
    the call from other modes and tensor subclasses too: where there are any, they see
    the call as before and it runs without the mode.
    """
    if (_redispatch is None or torch._C._len_torch_function_stack()
            or any(t not in _PLAIN_TYPES for t in types)):
        return func(*args, **kwargs)
    with mode:
        return _redispatch(func, types, args, kwargs)


def _with_mode_in_backward(mode: DeviceRandomness, func: Any, types: Any, args: tuple,
                           kwargs: dict) -> Any:
    """``_with_mode_inside`` for autograd's entry points: a function of its own, where
    the search for a checkpoint's recomputation stops (see ``_STOPS``)."""
    return _with_mode_inside(mode, func, types, args, kwargs)


def _attention_module(mode: DeviceRandomness, func: Any, types: Any, args: tuple,
                      kwargs: dict) -> Any:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): with dropout in
    training, run with the mode in effect inside, so that its dropout (``F.dropout``, or
    attention's) draws on the device; otherwise as it is (every call inside it would be a
    Python call under the mode)."""
    if (_arg(args, kwargs, 10, "dropout_p", 0.0) > 0
            and _arg(args, kwargs, 13, "training", True)):
        return _with_mode_inside(mode, func, types, args, kwargs)
    return func(*args, **kwargs)


# torch's reference attention, which takes a dropout mask (see _attention).
_SDPA_MATH = getattr(torch, "_scaled_dot_product_attention_math", None)
_sdpa_lock = threading.Lock()
_sdpa_quiet = False


@torch.compiler.disable
def _attention(mode: DeviceRandomness, func: Any, types: Any, args: tuple,
               kwargs: dict) -> Any:
    """``F.scaled_dot_product_attention`` with dropout: the mask is drawn on the device's
    generator, and applied by torch's reference ("math") implementation, as torch's own
    dropout would be (on the attention weights, the kept ones scaled by ``1 / (1 - p)``).
    torch's attention kernels draw their masks from the default generator. Without
    dropout, torch's attention as it is (its fused kernels included)."""
    p = _arg(args, kwargs, 4, "dropout_p", 0.0)
    if not (0 < p < 1) or _SDPA_MATH is None:
        return func(*args, **kwargs)
    q = _arg(args, kwargs, 0, "query", None)
    k = _arg(args, kwargs, 1, "key", None)
    v = _arg(args, kwargs, 2, "value", None)
    mask = _arg(args, kwargs, 3, "attn_mask", None)
    if not all(type(t) in _PLAIN_TYPES and not t.is_nested and t.ndim >= 2
               for t in (q, k, v)) or not (
            q.dtype == k.dtype == v.dtype and q.device == k.device == v.device) or (
            mask is not None and (type(mask) not in _PLAIN_TYPES or mask.dtype not in (
                torch.bool, torch.float32, q.dtype) or mask.device != q.device)):
        return func(*args, **kwargs)  # (torch's errors, before it draws)
    if mask is not None and mask.dtype == torch.bool:  # (as torch's attention does)
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            mask.logical_not(), -math.inf)
    heads = tuple(k.shape[:-2])
    if kwargs.get("enable_gqa", False) and q.ndim >= 3 and k.ndim >= 3:
        heads = heads[:-1] + (q.shape[-3],)
    try:
        batch = torch.broadcast_shapes(tuple(q.shape[:-2]), heads)
    except RuntimeError:
        return func(*args, **kwargs)  # (torch's error)
    probs = torch.full((*batch, q.shape[-2], k.shape[-2]), 1 - p, device=q.device,
                       dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    keep = torch.bernoulli(probs, generator=mode.generator).bool()
    _quiet_sdpa_math()
    return _SDPA_MATH(q, k, v, mask, p, _arg(args, kwargs, 5, "is_causal", False), keep,
                      scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False))[0]


def _quiet_sdpa_math() -> None:
    """torch warns, once per process, that a dropout mask given to its reference attention
    is "for testing purposes": said once here, where nobody hears it."""
    global _sdpa_quiet
    if _sdpa_quiet:
        return
    with _sdpa_lock:
        if not _sdpa_quiet:
            t, math_attention = torch.zeros(1, 1, 1), _SDPA_MATH
            assert math_attention is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                math_attention(t, t, t, None, 0.5, False, torch.ones(1, 1, 1, dtype=torch.bool))
            _sdpa_quiet = True


@torch.compiler.disable
def _recurrent(mode: DeviceRandomness, func: Any, types: Any, args: tuple,
               kwargs: dict) -> Any:
    """``nn.LSTM``/``GRU``/``RNN``'s kernel (``torch.lstm``, ``gru``, ``rnn_tanh``,
    ``rnn_relu``) with dropout between layers: run layer by layer, as torch's kernel
    does, with the dropout between them drawn on the device's generator (torch's kernels
    draw it from the default generator). Without dropout, the kernel as it is."""
    lstm = func is torch.lstm
    # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    # batch_first), or for a packed sequence (data, batch_sizes, hx, params, ...
    # bidirectional). An LSTM's hx is a pair, a GRU's or RNN's a tensor.
    packed = not kwargs and len(args) > 2 and isinstance(args[1 if lstm else 2], torch.Tensor)
    head = 2 if packed else 1
    if kwargs or len(args) < head + 7:
        return func(*args, **kwargs)
    hx, params, biases, layers, p, train, bidirectional = args[head:head + 7]
    if not train or p == 0 or layers < 2 or len(params) % layers:
        return func(*args)
    dirs = 2 if bidirectional else 1
    per_layer = len(params) // layers
    x, outs = args[0], []
    for layer in range(layers):
        rows = slice(layer * dirs, (layer + 1) * dirs)
        h = (hx[0][rows], hx[1][rows]) if lstm else hx[rows]
        out = func(x, *args[1:head], h, params[layer * per_layer:(layer + 1) * per_layer],
                   biases, 1, 0.0, train, bidirectional, *args[head + 7:])
        outs.append(out[1:])
        x = out[0]
        if layer < layers - 1:
            x = _dropout(lambda: mode.generator, x, p, True, False)
    return (x, *(torch.cat(states, 0) for states in zip(*outs)))


def _other_modes() -> bool:
    """Whether torch-function modes other than funcdp's own are in effect (a mode of the
    caller's around the pmap, which must see the devices' ``F.linear`` as torch's)."""
    return any(not getattr(m, "funcdp_per_device", False)
               for m in torch.overrides._get_current_function_mode_stack())


def _linear(mode: DeviceRandomness, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
    """``F.linear`` on oneDNN where ``funcdp.config.onednn_linear`` asked for it when the
    call was made (see ``onednn``); torch's own elsewhere, and in compiled code."""
    if (mode.seeds.onednn_linear and not kwargs and 2 <= len(args) <= 3
            and not torch.compiler.is_compiling()  # (inductor lowers F.linear itself)
            and not (torch._C._len_torch_function_stack() and _other_modes())
            and onednn.applies(args[0], args[1], args[2] if len(args) == 3 else None)
            and onednn.wanted(mode.seeds.onednn_linear)):
        return onednn.linear(*args)
    return func(*args, **kwargs)


# What the mode does besides calling the function.
_SPECIAL: dict[Any, Callable] = {
    torch.nn.functional.linear: _linear,
    **{f: _route for f in (*_WITH_GENERATOR, *_DROPOUT)},
    torch.autograd.grad: _with_mode_in_backward,
    torch.autograd.backward: _with_mode_in_backward,
    torch.Tensor.backward: _with_mode_in_backward,
    F.scaled_dot_product_attention: _attention,
    **{f: _recurrent for f in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)},
    F.multi_head_attention_forward: _attention_module,
    **{f: _with_mode_inside for f in (
        F.gumbel_softmax, F.fractional_max_pool2d, F.fractional_max_pool3d,
        F.fractional_max_pool2d_with_indices, F.fractional_max_pool3d_with_indices)},
}


class Continuation(DeviceRandomness):
    """A device's routing carried into a backward pass that funcdp runs after the call
    (the backward pass of a pmap): draws continue the forward pass's generator. A pmap
    called there is a checkpoint recomputing a forward pass: one around the pmap (which
    took its seed from torch's default generator, as this one does), or one inside the
    device's function, which ``checkpoint_random_contexts`` must replay (see ``nests``;
    without it, ``CallSeeds`` raises if the call draws)."""

    def __init__(self, forward: DeviceRandomness, around: tuple) -> None:
        super().__init__(forward.seeds, forward.index, forward.device)
        self.forward = forward
        # The checkpoint calls the pmap was called in: one of them may recompute the call
        # in its own backward pass, seeded from torch's default generator as it was
        # (which the checkpoint restores).
        self.around = around

    @property
    def nests(self) -> bool:
        # While checkpoint_random_contexts replays the device's generator, a pmap called
        # there was called in the device's forward pass: it nests, as it did then.
        return self.recomputing > 0

    @property
    def generator(self) -> torch.Generator:
        if self._generator is not None:  # (set for a checkpoint's recomputation)
            return self._generator
        if torch._C._current_graph_task_id() != -1:
            _check_draw()
        return self.forward.generator


class _Recompute:
    """The two contexts of ``checkpoint_random_contexts`` for one checkpointed call:
    ``forward`` is entered once, ``recompute`` once per backward pass that recomputes."""

    def __init__(self, mode: DeviceRandomness) -> None:
        self.mode = mode
        self.state: torch.Tensor | None = None
        self.saved: list[tuple[DeviceRandomness, torch.Generator | None]] = []
        self.forward = _Enter(self._snapshot)
        self.recompute = _Enter(self._replay, self._restore)

    def _snapshot(self) -> None:
        g = self.mode._generator
        if g is None and isinstance(self.mode, Continuation):
            g = self.mode.forward._generator
        # (A generator not made yet is made on the first draw, from the call's seed.)
        self.state = g.get_state() if g is not None else None

    def _replay(self) -> None:
        mode = active_mode() or self.mode
        if self.state is None:
            g = make_generator(mode.device, device_seed(mode.seeds.get(), mode.index))
        else:
            g = torch.Generator(device=mode.device)
            g.set_state(self.state)
        self.saved.append((mode, mode._generator))
        mode._generator = g
        mode.recomputing += 1

    def _restore(self) -> None:
        mode, old = self.saved.pop()
        mode.recomputing -= 1
        mode._generator = old


class _Enter:
    """A context manager that may be entered again (torch.utils.checkpoint enters the
    recomputation's once per backward pass)."""

    def __init__(self, enter: Callable[[], None], exit: Callable[[], None] | None = None):
        self._enter = enter
        self._exit = exit

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: Any) -> None:
        if self._exit is not None:
            self._exit()


@public
def checkpoint_random_contexts() -> tuple[Any, Any]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` inside ``pmap``: the
    recomputed forward pass draws the random numbers (dropout masks) the forward pass drew.

    Inside ``pmap`` every device draws from its own generator (see the randomness section
    of the composition guide), which torch's checkpoint does not know of: it restores
    torch's default generator for the recomputation, not the device's. Pass this function
    as ``context_fn`` (non-reentrant checkpointing); it snapshots the device's generator
    when the forward pass starts and replays it for the recomputation. Outside ``pmap`` it
    does nothing, and torch's own ``preserve_rng_state`` does the work. A checkpointed
    function that draws random numbers inside ``pmap`` without it raises an error when
    its recomputation draws, rather than training on mismatched masks.

    Returns:
        The forward pass's and the recomputation's context managers.

    Examples:
        >>> import torch, funcdp
        >>> import torch.nn.functional as F
        >>> from torch.utils.checkpoint import checkpoint
        >>> def loss(w, x):
        ...     block = lambda v: F.dropout(torch.tanh(v * w), 0.5)
        ...     return checkpoint(block, x, use_reentrant=False,
        ...                       context_fn=funcdp.checkpoint_random_contexts).sum()
        >>> step = funcdp.pmap(funcdp.value_and_grad(loss, "d"), axis_name="d",
        ...                    in_axes=(None, 0), devices=funcdp.local_devices()[:2])
        >>> value, g = step(torch.tensor(1.0), torch.ones(2, 8))
        >>> g.shape
        torch.Size([2])
    """
    mode = active_mode()
    if mode is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    r = _Recompute(mode)
    return r.forward, r.recompute


# The code of torch.utils.checkpoint's recomputations: the non-reentrant one (a function
# made inside the checkpoint generator) and the reentrant one (CheckpointFunction.backward).
_CHECKPOINT_FILE = _torch_checkpoint.__file__
_RECOMPUTE_NAMES = frozenset({"recompute_fn", "backward"})
# Frames where the search for a recomputation stops: where a device's function, or a
# backward pass funcdp started, begins (a checkpoint further out is not this draw's).
_STOPS: set = {_with_mode_in_backward.__code__}


def stop_checkpoint_search_at(code: Any) -> None:
    _STOPS.add(code)


def _check_draw() -> None:
    """Raises if a draw in a backward pass comes from torch.utils.checkpoint recomputing a
    forward pass of the device's function (which would draw other numbers than the
    forward pass did)."""
    found = _recomputation(sys._getframe(2))
    if found is not None and found[0]:
        raise _checkpoint_error()


def _recomputation(frame: Any) -> tuple[bool, Any] | None:
    """``(preserves the random state, the checkpoint call)`` of the torch.utils.checkpoint
    recomputation of a forward pass of the device's function that ``frame`` runs in, or
    None. The checkpoint call is an object of torch's own for one call of ``checkpoint``
    (its ``_CheckpointFrame``, or the reentrant checkpoint's ``ctx``), or None."""
    f = frame
    while f is not None:
        code = f.f_code
        if code in _STOPS:
            return None
        if code.co_filename == _CHECKPOINT_FILE and code.co_name in _RECOMPUTE_NAMES:
            ctx = f.f_locals.get("ctx")
            if ctx is not None:  # reentrant: CheckpointFunction.backward
                return bool(getattr(ctx, "preserve_rng_state", True)), ctx
            # Non-reentrant: the recomputation's closure, called (through a helper or
            # two) by the hook that holds its _CheckpointFrame.
            call, up = None, f.f_back
            for _ in range(4):
                if up is None:
                    break
                if up.f_code.co_name == "unpack_hook":
                    call = up.f_locals.get("frame")
                    break
                up = up.f_back
            return bool(f.f_locals.get("preserve_rng_state", True)), call
        f = f.f_back
    return None


def enclosing_checkpoints(frame: Any) -> tuple:
    """The torch.utils.checkpoint calls (see ``_recomputation``) whose forward pass
    ``frame`` runs in, inside the device's function if any: those that may recompute it."""
    out = []
    f = frame
    while f is not None:
        code = f.f_code
        if code in _STOPS:
            break
        if code.co_filename == _CHECKPOINT_FILE:
            if code.co_name == "checkpoint":  # non-reentrant: its generator's frame
                gen = getattr(f.f_locals.get("gen"), "gi_frame", None)
                call = gen.f_locals.get("new_frame") if gen is not None else None
            else:
                call = f.f_locals.get("ctx") if code.co_name == "forward" else None
            if call is not None:
                out.append(call)
        f = f.f_back
    return tuple(out)


def _checkpoint_error() -> RuntimeError:
    return RuntimeError(
        "torch.utils.checkpoint is recomputing a forward pass that draws random numbers "
        "inside pmap: each device draws from its own generator, which torch's checkpoint "
        "does not restore, so the recomputation would draw other numbers (other dropout "
        "masks) than the forward pass and the gradients would be wrong. Checkpoint with "
        "use_reentrant=False, context_fn=funcdp.checkpoint_random_contexts; or pass "
        "preserve_rng_state=False if fresh draws are what you want.")
