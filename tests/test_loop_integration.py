"""The whole adversarial loop on the tiny models, for real: `lion-local run` as a user runs it.

The teacher is a real vLLM process (vLLM's CPU build, started with `lion-local serve teacher` on
configs/tiny-cpu.yaml) behind a recording proxy, configured as an external endpoint, so that the
requests that reached the teacher are counted from the server's side, not from lion-local's own
journal. The referee works in mode expected_score (structured outputs and top_logprobs, each
score the expectation over the score tokens); the other modes' smoke runs are tests/test_vllm.py
(scores_only) and the runs on `transformers serve` (explain_first). The student is served by the
run itself and trained with TRL under `accelerate launch`.

test_run_end_to_end: an uninterrupted run at the roles' sampling temperatures, with real-valued
expected scores in every judgement; every invariant
of the method and the run-directory contract; `status` and a second `run` on the complete run;
`plan`, made before the run, within 10% of the calls the run made, per role; `report`'s table in
report.md checked number by number against the journals, its plots, and the student's
TensorBoard event files.
Killed runs, endpoint faults and dead servers: tests/test_fault_tolerance.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from statistics import fmean
from pathlib import Path

import pytest
import yaml

from loop_checks import (
    check_invariants,
    jsonl,
    lion_local,
    run_config,
    served_teacher,
    start_proxy,
    stop,
    teacher_deliveries,
    tiny_config,
)
from serving.process import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TAU = 0.02  # see test_run_end_to_end


@pytest.fixture(scope="module")
def vllm_teacher_url(tiny_models: Path, tmp_path_factory) -> str:
    """The tiny teacher on vLLM for this module only: an idle vLLM worker still keeps a core busy."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm/ (vLLM's CPU build): `make install` creates it on CPU machines")
    directory = tmp_path_factory.mktemp("vllm-teacher")
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    smoke = tiny_config(tiny_models, directory / "serve-run")
    data.update(run_dir=smoke["run_dir"], seed_data=smoke["seed_data"], tiny_models=smoke["tiny_models"])
    port = free_port()
    data["servers"]["teacher"].update(model=str(tiny_models / "teacher"), port=port)
    data["servers"]["teacher"]["vllm"]["launcher"][0] = str(VLLM_PYTHON)
    config = directory / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    with served_teacher(config, port, timeout_s=300) as url:
        yield url


def test_run_end_to_end(tiny_models: Path, vllm_teacher_url: str, tmp_path: Path) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = start_proxy(vllm_teacher_url, proxy_log)
    try:
        config = run_config(tiny_models, tmp_path, proxy_url, on_vllm=True, referee_mode="expected_score")
        # The tiny referee's expected scores of two answers differ by hundredths (its distributions
        # hardly depend on the answers), so the paper's tau of 1.0 would label every pair easy.
        data = yaml.safe_load(config.read_text())
        data["discrimination"]["tau"] = TAU
        config.write_text(yaml.safe_dump(data))
        # The plan of the demo's config, made before the run, for the run to be checked against.
        plan = subprocess.run(lion_local("plan", "--config", str(config), "--json"), capture_output=True, text=True)
        assert plan.returncode == 0, plan.stderr[-3000:]
        assert not (tmp_path / "run").exists()  # planning writes nothing
        result = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop(proxy)
    run_dir = tmp_path / "run"
    everything = check_invariants(run_dir, tiny_models, tau=TAU)

    # expected_score: every review is the constrained two-score reply, every judgement an expectation.
    for k in ("1", "2"):
        reviews = jsonl(run_dir / f"iter_{k}/reviews.jsonl")
        assert reviews and all(r["scores"] is not None and len(r["raw"].split()) == 2 for r in reviews)
        judged = [j for j in jsonl(run_dir / f"iter_{k}/judgements.jsonl") if j["label"] != "unjudged"]
        assert judged and any(not float(j["teacher_score"]).is_integer() for j in judged)

    # Every distinct instruction reached the teacher exactly once, as the server side saw it.
    deliveries = teacher_deliveries(proxy_log, everything)
    assert set(deliveries) == {r["id"] for r in everything}
    assert {len(times) for times in deliveries.values()} == {1}

    status = subprocess.run(lion_local("status", "--config", str(config)), capture_output=True, text=True)
    assert status.returncode == 0
    assert "complete" in status.stdout.splitlines()[0]
    assert status.stdout.count(" done ") == 7

    again = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "is complete: nothing to do" in again.stdout
    assert "server" not in again.stderr  # nothing was started

    # `plan` before the run predicted every role's calls within 10%. The generator's depend on how
    # many replies pass, which varies between runs (sampling at temperature 1.0, concurrent
    # requests); its first wave is sized so that it fills the quota in 95% of sides, so a second
    # wave, the only source of difference, is rare and small.
    made = {role: sum(json.loads(path.read_text())["roles"].get(role, {}).get("calls", 0)
                      for path in run_dir.glob("*/report.json")) for role in ("teacher", "student", "referee", "generator")}
    predicted = json.loads(plan.stdout)["totals"]
    for role, calls in made.items():
        assert abs(predicted[role]["calls"] - calls) <= 0.1 * calls, (role, predicted[role]["calls"], calls)

    check_report(run_dir, config)
    for name in ("iter_1", "iter_2", "final"):  # the student's training curves, offline
        assert list((run_dir / "tensorboard" / name).glob("events.out.tfevents.*")), name

    # `export`: every trained instruction with a non-empty teacher answer, each judged Cache Pool.
    from lion_local.run.seed_data import load_seed_instructions

    out = tmp_path / "export"
    exported = subprocess.run(lion_local("export", "--config", str(config), "--out", str(out), "--hf"), capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-3000:]
    empty = {r["id"] for r in jsonl(run_dir / "teacher_answers.jsonl") if r["empty"]}
    trained = [r for name in ("iter_1", "iter_2", "final") for r in jsonl(run_dir / name / "train_pool.jsonl") if r["id"] not in empty]
    assert len(jsonl(out / "train.messages.jsonl")) == len(load_seed_instructions(out / "train.alpaca.json")) == len(trained)
    cache = sum(len(jsonl(run_dir / f"iter_{k}/cache_pool.jsonl")) for k in (1, 2))
    assert len(jsonl(out / "cache_pool.judgements.jsonl")) == cache
    assert (out / "hf" / "dataset_dict.json").exists()


