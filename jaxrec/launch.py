"""Shared launcher plumbing: gin parsing with one-line errors, error-to-exit handling."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tokenize
from typing import Callable, Iterator, Mapping, Sequence

import gin

from jaxrec import gin_hints, gin_usage, signals
from jaxrec.errors import ConfigError, JaxrecError
from jaxrec.train import termination


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              overrides: Mapping[str, object] | None = None) -> None:
  """Parses gin files then bindings; errors name the flag and what was wrong. `overrides`
  (`{"ExperimentConfig.train_data": value of --train_data}`): values of flags that take
  the place of bindings, bound last, so that the operative config (`W/config.gin`) records
  what the run used, not the binding the flag overrode."""
  import jaxrec.configurables  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  gin.clear_config()
  gin_usage.clear()
  with _quiet_gin_lookup():
    _parse_files(files)
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      # (gin's text ends in "In bindings string line N <the binding>": quoted already)
      message = re.sub(r"\s*In bindings string line \d+.*$", "", _one_line(e))
      text = (gin_hints.unquoted_string(message, binding)
              or gin_hints.arithmetic_value(message, binding)
              or gin_hints.unparsable_value(message))
      hint = gin_hints.did_you_mean(str(e))
      text += _shell_quoting(binding, text)
      raise ConfigError(f"--gin_bindings: '{binding}': {text.rstrip('.') if hint else text}"
                        f"{_set_by(e)}{hint}") from None
    gin_usage.record_bindings(binding)
  for name, value in (overrides or {}).items():
    gin.bind_parameter(name, value)
    gin_usage.forget(name)   # an error about it must not point at the file's line
  try:
    gin.finalize()
  except ValueError as e:   # gin's check of the macros: its message dumps the whole config
    raise ConfigError(_unbound_macro(e)) from None


def _parse_files(files: Sequence[str]) -> None:
  """`--gin_file`s in order; a missing or unparsable one (or include) is a ConfigError."""
  for path in files:
    if not os.path.isfile(path):   # a pipe (`<(cat x.gin)`) was "no such file"
      why = ("is a directory" if os.path.isdir(path) else
             "is a pipe or another kind of non-regular file: give a file (a gin file is read "
             "again, for the lines errors name, and by every worker of scripts/launch.py)"
             if os.path.exists(path) else "no such file")
      raise ConfigError(f"--gin_file: cannot read '{path}': {why}")
    try:
      gin.parse_config_file(path)
    except SyntaxError as e:  # gin's ParseError: the location is in its attributes
      failed = e.filename or path   # the file it was in: `path` or one it includes (that
      where = f"{failed}:{e.lineno}" if e.lineno else failed   # was `path` at its line)
      message = _one_line(e)
      statement = _line(failed, e.lineno)
      text = (gin_hints.unquoted_string(message, statement)
              or gin_hints.arithmetic_value(message, statement)
              or gin_hints.unparsable_value(message))
      if e.lineno == 1 and _starts_with_bom(failed):   # gin reads it as a stray character
        text += " (the file starts with a UTF-8 byte-order mark: save it without one)"
      within = f" (included by {path})" if failed != path else ""
      raise ConfigError(f"--gin_file: {where}: {text}{within}") from None
    except RecursionError as e:   # gin's message repeats the include chain: ~20 KB
      raise ConfigError(f"--gin_file: {_include_cycle(path, str(e))}") from None
    except (UnicodeDecodeError, tokenize.TokenError) as e:   # gin: `utf-8`, or no line
      raise ConfigError(f"--gin_file: {_text_error(path, e)}") from None
    except Exception as e:  # gin raises ValueError/KeyError with location info
      missing = _missing_include(e)
      if missing:
        raise ConfigError(f"--gin_file: {missing}") from None
      if isinstance(e, OSError):
        raise ConfigError(f"--gin_file: cannot read '{path}': "
                          f"{getattr(e, 'strerror', None) or _one_line(e)}") from None
      raise ConfigError(f"--gin_file: {_located(path, _one_line(e))}{_set_by(e)}"
                        f"{gin_hints.did_you_mean(str(e))}") from None
    gin_usage.record_file(path)


_INCLUDE_STEP = re.compile(r'In file "(.+?)", line (\d+)\s*include\s+([\'"])(.+?)\3')


def _include_cycle(path: str, message: str) -> str:
  """`A:1 includes 'B', B:2 includes 'A': an include cycle` from gin's recursion error
  (its include chain, repeated until Python's recursion limit)."""
  steps, seen = [], set()
  for where, line, _, name in _INCLUDE_STEP.findall(message):
    if (where, line) in seen:
      break
    seen.add((where, line))
    steps.append(f"{where}:{line} includes '{name}'")
  steps.reverse()   # gin's chain is innermost first; the cycle told from the file given
  first = next((i for i, step in enumerate(steps) if step.startswith(f"{path}:")), 0)
  steps = steps[first:] + steps[:first]   # (where the recursion limit struck varies)
  if not steps:
    return f"{path}: too deeply nested includes (Python's recursion limit)"
  return f"{', '.join(steps)}: an include cycle (a file includes itself); remove one of them"


_INCLUDED_AT = re.compile(r'In file "(.+?)", line (\d+)\n\s*include\s+([\'"])(.+?)\3')


def _text_error(path: str, e: Exception) -> str:
  """`FILE:LINE: what` for a gin file (`path`, or the file it includes that failed) that is
  not UTF-8 or ends inside a bracket or string, with where it was included."""
  included = _INCLUDED_AT.findall(str(e))   # innermost first
  failed = included[0][3] if included else path
  text = gin_hints.text_error(failed)
  if text is None:   # (it reads now): gin's words
    return f"{path}: {e.args[0] if e.args else _one_line(e)}"
  return text + (f" (included at {included[0][0]}:{included[0][1]})" if included else "")


class _OrbaxErrorsInOneLine(logging.Filter):
  """Keeps orbax's ERROR records but not their tracebacks: a failed save (a full disk)
  logged two of ~50 lines each before the `error: saving checkpoint N ... failed: REASON;
  the last checkpoint (step M) is intact` line that the checkpoint manager raises for it.
  An error jaxrec does not turn into such a line still ends the run with its traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and (f"{os.sep}orbax{os.sep}" in record.pathname or _unretrieved(record)):
      record.exc_info = record.exc_text = None
    return True


def _unretrieved(record: logging.LogRecord) -> bool:
  """asyncio's `Future exception was never retrieved` (logged when a failed save's other
  writes are collected: three tracebacks after its one-line error)."""
  return (record.name == "asyncio" or record.pathname.endswith(
      os.path.join("asyncio", "base_events.py"))) and "never retrieved" in str(record.msg)


def quiet_orbax_tracebacks() -> None:
  """Installs `_OrbaxErrorsInOneLine` on absl's handler (the one that prints them), and
  drops tensorstore's calls into an event loop orbax closed (`storage.quiet_closed_loops`)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  from jaxrec.checkpoint import storage  # pylint: disable=import-outside-toplevel
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OrbaxErrorsInOneLine) for f in handler.filters):
    handler.addFilter(_OrbaxErrorsInOneLine())
  storage.quiet_closed_loops()


