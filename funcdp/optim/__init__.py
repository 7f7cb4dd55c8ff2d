"""Functional optimizers (pure init/update pairs), schedules and gradient clipping."""

from funcdp._src.optim import GradientTransformation as GradientTransformation
from funcdp._src.optim import adam as adam
from funcdp._src.optim import adamw as adamw
from funcdp._src.optim import apply_updates as apply_updates
from funcdp._src.optim import chain as chain
from funcdp._src.optim import clip_by_global_norm as clip_by_global_norm
from funcdp._src.optim import constant as constant
from funcdp._src.optim import cosine_decay as cosine_decay
from funcdp._src.optim import exponential_decay as exponential_decay
from funcdp._src.optim import global_norm as global_norm
from funcdp._src.optim import linear_warmup as linear_warmup
from funcdp._src.optim import piecewise_constant as piecewise_constant
from funcdp._src.optim import sgd as sgd
from funcdp._src.optim import warmup_cosine_decay as warmup_cosine_decay

__all__ = [
    "GradientTransformation",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "global_norm",
    "linear_warmup",
    "piecewise_constant",
    "sgd",
    "warmup_cosine_decay",
]
