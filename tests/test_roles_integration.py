"""Every role against a real `transformers serve` process hosting the tiny models."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lion_local.config import load_config
from lion_local.roles import (
    ask_generator,
    ask_referee,
    ask_student,
    ask_teacher,
    parse_generated_instruction,
    parse_referee_scores,
    parse_teacher_answer,
)
from lion_local.run.seed_data import load_seed_instructions
from lion_local.smoke.tiny_acceptance import (
    MIN_READABLE_REVIEWS,
    MIN_WELL_FORMED_INSTRUCTIONS,
    acceptance_seeds,
    well_formed_instruction,
)
from lion_local.smoke.tiny_build import TinyBuild, make_tiny_models
from lion_local.endpoints.servers import client_for, config_server
from loop_checks import run_config
from serving import ServerError
from serving.startup import wait_until_healthy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-lion-test-4b1d9e7c"
SERVED_MARGIN = 2


async def _exercise_roles(config, endpoints, seeds):
    teacher_client = client_for(endpoints["teacher"], config.servers["teacher"])
    student_client = client_for(endpoints["student"], config.servers["student"])
    roles = config.roles
    results = []
    try:
        for index, seed in enumerate(seeds):
            answer = await ask_teacher(teacher_client, roles.teacher, seed.instruction, seed.input, seed=index)
            student = await ask_student(student_client, roles.student, seed.instruction, seed.input, seed=index)
            teacher_first = await ask_referee(
                teacher_client, roles.referee, seed.instruction, seed.input, answer.text, student.text, seed=index
            )
            student_first = await ask_referee(
                teacher_client, roles.referee, seed.instruction, seed.input, student.text, answer.text, seed=index
            )
            hard = await ask_generator(teacher_client, roles.generator, seed.instruction, seed.input, "hard", seed=index)
            easy = await ask_generator(teacher_client, roles.generator, seed.instruction, seed.input, "easy", seed=index)
            results.append((answer, student, teacher_first, student_first, hard, easy))
        return results, {**teacher_client.usage, **student_client.usage}
    finally:
        await teacher_client.aclose()
        await student_client.aclose()


def test_every_role_returns_a_well_formed_parsed_result(tiny_run_config: Path, tmp_path: Path):
    # Greedy referee and generator, as the tiny build's acceptance check asks them
    # (lion_local/smoke/tiny_acceptance.py): what they write is then bounded by what any accepted
    # teacher writes, not by what one host's teacher happened to.
    config = load_config(tiny_run_config, ["roles.referee.temperature=0", "roles.generator.temperature=0"])
    seeds = acceptance_seeds(load_seed_instructions(config.seed_data))
    with config_server(config, "teacher", tmp_path / "logs") as teacher, config_server(
        config, "student", tmp_path / "logs"
    ) as student:
        results, usage = asyncio.run(_exercise_roles(config, {"teacher": teacher, "student": student}, seeds))

    reviews = [parse_referee_scores(r.text) for _, _, a, b, _, _ in results for r in (a, b)]
    generated = [r.text for *_, hard, easy in results for r in (hard, easy)]
    assert all(parse_teacher_answer(answer.text) for answer, *_ in results)
    assert all(student.finish_reason in ("stop", "length") for _, student, *_ in results)
    # The served teacher reviews the student's answers where the check used garbled ones, and the
    # server's batched arithmetic may tip a greedy choice: a margin of SERVED_MARGIN below the floors.
    assert sum(review is not None for review in reviews) >= MIN_READABLE_REVIEWS - SERVED_MARGIN, [
        r.text for *_, a, b, _, _ in results for r in (a, b)]
    unread = [r.text for *_, a, b, _, _ in results for r in (a, b) if parse_referee_scores(r.text) is None]
    assert all(text.count("Score of Assistant") < 2 for text in unread), unread
    scores = [score for review in reviews if review for score in review]
    assert all(1 <= score <= 10 for score in scores)
    assert len(set(reviews) - {None}) >= 2, "the referee's scores must vary between instructions"
    assert sum(map(well_formed_instruction, generated)) >= MIN_WELL_FORMED_INSTRUCTIONS - SERVED_MARGIN, generated

    assert usage["teacher"].calls == usage["student"].calls == len(seeds)
    assert usage["referee"].calls == usage["generator"].calls == 2 * len(seeds)
    for role in ("teacher", "referee", "generator", "student"):
        assert usage[role].prompt_tokens > 0 and usage[role].completion_tokens > 0, role


def _loopback_only() -> list[str]:
    """A command prefix that runs its command in a new network namespace with only loopback up."""
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        print(f"note: cannot make a network namespace here ({probe.stderr.decode().strip()}); running with the network")
        return []
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def test_doctor_reports_every_role_ok_offline_and_never_writes_the_key(tiny_run_config: Path, tmp_path: Path):
    env = {**os.environ, "LION_TEST_API_KEY": SECRET}
    completed = subprocess.run(
        [*_loopback_only(), sys.executable, "-m", "lion_local", "doctor", "--config", str(tiny_run_config),
         "--set", "servers.teacher.api_key_env=LION_TEST_API_KEY", "--set", "servers.student.api_key_env=LION_TEST_API_KEY"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for check in ("server student", "server teacher", "teacher", "student", "referee", "generator (hard)", "generator (easy)",
                  "referee check"):
        assert any(line.startswith("OK") and line[6:].startswith(check) for line in completed.stdout.splitlines()), check
    assert "doctor: all 8 checks passed" in completed.stdout
    # The referee on control pairs, in its mode (transformers serve has no other): its figures shown.
    [health] = [line for line in completed.stdout.splitlines() if line[6:].startswith("referee check")]
    assert "mode explain_first: 16 control pairs, readable replies" in health and "control accuracy" in health
    assert SECRET not in completed.stdout + completed.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "server-teacher.log" for path in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("mode", ["scores_only", "expected_score"])
def test_doctor_says_how_to_fix_a_referee_mode_its_endpoint_cannot_serve(
    tiny_models: Path, teacher_url: str, tmp_path: Path, mode: str
):
    """The teacher as an external endpoint that is `transformers serve` (which has no structured
    outputs and no logprobs): the config cannot tell, so doctor's real request must. (No control
    pairs: the referee's figures per mode are the doctor tests' above and in test_real_model.py.)"""
    config = run_config(tiny_models, tmp_path, teacher_url)
    completed = subprocess.run(
        [sys.executable, "-m", "lion_local", "doctor", "--config", str(config), "--set", f"roles.referee.mode={mode}",
         "--set", "discrimination.referee_check.control_pairs=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    [referee] = [line for line in completed.stdout.splitlines() if line[6:].startswith("referee ") and "check" not in line]
    assert referee.startswith("FAIL"), completed.stdout
    assert f"mode {mode} needs structured outputs" in referee or f"not the two scores of mode {mode}" in referee, referee
    assert "roles.referee.mode: explain_first" in referee
    assert all(line.startswith("OK") for line in completed.stdout.splitlines() if line[6:].startswith("teacher"))


def test_a_server_that_cannot_load_its_model_fails_fast_naming_its_log(tiny_run_config: Path, tmp_path: Path):
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    config = load_config(tiny_run_config, [f"servers.teacher.model={not_a_model}"])
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"teacher server exited with code \d+ while starting.*server-teacher.log"):
        with config_server(config, "teacher", tmp_path / "logs"):
            pass
    # Fast: on the server's exit, not after its start-up timeout (a host three times slower included).
    assert time.monotonic() - started < config.servers["teacher"].startup_timeout_s / 2


_SERVER_WITH_A_CHILD = """
import http.server, subprocess, sys
child = subprocess.Popen(["sleep", "300"])
print("CHILD-PID", child.pid, flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_stopping_a_server_ends_its_whole_process_group(tmp_path: Path):
    from serving.process import ServerProcess, free_port

    port = free_port()
    log = tmp_path / "server.log"
    server = ServerProcess(
        "fake", [sys.executable, "-c", _SERVER_WITH_A_CHILD, str(port)], dict(os.environ), log,
        f"http://127.0.0.1:{port}/health", startup_timeout_s=30, stop_grace_s=5,
    )
    server.start()
    wait_until_healthy([server])
    child = int(next(line for line in log.read_text().splitlines() if line.startswith("CHILD-PID")).split()[1])
    os.kill(child, 0)  # alive
    server.stop()
    assert not server.is_alive()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the child is reaped by init shortly after the group is killed
            os.kill(child, 0)
            time.sleep(0.1)


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_models_are_deterministic_for_a_seed(tmp_path: Path):
    build = TinyBuild(seed=3, train_steps=3, acceptance=False)  # three steps teach it nothing to accept
    first = make_tiny_models(tmp_path / "a", build=build)
    second = make_tiny_models(tmp_path / "b", build=build)
    other = make_tiny_models(tmp_path / "c", build=TinyBuild(seed=4, train_steps=3, acceptance=False))
    assert _digest(first / "teacher") == _digest(second / "teacher")
    assert _digest(first / "student") == _digest(second / "student")
    assert (first / "teacher/tokenizer.json").read_bytes() == (second / "teacher/tokenizer.json").read_bytes()
    assert _digest(first / "teacher") != _digest(other / "teacher")


def test_serve_runs_the_teacher_in_the_foreground_until_terminated(tiny_run_config: Path, tmp_path: Path):
    server = subprocess.Popen(
        [sys.executable, "-m", "lion_local", "serve", "teacher", "--config", str(tiny_run_config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("teacher serving at http://127.0.0.1:"), line
        base_url = line.split()[3]
        config = load_config(tiny_run_config)

        async def ask():
            from serving import Endpoint

            endpoint = Endpoint("teacher", [base_url], config.servers["teacher"].model)
            async with client_for(endpoint, config.servers["teacher"]) as client:
                return await ask_teacher(client, config.roles.teacher, "Name a planet.", seed=1)

        assert parse_teacher_answer(asyncio.run(ask()).text)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert (tmp_path / "run/logs/serve-teacher.log").exists()
