"""The server lion-local talks to is the one it started (serving/ports.py, serving/startup.py).

Through the command line, with real processes squatting ports:
- A configured port another process holds is refused before any server starts, in one line naming
  the port, servers.<name>.port and the holder's pid and name: `run`, `serve` and `doctor` (a
  failed check there).
- An OpenAI-like server that takes a configured port after that check, and answers /health and
  /v1/models for another model, ends the run in one line naming the port and what answered; no
  teacher answer is kept and nothing is trained.
- Picked ports lost in the seconds before the server binds them (to a server answering for another
  model, or to one that makes the server exit with "Address already in use") are replaced by fresh
  ones, with a warning, and the doctor passes. (The race is provoked deterministically: the port is
  taken as soon as the server's process appears, seconds before `transformers serve` binds it.)

Each: the exit code, one `error:` line, no traceback, no process of lion-local's left behind. The
decisions themselves (retry or not, what a mismatch says) are unit-tested as the pure functions
they are.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lion_local.config import load_config
from loop_checks import lion_local, tiny_config
from serving import check_configured_port
from serving.ports import (
    describe_holders,
    identity_problem,
    lost_its_port,
    port_is_free,
    retry_decision,
)
from serving.process import Expected, ServerError, ServerProcess, free_port
from serving.startup import wait_until_healthy
from test_signals import ProcessTree

ROOT = Path(__file__).resolve().parents[1]

# Answers like an OpenAI-compatible server on port argv[1], for model argv[2] (default: another
# model than any lion-local asks for).
FOREIGN_SERVER = r"""
import http.server, json, sys
MODEL = sys.argv[2] if len(sys.argv) > 2 else "someone-elses-model"
class Foreign(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": {"status": "ok"}, "/v1/models": {"object": "list", "data": [{"id": MODEL}]}}
        if self.path not in body:
            self.send_response(404); self.end_headers(); return
        data = json.dumps(body[self.path]).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Foreign).serve_forever()
