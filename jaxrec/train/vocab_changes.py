"""A run from a checkpoint reading its ids through another id vocabulary than the one the
checkpoint's tables were trained through.

A checkpoint's meta records the vocabulary as `vocab.record` does (`{"path",
"fingerprint"}`, None without one): the fingerprint hashes the tables' kept ids, so the
same vocabulary copied or moved elsewhere is the same one, and one rebuilt in place (from
the next day's data) is another, whose rows hold other ids. Compared as bound paths
instead, a moved vocabulary was refused, and one rebuilt in place scored an evaluate-only
run's data with every row moved (eval_auc 0.7725 -> 0.5139) without a word.
"""

from __future__ import annotations

from typing import Mapping

from jaxrec.errors import ConfigError


def said(record: Mapping | None) -> str:
  if record is None:
    return "no vocabulary (ids % rows)"
  return f"vocabulary '{record['path']}' (fingerprint {record['fingerprint']})"


def _unreadable(recorded) -> bool:
  """Whether a checkpoint's vocabulary record is neither None nor `{..., "fingerprint"}`."""
  return recorded is not None and not (isinstance(recorded, Mapping)
                                       and isinstance(recorded.get("fingerprint"), str))


def same(a: Mapping | None, b: Mapping | None) -> bool:
  return (a is None and b is None) or (
      a is not None and b is not None and a.get("fingerprint") == b.get("fingerprint"))


def check(recorded, run: Mapping | None, step: int, data: str, verb: str, then: str) -> None:
  """`ConfigError` unless this run's vocabulary `run` is the one checkpoint `step` recorded
  (`recorded`, compared by fingerprint), naming both."""
  if _unreadable(recorded):   # not checked (the meta's other checks stand)
    return
  if same(recorded, run):
    return
  if recorded is None:
    fix = "unbind open_source.vocab (gin)"
  else:
    fix = (f"bind open_source.vocab to a directory holding vocabulary {recorded['fingerprint']}"
           f" (it was '{recorded['path']}'; a copy anywhere will do)")
  moved = (" (rebuilt in place: the same path holds another vocabulary)"
           if recorded is not None and run is not None and recorded["path"] == run["path"]
           else "")
  raise ConfigError(
      f"checkpoint {step} was trained on categorical ids read through {said(recorded)}, but "
      f"this run reads its {data} through {said(run)}{moved}: the model would {verb} ids "
      f"mapped to other rows than it learned them in; {fix} to {then}")


def copy_warning(recorded, run: Mapping | None, step: int) -> str | None:
  """The warning of a training run from a copy of checkpoint `step` without its data
  position (`convert_checkpoint.py --restart_data`: it may read new data as it likes)
  through another vocabulary than the tables were trained through; None when the same."""
  if _unreadable(recorded):
    return None
  if same(recorded, run):
    return None
  return (f"warning: checkpoint {step}'s tables were trained on ids read through "
          f"{said(recorded)}; this run reads them through {said(run)}: a row holds "
          "what it learned for another id (a rebuilt vocabulary renumbers its ids), so this "
          "trains on from rows that no longer match their ids. To keep what the tables "
          "learned, read the new data through the recorded vocabulary (new ids share row 0)")
