"""Tiny DLRM runs with and without offloaded tables, through the real train step."""

from __future__ import annotations

import json
import math

import gin
import jax
import numpy as np

from jaxrec import launch, offload
from jaxrec.offload import snapshots
from jaxrec.data.pipeline import TrainIterator, open_source
from jaxrec.data.synthetic import SyntheticConfig
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.models import DLRM
from jaxrec.sharding.mesh import batch_sharding, make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import uniform_plan
from jaxrec.train import config as config_lib, loop
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer

DIM = 8
BATCH = 128
# "big" is offloaded (10,000 rows, 1,000 cached); "small" stays on the device. "big2"
# reads the big table a second time (two features share it, one multi-hot).
TABLES = (TableSpec("big", 10_000, DIM), TableSpec("small", 50, DIM))
FEATURES = (FeatureSpec("f_big", "big"), FeatureSpec("f_small", "small"),
            FeatureSpec("f_big2", "big", max_len=3, pooling="mean"))


def experiment(opt="sgd"):
  sparse = optimizers.sparse_optimizer(opt, lr=0.05)
  return ExperimentConfig(embedding=(TABLES, FEATURES), model=DLRM((16, DIM), (16, 1)),
                          batch_size=BATCH, dense_optimizer=dense_optimizer("sgd", 0.05),
                          sparse_optimizer=sparse)


def mesh_of(spec="single"):
  if spec == "single":
    return make_mesh({"data": 1}, jax.devices()[:1])
  shape = parse_mesh_spec(spec, math.prod(int(p.split("=")[1]) for p in spec.split(",")))
  return make_mesh(shape, jax.devices()[:math.prod(shape.values())])


def train_iterator(seed=0):
  source = open_source("synthetic", FEATURES, TABLES, seed=seed,
                       synthetic=SyntheticConfig(zipf_exponent=1.05))
  return TrainIterator(source, BATCH, seed, prefetch=0)


class CountedStream:
  """The training stream (seed 0) with a count `i` of the batches taken, kept in its state;
  subclasses change `__next__`."""

  def __init__(self):
    self.it, self.i = train_iterator(0), 0

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    return next(self.it)

  def get_state(self):
    return dict(self.it.get_state(), i=self.i)

  def set_state(self, state):
    self.it.set_state({k: v for k, v in state.items() if k != "i"})
    self.i = state["i"]


def offload_config(tmp_path, cache_rows=1000, **kw):
  table = kw.pop("table", {})
  kw.setdefault("host_buffer_rows", 600)      # small: the writer thread flushes often
  return offload.OffloadConfig(
      tables=(offload.OffloadTable("big", cache_rows=cache_rows, path=str(tmp_path / "big"),
                                   chunk_rows=64, **table),), **kw)


class Run:
  """One training run: collection, state, jitted step, iterator (optionally offloaded).
  `plan`: a kind for every table, or a `Plan`."""

  def __init__(self, config, mesh, off=None, plan="dp", seed=0, iterator=None, options=None):
    self.config, self.off = config, off
    tables = config.tables if off is None else offload.device_tables(
        config.tables, off, config.sparse_tx())
    if isinstance(plan, str):
      plan = uniform_plan(plan, tables, mesh.shape["table"])
    self.collection = EmbeddingCollection.create(tables, config.features, plan, mesh,
                                                 config.sparse_tx(), options)
    self.state = state_lib.create(config, self.collection, seed)
    shardings = state_lib.shardings(self.state, self.collection)
    self.bs = batch_sharding(mesh)
    it = iterator or train_iterator(seed)
    self.tier = None
    if off is not None:
      self.tier = offload.OffloadTier(self.collection, config.tables, off,
                                      key=offload.emb_init_key(seed))
      it = self.tier.wrap(it)
    self.it = it
    self.step_fn = step_lib.make_train_step(config, self.collection, shardings,
                                            self.tier.keyed if self.tier else ())
    self.losses = []

  def train(self, steps):
    for _ in range(steps):
      batch = next(self.it)
      self.collection.check_ids(batch.ids)
      if self.tier is not None:
        self.state = self.tier.before_step(self.state, batch)
      args = self.tier.step_args() if self.tier is not None else ()
      self.state, metrics = self.step_fn(self.state, self.put(batch), *args)
      self.losses.append(float(metrics["loss"]))
    return self

  def put(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.bs, x), batch)

  def full_tables(self):
    """`{table: [rows, dim]}` and `{table: {opt: array}}` as numpy, offloaded ones from the
    store after a flush."""
    tables, opt = self.collection.unstack_tables(self.state["emb"])
    tables = {k: jax.tree.map(np.asarray, v) for k, v in tables.items()}   # int8: 3 arrays
    opt = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in opt.items()}
    if self.tier is not None:
      self.tier.flush(self.state)
      for name, t in self.tier.tables.items():
        tables[name] = t.store.read_all("table", 0, t.spec.rows)
        opt[name] = {k[4:]: t.store.read_all(k, 0, t.spec.rows) for k in t.store.names
                     if k != "table"}
    return tables, opt

  def close(self):
    if self.tier is not None:
      self.tier.close()


# Trainer runs in-process on configs/dlrm_synthetic.gin, shrunk for tests.
SMALL_DLRM = ["ExperimentConfig.batch_size=128", "ExperimentConfig.eval_batch_size=512",
              "ExperimentConfig.num_eval_examples=512", "DLRM.bottom_mlp=(16,)",
              "DLRM.top_mlp=(16,1)", "ExperimentConfig.sparse_optimizer=@Adagrad()"]


def train_synthetic(workdir, num_steps, bindings, mesh="data=8", plan="dp", **options):
  """`loop.train_and_evaluate` on configs/dlrm_synthetic.gin with gin `bindings`, logging
  every 5 steps and checkpointing every 10; returns its last metrics."""
  launch.parse_gin(["configs/dlrm_synthetic.gin"], list(bindings))
  options = config_lib.RunOptions(num_steps=num_steps, mesh=mesh, plan=plan, log_every=5,
                                  checkpoint_every=10, progress=False, **options)
  try:
    return loop.train_and_evaluate(config_lib.ExperimentConfig(), options, str(workdir))
  finally:
    gin.clear_config()


# t0 offloaded, its snapshots small and quick (tests of offload snapshots' files)
SNAPSHOT_OFFLOAD = ["OffloadConfig.tables={'t0': {'cache_rows': 4000}}",
                    "OffloadConfig.host_buffer_rows=600"]


def two_snapshots(tmp_path_factory, name: str):
  """A workdir (under a temporary directory named `name`) with t0 offloaded and
  checkpoints, and offload snapshots, of steps 10 and 20."""
  w = tmp_path_factory.mktemp(name) / "w"
  train_synthetic(w, 20, SMALL_DLRM + SNAPSHOT_OFFLOAD)
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20]
  return w


def logged_lines(workdir) -> list[dict]:
  """`W/metrics.jsonl` as dicts."""
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def logged_losses(workdir) -> dict[int, float]:
  """`{step: loss}` of the log lines of `W/metrics.jsonl`."""
  return {l["step"]: l["loss"] for l in logged_lines(workdir) if "loss" in l}
