"""benchmarks/kernels.py measures the update the trainer runs."""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.kernels import RowWiseAdagrad, init_opt_state, platform
from tests.kernels.kernel_helpers import lower_for_gpu

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
  assert args.on_gpu and (args.rows, args.dim, args.iters, args.reps) == (1_000_000, 128, 20, 10)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not bench._parser().parse_args([]).on_gpu   # pylint: disable=protected-access


def test_sweep_needs_a_gpu(capsys):
  """`--sweep` tunes Triton launch settings; on CPU it is a usage error, not a slow run of
  the interpreter."""
  with pytest.raises(SystemExit) as exit_info:
    _bench().main(["--sweep"])
  assert exit_info.value.code == 2
  assert "--sweep tunes the Triton kernels: it needs a GPU" in capsys.readouterr().err


def test_launch_settings_reach_the_kernels():
  """`platform.tuned` (what `--sweep` varies) sets the traced Pallas call's warps, stages
  and bags per program; the unrolled lookup lowers to Triton too."""
  from jaxrec.kernels import lookup_pool   # pylint: disable=import-outside-toplevel
  table = jnp.zeros((64, 128), jnp.float32)
  idx, w = jnp.zeros((256, 2), jnp.int32), jnp.ones((256, 2), jnp.float32)
  lower = lambda: lower_for_gpu(
      lambda t, i, v: lookup_pool(t, i, v, kernel="pallas", interpret=False), table, idx, w)
  texts = []
  for launch in (platform.GpuTuning(num_warps=2, num_stages=1, lookup_block=4096,
                                    unroll_slots=False),
                 platform.GpuTuning(num_warps=8, num_stages=3, lookup_block=1024,
                                    unroll_slots=True)):
    with platform.tuned(launch):
      jax.clear_caches()
      texts.append(lower())
  jax.clear_caches()
  looped, tuned = texts
  assert "num_warps = 2" in looped and "num_warps = 8" in tuned
  assert "num_stages = 1" in looped and "num_stages = 3" in tuned
  # 256 bags: 32 per program with 4096 elements / 128 columns, 8 with 1024
  assert "grid_x = 8 :" in looped and "grid_x = 32 :" in tuned


def test_launch_flag_parses_into_tuning():
  """`--launch` replaces the named `GpuTuning` fields; a bad field or value is a usage
  error naming it, and on CPU the flag is refused like `--sweep`."""
  bench = _bench()
  errors = []
  def error(message):
    errors.append(message)
    raise SystemExit(2)
  tuning = bench.parse_launch(error, "num_warps=8,unroll_slots=false,lookup_block=2048")
  assert tuning == platform.GpuTuning(num_warps=8, unroll_slots=False, lookup_block=2048)
  for text, says in [("warps=8", "'warps=8' is not NAME=VALUE"),
                     ("num_warps", "'num_warps' is not NAME=VALUE"),
                     ("num_stages=0", "num_stages takes a positive integer, got '0'"),
                     ("unroll_slots=maybe", "unroll_slots takes true or false"),
                     ("num_warps=3", "GpuTuning.num_warps must be a power of two")]:
    with pytest.raises(SystemExit):
      bench.parse_launch(error, text)
    assert says in errors[-1]
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--launch=num_warps=8"])
  assert exit_info.value.code == 2


def test_sweep_prints_a_line_per_setting(monkeypatch, capsys):
  """The sweep's code path (Pallas interpreted here; compiled on a GPU): one JSON line per
  launch setting and kernel, each timed."""
  bench = _bench()
  monkeypatch.setattr(bench, "SWEEP_WARPS", (8,))   # each setting compiles the kernels
  monkeypatch.setattr(bench, "SWEEP_STAGES", (1,))
  monkeypatch.setattr(bench, "SWEEP_LOOKUP_BLOCKS", (1024,))
  monkeypatch.setattr(bench, "SWEEP_UPDATE_BLOCKS", (1024,))
  args = bench._parser().parse_args(["--iters=1", "--reps=2"])   # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 50, size=(8, 3)), jnp.int32)
  opt = RowWiseAdagrad(lr=0.01)
  bench.sweep(args, table, idx, jnp.ones((8, 3)), jnp.ones((8, 16)), opt,
              init_opt_state(opt, 50, 16), {"benchmark": "kernels"}, 1000)
  jax.clear_caches()
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(x["op"], x["num_warps"], x.get("unroll_slots")) for x in lines] == [
      ("lookup_pool", 8, False), ("lookup_pool", 8, True), ("sparse_update", 8, None)]
  assert all(x["sweep"] and x["seconds"] > 0 for x in lines)
