"""Modules as pure functions, and BatchNorm synchronised over a named axis."""

from funcdp._src.nn import FunctionalModule as FunctionalModule
from funcdp._src.nn import SyncBatchNorm as SyncBatchNorm
from funcdp._src.nn import functional as functional

__all__ = ["FunctionalModule", "SyncBatchNorm", "functional"]
