"""Exact resume: a small deterministic trainer killed with SIGKILL at random moments
(mid-step, mid-save) and restarted ends bit-for-bit where an uninterrupted run ends."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import tests.conftest
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrec.checkpoint import CheckpointManager
    from jaxrec.sharding.mesh import batch_sharding
    from tests.checkpoint import ckpt_helpers as h

    workdir, num_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    coll = h.collection("grid", 8, rows=(3000, 2000, 700, 1500), dim=32)
    tx = optax.adam(1e-2)
    rep = NamedSharding(coll.mesh, P())
    params = jax.device_put({{"w": jnp.full((4 * 32, 1), 0.01)}}, rep)
    state = {{"step": jax.device_put(jnp.int32(0), rep), "params": params,
             "opt_state": jax.device_put(tx.init(params), rep),
             "emb": coll.init(jax.random.key(0)),
             "rng": jax.device_put(jax.random.key_data(jax.random.key(1)), rep)}}
    shardings = jax.tree.map(lambda x: x.sharding, state)

    def batch(position):   # examples depend only on their position in the stream
      rng = np.random.default_rng(position)
      ids = {{f"f{{i}}": rng.integers(0, t.rows, (64, 2)).astype(np.int32)
             for i, t in enumerate(coll.tables)}}
      return ids, rng.standard_normal(64).astype(np.float32)

    def step_fn(state, ids, labels):
      ctx = coll.lookup(state["emb"], ids)
      def loss_fn(params, rows):
        x = coll.pool(rows, ctx).reshape(labels.shape[0], -1)
        return jnp.mean((x @ params["w"])[:, 0] - labels) ** 2
      loss, (gp, gr) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state["params"], ctx.rows)
      updates, opt_state = tx.update(gp, state["opt_state"], state["params"])
      emb = coll.apply_gradients(state["emb"], ctx, gr, state["step"])
      params = optax.apply_updates(state["params"], updates)
      return dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                  emb=emb), loss

    bs = batch_sharding(coll.mesh)
    step = jax.jit(step_fn, in_shardings=(shardings, bs, bs), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
    ckpt = CheckpointManager(workdir + "/checkpoints", max_to_keep=2, save_every=every)
    position = 0
    restored = ckpt.restore(state, coll)
    if restored is not None:
      state, position = restored.state, restored.data_state["position"]
    start = int(state["step"])
    for s in range(start, num_steps):
      ids, labels = batch(position)
      position += 64
      state, loss = step(state, ids, labels)
      print("step", s + 1, flush=True)
      ckpt.save(s + 1, state, coll, data_state={{"position": position}}, force=s + 1 == num_steps)
    ckpt.close()
    tables, opt = jax.device_get(coll.unstack_tables(state["emb"]))
    np.savez(workdir + "/final.npz", w=np.asarray(state["params"]["w"]), position=position,
             **{{"t/" + k: v for k, v in tables.items()}},
             **{{"o/" + k: v["accum"] for k, v in opt.items()}})
    print("done", flush=True)
""")


def _run(workdir, steps, every, kill_after=None):
  """Runs the worker; with `kill_after`, SIGKILLs it once that step has been printed
  (plus a random few milliseconds). Returns True if it finished."""
  script = _WORKER.format(root=ROOT)
  proc = subprocess.Popen([sys.executable, "-c", script, str(workdir), str(steps), str(every)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if kill_after is not None and line.strip() == f"step {kill_after}":
      time.sleep(random.uniform(0, 0.05))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return False
  return proc.wait() == 0


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(tmp_path):
  random.seed(0)
  steps, every = 24, 3
  assert _run(tmp_path / "ref", steps, every)
  work = tmp_path / "killed"
  kills = sorted(random.sample(range(2, steps), 4))
  for k in kills:
    assert not _run(work, steps, every, kill_after=k)   # killed, not finished
  assert _run(work, steps, every)
  with np.load(tmp_path / "ref" / "final.npz") as a, np.load(work / "final.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
