"""The coordinator's port can be taken between `procs.free_port` releasing it and process 0
binding it: process 0 says so (exit `EXIT_PORT_IN_USE`) and the supervisor starts the
workers again on a new port, as the next generation, up to `PORT_TRIES` times (it used to
count a lost slot and restart on one process fewer)."""

import os
import socket
import subprocess
import sys
import types

import jax
import pytest

from jaxrec.elastic import procs, stragglers, supervisor as sup, watching, worker
from tests.elastic import elastic_testlib as t

TAKEN = "UNKNOWN: Failed to start RPC server"   # XLA's status text (jax 0.10)


def _as_process(monkeypatch, process, error, port=None):
  monkeypatch.setattr(worker, "_WORKER", worker._Worker({   # pylint: disable=protected-access
      worker.ENV_GENERATION: "0", worker.ENV_NUM_PROCESSES: "2",
      worker.ENV_PROCESS_ID: str(process)}))
  monkeypatch.setenv(worker.ENV_COORDINATOR, f"127.0.0.1:{port or procs.free_port()}")
  monkeypatch.setenv(worker.ENV_PLATFORM, "gpu")   # no gloo setting in this process

  def initialize(**kwargs):
    raise error

  monkeypatch.setattr(jax.distributed, "initialize", initialize)


def test_process_0_exits_with_the_port_in_use_code(monkeypatch, capsys):
  _as_process(monkeypatch, 0, RuntimeError(TAKEN))
  with pytest.raises(SystemExit) as e:
    worker.initialize_from_env()
  assert e.value.code == worker.EXIT_PORT_IN_USE
  assert capsys.readouterr().err.startswith("coordinator address 127.0.0.1:")


def _held_port():
  """A listening socket (as another program's server) and its port."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen()
  return s, s.getsockname()[1]


def test_process_0_checks_the_port_before_xla_binds_it(monkeypatch, capsys):
  """XLA's failed bind sometimes segfaults (exit -11) instead of raising."""
  held, port = _held_port()
  with held:
    _as_process(monkeypatch, 0, AssertionError("initialize was called"), port)
    with pytest.raises(SystemExit) as e:
      worker.initialize_from_env()
  assert e.value.code == worker.EXIT_PORT_IN_USE
  assert capsys.readouterr().err.startswith(f"coordinator address 127.0.0.1:{port} is in use")


@pytest.mark.usefixtures("refused_binds")
def test_process_0_names_a_port_it_may_not_bind(monkeypatch, capsys):
  """A refused bind (EACCES) was read as a free port; now it is one `error:` line and exit
  1 (the supervisor gives up with it), not 'in use' and a retry on another port."""
  _as_process(monkeypatch, 0, AssertionError("initialize was called"), port=80)
  with pytest.raises(SystemExit) as e:
    worker.initialize_from_env()
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      "error: coordinator address 127.0.0.1:80: TCP port 80 cannot be bound on [::] or "
      "0.0.0.0 (EACCES: Permission denied)\n")


def test_the_launcher_gives_up_when_no_port_can_be_bound(tmp_path, refused_binds, capsys):
  """`free_port`'s PermissionError was a traceback; now one line, and the new workdir goes."""
  del refused_binds
  w = tmp_path / "w"
  options = sup.Options(num_processes=2, devices_per_process=2, train_script=FAKE)
  s = sup.Supervisor(options, [f"--workdir={w}", "--gin_file=configs/dlrm_synthetic.gin",
                               "--mesh=data=2,table=2", "--num_steps=5"])
  assert s.run() == sup.EXIT_USER_ERROR
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert errors == ["error: the coordinator's port: no TCP port can be bound on [::] or "
                    "0.0.0.0 (EACCES: Permission denied). Stopping; fix what it names."], errors
  assert not w.exists()


@pytest.mark.parametrize("process, error", [(1, RuntimeError(TAKEN)),
                                            (0, RuntimeError("DEADLINE_EXCEEDED: barrier"))])
def test_other_initialize_errors_pass_unchanged(monkeypatch, process, error):
  _as_process(monkeypatch, process, error)
  with pytest.raises(RuntimeError) as e:
    worker.initialize_from_env()
  assert e.value is error


def _supervisor(w):
  s = sup.Supervisor(sup.Options(num_processes=2, devices_per_process=2),
                     [f"--workdir={w}", "--gin_file=configs/x.gin"])
  s.detectors = (stragglers.Detector("process", 1.5, 3, 20),
                 stragglers.Detector("shard", 1.5, 3, 20))
  return s


def _popen(code):
  return types.SimpleNamespace(poll=lambda: code, returncode=code, pid=4242)


def test_a_taken_port_is_its_own_outcome_and_loses_no_slot(tmp_path):
  s = _supervisor(str(tmp_path))
  s._port = 5555   # pylint: disable=protected-access
  s.procs = [watching.WorkerProc(0, _popen(worker.EXIT_PORT_IN_USE), None, 0.0),
             watching.WorkerProc(1, _popen(None), None, 0.0)]
  out = s._check_exits(1.0, None)   # pylint: disable=protected-access
  assert (out.kind, out.lost, out.reason) == ("port_in_use", 0, "coordinator port 5555 in use")
  [exit_event] = t.events(str(tmp_path))
  assert exit_event["returncode"] == worker.EXIT_PORT_IN_USE and not exit_event["lost"]


