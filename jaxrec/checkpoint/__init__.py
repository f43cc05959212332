"""Checkpoints: orbax manager over a canonical (per-table, plan-independent) layout.

`CheckpointManager` saves and restores the train state; `convert` exports checkpoints
(npz, zarr), copies them for another mesh or plan, and imports TorchRec tables.
"""

from jaxrec.checkpoint.manager import CheckpointError, CheckpointManager, Restored, all_finite

__all__ = ["CheckpointError", "CheckpointManager", "Restored", "all_finite"]
