"""Learning-rate schedules (`jaxrec.schedules`): building and checking them, the sparse
optimizers that take them, and a scheduled run through scripts/train.py, resumed."""

import functools
import logging
import os
import pickle

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec import launch, schedules
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.local_ops import fused_update_ok
from jaxrec.errors import ConfigError
from jaxrec.schedules import lr_schedule, logged_rate
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.embedding.test_collection import FEATURES, TABLES
from tests.scripts.test_train import export, read_metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WARMUP = dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=100)


def test_a_schedule_is_optaxs_and_a_value():
  s = lr_schedule("warmup_cosine_decay", **WARMUP)
  want = optax.warmup_cosine_decay_schedule(**WARMUP)
  for step in (0, 5, 10, 55, 100, 500):
    np.testing.assert_allclose(float(s(step)), float(want(step)), rtol=1e-6)
  # equal arguments: an equal, equally hashed schedule (a static jit argument: no recompile)
  again = lr_schedule("warmup_cosine_decay", **dict(reversed(WARMUP.items())))
  assert again == s and hash(again) == hash(s)
  pieces = lr_schedule("piecewise_constant", init_value=1.0,
                       boundaries_and_scales={200: 0.5, 100: 0.1})
  assert [round(float(pieces(t)), 6) for t in (99, 100, 199, 200)] == [1.0, 0.1, 0.1, 0.05]
  assert hash(pieces) == hash(lr_schedule("piecewise_constant", init_value=1.0,
                                          boundaries_and_scales={100: 0.1, 200: 0.5}))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="cosine"), r"^lr_schedule.name: unknown 'cosine' \(known: constant, linear,"),
    (dict(name="linear", init_value=1.0), r"^lr_schedule.end_value, "
     r"lr_schedule.transition_steps not bound: the 'linear' schedule needs them"),
    (dict(name="constant", value=0.1, steps=3), r"^lr_schedule.steps: the 'constant' schedule "
     r"takes no such argument \(it takes: value\)"),
    (dict(name="linear", init_value=-0.1, end_value=0, transition_steps=5),
     r"^lr_schedule.init_value must be a number >= 0, got -0.1"),
    (dict(name="linear", init_value=1, end_value=0, transition_steps=2.5),
     r"^lr_schedule.transition_steps must be a whole number of steps in \[1, 2147483647\], "
     r"got 2.5"),
    (dict(name="linear", init_value=1, end_value=0, transition_steps=3_000_000_000),
     r"^lr_schedule.transition_steps must be a whole number of steps in \[1, 2147483647\]"),
    (dict(name="exponential_decay", init_value=1, transition_steps=5, decay_rate=0.5,
          staircase="no"), r"^lr_schedule.staircase must be True or False, got 'no'"),
    (dict(name="piecewise_constant", init_value=1, boundaries_and_scales={10: -1}),
     r"^lr_schedule.boundaries_and_scales\[10\] must be a number >= 0, got -1"),
    (dict(name="piecewise_constant", init_value=1, boundaries_and_scales=[10, 0.1]),
     r"^lr_schedule.boundaries_and_scales must be a dict of step"),
    (dict(WARMUP, name="warmup_cosine_decay", warmup_steps=200),   # (optax's error quoted
     r"^lr_schedule.warmup_steps = 200 is not below lr_schedule.decay_steps = 100"),  # -100)
    # every argument valid, the rate is not: 1 * 3 ** (t / 1) overflows float32 (inf)
    (dict(name="exponential_decay", init_value=1.0, transition_steps=1, decay_rate=3.0),
     r"^lr_schedule.name: lr_schedule\('exponential_decay', .*\) gives the rate inf at step "
     r"1000000000: a learning rate must be finite"),
    # at a step an argument names: that argument
    (dict(name="piecewise_constant", init_value=1.0, boundaries_and_scales={5: 1e30, 6: 1e30}),
     r"^lr_schedule.boundaries_and_scales: .* gives the rate inf at step 6: a learning rate"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    lr_schedule(**kwargs)


def test_a_schedule_pickles():
  """optax's function is a closure (cached on the instance once evaluated): not pickled."""
  s = lr_schedule("polynomial", init_value=1.0, end_value=0.0, power=2, transition_steps=10)
  again = pickle.loads(pickle.dumps(s))
  assert again == s and float(again(5)) == float(s(5)) == 0.25


@pytest.mark.parametrize("bindings, line, message", [
    (["name = 'constant'", "value = -1.0"], 4,
     "sparse/lr_schedule.value must be a number >= 0, got -1.0"),
    # every argument valid, the rate is not: it named neither the scope nor the line
    (["name = 'piecewise_constant'", "init_value = 1.0",
      "boundaries_and_scales = {5: 1e30, 6: 1e30}"], 5,
     "sparse/lr_schedule.boundaries_and_scales: lr_schedule('piecewise_constant', "
     "boundaries_and_scales=((5, 1e+30), (6, 1e+30)), init_value=1.0) gives the rate inf at "
     "step 6: a learning rate must be finite and >= 0"),
])
def test_the_error_names_the_scope_and_the_line(tmp_path, bindings, line, message):
  config = tmp_path / "c.gin"
  config.write_text(f"include '{ROOT}/configs/dlrm_synthetic.gin'\n"
                    "SGD.lr = @sparse/lr_schedule()\n"
                    + "".join(f"sparse/lr_schedule.{b}\n" for b in bindings))
  launch.parse_gin([str(config)], [])
  try:
    with pytest.raises(ConfigError) as e:
      ExperimentConfig()
  finally:
    gin.clear_config()
  assert launch.user_message(e.value) == f"--gin_file: {config}:{line}: {message}"


def test_a_decay_to_zero_rounded_below_it_is_zero(monkeypatch):
  """`linear` from 0.1 to 0 over 1,000 steps, compiled with XLA's default optimisation,
  gives -4.7e-9 at step 1,000 (the tests' -O0 flag gives 0; the rounding is added here):
  `lr_schedule` refused it as a negative rate, and a step there would have ascended."""
  @functools.wraps(optax.linear_schedule)
  def rounded(**kwargs):
    exact = optax.linear_schedule(**kwargs)
    return lambda step: exact(step) - 4.7e-9
  monkeypatch.setitem(schedules.SCHEDULES, "linear", rounded)
  s = lr_schedule("linear", init_value=0.1, end_value=0.0, transition_steps=1000)
  assert float(s(1000)) == 0.0 and float(jax.jit(s)(jnp.int32(5000))) == 0.0
  np.testing.assert_allclose(float(s(500)), 0.05, rtol=1e-6)


def test_ftrl_and_bare_callables_are_refused():
  with pytest.raises(ConfigError, match=r"^FTRL.lr must be a number, got lr_schedule\('constant'"
                     r", value=0.1\): FTRL's accumulated"):
    optimizers.FTRL(lr_schedule("constant", value=0.1))
  with pytest.raises(ConfigError, match=r"^SGD.lr must be a number or @lr_schedule\(\), got "):
    optimizers.SGD(optax.constant_schedule(0.1))


def test_pallas_fuses_the_update_of_a_scheduled_stack(caplog):
  """It updated on XLA with a warning (the kernel baked the rate in); the step's rate now
  reaches the kernel per row (values: tests/embedding/test_collection_kernels.py)."""
  opt = optimizers.RowWiseAdagrad(lr_schedule("constant", value=0.1))
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with caplog.at_level(logging.WARNING):
    coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                                      opt, kernel="pallas", interpret=True)
  assert all(fused_update_ok(l, opt) for l in coll.layouts)
  assert "update on XLA" not in caplog.text


