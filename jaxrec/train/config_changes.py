"""A resumed run whose gin config differs from the one that trained its checkpoint.

The checks at restore refuse what a checkpoint cannot take (other tables, dense shapes,
optimizer state); everything else may change at a resume (a batch size, a learning rate,
the synthetic data's settings), and did silently: `W/config.gin` was overwritten with the
new values, and its header said a rerun of it reproduced the run, which trained steps up
to the checkpoint with the old ones. Now such a resume logs which bindings changed, keeps
the config of the steps before it as `W/config-until-<step>.gin`, and says so in the new
`config.gin`'s header.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Mapping, Sequence

from absl import logging as log

from jaxrec.data import source, vocab as vocab_lib
from jaxrec.errors import ConfigError
from jaxrec.files import write_text_atomic
from jaxrec.train import vocab_changes

# A binding's first line in gin's operative config text: `scope/Name.param = ...` or a
# macro `NAME = ...`, at the start of the line; its continuation lines are indented.
_BINDING = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s?(.*)$")
SHOWN = 6   # changed bindings a warning lists
# Parameters added after checkpoints were written, at the value every run had before them
# (gin's text of it): a resume of such a checkpoint listed `open_source.dense_transform:
# (unbound) -> 'log'` as a change and kept a config-until-<step>.gin for it
# (`open_source.id_format`, 'hex', likewise): the TSV reading options, `source.READ_AS`.
# (`open_source.vocab`, None: ids read `% rows`, likewise.)
ADDED_DEFAULTS = {**{f"open_source.{field}": repr(default)
                     for field, (_, default, _) in source.READ_AS.items()},
                  "open_source.vocab": "None"}
CALLED_SHOWN = 4   # bindings of a configurable called on one side only, listed in its entry


def bindings(text: str) -> dict[str, str]:
  """`{name: value text}` of gin's operative config `text` (comments dropped, a value
  spread over several lines joined)."""
  out: dict[str, str] = {}
  name = None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    m = _BINDING.match(line)
    if m and not line[0].isspace():
      name = m.group(1)
      out[name] = m.group(2).strip()
      if out[name] == "\\":   # gin's `name = \` before a long value on the next lines
        out[name] = ""
      if name.endswith((".name", ".parent")) and out[name] == "None":
        del out[name]   # a flax model's own field, recorded by runs before it was denylisted
        name = None
    elif name is not None:
      out[name] = (out[name] + " " + line.strip()).lstrip()
  return out


def _entries(value: str | None) -> tuple[list[tuple[str, str]], bool] | None:
  """`([(key, value text)], ordered)` of a binding's value that is a dict with string keys
  (`ordered` False) or a sequence of `(name, entry)` pairs (`embedding_tables.tables`,
  `.features`; `ordered` True: its order is meant), in its order; None for any other value
  (or one that is not a literal, e.g. holds `@Adagrad()`)."""
  if not value:
    return None
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return None
  if isinstance(parsed, dict):
    pairs = list(parsed.items())
  elif isinstance(parsed, (list, tuple)) and parsed and all(
      isinstance(p, (list, tuple)) and len(p) == 2 for p in parsed):
    pairs = [tuple(p) for p in parsed]
  else:
    return None
  keys = [k for k, _ in pairs]
  if not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
    return None
  return [(k, repr(v)) for k, v in pairs], not isinstance(parsed, dict)


def _value_changes(name: str, old: str | None, new: str | None) -> list[str]:
  """`name: old -> new`, or for a dict / list of pairs on both sides (one entry a table:
  a 3,000-table config changing one table's init_scale logged both 3,000-entry values
  whole) one `name['key']: old -> new` per entry that differs (`(absent)` on the side
  without it); the whole values when a list's keys are reordered (its order is meant)."""
  a, b = _entries(old), _entries(new)
  if a is not None and b is not None:
    da, db = dict(a[0]), dict(b[0])
    if not a[1] or [k for k, _ in a[0] if k in db] == [k for k, _ in b[0] if k in da]:
      keys = list(dict.fromkeys([k for k, _ in a[0]] + [k for k, _ in b[0]]))
      return [f"{name}[{k!r}]: {da.get(k, '(absent)')} -> {db.get(k, '(absent)')}"
              for k in keys if da.get(k) != db.get(k)]
  return [f"{name}: {old if old is not None else '(unbound)'} -> "
          f"{new if new is not None else '(unbound)'}"]


