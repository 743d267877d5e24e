"""The whole adversarial loop on the tiny models, for real: `lion-local run` as a user runs it.

The teacher is a real `transformers serve` process (started with `lion-local serve teacher`)
behind a recording proxy, configured as an external endpoint, so that the requests that reached
the teacher are counted from the server's side, not from lion-local's own journal. The student
is served by the run itself and trained with TRL under `accelerate launch`.

- test_run_end_to_end: an uninterrupted run; every invariant of the method and the run-directory
  contract; `status` and a second `run` on the complete run.
- test_run_survives_sigkill_in_every_stage: the same run killed with SIGKILL during teacher
  answering, during training (after a trainer checkpoint), during reviews and during
  generation, re-run after each kill; it completes with the same invariants, resumes training
  from the checkpoint, and never asks the teacher again for an instruction already answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from rouge_score import rouge_scorer
from safetensors.torch import load_file

from lion_local.roles.teacher import teacher_messages
from serving.process import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "tests" / "recording_proxy.py"


def _tiny_config(tiny_models: Path, run_dir: Path) -> dict:
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(run_dir)
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    data["servers"]["teacher"]["model"] = str(tiny_models / "teacher")
    data["servers"]["student"]["model"] = str(tiny_models / "student")
    return data


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process serving {url} exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def teacher_url(tiny_models: Path, tmp_path_factory) -> str:
    """A real transformers serve process with the tiny teacher, started by `lion-local serve`."""
    directory = tmp_path_factory.mktemp("teacher-service")
    data = _tiny_config(tiny_models, directory / "serve-run")
    port = free_port()
    data["servers"]["teacher"]["port"] = port
    config = directory / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    log = open(directory / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "lion_local", "serve", "teacher", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


def _start_proxy(upstream: str, log: Path, delay_generator_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(PROXY), "--upstream", upstream, "--port", str(port), "--log", str(log),
         "--delay-generator-s", str(delay_generator_s)],
    )
    _wait_healthy(f"http://127.0.0.1:{port}/health", process)
    return process, f"http://127.0.0.1:{port}"


def _run_config(tiny_models: Path, tmp_path: Path, proxy_url: str) -> Path:
    data = _tiny_config(tiny_models, tmp_path / "run")
    data["servers"]["teacher"] = {
        "engine": "external",
        "base_urls": [f"{proxy_url}/v1"],
        "served_model_name": str(tiny_models / "teacher"),  # transformers serve wants its model path
        "max_concurrency": 4,
        "request_timeout_s": 120,
        "failure_budget_s": 60,
    }
    data["imitation"]["save_steps"] = 2  # trainer checkpoints often enough to kill after one
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _lion_local(*args: str) -> list[str]:
    return [sys.executable, "-m", "lion_local", *args]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _teacher_deliveries(proxy_log: Path, pools: list[dict]) -> dict[str, list[float]]:
    """Delivery times of the teacher's answers per instruction id, from the proxy's records."""
    prompt_to_id = {teacher_messages(r["instruction"], r["input"])[-1]["content"]: r["id"] for r in pools}
    deliveries: dict[str, list[float]] = {}
    for record in _jsonl(proxy_log):
        body = record["body"]
        if not record["path"].endswith("/chat/completions") or record["status"] != 200:
            continue
        content = body["messages"][-1]["content"]
        if content in prompt_to_id:
            deliveries.setdefault(prompt_to_id[content], []).append(record["delivered"])
        else:
            assert "#New Instruction#" in content or "[Answer of Assistant 1]" in content, content[:200]
    return deliveries


def _check_invariants(run_dir: Path, tiny_models: Path, tau: float = 1.0, threshold: float = 0.7) -> list[dict]:
    """Every invariant of the method on a finished 2-iteration run; returns all instructions."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    iterations = config["iterations"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"] == [
        f"{k}/{stage}" for k in range(1, iterations + 1) for stage in ("imitation", "discrimination", "generation")
    ] + ["final/imitation"]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for k in range(1, iterations + 1):
        directory = run_dir / f"iter_{k}"
        train, cache = _jsonl(directory / "train_pool.jsonl"), _jsonl(directory / "cache_pool.jsonl")
        generated = _jsonl(directory / "generated.jsonl")
        following = run_dir / (f"iter_{k + 1}" if k < iterations else "final")
        # Pools: Train k+1 is replaced by generated k; Cache k+1 is Cache k extended by it.
        assert _jsonl(following / "train_pool.jsonl") == generated
        if k < iterations:
            next_cache = _jsonl(following / "cache_pool.jsonl")
            assert next_cache == cache + generated
            assert len({r["id"] for r in next_cache}) == len(next_cache), "duplicate ids in the Cache Pool"
        assert {r["id"] for r in train} <= {r["id"] for r in cache}
        for record in generated:
            assert record["origin"] in ("hard", "easy") and record["iteration"] == k and record["input"] == ""
            assert record["parent"] in {r["id"] for r in cache}

        # Novelty: rouge-score itself, against Cache Pool k and the instructions accepted before.
        earlier = [r["instruction"] for r in cache]
        for record in generated:
            worst = max(scorer.score(text, record["instruction"])["rougeL"].fmeasure for text in earlier)
            assert worst <= threshold, (record["instruction"], worst)
            earlier.append(record["instruction"])

        # Judgements: per-model scores are the means over both orders; labels follow gap and tau.
        reviews = _jsonl(directory / "reviews.jsonl")
        first_readable: dict[tuple[str, str], list[float]] = {}
        for review in reviews:
            if review["scores"] is not None:
                first_readable.setdefault((review["id"], review["order"]), review["scores"])
        judgements = _jsonl(directory / "judgements.jsonl")
        assert [j["id"] for j in judgements] == [r["id"] for r in cache]
        for judgement in judgements:
            tf = first_readable.get((judgement["id"], "teacher_first"))
            sf = first_readable.get((judgement["id"], "student_first"))
            if tf is None or sf is None:
                assert judgement["label"] == "unjudged" and judgement["gap"] is None
                continue
            assert judgement["teacher_score"] == pytest.approx((tf[0] + sf[1]) / 2)
            assert judgement["student_score"] == pytest.approx((tf[1] + sf[0]) / 2)
            assert judgement["gap"] == pytest.approx(judgement["teacher_score"] - judgement["student_score"])
            assert judgement["label"] == ("hard" if judgement["gap"] >= tau else "easy")

        # Ratio: accepted per side follows the quota, or the report says why not.
        report = json.loads((directory / "report.json").read_text())
        generation = report["generation"]
        sides = Counter(r["origin"] for r in generated)
        assert sides["hard"] == generation["accepted"]["hard"] and sides["easy"] == generation["accepted"]["easy"]
        wanted = config["generation"]["new_per_iteration"]
        expected_hard = round(wanted * config["generation"]["hard_ratio"])
        if generation["quota"]["hard"] != expected_hard:
            assert any("no hard seeds" in n or "no easy seeds" in n for n in generation["notes"])
        for side in ("hard", "easy"):
            if sides[side] != generation["quota"][side]:
                assert generation["shortfall"][side] == generation["quota"][side] - sides[side]
                assert any(n.startswith(f"{side}:") for n in generation["notes"])
        labels = Counter(j["label"] for j in judgements)
        assert report["labels"] == {label: labels.get(label, 0) for label in ("hard", "easy", "unjudged")}
        assert report["pools"] == {
            "train": len(train), "cache": len(cache), "generated": len(generated),
            "next_train": len(generated), "next_cache": len(cache) + len(generated),
        }
        assert sum(b["count"] for b in report["scores"]["gap_histogram"]) == labels["hard"] + labels["easy"]
        for role in ("teacher", "student", "referee", "generator"):
            assert report["roles"][role]["calls"] > 0 or role == "teacher" and k > 1 and not train
        assert report["roles"]["student"]["calls"] == len(cache)
        assert report["roles"]["referee"]["calls"] == len(reviews)

        # Journals: one record per completed call, never two.
        assert len({r["id"] for r in _jsonl(directory / "student_answers.jsonl")}) == len(cache)
        assert len(_jsonl(directory / "student_answers.jsonl")) == len(cache)
        keys = [(r["id"], r["order"], r["attempt"]) for r in reviews]
        assert len(keys) == len(set(keys))
        calls = [(r["side"], r["attempt"]) for r in _jsonl(directory / "generator_calls.jsonl")]
        assert len(calls) == len(set(calls))
    answers = _jsonl(run_dir / "teacher_answers.jsonl")
    assert len({r["id"] for r in answers}) == len(answers), "an instruction was answered twice"

    # Each checkpoint's weights differ from the one it continued from.
    chain = [tiny_models / "student"] + [run_dir / f"iter_{k}/student" for k in range(1, iterations + 1)]
    chain.append(run_dir / "final/student")
    for before, after in zip(chain, chain[1:]):
        old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
        assert old.keys() == new.keys()
        assert any(not old[name].equal(new[name]) for name in old), f"{after} equals {before}"
        assert (after / "tokenizer.json").exists()

    last = iterations
    everything = _jsonl(run_dir / f"iter_{last}/cache_pool.jsonl") + _jsonl(run_dir / f"iter_{last}/generated.jsonl")
    assert {r["id"] for r in answers} == {r["id"] for r in everything}
    return everything