def _table(markdown: str, heading: str) -> dict[str, list[str]]:
    """A markdown table under `heading`: first cell of each row -> the other cells."""
    section = markdown.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()]
    return {row[0]: row[1:] for row in rows if not set(row[1]) <= {"-", ":"}}


def check_report(run_dir: Path, config: Path) -> None:
    """report.md's summary against the journals, one iteration column at a time."""
    result = subprocess.run(lion_local("report", "--config", str(config)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].split() == ["iter", "1", "iter", "2", "final"]
    table = _table((run_dir / "report.md").read_text(), "Summary per iteration")
    assert table[""] == ["iter 1", "iter 2", "final"]
    teacher_stages = Counter(r["stage"] for r in jsonl(run_dir / "teacher_answers.jsonl"))
    for column, k in enumerate(("1", "2")):
        directory = run_dir / f"iter_{k}"
        judgements = jsonl(directory / "judgements.jsonl")
        judged = [j for j in judgements if j["label"] != "unjudged"]
        labels = Counter(j["label"] for j in judgements)
        expected = {
            "Train Pool": len(jsonl(directory / "train_pool.jsonl")),
            "Cache Pool": len(jsonl(directory / "cache_pool.jsonl")),
            "generated": len(jsonl(directory / "generated.jsonl")),
            "hard": labels["hard"], "easy": labels["easy"], "unjudged": labels["unjudged"],
            # report.json keeps 4 decimals, the table shows 2
            "mean teacher score": f"{round(fmean(j['teacher_score'] for j in judged), 4):.2f}",
            "mean student score": f"{round(fmean(j['student_score'] for j in judged), 4):.2f}",
            "rejected": len(jsonl(directory / "rejected.jsonl")),
            "teacher calls (imitation)": teacher_stages[f"{k}/imitation"],
            "student calls (discrimination)": len(jsonl(directory / "student_answers.jsonl")),
            "referee calls (discrimination)": len(jsonl(directory / "reviews.jsonl")) + len(jsonl(directory / "controls.jsonl")),
            "control pairs": len({c["id"] for c in jsonl(directory / "controls.jsonl")}),
            "generator calls (generation)": len(jsonl(directory / "generator_calls.jsonl")),
        }
        for label, value in expected.items():
            assert table[label][column] == str(value), (k, label, table[label][column], value)
    assert table["Train Pool"][2] == str(len(jsonl(run_dir / "final/train_pool.jsonl")))
    assert table["teacher calls (imitation)"][2] == str(teacher_stages["final/imitation"])

    plots = sorted(path.name for path in (run_dir / "plots").glob("*.png"))
    assert plots == ["cost.png", "gaps.png", "generation.png", "labels.png", "pools.png", "referee.png", "scores.png"]
    for name in plots:
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name[:-4]}](plots/{name})" in (run_dir / "report.md").read_text()
