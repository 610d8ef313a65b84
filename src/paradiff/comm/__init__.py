"""Every collective behind one layer: stale activation exchange, all-gathers, broadcasts of objects and pytrees.

- `collectives`: all_gather, broadcast_object, broadcast_tree, broadcast_; errors become `CollectiveError`.
- `stale`: `StaleExchange`, the static-buffer exchange of per-layer activations (patch parallelism), and
  `SyncExchange`, its always-synchronous form that keeps no buffers (the patch-parallel VAE decode).
"""

from paradiff.comm.collectives import (LIKELY_CAUSE, all_gather, broadcast_, broadcast_object, broadcast_tree,
                                       guarded)
from paradiff.comm.stale import Slot, StaleExchange, SyncExchange

__all__ = ["LIKELY_CAUSE", "Slot", "StaleExchange", "SyncExchange", "all_gather", "broadcast_", "broadcast_object",
           "broadcast_tree", "guarded"]
