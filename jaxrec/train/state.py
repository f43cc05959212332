"""The train state pytree and where each part lives on the mesh.

    state = {"step": int32 [],                      replicated
             "params": dense flax params,           replicated
             "opt_state": optax state,              replicated
             "emb": EmbeddingState,                 sharded per plan (see embedding.collection)
             "rng": uint32 [2] key data,            replicated
             "item_freq": item_frequency state}     replicated; only for a TwoTower with
                                                    `logq_correction`
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import feature_dims
from jaxrec.models import item_frequency
from jaxrec.sharding.mesh import shares_cores
from jaxrec.train.config import ExperimentConfig

TrainState = dict


def init_dense(config: ExperimentConfig, key: jax.Array, dim: int) -> Any:
  """Dense params of the model, initialised from `key` (batch of 2 dummy examples)."""
  dense = jnp.zeros((2, config.num_dense), jnp.float32)
  emb = jnp.zeros((2, len(config.features), dim), jnp.float32)
  return config.model.init(key, dense, emb)["params"]


def check_model(config: ExperimentConfig) -> None:
  """Traces the model's init on abstract inputs `[2, num_dense]`, `[2, F, D]` (no compute,
  no compile), so that a binding that does not fit the config's shapes (DLRM's last bottom
  width vs the tables' dim, a TwoTower feature index >= F, DLRM without dense features)
  stops the run before planning. With features of mixed dims `D` is the widest (the
  pooled activations are padded to it; `ExperimentConfig.validate` has checked that the
  model takes them)."""
  dim = max(feature_dims(config.tables, config.features))
  jax.eval_shape(lambda: init_dense(config, jax.random.key(0), dim))


def init_dense_state(config: ExperimentConfig, key: jax.Array, dim: int) -> tuple[Any, Any]:
  """Dense params (`init_dense`) and the dense optimizer's state for them."""
  params = init_dense(config, key, dim)
  return params, config.dense_tx().init(params)


def uses_logq(config: ExperimentConfig) -> bool:
  """Whether the model keeps a logQ item-frequency estimate (`item_freq` of the state)."""
  return bool(getattr(config.model, "logq_correction", False))


class DenseBytes(NamedTuple):
  """`dense_bytes`: the dense model's bytes on every device, in two parts."""
  resident: int    # its parameters, the optimizer's state (and logQ estimate): the state's
  gradients: int   # the parameters' gradients: among the train step's temporaries (XLA)

  @property
  def total(self) -> int:
    return self.resident + self.gradients


def dense_bytes(config: ExperimentConfig, dim: int) -> DenseBytes:
  """Bytes the dense model keeps on every device during a step: its parameters, the dense
  optimizer's state (and a two-tower's logQ estimate), and apart from them the parameters'
  gradients, which a compiled train step's measured temporaries hold (`step_memory`). The
  planner's `--memory_per_device` covers the tables only. Abstract: nothing is computed."""
  def dense():   # the key inside: made outside, it compiled (data errors must stop first)
    params, opt_state = init_dense_state(config, jax.random.key(0), dim)
    extra = item_frequency.init(config.model.logq_buckets) if uses_logq(config) else ()
    return (params, opt_state, extra), params   # the params' shapes: their gradients'

  def size(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  return DenseBytes(*map(size, jax.eval_shape(dense)))


def create(config: ExperimentConfig, collection: EmbeddingCollection, seed: int) -> TrainState:
  """Fresh state placed on the collection's mesh. Values depend only on `seed`."""
  k_emb = jax.random.split(jax.random.key(seed), 3)[0]
  return {**create_dense(config, collection, seed), "emb": collection.init(k_emb)}


def create_dense(config: ExperimentConfig, collection: EmbeddingCollection, seed: int
                 ) -> TrainState:
  """`create`'s state without `emb` (the same values): what a tables-only checkpoint (a
  TorchRec import) lacks, without initialising tables only to drop them."""
  _, k_dense, k_rng = jax.random.split(jax.random.key(seed), 3)
  rep = NamedSharding(collection.mesh, P())
  params, opt_state = _replicated_dense_state(config, collection, k_dense, rep)
  out = {
      "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
      "params": params,
      "opt_state": opt_state,
      "rng": jax.device_put(jax.random.key_data(k_rng), rep),
  }
  if uses_logq(config):
    out["item_freq"] = jax.jit(item_frequency.init, static_argnums=0, out_shardings=rep)(
        config.model.logq_buckets)
  return out


def _replicated_dense_state(config: ExperimentConfig, collection: EmbeddingCollection,
                            key: jax.Array, rep: NamedSharding) -> tuple[Any, Any]:
  """`init_dense_state` replicated as `rep`. On CPU devices of one process
  (`shares_cores`) computed on the first device and copied to the others: computed on
  each, it cost the host 8x the work on 8 devices (a 1,000-feature DCNv2: 1.0-2.0 s against
  0.13 s, and a longer compile)."""
  init = lambda k: init_dense_state(config, k, collection.dim)   # noqa: E731
  if not shares_cores(collection.mesh):
    return jax.jit(init, out_shardings=rep)(key)
  first = SingleDeviceSharding(collection.mesh.devices.flat[0])
  return jax.device_put(jax.jit(init, out_shardings=first)(key), rep)


def abstract(config: ExperimentConfig, collection: EmbeddingCollection, seed: int
             ) -> TrainState:
  """`ShapeDtypeStruct`s (with shardings) of `create`'s state, without computing it."""
  shapes = jax.eval_shape(lambda: create(config, collection, seed))
  return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                      shapes, shardings(shapes, collection))


def shardings(state: TrainState, collection: EmbeddingCollection) -> TrainState:
  """Sharding pytree matching `state`."""
  rep = NamedSharding(collection.mesh, P())
  out = jax.tree.map(lambda _: rep, {k: v for k, v in state.items() if k != "emb"})
  out["emb"] = collection.shardings()
  return out
