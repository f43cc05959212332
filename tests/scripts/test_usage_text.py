"""`--help` prints each script's module docstring (absl): its usage lines as written."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_the_docstring_is_its_source_text(path):
  """A `\\` ending a usage line of a plain docstring joined it with the next one, leaving a
  run of spaces in the middle (`... dlrm_synthetic.gin       [--gin_bindings=...`)."""
  source = open(path, encoding="utf-8").read()
  tree = ast.parse(source)
  doc = ast.get_docstring(tree, clean=False)
  if doc is None:
    pytest.skip("no module docstring")
  literal = ast.get_source_segment(source, tree.body[0].value)
  text = literal.lstrip("rRuU")[3:-3]   # the lines between the triple quotes
  assert doc == text