"""


def _squat(port: int, foreign: bool) -> subprocess.Popen:
    """A process holding 127.0.0.1:`port`: the foreign OpenAI-like server, or `python -m http.server`
    (its /health is a 404); returns once it accepts connections."""
    command = [sys.executable, "-c", FOREIGN_SERVER, str(port)] if foreign else [
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    squatter = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert squatter.poll() is None, "the squatter could not take the port"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return squatter
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


class PortTaker(threading.Thread):
    """Takes the port of the first server process of each model (as started, before it binds):
    {model directory: foreign?}. Records the ports taken, and the squatters to stop."""

    def __init__(self, tree: ProcessTree, models: dict[str, bool]) -> None:
        super().__init__(daemon=True)
        self.tree, self.models = tree, dict(models)
        self.taken: dict[str, int] = {}
        self.squatters: list[subprocess.Popen] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.taken) < len(self.models):
            for command in list(self.tree.current.values()):
                words = command.split()
                if "serving/supervisor.py" in command or "--port" not in words:
                    continue
                model = next((m for m in self.models if m in words and m not in self.taken), None)
                if model is not None:
                    port = int(words[words.index("--port") + 1])
                    self.squatters.append(_squat(port, self.models[model]))
                    self.taken[model] = port
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        for squatter in self.squatters:
            squatter.terminate()
            squatter.wait()


def _lion(args: list[str], cwd: Path, models: dict[str, bool] | None = None, timeout_s: float = 400) -> dict:
    """Run lion-local; `models`: take those servers' first ports as they start (PortTaker)."""
    process = subprocess.Popen(lion_local(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = ProcessTree(process.pid)
    tree.start()
    taker = PortTaker(tree, models or {})
    taker.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    finally:
        tree.done.set()
        taker.stop()
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"code": process.returncode, "stdout": stdout, "stderr": stderr, "left": tree.left(),
            "seen": tree.seen, "taken": taker.taken}


def _config(tiny_models: Path, tmp_path: Path, **teacher: object) -> Path:
    data = tiny_config(tiny_models, tmp_path / "run")
    data["servers"]["teacher"].update(teacher)
    data["discrimination"]["referee_check"]["control_pairs"] = 0  # the doctor: one request per role is enough
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_error_line(outcome: dict) -> str:
    assert "Traceback" not in outcome["stderr"] + outcome["stdout"], outcome["stderr"][-3000:]
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome["stderr"][-3000:]
    assert outcome["stderr"].rstrip().endswith(errors[0])
    return errors[0]


def _servers_started(outcome: dict) -> list[str]:
    return [command for _, command in outcome["seen"].values() if "serving/supervisor.py" in command]


# ----------------------------------------------------------------------------------------------
# Through the command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.integration
def test_a_configured_port_in_use_is_refused_before_any_server_starts(tiny_models, tmp_path, command):
    port = free_port()
    squatter = _squat(port, foreign=False)
    try:
        config = _config(tiny_models, tmp_path, port=port)
        args = ["run", "--config", str(config)] if command == "run" else ["serve", "teacher", "--config", str(config)]
        outcome = _lion(args, tmp_path)
    finally:
        squatter.terminate()
        squatter.wait()
    assert outcome["code"] == 1, outcome["stderr"][-3000:]
    line = _one_error_line(outcome)
    assert line.startswith(f"error: servers.teacher.port: port {port} is already in use by pid {squatter.pid} (python")
    assert _servers_started(outcome) == [] and outcome["left"] == {}


@pytest.mark.integration
def test_doctor_fails_the_server_check_of_a_configured_port_in_use(tiny_models, tmp_path):
    port = free_port()
    squatter = _squat(port, foreign=True)  # it would answer every check, as another model
    try:
        outcome = _lion(["doctor", "--config", str(_config(tiny_models, tmp_path, port=port))], tmp_path)
    finally:
        squatter.terminate()
        squatter.wait()
    assert outcome["code"] == 1, outcome["stdout"][-3000:]
    assert "Traceback" not in outcome["stderr"] + outcome["stdout"]
    [teacher] = [line for line in outcome["stdout"].splitlines() if "server teacher" in line]
    assert teacher.startswith("FAIL") and f"port {port} is already in use by pid {squatter.pid}" in teacher
    assert "servers.teacher.port" in teacher
    assert "doctor: FAILED: server teacher" in outcome["stderr"]
    assert not any("teacher" in command for command in _servers_started(outcome))  # the student's only
    assert outcome["left"] == {}


@pytest.mark.integration
def test_another_server_taking_a_configured_port_ends_the_run_in_one_line(tiny_models, tmp_path):
    """The port is free when checked, and taken by an OpenAI-like server for another model before
    `transformers serve` binds it: its replies are never used."""
    port = free_port()
    config = _config(tiny_models, tmp_path, port=port)
    outcome = _lion(["run", "--config", str(config)], tmp_path, models={str(tiny_models / "teacher"): True})
    assert outcome["taken"] == {str(tiny_models / "teacher"): port}
    assert outcome["code"] == 1, outcome["stderr"][-3000:]
    line = _one_error_line(outcome)
    assert line.startswith(f"error: teacher server: port {port} is answered by pid "), line
    assert "not the teacher server lion-local started" in line and line.endswith("(servers.teacher.port)")
    answers = tmp_path / "run/teacher_answers.jsonl"
    assert not answers.exists() or not answers.read_text()
    assert not (tmp_path / "run/iter_1/student").exists() and not (tmp_path / "run/iter_1/logs/sft.log").exists()
    assert outcome["left"] == {}


@pytest.mark.integration
def test_picked_ports_lost_before_the_servers_bind_them_are_replaced(tiny_models, tmp_path):
    """The student's first port is taken by a server answering for another model (the doctor waits
    for the student first, so that server answers /health before the student's exits), the
    teacher's by one that makes `transformers serve` exit with "Address already in use": both start
    again on fresh ports, and every check passes."""
    config = _config(tiny_models, tmp_path)
    teacher, student = str(tiny_models / "teacher"), str(tiny_models / "student")
    outcome = _lion(["doctor", "--config", str(config)], tmp_path, models={student: True, teacher: False})
    assert set(outcome["taken"]) == {teacher, student}
    assert outcome["code"] == 0, outcome["stdout"][-3000:] + outcome["stderr"][-3000:]
    assert "Traceback" not in outcome["stderr"] + outcome["stdout"]
    warnings = [line for line in outcome["stderr"].splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert f"student server: port {outcome['taken'][student]} is answered by pid " in warnings[0]
    assert warnings[0].endswith("(start 1 of 3); starting it again on fresh ports")
    assert warnings[1].endswith(
        "teacher server: a port it was given was taken by another process before it bound it (start 1 of 3); "
        "starting it again on fresh ports"
    )
    for name, model in (("teacher", teacher), ("student", student)):
        [line] = [each for each in outcome["stdout"].splitlines() if f"server {name}" in each]
        assert line.startswith("OK") and f":{outcome['taken'][model]}/" not in line, line
    assert len(_servers_started(outcome)) == 4 and outcome["left"] == {}


# ----------------------------------------------------------------------------------------------
# Starting again (a stand-in server: a Python process)
# ----------------------------------------------------------------------------------------------

LOSES_A_PORT = [sys.executable, "-c", "print('zmq.error.ZMQError: Address already in use'); raise SystemExit(1)"]


def _stand_in(tmp_path: Path, port: int, port_key: str | None, relaunch: list[str]) -> ServerProcess:
    """A server that loses an (internal) port at its first start, started again as `relaunch`."""
    health = f"http://127.0.0.1:{port}/health"
    expected = Expected("127.0.0.1", port, port_key, "teacher")
    process = ServerProcess("teacher", LOSES_A_PORT, dict(os.environ), tmp_path / "server-teacher.log", health, 30,
                            stop_grace_s=5, expected=expected)
    process.relaunch_with = lambda: (relaunch, dict(os.environ), health, expected)
    return process


def test_a_start_that_lost_an_internal_port_starts_again_on_its_configured_port(tmp_path, caplog):
    port = free_port()
    ours = [sys.executable, "-c", FOREIGN_SERVER, str(port), "teacher"]  # answers for the model asked for
    process = _stand_in(tmp_path, port, "servers.teacher.port", ours)
    process.start()
    try:
        with caplog.at_level("WARNING", logger="serving"):
            wait_until_healthy([process])
        assert process.attempt == 2 and process.answered and process.health_url.endswith(f":{port}/health")
    finally:
        process.stop()
    [warning] = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warning.startswith("teacher server: a port it was given was taken by another process before it bound it")


def test_starts_that_keep_losing_their_port_end_after_three_in_one_line(tmp_path):
    process = _stand_in(tmp_path, free_port(), None, LOSES_A_PORT)
    process.start()
    with pytest.raises(ServerError) as raised:
        wait_until_healthy([process])
    assert process.attempt == 3 and not process.is_alive()
    message = str(raised.value)
    assert message.startswith("teacher server exited with code 1 while starting; an address it binds was in use by "
                              "another process; last log lines: ")
    assert "Address already in use" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# The decisions and the port probe
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lost", "may_restart", "configured_taken", "attempt", "decision"),
    [
        (False, True, False, 1, "fail"),  # any other exit is the server's own failure
        (True, True, False, 1, "retry"),  # a picked port (or vLLM's internal one) lost: fresh ports
        (True, True, False, 2, "retry"),
        (True, True, False, 3, "fail"),  # bounded: three starts in all
        (True, False, False, 1, "fail"),  # it may not move (`serve` of a picked port reads it once)
        (True, True, True, 1, "refuse"),  # the configured port is held by another process: name it
        (True, False, True, 3, "refuse"),
    ],
)
def test_retry_decision(lost, may_restart, configured_taken, attempt, decision):
    assert retry_decision(lost_port=lost, may_restart=may_restart, configured_port_taken=configured_taken,
                          attempt=attempt) == decision


def test_the_logs_of_a_lost_port_are_recognised():
    assert lost_its_port("OSError: [Errno 98] Address already in use")  # vLLM's own socket
    assert lost_its_port("ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): "
                         "address already in use")  # uvicorn (transformers serve)
    assert lost_its_port("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5555')")  # vLLM internal
    assert not lost_its_port("RuntimeError: Engine core initialization failed")


def test_what_answered_is_named_when_it_is_not_ours():
    assert identity_problem("teacher", 8000, "teacher", ["teacher"], [(12, "vllm")], True) is None
    assert identity_problem("teacher", 8000, "teacher", ["teacher", "teacher-lora"], [], None) is None
    assert identity_problem("teacher", 8000, None, None, [(12, "x")], True) is None  # nothing to check
    wrong_model = identity_problem("teacher", 8000, "teacher", ["llama-70b"], [], None)
    assert wrong_model == (
        "teacher server: port 8000 is answered by a server with models 'llama-70b', not the teacher server "
        "lion-local started for model 'teacher'; another server holds the port"
    )
    no_list = identity_problem("student", 9000, "student", None, [], None)
    assert "port 9000 is answered by a server with no model list" in no_list
    # Another process listens, whatever it serves (another run's vLLM serving "teacher" too).
    foreign = identity_problem("teacher", 8000, "teacher", ["teacher"], [(4321, "python3")], False)
    assert foreign.startswith("teacher server: port 8000 is answered by pid 4321 (python3), not the teacher server")
    assert describe_holders(None) == describe_holders([(None, None)]) == "another process"


def test_a_port_held_in_this_process_is_named_with_its_pid():
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_is_free("127.0.0.1", port) and not port_is_free("0.0.0.0", port)
        config = load_config(ROOT / "configs/tiny-cpu-transformers.yaml", [f"servers.student.port={port}"])
        spec = config.servers["student"]
        with pytest.raises(ServerError) as raised:
            check_configured_port("student", spec)
    message = str(raised.value)
    assert message.startswith(f"servers.student.port: port {port} is already in use by pid {os.getpid()} (")
    assert "\n" not in message
    assert port_is_free("127.0.0.1", port)
