#!/usr/bin/env python3
"""Exports the embedding tables of a TorchRec model as an .npz jaxrec can import.

Runs in a torch venv (e.g. `third_party/torchrec_reference/.venv`), never in the core
install. Reads a `state_dict` (or a whole module) saved with `torch.save`, keeps the
embedding table weights of its `EmbeddingBagCollection` / `EmbeddingCollection`
(`...embedding_bags.<table>.weight`, `...embeddings.<table>.weight`) and writes them,
keys unchanged, as float arrays `[rows, dim]`:

  python third_party/torchrec_export/export_torchrec.py --state_dict=model.pt --output=ebc.npz
  python scripts/convert_checkpoint.py --torchrec_npz=ebc.npz --output=W/checkpoints \
      --format=checkpoint

Sharded weights (`ShardedTensor` from `DistributedModelParallel.state_dict()`, `DTensor`)
are assembled from the shards this process holds: save it with world size 1, or a
state_dict gathered to one rank (loading one starts a one-process gloo group, which torch
needs to unpickle a ShardedTensor). npz has no bfloat16: a bfloat16 table is written as its
raw bits (uint16) and named in the JSON entry `jaxrec_dtypes`, which the import reads (the
checkpoint holds it as bfloat16, exactly). `--output` must end in `.npz` and not exist; it
is written whole or not at all.

`--demo_tables=N --demo_rows=R --demo_dim=D` builds a fresh `EmbeddingBagCollection`
(tables `t0..tN-1`, seed `--seed`) instead of reading a file: for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import torch

TABLE_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")
DTYPES_KEY = "jaxrec_dtypes"   # jaxrec/checkpoint/torchrec_npz.py reads it


def to_numpy(value) -> np.ndarray:
  """A dense, ShardedTensor or DTensor weight → numpy `[rows, dim]` (float32/float16, or a
  bfloat16 table's raw bits as uint16)."""
  if hasattr(value, "full_tensor"):                      # DTensor
    value = value.full_tensor()
  if hasattr(value, "local_shards"):                     # ShardedTensor
    full = torch.zeros(tuple(value.size()), dtype=value.dtype)
    covered = 0
    for shard in value.local_shards():
      offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
      region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
      full[region] = shard.tensor.detach().cpu()
      covered += int(np.prod(sizes))
    if covered != full.numel():
      raise SystemExit("error: this process holds only part of a sharded table; gather the "
                       "state_dict to one rank (or run with world size 1) first")
    value = full
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:   # npz has no bfloat16: its bits, named in DTYPES_KEY
    return value.contiguous().view(torch.int16).numpy().view(np.uint16)
  return value.numpy()


def tables_of(state_dict) -> dict[str, np.ndarray]:
  """`{state_dict key: array}` for every embedding table weight."""
  out = {key: to_numpy(v) for key, v in state_dict.items() if TABLE_KEY.search(key)}
  if not out:
    raise SystemExit("error: no '...embedding_bags.<table>.weight' keys in the state_dict "
                     f"(keys: {list(state_dict)[:10]})")
  return out


def load_state_dict(path: str) -> dict:
  """The state_dict saved in `path` (or a whole module's); one line naming the file when it
  cannot be read."""
  if not os.path.isfile(path):
    raise SystemExit(f"error: --state_dict: {path}: no such file")
  import torch.distributed as dist   # pylint: disable=import-outside-toplevel
  if dist.is_available() and not dist.is_initialized():   # a ShardedTensor's unpickling
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise SystemExit(f"error: --state_dict: {path} is not a file torch.save wrote "
                     f"({reason[:200]})") from None
  state_dict = obj.state_dict() if hasattr(obj, "state_dict") else obj
  if not isinstance(state_dict, dict):
    raise SystemExit(f"error: --state_dict: {path} holds a {type(obj).__name__}, not a "
                     "state_dict or module")
  return state_dict


def write_npz(path: str, tables: dict[str, np.ndarray]) -> None:
  """`tables` (and DTYPES_KEY for bfloat16 ones) as npz `path`, through a temporary file
  renamed at the end: never a partial file under that name."""
  raw = {k: "bfloat16" for k, x in tables.items() if x.dtype == np.uint16}
  arrays = dict(tables, **({DTYPES_KEY: np.array(json.dumps(raw))} if raw else {}))
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:   # a file object: np.savez appends no second .npz
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise SystemExit(f"error: --output: cannot write {path}: {e.strerror or e}") from None
    raise


def demo_state_dict(num_tables: int, rows: int, dim: int, seed: int) -> dict:
  import torchrec   # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  configs = [torchrec.EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows,
                                         feature_names=[f"f{i}"]) for i in range(num_tables)]
  ebc = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
  return ebc.state_dict()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--state_dict", help="file saved with torch.save (state_dict or module)")
  p.add_argument("--output", required=True, help="npz to write")
  p.add_argument("--demo_tables", type=int, default=0)
  p.add_argument("--demo_rows", type=int, default=100)
  p.add_argument("--demo_dim", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--demo_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  args = p.parse_args(argv)
  if not args.output.endswith(".npz"):   # np.savez wrote OUT.npz and this printed OUT
    raise SystemExit(f"error: --output: {args.output}: name the file with .npz at the end")
  if os.path.lexists(args.output):
    raise SystemExit(f"error: --output: {args.output} exists; remove it or pick another name")
  if args.demo_tables:
    state_dict = demo_state_dict(args.demo_tables, args.demo_rows, args.demo_dim, args.seed)
    state_dict = {k: v.to(getattr(torch, args.demo_dtype)) for k, v in state_dict.items()}
  elif args.state_dict:
    state_dict = load_state_dict(args.state_dict)
  else:
    raise SystemExit("error: give --state_dict=FILE (or --demo_tables=N)")
  tables = tables_of(state_dict)
  write_npz(args.output, tables)
  for key, x in sorted(tables.items()):
    dtype = "bfloat16 (raw bits)" if x.dtype == np.uint16 else x.dtype
    print(f"{key}: {dtype}{list(x.shape)}", file=sys.stderr)
  print(args.output)


if __name__ == "__main__":
  main()
