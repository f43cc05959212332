#!/usr/bin/env python3
"""A plain single-device JAX DLRM: the baseline `vs_torchrec` holds jaxrec against.

No framework: 26 tables as one `[tables, rows, dim]` array, a gather for the lookup, the
DLRM interaction, two `x @ W + b` MLPs, `jax.value_and_grad`, SGD on the dense parameters
and a scatter-add of `-lr * grad` into the gathered rows; one jitted step with donated
state. Same shape, data, order, step timing and eval as the jaxrec and TorchRec runs of
`benchmarks/vs_torchrec.py` (which runs this script as a subprocess on the same two
cores). The issue sets the bar: the framework must beat this, not trail it.

Input: the .npz `vs_torchrec.py` writes (`dense`, `sparse`, `labels`, `eval_*`).
Prints one JSON line: `{"framework": "naive_jax", "examples_per_sec", "auc", ...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import HelpFormatter, check_at_least, interruptible
from vs_torchrec import step_times

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.train import metrics

BOTTOM = (512, 256, 64, 16)
TOP = (512, 256, 1)


def init_params(key, num_dense: int, num_tables: int, rows: int, dim: int) -> dict:
  """Dense layers (Glorot normal kernels, zero biases) and uniform `1/sqrt(rows)` tables."""
  def mlp(key, sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
      key, k = jax.random.split(key)
      layers.append((jax.random.normal(k, (a, b)) * np.sqrt(2.0 / (a + b)), jnp.zeros(b)))
    return layers

  k_bot, k_top, k_tab = jax.random.split(key, 3)
  vectors = num_tables + 1
  interaction = dim + vectors * (vectors - 1) // 2
  scale = 1.0 / np.sqrt(rows)
  return {"bottom": mlp(k_bot, (num_dense,) + BOTTOM), "top": mlp(k_top, (interaction,) + TOP),
          "tables": jax.random.uniform(k_tab, (num_tables, rows, dim), jnp.float32,
                                       -scale, scale)}


def logits(dense_params, emb, dense, dtype=jnp.float32):
  """emb `[B, T, D]`, dense `[B, num_dense]` → float32 `[B]`; matmuls on operands cast to
  `dtype` (as `flax.linen.Dense(dtype=...)` does)."""
  x = dense.astype(dtype)
  for w, b in dense_params["bottom"]:
    x = jax.nn.relu(x @ w.astype(dtype) + b.astype(dtype))
  t = jnp.concatenate([x[:, None], emb.astype(dtype)], axis=1)         # [B, T+1, D]
  li, lj = np.tril_indices(t.shape[1], -1)
  z = jnp.einsum("bid,bjd->bij", t, t)[:, li, lj]
  h = jnp.concatenate([x, z], axis=1)
  for i, (w, b) in enumerate(dense_params["top"]):
    h = h @ w.astype(dtype) + b.astype(dtype)
    if i < len(dense_params["top"]) - 1:
      h = jax.nn.relu(h)
  return h[:, 0].astype(jnp.float32)


def make_step(lr: float, dtype=jnp.float32):
  def loss_fn(dense_params, emb, dense, labels):
    lg = logits(dense_params, emb, dense, dtype)
    return jnp.mean(jnp.maximum(lg, 0) - lg * labels + jnp.log1p(jnp.exp(-jnp.abs(lg))))

  def step(params, dense, ids, labels):
    tables = params["tables"]
    cols = jnp.arange(tables.shape[0])[None, :]
    dense_params = {k: v for k, v in params.items() if k != "tables"}
    loss, (g_dense, g_emb) = jax.value_and_grad(loss_fn, (0, 1))(
        dense_params, tables[cols, ids], dense, labels)
    new = jax.tree.map(lambda p, g: p - lr * g, dense_params, g_dense)
    new["tables"] = tables.at[cols, ids].add(-lr * g_emb)
    return new, loss

  return jax.jit(step, donate_argnums=(0,))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--data", required=True,
                 help='the .npz vs_torchrec.py writes')
  p.add_argument("--steps", type=int, default=300,
                 help='train steps')
  p.add_argument("--warmup", type=int, default=20,
                 help='untimed first steps')
  p.add_argument("--seed", type=int, default=0,
                 help='initialisation seed')
  p.add_argument("--batch_size", type=int, default=512,
                 help='examples per step')
  p.add_argument("--lr", type=float, default=0.1,
                 help='SGD learning rate, dense and sparse')
  p.add_argument("--rows", type=int, default=100000,
                 help='rows of each of the 26 tables')
  p.add_argument("--dim", type=int, default=16,
                 help='embedding dimension')
  p.add_argument("--dense_dtype", choices=["float32", "bfloat16"], default="float32",
                 help='matmul operand dtype of the MLPs')
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("steps", "batch_size", "rows", "dim"))
  if not 1 <= args.warmup < args.steps:   # as vs_torchrec.step_times needs
    p.error(f"--warmup must be in [1, --steps={args.steps}), got {args.warmup}")
  if not os.path.isfile(args.data):
    p.error(f"--data: no file {args.data!r}")
  dtype = jnp.dtype(args.dense_dtype)

  data = dict(np.load(args.data))
  bs, n = args.batch_size, args.steps * args.batch_size
  if len(data["labels"]) < n:
    raise SystemExit(f"naive_dlrm: {args.data} holds {len(data['labels'])} train examples, "
                     f"{args.steps} steps need {n}")
  for key in ("sparse", "eval_sparse"):   # a gather clamps: out-of-range ids trained quietly
    ids = data.get(key)
    if ids is not None and ids.size and not 0 <= ids.min() <= ids.max() < args.rows:
      raise SystemExit(f"naive_dlrm: {args.data}: {key} holds ids in [{ids.min()}, "
                       f"{ids.max()}], outside the {args.rows} rows of --rows")
  num_tables = data["sparse"].shape[1]
  params = init_params(jax.random.key(args.seed), data["dense"].shape[1], num_tables,
                       args.rows, args.dim)
  step = make_step(args.lr, dtype)
  sparse = data["sparse"].astype(np.int32)

  losses, done = [], []
  for lo in range(0, n, bs):   # one step in flight, as the jaxrec worker does
    params, loss = step(params, data["dense"][lo:lo + bs], sparse[lo:lo + bs],
                        data["labels"][lo:lo + bs])
    if losses:
      losses[-1].block_until_ready()
      done.append(time.perf_counter())
    losses.append(loss)
  jax.block_until_ready(params)
  done.append(time.perf_counter())
  losses = np.asarray(jax.device_get(losses), np.float64)

  score = jax.jit(lambda p, d, s: logits(p, p["tables"][jnp.arange(num_tables)[None], s], d,
                                         dtype))
  acc = metrics.EvalAccumulator()
  ev_sparse = data["eval_sparse"].astype(np.int32)
  for lo in range(0, len(data["eval_labels"]), 4096):
    acc.add(np.asarray(score(params, data["eval_dense"][lo:lo + 4096], ev_sparse[lo:lo + 4096])),
            data["eval_labels"][lo:lo + 4096])
  ev = acc.result()
  print(json.dumps({"framework": "naive_jax", **step_times(done, args.warmup, bs),
                    "auc": ev["eval_auc"], "logloss": ev["eval_logloss"], "steps": args.steps,
                    "warmup": args.warmup, "train_loss_last50": float(losses[-50:].mean()),
                    "eval_examples": ev["eval_examples"], "jax": jax.__version__,
                    "dense_dtype": args.dense_dtype}), flush=True)


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
