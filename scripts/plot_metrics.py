"""Plots loss, eval AUC and examples/sec vs step for one or more workdirs.

  python scripts/plot_metrics.py --workdir=W1 [--workdir=W2 ...] [--output=PNG]
"""

import sys

from absl import app, flags

from jaxrec import cli_flags
from jaxrec.errors import JaxrecError
from jaxrec.train import plotting

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
