"""Faults injected for real into the loop: endpoint errors, outages, dead servers and SIGKILL.

The teacher, referee and generator are the real tiny teacher (`transformers serve`, started once
per session with `lion-local serve teacher`) behind tests/recording_proxy.py, which records what
reached the server and injects faults; the student server and the trainer are started by the run
itself. Every role samples at temperature 0: seeded sampling is not repeatable when requests run
concurrently on `transformers serve`, greedy decoding is, so two runs of one config must give the
same results. The config is one iteration on 12 seeds (no final imitation), to keep it quick.

- test_run_completes_through_injected_faults_and_a_20_s_outage: every 5th request to the
  teacher's server gets HTTP 500, HTTP 503, a reply that hangs past the request timeout, or a
  TCP reset after the server did the work, in turn; after 24 forwarded requests the server is
  unreachable for 20 s (connections refused, open ones reset). The run completes with every
  invariant of the method, and no call that came back was made again. This run is also the
  uninterrupted reference of the next test.
- test_sigkill_at_seeded_random_points_then_resume_equals_the_uninterrupted_run: the same
  config killed with SIGKILL at 7 points drawn by a seeded RNG, one at each kind of moment
  (teacher answers, trainer checkpoints, the student server starting, student answers, reviews)
  and two in the generator calls, re-run after each kill (tests/kill_campaign.py kills more often,
  at random times). Pools, judgements, labels, generated and rejected
  instructions, every answer and review, and the student's weights equal the reference's; no
  journal has a torn or duplicate record; no call that had come back was made again (the
  teacher's side counted at the proxy, the student's in its server's access log); every process
  the killed run had started is gone within seconds; a second `run` on the busy run directory is
  refused in one line, and each run after a kill takes the stale lock over.
- test_permanent_outage_and_a_dead_student_server_end_the_stage_in_one_line: the teacher's
  server goes away for good during imitation: the stage ends within the failure budget with one
  `error:` line naming the endpoint and the last error, exit code 1; once the server is back the
  same command completes, asking nothing twice. Then the student server the run started is
  killed during discrimination: the stage ends at once (not after the failure budget) with one
  line naming the server, its pid, the signal and its log; a re-run completes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from loop_checks import (
    alive,
    check_invariants,
    descendants,
    jsonl,
    lion_local,
    proxy_records,
    run_config,
    start_proxy,
    stop,
    teacher_deliveries,
)
from serving.process import free_port

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 6.0
MAX_CONCURRENCY = 4  # run_config's servers.*.max_concurrency: the calls that can be in flight at a kill
KILL_SEED = 20261121
SEEDS = 12
STUDENT_BUDGET_S = 120.0  # long, so that a dead student server reported at once is told from one retried


def greedy_config(tiny_models: Path, tmp_path: Path, proxy_url: str, failure_budget_s: float = 45.0) -> Path:
    """One greedy iteration on SEEDS seeds, no final imitation, a trainer checkpoint every step, and
    the teacher's timeouts short, as suits a test."""
    path = run_config(tiny_models, tmp_path, proxy_url, greedy=True)
    data = yaml.safe_load(path.read_text())
    data.update(iterations=1, seed_limit=SEEDS)
    data["imitation"]["final_imitation"] = False
    data["imitation"].setdefault("trainer", {})["save_steps"] = 1
    data["generation"]["new_per_iteration"] = 8
    data["servers"]["teacher"].update(
        request_timeout_s=REQUEST_TIMEOUT_S, failure_budget_s=failure_budget_s, backoff_initial_s=0.2, backoff_max_s=2.0
    )
    data["servers"]["student"]["failure_budget_s"] = STUDENT_BUDGET_S
    path.write_text(yaml.safe_dump(data))
    return path


def answered_calls(proxy_log: Path) -> dict[str, list[dict]]:
    """The completion requests the server answered (status 200 sent back), by request body."""
    answered: dict[str, list[dict]] = {}
    for record in proxy_records(proxy_log):
        if record["status"] == 200 and record["path"].endswith("completions"):
            answered.setdefault(json.dumps(record["body"], sort_keys=True), []).append(record)
    return answered


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout_s:.0f} s"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# Transient faults, and the uninterrupted reference
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    proxy_log: Path
    started: float
    finished: float


