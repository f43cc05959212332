"""benchmarks/kernels.py measures the update the trainer runs."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.kernels import RowWiseAdagrad, init_opt_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
  spec = importlib.util.spec_from_file_location(
      "bench_kernels", os.path.join(ROOT, "benchmarks", "kernels.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bf16_update_is_compiled_as_the_trainer_compiles_it():
  """On CPU the trainer compiles bf16 table updates without XLA's bf16 normalization
  (`EmbeddingCollection.compiler_options`); the benchmark compiled them with it, timing a
  conversion of the whole table to f32 and back per update (~1.8x slower) no run pays."""
  rows, dim, n = 20_000, 16, 64
  opt = RowWiseAdagrad(lr=0.01)
  f = _bench().update_fn(opt, "xla", "bfloat16")
  table = jnp.zeros((rows, dim), jnp.bfloat16)
  idx, w = jnp.zeros((n, 2), jnp.int32), jnp.ones((n, 2), jnp.float32)
  hlo = f.lower(table, init_opt_state(opt, rows, dim), idx, w,
                jnp.asarray(np.ones((n, dim)), jnp.float32)).compile().as_text()
  assert f"bf16[{rows},{dim}]" in hlo
  assert not re.search(rf"f32\[{rows},{dim}\]", hlo)   # no whole-table conversion


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm"])
def test_every_gpu_backend_gets_the_gpu_defaults(monkeypatch, backend):
  """The benchmark takes a GPU as `kernels.platform` does (`gpu`, `cuda`, `rocm`): on
  `cuda`/`rocm` it used the CPU sizes and skipped the Pallas kernel."""
  bench = _bench()
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  args = bench._parser().parse_args([])   # pylint: disable=protected-access
  assert args.on_gpu and (args.rows, args.dim, args.iters) == (1_000_000, 128, 20)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not bench._parser().parse_args([]).on_gpu   # pylint: disable=protected-access
