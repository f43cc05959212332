#!/usr/bin/env python3
"""TorchRec reference: DLRM under `DistributedModelParallel` on CPU, for `vs_torchrec`.

Runs in this folder's own venv (`make venv`: torch 2.13 CPU, fbgemm-gpu-cpu 1.8,
torchrec 1.8), never in the core install. The model is `torchrec.models.dlrm.DLRM` with
the `configs/dlrm_criteo.gin` shape (26 tables x `--rows` x `--dim`, dense arch
512-256-64-16, over arch 512-256-1), sharded by `DistributedModelParallel` on a gloo
process group of world size 1: every table table-wise on the fused TBE kernel
(`EmbeddingComputeKernel.FUSED`), the sparse SGD update applied inside the backward pass
(`apply_optimizer_in_backward`, lr `--lr`), the dense parameters (DDP-wrapped by DMP) with
`torch.optim.SGD` (lr `--lr`), `BCEWithLogitsLoss` (mean), `torch.set_num_threads`.

Input: the .npz written by `benchmarks/vs_torchrec.py`: `dense [N, 13] float32`,
`sparse [N, 26] int64` (one-hot ids already `% rows`), `labels [N] float32`, and
`eval_dense` / `eval_sparse` / `eval_labels`. Trains on the first `steps * batch_size`
examples in order, times the steps after `--warmup` (batch assembly included, as on the
jaxrec side), then scores the eval arrays (exact AUC with ties counted 1/2, log loss).

Prints one JSON line:
  {"framework": "torchrec", "examples_per_sec", "auc", "logloss", "steps", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import torchrec
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DENSE_ARCH = [512, 256, 64, 16]
OVER_ARCH = [512, 256, 1]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Exact ROC AUC, ties count 1/2 (same definition as `jaxrec.train.metrics.roc_auc`)."""
  y = labels.reshape(-1) > 0.5
  s = scores.astype(np.float64).reshape(-1)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(s, kind="stable")
  s, y = s[order], y[order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
  pos = np.add.reduceat(y.astype(np.int64), starts)
  neg = np.diff(np.r_[starts, y.size]) - pos
  neg_below = np.cumsum(neg) - neg
  wins = (pos * neg_below).sum(dtype=np.float64) + 0.5 * (pos * neg).sum(dtype=np.float64)
  return float(wins / (float(n_pos) * float(n_neg)))


def log_loss(labels: np.ndarray, logits: np.ndarray, eps: float = 1e-7) -> float:
  y = labels.astype(np.float64).reshape(-1)
  p = np.clip(1.0 / (1.0 + np.exp(-logits.astype(np.float64).reshape(-1))), eps, 1 - eps)
  return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def step_times(done, warmup: int, batch_size: int) -> dict:
  """Speed from the finish time of every step (as `benchmarks/vs_torchrec.step_times`).

  `examples_per_sec`: wall clock from the end of step `warmup - 1` to the end of the last;
  `examples_per_sec_median`: from the median per-step time (less disturbed by other load).
  """
  done = np.asarray(done, np.float64)
  timed = len(done) - warmup
  elapsed = done[-1] - done[warmup - 1]
  gaps = np.diff(done[warmup - 1:])
  return {"examples_per_sec": timed * batch_size / elapsed,
          "examples_per_sec_median": batch_size / float(np.median(gaps)),
          "step_ms": 1e3 * elapsed / timed, "step_ms_median": 1e3 * float(np.median(gaps)),
          "step_ms_min": 1e3 * float(gaps.min())}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def init_process_group() -> None:
  os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
  os.environ.setdefault("MASTER_PORT", str(free_port()))
  os.environ.setdefault("RANK", "0")
  os.environ.setdefault("WORLD_SIZE", "1")
  os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
  dist.init_process_group(backend="gloo")


def build_model(num_features: int, rows: int, dim: int, lr: float, batch_size: int):
  """-> (DMP model, dense optimizer, plan text)."""
  names = [f"f{i}" for i in range(num_features)]
  tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows,
                               feature_names=[names[i]]) for i in range(num_features)]
  ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
  model = DLRM(embedding_bag_collection=ebc, dense_in_features=13,
               dense_arch_layer_sizes=DENSE_ARCH, over_arch_layer_sizes=OVER_ARCH,
               dense_device=torch.device("cpu"))
  # Sparse SGD fused into the backward pass (the TBE kernel updates the rows it touched).
  apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": lr})
  constraints = {t.name: ParameterConstraints(
      sharding_types=[ShardingType.TABLE_WISE.value],
      compute_kernels=[EmbeddingComputeKernel.FUSED.value]) for t in tables}
  planner = EmbeddingShardingPlanner(
      topology=Topology(world_size=1, local_world_size=1, compute_device="cpu"),
      batch_size=batch_size, constraints=constraints)
  sharders = [EmbeddingBagCollectionSharder()]
  plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
  dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan,
                                 sharders=sharders)
  dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
  dense_opt = torch.optim.SGD(dense_params, lr=lr)
  return dmp, dense_opt, str(plan)