@contextlib.contextmanager
def _quiet_gin_lookup() -> Iterator[None]:
  """Drops what gin's Python-package lookup of a file logs (`system_path_file_exists`,
  `Path not found` for every include not on the filesystem): it came before the one-line
  `error:` of a missing include."""
  def keep(record: logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
  loggers = [logging.getLogger("absl"), logging.getLogger()]
  for logger in loggers:
    logger.addFilter(keep)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(keep)


def _unbound_macro(e: ValueError) -> str:
  """One line for gin's "No bindings specified for 'NAME/gin.macro' in config string: ..."."""
  m = re.match(r"No bindings specified for '(.+)/gin\.macro'", str(e))
  if not m:
    return f"--gin_file/--gin_bindings: {str(e).splitlines()[0]}"
  name, where = m.group(1), gin_usage.macro_use(m.group(1))
  return (f"{gin_usage.with_flag(where) + ': ' if where else ''}%{name} is used but never "
          f"bound; bind it (e.g. "
          f"`{name} = ...` in a gin file or --gin_bindings=\"{name}=...\") or fix the name")


def _starts_with_bom(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(3) == b"\xef\xbb\xbf"
  except OSError:
    return False


def _line(path: str, lineno: int | None) -> str:
  """Line `lineno` of file `path` ('' when there is none)."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
    return lines[lineno - 1] if lineno and 0 < lineno <= len(lines) else ""
  except (OSError, UnicodeDecodeError):
    return ""


def _shell_quoting(binding: str, message: str) -> str:
  """For a string value without its quotes (a shell removes them from
  `--gin_bindings=a.b='x'`): how to write the flag so that they stay."""
  m = re.search(r"a string needs quotes: '(.*)'$", message)
  if not m or "=" not in binding:
    return ""
  lhs, rhs = binding.split("=", 1)
  whole = repr(rhs.strip())
  if message.endswith(f"a string needs quotes: {whole}"):   # the whole value (a path)
    quoted = f"{lhs}={whole}"
  else:   # one word of it
    quoted = f"{lhs}={rhs.replace(m.group(1), repr(m.group(1)), 1)}"
  return f" (in a shell, quote the whole flag: --gin_bindings=\"{quoted}\")"


def bound_value(selector: str, default=None):
  """The value gin binds to `selector` (e.g. `ExperimentConfig.embedding`, `%tables`) with
  its `@x()` references called, as the configurable would receive it; `default` when it is
  not bound."""
  try:
    value = gin.query_parameter(selector)
  except (ValueError, KeyError):   # not bound
    return default
  return _evaluated(value)


def _evaluated(value):
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return build(fn) if value.evaluate else fn
  if isinstance(value, (list, tuple)):
    return type(value)(_evaluated(v) for v in value)
  if isinstance(value, dict):
    return {k: _evaluated(v) for k, v in value.items()}
  return value


# Where to set what a configurable takes from the trainer (gin refuses those bindings).
_SET_INSTEAD = {"seed": "--seed", "bad_rows": "--bad_rows",
                "source": "--train_data / --eval_data (or ExperimentConfig.train_data / eval_data)",
                "num_dense": "ExperimentConfig.num_dense",
                "batch_size": "ExperimentConfig.batch_size / eval_batch_size",
                "synthetic_examples": "ExperimentConfig.num_eval_examples",
                "features": "ExperimentConfig.embedding", "rows": "ExperimentConfig.embedding",
                "split": "nothing: the trainer reads its train and eval splits itself",
                "max_to_keep": "--keep_checkpoints", "save_every": "--checkpoint_every"}


def _set_by(e: BaseException) -> str:
  """For gin's "has denylisted kwarg 'X'": where X is set instead."""
  m = re.search(r"has denylisted kwarg '(\w+)'", str(e))
  if not m:
    return ""
  where = _SET_INSTEAD.get(m.group(1))
  return f" (the trainer passes it{'; set it with ' + where if where else ' itself'})"


def build(make):
  """`make()` (a gin configurable, e.g. `ExperimentConfig`); a binding the gin files left
  out becomes a one-line `ConfigError` naming it, not a traceback."""
  try:
    return make()
  except RuntimeError as e:
    if "Required bindings" not in str(e):
      raise
    raise ConfigError(f"--gin_file: {_one_line(user_message(e))}{_required_hint(str(e))}"
                      ) from None
  except TypeError as e:   # a referenced `@X()` whose arguments without defaults are unbound
    message = _unbound_arguments(str(e))
    if message is None:
      raise
    raise ConfigError(message) from None


def _required_hint(text: str) -> str:
  """For gin's "Required bindings for `X` not provided in config: ['p']": the bindings of
  `X.p` under a scope, and the scopes `@scope/X()` is called in (`sprse/lr_schedule.name`
  bound, `@sparse/lr_schedule()` called: the message named neither)."""
  m = re.search(r"Required bindings for `([\w.]+)` not provided in config: \[(.*?)\]", text)
  if not m:
    return ""
  name = m.group(1).rsplit(".", 1)[-1]
  found = [f"{n} at {w}" for p in re.findall(r"'(\w+)'", m.group(2))
           for n, w in gin_usage.scoped_elsewhere(name, p)]
  if not found:
    return ""
  called = sorted(set(re.findall(rf"@((?:[\w.]+/)*){re.escape(name)}\(", gin.config_str())))
  calls = ", ".join(f"@{c}{name}()" for c in called) or f"@{name}()"
  return f" (bound only in another scope: {'; '.join(found)}; the config calls {calls})"


def _unbound_arguments(text: str) -> str | None:
  """One line for gin's TypeError "X() missing ... No values supplied by Gin or caller for
  arguments: [...] ... In call to configurable 'X'" (None for other TypeErrors)."""
  args = re.search(r"No values supplied by Gin or caller for arguments: \[(.*?)\]", text)
  where = re.search(r"In call to configurable '([\w.]+)'(?: \([^)\n]*\))?"   # the innermost
                    r"(?: in scope '([\w/.]+)')?", text)                     # call
  if not args or not where:
    return None
  name = where.group(1).rsplit(".", 1)[-1]
  if where.group(2):   # `@cat/TableSpec()`: its scope (one of several specs), and where its
    name = f"{where.group(2)}/{name}"   # other bindings are (the missing one has no line)
  names = [f"{name}.{a}" for a in re.findall(r"'(\w+)'", args.group(1))]
  if not names:
    return None
  it = "them" if len(names) > 1 else "it"
  listed = " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
  line = gin_usage.first_bound(f"{name}.") if where.group(2) else None
  at = f"{line}: " if line and not line.startswith("--") else ""   # FILE:LINE, not a flag
  return (f"--gin_file: {at}@{name}() is called with {listed} not bound (no default "
          f"for {it}); bind {it} in the gin file or with --gin_bindings")


_GIN_CONTEXT = "\n  In call to configurable "


def user_message(e: BaseException) -> str:
  """The message of a user-facing error, without the `In call to configurable ...` lines
  gin appends when the error passes through a configurable (keeps it one line)."""
  text = str(e)
  cut = text.find(_GIN_CONTEXT)
  text = text if cut < 0 else text[:cut]
  return gin_usage.locate(text) if isinstance(e, ConfigError) else text


_GIN_LOCATION = re.compile(r'^(.*?)\s*In file "(.+?)", line (\d+)\s*(.*)$')


def _located(path: str, message: str) -> str:
  """`FILE:LINE: message (in 'LINE TEXT')` from gin's `message In file "F", line N TEXT`
  (as syntax errors read; F may be a file `path` includes); `path: message` without one.
  An error in an included file carries the include chain after the text (`... TEXT In
  file "G", line 1 include 'F'`), which was quoted as part of the line: it becomes
  `(included at G:1)`, as `_text_error` says it (innermost first)."""
  m = _GIN_LOCATION.match(message)
  if not m:
    return f"{path}: {message}"
  text, where, line, rest = m.groups()
  source, *chain = _INCLUDED_FROM.split(rest)   # [text, file, line, text, file, line, ...]
  including = [f"{f}:{n}" for f, n in zip(chain[0::3], chain[1::3])]
  return (f"{where}:{line}: {text.rstrip('.')}" + (f" (in '{source}')" if source else "")
          + (f" (included at {', '.join(including)})" if including else ""))


_INCLUDED_FROM = re.compile(r'\s*In file "(.+?)", line (\d+)\s*')


_INCLUDE = re.compile(r"""^include\s+(['"])(.+?)\1\s*(?:#.*)?$""")   # a comment may follow


def _missing_include(e: Exception) -> str | None:
  """`FILE:LINE: include 'NAME': no such file` when `e` is gin failing to find an included
  file: its IOError (`Unable to open file ...`), or a TypeError (`expected str ... not
  NoneType`) from its Python-package lookup when NAME's directory is also a directory here
  (`configs/x.gin` from the repository root). None for any other error."""
  if not isinstance(e, (OSError, TypeError)):
    return None
  m = _GIN_LOCATION.match(_one_line(e))
  # the include's own line, then where its file was included, innermost first
  source, *chain = _INCLUDED_FROM.split(m.group(4)) if m else [""]
  include = _INCLUDE.match(source)
  if not include:
    return None
  name = include.group(2)
  within = [f"{f}:{n}" for f, n in zip(chain[0::3], chain[1::3])]
  within = f" (included at {', '.join(within)})" if within else ""
  if os.path.isdir(name):   # (gin's IOError said 'no such file' for it too)
    return f"{m.group(2)}:{m.group(3)}: include '{name}': is a directory, not a gin file{within}"
  return (f"{m.group(2)}:{m.group(3)}: include '{name}': no such file (a relative "
          f"path is read from the current directory, {os.getcwd()}){within}")


def _one_line(e: BaseException) -> str:
  text = str(e.args[0]) if getattr(e, "args", None) else str(e)
  return " ".join(text.split())


@contextlib.contextmanager
def user_errors(interrupted: Callable[[str], str] | None = None) -> Iterator[None]:
  """Turns user-facing errors into `error: ...` on stderr and exit code 1 (no traceback);
  SIGINT (KeyboardInterrupt) and SIGTERM (`signals.TerminateRequested`, from `signals.check()`)
  into `error: ` + `interrupted(signal name)` (or `interrupted`) and exit code 130 / 143."""
  try:
    yield
  except JaxrecError as e:
    logging.shutdown()
    print(f"error: {user_message(e)}", file=sys.stderr)
    sys.exit(1)
  except (KeyboardInterrupt, signals.TerminateRequested) as e:
    name = signals.name(e)
    print(f"error: {interrupted(name)}" if interrupted else "interrupted", file=sys.stderr)
    sys.exit(signals.exit_code(e))
  except termination.Terminated as e:   # SIGTERM (SIGHUP): a checkpoint was saved first
    logging.shutdown()
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
