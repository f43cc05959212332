"""Per-table sparse optimizers in `test_reshard_fuzz`: their draws (a stream of their own,
so a seed's other draws are as before) and the restore's rule for each table's state, as
the oracle models it (not read from the library): a table keeps its saved state when its
optimizer's state has the same arrays (the same optimizer, its hyperparameters changed or
not), starts it fresh when it saved none (SGD before), and any other change is refused
(a `ConfigError` naming the table: state lost, e.g. Adam to SGD, or of another shape).
"""

from __future__ import annotations

import dataclasses

from jaxrec.embedding import optimizers
from jaxrec.schedules import lr_schedule

NAMES = ("sgd", "adagrad", "rowwise", "adam", "ftrl")
CLASSES = {"sgd": optimizers.SGD, "adagrad": optimizers.Adagrad,
           "rowwise": optimizers.RowWiseAdagrad, "adam": optimizers.Adam,
           "ftrl": optimizers.FTRL}


def _u(rng, lo: float, hi: float) -> float:
  return round(float(rng.uniform(lo, hi)), 4)


def random_optimizer(rng, names=NAMES):
  """One of `names`' optimizers with sampled hyperparameters (a rate decaying to 0 over 4
  steps now and then, not FTRL); Adagrad's accumulators start above 0 (at 0 the first
  update magnifies the sum order's rounding, README "Sharded embeddings")."""
  name = str(rng.choice(names))
  scheduled = name != "ftrl" and rng.random() < 0.2

  def lr(lo, hi):
    v = _u(rng, lo, hi)
    return (lr_schedule("linear", init_value=v, end_value=0.0, transition_steps=4)
            if scheduled else v)
  eps = float(rng.choice([1e-8, 1e-6]))
  if name == "sgd":
    return optimizers.SGD(lr(0.02, 0.2))
  if name in ("adagrad", "rowwise"):
    return CLASSES[name](lr(0.02, 0.2), _u(rng, 0.05, 0.5), eps)
  if name == "adam":
    return optimizers.Adam(lr(0.002, 0.02), _u(rng, 0.8, 0.95), _u(rng, 0.99, 0.9999), eps)
  return optimizers.FTRL(_u(rng, 0.05, 0.2), l1=_u(rng, 0.0, 0.02), l2=_u(rng, 0.0, 0.02),
                         beta=float(rng.choice([0.5, 1.0])),
                         initial_accumulator=_u(rng, 0.05, 0.3))


def kinds(opt) -> dict:
  """`{state name: "element" | "row"}`: what a checkpoint stores of a table's state."""
  return {k: per for k, (per, _) in opt.state_layout().items()}


def rule(before, now) -> str:
  """What a restore does with the state a table saved under `before` when it trains with
  `now`: `keep` (the same arrays, or none either side), `fresh` or `refused`."""
  a, b = kinds(before), kinds(now)
  return "keep" if a == b else "fresh" if not a else "refused"


def rules(before, now, tables) -> dict:
  """`{table: rule}` of the tables (names) going from optimizer `before` to `now` (each
  one optimizer, or per table)."""
  return {t: rule(optimizers.of(before, t), optimizers.of(now, t)) for t in tables}


def describe(opt) -> str:
  """An optimizer, or a default and each table's own: `SGD(..) t1:Adam(..)`."""
  if isinstance(opt, optimizers.TableOptimizers):
    return " ".join([str(opt.default)] + [f"{t}:{o}" for t, o in opt.overrides])
  return str(opt)


def _build(default, own: dict):
  """`per_table(default, own)` of the tables whose optimizer is not the default."""
  return optimizers.per_table(default, {t: o for t, o in own.items() if o != default})


def _changed(rng, before, default):
  """A table's optimizer after `before` that a restore takes (`rule` not refused): the
  same class retuned, the default, or after SGD any other (its state starts fresh)."""
  pick = rng.random()
  if pick < 0.35:
    return random_optimizer(rng, [n for n, c in CLASSES.items() if isinstance(before, c)])
  if pick < 0.6 and rule(before, default) != "refused":
    return default
  if not kinds(before):
    return random_optimizer(rng)
  return before


