"""How a data script (scripts/preprocess.py, scripts/build_vocab.py) ends on an error or an
interrupt: one `error: ...` line and exit 1, or one `interrupted (Ctrl-C | SIGTERM): ...`
line and exit 130 / 143 (`signals.exit_code`), never a traceback."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from jaxrec import signals
from jaxrec.errors import JaxrecError

T = TypeVar("T")


def signal_word(name: str) -> str:
  """How the interrupted lines name signal `name`: Ctrl-C for SIGINT."""
  return "Ctrl-C" if name == "SIGINT" else name


def run(body: Callable[[], T], interrupted: str) -> T:
  """`body()`'s result; a user-facing error (a `JaxrecError`, gin's errors, I/O) is printed
  as one `error:` line, exit 1; Ctrl-C or SIGTERM (deferred by `signals.defer`) as
  `interrupted (<signal>): <interrupted>`, exit 128 + the signal."""
  from jaxrec.launch import user_message  # pylint: disable=import-outside-toplevel
  try:
    return body()
  except JaxrecError as e:
    print(f"error: {user_message(e)}", file=sys.stderr)
    sys.exit(1)
  except SyntaxError as e:  # gin parse errors
    print(f"error: {e.filename}:{e.lineno}: {e.msg}", file=sys.stderr)
    sys.exit(1)
  except (ValueError, TypeError, RuntimeError, OSError) as e:  # gin bindings, I/O
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)
  except (KeyboardInterrupt, signals.TerminateRequested) as e:
    print(f"interrupted ({signal_word(signals.name(e))}): {interrupted}", file=sys.stderr)
    sys.exit(signals.exit_code(e))
