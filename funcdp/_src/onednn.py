"""oneDNN matrix products for ``F.linear`` on CPU devices (``funcdp.config.onednn_linear``).

torch computes a float32 ``F.linear`` on the CPU with its BLAS (MKL in the PyPI build),
which on some CPUs is far from their peak: on an AMD EPYC with AVX-512, MKL's single-thread
``sgemm`` reaches about 115 GFLOPS where oneDNN's reaches 250 (oneDNN is part of torch too,
used for lower-precision products). With the setting on, the ``F.linear`` calls a pmapped
function makes on its devices (every ``nn.Linear``) run forward and backward on oneDNN.

Only float32 tensors on the CPU, with no ``torch.func`` transform, autocast or dispatch mode
(a FLOP counter) active, and products of at least ``MIN_MACS`` multiply-adds (oneDNN's
fixed cost per call exceeds the gain on small ones); anything else runs torch's own
``F.linear``. The derivatives are
again oneDNN products, so gradients of gradients work too. Results agree with torch's to
float32 rounding (the products sum in another order), not bit for bit.

With the setting ``"auto"`` (the default) the first such product a device makes times
torch's and oneDNN's on one product and its weight gradient (``faster()``, a few
milliseconds once per process) and the process keeps oneDNN if it is at least ``MARGIN``
times faster: on the AMD EPYC above it is 2.1 times on a quiet machine and 1.4-1.5 times
with other work on the cores; where MKL is at its best (Intel) it is not expected to be,
and the margin keeps the choice from flipping between runs on timing noise.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch._C import _functorch
from torch.utils._python_dispatch import _disable_current_modes

_pointwise = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
AVAILABLE = _pointwise is not None and torch.backends.mkldnn.is_available()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _pointwise(x, w, b, "none", [], "")  # type: ignore[misc]


class _Linear(torch.autograd.Function):
    """``F.linear(x, w, b)`` on oneDNN, with derivatives that are oneDNN products too."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return _product(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, w, b = inputs
        # (As torch: each only where the other's gradient needs it, so that in-place
        # writes torch allows stay allowed and a frozen layer keeps no activation.)
        ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _Linear.apply(g, w.t(), None)  # g @ w
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = _Linear.apply(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # g^T @ x
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g2.sum(0)
        return gx, gw, gb


# The smallest product (multiply-adds) worth oneDNN: each of its calls costs about 10 us
# more than torch's, which a product of 2**20 multiply-adds (128 x 1024 x 10) repays and a
# smaller one may not (a network of many small layers ran 4 times slower on it).
MIN_MACS = 1 << 20


def applies(x: Any, w: Any, b: Any) -> bool:
    """Whether ``linear(x, w, b)`` can run on oneDNN (else torch's ``F.linear`` runs)."""
    return (AVAILABLE and type(x) in _PLAIN and type(w) in _PLAIN
            and x.layout == torch.strided and w.layout == torch.strided and not x.is_nested
            and w.ndim == 2 and x.numel() * w.shape[0] >= MIN_MACS and x.numel() > 0
            and (b is None or (type(b) in _PLAIN and b.layout == torch.strided))
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.ndim >= 2 and x.is_cpu and w.is_cpu and x.shape[-1] == w.shape[1]
            and (b is None or (b.dtype == torch.float32 and b.shape == w.shape[:1]
                               and b.is_cpu))
            and _functorch.maybe_current_level() is None
            and not torch.is_autocast_enabled("cpu")
            # (A dispatch mode (a FLOP counter, fake tensors) knows torch's ops, not this.)
            and not torch._C._len_torch_dispatch_stack())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` on oneDNN; the caller checked ``applies(x, w, b)``."""
    if b is not None and not b.is_contiguous():
        b = b.contiguous()  # (oneDNN reads the bias as dense, whatever its strides)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (b is not None and b.requires_grad)):
        return _Linear.apply(x, w, b)
    return _product(x, w, b)


# How much faster than torch's BLAS oneDNN must be for ``"auto"`` to choose it.
MARGIN = 1.2
_choice: bool | None = None  # ``faster()``'s answer, once known
_choosing = threading.Lock()


def wanted(setting: bool | str) -> bool:
    """Whether a product ``applies()`` accepts runs on oneDNN under ``setting`` (a value of
    ``funcdp.config.onednn_linear``)."""
    if setting == "auto":
        return _choice if _choice is not None else faster()
    return bool(setting)


def faster() -> bool:
    """Whether oneDNN's products are at least ``MARGIN`` times faster than torch's here,
    measured once per process (the first caller times them; the others wait for it), or
    chosen by ``funcdp.distributed.initialize`` for all processes together."""
    global _choice
    with _choosing:
        if _choice is None:
            _choice = measure_safely() >= MARGIN
        return _choice


def measure_safely() -> float:
    """``_measure()``, or 0 where oneDNN cannot run (torch's products then)."""
    try:
        return _measure()
    except RuntimeError:
        return 0.0


def decided() -> bool:
    return _choice is not None


def choose(use: bool) -> None:
    """Sets ``"auto"``'s choice (made by the processes of a run together)."""
    global _choice
    with _choosing:
        _choice = use


def _measure() -> float:
    """torch's time over oneDNN's for a 128 x 512 x 512 product and its weight gradient
    (the two kinds of product a layer's forward and backward make), on one thread: the
    median of three measurements, each the best of six runs of each, interleaved (other
    work on the cores makes a single measurement err by a third now and then)."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(n, 512, generator=gen, dtype=torch.float32)  # (whatever the
               for n in (128, 512, 128))                                # default dtype)
    runs = (lambda: torch.mm(x, w.t()), lambda: torch.mm(g.t(), x),
            lambda: _product(x, w, None), lambda: _product(g.t(), x.t(), None))
    ratios = []
    threads = torch.get_num_threads()
    # (No torch-function or dispatch mode sees these calls: they are funcdp's own.)
    with torch._C.DisableTorchFunction(), _disable_current_modes(), torch.no_grad():
        try:
            torch.set_num_threads(1)
            for _ in range(3):
                best = [float("inf")] * 4
                for rep in range(7):
                    for i, run in enumerate(runs):
                        start = time.perf_counter()
                        run()
                        if rep:  # (the first round warms up)
                            best[i] = min(best[i], time.perf_counter() - start)
                ratios.append((best[0] + best[1]) / (best[2] + best[3]))
        finally:
            torch.set_num_threads(threads)
    return sorted(ratios)[1]
