"""A test config's embedding collection, every table replicated (`dp`) on the first
`devices` devices: the single-host setup several model tests compare device counts with."""

import jax

from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan


def dp_collection(config, devices: int) -> EmbeddingCollection:
  """`config`'s tables and features on `data=devices`, with its sparse optimizer."""
  mesh = make_mesh({"data": devices}, jax.devices()[:devices])
  return EmbeddingCollection.create(config.tables, config.features,
                                    uniform_plan("dp", config.tables, 1), mesh,
                                    config.sparse_tx())
