"""Runs scripts/train.py and SIGKILLs it at a chosen moment (tests of exact resume).

  JAXREC_TEST_KILL=save:14 python tests/scripts/kill_points.py <train.py flags>

  save:N   mid-save of checkpoint N: orbax's temporary step directory exists and half of
           the tables are written into it when the process dies
  step:N   mid-step: right after step N is dispatched, before its result exists
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _die():
  print(f"kill_points: SIGKILL at {os.environ['JAXREC_TEST_KILL']}", file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_mid_save(step: int) -> None:
  from jaxrec.checkpoint import tables  # pylint: disable=import-outside-toplevel
  real = tables.write_pieces

  async def write_pieces(directory, arrays, pieces, chunk_bytes=tables.CHUNK_BYTES):
    tmp = directory.parent.name   # <step>.orbax-checkpoint-tmp-<time>/embeddings
    if tmp.startswith(f"{step}.") and "tmp" in tmp:
      half = sorted(arrays)[:max(1, len(arrays) // 2)]
      await real(directory, {k: arrays[k] for k in half},
                 [p for p in pieces if p.array in half], chunk_bytes)
      _die()
    await real(directory, arrays, pieces, chunk_bytes)
  tables.write_pieces = write_pieces


def _kill_mid_step(step: int) -> None:
  from jaxrec.train import step as step_lib  # pylint: disable=import-outside-toplevel
  real = step_lib.make_train_step

  def make_train_step(*args, **kwargs):
    fn = real(*args, **kwargs)

    def train_step(state, batch, *step_args):   # the tier's slot rows, if it keys any
      before = int(state["step"])
      out = fn(state, batch, *step_args)   # dispatched, not waited for
      if before + 1 == step:
        _die()
      return out
    return train_step
  step_lib.make_train_step = make_train_step


def main():
  point, _, step = os.environ["JAXREC_TEST_KILL"].partition(":")
  {"save": _kill_mid_save, "step": _kill_mid_step}[point](int(step))
  script = os.path.join(ROOT, "scripts", "train.py")
  sys.argv = [script] + sys.argv[1:]
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
