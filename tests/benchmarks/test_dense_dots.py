"""`benchmarks/dense_dots.py`: the dots of a traced function (nested jaxprs and custom
derivatives included), their FLOPs, and the time of a program of just those dots."""

import json
import os
import subprocess
import sys

import dense_dots
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import mlp


def _loss(params, x):
  """Two `mlp.affine` layers (custom VJP) under a `jit`, then a batched gram."""
  h = jax.jit(mlp.affine)(x, params["w1"], params["b1"])
  y = mlp.affine(jax.nn.relu(h), params["w2"], None)                    # [8, 6]
  g = jnp.einsum("bi,bj->bij", y, y)                                    # batched dot
  return g.sum()


def _params():
  r = np.random.default_rng(0)
  return {"w1": jnp.asarray(r.standard_normal((5, 4)), jnp.float32),
          "b1": jnp.zeros(4, jnp.float32),
          "w2": jnp.asarray(r.standard_normal((4, 6)), jnp.float32)}


def test_dots_of_a_gradient_count_forward_and_backward_matmuls():
  x = jnp.ones((8, 5), jnp.float32)
  found = dense_dots.dots(jax.grad(_loss), _params(), x)
  # forward: the 2 layers (the gram's own value feeds only the loss, which `jax.grad`
  # drops); backward: the gram's (2: both operands are y), each layer's kernel gradient,
  # the second layer's input gradient (the first's, computed by its custom VJP inside a
  # `jit`, is used by nothing)
  assert sum(found.values()) == 7, found
  shapes = {(d.lhs[0], d.rhs[0]) for d in found}
  assert ((8, 5), (5, 4)) in shapes and ((8, 4), (4, 6)) in shapes      # forwards
  assert ((8, 5), (8, 4)) in shapes                                      # x^T g, layer 1
  assert ((8, 4), (5, 4)) not in shapes                                  # its unused dx
  flops = sum(n * d.flops for d, n in found.items())
  expected = (2 * 8 * 5 * 4 + 2 * 8 * 4 * 6          # forwards
              + 2 * 8 * 5 * 4 + 2 * 8 * 4 * 6        # kernel gradients
              + 2 * 8 * 6 * 4                        # layer 2's input gradient
              + 2 * 2 * 8 * 6 * 6)                   # the gram's two operands
  assert flops == expected


def test_flops_of_a_batched_dot():
  d = dense_dots.Dot(((3, 7, 5), "float32"), ((3, 5, 2), "float32"),
                     (((2,), (1,)), ((0,), (0,))), "float32")
  assert d.flops == 2 * 3 * 7 * 2 * 5


def test_summary_times_the_dots_program():
  x = jnp.ones((64, 5), jnp.float32)
  out = dense_dots.summary(jax.grad(_loss), _params(), x, reps=3)
  assert out["dots"] == 7 and out["dots_ms"] > 0
  assert out["dense_gflop"] == pytest.approx(sum(
      n * d.flops for d, n in dense_dots.dots(jax.grad(_loss), _params(), x).items()) / 1e9,
      abs=1e-4)
  assert out["dots_gflops"] > 0


SCRIPT = os.path.join(os.path.dirname(os.path.abspath(dense_dots.__file__)), "dense_dots.py")


def _script(*flags):
  return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True,
                        timeout=300)


def test_script_prints_the_configs_dots():
  out = _script("--config", "dlrm_synthetic", "--reps", "1")
  assert out.returncode == 0, out.stderr[-2000:]
  line = json.loads(out.stdout.splitlines()[-1])
  assert line["benchmark"] == "dense_dots" and line["config"] == "dlrm_synthetic"
  assert line["batch_size"] == 512 and line["dots"] > 0 and line["dots_ms"] > 0
  assert line["dense_gflop"] > 0 and line["dots_gflops"] > 0


@pytest.mark.slow   # a process of its own: gin bindings parsed
def test_script_refuses_a_bad_binding_naming_it():
  out = _script("--gin_bindings", "DLRM.nope=1", "--reps", "1")
  assert out.returncode == 2 and "--gin_bindings: 'DLRM.nope=1'" in out.stderr, out.stderr
  assert out.stdout == ""
