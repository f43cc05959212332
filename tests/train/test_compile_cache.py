"""`scripts/train.py` turns on jax's persistent compilation cache (`jaxrec.compile_cache`):
every start compiled the run's programs again."""

import logging
import os

import jax
import pytest

from jaxrec import compile_cache
from jaxrec.errors import ConfigError
from tests.scripts.in_process import CACHE_CONFIG
from tests.scripts.test_train import SMALL, assert_one_line_error, train



@pytest.fixture(name="jax_config")
def _jax_config(monkeypatch):
  """The cache settings of this process, put back afterwards (the suite's own cache)."""
  saved = {k: getattr(jax.config, k) for k in CACHE_CONFIG}
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE",
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAXREC_CACHE_DIR",
               "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def test_the_default_directory(jax_config, monkeypatch, tmp_path):   # pylint: disable=unused-argument
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compile_cache.default_dir() == f"{tmp_path}/.cache/jaxrec/xla"
  monkeypatch.setenv("XDG_CACHE_HOME", "/x")
  assert compile_cache.default_dir() == "/x/jaxrec/xla"
  monkeypatch.setenv("JAXREC_CACHE_DIR", "/j")
  assert compile_cache.default_dir() == "/j/xla"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/c")
  assert compile_cache.default_dir() == "/c"


def test_enable_sets_jax_up_and_keeps_what_the_environment_says(jax_config, monkeypatch,   # pylint: disable=unused-argument
                                                                tmp_path):
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path))
  assert compile_cache.enable(None) == str(tmp_path / "xla")
  assert (tmp_path / "xla").is_dir()
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_compilation_cache_max_size == -1   # jax's limit: O(entries) writes
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
  assert compile_cache.enable(str(tmp_path / "mine")) == str(tmp_path / "mine")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
  assert compile_cache.enable("none") is None and not jax.config.jax_enable_compilation_cache


def test_a_directory_that_cannot_be_used(jax_config, monkeypatch, tmp_path, caplog):   # pylint: disable=unused-argument
  """Given with the flag: an error naming it. The default one: a warning, and no cache
  (the run does not need it)."""
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=r"^--compilation_cache=.*/file/xla: cannot use "
                     r".*/file/xla as the compilation cache: Not a directory \(give another "
                     r"directory, or 'none'\)$"):
    compile_cache.enable(str(tmp_path / "file" / "xla"))
  with pytest.raises(ConfigError, match="--compilation_cache: empty"):
    compile_cache.enable(" ")
  monkeypatch.setenv("JAXREC_CACHE_DIR", str(tmp_path / "file"))
  with caplog.at_level(logging.WARNING):
    assert compile_cache.enable(None) is None
  assert "cannot be used (Not a directory)" in caplog.text
  assert not jax.config.jax_enable_compilation_cache


def test_train_fills_the_cache_and_a_rerun_compiles_less(tmp_path):
  cache = tmp_path / "xla"
  flags = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=2", "--noprogress",
           f"--compilation_cache={cache}", *(f"--gin_bindings={b}" for b in SMALL)]
  env = {"JAX_LOG_COMPILES": "1", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "not_this")}
  first = train(tmp_path / "w1", *flags, env=env)
  entries = [n for n in os.listdir(cache) if n.endswith("-cache")]
  assert len(entries) >= 5 and not (tmp_path / "not_this").exists()
  second = train(tmp_path / "w2", *flags, env=env)
  assert first.stderr.count("Persistent compilation cache hit") == 0
  assert second.stderr.count("Persistent compilation cache hit") >= len(entries) - 1
  off = train(tmp_path / "w3", *flags[:-len(SMALL) - 1], "--compilation_cache=none",
              *(f"--gin_bindings={b}" for b in SMALL), env=env)
  assert "Persistent compilation cache hit" not in off.stderr
  proc = train(tmp_path / "w4", *flags[:-len(SMALL) - 1], "--compilation_cache=~/x",
               *(f"--gin_bindings={b}" for b in SMALL), env=env, check=False)
  assert_one_line_error(proc, "--compilation_cache=~/x")


