"""Checkpoint conversion: export (npz, zarr), copy for another mesh/plan, TorchRec import.

Exported names (npz keys, zarr array paths), from the canonical leaf names:

    tables/<table>              [rows, dim]
    table_opt/<table>/<name>    [rows, dim] or [rows]   sparse optimizer state
    dense/<path>                dense parameter, e.g. dense/bottom_mlp/layer_0/kernel
    dense_opt/<path>            optax state leaf, e.g. dense_opt/0/mu/bottom_0/kernel
    step, rng                   int32 [], uint32 key data
    item_freq/<name>            a two-tower's logQ estimate (`TwoTower.logq_correction`)
    metadata                    JSON text: {"step", "manifest", "meta", "data_state"}

int8 tables export their `q`, `scale`, `bias` (`tables/<table>/q`, ...); bfloat16 arrays
are widened to float32 in npz (exact), kept as bfloat16 in zarr.

Offloaded tables (`jaxrec.offload`): the orbax checkpoint holds only their device cache;
the whole table and its optimizer state are in the offload snapshot of the same step
(`W/offload_snapshots/<step>`, named in the checkpoint's `meta["offload"]`). Exports read
those instead (`tables/<table>` is the full `[rows, dim]` table), and a checkpoint copy
links the snapshot next to it (`<output>/../offload_snapshots/<step>`). A rejected checkpoint
(`W/checkpoints/rejected/<step>.<reason>.<ns>`, given as the checkpoint directory) converts
like a kept one; its snapshot is the one set aside with it.

Arrays are read from the checkpoint in row blocks and verified against their saved
fingerprints while they are written, so an export never holds a whole table in memory
and never silently exports corrupt data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
import zipfile
from typing import Mapping, Sequence

import numpy as np
import tensorstore as ts
from absl import logging
from etils import epath

from jaxrec import phase_log, signals, tree_copy, workdir_layout
from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.checkpoint import copy_layout
from jaxrec.checkpoint import offloaded as offloaded_lib
from jaxrec.checkpoint import selection
from jaxrec.checkpoint import storage
from jaxrec.checkpoint import torchrec_npz
from jaxrec.checkpoint.manager import CheckpointError, CheckpointManager
from jaxrec.checkpoint.steps import first_line, foreign_entries, step_dirs
from jaxrec.checkpoint.copy_layout import resolve_plan  # noqa: F401  (convert.resolve_plan)
from jaxrec.errors import ConfigError, DataError, OffloadError, some
from jaxrec.planner.result import format_bytes
from jaxrec.sharding.plan import recorded_mesh

FORMATS = ("npz", "zarr", "checkpoint")
NPZ_DTYPES = {"bfloat16": np.dtype(np.float32)}   # npy has no bfloat16: widened, exactly
_RENAME = (("params", "dense"), ("opt_state", "dense_opt"))


def export_name(name: str) -> str:
  """Canonical leaf name → exported name (`params/x` → `dense/x`, ...)."""
  head, sep, rest = name.partition("/")
  return dict(_RENAME).get(head, head) + sep + rest


def _read_blocks(array, name, step_dir):
  """`storage.row_blocks`; a block that cannot be read is a `DataError` naming the file
  when the filesystem failed (e.g. EIO, worded as `tree_copy`'s copy errors), else a
  `CheckpointError` (the checkpoint is corrupt)."""
  try:
    for block in storage.row_blocks(array):
      signals.check()   # SIGINT / SIGTERM deferred by scripts/convert_checkpoint.py
      yield block
  except (OSError, ValueError) as e:
    failed = storage.read_failure(e, _array_dir(array))
    if failed is not None:
      raise DataError(f"--checkpoint_dir: cannot read {failed[0]}: {failed[1]} (array "
                      f"'{name}')") from None
    # tensorstore: truncated or missing chunk files
    raise CheckpointError(f"array '{name}' in {step_dir} cannot be read ({first_line(e)}): "
                          f"the checkpoint is corrupt{selection.PICK_ANOTHER}") from None


def _array_dir(array) -> str:
  """Where a TensorStore's files are: its kvstore's directory (an ocdbt one's database)."""
  kv = array.kvstore
  base = getattr(kv, "base", None)
  return (base if base is not None else kv).path.rstrip("/")


def _new_output(output, checkpoint_dir) -> epath.Path:
  """Refuses an `--output` that exists or lies inside `--checkpoint_dir`, and creates its
  parent directory: before any array is read."""
  output = epath.Path(output)
  _outside(output, checkpoint_dir)
  if output.exists():
    raise ConfigError(f"--output {output} already exists; remove it or pick another path")
  _mkdir(output.parent)
  return output


def _outside(output, checkpoint_dir) -> None:
  src, dst = os.path.realpath(checkpoint_dir), os.path.realpath(output)
  if os.path.commonpath([src, dst]) == src:
    raise ConfigError(f"--output {output} is inside --checkpoint_dir {checkpoint_dir}: pick a "
                      "path outside it")


def _not_around(output, checkpoint_dir) -> None:
  """Refuses a checkpoint `--output` that holds the checkpoint directory, e.g. `--output=W`
  for `--checkpoint_dir=W/checkpoints`: the copy's step directory went beside
  `W/checkpoints`, and W was refused as a workdir from then on (a checkpoint directory)."""
  src = os.path.realpath(checkpoint_dir)
  if offloaded_lib.rejected_step(src) is not None:   # W/checkpoints/rejected/<name>
    src = os.path.dirname(os.path.dirname(src))      # W/checkpoints itself is a fine --output
  dst = os.path.realpath(output)
  if dst != src and os.path.commonpath([src, dst]) == dst:
    raise ConfigError(f"--output {output} holds --checkpoint_dir {checkpoint_dir}: "
                      "--format=checkpoint writes step directories into --output; pick a "
                      "checkpoint directory of its own, e.g. W2/checkpoints")


def _not_a_workdir(output) -> None:
  """Refuses a checkpoint `--output` that is a run's directory (it holds `checkpoints/`):
  `--output=W2` for `W2/checkpoints` put the step directory beside W2/checkpoints, where no
  run reads it, and train.py refused W2 from then on (a checkpoint directory). So is a
  step directory (`W2/checkpoints/4`): the steps written inside it no run read either, and
  rotating step 4 out deleted them. So is a directory holding anything but steps (a
  `~/Documents` took the step among its files)."""
  inner = epath.Path(output) / workdir_layout.CHECKPOINTS_DIR
  if inner.is_dir():
    raise ConfigError(f"--output {output} is a run's directory (it holds {inner}): "
                      f"checkpoints go into its checkpoint directory, --output={inner}")
  if storage.is_step_dir(output) or _new_step_path(output):
    raise ConfigError(f"--output {output} is a step of a checkpoint directory: checkpoints "
                      f"go into the directory, --output={epath.Path(output).parent}")
  foreign = foreign_entries(output, also=[offloaded_lib.REJECTED])
  if foreign:   # e.g. ~/Documents: the step went among the user's files
    raise ConfigError(f"--output {output} is not a checkpoint directory: it holds "
                      f"{some(foreign)}, not checkpoint steps; pick a new or empty directory, "
                      "or a run's checkpoints/")


def _new_step_path(output) -> bool:
  """Whether `output`, not there yet, would be a step directory: a number in a checkpoint
  directory (one holding steps, or any `checkpoints/`, a run's or one not made yet). Only
  an existing step was refused: `W2/checkpoints/4` took the copy as `4/20`, which the next
  run of W2 warned about and rotated away; so did `NEW/checkpoints/20` for a workdir not
  made yet, and `train.py --workdir=NEW` then found no valid checkpoint."""
  path = epath.Path(os.path.abspath(output))
  if not path.name.isdigit() or path.exists():
    return False
  parent = path.parent
  return (parent.name == workdir_layout.CHECKPOINTS_DIR
          or any(storage.is_step_dir(parent / str(s)) for s in step_dirs(parent)))


def _mkdir(path, shown=None) -> None:
  """Creates directory `path`; errors name `shown` (the output a temporary path is for)."""
  path = epath.Path(path)
  file = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
  if file is not None:   # said 'cannot create directory P: File exists'
    raise ConfigError(f"--output: {file} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--output: cannot create directory {shown or path}: "
                      f"{e.strerror or e}") from None


@contextlib.contextmanager
def _removed_on_error(output, remove: list):
  """Removes the paths in `remove` (files or directories; the body may add some) if the
  body raises; an `OSError` (disk full, unwritable) becomes a one-line `DataError` naming
  `--output` (or the file it names, when that is not the output's), a
  `tree_copy.CopyError` one naming the file and the side that failed."""
  try:
    yield
  except BaseException as e:
    for path in remove:
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      elif os.path.lexists(path):
        os.remove(path)
    if isinstance(e, tree_copy.CopyError):
      side = "--checkpoint_dir: cannot read" if e.reading else "--output: cannot write"
      raise DataError(f"{side} {e.filename}: {e.strerror}") from None
    if isinstance(e, OSError):
      if e.filename and not _under(e.filename, output):   # e.g. a file of the source
        raise DataError(f"cannot convert: {e.filename}: {e.strerror or e}") from None
      raise DataError(f"--output: cannot write {output}: {e.strerror or e}") from None
    raise


def _under(path, output) -> bool:
  """`path` is `output`, inside it, or one of its siblings named `output` + suffix (a
  temporary file the write renames)."""
  path, output = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(output))
  return path == output or path.startswith((output + os.sep, output + "."))


def _metadata(step_dir, step) -> dict:
  return {"step": step, "manifest": storage.read_json(step_dir, storage.MANIFEST),
          "meta": storage.read_json(step_dir, storage.META),
          "data_state": storage.read_json(step_dir, storage.DATA_STATE)}


def _exported_arrays(step_dir):
  """Yields `(export name, tensorstore, saved fingerprint or None)`, sorted by name.
  Offloaded tables come from their snapshot (no saved fingerprint)."""
  with selection.read_errors(step_dir):
    manifest = storage.check_step(step_dir)
    arrays = storage.open_arrays(step_dir)
    saved = storage.saved_fingerprints(step_dir, manifest, arrays)
  offloaded = _snapshot_arrays(step_dir)
  for name in offloaded:
    if name not in arrays:
      raise CheckpointError(f"offload snapshot of {step_dir} holds '{name}', which the "
                            "checkpoint does not have")
    # The checkpoint's own array (the device cache) is replaced by the snapshot's, but a
    # training restore checks it: read it too, so that both pick the same step (a damaged
    # cache chunk was exported as step N while training fell back to N-1).
    for _ in _verified_blocks(arrays[name], name, saved.get(name), step_dir,
                              f"checking '{name}' (the offloaded table's device cache)"):
      pass
  arrays.update(offloaded)
  for name in sorted(n for n in arrays if n != "fingerprint"):
    yield export_name(name), name, arrays[name], None if name in offloaded else saved.get(name)


def _snapshot_arrays(step_dir) -> dict:
  """`offloaded.snapshot_arrays` after checking the snapshot's files (sizes, CRC32s); a
  damaged snapshot is a `CheckpointError` naming the file."""
  try:
    return offloaded_lib.snapshot_arrays(step_dir)
  except OffloadError as e:
    raise CheckpointError(f"checkpoint {step_dir}: {e}{selection.PICK_ANOTHER}") from None


def _verified_blocks(array, name, expect, step_dir, what):
  """`_read_blocks` of `array`, with its fingerprint accumulated over the blocks and
  compared with `expect` (None: not checked) after the last one: a mismatch raises
  `CheckpointError` (the caller has not finished with the array yet). A large array's
  pass is logged as `what` (`phase_log`: a 3e7 x 16 table took 14-18 s without a word)."""
  shape, value = tuple(array.shape), 0
  size = math.prod(shape) * array.dtype.numpy_dtype.itemsize
  detail = f"{format_bytes(size)}, {array.dtype.numpy_dtype.name} {list(shape)}"
  for start, block in storage.logged_blocks(array, what, _read_blocks(array, name, step_dir),
                                            detail):
    value = (value + canonical_lib.fingerprint_np(block, shape, (start,))) & 0xFFFFFFFF
    yield start, block
  if expect is not None and value != expect:
    raise CheckpointError(f"array '{name}' in {step_dir} fails its fingerprint check: the "
                          f"checkpoint is corrupt{selection.PICK_ANOTHER}")


def _dirs_removed_on_error(fn):
  """Decorates a conversion taking `(source, output, ...)`: when it fails, removes the
  directories it created for `output` (the top-most of them, e.g. W2 for W2/checkpoints,
  and every empty directory below it); files are never removed here."""
  @functools.wraps(fn)
  def wrapped(source, output, *args, **kwargs):
    path = os.path.abspath(os.fspath(output))
    top = None
    while not os.path.lexists(path) and os.path.dirname(path) != path:
      top, path = path, os.path.dirname(path)
    try:
      return fn(source, output, *args, **kwargs)
    except BaseException:
      if top is not None and os.path.isdir(top) and not os.path.islink(top):
        for d, _, _ in list(os.walk(top, topdown=False)):
          with contextlib.suppress(OSError):   # not empty: something else wrote there
            os.rmdir(d)
      raise
  return wrapped


@_dirs_removed_on_error
def export_npz(checkpoint_dir, output, step: int | None = None) -> int:
  """Writes checkpoint `step` (default: latest valid, see `selection`) as one `.npz`;
  returns the step written.

  Streams each array into the zip (uncompressed, zip64), so memory stays bounded."""
  return _export(checkpoint_dir, output, step, _write_npz)


def _export(checkpoint_dir, output, step, write) -> int:
  """`write(tmp path, step directory, step, output path)` of the selected step (see
  `selection`), once `_new_output` accepts `output`, then renames tmp to `output`; returns
  the step written. Errors name `output`, never tmp (it is gone by then)."""
  def written(step_dir, step):
    output_path = _new_output(output, checkpoint_dir)
    tmp = output_path.parent / (output_path.name + f".tmp-{time.time_ns()}")
    with _removed_on_error(output_path, [tmp]):
      write(tmp, step_dir, step, output_path)
      signals.check()
      tmp.rename(output_path)
    return step
  return selection.convert_step(checkpoint_dir, step, written)


def _write_npz(tmp, step_dir, step, output_path):
  del output_path   # an OSError names it (`_removed_on_error`)
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for ename, name, array, expect in _exported_arrays(step_dir):
      shape = tuple(array.shape)
      dtype = NPZ_DTYPES.get(array.dtype.numpy_dtype.name, array.dtype.numpy_dtype)
      with zf.open(ename + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": shape})
        for _, block in _verified_blocks(array, name, expect, step_dir,
                                         f"exporting '{ename}' to npz"):
          f.write(np.ascontiguousarray(block.astype(dtype)).tobytes())
    with zf.open("metadata.npy", "w") as f:
      np.lib.format.write_array(f, np.array(json.dumps(_metadata(step_dir, step))))


@_dirs_removed_on_error
def export_zarr(checkpoint_dir, output, step: int | None = None) -> int:
  """Writes checkpoint `step` (default: latest valid, see `selection`) as a directory of
  tensorstore zarr (v2) arrays, one per exported name, plus `metadata.json`; returns the
  step written."""
  return _export(checkpoint_dir, output, step, _write_zarr)


def _write_zarr(tmp, step_dir, step, output_path):
  _mkdir(tmp, shown=output_path)
  for ename, name, array, expect in _exported_arrays(step_dir):
    dtype, shape = array.dtype.numpy_dtype, tuple(array.shape)
    row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize) if shape else 1
    chunks = [max(1, min(shape[0], (8 << 20) // row_bytes)), *shape[1:]] if shape else []
    try:
      out = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp / ename)},
                     "dtype": dtype.name, "metadata": {"shape": list(shape), "chunks": chunks}},
                    create=True).result()
      for start, block in _verified_blocks(array, name, expect, step_dir,
                                           f"exporting '{ename}' to zarr"):
        (out[start:start + len(block)] if shape else out).write(block).result()
    except (CheckpointError, DataError):   # reading --checkpoint_dir
      raise
    except ValueError as e:   # tensorstore: the output cannot be written
      raise DataError(f"--output: cannot write {output_path / ename}: "
                      f"{_ts_reason(e, tmp, output_path)}") from None
  (tmp / "metadata.json").write_text(json.dumps(_metadata(step_dir, step), indent=1))


