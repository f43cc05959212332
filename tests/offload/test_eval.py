"""Evaluation with offloaded tables, in the trainer: eval batches interleaved with training
(look-ahead running), right after checkpoint saves, after a resume and on a run that only
evaluates give the metrics of the same run with every table on the device."""

import logging

import numpy as np
import pytest

from tests.offload.offload_helpers import (SMALL_DLRM, logged_lines, logged_losses,
                                          train_synthetic)

# 256-example eval batches, the last one partial (600 = 2 x 256 + 88); the eval set holds rows
# training never read. t5 (2,000 rows, bags of 8) caches 1,900: evictions every step.
BINDINGS = SMALL_DLRM + ["ExperimentConfig.eval_batch_size=256",
                         "ExperimentConfig.num_eval_examples=600"]
OFFLOAD = ["OffloadConfig.tables={'t0': {'cache_rows': 3000}, 't5': {'cache_rows': 1900}}",
           "OffloadConfig.host_buffer_rows=600", "OffloadConfig.prefetch_depth=3"]
EVAL_KEYS = ("eval_auc", "eval_logloss", "eval_examples")


def _evals(workdir) -> dict[int, list[float]]:
  """`{step: [auc, logloss, examples]}` of the eval lines (a resume line's too)."""
  return {l["step"]: [l[k] for k in EVAL_KEYS] for l in logged_lines(workdir)
          if "eval_auc" in l}


