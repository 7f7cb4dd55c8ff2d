"""Multi-process (multi-host) runs on torch.distributed, launched with torchrun."""

from funcdp._src.distributed import barrier as barrier
from funcdp._src.distributed import broadcast as broadcast
from funcdp._src.distributed import initialize as initialize
from funcdp._src.distributed import process_allgather as process_allgather
from funcdp._src.distributed import save_checkpoint as save_checkpoint
from funcdp._src.distributed import shutdown as shutdown

__all__ = ["barrier", "broadcast", "initialize", "process_allgather", "save_checkpoint",
           "shutdown"]