def _ts_reason(e: ValueError, tmp, output_path) -> str:
  """A tensorstore write error's reason: the OS error's text where it gives one (`No space
  left on device` for `[os_error_code='28']`), else its first line, naming `output_path`
  where it named the temporary directory `tmp`."""
  code = storage.os_error_code(e)
  if code is not None:
    return os.strerror(code)
  return first_line(e).replace(str(tmp), str(output_path))


def parse_mesh(spec: str) -> dict[str, int]:
  """`--mesh=data=2,row=4` → axis sizes, without needing the devices (no `auto`: the copy
  is laid out for one mesh, written out)."""
  from jaxrec.sharding.mesh import parse_mesh_spec
  if spec.strip() == "auto":
    raise ConfigError("--mesh=auto: a copy is laid out for one mesh; give it as AXIS=SIZE,... "
                      "(e.g. data=2,table=2,row=2,col=1)")
  sizes = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    try:
      sizes.append(int(part.partition("=")[2]))
    except ValueError:
      sizes.append(1)   # parse_mesh_spec reports it
  return parse_mesh_spec(spec, math.prod(sizes) if sizes else 1, auto=False)


@_dirs_removed_on_error
def export_checkpoint(checkpoint_dir, output, step: int | None = None,
                      mesh_shape: Mapping[str, int] | None = None, plan: str | None = None,
                      restart_data: bool = False, gin_files: Sequence[str] = (),
                      gin_bindings: Sequence[str] = ()) -> tuple[int, str]:
  """Copies checkpoint `step` into the checkpoint directory `output`, for a run on
  `mesh_shape` with `plan`. The stored layout is canonical, so the copy is exact; this
  verifies every array's fingerprint and that the plan fits the mesh (the layouts it
  would build). `restart_data`: the copy drops the data position, so a run resuming from
  it keeps the model (tables, dense, optimizer states, step) and reads its training data
  from the start (other data, e.g. the next day's, or another seed). `gin_files`,
  `gin_bindings`: the resuming run's config, for the sparse optimizers of the described
  stacks (default: the config the checkpoint records; `copy_optimizer`). Returns
  `(step written, layout description)`; `step` None: the latest valid (see `selection`)."""
  if plan is not None and mesh_shape is None:
    mesh_shape = recorded_mesh(plan)   # a plan file's own mesh, as train.py and plan.py take
    if mesh_shape is None and plan != "auto":   # resolve_plan explains --plan=auto
      raise ConfigError(f"--plan={plan} needs --mesh for --format=checkpoint (only a plan "
                        "file that records its mesh, such as a run's plan.json, goes without)")
  if mesh_shape is not None and plan is None:
    raise ConfigError("--mesh needs --plan for --format=checkpoint (a kind such as rw, or a "
                      "plan JSON file)")
  output = epath.Path(output)
  _outside(output, checkpoint_dir)
  _not_around(output, checkpoint_dir)
  _not_a_workdir(output)
  if output.exists() and not output.is_dir():
    raise ConfigError(f"--output {output} is a file; --format=checkpoint writes a directory")
  if (gin_files or gin_bindings) and plan is None:
    raise ConfigError("--gin_file/--gin_bindings give the resuming run's sparse optimizers "
                      "for the stacks a copy prints: they go with --plan (and --mesh)")
  copy = functools.partial(_copy, output, mesh_shape, plan, restart_data,
                           (tuple(gin_files), tuple(gin_bindings)))
  return selection.convert_step(checkpoint_dir, step, copy)


