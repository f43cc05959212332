"""Direct, streaming access to the arrays of one stored checkpoint step (no devices).

Orbax writes each array of the `state` item as a tensorstore zarr array (inside an OCDBT
database by default) named after its pytree path. These helpers open them with
tensorstore, so tools (export, full validation) read them in row blocks: a table is
never held whole in memory.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import numpy as np
import tensorstore as ts
from etils import epath

from jaxrec.checkpoint import canonical as canonical_lib

STATE, DATA_STATE, META, MANIFEST = "state", "data_state", "meta", "manifest"
ITEMS = (STATE, DATA_STATE, META, MANIFEST)
BLOCK_BYTES = 64 << 20   # rows read at a time: about this many bytes


def read_json(step_dir: epath.PathLike, item: str) -> dict:
  """A JSON item (`manifest`, `meta`, `data_state`) of a step directory."""
  return json.loads((epath.Path(step_dir) / item / "metadata").read_text())


def _array_tree(step_dir: epath.Path):
  """Orbax's metadata tree of the `state` item: leaves have `.name`, `.directory`."""
  import orbax.checkpoint as ocp
  handler = ocp.StandardCheckpointHandler()
  return handler.metadata(step_dir / STATE)


def open_arrays(step_dir: epath.PathLike) -> dict[str, ts.TensorStore]:
  """`{leaf name: read-only TensorStore}` for every array of the `state` item.

  Leaf names are canonical (`tables/t0`, `params/dense_0/kernel`, `fingerprint`)."""
  step_dir = epath.Path(step_dir)
  meta = _array_tree(step_dir)
  driver = "zarr3" if getattr(meta, "use_zarr3", False) else "zarr"
  tree = getattr(meta, "tree", meta)
  out = {}
  for name, leaf in canonical_lib.leaf_names(tree):
    if leaf is None or not hasattr(leaf, "name"):
      continue
    directory = epath.Path(leaf.directory or step_dir / STATE)
    if (directory / "manifest.ocdbt").exists():
      kvstore = {"driver": "ocdbt", "base": f"file://{directory}", "path": leaf.name}
    else:
      kvstore = {"driver": "file", "path": f"{directory / leaf.name}/"}
    out[name] = ts.open({"driver": driver, "kvstore": kvstore}, open=True,
                        read=True).result()
  return out


def row_blocks(array: ts.TensorStore, block_bytes: int = BLOCK_BYTES
               ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields `(start_row, block)` covering `array` in row blocks of ~`block_bytes`."""
  shape = tuple(array.shape)
  if not shape:
    yield 0, np.asarray(array.read().result())
    return
  row_bytes = max(1, math.prod(shape[1:]) * array.dtype.numpy_dtype.itemsize)
  step = max(1, block_bytes // row_bytes)
  for start in range(0, shape[0], step):
    yield start, np.asarray(array[start:min(start + step, shape[0])].read().result())
  if shape[0] == 0:
    yield 0, np.zeros(shape, array.dtype.numpy_dtype)


def check_step(step_dir: epath.PathLike, full: bool = False) -> dict:
  """Checks a step directory; returns its manifest or raises.

  Always: the JSON items parse, the manifest is ours, every array it lists opens with
  the listed shape and dtype. `full`: also reads every array and compares fingerprints.
  """
  step_dir = epath.Path(step_dir)
  manifest = read_json(step_dir, MANIFEST)
  if manifest.get("format") != canonical_lib.FORMAT:
    raise ValueError(f"{step_dir} is not a jaxrec checkpoint (manifest format "
                     f"{manifest.get('format')!r})")
  read_json(step_dir, META)
  read_json(step_dir, DATA_STATE)
  arrays = open_arrays(step_dir)
  for name, info in manifest["leaves"].items():
    if name not in arrays:
      raise ValueError(f"array '{name}' is missing")
    a = arrays[name]
    if list(a.shape) != info["shape"] or str(a.dtype.numpy_dtype) != info["dtype"]:
      raise ValueError(f"array '{name}' is {a.dtype.numpy_dtype}{list(a.shape)}, manifest "
                       f"says {info['dtype']}{info['shape']}")
  if full and manifest.get("fingerprint"):
    saved = np.asarray(arrays["fingerprint"].read().result())
    for name, expect in zip(manifest["fingerprint"], saved):
      got = array_fingerprint(arrays[name])
      if got != int(expect):
        raise ValueError(f"array '{name}' fails its fingerprint check (stored data differ "
                         "from what was saved)")
  return manifest


def array_fingerprint(array: ts.TensorStore) -> int:
  """`canonical.fingerprint` of a stored array, read block by block."""
  shape = tuple(array.shape)
  total = 0
  for start, block in row_blocks(array):
    total = (total + canonical_lib.fingerprint_np(block, shape, start)) & 0xFFFFFFFF
  return total