def test_each_scheduled_sparse_optimizer_logs_its_rate():
  """Per-table optimizers: the default's rate is `sparse_lr`, group g's `sparse_lr_o<g>`
  (its stacks' suffix); constant rates are in config.gin, not logged."""
  fast = lr_schedule("constant", value=0.5)
  slow = lr_schedule("linear", init_value=0.2, end_value=0.0, transition_steps=10)
  tx = optimizers.per_table(optimizers.SGD(fast), {"a": optimizers.Adagrad(0.1),
                                                   "b": optimizers.Adam(slow)})
  assert optimizers.logged_rates(tx, 5) == {"sparse_lr": pytest.approx(0.5),
                                           "sparse_lr_o2": pytest.approx(0.12)}
  assert optimizers.logged_rates(optimizers.SGD(slow), 5) == {"sparse_lr": pytest.approx(0.12)}
  # the default trains no table when every table is overridden: its rate was logged anyway
  assert optimizers.logged_rates(tx, 5, ["a", "b"]) == {"sparse_lr_o2": pytest.approx(0.12)}
  assert "sparse_lr" in optimizers.logged_rates(tx, 5, ["a", "b", "c"])


def test_a_family_of_several_scheduled_rates_logs_each_tables():
  """Tables that differ only in `lr` share their family's stacks (`_o<g>`), so one key per
  family would be ambiguous: a family of several rates logs each scheduled one per table
  (`sparse_lr/<table>`), but the default's own (`sparse_lr`); a family of one rate keeps
  `sparse_lr_o<g>`."""
  fast = lr_schedule("constant", value=0.5)
  slow = lr_schedule("linear", init_value=0.2, end_value=0.0, transition_steps=10)
  tx = optimizers.per_table(optimizers.SGD(fast), {
      "a": optimizers.SGD(slow), "b": optimizers.SGD(0.3), "c": optimizers.SGD(fast),
      "d": optimizers.Adam(slow), "e": optimizers.Adam(fast), "f": optimizers.Adam(0.01),
      "g": optimizers.Adagrad(slow), "h": optimizers.Adagrad(slow)})
  assert [tx.group(t) for t in "abcdefgh"] == [0, 0, 0, 1, 1, 1, 2, 2]
  assert optimizers.logged_rates(tx, 5) == {
      "sparse_lr": pytest.approx(0.5), "sparse_lr/a": pytest.approx(0.12),
      "sparse_lr/d": pytest.approx(0.12), "sparse_lr/e": pytest.approx(0.5),
      "sparse_lr_o2": pytest.approx(0.12)}


