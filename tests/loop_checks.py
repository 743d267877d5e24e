"""Helpers shared by the tests that run the whole loop for real (test_loop_integration, test_slurm).

- tiny_config / run_config: configs/tiny-cpu-transformers.yaml with absolute paths under a test's tmp dir; the
  run_config variant makes the teacher an external endpoint behind the recording proxy (and,
  greedy, samples at temperature 0 so that two runs of it give the same results).
- start_proxy / proxy_records / teacher_deliveries: the recording proxy (which can inject faults),
  what it saw, and the teacher answers it delivered.
- check_invariants: every invariant of the method and the run-directory contract on a finished run.
- descendants / process_environment: the process tree under a pid, read from /proc.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy
import pytest
import yaml
from rouge_score import rouge_scorer
from safetensors.torch import load_file

from lion_local.roles.teacher import teacher_messages
from lion_local.run.records import request_seed
from serving.process import free_port

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "tests" / "recording_proxy.py"


def tiny_config(tiny_models: Path, run_dir: Path) -> dict:
    data = yaml.safe_load((ROOT / "configs/tiny-cpu-transformers.yaml").read_text())
    data["run_dir"] = str(run_dir)
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    data["servers"]["teacher"]["model"] = str(tiny_models / "teacher")
    data["servers"]["student"]["model"] = str(tiny_models / "student")
    return data


def set_keys(data: dict, changes: dict) -> dict:
    """`data` with each dotted key path set to its value, sections made as needed."""
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 180.0) -> None:
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


@contextmanager
def served_teacher(config: Path, port: int, timeout_s: float = 180.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """`lion-local serve teacher --config CONFIG` (its server on `port`), logged to serve.log beside
    the config; yields its URL once healthy and stops it after."""
    with open(config.parent / "serve.log", "w") as log:
        process = subprocess.Popen(lion_local("serve", "teacher", "--config", str(config)), stdout=log, stderr=log, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, timeout_s=timeout_s)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_proxy(
    upstream: str, log: Path, delay_generator_s: float = 0.0, port: int | None = None, faults: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """The recording proxy in front of `upstream`; `faults` are its fault options (see its docstring)."""
    port = port or free_port()
    with open(log.with_name(log.name + ".stderr"), "a") as stderr:  # the proxy's own messages
        process = subprocess.Popen(
            [sys.executable, str(PROXY), "--upstream", upstream, "--port", str(port), "--log", str(log),
             "--delay-generator-s", str(delay_generator_s), *faults],
            stdout=stderr, stderr=stderr,
        )
    wait_healthy(f"http://127.0.0.1:{port}/health", process)
    return process, f"http://127.0.0.1:{port}"


def proxy_records(log: Path) -> list[dict]:
    """The requests the proxy saw (its outage lines left out)."""
    return [record for record in jsonl(log) if "path" in record]


def run_config(
    tiny_models: Path, tmp_path: Path, proxy_url: str, greedy: bool = False, on_vllm: bool = False, referee_mode: str | None = None
) -> Path:
    """The smoke config with the teacher at `proxy_url`: `transformers serve` (which wants its model
    path as the model name) or, `on_vllm`, vLLM serving it as "teacher"."""
    data = tiny_config(tiny_models, tmp_path / "run")
    if referee_mode is not None:
        data["roles"]["referee"]["mode"] = referee_mode
    data["servers"]["teacher"] = {
        "engine": "external",
        "base_urls": [f"{proxy_url}/v1"],
        "served_model_name": "teacher" if on_vllm else str(tiny_models / "teacher"),
        "max_concurrency": 4,
        "request_timeout_s": 120,
        "failure_budget_s": 60,
    }
    data["imitation"].setdefault("trainer", {})["save_steps"] = 2  # trainer checkpoints often enough to kill after one
    if greedy:
        # Seeded sampling is not repeatable under concurrency on `transformers serve`; greedy is.
        for role in ("teacher", "referee", "generator", "student"):
            data["roles"][role]["temperature"] = 0.0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` (children, grandchildren, ...) -> its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited while we looked
        # The command name in parentheses may hold spaces; the fields after it are fixed.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def process_environment(pid: int) -> dict[str, str] | None:
    """The environment `pid` was started with, or None once it has exited (or is exiting: its
    memory is gone, and /proc shows an empty environment)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def lion_local(*args: str) -> list[str]:
    return [sys.executable, "-m", "lion_local", *args]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def teacher_deliveries(proxy_log: Path, pools: list[dict]) -> dict[str, list[float]]:
    """Delivery times of the teacher's answers per instruction id, from the proxy's records."""
    prompt_to_id = {teacher_messages(r["instruction"], r["input"])[-1]["content"]: r["id"] for r in pools}
    deliveries: dict[str, list[float]] = {}
    for record in proxy_records(proxy_log):
        body = record["body"]
        if not record["path"].endswith("/chat/completions") or record["status"] != 200:
            continue
        content = body["messages"][-1]["content"]
        if content in prompt_to_id:
            deliveries.setdefault(prompt_to_id[content], []).append(record["delivered"])
        else:
            assert "#New Instruction#" in content or "[Answer of Assistant 1]" in content, content[:200]
    return deliveries


