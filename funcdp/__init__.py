"""funcdp: JAX-style data parallelism for PyTorch, on ``torch.func``.

Models are pure functions of parameter pytrees; :func:`funcdp.pmap` runs a function on
every device, each on its slice of the batch, and collectives such as
:func:`funcdp.pmean` make the communication explicit.
"""

from funcdp import distributed as distributed
from funcdp import nn as nn
from funcdp import optim as optim
from funcdp._src.checkpoint import load_checkpoint as load_checkpoint
from funcdp._src.checkpoint import save_checkpoint as save_checkpoint
from funcdp._src.collectives import all_gather as all_gather
from funcdp._src.collectives import all_to_all as all_to_all
from funcdp._src.collectives import axis_index as axis_index
from funcdp._src.collectives import axis_size as axis_size
from funcdp._src.collectives import pbroadcast as pbroadcast
from funcdp._src.collectives import pmax as pmax
from funcdp._src.collectives import pmean as pmean
from funcdp._src.collectives import pmin as pmin
from funcdp._src.collectives import ppermute as ppermute
from funcdp._src.collectives import pshuffle as pshuffle
from funcdp._src.collectives import psum as psum
from funcdp._src.collectives import psum_scatter as psum_scatter
from funcdp._src.config import config as config
from funcdp._src.data_parallel import DataParallel as DataParallel
from funcdp._src.data_utils import pad_shard_unpad as pad_shard_unpad
from funcdp._src.data_utils import prefetch_to_device as prefetch_to_device
from funcdp._src.devices import Device as Device
from funcdp._src.devices import device_count as device_count
from funcdp._src.devices import devices as devices
from funcdp._src.devices import local_device_count as local_device_count
from funcdp._src.devices import local_devices as local_devices
from funcdp._src.devices import process_count as process_count
from funcdp._src.devices import process_index as process_index
from funcdp._src.pmap import pmap as pmap
from funcdp._src.random import checkpoint_random_contexts as checkpoint_random_contexts
from funcdp._src.rendezvous import CollectiveError as CollectiveError
from funcdp._src.sharded import ShardedValue as ShardedValue
from funcdp._src.sharded import replicate as replicate
from funcdp._src.sharded import shard as shard
from funcdp._src.sharded import unreplicate as unreplicate
from funcdp._src.sharded import unshard as unshard
from funcdp._src.train import value_and_grad as value_and_grad
from funcdp._src.train import value_and_update as value_and_update
from funcdp._src.vmap import vmap as vmap

__version__ = "0.1.0"

__all__ = [
    "CollectiveError",
    "DataParallel",
    "Device",
    "ShardedValue",
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_size",
    "checkpoint_random_contexts",
    "config",
    "device_count",
    "devices",
    "local_device_count",
    "load_checkpoint",
    "local_devices",
    "pad_shard_unpad",
    "pbroadcast",
    "pmap",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "prefetch_to_device",
    "process_count",
    "process_index",
    "pshuffle",
    "psum",
    "psum_scatter",
    "replicate",
    "save_checkpoint",
    "shard",
    "unreplicate",
    "unshard",
    "value_and_grad",
    "value_and_update",
    "vmap",
]