def changed(before: str, after: str) -> list[str]:
  """`name: old -> new` for each binding whose value differs between the operative configs
  `before` and `after` (`(unbound)` for one only the other has). A configurable that only
  one side called is one entry with its first bindings (`FTRL: (not called) -> called
  (beta = 1.0, ..., +2 more)`): switching `sparse_optimizer` to `@FTRL()` listed each of
  FTRL's defaults as a change of its own, pushing the others out of the warning."""
  old, new = bindings(before), bindings(after)
  called_before = _configurables(old)
  for k, v in ADDED_DEFAULTS.items():
    if k not in old and new.get(k) == v and _configurable(k) in called_before:
      old[k] = v
  only_old = _configurables(old) - _configurables(new)
  only_new = _configurables(new) - _configurables(old)
  out, names = [], sorted(old.keys() | new.keys())
  for k in names:
    owner = _configurable(k)
    if owner in only_old or owner in only_new or old.get(k) == new.get(k):
      continue
    out.extend(_value_changes(k, old.get(k), new.get(k)))
  by_owner: dict[str, list[str]] = {}   # (one pass: a walk per owner was quadratic)
  for k in names:
    by_owner.setdefault(_configurable(k), []).append(k)
  for owner in sorted(only_old | only_new):
    side = old if owner in only_old else new
    own = by_owner[owner]
    more = f", +{len(own) - CALLED_SHOWN} more" if len(own) > CALLED_SHOWN else ""
    what = "called (" + ", ".join(f"{k.rpartition('.')[2]} = {side[k]}"
                                  for k in own[:CALLED_SHOWN]) + more + ")"
    out.append(f"{owner}: {what} -> (not called)" if owner in only_old
               else f"{owner}: (not called) -> {what}")
  return out


def _configurable(name: str) -> str:
  """`scope/Name` of a binding `scope/Name.param` (a macro: its own name)."""
  return name.rpartition(".")[0] or name


def _configurables(b: Mapping[str, str]) -> set[str]:
  return {_configurable(k) for k in b if "." in k}


def until_name(step: int) -> str:
  """The file name that keeps the config of the steps up to `step`."""
  return f"config-until-{step}.gin"


def note(workdir: str, step: int, before: str | None, after: str) -> str | None:
  """For a run resuming at `step` whose checkpoint was trained with operative config
  `before` (its meta's `gin`; None for an older checkpoint) and runs `after`: when they
  differ, writes `before` to `W/config-until-<step>.gin`, logs a warning naming the changed
  bindings and returns the line for `config.gin`'s header; None when nothing changed."""
  if step <= 0:
    return None
  diff = changed(before, after) if before else []
  if not diff:   # an earlier resume's change still stands in this file's history
    return _earlier(workdir, step)
  name, first = until_name(step), _last_until(workdir, step - 1) + 1
  write_text_atomic(os.path.join(workdir, name),
                    f"# The operative config that trained steps {first} to {step} of this "
                    "run.\n\n" + before)
  more = f" (+{len(diff) - SHOWN} more)" if len(diff) > SHOWN else ""
  log.warning("warning: this run resumes at step %d with a gin config that differs from the "
              "one that trained it: %s%s; W/%s keeps the earlier one, W/config.gin records "
              "this run's", step, "; ".join(diff[:SHOWN]), more, name)
  return (f"# It resumed at step {step} with {len(diff)} binding(s) other than those of the "
          f"steps before (their config: {name}): this file alone does not rerun them.\n")