@pytest.mark.slow
def test_interleaved_evals_and_resume_match_on_device_tables(tmp_path):
  # eval every 7 steps, checkpoints every 10 (and at 12, where the first run stops): evals
  # 7 and 14 run between saves with batches planned ahead, 12 and 22 right after a save,
  # 14 and 21 after the resume from 12; the third run only evaluates checkpoint 22
  ref, off = tmp_path / "ref", tmp_path / "off"
  train_synthetic(ref, 22, BINDINGS, mesh="data=8", eval_every=7)
  train_synthetic(off, 12, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  train_synthetic(off, 22, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  want = _evals(ref)
  first = _evals(off)
  train_synthetic(off, 22, BINDINGS + OFFLOAD, mesh="data=8", eval_every=7)
  again = [l for l in logged_lines(off) if l.get("event") == "resume"][-1]
  assert sorted(first) == [7, 12, 14, 21, 22] and sorted(want) == [7, 14, 21, 22]
  for step in want:
    np.testing.assert_allclose(first[step], want[step], rtol=0, atol=1e-6, err_msg=step)
  assert want[22][2] == 600
  # the evals wrote nothing to the tables: training after them is unchanged
  losses, ref_losses = logged_losses(off), logged_losses(ref)
  np.testing.assert_allclose([losses[s] for s in (5, 10, 20, 22)],
                             [ref_losses[s] for s in (5, 10, 20, 22)], rtol=0, atol=1e-6)
  np.testing.assert_allclose([again[k] for k in EVAL_KEYS], want[22], rtol=0, atol=1e-6)


def _eval_logits(run, eval_step, batch):
  """Logits `[B]` of `batch` through the offload cache (`run.state` follows the donation),
  and the number of passes."""
  passes = []

  def step(st, b):
    passes.append(b)
    return np.asarray(eval_step(st, run.put(b))["logits"])
  run.state, logits = run.tier.eval_logits(run.state, batch, step)
  return logits, len(passes)


def test_eval_batches_bigger_than_the_cache_are_evaluated_in_pieces(tmp_path, caplog):
  """An eval batch whose distinct rows fill the cache exactly scores as on the device in one
  pass; one row more (it stopped the run with an error), or eight times the rows, is
  evaluated in passes over pieces that fit, with the on-device logits, and logs nothing
  (start-up warns once per run, `hooks.warn_small_eval_caches`); training goes on as if
  those evals never ran."""
  from jaxrec.data.batch import concatenate   # pylint: disable=import-outside-toplevel
  from jaxrec.offload.cache import batch_rows   # pylint: disable=import-outside-toplevel
  from jaxrec.train import state as state_lib, step as step_lib   # pylint: disable=C0415
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  cfg = experiment("sgd")
  ref = Run(cfg, mesh_of()).train(4)
  # two batches' worth of unseen examples: more distinct rows than any training batch reads
  batch = concatenate([ref.it.batch_at(10**6), ref.it.batch_at(10**6 + 128)])
  uniq = batch_rows(cfg.tables[0], ["f_big", "f_big2"], batch)[0]
  ids = np.array(batch.ids["f_big"])
  ids[ids == ids[0]] = np.setdiff1d(np.arange(10_000), uniq)[0]   # a row no other id reads
  bigger = batch.replace(ids=dict(batch.ids, f_big=ids))
  assert len(batch_rows(cfg.tables[0], ["f_big", "f_big2"], bigger)[0]) == len(uniq) + 1
  huge = concatenate([ref.it.batch_at(10**6 + 128 * k) for k in range(16)])
  ref_eval = step_lib.make_eval_step(cfg, ref.collection, state_lib.shardings(
      ref.state, ref.collection))
  want = [np.asarray(ref_eval(ref.state, ref.put(b))["logits"]) for b in (batch, bigger, huge)]
  ref.train(2)
  off = Run(cfg, mesh_of(), offload_config(tmp_path, len(uniq), prefetch_depth=2)).train(4)
  try:
    eval_step = step_lib.make_eval_step(cfg, off.collection, state_lib.shardings(
        off.state, off.collection))
    caplog.clear()
    got = [_eval_logits(off, eval_step, b) for b in (batch, bigger, huge)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [p for _, p in got][:2] == [1, 2] and got[2][1] >= 8
    for (logits, _), w in zip(got, want):
      np.testing.assert_allclose(logits, w, rtol=0, atol=1e-6)
    off.train(2)
    np.testing.assert_allclose(off.losses, ref.losses, rtol=0, atol=1e-6)
  finally:
    off.close()


def test_an_eval_batch_with_only_padding_for_the_offloaded_table(tmp_path):
  """Every bag of the offloaded table's features empty (-1): the eval raised IndexError
  (`eval_split.remap` indexed an empty slot array), training with such batches did not."""
  from jaxrec.train import state as state_lib, step as step_lib   # pylint: disable=C0415
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  cfg = experiment("sgd")
  ref = Run(cfg, mesh_of()).train(2)
  batch = ref.it.batch_at(10**6)
  empty = {f: np.full_like(np.asarray(batch.ids[f]), -1) for f in ("f_big", "f_big2")}
  batch = batch.replace(ids=dict(batch.ids, **empty))
  ref_eval = step_lib.make_eval_step(cfg, ref.collection, state_lib.shardings(
      ref.state, ref.collection))
  want = np.asarray(ref_eval(ref.state, ref.put(batch))["logits"])
  off = Run(cfg, mesh_of(), offload_config(tmp_path, prefetch_depth=1)).train(2)
  try:
    eval_step = step_lib.make_eval_step(cfg, off.collection, state_lib.shardings(
        off.state, off.collection))
    logits, passes = _eval_logits(off, eval_step, batch)
    assert passes == 1
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-6)
  finally:
    off.close()


def test_eval_pieces_are_greedy_runs_and_an_example_too_big_is_named():
  from jaxrec.data.batch import Batch   # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError   # pylint: disable=import-outside-toplevel
  from jaxrec.offload import OffloadConfig, eval_split   # pylint: disable=C0415
  ids = {"a": np.array([0, 1, 1, 2, -1]), "b": np.array([[0, 5], [1, -1], [7, 7], [3, 0],
                                                          [-1, -1]])}
  batch = Batch(dense=np.zeros((5, 1)), labels=np.zeros(5), ids=ids)
  # distinct rows per example: {0,5} {1} {1,7} {2,3,0} {}
  runs = lambda cache, off=OffloadConfig(): [
      np.flatnonzero(m).tolist()
      for m in eval_split.pieces(batch, {"t": (("a", "b"), cache)}, off.cache_advice)]
  assert runs(7) == [[0, 1, 2, 3, 4]]
  assert runs(4) == [[0, 1, 2], [3, 4]]
  assert runs(3) == [[0, 1], [2], [3, 4]]
  masked = eval_split.only(batch, np.array([0, 0, 1, 0, 0], bool), ["b"])
  assert masked.ids["b"].tolist() == [[-1, -1], [-1, -1], [7, 7], [-1, -1], [-1, -1]]
  assert masked.ids["a"] is ids["a"]
  with pytest.raises(ConfigError, match=r"^offloaded table 't': example 3 of an eval batch "
                     r"alone reads 3 distinct rows, more than its cache of 2; raise its "
                     r"cache_rows/cache_bytes \(OffloadConfig.tables\['t'\]\)$"):
    runs(2)
  with pytest.raises(ConfigError, match=r"more than its cache of 2; raise OffloadConfig."
                     r"auto_cache_fraction \(now 0.1; OffloadConfig.auto offloaded 't'\), or "
                     r"list 't' in OffloadConfig.tables with its cache_rows/cache_bytes$"):
    runs(2, OffloadConfig(auto=True, auto_added=("t",)))
  rng = np.random.default_rng(0)   # against greedy runs over python sets
  for cache in (4, 5, 9, 40):
    big = Batch(dense=np.zeros((60, 1)), labels=np.zeros(60),
                ids={"a": rng.integers(-1, 30, (60, 3)), "b": rng.integers(-1, 30, 60)})
    per_example = [(set(big.ids["a"][i]) | {big.ids["b"][i]}) - {-1} for i in range(60)]
    want, run = [], set()
    for i, r in enumerate(per_example):
      if len(run | r) > cache:
        want.append(i)
        run = set()
      run |= r
    got = eval_split.pieces(big, {"t": (("a", "b"), cache)}, OffloadConfig().cache_advice)
    assert [int(np.flatnonzero(m)[0]) for m in got[1:]] == want, cache


def test_an_eval_copies_no_stack_and_leaves_the_cache_as_it_was(tmp_path):
  """An eval view copied the whole embedding state per eval batch (jit copies every output,
  unchanged ones too): every stack and all optimizer state. The rows an eval pass reads
  that are not cached now go into spare cache slots in place and are put back after: the
  pass holds those rows (and the values they replaced), less than one copy of the cache."""
  import jax   # pylint: disable=import-outside-toplevel
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  off = Run(experiment("adagrad"), mesh_of(), offload_config(tmp_path, 5000)).train(2)
  try:
    before = jax.tree.map(np.asarray, off.state["emb"])
    (stack,) = {p.stack for p in off.tier.ops.places.values()}
    existing, extra = {id(a) for a in jax.live_arrays()}, []

    def step(st, b):   # device arrays the pass made, beyond the state's own
      own = {id(a) for a in jax.tree.leaves(st)} | existing
      extra.append(sum(a.nbytes for a in jax.live_arrays() if id(a) not in own))
      return np.zeros(b.size, np.float32)
    off.state, _ = off.tier.eval_logits(off.state, off.it.batch_at(10**6), step)
    # 128 examples: < 512 rows installed, values + accumulators, and those they replaced
    assert 0 < extra[0] <= 2 * 2 * 512 * 8 * 4 + 2 * 512 * 4 < before["tables"][stack].nbytes
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, off.state["emb"]),
                 before)
  finally:
    off.close()