@pytest.fixture(scope="module")
def faulted_run(tiny_models: Path, teacher_url: str, tmp_path_factory) -> FinishedRun:
    """One `lion-local run` through the fault-injecting proxy, never interrupted."""
    directory = tmp_path_factory.mktemp("faulted")
    proxy_log = directory / "teacher-requests.jsonl"
    faults = ("--fault-every", "5", "--hang-s", str(REQUEST_TIMEOUT_S + 4), "--outage-after", "24", "--outage-s", "20")
    proxy, proxy_url = start_proxy(teacher_url, proxy_log, faults=faults)
    try:
        config = greedy_config(tiny_models, directory, proxy_url)
        started = time.time()
        result = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop(proxy)
    return FinishedRun(directory / "run", proxy_log, started, time.time())


def test_run_completes_through_injected_faults_and_a_20_s_outage(faulted_run: FinishedRun, tiny_models: Path) -> None:
    run_dir = faulted_run.run_dir
    everything = check_invariants(run_dir, tiny_models)

    records = jsonl(faulted_run.proxy_log)
    seen = Counter(r["fault"] for r in records if "path" in r)
    assert all(seen[kind] >= 2 for kind in ("500", "503", "hang", "reset")), seen
    assert seen["outage"] >= 1, "no request met the outage on an open connection"
    [outage] = [r["outage"] for r in records if "outage" in r]
    assert outage[1] - outage[0] >= 20 and faulted_run.started < outage[0] < faulted_run.finished
    assert "retrying for up to 45 s" in (run_dir / "logs/lion-local.log").read_text()

    # Each answered call was answered once, unless the client had timed out on the first reply.
    for calls in answered_calls(faulted_run.proxy_log).values():
        earlier = sorted(calls, key=lambda r: r["delivered"])[:-1]
        assert all(r["delivered"] - r["arrived"] >= REQUEST_TIMEOUT_S for r in earlier), calls[0]["body"]
    assert set(teacher_deliveries(faulted_run.proxy_log, everything)) == {r["id"] for r in everything}


# ----------------------------------------------------------------------------------------------
# SIGKILL at seeded random points
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    stage: str  # the stage of iteration 1 the kill falls in
    counter: str  # what is counted
    at: int  # the kill comes as soon as the count reaches this


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete trainer checkpoint (0 before the first)."""
    states = (run_dir / "iter_1/sft_checkpoints").glob("checkpoint-*/trainer_state.json")
    return max((int(path.parent.name.split("-")[1]) for path in states), default=0)


def _student_server_starting(run_dir: Path, pid: int) -> int:
    """1 once the run has started iteration 1's student server and it has not answered yet."""
    started = any(str(run_dir / "iter_1/student") in command for command in descendants(pid).values())
    return int(started and lines(run_dir / "iter_1/student_answers.jsonl") == 0)


COUNTERS: dict[str, Callable[[Path, int], int]] = {
    "teacher answers": lambda run_dir, pid: lines(run_dir / "teacher_answers.jsonl"),
    "trainer checkpoint step": lambda run_dir, pid: _checkpoint_step(run_dir),
    "student server starting": _student_server_starting,
    "student answers": lambda run_dir, pid: lines(run_dir / "iter_1/student_answers.jsonl"),
    "reviews": lambda run_dir, pid: lines(run_dir / "iter_1/reviews.jsonl"),
    "generator calls": lambda run_dir, pid: lines(run_dir / "iter_1/generator_calls.jsonl"),
}


