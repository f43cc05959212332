"""Every benchmark line with a `"goal"` says which way it is met (`"goal_op"`)."""

import ast
import glob
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "benchmarks")


def _goal_calls(path):
  """(line, keywords) of each call in `path` passing `goal=`."""
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      names = {k.arg for k in node.keywords}
      if "goal" in names:
        yield node.lineno, names


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(BENCH, "*.py"))),
                         ids=os.path.basename)
def test_goal_comes_with_goal_op(path):
  """checkpoint, input_pipeline, offload and elastic printed "goal" alone."""
  missing = [line for line, names in _goal_calls(path) if "goal_op" not in names]
  assert not missing, f"{os.path.basename(path)}: goal without goal_op at lines {missing}"