def test_run_end_to_end(tiny_models: Path, teacher_url: str, tmp_path: Path) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = _start_proxy(teacher_url, proxy_log)
    try:
        config = _run_config(tiny_models, tmp_path, proxy_url)
        started = time.monotonic()
        result = subprocess.run(_lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert time.monotonic() - started < 400
    finally:
        _stop(proxy)
    run_dir = tmp_path / "run"
    everything = _check_invariants(run_dir, tiny_models)

    # Every distinct instruction reached the teacher exactly once, as the server side saw it.
    deliveries = _teacher_deliveries(proxy_log, everything)
    assert set(deliveries) == {r["id"] for r in everything}
    assert {len(times) for times in deliveries.values()} == {1}

    status = subprocess.run(_lion_local("status", "--config", str(config)), capture_output=True, text=True)
    assert status.returncode == 0
    assert "complete" in status.stdout.splitlines()[0]
    assert status.stdout.count(" done ") == 7

    started = time.monotonic()
    again = subprocess.run(_lion_local("run", "--config", str(config)), capture_output=True, text=True)
    assert again.returncode == 0
    assert "is complete: nothing to do" in again.stdout
    assert time.monotonic() - started < 30
    assert "server" not in again.stderr  # nothing was started


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_run_survives_sigkill_in_every_stage(tiny_models: Path, teacher_url: str, tmp_path: Path) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = _start_proxy(teacher_url, proxy_log, delay_generator_s=0.4)
    run_dir = tmp_path / "run"
    kill_points = [
        ("imitation: teacher answers", lambda: _lines(run_dir / "teacher_answers.jsonl") >= 12),
        ("imitation: training", lambda: any((run_dir / "iter_1/sft_checkpoints").glob("checkpoint-*/trainer_state.json"))),
        ("discrimination: reviews", lambda: _lines(run_dir / "iter_1/reviews.jsonl") >= 20),
        ("generation", lambda: _lines(run_dir / "iter_1/generator_calls.jsonl") >= 2),
    ]
    kill_times: list[float] = []
    try:
        config = _run_config(tiny_models, tmp_path, proxy_url)
        for number, (name, reached) in enumerate(kill_points):
            output = tmp_path / f"run-{number}.log"
            with open(output, "w") as log:
                process = subprocess.Popen(_lion_local("run", "--config", str(config)), stdout=log, stderr=log)
            deadline = time.monotonic() + 300
            while not reached():
                if process.poll() is not None:
                    tail = output.read_text()[-3000:]
                    raise AssertionError(f"run ended (code {process.returncode}) before kill point {name!r}: {tail}")
                assert time.monotonic() < deadline, f"kill point {name!r} not reached"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            kill_times.append(time.time())
            process.wait()
            state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
            assert "2/imitation" not in state.get("completed", []), f"kill point {name!r} came too late"
            time.sleep(1.0)  # servers the killed run started get SIGTERM from the kernel
        result = subprocess.run(_lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        _stop(proxy)

    everything = _check_invariants(run_dir, tiny_models)
    assert json.loads((run_dir / "iter_1/sft_result.json").read_text())["resumed"] is True

    # No instruction was asked of the teacher again once its answer had come back, except an
    # answer delivered in the instant before a kill, which the killed run could not journal.
    deliveries = _teacher_deliveries(proxy_log, everything)
    assert set(deliveries) == {r["id"] for r in everything}
    for instruction_id, times in deliveries.items():
        for earlier in sorted(times)[:-1]:
            assert any(0 <= kill - earlier < 0.5 for kill in kill_times), (
                f"instruction {instruction_id} was answered at {earlier} and asked again later"
            )
    # The journal has one answer per instruction although requests in flight were repeated.
    answers = _jsonl(run_dir / "teacher_answers.jsonl")
    assert len(answers) == len(everything)
    assert os.path.isdir(run_dir / "final/student")
