"""`remove_accidental_hits` with multi-hot item bags: rows holding the same item ids in
another order are the same item. Keyed on pooled embeddings, such rows could differ in the
last bit of a float sum and were then negatives for each other."""

import jax
import numpy as np
import pytest

from jaxrec.data.batch import Batch
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.models import TwoTower
from jaxrec.models.two_tower import item_bag_keys
from jaxrec.sharding.mesh import batch_sharding
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.dp_collection import dp_collection

B, D = 16, 8
TABLES = (TableSpec("users", 40, D), TableSpec("items", 50, D))


def _features(weighted):
  return (FeatureSpec("user", "users"),
          FeatureSpec("item", "items", max_len=5, pooling="mean", weighted=weighted))


def _batch(weighted, seed=0):
  rng = np.random.default_rng(seed)
  items = np.stack([rng.permutation(50)[:5] for _ in range(B)]).astype(np.int32)
  items[:, 4] = -1                                        # bags of 4 ids
  w = rng.uniform(0.5, 2, size=(B, 5)).astype(np.float32)
  for dst, src, perm in ((7, 2, [3, 1, 0, 2, 4]), (11, 2, [2, 0, 3, 1, 4]),
                         (13, 5, [1, 2, 3, 0, 4])):
    items[dst], w[dst] = items[src][perm], w[src][perm]    # same bag, another order
  return Batch(dense=rng.normal(size=(B, 2)).astype(np.float32),
               labels=np.ones(B, np.float32),
               ids={"user": rng.integers(0, 40, size=(B, 1)).astype(np.int32), "item": items},
               weights={"item": w} if weighted else {})


def _setup(weighted, devices):
  model = TwoTower(user_features=(0,), item_features=(1,), user_mlp=(8,), item_mlp=(8,),
                   loss="in_batch_softmax", remove_accidental_hits=True, temperature=0.05)
  config = ExperimentConfig(embedding=(TABLES, _features(weighted)), model=model, batch_size=B,
                            num_dense=2,
                            dense_optimizer=dense_optimizer("sgd", 0.0),
                            sparse_optimizer=optimizers.sparse_optimizer("sgd", lr=0.0))
  coll = dp_collection(config, devices)
  return config, coll, state_lib.create(config, coll, 0), batch_sharding(coll.mesh)


def _reference(config, coll, state, batch):
  """numpy loss: rows are the same item when their bags hold the same (id, weight) pairs."""
  ctx = coll.lookup(state["emb"], batch.ids, batch.weights)
  emb = coll.pool(ctx.rows, ctx)
  model = config.model
  u, v = (np.asarray(x) for x in model.apply({"params": state["params"]}, batch.dense, emb,
                                             method="towers"))
  w = batch.weights.get("item", np.ones_like(batch.ids["item"], np.float32))
  bags = [sorted((int(i), float(x)) for i, x in zip(ids, ws) if i >= 0)
          for ids, ws in zip(batch.ids["item"], w)]
  s = (u @ v.T) / model.temperature
  losses = [np.log(np.exp(s[i, [j for j in range(B) if j == i or bags[j] != bags[i]]]).sum())
            - s[i, i] for i in range(B)]
  return float(np.mean(losses))


@pytest.mark.parametrize("weighted", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_same_bag_in_another_order_is_the_same_item(weighted):
  batch = _batch(weighted)
  losses = []
  for devices in (1, 8):
    config, coll, state, bs = _setup(weighted, devices)
    if devices == 1:
      want = _reference(config, coll, state, batch)
    step = step_lib.make_train_step(config, coll, state_lib.shardings(state, coll))
    fed = batch if devices == 1 else coll.pack_batch(batch)    # ids by feature, then packed
    put = jax.tree.map(lambda x: jax.make_array_from_process_local_data(bs, x), fed)
    losses.append(float(step(state, put)[1]["loss"]))
  np.testing.assert_allclose(losses, [want, want], rtol=2e-6)   # a missed hit: ~6e-5


def test_item_bag_keys_sort_ids_and_their_weights():
  ids = np.array([[3, 1, 3, -1], [1, 3, -1, 3], [3, 1, -1, -1]], np.int32)
  w = np.array([[2., 5., 1., 9.], [5., 1., 7., 2.], [2., 5., 0., 0.]], np.float32)
  keys = item_bag_keys([(ids, w)])
  np.testing.assert_array_equal(keys[0], [[-1, 1, 3, 3], [-1, 1, 3, 3], [-1, -1, 1, 3]])
  np.testing.assert_array_equal(keys[1], [[0, 5, 1, 2], [0, 5, 1, 2], [0, 0, 5, 2]])