def _copy(output, mesh_shape, plan, restart_data, gin_config, step_dir, step
          ) -> tuple[int, str]:
  """`export_checkpoint` of checkpoint `step_dir` (of `step`); `gin_config`: `(gin files,
  gin bindings)`."""
  manifest = selection.check(step_dir)
  description = ""
  if plan is not None:   # offloaded tables whole, not as the saved caches (`copy_layout`)
    resolved, description = copy_layout.describe(step_dir, manifest, plan, mesh_shape,
                                                 *gin_config)
  dest = output / str(step)
  if dest.exists():
    raise ConfigError(f"--output: {dest} already exists")
  newer = [s for s in step_dirs(output) if s > step]
  if newer:   # a run resumes from the newest step: the copy would be ignored (and rotated out)
    raise ConfigError(f"--output {output} holds step {newer[-1]}, which a run would resume "
                      f"from instead of the copied step {step}: pick a fresh --output")
  snapshot = offloaded_lib.snapshot_of(step_dir)
  snap_dest = offloaded_lib.snapshots_beside(output) / str(step)
  if snapshot is not None and snap_dest.exists():
    _remove_leftover(snap_dest, snapshot[0], step)
  created = not output.exists()
  _mkdir(output)
  try:
    manifest = selection.check(step_dir, full=True)   # every array read and checked
    _snapshot_arrays(step_dir)                        # ... and every file of its snapshot
  except (CheckpointError, DataError):
    if created:
      output.rmdir()
    raise
  if plan is not None:
    manifest.update(saved_plan=resolved.to_json(), saved_mesh=dict(mesh_shape))
  tmp = output / f"{step}.orbax-checkpoint-tmp-{time.time_ns()}"
  written = [tmp]
  with _removed_on_error(dest, written):
    _copy_tree(step_dir, tmp, dest)
    manifest["converted_from"] = str(step_dir)
    meta = storage.read_json(tmp, storage.META)
    evaluated = meta.get("evaluates") and _evaluated_in_its_run(step_dir, step)
    if restart_data:   # and its eval was the old run's: the new day re-ran it, saying the
      manifest["data_restarted"] = True   # run 'stopped before or during that eval'
      (tmp / storage.DATA_STATE / "metadata").write_text(json.dumps({}))
    if restart_data or evaluated:
      meta["evaluates"] = False
    (tmp / storage.MANIFEST / "metadata").write_text(json.dumps(manifest))
    if snapshot is not None:   # the offloaded tables: the snapshot first, hard links
      _link_copy(epath.Path(snapshot[0]), snap_dest)
      written.append(snap_dest)   # left alone, it would refuse the next try
      meta["offload"]["snapshots"] = str(snap_dest.parent)
    if restart_data or evaluated or snapshot is not None:
      (tmp / storage.META / "metadata").write_text(json.dumps(meta))
    signals.check()
    tmp.rename(dest)
  return step, description