def check_invariants(
    run_dir: Path, tiny_models: Path, tau: float = 1.0, threshold: float = 0.7, novelty_sample: int | None = None
) -> list[dict]:
    """Every invariant of the method on a finished run; returns the instructions the teacher answered.

    novelty_sample: check only this many generated instructions per iteration (evenly spaced) with
    rouge-score, for runs whose pools make the pair-by-pair check take hours; None: all of them.
    """
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    iterations = config["iterations"]
    state = json.loads((run_dir / "state.json").read_text())
    final = config["imitation"]["final_imitation"]
    assert state["completed"] == [
        f"{k}/{stage}" for k in range(1, iterations + 1) for stage in ("imitation", "discrimination", "generation")
    ] + (["final/imitation"] if final else [])

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for k in range(1, iterations + 1):
        directory = run_dir / f"iter_{k}"
        train, cache = jsonl(directory / "train_pool.jsonl"), jsonl(directory / "cache_pool.jsonl")
        generated = jsonl(directory / "generated.jsonl")
        following = run_dir / (f"iter_{k + 1}" if k < iterations else "final")
        # Pools: Train k+1 is replaced by generated k; Cache k+1 is Cache k extended by it.
        if k < iterations or final:
            assert jsonl(following / "train_pool.jsonl") == generated
        if k < iterations:
            next_cache = jsonl(following / "cache_pool.jsonl")
            assert next_cache == cache + generated
            assert len({r["id"] for r in next_cache}) == len(next_cache), "duplicate ids in the Cache Pool"
        assert {r["id"] for r in train} <= {r["id"] for r in cache}
        for record in generated:
            assert record["origin"] in ("hard", "easy") and record["iteration"] == k and record["input"] == ""
            assert record["parent"] in {r["id"] for r in cache}

        # Novelty: rouge-score itself, against Cache Pool k and the instructions accepted before.
        step = max(1, len(generated) // novelty_sample) if novelty_sample else 1
        for position in range(0, len(generated), step)[: novelty_sample or None]:
            record = generated[position]
            earlier = [r["instruction"] for r in cache] + [r["instruction"] for r in generated[:position]]
            worst = max(scorer.score(text, record["instruction"])["rougeL"].fmeasure for text in earlier)
            assert worst <= threshold, (record["instruction"], worst)

        judgements = jsonl(directory / "judgements.jsonl")
        assert [j["id"] for j in judgements] == [r["id"] for r in cache]
        signal = config["discrimination"].get("signal", "referee")
        if signal == "referee":
            _check_referee(directory, judgements, config, cache, tau)
        elif signal == "likelihood":
            _check_likelihood(directory, judgements, config, cache)
        else:
            _check_no_discrimination(directory, judgements, config, cache, k)
        # Each generator call's seed is of its side (signal none: any Cache Pool instruction).
        sides_of = {j["id"]: {"hard", "easy"} if j["label"] == "any" else {j["label"]} for j in judgements}
        for call in jsonl(directory / "generator_calls.jsonl"):
            assert call["side"] in sides_of[call["parent"]], call

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
        assert report["roles"]["teacher"]["calls"] > 0 or k > 1 and not train
        assert report["roles"]["generator"]["calls"] > 0
        assert report["pools"] == {
            "train": len(train), "cache": len(cache), "generated": len(generated),
            "next_train": len(generated), "next_cache": len(cache) + len(generated),
        }
        calls = [(r["side"], r["attempt"]) for r in jsonl(directory / "generator_calls.jsonl")]
        assert len(calls) == len(set(calls))
    answers = jsonl(run_dir / "teacher_answers.jsonl")
    assert len({r["id"] for r in answers}) == len(answers), "an instruction was answered twice"

    # Each checkpoint's weights differ from the one it continued from (a LoRA adapter served as
    # such: its B matrices, zero when an adapter starts, were trained away from zero).
    chain = [tiny_models / "student"] + [run_dir / f"iter_{k}/student" for k in range(1, iterations + 1)]
    if final:
        chain.append(run_dir / "final/student")
    for before, after in zip(chain, chain[1:]):
        assert (after / "tokenizer.json").exists()
        if (after / "adapter_model.safetensors").exists():
            adapter = load_file(after / "adapter_model.safetensors")
            assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
            continue
        old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
        assert old.keys() == new.keys()
        assert any(not old[name].equal(new[name]) for name in old), f"{after} equals {before}"

    last = iterations
    everything = jsonl(run_dir / f"iter_{last}/cache_pool.jsonl") + jsonl(run_dir / f"iter_{last}/generated.jsonl")
    # The teacher answered every Cache Pool instruction, and the last generated ones when the
    # final imitation trained on them.
    answered = everything if final else jsonl(run_dir / f"iter_{last}/cache_pool.jsonl")
    assert {r["id"] for r in answers} == {r["id"] for r in answered}
    return answered


def _check_referee(directory: Path, judgements: list[dict], config: dict, cache: list[dict], tau: float) -> None:
    """signal referee: per-model scores are the means over both orders; labels follow gap and tau. Only
    the reviews asked under the referee's last settings count (a resume in another mode asks again)."""
    journaled = jsonl(directory / "reviews.jsonl")
    reviews = [r for r in journaled if r["referee"] == journaled[-1]["referee"]] if journaled else []
    first_readable: dict[tuple[str, str], list[float]] = {}
    for review in reviews:
        if review["scores"] is not None:
            first_readable.setdefault((review["id"], review["order"]), review["scores"])
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

    report = json.loads((directory / "report.json").read_text())
    labels = Counter(j["label"] for j in judgements)
    assert sum(b["count"] for b in report["scores"]["gap_histogram"]) == labels["hard"] + labels["easy"]
    for role in ("student", "referee", "generator"):
        assert report["roles"][role]["calls"] > 0
    assert report["roles"]["student"]["calls"] == len(cache)
    controls = jsonl(directory / "controls.jsonl") if (directory / "controls.jsonl").exists() else []
    assert report["roles"]["referee"]["calls"] == len(journaled) + len(controls)

    # Control pairs: Cache Pool instructions reviewed apart, in both orders; their figures are the
    # summary's; they judge nothing (the judgements are the Cache Pool's, one each, checked above).
    current = [c for c in controls if c["referee"] == (controls[-1]["referee"] if controls else None)]
    assert {c["id"] for c in current} <= {r["id"] for r in cache}
    check = report["referee_check"]
    assert check["pairs"] == len({c["id"] for c in current}) <= config["discrimination"]["referee_check"]["control_pairs"]
    assert check["replies"] == len(current)
    if check["pairs"]:
        assert {c["order"] for c in current} == {"teacher_first", "student_first"}
        assert check["accuracy"] is None or check["accuracy"] >= config["discrimination"]["referee_check"]["min_control_accuracy"]
        assert check["unjudged_share"] <= config["discrimination"]["referee_check"]["max_unjudged_share"]

    # Journals: one record per completed call, never two.
    assert len({r["id"] for r in jsonl(directory / "student_answers.jsonl")}) == len(cache)
    assert len(jsonl(directory / "student_answers.jsonl")) == len(cache)
    for journal in (reviews, current):
        keys = [(r["id"], r["order"], r["attempt"]) for r in journal]
        assert len(keys) == len(set(keys))


def _check_likelihood(directory: Path, judgements: list[dict], config: dict, cache: list[dict]) -> None:
    """signal likelihood: one journaled gap per Cache Pool instruction with a teacher answer, the gap
    its mean NLL per answer token, hard above the configured quantile of the pool's gaps (numpy's);
    no student answer, no review, no control pair."""
    records = jsonl(directory / "likelihoods.jsonl")
    assert len({r["id"] for r in records}) == len(records), "a gap computed twice"
    by_id = {r["id"]: r for r in records}
    gaps = [j["gap"] for j in judgements if j["gap"] is not None]
    threshold = float(numpy.quantile(gaps, config["discrimination"].get("likelihood_quantile", 0.5)))
    for judgement in judgements:
        if judgement["label"] == "unjudged":
            assert judgement["gap"] is None and judgement["id"] not in by_id
            continue
        record = by_id[judgement["id"]]
        assert judgement["gap"] == pytest.approx(record["nll"] / record["tokens"], abs=1e-5)
        assert judgement["label"] == ("hard" if judgement["gap"] > threshold + 1e-9 else "easy"), (judgement, threshold)
    summary = json.loads((directory / "discrimination.json").read_text())
    assert summary["signal"] == "likelihood" and summary["threshold"] == pytest.approx(threshold, abs=1e-5)
    report = json.loads((directory / "report.json").read_text())
    assert report["roles"]["student"]["calls"] == len(records) and report["roles"]["referee"]["calls"] == 0
    assert sum(b["count"] for b in report["likelihood_gaps"]["nll_histogram"]) == len(gaps)
    for name in ("student_answers.jsonl", "reviews.jsonl", "controls.jsonl"):
        assert not jsonl(directory / name) if (directory / name).exists() else True, name


def _check_no_discrimination(directory: Path, judgements: list[dict], config: dict, cache: list[dict], k: int) -> None:
    """signal none: nothing judged, every instruction a seed of both sides, each drawn uniformly with
    the stage's seeded RNG from the whole Cache Pool; the quotas are the referee's loop's."""
    assert {j["label"] for j in judgements} == {"any"}
    for call in jsonl(directory / "generator_calls.jsonl"):
        draw = random.Random(request_seed(config["seed"], "generator-seed", k, call["side"], call["attempt"]))
        assert call["parent"] == cache[draw.randrange(len(cache))]["id"]
    report = json.loads((directory / "report.json").read_text())
    assert report["roles"]["student"]["calls"] == report["roles"]["referee"]["calls"] == 0
    wanted = config["generation"]["new_per_iteration"]
    assert report["generation"]["quota"]["hard"] == round(wanted * config["generation"]["hard_ratio"])
    for name in ("student_answers.jsonl", "reviews.jsonl", "controls.jsonl", "likelihoods.jsonl"):
        assert not (directory / name).exists(), name