def kill_points(reference: Path, rng: random.Random) -> list[KillPoint]:
    """7 points, every kind of moment once (two in the generation), drawn within the counts of the
    reference run. Each count stops MAX_CONCURRENCY short of its total, so the kill falls before
    the stage can end. tests/kill_campaign.py kills many more times, at random moments."""
    totals = {
        "teacher answers": lines(reference / "iter_1/train_pool.jsonl"),
        "student answers": lines(reference / "iter_1/student_answers.jsonl"),
        "reviews": lines(reference / "iter_1/reviews.jsonl"),
        "generator calls": lines(reference / "iter_1/generator_calls.jsonl"),
    }
    steps = json.loads((reference / "iter_1/imitation.json").read_text())["training"]["steps"]

    def draw(stage: str, counter: str, count: int) -> list[KillPoint]:
        return [KillPoint(stage, counter, at) for at in sorted(rng.sample(range(1, totals[counter] - MAX_CONCURRENCY), count))]

    return [
        *draw("imitation", "teacher answers", 1),
        KillPoint("imitation", "trainer checkpoint step", rng.randrange(1, steps)),
        KillPoint("discrimination", "student server starting", 1),
        *draw("discrimination", "student answers", 1),
        *draw("discrimination", "reviews", 1),
        *draw("generation", "generator calls", 2),
    ]


def _still_running(processes: dict[int, str], timeout_s: float) -> tuple[float, dict[int, str]]:
    """Seconds until none of `processes` runs any more, and those still running at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not any(alive(pid) for pid in processes):
            return time.monotonic() - started, {}
        time.sleep(0.1)
    return timeout_s, {pid: command for pid, command in processes.items() if alive(pid)}


def _student_server_replies(run_dir: Path) -> int:
    """Completions iteration 1's student server sent back, counted in its access log."""
    count, current = 0, False
    for line in (run_dir / "logs/server-student.log").read_text(errors="replace").splitlines():
        if line.startswith("==== "):
            current = str(run_dir / "iter_1/student") in line
        elif current and re.search(r'"POST /v1/(chat/)?completions HTTP/1\.1" 200', line):
            count += 1
    return count


