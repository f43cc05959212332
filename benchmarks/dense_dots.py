#!/usr/bin/env python3
"""The dense step's matmuls alone: what the step would cost if it were only its matmuls.

  .venv/bin/python benchmarks/dense_dots.py --config dlrm_criteo
  .venv/bin/python benchmarks/dense_dots.py --gin_bindings "DLRM.dtype='bfloat16'"

prints `{"benchmark": "dense_dots", "config", "batch_size", "dots_ms", "dense_gflop",
"dots_gflops", "dots"}` for the config's dense model (forward and backward w.r.t. its
parameters, the global batch on one device, random inputs): the floor the host's matmul
rate puts under a step of that model.

`vs_torchrec.py --breakdown` times the dense step's `dot_general`s this way
(`breakdown_ms.dots`, with `dense_gflop` and `dots_gflops`), and with TorchRec reports
`ratio_bound_dots`: TorchRec's step (from its best run's examples/sec, as `ratio` takes it)
÷ these dots' time, the ratio jaxrec would reach on this host if everything but its dense
matmuls took no time. Where that bound is below
the goal, no change outside the matmuls can meet the goal on this host: XLA:CPU's matmul
rate on the model's shapes decides (docs/vs_torchrec.md).

The dots (operand shapes and dtypes, dimension numbers, accumulation dtype, each as many
times as the function runs it) are compiled into one program of nothing else, on random
operands, and timed. Operand layouts are XLA's defaults, so a dot that takes a
transposed operand in the step is timed on a row-major one: the bound leaves out the
copies XLA makes for such operands too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Callable

from common import HelpFormatter, check_at_least, emit, interruptible

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@dataclasses.dataclass(frozen=True)
class Dot:
  """One `dot_general` of a traced function: operand shapes and dtypes, its dimension
  numbers `((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))` and its accumulation
  dtype (None: the operands')."""

  lhs: tuple[tuple[int, ...], str]
  rhs: tuple[tuple[int, ...], str]
  dimension_numbers: tuple
  preferred: str | None

  @property
  def flops(self) -> int:
    """2 x batch x M x N x K."""
    (lc, rc), (lb, rb) = self.dimension_numbers
    ls, rs = self.lhs[0], self.rhs[0]
    batch = math.prod(ls[i] for i in lb)
    k = math.prod(ls[i] for i in lc)
    m = math.prod(d for i, d in enumerate(ls) if i not in lc and i not in lb)
    n = math.prod(d for i, d in enumerate(rs) if i not in rc and i not in rb)
    return 2 * batch * m * n * k


def dots(fn: Callable, *args) -> dict[Dot, int]:
  """`{Dot: how many times}` over `fn(*args)`'s jaxpr, nested jaxprs included (jit, custom
  derivatives, loops' bodies once). Dots whose results nothing uses are left out, as XLA
  drops them (e.g. a first layer's input gradient, which its custom VJP computes), also
  inside a nested `jit` whose output goes unused."""
  import jax
  from jax.extend import core as jcore

  found: dict[Dot, int] = {}

  def walk(jaxpr, used_out):
    live = {v for v, u in zip(jaxpr.outvars, used_out) if u and isinstance(v, jcore.Var)}
    for eqn in reversed(jaxpr.eqns):
      used = [v in live for v in eqn.outvars]
      if not any(used) and not eqn.effects:
        continue
      live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
      if eqn.primitive.name == "dot_general":
        a, b = (v.aval for v in eqn.invars)
        dn = tuple(tuple(tuple(int(i) for i in x) for x in pair)
                   for pair in eqn.params["dimension_numbers"])
        pref = eqn.params.get("preferred_element_type")
        d = Dot((tuple(a.shape), str(a.dtype)), (tuple(b.shape), str(b.dtype)), dn,
                None if pref is None else str(np.dtype(pref)))
        found[d] = found.get(d, 0) + 1
      elif eqn.primitive.name in ("pjit", "jit"):   # its outputs map to the call's
        walk(eqn.params["jaxpr"].jaxpr, used)
        continue
      for sub in jcore.jaxprs_in_params(eqn.params):
        walk(sub, [True] * len(sub.outvars))

  closed = jax.make_jaxpr(fn)(*args)
  walk(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return found


def time_dots(found: dict[Dot, int], reps: int = 20, rounds: int = 7) -> float:
  """Seconds of one program running every dot of `found` as often as counted, each
  occurrence on operands of its own (random; no two identical, which XLA would merge),
  nothing else: `reps` calls dispatched back to back, then one wait, the median of `rounds`
  such rounds ÷ `reps`. One program rather than a call per dot, which would add a call's
  dispatch and wake-up to every dot (timed so, the criteo step's 22 dots took longer than
  the whole step)."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  plan = [d for d, n in found.items() for _ in range(n)]
  operands = [tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                    for shape, dtype in (d.lhs, d.rhs)) for d in plan]

  @jax.jit
  def run(ops):
    return [jax.lax.dot_general(a, b, d.dimension_numbers, preferred_element_type=d.preferred)
            for d, (a, b) in zip(plan, ops)]

  jax.block_until_ready(run(operands))
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    out = [run(operands) for _ in range(reps)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / reps)
  return float(np.median(times))


def summary(fn: Callable, *args, reps: int = 20) -> dict:
  """`{"dots_ms", "dense_gflop", "dots_gflops", "dots"}` of `fn(*args)`: the time of its
  dots' program (`time_dots`), their FLOPs, the rate that makes, and how many dots the
  function runs."""
  found = dots(fn, *args)
  seconds = time_dots(found, reps)
  flops = sum(n * d.flops for d, n in found.items())
  return {"dots_ms": round(seconds * 1e3, 3), "dense_gflop": round(flops / 1e9, 4),
          "dots_gflops": round(flops / seconds / 1e9, 1) if seconds else None,
          "dots": sum(found.values())}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--config", default="dlrm_criteo", help="name in configs/ (without .gin)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra gin bindings (repeatable), e.g. DLRM.dtype='bfloat16'")
  p.add_argument("--reps", type=int, default=20, help="calls of the dots' program per timing "
                 "round (7 rounds, the median)")
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("reps",))
  gin_file = os.path.join(ROOT, "configs", f"{args.config}.gin")
  if not os.path.isfile(gin_file):
    p.error(f"--config: no configs/{args.config}.gin")

  import jax
  import jax.numpy as jnp
  from jaxrec.embedding.specs import feature_dims
  from jaxrec.errors import ConfigError
  from jaxrec.launch import parse_gin
  from jaxrec.models import compute_loss
  from jaxrec.train.config import ExperimentConfig
  from jaxrec.train.state import init_dense

  try:
    parse_gin([gin_file], args.gin_bindings)
    config = ExperimentConfig()
  except ConfigError as e:
    p.error(str(e))
  dim = max(feature_dims(config.tables, config.features))
  params = init_dense(config, jax.random.key(0), dim)
  b = config.batch_size
  r = np.random.default_rng(0)
  dense = jnp.asarray(r.standard_normal((b, config.num_dense)), jnp.float32)
  emb = jnp.asarray(0.1 * r.standard_normal((b, len(config.features), dim)), jnp.float32)
  labels = jnp.asarray(r.integers(0, 2, b), jnp.float32)
  grads = lambda q: jax.grad(lambda x: compute_loss(config.model, x, dense, emb, labels)[0])(q)
  emit("dense_dots", config=args.config, batch_size=b, gin_bindings=args.gin_bindings,
       **summary(grads, params, reps=args.reps))


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
