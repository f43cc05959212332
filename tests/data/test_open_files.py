"""A preprocessed dataset of more shards than the process's open-file limit (`ulimit -n`):
each shard's memory map holds a file descriptor, and past the limit opening it was an
OSError traceback (`Too many open files`); Criteo 1TB at the default --shard_examples is
~1,043 shards, past a usual limit of 1,024. Run in child processes: their limits are
lowered, which the test process could not undo."""

import os
import subprocess
import sys

import data_testlib as lib
from jaxrec.data import binary, binary_write, synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Opens DIR (argv[1]) with the open-file limit lowered to SOFT, HARD files (argv[2:4], as
# many more than are open now; HARD `same`: as it is); prints the examples and whether the
# soft limit was raised.
CHILD = """
import os, resource, sys
import data_testlib as lib
from jaxrec.data import binary
from jaxrec.errors import DataError
used = len(os.listdir("/proc/self/fd"))
soft = used + int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if sys.argv[3] == "same" else (
    used + int(sys.argv[3]))
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
try:
  src = binary.BinarySource(sys.argv[1], lib.layout(n=1000), verify_checksums=False)
except DataError as e:
  print("error:", e)
else:
  print(src.num_examples, src.gather([0, 299]).labels.shape,
        resource.getrlimit(resource.RLIMIT_NOFILE)[0] > soft)
"""


def _open_limited(directory, soft, hard):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  proc = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(soft), str(hard)],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_more_shards_than_the_open_file_limit(tmp_path):
  path = str(tmp_path / "train.tsv")
  synthetic.write_tsv(path, synthetic.SyntheticSource(lib.layout(n=1000), seed=2), 300)
  out = tmp_path / "bin"
  binary_write.preprocess(path, str(out), lib.features(), lib.rows(1000), shard_examples=4)
  # 75 shards, 40 files more allowed (soft) than open: the limit is raised to the hard one
  assert _open_limited(out, 40, "same") == "300 (2,) True"
  # the hard limit has no room for them: one line saying what to do
  message = _open_limited(out, 40, 40)
  assert message.startswith(f"error: {out}: its 75 shards need as many open files at once, "
                            "past this process's limit (`ulimit -Hn` "), message
  assert message.endswith("raise it, or re-run scripts/preprocess.py with a larger "
                          "--shard_examples (fewer, larger shards)"), message
