"""Streaming item frequency estimation (`item_frequency`): the logQ correction's `p`."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models import item_frequency as freq

update = jax.jit(freq.update, static_argnums=3)
buckets = jax.jit(freq.buckets, static_argnums=1)


def _sequential(bucket_steps, num, alpha):
  """numpy Algorithm 2 of Yi et al., one example at a time (time = example index; before
  its first sight a bucket was last seen at time -1 and its average starts at that gap)."""
  last, gap = np.full(num, -1.0), np.zeros(num)
  for t, h in enumerate(np.concatenate(bucket_steps)):
    g = t - last[h]
    gap[h] = g if gap[h] == 0 else (1 - alpha) * gap[h] + alpha * g
    last[h] = t
  return gap


def test_update_is_the_example_by_example_algorithm():
  rng = np.random.default_rng(0)
  num, n, alpha = 7, 12, 0.3
  steps = [rng.integers(0, num, n).astype(np.int32) for _ in range(5)]
  steps[1][:] = 3                                   # one bucket filling a whole step
  state = freq.init(num)
  for t, b in enumerate(steps):
    state = update(state, jnp.asarray(b), jnp.int32(t), alpha)
  np.testing.assert_allclose(state["gap"], _sequential(steps, num, alpha), rtol=1e-5)
  last = {int(h): (t, r) for t, b in enumerate(steps) for r, h in enumerate(b)}
  for h, (t, r) in last.items():
    assert (int(state["last_step"][h]), int(state["last_row"][h])) == (t, r)


def test_converges_to_the_frequencies_of_a_zipf_stream():
  rng = np.random.default_rng(1)
  items, n, num = 30, 256, 4096
  q = 1.0 / np.arange(1, items + 1) ** 1.2
  q /= q.sum()
  ids = jnp.arange(items, dtype=jnp.int32)[:, None]
  bucket_of = np.asarray(buckets([ids], num))
  want = np.array([q[bucket_of == h].sum() for h in bucket_of])   # colliding items add up
  stream = jnp.asarray(bucket_of[rng.choice(items, size=(800, n), p=q)])

  @jax.jit
  def run(stream):
    def step(state, xs):
      t, b = xs
      return freq.update(state, b, t, 0.01), None
    return jax.lax.scan(step, freq.init(num), (jnp.arange(800, dtype=jnp.int32), stream))[0]

  state = run(stream)
  p = np.exp(np.asarray(freq.log_prob(state, jnp.asarray(bucket_of))))
  # measured: within 10% of the truth (the rarest item: ~1000 sightings), mean |log| 0.047
  np.testing.assert_allclose(p, want, rtol=0.2)
  assert abs(np.log(p / want)).mean() < 0.08, np.log(p / want)


def test_equal_keys_share_a_bucket_and_any_key_value_counts():
  ids = jnp.asarray([[1, 5], [1, 5], [5, 1], [1, 6]], jnp.int32)
  w = jnp.asarray([[0.5, 2.0], [0.5, 2.0], [0.5, 2.0], [0.5, 2.0]], jnp.float32)
  b = np.asarray(buckets([ids, w], 1 << 30))
  assert b[0] == b[1] and len({b[0], b[2], b[3]}) == 3
  b2 = np.asarray(buckets([ids, w.at[1, 1].set(2.5)], 1 << 30))
  assert b2[0] != b2[1]
  assert ((0 <= b) & (b < 1 << 30)).all()


def test_an_estimate_started_at_a_resume_counts_from_that_step():
  """Switched on at a resume (step 200), a first occurrence's gap counted the examples
  since step 0: the hot items' `log p` ten steps later was 4-7 nats low. Started there, it
  is the estimate of a run that started at that step; one that has seen items is kept."""
  rng = np.random.default_rng(3)
  num, n, alpha, start = 16, 8, 0.1, 200
  steps = [rng.integers(0, num, n).astype(np.int32) for _ in range(4)]
  fresh, resumed = freq.init(num), freq.started_at(freq.init(num), start)
  for t, b in enumerate(steps):
    fresh = update(fresh, jnp.asarray(b), jnp.int32(t), alpha)
    resumed = update(resumed, jnp.asarray(b), jnp.int32(start + t), alpha)
  np.testing.assert_array_equal(resumed["gap"], fresh["gap"])
  np.testing.assert_array_equal(resumed["last_row"], fresh["last_row"])
  assert freq.started_at(fresh, start) is fresh   # seen items: its unseen ones count from 0
  assert freq.started_at(freq.init(num), 0)["last_step"].sum() == 0