def _earlier(workdir: str, step: int) -> str | None:
  """The header line of the latest earlier resume with another config (its
  `config-until-<s>.gin`, `s <= step`), for a later resume without a change."""
  last = _last_until(workdir, step)
  if not last:
    return None
  return (f"# Steps 1 to {last} were trained with other configs ({until_name(last)} and any "
          "earlier config-until-*.gin): this file alone does not rerun them.\n")


def _last_until(workdir: str, step: int) -> int:
  """The largest `s <= step` of the workdir's `config-until-<s>.gin` files; 0 if none."""
  try:
    names = os.listdir(workdir)
  except OSError:
    return 0
  return max((s for n in names if (m := _UNTIL.fullmatch(n)) and (s := int(m.group(1))) <= step),
             default=0)


_UNTIL = re.compile(r"config-until-(\d+)\.gin")


def explained(error: Exception, after: str) -> Exception:
  """`error`, a restore's refusal of a checkpoint whose dense state does not fit this run's
  model (`checkpoint.dense`, which sets `.step_dir`), with the bindings that changed since
  that checkpoint's config (its meta's `gin`) appended: the refusal named parameter paths
  (`params/deep_mlp/layer_3/bias`, at most three) where a `DeepFM.deep_mlp` had changed.
  Returned as it is without a step or a recorded config, or when nothing changed."""
  step_dir = getattr(error, "step_dir", None)
  if step_dir is None:
    return error
  from jaxrec.checkpoint import storage  # pylint: disable=import-outside-toplevel
  try:
    before = storage.read_json(step_dir, storage.META).get("gin")
  except Exception:  # pylint: disable=broad-except
    return error   # an unreadable meta: the refusal as it was
  # only configurables this run has called by now: the training data's are called after
  # the restore (`make_train_iterator.*` read as unbound); and the models: a run switched
  # to another model never calls the checkpoint's (`DLRM: called (...) -> (not called)`)
  from jaxrec.models.base import MODELS  # pylint: disable=import-outside-toplevel
  called = {_configurable(n) for n in bindings(after)} | {m.__name__ for m in MODELS.values()}
  diff = [d for d in (changed(before, after) if isinstance(before, str) else [])
          if _configurable(d.split(":")[0].split("[")[0]) in called]
  if not diff:
    return error
  more = f" (+{len(diff) - SHOWN} more)" if len(diff) > SHOWN else ""
  out = type(error)(f"{error}; bindings changed since that checkpoint: "
                    f"{'; '.join(diff[:SHOWN])}{more}")
  out.step_dir = step_dir
  return out


# FTRL fields its state (`z`, `n`) depends on: `lr` scales a row's weight from them (0.1 ->
# 0.5 made every row it updated 5x at a zero gradient), and a row never updated is told by
# `n == initial_accumulator` (changed, such rows restarted from 0 at their first update)
FTRL_STATEFUL = {"lr": "every row it updates jumps to the new rate's weight",
                 "initial_accumulator": "rows it never updated would restart from 0 at "
                                        "their first update"}


# How a TSV file's values are read (`source.READ_AS`): what the model saw, and what it
# would see read otherwise; a run from a checkpoint reads its files as it was trained
_READ_AS_WORDS = {"dense_transform": ("dense values", "inputs of another scale"),
                  "id_format": ("categorical ids", "ids mapped to other rows than it learned "
                                "them in"),
                  "vocab": ("categorical ids", "ids mapped to other rows than it learned "
                            "them in")}


