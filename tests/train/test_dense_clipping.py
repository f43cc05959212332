"""`dense_optimizer.clip_norm`: the dense gradients scaled to a global norm before the
optimizer (optax's `clip_by_global_norm`, no state of its own), and the norms it logs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.errors import ConfigError
from jaxrec.train.config import dense_optimizer
from jaxrec.train.step import window_record
from tests.scripts.test_train import read_metrics, train

GRADS = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}   # global norm 5
PARAMS = jax.tree.map(jnp.zeros_like, GRADS)


@pytest.mark.parametrize("clip_norm, scale", [(1.0, 0.2), (5.0, 1.0), (10.0, 1.0)])
def test_sgd_steps_along_the_clipped_gradient(clip_norm, scale):
  tx = dense_optimizer("sgd", 0.5, clip_norm=clip_norm)
  updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  for got, g in zip(jax.tree.leaves(updates), jax.tree.leaves(GRADS)):
    np.testing.assert_allclose(got, -0.5 * scale * np.asarray(g), rtol=1e-6)


def test_adam_sees_the_clipped_gradient_and_keeps_the_same_state():
  clipped = dense_optimizer("adam", 0.1, clip_norm=1.0)
  plain = dense_optimizer("adam", 0.1)
  state = clipped.init(PARAMS)
  # the same state tree with and without clipping: a checkpoint restores either way
  assert jax.tree.structure(state) == jax.tree.structure(plain.init(PARAMS))
  got, got_state = clipped.update(GRADS, state, PARAMS)
  want, want_state = plain.update(jax.tree.map(lambda g: g / 5.0, GRADS), state, PARAMS)
  for x, y in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  assert optax.tree.norm(got_state[0].mu) == pytest.approx(0.1, rel=1e-5)   # (1-b1) * 1


@pytest.mark.parametrize("value", [0, -1.0, "1.0", True, float("inf")])
def test_a_bad_clip_norm_is_named(value):
  with pytest.raises(ConfigError, match="dense_optimizer.clip_norm must be a number > 0"):
    dense_optimizer("sgd", 0.1, clip_norm=value)


def test_window_record_averages_the_norms_and_counts_the_clipped_steps():
  tx = dense_optimizer("sgd", 0.1, clip_norm=2.0)
  outputs = [{"loss": 0.5, "dense_grad_norm": n} for n in (1.0, 3.0, 5.0, 2.0)]
  assert window_record(outputs, tx) == {"dense_grad_norm": 2.75, "dense_clipped": 0.5}
  assert window_record([{"loss": 0.5}], dense_optimizer("sgd", 0.1)) == {}
  assert window_record(outputs, optax.sgd(0.1)) == {}   # a plain optax transformation


CLIPPED = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=10", "--log_every=5",
           "--eval_every=0", "--gin_bindings=ExperimentConfig.batch_size=64",
           "--gin_bindings=ExperimentConfig.eval_batch_size=512",
           "--gin_bindings=ExperimentConfig.num_eval_examples=1024",
           "--gin_bindings=dense_optimizer.clip_norm=0.01"]


def _lines(workdir):
  return [(l["step"], l["loss"], l["dense_grad_norm"], l["dense_clipped"])
          for l in read_metrics(workdir) if "loss" in l]


@pytest.fixture(scope="module")
def clipped_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("clip") / "two")
  train(workdir, *CLIPPED, "--mesh=data=2", "--plan=dp", devices=2)
  return workdir


@pytest.mark.slow   # a 2-device train.py run (~13 s); window_record and the update above
def test_a_clipped_run_logs_the_norms(clipped_run):
  lines = _lines(clipped_run)
  assert [l[0] for l in lines] == [5, 10]
  assert all(norm > 0.01 and clipped == 1.0 for _, _, norm, clipped in lines), lines
  with open(f"{clipped_run}/config.gin") as f:
    assert "dense_optimizer.clip_norm = 0.01" in f.read()


@pytest.mark.slow   # one more script run (~6 s)
def test_two_devices_clip_as_one_does(clipped_run, tmp_path):
  """The norm is the whole batch's (the dense gradients are all-reduced first)."""
  one = str(tmp_path / "one")
  train(one, *CLIPPED, "--mesh=data=1", "--plan=dp")
  np.testing.assert_allclose([l[1:] for l in _lines(clipped_run)],
                             [l[1:] for l in _lines(one)], rtol=1e-5)