def _evaluated_in_its_run(step_dir, step: int) -> bool:
  """Whether the run that saved `step_dir` (`W/checkpoints/<step>`) has the eval of `step`
  in its `W/metrics.jsonl`: a copy of it owes none (the copy's workdir ran it again,
  saying the run 'stopped before or during that eval')."""
  from jaxrec.train import evaluation, writers  # pylint: disable=import-outside-toplevel
  metrics = os.path.join(os.path.dirname(os.path.dirname(str(step_dir))), writers.METRICS_FILE)
  return os.path.isfile(metrics) and evaluation.has_eval_line(metrics, step)


def _remove_leftover(snap_dest: epath.Path, source: str, step: int) -> None:
  """Removes `snap_dest`, the offload snapshot of `step` beside `--output`, left by a copy
  stopped between its renames (the snapshot's, then the step's; a second signal or a kill):
  no checkpoint directory beside it holds `step` and it is not `source`, the snapshot
  copied. Else a `ConfigError` naming what uses it."""
  holders = [d / str(step) for d in snap_dest.parent.parent.iterdir()
             if d != snap_dest.parent and (d / str(step)).is_dir()]
  if holders or os.path.realpath(snap_dest) == os.path.realpath(source):
    used = f"step directory {holders[0]}" if holders else "the checkpoint converted"
    raise ConfigError(f"--output: {snap_dest} (offload snapshot of step {step}) already "
                      f"exists and belongs to {used}: pick another --output")
  logging.warning("--output: removing %s, an offload snapshot of step %d that no checkpoint "
                  "holds (left by a conversion stopped before its step was written)",
                  snap_dest, step)
  try:
    shutil.rmtree(snap_dest)
  except OSError as e:
    raise DataError(f"--output: cannot remove {snap_dest}: {e.strerror or e}") from None


