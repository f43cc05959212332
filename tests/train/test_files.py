"""`jaxrec.files`: atomic writes (the old file or the new one, never a torn one), the
workdir made for a run and its one-line errors."""

import os

import pytest

from jaxrec.files import write_text_atomic


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "plan.json"
  write_text_atomic(path, "old")
  write_text_atomic(path, "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["plan.json"]


def test_failure_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "config.gin"
  path.write_text("old")

  def fail(src, dst):
    raise KeyboardInterrupt   # e.g. Ctrl-C between the write and the rename

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(KeyboardInterrupt):
    write_text_atomic(path, "new")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.gin"]


def test_unwritable_directory_raises_oserror(tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("")
  with pytest.raises(OSError):
    write_text_atomic(blocker / "x.json", "{}")


def test_a_read_only_checkpoints_directory_is_refused_at_start(tmp_path, monkeypatch):
  """A read-only `W/checkpoints` failed only at the first save, and orbax's threads then
  waited 5 minutes before the process exited. `check_workdir` tries writing there first.
  (Simulated: as root, permission bits do not stop writes; a read-only mount would.)"""
  import errno  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import workdir_checks  # pylint: disable=import-outside-toplevel
  (tmp_path / "w" / "checkpoints").mkdir(parents=True)
  workdir_checks.check_workdir(str(tmp_path / "w"))
  real = tempfile.TemporaryFile

  def read_only(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if str(dir).endswith("checkpoints"):
      raise OSError(errno.EROFS, "Read-only file system")
    return real(*args, dir=dir, **kwargs)

  monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
  assert files.is_writable(tmp_path) and not files.is_writable(tmp_path / "w" / "checkpoints")
  with pytest.raises(ConfigError, match=r"--workdir: cannot write in .*w/checkpoints "
                     r"\(read-only or no permission\)"):
    workdir_checks.check_workdir(str(tmp_path / "w"))


@pytest.mark.parametrize("name,make,message", [
    ("metrics.jsonl", "dir", r"cannot write .*w/metrics.jsonl: Is a directory"),
    ("profile.jsonl", "dir", r"cannot write .*w/profile.jsonl: Is a directory"),
    ("metrics.jsonl", "eperm", r"cannot write .*w/metrics.jsonl: Operation not permitted"),
    ("tb", "file", r"cannot write in .*w/tb \(not a directory, read-only or no permission\)"),
    ("offload", "file", r"cannot write in .*w/offload \(not a directory, read-only or no "
     r"permission\), which holds the stores of the offloaded tables without a 'path' in "
     r"OffloadConfig.tables$")])
def test_an_earlier_runs_file_this_run_cannot_write_is_refused_at_start(tmp_path, monkeypatch,
                                                                        name, make, message):
  """A file left in W that this run appends to but cannot (e.g. owned by another user after
  a `sudo` run) was a traceback: metrics.jsonl and tb/ when opened, profile.jsonl only at
  the first log step, after training. (`eperm`: simulated, as root ignores permission bits;
  `chattr +i` gives it.)"""
  import builtins  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import workdir_checks  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  w.mkdir()
  (w / name).mkdir() if make == "dir" else (w / name).write_text("{}\n")
  if make == "eperm":
    real = builtins.open

    def no_append(file, mode="r", *args, **kwargs):
      if str(file) == str(w / name) and "a" in mode:
        raise PermissionError(1, "Operation not permitted", str(file))
      return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_append)
  with pytest.raises(ConfigError, match=rf"^--workdir: {message}"):
    workdir_checks.check_workdir(str(w))
  monkeypatch.undo()
  assert (w / name).is_dir() if make == "dir" else (w / name).read_text() == "{}\n"


def test_made_dir_removes_only_what_a_refused_body_created(tmp_path):
  """A run refused after `W` was made (bad --mesh) left `W` with only its lock file; a
  directory that existed before, or that got a file, must stay."""
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  new = tmp_path / "runs" / "new" / "w"
  with pytest.raises(KeyError), files.made_dir(new), files.workdir_lock(new):
    (new / "checkpoints").mkdir()
    raise KeyError("refused")
  assert not (tmp_path / "runs").exists()
  (tmp_path / "old").mkdir()
  for workdir, write in ((tmp_path / "old", False), (tmp_path / "kept", True)):
    with pytest.raises(KeyError), files.made_dir(workdir), files.workdir_lock(workdir):
      if write:
        (workdir / "metrics.jsonl").write_text("{}\n")
      raise KeyError("refused")
    assert workdir.is_dir()
  with files.made_dir(tmp_path / "ok"):
    pass
  assert (tmp_path / "ok").is_dir()


def test_a_run_refused_by_anothers_lock_leaves_that_runs_new_workdir(tmp_path):
  """Two runs started at once on a new W both found it missing; the one refused by the
  other's lock removed W, lock file included, so the first ran on unlocked and a third
  run in W was not refused (they then broke each other's checkpoints)."""
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  new = tmp_path / "runs" / "w"
  refused = files.made_dir(new)
  refused.__enter__()                       # the second run found `new` missing, made it
  with files.workdir_lock(new):             # the first run holds the lock
    with pytest.raises(ConfigError, match="is in use by another run") as e:
      with files.workdir_lock(new):
        pass
    refused.__exit__(e.type, e.value, e.tb)   # the refused run's clean-up
    assert (new / files.LOCK_NAME).is_file()
    with pytest.raises(ConfigError, match="is in use by another run"):   # a third run
      with files.workdir_lock(new):
        pass
  # a run that takes the lock while a refused run cleans up is refused, not left unlocked
  # in a directory the clean-up then removes
  failing, seen = tmp_path / "failing", []
  real_remove = files.remove_made

  def remove_while_another_starts(*args):
    with pytest.raises(ConfigError, match="is in use by another run") as refused:
      with files.workdir_lock(failing):
        pass
    seen.append(refused.value)
    return real_remove(*args)
  files.remove_made = remove_while_another_starts
  try:
    with pytest.raises(KeyError), files.made_dir(failing):
      with files.workdir_lock(failing):
        raise KeyError("a bad --mesh")
  finally:
    files.remove_made = real_remove
  assert seen and not failing.exists()
  # a lock taken in a directory that another run's clean-up removed meanwhile
  gone = tmp_path / "gone"
  with files.workdir_lock(gone):
    assert (gone / files.LOCK_NAME).is_file()


def test_a_deleted_or_replaced_lock_file_still_refuses_a_second_run(tmp_path):
  """Deleting `W/.jaxrec.lock` while a run held it let a second run lock a new file and
  start; it then moved the first's committing step to rejected/. The directory's own lock
  refuses it, naming the holder's pid from /proc/locks."""
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  with files.workdir_lock(w):
    for replace in (False, True):
      (w / files.LOCK_NAME).unlink()
      if replace:
        (w / files.LOCK_NAME).write_text("999999\n")
      with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}; "
                         r"its lock file .* was removed or replaced"):
        with files.workdir_lock(w):
          pass
      with pytest.raises(ConfigError, match=rf"in use by a job \(pid {os.getpid()}\)"):
        files.check_unlocked(w, files.LOCK_NAME, "a job")
  with files.workdir_lock(w):   # released with the run
    pass
  files.check_unlocked(w, files.LOCK_NAME, "a job")


