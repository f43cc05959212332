"""Clearer gin errors: 'did you mean ...?' for an unknown configurable or parameter, what
an unparsable value should look like, and where a file stops being text gin can read."""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import re
import tokenize

import gin

_UNKNOWN_CONFIGURABLE = re.compile(
    r"No configurable matching (?:reference )?'@?([\w./]+?)(?:\(\))?'")
_UNKNOWN_PARAMETER = re.compile(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'")
_NOT_PARAMETERS = {"self", "parent", "name"}   # flax modules' own constructor arguments
_BAD_TOKEN = re.compile(r"Failed to parse token '([^']*)'")
_BINDING = re.compile(r"^\s*[\w./]+\s*=\s*(.*?)\s*$")   # `scope/selector.param = value`
_PYTHON_CONSTANTS = {"true": "True", "false": "False", "none": "None", "null": "None"}


def unparsable_value(message: str) -> str:
  """gin's "malformed node or string ... <ast.Name object at 0x...> Failed to parse token
  'dlrm'" as what the value should be (`'dlrm'` in quotes, `True` for `true`), its "EOF in
  multi-line statement" with what is unclosed; `message` unchanged for other errors."""
  if message.startswith("EOF in multi-line statement"):   # gin gives no line for it
    return f"{message}: a (, [ or {{ is not closed (or a string's quote)"
  m = _BAD_TOKEN.search(message)
  if not m:
    return message
  token = m.group(1)
  if token.lower() in _PYTHON_CONSTANTS:
    return f"cannot parse the value {token}; write {_PYTHON_CONSTANTS[token.lower()]}"
  if token in _configurable_names():
    return f"cannot parse the value {token}; a configurable is referenced as @{token}()"
  return f"cannot parse the value {token}; a string needs quotes: '{token}'"


def unquoted_string(message: str, statement: str) -> str | None:
  """When gin could not parse `statement` (`selector = value`, one line) because its value
  is a string without quotes that is not one word, e.g. a path (`data/day_0.tsv`,
  `/data/criteo`: gin names only the first token, or says "Unable to parse value."), what
  to write: the whole value in quotes. None otherwise (then `unparsable_value`)."""
  if not (message.startswith("Unable to parse value") or _BAD_TOKEN.search(message)):
    return None
  m = _BINDING.match(statement)
  value = m.group(1) if m else ""
  if not value or not re.fullmatch(r"[^'\"()\[\]{}@%,\s]+", value) or value.isidentifier():
    return None   # empty, quoted, a tuple, a reference, or one word (`unparsable_value`)
  try:
    ast.literal_eval(value)
    return None   # a number: not a missing quote
  except (ValueError, SyntaxError):
    pass
  return f"cannot parse the value {value}; a string needs quotes: {value!r}"


_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
               ast.Pow: lambda a, b: a ** b}


def arithmetic_value(message: str, statement: str) -> str | None:
  """When gin stopped at arithmetic in a value (`rows = 2**20`, `1024*8`: it reads
  literals only, and said just "Expected newline."), the number to write instead; None
  for any other statement."""
  m = _BINDING.match(statement)
  if not message.startswith("Expected newline") or not m:
    return None
  try:
    tree = ast.parse(m.group(1), mode="eval").body
  except SyntaxError:
    return None

  def value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
      left, right = value(node.left), value(node.right)
      if isinstance(node.op, ast.Pow) and abs(right) > 64:   # 2**10**9 would not end
        raise ValueError(node)
      return _ARITHMETIC[type(node.op)](left, right)
    raise ValueError(node)

  if not isinstance(tree, ast.BinOp):
    return None
  try:
    number = value(tree)
  except (ValueError, ArithmeticError):
    return None
  return (f"gin reads literal values only, not arithmetic such as {m.group(1)}: write "
          f"{number!r}")


def did_you_mean(message: str) -> str:
  """`; did you mean X?` (with a configurable's parameters) for a gin error `message` about
  an unknown configurable or parameter; '' for other errors or when nothing is close."""
  m = _UNKNOWN_PARAMETER.search(message)
  if m:
    return _parameter_hint(*m.groups())
  m = _UNKNOWN_CONFIGURABLE.search(message)
  if m:
    name = m.group(1).rsplit("/", 1)[-1]   # a scope is not part of the name
    close = _close(name, _configurable_names())
    return f"; did you mean {' or '.join(close)}?" if close else ""
  return ""


def _parameter_hint(selector: str, arg: str) -> str:
  params = _parameters(selector)
  if not params:
    return ""
  close = _close(arg, params)
  short = selector.rsplit(".", 1)[-1]
  guess = f"; did you mean {' or '.join(close)}?" if close else ""
  return f"{guess} ({short} takes: {', '.join(params)})"


def _configurable_names() -> list[str]:
  names = {c.selector.rsplit(".", 1)[-1]
           for _, c in gin.config._REGISTRY.items()}   # pylint: disable=protected-access
  return sorted(n for n in names if not n.startswith("_"))


def _parameters(selector: str) -> list[str]:
  """The names a binding of configurable `selector` may set (its keyword parameters)."""
  found = gin.config._REGISTRY.get_match(selector)   # pylint: disable=protected-access
  if found is None:
    return []
  try:
    signature = inspect.signature(found.wrapped)
  except (TypeError, ValueError):
    return []
  deny = set(found.denylist or ()) | _NOT_PARAMETERS
  return [p.name for p in signature.parameters.values()
          if p.name not in deny and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
          and (not found.allowlist or p.name in found.allowlist)]


def _close(word: str, choices: list[str]) -> list[str]:
  """Up to 3 of `choices` that start with `word` (`temp` -> `temperature`), else close to
  it; case ignored (`dlrm` -> `DLRM`)."""
  lower = {c.lower(): c for c in choices}
  starting = [c for c in lower if c.startswith(word.lower())]
  return [lower[c] for c in starting[:3] or difflib.get_close_matches(
      word.lower(), list(lower), n=3, cutoff=0.6)]


def text_error(path: str) -> str | None:
  """`PATH:LINE: what` when the gin file `path` is not text gin can tokenize: bytes that
  are not UTF-8 (gin said only `utf-8`), or a bracket or triple-quoted string still open at
  the end of the file (gin's "EOF in multi-line statement", without a line). None when it
  reads and tokenizes."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError:
    return None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    start = data.rfind(b"\n", 0, e.start) + 1
    line = data.count(b"\n", 0, e.start) + 1
    column = len(data[start:e.start].decode("utf-8", "replace")) + 1
    return (f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column "
            f"{column}); save the file as UTF-8")
  opened: list[tokenize.TokenInfo] = []
  try:
    for token in tokenize.generate_tokens(io.StringIO(text.lstrip("\ufeff")).readline):
      if token.type == tokenize.OP and token.string in "([{":
        opened.append(token)
      elif token.type == tokenize.OP and token.string in ")]}" and opened:
        opened.pop()
  except tokenize.TokenError as e:
    if "string" in str(e.args[0]) and len(e.args) > 1:   # (its start: line, column)
      line, column = e.args[1]
      return (f"{path}:{line}: the string at column {column + 1} is not closed by the end "
              "of the file")
    if opened:   # the outermost: where the statement begins
      line, column = opened[0].start
      return (f"{path}:{line}: the '{opened[0].string}' at column {column + 1} is not "
              "closed by the end of the file")
    return f"{path}: {e.args[0]}"
  return None
