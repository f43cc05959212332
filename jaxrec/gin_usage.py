"""Which gin bindings a run never used, and where each was written (file:line, --gin_bindings).

gin accepts a binding of any registered configurable, also one the run never calls (e.g.
`RowWiseAdagrad.lr` in a run whose sparse optimizer is `SGD`), and applies none of it.
`record_file` / `record_bindings` note where each binding came from as `launch.parse_gin`
reads them; `unused()` compares them with gin's operative config (what the configurables
that were called actually received) once the run has built everything.

Both configs are read through gin's public API, `gin.config_str()` and
`gin.operative_config_str()` parsed back to their keys (gin has no public accessor for
the operative config's keys). Those strings leave out values that are not literals, which
a binding parsed from a gin file or `--gin_bindings` never is (`tests/train/
test_unused_bindings.py` checks the shipped configs against gin's own tables).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Sequence

import gin
from gin import config_parser

# (scope, full selector, parameter) -> where it was last bound (a later binding wins, as in gin)
_ORIGINS: dict[tuple[str, str, str], str] = {}
# the recorded bindings' names (`big/SGD.lr`), built from _ORIGINS when asked, emptied
# when it changes (`calling_name` runs at every optimizer built: 3,000 scanned each time)
_NAMES: set[str] = set()
# macro name -> where it is first used (`x = %name`)
_MACRO_USES: dict[str, str] = {}
_FILES: list[str] = []   # gin files parsed, includes too (`files_read`)


class _Placeholders(config_parser.ParserDelegate):
  """Parses references and macros to nothing, noting the macros' names: only the binding
  keys, lines and macro uses are read."""

  def __init__(self):
    self.macros: list[str] = []

  def configurable_reference(self, scoped_name, evaluate):
    return None

  def macro(self, name):
    self.macros.append(name)


def clear() -> None:
  _ORIGINS.clear()
  _NAMES.clear()
  _MACRO_USES.clear()
  _FILES.clear()


def saved() -> tuple:
  """A copy of what is recorded, for `restore` (around a parse of another config)."""
  return dict(_ORIGINS), dict(_MACRO_USES), list(_FILES)


def restore(state: tuple) -> None:
  """Puts back what `saved` returned."""
  clear()
  origins, macro_uses, files = state
  _ORIGINS.update(origins)
  _NAMES.clear()
  _MACRO_USES.update(macro_uses)
  _FILES.extend(files)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
  """The body parses and calls gin configurables on a cleared configuration; the one there
  before (bindings, imports, operative config, singletons, lock) and this module's record
  of it are put back after it (checkpoint conversion reads a recorded config with it)."""
  config = gin.config   # pylint: disable=protected-access (gin has no API to save its state)
  kept = ({k: dict(v) for k, v in config._CONFIG.items()}, set(config._IMPORTS),
          {k: dict(v) for k, v in config._OPERATIVE_CONFIG.items()},
          dict(config._SINGLETONS), config.config_is_locked())
  usage = saved()
  gin.clear_config()
  try:
    yield
  finally:
    gin.clear_config()
    bindings, imports, operative, singletons, locked = kept
    config._CONFIG.update(bindings)
    config._IMPORTS.update(imports)
    config._OPERATIVE_CONFIG.update(operative)
    config._SINGLETONS.update(singletons)
    config._set_config_is_locked(locked)
    restore(usage)


def files_read() -> list[str]:
  """The gin files parsed since `clear`, `--gin_file`s and their includes (e.g. for an
  output that must not overwrite one)."""
  return list(_FILES)


def record_file(path: str) -> None:
  """Notes the bindings of gin file `path` (and of the files it includes) as `FILE:LINE`."""
  with _open_as_gin_does(path) as f:
    path = getattr(f, "name", path)   # where gin found it (e.g. in a package on sys.path)
    _FILES.append(path)
    # in order, an include where it stands: a binding after it wins, as in gin (recorded
    # after the file's own bindings, an included default was named as a binding's place)
    for statement in _parsed(f, lambda line: f"{path}:{line}",
                             lambda line: f"--gin_file: {path}:{line}"):
      if isinstance(statement, config_parser.IncludeStatement):
        record_file(statement.filename)


def _open_as_gin_does(name: str):
  """File `name` opened as `gin.parse_config_file` finds it: under its search paths, by
  each registered reader (gin's own looks in the Python packages on `sys.path`: `include
  'mycfg/base.gin'` read there was a FileNotFoundError here)."""
  config = gin.config   # pylint: disable=protected-access (gin has no API to resolve a name)
  prefixes = config._LOCATION_PREFIXES if not os.path.isabs(name) else [""]
  for prefix in prefixes:
    candidate = os.path.join(prefix, name)
    for reader, exists in config._FILE_READERS:
      if exists(candidate):
        return open(candidate, encoding="utf-8") if reader is open else reader(candidate)
  return open(name, encoding="utf-8")   # (gin read it: not reached)


def record_bindings(text: str, where: str = "--gin_bindings") -> None:
  """Notes the bindings of one `--gin_bindings` value as coming from `where`, and those of
  a file it includes (`--gin_bindings="include 'x.gin'"`) as that file's `FILE:LINE`."""
  for statement in _parsed(text, lambda line: where, lambda line: f"{where}: '{text}'"):
    if isinstance(statement, config_parser.IncludeStatement):
      record_file(statement.filename)


def forget(name: str) -> None:
  """Drops where binding `name` (`ExperimentConfig.train_data`) was written: a flag bound it
  again (`launch.parse_gin`'s overrides), so the file's line no longer holds its value."""
  for key in [k for k in _ORIGINS if _name(*k) == name]:
    del _ORIGINS[key]
  _NAMES.clear()


def _parsed(source, where_of, error_at):
  """Yields the statements of `source`, each binding and macro use recorded at
  `where_of(line)` before it is yielded. A dict literal giving a key twice is a
  `ConfigError` at `error_at(line)`: gin, as Python, keeps the last value silently
  (`OffloadConfig.tables = {'t0': {...}, 't0': {...}}`)."""
  delegate = _Placeholders()
  try:
    for statement in _Parser(source, delegate):
      where = where_of(statement.location.line_num)
      if isinstance(statement, config_parser.BindingStatement):
        _record(statement, where)
        for name in delegate.macros:
          _MACRO_USES.setdefault(name, where)
      delegate.macros.clear()
      yield statement
  except _RepeatedKey as e:
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f"{error_at(e.line)}: key {e.key!r} appears twice in one dict "
                      "(gin keeps the last value silently); give it once") from None


class _RepeatedKey(Exception):
  def __init__(self, key, line: int):
    super().__init__(key)
    self.key, self.line = key, line


class _Parser(config_parser.ConfigParser):
  """gin's parser, refusing a dict literal that repeats a key (`_RepeatedKey`). Overrides
  two of its private methods: gin has no hook for the keys of a literal."""

  def __init__(self, *args, **kwargs):
    self._keys: list[list] = []   # the keys of each dict literal being parsed, innermost last
    super().__init__(*args, **kwargs)

  def _maybe_parse_container(self):
    if self._current_token.string != "{":
      return super()._maybe_parse_container()
    self._keys.append([])
    try:
      return super()._maybe_parse_container()
    finally:
      self._keys.pop()

  def _parse_dict_item(self):
    line = self._current_token.start[0]
    key, value = super()._parse_dict_item()
    if key is not None and key in self._keys[-1]:   # (None: also a reference's placeholder)
      raise _RepeatedKey(key, line)
    self._keys[-1].append(key)
    return key, value


def macro_use(name: str) -> str | None:
  """Where macro `name` is first used (`FILE:LINE` or `--gin_bindings`), if recorded."""
  return _MACRO_USES.get(name)


_BINDING_NAME = re.compile(r"^((?:\w+/)*[A-Za-z_]\w*\.[A-Za-z_]\w*)\b")


def bound_at(name: str) -> str | None:
  """Where binding `name` (as errors and configs write it: `RowWiseAdagrad.lr`,
  `scope/DLRM.top_mlp`) was last bound, if recorded. None also when `name` has no scope
  and some scope binds it too: a value check names the parameter without its scope, so
  the unscoped binding need not be the bad one (`m/DLRM.top_mlp` was placed at the line
  of a valid `DLRM.top_mlp`). An entry of a dict or list binding,
  `embedding_tables.tables['t0']`, is where its binding is."""
  name = name.split("[", 1)[0]
  found = [where for key, where in _ORIGINS.items() if _name(*key) == name]
  if "/" not in name and any(scope and _name("", sel, arg) == name
                             for scope, sel, arg in _ORIGINS):
    return None
  return found[-1] if found else None


def calling_name(configurable: str, parameter: str) -> str:
  """The name of the binding that gave `parameter` to the call of `configurable` (its short
  name, `SGD`) now in progress: scoped as the innermost scope of the call that binds it
  (`big/SGD.lr` for `@big/SGD()`), else unscoped. For a value check's error, which
  `locate` then places at that binding's line (`SGD.lr must be ...` named no scope, and
  the file's valid unscoped `SGD.lr` was the one a reader looked at)."""
  scope = gin.current_scope()
  if scope and not _NAMES:
    _NAMES.update(_name(*key) for key in _ORIGINS)
  for i in range(len(scope), 0, -1):
    name = f"{'/'.join(scope[:i])}/{configurable}.{parameter}"
    if name in _NAMES:
      return name
  return f"{configurable}.{parameter}"


def bound_where(name: str) -> str | None:
  """`bound at FILE:LINE` or `bound by --gin_bindings` for binding `name` (`bound_at`), for
  a message's words; None when not recorded."""
  where = bound_at(name)
  if where is None:
    return None
  return f"bound by {where}" if where.startswith("--") else f"bound at {where}"


def through_macros(binding: str, value) -> tuple[str, object]:
  """`(binding, value)` past the macros of `value` (`%DATA`, `%DATA` -> `%D2` -> 'x.tsv'):
  the binding that holds the value itself (`D2/gin.macro.value`) and that value."""
  for _ in range(100):   # (gin refuses a macro cycle at finalize)
    if not (isinstance(value, gin.config.ConfigurableReference)
            and value.scoped_selector.endswith("gin.macro")):
      break
    binding = value.scoped_selector + ".value"
    value = gin.query_parameter(binding)
  return binding, value


def scoped_elsewhere(configurable: str, parameter: str) -> list[tuple[str, str]]:
  """`(name, where)` of the recorded bindings of `parameter` of `configurable` (its short
  name) in some scope (`sprse/lr_schedule.name`): for a call that lacks the parameter,
  a binding under a mistyped scope."""
  return [(_name(*key), where) for key, where in _ORIGINS.items()
          if key[0] and key[2] == parameter and key[1].rsplit(".", 1)[-1] == configurable]


def first_bound(prefix: str) -> str | None:
  """Where the first recorded binding whose name starts with `prefix` (`cat/TableSpec.`)
  was written, if any: the place of a scoped configurable one of whose arguments is
  missing (that one has no line of its own)."""
  return next((where for key, where in _ORIGINS.items() if _name(*key).startswith(prefix)),
              None)


def locate(message: str) -> str:
  """A value check's `message` that starts with a binding's name, with where that binding
  was written in front: `--gin_file: FILE:LINE: ...` or `--gin_bindings: ...` (as the
  errors of an unknown name read); unchanged for a default value or another message.
  Bad values said only the binding's name, not which of several files or flags set it."""
  m = _BINDING_NAME.match(message)
  where = bound_at(m.group(1)) if m else None
  if where is None:
    return message
  return f"{with_flag(where)}: {message}"


def with_flag(where: str) -> str:
  """A recorded place as an error leads with it: `--gin_file: FILE:LINE`, or the flag
  (`--gin_bindings`) as recorded."""
  return where if where.startswith("--") else f"--gin_file: {where}"


def _key(statement: config_parser.BindingStatement) -> tuple[str, str, str]:
  """(scope, full selector, parameter) of a binding, as gin's tables key it."""
  scope, selector, arg = statement.scope, statement.selector, statement.arg_name
  if not arg:   # a macro, `name = value`: gin binds it as `name/gin.macro.value`
    scope, selector, arg = "/".join(filter(None, (scope, selector))), "gin.macro", "value"
  try:   # the full selector, as gin's operative config names it
    return gin.config.ParsedBindingKey.parse((scope, selector, arg)).scope_selector_arg
  except ValueError:   # cannot happen after gin parsed it; keep the name as written
    return scope, selector, arg


def _record(statement: config_parser.BindingStatement, where: str) -> None:
  _ORIGINS[_key(statement)] = where
  _NAMES.clear()


def _tables() -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], set[str]]]:
  """gin's bound and operative parameters, `{(scope, full selector): {parameter, ...}}`
  each, read from its own tables (gin-config 0.5, pinned below 0.6): written out as config
  strings and parsed back, they took 3.9 s at 1,000 tables (and a bound value gin cannot
  write as a literal was left out of the operative string: reported unused)."""
  # pylint: disable=protected-access
  bound = {key: set(params) for key, params in gin.config._CONFIG.items()}
  with gin.config._OPERATIVE_CONFIG_LOCK:
    operative = {key: set(params) for key, params in gin.config._OPERATIVE_CONFIG.items()}
  return bound, operative


def unused(not_called: Sequence[str] = ()) -> list[str]:
  """`binding (where)` for each recorded binding that no configurable call received, except
  those of the configurables named in `not_called` (short names, e.g.
  `make_train_iterator`: ones this run skips by design, such as a run that only evaluates)."""
  bound, operative = _tables()
  calls: dict[str, dict[str, set[str]]] = {}   # selector -> call scope -> parameters
  for (call_scope, selector), params in operative.items():
    calls.setdefault(selector, {})[call_scope] = params
  # (a binding gin no longer holds was cleared since, e.g. by gin.clear_config: not reported)
  return [f"{_name(scope, selector, arg)} ({where})"
          for (scope, selector, arg), where in _ORIGINS.items()
          if arg in bound.get((scope, selector), ())
          and selector.rsplit(".", 1)[-1] not in not_called
          and not _used(scope, selector, arg, bound, calls.get(selector, {}))]


def _used(scope: str, selector: str, arg: str, bound: dict, calls: dict) -> bool:
  """Some call received this binding: a call in scope `scope` or one inside it (gin applies
  the bindings of every prefix of the call's scope, the longest winning) whose operative
  config has `arg`, with no binding in a scope between them taking precedence. `calls`:
  the operative parameters of `selector` by call scope (every selector's, searched per
  binding, took 13 s at 3,000 tables)."""
  if arg in calls.get(scope, ()):   # a call in this very scope: no scope between
    return True
  mine = scope.split("/") if scope else []
  for call_scope, params in calls.items():
    parts = call_scope.split("/") if call_scope else []
    if arg not in params or parts[:len(mine)] != mine:
      continue
    inner = ("/".join(parts[:i]) for i in range(len(mine) + 1, len(parts) + 1))
    if not any(arg in bound.get((s, selector), ()) for s in inner):
      return True
  return False


def _name(scope: str, selector: str, arg: str) -> str:
  if selector == "gin.macro":
    return f"%{scope}"
  short = selector.rsplit(".", 1)[-1]   # `RowWiseAdagrad.lr`, as configs write it
  return f"{scope + '/' if scope else ''}{short}.{arg}"


def warning(not_called: Sequence[str] = ()) -> str | None:
  """The one-line warning naming the unused bindings (`unused`), or None when every one
  was used."""
  names = unused(not_called)
  if not names:
    return None
  return (f"warning: gin bindings that no configurable of this run used (they had no effect; "
          f"a typo in the scope or a configurable this model/optimizer does not call?): "
          f"{', '.join(names)}")