def _copy_tree(step_dir, tmp, dest) -> None:
  """Copies step directory `step_dir` into `tmp` (errors name `dest`), stopping between
  files on a deferred signal; a large one is logged (`phase_log`), with its progress."""
  sizes = _file_sizes(step_dir)
  size = sum(sizes.values())
  with phase_log.logged(f"copying checkpoint {step_dir} to {dest}", size,
                        f"{format_bytes(size)} in {len(sizes):,} files", total=size) as phase:
    started = [0]   # the bytes of the file being copied: done at the next file's start

    def skip(rel: str) -> bool:   # copies every file
      signals.check()
      phase.advance(started[0])
      started[0] = sizes.get(rel, 0)
      return False
    tree_copy.copy_tree(step_dir, tmp, shown=dest, skip=skip)


def _file_sizes(root) -> dict[str, int]:
  """`{path relative to root: bytes}` of the files under `root` (one it cannot stat: 0;
  the copy names the file it fails on)."""
  out = {}
  for here, _, names in os.walk(root):
    for name in names:
      path = os.path.join(here, name)
      with contextlib.suppress(OSError):
        out[os.path.normpath(os.path.relpath(path, root))] = os.stat(path).st_size
  return out


def _link_copy(src: epath.Path, dst: epath.Path) -> None:
  """Copies directory `src` to `dst` (hard links where possible) via a tmp directory."""
  from jaxrec.offload.store import link_tree  # pylint: disable=import-outside-toplevel
  tmp = dst.parent / f"{dst.name}.tmp-{time.time_ns()}"
  sizes = _file_sizes(src)
  size = sum(sizes.values())
  with _removed_on_error(dst, [tmp]), phase_log.logged(
      f"linking offload snapshot {src} to {dst}", size,
      f"{format_bytes(size)} in {len(sizes):,} files"):
    link_tree(str(src), str(tmp), shown=str(dst))
    signals.check()
    tmp.rename(dst)