def test_sigkill_at_seeded_random_points_then_resume_equals_the_uninterrupted_run(
    faulted_run: FinishedRun, tiny_models: Path, teacher_url: str, tmp_path: Path
) -> None:
    reference = faulted_run.run_dir
    points = kill_points(reference, random.Random(KILL_SEED))
    assert {p.counter for p in points} == set(COUNTERS)  # every kind of moment
    proxy_log = tmp_path / "teacher-requests.jsonl"
    # Generator requests are held 0.4 s at the proxy, so that the short generation stage can be
    # killed at five different points.
    proxy, proxy_url = start_proxy(teacher_url, proxy_log, delay_generator_s=0.4)
    run_dir = tmp_path / "run"
    config = greedy_config(tiny_models, tmp_path, proxy_url)
    kill_times: list[float] = []
    previous_pid = 0
    lock_checked = False
    try:
        for number, point in enumerate(points):
            output = tmp_path / f"run-{number}.log"
            with open(output, "w") as log:
                process = subprocess.Popen(lion_local("run", "--config", str(config)), stdout=log, stderr=log)
            if previous_pid:
                # This run finds the lock of the one killed before and takes it over. (A point the
                # last kill overshot is then reached at once: the kill falls just after the restart.)
                stale = f"taking over the stale lock of pid {previous_pid} "
                wait_for(lambda: stale in output.read_text(), process, "the stale lock taken over", timeout_s=60)
            count = COUNTERS[point.counter]
            wait_for(lambda: count(run_dir, process.pid) >= point.at, process, str(point))

            if point.counter == "student server starting" and not lock_checked:
                # One writer per run: a second process on the busy run directory is turned away.
                # Asked while the student server starts, so that the whole discrimination is still
                # ahead however slowly the second process starts on a busy host.
                lock_checked = True
                second = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
                assert second.returncode == 1
                assert error_lines(second.stderr) == [
                    f"error: {run_dir}: the run is in use by pid {process.pid} on {os.uname().nodename}; "
                    "wait for it to finish or stop it first"
                ]

            started_by_run = descendants(process.pid)
            process.send_signal(signal.SIGKILL)
            kill_times.append(time.time())
            process.wait()
            assert proxy.poll() is None, "the proxy died"
            completed = json.loads((run_dir / "state.json").read_text())["completed"] if (run_dir / "state.json").exists() else []
            assert f"1/{point.stage}" not in completed, f"{point}: the kill came after the stage ended"
            # Servers and the trainer die with the process that started them.
            _, left = _still_running(started_by_run, timeout_s=20)
            assert not left, f"{point}: still running 20 s after the kill: {left}"
            previous_pid = process.pid
        result = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop(proxy)
    assert lock_checked
    everything = check_invariants(run_dir, tiny_models)
    assert json.loads((run_dir / "iter_1/sft_result.json").read_text())["resumed"] is True

    # The results of the uninterrupted run, file by file.
    for name in ("train_pool", "cache_pool", "judgements", "generated", "rejected"):
        assert jsonl(run_dir / f"iter_1/{name}.jsonl") == jsonl(reference / f"iter_1/{name}.jsonl"), name
    same_journal = {
        "teacher_answers.jsonl": (("id",), "answer"),
        "iter_1/student_answers.jsonl": (("id",), "answer"),
        "iter_1/reviews.jsonl": (("id", "order", "attempt"), "raw"),
        "iter_1/generator_calls.jsonl": (("side", "attempt"), "raw"),
    }
    for name, (key, value) in same_journal.items():
        contents = [{tuple(r[k] for k in key): r[value] for r in jsonl(directory / name)} for directory in (run_dir, reference)]
        assert contents[0] == contents[1], name
    ours, theirs = (load_file(d / "iter_1/student/model.safetensors") for d in (run_dir, reference))
    assert ours.keys() == theirs.keys()
    assert all(ours[name].equal(theirs[name]) for name in ours), "the resumed training gave other weights"

    # No journal holds a torn line or a record twice.
    for path in run_dir.rglob("*.jsonl"):
        raw = path.read_bytes()
        assert not raw or raw.endswith(b"\n"), f"{path} ends in a torn line"
        records = [json.loads(line) for line in raw.splitlines()]
        name = path.relative_to(run_dir).as_posix()
        if name in same_journal:
            identities = [tuple(r[k] for k in same_journal[name][0]) for r in records]
            assert len(identities) == len(set(identities)), f"{path} holds a record twice"

    # No call that had come back was made again, except one still in flight at a kill: killed
    # before its reply arrived (the proxy's write to a dead client's socket can still succeed), or
    # answered so shortly before that the killed run had no time to journal it (on 2 busy cores
    # that can take a few hundred ms). Teacher, referee and generator: at the proxy,
    assert set(teacher_deliveries(proxy_log, everything)) == {r["id"] for r in everything}
    repeated = 0
    for calls in answered_calls(proxy_log).values():
        for earlier in sorted(calls, key=lambda r: r["delivered"])[:-1]:
            repeated += 1
            assert any(earlier["arrived"] <= kill <= earlier["delivered"] + 2.0 for kill in kill_times), (
                f"a call answered at {earlier['delivered']} was made again; kills at {kill_times}"
            )
    assert repeated <= MAX_CONCURRENCY * len(points)
    # and the student at its server: at most the calls in flight at each kill were answered twice.
    kills_in_discrimination = sum(p.stage == "discrimination" for p in points)
    cache = lines(run_dir / "iter_1/cache_pool.jsonl")
    assert cache <= _student_server_replies(run_dir) <= cache + MAX_CONCURRENCY * kills_in_discrimination


# ----------------------------------------------------------------------------------------------
# A permanent outage, and a server that dies
# ----------------------------------------------------------------------------------------------


def _student_server(stage_pid: int, run_dir: Path) -> int | None:
    """The pid of the student server a stage started (not its supervisor), or None before it runs."""
    found = [pid for pid, command in descendants(stage_pid).items()
             if str(run_dir / "iter_1/student") in command and "serving/supervisor.py" not in command]
    return found[0] if len(found) == 1 else None


