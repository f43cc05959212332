"""Every script finds jaxrec from a plain checkout: `sys.path.insert(0, <repo root>)` runs
before its first jaxrec import (preprocess.py and plot_metrics.py had none and worked only
with jaxrec installed)."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))


def _first_jaxrec_import(tree: ast.Module) -> int | None:
  lines = [n.lineno for n in ast.walk(tree)
           if (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "jaxrec")
           or (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "jaxrec"
                                                 for a in n.names))]
  return min(lines, default=None)


def _path_insert(tree: ast.Module) -> int | None:
  """Line of a module-level `sys.path.insert(0, ...)`, None if there is none."""
  for n in tree.body:
    if (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
        and ast.unparse(n.value.func) == "sys.path.insert"):
      return n.lineno
  return None


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_the_script_puts_the_repo_root_on_sys_path_before_importing_jaxrec(path):
  tree = ast.parse(open(path).read(), path)
  first = _first_jaxrec_import(tree)
  insert = _path_insert(tree)
  name = os.path.relpath(path, ROOT)
  assert first is not None, f"{name} imports nothing from jaxrec"
  assert insert is not None and insert < first, (
      f"{name}:{first} imports jaxrec without a sys.path.insert of the repo root before it")