@_dirs_removed_on_error
def import_torchrec(npz_path, output, step: int = 0) -> list[str]:
  """Imports the tables of a TorchRec `EmbeddingBagCollection` state_dict (saved as npz
  by `third_party/torchrec_export`) as checkpoint `step` in directory `output`.

  Keys `...embedding_bags.<table>.weight` (or `embeddings.<table>.weight`) become tables
  `<table>`; other keys are ignored. The checkpoint holds tables only: a run restoring it
  takes its dense parameters from its own initialisation and starts the sparse optimizer
  state fresh. Returns the imported table names."""
  npz_path = epath.Path(npz_path)
  if step < 0:
    raise ConfigError(f"--step must be >= 0, got {step}")
  if not npz_path.exists():
    raise ConfigError(f"--torchrec_npz: {npz_path} does not exist")
  if npz_path.is_file() and not zipfile.is_zipfile(npz_path):   # np.load took a text file
    raise DataError(f"--torchrec_npz: {npz_path} is not an npz file (not a zip archive)")
  try:
    tables = torchrec_npz.read_tables(npz_path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"--torchrec_npz: {npz_path} is not a readable npz file "
                    f"({first_line(e)})") from None
  _not_a_workdir(output)
  _mkdir(output)
  with CheckpointManager(output, max_to_keep=None, async_save=False) as mgr:
    if step in mgr.all_steps():
      raise ConfigError(f"{mgr.step_dir(step)} already exists: pass --step="
                        f"{mgr.latest_step() + 1} (the import's step) or a fresh --output")
    if mgr.all_steps() and mgr.latest_step() > step:   # a run resumes from the newest
      raise ConfigError(f"{output} holds step {mgr.latest_step()}, which a run would resume "
                        f"from instead of the import: pass --step={mgr.latest_step() + 1} or "
                        "a fresh --output")
    signals.check()
    try:
      mgr.save_arrays(step, tables, meta={"imported_from": "torchrec", "source": str(npz_path)})
    except CheckpointError as e:
      # A full or read-only disk: the save's error (in the training save's words, 'saving
      # checkpoint 0 ... failed') becomes the output's, with the filesystem's reason only
      # (the file it names was in the tmp directory removed here).
      for tmp in epath.Path(output).glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
      failed = storage.unreadable(e, mgr.step_dir(step))
      raise DataError(f"--output: cannot write {mgr.step_dir(step)}: "
                      f"{failed[1] if failed else first_line(e)}") from None
  return sorted(tables)
