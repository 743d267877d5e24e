"""The loop in discrimination.signal likelihood and none, for real: killed, resumed, checked, compared.

One first imitation on the tiny models (the teacher: the session's `transformers serve`, behind the
recording proxy as an external endpoint; the student trained by TRL and served by vLLM's CPU build),
made once; each arm continues a copy of it with `--accept-change discrimination.signal`, as
benchmarks/loop_effect.py does, and is SIGKILLed in the middle of its own work:

- likelihood, once its first gaps are journaled: the resumed run computes only the missing gaps,
  each from the student's vLLM prompt logprobs (one generated token per prefill; the figure agrees
  with transformers in this process), and the finished run passes the loop's invariants by the
  likelihood's rules (tests/loop_checks.py: no student answer, no review, hard above the quantile).
- none, once its first generator replies are journaled: no discrimination call at all, every seed
  drawn uniformly from the whole Cache Pool, no journaled call asked again.
In both, the proxy delivered each teacher answer once. `lion-local compare` then reads the two
finished arms (table and plots) and refuses, in one line, a run started from other seeds.
Unit tests of the same rules, against a fake endpoint: tests/test_discrimination_signals.py.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loop_checks import check_invariants, jsonl, lion_local, proxy_records, run_config, start_proxy, stop, teacher_deliveries

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
GAPS = re.compile(r"likelihood gaps: (\d+) of (\d+) journaled, (\d+) to compute")


@pytest.fixture(scope="module")
def first_imitation(tiny_models: Path, teacher_url: str, tmp_path_factory) -> dict:
    """A run after its first imitation (signal none), its teacher behind the recording proxy."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm/ (vLLM's CPU build): `make install` creates it on CPU machines")
    directory = tmp_path_factory.mktemp("signal-arms")
    proxy_log = directory / "teacher-requests.jsonl"
    proxy, proxy_url = start_proxy(teacher_url, proxy_log)
    data = yaml.safe_load(run_config(tiny_models, directory, proxy_url).read_text())
    data.update(iterations=1, seed_limit=12)  # the suite's time: a few of everything is enough here
    data["generation"]["new_per_iteration"] = 8
    data["imitation"]["final_imitation"] = False
    data["discrimination"]["signal"] = "none"
    student = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())["servers"]["student"]
    student["model"] = str(tiny_models / "student")
    student["vllm"]["launcher"][0] = str(VLLM_PYTHON)
    data["servers"]["student"] = student
    config = directory / "base.yaml"
    config.write_text(yaml.safe_dump(data))
    try:
        result = subprocess.run(lion_local("stage", "imitation", "--config", str(config)), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        yield {"data": data, "run_dir": Path(data["run_dir"]), "proxy_log": proxy_log, "directory": directory,
               "teacher_url": teacher_url}
    finally:
        stop(proxy)


def continue_as(base: dict, signal_name: str, killed_when) -> dict:
    """A copy of the first imitation continued in `signal_name`, SIGKILLed once `killed_when(run_dir)`
    holds, then resumed to the end; returns what the test checks."""
    directory = base["directory"] / signal_name
    run_dir = directory / "run"
    shutil.copytree(base["run_dir"], run_dir)
    # The arm's own proxy (the endpoint's address is operational: no --accept-change for it).
    proxy, proxy_url = start_proxy(base["teacher_url"], directory / "teacher-requests.jsonl")
    teacher = {**base["data"]["servers"]["teacher"], "base_urls": [f"{proxy_url}/v1"]}
    data = {**base["data"], "run_dir": str(run_dir), "servers": {**base["data"]["servers"], "teacher": teacher},
            "discrimination": {**base["data"]["discrimination"], "signal": signal_name}}
    config = directory / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    try:
        return _killed_and_resumed(run_dir, config, killed_when) | {"proxy_log": directory / "teacher-requests.jsonl"}
    finally:
        stop(proxy)


def _killed_and_resumed(run_dir: Path, config: Path, killed_when) -> dict:
    command = lion_local("run", "--config", str(config), "--accept-change", "discrimination.signal")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline and not killed_when(run_dir):
        time.sleep(0.01)
    assert first.poll() is None, f"the run ended before the kill point: {first.stdout.read()[-3000:]}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    outcome = {"run_dir": run_dir, "config": config, "first_output": first.stdout.read()}
    outcome["likelihoods_at_kill"] = len(jsonl(run_dir / "iter_1/likelihoods.jsonl")) if (run_dir / "iter_1/likelihoods.jsonl").exists() else 0
    outcome["generator_calls_at_kill"] = len(jsonl(run_dir / "iter_1/generator_calls.jsonl")) if (run_dir / "iter_1/generator_calls.jsonl").exists() else 0
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    outcome["second_output"] = second.stderr
    return outcome


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def arms(first_imitation: dict, tiny_models: Path) -> dict:
    likelihood = continue_as(first_imitation, "likelihood", lambda run: lines(run / "iter_1/likelihoods.jsonl") >= 1)
    none = continue_as(first_imitation, "none", lambda run: lines(run / "iter_1/generator_calls.jsonl") >= 1)
    return {"likelihood": likelihood, "none": none, "base": first_imitation}


def test_a_likelihood_run_killed_in_its_gaps_resumes_them_from_the_students_prompt_logprobs(arms: dict, tiny_models: Path):
    from transformers import AutoTokenizer

    from lion_local.stages.likelihood import SERVER_METHOD, local_nll, student_scored

    outcome = arms["likelihood"]
    run_dir = outcome["run_dir"]
    everything = check_invariants(run_dir, tiny_models)
    cache = jsonl(run_dir / "iter_1/cache_pool.jsonl")
    records = jsonl(run_dir / "iter_1/likelihoods.jsonl")
    summary = yaml.safe_load((run_dir / "iter_1/discrimination.json").read_text())
    assert summary["method"] == SERVER_METHOD and {r["completion_tokens"] for r in records} == {1}
    assert 0 < summary["hard"] < len(cache) and summary["unjudged"] == 0
    # The resumed stage computed only the gaps the killed one had not journaled.
    resumed = GAPS.findall(outcome["second_output"])
    if outcome["likelihoods_at_kill"] < len(cache):
        assert resumed and int(resumed[0][0]) >= outcome["likelihoods_at_kill"] >= 1, resumed
        assert int(resumed[0][0]) + int(resumed[0][2]) == len(cache)
    # vLLM's prompt logprobs give the figure transformers gives here, for the same token ids.
    student = run_dir / "iter_1/student"
    tokenizer = AutoTokenizer.from_pretrained(student)
    answers = {r["id"]: r["answer"] for r in jsonl(run_dir / "teacher_answers.jsonl")}
    by_id = {r["id"]: r for r in records}
    sample = [r for r in cache if r["id"] in by_id][:4]
    scored = [student_scored(tokenizer, "alpaca", r["instruction"], r["input"], answers[r["id"]]) for r in sample]
    for record, here in zip(sample, local_nll(str(student), scored)):
        assert here["tokens"] == by_id[record["id"]]["tokens"]
        assert math.isclose(here["nll"], by_id[record["id"]]["nll"], rel_tol=0.02), (here, by_id[record["id"]])
    assert_each_teacher_answer_delivered_once(arms["base"], outcome, everything)


def assert_each_teacher_answer_delivered_once(base: dict, outcome: dict, everything: list[dict]) -> None:
    """The first imitation's proxy and the arm's together delivered each teacher answer once."""
    delivered = teacher_deliveries(base["proxy_log"], everything)
    for instruction, times in teacher_deliveries(outcome["proxy_log"], everything).items():
        delivered.setdefault(instruction, []).extend(times)
    assert set(delivered) == {r["id"] for r in everything}
    assert {len(times) for times in delivered.values()} == {1}


def test_a_run_without_discrimination_killed_in_its_generation_resumes_without_asking_again(arms: dict, tiny_models: Path):
    outcome = arms["none"]
    run_dir = outcome["run_dir"]
    assert_each_teacher_answer_delivered_once(arms["base"], outcome, check_invariants(run_dir, tiny_models))
    assert "==== 1/discrimination done" in outcome["first_output"] and outcome["generator_calls_at_kill"] >= 1
    # No server was started for the student: nothing asked it anything.
    assert "student server" not in outcome["first_output"] + outcome["second_output"]
    calls = jsonl(run_dir / "iter_1/generator_calls.jsonl")
    seeds = {call["seed"] for call in calls}
    # The proxy delivered each journaled generator call once (the calls in flight at the kill, at
    # most the endpoint's max_concurrency, were delivered to no journal and asked again).
    delivered = [r for r in proxy_records(outcome["proxy_log"]) if r["status"] == 200
                 and r["path"].endswith("/chat/completions") and "#New Instruction#" in r["body"]["messages"][-1]["content"]]
    delivered_seeds = [r["body"].get("seed") for r in delivered if r["body"].get("seed") in seeds]
    assert set(delivered_seeds) == seeds
    assert len(delivered_seeds) - len(set(delivered_seeds)) <= arms["base"]["data"]["servers"]["teacher"]["max_concurrency"]


def test_compare_reads_both_arms_and_refuses_a_run_of_other_seeds(arms: dict, tmp_path: Path):
    like, none = arms["likelihood"]["run_dir"], arms["none"]["run_dir"]
    out = tmp_path / "compare"
    result = subprocess.run(lion_local("compare", str(like), str(none), "--out", str(out)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    assert table["signal"] == ["likelihood", "none"]
    assert (out / "compare.md").exists() and (out / "compare.json").exists()
    for name in ("hard_share.png", "cost.png"):
        assert (out / "plots" / name).stat().st_size > 10_000, name

    other = tmp_path / "other"
    shutil.copytree(none, other)
    pool = other / "iter_1/cache_pool.jsonl"
    pool.write_text("".join(pool.read_text().splitlines(keepends=True)[1:]))
    refused = subprocess.run(lion_local("compare", str(like), str(other), "--out", str(tmp_path / "refused")),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "seed" in refused.stderr and not (tmp_path / "refused").exists()
