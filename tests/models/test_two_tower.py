"""TwoTower's in-batch softmax with accidental hits removed (`remove_accidental_hits`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import ConfigError
from jaxrec.models import build_model, compute_loss, in_batch_softmax_loss, init_params

NUM_DENSE, F, D = 3, 4, 8
TOWERS = dict(user_features=(0, 1), item_features=(2, 3), user_mlp=(16, 8), item_mlp=(16, 8))


def _reference(u, v, labels, t, keys):
  """numpy: row i's softmax over the candidates j whose key differs from i's, plus i."""
  s = (u @ v.T) / t
  losses = []
  for i in np.flatnonzero(labels > 0.5):
    keep = [j for j in range(len(u)) if j == i or not np.array_equal(keys[j], keys[i])]
    losses.append(np.log(np.exp(s[i, keep]).sum()) - s[i, i])
  return np.mean(losses)


def test_duplicate_items_are_not_negatives_for_each_other():
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(2, 6, 4)).astype(np.float32)
  keys = rng.normal(size=(6, 2, 3)).astype(np.float32)
  keys[4] = keys[1]                     # rows 1 and 4 hold the same item
  v[4] = v[1]
  labels = np.array([1, 1, 0, 1, 1, 0], np.float32)
  got = in_batch_softmax_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels), 0.5,
                              jnp.asarray(keys))
  np.testing.assert_allclose(got, _reference(u, v, labels, 0.5, keys), rtol=1e-5)
  plain = in_batch_softmax_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels), 0.5)
  assert float(got) < float(plain)      # the duplicate no longer pushes its own item down
  # No duplicates: the same loss as without keys.
  distinct = rng.normal(size=(6, 2, 3)).astype(np.float32)
  np.testing.assert_allclose(in_batch_softmax_loss(u, v, labels, 0.5, distinct), plain,
                             rtol=1e-6)


def _batch(seed):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(16, NUM_DENSE)).astype(np.float32)
  emb = rng.normal(size=(16, F, D)).astype(np.float32)
  emb[9, 2:] = emb[3, 2:]               # same item features in rows 3 and 9 (users differ)
  emb[12, 2:] = emb[3, 2:]
  labels = (np.arange(16) % 4 != 1).astype(np.float32)
  return jnp.asarray(dense), jnp.asarray(emb), jnp.asarray(labels)


def test_compute_loss_keys_on_the_item_features_and_is_the_same_sharded():
  model = build_model("two_tower", loss="in_batch_softmax", remove_accidental_hits=True,
                      temperature=0.3, **TOWERS)
  dense, emb, labels = _batch(1)
  params = init_params(model, jax.random.key(1), NUM_DENSE, F, D)
  loss, _ = compute_loss(model, params, dense, emb, labels)
  user, item = model.apply({"params": params}, dense, emb, method="towers")
  want = _reference(np.asarray(user), np.asarray(item), np.asarray(labels), 0.3,
                    np.asarray(emb)[:, 2:])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  fn = jax.jit(lambda p, d, e, y: compute_loss(model, p, d, e, y))
  grads = jax.jit(jax.grad(lambda p, d, e, y: compute_loss(model, p, d, e, y)[0],
                           argnums=(0, 2)))
  sharded = [jax.device_put(x, spec) for x in (dense, emb, labels)]
  np.testing.assert_allclose(fn(params, *sharded)[0], loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads(params, *sharded)),
                  jax.tree.leaves(grads(params, dense, emb, labels))):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_remove_accidental_hits_must_be_a_bool():
  with pytest.raises(ConfigError, match="TwoTower.remove_accidental_hits must be True or "
                     "False, got 'yes'"):
    build_model("two_tower", loss="in_batch_softmax", remove_accidental_hits="yes", **TOWERS)


def test_remove_accidental_hits_with_a_pointwise_loss_is_an_error():
  """It was silently ignored with loss='bce' (no in-batch negatives to remove)."""
  with pytest.raises(ConfigError, match="TwoTower.remove_accidental_hits applies to "
                     "loss='in_batch_softmax' only, not loss='bce'"):
    build_model("two_tower", loss="bce", remove_accidental_hits=True, **TOWERS)


@pytest.mark.parametrize("attr,value", [("normalize", "no"), ("dense_to_user", "False"),
                                        ("dense_to_user", None), ("normalize", 0)])
def test_boolean_options_must_be_bools(attr, value):
  # 'no' and 'False' are truthy strings: they used to switch the option on silently.
  with pytest.raises(ConfigError, match=f"TwoTower.{attr} must be True or False, got "
                     f"{value!r}"):
    build_model("two_tower", **{attr: value}, **TOWERS)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0])
def test_temperature_must_be_positive_and_finite(temperature):
  # inf made every score 0: the loss stayed at log 2 and nothing learned, silently.
  with pytest.raises(ConfigError, match="TwoTower.temperature must be a positive finite "
                     "number"):
    build_model("two_tower", temperature=temperature, **TOWERS)


# Checked by build_model (when the config is read, before planning) since these checks moved
# from flax `setup` (the first apply, after the planner ran) into `TwoTower.check_config`.
@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="softmax"), r"TwoTower.loss must be one of \('bce', 'in_batch_softmax'\), got "
                           "'softmax'"),
    (dict(user_mlp=(8, 4)), r"the towers must end in the same width: TwoTower.user_mlp = "
                            r"\(8, 4\) and TwoTower.item_mlp = \(16, 8\)\n"),
    (dict(item_mlp=(0,)), "TwoTower.item_mlp"),
    (dict(user_features=(0, 0)), r"TwoTower.user_features = \(0, 0\) must be a sequence of "
                                 "distinct indices >= 0"),
    (dict(item_features="ab"), "TwoTower.item_features = 'ab' must be a sequence"),
    (dict(user_features=(0, 1), item_features=(1,)), r"overlap: .* share \[1\]"),
])
def test_bad_hyperparameters_stop_build_model(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    build_model("two_tower", **{**TOWERS, **kwargs})


def test_in_batch_softmax_with_adam_scores_the_same_on_one_and_eight_devices():
  """Without `normalize` the item tower's last bias adds `<u_i, b>` to every score of row
  `i`: the softmax cancels it. Its gradient was rounding noise (~1e-8, set by the device
  count) that Adam scaled up to lr-sized steps, so the eval scores `<u, v>` of 1 and 8
  devices drifted apart (two_tower_synthetic: eval AUC 0.5605 vs 0.5622 after 6 steps)."""
  import optax   # pylint: disable=import-outside-toplevel
  model = build_model("two_tower", loss="in_batch_softmax", normalize=False, temperature=1.0,
                      **TOWERS)
  dense, emb, labels = _batch(2)
  params = init_params(model, jax.random.key(2), NUM_DENSE, F, D)
  tx = optax.adam(0.01)
  grad = jax.grad(lambda p, d, e, y: compute_loss(model, p, d, e, y)[0])

  @jax.jit
  def step(p, s, d, e, y):
    g = grad(p, d, e, y)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, g["item_tower"]["layer_1"]["bias"]

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  scores = []
  for args in [(dense, emb, labels), [jax.device_put(x, spec) for x in (dense, emb, labels)]]:
    p, s = params, tx.init(params)
    for _ in range(4):
      p, s, bias_grad = step(p, s, *args)
      np.testing.assert_array_equal(bias_grad, 0)       # exactly: not noise
    scores.append(np.asarray(model.apply({"params": p}, dense, emb)))
  np.testing.assert_allclose(scores[1], scores[0], rtol=0, atol=1e-5)


def test_a_tower_width_mismatch_names_where_each_tower_was_bound():
  """The error started with `TwoTower.user_mlp`, so the run blamed that binding's line in
  the config for an `item_mlp` given by `--gin_bindings`."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/two_tower_synthetic.gin"], ["TwoTower.item_mlp=(128, 32)"])
  with pytest.raises(ConfigError) as e:
    launch.build(ExperimentConfig)
  assert launch.user_message(e.value).startswith(
      "the towers must end in the same width: TwoTower.user_mlp = (128, 64) "
      "(configs/two_tower_synthetic.gin:23) and TwoTower.item_mlp = (128, 32) (--gin_bindings)")