def _denied(monkeypatch, path):
  """os.makedirs fails as it does under a parent without write permission (root is not
  stopped by permission bits)."""
  import errno  # pylint: disable=import-outside-toplevel

  def makedirs(name, mode=0o777, exist_ok=False):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

  monkeypatch.setattr(os, "makedirs", makedirs)


@pytest.mark.parametrize("how", ["chmod", "denied", "file_in_the_way"])
def test_a_workdir_that_cannot_be_created_is_a_one_line_error(tmp_path, monkeypatch, capsys,
                                                               how):
  """A parent of --workdir without write permission gave a PermissionError traceback."""
  from jaxrec import files, launch  # pylint: disable=import-outside-toplevel
  parent = tmp_path / "parent"
  parent.mkdir()
  workdir = parent / "runs" / "w"
  reason, failed = "Permission denied", parent / "runs"
  if how == "chmod":
    if os.geteuid() == 0:
      pytest.skip("root is not stopped by permission bits")
    parent.chmod(0o500)
  elif how == "denied":
    _denied(monkeypatch, parent / "runs")
  else:
    (parent / "runs").write_text("")
  # its logging.shutdown would close the handlers' streams: pytest's capture
  monkeypatch.setattr(launch.logging, "shutdown", lambda: None)
  try:
    with pytest.raises(SystemExit) as e, launch.user_errors(), files.made_dir(str(workdir)):
      pass
  finally:
    parent.chmod(0o700)
  assert e.value.code == 1
  err = capsys.readouterr().err
  if how == "file_in_the_way":   # the file in the way, not `w` (whose mkdir failed)
    assert err == f"error: --workdir={workdir}: {failed} is a file, not a directory\n", err
  else:
    assert err == f"error: --workdir={workdir}: cannot create {failed}: {reason}\n", err