def test_tables_sharing_a_scheduled_rate_log_it_once():
  """A pattern overriding 3,000 tables with one schedule logged 3,000 `sparse_lr/<table>`
  keys of one value (119 KB a metrics line)."""
  fast = lr_schedule("constant", value=0.5)
  slow = lr_schedule("linear", init_value=0.2, end_value=0.0, transition_steps=10)
  names = [f"s{i:03d}" for i in range(300)] + ["u"]
  tx = optimizers.per_table(optimizers.SGD(fast), {"s*": optimizers.SGD(slow)}, tables=names)
  assert optimizers.logged_rates(tx, 5, names) == {
      "sparse_lr": pytest.approx(0.5), "sparse_lr/s000(+299)": pytest.approx(0.12)}


def test_logged_rate_is_the_last_steps():
  s = lr_schedule("linear", init_value=1.0, end_value=0.0, transition_steps=10)
  assert logged_rate(s, 10) == {"sparse_lr": pytest.approx(0.1)}   # step 9's update
  assert logged_rate(0.1, 10) == {} and logged_rate(s, 0) == {}
  assert logged_rate(s, 3, "dense_lr") == {"dense_lr": pytest.approx(0.8)}


def test_the_dense_optimizer_keeps_its_rate_and_optax_behaviour():
  """`dense_optimizer` hands optax's transformation through, with the rate beside it."""
  s = lr_schedule("linear", init_value=1.0, end_value=0.0, transition_steps=10)
  tx = dense_optimizer("adamw", s, weight_decay=0.1)
  assert tx.learning_rate == s and dense_optimizer("sgd", 0.5).learning_rate == 0.5
  params = {"w": jnp.ones(3)}
  mine, theirs = tx.update(params, tx.init(params), params), optax.adamw(s, weight_decay=0.1)
  want = theirs.update(params, theirs.init(params), params)[0]["w"]
  np.testing.assert_allclose(mine[0]["w"], want)
  init, update = tx                  # unpacks as optax's NamedTuple does
  np.testing.assert_allclose(update(params, init(params), params)[0]["w"], want)


SCHEDULED = ["--gin_file=configs/dlrm_synthetic.gin", "--log_every=5", "--eval_every=0",
             "--gin_bindings=SGD.lr = @sparse/lr_schedule()",
             "--gin_bindings=sparse/lr_schedule.name = 'linear'",
             "--gin_bindings=sparse/lr_schedule.init_value = 2.0",
             "--gin_bindings=sparse/lr_schedule.end_value = 0.0",
             "--gin_bindings=sparse/lr_schedule.transition_steps = 20",
             "--gin_bindings=dense_optimizer.learning_rate = @dense/lr_schedule()",
             "--gin_bindings=dense/lr_schedule.name = 'warmup_constant'",
             "--gin_bindings=dense/lr_schedule.init_value = 0.0",
             "--gin_bindings=dense/lr_schedule.peak_value = 0.1",
             "--gin_bindings=dense/lr_schedule.warmup_steps = 10",
             "--gin_bindings=ExperimentConfig.batch_size = 64",
             "--gin_bindings=ExperimentConfig.eval_batch_size = 512",
             "--gin_bindings=ExperimentConfig.num_eval_examples = 1024"]