def test_overlapping_feature_lists_name_where_each_was_bound():
  """The overlap error started with `TwoTower.user_features`: the run blamed that line of
  the config for an `item_features` given by `--gin_bindings`."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/two_tower_synthetic.gin"], ["TwoTower.item_features=(3, 4, 5)"])
  with pytest.raises(ConfigError) as e:
    launch.build(ExperimentConfig)
  assert launch.user_message(e.value) == (
      "the towers' features overlap: TwoTower.user_features = (0, 1, 2, 3) "
      "(configs/two_tower_synthetic.gin:21) and TwoTower.item_features = (3, 4, 5) "
      "(--gin_bindings) share [3] (a feature feeds one tower)")


@pytest.mark.parametrize("loss", ["bce", "in_batch_softmax"])
def test_normalize_gives_a_zero_tower_output_a_zero_gradient(loss):
  """An item of empty bags has a zero tower output at the zero-bias init: normalising
  it through max(|x|^2, 1e-12) scaled its gradient by 1e6 (the last bias's gradient went
  from ~10 to ~6e5), and plain SGD then sent every item vector the same way for good."""
  model = build_model("two_tower", user_features=(0,), item_features=(1,), user_mlp=(8, 4),
                      item_mlp=(8, 4), normalize=True, temperature=0.1, loss=loss)
  params = init_params(model, jax.random.PRNGKey(0), 2, 2, 4)
  rng = np.random.default_rng(9)
  dense = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  emb = rng.normal(size=(8, 2, 4)).astype(np.float32)
  norms = []
  for empty in (False, True):
    e = emb.copy()
    if empty:
      e[0, 1] = 0.0   # row 0's item bag is empty: it pools to zeros
    grads = jax.grad(lambda p: compute_loss(model, p, dense, jnp.asarray(e), jnp.ones(8))[0])(
        params)
    norms.append(float(jnp.linalg.norm(grads["item_tower"]["layer_1"]["bias"])))
  assert np.isfinite(norms).all() and norms[1] < 3 * norms[0], norms
  e = emb.copy()
  e[3, 1, 2] = np.nan   # a NaN stays NaN: the loss says so (`--on_nan`)
  assert np.isnan(float(compute_loss(model, params, dense, jnp.asarray(e), jnp.ones(8))[0]))


def test_a_feature_in_neither_tower_is_warned_about(caplog):
  """A feature left out of both lists was looked up and never trained, without a word
  (with FTRL its rows went to 0)."""
  model = build_model("two_tower", loss="bce", **dict(TOWERS, item_features=(3,)))
  with caplog.at_level("WARNING"):
    init_params(model, jax.random.key(0), NUM_DENSE, F, D)
  assert ("TwoTower: features [2] (indices into the config's features) are in neither "
          "TwoTower.user_features nor TwoTower.item_features") in caplog.text, caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    init_params(build_model("two_tower", loss="bce", **TOWERS), jax.random.key(0), NUM_DENSE,
                F, D)
  assert "neither" not in caplog.text


@pytest.mark.parametrize("options", [dict(), dict(dense_to_user=True, normalize=True),
                                     dict(feature_dims=(8, 4, 6, 8))])
def test_each_side_alone_gives_the_towers_vectors(options):
  """Serving embedded a whole item catalog through `towers`, which needed dense inputs and
  user features (zeros worked): `item_vectors` takes the item side alone, `user_vectors`
  the user side, and they are `towers`' vectors bit for bit."""
  model = build_model("two_tower", **TOWERS, **options)
  dense, emb, _ = _batch(3)
  params = {"params": init_params(model, jax.random.key(4), NUM_DENSE, F, D)}
  user, item = model.apply(params, dense, emb, method="towers")
  items = model.apply(params, emb[:, [2, 3]], method="item_vectors")
  users = model.apply(params, dense, emb[:, [0, 1]], method="user_vectors")
  np.testing.assert_array_equal(items, item)
  np.testing.assert_array_equal(users, user)
  with pytest.raises(ConfigError, match=r"TwoTower: the item side's embeddings must be "
                     r"\[batch, 2, dim\] \(one per TwoTower.item_features entry, in its "
                     r"order\), got shape \(16, 4, 8\)"):
    model.apply(params, emb, method="item_vectors")
