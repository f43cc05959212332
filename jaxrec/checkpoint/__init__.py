"""Checkpoints: asynchronous, atomic orbax checkpoints in a mesh- and plan-independent layout.

    CheckpointManager(directory, max_to_keep=3, save_every=0, async_save=True,
                      read_only=False, chunk_bytes=..., device_copy='auto')
                      (gin: async_save, chunk_bytes, device_copy; the trainer passes the rest)
      .save(step, state, collection, data_state=None, meta=None, force=False) -> bool
      .wait() / .close()                                    (also a context manager)
      .restore(target, collection, step=None, require_finite=False, init=None,
               offloaded=None, snapshot_check='full')       -> Restored | None
      .all_steps() / .latest_step() / .latest_valid_step(full=False) / .check(step, full)
      .save_arrays(step, tables, table_opt=None, ...)       tables-only checkpoints (import)
    Restored(state, data_state, meta, host_tables)
    CheckpointError                                         no usable checkpoint
    all_finite(state) -> bool

Modules: `manager` (the above), `dense` (the dense part of a restore: the target's
abstract tree checked against the manifest, fingerprint verification, typed keys,
`all_finite`), `canonical` (names, dense part, fingerprints), `tables`
(per-table zarr store written from / read into the stacked shards), `storage` (direct
streaming reads of a step), `convert` (npz / zarr export, copy for another mesh or plan,
TorchRec import; CLI: `scripts/convert_checkpoint.py`), `torchrec_npz` (a TorchRec
npz's tables, checked and read for the import), `selection` (the step a
conversion reads: `--step`, or the newest valid one), `steps` (step directories, the newest
valid step), `offloaded` (offloaded tables' snapshots; tables that changed tier since the
save), `rotation` (steps a running job deletes while they are read).
"""

from jaxrec.checkpoint.dense import all_finite
from jaxrec.checkpoint.manager import CheckpointError, CheckpointManager, Restored

__all__ = ["CheckpointError", "CheckpointManager", "Restored", "all_finite"]
