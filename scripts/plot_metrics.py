"""Plots loss, eval AUC and examples/sec vs step for one or more workdirs.

  .venv/bin/python scripts/plot_metrics.py --workdir=W1 [--workdir=W2 ...] [--output=PNG]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from jaxrec import cli_flags  # noqa: E402
from jaxrec.errors import JaxrecError  # noqa: E402
from jaxrec.train import plotting  # noqa: E402

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory; repeat to overlay runs.",
                                     required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Image path, any extension matplotlib writes "
                              "(.png, .pdf, .svg, ...); default <first workdir>/metrics.png.")


def main(argv):
  del argv   # cli_flags.parse refuses arguments that are not flags
  try:
    path = plotting.plot_metrics(_WORKDIR.value, _OUTPUT.value)
  except JaxrecError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(path)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse)