def _scheduled_lines(workdir) -> list[tuple]:
  """`(step, loss, sparse_lr, dense_lr)` of a run's loss lines."""
  return [(l["step"], l["loss"], l["sparse_lr"], l["dense_lr"])
          for l in read_metrics(workdir) if "loss" in l]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
  """A workdir of 20 steps of `SCHEDULED` at once, on one device."""
  workdir = str(tmp_path_factory.mktemp("schedules") / "whole")
  train(workdir, *SCHEDULED, "--num_steps=20")
  return workdir


def test_the_metrics_lines_carry_both_scheduled_rates(whole_run):
  """Each loss line logs the rates its window's last step applied (step - 1's)."""
  assert [(s, lr, dense) for s, _, lr, dense in _scheduled_lines(whole_run)] == [
      (s, pytest.approx(2.0 * (1 - (s - 1) / 20)), pytest.approx(0.1 * min((s - 1) / 10, 1)))
      for s in (5, 10, 15, 20)]


@pytest.mark.slow   # two more script runs (~20 s)
def test_a_resumed_run_continues_its_schedules(whole_run, tmp_path):
  """20 steps at once, and 10 + 10 resumed on 2 devices: the same losses and logged rates
  (a resume restarting a schedule, or reading the rate of another step, differs)."""
  split = str(tmp_path / "split")
  train(split, *SCHEDULED, "--num_steps=10", "--checkpoint_every=10")
  train(split, *SCHEDULED, "--num_steps=20", devices=2)
  np.testing.assert_allclose([x[1:] for x in _scheduled_lines(split)],
                             [x[1:] for x in _scheduled_lines(whole_run)], rtol=0, atol=1e-5)


def test_the_logged_dense_rate_is_the_one_optax_applied_after_an_import(tmp_path):
  """A tables-only checkpoint (a TorchRec import at step 10) starts the dense optimizer's
  state afresh: optax's count, which its schedule reads, starts at 0 while the step (which
  the sparse schedule reads) is 10. `dense_lr` is the rate of optax's count, not of the step
  (it logged the warmup's peak, lr(14), for updates made at lr(0..4))."""
  from jaxrec.checkpoint import convert   # pylint: disable=import-outside-toplevel
  rows = (300, 50)
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.t{i}.weight": np.random.default_rng(i).standard_normal(
      (r, 16)).astype(np.float32) for i, r in enumerate(rows)})
  work = tmp_path / "w"
  convert.import_torchrec(npz, work / "checkpoints", 10)
  bindings = ["uniform_tables.num_tables=2", f"uniform_tables.rows={list(rows)}",
              "uniform_tables.max_len=[1, 2]", "DLRM.bottom_mlp=(8,16)", "DLRM.top_mlp=(8,1)"]
  train(str(work), *SCHEDULED, "--num_steps=15", *[f"--gin_bindings={b}" for b in bindings])
  line, = [l for l in read_metrics(work) if "loss" in l]
  count = {k: v for k, v in export(str(work)).items() if k.startswith("dense_opt/")
           and k.endswith("count")}
  assert count and {int(v) for v in count.values()} == {5}, count   # 5 dense updates
  assert (line["step"], line["sparse_lr"]) == (15, pytest.approx(2.0 * (1 - 14 / 20)))
  assert line["dense_lr"] == pytest.approx(0.1 * 4 / 10)   # count 4's update, the last


def test_a_warmup_longer_than_its_decay_is_named():
  """It quoted optax's derived decay_steps=-10, a number nobody wrote."""
  for warmup in (20, 10):   # optax needs some decay steps after the warmup
    with pytest.raises(ConfigError, match=rf"^lr_schedule.warmup_steps = {warmup} is not "
                       r"below lr_schedule.decay_steps = 10: in optax's warmup_cosine_decay, "
                       r"decay_steps counts the warmup's steps too"):
      lr_schedule(name="warmup_cosine_decay", init_value=0.0, peak_value=1.0,
                  warmup_steps=warmup, decay_steps=10)
  assert lr_schedule(name="warmup_cosine_decay", init_value=0.0, peak_value=1.0,
                     warmup_steps=9, decay_steps=10)(9) == pytest.approx(1.0)