def test_the_supervisors_workdir_that_cannot_be_created_is_a_one_line_error(tmp_path,
                                                                             monkeypatch):
  """scripts/launch.py creates `W/elastic` first: the same traceback there."""
  from jaxrec.elastic import supervisor as sup  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "runs" / "w"
  _denied(monkeypatch, tmp_path / "runs")
  with pytest.raises(ConfigError) as e:
    sup.Supervisor(sup.Options(num_processes=1, devices_per_process=2),
                   [f"--workdir={workdir}", "--gin_file=configs/x.gin"])
  assert str(e.value) == (f"--workdir={workdir}: cannot create {tmp_path / 'runs'}: "
                          "Permission denied")


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_a_file_in_the_way_is_named_at_any_depth(tmp_path, depth):
  """`--workdir=F/a/b` with `F` a file said `cannot create F/a: Not a directory`; `F` itself
  said `cannot create F: File exists`."""
  from jaxrec import files  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  blocker = tmp_path / "x" / "y"
  blocker.parent.mkdir()
  blocker.write_text("")
  workdir = os.path.join(blocker, *["d"] * depth)
  with pytest.raises(ConfigError) as e:
    files.make_dirs(workdir, "--output", shown="W")
  assert str(e.value) == f"--output=W: {blocker} is a file, not a directory"


def test_the_launcher_refuses_a_pipe_as_data(tmp_path):
  """`--train_data=<(zcat day_0.gz)` under scripts/launch.py: the workers do not inherit
  /dev/fd/N ("no such file or directory"), and a FIFO's stream was split between them (a
  torn line blamed the data)."""
  from jaxrec.elastic import train_args  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  with pytest.raises(ConfigError, match=rf"^--eval_data={fifo} is a pipe or other stream, not "
                     r"a file: under scripts/launch.py every worker, and every restart, opens "
                     r"the data itself; give the file"):
    train_args.TrainArgs.parse(["--workdir=w", "--gin_file=c.gin", f"--eval_data={fifo}"])
  (tmp_path / "day_0.tsv").write_text("")
  for ok in (tmp_path / "day_0.tsv", tmp_path, tmp_path / "*.tsv", "synthetic"):
    train_args.TrainArgs.parse(["--workdir=w", "--gin_file=c.gin", f"--train_data={ok}"])


def _refused_by_train_and_launch(workdir: str, message: str) -> None:
  """train.py (`workdir_checks.check_workdir`) and scripts/launch.py's worker flags both refuse
  `--workdir=workdir` with an error matching `message`."""
  from jaxrec.elastic import train_args  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import workdir_checks  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=message):
    workdir_checks.check_workdir(workdir)
  with pytest.raises(ConfigError, match=message):
    train_args.TrainArgs.parse([f"--workdir={workdir}", "--gin_file=c.gin"])


def test_a_workdir_starting_with_an_unexpanded_tilde_is_refused(tmp_path, monkeypatch):
  """`--workdir=~/runs/x`: bash leaves `~` after `=` as it is, and the run created
  `./~/runs/x`. An existing directory of that name (made on purpose) is still taken."""
  from jaxrec.elastic import train_args  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.train import workdir_checks  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  _refused_by_train_and_launch("~/runs/x", (
      r"^--workdir=~/runs/x: the shell does not expand '~' after '=' \(the path would "
      r"be a directory named '~' here\); write --workdir ~/runs/x, "
      r"--workdir=\$HOME/runs/x or an absolute path$"))
  with pytest.raises(ConfigError, match=r"^--train_data=~/d: the shell does not expand"):
    train_args.TrainArgs.parse(["--workdir=w", "--gin_file=c.gin", "--train_data=~/d"])
  assert os.listdir(tmp_path) == []
  (tmp_path / "~" / "runs" / "x").mkdir(parents=True)
  workdir_checks.check_workdir("~/runs/x")
  workdir_checks.check_workdir("runs~/x")