class Batches:
  """Consecutive `batch_size` slices of the npz arrays as (dense, KJT, labels)."""

  def __init__(self, dense, sparse, labels, batch_size: int):
    self.dense = torch.from_numpy(np.ascontiguousarray(dense, np.float32))
    self.sparse = torch.from_numpy(np.ascontiguousarray(sparse, np.int64))
    self.labels = torch.from_numpy(np.ascontiguousarray(labels, np.float32))
    self.batch_size = batch_size
    self.keys = [f"f{i}" for i in range(self.sparse.shape[1])]

  def __len__(self):
    return (len(self.labels) + self.batch_size - 1) // self.batch_size

  def __getitem__(self, i: int):
    lo = i * self.batch_size
    hi = min(lo + self.batch_size, len(self.labels))
    ids = self.sparse[lo:hi]
    # KJT values are feature-major: all of f0's ids for the batch, then f1's, ...
    values = ids.t().contiguous().view(-1)
    lengths = torch.ones(values.numel(), dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
    return self.dense[lo:hi], kjt, self.labels[lo:hi]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--batch_size", type=int, default=512)
  p.add_argument("--eval_batch_size", type=int, default=4096)
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--dim", type=int, default=16)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dense_dtype", choices=["float32", "bfloat16"], default="float32",
                 help="bfloat16: forward and loss under torch.autocast('cpu', bfloat16) "
                      "(matmuls in bfloat16; parameters and the TBE tables stay float32)")
  args = p.parse_args()
  if not 0 < args.warmup < args.steps:
    p.error("--warmup must be in [1, --steps)")

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  init_process_group()
  try:
    data = np.load(args.data)
    n = args.steps * args.batch_size
    if len(data["labels"]) < n:
      sys.exit(f"run_torchrec: {args.data} holds {len(data['labels'])} train examples, "
               f"{args.steps} steps need {n}")
    if int(data["sparse"].max()) >= args.rows or int(data["sparse"].min()) < 0:
      sys.exit(f"run_torchrec: ids must be in [0, {args.rows})")
    train = Batches(data["dense"][:n], data["sparse"][:n], data["labels"][:n], args.batch_size)
    model, dense_opt, plan = build_model(train.sparse.shape[1], args.rows, args.dim, args.lr,
                                         args.batch_size)
    print(plan, file=sys.stderr)
    loss_fn = nn.BCEWithLogitsLoss()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=args.dense_dtype == "bfloat16")
    model.train()
    load = round(os.getloadavg()[0], 2)   # other processes competing for the cores
    losses, done = [], []     # done[i]: when step i finished (CPU: synchronous)
    for i in range(args.steps):
      dense, kjt, labels = train[i]
      with autocast:
        logits = model(dense, kjt).squeeze(-1)
        loss = loss_fn(logits.float(), labels)
      dense_opt.zero_grad(set_to_none=True)
      loss.backward()          # also applies the fused sparse SGD update
      dense_opt.step()
      losses.append(loss.detach())
      done.append(time.perf_counter())
    losses = torch.stack(losses).numpy()

    model.eval()
    ev = Batches(data["eval_dense"], data["eval_sparse"], data["eval_labels"],
                 args.eval_batch_size)
    scores = []
    with torch.no_grad(), autocast:
      for i in range(len(ev)):
        dense, kjt, _ = ev[i]
        scores.append(model(dense, kjt).squeeze(-1).float().numpy())
    scores = np.concatenate(scores)
    labels = ev.labels.numpy()
    print(json.dumps({
        "framework": "torchrec", **step_times(done, args.warmup, args.batch_size),
        "auc": roc_auc(labels, scores),
        "logloss": log_loss(labels, scores), "steps": args.steps, "warmup": args.warmup,
        "train_loss_last50": float(losses[-50:].mean()), "eval_examples": int(labels.size),
        "threads": torch.get_num_threads(), "load_average_1m": load, "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "?"), "dense_dtype": args.dense_dtype}),
        flush=True)
  finally:
    dist.destroy_process_group()


if __name__ == "__main__":
  main()