@pytest.mark.slow   # ~25 s: a short offloaded run to fail an eval pass of
def test_an_eval_pass_that_fails_hands_back_the_live_state(tmp_path):
  """The first pass's install donates the state's stacks: an error in a later pass (a bad
  id of an offloaded feature there, a failing eval step) carries the state to go on with,
  holding the values from before the eval, so the trainer can still save it."""
  import jax   # pylint: disable=import-outside-toplevel
  from jaxrec.data.batch import concatenate   # pylint: disable=import-outside-toplevel
  from jaxrec.errors import DataError   # pylint: disable=import-outside-toplevel
  from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config
  off = Run(experiment("adagrad"), mesh_of(), offload_config(tmp_path, 600)).train(2)
  try:
    before = jax.tree.map(np.asarray, off.state["emb"])
    batch = concatenate([off.it.batch_at(10**6 + 128 * k) for k in range(4)])
    calls = []

    def step(st, b):
      calls.append(1)
      if len(calls) == 2:
        raise DataError("the second pass failed")
      return np.zeros(b.size, np.float32)
    with pytest.raises(DataError, match="second pass") as info:
      off.tier.eval_logits(off.state, batch, step)
    assert len(calls) == 2
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, info.value.state["emb"]), before)
  finally:
    off.close()


class _CountedSorts(np.ndarray):
  """A cache's `resident` that counts the sorts made of it (and of `resident >= 0`)."""
  sorts = 0

  def argsort(self, *args, **kwargs):
    _CountedSorts.sorts += 1
    return np.asarray(self).argsort(*args, **kwargs)


def test_eval_slots_sort_the_cache_once_per_cache_state():
  """`eval_split.slots` sorted the whole cache twice per eval batch: 0.75 s a batch for a
  6M-row cache, minutes for an eval set of thousands of batches. It sorts once until an
  install changes the cache (`eval_index` dropped), with the slots it gave before: cached
  rows their own, the others spare slots, free ones first."""
  from types import SimpleNamespace   # pylint: disable=import-outside-toplevel
  from jaxrec.offload import eval_split   # pylint: disable=import-outside-toplevel

  def expected(resident, uniq):
    where = {r: s for s, r in enumerate(resident) if r >= 0}
    cached = np.array([u in where for u in uniq], bool)
    own = {where[u] for u in uniq if u in where}
    spare = [s for s in np.argsort(resident >= 0, kind="stable") if s not in own]
    slot = np.array([where.get(u, -1) for u in uniq], np.int64)
    slot[~cached] = spare[:np.count_nonzero(~cached)]
    return slot, ~cached

  rng = np.random.default_rng(0)
  resident = rng.permutation(100)[:40].astype(np.int64)
  resident[rng.choice(40, 10, replace=False)] = -1      # 10 free slots
  t = SimpleNamespace(resident=resident.view(_CountedSorts), eval_index=None)
  _CountedSorts.sorts = 0
  for n in (5, 12, 30, 0):
    uniq = np.sort(rng.choice(100, n, replace=False))
    for got, want in zip(eval_split.slots(t, uniq), expected(resident, uniq)):
      np.testing.assert_array_equal(got, want)
  assert _CountedSorts.sorts == 2
  t.resident[:5] = np.setdiff1d(np.arange(100), resident)[:5]   # an install, which drops
  t.eval_index = None                                            # the index
  uniq = np.sort(rng.choice(100, 30, replace=False))
  for got, want in zip(eval_split.slots(t, uniq), expected(np.asarray(t.resident), uniq)):
    np.testing.assert_array_equal(got, want)
  assert _CountedSorts.sorts == 4
