"""Sampling-bias (logQ) correction of the two-tower in-batch softmax (`logq_correction`):
the loss, its config checks, the estimator in the train state on 1 and 8 devices, and its
checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager
from jaxrec.data.batch import Batch
from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.models import build_model, compute_loss, in_batch_softmax_loss, item_frequency
from jaxrec.sharding.mesh import batch_sharding
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer
from tests.dp_collection import dp_collection

B, D, ITEMS = 32, 8, 12
TOWERS = dict(user_features=(0,), item_features=(1,), user_mlp=(8,), item_mlp=(8,),
              loss="in_batch_softmax")
TABLES = (TableSpec("users", 40, D), TableSpec("items", ITEMS, D))
FEATURES = (FeatureSpec("user", "users"), FeatureSpec("item", "items"))


def test_corrected_loss_is_the_formula():
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(2, 5, 3)).astype(np.float32)
  labels = np.array([1, 0, 1, 1, 0], np.float32)
  p = np.array([0.5, 0.1, 0.01, 0.2, 0.05], np.float32)
  t = 0.5
  s = u @ v.T / t - np.log(p)[None, :]       # logit of item j for user i: s_ij - log p_j
  want = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in (0, 2, 3)])
  got = in_batch_softmax_loss(u, v, labels, t, log_q=jnp.log(p))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(got) - float(in_batch_softmax_loss(u, v, labels, t))) > 0.1


@pytest.mark.parametrize("bindings,message", [
    (dict(loss="bce"), "TwoTower.logq_correction applies to loss='in_batch_softmax' only"),
    (dict(logq_buckets=0), "TwoTower.logq_buckets must be a positive integer"),
    (dict(logq_buckets=2.5), "TwoTower.logq_buckets must be a positive integer"),
    (dict(logq_alpha=0.0), r"TwoTower.logq_alpha must be in \(0, 1\], got 0.0"),
    (dict(logq_alpha=1.5), r"TwoTower.logq_alpha must be in \(0, 1\], got 1.5"),
    (dict(logq_correction="yes"), "TwoTower.logq_correction must be True or False"),
])
def test_bad_bindings_stop_build_model(bindings, message):
  kw = {**TOWERS, "logq_correction": True, **bindings}
  with pytest.raises(ConfigError, match=message):
    build_model("two_tower", **kw)


@pytest.mark.parametrize("bindings, message, alpha", [
    (dict(logq_alpha=5.0), r"TwoTower.logq_alpha must be in \(0, 1\], got 5.0", 0.5),
    (dict(logq_buckets=-3), "TwoTower.logq_buckets must be a positive integer", 0.25)])
def test_logq_options_without_the_correction_are_checked_and_named(bindings, message, alpha,
                                                                   caplog):
  """Uncommented from two_tower_synthetic.gin without `logq_correction = True` they were
  taken, unchecked and unused, without a word: bad values are errors, good ones a warning
  (a shared config may set them)."""
  with pytest.raises(ConfigError, match=message):
    build_model("two_tower", **TOWERS, **bindings)
  with caplog.at_level("WARNING"):
    build_model("two_tower", **TOWERS, logq_alpha=alpha)
    build_model("two_tower", **TOWERS, logq_alpha=0.01)   # the default: nothing to say
  assert caplog.text.count(f"TwoTower.logq_alpha = {alpha} set, but TwoTower.logq_correction "
                           "is False: they do nothing") == 1


def test_compute_loss_without_log_q_is_refused():
  model = build_model("two_tower", logq_correction=True, **TOWERS)
  with pytest.raises(ConfigError, match="compute_loss needs log_q"):
    compute_loss(model, {}, jnp.zeros((2, 1)), jnp.zeros((2, 2, D)), jnp.ones(2))


def _setup(devices, logq=True):
  model = build_model("two_tower", logq_correction=logq, logq_buckets=64, logq_alpha=0.1,
                      temperature=0.2, **TOWERS)
  config = ExperimentConfig(embedding=(TABLES, FEATURES), model=model, batch_size=B,
                            num_dense=1, dense_optimizer=dense_optimizer("adam", 0.01),
                            sparse_optimizer=optimizers.sparse_optimizer("sgd", lr=0.5))
  coll = dp_collection(config, devices)
  return config, coll


def _batches(n):
  rng = np.random.default_rng(3)
  q = 1.0 / np.arange(1, ITEMS + 1) ** 1.5        # hot items recur within a batch
  return [Batch(dense=rng.normal(size=(B, 1)).astype(np.float32),
                labels=(rng.random(B) < 0.7).astype(np.float32),
                ids={"user": rng.integers(0, 40, (B, 1)).astype(np.int32),
                     "item": rng.choice(ITEMS, (B, 1), p=q / q.sum()).astype(np.int32)})
          for _ in range(n)]


def _train(config, coll, state, batches, step=None):
  step = step or step_lib.make_train_step(config, coll, state_lib.shardings(state, coll))
  bs, losses = batch_sharding(coll.mesh), []
  for b in batches:
    placed = jax.tree.map(lambda x: jax.make_array_from_process_local_data(bs, x),
                          coll.pack_batch(b))
    state, metrics = step(state, placed)
    losses.append(float(metrics["loss"]))
  return state, losses, step


def _assert_same_estimate(a, b):
  for k in ("last_step", "last_row", "gap"):
    np.testing.assert_array_equal(a["item_freq"][k], b["item_freq"][k])


def test_one_and_eight_devices_match_and_a_checkpoint_keeps_the_estimator(tmp_path):
  """3 steps on 1 device; 2 on 8, saved, restored on 1 device and trained 1 step more."""
  batches = _batches(3)
  config, coll1 = _setup(1)
  s1, l1, step1 = _train(config, coll1, state_lib.create(config, coll1, 0), batches)
  _, coll8 = _setup(8)
  s8, l8, _ = _train(config, coll8, state_lib.create(config, coll8, 0), batches[:2])
  np.testing.assert_allclose(l8, l1[:2], rtol=2e-5)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(2, s8, coll8, force=True)
    restored = mgr.restore(state_lib.abstract(config, coll1, 0), coll1).state
    plain, _ = _setup(1, logq=False)          # the correction switched off: refused
    with pytest.raises(ConfigError, match="holds 'item_freq' but the restore target has "
                       "none \\(its run bound TwoTower.logq_correction = True, with loss "
                       "= 'in_batch_softmax': bind both to resume it, or train in a new "
                       "--workdir\\)"):
      mgr.restore(state_lib.abstract(plain, coll1, 0), coll1)
  with CheckpointManager(tmp_path / "plain") as mgr:   # saved without: a fresh estimate
    mgr.save(0, state_lib.create(plain, coll1, 0), coll1, force=True)
    fresh = mgr.restore(state_lib.abstract(config, coll1, 0), coll1,
                        init=lambda: state_lib.create_dense(config, coll1, 0)).state
  _assert_same_estimate(fresh, {"item_freq": item_frequency.init(64)})
  _assert_same_estimate(restored, s8)       # the global batch's estimate, bit for bit
  resumed, l_resumed, _ = _train(config, coll1, restored, batches[2:], step1)
  np.testing.assert_allclose(l_resumed, l1[2:], rtol=2e-5)
  _assert_same_estimate(resumed, s1)


def test_train_step_loss_is_corrected_and_eval_scores_are_not():
  config, coll = _setup(1)
  b = _batches(1)[0]
  state = state_lib.create(config, coll, 0)

  @jax.jit
  def reference(state):
    """(loss with p from the step's items, without correction, scores <u, v> / T)."""
    bucket = item_frequency.buckets([jnp.asarray(b.ids["item"])], 64)
    log_q = item_frequency.log_prob(
        item_frequency.update(item_frequency.init(64), bucket, jnp.int32(0), 0.1), bucket)
    ctx = coll.lookup(state["emb"], b.ids, b.weights)
    emb = coll.pool(ctx.rows, ctx)
    model, params = config.model, state["params"]
    return (compute_loss(model, params, b.dense, emb, b.labels, log_q=log_q)[0],
            compute_loss(model, params, b.dense, emb, b.labels, log_q=jnp.zeros(B))[0],
            model.apply({"params": params}, b.dense, emb))

  want, uncorrected, scores = reference(state)
  eval_step = step_lib.make_eval_step(config, coll, state_lib.shardings(state, coll))
  np.testing.assert_allclose(eval_step(state, coll.pack_batch(b))["logits"], scores,
                             atol=1e-6)
  _, (loss,), _ = _train(config, coll, state, [b])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert abs(float(uncorrected) - loss) > 1e-2