def test_a_path_with_a_backslash_is_refused_where_tensorstore_writes(tmp_path, monkeypatch):
  """tensorstore's file driver reads `\\` as a separator: `W='a\\b'` put its checkpoints
  (and offload stores) in `a/b`, a resume of `a\\b` found none, and another run's files
  there could be overwritten."""
  from jaxrec import files, offload  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.offload.config import check_paths  # pylint: disable=import-outside-toplevel
  from jaxrec.train import workdir_checks  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  _refused_by_train_and_launch("a\\b", (
      r"^--workdir: 'a\\b' holds a backslash, which tensorstore \(checkpoints, "
      r"offload stores, zarr\) reads as a directory separator: its files would go to "
      rf"'{tmp_path}/a/b'; use a path without '\\'$"))
  table = offload.OffloadTable("big", cache_rows=4, path=str(tmp_path / "s\\big"))
  with pytest.raises(ConfigError, match=r"^offloaded table 'big': its store directory "
                     r"\('path' in OffloadConfig.tables\): '.*/s\\big' holds a backslash"):
    check_paths(offload.OffloadConfig((table,)), str(tmp_path / "w"))
  (tmp_path / "c\\d").mkdir()
  monkeypatch.chdir(tmp_path / "c\\d")   # a relative path under such a directory
  with pytest.raises(ConfigError, match=r"^--workdir: 'w' \(the current directory is "
                     r"'.*/c\\d'\) holds a backslash"):
    files.check_tensorstore_path("--workdir", "w")
  assert sorted(os.listdir(tmp_path)) == ["c\\d"]
  workdir_checks.check_workdir(str(tmp_path / "plain"))


def test_convert_checkpoint_refuses_a_backslash_where_tensorstore_reads_or_writes(tmp_path):
  from tests.scripts.in_process import run_script  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "o\\p")
  for flags, what in ((["--checkpoint_dir=c\\d", f"--output={tmp_path / 'a.npz'}",
                        "--format=npz"], "--checkpoint_dir: 'c\\d'"),
                      (["--checkpoint_dir=c", f"--output={out}", "--format=zarr"],
                       f"--output: '{out}'")):
    r = run_script("convert_checkpoint.py", *flags)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {what} holds a backslash"), (
        r.stderr)
  assert os.listdir(tmp_path) == []


def _fake_steps(directory, *steps):
  for s in steps:   # a step directory holds a manifest (`storage.is_step_dir`)
    (directory / str(s) / "manifest").mkdir(parents=True)
    (directory / str(s) / "manifest" / "metadata").write_text("{}")


def test_a_checkpoint_directory_as_workdir_names_how_a_run_trains_from_it(tmp_path):
  """`--workdir=X/imported` (an import's --output) advised `--workdir=X`, which trained
  from fresh tables: a run reads only its workdir's `checkpoints/`."""
  from jaxrec.train import workdir_checks   # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError   # pylint: disable=import-outside-toplevel
  _fake_steps(tmp_path / "x" / "imported", 0)
  _fake_steps(tmp_path / "w" / "checkpoints", 4)
  for wrong in (tmp_path / "x" / "imported", tmp_path / "x" / "imported" / "0"):
    with pytest.raises(ConfigError) as e:
      workdir_checks.check_workdir(str(wrong))
    assert str(e.value) == (
        f"--workdir: '{wrong}' is a checkpoint directory, not a run's directory; a run resumes "
        f"only from the checkpoints/ of its workdir: move it there (e.g. mkdir W && mv "
        f"{tmp_path / 'x' / 'imported'} W/checkpoints) and pass --workdir=W")
  with pytest.raises(ConfigError, match=rf"; to resume that run pass --workdir={tmp_path}/w$"):
    workdir_checks.check_workdir(str(tmp_path / "w" / "checkpoints" / "4"))
