"""A host batch's shapes are checked as it is placed (`device_batch`): labels `[B, 1]`
broadcast the loss to `[B, B]` and trained on it without a word; a batch the devices do not
divide was jax's IndivisibleError. A user's own flax model without `dtype` trains."""

import flax.linen as nn
import numpy as np
import pytest

from jaxrec.data.batch import Batch
from jaxrec.errors import DataError
from jaxrec.models import bf16_hardware
from jaxrec.sharding.mesh import batch_sharding
from jaxrec.train.placement import device_batch
from tests.embedding.test_library_misuse import collection, inputs


def batch(labels_shape=(8,), dense_shape=(8, 3), n=8):
  ids, weights = inputs()
  ids = {k: np.resize(v, (n, v.shape[1])) for k, v in ids.items()}
  weights = {k: np.resize(v, (n, v.shape[1])) for k, v in weights.items()}
  return Batch(dense=np.zeros(dense_shape, np.float32), labels=np.zeros(labels_shape,
                                                                          np.float32),
               ids=ids, weights=weights)


@pytest.mark.parametrize("b,message", [
    (batch((8, 1)), r"Batch.labels has shape \[8, 1\], expected \[batch\]"),
    (batch(dense_shape=(4, 3)), r"Batch.dense has shape \[4, 3\], expected \[8, num_dense\]"),
    (batch((12,), (12, 3), 12), "batch of 12 examples is not divisible by the 8 devices")])
def test_bad_batch_shapes_are_named(b, message):
  coll = collection()
  with pytest.raises(DataError, match=message):
    device_batch(coll, b, batch_sharding(coll.mesh))
  placed = device_batch(coll, batch(), batch_sharding(coll.mesh))
  assert placed.labels.shape == (8,)


def test_a_model_without_a_dtype_field_is_no_bfloat16_model():
  """`loop.setup` crashed with AttributeError: 'Mine' object has no attribute 'dtype'."""
  class Mine(nn.Module):
    @nn.compact
    def __call__(self, dense, emb):
      return nn.Dense(1)(emb.reshape(emb.shape[0], -1))[:, 0]

  assert bf16_hardware.slow_bf16_warning(Mine(), "cpu", cpuinfo="flags : avx2") is None
