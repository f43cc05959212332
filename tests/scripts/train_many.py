"""Runs scripts/train.py's `main` once per flag list, all in this one process.

  python tests/scripts/train_many.py CASES.json RESULTS.json

CASES.json holds a list of flag lists; RESULTS.json gets `[{"returncode": int, "stderr":
str}]`, one per case, as a separate `train.py` process would have produced them. For the
tests of the script's one-line errors, which fail before anything compiles: one process
start (~3 s of jax import) serves every case instead of one each.
"""

import contextlib
import importlib.util
import io
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from jaxrec import cli_flags  # noqa: E402


class _CurrentStderr:
  """A stream that writes to whatever `sys.stderr` is at the time, so log records (jax's
  `Compiling ...` under JAX_LOG_COMPILES included) land in the case's captured stderr."""

  def write(self, text):
    return sys.stderr.write(text)

  def flush(self):
    sys.stderr.flush()


def _load_train_script():
  spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts",
                                                                             "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_case(train_script, argv):
  """`{"returncode", "stderr"}` of `train.py ARGV`, as `absl.app.run` would exit."""
  flags.FLAGS.unparse_flags()   # the previous case's values (its log line is not the case's)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:   # as `app.run(main, flags_parser=cli_flags.parse)` in scripts/train.py
      train_script.main(cli_flags.parse(["train.py", *argv]))
      code = 0
    except SystemExit as e:
      if isinstance(e.code, str):   # sys.exit("message"): printed, exit status 1
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
  return {"returncode": code, "stderr": err.getvalue()}


def main():
  cases_path, results_path = sys.argv[1:3]
  with open(cases_path) as f:
    cases = json.load(f)
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=_CurrentStderr())
  train_script = _load_train_script()
  results = [run_case(train_script, argv) for argv in cases]
  with open(results_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