@pytest.mark.parametrize("held", [True, False])
def test_process_0_dead_before_joining_with_its_port_held_is_a_taken_port(tmp_path, held):
  """A segfault in XLA's failed bind: the port, held by another program, tells it from a
  crash (a lost slot)."""
  s = _supervisor(str(tmp_path))
  s.choice = types.SimpleNamespace(processes=2)
  sock, s._port = _held_port()   # pylint: disable=protected-access
  if not held:
    sock.close()
  s.procs = [watching.WorkerProc(0, _popen(-11), None, 0.0),
             watching.WorkerProc(1, _popen(None), None, 0.0)]
  with sock:
    out = s._check_exits(1.0, None)   # pylint: disable=protected-access
  assert (out.kind, out.lost) == (("port_in_use", 0) if held else ("failure", 1))


def test_process_0_dead_before_joining_on_a_refused_port_is_a_failure(tmp_path, refused_binds):
  """The supervisor's own check of a port it may not bind: not taken, no exception."""
  del refused_binds
  s = _supervisor(str(tmp_path))
  s.choice, s._port = types.SimpleNamespace(processes=2), 80   # pylint: disable=protected-access
  s.procs = [watching.WorkerProc(0, _popen(-11), None, 0.0),
             watching.WorkerProc(1, _popen(None), None, 0.0)]
  assert s._check_exits(1.0, None).kind == "failure"   # pylint: disable=protected-access


@pytest.mark.parametrize("taken", [2, sup.PORT_TRIES])
def test_the_workers_start_again_on_a_new_port(tmp_path, monkeypatch, taken):
  s = _supervisor(str(tmp_path))
  ports, stopped = iter(range(6000, 6000 + sup.PORT_TRIES)), []
  launched = []

  def launch(choice):
    s._port = next(ports)   # pylint: disable=protected-access
    launched.append((s.generation, s._port))   # pylint: disable=protected-access

  def watch():
    kind = "port_in_use" if len(launched) <= taken else "finished"
    return sup._Outcome(kind, kind)   # pylint: disable=protected-access

  monkeypatch.setattr(s, "_launch", launch)
  monkeypatch.setattr(s, "_watch", watch)
  monkeypatch.setattr(s, "_stop_all", lambda reason, graceful: stopped.append(reason))
  out = s._launch_and_watch(None)   # pylint: disable=protected-access
  tries = min(taken + 1, sup.PORT_TRIES)
  assert launched == [(g, 6000 + g) for g in range(tries)]
  assert len(stopped) == tries - 1 and s.restarts == 0
  events = [(e["generation"], e["port"], e["retry"]) for e in t.events(str(tmp_path))]
  assert events == [(g, 6000 + g, g + 1 < sup.PORT_TRIES) for g in range(taken)]
  if taken < sup.PORT_TRIES:
    assert out.kind == "finished"
  else:
    assert out.kind == "port_in_use" and out.message.startswith(
        f"the coordinator's port was taken {sup.PORT_TRIES} times in a row (last "
        f"127.0.0.1:{6000 + sup.PORT_TRIES - 1}: address in use)")


@pytest.mark.slow   # a jax import in a subprocess (~5 s)
def test_a_real_taken_port_gives_the_port_in_use_exit(tmp_path):
  """A real process 0 (jax imported, gloo set) on a port another program listens on."""
  held, port = _held_port()
  with held:
    env = dict(os.environ, **{worker.ENV_GENERATION: "0", worker.ENV_NUM_PROCESSES: "2",
                              worker.ENV_PROCESS_ID: "0", worker.ENV_PLATFORM: "cpu",
                              worker.ENV_COORDINATOR: f"127.0.0.1:{port}",
                              "JAX_PLATFORMS": "cpu"})
    proc = subprocess.run([sys.executable, "-c", "from jaxrec.elastic import worker\n"
                           "worker.initialize_from_env()"], env=env, capture_output=True,
                          text=True, timeout=120)
  assert proc.returncode == worker.EXIT_PORT_IN_USE, proc.stderr[-2000:]
  assert f"coordinator address 127.0.0.1:{port} is in use" in proc.stderr


FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_train.py")


@pytest.mark.slow   # the supervisor and fake workers in subprocesses (~10 s each)
@pytest.mark.parametrize("taken", [2, 99])
def test_the_launcher_retries_taken_ports_then_gives_up(tmp_path, taken):
  w = str(tmp_path)
  proc = t.launch(w, ["--num_processes=2", "--devices_per_process=2", "--hang_timeout=20",
                      "--stop_grace=2", f"--train_script={FAKE}"],
                  ["--gin_file=configs/dlrm_synthetic.gin", "--mesh=data=2,table=2",
                   "--num_steps=10", "--step_s=0.01", f"--port_taken_gens={taken}"])
  code = t.finish(proc)
  ev = t.events(w)
  ports = [e for e in ev if e["event"] == "port_in_use"]
  launches = [e for e in ev if e["event"] == "launch"]
  assert all(e["processes"] == 2 for e in launches) and not any(
      e["lost"] for e in ev if e["event"] == "worker_exit")
  if taken < sup.PORT_TRIES:
    assert code == 0 and ev[-1]["event"] == "finished" and ev[-1]["restarts"] == 0
    assert [e["generation"] for e in ports] == list(range(taken)) and len(launches) == taken + 1
  else:
    assert code == sup.EXIT_MAX_RESTARTS and len(ports) == len(launches) == sup.PORT_TRIES
    assert ev[-1]["event"] == "give_up" and ev[-1]["reason"] == "port_in_use"
    assert f"error: the coordinator's port was taken {sup.PORT_TRIES} times in a row" in open(
        os.path.join(w, "launch.log")).read()

