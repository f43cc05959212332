"""Jitted train and eval steps over the train state (see `state.py`).

Train step, one `jit`:
  lookup (ids → unique rows per device) → pool `[B, F, D]` → dense model → loss (on 2+
  devices per device, with one all-reduce of the flat dense gradient: `dense_loss.py`);
  grads of the dense params (optax) and of the unique rows (sparse optimizer), so the
  embedding update costs O(ids in the batch), independent of table size. A two-tower model
  with `logq_correction` first updates `state["item_freq"]` with the global batch's items
  and takes their log probabilities from it. The eval step never applies the correction.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.data.batch import Batch
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.models import item_frequency
from jaxrec.models.two_tower import item_bag_keys
from jaxrec.sharding.mesh import batch_sharding, replicated
from jaxrec.train.config import ExperimentConfig
from jaxrec.train.dense_loss import dense_value_and_grad
from jaxrec.train import retrieval, state as state_lib


def make_train_step(config: ExperimentConfig, collection: EmbeddingCollection, state_shardings,
                    keyed: Sequence[str] = ()):
  """`step(state, batch) -> (state, metrics)`; state buffers are donated (in-place).

  `keyed`: offloaded tables whose stochastic rounding is keyed by table row
  (`OffloadTier.keyed`); the step then takes a third argument, `OffloadTier.step_args()`'s
  `{table: uint32 [cache_rows]}` (the table row in each cache slot)."""
  tx = config.dense_tx()
  model = config.model
  dense_vg = dense_value_and_grad(model, collection.mesh)

  def step(state, batch: Batch, slot_rows=None):
    ctx = collection.lookup(state["emb"], batch.ids, batch.weights)
    keys = log_q = None
    logq = getattr(model, "logq_correction", False)
    if logq or getattr(model, "remove_accidental_hits", False):   # ids packed or by feature
      keys = item_bag_keys([_table_rows(collection.feature_inputs(batch.ids, batch.weights,
                                                                  f.name), f, slot_rows)
                            for f in map(collection.features.__getitem__,
                                         map(int, model.item_features))])
    new_state = dict(state)
    if logq:   # on the global batch: the same estimate on any number of devices
      bucket = item_frequency.buckets(keys, model.logq_buckets)
      new_state["item_freq"] = item_frequency.update(state["item_freq"], bucket,
                                                     state["step"], model.logq_alpha)
      log_q = item_frequency.log_prob(new_state["item_freq"], bucket)

    # the dense model's backward (per device on 2+), then the pooling's by its vjp; keys
    # are used only with remove_accidental_hits
    emb, pool_vjp = jax.vjp(lambda rows: collection.pool(rows, ctx), ctx.rows)
    loss, g_params, g_emb = dense_vg(state["params"], batch.dense, emb, batch.labels, keys,
                                     log_q)
    (g_rows,) = pool_vjp(g_emb)
    updates, opt_state = tx.update(g_params, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    emb = collection.apply_gradients(state["emb"], ctx, g_rows, state["step"], slot_rows)
    new_state.update(step=state["step"] + 1, params=params, opt_state=opt_state, emb=emb)
    metrics = {"loss": loss}
    if getattr(tx, "clip_norm", None) is not None:   # before clipping: `window_record`
      metrics["dense_grad_norm"] = optax.tree.norm(g_params)
    return new_state, metrics

  bs = batch_sharding(collection.mesh)
  slot_rows = (replicated(collection.mesh),) if keyed else ()
  return jax.jit(step, in_shardings=(state_shardings, bs) + slot_rows,
                 out_shardings=(state_shardings, replicated(collection.mesh)),
                 donate_argnums=(0,), compiler_options=collection.compiler_options())


def _table_rows(bag, feature, slot_rows):
  """A feature's `(ids [B, max_len], weights)` with an offloaded table's cache slots made
  its table rows (`slot_rows`, `OffloadTier.row_keyed`): the logQ estimate is keyed by
  item, and a slot holds other items over time (that estimate counted slots)."""
  ids, weights = bag
  if feature.table not in (slot_rows or {}):
    return bag
  rows = jnp.take(slot_rows[feature.table], jnp.clip(ids, 0, None)).astype(jnp.int32)
  return jnp.where(ids >= 0, rows, -1), weights


def row_keyed_tables(config: ExperimentConfig) -> tuple[str, ...]:
  """The tables a two-tower's logQ estimate keys by their rows (its item features'): an
  offload tier maps their cache slots back to rows for the train step."""
  model = config.model
  if not getattr(model, "logq_correction", False):
    return ()
  return tuple(dict.fromkeys(config.features[int(i)].table for i in model.item_features))


def window_record(outputs: Sequence[dict], tx) -> dict:
  """What a log window's train-step outputs (fetched, one dict per step) add to its
  `metrics.jsonl` line besides the loss: with `dense_optimizer.clip_norm`,
  `dense_grad_norm` (the dense gradients' global norm before clipping, mean over the
  window) and `dense_clipped` (the fraction of its steps whose norm was clipped)."""
  clip_norm = getattr(tx, "clip_norm", None)
  norms = [float(o["dense_grad_norm"]) for o in outputs if "dense_grad_norm" in o]
  if clip_norm is None or not norms:
    return {}
  norms = np.asarray(norms, np.float64)
  return {"dense_grad_norm": float(norms.mean()),
          "dense_clipped": float(np.mean(norms > clip_norm))}


def make_eval_step(config: ExperimentConfig, collection: EmbeddingCollection, state_shardings):
  """`eval_step(state, batch) -> {"logits": [B]}` (float32, replicated: exact host-side
  AUC); for a model with towers (`TwoTower`) also `"user"` and `"item"` `[B, K]`, its
  vectors, for the in-batch retrieval metrics (`retrieval.py`)."""
  model = config.model
  towers = retrieval.has_towers(model)

  def eval_step(state, batch: Batch):
    ctx = collection.lookup(state["emb"], batch.ids, batch.weights)
    emb = collection.pool(ctx.rows, ctx)
    variables = {"params": state["params"]}
    if not towers:
      return {"logits": model.apply(variables, batch.dense, emb).astype(jnp.float32)}
    user, item = model.apply(variables, batch.dense, emb, method="towers")
    # `TwoTower.__call__`'s score, from the same vectors
    return {"logits": (user * item).sum(-1) / model.temperature, "user": user, "item": item}

  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding(collection.mesh)),
                 out_shardings=replicated(collection.mesh))


__all__ = ["make_train_step", "make_eval_step", "state_lib"]
