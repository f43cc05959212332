"""`W/config.gin` and `W/plan.json`, the records of what a run trains, written once its
restore accepted the checkpoint (a run it refuses leaves the last run's files)."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from jaxrec import elastic, gin_usage
from jaxrec.errors import ConfigError
from jaxrec.files import write_text_atomic
from jaxrec.train.config import RunOptions, config_gin_header

log = logging.getLogger("jaxrec")


def write(workdir: str, operative_gin: str, plan_result, trains: bool, options: RunOptions,
          unwritten: Sequence[str] = (), resumed: str | None = None) -> None:
  """Warns about unused gin bindings and writes `config.gin` and `plan.json`. Every
  configurable of the run has been called by now; a run that only evaluates opens no
  training data, and keeps the config.gin and plan.json of the run that trained (with its
  data pipeline's settings), unless there are none. A file it cannot write (e.g. an immutable
  one: the directory was checked) is a ConfigError naming it. `resumed`: config.gin's
  header line for a resume with another config (`config_changes.note`)."""
  unused = gin_usage.warning(not_called=() if trains else ("make_train_iterator",))
  if unused:
    log.warning("%s", unused)
    elastic.report_warning(unused)   # under launch.py: on its stderr, not only 0.log
  # whole or not at all: `--plan=W/plan.json` reads it back on the next start; like
  # config.gin, the plan of the run that trained is kept by one that only evaluates
  header = config_gin_header(options, unwritten)
  if resumed:   # in place of its "Rerun it with ..." lines: this file alone does not
    header = header.split("\n")[0] + "\n" + resumed + "\n"
  for name, text in (("config.gin", lambda: header + operative_gin),
                     ("plan.json", lambda: plan_result.dumps())):
    path = os.path.join(workdir, name)
    if not trains and os.path.exists(path):
      continue
    try:
      write_text_atomic(path, text())
    except OSError as e:   # a full disk's ENOSPC from write() names no file
      raise ConfigError(f"--workdir: cannot write {path}: {e.strerror or e}") from None