def test_permanent_outage_and_a_dead_student_server_end_the_stage_in_one_line(
    tiny_models: Path, teacher_url: str, tmp_path: Path
) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    port = free_port()
    proxy, proxy_url = start_proxy(teacher_url, proxy_log, port=port)
    budget = 10.0
    config = greedy_config(tiny_models, tmp_path, proxy_url, failure_budget_s=budget)
    run_dir = tmp_path / "run"
    stage = lambda name: lion_local("stage", name, "--config", str(config))  # noqa: E731
    try:
        # The teacher's server goes away for good in the middle of imitation.
        imitation = subprocess.Popen(stage("imitation"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: lines(run_dir / "teacher_answers.jsonl") >= 4, imitation, "4 teacher answers")
        proxy.kill()
        proxy.wait()
        gone = time.monotonic()
        _, stderr = imitation.communicate(timeout=budget + 60)
        ended_after = time.monotonic() - gone
        assert imitation.returncode == 1
        [line] = error_lines(stderr)
        assert re.fullmatch(
            rf"error: endpoint 'teacher' \(http://127\.0\.0\.1:{port}/v1/chat/completions\) failed for \d+\.\d s over \d+ "
            r"attempts; last error: ClientConnectorError: Cannot connect to host 127\.0\.0\.1:\d+ .*; the server may be "
            r"down or overloaded: check it, then re-run the stage",
            line,
        ), line
        # At least the budget; at most the budget and one request timeout, with room for a host
        # three times slower (a stage that kept retrying would never end).
        assert budget <= ended_after < 3 * (budget + REQUEST_TIMEOUT_S)
        assert json.loads((run_dir / "state.json").read_text())["completed"] == []

        # The server is back: the same command completes, and nothing answered before is asked again.
        answered_before = lines(run_dir / "teacher_answers.jsonl")
        proxy, _ = start_proxy(teacher_url, proxy_log, port=port)
        again = subprocess.run(stage("imitation"), capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"teacher answers: {answered_before} of {SEEDS} cached, {SEEDS - answered_before} to request" in again.stderr
        assert lines(run_dir / "teacher_answers.jsonl") == SEEDS
        assert all(len(calls) == 1 for calls in answered_calls(proxy_log).values())

        # The student server the run started dies in the middle of discrimination.
        discrimination = subprocess.Popen(stage("discrimination"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        answers = run_dir / "iter_1/student_answers.jsonl"
        wait_for(lambda: _student_server(discrimination.pid, run_dir) is not None, discrimination, "the student server")
        server = _student_server(discrimination.pid, run_dir)
        # Frozen at its first answer, killed once frozen: the kill lands while answers are still owed
        # (a server killed after its last answer was journaled would end nothing, rightly).
        wait_for(lambda: lines(answers) >= 1, discrimination, "a student answer", timeout_s=240.0)
        os.kill(server, signal.SIGSTOP)
        time.sleep(1.0)
        assert lines(answers) < SEEDS, "every student answer came back before the server was frozen"
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = discrimination.communicate(timeout=120)
        assert discrimination.returncode == 1
        # The student's failure budget is STUDENT_BUDGET_S: a stage that retried the dead server
        # would take all of it; reporting it at once takes seconds, even on a host three times slower.
        assert time.monotonic() - killed < STUDENT_BUDGET_S / 2, "a dead server must be reported at once, not after the failure budget"
        [line] = error_lines(stderr)
        assert line.startswith("error: endpoint 'student' (http://127.0.0.1:")
        assert f"the student server (pid {server}) was killed by SIGKILL while in use; last log lines: " in line
        assert f"full log: {run_dir / 'logs/server-student.log'}; last error: " in line

        rerun = subprocess.run(stage("discrimination"), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        stop(proxy)
    assert sorted(r["id"] for r in jsonl(answers)) == sorted(r["id"] for r in jsonl(run_dir / "iter_1/cache_pool.jsonl"))
    assert len(jsonl(run_dir / "iter_1/judgements.jsonl")) == SEEDS
    assert all(len(calls) == 1 for calls in answered_calls(proxy_log).values())