def check_read_as(meta: Mapping | None, after: str, eval_source: str, step: int,
                  trains: bool = False, position: bool = True) -> None:
  """Raises `ConfigError` when a run from checkpoint `step` (its `meta`'s recorded gin)
  reads data other than the synthetic set (which ignores them: `eval_source`, or the
  training data when it `trains`) with another `source.READ_AS` binding
  (`open_source.dense_transform`, `open_source.id_format`) or id vocabulary than the
  checkpoint was trained with (`after`: this run's operative config). The vocabulary is
  compared by fingerprint when the checkpoint records one (`meta["vocab"]`,
  `vocab_record`: a copy elsewhere is the same one, one rebuilt in place another), else
  as `open_source.vocab` is bound (a path). Evaluating, the model scored inputs of
  another scale, or looked up other rows, without a word; training on from its data
  position, the data's fingerprint refused the files as "other data" without naming the
  binding (the trainer checks only then: a copy without one may change them). Nothing is
  checked without a recorded config. A training run from a copy without its data position
  (`position` False) may change them all; another vocabulary is warned of."""
  before = (meta or {}).get("gin")
  if not isinstance(before, str) or eval_source == "synthetic":
    return
  if not position:
    if isinstance(meta, Mapping) and "vocab" in meta:
      note = vocab_changes.copy_warning(meta["vocab"], vocab_record(), step)
      if note:   # (under launch.py: its stderr too, once per job)
        log.warning("%s", note)
        from jaxrec import elastic  # pylint: disable=import-outside-toplevel
        elastic.report_warning(note)
    return
  data, verb, then = (("training data", "train on", "train on from it (or copy it without "
                       "its data position, convert_checkpoint.py --restart_data, to go on with "
                       "the new one)") if trains else ("eval data", "score", "evaluate it"))
  old_bindings, new_bindings = bindings(before), bindings(after)
  for field, (what, consequence) in _READ_AS_WORDS.items():
    key = f"open_source.{field}"
    if field == "vocab" and isinstance(meta, Mapping) and "vocab" in meta:
      vocab_changes.check(meta["vocab"], vocab_record(), step, data, verb, then)
      continue
    default = ADDED_DEFAULTS[key]
    old, new = old_bindings.get(key, default), new_bindings.get(key, default)
    if old != new:
      raise ConfigError(
          f"checkpoint {step} was trained on {what} read with {key} = {old}, but this run "
          f"reads its {data} with {key} = {new}: the model would {verb} {consequence}; "
          f"bind {key} = {old} (gin) to {then}")


def vocab_record() -> dict | None:
  """This run's id vocabulary (gin's `open_source.vocab`) as a checkpoint's meta records it
  (`vocab.record`: absolute path and fingerprint; None without one)."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  return vocab_lib.record(vocab_lib.load_binding(launch.bound_value("open_source.vocab")))


def check_stateful_optimizers(meta: Mapping | None, tables: Sequence[str], optimizer) -> None:
  """Raises `ConfigError` when a table whose checkpoint (its `meta`'s recorded gin) and
  this run (`optimizer`, the run's sparse optimizer) both give FTRL has another `lr` or
  `initial_accumulator` (`FTRL_STATEFUL`): the resume went on silently with rows rescaled
  or wiped. Nothing is checked without a recorded config."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint import copy_optimizer
  from jaxrec.embedding import optimizers
  # pylint: enable=import-outside-toplevel
  if (not meta or not isinstance(meta.get("gin"), str) or not any(
      isinstance(o, optimizers.FTRL) for o in optimizers.distinct(optimizer))):
    return   # (no FTRL in this run: the recorded config is not parsed)
  before, _ = copy_optimizer.resolve(meta, list(tables))
  if before is None:
    return
  for table in tables:
    old, new = optimizers.of(before, table), optimizers.of(optimizer, table)
    if not (isinstance(old, optimizers.FTRL) and isinstance(new, optimizers.FTRL)):
      continue
    for field, harm in FTRL_STATEFUL.items():
      if getattr(old, field) != getattr(new, field):
        raise ConfigError(
            f"table '{table}': its FTRL {field} is {getattr(new, field)!r} in this run but "
            f"was {getattr(old, field)!r} when its checkpoint was trained: FTRL's state (z, "
            f"n) holds the rows under the old value, and {harm}. Bind {field} = "
            f"{getattr(old, field)!r} again for this table (FTRL.{field}, or its "
            "ExperimentConfig.table_optimizers entry), or train in a new --workdir")