def _refused(rng, before):
  """A table's optimizer after stateful `before` that a restore refuses."""
  return random_optimizer(rng, [n for n, c in CLASSES.items() if not isinstance(before, c)])


def _join(rng, leg, before, now: dict, own: dict):
  """`leg` with a table that saved no state (SGD before) put on the default's stack beside
  a table that keeps its state there: the default (stateful) optimizer, and the other's
  placement (kind and slice; the same dim and dtype): the restore then starts its slot's
  state fresh in a stack it reads (`now`, `own` updated); `leg` if no pair fits."""
  default, specs = leg.optimizer, {t.name: t for t in leg.tables}
  keep = [n for n in specs if now[n] == default and rule(optimizers.of(before, n), default)
          == "keep" and kinds(default)]
  pairs = [(a, b) for a in specs if not kinds(optimizers.of(before, a)) for b in keep
           if (specs[a].dim, specs[a].dtype) == (specs[b].dim, specs[b].dtype)]
  if not pairs:
    return leg
  a, b = pairs[int(rng.integers(len(pairs)))]
  now[a] = default
  own.pop(a, None)
  at = [t.name for t in leg.tables]
  placements = list(leg.placements)
  placements[at.index(a)] = placements[at.index(b)]
  return dataclasses.replace(leg, placements=tuple(placements))


def draw(rng, legs: list, offloaded_first: float = 0.6) -> list:
  """`legs` with optimizers of their own for some tables: in a quarter of the seeds 1-3 of
  the first run's tables (an offloaded one more often; SGD more often beside a stateful
  default); in a fifth of the later runs, one or two tables change theirs as a restore
  takes it (retuned, back to the default, after SGD another that starts fresh) or gain
  one then; in most later runs, where one fits, a table that saved no state joins the
  stack of a table that keeps its state (`_join`); rarely (3% of later runs) a table's
  optimizer changes as a restore refuses it: the chain then ends with that run (whose
  restore must raise). A leg's `optimizer` stays its default (drawn as before)."""
  names = [t.name for t in legs[0].tables]
  offloaded = {n for leg in legs for n, _ in leg.offloaded}
  own = {}
  if rng.random() < 0.25:
    k = int(rng.integers(1, min(3, len(names)) + 1))
    pool = [n for n in names if n in offloaded] if rng.random() < offloaded_first else []
    first = [str(n) for n in rng.permutation(pool or names)[:1]]
    rest = [n for n in rng.permutation(names) if n not in first][:k - 1]
    sgd = kinds(legs[0].optimizer) and rng.random() < 0.5
    own = {str(n): random_optimizer(rng, ["sgd"] if sgd and i == 0 else NAMES)
           for i, n in enumerate(first + rest)}
  out = [dataclasses.replace(legs[0], optimizer=_build(legs[0].optimizer, own))]
  for leg in legs[1:]:
    prev, default = out[-1].optimizer, leg.optimizer
    now = {n: optimizers.of(prev, n) for n in names}
    now = {n: o if n in own or rule(o, default) == "refused" else default
           for n, o in now.items()}   # a table on the default follows it (as drawn before)
    if rng.random() < 0.2:
      for n in rng.permutation(names)[:int(rng.integers(1, 3))]:
        now[str(n)] = own[str(n)] = _changed(rng, now[str(n)], default)
    if rng.random() < 0.7:
      leg = _join(rng, leg, prev, now, own)
    stateful = [n for n in names if kinds(optimizers.of(prev, n))]
    if stateful and rng.random() < 0.03:
      n = str(rng.choice(stateful))
      now[n] = own[n] = _refused(rng, optimizers.of(prev, n))
      out.append(dataclasses.replace(leg, optimizer=_build(default, now)))
      return out
    out.append(dataclasses.replace(leg, optimizer=_build(default, now)))
  return out