def test_each_start_keeps_the_cache_within_its_limit(jax_config, monkeypatch, tmp_path,   # pylint: disable=unused-argument
                                                     caplog):
  """The least recently used entries go (access or modification time, the later) until 80%
  of the limit is left; other files stay."""
  cache = tmp_path / "xla"
  cache.mkdir()
  for i in range(10):   # entry i last used at time 1000 + i
    entry = cache / f"jit_f{i}-{i:02d}-cache"
    entry.write_bytes(b"x" * 1000)
    os.utime(entry, (1000 + i, 1000 + i))
  (cache / "jit_f0-00-atime").write_bytes(b"\0" * 8)   # of a cache jax size-limited
  (cache / "notes.txt").write_text("mine")
  monkeypatch.setattr(compile_cache, "DEFAULT_MAX_BYTES", 10_000)
  compile_cache.enable(str(cache))
  assert len(os.listdir(cache)) == 12                  # 10,000 bytes: within the limit
  monkeypatch.setattr(compile_cache, "DEFAULT_MAX_BYTES", 5_000)
  with caplog.at_level(logging.INFO):
    compile_cache.enable(str(cache))
  assert sorted(os.listdir(cache)) == sorted(["notes.txt"] + [f"jit_f{i}-{i:02d}-cache"
                                                              for i in range(6, 10)])
  assert "removed the 6 least recently used programs (5.9 KiB) of 9.8 KiB (limit 4.9 KiB)" \
      in caplog.text


@pytest.mark.slow
def test_damaged_entries_are_replaced_not_warned_about_at_every_start(tmp_path):
  """jax warned about an entry it could not read naming the program only, compiled it
  again and kept the damaged file: 12 warnings at every start. Each is removed, named,
  and written anew by that start."""
  cache = tmp_path / "xla"
  flags = ["--gin_file=configs/dlrm_synthetic.gin", "--num_steps=2", "--noprogress",
           f"--compilation_cache={cache}", *(f"--gin_bindings={b}" for b in SMALL)]
  train(tmp_path / "w1", *flags)
  entries = sorted(n for n in os.listdir(cache) if n.endswith("-cache"))
  for name in entries:
    data = bytearray((cache / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / name).write_bytes(bytes(data))
  second = train(tmp_path / "w2", *flags)
  assert "Error reading persistent compilation cache" not in second.stderr
  for name in entries:
    assert f"compilation cache {cache}: removed {name}, which jax could not read" \
        in second.stderr
  assert sorted(n for n in os.listdir(cache) if n.endswith("-cache")) == entries
  third = train(tmp_path / "w3", *flags, env={"JAX_LOG_COMPILES": "1"})
  assert "could not read" not in third.stderr and "Error reading" not in third.stderr
  assert third.stderr.count("Persistent compilation cache hit") >= len(entries) - 1


def test_an_entry_that_decompresses_is_named_with_what_to_remove(tmp_path, caplog):
  """A read error past decompressing (the entry's file is whole): the line names the
  directory and the files to remove; the entry stays."""
  from jax._src import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
  entry = tmp_path / f"jit_step-{'a' * 64}-cache"
  entry.write_bytes(jax_cache.compress_executable(b"not an executable"))
  with caplog.at_level(logging.WARNING):
    assert compile_cache._drop_unreadable(str(tmp_path), "jit_step", "XlaRuntimeError: x")   # pylint: disable=protected-access
  assert entry.exists()
  assert (f"compilation cache {tmp_path}: jax could not read its entry for 'jit_step' "
          f"(XlaRuntimeError: x) and compiles it again at every start: remove "
          f"{tmp_path}/jit_step-*-cache there") in caplog.text


def test_jax_s_read_warning_removes_the_damaged_entry(jax_config, tmp_path, caplog):   # pylint: disable=unused-argument
  """`enable` routes jax's read warning to the removal (the end-to-end case is slow: three
  training runs); other warnings are shown as before."""
  import warnings  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
  damaged, whole = (tmp_path / f"jit_f-{c * 64}-cache" for c in "ab")
  damaged.write_bytes(b"not compressed")
  whole.write_bytes(jax_cache.compress_executable(b"x"))   # the same program's: stays
  unreported = tmp_path / f"jit_h-{'c' * 64}-cache"   # until its key is named
  unreported.write_bytes(b"not compressed")
  with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING):
    warnings.simplefilter("always")
    compile_cache.enable(str(tmp_path))
    warnings.warn("Error reading persistent compilation cache entry for 'jit_g': e: x")
    warnings.warn("Error reading persistent compilation cache entry for 'jit_f': e: y")
    warnings.warn("something else")
    key = f"jit_h-{'c' * 64}"   # the existence check names the entry's key
    warnings.warn(f"Error reading persistent compilation cache entry for '{key}': e: z")
  assert not damaged.exists() and whole.exists() and not unreported.exists()
  assert [str(w.message) for w in shown] == ["something else"]
  assert f"removed {damaged.name}, which jax could not read (e: y)" in caplog.text
  assert f"remove {tmp_path}/jit_g-*-cache there" in caplog.text
