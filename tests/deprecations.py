"""Deprecation warnings raised from jaxrec's own code (tests/train/test_deprecations.py).

A warning counts when Python attributes it to a file of the `jaxrec` package, i.e. the
deprecated call is in jaxrec: library deprecation shims warn at their caller's line.
Libraries warning about their own internals (flax's `Traversal` at import, jax 0.11's
Pallas Triton backend inside the lowering: docs/architecture.md#upgrading-jax) are
attributed to their own files and do not count.
"""

import contextlib
import pathlib
import warnings

import jaxrec

JAXREC_DIR = pathlib.Path(jaxrec.__file__).resolve().parent
CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def from_jaxrec(records: list[warnings.WarningMessage]) -> list[str]:
  """`file:line: Category: message` of each deprecation warning raised from jaxrec's code
  (each once)."""
  return list(dict.fromkeys(
      f"{r.filename}:{r.lineno}: {r.category.__name__}: {r.message}" for r in records
      if issubclass(r.category, CATEGORIES)
      and pathlib.Path(r.filename).resolve().is_relative_to(JAXREC_DIR)))


@contextlib.contextmanager
def none_from_jaxrec():
  """Fails (AssertionError naming file and line) if the block's jaxrec code raises one."""
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    yield
  found = from_jaxrec(records)
  assert not found, "jaxrec code raised deprecation warnings:\n" + "\n".join(found)
