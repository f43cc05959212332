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
are assembled from the shards this process holds: run it with world size 1, or on a
state_dict gathered to one rank. bfloat16 becomes float32 (npz has no bfloat16).

`--demo_tables=N --demo_rows=R --demo_dim=D` builds a fresh `EmbeddingBagCollection`
(tables `t0..tN-1`, seed `--seed`) instead of reading a file: for tests.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import torch

TABLE_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")


def to_numpy(value) -> np.ndarray:
  """A dense, ShardedTensor or DTensor weight → numpy `[rows, dim]` (float32/float16)."""
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
  if value.dtype == torch.bfloat16:
    value = value.float()
  return value.numpy()


def tables_of(state_dict) -> dict[str, np.ndarray]:
  """`{state_dict key: array}` for every embedding table weight."""
  out = {key: to_numpy(v) for key, v in state_dict.items() if TABLE_KEY.search(key)}
  if not out:
    raise SystemExit("error: no '...embedding_bags.<table>.weight' keys in the state_dict "
                     f"(keys: {list(state_dict)[:10]})")
  return out


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
  args = p.parse_args(argv)
  if args.demo_tables:
    state_dict = demo_state_dict(args.demo_tables, args.demo_rows, args.demo_dim, args.seed)
  elif args.state_dict:
    obj = torch.load(args.state_dict, map_location="cpu", weights_only=False)
    state_dict = obj.state_dict() if hasattr(obj, "state_dict") else obj
  else:
    raise SystemExit("error: give --state_dict=FILE (or --demo_tables=N)")
  tables = tables_of(state_dict)
  np.savez(args.output, **tables)
  for key, x in sorted(tables.items()):
    print(f"{key}: {x.dtype}{list(x.shape)}", file=sys.stderr)
  print(args.output)


if __name__ == "__main__":
  main()
